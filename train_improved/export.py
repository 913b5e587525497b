"""Weights out: any checkpoint a resume accepts, as the model's weights in safetensors.

    train --export best --to model.safetensors                  # float32; --dtype bfloat16 halves it
    train --export rolling_step_000500.pt --to gpt2/ --format hf  # config.json + model.safetensors for transformers
    train --sample best --prompt "def " --sample-length 200     # text from any checkpoint, no training

The source is verified (its digest, every shard file of a sharded one) before it is read, and a
sharded (--fsdp) checkpoint is consolidated in this one process. The weights go through the GPT
they belong to, so a checkpoint of another shape is refused and tied weights (lm_head = wte) are
found and stored once, named in the metadata. A --task checkpoint's model is the task's: its
state_dict goes out as it is (tensors sharing storage stored once), with the task in the metadata. The file is written atomically (temporary name,
fsync, rename), then read back and compared tensor by tensor. Its metadata header holds the
source's name, step and digest, the model's shape and this package's version.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import CheckpointError, CheckpointManager, layout, storage
from .checkpoint.remote import RemoteStore, mask
from .model import GPT, GPTConfig, sample_text
from .overrides import MODEL_SHAPE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("safetensors", "hf")


def _safetensors() -> Any:
    import safetensors.torch  # a dependency; imported here so that the rest of `train` never pays for it

    return safetensors.torch


# ---------------------------------------------------------------------- reading a checkpoint's model


def load_gpt(which: str, directory: Path, *, mirror: str | None = None,
             mirror_options: dict[str, Any] | None = None) -> tuple[GPT, dict[str, Any], str]:
    """The GPT of checkpoint `which` (latest, best, a name, a path, a sharded directory, or a mirror's
    `scheme://prefix/name`), its footer and where it came from; verified, with the fallback chain of a resume.

    Nothing is written to `directory`: a checkpoint that only the mirror holds is downloaded aside.
    """
    weights, footer, source = load_weights(which, directory, mirror=mirror, mirror_options=mirror_options)
    if task := task_of(footer):
        raise CheckpointError(f"{source} holds the model of --task {task}, not the built-in GPT: "
                              "export its weights as safetensors (--export), or sample it with the task's own code")
    return gpt_from_weights(weights, footer, source), footer, source


def task_of(footer: dict[str, Any]) -> str | None:
    args = footer.get("args")
    return args.get("task") if isinstance(args, dict) else None


def load_weights(which: str, directory: Path, *, mirror: str | None = None,
                 mirror_options: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """The model state of checkpoint `which` (see `load_gpt`), its footer and where it came from."""
    if "://" in which:  # one object of a mirror
        url, name = which.rsplit("/", 1)
        weights, footer, source = _from_mirror(url, name, mirror_options)
    else:
        try:
            weights, footer, source = _load(CheckpointManager(directory, read_only=True), which)
        except CheckpointError:
            if mirror is None or layout.is_explicit_path(which):
                raise
            weights, footer, source = _from_mirror(mirror, which, mirror_options)
    return weights, footer, source


def _from_mirror(url: str, which: str, options: dict[str, Any] | None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    with tempfile.TemporaryDirectory(prefix="train-improved-export-") as aside:
        path = RemoteStore.open(url, options, check_writable=False).fetch(which, Path(aside))
        weights, footer, _ = _load(CheckpointManager(Path(aside), read_only=True), path)
    return weights, footer, f"{mask(url.rstrip('/'))}/{path.name}"


def _load(manager: CheckpointManager, which: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    state, info = manager.restore(which)  # verified; for a sharded one every shard file too
    if info.path.is_dir():
        from .checkpoint.sharded import load_model_state

        weights = load_model_state(info.path)  # consolidated here, without a process group
    else:
        weights = state.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{info.path} holds no model weights (written by another training loop?)")
    return weights, info.meta, str(info.path.resolve())


def model_shape(footer: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """The GPT's shape: from the weights where they tell it, the rest from the checkpoint's options."""
    args = footer.get("args") if isinstance(footer.get("args"), dict) else {}
    shape = {k: args[k] for k in MODEL_SHAPE if isinstance(args.get(k), int)}
    if "wte.weight" in weights:
        shape["vocab_size"], shape["n_embd"] = weights["wte.weight"].shape
    if "wpe.weight" in weights:
        shape["block_size"] = weights["wpe.weight"].shape[0]
    shape["n_layer"] = len({k.split(".")[1] for k in weights if k.startswith("blocks.")}) or shape.get("n_layer", 0)
    if "n_head" not in shape:
        raise CheckpointError("the checkpoint does not say how many attention heads its model has (no options)")
    return shape


def gpt_from_weights(weights: dict[str, torch.Tensor], footer: dict[str, Any], source: str) -> GPT:
    """A GPT holding `weights`; CheckpointError naming what does not fit."""
    model = GPT(GPTConfig(**model_shape(footer, weights)))
    check_fits(model.state_dict(), weights, source)
    model.load_state_dict(weights)
    return model.eval()


def check_fits(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    """Names and shapes of `got` against a model's: one short error listing what is missing, unexpected, mis-shaped."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shaped = [f"{k} {tuple(got[k].shape)} (model {tuple(expected[k].shape)})" for k in sorted(set(expected) & set(got))
              if got[k].shape != expected[k].shape]
    if missing or unexpected or shaped:
        parts = [f"{what}: {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped))
                 if names]
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))


