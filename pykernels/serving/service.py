"""The embeddings service without a web framework: one model behind a DynamicBatcher.

``EmbeddingService(model, batcher)`` does auth, request validation
(``parse_embeddings_request``: body bytes in, ``EmbeddingRequest`` or ``ApiError``
out), batching, OpenAI-shaped answers and metrics; the Starlette app
(``serving.asgi``) and the Ray Serve replica (``serving.ray``) both drive one.
``make_batcher(model)`` joins the model with the policy: two SLO classes planned
on the model's own description of its forward (``model.describe``) with a
profile measured once per machine (``serving_profile``). See docs/serving.md.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import collections
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import pykernels

from ..policy import SLO, Policy, Profile, ProfileWarning
from ..models.minilm import encoder_op
from ..policy.profile import default_path
from ..policy.slo import cosine_error
from .batcher import DynamicBatcher, Overloaded, TooLarge
from .sizing import EncoderWork
from .metrics import prom_labels, prom_number

log = logging.getLogger("pykernels.serving.service")

MODEL_ID = "all-MiniLM-L6-v2"
MODEL_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
SLO_HEADER = "x-slo-class"
# Accuracy budget per model precision: the planner must accept the precision
# the weights were packed in (the model's description fixes it; see work.PRECISION_REL_ERROR).
_MAX_REL_ERROR = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2, "int8": 5e-2, "int8_7bit": 5e-2}
# The precisions a model serving with accuracy budgets holds (``pykernels serve
# --accuracy``, the Ray deployment, the demo): fp32 (the reference the cosines
# are measured to), bf16 (+50% of the fp32 weight memory: on CPUs where
# vdpbf16ps runs at twice the FMA rate it halves a query's service time at a
# cosine of ~0.99998, within a 0.999 budget; elsewhere it measures about as
# fast as fp32 and the planner may leave it) and the two int8 ones, which share
# one set of int8 weights (+25%); the planner picks per batch what each class's
# budget admits.
ACCURACY_PRECISIONS = ("fp32", "bf16", "int8", "int8_7bit")
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
# The model side: its work for the planner, the batch function, the profile
# --------------------------------------------------------------------------

def served_ops(model, seq_lens: Sequence[int] = (INTERACTIVE_SEQ_LEN, BULK_SEQ_LEN)) -> list:
    """The model's forward (``model.describe``) at the typical sequence length
    of each class: [interactive, bulk]."""
    return [model.describe(s) for s in seq_lens]


def make_encode_fn(model, *, sub_batch: int = SUB_BATCH) -> Callable[[List[str], Any], list]:
    """``fn(texts, plan) -> [(embedding (hidden,) float32, n_tokens), ...]`` for a
    DynamicBatcher: tokenizes the batch once and runs ``model.encode_tokens``
    (sub-batches of ``sub_batch`` sorted by length) with the plan's variant and
    threads, so results match ``model.encode(texts)`` to float rounding."""

    held = tuple(getattr(model, "precisions", ()))

    def encode_batch(texts: List[str], plan) -> list:
        ids, lens = model.tokenize(texts)
        # a model holding several precisions runs the one the plan chose
        prec = getattr(plan, "precision", None)
        kw = {"precision": prec} if len(held) > 1 and prec in held else {}
        out = model.encode_tokens(ids, lens, batch_size=sub_batch,
                                  variant=getattr(plan, "variant", None) or "auto",
                                  threads=getattr(plan, "threads", None), **kw)
        return [(out[i], int(lens[i])) for i in range(len(texts))]

    return encode_batch


def serve_profile_path():
    """Where the server caches the profile of its model's shapes: beside the
    general profile (``$PYKERNELS_CACHE`` or the user cache), same key."""
    p = default_path()
    return p.with_name("serve-minilm-" + p.name)


def serving_profile(model_ops: Sequence, *, path=None, budget_s: float = 8.0,
                    recalibrate: bool = False, progress: bool = False, precisions=None):
    """A profile that can plan ``model_ops``: read from ``path`` (default
    ``serve_profile_path()``); if that is missing, stale, corrupt or cannot
    predict every op, measure the ops' parts (a few seconds: ``budget_s``) and
    save it there. A profile from ``pykernels calibrate --from-benchmark`` works
    too when it covers the shapes."""
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
    n = pykernels.get_num_threads()
    for t in sorted({t for t in (threads or ()) if 1 <= t <= n} or {1, n}):
        for variant in ("latency", "throughput"):
            for b in (1, 4):
                model.encode(["warming up the encoder with a short text"] * b,
                             variant=variant, threads=t)


def make_batcher(model, *, profile=None, interactive_p99_ms: float = 50.0,
                 bulk_throughput: Optional[float] = None, max_queue: int = 4096,
                 profile_path=None, calibrate_budget_s: float = 8.0,
                 name: str = "embeddings", warm: bool = True,
                 accuracy: Optional[dict] = None, **batcher_kw) -> DynamicBatcher:
    """A DynamicBatcher for ``model`` with two classes: ``interactive`` (p99
    target ``interactive_p99_ms``) and ``bulk`` (throughput floor
    ``bulk_throughput`` texts/s, or none), each planned by a ``Policy`` on
    ``profile`` (default: ``serving_profile``). ``warm``: ``warm_up(model)``
    first. ``accuracy``: {class: least cosine to fp32's embeddings}, see
    ``_with_accuracy``."""
    prec = getattr(model, "precision", "fp32")
    op_i, op_b = served_ops(model)
    if accuracy:
        op_i, op_b = (model.describe(s, free=True) for s in (INTERACTIVE_SEQ_LEN, BULK_SEQ_LEN))
    if profile is None:
        profile = serving_profile([op_i, op_b], path=profile_path, budget_s=calibrate_budget_s,
                                  precisions=list(model.precisions) if accuracy else None)
    if warm:
        warm_up(model, sorted({m.threads for m in profile.measurements}) or None)
    err = _MAX_REL_ERROR.get(prec, 1e-4)
    classes = {"interactive": SLO(p99_ms=float(interactive_p99_ms), max_rel_error=err),
               "bulk": SLO(min_throughput=bulk_throughput, max_rel_error=err)}
    if accuracy:
        classes, profile = _with_accuracy(model, classes, profile, accuracy)
    # requests priced by their tokens' work (docs/serving.md, "Sizes")
    batcher_kw.setdefault("size", EncoderWork(model) if hasattr(model, "count_tokens") else None)
    return DynamicBatcher(make_encode_fn(model),
                          policy=lambda slo: Policy(slo, profile, progress=False),
                          classes=classes, op={"interactive": op_i, "bulk": op_b},
                          max_queue=max_queue, name=name, **batcher_kw)


# --- accuracy budgets in cosine (pykernels serve --accuracy) ----------------
_CALIBRATION_TEXTS = [
    "what is the capital of france",
    "how do i reset my password",
    "cheap flights to tokyo in march",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Sentence embeddings map a text to a vector so that similar texts land close together; "
    "the cosine between two vectors measures how alike the texts are.",
    "A kernel library runs matrix products and attention on the CPU. It chooses tile sizes, "
    "thread counts and precisions so that small interactive requests stay fast while large "
    "batches of documents are indexed at the highest throughput the machine allows, and it "
    "learns from the service times it observes while serving.",
]


def _with_accuracy(model, classes: dict, profile, accuracy: dict):
    """Classes whose accuracy budget is a least cosine to fp32's embeddings
    (``accuracy``: {class: cosine}; classes not named keep theirs), and a copy
    of ``profile`` whose precision errors are the distances at the cosines
    ``model.min_cosines`` measures now on calibration texts."""
    cos = model.min_cosines(_CALIBRATION_TEXTS)
    profile = profile.copy()
    profile.precision_error.update({p: cosine_error(c) for p, c in cos.items()})
    out = {k: dataclasses.replace(slo, min_cosine=accuracy[k]) if k in accuracy else slo
           for k, slo in classes.items()}
    log.info("accuracy budgets %s; measured cosines to fp32 %s", accuracy, cos)
    return out, profile


def measure_encoder(model, texts_by_tokens: dict, configs, batches, profile=None,
                    reps: int = 3) -> Profile:
    """A ``Profile`` of whole ``model.encode`` calls (``encoder_op``: the model's
    description measured as one unit, fixed per-call costs included).

    texts_by_tokens: {tokens: [texts of about that many tokens]}; configs:
    [(variant, threads)]; batches: batch sizes; reps: timed calls per cell
    (median as p50, max as p99) after one warm call."""
    profile = profile if profile is not None else Profile()
    for tokens, texts in texts_by_tokens.items():
        op = encoder_op(model, tokens)
        for variant, threads in configs:
            for b in batches:
                batch = [texts[i % len(texts)] for i in range(b)]
                model.encode(batch, batch_size=b, variant=variant, threads=threads)  # warm
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    model.encode(batch, batch_size=b, variant=variant, threads=threads)
                    times.append((time.perf_counter() - t0) * 1e3)
                times.sort()
                profile.add(op, variant, model.precision, threads, b, times[len(times) // 2],
                            max(times[-1], times[len(times) // 2]), samples=reps)
    return profile


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
        check_unicode(t, i)
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


def check_unicode(text: str, index: int) -> None:
    """422 naming the position of the first code point of ``text`` that is not
    Unicode a tokenizer can take: a lone surrogate (U+D800-U+DFFF), which JSON
    allows as ``"\\ud800"`` and Python's ``json.loads`` also makes of the raw
    UTF-8-like bytes ED A0 80. Refused rather than replaced: a replacement
    character would silently change the embedding the client asked for."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, f"input[{index}] holds the lone surrogate U+{ord(text[e.start]):04X} "
                            f"at character {e.start}, which is not valid Unicode text; send "
                            "UTF-8 text (pair surrogates or drop them)",
                       param="input", code="invalid_unicode") from None


