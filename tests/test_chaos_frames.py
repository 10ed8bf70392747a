"""Chaos, frames: a peer that completes the real handshake (the project's own codec and link
code) and then sends frames a ring member would never send. A token id past the vocabulary, a
step from a node that is not the previous member, a flood of fresh request ids, a batch holding
one request twice: each fails its own request at most, never the node, never another request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import mlx.core as mx
import pytest

from mlxring import aio
from mlxring.config import load_config
from mlxring.protocol.messages import Forward, ForwardBatch, NodeStats, Probe
from mlxring.ring.routing import sender_to
from mlxring.ring.runtime import Runtime
from mlxring.transport.conn import FrameConnection, connect
from mlxring.transport.link import HANDSHAKE_MAX_FRAME, LinkError, LinkSettings, handshake_connect

from .ringutil import (
    CONCURRENT_TEXTS,
    FAST,
    NodeProcess,
    complete,
    decode,
    encode,
    local_ring,
    post_completion,
    process_ring,
    reference,
    ring_tokens,
    tiny_model,
    wait_for,
    write_config,
)


@asynccontextmanager
async def intruder(port: int, name: str) -> AsyncIterator[FrameConnection]:
    """A connection to a node's ring port, through the real handshake (the ring has no secret),
    claiming to be node `name`."""
    conn = await connect("127.0.0.1", port, HANDSHAKE_MAX_FRAME, 5)
    try:
        await handshake_connect(conn, LinkSettings(cluster="test", node=name))
        conn.deliver(lambda msg: None)  # pongs
        yield conn
    finally:
        await conn.drain()
        await conn.wait_closed(5)


def hidden_size(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["hidden_size"])


def test_a_token_id_past_the_vocabulary_fails_its_request_not_the_node(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 2, extra_cluster=FAST)
    prompt = encode(model, "One frame must not take a node down.")
    want = decode(model, reference(model, prompt, 16))

    async def attack(port: int) -> None:
        # From the previous member's name: the frame reaches the first shard's embedding.
        async with intruder(port, "n1") as conn:
            conn.send(Forward("evil", 0, (2147483647,), True))
            conn.send(Forward("evil2", 0, (1, 2, 1 << 30), False))

    with process_ring(cfg, ["n0", "n1"], tmp_path) as procs:
        n0: NodeProcess = procs["n0"]
        n0.wait_log('"ring_up"', 60)
        config = load_config(cfg)
        api = config.api_port("n0")
        assert complete(api, prompt, 16) == want
        asyncio.run(attack(config.node("n0").port))
        n0.wait_log('"step_refused"', 10)
        assert "outside the vocabulary" in n0.log()
        assert n0.proc.poll() is None, n0.log()[-3000:]
        assert complete(api, prompt, 16) == want
        assert n0.proc.poll() is None


@asynccontextmanager
async def beside_head(tmp_path: Path, api: str = "") -> AsyncIterator[Runtime]:
    """A 2-node ring whose head n0 is a process and whose n1 runs here, loaded."""
    cfg = write_config(tmp_path, tiny_model("qwen3"), 2, extra_cluster=FAST, api=api)
    with process_ring(cfg, ["n0"], tmp_path):
        async with local_ring(cfg, ["n1"]) as rt:
            actor = rt.nodes["n1"].actor
            await wait_for(lambda: rt.members == ("n0", "n1") and actor.model is not None, 60)
            yield rt


def chunk(rt: Runtime, rid: str) -> Forward:
    """A prompt chunk of 4 positions as n0 would send it to n1."""
    h = mx.zeros((1, 4, hidden_size(tiny_model("qwen3"))), mx.bfloat16)
    return Forward(rid, 0, (1, 2, 3, 4), False, h=h, layer=rt.plan[1][0])


async def test_a_step_from_a_node_that_is_not_the_previous_member_is_dropped(
    tmp_path: Path,
) -> None:
    async with beside_head(tmp_path) as rt:
        node = rt.nodes["n1"]
        port = rt.config.node("n1").port
        # A name that is no node of the ring is refused at the handshake (the ring is open).
        with pytest.raises((ConnectionError, LinkError)):
            async with intruder(port, "stranger") as conn:
                conn.send(chunk(rt, "from-stranger"))
        # n1 itself passes the handshake (its address is right), but a local node never comes
        # over a link: its step is dropped.
        async with intruder(port, "n1") as conn:
            conn.send(chunk(rt, "from-n1"))
        await asyncio.sleep(0.3)
        assert node.actor.requests == {}  # neither reached the shard
        assert node.rejected == 1
        # From the previous member (n0's name) the same step is taken.
        async with intruder(port, "n0") as conn:
            conn.send(chunk(rt, "from-n0"))
        await wait_for(lambda: "from-n0" in node.actor.requests, 5)
        assert node.rejected == 1


async def test_a_flood_of_fresh_request_ids_stays_bounded(tmp_path: Path) -> None:
    # Requests in the ring at once: max_concurrent + max_queue.
    async with beside_head(tmp_path, api="max_concurrent = 3\nmax_queue = 2") as rt:
        actor = rt.nodes["n1"].actor
        async with intruder(rt.config.node("n1").port, "n0") as conn:
            for i in range(200):
                conn.send(chunk(rt, f"flood{i}"))
        await wait_for(lambda: actor.backlog == 0 and actor.steps >= 5, 30)
        await asyncio.sleep(0.3)
        assert len(actor.requests) == 5
        assert set(actor.requests) == {f"flood{i}" for i in range(5)}


async def test_a_batch_with_one_request_twice_fails_that_request_only(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 2, extra_cluster=FAST)
    prompts = [encode(model, t) for t in CONCURRENT_TEXTS[:4]]
    n = 48
    want = [reference(model, p, n) for p in prompts]
    with process_ring(cfg, ["n1"], tmp_path) as procs:
        async with local_ring(cfg, ["n0"]) as rt:
            assert rt.engine is not None
            got: list[list[int]] = [[] for _ in prompts]

            async def stream(i: int) -> list[int]:
                assert rt.engine is not None
                async for g in rt.engine.generate(prompts[i], max_tokens=n):
                    got[i].append(g.token)
                    await asyncio.sleep(0.005)  # the streams stay under way across the attack
                return got[i]

            streams = [asyncio.create_task(stream(i)) for i in range(len(prompts))]
            await wait_for(lambda: all(len(g) >= 4 for g in got), 30)
            h = mx.zeros((2, 1, hidden_size(model)), mx.bfloat16)
            step = Forward("twice", 1, (5,), True, layer=rt.plan[1][0])
            async with intruder(rt.config.node("n1").port, "n0") as conn:
                conn.send(ForwardBatch((step, step), h))
            results = await aio.wait_for(asyncio.gather(*streams), 60)
            assert list(results) == want
            procs["n1"].wait_log('"step_refused"', 5)
            assert "a pass holds 2 steps of request twice" in procs["n1"].log()


def test_a_process_names_each_link_after_the_node_that_sends_on_it(tmp_path: Path) -> None:
    """A link carries one name, and a node takes steps only from its previous member: the link
    to a node is named after this process's nearest node before it in ring order."""
    config = load_config(write_config(tmp_path, tiny_model("qwen3"), 4))
    assert [sender_to(config, ["n0", "n2"], n) for n in ("n1", "n3")] == ["n0", "n2"]
    assert [sender_to(config, ["n0", "n1"], n) for n in ("n2", "n3")] == ["n1", "n1"]
    assert sender_to(config, ["n1"], "n0") == "n1"


