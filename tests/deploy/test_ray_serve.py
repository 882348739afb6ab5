"""rnnserve on Ray Serve: the routing table, the KubeRay manifest, and a live local Ray cluster.

The cluster tests share one module-scoped cluster (Ray starts slowly): this process starts it on
127.0.0.1 with 2 CPUs and no dashboard, and ``rnnserve serve --ray --ray-address`` joins it with two
engine replicas of a tiny random Mamba. This process, a Ray driver of the same cluster, can then
find a replica's actor and kill its process.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.middleware import Middleware

ray = pytest.importorskip("ray", reason="ray is not installed (the 'ray' extra: pip install -e '.[ray]')")
pytest.importorskip("ray.serve", reason="ray is installed without Serve (the 'ray' extra installs ray[serve])")

from rnnserve.deploy.ray_serve import (  # noqa: E402
    CONVERSATION,
    ENGINE_DEPLOYMENT,
    ConversationMiddleware,
    OpenAIIngress,
    RayEngineClient,
    ServeEdgeGuard,
    aggregate_stats,
    app_builder,
    configs_from_app_args,
    conversation_of,
    keep_ray_on_loopback,
)
from rnnserve.deploy.routing import PREFIX_TOKENS, AffinityTable, Conversation  # noqa: E402
from rnnserve.server.edge import REFUSAL_BODY, EdgeGuard, edge_bounds  # noqa: E402
from tests.e2e.conftest import free_port  # noqa: E402
from tests.server.conftest import build_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "rnnserve.json"
MODEL = "tiny-mamba"
# The live cluster's engine (the fixture's --num-replicas, --max-num-seqs).
REPLICAS, MAX_NUM_SEQS = 2, 8


# --- the routing table (no Ray) -------------------------------------------------------------------


def test_named_conversations_stick_to_their_replica() -> None:
    table = AffinityTable()
    alice = Conversation("user:alice", [1, 2, 3])
    assert table.lookup(alice) is None
    assert table.record(alice, "r1") == "new"
    # Later turns of the same conversation, whatever their prompt.
    assert table.lookup(Conversation("user:alice", [9])) == "r1"
    assert table.record(Conversation("user:alice", [9]), "r1") == "hit"
    assert table.record(Conversation("user:alice", [9, 9]), "r2") == "miss"  # r1 was full or gone
    assert table.lookup(Conversation("user:alice", [])) == "r2"
    assert table.lookup(Conversation("user:bob", [1, 2, 3])) is None
    assert table.lookup(Conversation(None, [1, 2, 3])) is None  # names and prompts are separate keys


def test_anonymous_turns_match_their_earlier_prompt() -> None:
    table = AffinityTable()
    turn1 = [5, 6, 7, 8]
    table.record(Conversation(None, turn1), "r1")
    table.record(Conversation(None, [5, 6, 99]), "r2")  # another conversation sharing a prefix
    turn2 = [*turn1, 40, 41, 42]  # turn 1's prompt, the answer, the next message
    assert table.lookup(Conversation(None, turn2)) == "r1"
    assert table.record(Conversation(None, turn2), "r1") == "hit"
    assert table.lookup(Conversation(None, [*turn2, 50])) == "r1"  # turn 3 matches turn 2
    assert table.lookup(Conversation(None, [5, 6, 99, 1])) == "r2"
    assert table.lookup(Conversation(None, [5, 6])) is None  # shorter than every recorded prompt
    assert table.lookup(Conversation(None, [5, 6, 7, 9])) is None


def test_long_prompts_are_keyed_by_their_first_tokens() -> None:
    table = AffinityTable()
    long = list(range(PREFIX_TOKENS + 50))
    table.record(Conversation(None, long), "r1")
    assert table.lookup(Conversation(None, [*long[:PREFIX_TOKENS], 7, 7, 7])) == "r1"
    assert table.lookup(Conversation(None, [1, *long[1:]])) is None


def test_affinity_table_drops_the_least_recently_used() -> None:
    table = AffinityTable(max_entries=2)
    table.record(Conversation("session:a", []), "r1")
    table.record(Conversation(None, [1, 2]), "r1")
    table.lookup(Conversation("session:a", []))
    table.record(Conversation("session:a", []), "r1")  # a is now the most recent
    table.record(Conversation("session:c", []), "r2")
    assert len(table) == 2
    assert table.lookup(Conversation(None, [1, 2, 3])) is None
    assert table.lookup(Conversation("session:a", [])) == "r1"


def test_conversation_of_reads_session_id_then_user() -> None:
    assert conversation_of(b'{"session_id": "s1", "user": "u"}') == "session:s1"
    assert conversation_of(b'{"user": "u", "prompt": "x"}') == "user:u"
    assert conversation_of(b'{"session_id": 12}') == "session:12"
    assert conversation_of(b'{"user": "", "session_id": null}') is None
    assert conversation_of(b'{"user": true}') is None
    assert conversation_of(b"not json") is None
    assert conversation_of(b"[1, 2]") is None


def test_conversation_middleware_sets_the_conversation_and_replays_the_body() -> None:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, object]:
        return {"conversation": CONVERSATION.get(), "body": (await request.body()).decode()}

    app.user_middleware.append(Middleware(ConversationMiddleware, max_bytes=64))
    with TestClient(app) as client:
        body = '{"user": "alice", "prompt": "hi"}'
        assert client.post("/echo", content=body).json() == {"conversation": "user:alice", "body": body}
        assert client.post("/echo", content='{"prompt": "hi"}').json()["conversation"] is None
        big = '{"user": "bob", "prompt": "' + "x" * 100 + '"}'  # over max_bytes: replayed, not parsed
        assert client.post("/echo", content=big).json() == {"conversation": None, "body": big}


def test_aggregate_stats_sums_replicas() -> None:
    a = {"num_running": 2, "num_waiting": 1, "num_slots": 4, "slots_used": 2, "state_bytes_per_slot": 100,
         "state_pool_usage": 0.5, "prompt_tokens_total": 10, "generation_tokens_total": 5, "num_steps": 3,
         "last_step_seconds": 0.01, "kv_bytes_per_token": 64, "prefix_cache_hits": 7}  # fmt: skip
    b = {**a, "num_running": 0, "slots_used": 0, "state_pool_usage": 0.0, "last_step_seconds": 0.03}
    s = aggregate_stats([a, b])
    assert (s.num_running, s.num_waiting, s.num_slots, s.slots_used) == (2, 2, 8, 2)
    assert s.state_pool_usage == pytest.approx(0.25)
    assert (s.prompt_tokens_total, s.generation_tokens_total, s.num_steps) == (20, 10, 6)
    assert (s.state_bytes_per_slot, s.kv_bytes_per_token, s.last_step_seconds) == (100, 64, 0.03)
    assert s.prefix_cache_hits == 14
    assert aggregate_stats([]).num_slots == 0


def test_application_args_are_serve_flags() -> None:
    cfg = configs_from_app_args({"model": "/m", "num-replicas": 3, "threads_per_replica": 2, "enforce-eager": True})
    assert (cfg.model.model, cfg.ray.num_replicas, cfg.ray.threads_per_replica) == ("/m", 3, 2)
    assert cfg.ray.enabled and cfg.runner.enforce_eager
    assert configs_from_app_args({"autoscale": "1:4"}).ray.autoscale == (1, 4)
    with pytest.raises(ValueError, match="unknown application args: --num-replica"):
        configs_from_app_args({"num-replica": 2})
    with pytest.raises(ValueError, match="autoscale"):
        configs_from_app_args({"autoscale": "4"})


class _StatsClient(RayEngineClient):
    """A RayEngineClient whose replicas reported their stats, without a cluster."""

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        return {f"r{i}": {"num_slots": MAX_NUM_SEQS, "slots_used": 0} for i in range(REPLICAS)}


def _edge_bound_per_address() -> int:
    """build_app's bound for REPLICAS x MAX_NUM_SEQS slots and the default queue (as many as slots)."""
    slots = REPLICAS * MAX_NUM_SEQS
    _, per_address = edge_bounds(max_in_flight=slots + slots, slots=slots)
    assert per_address is not None
    return per_address


