"""Command-line entry points: `train` and `generate-resume-command`.

Commands are thin: they gather options and call the package. Domain errors (bad options, bad
data, bad checkpoints) become one red line on stderr and exit code 1, here and only here.
Heavy imports (torch) happen inside the commands, so `--help` and `--list-checkpoints` stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import config
from .checkpoint import CheckpointError, CheckpointManager, CheckpointOptions, NoCheckpointError, read_footer
from .config import ConfigError, DataError, TrainConfig
from .progress import configure_logging, err_console

_D = TrainConfig()


def _opt(name: str, help: str, default: Any = None, **kw: Any) -> Any:
    """An option whose absence is None, so that lower-precedence sources can fill it in."""
    shown = getattr(_D, name.split("/")[0].replace("-", "_"), default)
    return typer.Option(f"--{name}", help=help, show_default=str(shown) if shown is not None else False, **kw)


Int = Optional[int]
Float = Optional[float]
Str = Optional[str]
Bool = Optional[bool]


def train(
    data: Annotated[Str, _opt("data", "Text file, directory of .txt, or directory of .npy/.bin token shards. "
                                      "Default: a corpus built from the Python standard library's sources.")] = None,
    vocab_size: Annotated[Int, _opt("vocab-size", "Vocabulary size (default: 256 for text, from the shards otherwise).")] = None,
    n_layer: Annotated[Int, _opt("n-layer", "Transformer blocks.")] = None,
    n_head: Annotated[Int, _opt("n-head", "Attention heads (must divide --n-embd).")] = None,
    n_embd: Annotated[Int, _opt("n-embd", "Embedding width.")] = None,
    block_size: Annotated[Int, _opt("block-size", "Context length in tokens.")] = None,
    dropout: Annotated[Float, _opt("dropout", "Dropout probability.")] = None,
    batch_size: Annotated[Int, _opt("batch-size", "Sequences per optimizer step.")] = None,
    mini_batch_size: Annotated[Int, _opt("mini-batch-size", "Sequences per forward/backward (gradient accumulation).")] = None,
    lr: Annotated[Float, _opt("lr", "Peak learning rate (after warmup).")] = None,
    min_lr: Annotated[Float, _opt("min-lr", "Learning rate at the end of the cosine decay.")] = None,
    warmup_steps: Annotated[Int, _opt("warmup-steps", "Linear warmup steps.")] = None,
    weight_decay: Annotated[Float, _opt("weight-decay", "AdamW weight decay (matrices only).")] = None,
    grad_clip: Annotated[Float, _opt("grad-clip", "Clip the global gradient norm (0 disables).")] = None,
    num_epochs: Annotated[Int, _opt("num-epochs", "Passes over the training split.")] = None,
    max_steps: Annotated[Int, _opt("max-steps", "Stop after this optimizer step, even mid-epoch.")] = None,
    eval_interval: Annotated[Int, _opt("eval-interval", "Steps between evaluations.")] = None,
    eval_steps: Annotated[Int, _opt("eval-steps", "Held-out batches per evaluation.")] = None,
    seed: Annotated[Int, _opt("seed", "Random seed: the same command twice gives identical losses on CPU.")] = None,
    device: Annotated[Str, _opt("device", "auto, cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[Str, _opt("dtype", "float32, bfloat16 or float16 (autocast).")] = None,
    compile: Annotated[Bool, _opt("compile/--no-compile", "torch.compile the model.")] = None,
    checkpoint_dir: Annotated[Str, _opt("checkpoint-dir", "Checkpoint directory (env CHECKPOINT_DIR).")] = None,
    checkpoint_freq: Annotated[Str, _opt("checkpoint-freq", "Steps between rolling checkpoints, or 'auto' "
                                                            "(env CHECKPOINT_FREQ).")] = None,
    keep_checkpoints: Annotated[Int, _opt("keep-checkpoints", "Rolling checkpoints to keep (env CHECKPOINT_KEEP_LAST).")] = None,
    keep_emergency_checkpoints: Annotated[Int, _opt("keep-emergency-checkpoints", "Emergency checkpoints to keep.")] = None,
    metric: Annotated[Str, _opt("metric", "Metric that decides best_model.pt (val_loss or train_loss).")] = None,
    mode: Annotated[Str, _opt("mode", "min or max: which direction of --metric is better.")] = None,
    min_free_space: Annotated[Str, _opt("min-free-space", "Skip a save rather than leave less free disk than "
                                                          "this (e.g. 10GB, 500MiB).")] = None,
    async_save: Annotated[Bool, typer.Option("--async-save/--no-async-save", show_default="async",
                                             help="Write checkpoints in the background.")] = None,
    mtbf: Annotated[Str, _opt("mtbf", "Expected time between failures for --checkpoint-freq auto (e.g. 24h).")] = None,
    log_dir: Annotated[Str, _opt("log-dir", "Directory for metrics.jsonl and TensorBoard files.")] = None,
    metrics_file: Annotated[Str, _opt("metrics-file", "JSON-lines metrics file (default <log-dir>/metrics.jsonl).")] = None,
    use_tensorboard: Annotated[Bool, _opt("use-tensorboard/--no-use-tensorboard", "Also write TensorBoard event files to --log-dir.")] = None,
    sample_length: Annotated[Int, _opt("sample-length", "Bytes of text to sample from the best model at the end.")] = None,
    resume: Annotated[Str, typer.Option("--resume", help="latest, best, auto (resume if possible, else start "
                                                         "fresh), a file name in --checkpoint-dir, or a path.")] = None,
    config_file: Annotated[Str, typer.Option("--config", help="TOML file of options (below env and command line).")] = None,
    list_checkpoints: Annotated[bool, typer.Option("--list-checkpoints", help="List the checkpoint directory and exit.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="With --list-checkpoints: print JSON.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="With --list-checkpoints: re-check every checksum.")] = False,
) -> None:
    """Train a GPT on the built-in corpus or your data, checkpointing so that no training is lost.

    Run with no options for the demo: a small model on the Python standard library's sources,
    a few minutes on a laptop CPU.
    """
    given = {k: v for k, v in locals().items() if k in config.OPTION_NAMES and v is not None}
    configure_logging()
    try:
        if list_checkpoints:
            from .listing import list_checkpoints as show

            directory = config.resolve(cli=given, environ=os.environ, config_file=config_file,
                                       check=False).checkpoint_dir
            raise typer.Exit(show(Path(directory), as_json=json_output, verify=verify))
        raise typer.Exit(_train(given, resume, config_file))
    except (ConfigError, DataError, CheckpointError) as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def checkpoint_options(cfg: TrainConfig) -> CheckpointOptions:
    return CheckpointOptions(
        keep_rolling=cfg.keep_checkpoints, keep_emergency=cfg.keep_emergency_checkpoints,
        save_every=cfg.checkpoint_freq if isinstance(cfg.checkpoint_freq, int) else None,
        metric=cfg.metric, mode=cfg.mode, min_free_bytes=cfg.min_free_space, async_save=cfg.async_save,  # type: ignore[arg-type]
    )


def _train(given: dict[str, Any], resume: str | None, config_file: str | None) -> int:
    from .metrics import MetricsLogger
    from .progress import RichProgress
    from .resume_command import print_changes
    from .signals import GracefulStop
    from .trainer import Trainer

    stored = None
    if resume not in (None, "latest", "best", "auto") and (os.sep in resume or resume.startswith((".", "~"))):
        stored = _footer_args(Path(resume).expanduser())  # a path elsewhere also brings its checkpoint dir
    pre = config.resolve(cli=given, environ=os.environ, config_file=config_file, stored=stored, check=False)
    directory = Path(pre.checkpoint_dir)
    manager, state, info = None, None, None
    try:
        if resume is not None and (directory.is_dir() or resume not in ("latest", "best", "auto")):
            manager = CheckpointManager(directory, checkpoint_options(pre))  # the lock comes before reading
            try:
                state, info = manager.restore("latest" if resume == "auto" else resume)
            except NoCheckpointError:
                if resume != "auto":
                    raise
        if resume in ("latest", "best") and state is None:
            raise CheckpointError(f"no checkpoint to resume from in {directory}; run without --resume to "
                                  "start, or use --resume auto in job scripts")
        if resume == "auto" and state is None:
            err_console.print(f"no checkpoint in {directory}: starting fresh (--resume auto)")
        if resume is None and directory.is_dir():
            latest = CheckpointManager(directory, read_only=True).latest_step()
            if latest is not None:
                raise CheckpointError(f"{directory} already holds checkpoints (up to step {latest}); pass "
                                      "--resume latest to continue that run, or choose another --checkpoint-dir")
        cfg = config.resolve(cli=given, environ=os.environ, config_file=config_file,
                             stored=state["args"] if state else None)
        if state is not None:
            print_changes(state["args"], cfg.to_dict(), title="Changes from the checkpoint's options")
        # Data and model are built, and so checked, before a fresh run writes anything.
        trainer = Trainer(cfg, progress=RichProgress())
        if state is not None and info is not None:
            trainer.load_state_dict(state)
        if manager is None:
            manager = CheckpointManager(cfg.checkpoint_dir, checkpoint_options(cfg))
        manager.options = checkpoint_options(cfg)
        metrics = MetricsLogger(cfg.metrics_path, tensorboard_dir=Path(cfg.log_dir) if cfg.use_tensorboard else None)
        try:
            if info is not None:
                metrics.log("resume", path=str(info.path), step=trainer.step)
                err_console.print(f"resumed from {info.path} at step {trainer.step}", highlight=False)
            with GracefulStop() as stop:
                code = trainer.run(stop, manager, metrics)
            if code == 0:
                if (text := trainer.sample(cfg.sample_length)) is not None:
                    err_console.rule("sample from the best model")
                    print(text)
                val = f"{trainer.val_loss:.4f}" if trainer.val_loss is not None else "-"
                err_console.print(f"done: step {trainer.step}, val_loss {val}, checkpoints in {cfg.checkpoint_dir}",
                                  highlight=False)
            return code
        finally:
            metrics.close()
    finally:
        if manager is not None:
            manager.close()


def _footer_args(path: Path) -> dict[str, Any] | None:
    try:
        return read_footer(path).get("args")
    except CheckpointError:
        return None  # restore() reports the problem with the full fallback story


def generate_resume_command(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file (a path, or a name inside --checkpoint-dir).")],
    compare: Annotated[bool, typer.Option("--compare", help="Show old vs new values and classify each change.")] = False,
    ctx: typer.Context = typer.Option(None, hidden=True),
) -> None:
    """Print the full `train` command that resumes from CHECKPOINT, every original option spelled out.

    Extra `--OPTION VALUE` pairs are proposed changes: with --compare, a table shows each old and new
    value and whether the change is harmless, changes the trajectory, or is incompatible (exit 1).
    """
    from .resume_command import main

    configure_logging()
    try:
        raise typer.Exit(main(checkpoint, ctx.args, compare=compare))
    except (ConfigError, CheckpointError) as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _normalize_argv(argv: list[str]) -> list[str]:
    """Accept the underscore spellings of older docs (--checkpoint_freq) as aliases of --checkpoint-freq."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(train)
    app(args=_normalize_argv(sys.argv[1:]), prog_name="train")


def resume_command_main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(generate_resume_command)
    app(args=_normalize_argv(sys.argv[1:]), prog_name="generate-resume-command")
