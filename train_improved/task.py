"""A task: your model and data, trained by `train --task FILE.py` with every guarantee the built-in GPT has.

A task is a Python file (or an importable module: `--task pkg.module`) of plain functions; no base
class, nothing to register:

    @dataclass
    class Options:                 # optional: the task's own options (--width 64, or [task_options] in a TOML file)
        width: int = 32

    DEFAULTS = {"num_epochs": 10}  # optional: train's options for this task, below anything given

    def model(options) -> torch.nn.Module
    def datasets(options) -> tuple[Dataset, Dataset]   # training and held-out, map-style: len() and [i]
    def loss(model, batch) -> torch.Tensor              # a scalar; `model` may be wrapped (DDP)
    def metrics(model, batch) -> dict[str, float]       # optional: held-out means, e.g. {"accuracy": ...}
    def collate(samples) -> batch                       # optional: default torch's default_collate
    def param_groups(model, weight_decay) -> list[dict] # optional: AdamW's groups (default: decay matrices)
    def fsdp_units(model) -> list[torch.nn.Module]      # optional: --fsdp shards each on its own (its blocks)
    def sample(model, length, seed) -> str | None       # optional: shown at the end, from the best model
    def describe(model, options) -> str                 # optional: the banner's model line

A dataset may also carry (all optional): `at_epoch(epoch, rng)` on the training set, returning
it as that epoch reads it (choices shared by the epoch, drawn from its generator), `position(i)`
(a dict recorded with the data position), `fingerprint` (a string: other data under a resumed
run starts a new epoch), `tokens_per_sample` (throughput in tokens/s) and `description` (the
banner's data line). The built-in GPT is a task written this way: gpt_task.py.

The runner reads the training set in a shuffled, resumable order, with DataLoader workers, and
runs every `train[i]` with the global generators seeded from (seed, epoch, i) (see samples.py).
Everything a user can get wrong here is found before anything is written: `load_task` imports
and checks the file, `Task.try_once` runs the model once on two samples of each set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .config import ConfigError, DataError, parse_bool

REQUIRED = ("model", "datasets", "loss")


class TaskError(ConfigError):
    """A task that cannot be trained: it does not import, lacks a function, returns the wrong thing."""


@dataclass
class Task:
    spec: str  # as given: a file path or a module name
    module: ModuleType
    source: Path
    options: Any  # an instance of the task's Options (or an empty namespace)
    builtin: bool = False  # the built-in GPT (gpt_task.py): its options are train's own flags

    @property
    def label(self) -> str:
        """How messages name the task."""
        return "the built-in GPT" if self.builtin else f"--task {self.spec}"

    @property
    def name(self) -> str:
        return self.source.name if self.source.suffix == ".py" and not self.spec.isidentifier() else self.spec

    @property
    def digest(self) -> str:
        """What identifies the task's code: the SHA-256 of its source file (first 16 hex digits)."""
        return source_digest(self.source)

    def has(self, function: str) -> bool:
        return callable(getattr(self.module, function, None))

    def call(self, function: str, *args: Any) -> Any:
        """One of the task's functions at setup: its exceptions become one line naming where they came from."""
        try:
            return getattr(self.module, function)(*args)
        except (ConfigError, DataError):
            raise  # already one line for the user (the built-in GPT's --data, say)
        except Exception as e:  # noqa: BLE001 - reported as the task's, in one line, before anything is written
            raise TaskError(f"{self.label}: {function}() raised {_where(e)}") from None

    def build(self) -> tuple[Any, Any, Any]:
        """(model, training set, held-out set), each checked to be what the runner needs."""
        import torch

        model = self.call("model", self.options)
        if not isinstance(model, torch.nn.Module):
            raise TaskError(f"{self.label}: model() returned {type(model).__name__}, not a torch.nn.Module")
        from .checkpoint.validation import check_plain_data

        try:
            check_plain_data(model.state_dict())
        except TypeError as e:
            raise TaskError(f"{self.label}: the model's state_dict cannot be checkpointed safely: {e}") from None
        sets = self.call("datasets", self.options)
        if not isinstance(sets, (tuple, list)) or len(sets) != 2:
            raise TaskError(f"{self.label}: datasets() must return (training set, held-out set)")
        for what, dataset in zip(("training", "held-out"), sets, strict=True):
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise TaskError(f"{self.label}: the {what} set is a {type(dataset).__name__}, not a map-style "
                                "dataset (len() and [i])")
            if len(dataset) == 0:
                raise TaskError(f"{self.label}: the {what} set is empty")
        return model, sets[0], sets[1]

    def try_once(self, model: Any, train: Any, held_out: Any, device: str, seed: int) -> list[str]:
        """Run the model once on two samples of each set (eval mode, generators put back, nothing learned):
        `loss` must be a scalar with a gradient, `metrics` a dict of numbers. Returns the metric names."""
        import torch

        from .samples import seeded_globals

        def first(dataset: Any) -> Any:
            try:
                samples = [dataset[i] for i in range(min(2, len(dataset)))]
            except Exception as e:  # noqa: BLE001 - the task's own code, reported in one line
                raise TaskError(f"{self.label}: reading a sample raised {_where(e)}") from None
            collate = self.module.collate if self.has("collate") else torch.utils.data.default_collate
            try:
                return to_device(collate(samples), device)
            except Exception as e:  # noqa: BLE001
                raise TaskError(f"{self.label}: collating two samples raised {_where(e)}") from None

        was_training = model.training
        model.eval()  # no dropout drawn, no batch-norm statistics moved
        try:
            with seeded_globals(seed):
                value = self.call("loss", model, first(train))
                if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.is_floating_point():
                    shape = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
                        else type(value).__name__
                    raise TaskError(f"{self.label}: loss() must return a scalar tensor, got {shape}")
                if not value.requires_grad:
                    raise TaskError(f"{self.label}: loss() returned a tensor without a gradient "
                                    "(computed under no_grad, or not from the model's parameters)")
                if not self.has("metrics"):
                    return []
                with torch.no_grad():
                    found = self.call("metrics", model, first(held_out))
        finally:
            model.train(was_training)
        if not isinstance(found, dict):
            raise TaskError(f"{self.label}: metrics() must return a dict of numbers, got {type(found).__name__}")
        for name, v in found.items():
            number = isinstance(v, (int, float)) and not isinstance(v, bool) or \
                isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex
            if not isinstance(name, str) or not name.isidentifier() or not number:
                raise TaskError(f"{self.label}: metrics() returned {name!r}: {type(v).__name__}; each metric "
                                "must be a number (a float or a one-element tensor) under a name like 'accuracy'")
            if name in ("loss", "val_loss", "train_loss"):
                raise TaskError(f"{self.label}: metrics() may not return {name!r}: the runner measures the loss")
        return sorted(found)