def test_ingress_serves_the_app_behind_its_edge_guard(neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    from ray.serve._private.thirdparty.get_asgi_route_name import extract_route_patterns

    model_dir = build_model_dir(tmp_path / MODEL, neox_tokenizer_dir)
    cfg = configs_from_app_args({"model": str(model_dir), "served-model-name": MODEL,
                                 "num-replicas": REPLICAS, "max-num-seqs": MAX_NUM_SEQS})  # fmt: skip
    client = _StatsClient(handle=None, app_name="unit")  # type: ignore[arg-type]  # no replica is called
    client.max_model_len = 64
    # What Serve calls once the ingress's constructor ran (it needs only these two fields).
    guard = OpenAIIngress.__serve_build_asgi_app__(SimpleNamespace(_cfg=cfg, _client=client))
    assert isinstance(guard, ServeEdgeGuard) and isinstance(guard, EdgeGuard)
    app = guard.app
    assert app.state.edge is guard
    per_address = _edge_bound_per_address()
    assert (guard.max_requests, guard.max_per_address) == (2 * per_address, per_address) == (96, 48)
    assert any(m.cls is ConversationMiddleware for m in app.user_middleware)
    # Serve's duck typing reaches the app behind the guard: its routes (Serve's route metrics) and
    # its exception handlers (Serve's 503s).
    assert guard.routes is app.routes and guard.add_exception_handler == app.add_exception_handler
    assert {"/v1/completions", "/v1/chat/completions"} <= {p.path for p in extract_route_patterns(guard)}
    # The lifespan goes through the guard to the app; a request through it is counted and freed.
    with TestClient(guard, base_url="http://127.0.0.1") as http:  # a host --allowed-hosts lets in
        r = http.get("/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL, r.text
        assert guard.in_flight == 0 and guard.refused == 0


# --- the KubeRay manifest -------------------------------------------------------------------------

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "image"],
                        "properties": {"name": {"type": "string"}, "image": {"type": "string"}},
                    },
                }
            },
        }
    },
}
# The parts of KubeRay's ray.io/v1 RayService CRD this manifest uses. KubeRay wants rayStartParams
# values as strings, and unknown fields are typos the operator would silently drop.
RAYSERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "rayStartParams", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": _STR_MAP,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_kuberay_manifest_is_a_valid_rayservice() -> None:
    import jsonschema
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load(MANIFEST.read_text())
    jsonschema.validate(manifest, RAYSERVICE_SCHEMA)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__, "the manifest's Ray must be the one tested here"
    for group in cluster.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, attr = app.import_path.partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is app_builder
    cfg = configs_from_app_args(app.args)  # the args are flags the server takes
    assert cfg.ray.enabled and cfg.model.model
    # A Serve config's proxy takes its keep-alive from the manifest, not from --keep-alive-timeout.
    assert serve_config.http_options.keep_alive_timeout_s == cfg.server.keep_alive_timeout


