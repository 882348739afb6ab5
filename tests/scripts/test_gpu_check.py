"""scripts/gpu_check.sh on a machine without a CUDA GPU: it refuses at once with one line and a
non-zero status, and writes nothing (not even its $OUT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_MODELS": str(tmp_path / "models")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("gpu_check: error: no CUDA GPU here") and proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_exit_status_follows_the_steps() -> None:
    text = SCRIPT.read_text()
    # The status comes from the steps table, and every default path is under $OUT.
    assert "exit 1" in text.split("# Exit status:", 1)[1]
    assert 'MODELS="${GPU_CHECK_MODELS:-$OUT/models}"' in text
    assert "/tmp/" not in text
