"""One `train` invocation: what to resume, the final options, the trainer, the store.

Order matters for the promise "bad input touches nothing": options are resolved and the data and
model are built (and so checked) before a fresh run creates its checkpoint directory or log file.
When resuming, the directory lock is taken before anything is read.

Under torchrun, rank 0 alone opens the checkpoint directory (its lock, the fallback chain) and
tells the other ranks which file it chose; every rank then loads that file and resolves the same
options, so all ranks fail alike on bad input and train alike otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console

from . import config, distributed, parallel
from .checkpoint import CheckpointError, CheckpointManager, CheckpointOptions, NoCheckpointError, read_footer
from .checkpoint.fileformat import load_checkpoint
from .checkpoint.layout import is_explicit_path
from .checkpoint.records import describe
from .checkpoint.remote import RemoteStore, mask
from .checkpoint.storage import temp_path_for
from .config import ConfigError, DataError, TrainConfig
from .overrides import MODEL_SHAPE
from .progress import err_console
from .resume_command import continued_args, print_changes
from .save_points import MIRROR_CATCH_UP_S
from .task import Task, TaskError, load_task, options_as_dict


def checkpoint_options(cfg: TrainConfig) -> CheckpointOptions:
    return CheckpointOptions(
        keep_rolling=cfg.keep_checkpoints, keep_emergency=cfg.keep_emergency_checkpoints,
        save_every=cfg.checkpoint_freq if isinstance(cfg.checkpoint_freq, int) else None,
        metric=cfg.metric, mode=cfg.mode, keep_best=cfg.keep_best, min_free_bytes=cfg.min_free_space,  # type: ignore[arg-type]
        async_save=cfg.async_save, mirror=cfg.mirror, mirror_options=cfg.mirror_storage_options(),
    )


def run_session(given: dict[str, Any], *, resume: str | None, config_file: str | None,
                init_from: str | None = None) -> int:
    """Run `train` with the options given on the command line; return the exit code."""
    import torch

    if resume is not None and init_from is not None:
        raise ConfigError("--init-from starts a new run from a checkpoint's weights and --resume continues one: "
                          "give only one of them")
    d = distributed.from_environment()
    if not d.is_main:
        logging.getLogger("train_improved").setLevel(logging.ERROR)  # rank 0 speaks for the run
    stored = shape = None
    if resume not in (None, "latest", "best", "auto") and is_explicit_path(resume):
        stored = _footer_args(Path(resume).expanduser())  # a path elsewhere also brings its checkpoint dir
    elif init_from is not None:
        stored = shape = _model_shape(Path(init_from).expanduser())
    pre = config.resolve(cli=given, environ=os.environ, config_file=config_file, stored=stored, check=False)
    use_cuda = pre.device.startswith("cuda") or (pre.device == "auto" and torch.cuda.is_available())
    distributed.init(d, "cuda" if use_cuda else "cpu")
    try:
        code = _run(d, given, resume, config_file, pre, init_from, shape)
    except BaseException:
        distributed.shutdown(d, together=False)
        raise
    distributed.shutdown(d, together=True)
    return code


def _run(d: distributed.Dist, given: dict[str, Any], resume: str | None, config_file: str | None,
         pre: TrainConfig, init_from: str | None, shape: dict[str, Any] | None) -> int:
    from .metrics import MetricsLogger
    from .progress import RichProgress
    from .signals import GracefulStop
    from .trainer import NoProgress, Trainer

    own_disks = pre.fsdp and d.enabled and not _directory_is_shared(d, Path(pre.checkpoint_dir))
    manager, state, info = _choose_checkpoint(d, pre, resume)
    code = 1
    try:
        stored = None
        if state is not None:
            if not isinstance(state.get("args"), dict):
                raise CheckpointError(f"{info.path} holds no train options: it was written by another training "
                                      "loop, so resume it with the loop that wrote it")
            stored = continued_args(state["args"], info.path)
        cfg, task = _resolve_with_task(given, config_file, stored if stored is not None else shape)
        if stored is not None:
            old = {**stored, "world_size": int(state.get("world_size", 1))}
            now = {**cfg.to_dict(), "world_size": d.world_size, **({"task_digest": task.digest} if task else {})}
            print_changes(old, now, title="Changes from the checkpoint's options",
                          console=Console(stderr=True, quiet=not d.is_main))
        # Data and model are built, and so checked, before a fresh run writes anything.
        progress = RichProgress(log_interval=cfg.log_interval) if d.is_main else NoProgress()
        upload = _shards_from_their_nodes(d, cfg, manager) if own_disks else None
        trainer = Trainer(cfg, progress=progress, task=task, collect_shards=own_disks and upload is None,
                          upload_shards=upload)
        if task is not None:
            config.check_best_metric(cfg, trainer.workload.metric_names)
        if state is not None:
            try:
                trainer.load_state_dict(state, info.path)
            finally:
                if info.path.parent.name.startswith(RECEIVED_PREFIX):  # sent by rank 0: loaded, not kept
                    shutil.rmtree(info.path.parent)
        elif init_from is not None:
            _load_weights(trainer, Path(init_from).expanduser())
            if d.is_main:
                err_console.print(f"weights from {_describe_weights(Path(init_from).expanduser())}; the optimizer, "
                                  "schedule and step count start afresh", highlight=False, soft_wrap=True)
        if d.is_main:  # a mirror is checked before anything is written; the first save takes its prefix
            if manager is None:
                manager = CheckpointManager(cfg.checkpoint_dir, checkpoint_options(cfg))
            else:
                manager.options = checkpoint_options(cfg)  # opened with the options known before the checkpoint's
        metrics = MetricsLogger(cfg.metrics_path, tensorboard_dir=Path(cfg.log_dir) if cfg.use_tensorboard else None,
                                enabled=d.is_main)
        try:
            if d.is_main:
                for line in trainer.describe():
                    err_console.print(line, highlight=False, soft_wrap=True)
            if info is not None:
                lineage = {"run": manager.run_id, "parent": info.meta.get("lineage", {}).get("run")} \
                    if manager is not None else {}
                metrics.log("resume", path=str(info.path), step=trainer.step, **lineage)
                if d.is_main:
                    err_console.print(f"resumed from {info.path.resolve()} at step {trainer.step}", highlight=False,
                                      soft_wrap=True)
            elif init_from is not None:
                metrics.log("init_from", path=str(init_from), step=0)
            with GracefulStop() as stop:
                code = trainer.run(stop, manager, metrics)
            if code == 0 and d.is_main:
                if (text := trainer.sample(cfg.sample_length)) is not None:
                    err_console.rule("sample from the best model")
                    print(text)
                val = f"{trainer.val_loss:.4f}" if trainer.val_loss is not None else "-"
                measured = "".join(f", {k} {v:.4f}" for k, v in trainer.val_metrics.items())
                err_console.print(f"done: step {trainer.step}, val_loss {val}{measured}, checkpoints in "
                                  f"{cfg.checkpoint_dir}", highlight=False, soft_wrap=True)
            return code
        finally:
            metrics.close()
    finally:
        if manager is not None:
            # A finished run has waited for the mirror (save_points.finish), a stopped one for its emergency
            # checkpoint's upload (--emergency-budget); a failed one gives the mirror its chance here.
            manager.close(mirror_wait=0 if code == 0 or code >= 128 else MIRROR_CATCH_UP_S)


def _resolve_with_task(given: dict[str, Any], config_file: str | None, stored: dict[str, Any] | None
                       ) -> tuple[TrainConfig, Task | None]:
    """The final options and, with --task, the imported task: its DEFAULTS sit below every given option,
    and its options are stored whole (defaults included), as parsed."""
    cfg = config.resolve(cli=given, environ=os.environ, config_file=config_file, stored=stored, check=False)
    if cfg.task is None:
        return config.resolve(cli=given, environ=os.environ, config_file=config_file,
                              stored=stored).with_absolute_paths(), None
    task = load_task(cfg.task, cfg.task_options)
    defaults = getattr(task.module, "DEFAULTS", None) or {}
    if not isinstance(defaults, dict):
        raise TaskError(f"--task {cfg.task}: DEFAULTS must be a dict of train's options")
    cfg = config.resolve(cli=given, environ=os.environ, config_file=config_file, stored=stored,
                         task_defaults=defaults).with_absolute_paths()
    return dataclasses.replace(cfg, task_options=options_as_dict(task)), task


def _shards_from_their_nodes(d: distributed.Dist, cfg: TrainConfig, manager: CheckpointManager | None
                             ) -> Callable[[Path, str], None] | None:
    """--fsdp on nodes without a shared directory: how the shards of each save reach one place.

    With a mirror, each node uploads the shard files it wrote (returned: the upload), and rank 0's
    store lists them as on the mirror; without one, rank 0 collects them (None).
    """
    if not cfg.mirror:
        if d.is_main:
            err_console.print(f"--fsdp: not every node sees {cfg.checkpoint_dir} (disks of their own): rank 0 "
                              "collects the shards of every save over the process group", highlight=False,
                              soft_wrap=True)
        return None
    if d.is_main:
        err_console.print(f"--fsdp: not every node sees {cfg.checkpoint_dir} (disks of their own): each node "
                          f"uploads its shards to the mirror, and {cfg.checkpoint_dir} here holds this node's",
                          highlight=False, soft_wrap=True)
        # The mirror's start-up sweep removes objects no manifest lists: done before any node uploads.
        if manager is not None and not manager.open_mirror(wait=60.0):
            err_console.print("warning: the mirror did not open within 60 s; the first save's shards may not reach it",
                              highlight=False, soft_wrap=True)
    distributed.gather(d, None)  # every node waits for that sweep
    if manager is not None and manager.remote is not None:
        return manager.remote.upload_shard  # rank 0's store: no second connection for an upload it never makes
    return RemoteStore.open(cfg.mirror, cfg.mirror_storage_options(), check_writable=False).upload_shard


def _directory_is_shared(d: distributed.Dist, directory: Path) -> bool:
    """Whether every rank sees rank 0's checkpoint directory: a file rank 0 creates there must appear for all.

    --fsdp: every rank writes its shards into it. Nodes with disks of their own at the same path do
    not see each other's files; rank 0 then collects the shards (`sharded.collect_on_rank_0`).
    """
    probe = None
    if d.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temp_path_for(directory / "shared-directory-probe")  # swept by the store if left behind
        probe.touch()
    try:
        name = distributed.gather(d, probe.name if probe is not None else None)[0]
        return all(distributed.gather(d, _appears(directory / name)))
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)


def _appears(path: Path, within: float = 2.0) -> bool:
    """Whether `path` exists now or within `within` seconds (a network filesystem may show a new name late)."""
    deadline = time.monotonic() + within
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _choose_checkpoint(d: distributed.Dist, pre: TrainConfig, resume: str | None
                       ) -> tuple[CheckpointManager | None, dict[str, Any] | None, Any]:
    """Rank 0 locks the directory and picks the file (with fallback); the other ranks load that file."""
    manager, state, info, error = None, None, None, None
    if d.is_main:
        try:
            manager, state, info = _open_and_restore(pre, resume)
        except (CheckpointError, ConfigError, DataError) as e:
            error = e
    if not d.enabled:
        if error is not None:
            raise error
        return manager, state, info
    chosen = (str(info.path), info.meta.get("digest")) if info else None
    chosen, failed = distributed.gather(d, (chosen, error is not None))[0]
    if error is not None:
        raise error
    if failed:
        raise ConfigError("rank 0 could not start the run (see its message)")
    if chosen is not None:
        state, info = _same_checkpoint_on_every_rank(d, Path(chosen[0]), chosen[1], state, info)
    return manager, state, info


RECEIVED_PREFIX = "train-improved-received-"  # a checkpoint a rank received from rank 0, aside


def _same_checkpoint_on_every_rank(d: distributed.Dist, path: Path, digest: str | None, state: Any, info: Any
                                   ) -> tuple[dict[str, Any], Any]:
    """Every rank loads the checkpoint rank 0 chose: from its own disk where it holds the same file, else
    (another node, no shared disk) sent by rank 0 over the process group, streamed to a copy aside on
    its disk and verified like any checkpoint there.

    A sharded checkpoint is sent file by file, and its copy is kept: the receiving rank's `info`
    names it, DCP reads the shards from there, and `_run` deletes it after loading.
    """
    holds = d.is_main or (path.exists() and _footer_digest(path) == digest)
    seen = distributed.gather(d, (holds, sorted(p.name for p in path.iterdir()) if d.is_main and path.is_dir()
                                  else None))  # one round: who holds it, and a sharded one's files
    lacking = [rank for rank, (held, _) in enumerate(seen) if not held]
    files = seen[0][1]  # None: one file
    copy = Path(tempfile.mkdtemp(prefix=RECEIVED_PREFIX)) / path.name if d.rank in lacking else None
    if copy is not None and files is not None:
        copy.mkdir()
    for name in (files if files is not None else [None]) if lacking else []:  # every rank takes part in each
        source, target = (path, copy) if name is None else (path / name, copy and copy / name)
        with open(target, "wb") if target is not None else nullcontext() as f:
            distributed.broadcast_file(d, source if d.is_main else None, into=f)
    if copy is None:  # rank 0, or a rank whose disk holds the checkpoint too (rank 0's node, a shared disk)
        if not d.is_main:
            state, _ = load_checkpoint(path, shards=False)  # rank 0 has just verified every shard file
            info = describe(path)
        return state, info
    try:
        state, footer = load_checkpoint(copy)  # verified here too: every digest, safe loading
        if footer.get("digest") != digest:
            raise CheckpointError(f"the copy of {path.name} received from rank 0 is not the checkpoint it chose")
        info = describe(copy)
    except BaseException:
        shutil.rmtree(copy.parent)
        raise
    if files is None:  # one file: all of it is in `state` now
        shutil.rmtree(copy.parent)
        return state, dataclasses.replace(info, path=path)
    return state, info


def _footer_digest(path: Path) -> str | None:
    try:
        return read_footer(path).get("digest")
    except CheckpointError:
        return None


def _open_and_restore(pre: TrainConfig, resume: str | None
                      ) -> tuple[CheckpointManager | None, dict[str, Any] | None, Any]:
    """Lock the directory and restore `resume` along the fallback chain, the local store first, then the mirror."""
    directory = Path(pre.checkpoint_dir)
    # The store seeds its best tracking from --metric and --mode as it restores: refused first. A task's
    # metrics are known once it runs, and recorded in its checkpoints: a resumed run's newest one says them.
    task_metrics = None
    if resume is not None and directory.is_dir():
        newest = CheckpointManager(directory, read_only=True).latest()
        args = (newest.meta.get("args") or {}) if newest is not None and newest.ok else {}
        if args.get("task") and (pre.task is None or pre.task == args["task"]):
            pre = dataclasses.replace(pre, task=args["task"])
            task_metrics = args.get("task_metrics")
    config.check_best_metric(pre, task_metrics)
    manager, state, info = None, None, None
    try:
        if resume is not None and (directory.is_dir() or resume not in ("latest", "best", "auto") or pre.mirror):
            manager = CheckpointManager(directory, checkpoint_options(pre))  # the mirror is checked, then the lock
            which = "latest" if resume == "auto" else resume
            if "://" in which:  # one object of a mirror: --resume s3://bucket/run/rolling_step_000500.pt
                url, name = which.rsplit("/", 1)
                source = RemoteStore.open(url, pre.mirror_storage_options(), check_writable=False)
                state, info = manager.restore(source.fetch(name, directory))
            else:
                try:
                    state, info = manager.restore(which)  # the local store's chain, then the mirror's
                except NoCheckpointError:
                    if resume != "auto":
                        raise
        if resume in ("latest", "best") and state is None:
            raise CheckpointError(f"no checkpoint to resume from in {directory}; run without --resume to "
                                  "start, or use --resume auto in job scripts")
        if resume == "auto" and state is None:
            err_console.print(f"no checkpoint in {directory}: starting fresh (--resume auto)", soft_wrap=True)
        if resume is None and directory.is_dir():
            latest = CheckpointManager(directory, read_only=True).latest_step()
            if latest is not None:
                raise CheckpointError(f"{directory} already holds checkpoints (up to step {latest}); pass "
                                      "--resume latest to continue that run, or choose another --checkpoint-dir")
        if resume is None and pre.mirror:
            remote = RemoteStore.open(pre.mirror, pre.mirror_storage_options())  # before anything is written
            if held := remote.manifest():
                # A new run would make the bucket's inventory two runs' at once: refused, as for the local store.
                newest = max((e.step or 0) for e in held.values())
                raise CheckpointError(f"the mirror {mask(remote.url)} already holds checkpoints (up to step "
                                      f"{newest}); pass --resume latest to continue that run, or choose another "
                                      "--mirror prefix")
    except BaseException:
        if manager is not None:
            manager.close(mirror_wait=0)
        raise
    return manager, state, info


def _footer_args(path: Path) -> dict[str, Any] | None:
    try:
        args = read_footer(path).get("args")
    except CheckpointError:
        return None  # restore() reports the problem with the full fallback story
    return continued_args(args, path) if isinstance(args, dict) else None


# ---------------------------------------------------------------------- --init-from: weights only


def _model_shape(path: Path) -> dict[str, Any]:
    """The model-shape options of the checkpoint a fine-tuning run starts from (its footer's `args`, or a
    safetensors file's metadata)."""
    if not path.exists():
        raise CheckpointError(f"--init-from {path}: no such checkpoint")
    if path.suffix == ".safetensors":
        from .export import safetensors_shape

        return safetensors_shape(path)
    try:
        args = read_footer(path).get("args")
    except CheckpointError as e:
        raise CheckpointError(f"--init-from {path}: {e}") from None
    return {k: v for k, v in args.items() if k in MODEL_SHAPE} if isinstance(args, dict) else {}


def _describe_weights(path: Path) -> str:
    if path.suffix == ".safetensors":
        from .export import read_safetensors

        meta = read_safetensors(path)[1]
        return f"{path.resolve()} (exported from {meta.get('source_name', '?')}, step {meta.get('step', '?')})" \
            if "source_name" in meta else str(path.resolve())
    footer = read_footer(path)
    return f"{path.resolve()} (step {footer.get('step')}, run {(footer.get('lineage') or {}).get('run', '?')})"


def _load_weights(trainer: Any, path: Path) -> None:
    """A new run starting from a checkpoint's weights: the optimizer, schedule and step start afresh."""
    if path.suffix == ".safetensors":  # ours or anyone's: names and shapes must match the model
        from .export import check_fits, read_safetensors

        weights = read_safetensors(path)[0]
        check_fits(trainer.raw_model.state_dict(), weights, f"--init-from {path}")
    elif path.is_dir():
        from .checkpoint.fileformat import verify_file
        from .checkpoint.sharded import load_model_state

        verify_file(path)
        weights = load_model_state(path)
    else:
        weights = load_checkpoint(path)[0].get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"--init-from {path}: the checkpoint holds no model weights")
    parallel.load_full_weights(trainer.raw_model, weights, fsdp=trainer.cfg.fsdp)
