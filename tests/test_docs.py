"""Every command that README.md and CHECKPOINTING.md show is run (issue 17), so none can silently rot.

Commands run as documented, with a tiny model appended (later options win), in a directory
prepared for them: a text file, token shards, and a finished run with the checkpoints the
commands name. Installs and CI's own command are left to CI; the SLURM script needs SLURM;
torchrun's commands run under the `distributed` marker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, corpus_bytes, train_in_process

# Appended to every `train`: a model that trains in a second. Shapes equal the prepared run's, so a
# resume sees no change.
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "16",
        "--mini-batch-size", "8", "--eval-interval", "50", "--eval-steps", "1", "--sample-length", "0",
        "--warmup-steps", "2"]
SHARED = ["--mini-batch-size", "4"]  # torchrun: 4 micro-batches per step, so 2 or 4 ranks can share them
EXPECTED_EXIT = {"--n-embd 64": 1}  # the documented refusal of an incompatible change


def documented_commands() -> list[tuple[str, str]]:
    commands = []
    for doc in ("README.md", "CHECKPOINTING.md"):
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", (ROOT / doc).read_text(), flags=re.S):
            for line in body.splitlines():
                line = line.strip()
                if lang != "bash" and not line.startswith("$ "):
                    continue
                line = line.removeprefix("$ ").split("  #")[0].strip()
                if line.split(" ")[0] in ("train", "generate-resume-command", "torchrun"):
                    commands.append((doc, line))
    return commands


COMMANDS = documented_commands()


def test_the_readme_shows_the_digits_task_as_it_is() -> None:
    """README's "Train your own model" holds examples/digits.py whole: the file CI trains, not a copy that drifts."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert (ROOT / "examples" / "digits.py").read_text() in blocks


def test_the_docs_show_the_commands_this_test_runs() -> None:
    assert len(COMMANDS) >= 15 and {c.split()[0] for _, c in COMMANDS} == {"train", "generate-resume-command",
                                                                            "torchrun"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with my_text.txt, shards/ and a finished 300-step run (rolling files every 50 steps)."""
    d = tmp_path_factory.mktemp("docs")
    (d / "my_text.txt").write_bytes(corpus_bytes(60_000))
    (d / "shards").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40_000), ("val", 4_000)):
        rng.integers(0, 50304, n, dtype=np.uint16).tofile(d / "shards" / f"{split}_000.bin")
    mp = pytest.MonkeyPatch()
    try:
        code, err = train_in_process("--data", "my_text.txt", *TINY, "--max-steps", "300", "--num-epochs", "5",
                                     "--checkpoint-freq", "50", "--keep-checkpoints", "10", cwd=d, monkeypatch=mp)
        assert code == 0, err
        code, err = train_in_process("--export", "best", "--to", "model.safetensors", cwd=d, monkeypatch=mp)
        assert code == 0, err  # what `--init-from model.safetensors` starts from
    finally:
        mp.undo()
    return d


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    """The buckets the docs name, on a real S3 endpoint on loopback (moto's server mode)."""
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server._server.port}"  # noqa: SLF001 - moto exposes the bound port only here
    fs = s3fs.S3FileSystem(endpoint_url=url)
    for bucket in ("my-bucket", "bucket"):
        fs.makedirs(bucket, exist_ok=True)  # moto keeps its buckets for the whole test process
    yield url
    server.stop()


def concrete(command: str, run: Path, s3: str = "") -> list[str]:
    """The documented command with its placeholders made real: paths of the prepared run, no `...`."""
    command = command.replace("/runs/a/checkpoints", str(run / "checkpoints"))
    command = command.replace("file:///mnt/nfs/", f"file://{run}/nfs/").replace("http://minio:9000", s3)
    command = command.replace("/elsewhere/", str(run / "checkpoints") + "/")
    command = command.replace("[--json] [--verify]", "--json --verify").replace(" ...", "")
    command = command.replace("$(which train)", "").replace("examples/", f"{ROOT}/examples/")
    return shlex.split(command)


def starts_a_run(words: list[str]) -> bool:
    return not {"--resume", "--list-checkpoints", "--init-from", "--export", "--sample"} & set(words)


@pytest.mark.parametrize("doc, command", [c for c in COMMANDS if not c[1].startswith("torchrun")],
                         ids=lambda c: c if isinstance(c, str) and c.endswith(".md") else None)
def test_documented_command_runs(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 request: pytest.FixtureRequest, doc: str, command: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    s3 = request.getfixturevalue("s3_endpoint") if "s3://" in command else ""
    words = concrete(command, run, s3)
    if "s3://" in command and "--mirror-options" not in words:
        words += ["--mirror-options", json.dumps({"endpoint_url": s3})]  # where the docs' bucket is
    if words[0] == "train" and starts_a_run(words):
        shutil.rmtree(run / "checkpoints")  # a new run needs an empty --checkpoint-dir
        if s3:  # and an empty mirror prefix (another documented command may have filled this one)
            import s3fs

            prefix = next(w for w in words if w.startswith("s3://")).removeprefix("s3://")
            fs = s3fs.S3FileSystem(endpoint_url=s3)
            if fs.exists(prefix):
                fs.rm(prefix, recursive=True)
    if "--export" in words:  # the prepared model.safetensors (for --init-from) is not in an export's way
        (run / words[words.index("--to") + 1]).unlink(missing_ok=True)
    where = tmp_path if "/" in command and str(run) in " ".join(words) else run  # "from anywhere"
    expected = next((code for key, code in EXPECTED_EXIT.items() if key in command), 0)
    if words[0] == "generate-resume-command":
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "generate_resume_command.py"), *words[1:]],
                             cwd=where, capture_output=True, text=True)
        code, err = out.returncode, out.stderr
    else:
        extra = [] if "--list-checkpoints" in words else [*TINY, "--max-steps", "10"] if starts_a_run(words) else TINY
        if "--task" in words:  # the task builds its own model: a few steps of it
            extra = [] if "--help" in words else ["--max-steps", "6", "--eval-interval", "3", "--num-workers", "0"]
        code, err = train_in_process(*words[1:], *extra, cwd=where, monkeypatch=monkeypatch)
    assert code == expected, f"{doc}: {command}\n{err[-2000:]}"
    assert "Traceback" not in err


@pytest.mark.distributed
@pytest.mark.parametrize("command", [c for _, c in COMMANDS if c.startswith("torchrun")])
def test_documented_torchrun_command_runs(prepared: Path, tmp_path: Path, command: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    words = concrete(command, run)
    if "--fsdp" in words or starts_a_run(words):
        shutil.rmtree(run / "checkpoints")  # the prepared run is not sharded: these start afresh
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:words.index("-m")]]
    proc = subprocess.run([*launcher, "-m", "train_improved", *words[words.index("-m") + 2:], *TINY, *SHARED,
                           "--max-steps", "4", "--data", "my_text.txt"], cwd=run, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
