"""Servers the demo compares: static batchers (priority levels or one FIFO)
and the pykernels DynamicBatcher, behind one ``submit(item, cls)``."""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Optional

from ..policy import SLO, Policy
from ..serving import DynamicBatcher
from .workload import BULK_BATCH

# ---------------------------------------------------------------------------
# Static servers: one worker thread, a batch of at most ``batch`` items.
class StaticServer:
    """A static batcher. ``priority``: interactive requests always leave the
    queue first and a batch is filled in priority order (Triton's
    priority_levels); otherwise one FIFO for both classes. A batch waits at
    most ``max_wait_s`` after its first request to fill. ``aimd_target_ms``:
    the batch size follows Clipper's AIMD on batch service time."""

    def __init__(self, encode, *, batch: int, max_wait_s: float, variant: str, threads: int,
                 priority: bool = False, aimd_target_ms: Optional[float] = None):
        self.encode = encode
        self.batch = batch
        self.max_wait_s = max_wait_s
        self.variant = variant
        self.threads = threads
        self.priority = priority
        self.aimd_target_ms = aimd_target_ms
        self._queues = {"interactive": deque(), "bulk": deque()}
        self._cv = threading.Condition()
        self._stop = False
        self._recent: deque = deque(maxlen=8)
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()

    def submit(self, item, cls):
        fut: Future = Future()
        q = self._queues[cls] if self.priority else self._queues["bulk"]
        with self._cv:
            q.append((item, fut, time.monotonic()))
            self._cv.notify()
        return fut

    def _queued(self) -> int:
        return len(self._queues["interactive"]) + len(self._queues["bulk"])

    def take(self, limit: int) -> list:
        """Pop up to ``limit`` requests, interactive first (caller holds the lock)."""
        out = []
        for q in (self._queues["interactive"], self._queues["bulk"]):
            while q and len(out) < limit:
                out.append(q.popleft())
        return out

    def _run(self):
        while True:
            with self._cv:
                while not self._queued() and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queued():
                    return
                limit = max(1, int(self.batch))
                first = min(q[0][2] for q in self._queues.values() if q)
                while self._queued() < limit and not self._stop:
                    left = first + self.max_wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                items = self.take(limit)
            t0 = time.perf_counter()
            try:
                out = self.encode([it[0] for it in items], self.variant, self.threads)
                for (_, fut, _), row in zip(items, out):
                    fut.set_result(row)
            except Exception as e:  # noqa: BLE001 - fail this batch's futures only
                for _, fut, _ in items:
                    fut.set_exception(e)
            ms = (time.perf_counter() - t0) * 1e3
            if self.aimd_target_ms is not None:
                self._recent.append(ms)
                # Clipper's AIMD: additive increase while batches meet the target,
                # multiplicative decrease (10%) on a miss.
                if max(self._recent) <= self.aimd_target_ms * 0.5:
                    self.batch = min(BULK_BATCH, self.batch + 1)
                elif ms > self.aimd_target_ms * 0.5:
                    self.batch = max(1, int(self.batch * 0.9))
                    self._recent.clear()

    def close(self):
        """Stop: the batch in flight completes, queued requests fail (the
        run has stopped counting; draining 128 documents would only add minutes)."""
        with self._cv:
            self._stop = True
            left = [r for q in self._queues.values() for r in q]
            for q in self._queues.values():
                q.clear()
            self._cv.notify_all()
        for _, fut, _ in left:
            fut.set_exception(RuntimeError("server closed before this request ran"))
        self._worker.join(timeout=60)


FifoServer = StaticServer  # the name the FIFO reference rows had


class PolicyServer:
    """The pykernels DynamicBatcher behind the same submit() as the baselines.

    ops: class -> op the policy plans (precision None: the planner's choice);
    accuracy: class -> the least cosine to fp32's embeddings; size /
    unit_size: the batcher's (requests priced by their real work). Every
    batch's (time, class, precision, items) goes to ``self.batches``."""

    def __init__(self, model, profile, p99_ms: float, ops: dict, accuracy: dict, *,
                 size=None, unit_size=None):

        self.batches: list = []
        by_op = {id(op): cls for cls, op in ops.items()}
        classes = {"interactive": SLO(p99_ms=p99_ms, min_cosine=accuracy["interactive"]),
                   "bulk": SLO(min_cosine=accuracy["bulk"])}

        def run(items, plan):
            out = model.encode(items, batch_size=len(items), variant=plan.variant,
                               threads=plan.threads, precision=plan.precision)
            self.batches.append((time.monotonic(), by_op.get(id(plan.op), "?"), plan.precision,
                                 len(items)))
            return list(out)

        self.policies: dict = {}

        def make(slo):
            pol = Policy(slo, profile)
            self.policies[slo] = pol
            return pol

        self.batcher = DynamicBatcher(run, policy=make, classes=classes, op=ops, name="demo",
                                      size=size, unit_size=unit_size)
        for slo, pol in self.policies.items():  # build the cost models before the clock starts
            pol.plan(ops["interactive" if slo.p99_ms is not None else "bulk"], queued=1)

    def submit(self, item, cls):
        return self.batcher.submit(item, cls)

    def close(self):
        self.batcher.close(drain=False)  # as StaticServer.close: queued requests fail


