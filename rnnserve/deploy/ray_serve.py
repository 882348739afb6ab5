"""Scale-out on Ray Serve: engine replicas behind one OpenAI endpoint, conversations routed to their state.

Two deployments make the application:

- ``EngineReplica`` (``--num-replicas`` of them, or ``--autoscale MIN:MAX``): each owns one
  ``AsyncEngine`` (one model copy, its state pool and prefix cache) and streams ``RequestOutput``s.
- ``OpenAIIngress``: the server's own FastAPI app (``rnnserve.server.app.build_app``: the same routes,
  SSE, errors and metrics) around ``RayEngineClient``, an ``EngineClient`` whose ``generate`` streams
  from a replica through a Serve handle. Tokenizing and detokenizing happen here.

``StateAwareRouter`` is the engine deployment's Ray Serve request router (``ray.serve.request_router``):
it sends a request to the replica that served its conversation last (``rnnserve.deploy.routing``),
else, or when that replica is full (Serve's queue probe rejects it) or gone, to the least-loaded one.
Each replica reports its engine stats through Serve's routing stats; ``/metrics`` sums them under
the single-server names (so the Grafana dashboard reads the same) and adds per-replica series and the
routing outcomes. ``/health`` is 200 while at least one replica is running.

A replica that dies mid-stream ends its requests with an error event and ``[DONE]``; Serve starts a
new replica and routes new requests to the live ones meanwhile.

The edge. The ingress serves the app behind its ``EdgeGuard`` (``rnnserve.server.edge``), as
``rnnserve serve`` does: past the per-address or the total bound on HTTP requests in flight, the same
429 (``Retry-After``, the OpenAI error body, ``Connection: close``) before the app runs, and the
guard's ``malloc_trim`` once the ingress goes idle after a burst. Serve (2.60) takes any ASGI callable
from ``__serve_build_asgi_app__``, runs the lifespan through it (the guard passes non-HTTP scopes on)
and reads some FastAPI attributes off it (``routes`` for its route metrics, ``add_exception_handler``
for its 503s): ``ServeEdgeGuard`` hands those to the app behind the guard. The bounds are the ingress
replica's (one), from the replicas' summed slots when it starts. The address is the ASGI scope's
``client``, which Serve's proxy pickles with the rest of its uvicorn scope: the TCP peer of the proxy,
so the real client when nothing stands in front of it. Unlike ``rnnserve serve``, the proxy's
uvicorn keeps its ``X-Forwarded-For`` handling on: from a peer in ``FORWARDED_ALLOW_IPS`` (default
127.0.0.1) the address is the header's, so a proxy on the same machine passes its clients' addresses
on, and a local client may name any address it likes. Behind a load balancer that does not keep the
source address (a Kubernetes Service with ``externalTrafficPolicy: Cluster``), every client is the
balancer's address: all of them together get one address's bound (half the total), and the fair
share tells them apart only by their ``user`` field. What the guard cannot do on Ray: refuse from the
raw head (``run.py``'s protocol) or bound heads per event-loop turn; each refused request still
costs the proxy its parse and a handle call to the ingress, only the app's work is saved.

Timeouts. ``serve_on_ray`` gives Serve's proxy ``--keep-alive-timeout`` (``keep_alive_timeout_s``,
whole seconds, rounded up). The proxy has no read timeout: a connection that never completes its
request head stays open (Serve's ``request_timeout_s`` is end-to-end, and would end long streams
too), which ``rnnserve serve`` closes after ``--read-timeout``. A body that trickles in still gets the
app's 408 after ``--read-timeout`` (the proxy hands the request to the ingress on its head, and the
body follows). An application deployed from a Serve config (``app_builder``: ``serve run``, KubeRay)
takes its HTTP options from that config's ``http_options``, not from these flags; so does one joining
a cluster whose Serve already runs (Serve ignores new HTTP options then, and logs that).

Named states (``--state-dir``) live in one folder at the same path on every machine (a shared volume,
as the model is): ``POST /v1/states`` runs on one replica, which writes the file; every replica loads
a name from the folder when a request first names it, and again once the file changed. The ingress
lists the folder for ``GET /v1/states``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import os
import random
import signal
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rnnserve.config import ConfigError, ModelConfig, RayConfig
from rnnserve.console import CLIError
from rnnserve.deploy.routing import AffinityTable, Conversation, Outcome
from rnnserve.engine.request import FinishReason, RequestOutput, SamplingParams
from rnnserve.server.edge import EdgeGuard
from rnnserve.server.run import shorten_gil_switch_interval

if TYPE_CHECKING:
    from rnnserve.cli import ServeConfigs
    from rnnserve.engine.engine import EngineStats

logger = logging.getLogger("rnnserve.deploy")

APP_NAME = "rnnserve"
ENGINE_DEPLOYMENT = "EngineReplica"
ROUTING_STATS_PERIOD_S = 1.0  # how often Serve collects each replica's engine stats (metrics, health)

# The conversation a request names (``session_id`` / ``user``), set per request by ConversationMiddleware.
CONVERSATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("rnnserve_conversation", default=None)


def resolve_model(model_cfg: ModelConfig) -> tuple[ModelConfig, str]:
    """The model config with the default model's folder filled in, and the served model's name
    (as ``rnnserve serve`` names it). Every process calls this itself: the default model is written
    (atomically, deterministically) into the local cache of whichever node it runs on."""
    name = model_cfg.served_model_name or model_cfg.model
    if model_cfg.model is None:
        from rnnserve.models.default import ensure_default_model

        path = ensure_default_model()
        model_cfg = dataclasses.replace(model_cfg, model=str(path))
        name = name or path.name
    return model_cfg, str(name)


def conversation_of(body: bytes) -> str | None:
    """``session:<session_id>``, else ``user:<user>`` from a JSON request body; None when it names neither."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    for field in ("session_id", "user"):
        value = data.get(field)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return f"{field.removesuffix('_id')}:{value}"
    return None