# --- a live cluster -------------------------------------------------------------------------------


class RayServer:
    def __init__(self, base_url: str, process: subprocess.Popen, log: Path, state_dir: Path) -> None:
        self.base_url = base_url
        self.process = process
        self.log = log
        self.state_dir = state_dir  # --state-dir, shared by the replicas

    def metrics(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=10).text

    def per_replica(self, series: str) -> dict[str, float]:
        pattern = rf'^rnnserve:{series}\{{model_name="{MODEL}",replica="(\w+)"\}} (\S+)$'
        return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, self.metrics(), re.M)}

    def settled(self, series: str) -> dict[str, float]:
        """Per-replica values once the replicas' reports (every second) have caught up."""
        last = self.per_replica(series)
        while True:
            time.sleep(2.5)
            now = self.per_replica(series)
            if now == last:
                return now
            last = now

    def gauge(self, name: str) -> float:
        """An unlabelled-but-for-the-model series of /metrics (the replicas' sums)."""
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and sample.labels == {"model_name": MODEL}:
                    return sample.value
        raise AssertionError(f"{name} not in /metrics")

    def routed(self) -> dict[str, float]:
        pattern = rf'^rnnserve:ray_routed_requests_total\{{model_name="{MODEL}",outcome="(\w+)"\}} (\S+)$'
        return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, self.metrics(), re.M)}


def _wait(condition, timeout: float, what: str, interval: float = 0.25):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def ray_server(neox_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    tmp = tmp_path_factory.mktemp("ray")
    model_dir = build_model_dir(tmp / MODEL, neox_tokenizer_dir)
    keep_ray_on_loopback()
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    assert context.address_info["node_ip_address"] == "127.0.0.1"
    port = free_port()
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "rnnserve", "serve", "--ray", "--ray-address", context.address_info["gcs_address"],
           "--num-replicas", str(REPLICAS), "--threads-per-replica", "1", "--model", str(model_dir),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--state-dir", str(tmp / "states")]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RNNSERVE_API_KEY", None)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = RayServer(f"http://127.0.0.1:{port}", proc, log, tmp / "states")
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"rnnserve serve --ray exited with {proc.returncode}:\n{log.read_text()}")
            try:
                return httpx.get(server.base_url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 150, "the Ray endpoint to become healthy", interval=0.5)
        _wait(lambda: len(server.per_replica("ray_replica_requests_total")) == 2, 30, "both replicas' stats")
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        ray.shutdown()


