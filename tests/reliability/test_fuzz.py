"""Property-based fuzz of every operation in /openapi.json (schemathesis): no input gets a 5xx, every
status is one the document lists, and nothing is left running afterwards.

Work per request is bounded so the run stays short: max_model_len 32 (so at most ~32 tokens per
sequence), at most 4 sequences per request, and a 5 s request timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from rnnserve.config import ServerConfig
from tests.server.conftest import make_app

MAX_EXAMPLES = 40  # per operation; ~12 operations


@pytest.fixture(scope="module")
def fuzz_app(rel_model_dir: Path) -> Iterator[FastAPI]:
    cfg = ServerConfig(request_timeout=5.0, max_fanout=4)
    app = make_app(rel_model_dir, server=cfg, max_model_len=32, max_num_seqs=4)
    yield app
    engine = app.state.ctx.engine
    stats = engine.stats()
    asyncio.run(engine.shutdown())
    assert (stats.num_running, stats.num_waiting, stats.slots_used) == (0, 0, 0)
    assert app.state.admission.in_flight == 0


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app: FastAPI):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def test_no_input_gets_a_5xx(fuzz_schema) -> None:
    # Hypothesis driven by hand per operation (schemathesis' pytest plugin does not load here).
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance])

        check()