def to_device(batch: Any, device: str, non_blocking: bool = False) -> Any:
    """A batch (tensors in tuples, lists and dicts, as collate makes them) on the device."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def _where(e: BaseException) -> str:
    """`ValueError: bad width (digits.py:12)`: the exception and the innermost line of the task's own code."""
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if "train_improved" not in Path(f.filename).parts] or frames
    at = f" ({Path(own[-1].filename).name}:{own[-1].lineno})" if own else ""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}{at}"


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def locate(spec: str) -> Path:
    """The source file of a task spec (a .py path, or a module name), without importing it."""
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise TaskError(f"--task {spec}: no such file")
        return path.resolve()
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError) as e:
        raise TaskError(f"--task {spec}: cannot find the module ({e})") from None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        raise TaskError(f"--task {spec}: no such file or importable module")
    return Path(found.origin)


def load_task(spec: str, raw_options: dict[str, Any] | None = None) -> Task:
    """Import a task and parse its options; TaskError in one line if it cannot be trained."""
    source = locate(spec)
    try:
        if spec.endswith(".py") or Path(spec).expanduser().exists():
            module = _import_file(source)
        else:
            module = importlib.import_module(spec)
    except Exception as e:  # noqa: BLE001 - the user's file: one line, where it failed
        raise TaskError(f"--task {spec} does not import: {_where(e)}") from None
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise TaskError(f"--task {spec} defines no {', '.join(f'{m}()' for m in missing)}: a task needs "
                        "model(options), datasets(options) and loss(model, batch)")
    task = Task(spec, module, source, None)
    task.options = parse_options(task, raw_options or {})
    return task


def _import_file(source: Path) -> ModuleType:
    """A task file as a module that DataLoader workers can import by name, also where they are spawned
    (macOS, Windows): as its own name, from its directory appended to sys.path (which spawned children
    inherit), unless that name is taken by another module; then under a name of its own (workers must fork)."""
    name = source.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == source:
        return loaded  # this file, already imported by this process
    found = importlib.util.find_spec(name) if name.isidentifier() and loaded is None else None
    if name.isidentifier() and loaded is None and (found is None or Path(found.origin or "").resolve() == source):
        if found is None:  # its directory is not on sys.path yet (it is when the file is in the working directory)
            sys.path.append(str(source.parent))
            importlib.invalidate_caches()
        return importlib.import_module(name)
    name = f"train_improved_task_{name}_{source_digest(source)[:8]}".replace("-", "_")
    loader = importlib.util.spec_from_file_location(name, source)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # forked workers and pickling find it by name
    try:
        loader.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def option_fields(task: Task) -> list[dataclasses.Field[Any]]:
    cls = getattr(task.module, "Options", None)
    return list(dataclasses.fields(cls)) if cls is not None and dataclasses.is_dataclass(cls) else []


def parse_options(task: Task, raw: dict[str, Any]) -> Any:
    """The task's Options from raw values (strings from the command line, typed from TOML or a checkpoint)."""
    cls = getattr(task.module, "Options", None)
    known = {f.name: f for f in option_fields(task)}
    unknown = [k for k in raw if k.replace("-", "_") not in known]
    if unknown:
        spelled = ", ".join("--" + k.replace("_", "-") for k in unknown)
        have = ", ".join("--" + k.replace("_", "-") for k in known) or "none"
        raise TaskError(f"{spelled}: not an option of train nor of --task {task.spec} (its options: {have})")
    values, problems = {}, []
    for key, value in raw.items():
        f = known[key.replace("-", "_")]
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        try:
            values[f.name] = parse_bool(value) if kind is bool else kind(value)
        except (TypeError, ValueError) as e:
            problems.append(f"--{f.name.replace('_', '-')} (task {task.spec}): {e}")
    if problems:
        raise TaskError("; ".join(problems))
    if cls is None:
        return dataclasses.make_dataclass("Options", [])()
    try:
        return cls(**values)
    except Exception as e:  # noqa: BLE001 - the task's own validation (__post_init__), in one line
        raise TaskError(f"--task {task.spec}: its Options refused the values: {_where(e)}") from None


def options_as_dict(task: Task) -> dict[str, Any]:
    """The task's options as a checkpoint stores them (all of them, defaults included)."""
    return dataclasses.asdict(task.options)


def parse_extra_args(args: list[str]) -> dict[str, Any]:
    """Options train does not know, for the task: `--width 64 --flip --no-shift` -> {"width": "64", ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            out[key] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[key] = args[i + 1]
            i += 1
        elif key.startswith("no_"):
            out[key[3:]] = False
        else:
            out[key] = True
        i += 1
    return out