def test_a_prompt_past_a_nodes_kv_bound_fails_with_why_and_short_ones_go_on(
    tmp_path: Path,
) -> None:
    """A peer cannot make a node hold more KV cache than its bound, with a long prompt
    either. n0 holds 4 layers of the tiny model, 512 bytes of KV a position; its bound of
    512 KiB is 1024 positions. A prompt of 2048 (chunks of 512) fails at its third chunk with
    the reason; short prompts before and after it give mlx-lm's tokens."""
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 2, extra_cluster=FAST, tuning="kv_cache_gb = 0.00048828125")
    prompt = encode(model, "A bound on bytes, not only on requests.")
    want = decode(model, reference(model, prompt, 16))
    with process_ring(cfg, ["n0", "n1"], tmp_path) as procs:
        procs["n0"].wait_log('"ring_up"', 60)
        api = load_config(cfg).api_port("n0")
        assert complete(api, prompt, 16) == want
        status, body = post_completion(api, [(7 * i) % 500 + 1 for i in range(2048)], 4)
        assert status == 503, body
        error = body["error"]["message"]
        assert "the shard holds 0.000488 GiB of KV cache, its bound is 0.000488 GiB" in error
        assert "would add 0.000244 GiB" in error
        assert complete(api, prompt, 16) == want
        assert all(p.proc.poll() is None for p in procs.values())


def forged_probe(origin: str, passed: Sequence[str]) -> Probe:
    """A probe from `origin` that claims to have passed the nodes `passed` (a hop and a report
    each)."""
    hops = tuple((n, 0, 1) for n in passed)
    return Probe(
        origin, time.monotonic(), hops, tuple(NodeStats(n, 0, 0, 0, 0.0, 0, 0) for n in passed)
    )


async def test_probes_are_taken_only_on_their_way_round_the_ring(tmp_path: Path) -> None:
    """A probe is taken only from the previous member, from a live member's origin, with fewer
    hops than the ring has members (or as many, home): any other one is dropped where it
    arrives, counted, never passed on; the head's own probes still come home."""
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 2, extra_cluster=FAST)
    prompt = encode(model, "A probe goes round the ring once.")
    want = reference(model, prompt, 16)
    with process_ring(cfg, ["n1"], tmp_path) as procs:
        async with local_ring(cfg, ["n0"]) as rt:
            head, monitor = rt.nodes["n0"], rt.monitor
            assert monitor is not None and monitor.view.ok
            port = rt.config.node("n0").port
            async with intruder(port, "n1") as conn:
                # From the previous member's name: an origin that is no member would circle
                # the ring for ever; a hop list longer than the ring, or none, was never sent
                # round it (the first would reach the head's monitor as the ring's answer).
                conn.send(forged_probe("ghost", ["n1"]))
                conn.send(forged_probe("n0", ["n1"] * 5000))
                conn.send(forged_probe("n0", []))
            # n0 is this process's own node: nothing of it comes over a link.
            async with intruder(port, "n0") as conn:
                conn.send(forged_probe("n0", ["n0", "n1"]))
            await wait_for(lambda: head.rejected == 4, 10)
            # The head's own probes go on coming home through exactly the ring.
            returned = monitor.view.checked
            await wait_for(lambda: monitor.view.checked > returned, 5)
            assert monitor.view.ok, monitor.view.reason
            assert [h[0] for h in monitor.view.hops] == ["n0", "n1"]
            # A node in another process drops a stranger's probe too, and says so.
            async with intruder(rt.config.node("n1").port, "n0") as conn:
                conn.send(forged_probe("ghost", ["n0"]))
            procs["n1"].wait_log('"frame_dropped"', 10)
            dropped = [line for line in procs["n1"].log().splitlines() if "frame_dropped" in line]
            assert len(dropped) == 1 and '"Probe"' in dropped[0]
            assert head.rejected == 4
            assert await ring_tokens(rt, prompt, 16) == want
            assert monitor.view.ok, monitor.view.reason
