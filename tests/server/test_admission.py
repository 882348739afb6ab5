"""Per-client fair share of the admission bound (rnnserve/server/admission.py)."""

import pytest

from rnnserve.server.admission import Admission, client_key, per_client_share
from rnnserve.server.errors import APIError


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


def test_share_flag_and_client_key() -> None:
    # Default: every slot and half the queue (one client alone can still fill every slot).
    assert per_client_share(None, 8, 8) == 12 and per_client_share(None, 4, 1) == 4
    assert per_client_share(0, 8, 8) is None and per_client_share(3, 8, 8) == 3
    assert per_client_share(None, None, None) is None and per_client_share(None, 8, None) is None
    assert client_key("alice", "127.0.0.1") == "user:alice"
    assert client_key(None, "127.0.0.1") == client_key("", "127.0.0.1") == "addr:127.0.0.1"
    assert client_key("127.0.0.1", "10.0.0.1") != client_key(None, "127.0.0.1")
