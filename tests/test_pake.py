"""The ring handshake is SPAKE2 with key confirmation: a stranger posing as the node a ring node
dials gets nothing to test guesses of the secret against offline; a wrong secret on either side
is refused with its message; a malformed SPAKE2 message or an older protocol is refused before
any key; a flood of hellos gets a bounded number of SPAKE2 answers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.parameters.ed25519 import ParamsEd25519
from spake2.spake2 import finalize_SPAKE2

from mlxring import aio
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Hello
from mlxring.transport.conn import FrameConnection, connect
from mlxring.transport.link import (
    HANDSHAKE_MAX_FRAME,
    PAKE_BURST,
    PAKE_PER_S,
    LinkError,
    LinkSettings,
    Listener,
    Peer,
    handshake_accept,
    handshake_connect,
)

from .ringutil import free_port

SECRET = "correct horse battery"  # human-chosen: in any attacker's dictionary
GUESS = "hunter2"  # what the impostor knows
# An attacker's dictionary: it holds the real secret and the impostor's own guess.
CANDIDATES = (
    "password",
    "123456",
    "letmein",
    GUESS,
    "mlxring",
    "home",
    SECRET,
    "correct horse battery staple",
    "s3cret",
    "",
)


def settings(node: str, secret: str, cluster: str = "home") -> LinkSettings:
    return LinkSettings(cluster=cluster, node=node, secret=secret, connect_timeout_s=3.0)


def frame(m: dict[str, Any]) -> bytes:
    body = msgpack.packb(m)
    return struct.pack(">I", len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    m = msgpack.unpackb(await reader.readexactly(size))
    assert isinstance(m, dict)
    return m


@dataclass
class Capture:
    """All a connector sent an impostor, and the impostor's own side of the exchange."""

    hello: dict[str, Any]  # the connector's hello, as it came off the wire
    proof: bytes  # the connector's third frame
    mine: dict[str, Any]  # the impostor's hello
    y: int  # the impostor's SPAKE2 scalar


async def dial_impostor(guess: str) -> Capture:
    """A node with the real secret dials an address where an impostor listens that knows only
    `guess`: the impostor answers as an acceptor would (its hello, with a SPAKE2 message made
    from `guess`), takes the connector's proof, and hangs up."""
    captured: asyncio.Future[Capture] = asyncio.get_running_loop().create_future()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_frame(reader)
            prefix = f"mlxring link {hello['version']} {hello['cluster']}".encode()
            pake = SPAKE2_B(guess.encode(), idA=prefix + b" connector", idB=prefix + b" acceptor")
            mine = {
                "type": "hello",
                "version": hello["version"],
                "cluster": hello["cluster"],
                "node": "b",
                "nonce": os.urandom(16),
                "proof": b"",
                "pake": pake.start(),
            }
            writer.write(frame(mine))
            proof = (await read_frame(reader))["proof"]
            captured.set_result(Capture(hello, proof, mine, pake.xy_scalar))
        except Exception as e:  # the test reads it from the future
            captured.set_exception(e)
        finally:
            writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await connect("127.0.0.1", port, HANDSHAKE_MAX_FRAME, 2)
        with pytest.raises(LinkError, match="refused our proof of the cluster secret"):
            await handshake_connect(conn, settings("a", SECRET))
        await conn.wait_closed()
        return await aio.wait_for(captured, 3)
    finally:
        server.close()
        await server.wait_closed()


def transcript(hello: dict[str, Any], mine: dict[str, Any]) -> bytes:
    fields = (
        hello["cluster"].encode(),
        hello["node"].encode(),
        hello["nonce"],
        hello["pake"],
        mine["node"].encode(),
        mine["nonce"],
        mine["pake"],
    )
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def offline(c: Capture, candidates: tuple[str, ...]) -> list[str]:
    """The candidates that the captured proof confirms, tried as an attacker would: the HMAC of
    the secret over both nonces (the handshake of protocol 4), and the best SPAKE2 key the
    impostor can compute for each candidate with its own scalar."""
    found = []
    group, m = ParamsEd25519.group, ParamsEd25519.M
    for candidate in candidates:
        pw = candidate.encode()
        old = hmac.new(pw, b"connector" + c.hello["nonce"] + c.mine["nonce"], hashlib.sha256)
        if hmac.compare_digest(old.digest(), c.proof):
            found.append(candidate)
            continue
        x_msg = c.hello.get("pake")
        if x_msg is None:  # a connector of protocol 4 sent no SPAKE2 message
            continue
        # What an acceptor holding `candidate` and the impostor's scalar derives from the
        # connector's message: the connector's key if, and only if, both used `candidate`.
        unblinded = group.bytes_to_element(x_msg[1:]).add(
            m.scalarmult(-group.password_to_scalar(pw))
        )
        prefix = f"mlxring link {c.hello['version']} {c.hello['cluster']}".encode()
        key = finalize_SPAKE2(
            prefix + b" connector",
            prefix + b" acceptor",
            x_msg[1:],
            c.mine["pake"][1:],
            unblinded.scalarmult(c.y).to_bytes(),
            pw,
        )
        confirm = hmac.new(key, b"connector" + transcript(c.hello, c.mine), hashlib.sha256)
        if hmac.compare_digest(confirm.digest(), c.proof):
            found.append(candidate)
    return found