# ---------------------------------------------------------------------- safetensors


def weights_once(state: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict's tensors in `dtype`, each storage once; and alias -> name for the tied ones left out."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in state.items():  # in the model's order: wte.weight keeps its name, lm_head is the alias
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    return tensors, tied


def write_safetensors(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write, then read back and compare every tensor bitwise."""
    st = _safetensors()
    storage.replace_file(target, st.save(tensors, metadata=metadata))
    back = st.load_file(str(target))
    if back.keys() != tensors.keys() or any(not torch.equal(back[k], v) or back[k].dtype != v.dtype
                                            for k, v in tensors.items()):
        storage.remove(target)
        raise CheckpointError(f"{target} did not read back identical to the checkpoint's weights: removed")


def metadata(footer: dict[str, Any], source: str, model: GPT, dtype: str, tied: dict[str, str]) -> dict[str, str]:
    shape = {k: getattr(model.config, k) for k in MODEL_SHAPE}
    return {"format": "pt", "producer": f"train_improved {__version__}", "source": source,
            "source_name": str(footer.get("name")), "source_digest": str(footer.get("digest")),
            "step": str(footer.get("step")), "model": json.dumps(shape), "dtype": dtype, "tied": json.dumps(tied)}


def export(which: str, target: Path, directory: Path, *, fmt: str = "safetensors", dtype: str = "float32",
           force: bool = False, mirror: str | None = None, mirror_options: dict[str, Any] | None = None) -> str:
    """Write checkpoint `which`'s weights to `target`; return a one-line summary. See the module docstring."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--format must be {' or '.join(FORMATS)} (got {fmt!r})")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be {', '.join(DTYPES)} (got {dtype!r})")
    if target.exists() and not force:
        raise CheckpointError(f"{target} exists: pass --force to replace it")
    if not target.parent.is_dir():
        raise CheckpointError(f"{target.parent} is not a directory")
    _safetensors()
    weights, footer, source = load_weights(which, directory, mirror=mirror, mirror_options=mirror_options)
    if task := task_of(footer):
        if fmt != "safetensors":
            raise CheckpointError(f"--format {fmt} writes the built-in GPT; {source} holds the model of --task "
                                  f"{task}: export it as safetensors")
        tensors, tied = weights_once({k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}, DTYPES[dtype])
        args = footer["args"]
        write_safetensors(target, tensors, {
            "format": "pt", "producer": f"train_improved {__version__}", "source": source,
            "source_name": str(footer.get("name")), "source_digest": str(footer.get("digest")),
            "step": str(footer.get("step")), "task": str(task), "task_options": json.dumps(args.get("task_options")),
            "task_digest": str(args.get("task_digest")), "dtype": dtype, "tied": json.dumps(tied)})
        params = sum(t.numel() for t in tensors.values())
        return (f"exported {source} (step {footer.get('step')}, task {Path(task).name}) to {target} "
                f"({fmt}, {dtype}, {params:,} values)")
    model = gpt_from_weights(weights, footer, source)
    if fmt == "hf":
        from .hf_export import write_hf_directory

        write_hf_directory(target, model, metadata(footer, source, model, dtype, {}), DTYPES[dtype])
    else:
        tensors, tied = weights_once(model.state_dict(), DTYPES[dtype])
        write_safetensors(target, tensors, metadata(footer, source, model, dtype, tied))
    return (f"exported {source} (step {footer.get('step')}) to {target} ({fmt}, {dtype}, "
            f"{model.num_params() / 1e6:.2f}M parameters)")


# ---------------------------------------------------------------------- --init-from a safetensors file


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file with tied aliases filled in, and its metadata (no code runs)."""
    st = _safetensors()
    from safetensors import safe_open

    try:
        tensors = st.load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own SafetensorError: not such a file
        raise CheckpointError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0][:200]}") from None
    try:
        tied = json.loads(meta.get("tied") or "{}")
    except ValueError:
        tied = {}
    for alias, name in tied.items():
        if name in tensors:
            tensors[alias] = tensors[name]
    return tensors, meta


def safetensors_shape(path: Path) -> dict[str, Any]:
    """The model options a safetensors file's metadata records (ours), or {} for anyone else's."""
    _, meta = read_safetensors(path)
    try:
        shape = json.loads(meta.get("model") or "{}")
    except ValueError:
        return {}
    return {k: v for k, v in shape.items() if k in MODEL_SHAPE and isinstance(v, int)} if isinstance(shape, dict) else {}


# ---------------------------------------------------------------------- sampling


def sample(which: str, directory: Path, *, prompt: str, length: int, temperature: float, seed: int,
           device: str = "cpu", mirror: str | None = None, mirror_options: dict[str, Any] | None = None) -> str:
    """Text from checkpoint `which`'s model: the sampler the end of a run uses (byte-level models only)."""
    model, _, source = load_gpt(which, directory, mirror=mirror, mirror_options=mirror_options)
    if model.config.vocab_size != 256:
        raise CheckpointError(f"{source} is a model of {model.config.vocab_size} tokens: sampling text needs a "
                              "byte-level model (vocab 256)")
    if temperature <= 0:
        raise CheckpointError(f"--temperature must be positive (got {temperature})")
    return sample_text(model.to(device), prompt.encode(), length, temperature=temperature, seed=seed)
