"""Admission: a bounded number of requests generating, a bounded queue waiting, 429 beyond.

Every API port of a process shares one Admission: `api.max_concurrent` generate, `api.max_queue`
wait (each at most `cluster.request_timeout_s` for a slot), the rest are refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mlxring.aio import wait_for
from mlxring.api.errors import ApiError
from mlxring.ring.snapshot import QueueDepth


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, wait_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.wait_s = wait_s  # the longest a request waits in the queue for a slot
        self._sem = asyncio.Semaphore(max_concurrent)
        self.running = 0
        self.waiting = 0

    def depth(self) -> QueueDepth:
        return QueueDepth(self.running, self.waiting)

    def _busy(self, message: str, code: str) -> ApiError:
        return ApiError(
            429,
            f"{message} ({self.running} requests generating, {self.waiting} waiting); "
            "retry shortly.",
            type_="rate_limit_exceeded",
            code=code,
            headers={"Retry-After": "1"},
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise self._busy("The server is at capacity", "queue_full")
        self.waiting += 1
        try:
            await wait_for(self._sem.acquire(), self.wait_s)
        except TimeoutError:
            raise self._busy(
                f"No generation slot freed up within {self.wait_s:g} s", "queue_timeout"
            ) from None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()
