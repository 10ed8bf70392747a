"""The tiny actor base: a mailbox, a run loop that handles one message at a time, clean stop.

An exception while handling a message is logged and the actor goes on with the next one: one bad
request must not take a shard down.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

import structlog

M = TypeVar("M")
_STOP = object()


class Actor(Generic[M]):
    def __init__(self, name: str) -> None:
        self.name = name
        self.log = structlog.get_logger(actor=name)
        self._mailbox: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def send(self, msg: M) -> None:
        """Deliver a message; never blocks (the mailbox is unbounded, bounded upstream)."""
        self._mailbox.put_nowait(msg)

    @property
    def backlog(self) -> int:
        return self._mailbox.qsize()

    async def stop(self, timeout: float = 5.0) -> None:
        if self._task is None:
            return
        self._mailbox.put_nowait(_STOP)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
        self._task = None

    async def handle(self, msg: M) -> None:
        raise NotImplementedError

    async def on_error(self, msg: M, error: Exception) -> None:
        """Called when handling `msg` raised; the default only logs."""

    async def _run(self) -> None:
        while True:
            msg = await self._mailbox.get()
            if msg is _STOP:
                return
            try:
                await self.handle(msg)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - supervision: log, tell, keep serving
                self.log.exception("actor_error", message=type(msg).__name__)
                try:
                    await self.on_error(msg, e)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001
                    self.log.exception("actor_on_error_failed")