class ConversationMiddleware:
    """Reads a POST body's ``session_id`` / ``user`` into ``CONVERSATION`` for the router, then replays
    the body. A body over ``max_bytes`` is replayed unparsed (the app's body limit runs first anyway)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        total = 0
        complete = False
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                break
            if not message.get("more_body", False):
                complete = True
                break
        token = None
        if complete:
            token = CONVERSATION.set(conversation_of(b"".join(m.get("body", b"") for m in messages)))

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if token is not None:
                CONVERSATION.reset(token)


# Routers of this process (the ingress owns the engine handle, so its router lives here).
_ROUTERS: weakref.WeakSet[StateAwareRouter] = weakref.WeakSet()


def _conversation(pending: PendingRequest | None) -> Conversation | None:
    """The conversation of an engine ``generate`` call; None for other calls (``info``)."""
    if pending is None or "prompt_token_ids" not in pending.kwargs:
        return None
    return Conversation(pending.kwargs.get("session"), pending.kwargs["prompt_token_ids"])


class StateAwareRouter(RequestRouter):
    """First choice: the replica that served the conversation last. Else, or when it rejects the
    request (its queue is full) or is gone: the least-loaded replica (ties broken at random)."""

    def initialize_state(self, max_conversations: int = 100_000) -> None:
        self.table = AffinityTable(max_conversations)
        self.outcomes: Counter[Outcome] = Counter()
        self._in_flight: dict[str, str] = {}  # Serve's internal request id -> replica id
        # Serve ships this class to the handle's process by value (cloudpickle), with a copy of this
        # module's globals: register in the imported module, where RayEngineClient looks.
        import rnnserve.deploy.ray_serve as this_module

        this_module._ROUTERS.add(self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        conv = _conversation(pending_request)
        preferred = None if conv is None else self.table.lookup(conv)
        first = [r for r in candidate_replicas if r.replica_id.unique_id == preferred]
        rest = [r for r in candidate_replicas if r.replica_id.unique_id != preferred]
        # One replica per rank, fewest requests in flight first (this router is the deployment's only
        # caller, so its own count is exact). Serve, given a rank of several, would prefer one with a
        # cached queue length over an idle one it has not probed yet.
        loads = Counter(self._in_flight.values())
        random.shuffle(rest)
        rest.sort(key=lambda r: loads[r.replica_id.unique_id])
        return [ranked for ranked in (first, *([r] for r in rest)) if ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._in_flight[pending_request.metadata.internal_request_id] = replica_id.unique_id
        conv = _conversation(pending_request)
        if conv is not None:
            self.outcomes[self.table.record(conv, replica_id.unique_id)] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._in_flight.pop(internal_request_id, None)

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Replica id -> its last reported stats (``EngineReplica.record_routing_stats``), running replicas only."""
        return {rid.unique_id: dict(r.routing_stats) for rid, r in self.curr_replicas.items() if r.routing_stats}


