"""The built-in GPT as a Hugging Face GPT-2 directory (config.json + model.safetensors).

Our GPT is GPT-2's architecture: learned positions, pre-norm blocks with biases everywhere, a fused
q/k/v projection, tied embeddings. Two things differ in form only, and are bridged here:
  * GPT-2's projections are `Conv1D` modules whose weights are stored transposed ([in, out]) against
    a `Linear`'s [out, in]: every projection weight is written transposed;
  * GPT-2's default activation is the tanh approximation of GELU ("gelu_new"); ours is the exact GELU,
    so config.json says "activation_function": "gelu".
Nothing else needs bridging (no zero biases: ours has them). transformers is not needed to write
the directory, only to load it: `GPT2LMHeadModel.from_pretrained(path)` gives logits equal to ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import storage
from .model import GPT

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_NAMES = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln_2": "ln_2",
          "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def hf_config(model: GPT) -> dict[str, object]:
    c = model.config
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_inner": 4 * c.n_embd, "activation_function": "gelu", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "bos_token_id": None, "eos_token_id": None}


def hf_tensors(model: GPT, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names (lm_head.weight is tied to wte: left out, as transformers saves it)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            module, param = rest.rsplit(".", 1)
            hf = f"transformer.h.{i}.{_NAMES[module]}.{param}"
        else:
            hf = f"transformer.{name}"
        if hf.endswith(_TRANSPOSED):
            t = t.t()
        out[hf] = t.detach().to("cpu", dtype).contiguous()
    return out


def write_hf_directory(target: Path, model: GPT, metadata: dict[str, str], dtype: torch.dtype) -> None:
    """config.json and model.safetensors, written aside, then renamed into place whole (replacing `target`)."""
    from .export import write_safetensors

    tmp = storage.temp_path_for(target)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", hf_tensors(model, dtype), metadata)
        storage.replace_file(tmp / "config.json", json.dumps(hf_config(model), indent=2).encode())
        storage.fsync_dir(tmp)
        storage.commit_temporary(tmp, target)
    except BaseException:
        if tmp.exists():
            storage.remove(tmp)
        raise