def _chat_turns(base_url: str, turns: int, **extra: str) -> None:
    messages = [{"role": "user", "content": f"hello, this is conversation {extra or 'anonymous'}"}]
    for turn in range(turns):
        body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}
        r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        messages += [r.json()["choices"][0]["message"], {"role": "user", "content": f"and then {turn}?"}]


def test_openai_client_streams_through_ray(ray_server: RayServer) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=ray_server.base_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    # The same greedy completion, unstreamed: whichever replica serves it, the model is the same.
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == text
    # The single server's error shapes.
    with pytest.raises(NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert err.value.body["code"] == "model_not_found"
    r = httpx.post(ray_server.base_url + "/v1/completions", json={"prompt": [10**9], "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_the_cluster_listens_on_loopback_only(ray_server: RayServer) -> None:
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)}  # Ray's processes, the server's
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "no listening socket found: the check would prove nothing"

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return addr.is_loopback or (addr.version == 6 and addr.ipv4_mapped is not None and addr.ipv4_mapped.is_loopback)

    outside = [(c.pid, c.laddr) for c in listening if not loopback(c.laddr.ip)]
    assert not outside, outside


def test_grafana_dashboard_reads_the_ray_endpoint(ray_server: RayServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        series
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for series in re.findall(r"\b((?:vllm|rnnserve):[a-z0-9_]+)", target["expr"])
    }
    text = ray_server.metrics()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert used and not used - exported, sorted(used - exported)
    # Engine series are the replicas' sums: two replicas' slots.
    slots = re.search(rf'^rnnserve:state_pool_slots\{{model_name="{MODEL}"\}} (\S+)$', text, re.M)
    assert slots is not None and float(slots.group(1)) == REPLICAS * MAX_NUM_SEQS


def test_every_choice_and_prompt_of_one_request_is_served(ray_server: RayServer) -> None:
    # One HTTP request, several engine calls routed at once (n choices x prompts): Serve's router
    # keeps one pending call per internal request id, so each call needs its own (it hung before).
    body = {"model": MODEL, "prompt": [[5, 6, 7], [8, 9], [10, 11, 12]], "n": 3, "max_tokens": 3}
    for _ in range(3):
        r = httpx.post(ray_server.base_url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=90)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert sorted(c["index"] for c in choices) == list(range(9))
        assert all(c["finish_reason"] == "length" for c in choices)


def _hold_request(port: int, path: str, body: bytes) -> socket.socket:
    """A request whose head and half its body are sent: it stays in the app, reading its body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def _finish_request(sock: socket.socket, body: bytes) -> tuple[int, bytes]:
    sock.sendall(body[len(body) // 2 :])
    response = http.client.HTTPResponse(sock)
    response.begin()
    try:
        return response.status, response.read()
    finally:
        sock.close()


async def _stream_statuses(base_url: str, count: int, **headers: str) -> list[httpx.Response]:
    """``count`` long streamed completions at once; each is closed once its head (and, for a 200, its
    first event) arrived. A refused one's body is read."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10**6, "ignore_eos": True, "stream": True}

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code == 200:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            else:
                await r.aread()
            return r

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(one(client) for _ in range(count)))


