"""Run the Triton kernel tests natively on CUDA, under Triton's interpreter on the CPU.

The interpreter flag (``TRITON_INTERPRET=1``) is read when ``@triton.jit`` decorates a function,
including triton's own library functions (``tl.sigmoid``...) when ``triton`` is first imported, so
it must be set before anything in the process imports triton. Without CUDA, a Triton test module
therefore runs its tests in a child pytest started with the flag: in the parent its one test is
``test_under_triton_interpreter``, which passes when every test of the module passed in the child
(``tests/kernels/conftest.py`` leaves the module's other tests out of the parent's collection and
prints the child's counts in the summary), and the parent process never sees the flag.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
# True in the parent pytest process on a machine without CUDA: the kernels cannot run here.
NEEDS_CHILD = not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1"
CHILD_TIMEOUT_S = 300
# test file name -> the child's result line ("12 passed in 3.1s"), for the terminal summary.
CHILD_RESULTS: dict[str, str] = {}


def triton_device() -> torch.device:
    return torch.device("cuda" if ON_CUDA else "cpu")


def import_triton_module(name: str) -> ModuleType:
    """The kernel module, runnable in this process; skips where it is not (see the module doc)."""
    pytest.importorskip("triton")
    if NEEDS_CHILD:
        pytest.skip("run by test_under_triton_interpreter in a child process under TRITON_INTERPRET=1")
    return importlib.import_module(name)


def run_module_under_interpreter(test_file: str) -> None:
    """Run ``test_file``'s tests in a child pytest with TRITON_INTERPRET=1; fail with its report."""
    pytest.importorskip("triton")
    if not NEEDS_CHILD:
        pytest.skip("the kernel tests run in this process")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"Triton interpreter tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    CHILD_RESULTS[Path(test_file).name] = lines[-1].strip("= ") if lines else "?"
