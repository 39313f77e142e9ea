"""EmbeddingService.embed submits a large request from a worker thread (pricing
a text by its size tokenizes it, which must not hold the event loop), a small
one on the loop; cancelled mid-submit, the texts it queued are cancelled."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

pytest.importorskip("starlette", reason="the service module needs starlette")

from pykernels.serving.service import EmbeddingRequest, EmbeddingService  # noqa: E402


class RecordingBatcher:
    """submit_many records the thread it ran on and answers at once (or, with
    `gate`, after the gate opens)."""
    classes = {"interactive": None, "bulk": None}
    closed = False

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.threads: list[int] = []
        self.futures: list[concurrent.futures.Future] = []

    def submit_many(self, texts, cls):
        self.threads.append(threading.get_ident())
        if self.gate is not None:
            self.gate.wait(10)
        futs = []
        for t in texts:
            f = concurrent.futures.Future()
            if self.gate is None:
                f.set_result((t, len(t)))
            futs.append(f)
        self.futures.extend(futs)
        return futs


def _request(n: int) -> EmbeddingRequest:
    return EmbeddingRequest(texts=[f"text {i}" for i in range(n)], model="m",
                            encoding_format="float", slo_class="bulk")


@pytest.mark.parametrize("n", [1, EmbeddingService.OFF_LOOP_SUBMIT,
                               EmbeddingService.OFF_LOOP_SUBMIT + 1, 256])
def test_large_requests_are_submitted_off_the_event_loop(n):
    batcher = RecordingBatcher()
    svc = EmbeddingService(None, batcher)

    async def run():
        loop_thread = threading.get_ident()
        results = await svc.embed(_request(n))
        return loop_thread, results

    loop_thread, results = asyncio.run(run())
    assert [r[0] for r in results] == [f"text {i}" for i in range(n)]
    assert len(batcher.threads) == 1
    off_loop = batcher.threads[0] != loop_thread
    assert off_loop == (n > EmbeddingService.OFF_LOOP_SUBMIT)
    assert svc.texts_total["bulk"] == n


def test_cancelled_during_an_off_loop_submit_cancels_what_it_queued():
    gate = threading.Event()
    batcher = RecordingBatcher(gate)
    svc = EmbeddingService(None, batcher)

    async def run():
        task = asyncio.ensure_future(svc.embed(_request(20)))
        while not batcher.threads:  # the submit has started in its thread
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()  # the submit now returns its 20 futures
        for _ in range(1000):
            if len(batcher.futures) == 20 and all(f.cancelled() for f in batcher.futures):
                break
            await asyncio.sleep(0.005)

    asyncio.run(run())
    assert len(batcher.futures) == 20
    assert all(f.cancelled() for f in batcher.futures)
