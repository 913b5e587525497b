"""How a change of option between a checkpoint and a resume affects the run: one table, shared by
`train --resume` and `generate-resume-command --compare`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Effect(str, Enum):
    HARMLESS = "harmless"  # logging, evaluation and checkpoint cadence: same weights, same losses
    ELASTIC = "elastic"  # another number of ranks: the same windows and schedule, another reduction order
    TRAJECTORY = "changes the trajectory"  # a valid resume, but no longer the run that was started
    INCOMPATIBLE = "incompatible"  # the checkpoint cannot be loaded into what these options build


MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
EFFECTS: dict[str, Effect] = {
    **dict.fromkeys([*MODEL_SHAPE, "fsdp"], Effect.INCOMPATIBLE),
    **dict.fromkeys(["data", "dropout", "batch_size", "mini_batch_size", "lr", "min_lr", "warmup_steps",
                     "weight_decay", "grad_clip", "num_epochs", "max_steps", "seed", "device", "dtype",
                     "compile", "task", "task_digest"], Effect.TRAJECTORY),
    **dict.fromkeys(["eval_interval", "eval_steps", "checkpoint_dir", "checkpoint_freq", "keep_checkpoints",
                     "keep_emergency_checkpoints", "metric", "mode", "min_free_space", "async_save", "mtbf",
                     "emergency_budget", "log_dir", "log_interval", "metrics_file", "use_tensorboard",
                     "sample_length", "mirror", "mirror_options", "num_workers", "keep_best"], Effect.HARMLESS),
    "world_size": Effect.ELASTIC,  # not an option: the number of processes torchrun starts
}
WHY = {
    Effect.INCOMPATIBLE: "model shape, vocabulary or sharding: the saved state does not fit",
    Effect.TRAJECTORY: "optimization, schedule, data or numerics: losses will differ from the original run",
    Effect.ELASTIC: "same data order, same schedule; the floating-point reduction order changes",
    Effect.HARMLESS: "logging, evaluation or checkpoint cadence: training itself is unchanged",
}
# What a change does beyond its class, where that is not obvious.
NOTES = {
    "data": "other data: the run keeps its weights, optimizer and step and starts a new epoch on it "
            "(the same content under another path continues exactly where it was)",
    "task_digest": "the task file's source changed since the checkpoint: if its model's parameters no longer "
                   "match, the resume is refused when the weights are loaded",
    "num_workers": "the same samples with the same augmentation: only how many processes read them",
    "metric": "best tracking starts again with the new metric; best_model_previous.pt keeps the old best",
    "mode": "best tracking starts again in the new direction; best_model_previous.pt keeps the old best",
}


@dataclass(frozen=True)
class Change:
    option: str
    old: Any
    new: Any
    effect: Effect

    @property
    def flag(self) -> str:
        if self.option == "task_digest":
            return "task source (digest)"
        name = self.option.removeprefix(TASK_OPTION)  # one of the task's own options
        return "ranks (world size)" if self.option == "world_size" else "--" + name.replace("_", "-")


PATH_OPTIONS = frozenset({"data", "checkpoint_dir", "log_dir", "metrics_file"})


def _same(option: str, a: Any, b: Any) -> bool:
    # `checkpoints` and the absolute path of the same directory are one directory, not a change.
    if option.startswith(TASK_OPTION):  # typed in the checkpoint, maybe a string on the command line
        return str(a) == str(b)
    if option in PATH_OPTIONS and isinstance(a, str) and isinstance(b, str):
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return a == b


TASK_OPTION = "task_options."


def _flat(args: dict[str, Any]) -> dict[str, Any]:
    """A task's options as options of their own, so each change is one row."""
    out = {k: v for k, v in args.items() if k != "task_options"}
    out.update({TASK_OPTION + k: v for k, v in (args.get("task_options") or {}).items()})
    return out


def classify(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every option whose value differs, with its effect; unknown options (a task's) count as trajectory changes."""
    old, new = _flat(old), _flat(new)
    return [Change(k, old.get(k), new[k], EFFECTS.get(k, Effect.TRAJECTORY))
            for k in new if k in old and not _same(k, old[k], new[k])]


def incompatible(changes: list[Change]) -> list[Change]:
    return [c for c in changes if c.effect is Effect.INCOMPATIBLE]