@contextlib.contextmanager
def _own_internal_request_id() -> Iterator[None]:
    """A handle call made inside gets an internal request id of its own. Serve gives every call made
    while serving one HTTP request that request's id, and its router keeps one pending call per id:
    the engine calls of an n > 1 request or of several prompts, routed together, left all but one
    waiting for a replica forever (and this module's router counted them as one in flight). The HTTP
    request id, which logs show, stays."""
    from ray.serve import context as serve_context
    from ray.serve._private.utils import generate_request_id

    current = serve_context._get_serve_request_context()
    token = serve_context._serve_request_context.set(
        dataclasses.replace(current, _internal_request_id=generate_request_id())
    )
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


def _router_for(app_name: str) -> StateAwareRouter | None:
    return next((r for r in list(_ROUTERS) if r.app_name == app_name), None)


def _final_output(request_id: str, error: str) -> RequestOutput:
    from rnnserve.engine.engine import final_output  # torch stays out of this module's import

    return final_output(request_id, FinishReason.ERROR, error)


def aggregate_stats(per_replica: list[dict[str, Any]]) -> EngineStats:
    """One ``EngineStats`` for the whole deployment: counts and totals summed over replicas, the pool
    usage recomputed from the summed slots; sizes per sequence or token (the same on every replica)
    and the last step time are the max."""
    from rnnserve.engine.engine import EngineStats

    out: dict[str, Any] = {}
    for f in dataclasses.fields(EngineStats):
        values = [s[f.name] for s in per_replica if f.name in s]
        if f.name in ("state_bytes_per_slot", "last_step_seconds", "kv_bytes_per_token"):
            out[f.name] = max(values, default=0)
        else:
            out[f.name] = sum(values)
    out["state_pool_usage"] = out["slots_used"] / out["num_slots"] if out.get("num_slots") else 0.0
    return EngineStats(**out)


class RayEngineClient:
    """The ``EngineClient`` of the ingress app: every request streams from an engine replica.

    It takes the engine's state options: ``initial_state`` and ``save_state`` go to the replica, which
    reads and writes the shared ``--state-dir``; ``fork_of`` too, though an n > 1 choice shares its
    sibling's prefill only where both land on one replica (elsewhere the engine runs it on its own)."""

    takes_state_options = True

    def __init__(self, handle: DeploymentHandle, app_name: str, state_dir: str | None = None) -> None:
        self._handle = handle
        self._app_name = app_name
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self.max_model_len: int | None = None
        self.vocab_size = 0

    async def connect(self) -> None:
        """Learn the model's limits from a replica (this also creates the handle's router)."""
        info = await self._handle.info.remote()
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]

    async def wait_for_stats(self, replicas: int, timeout_s: float) -> None:
        """Until ``replicas`` replicas have reported their engine stats (or ``timeout_s`` passed): the
        app sizes its admission queue from ``stats().num_slots`` when it is built."""
        deadline = time.monotonic() + timeout_s
        while len(self.replica_stats()) < replicas and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def start(self) -> None:
        """Nothing to start: Serve runs the replicas."""

    async def shutdown(self) -> None:
        """Nothing to stop: the replicas belong to Serve."""

    @property
    def is_running(self) -> bool:
        """At least one replica is running (Serve health-checks them; see EngineReplica.check_health)."""
        router = _router_for(self._app_name)
        return router is not None and len(router.curr_replicas) > 0

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        router = _router_for(self._app_name)
        return {} if router is None else router.replica_stats()

    def routing_outcomes(self) -> dict[str, int]:
        router = _router_for(self._app_name)
        return {} if router is None else dict(router.outcomes)

    def stats(self) -> EngineStats:
        return aggregate_stats(list(self.replica_stats().values()))

    def state_names(self) -> list[str]:
        """The saved states in the shared ``--state-dir`` (none without one)."""
        from rnnserve.engine.state_store import state_names

        return state_names(self._state_dir) if self._state_dir is not None else []

    async def abort(self, request_id: str) -> None:
        """Requests are aborted by closing their stream (the replica's generator is cancelled)."""

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fork_of: str | None = None,
        initial_state: str | None = None,
        save_state: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        options = {"fork_of": fork_of, "initial_state": initial_state, "save_state": save_state}
        return self._generate(request_id, list(prompt_token_ids), params, CONVERSATION.get(), options)

    async def _generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        session: str | None,
        options: dict[str, str | None],
    ) -> AsyncIterator[RequestOutput]:
        with _own_internal_request_id():
            stream = self._handle.options(stream=True).generate.remote(
                request_id=request_id, prompt_token_ids=prompt_token_ids, params=params, session=session, **options
            )
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield out
                if finished:
                    return
            finished = True
            yield _final_output(request_id, "the engine replica ended the stream without finishing it")
        except ray.exceptions.RayTaskError as exc:
            # The replica raised: an input error (ValueError) goes back as it was, for the 400.
            finished = True
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError):
                raise cause from None
            raise
        except ray.exceptions.RayError as exc:
            finished = True
            logger.warning("request %s lost its engine replica: %s", request_id, type(exc).__name__)
            yield _final_output(
                request_id, f"the engine replica serving this request went away ({type(exc).__name__}); retry it"
            )
        finally:
            if not finished:
                stream.cancel()  # the client left or a stop string matched: the replica aborts it


