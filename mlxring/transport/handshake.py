"""The ring handshake: hello each way (version, cluster, name, a nonce and a SPAKE2 message over
the cluster secret), then key confirmation, the connector first; the settings of a link, and
what a listener allows before a peer has proven itself.

SPAKE2 is a password-authenticated key exchange: nothing either side sends can be tested
against guesses of the secret offline, whether the other end connected to a node or took over
an address a node dials; each handshake tests one guess, online.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spake2 import SPAKE2_A, SPAKE2_B, SPAKEError
from spake2.ed25519_basic import NotOnCurve

from mlxring.aio import wait_for
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Hello, Message, Proof
from mlxring.transport.conn import ConnectionClosed, FrameConnection

# Frames before the handshake is done are small: a stranger must not make us allocate more.
HANDSHAKE_MAX_FRAME = 64 * 1024
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
