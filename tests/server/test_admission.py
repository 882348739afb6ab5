"""Per-client fair share of the admission bound (rnnserve/server/admission.py), and the gate that
refuses a burst's excess before the handler runs."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rnnserve.config import ServerConfig
from rnnserve.server.admission import Admission, client_key, per_client_share, raw_fanout
from rnnserve.server.errors import APIError
from tests.server.conftest import make_app


def test_a_client_past_its_share_gets_429_while_others_are_admitted() -> None:
    adm = Admission(max_in_flight=8, max_fanout=8, max_per_client=4)
    adm.admit(3, "addr:a")
    adm.admit(1, "addr:a")
    with pytest.raises(APIError) as exc:
        adm.admit(1, "addr:a")
    assert exc.value.status == 429 and exc.value.headers == {"Retry-After": "1"}
    adm.admit(4, "user:b")  # the other half of the bound is still there for another client
    assert adm.in_flight == 8 and adm.in_flight_of("addr:a") == 4
    adm.release(3, "addr:a")
    adm.admit(2, "addr:a")
    assert adm.in_flight_of("addr:a") == 3


def test_a_client_with_nothing_in_flight_may_send_one_request_larger_than_its_share() -> None:
    adm = Admission(max_in_flight=8, max_fanout=8, max_per_client=2)
    adm.admit(6, "c")
    with pytest.raises(APIError):
        adm.admit(1, "c")
    adm.release(6, "c")
    assert adm.in_flight == 0 and adm.in_flight_of("c") == 0 and not adm._per_client


def test_no_share_lets_one_client_take_the_whole_bound() -> None:
    adm = Admission(max_in_flight=4, max_fanout=4, max_per_client=per_client_share(0, 2, 2))
    for _ in range(4):
        adm.admit(1, "c")
    with pytest.raises(APIError):
        adm.admit(1, "other")  # the shared bound: the old behaviour, a burst locks others out


def test_could_refuse_is_false_only_while_every_admissible_request_would_be_admitted() -> None:
    adm = Admission(max_in_flight=8, max_fanout=4, max_per_client=6)
    assert not adm.could_refuse()  # 0 + 4 fits both bounds: the gate skips parsing
    adm.admit(2, "c")
    assert not adm.could_refuse()
    adm.admit(1, "c")  # 3 + 4 > 6: a client could pass its share
    assert adm.could_refuse() and adm.refusal(4, "c") is not None
    adm.release(3, "c")
    adm.start_draining()
    assert adm.could_refuse()
    assert Admission(max_in_flight=None, max_fanout=4).could_refuse() is False


def test_share_flag_and_client_key() -> None:
    # Default: every slot and half the queue (one client alone can still fill every slot).
    assert per_client_share(None, 8, 8) == 12 and per_client_share(None, 4, 1) == 4
    assert per_client_share(0, 8, 8) is None and per_client_share(3, 8, 8) == 3
    assert per_client_share(None, None, None) is None and per_client_share(None, 8, None) is None
    assert client_key("alice", "127.0.0.1") == "user:alice"
    assert client_key(None, "127.0.0.1") == client_key("", "127.0.0.1") == "addr:127.0.0.1"
    assert client_key("127.0.0.1", "10.0.0.1") != client_key(None, "127.0.0.1")


def test_raw_fanout_counts_as_the_handlers_do() -> None:
    assert raw_fanout({"prompt": "x"}, chat=False) == 1
    assert raw_fanout({"prompt": [1, 2, 3], "n": 2}, chat=False) == 2  # one token-id prompt
    assert raw_fanout({"prompt": ["a", "b", [1]], "n": 3}, chat=False) == 9
    assert raw_fanout({"messages": [], "n": 4}, chat=True) == 4
    assert raw_fanout({"prompt": "x", "n": None}, chat=False) == 1
    # Not a well-formed request: left to the handler's 400.
    for body in ([], {"prompt": []}, {"prompt": 3}, {"prompt": "x", "n": 0}, {"prompt": "x", "n": True}):
        assert raw_fanout(body, chat=False) is None


def test_a_refused_request_is_answered_before_its_handler_runs(model_dir: Path) -> None:
    server = ServerConfig(max_queued_requests=2, max_in_flight_per_client=2)
    with TestClient(make_app(model_dir, max_num_seqs=2, server=server)) as client:
        app = client.app
        tok = app.state.ctx.tokenizer
        encoded: list[str] = []
        encode = tok.encode
        tok.encode = lambda text, **kw: encoded.append(text) or encode(text, **kw)  # type: ignore[method-assign]
        app.state.admission.admit(2, "user:burst")  # that client holds its whole share
        for path, body in [
            ("/v1/completions", {"prompt": "refused", "max_tokens": 2, "user": "burst"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "refused"}], "user": "burst"}),
        ]:
            r = client.post(path, json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
            assert r.json()["error"]["type"] == "rate_limit_error"
        assert encoded == []  # refused before tokenization (and validation)
        # A body the handler must answer (not JSON, no prompt, a fan-out past the cap) still gets its 400.
        bad = client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        assert client.post("/v1/completions", json={"user": "burst"}).status_code == 400
        assert client.post("/v1/completions", json={"prompt": "x", "n": 9, "user": "burst"}).status_code == 400
        # Another client is admitted, through the gate, as before.
        encoded.clear()
        r = client.post("/v1/completions", json={"prompt": "admitted", "max_tokens": 2, "user": "quiet"})
        assert r.status_code == 200 and encoded == ["admitted"]
        app.state.admission.release(2, "user:burst")
        assert app.state.admission.in_flight == 0
