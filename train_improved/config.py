"""Training options: one dataclass, human units, and the precedence of SPEC §3.

Precedence, highest first: command line > environment > --config FILE.toml > the resumed
checkpoint's stored args > the defaults below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A bad option value, file or combination; the CLI prints it as one line and exits 1."""


class DataError(Exception):
    """Unusable data given by the user (missing path, too little data, bad shards)."""


@dataclass
class TrainConfig:
    # your model and data (task.py): None trains the built-in GPT below
    task: str | None = None  # a task file (my_task.py) or module (pkg.my_task)
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the task's own options
    # DataLoader worker processes reading the samples; 0 reads in the loop; None: 2 for a --task, 0 for the
    # built-in GPT (a window is a slice of a memory-mapped shard: workers would only add copies)
    num_workers: int | None = None
    # data
    data: str | None = None  # None: the built-in corpus made from the Python standard library's sources
    vocab_size: int | None = None  # None: 256 for bytes, else taken from the token shards
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 96  # on 2 CPU cores, 96 wide for 1650 steps beats 128 wide for the same minutes
    block_size: int = 128  # context length in tokens
    dropout: float = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
    # optimization
    batch_size: int = 32  # sequences per optimizer step
    mini_batch_size: int = 32  # sequences per forward/backward (follows batch_size unless given): accumulation
    lr: float = 3e-3  # small models tolerate a high peak learning rate
    min_lr: float | None = None  # cosine decay ends here; None: lr/10 (per Chinchilla), so it follows --lr
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    num_epochs: int = 1
    max_steps: int | None = 1650  # stop after this optimizer step even mid-epoch; None: run num_epochs
    # evaluation
    eval_interval: int = 200  # steps between evaluations
    eval_steps: int = 20  # held-out batches per evaluation
    # system
    seed: int = 1337
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; float16 adds a GradScaler)
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard model and optimizer with FSDP2, checkpoint them with DCP
    # checkpointing
    checkpoint_dir: str = "checkpoints"
    checkpoint_freq: int | str = 250  # steps between rolling checkpoints, or "auto" (Young's formula)
    keep_checkpoints: int = 10  # rolling checkpoints kept; best, epoch and emergency are kept separately
    keep_emergency_checkpoints: int = 10
    metric: str = "val_loss"  # decides best_model.pt: val_loss, train_loss, or a metric a --task reports
    mode: str = "min"  # min | max
    keep_best: int = 0  # also keep the K best evaluations by --metric as best_step_NNNNNN.pt; 0: the best triple only
    min_free_space: int = 0  # bytes that must stay free after a save, e.g. "10GB"
    async_save: bool = True  # the loop only waits for a copy into reused buffers
    mtbf: float = 86400.0  # expected seconds between failures, for --checkpoint-freq auto
    emergency_budget: float = 25.0  # seconds an emergency save may take (SIGKILL follows SIGTERM after ~30 s)
    mirror: str | None = None  # a second tier, any fsspec URL (s3://bucket/run, file:///mnt/nfs/run): survives the machine
    mirror_options: str | None = None  # JSON storage_options for the mirror (endpoint_url...); never stored
    # logging
    log_dir: str = "runs"
    log_interval: float = 60.0  # seconds between progress lines when stderr is not a terminal (a batch log)
    metrics_file: str | None = None  # None: <log_dir>/metrics.jsonl
    use_tensorboard: bool = False
    sample_length: int = 300  # the length asked of the sample from the best model at the end (the GPT: bytes); 0 disables

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stored_args(self) -> dict[str, Any]:
        """The options as a checkpoint keeps them: no secrets (the mirror's options are left out, its URL masked)."""
        from .checkpoint.remote import mask

        args = self.to_dict()
        args.pop("mirror_options")
        if args["mirror"]:
            args["mirror"] = mask(args["mirror"])
        return args

    def mirror_storage_options(self) -> dict[str, Any]:
        """--mirror-options as a dict (validated to be a JSON object)."""
        return parse_mirror_options(self.mirror_options)

    def with_absolute_paths(self) -> TrainConfig:
        """--data (and a --task file) made absolute, as a run stores it: a resume typed in another directory
        (`train --resume /runs/a/checkpoints/latest.pt`) reads the same data. Logs are written where
        the command runs (relative --log-dir / --metrics-file), which suits a new machine too."""
        out = self
        if self.data is not None:
            out = dataclasses.replace(out, data=str(Path(self.data).expanduser().absolute()))
        if self.task is not None and (self.task.endswith(".py") or Path(self.task).expanduser().exists()):
            out = dataclasses.replace(out, task=str(Path(self.task).expanduser().absolute()))  # a file, not a module
        return out

    @property
    def final_lr(self) -> float:
        """The learning rate at the end of the cosine decay: --min-lr, else a tenth of --lr."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics_file) if self.metrics_file else Path(self.log_dir) / "metrics.jsonl"


OPTION_NAMES = [f.name for f in fields(TrainConfig)]
# The built-in GPT's own options: a --task brings its model and data, so these would be silently ignored.
GPT_OPTIONS = ("data", "vocab_size", "n_layer", "n_head", "n_embd", "block_size", "dropout")
METRICS = ("val_loss", "train_loss")  # what the trainer measures, so what --metric may name
ENV_VARS = {"CHECKPOINT_DIR": "checkpoint_dir", "CHECKPOINT_KEEP_LAST": "keep_checkpoints",
            "CHECKPOINT_FREQ": "checkpoint_freq", "CHECKPOINT_MIRROR": "mirror",
            "CHECKPOINT_MIRROR_OPTIONS": "mirror_options"}

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_size(value: Any) -> int:
    """'10GB' -> 10_000_000_000, '500MiB' -> 524_288_000, 42 -> 42."""
    return int(_parse_with_units(value, _SIZE_UNITS, "size", "10GB or 500MiB"))


def parse_duration(value: Any) -> float:
    """'24h' -> 86400.0, '90m' -> 5400.0, 30 -> 30.0 (seconds)."""
    return _parse_with_units(value, _DURATION_UNITS, "duration", "24h, 90m or 3600")


def format_duration(seconds: float) -> str:
    """86400 -> '1d', 5400 -> '1.5h', 90 -> '1.5m', 0.05 -> '0.05s': what parse_duration reads back."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"


