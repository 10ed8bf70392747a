"""Links: the handshake refuses strangers, junk on a ring port closes only that connection, a
link held back by its receiver stays up and delivers everything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import msgpack
import pytest
from spake2 import SPAKE2_A

from mlxring import aio
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import End, Forward, Hello, Message, Proof, Token
from mlxring.transport.conn import connect
from mlxring.transport.link import (
    LinkError,
    LinkSettings,
    Listener,
    Peer,
    handshake_connect,
    secret_warning,
)

from .ringutil import (
    encode,
    free_port,
    local_ring,
    process_ring,
    reference,
    ring_tokens,
    tiny_model,
    write_config,
)
from .test_conn import Box


def settings(node: str, secret: str = "", cluster: str = "c") -> LinkSettings:
    return LinkSettings(
        cluster=cluster, node=node, secret=secret, heartbeat_s=0.2, down_after_s=1.0
    )


async def test_a_link_held_back_longer_than_down_after_stays_up_and_loses_nothing() -> None:
    port = free_port()
    box = Box(room=10)
    listener = Listener(
        settings("b", "s3cret"), "127.0.0.1", port, lambda m, peer: box.put(m), inflow=box
    )
    await listener.start()
    peer = Peer(settings("a", "s3cret"), "b", lambda: ("127.0.0.1", port))
    peer.start()
    chunk = mx.ones((1, 16, 512), mx.bfloat16)
    n = 3000  # 48 MiB: past the sender's HIGH_WATER and the sockets' buffers
    try:
        assert await peer.wait_up(5)

        async def flood() -> None:
            for i in range(n):
                await peer.send(Forward(f"r{i}", 0, (1,), False, h=chunk))

        sending = asyncio.create_task(flood())
        await asyncio.sleep(2.5)  # down_after_s is 1: the pongs while held keep the link up
        assert box.peak == box.room and not sending.done()
        assert peer.up and peer.reconnects == 0
        got: list[object] = []
        while len(got) < n:
            await asyncio.sleep(0.005)
            got += box.empty()
        await aio.wait_for(sending, 10)
        assert [f.rid for f in got] == [f"r{i}" for i in range(n)]  # type: ignore[attr-defined]
        assert peer.up and peer.reconnects == 0 and listener.rejected == 0
    finally:
        await peer.stop()
        await listener.stop()


@contextlib.asynccontextmanager
async def linked(secret: str) -> AsyncIterator[tuple[Peer, list[Message]]]:
    """A link from node a to node b, up; yields a's peer and what b's listener received."""
    port = free_port()
    got: list[Message] = []
    listener = Listener(settings("b", secret), "127.0.0.1", port, lambda m, peer: got.append(m))
    await listener.start()
    peer = Peer(settings("a", secret), "b", lambda: ("127.0.0.1", port))
    peer.start()
    try:
        assert await peer.wait_up(5)
        yield peer, got
    finally:
        await peer.stop()
        await listener.stop()


async def received(got: list[Message], n: int, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if len(got) >= n:
            return
        await asyncio.sleep(0.01)


async def test_peer_with_the_secret_links_and_delivers() -> None:
    async with linked("s3cret") as (peer, got):
        await peer.send(End("r1"))
        await peer.send(Token("r1", 0, 42))
        await received(got, 2)
        assert got == [End("r1"), Token("r1", 0, 42)]
        await asyncio.sleep(0.5)  # heartbeats keep a quiet link up
        assert peer.up and peer.rtt_s > 0


async def test_once_linked_frames_up_to_the_rings_limit_pass() -> None:
    """The handshake takes small frames only; after it the ring's max_frame holds, so a prompt
    chunk's activations (megabytes), sent right behind the handshake, pass."""
    h = mx.arange(512 * 1024, dtype=mx.float32).reshape(1, 1024, 512)  # 2 MiB
    async with linked("s3cret") as (peer, got):
        await peer.send(Forward("r1", 0, (), False, h))
        await received(got, 1)
        assert len(got) == 1 and isinstance(got[0], Forward) and got[0].h is not None
        assert mx.array_equal(wire.to_array(got[0].h), h).item()
        assert peer.up


@pytest.mark.parametrize(
    ("theirs", "cluster"), [("wrong", "c"), ("", "c"), ("s3cret", "other-cluster")]
)
async def test_peer_without_the_secret_is_refused(theirs: str, cluster: str) -> None:
    port = free_port()
    got: list[Message] = []
    listener = Listener(settings("b", "s3cret"), "127.0.0.1", port, lambda m, peer: got.append(m))
    await listener.start()
    try:
        conn = await connect("127.0.0.1", port, wire.DEFAULT_MAX_FRAME, 2)
        with pytest.raises((LinkError, ConnectionError)):
            await handshake_connect(conn, settings("a", theirs, cluster))
            # The acceptor only learns we lack the secret from our proof: it then hangs up.
            conn.send(End("injected"))
            await conn.read(2)
        conn.close()
        await asyncio.sleep(0.1)
        assert got == [], "a refused peer must not inject frames"
        assert listener.rejected >= 1
    finally:
        await listener.stop()


