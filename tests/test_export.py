"""Weights out (issue 23): any checkpoint to safetensors (or a transformers GPT-2 directory), sampling from a
checkpoint, and --init-from a safetensors file.

Exports run in this process (a subprocess proves nothing more), except where a fresh Python that never
imports train_improved must read the file, and the 2-rank FSDP run that makes a sharded checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import read_footer
from train_improved.checkpoint.sharded import load_model_state

from conftest import CORPUS_BYTES, TINY, corpus_bytes, read_metrics, train_in_process

ARGS = ["--data", "corpus.txt", *TINY, "--max-steps", "12", "--num-epochs", "10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 12-step run: rolling files every 4 steps, a best at step 10, mirrored to a file:// mirror."""
    d = tmp_path_factory.mktemp("export")
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    mp = pytest.MonkeyPatch()
    try:
        code, err = train_in_process(*ARGS, "--mirror", f"file://{d / 'bucket'}", cwd=d, monkeypatch=mp)
    finally:
        mp.undo()
    assert code == 0, err
    return d


def read_in_a_fresh_python(path: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """What safetensors alone reads from `path`, in a process that never imports train_improved."""
    out = tmp_path / "read.pt"
    code = ("import sys, torch; from safetensors.torch import load_file; t = load_file(sys.argv[1]); "
            "assert 'train_improved' not in sys.modules; torch.save(t, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, cwd=tmp_path,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return torch.load(out, weights_only=True)


def assert_same_weights(exported: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> None:
    assert set(exported) == set(model) - {"lm_head.weight"}  # tied to wte.weight: stored once
    for name, t in exported.items():
        assert t.dtype == model[name].dtype and torch.equal(t, model[name]), name


@pytest.mark.parametrize("which", ["rolling_step_000008.pt", "best"])
def test_a_checkpoint_exports_to_safetensors_that_anyone_reads_bitwise(run: Path, tmp_path: Path, monkeypatch,
                                                                      which: str) -> None:
    target = tmp_path / "model.safetensors"
    code, err = train_in_process("--export", which, "--to", str(target), cwd=run, monkeypatch=monkeypatch)
    assert code == 0 and "exported" in err, err
    source = run / "checkpoints" / ("best_model.pt" if which == "best" else which)
    assert_same_weights(read_in_a_fresh_python(target, tmp_path), torch.load(source, weights_only=True)["model"])
    from safetensors import safe_open

    with safe_open(str(target), "pt") as f:
        meta = f.metadata()
    footer = read_footer(source)
    assert meta["step"] == str(footer["step"]) and meta["source_digest"] == footer["digest"]
    assert '"n_embd": 32' in meta["model"] and meta["producer"].startswith("train_improved ")
    assert meta["tied"] == '{"lm_head.weight": "wte.weight"}'


def test_bfloat16_halves_the_file_and_an_existing_target_needs_force(run: Path, tmp_path: Path, monkeypatch) -> None:
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    assert train_in_process("--export", "latest", "--to", str(full), cwd=run, monkeypatch=monkeypatch)[0] == 0
    assert train_in_process("--export", "latest", "--to", str(half), "--dtype", "bfloat16", cwd=run,
                            monkeypatch=monkeypatch)[0] == 0
    tensors = read_in_a_fresh_python(half, tmp_path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert half.stat().st_size < 0.6 * full.stat().st_size
    before = full.read_bytes()
    code, err = train_in_process("--export", "rolling_step_000004.pt", "--to", str(full), cwd=run,
                                 monkeypatch=monkeypatch)
    assert code == 1 and "exists: pass --force" in err and full.read_bytes() == before
    code, err = train_in_process("--export", "rolling_step_000004.pt", "--to", str(full), "--force", cwd=run,
                                 monkeypatch=monkeypatch)
    assert code == 0 and full.read_bytes() != before, err


def test_a_damaged_source_is_one_line_and_writes_nothing(run: Path, tmp_path: Path, monkeypatch) -> None:
    damaged = tmp_path / "damaged.pt"
    data = bytearray((run / "checkpoints" / "rolling_step_000008.pt").read_bytes())
    data[len(data) // 3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    target = tmp_path / "out.safetensors"
    code, err = train_in_process("--export", str(damaged), "--to", str(target), cwd=run, monkeypatch=monkeypatch)
    assert code == 1 and "Traceback" not in err and "checksum" in err and len(err.strip().splitlines()) == 1, err
    assert not target.exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_mirrors_checkpoint_exports_without_touching_the_local_store(run: Path, tmp_path: Path, monkeypatch
                                                                       ) -> None:
    target = tmp_path / "from_bucket.safetensors"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    url = f"file://{run / 'bucket'}/rolling_step_000012.pt"
    code, err = train_in_process("--export", url, "--to", str(target), cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, err
    assert_same_weights(read_in_a_fresh_python(target, tmp_path),
                        torch.load(run / "checkpoints" / "rolling_step_000012.pt", weights_only=True)["model"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.distributed
def test_a_sharded_fsdp_checkpoint_is_consolidated_in_one_process(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train_improved", "--fsdp", *ARGS, "--max-steps", "4"], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = tmp_path / "checkpoints" / "rolling_step_000004.pt"
    assert sharded.is_dir()
    target = tmp_path / "consolidated.safetensors"
    code, err = train_in_process("--export", "latest", "--to", str(target), cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, err
    assert_same_weights(read_in_a_fresh_python(target, tmp_path), load_model_state(sharded))


def test_a_hugging_face_directory_gives_our_logits(run: Path, tmp_path: Path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from train_improved.export import load_gpt

    target = tmp_path / "gpt2"
    code, err = train_in_process("--export", "best", "--to", str(target), "--format", "hf", cwd=run,
                                 monkeypatch=monkeypatch)
    assert code == 0, err
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(target)).eval()
    ours, _, _ = load_gpt("best", run / "checkpoints")
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = ours(idx)
        got = theirs(idx).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_sampling_a_checkpoint_reproduces_the_end_of_run_sample(tmp_path: Path, monkeypatch) -> None:
    from conftest import invoke_train

    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    args = [*ARGS, "--sample-length", "40", "--seed", "5"]
    end = invoke_train(*args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert end.exit_code == 0, end.stderr
    sampled = invoke_train("--sample", "best", "--sample-length", "40", "--seed", "5", cwd=tmp_path,
                           monkeypatch=monkeypatch)
    assert sampled.exit_code == 0, sampled.stderr
    assert sampled.stdout.strip() and sampled.stdout == end.stdout
    other = invoke_train("--sample", "best", "--sample-length", "40", "--seed", "5", "--prompt", "def ",
                         cwd=tmp_path, monkeypatch=monkeypatch)
    assert other.stdout.startswith("def ") and other.stdout != end.stdout


def test_init_from_a_safetensors_file_trains_as_from_its_checkpoint(run: Path, tmp_path: Path, monkeypatch) -> None:
    exported = tmp_path / "model.safetensors"
    assert train_in_process("--export", "rolling_step_000012.pt", "--to", str(exported), cwd=run,
                            monkeypatch=monkeypatch)[0] == 0
    first = {}
    for name, source in (("from_file", exported), ("from_checkpoint", run / "checkpoints" / "rolling_step_000012.pt")):
        d = tmp_path / name
        d.mkdir()
        (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
        code, err = train_in_process(*ARGS, "--max-steps", "2", "--init-from", str(source), cwd=d,
                                     monkeypatch=monkeypatch)
        assert code == 0, err
        first[name] = next(r["loss"] for r in read_metrics(d / "runs" / "metrics.jsonl") if r["event"] == "step")
    assert first["from_file"] == first["from_checkpoint"]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    code, err = train_in_process(*ARGS, "--n-embd", "64", "--init-from", str(exported), cwd=wrong,
                                 monkeypatch=monkeypatch)
    assert code == 1 and "does not fit the model: mis-shaped: " in err and "Traceback" not in err, err
    assert not (wrong / "checkpoints").exists() and not (wrong / "runs").exists()


def test_an_export_that_does_not_read_back_identical_is_removed(run: Path, tmp_path: Path, monkeypatch) -> None:
    from train_improved.checkpoint import storage

    real = storage.replace_file

    def flips_a_byte(final: Path, data: bytes) -> None:  # the disk returns other bytes than were written
        real(final, data)
        with open(final, "r+b") as f:
            f.seek(len(data) - 3)
            byte = f.read(1)
            f.seek(len(data) - 3)
            f.write(bytes([byte[0] ^ 0xFF]))

    monkeypatch.setattr(storage, "replace_file", flips_a_byte)
    target = tmp_path / "model.safetensors"
    code, err = train_in_process("--export", "latest", "--to", str(target), cwd=run, monkeypatch=monkeypatch)
    assert code == 1 and "did not read back identical" in err and not target.exists(), err