class _RayCollector(Collector):
    """Routing outcomes, live replicas and per-replica engine series (label ``replica``)."""

    def __init__(self, model_name: str, client: RayEngineClient) -> None:
        self._model_name = model_name
        self._client = client

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name"]
        routed = CounterMetricFamily(
            "rnnserve:ray_routed_requests",
            "Engine requests by routing outcome: hit (the conversation's replica), miss (it was full or "
            "gone), new (no earlier turn known).",
            labels=[*labels, "outcome"],
        )
        outcomes = self._client.routing_outcomes()
        for outcome in ("hit", "miss", "new"):
            routed.add_metric([self._model_name, outcome], float(outcomes.get(outcome, 0)))
        yield routed
        stats = self._client.replica_stats()
        live = GaugeMetricFamily("rnnserve:ray_replicas", "Engine replicas running.", labels=labels)
        live.add_metric([self._model_name], float(len(stats)))
        yield live
        per_replica = [
            ("rnnserve:ray_replica_requests", "Engine requests a replica has taken.", "requests_total", True),
            ("rnnserve:ray_replica_running", "Requests holding a state slot, per replica.", "num_running", False),
            ("rnnserve:ray_replica_waiting", "Requests waiting for a slot, per replica.", "num_waiting", False),
            ("rnnserve:ray_replica_state_pool_usage", "State pool usage, per replica.", "state_pool_usage", False),
            ("rnnserve:ray_replica_generation_tokens", "Tokens out, per replica.", "generation_tokens_total", True),
        ]  # fmt: skip
        for name, doc, key, is_counter in per_replica:
            family_cls = CounterMetricFamily if is_counter else GaugeMetricFamily
            family = family_cls(name, doc, labels=[*labels, "replica"])
            for replica, s in sorted(stats.items()):
                family.add_metric([self._model_name, replica], float(s.get(key, 0)))
            yield family