def _parse_with_units(value: Any, units: dict[str, int], what: str, example: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a {what} like {example}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m[2].lower() not in units:
            raise ValueError(f"expected a {what} like {example}, got {value!r}")
        number, unit = float(m[1]), m[2].lower()
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"a {what} cannot be negative or infinite, got {value!r}")
    return number * units[unit]


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_optional_int(value: Any) -> int | None:
    return None if value is None or str(value).lower() in ("none", "") else _parse_int(value)


def _parse_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a whole number, got {value!r}") from None


def _parse_freq(value: Any) -> int | str:
    return "auto" if str(value).strip().lower() == "auto" else _parse_int(value)


def _parse_optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _parse_task_options(value: Any) -> dict[str, Any]:
    """A [task_options] table (TOML), a dict (the command line, a checkpoint), or a JSON object."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError("expected a table of the task's options")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _parse_optional_float(value: Any) -> float | None:
    return None if value is None or str(value).lower() in ("none", "") else float(value)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "data": _parse_optional_str, "metrics_file": _parse_optional_str, "mirror": _parse_optional_str,
    "mirror_options": _parse_optional_str, "task": _parse_optional_str, "task_options": _parse_task_options,
    "vocab_size": _parse_optional_int, "max_steps": _parse_optional_int, "num_workers": _parse_optional_int,
    "checkpoint_freq": _parse_freq, "min_free_space": parse_size, "mtbf": parse_duration,
    "emergency_budget": parse_duration, "log_interval": parse_duration, "min_lr": _parse_optional_float,
}
for _f in fields(TrainConfig):
    if _f.name not in _PARSERS:
        _PARSERS[_f.name] = {int: _parse_int, float: float, bool: parse_bool, str: str}[type(_f.default)]


def coerce(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Parse raw values (strings from env/TOML, typed from the CLI) into TrainConfig types."""
    out, problems = {}, []
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in _PARSERS:
            problems.append(f"unknown option {key!r} in {source}")
            continue
        try:
            out[name] = _PARSERS[name](raw)
        except ValueError as e:
            problems.append(f"--{name.replace('_', '-')} ({source}): {e}")
    if problems:
        raise ConfigError("; ".join(problems))
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Options from a TOML file: top-level keys named like the options (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    if isinstance(data.get("train"), dict):  # also accept the options under a [train] table
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    return coerce(data, f"config file {path}")


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    return coerce({opt: environ[var] for var, opt in ENV_VARS.items() if environ.get(var)}, "environment")


def resolve(*, cli: Mapping[str, Any], environ: Mapping[str, str], config_file: str | None,
            stored: Mapping[str, Any] | None = None, check: bool = True,
            task_defaults: Mapping[str, Any] | None = None) -> TrainConfig:
    """Merge the sources by precedence and (unless check=False) validate the result.

    `task_defaults` (a task's DEFAULTS) sit just above the built-in defaults; a task run has no
    --max-steps unless one is given (the 1650 steps are the demo's).
    """
    merged: dict[str, Any] = {}
    if task_defaults is not None:
        merged.update({"max_steps": None, **coerce(task_defaults, "the task's DEFAULTS")})
    if stored:
        merged.update({k: v for k, v in stored.items() if k in _PARSERS})  # a newer version may have dropped some
    given: dict[str, Any] = {}
    if config_file:
        given.update(load_toml(config_file))
    given.update(from_env(environ))
    cli_values = coerce(cli, "command line")
    task_options = {**merged.get("task_options", {}), **given.get("task_options", {}),
                    **cli_values.get("task_options", {})}  # one option of the task overrides one, not all
    given.update(cli_values)
    if check and (merged.get("task") or given.get("task")):
        if wrong := [k for k in GPT_OPTIONS if k in given]:
            raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in wrong)}: an option of the built-in "
                              "GPT; with --task, the task builds the model and data (its own options: "
                              "train --task FILE --help)")
    merged.update(given)
    merged["task_options"] = task_options
    if "batch_size" in merged and "mini_batch_size" not in merged:
        merged["mini_batch_size"] = merged["batch_size"]  # no gradient accumulation unless asked for
    cfg = TrainConfig(**merged)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Collect every problem and raise once, each saying how to fix it."""
    p = []
    for name in ("num_workers", "keep_best"):
        if (getattr(cfg, name) or 0) < 0:
            p.append(f"--{name.replace('_', '-')} cannot be negative (got {getattr(cfg, name)})")
    positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "mini_batch_size", "num_epochs",
                "eval_interval", "eval_steps", "keep_checkpoints", "keep_emergency_checkpoints"]
    for name in positive:
        if getattr(cfg, name) < 1:
            p.append(f"--{name.replace('_', '-')} must be a positive number (got {getattr(cfg, name)})")
    if cfg.n_head >= 1 and cfg.n_embd % cfg.n_head:
        p.append(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    if cfg.mini_batch_size >= 1 and cfg.batch_size % cfg.mini_batch_size:
        p.append(f"--batch-size {cfg.batch_size} must be a multiple of --mini-batch-size {cfg.mini_batch_size}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        p.append(f"--max-steps must be a positive number of steps (got {cfg.max_steps})")
    if isinstance(cfg.checkpoint_freq, int) and cfg.checkpoint_freq < 1:
        p.append(f"--checkpoint-freq must be a positive number of steps or 'auto' (got {cfg.checkpoint_freq})")
    if cfg.vocab_size is not None and cfg.vocab_size < 1:
        p.append(f"--vocab-size must be positive (got {cfg.vocab_size})")
    for name in ("lr", "weight_decay", "grad_clip", "warmup_steps", "seed", "sample_length"):
        if getattr(cfg, name) < 0:
            p.append(f"--{name.replace('_', '-')} cannot be negative (got {getattr(cfg, name)})")
    if cfg.min_lr is not None and cfg.min_lr < 0:
        p.append(f"--min-lr cannot be negative (got {cfg.min_lr})")
    elif cfg.min_lr is not None and cfg.lr > 0 and cfg.min_lr > cfg.lr:
        p.append(f"--min-lr {cfg.min_lr} cannot exceed --lr {cfg.lr} (leave --min-lr out to follow --lr: lr/10)")
    p += _best_metric_problems(cfg)
    if not 0.0 <= cfg.dropout < 1.0:
        p.append(f"--dropout must be in [0, 1) (got {cfg.dropout})")
    if cfg.device not in ("auto", "cpu", "mps") and not re.fullmatch(r"cuda(:\d+)?", cfg.device):
        p.append(f"--device must be auto, cpu, cuda, cuda:N or mps (got {cfg.device!r})")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        p.append(f"--dtype must be float32, bfloat16 or float16 (got {cfg.dtype!r})")
    if cfg.emergency_budget <= 0:
        p.append(f"--emergency-budget must be a positive duration (got {cfg.emergency_budget})")
    if cfg.mtbf <= 0:
        p.append(f"--mtbf must be a positive duration (got {cfg.mtbf})")
    try:
        cfg.mirror_storage_options()
    except ConfigError as e:
        p.append(str(e))
    if cfg.log_interval <= 0:
        p.append(f"--log-interval must be a positive duration (got {cfg.log_interval})")
    if p:
        raise ConfigError("; ".join(p))


def _best_metric_problems(cfg: TrainConfig, task_metrics: list[str] | None = None) -> list[str]:
    """`task_metrics`: what a task's metrics() reports (None: not known yet, any name is taken for now)."""
    p = []
    if cfg.task is not None and task_metrics is not None and cfg.metric not in (*METRICS, *task_metrics):
        p.append(f"--metric {cfg.metric!r} is not a metric this run produces: choose "
                 f"{', '.join((*METRICS, *task_metrics))} (task metrics come from its metrics() function)")
    elif cfg.task is None and cfg.metric not in METRICS:
        p.append(f"--metric {cfg.metric!r} is not a metric this run produces: choose {' or '.join(METRICS)}")
    if cfg.mode not in ("min", "max"):
        p.append(f"--mode must be min or max (got {cfg.mode!r})")
    return p