async def test_peer_refuses_an_impostor_acceptor() -> None:
    """The connecting side checks the acceptor's proof too: a listener without the secret
    cannot pose as the next node."""
    port = free_port()
    listener = Listener(settings("b", "other"), "127.0.0.1", port, lambda m, peer: None)
    await listener.start()
    try:
        conn = await connect("127.0.0.1", port, wire.DEFAULT_MAX_FRAME, 2)
        with pytest.raises(LinkError, match="secret"):
            await handshake_connect(conn, settings("a", "s3cret"))
        conn.close()
    finally:
        await listener.stop()


async def test_a_stranger_cannot_announce_a_large_frame() -> None:
    """Before the handshake a frame is small: a length prefix of 100 MB is refused at once,
    not buffered for (the acceptor would otherwise allocate it, or wait out the timeout)."""
    port = free_port()
    listener = Listener(settings("b"), "127.0.0.1", port, lambda m, peer: None)
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack(">I", 100 * 1024 * 1024) + b"x" * 1000)
        assert await aio.wait_for(reader.read(), 1.0) == b""  # closed on us, well within 3 s
        assert listener.rejected == 1
        writer.close()
    finally:
        await listener.stop()


def junk_frames() -> list[bytes]:
    """One of each kind of bad input a ring port can get."""
    unknown = msgpack.packb({"type": "launch-missiles"})
    unknown_rid = wire.encode_bytes(Forward("no-such-request", 5, (1,), True))
    return [
        os.urandom(64),  # random bytes
        struct.pack(">I", 20) + os.urandom(20),  # valid length, junk body
        struct.pack(">I", 0xFFFFFFF0),  # oversize length
        struct.pack(">I", len(unknown)) + unknown,  # valid map, unknown type
        unknown_rid,  # a valid frame before any handshake
        struct.pack(">I", 1000) + b"half",  # half a frame, then silence
    ]


async def _junk_client(host: str, port: int, rounds: int) -> int:
    sent = 0
    frames = junk_frames()
    for i in range(rounds):
        try:
            conn = await connect(host, port, wire.DEFAULT_MAX_FRAME, 2)
            # Now and then, pass the handshake first: junk from a "member" (a ring port takes
            # 16 handshakes a second from one address: more would be refused, junk unsent).
            if i % 8 == 1:
                await handshake_connect(conn, settings("n0", cluster="test"))
            assert conn.transport is not None
            for f in frames:
                conn.transport.write(f)  # raw bytes: not frames of ours
                sent += 1
            await asyncio.sleep(0)
            conn.close()
        except (OSError, LinkError, TimeoutError, wire.FrameError):
            pass
    return sent


def test_junk_on_a_ring_port_does_not_disturb_generation(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 2)
    prompt = encode(model, "Junk arrives while we generate.")
    want = reference(model, prompt, 48)
    from mlxring.config import load_config

    n1 = load_config(cfg).node("n1")

    async def run() -> tuple[list[list[int]], int, list[int]]:
        async with local_ring(cfg, ["n0"]) as rt:
            junk = asyncio.gather(
                _junk_client("127.0.0.1", n1.port, 850),
                _junk_client("127.0.0.1", rt.config.node("n0").port, 850),
            )
            during = [await ring_tokens(rt, prompt, 48)]
            while not junk.done():  # keep generating for as long as the junk flows
                during.append(await ring_tokens(rt, prompt, 48))
            sent = sum(await junk)
            again = await ring_tokens(rt, prompt, 48)  # and still serving afterwards
            return during, sent, again

    with process_ring(cfg, ["n1"], tmp_path) as procs:
        during, sent, again = asyncio.run(run())
        alive = procs["n1"].proc.poll() is None
        log = procs["n1"].log()
    assert sent >= 10_000  # the issue: 10 000 junk frames during a generation
    assert len(during) >= 2 and all(got == want for got in during) and again == want
    assert alive, "the node must survive junk"
    assert '"bad_frame"' in log and '"peer_refused"' in log


def test_a_reconnecting_peer_stops_promptly_whenever_it_is_stopped() -> None:
    """A peer whose next node is gone loops connect/fail/back off; stopping it at any moment
    of that loop must end it (on 3.11 a cancel landing as a connect failed used to be lost, and
    the node never exited). On uvloop, as the node runs."""
    import uvloop

    port = free_port()
    rng = random.Random(7)

    async def stop_at_random_moments() -> None:
        for _ in range(10):  # many peers at once: some connect is always just completing
            peers = [Peer(settings("a"), "b", lambda: ("127.0.0.1", port)) for _ in range(40)]
            for peer in peers:
                peer.start()
            await asyncio.sleep(rng.uniform(0, 0.02))
            await aio.wait_for(asyncio.gather(*(p.stop() for p in peers)), 3.0)
            running = [t for t in asyncio.all_tasks() if t.get_name() == "peer:b" and not t.done()]
            assert not running

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(stop_at_random_moments())


