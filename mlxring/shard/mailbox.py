"""The tiny actor base: a mailbox, a run loop that handles one message at a time, clean stop.

An exception while handling a message is logged and the actor goes on with the next one: one bad
request must not take a shard down.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

from mlxring.aio import wait_for

M = TypeVar("M")
_STOP = object()


class Actor(Generic[M]):
    def __init__(self, name: str) -> None:
        self.name = name
        self.log = structlog.get_logger(actor=name)
        # A deque, not an asyncio.Queue: a shard looks at what waits behind a message to run
        # several requests' decode steps as one batch, and ahead of a long prompt's chunks.
        self._mailbox: deque[object] = deque()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def send(self, msg: M) -> None:
        """Deliver a message; never blocks (the mailbox is unbounded, bounded upstream)."""
        self._mailbox.append(msg)
        self._ready.set()

    @property
    def backlog(self) -> int:
        return len(self._mailbox)

    def take_out(self, pick: Callable[[object], bool | None]) -> list[M]:
        """Take the messages `pick` accepts out of the mailbox, in order, leaving the rest in
        theirs; the scan stops where `pick` returns None."""
        out: list[M] = []
        box = self._mailbox
        keep: list[object] = []
        while box:
            verdict = pick(box[0])
            if verdict is None:
                break
            if verdict:
                out.append(box.popleft())  # type: ignore[arg-type]
            else:
                keep.append(box.popleft())
        box.extendleft(reversed(keep))
        return out

    def next_message(self) -> object:
        """The message to handle next: the oldest one, unless a subclass knows better."""
        return self._mailbox.popleft()

    async def stop(self, timeout: float = 5.0) -> None:
        if self._task is None:
            return
        self._mailbox.append(_STOP)
        self._ready.set()
        try:
            await wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
        self._task = None

    async def handle(self, msg: M) -> None:
        raise NotImplementedError

    async def on_error(self, msg: M, error: Exception) -> None:
        """Called when handling `msg` raised; the default only logs."""

    async def _run(self) -> None:
        while True:
            if not self._mailbox:
                self._ready.clear()
                await self._ready.wait()
                continue
            msg = self.next_message()
            if msg is _STOP:
                return
            # Every log line about a request carries its id, on every node it passes.
            rid = getattr(msg, "rid", None)
            with structlog.contextvars.bound_contextvars(**({"rid": rid} if rid else {})):
                try:
                    await self.handle(msg)  # type: ignore[arg-type]
                except Exception as e:  # noqa: BLE001 - supervision: log, tell, keep serving
                    self.log.exception("actor_error", message=type(msg).__name__)
                    try:
                        await self.on_error(msg, e)  # type: ignore[arg-type]
                    except Exception:  # noqa: BLE001
                        self.log.exception("actor_on_error_failed")