def test_edge_guard_refuses_a_flood_from_one_address(ray_server: RayServer) -> None:
    """The ingress's EdgeGuard: while one address has its bound of requests in flight in the app, its
    further requests get the edge's 429 before the app runs, another address's do not, and once the
    held requests end the address is served again; nothing is left running."""
    port = int(ray_server.base_url.rsplit(":", 1)[1])
    per_address = _edge_bound_per_address()
    models = ray_server.base_url + "/v1/models"
    assert httpx.get(models, timeout=30).status_code == 200
    # The bound's worth of requests in the app at once, held there by their unfinished bodies (the
    # proxy hands a request to the ingress on its head). /tokenize: admission does not count it.
    body = json.dumps({"model": MODEL, "prompt": "hello there"}).encode()
    held = [_hold_request(port, "/tokenize", body) for _ in range(per_address)]
    try:
        # The guard refuses this address's next request once all of them reached it (a 429 whose
        # body is the edge's: admission's 429s say something else).
        _wait(lambda: httpx.get(models, timeout=30).status_code == 429, 30, "the held requests at the edge")
        refused = asyncio.run(_stream_statuses(ray_server.base_url, 8))
        for r in refused:
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
            assert r.json() == json.loads(REFUSAL_BODY), r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
        # Another address (the proxy takes X-Forwarded-For from loopback) is under its own bound.
        other = {"X-Forwarded-For": "192.0.2.7"}
        (r,) = asyncio.run(_stream_statuses(ray_server.base_url, 1, **other))
        assert r.status_code == 200, r.text
    finally:
        answers = [_finish_request(sock, body) for sock in held]
    assert [status for status, _ in answers] == [200] * per_address, answers[:3]
    assert all(json.loads(text)["count"] > 0 for _, text in answers)
    # The address has room again: the same flood is served.
    served = asyncio.run(_stream_statuses(ray_server.base_url, 8))
    assert [r.status_code for r in served] == [200] * 8, [r.text for r in served if r.status_code != 200]
    assert httpx.get(models, timeout=30).status_code == 200
    # Every stream closed above ends its engine request (the replicas report each second).
    _wait(
        lambda: ray_server.gauge("vllm:num_requests_running") == 0 == ray_server.gauge("vllm:num_requests_waiting"),
        30,
        "no request left running or waiting",
    )


def test_the_proxy_takes_the_servers_keep_alive_timeout(ray_server: RayServer) -> None:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from rnnserve.config import ServerConfig

    # The fixture's --keep-alive-timeout is the default (5 s); Serve's own default is 90 s.
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    http_options = ray.get(controller.get_http_config.remote(), timeout=30)
    assert http_options.keep_alive_timeout_s == ServerConfig().keep_alive_timeout == 5


def test_same_conversation_lands_on_the_same_replica(ray_server: RayServer) -> None:
    before = ray_server.settled("ray_replica_requests_total")
    routed_before = ray_server.routed()
    _chat_turns(ray_server.base_url, 4, user="alice")
    _chat_turns(ray_server.base_url, 4, session_id="s-1")
    _chat_turns(ray_server.base_url, 4)  # anonymous: matched by its prompt

    def grew() -> dict[str, float] | None:
        now = ray_server.per_replica("ray_replica_requests_total")
        delta = {r: now[r] - before.get(r, 0) for r in now}
        return delta if sum(delta.values()) == 12 else None

    # Replica-side counts (reported each second): 3 conversations x 4 turns, so every replica's count
    # grows by a multiple of 4 exactly when no conversation was split.
    delta = _wait(grew, 20, "the replicas' request counts")
    assert all(v % 4 == 0 for v in delta.values()), delta
    routed = ray_server.routed()
    assert routed["hit"] - routed_before.get("hit", 0) == 9  # every turn after the first
    assert routed["miss"] == routed_before.get("miss", 0)


class _Stream(threading.Thread):
    """A long completion streamed in the background; ``stop`` closes it like a client that leaves."""

    def __init__(self, base_url: str, session: str, **body: object) -> None:
        super().__init__(daemon=True)
        self.body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10**6, "ignore_eos": True,
                     "stream": True, "session_id": session, **body}  # fmt: skip
        self.url = base_url + "/v1/completions"
        self.events: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[len("data: ") :])
                if self.stop.is_set():
                    return


def _running_on_both_replicas(server: RayServer) -> list[str]:
    """Waits until both replicas run a request (they report every second, later on a busy machine)."""
    return _wait(
        lambda: (
            (busy := [r for r, n in server.per_replica("ray_replica_running").items() if n > 0])
            and len(busy) == 2
            and busy
        ),
        30,
        f"both streams running, on different replicas ({server.per_replica('ray_replica_requests_total')})",
    )