def check_content_length(value: Optional[str], limits: Limits) -> None:
    """Refuse a body by its Content-Length header before reading it: 400 if the
    header is not an integer, 413 past ``limits.max_body_bytes``."""
    if value is None:
        return
    try:
        n = int(value)
    except ValueError:
        raise ApiError(400, f"invalid Content-Length header {value!r}", code="invalid_header") from None
    if n > limits.max_body_bytes:
        raise ApiError(413, f"request body of {n} bytes exceeds the limit "
                            f"max_body_bytes={limits.max_body_bytes}", code="body_too_large")


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


class FailureLog:
    """Logs failures at most one line per kind per ``interval_s`` (60 s): the
    first of a kind at once, with its message and no traceback; later ones are
    counted and the count rides on the next line of that kind. A client that
    sends a failing request every 20 ms thus costs one log line a minute, not
    ~94 lines per request. ``counts``: failures seen per kind."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log = logger
        self.interval_s = float(interval_s)
        self.clock = clock
        self.counts: collections.Counter = collections.Counter()
        self._next: Dict[str, float] = {}
        self._quiet: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def report(self, kind: str, message: str) -> bool:
        """Count a failure of ``kind``; True if it was logged."""
        now = self.clock()
        with self._lock:
            self.counts[kind] += 1
            if now < self._next.get(kind, -math.inf):
                self._quiet[kind] += 1
                return False
            self._next[kind] = now + self.interval_s
            quiet, self._quiet[kind] = self._quiet[kind], 0
        more = f" (+{quiet} more of this kind in the last {self.interval_s:g} s)" if quiet else ""
        self.log.error("%s: %s%s", kind, message.replace("\n", " | ")[:500], more)
        return True


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
        self.failures = FailureLog(log)

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

    @contextlib.contextmanager
    def in_flight_request(self):
        """Counts an embeddings request as in flight while the block runs."""
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    # --- embeddings -------------------------------------------------------------
    def parse(self, body: bytes, slo_header: Optional[str] = None) -> EmbeddingRequest:
        return parse_embeddings_request(
            body, limits=self.limits, classes=self.classes, default_class=self.default_class,
            model_ids=self.model_ids, dimensions=self.dimensions, slo_header=slo_header)

    # Texts above which a request is submitted from a worker thread: pricing a
    # text by its size tokenizes it (EncoderWork, ~65 us for a short text), so
    # a 256-text request of long documents held the event loop, and every
    # other connection, for its whole tokenization.
    OFF_LOOP_SUBMIT = 8

    async def _submit(self, req: EmbeddingRequest) -> list:
        """``batcher.submit_many`` for the request: on the event loop for a few
        texts, in the default executor above OFF_LOOP_SUBMIT. Cancelled while the
        executor runs it, the texts it queued are cancelled when it returns."""
        if len(req.texts) <= self.OFF_LOOP_SUBMIT:
            return self.batcher.submit_many(req.texts, req.slo_class)
        pending = asyncio.get_running_loop().run_in_executor(
            None, self.batcher.submit_many, req.texts, req.slo_class)
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            def cancel_queued(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    for f in done.result():
                        f.cancel()
            pending.add_done_callback(cancel_queued)
            raise

    async def embed(self, req: EmbeddingRequest) -> list:
        """Submit the request's texts to the batcher as one unit
        (``submit_many``: all admitted or none) and wait for all. Raises
        ApiError 413 when its class cannot serve that many texts even when idle
        (not retryable: use bulk), 429 when the batcher refuses it now
        (Retry-After: the predicted wait), 503 when it is closed, 500 (with
        Connection: close, logged once per kind a minute) when encoding fails.
        Cancelling the caller cancels the texts still queued."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down",
                           headers={"Retry-After": "1"})
        n = len(req.texts)
        try:
            futs = await self._submit(req)
        except TooLarge as e:
            raise ApiError(413, f"{n} texts are more than the {req.slo_class!r} class can serve "
                                f"within its latency target ({e}); send them with "
                                "'X-SLO-Class: bulk' (or \"slo_class\": \"bulk\") or in smaller "
                                "requests", param="input", code="too_many_inputs_for_class") from None
        except Overloaded as e:
            what = "the request" if n == 1 else f"the request of {n} texts"
            raise ApiError(429, f"overloaded: {what} was refused ({e}); retry after "
                                f"{e.retry_after_s:.3g} s", code="overloaded",
                           headers={"Retry-After": _retry_after(e.retry_after_s)}) from None
        except RuntimeError as e:  # closed between the check and the submit
            raise ApiError(503, f"the server is shutting down ({e})", code="shutting_down",
                           headers={"Retry-After": "1"}) from None
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
        except (asyncio.CancelledError, ApiError):
            raise
        except RuntimeError as e:
            if self.batcher.closed:  # close(drain=False) failed the queued texts
                raise ApiError(503, f"the server is shutting down ({e})", code="shutting_down",
                               headers={"Retry-After": "1"}) from None
            raise self.internal_error("encoding failed", e) from None
        except Exception as e:  # noqa: BLE001 - the batcher isolated it to this request
            raise self.internal_error("encoding failed", e) from None
        finally:
            for f in futs:
                f.cancel()  # no-op for the finished; takes the rest out of the queue
        with self._lock:
            self.texts_total[req.slo_class] += len(results)
            self.tokens_total[req.slo_class] += sum(int(r[1]) for r in results)
        return results

    def internal_error(self, what: str, exc: BaseException) -> ApiError:
        """A 500 for ``exc`` (logged once per kind a minute) that closes the
        connection: the server's state for it is unknown."""
        self.failures.report(f"{what} ({type(exc).__name__})", str(exc))
        return ApiError(500, f"internal server error: {what} ({type(exc).__name__})",
                        code="internal_error", headers={"Connection": "close"})

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
            h = predicted_headroom(self.plan(cls), slos.get(cls))
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

    def plan(self, cls: str):
        """The batcher's current plan of SLO class ``cls`` (None before the first)."""
        c = getattr(self.batcher, "_classes", {}).get(cls)
        return getattr(c, "plan", None)

    def close(self, drain: bool = True) -> None:
        self.closing = True
        self.batcher.close(drain=drain)