async def test_a_node_dialling_an_impostor_gives_it_nothing_to_guess_offline() -> None:
    """Protocol 4's connector sent an HMAC of the secret to whoever listened at the address it
    dials: that attack finds the secret here in one pass over the dictionary. Now the connector
    sends a SPAKE2 message and a confirmation under a key that depends on the impostor's
    guess: no candidate, the real secret included, is confirmed."""
    captured = await dial_impostor(GUESS)
    assert offline(captured, CANDIDATES) == []
    assert captured.proof and len(captured.hello["pake"]) == 33


async def test_the_offline_attack_finds_the_secret_once_the_impostor_guessed_it() -> None:
    """The attack above is the right one: an impostor whose one online guess is the secret
    confirms it (and only it) from what the connector sent."""
    assert offline(await dial_impostor(SECRET), CANDIDATES) == [SECRET]


@contextlib.asynccontextmanager
async def acceptor(s: LinkSettings) -> AsyncIterator[tuple[int, asyncio.Future[str]]]:
    """A port where one connection gets `handshake_accept`; yields the port and its outcome."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str] = loop.create_future()
    tasks: list[asyncio.Task[None]] = []

    async def accept(conn: FrameConnection) -> None:
        try:
            outcome.set_result(await handshake_accept(conn, s))
        except Exception as e:
            outcome.set_exception(e)
        finally:
            conn.close()

    server = await loop.create_server(
        lambda: FrameConnection(
            HANDSHAKE_MAX_FRAME, lambda c: tasks.append(loop.create_task(accept(c)))
        ),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1], outcome
    finally:
        server.close()
        await aio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await server.wait_closed()


@pytest.mark.parametrize("secret", [SECRET, ""])
async def test_the_same_secret_links_on_both_sides(secret: str) -> None:
    async with acceptor(settings("b", secret)) as (port, accepted):
        conn = await connect("127.0.0.1", port, HANDSHAKE_MAX_FRAME, 2)
        assert await handshake_connect(conn, settings("a", secret)) == "b"
        assert await aio.wait_for(accepted, 3) == "a"
        conn.close()


@pytest.mark.parametrize(("ours", "theirs"), [(SECRET, GUESS), (GUESS, SECRET), ("", SECRET)])
async def test_a_wrong_secret_on_either_side_is_refused_with_its_message(
    ours: str, theirs: str
) -> None:
    async with acceptor(settings("b", theirs)) as (port, accepted):
        conn = await connect("127.0.0.1", port, HANDSHAKE_MAX_FRAME, 2)
        with pytest.raises(LinkError, match="peer 'b' refused our proof of the cluster secret"):
            await handshake_connect(conn, settings("a", ours))
        with pytest.raises(LinkError, match="peer 'a' does not know the cluster secret"):
            await aio.wait_for(accepted, 3)
        conn.close()


async def test_a_connector_is_told_when_the_acceptor_does_not_know_the_secret() -> None:
    """An acceptor that sends a confirmation it cannot have computed is refused."""

    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader)
        pake = SPAKE2_B(GUESS.encode())
        writer.write(frame({**hello, "node": "b", "nonce": os.urandom(16), "pake": pake.start()}))
        await read_frame(reader)
        writer.write(frame({"type": "proof", "proof": os.urandom(32)}))
        await reader.read()
        writer.close()

    server = await asyncio.start_server(liar, "127.0.0.1", 0)
    try:
        conn = await connect("127.0.0.1", server.sockets[0].getsockname()[1], 4096, 2)
        with pytest.raises(LinkError, match="peer 'b' does not know the cluster secret"):
            await handshake_connect(conn, settings("a", SECRET))
        conn.close()
    finally:
        server.close()
        await server.wait_closed()


def hello_map(**fields: Any) -> dict[str, Any]:
    base = {
        "type": "hello",
        "version": wire.PROTOCOL_VERSION,
        "cluster": "home",
        "node": "a",
        "nonce": os.urandom(16),
        "proof": b"",
        "pake": SPAKE2_A(SECRET.encode()).start(),
    }
    return {k: v for k, v in {**base, **fields}.items() if v is not None}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"pake": None, "version": 4}, f"speaks protocol 4, not {wire.PROTOCOL_VERSION}"),
        ({"pake": "A" * 33}, "'pake' has type str"),  # the codec checks the field's type
        ({"pake": None}, "sent no SPAKE2 message"),
        ({"pake": b"A" + bytes(31)}, "sent 32 bytes of SPAKE2 message"),
        ({"pake": b"A" + bytes(32)}, "not the other side's point"),  # the neutral element
        ({"pake": b"A" + b"\x02" + bytes(31)}, "not the other side's point"),  # off the curve
        (
            {"pake": SPAKE2_B(SECRET.encode()).start()},
            "not the other side's point",
        ),  # an acceptor's
    ],
)
async def test_a_hello_without_a_usable_spake2_message_is_refused(
    fields: dict[str, Any], error: str
) -> None:
    async with acceptor(settings("b", SECRET)) as (port, accepted):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(hello_map(**fields)))
        with pytest.raises((LinkError, wire.FrameError), match=error):
            await aio.wait_for(accepted, 3)
        writer.close()


async def stranger(port: int, hello: bytes) -> bool:
    """One connection that sends a valid-looking hello and hangs up once answered; True if the
    node answered with its own hello (having computed its SPAKE2), False if it hung up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(hello)
        return bool(await aio.wait_for(reader.read(4096), 5))
    except ConnectionResetError:
        return False
    finally:
        writer.close()


