"""TCP links between ring neighbours: handshake (version, cluster, name, SPAKE2 over the cluster
secret with key confirmation), heartbeats, reconnect with capped backoff, back-pressure.

Data flows one way on a link (a node to the next one); the receiving side answers pings with
pongs on the same socket, so each side can tell when the other went silent.

Back-pressure: a listener whose node's mailbox is full stops reading the link (see
`conn.Inflow`); the sender's writes then wait for the socket (`Peer.send`). A paused link is
not a dead one: while it holds back, the listener sends a `Pong(HOLDING)` every heartbeat, and
the sender waits as long as pongs come. Every queue on a link has a limit: frames read but not
taken (conn), bytes written but not sent (HIGH_WATER for data, PONG_LIMIT for heartbeats).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from spake2 import SPAKE2_A, SPAKE2_B, SPAKEError
from spake2.ed25519_basic import NotOnCurve

from mlxring.aio import wait_for
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Hello, Message, Ping, Pong, Proof
from mlxring.tasks import TaskScope
from mlxring.transport.conn import (
    SMALL_RECV,
    ConnectionClosed,
    FrameConnection,
    Inflow,
    connect,
)

log = structlog.get_logger()

STOP_S = 2.0  # how long stop() waits for the reconnect loop to end
# Frames before the handshake is done are small: a stranger must not make us allocate more.
HANDSHAKE_MAX_FRAME = 64 * 1024
HIGH_WATER = 4 * 1024 * 1024  # bytes queued in the transport before a sender waits for drain
# Heartbeats are not queued behind more than this: a peer that does not read gets none.
PONG_LIMIT = 64 * 1024
HOLDING = -1.0  # a Pong's `sent` when it answers no ping: "alive, not reading for now"
# Connections still in their handshake, per listener: beyond this a new one is closed at once,
# so strangers that never finish cannot pile up (each also ends at connect_timeout_s).
MAX_HANDSHAKING = 128
MIN_SECRET_CHARS = 16
NONCE_BYTES = 16
MIN_SECRET_BITS = 64.0
PAKE_BYTES = 33  # a SPAKE2 message: its side (b"A" or b"B"), then a point of Ed25519
# SPAKE2 costs the acceptor some milliseconds of the event loop per hello: a listener answers
# at most PAKE_BURST hellos at once and PAKE_PER_S a second after from one address, and
# PAKE_ALL_PER_S from all addresses but the nodes' own, and refuses the rest before computing
# anything. A flood of hellos then costs the loop a bounded share of its time, and a flood from
# other addresses does not keep a node of the ring out.
PAKE_PER_S = 16.0
PAKE_BURST = 16
PAKE_ALL_PER_S = 64.0
PAKE_ADDRESSES = 1024  # addresses whose allowance is remembered (the oldest is forgotten)


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
    # This node's own address: links start from it, so that the next node sees them come
    # from where nodes.toml says this node is, or zeroconf found it (None: the system picks).
    bind: str | None = None


class Allowance:
    """A token bucket: `take` is True at most `burst` times at once, then `per_s` times a second."""

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s, self.burst = per_s, float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _pake(side: Any, s: LinkSettings) -> Any:
    """One side's SPAKE2 state (SPAKE2_A: the connector, SPAKE2_B: the acceptor) over the cluster
    secret; the identities bind the key to this protocol and cluster."""
    prefix = f"mlxring link {wire.PROTOCOL_VERSION} {s.cluster}".encode()
    return side(s.secret.encode(), idA=prefix + b" connector", idB=prefix + b" acceptor")


def _key(pake: Any, theirs: Hello) -> bytes:
    """The key SPAKE2 derives from our state and the peer's message; LinkError for a message
    that is not a point of the group, or not of the other side."""
    try:
        return bytes(pake.finish(theirs.pake))
    except (SPAKEError, ValueError, NotOnCurve):
        why = f"peer {theirs.node!r} sent a SPAKE2 message that is not the other side's point"
        raise LinkError(why) from None


def _transcript(connector: Hello, acceptor: Hello) -> bytes:
    """Both hellos as both sides saw them, each field length-prefixed so it splits one way only."""
    fields = (
        connector.cluster.encode(),
        connector.node.encode(),
        connector.nonce,
        connector.pake or b"",
        acceptor.node.encode(),
        acceptor.nonce,
        acceptor.pake or b"",
    )
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _confirmation(key: bytes, role: bytes, transcript: bytes) -> bytes:
    # The role prefix keeps one side's confirmation from being replayed as the other's; the
    # transcript binds it to this one exchange and to both names.
    return hmac.new(key, role + transcript, hashlib.sha256).digest()


def _check_hello(msg: Message, s: LinkSettings) -> Hello:
    if not isinstance(msg, Hello):
        raise LinkError(f"expected hello, got {type(msg).__name__}")
    if msg.version != wire.PROTOCOL_VERSION:
        raise LinkError(
            f"peer {msg.node!r} speaks protocol {msg.version}, not {wire.PROTOCOL_VERSION}"
        )
    if msg.cluster != s.cluster:
        raise LinkError(f"peer {msg.node!r} is in cluster {msg.cluster!r}, not {s.cluster!r}")
    if len(msg.nonce) != NONCE_BYTES:  # fixed: the transcript's fields are then all bounded
        raise LinkError(f"peer {msg.node!r} sent a nonce of {len(msg.nonce)} bytes")
    if msg.pake is None or len(msg.pake) != PAKE_BYTES:
        size = "no" if msg.pake is None else f"{len(msg.pake)} bytes of"
        raise LinkError(f"peer {msg.node!r} sent {size} SPAKE2 message, not {PAKE_BYTES} bytes")
    return msg


# The handshake is SPAKE2 (a password-authenticated key exchange) over the cluster secret, then
# key confirmation. Each hello carries its side's SPAKE2 message: a point blinded by the secret
# and by a fresh random scalar, which on its own says nothing about the secret. From the other
# side's message each side derives a key, equal on both only if both used the same secret. The
# connector then sends an HMAC under that key over both hellos, and only once the acceptor has
# checked it does it send its own. Whoever talks to a node, connecting to it or posing as the
# node it dials, tests one guess of the secret per handshake, online: nothing it receives lets
# it test further guesses offline. An open ring runs the same exchange with the empty secret.
# The acceptor computes its SPAKE2 only for a hello that passed the cheap checks and `admit`.


async def handshake_connect(conn: FrameConnection, s: LinkSettings) -> str:
    """The connecting side's handshake; returns the peer's node name."""
    pake = _pake(SPAKE2_A, s)
    hello = Hello(
        wire.PROTOCOL_VERSION, s.cluster, s.node, os.urandom(NONCE_BYTES), pake=pake.start()
    )
    conn.send(hello)
    reply = _check_hello(await conn.read(s.connect_timeout_s), s)
    transcript = _transcript(hello, reply)
    key = _key(pake, reply)
    conn.send(Proof(_confirmation(key, b"connector", transcript)))
    try:
        answer = await conn.read(s.connect_timeout_s)
    except ConnectionClosed:  # the acceptor hangs up on a wrong confirmation
        raise LinkError(f"peer {reply.node!r} refused our proof of the cluster secret") from None
    if not isinstance(answer, Proof) or not hmac.compare_digest(
        answer.proof, _confirmation(key, b"acceptor", transcript)
    ):
        raise LinkError(f"peer {reply.node!r} does not know the cluster secret")
    return reply.node


async def handshake_accept(
    conn: FrameConnection, s: LinkSettings, admit: Callable[[str], None] = lambda name: None
) -> str:
    """The accepting side's handshake; returns the peer's node name. `admit` may refuse the
    name the peer gives (LinkError) before anything is computed or answered. The whole of it
    takes at most `connect_timeout_s` (TimeoutError)."""
    return await wait_for(_accept(conn, s, admit), s.connect_timeout_s)


async def _accept(conn: FrameConnection, s: LinkSettings, admit: Callable[[str], None]) -> str:
    hello = _check_hello(await conn.read(s.connect_timeout_s), s)
    admit(hello.node)
    pake = _pake(SPAKE2_B, s)
    mine = Hello(
        wire.PROTOCOL_VERSION, s.cluster, s.node, os.urandom(NONCE_BYTES), pake=pake.start()
    )
    conn.send(mine)  # sent first: the connector derives its key while we derive ours
    transcript = _transcript(hello, mine)
    key = _key(pake, hello)
    answer = await conn.read(s.connect_timeout_s)
    if not isinstance(answer, Proof) or not hmac.compare_digest(
        answer.proof, _confirmation(key, b"connector", transcript)
    ):
        raise LinkError(f"peer {hello.node!r} does not know the cluster secret")
    conn.send(Proof(_confirmation(key, b"acceptor", transcript)))
    return hello.node


def secret_warning(secret: str, port: int) -> str | None:
    """What is wrong with a ring's `secret`, as one line for the log at start; None if nothing.
    The entropy estimate is rough (length times log2 of the distinct characters): it flags
    short, repetitive, human-chosen secrets, not every weak one."""
    if not secret:
        return (
            f"the ring is open: anyone who can reach port {port} can join; "
            "set [cluster] secret (mlxring secret prints one)"
        )
    bits = len(secret) * math.log2(max(len(set(secret)), 2))
    if len(secret) < MIN_SECRET_CHARS or bits < MIN_SECRET_BITS:
        return (
            f"the cluster secret is short or of low entropy (about {bits:.0f} bits): "
            "it can be guessed; use a fresh one (mlxring secret prints one)"
        )
    return None


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
        self._conn: FrameConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._up = asyncio.Event()
        self.reconnects = 0
        self.last_pong = 0.0
        self.rtt_s = 0.0

    @property
    def up(self) -> bool:
        return self._conn is not None

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
        if self._conn is not None:
            await self._conn.wait_closed()
            self._conn = None

    async def wait_up(self, timeout: float) -> bool:
        try:
            await wait_for(self._up.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def send(self, msg: Message) -> None:
        conn = self._conn
        if conn is None:
            raise LinkError(f"link to {self.name} is down")
        try:
            conn.send(msg)
            if conn.buffered > HIGH_WATER:
                await self._drain(conn)
        except ConnectionError as e:
            self._drop(conn, f"send failed: {e!r}")
            raise LinkError(f"link to {self.name} is down") from None
        except TimeoutError:
            self._drop(conn, "send stalled")
            raise LinkError(f"link to {self.name} stalled") from None

    async def _drain(self, conn: FrameConnection) -> None:
        """Wait for the socket to take what was written, for as long as the peer shows it is
        alive (a peer that pushes back keeps sending pongs); TimeoutError once it does not."""
        while True:
            try:
                await wait_for(conn.drain(), self.s.heartbeat_s)
                return
            except TimeoutError:
                if time.monotonic() - self.last_pong > self.s.down_after_s:
                    raise

    def _drop(self, conn: FrameConnection, why: str) -> None:
        conn.close()
        if self._conn is conn:
            self._conn = None
            self._up.clear()
            log.warning("link_down", peer=self.name, reason=why)
            self._on_state(False)

    async def _maintain(self) -> None:
        """Link, watch, link again, until stopped. Whatever an attempt raises beyond the
        network's failures (an address lookup, a peer's odd answer, a state callback) is
        logged with its cause and retried after the backoff: a link never stays down for good
        because one attempt failed in a way nobody foresaw."""
        backoff = 0.05
        while not self._stopping:
            try:
                backoff = await self._attempt(backoff)
            except Exception as e:  # noqa: BLE001 - logged with its cause, then retried
                why = f"{type(e).__name__}: {e}"
                log.error("link_failed", peer=self.name, error=why, exc_info=e)
                if self._conn is not None:
                    try:
                        self._drop(self._conn, why)
                    except Exception as again:  # noqa: BLE001 - the state callback failed again
                        log.error("link_failed", peer=self.name, error=repr(again))
                await asyncio.sleep(max(backoff, 0.5))
                backoff = min(backoff * 2, self.s.max_backoff_s)

    async def _attempt(self, backoff: float) -> float:
        """One connection to the next node, through its life; returns the next backoff."""
        addr = self._address()
        if addr is None:
            await asyncio.sleep(self.s.heartbeat_s)
            return backoff
        try:
            conn = await connect(*addr, HANDSHAKE_MAX_FRAME, self.s.connect_timeout_s, self.s.bind)
        except (OSError, TimeoutError):
            await asyncio.sleep(backoff)
            return min(backoff * 2, self.s.max_backoff_s)
        try:
            peer = await handshake_connect(conn, self.s)
            if peer != self.name:
                raise LinkError(f"{addr[0]}:{addr[1]} is node {peer!r}, expected {self.name!r}")
        except (LinkError, wire.FrameError, OSError, TimeoutError) as e:
            log.warning(
                "handshake_failed", peer=self.name, address=f"{addr[0]}:{addr[1]}", error=str(e)
            )
            await conn.wait_closed()
            await asyncio.sleep(max(backoff, 0.5))
            return min(backoff * 2, self.s.max_backoff_s)
        except BaseException:
            conn.close()
            raise
        conn.max_frame = self.s.max_frame
        self._conn = conn
        self.last_pong = time.monotonic()
        conn.deliver(self._pong)
        self._up.set()
        log.info("link_up", peer=self.name, address=f"{addr[0]}:{addr[1]}")
        self._on_state(True)
        await self._watch(conn)
        self.reconnects += 1
        return 0.05

    def _pong(self, msg: Message) -> None:
        if isinstance(msg, Pong):
            self.last_pong = time.monotonic()
            if msg.sent != HOLDING:
                self.rtt_s = self.last_pong - msg.sent

    async def _watch(self, conn: FrameConnection) -> None:
        """Ping every heartbeat; the link is down when pongs stop or the socket closes."""
        while self._conn is conn and not conn.closed.done():
            if time.monotonic() - self.last_pong > self.s.down_after_s:
                self._drop(conn, "no heartbeat")
                return
            try:
                if conn.buffered < PONG_LIMIT:  # a peer holding back reads them later, or never
                    conn.send(Ping(time.monotonic()))
            except (ConnectionError, RuntimeError) as e:
                self._drop(conn, repr(e))
                return
            await asyncio.wait({conn.closed}, timeout=self.s.heartbeat_s)
        if conn.closed.done():
            self._drop(conn, str(conn.error) if conn.error else "connection closed")


class Listener:
    """Accepts links from the previous node; hands every data frame to `on_message`.

    Before a connection has finished its handshake it costs little: a small receive buffer,
    `connect_timeout_s` in all, and at most MAX_HANDSHAKING of them at once; hellos beyond
    PAKE_PER_S from one address (PAKE_ALL_PER_S from strangers' addresses together) are refused
    before their SPAKE2 is computed. On an open ring (no secret)
    `peer_host`, when given, says where a named node must connect from: a peer that claims a
    name from another address, or a name that is not a node of the ring (None), is refused."""

    def __init__(
        self,
        s: LinkSettings,
        host: str,
        port: int,
        on_message: Callable[[Message, str], None],
        inflow: Inflow | None = None,
        peer_host: Callable[[str], str | None] | None = None,
    ) -> None:
        self.s = s
        self.host, self.port = host, port
        self._on_message = on_message
        self._inflow = inflow  # where the data frames go: reading pauses while it is full
        self.peer_host = peer_host
        self._server: asyncio.Server | None = None
        self._conns: set[FrameConnection] = set()
        self._handshaking = 0
        # One task per accepted connection, each ending with it; all end with the listener.
        self._tasks = TaskScope(f"listener:{port}")
        self.rejected = 0
        self.turned_away = 0  # connections closed at once: too many in their handshake
        self._pakes: dict[str | None, Allowance] = {}  # per source address
        self._all_pakes = Allowance(PAKE_ALL_PER_S, int(PAKE_ALL_PER_S))
        self._turned_logged = 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self._tasks.open()
        if (warning := secret_warning(self.s.secret, self.port)) is not None:
            log.warning("ring_insecure", node=self.s.node, warning=warning)
        self._server = await loop.create_server(
            # One frame at a time until the handshake ends: the frames behind the proof are
            # measured against the ring's limit, not the handshake's. A small buffer until then.
            lambda: FrameConnection(
                HANDSHAKE_MAX_FRAME, self._accepted, max_queued=1, recv=SMALL_RECV
            ),
            self.host,
            self.port,
            reuse_address=True,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close()
        if self._server is not None:
            try:
                await wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                pass
            self._server = None
        await self._tasks.close(2.0)

    def _accepted(self, conn: FrameConnection) -> None:
        if self._handshaking >= MAX_HANDSHAKING:
            conn.close()
            self.turned_away += 1
            now = time.monotonic()
            if now - self._turned_logged > 1.0:  # a flood is one line a second, not thousands
                self._turned_logged = now
                log.warning(
                    "peers_turned_away",
                    reason=f"{MAX_HANDSHAKING} connections are in their handshake",
                    address=conn.peername,
                    total=self.turned_away,
                )
            return
        self._conns.add(conn)
        if self._tasks.spawn(self._serve(conn), "serve") is None:
            conn.close()  # the listener is stopping
            self._conns.discard(conn)
            return
        self._handshaking += 1  # counted at once: a burst of accepts comes before any task runs

    def _admit(self, peer: str, address: str | None) -> None:
        """On an open ring, a node name is only taken from that node's address; past the
        allowance of SPAKE2 exchanges, nobody is taken (LinkError)."""
        expected = self.peer_host(peer) if self.peer_host is not None else None
        if not self.s.secret and self.peer_host is not None:
            if expected is None:
                raise LinkError(f"peer {peer!r} is not a node of this ring (or not found yet)")
            if address != expected:
                raise LinkError(
                    f"peer claims to be {peer!r} from {address}, but {peer!r} is at {expected}"
                )
        if not self._allowance(address).take() or (
            address != expected and not self._all_pakes.take()
        ):
            raise LinkError(f"too many handshakes a second: {peer!r} from {address} refused")

    def _allowance(self, address: str | None) -> Allowance:
        allowance = self._pakes.pop(address, None) or Allowance(PAKE_PER_S, PAKE_BURST)
        self._pakes[address] = allowance  # the newest last: the oldest is the first forgotten
        if len(self._pakes) > PAKE_ADDRESSES:
            del self._pakes[next(iter(self._pakes))]
        return allowance

    async def _serve(self, conn: FrameConnection) -> None:
        remote = conn.peername
        where = f"{remote[0]}:{remote[1]}" if remote else "?"
        ip = remote[0] if remote else None
        try:
            try:
                peer = await handshake_accept(conn, self.s, lambda name: self._admit(name, ip))
            except (LinkError, wire.FrameError, TimeoutError, ConnectionError) as e:
                self.rejected += 1
                log.warning("peer_refused", address=where, error=str(e) or type(e).__name__)
                return
            finally:
                self._handshaking -= 1

            def on_frame(msg: Message) -> None:
                if isinstance(msg, Ping):
                    if conn.buffered < PONG_LIMIT:
                        conn.send(Pong(msg.sent))
                elif isinstance(msg, Hello | Proof | Pong):
                    conn.fail(wire.FrameError(f"unexpected {type(msg).__name__}"))
                else:
                    self._on_message(msg, peer)

            conn.open_up(self.s.max_frame)
            conn.deliver(on_frame, self._inflow)
            # Pings come every heartbeat: a link silent for longer than down_after_s is dead.
            while not conn.closed.done():
                await asyncio.wait({conn.closed}, timeout=self.s.heartbeat_s)
                if conn.reading_paused:
                    # Not reading: the silence is ours. Tell the sender we are alive.
                    if not conn.closing and conn.buffered < PONG_LIMIT:
                        conn.send(Pong(HOLDING))
                    continue
                if time.monotonic() - conn.last_received > self.s.down_after_s:
                    log.warning("peer_silent", peer=peer, address=where)
                    return
            if isinstance(conn.error, wire.FrameError):
                self.rejected += 1
                log.error("bad_frame", peer=peer, address=where, error=str(conn.error))
        finally:
            await conn.wait_closed()
            self._conns.discard(conn)
