"""The benchmark scripts still run (smallest settings; no timing is asserted: their figures go to
benchmarks/README.md). A script that rots unnoticed cannot be re-measured by the next person."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

CASES = {
    "checkpoint_io": ["--sizes", "4", "--rounds", "1"],
    "gpu_throughput": ["--preset", "tiny", "--device", "cpu", "--steps", "8", "--rounds", "1", "--no-compile",
                       "--save-every", "3"],
    "gpu_throughput --profile": ["--preset", "tiny", "--device", "cpu", "--steps", "4", "--no-compile",
                                 "--profile", "prof"],  # one profiled round of each side; traces into ./prof
    "end_to_end": ["--steps", "6", "--every", "3"],
    "gpu_staging": ["--sizes", "4"],  # says "no CUDA device" on a machine without one
    "gpu_staging --device cpu": ["--sizes", "4", "--device", "cpu"],  # every step of the GPU check, on CPU
    "listing": ["--count", "3", "--large-mb", "1"],
    "quality": ["--steps", "6", "--eval-interval", "3", "--tiny"],
    "mirror_io": ["--n-embd", "32", "--steps", "6", "--every", "3", "--large-mb", "8"],
    "fsdp_stall": ["--n-layer", "1", "--n-embd", "32", "--steps", "4", "--every", "2"],  # 2 torchrun jobs
    "task_overhead": ["--steps", "8", "--rounds", "1", "--workers", "0"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs(script: str, tmp_path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script.split()[0]}.py"), *CASES[script]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
