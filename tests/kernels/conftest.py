"""On a machine without CUDA, a Triton test module's tests run in a child process under Triton's
interpreter (see triton_util): the parent collects only its ``test_under_triton_interpreter``, which
passes when they all passed there, and the summary prints what the children ran. Where the kernels
run in the process itself (CUDA, or that child), ``test_under_triton_interpreter`` is left out."""

from __future__ import annotations

import pytest

from tests.kernels import triton_util


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not triton_util.NEEDS_CHILD:
        # The kernels run in this process (CUDA, or the child itself): the parent tests have nothing to do.
        items[:] = [item for item in items if getattr(item, "originalname", None) != "test_under_triton_interpreter"]
        return
    # Left out, not skipped: they do run, in the child, and its result is the parent test's. A test
    # selected alone (its module's parent test not collected) stays, and says why it skips.
    parents = {item.module for item in items if getattr(item, "originalname", None) == "test_under_triton_interpreter"}
    items[:] = [
        item
        for item in items
        if getattr(item, "module", None) not in parents or item.originalname == "test_under_triton_interpreter"
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not triton_util.CHILD_RESULTS:
        return
    terminalreporter.section("Triton kernels under TRITON_INTERPRET=1 (child processes)")
    for name, result in sorted(triton_util.CHILD_RESULTS.items()):
        terminalreporter.write_line(f"{name}: {result}")
