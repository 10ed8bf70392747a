"""TCP links between ring neighbours: handshake (version, cluster, name, HMAC proof of the
cluster secret), heartbeats, reconnect with capped backoff, back-pressure.

Data flows one way on a link (a node to the next one); the receiving side answers pings with
pongs on the same socket, so each side can tell when the other went silent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mlxring import wire
from mlxring.aio import wait_for
from mlxring.messages import Hello, Message, Ping, Pong, Proof

log = structlog.get_logger()

STOP_S = 2.0  # how long stop() waits for the reconnect loop to end
HIGH_WATER = 4 * 1024 * 1024  # bytes queued in the transport before a sender waits for drain


class LinkError(Exception):
    """A handshake that failed (wrong cluster, version or secret) or a link that is down."""


@dataclass(frozen=True)
class LinkSettings:
    cluster: str
    node: str
    secret: str = ""
    heartbeat_s: float = 1.0
    down_after_s: float = 5.0
    max_frame: int = wire.DEFAULT_MAX_FRAME
    connect_timeout_s: float = 3.0
    max_backoff_s: float = 2.0


def _proof(secret: str, nonce: bytes, role: bytes) -> bytes:
    # The role prefix keeps one side's proof from being replayed as the other's.
    return hmac.new(secret.encode(), role + nonce, hashlib.sha256).digest()


def _write(writer: asyncio.StreamWriter, msg: Message) -> None:
    writer.writelines(wire.encode(msg))


async def _read(reader: asyncio.StreamReader, s: LinkSettings, timeout: float) -> Message:
    return await wait_for(wire.read_frame(reader, s.max_frame), timeout)


def _check_hello(msg: Message, s: LinkSettings) -> Hello:
    if not isinstance(msg, Hello):
        raise LinkError(f"expected hello, got {type(msg).__name__}")
    if msg.version != wire.PROTOCOL_VERSION:
        raise LinkError(
            f"peer {msg.node!r} speaks protocol {msg.version}, not {wire.PROTOCOL_VERSION}"
        )
    if msg.cluster != s.cluster:
        raise LinkError(f"peer {msg.node!r} is in cluster {msg.cluster!r}, not {s.cluster!r}")
    return msg


async def handshake_connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: LinkSettings
) -> str:
    """The connecting side's handshake; returns the peer's node name."""
    nonce = os.urandom(16)
    _write(writer, Hello(wire.PROTOCOL_VERSION, s.cluster, s.node, nonce))
    reply = _check_hello(await _read(reader, s, s.connect_timeout_s), s)
    if not hmac.compare_digest(reply.proof, _proof(s.secret, nonce, b"acceptor")):
        raise LinkError(f"peer {reply.node!r} does not know the cluster secret")
    _write(writer, Proof(_proof(s.secret, reply.nonce, b"connector")))
    return reply.node


async def handshake_accept(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: LinkSettings
) -> str:
    """The accepting side's handshake; returns the peer's node name."""
    hello = _check_hello(await _read(reader, s, s.connect_timeout_s), s)
    nonce = os.urandom(16)
    _write(
        writer,
        Hello(
            wire.PROTOCOL_VERSION,
            s.cluster,
            s.node,
            nonce,
            _proof(s.secret, hello.nonce, b"acceptor"),
        ),
    )
    answer = await _read(reader, s, s.connect_timeout_s)
    if not isinstance(answer, Proof) or not hmac.compare_digest(
        answer.proof, _proof(s.secret, nonce, b"connector")
    ):
        raise LinkError(f"peer {hello.node!r} does not know the cluster secret")
    return hello.node


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await wait_for(writer.wait_closed(), 1.0)
    except (TimeoutError, OSError, ConnectionError):
        pass


class Peer:
    """The outbound link to the next node of the ring; reconnects on its own."""

    def __init__(
        self,
        s: LinkSettings,
        name: str,
        address: Callable[[], tuple[str, int] | None],
        on_state: Callable[[bool], None] = lambda up: None,
    ) -> None:
        self.s = s
        self.name = name
        self._address = address
        self._on_state = on_state
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._up = asyncio.Event()
        self.reconnects = 0
        self.last_pong = 0.0
        self.rtt_s = 0.0

    @property
    def up(self) -> bool:
        return self._writer is not None

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(
            self._maintain(), name=f"peer:{self.name}"
        )

    async def stop(self) -> None:
        self._stopping = True  # the reconnect loop ends even if a cancel goes astray
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_S)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: its last error is of no interest now
        if self._writer is not None:
            await _close(self._writer)
            self._writer = None

    async def wait_up(self, timeout: float) -> bool:
        try:
            await wait_for(self._up.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def send(self, msg: Message) -> None:
        writer = self._writer
        if writer is None:
            raise LinkError(f"link to {self.name} is down")
        _write(writer, msg)
        if writer.transport.get_write_buffer_size() > HIGH_WATER:
            try:
                await wait_for(writer.drain(), self.s.down_after_s)
            except (TimeoutError, ConnectionError) as e:
                self._drop(writer, f"send stalled: {e!r}")
                raise LinkError(f"link to {self.name} stalled") from None

    def _drop(self, writer: asyncio.StreamWriter, why: str) -> None:
        if self._writer is writer:
            self._writer = None
            self._up.clear()
            log.warning("link_down", peer=self.name, reason=why)
            self._on_state(False)
        writer.close()

    async def _maintain(self) -> None:
        backoff = 0.05
        while not self._stopping:
            addr = self._address()
            if addr is None:
                await asyncio.sleep(self.s.heartbeat_s)
                continue
            try:
                reader, writer = await wait_for(
                    asyncio.open_connection(*addr), self.s.connect_timeout_s
                )
            except (OSError, TimeoutError):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.s.max_backoff_s)
                continue
            try:
                _tune(writer)
                peer = await handshake_connect(reader, writer, self.s)
                if peer != self.name:
                    raise LinkError(f"{addr[0]}:{addr[1]} is node {peer!r}, expected {self.name!r}")
            except (
                LinkError,
                wire.FrameError,
                OSError,
                TimeoutError,
                asyncio.IncompleteReadError,
            ) as e:
                log.warning(
                    "handshake_failed", peer=self.name, address=f"{addr[0]}:{addr[1]}", error=str(e)
                )
                await _close(writer)
                await asyncio.sleep(max(backoff, 0.5))
                backoff = min(backoff * 2, self.s.max_backoff_s)
                continue
            backoff = 0.05
            self._writer = writer
            self.last_pong = time.monotonic()
            self._up.set()
            log.info("link_up", peer=self.name, address=f"{addr[0]}:{addr[1]}")
            self._on_state(True)
            await self._watch(reader, writer)
            self.reconnects += 1

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Ping every heartbeat; the link is down when pongs stop or the socket closes."""
        pongs = asyncio.get_running_loop().create_task(self._read_pongs(reader))
        try:
            while self._writer is writer and not pongs.done():
                if time.monotonic() - self.last_pong > self.s.down_after_s:
                    self._drop(writer, "no heartbeat")
                    break
                try:
                    _write(writer, Ping(time.monotonic()))
                except (ConnectionError, RuntimeError) as e:
                    self._drop(writer, repr(e))
                    break
                await asyncio.wait({pongs}, timeout=self.s.heartbeat_s)
            if pongs.done():
                self._drop(writer, "connection closed")
        finally:
            pongs.cancel()

    async def _read_pongs(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await wire.read_frame(reader, self.s.max_frame)
                if isinstance(msg, Pong):
                    self.last_pong = time.monotonic()
                    self.rtt_s = self.last_pong - msg.sent
        except (asyncio.IncompleteReadError, ConnectionError, wire.FrameError, OSError):
            return


class Listener:
    """Accepts links from the previous node; hands every data frame to `on_message`."""

    def __init__(
        self,
        s: LinkSettings,
        host: str,
        port: int,
        on_message: Callable[[Message, str], None],
    ) -> None:
        self.s = s
        self.host, self.port = host, port
        self._on_message = on_message
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.rejected = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        if self._server is not None:
            try:
                await wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                pass
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = writer.get_extra_info("peername")
        where = f"{remote[0]}:{remote[1]}" if remote else "?"
        self._conns.add(writer)
        _tune(writer)
        try:
            try:
                peer = await handshake_accept(reader, writer, self.s)
            except (LinkError, wire.FrameError, TimeoutError, asyncio.IncompleteReadError) as e:
                self.rejected += 1
                log.warning("peer_refused", address=where, error=str(e) or type(e).__name__)
                return
            while True:
                try:
                    msg = await _read(reader, self.s, self.s.down_after_s)
                except TimeoutError:
                    log.warning("peer_silent", peer=peer, address=where)
                    return
                except wire.FrameError as e:
                    self.rejected += 1
                    log.error("bad_frame", peer=peer, address=where, error=str(e))
                    return
                if isinstance(msg, Ping):
                    _write(writer, Pong(msg.sent))
                elif isinstance(msg, Hello | Proof | Pong):
                    log.error("bad_frame", peer=peer, error=f"unexpected {type(msg).__name__}")
                    return
                else:
                    self._on_message(msg, peer)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        finally:
            self._conns.discard(writer)
            await _close(writer)
