"""A Ray Serve replica killed under load: answers by status, hung requests, recovery.

    python bench/ray_replica_kill.py [--seconds 12] [--no-ingress]

A local Ray instance (2 CPUs), ``build_app(model, num_replicas=2,
ingress=True)`` (``--no-ingress``: the replicas alone, behind Ray's proxy), 4
closed-loop HTTP clients of 4-text requests; 3 s in, one replica actor is
killed (``ray.kill``, Serve restarts it). Prints the answers by status, every
non-200 with its time relative to the kill, the first 200 sent after the kill,
the longest request, and when the deployment is back to 2 running replicas.
Nothing asserts; tests/test_ray_serve.py holds the test.
"""
from __future__ import annotations

import argparse
import collections
import socket
import threading
import time

import httpx
import ray
from ray import serve

from pykernels.models import MiniLM
from pykernels.serving.ray import build_app
from pykernels.serving.service import served_ops, serving_profile


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--no-ingress", dest="ingress", action="store_false")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    m = MiniLM.load()
    serve.run(build_app(m, num_replicas=2, profile=serving_profile(served_ops(m)),
                        interactive_p99_ms=5000.0, ingress=a.ingress),
              name="embeddings", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    res, events, lock = collections.Counter(), [], threading.Lock()
    stop = time.monotonic() + a.seconds

    def client(i):
        with httpx.Client(timeout=120) as c:
            k = 0
            while time.monotonic() < stop:
                t = time.monotonic()
                try:
                    r = c.post(url, json={"model": "all-MiniLM-L6-v2",
                                          "input": [f"text {i} {k} {j}" for j in range(4)]})
                    code, body = r.status_code, (r.text[:200] if r.status_code != 200 else "")
                except Exception as e:  # noqa: BLE001 - counted as lost
                    code, body = type(e).__name__, str(e)[:200]
                with lock:
                    res[code] += 1
                    events.append((t, time.monotonic(), code, body))
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = next(x for x in ray.util.list_named_actors(all_namespaces=True)
                  if "SERVE_REPLICA::embeddings#" in x["name"] and "ingress" not in x["name"])
    kill_t = time.monotonic()
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    for t in threads:
        t.join()
    back = None
    while back is None and time.monotonic() < kill_t + 180:
        dep = serve.status().applications["embeddings"].deployments["pykernels-embeddings"]
        if dep.replica_states.get("RUNNING") == 2:
            back = time.monotonic() - kill_t
        time.sleep(0.5)
    print("ingress" if a.ingress else "no ingress", dict(res))
    for t0, t1, code, body in events:
        if code != 200:
            print(f"  {t0 - kill_t:+.2f} s, took {t1 - t0:.2f} s: {code} {body}")
    after = [t0 - kill_t for t0, _, code, _ in events if code == 200 and t0 > kill_t]
    print(f"first 200 sent after the kill: +{min(after):.3f} s" if after else "no 200 after the kill")
    print(f"longest request: {max(t1 - t0 for t0, t1, _, _ in events):.2f} s; "
          f"back to 2 running replicas: {back if back is None else round(back, 1)} s")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
