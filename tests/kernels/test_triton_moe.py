"""The Triton MoE backend: its cases (tests/kernels/triton_cases.py) in-process on a GPU, else under
Triton's interpreter in a child process, so this test process keeps Triton in its normal mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

if torch.cuda.is_available():
    from tests.kernels.triton_cases import *  # noqa: F403
else:
    @pytest.mark.timeout(600)
    def test_triton_kernels_under_the_interpreter():
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "",
               str(Path(__file__).with_name("triton_cases.py"))]
        run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"interpreted Triton cases failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
        assert " passed" in run.stdout
