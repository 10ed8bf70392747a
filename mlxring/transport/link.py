"""TCP links between ring neighbours: the handshake (`handshake`: SPAKE2 over the cluster secret
with key confirmation), heartbeats, reconnect with capped backoff, back-pressure.

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
import time
from collections.abc import Callable

import structlog

from mlxring.aio import wait_for
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Hello, Message, Ping, Pong, Proof
from mlxring.tasks import TaskScope
from mlxring.transport.conn import SMALL_RECV, FrameConnection, Inflow, connect
from mlxring.transport.handshake import (
    HANDSHAKE_MAX_FRAME,
    MAX_HANDSHAKING,
    PAKE_ADDRESSES,
    PAKE_ALL_PER_S,
    PAKE_BURST,
    PAKE_PER_S,
    Allowance,
    LinkError,
    LinkSettings,
    handshake_accept,
    handshake_connect,
    secret_warning,
)

log = structlog.get_logger()

STOP_S = 2.0  # how long stop() waits for the reconnect loop to end
HIGH_WATER = 4 * 1024 * 1024  # bytes queued in the transport before a sender waits for drain
# Heartbeats are not queued behind more than this: a peer that does not read gets none.
PONG_LIMIT = 64 * 1024
HOLDING = -1.0  # a Pong's `sent` when it answers no ping: "alive, not reading for now"


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
