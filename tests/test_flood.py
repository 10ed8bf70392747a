"""Back-pressure: a peer that sends valid frames faster than a shard computes is held back (the
node stops reading it) instead of growing the node's memory, and the ring serves on exactly.
Also the mailbox's high-water mark on its own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxring.protocol import codec as wire
from mlxring.protocol.messages import End, Forward, Tensor
from mlxring.shard.mailbox import Actor, Watermarks, weight
from mlxring.transport import conn as frames
from mlxring.transport.conn import connect
from mlxring.transport.link import (
    HANDSHAKE_MAX_FRAME,
    HIGH_WATER,
    LinkSettings,
    handshake_connect,
)

from .ringutil import (
    NodeProcess,
    encode,
    local_ring,
    process_ring,
    reference,
    ring_tokens,
    tiny_model,
    wait_for,
    write_config,
)

SECRET = "s3cret"
ROUNDS = 24_000  # fresh request ids, each ended; every CHUNK_EVERY-th first gets a prompt chunk
CHUNK_EVERY = 32
CHUNK = 16  # tokens a chunk
# A long reason makes each End 16 KiB: the whole flood is 384 MiB, what the mailbox may hold
# (its mark of 4096 messages) is 64 MiB.
REASON = "flooded " * 2048
RSS_GROWTH = 256 << 20  # what the flooded node's memory may grow by


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def events(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    out = []
    for line in node.log().splitlines():
        if f'"{name}"' in line:
            entry = json.loads(line)
            if entry.get("event") == name:
                out.append(entry)
    return out


async def flood(port: int, layer: int, hidden: int) -> int:
    """Handshake with the secret, then send the flood as fast as the socket takes it; returns
    the frames sent."""
    conn = await connect("127.0.0.1", port, HANDSHAKE_MAX_FRAME, 5)
    # As n1's previous member: steps from any other peer are dropped before the mailbox.
    await handshake_connect(conn, LinkSettings(cluster="test", node="n0", secret=SECRET))
    conn.deliver(lambda msg: None)  # pongs
    h = mx.zeros((1, CHUNK, hidden), mx.bfloat16)
    tokens = tuple(range(CHUNK))
    sent = 0
    for i in range(ROUNDS):
        rid = f"flood{i}"
        if i % CHUNK_EVERY == 0:
            conn.send(Forward(rid, 0, tokens, False, h=h, layer=layer))
            sent += 1
        conn.send(End(rid, REASON))
        sent += 1
        if conn.buffered > HIGH_WATER:
            await conn.drain()
    while conn.buffered:  # all of it handed to the socket before closing
        await asyncio.sleep(0.05)
    await conn.wait_closed(30)
    return sent


def test_a_flood_of_valid_frames_is_held_back_and_the_ring_serves_on(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    cfg = write_config(tmp_path, model, 2, extra_cluster=f'secret = "{SECRET}"')
    prompt = encode(model, "A flood comes and goes, the answer stays the same.")
    want = reference(model, prompt, 24)

    async def run(node: NodeProcess) -> None:
        async with local_ring(cfg, ["n0"]) as rt:
            assert await ring_tokens(rt, prompt, 24) == want
            pid = node.proc.pid
            base = vm_rss(pid)
            rss = [base]

            async def sample() -> None:
                while True:
                    rss.append(vm_rss(pid))
                    await asyncio.sleep(0.02)

            sampling = asyncio.create_task(sample())
            sent = await flood(rt.config.node("n1").port, rt.plan[1][0], hidden)
            assert sent == ROUNDS + ROUNDS // CHUNK_EVERY
            await wait_for(lambda: events(node, "mailbox_relieved"), 30)
            # What is still in the mailbox goes first: the request waits, and is exact.
            assert await ring_tokens(rt, prompt, 24) == want
            sampling.cancel()
            # The shard was slower than the flood: its mailbox passed the mark, and the node
            # stopped reading until it was back under it.
            assert [e for e in events(node, "reading_paused") if e["reason"] == "inflow"]
            full = events(node, "mailbox_full")
            assert full
            # Reading stops at the frame that passes the mark; at worst one read's frames
            # (all as small as an End) are parsed past it.
            per_read = frames._RECV // len(wire.encode_bytes(End(f"flood{ROUNDS}")))
            peaks = [int(e["peak"]) for e in events(node, "mailbox_relieved")]
            assert max(peaks) <= Watermarks().messages + per_read, peaks
            assert max(rss) - base < RSS_GROWTH, (base, max(rss))

    with process_ring(cfg, ["n1"], tmp_path) as procs:
        asyncio.run(run(procs["n1"]))


class Held(Actor[object]):
    """An actor that handles nothing until let go."""

    def __init__(self, marks: Watermarks) -> None:
        super().__init__("held", marks)
        self.go = asyncio.Event()
        self.handled: list[object] = []

    async def handle(self, msg: object) -> None:
        await self.go.wait()
        self.handled.append(msg)


async def test_a_mailbox_past_its_mark_wants_no_more_until_back_under_it() -> None:
    actor = Held(Watermarks(messages=16, bytes=1 << 30, resume=0.5))
    actor.start()
    resumed: list[int] = []
    try:
        for i in range(17):
            assert actor.wants_more()
            actor.send(End(f"r{i}"))
        assert not actor.wants_more() and actor.pressured == 1 and actor.taken == 17
        actor.when_relieved(lambda: resumed.append(actor.backlog))
        actor.send(End("r17"))  # send never blocks, and never loses a message
        assert actor.peak_backlog == 18
        actor.go.set()
        await wait_for(lambda: len(actor.handled) == 18, 5)
        assert resumed and resumed[0] <= 8
        assert actor.wants_more() and actor.backlog == 0
        assert [m.rid for m in actor.handled] == [f"r{i}" for i in range(18)]  # type: ignore[attr-defined]
        ran: list[bool] = []
        actor.when_relieved(lambda: ran.append(True))  # room now: at once
        assert ran == [True]
    finally:
        await actor.stop()


async def test_a_mailbox_counts_bytes_too() -> None:
    actor = Held(Watermarks(messages=1000, bytes=(3 << 20) + 4096))
    big = Forward("r", 0, (1,), False, h=Tensor("bfloat16", (1, 512, 1024), bytes(1 << 20)))
    assert weight(big) > 1 << 20 and weight(End("r")) < 1024
    for _ in range(3):
        actor.send(big)
    assert actor.wants_more()
    actor.send(big)
    assert not actor.wants_more() and actor.backlog_bytes == 4 * weight(big)
    actor.next_message()
    assert actor.backlog_bytes == 3 * weight(big)