async def test_a_stranger_gets_nothing_computed_from_the_secret() -> None:
    """The acceptor answers a hello with its own hello (its SPAKE2 message, no proof) and
    confirms the key only after the connector has: a stranger that sends a guess is hung up
    on, having received nothing it could test guesses against offline."""
    port = free_port()
    listener = Listener(settings("b", "s3cret"), "127.0.0.1", port, lambda m, peer: None)
    await listener.start()
    share = SPAKE2_A(b"guess").start()
    try:
        conn = await connect("127.0.0.1", port, wire.DEFAULT_MAX_FRAME, 2)
        conn.send(Hello(wire.PROTOCOL_VERSION, "c", "a", os.urandom(16), pake=share))
        reply = await conn.read(2)
        assert isinstance(reply, Hello) and reply.proof == b""
        assert reply.pake is not None and reply.pake[:1] == b"B" and len(reply.pake) == 33
        conn.send(Proof(os.urandom(32)))
        with pytest.raises(ConnectionError):
            await conn.read(2)  # closed: no Proof of the acceptor's ever comes
        conn.close()
        conn = await connect("127.0.0.1", port, wire.DEFAULT_MAX_FRAME, 2)
        conn.send(Hello(wire.PROTOCOL_VERSION, "c", "a", b"abc", pake=share))  # nonces: 16 bytes
        with pytest.raises(ConnectionError):
            await conn.read(2)
        conn.close()
        assert listener.rejected == 2
    finally:
        await listener.stop()


def test_mlxring_secret_prints_a_fresh_high_entropy_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlxring import cli

    printed = []
    for _ in range(2):
        # Not cli.main: it ends this thread's MLX streams, as a command's last act.
        args = cli.build_parser().parse_args(["secret"])
        assert args.func(args) == 0
        printed.append(capsys.readouterr().out.strip())
    assert printed[0] != printed[1] and len(printed[0]) >= 43
    assert secret_warning(printed[0], 5100) is None


def test_an_open_ring_and_a_weak_secret_are_warned_about() -> None:
    open_ring = secret_warning("", 5100)
    assert open_ring is not None and "the ring is open" in open_ring and "5100" in open_ring
    for weak in ("s3cret", "passwordpassword", "abababababababababab"):
        assert secret_warning(weak, 5100) is not None, weak
    assert secret_warning("correct horse battery staple 1987", 5100) is None


def _loopback_aliases() -> None:
    """127.0.0.2 and .3 are loopback on Linux; elsewhere they must be configured."""
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        try:
            with socket.socket() as s:
                s.bind((host, 0))
        except OSError:
            pytest.skip(f"{host} is not an address of this machine")


async def test_an_open_ring_takes_a_name_only_from_that_nodes_address() -> None:
    """With no secret, a peer that claims node a's name from an address that is not a's, or a
    name that is not a node of the ring, is refused before the handshake goes on."""
    _loopback_aliases()
    port = free_port("127.0.0.3")
    got: list[Message] = []
    hosts = {"a": "127.0.0.2", "b": "127.0.0.3"}
    listener = Listener(
        settings("b"), "127.0.0.3", port, lambda m, peer: got.append(m), peer_host=hosts.get
    )
    await listener.start()
    a = Peer(replace(settings("a"), bind="127.0.0.2"), "b", lambda: ("127.0.0.3", port))
    a.start()
    try:
        assert await a.wait_up(5)  # the real a, from its own address
        for name, source in (("a", "127.0.0.4"), ("zz", "127.0.0.2")):
            conn = await connect("127.0.0.3", port, wire.DEFAULT_MAX_FRAME, 2, local=source)
            with pytest.raises(ConnectionError):
                await handshake_connect(conn, settings(name))
                conn.send(End("injected"))
                await conn.read(2)
            conn.close()
        await a.send(End("r1"))
        await received(got, 1)
        assert got == [End("r1")] and listener.rejected == 2 and a.up
    finally:
        await a.stop()
        await listener.stop()


async def test_a_peer_whose_attempt_fails_unforeseen_links_again() -> None:
    """An attempt that fails in a way no network error covers (here the address lookup raises,
    then the runtime's state callback does) is logged and retried: the link comes up, it is
    never left down for good with its task ended."""
    port = free_port()
    listener = Listener(settings("b"), "127.0.0.1", port, lambda msg, peer: None)
    await listener.start()
    lookups = 0

    def address() -> tuple[str, int]:
        nonlocal lookups
        lookups += 1
        if lookups <= 2:
            raise RuntimeError("discovery is not ready")
        return ("127.0.0.1", port)

    states: list[bool] = []

    def on_state(up: bool) -> None:
        states.append(up)
        if len(states) == 1:
            raise RuntimeError("the runtime could not take the link yet")

    peer = Peer(settings("a"), "b", address, on_state)
    peer.start()
    try:
        for _ in range(1000):  # two failed lookups, a refused callback: a few backoffs
            if states[-1:] == [True] and len(states) >= 2 and peer.up:
                break
            await asyncio.sleep(0.01)
        assert lookups >= 3 and peer.up
        assert states[0] is True and states[-1] is True
    finally:
        await peer.stop()
        await listener.stop()