def check_best_metric(cfg: TrainConfig, task_metrics: list[str] | None = None) -> None:
    """--metric and --mode alone, before a resume reads a checkpoint's best record with them."""
    if p := _best_metric_problems(cfg, task_metrics):
        raise ConfigError("; ".join(p))


def parse_mirror_options(text: str | None) -> dict[str, Any]:
    """--mirror-options (or CHECKPOINT_MIRROR_OPTIONS) as a dict; ConfigError in one line if it is not a JSON object."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as e:
        options = e
    if not isinstance(options, dict):
        why = f" ({options})" if isinstance(options, ValueError) else ""
        raise ConfigError(f"--mirror-options (or CHECKPOINT_MIRROR_OPTIONS) must be a JSON object like "
                          f"'{{\"endpoint_url\": \"http://...\"}}'{why}")
    return options


def batch_split(batch_size: int, mini_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank per step; a world size that cannot share the batch evenly is refused."""
    micro = batch_size // mini_batch_size
    if batch_size % mini_batch_size == 0 and micro % world_size == 0:
        return micro // world_size
    works = ", ".join(str(n) for n in range(1, micro + 1) if micro % n == 0)
    raise ConfigError(f"--batch-size {batch_size} is {micro} micro-batches of --mini-batch-size {mini_batch_size}, "
                      f"which {world_size} ranks cannot share evenly; run on {works} rank(s), or change the sizes")
