"""When the trainer saves, and how it ends: save points, emergency saves, the final commit.

    saves = SavePoints(trainer)
    saves.after_step(stop)            # evaluation, best, rolling and epoch saves that are due now
    saves.emergency_stop(signum)      # a stop request: one emergency checkpoint, exit 128 + signum
    saves.finish()                    # the final state committed (exit 0), or exit 3 if it could not be

Every save is a collective under torchrun (the state is gathered, shards are written by every
rank); rank 0 alone holds the store and decides, and tells the other ranks what it decided.
"""

from __future__ import annotations

import logging
import math
import shlex
import signal
import time
from typing import Any, Protocol

from . import distributed
from .checkpoint import CheckpointManager, Kind, SaveResult, sharded
from .checkpoint.records import human_bytes
from .config import TrainConfig, format_duration
from .metrics import MetricsLogger
from .signals import GracefulStop

logger = logging.getLogger("train_improved")
EXIT_NOT_DURABLE = 3  # training ended, but its final state could not be committed (disk full, I/O errors)
MIRROR_CATCH_UP_S = 300.0  # at the normal end, how long the run waits for its mirror


AUTO_FIRST_INTERVAL = 250  # steps between rolling saves under --checkpoint-freq auto before any cost is known


class Loop(Protocol):
    """What the save points read of the training loop (trainer.Trainer); they never write its fields."""

    cfg: TrainConfig
    dist: distributed.Dist
    device: str
    step: int
    epoch: int
    epoch_ended: bool  # the last step finished an epoch
    updating: bool  # inside the optimizer update: the state is not consistent
    step_time: float | None  # seconds per step (moving average)
    last_eval_step: int
    manager: CheckpointManager | None  # rank 0's store; None on the other ranks
    metrics: MetricsLogger | None
    shard_writer: sharded.ShardWriter | None
    stored_args: dict[str, Any]

    def state_dict(self) -> dict[str, Any]: ...
    def metrics_now(self) -> dict[str, float]: ...
    def eval_due(self, step: int) -> bool: ...
    def evaluate_and_record(self, stop: GracefulStop) -> dict[str, float] | None: ...


