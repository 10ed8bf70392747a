"""One TCP connection carrying `wire` frames, read straight into their buffers.

asyncio's streams copy every byte in twice (into the stream's buffer, then out of it) and
pause the socket every 128 KiB; a prompt chunk's activations are megabytes (2048 tokens of
Qwen3-1.7B: 8 MiB). Here small frames are cut out of one receive buffer, and a large frame's
body is received straight into a bytearray of its own. Once a link is up, frames go to a
callback as they arrive, without a task switch per frame.

Reading pauses (the socket is left unread, so TCP pushes back on the sender) while frames read
but not yet taken pile up (`read`'s queue, bounded by `max_queued`), and while the `Inflow` the
frames are delivered into has no room. Frames already in the receive buffer then wait there,
unparsed: nothing that arrived is lost, and what one connection holds stays bounded by its
buffer and one large frame.

A connection that has not proven anything yet (a listener's, before the handshake) starts with a
small receive buffer (`SMALL_RECV`) and grows it to the full one only once it is linked
(`open_up`): a stranger's connection costs a few KiB, not 256.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import structlog

from mlxring.aio import wait_for
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Message

log = structlog.get_logger()

_RECV = 256 * 1024  # the receive buffer small frames are cut from
SMALL_RECV = 4 * 1024  # a connection's receive buffer until it has proven itself
_BIG = 64 * 1024  # a frame body this large or larger is received into its own buffer
MAX_QUEUED = 64  # frames read but not taken (before `deliver`) at which reading pauses


class Inflow(Protocol):
    """Where delivered frames go (a shard's mailbox), telling a connection when to stop reading:
    after a frame it delivered, `taken` moved on and `wants_more()` is False; it reads on when
    the inflow calls the function it gave `when_relieved`."""

    @property
    def taken(self) -> int: ...

    def wants_more(self) -> bool: ...

    def when_relieved(self, resume: Callable[[], None]) -> None: ...


class FrameCutter:
    """Cuts length-prefixed frame bodies out of a byte stream: small ones out of one receive
    buffer, a large one received straight into a buffer of its own (kept for the next one:
    decoding copies the payload out, and fresh megabytes per frame cost page faults)."""

    def __init__(self, max_frame: int, recv: int = _RECV) -> None:
        self.max_frame = max_frame
        self._buf = bytearray(recv)
        self._start = self._end = 0  # the unparsed bytes of _buf
        self._big: memoryview | None = None  # a large frame's body while it arrives
        self._spare = bytearray()
        self._got = 0

    @property
    def in_big(self) -> bool:
        """Whether a large frame's body is arriving into its own buffer."""
        return self._big is not None

    def buffer(self) -> memoryview:
        """Where the next bytes from the socket go."""
        if self._big is not None:
            return self._big[self._got :]
        return memoryview(self._buf)[self._end :]

    def received(self, nbytes: int) -> memoryview | None:
        """Count `nbytes` written into `buffer()`; a large frame's body once it is whole (the
        caller releases it), else None."""
        if self._big is None:
            self._end += nbytes
            return None
        self._got += nbytes
        if self._got < len(self._big):
            return None
        body, self._big = self._big, None
        return body

    def next(self) -> bytes | None:
        """The next whole small frame's body; None when more bytes are needed (a large frame's
        body then goes on arriving into its own buffer). Raises FrameError."""
        if self._end - self._start < wire.PREFIX.size:
            return None
        buf = self._buf
        (n,) = wire.PREFIX.unpack_from(buf, self._start)
        if n > self.max_frame:
            raise wire.FrameError(f"frame of {n} bytes is over the maximum of {self.max_frame}")
        if n == 0:
            raise wire.FrameError("empty frame")
        body_at = self._start + wire.PREFIX.size
        have = self._end - body_at
        if have >= n:
            self._start = body_at + n
            return bytes(buf[body_at : self._start])
        # A frame that may not fit in the receive buffer (a small one: any frame over its size)
        # goes on arriving straight into a buffer of its own.
        if n >= min(_BIG, len(buf) - wire.PREFIX.size):
            if len(self._spare) < n:
                self._spare = bytearray(n)
            self._big = memoryview(self._spare)[:n]
            self._big[:have] = buf[body_at : self._end]
            self._got = have
            self._start = self._end = 0
        return None

    def grow(self, size: int) -> None:
        """Make the receive buffer `size` bytes, keeping what it holds unparsed."""
        if size <= len(self._buf):
            return
        rest = self._end - self._start
        buf = bytearray(size)
        buf[:rest] = self._buf[self._start : self._end]
        self._buf, self._start, self._end = buf, 0, rest

    def compact(self) -> None:
        """Keep a partial frame at the front: a body that is not received apart then always fits."""
        if self._start:
            rest = self._end - self._start
            self._buf[:rest] = self._buf[self._start : self._end]
            self._start, self._end = 0, rest

    def truncated(self) -> str | None:
        """What the stream ended inside of, if it ended inside a frame."""
        if self._big is not None:
            return f"truncated frame: {self._got} of {len(self._big)} bytes"
        if self._end > self._start:
            return f"truncated frame: {self._end - self._start} bytes of a frame at the end"
        return None


class ConnectionClosed(ConnectionError):
    """The other side closed the connection between frames."""


class FrameConnection(asyncio.BufferedProtocol):
    """The protocol of one connection: frames in (`read`, or `deliver` to a callback), frames
    out (`send`, `drain`). A frame that cannot be decoded closes the connection; `error` then
    says why."""

    def __init__(
        self,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        on_open: Callable[[FrameConnection], None] | None = None,
        max_queued: int = MAX_QUEUED,
        recv: int = _RECV,
    ) -> None:
        self.max_queued = max_queued
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self.peername: tuple[str, int] | None = None
        self.error: Exception | None = None  # why the connection closed, if not a clean EOF
        self.last_received = time.monotonic()
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._cut = FrameCutter(max_frame, recv)
        self._frames: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_message: Callable[[Message], None] | None = None
        self._inflow: Inflow | None = None
        self._holds: set[str] = set()  # why reading is paused: "queue", "inflow"
        self.pauses = 0  # times reading paused
        self._parsing = False
        self._drained: asyncio.Future[None] | None = None

    @property
    def max_frame(self) -> int:
        """The largest frame body accepted: small during a handshake, the ring's limit after."""
        return self._cut.max_frame

    @max_frame.setter
    def max_frame(self, n: int) -> None:
        self._cut.max_frame = n

    def open_up(self, max_frame: int) -> None:
        """The peer has proven itself: frames up to `max_frame`, cut from the full buffer."""
        self._cut.max_frame = max_frame
        self._cut.grow(_RECV)

    # --- asyncio.BufferedProtocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_open is not None:
            self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._cut.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        body = self._cut.received(nbytes)
        if body is not None:
            self._frame(body)
            body.release()
        elif not self._cut.in_big:
            self._parse()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            truncated = self._cut.truncated()
            if self._holds:  # frames left unread on purpose, not a truncated one
                self.error = exc
            elif truncated is not None:
                self.error = wire.FrameError(truncated)
            elif exc is not None:
                self.error = exc
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # --- frames in ---------------------------------------------------------------------------

    def _parse(self) -> None:
        self._parsing = True
        try:
            self._parse_buffer()
        finally:
            self._parsing = False

    def _parse_buffer(self) -> None:
        while not self.closing and not self._holds:
            try:
                body = self._cut.next()
            except wire.FrameError as e:
                self.fail(e)
                return
            if body is None:
                break
            self._frame(body)
        self._cut.compact()

    def _frame(self, body: bytes | memoryview) -> None:
        self.last_received = time.monotonic()
        try:
            msg = wire.decode(body)
        except wire.FrameError as e:
            self.fail(e)
            return
        if self._on_message is None:
            self._frames.append(msg)
            self._wake()
            if len(self._frames) >= self.max_queued:
                self._hold("queue")
            return
        self._hand(self._on_message, msg)

    def _hand(self, on_message: Callable[[Message], None], msg: Message) -> None:
        inflow = self._inflow
        before = inflow.taken if inflow is not None else 0
        try:
            on_message(msg)
        except Exception as e:  # noqa: BLE001 - a handler's bug closes this link, not the node
            log.exception("frame_handler_failed", message=type(msg).__name__)
            self.fail(e)
            return
        # Only a frame that went into the inflow pauses: heartbeats and tokens for the engine
        # pass on a link whose node's mailbox is full.
        if inflow is not None and inflow.taken != before and not inflow.wants_more():
            if "inflow" not in self._holds:
                self._hold("inflow")
                inflow.when_relieved(lambda: self._release("inflow"))

    # --- pausing -----------------------------------------------------------------------------

    @property
    def reading_paused(self) -> bool:
        return bool(self._holds)

    def _hold(self, why: str) -> None:
        if not self._holds and self.transport is not None and not self.closing:
            self.transport.pause_reading()
            self.pauses += 1
            # A full read queue is the reader's own pace (a handshake reads frame by frame).
            say = log.debug if why == "queue" else log.info
            say("reading_paused", peer=self.peername, reason=why, pauses=self.pauses)
        self._holds.add(why)

    def _release(self, why: str) -> None:
        if why not in self._holds:
            return
        self._holds.discard(why)
        if self._holds or self.closing:
            return
        # Silence while paused was ours, not the peer's.
        self.last_received = time.monotonic()
        log.debug("reading_resumed", peer=self.peername, reason=why)
        if not self._cut.in_big and not self._parsing:
            self._parse()  # what waited in the buffer first; it may pause again
        if not self._holds and not self.closing:
            assert self.transport is not None
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, timeout: float) -> Message:
        """The next frame. Raises FrameError (a bad frame), ConnectionClosed (the other side
        closed between frames), TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self._frames:
            # Only now, with every frame read taken, does what waits in the buffer get parsed:
            # a handshake's frames are then each read before the next frame's size is checked
            # against the limit that the handshake's end raises.
            self._release("queue")
            if self._frames:
                break
            if self.closed.done():
                if isinstance(self.error, wire.FrameError):
                    raise self.error
                raise ConnectionClosed(str(self.error) if self.error else "connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await wait_for(asyncio.shield(self._waiter), max(0.0, deadline - time.monotonic()))
        return self._frames.popleft()

    def deliver(self, on_message: Callable[[Message], None], inflow: Inflow | None = None) -> None:
        """From now on hand every frame to `on_message` as it arrives (those already read
        first); with `inflow`, pause reading while it has no room."""
        self._on_message = on_message
        self._inflow = inflow
        while self._frames and not self.closing:
            self._hand(on_message, self._frames.popleft())
        self._release("queue")

    # --- frames out, closing -----------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def send(self, msg: Message) -> None:
        """Queue one frame; its tensor payload is handed over as a view, not copied."""
        if self.closing:
            raise ConnectionClosed("connection closed")
        assert self.transport is not None
        self.transport.writelines(wire.encode(msg))

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the socket."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait until the socket has taken most of what was written."""
        if self._drained is not None:
            await asyncio.shield(self._drained)
        if self.closed.done():
            raise ConnectionClosed("connection closed")

    def fail(self, error: Exception) -> None:
        """Close the connection because of `error`."""
        if self.error is None:
            self.error = error
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self, timeout: float = 1.0) -> None:
        self.close()
        try:
            await wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()


async def connect(
    host: str, port: int, max_frame: int, timeout: float, local: str | None = None
) -> FrameConnection:
    """Open a connection to `host:port`, from address `local` when given (OSError or
    TimeoutError when it cannot)."""
    loop = asyncio.get_running_loop()
    _, conn = await wait_for(
        loop.create_connection(
            lambda: FrameConnection(max_frame),
            host,
            port,
            local_addr=(local, 0) if local else None,
        ),
        timeout,
    )
    return conn