def test_named_states_work_on_every_replica(ray_server: RayServer) -> None:
    """--state-dir with --ray: a state saved through the endpoint (on one replica) starts requests on
    both replicas, which load it from the shared folder; unknown and foreign states are 400s."""
    import torch
    from safetensors.torch import save_file

    url = ray_server.base_url
    persona, question = list(range(500, 530)), [11, 12, 13]
    greedy = {"model": MODEL, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(url + "/v1/completions", json={**greedy, "prompt": question, "initial_state": "persona"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "initial_state", r.text
    assert "no state named" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/states", json={"name": "persona", "prompt": persona}, timeout=60)
    assert r.status_code == 200 and r.json()["num_tokens"] == len(persona), r.text
    assert {"object": "state", "name": "persona"} in httpx.get(url + "/v1/states", timeout=30).json()["data"]
    assert (ray_server.state_dir / "persona.safetensors").is_file()
    reference = httpx.post(url + "/v1/completions", json={**greedy, "prompt": persona + question, "max_tokens": 6},
                           timeout=60).json()["choices"][0]["token_ids"]  # fmt: skip
    # Two streams from the state at once: the second goes to the least-loaded replica, the other one.
    streams = [_Stream(url, f"state-{i}", **greedy, prompt=question, initial_state="persona") for i in range(2)]
    try:
        for stream in streams:
            stream.start()
            _wait(lambda s=stream: len(s.events) >= 3, 30, "a stream from the saved state")
        _running_on_both_replicas(ray_server)
        _wait(lambda: all(len(s.events) >= 6 for s in streams), 30, "six tokens of each stream")
    finally:
        for stream in streams:
            stream.stop.set()
    for stream in streams:
        stream.join(30)
        ids = [i for e in stream.events for i in json.loads(e)["choices"][0]["token_ids"]]
        assert ids[:6] == reference, (ids, reference)  # as if the persona were the prompt's start
    # n > 1 from the state: every choice is the greedy continuation (a fork on one replica, or its own run).
    body = {**greedy, "prompt": question, "initial_state": "persona", "n": 2, "max_tokens": 6}
    choices = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert [c["token_ids"] for c in choices] == [reference, reference]
    # A state of another model in the folder is refused as on a single server.
    meta = {"model": "another", "dtype": "torch.float32", "state_shapes": "[]"}
    save_file({"0.ssm": torch.zeros(4)}, str(ray_server.state_dir / "alien.safetensors"), metadata=meta)
    r = httpx.post(url + "/v1/completions", json={**greedy, "prompt": question, "initial_state": "alien"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "initial_state", r.text
    assert "cannot be used with this model" in r.json()["error"]["message"]
    _wait(lambda: not any(ray_server.per_replica("ray_replica_running").values()), 30, "no request left running")


def test_killed_replica_fails_only_its_own_requests(ray_server: RayServer) -> None:
    victim, bystander = _Stream(ray_server.base_url, "victim"), _Stream(ray_server.base_url, "bystander")
    victim.start()
    _wait(lambda: len(victim.events) >= 3, 30, "the first stream")
    bystander.start()  # to the least-loaded replica: the other one
    _wait(lambda: len(bystander.events) >= 3, 30, "the second stream")
    running = _running_on_both_replicas(ray_server)
    replica = running[0]
    actor = ray.get_actor(f"SERVE_REPLICA::rnnserve#{ENGINE_DEPLOYMENT}#{replica}", namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    # Meanwhile the live replica serves new requests.
    for i in range(4):
        r = httpx.post(ray_server.base_url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
    # One client (that of the killed replica) gets an error event, then [DONE].
    ended = _wait(lambda: [s for s in (victim, bystander) if not s.is_alive()], 60, "the killed replica's stream")
    assert len(ended) == 1
    lost = ended[0]
    kept = bystander if lost is victim else victim
    assert lost.events[-1] == "[DONE]"
    assert json.loads(lost.events[-2])["error"]["type"] == "server_error"
    assert all("error" not in json.loads(e) for e in lost.events[:-2])
    # The other one keeps streaming, error-free.
    seen = len(kept.events)
    _wait(lambda: len(kept.events) >= seen + 20, 30, "the other stream to go on")
    kept.stop.set()
    kept.join(30)
    assert not kept.is_alive()
    assert all(e != "[DONE]" and "error" not in json.loads(e) for e in kept.events)
    # Ray starts a new replica in place of the killed one; the stopped stream freed its slot.
    replicas = _wait(
        lambda: (r := ray_server.per_replica("ray_replica_running")) and len(r) == 2 and replica not in r and r,
        60,
        "a replacement replica",
    )
    assert replica not in replicas
    _wait(lambda: not any(ray_server.per_replica("ray_replica_running").values()), 10, "no request left running")
    assert httpx.get(ray_server.base_url + "/health", timeout=10).status_code == 200
