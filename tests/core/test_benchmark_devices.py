"""The GPU benchmarks are ready to run, and on a machine without the accelerator they say so and exit 0 before
anything else (no ComfyUI needed, nothing downloaded).

Break this catches (tried on a copy of the worktree): ``accelerator_missing`` in bench_guidance.py answering
None for cuda, so the script goes on to start ComfyUI on a missing device: it exits non-zero ("ComfyUI picked
cpu, not cuda"), or with no host found, "No ComfyUI at ...", and the test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    # No COMFYUI_PATH: the message must come before the script looks for a host at all.
    env = {key: value for key, value in os.environ.items() if key != "COMFYUI_PATH"}
    env["HOME"] = str(BENCHMARKS / "no-such-home")  # so ~/ComfyUI cannot be found either
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


@pytest.mark.parametrize("script", ["bench_guidance.py", "bench_memory.py"])
def test_cuda_benchmark_without_a_cuda_device_says_so_and_exits_0(script):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the benchmark would run instead")
    done = _run(script, "--device", "cuda", "--dtype", "float16")
    assert done.returncode == 0, done.stderr
    assert "No CUDA device is present" in done.stdout


def test_mps_benchmark_without_an_mps_device_says_so_and_exits_0():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device: the benchmark would run instead")
    done = _run("bench_guidance.py", "--device", "mps", "--size", "realistic")
    assert done.returncode == 0, done.stderr
    assert "No MPS device is present" in done.stdout