class SavePoints:
    """The save cadence of a run (`every`, which --checkpoint-freq auto retunes from measured costs) and
    how it ends. `state_dict()` is part of every checkpoint, so a resumed run keeps its cadence."""

    def __init__(self, loop: Loop) -> None:
        self.t = loop
        self.cfg = loop.cfg
        # --checkpoint-freq auto starts at the default interval until a save has been timed.
        self.every = self.cfg.checkpoint_freq if isinstance(self.cfg.checkpoint_freq, int) else AUTO_FIRST_INTERVAL
        self.save_cost: float | None = None  # the loop's stall of the last committed save

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "step_time": self.t.step_time, "save_cost": self.save_cost}

    def load_state_dict(self, auto: dict[str, Any]) -> None:
        """A checkpoint's `checkpoint_freq_auto`: kept only under --checkpoint-freq auto."""
        if self.cfg.checkpoint_freq == "auto":
            self.every = auto.get("every") or self.every
            self.save_cost = auto.get("save_cost")

    def announce(self) -> None:
        if self.cfg.checkpoint_freq == "auto" and self.t.manager is not None:
            known = "" if self.save_cost is None else f" (resumed: save cost {self.save_cost:.3f}s)"
            logger.info("checkpoint interval: every %d steps %s(--checkpoint-freq auto, MTBF %s)%s",
                        self.every, "" if known else "until a save has been timed ",
                        format_duration(self.cfg.mtbf), known)

    def after_step(self, stop: GracefulStop) -> None:
        t = self.t
        if t.manager is not None:
            self.log(t.manager.poll())
        kinds = []
        if t.eval_due(t.step):
            kinds += self.evaluate_and_save(stop, save=False)
        if self.every and t.step % self.every == 0:
            kinds.append(Kind.ROLLING)
        if t.epoch_ended:
            kinds.append(Kind.EPOCH)
        self.save(kinds)

    def evaluate_and_save(self, stop: GracefulStop, save: bool = True) -> list[Kind]:
        t = self.t
        measured = t.evaluate_and_record(stop)
        if measured is None:
            return []
        val = measured["val_loss"]
        # Rank 0's store holds the one best tracker; every rank must take the same decision (a save is collective).
        improved = t.manager is not None and t.manager.is_improvement(t.metrics_now())
        improved = distributed.any_rank(t.dist, improved, t.device)
        if t.manager is not None:
            best = t.manager.best_value
            note = "new best" if improved else f"best {self.cfg.metric} {best:.4f}" if best is not None else "no best"
            shown = "".join(f", {k} {v:.4f}" for k, v in measured.items() if k != "val_loss")
            logger.info("step %d: val_loss %.4f%s (%s)", t.step, val, shown, note)
        top = distributed.any_rank(t.dist, t.manager is not None and t.manager.enters_top(t.metrics_now()), t.device)
        kinds = [Kind.BEST] * improved + [Kind.TOP] * top
        if save:
            self.save(kinds)
        return kinds

    def save(self, kinds: list[Kind], final: bool = False) -> None:
        t = self.t
        if final:
            if distributed.any_rank(t.dist, self._committed(), t.device):
                return  # the final state is already committed
        if not kinds:
            return
        self.checkpoint(kinds)
        if t.manager is not None:
            # The save just made (synchronous) or the one before it (async) is done: log it now, so
            # the auto interval below uses the newest measured cost.
            self.log(t.manager.poll())
            if self.cfg.checkpoint_freq == "auto":
                self._retune()
        if t.dist.enabled:
            self.every = distributed.gather(t.dist, self.every)[0]  # rank 0 measured the cost
            distributed.barrier(t.dist)

    def checkpoint(self, kinds: list[Kind], emergency_budget: float | None = None,
                   since: float | None = None) -> list[SaveResult]:
        """Save the current state as `kinds`. Every rank calls this: gathering the state is collective.

        Rank 0 hands the state to the store. Under --fsdp every rank first starts writing its
        shards (DCP) into a staging directory that rank 0's store names: the loop waits only for
        their copy to host memory, and the store commits once every rank's files are durable.
        An emergency save (`emergency_budget` counted from `since`, or None on a crash) is waited for;
        returns its results.
        """
        t = self.t
        started = time.perf_counter()
        state = t.state_dict()
        shards = None
        if t.shard_writer is not None:
            tensors = sharded.split_tensors(state.pop("model"), state["optimizer"])
            state["sharded"] = True
            staging = t.manager.staging_directory() if t.manager is not None else None
            shards = t.shard_writer.start(distributed.gather(t.dist, staging)[0], tensors)
        if t.manager is None:
            return []
        options = dict(epoch=t.epoch, metrics=t.metrics_now(), args=t.stored_args, shards=shards,
                       meta={"world_size": t.dist.world_size, "eval_step": t.last_eval_step})
        if Kind.EMERGENCY in kinds:
            return t.manager.emergency_save(state, step=t.step, budget=emergency_budget, since=since,
                                            stall_before=time.perf_counter() - started, **options)
        t.manager.save(state, step=t.step, kinds=kinds, stall_before=time.perf_counter() - started, **options)
        return []

    def wait_for_saves(self) -> None:
        t = self.t
        if t.shard_writer is not None:
            t.shard_writer.wait()  # this rank's shards; rank 0's store waits for everyone's
        if t.manager is not None:
            self.log(t.manager.wait_until_finished())

    def log(self, results: list[SaveResult]) -> None:
        """One metrics record and one log line per committed save (the store has warned of failures)."""
        t = self.t
        assert t.manager is not None and t.metrics is not None
        for r in results:
            if r.error:
                continue
            lag = {} if t.manager.mirror is None else {"mirror_lag_steps": t.manager.mirror.lag(r.step)}
            t.metrics.log("checkpoint", step=r.step, kind=r.kind.value, path=str(t.manager.directory / r.name),
                          bytes=r.bytes, stall_s=r.stall_s, write_s=r.write_s, cleanup_s=r.cleanup_s, **lag)
            # The file's size, and what the save wrote when that differs (the file and its independent copy).
            written = f", {human_bytes(r.bytes)} written with its copy" if r.bytes != r.file_bytes else ""
            logger.info("saved %s (step %d, %s%s, stall %.3fs, write %.2fs)", r.name, r.step,
                        human_bytes(r.file_bytes), written, r.stall_s, r.write_s)
            self.save_cost = r.stall_s
        for sync in t.manager.mirror_events():  # the second tier: how far the mirror lags
            lag = t.step - (sync["mirrored_step"] or 0)
            t.metrics.log("mirror", step=t.step, mirrored_step=sync["mirrored_step"], mirror_lag_steps=lag,
                          upload_s=sync["upload_s"], upload_bytes=sync["upload_bytes"])
            if sync["upload_bytes"]:
                logger.info("mirrored up to step %s (lag %d steps; %s in %.2fs)", sync["mirrored_step"], lag,
                            human_bytes(sync["upload_bytes"]), sync["upload_s"])

    def _retune(self) -> None:
        """--checkpoint-freq auto: Young's interval sqrt(2 * cost * MTBF), in steps, from measured costs."""
        t = self.t
        if self.save_cost is None or not t.step_time:
            return
        cost = max(self.save_cost, 1e-3)
        every = max(1, round(math.sqrt(2 * cost * self.cfg.mtbf) / t.step_time))
        if every != self.every:
            logger.info("checkpoint interval: every %d steps (save cost %.3fs, MTBF %s)", every, cost,
                        format_duration(self.cfg.mtbf))
            self.every = every

    def _committed(self) -> bool:
        """Whether latest.pt holds the current step, on this line of training (rank 0's view)."""
        t = self.t
        latest = t.manager.latest() if t.manager is not None else None
        return latest is not None and latest.ok and latest.step == t.step and t.manager.on_current_line(latest)

    # ------------------------------------------------------------------ how a run ends

    def agreed_signal(self, stop: GracefulStop) -> int | None:
        """The stop signal any rank received, the same on every rank; None if none did."""
        seen = [s for s in distributed.gather(self.t.dist, stop.signum) if s is not None]
        return seen[0] if seen else None

    def finish(self) -> int:
        """Commit the final state; 0 if it is durable, EXIT_NOT_DURABLE (naming the last durable step) if not."""
        t = self.t
        self.wait_for_saves()
        self.save([Kind.ROLLING], final=True)  # latest.pt holds the final state
        self.wait_for_saves()
        distributed.barrier(t.dist)
        if distributed.any_rank(t.dist, t.manager is not None and not self._committed(), t.device):
            if t.manager is not None:
                latest = t.manager.latest()
                last = f"step {latest.step} ({latest.name})" if latest is not None and latest.ok else "none"
                logger.error("training reached step %d but its final state could not be saved (see the warnings "
                             "above); the last durable checkpoint is %s. Resume with: %s", t.step, last,
                             resume_hint(self.cfg, t.dist))
            return EXIT_NOT_DURABLE
        if t.manager is not None and t.manager.mirror is not None and t.manager.mirror.stopped is None:
            # Before the run reports done, so the last syncs land in the metrics too. (A mirror that
            # stopped for good, fenced off by a newer run, has said why; there is nothing to wait for.)
            logger.info("waiting for the mirror to catch up (up to %s)", format_duration(MIRROR_CATCH_UP_S))
            if not t.manager.mirror.request(wait=MIRROR_CATCH_UP_S):
                logger.warning("the mirror did not catch up within %s: it holds up to step %s",
                               format_duration(MIRROR_CATCH_UP_S), t.manager.mirror.mirrored_step)
            self.log([])
        return 0

    def emergency_stop(self, signum: int, since: float | None = None) -> int:
        """Write the emergency checkpoint; --emergency-budget counts from `since` (when this rank saw the
        signal; now, on a rank that learned it from another)."""
        t = self.t
        since = since if since is not None else time.monotonic()
        logger.warning("received %s: saving an emergency checkpoint at step %d", signal.Signals(signum).name, t.step)
        started = time.perf_counter()
        self.wait_for_saves()  # commits stay in order
        results = self.checkpoint([Kind.EMERGENCY], emergency_budget=self.cfg.emergency_budget, since=since)
        if t.manager is None:
            distributed.barrier(t.dist)  # rank 0 commits the one emergency checkpoint
            return 128 + signum
        self.log(results)
        done = [r for r in results if r.kind is Kind.EMERGENCY and not r.error]
        if done:
            logger.warning("emergency checkpoint %s written in %.1fs; resume with: %s", done[0].name,
                           time.perf_counter() - started, resume_hint(self.cfg, t.dist))
        else:
            latest = t.manager.latest()
            logger.error("the emergency checkpoint could not be saved; the last durable checkpoint is step %s. "
                         "Resume with: %s", latest.step if latest is not None and latest.ok else "none",
                         resume_hint(self.cfg, t.dist))
        distributed.barrier(t.dist)
        return 128 + signum

    def emergency_after_crash(self) -> None:
        t = self.t
        if t.dist.enabled:
            # The other ranks may be blocked in a collective, so the state cannot be gathered;
            # torchrun stops them. latest.pt is the last consistent state.
            logger.error("training failed at step %d on rank %d; under torchrun no emergency checkpoint is "
                         "written after a crash: resume from latest.pt", t.step, t.dist.rank)
            return
        if t.updating or t.manager is None:
            logger.error("the error hit during the optimizer update, so the in-memory state is inconsistent: "
                         "no emergency checkpoint; latest.pt is intact")
            return
        logger.error("training failed at step %d: writing an emergency checkpoint before the traceback", t.step)
        try:
            self.wait_for_saves()
            self.log(self.checkpoint([Kind.EMERGENCY]))
        except Exception as e:  # noqa: BLE001 - the original error matters more; report this one and go on
            logger.error("the emergency checkpoint also failed: %s", e)


def resume_hint(cfg: TrainConfig, d: distributed.Dist) -> str:
    """The command that resumes this run, typed where it was started (the stored options do the rest)."""
    words = ["train"] if not d.enabled else ["torchrun", "--nproc_per_node", str(d.world_size), "-m", "train_improved"]
    words += ["--resume", "latest"]
    if cfg.checkpoint_dir != TrainConfig.checkpoint_dir:
        words += ["--checkpoint-dir", cfg.checkpoint_dir]
    return shlex.join(words)
