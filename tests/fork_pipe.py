"""Helpers for the fork tests' child scripts (test_runtime, test_safety): a parent
reads what a forked child writes into a pipe and waits for it, both bounded by a
deadline, so a child that hangs after fork fails the test instead of stalling it.
The scripts run in a fresh interpreter with this directory on PYTHONPATH
(conftest.subprocess_env)."""
from __future__ import annotations

import os
import select
import time


def read_until_eof(fd: int, deadline: float, chunk: int = 65536) -> bytes:
    """Everything written to the pipe ``fd`` until its writers close it, or what
    has arrived by ``deadline`` (a ``time.monotonic()`` value)."""
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            part = os.read(fd, chunk)
            if not part:
                break
            data += part
    return data


def wait_child(pid: int, deadline: float):
    """The wait status of the child ``pid`` once it exits, or None if it is still
    running at ``deadline`` (polled every 50 ms)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    return None