async def test_a_flood_of_hellos_gets_a_bounded_number_of_spake2_answers() -> None:
    """1,200 hellos that pass every cheap check (right version and cluster, a valid SPAKE2
    message replayed, no proof) cost the listener at most PAKE_BURST + PAKE_PER_S a second of
    SPAKE2 exchanges; the rest are refused before any is computed. The real peer links after."""
    port = free_port()
    listener = Listener(settings("b", SECRET), "127.0.0.1", port, lambda m, peer: None)
    await listener.start()
    share = SPAKE2_A(b"anything").start()
    hellos = [
        wire.encode_bytes(Hello(wire.PROTOCOL_VERSION, "home", f"s{i}", os.urandom(16), pake=share))
        for i in range(1200)
    ]
    peer = Peer(settings("a", SECRET), "b", lambda: ("127.0.0.1", port))
    try:
        started = time.monotonic()
        answered = 0
        for batch in range(0, len(hellos), 100):  # within MAX_HANDSHAKING and the backlog
            got = await asyncio.gather(*(stranger(port, h) for h in hellos[batch : batch + 100]))
            answered += sum(got)
        elapsed = time.monotonic() - started
        assert PAKE_BURST <= answered <= PAKE_BURST + PAKE_PER_S * elapsed + 1, (answered, elapsed)
        for _ in range(300):  # the last refusals are counted just after their hang-ups
            if listener.rejected == len(hellos):
                break
            await asyncio.sleep(0.01)
        assert listener.rejected == len(hellos)
        peer.start()
        assert await peer.wait_up(5)
    finally:
        await peer.stop()
        await listener.stop()


async def test_a_flood_of_hellos_from_elsewhere_does_not_keep_a_node_out() -> None:
    """The SPAKE2 allowance is per source address, and the nodes' own addresses are outside the
    strangers' common one: while hellos pour in from 127.0.0.1, the ring's node at 127.0.0.2
    still links at once."""
    port = free_port()
    listener = Listener(
        settings("b", SECRET),
        "127.0.0.1",
        port,
        lambda m, peer: None,
        peer_host=lambda name: "127.0.0.2" if name == "a" else None,
    )
    await listener.start()
    share = SPAKE2_A(b"anything").start()
    hello = wire.encode_bytes(Hello(wire.PROTOCOL_VERSION, "home", "a", os.urandom(16), pake=share))
    stop = asyncio.Event()

    async def flood() -> None:  # always hellos waiting: each token is taken as it comes
        while not stop.is_set():
            await asyncio.gather(*(stranger(port, hello) for _ in range(25)))

    a = dataclasses.replace(settings("a", SECRET), bind="127.0.0.2")
    peer = Peer(a, "b", lambda: ("127.0.0.1", port))
    flooding = asyncio.gather(*(flood() for _ in range(4)))
    try:
        while listener.rejected < 100:  # the allowance of 127.0.0.1 is spent
            await asyncio.sleep(0.01)
        peer.start()
        assert await peer.wait_up(2)
        assert not flooding.done()
    finally:
        stop.set()
        await aio.wait_for(flooding, 10)
        await peer.stop()
        await listener.stop()