def _keep_replica_grpc_on_loopback() -> None:
    """Ray Serve binds each replica's inter-deployment gRPC server on every interface (``[::]:0`` in
    ``ray/serve/_private/replica.py``, after the user constructor runs). On a node whose address is
    loopback (``keep_ray_on_loopback``) bind it on loopback, like the rest of that cluster."""
    if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "rnnserve_loopback", False):
        return

    def bind_on_loopback(server: Any, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    bind_on_loopback.rnnserve_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_on_loopback


class EngineReplica:
    """One model copy and its engine; streams a request's outputs to the ingress."""

    async def __init__(self, cfg: ServeConfigs) -> None:
        import torch

        from rnnserve.engine.engine import AsyncEngine

        _keep_replica_grpc_on_loopback()
        # The engine's step loop runs in a thread beside this replica's event loop, as in rnnserve serve.
        shorten_gil_switch_interval()
        # A CPU replica reserves --threads-per-replica Ray CPUs and runs that many torch threads.
        torch.set_num_threads(cfg.ray.threads_per_replica)
        model_cfg, _ = resolve_model(cfg.model)
        self.engine = AsyncEngine.from_configs(
            model_cfg,
            cfg.pool,
            cfg.scheduler,
            cfg.runner,
            prefix_cache_config=cfg.prefix_cache,
            state_dir=cfg.state_dir,
            kv_cache_config=cfg.kv_cache,
        )
        await self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.requests_total = 0
        logger.info(
            "engine replica %s ready (pid %d, %d torch threads)", self.replica, os.getpid(), torch.get_num_threads()
        )

    async def info(self) -> dict[str, Any]:
        return {
            "max_model_len": self.engine.max_model_len,
            "vocab_size": self.engine.vocab_size,
            "replica": self.replica,
            "pid": os.getpid(),
        }

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        session: str | None = None,
        fork_of: str | None = None,
        initial_state: str | None = None,
        save_state: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request. ``session`` is read by the router, not here; the
        state options are ``AsyncEngine.generate``'s (named states in the shared ``--state-dir``)."""
        self.requests_total += 1
        stream = self.engine.generate(
            request_id, prompt_token_ids, params, fork_of=fork_of, initial_state=initial_state, save_state=save_state
        )
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # cancelled by the ingress: the engine aborts the request

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve collects this every ROUTING_STATS_PERIOD_S for the router (metrics, health)."""
        return {
            "replica": self.replica,
            "requests_total": self.requests_total,
            **dataclasses.asdict(self.engine.stats()),
        }

    def check_health(self) -> None:
        """Serve restarts a replica whose engine step loop is gone."""
        if not self.engine.is_running:
            raise RuntimeError("the engine step loop is not running")


class ServeEdgeGuard(EdgeGuard):
    """The ingress's ASGI app: an ``EdgeGuard`` that also shows Serve the FastAPI app behind it.

    Serve reads FastAPI attributes off whatever ``__serve_build_asgi_app__`` returns when it has them
    (``routes``, ``router``, ``root_path`` for its per-route metrics; ``add_exception_handler`` for
    its 503 on ``BackPressureError`` and ``DeploymentUnavailableError``), and silently does without
    them otherwise; what the guard lacks is the app's."""

    def __getattr__(self, name: str) -> Any:
        if name == "app":  # not set yet (a half-built object): no app to ask
            raise AttributeError(name)
        return getattr(self.app, name)


@serve.ingress()
class OpenAIIngress:
    """The OpenAI API: rnnserve's FastAPI app over a RayEngineClient."""

    async def __init__(self, engine: DeploymentHandle, cfg: ServeConfigs, app_name: str) -> None:
        _keep_replica_grpc_on_loopback()
        self._cfg = cfg
        self._client = RayEngineClient(engine, app_name, cfg.state_dir)
        await self._client.connect()
        initial = cfg.ray.autoscale[0] if cfg.ray.autoscale is not None else cfg.ray.num_replicas
        await self._client.wait_for_stats(initial, timeout_s=60.0)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from rnnserve.models.loader import resolve_model_path
        from rnnserve.server.app import build_app
        from rnnserve.server.tokenizer import load_tokenizer

        model_cfg, name = resolve_model(self._cfg.model)
        path = resolve_model_path(str(model_cfg.model))
        folder = path if path.is_dir() else path.parent
        tokenizer = load_tokenizer(folder, model_cfg.tokenizer, model_cfg.chat_template)
        app = build_app(
            self._client,
            tokenizer,
            model_name=name,
            model_root=str(folder),
            server_config=self._cfg.server,
            edge_guard=ServeEdgeGuard,  # outermost, as uvicorn serves build_app's guard in rnnserve serve
        )
        app.state.ctx.metrics.registry.register(_RayCollector(name, self._client))
        # Innermost (the end of the middleware list): after the app's host, key, JSON and body-limit
        # checks, which keep their order and timeouts; before any route.
        app.user_middleware.append(Middleware(ConversationMiddleware, max_bytes=self._cfg.server.max_request_bytes))
        return app.state.edge


def _uses_gpu(model_cfg: ModelConfig) -> bool:
    if model_cfg.device.startswith("cuda"):
        return True
    return model_cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def build_application(cfg: ServeConfigs, app_name: str = APP_NAME) -> serve.Application:
    """The Serve application (needs a connected Ray: GPU replicas are chosen from the cluster's resources)."""
    ray_cfg: RayConfig = cfg.ray
    gpu = _uses_gpu(cfg.model)
    actor_options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": ray_cfg.threads_per_replica}
    # Serve's queue limit per replica = the engine's slots: a full replica rejects, the router moves on.
    scaling: dict[str, Any]
    if ray_cfg.autoscale is not None:
        low, high = ray_cfg.autoscale
        scaling = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=low,
                max_replicas=high,
                target_ongoing_requests=max(1, cfg.pool.max_num_seqs // 2),
            )
        }
    else:
        scaling = {"num_replicas": ray_cfg.num_replicas}
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        ray_actor_options=actor_options,
        max_ongoing_requests=cfg.pool.max_num_seqs,
        health_check_period_s=5,
        request_router_config=RequestRouterConfig(
            request_router_class=StateAwareRouter,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
        **scaling,
    )
    # The ingress tokenizes and frames SSE: light work, so it takes no CPU of the replicas' budget.
    ingress = serve.deployment(OpenAIIngress, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(engine.bind(cfg), cfg, app_name)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``import_path`` for ``serve run`` / a KubeRay RayService (see ``configs_from_app_args``)."""
    return build_application(configs_from_app_args(args))


def configs_from_app_args(args: dict[str, Any]) -> ServeConfigs:
    """An application's ``args`` are ``rnnserve serve`` flags without their dashes, parsed by the
    same parser: ``{"model": "/models/m", "num-replicas": 2, "enforce-eager": true}``."""
    from rnnserve.cli import add_serve_arguments, configs_from_args

    argv = ["--ray"]
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    parser = argparse.ArgumentParser(
        prog="rnnserve serve (Ray Serve application args)", exit_on_error=False, allow_abbrev=False
    )
    add_serve_arguments(parser)
    try:
        parsed, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ValueError(f"bad application args: {exc}") from exc
    if unknown:
        raise ValueError(f"unknown application args: {' '.join(unknown)}")
    return configs_from_args(parsed)


def keep_ray_on_loopback() -> None:
    """Make the next local ``ray.init`` use 127.0.0.1 as its node address, so Ray binds its ports on
    loopback only. Ray turns a loopback ``_node_ip_address`` into the machine's external address,
    except where clusters are off (its rule on macOS and Windows): that switch, set here for Linux too."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def serve_on_ray(cfg: ServeConfigs) -> int:
    """``rnnserve serve --ray``: start (or join) a Ray cluster, deploy, serve until SIGINT / SIGTERM."""
    ray_cfg = cfg.ray
    local = ray_cfg.address is None
    if local:
        needed = ray_cfg.threads_per_replica * (ray_cfg.autoscale[1] if ray_cfg.autoscale else ray_cfg.num_replicas)
        cpus = os.cpu_count() or 1
        if needed > cpus:
            logger.warning("%d replica CPUs asked for on %d cores: the replicas share them", needed, cpus)
        if cfg.server.host in ("127.0.0.1", "localhost"):
            keep_ray_on_loopback()
        ray.init(address="local", num_cpus=max(cpus, needed), include_dashboard=False, logging_level=logging.WARNING)
    else:
        if ray_cfg.address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            keep_ray_on_loopback()  # a cluster on loopback (else Ray dials the machine's external address)
        try:
            ray.init(address=ray_cfg.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as exc:
            raise CLIError(f"cannot join the Ray cluster at {ray_cfg.address}: {exc}", status=2) from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(
            http_options={
                "host": cfg.server.host,
                "port": cfg.server.port,
                # Serve's field is whole seconds: never shorter than asked.
                "keep_alive_timeout_s": math.ceil(cfg.server.keep_alive_timeout),
            }
        )
        try:
            app = build_application(cfg)
        except ConfigError as exc:
            raise CLIError(str(exc), status=2) from exc
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # a replica failed to start: its traceback is in the log above
            raise CLIError(f"the Ray Serve application did not start: {exc}") from exc
        scale = f"{ray_cfg.autoscale[0]}..{ray_cfg.autoscale[1]}" if ray_cfg.autoscale else str(ray_cfg.num_replicas)
        logger.info(
            "rnnserve on Ray Serve: %s engine replicas at http://%s:%d/v1", scale, cfg.server.host, cfg.server.port
        )
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0


__all__ = [
    "APP_NAME",
    "CONVERSATION",
    "ConversationMiddleware",
    "EngineReplica",
    "OpenAIIngress",
    "RayEngineClient",
    "ServeEdgeGuard",
    "StateAwareRouter",
    "aggregate_stats",
    "app_builder",
    "build_application",
    "conversation_of",
    "serve_on_ray",
]
