"""The tiny actor base: a mailbox with a high-water mark, a run loop that handles one message at
a time, clean stop.

An exception while handling a message is logged and the actor goes on with the next one: one bad
request must not take a shard down.

Back-pressure: `send` never blocks (a shard must never block its own sender: the head's engine
and a neighbour in the same process deliver straight into the mailbox). Past the high-water mark
the actor is under pressure; a connection that delivers into it then stops reading its socket
(`wants_more`, `when_relieved`: the transport's `Inflow`) until the mailbox is back under the
low-water mark, and TCP pushes back on the sending process. Local senders are never paused, and
what the last shard sends home (tokens, failures) goes to the engine, not to a mailbox: the path
from one mailbox to the next never closes into a cycle, so a ring under pressure slows down but
cannot deadlock on itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from mlxring.aio import wait_for

M = TypeVar("M")
_STOP = object()
# What a message costs beside its tensor: the object, its fields, a request id; a bound on bytes
# alone would let a flood of tiny messages (End, one decode step) through.
_OVERHEAD = 512


@dataclass(frozen=True)
class Watermarks:
    """When a mailbox is full: past `messages` messages or `bytes` bytes (either one); it has
    room again once both are at or under `resume` of their mark.

    Two measures, because the traffic is of two kinds: decode steps are many small messages (one
    per running request: a few hundred at most, far under 4096), prompt chunks a few large ones
    (up to a few tens of MiB of activations each: 2 GiB holds dozens of them, more than the
    stages of a ring hand each other at once). Neither mark is reached by the protocol's own
    traffic; they bound what a peer that sends faster than a shard computes can make it hold.
    """

    messages: int = 4096
    bytes: int = 2 << 30
    # Close under the mark, so that a pause lasts a few messages' handling, not a drained mailbox.
    resume: float = 0.875


def weight(msg: object) -> int:
    """The bytes a message holds, about: its tensor's, its token ids', and a fixed overhead."""
    h: Any = getattr(msg, "h", None)
    payload = 0 if h is None else int(getattr(h, "nbytes", None) or len(getattr(h, "data", b"")))
    return _OVERHEAD + payload + 8 * len(getattr(msg, "tokens", ()))


class Mailbox:
    """The messages waiting for an actor, in order, with a running count of their bytes."""

    def __init__(self) -> None:
        self._q: deque[object] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return bool(self._q)

    def __getitem__(self, i: int) -> object:
        return self._q[i]

    def __iter__(self) -> Iterator[object]:
        return iter(self._q)

    def append(self, msg: object) -> None:
        self._q.append(msg)
        self.bytes += weight(msg)

    def popleft(self) -> object:
        msg = self._q.popleft()
        self.bytes -= weight(msg)
        return msg

    def extendleft(self, msgs: Iterable[object]) -> None:
        for msg in msgs:
            self._q.appendleft(msg)
            self.bytes += weight(msg)


class Actor(Generic[M]):
    def __init__(self, name: str, marks: Watermarks = Watermarks()) -> None:
        self.name = name
        self.log = structlog.get_logger(actor=name)
        # A deque, not an asyncio.Queue: a shard looks at what waits behind a message to run
        # several requests' decode steps as one batch, and ahead of a long prompt's chunks.
        self._mailbox = Mailbox()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.marks = marks
        self.taken = 0  # messages ever sent to this actor (a connection tells its own apart)
        self.pressured = 0  # times the mailbox passed its high-water mark
        self.peak_backlog = 0  # the most messages waiting since the mailbox last passed it
        self._pressed = False
        self._relief: list[Callable[[], None]] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def send(self, msg: M) -> None:
        """Deliver a message; never blocks (connections feeding it pause instead)."""
        box = self._mailbox
        box.append(msg)
        self.taken += 1
        self._ready.set()
        if self._pressed:
            self.peak_backlog = max(self.peak_backlog, len(box))
        elif len(box) > self.marks.messages or box.bytes > self.marks.bytes:
            self._pressed = True
            self.pressured += 1
            self.peak_backlog = len(box)
            self.log.warning("mailbox_full", backlog=len(box), bytes=box.bytes)

    @property
    def backlog(self) -> int:
        return len(self._mailbox)

    @property
    def backlog_bytes(self) -> int:
        return self._mailbox.bytes

    # --- the transport's Inflow: when connections feeding this actor read on --------------

    def wants_more(self) -> bool:
        """False while the mailbox is past its high-water mark and not yet back under its
        low-water mark."""
        return not self._pressed

    def when_relieved(self, resume: Callable[[], None]) -> None:
        """Call `resume` once the mailbox has room again (at once when it has now)."""
        if self._pressed:
            self._relief.append(resume)
        else:
            resume()

    def _relieve(self, force: bool = False) -> None:
        box, marks = self._mailbox, self.marks
        low_messages, low_bytes = marks.messages * marks.resume, marks.bytes * marks.resume
        if not force and (len(box) > low_messages or box.bytes > low_bytes):
            return
        self._pressed = False
        waiting, self._relief = self._relief, []
        self.log.info(
            "mailbox_relieved", backlog=len(box), peak=self.peak_backlog, readers=len(waiting)
        )
        for resume in waiting:
            try:
                resume()
            except Exception:  # noqa: BLE001 - one reader's failure must not keep others paused
                self.log.exception("resume_failed")

    # --- messages -------------------------------------------------------------------------

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
        if self._pressed:
            self._relieve(force=True)  # nothing reads this mailbox any more: no one waits on it

    async def handle(self, msg: M) -> None:
        raise NotImplementedError

    async def on_error(self, msg: M, error: Exception) -> None:
        """Called when handling `msg` raised; the default only logs."""

    async def _run(self) -> None:
        while True:
            if self._pressed:
                self._relieve()
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
