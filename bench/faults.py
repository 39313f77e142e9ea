"""`pykernels serve` under hostile clients and faults, measured on loopback.

    python bench/faults.py [--only poison,keepalive,group,bulk] [--seconds-scale 1.0]

Starts ``python -m pykernels.serving.command --port 0`` (its serving profile
from ``$PYKERNELS_CACHE``) and measures, one scenario at a time:

* poison: 1 client sending a lone surrogate (as a JSON escape and as raw bytes
  ED A0 80) every 20 ms beside 12 normal clients for 15 s: normal requests
  that failed (must be 0), hostile answers by status.
* keepalive: the official ``openai`` client on one keep-alive connection, 200
  single-text requests one after another on an idle server: p50, against the
  p50 of ``MiniLM.encode`` of the same text in this process.
* group: one 32-text interactive request on an idle server: status (and 8 texts
  of 3,000 characters).
* bulk: capacity first (2 closed-loop clients of 256-text bulk requests, 10 s:
  texts/s completed, from the server's counters), then 20 such clients for
  20 s, each retrying a 429 after its Retry-After (``--poll``: every POLL s):
  texts/s completed against capacity,
  cancelled texts and queue depth from /metrics, and each first Retry-After against the real wait (first refusal
  to the attempt that was admitted).

Prints one JSON object. Nothing here asserts; the figures go in a report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx

MODEL = "all-MiniLM-L6-v2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "pykernels.serving.command", "--port",
                                      "0", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                break
        else:
            raise RuntimeError(self.proc.stderr.read()[-3000:])
        self.err_lines = []
        threading.Thread(target=lambda: self.err_lines.extend(self.proc.stderr), daemon=True).start()
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def poison(srv, scale):
    url = srv.url + "/v1/embeddings"
    stop = time.monotonic() + 15 * scale
    normal, hostile, lock = {}, {}, threading.Lock()

    def count(d, k):
        with lock:
            d[k] = d.get(k, 0) + 1

    def evil():
        bodies = [json.dumps({"model": MODEL, "input": "x\ud800"}).encode(),
                  b'{"model":"all-MiniLM-L6-v2","input":"x\xed\xa0\x80"}']
        with httpx.Client(timeout=60) as c:
            i = 0
            while time.monotonic() < stop:
                try:
                    count(hostile, c.post(url, content=bodies[i % 2]).status_code)
                except httpx.HTTPError as e:
                    count(hostile, type(e).__name__)
                i += 1
                time.sleep(0.02)

    def good(i):
        with httpx.Client(timeout=60) as c:
            k = 0
            while time.monotonic() < stop:
                try:
                    r = c.post(url, json={"model": MODEL, "input": [f"client {i} text {k}", "more"]})
                    count(normal, r.status_code)
                    if r.status_code == 429:
                        time.sleep(float(r.headers.get("retry-after", "1")))
                except httpx.HTTPError as e:
                    count(normal, type(e).__name__)
                k += 1

    ts = [threading.Thread(target=evil)] + [threading.Thread(target=good, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    failed = sum(n for k, n in normal.items() if k not in (200, 429))
    return {"normal": normal, "normal_failed": failed, "hostile": hostile,
            "log_lines_during_run": len(srv.err_lines)}


def keepalive_run(srv):
    import numpy as np
    import openai

    from pykernels.models import MiniLM

    text = "how do I reset my password?"
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(20):
        client.embeddings.create(model=MODEL, input=text)
    lat = []
    for _ in range(200):
        t0 = time.perf_counter()
        client.embeddings.create(model=MODEL, input=text)
        lat.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.005)
    m = MiniLM.load()
    for _ in range(20):
        m.encode([text])
    enc = []
    for _ in range(200):
        t0 = time.perf_counter()
        m.encode([text])
        enc.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.005)
    return {"client_p50_ms": round(float(np.median(lat)), 2),
            "client_p90_ms": round(float(np.percentile(lat, 90)), 2),
            "encode_p50_ms": round(float(np.median(enc)), 2),
            "overhead_p50_ms": round(float(np.median(lat) - np.median(enc)), 2)}


def group(srv):
    out = {}
    for name, texts in (("32 short", [f"interactive text number {i}" for i in range(32)]),
                        ("8 x 3000 chars", ["word " * 600] * 8)):
        t0 = time.perf_counter()
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=60)
        out[name] = {"status": r.status_code, "ms": round((time.perf_counter() - t0) * 1e3, 1),
                     "retry_after": r.headers.get("retry-after"),
                     "error": None if r.status_code == 200 else r.json()["error"]["message"][:200]}
    return out


def bulk(srv, scale, poll_s=None):
    url = srv.url + "/v1/embeddings"
    texts = [f"a bulk document of moderate length, number {i}, about kernels and batching"
             for i in range(256)]
    body = {"model": MODEL, "input": texts, "encoding_format": "base64"}  # as openai sends
    hdr = {"X-SLO-Class": "bulk"}

    def closed_loop(n_clients, seconds, retry_poll_s=None):
        stop = time.monotonic() + seconds
        lock = threading.Lock()
        st = {"accepted_texts": 0, "ok": 0, "r429": 0, "other": {}, "waits": []}

        def client():
            with httpx.Client(timeout=300) as c:
                while time.monotonic() < stop:
                    first_refusal, first_ra = None, None
                    while True:
                        sent = time.monotonic()
                        r = c.post(url, json=body, headers=hdr)
                        if r.status_code != 429:
                            break
                        with lock:
                            st["r429"] += 1
                        if first_refusal is None:
                            first_refusal, first_ra = sent, float(r.headers["retry-after"])
                        if time.monotonic() > stop:
                            return
                        time.sleep(retry_poll_s or first_ra)
                    with lock:
                        if r.status_code == 200:
                            st["ok"] += 1
                            if sent < stop:
                                st["accepted_texts"] += 256
                            if first_refusal is not None:
                                st["waits"].append((first_ra, sent - first_refusal))
                        else:
                            st["other"][r.status_code] = st["other"].get(r.status_code, 0) + 1

        ts = [threading.Thread(target=client) for _ in range(n_clients)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        depth = []
        while any(t.is_alive() for t in ts):
            depth.append(srv.metric("pykernels_queue_depth"))
            time.sleep(0.5)
        for t in ts:
            t.join()
        st["seconds"] = time.monotonic() - t0
        st["max_queue_depth"] = max(depth) if depth else 0
        return st

    def done_texts():  # per text as its batch ends (embedded_texts_total: per request)
        return srv.metric("pykernels_requests_total", outcome="completed", **{"class": "bulk"})

    # completed texts/s while the queue is never empty: server-side counters
    # over a window inside each phase (the first seconds warm up the plans)
    def rate_during(n_clients, seconds, window, **kw):
        res = {}

        def sample():
            time.sleep(seconds - window - 0.5)
            a, t0 = done_texts(), time.monotonic()
            time.sleep(window)
            res["rate"] = (done_texts() - a) / (time.monotonic() - t0)

        th = threading.Thread(target=sample)
        th.start()
        st = closed_loop(n_clients, seconds, **kw)
        th.join()
        return res["rate"], st

    capacity, _ = rate_during(2, 12 * scale, 8 * scale)
    cancelled0 = srv.metric("pykernels_requests_total", outcome="cancelled")
    accepted, load = rate_during(20, 20 * scale, 16 * scale, retry_poll_s=poll_s)
    waits = load.pop("waits")
    ratios = [ra / max(w, 1e-3) for ra, w in waits]
    return {"capacity_texts_per_s": round(capacity, 1),
            "served_texts_per_s_under_20_clients": round(accepted, 1),
            "accepted_over_capacity": round(accepted / capacity, 3) if capacity else None,
            "requests_ok": load["ok"], "refusals_429": load["r429"], "other": load["other"],
            "cancelled_texts": srv.metric("pykernels_requests_total", outcome="cancelled") - cancelled0,
            "queue_depth_after": srv.metric("pykernels_queue_depth"),
            "max_queue_depth_sampled": load["max_queue_depth"],
            "retry_after_vs_real_wait": {
                "n": len(waits),
                "median_retry_after_s": statistics.median([ra for ra, _ in waits]) if waits else None,
                "median_real_wait_s": round(statistics.median([w for _, w in waits]), 2) if waits else None,
                "within_2x": sum(0.5 <= r <= 2.0 for r in ratios), "median_ratio":
                    round(statistics.median(ratios), 2) if ratios else None}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="poison,keepalive,group,bulk")
    ap.add_argument("--seconds-scale", type=float, default=1.0)
    ap.add_argument("--poll", type=float, default=None,
                    help="bulk clients retry a 429 every POLL s (default: after Retry-After, "
                         "as the openai client does)")
    a = ap.parse_args(argv)
    which = a.only.split(",")
    out = {"load_before": os.getloadavg()}
    srv = Server()
    try:
        if "keepalive" in which:
            out["keepalive"] = keepalive_run(srv)
        if "group" in which:
            out["group"] = group(srv)
        if "poison" in which:
            out["poison"] = poison(srv, a.seconds_scale)
        if "bulk" in which:
            out["bulk"] = bulk(srv, a.seconds_scale, a.poll)
    finally:
        srv.stop()
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
