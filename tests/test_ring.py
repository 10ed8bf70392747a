"""The ring generates exactly what mlx-lm generates on one machine, token for token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest

from mlxring.aio import wait_for
from mlxring.model.sharded import load_shard, model_info
from mlxring.model.source import tensor_sizes
from mlxring.ring.plan import ModelFootprint
from mlxring.ring.runtime import Runtime

from .ringutil import (
    CONCURRENT_TEXTS,
    encode,
    head_here,
    local_ring,
    process_ring,
    reference,
    ring_tokens,
    tiny_model,
    write_config,
)

PROMPT = "The ring carries activations from one Mac to the next."

MODELS = [
    pytest.param("qwen3", None, None, id="qwen3-tied-bf16"),
    pytest.param("qwen3", False, None, id="qwen3-untied-bf16"),
    pytest.param("qwen3", None, 4, id="qwen3-tied-4bit"),
    pytest.param("qwen2", None, None, id="qwen2-bf16"),
    pytest.param("qwen2", True, 4, id="qwen2-tied-4bit"),
    pytest.param("llama", None, None, id="llama-bf16"),
    pytest.param("llama", True, 8, id="llama-tied-8bit"),
    pytest.param("llama", False, 4, id="llama-untied-4bit"),
]


@pytest.mark.parametrize(("family", "tie", "quantize"), MODELS)
@pytest.mark.parametrize("n_nodes", [1, 2, 3, 4])
async def test_in_process_ring_is_exact(
    tmp_path: Path, family: str, tie: bool | None, quantize: int | None, n_nodes: int
) -> None:
    model = tiny_model(family, tie=tie, quantize=quantize)  # 7 layers: not divisible by 2, 3, 4
    prompt = encode(model, PROMPT)
    want = reference(model, prompt, 64)
    assert len(set(want)) >= 10, "the oracle output is degenerate; the test would prove little"
    async with local_ring(write_config(tmp_path, model, n_nodes)) as rt:
        assert len(rt.plan) == n_nodes and rt.plan[0][0] == 0 and rt.plan[-1][1] == 7
        assert await ring_tokens(rt, prompt, 64) == want


async def test_long_prompt_prefills_in_chunks_exactly(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    prompt = encode(model, PROMPT * 12)
    assert len(prompt) > 3 * 32
    want = reference(model, prompt, 32, prefill_step=32)
    cfg = write_config(tmp_path, model, 3, extra_cluster="prefill_chunk = 32")
    async with local_ring(cfg) as rt:
        assert rt.engine is not None and rt.engine.prefill_chunk == 32
        assert await ring_tokens(rt, prompt, 32) == want
        # Each shard ran the prompt but its last token in chunks, then one step per token;
        # only those count as decode (what `mlxring bench` times).
        chunks = -(-(len(prompt) - 1) // 32)
        for node in rt.nodes.values():
            a = node.actor
            assert (a.steps, a.decode_steps) == (chunks + len(want), len(want)), node.name
            assert 0 < a.decode_busy_s < a.busy_s


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_separate_processes_over_tcp_are_exact(tmp_path: Path, family: str) -> None:
    """The head (with the engine) runs here; the other three nodes are `mlxring node` processes."""
    import asyncio

    model = tiny_model(family, quantize=4 if family == "llama" else None)
    cfg_path = write_config(tmp_path, model, 4)
    prompt = encode(model, PROMPT)
    want = reference(model, prompt, 64)

    async def run() -> tuple[list[int], list[float], list[float]]:
        async with local_ring(cfg_path, ["n0"]) as rt:
            assert rt.engine is not None
            got = await ring_tokens(rt, prompt, 64)
            return got, rt.engine.trip_s, rt.engine.hop_s

    with process_ring(cfg_path, ["n1", "n2", "n3"], tmp_path):
        got, trips, hops = asyncio.run(run())
    assert got == want
    # Every decode step came home with its network time: a trip less the time inside the four
    # processes, over four hops (a stamp lost or counted twice shows up here).
    assert len(hops) == len(trips) == len(got) - 1
    assert all(0 < h < t / 4 for h, t in zip(hops, trips, strict=True)), (hops, trips)


@pytest.mark.parametrize("convoys", ['"auto"', "1"])
async def test_a_long_prompt_lets_running_generations_through_between_its_chunks(
    tmp_path: Path, convoys: str
) -> None:
    """Every shard lets decode steps pass a prompt chunk in front of them (once per chunk), so a
    running generation keeps making tokens while a long prompt prefills; in arrival order it
    would wait behind all of the prompt's chunks on every shard. With one convoy, the running
    one does not wait for the prefilling one to join."""
    import asyncio

    model = tiny_model("qwen3")
    running, long = encode(model, PROMPT), encode(model, PROMPT * 40)
    assert len(long) // 16 >= 24
    want_running = reference(model, running, 200, prefill_step=16)
    want_long = reference(model, long, 4, prefill_step=16)
    assert len(want_running) == 200, "the oracle stopped early; the test would prove little"
    cfg = write_config(
        tmp_path, model, 3, extra_cluster="prefill_chunk = 16", tuning=f"convoys = {convoys}"
    )
    async with local_ring(cfg) as rt:
        assert rt.engine is not None
        got: list[int] = []
        seen_while_prefilling: list[int] = []

        async def run() -> None:
            async for g in rt.engine.generate(running, max_tokens=200):  # type: ignore[union-attr]
                got.append(g.token)

        async def long_request() -> list[int]:
            out = []
            async for g in rt.engine.generate(long, max_tokens=4):  # type: ignore[union-attr]
                if not out:
                    seen_while_prefilling.append(len(got))
                out.append(g.token)
            return out

        task = asyncio.create_task(run())
        while len(got) < 3:
            await asyncio.sleep(0.001)
        before = len(got)
        got_long = await long_request()
        await task
    assert got == want_running and got_long == want_long[: len(got_long)]
    # Measured: 1 token got through in arrival order, 18-22 with decode steps passing chunks;
    # with one convoy 14, and 6 when the running stream waited for the prefilling one to join.
    assert seen_while_prefilling[0] - before >= 10, (before, seen_while_prefilling)


async def test_concurrent_requests_do_not_mix_caches(tmp_path: Path) -> None:
    import asyncio

    model = tiny_model("qwen3")
    prompts = [encode(model, t) for t in CONCURRENT_TEXTS]
    want = [reference(model, p, 24) for p in prompts]
    async with local_ring(write_config(tmp_path, model, 3)) as rt:
        got = await asyncio.gather(*(ring_tokens(rt, p, 24) for p in prompts))
        assert list(got) == want
        await asyncio.sleep(0.05)  # End messages travel the ring after the last token
        for node in rt.nodes.values():
            assert node.actor.requests == {}, f"{node.name} still holds caches"
        # The decode steps of concurrent requests really ran as batched forward passes.
        assert all(node.actor.batches > 0 for node in rt.nodes.values())


@dataclass(frozen=True)
class HeadCounts:
    busy_poll: bool
    stages: int
    batches: int
    batched_rows: int


def _streams_through_three_processes(
    tmp_path: Path, model: Path, prompts: list[list[int]], extra_cluster: str
) -> tuple[list[list[int]], HeadCounts]:
    """24 greedy tokens of every prompt at once, the head (n0) here and n1, n2 as processes;
    with what the head's process and shard counted."""
    import asyncio

    async def run(rt: Runtime) -> tuple[list[list[int]], HeadCounts]:
        got = await asyncio.gather(*(ring_tokens(rt, p, 24) for p in prompts))
        a = rt.nodes["n0"].actor
        return list(got), HeadCounts(rt.busy_poll, a.stages, a.batches, a.batched_rows)

    return head_here(tmp_path, model, 3, run, extra_cluster)


@pytest.mark.parametrize("busy_poll", [False, True])
def test_concurrent_requests_split_into_one_convoy_per_process(
    tmp_path: Path, busy_poll: bool
) -> None:
    """Three processes compute at once: 8 streams travel as convoys of at most ceil(8/3) rows,
    so each stage has a convoy to run, and every stream stays exact, with the processes' loops
    polling or sleeping between frames."""
    model = tiny_model("qwen3")
    prompts = [encode(model, f"Stream {i} of the convoy test.") for i in range(8)]
    poll = f"busy_poll = {str(busy_poll).lower()}"
    got, head = _streams_through_three_processes(tmp_path, model, prompts, poll)
    assert got == [reference(model, p, 24) for p in prompts]
    assert head.busy_poll is busy_poll
    stages, batches, rows = head.stages, head.batches, head.batched_rows
    assert stages == 3
    assert batches > 0 and rows / batches <= 3, (batches, rows)


def test_one_convoy_carries_every_stream_in_one_pass(tmp_path: Path) -> None:
    """`convoys = 1` (processes that share one accelerator): the head sends the decode steps of
    all streams together, so the three processes run one wide pass at a time, not ceil(8/3)
    rows each; every stream stays exact."""
    model = tiny_model("qwen3")
    prompts = [encode(model, f"Stream {i} of the one-convoy test." * (1 + i % 3)) for i in range(8)]
    got, head = _streams_through_three_processes(tmp_path, model, prompts, "convoys = 1")
    assert got == [reference(model, p, 24) for p in prompts]
    stages, batches, rows = head.stages, head.batches, head.batched_rows
    assert stages == 1
    # Prompts of three lengths finish prefilling apart; after that, all eight go together
    # (23 decode passes of 8 rows here), where one convoy per process carries at most 3.
    assert batches > 0 and rows / batches > 6, (batches, rows)


async def test_one_convoy_does_not_wait_for_a_stream_nobody_reads(tmp_path: Path) -> None:
    """A client that stops reading holds its stream's next step back; with `convoys = 1` the
    others wait for it at most about a trip per step, and finish exact; so does it, later."""
    import asyncio

    model = tiny_model("qwen3")
    prompts = [encode(model, f"Reader {i} of the one-convoy test.") for i in range(3)]
    want = [reference(model, p, 16) for p in prompts]
    cfg = write_config(tmp_path, model, 2, tuning="convoys = 1")
    async with local_ring(cfg) as rt:
        assert rt.engine is not None
        stalled = rt.engine.generate(prompts[0], max_tokens=16)
        first = await anext(stalled)  # then nobody asks for the next token for a while
        got = await wait_for(asyncio.gather(*(ring_tokens(rt, p, 16) for p in prompts[1:])), 30)
        assert list(got) == want[1:]
        rest = [g.token async for g in stalled]
        assert [first.token, *rest] == want[0]


async def test_one_convoy_goes_on_when_a_stream_is_cancelled(tmp_path: Path) -> None:
    """A client that goes away mid-generation (its task cancelled, as aiohttp does on a
    disconnect) leaves the convoy: the others neither wait for it nor lose their steps."""
    import asyncio

    model = tiny_model("qwen3")
    prompts = [encode(model, f"Cancelled {i} of the one-convoy test.") for i in range(3)]
    want = [reference(model, p, 24) for p in prompts]
    cfg = write_config(tmp_path, model, 2, tuning="convoys = 1")
    async with local_ring(cfg) as rt:
        assert rt.engine is not None
        seen: list[int] = []

        async def doomed() -> None:
            async for g in rt.engine.generate(prompts[0], max_tokens=24):  # type: ignore[union-attr]
                seen.append(g.token)

        victim = asyncio.create_task(doomed())
        others = asyncio.gather(*(ring_tokens(rt, p, 24) for p in prompts[1:]))
        while len(seen) < 5:
            await asyncio.sleep(0.001)
        victim.cancel()
        got = await wait_for(others, 30)
        assert list(got) == want[1:]
        assert seen == want[0][: len(seen)]
        assert not rt.engine._out and not rt.engine._ready  # nobody is waited for any more
        await asyncio.sleep(0.05)  # End messages travel the ring after the last token
        for node in rt.nodes.values():
            assert node.actor.requests == {}, f"{node.name} still holds caches"


def test_shards_know_whether_their_output_stays_in_their_process(tmp_path: Path) -> None:
    """n0 and n1 in one process, n2 in another: n0 hands its output to n1 in the same process
    (so it does not build steps ahead), n1 and n2 send theirs across; the ring stays exact."""
    import asyncio

    model = tiny_model("qwen3")
    cfg_path = write_config(tmp_path, model, 3)
    prompt = encode(model, "Two nodes here, one there.")
    want = reference(model, prompt, 16)

    async def run() -> tuple[list[int], dict[str, bool]]:
        async with local_ring(cfg_path, ["n0", "n1"]) as rt:
            got = await ring_tokens(rt, prompt, 16)
            return got, {n: node.actor.next_local for n, node in rt.nodes.items()}

    with process_ring(cfg_path, ["n2"], tmp_path):
        got, next_local = asyncio.run(run())
    assert got == want
    assert next_local == {"n0": True, "n1": False}


@pytest.mark.parametrize(
    ("family", "tie", "quantize"),
    [
        ("qwen3", False, None),
        ("qwen3", False, 4),
        ("qwen3_moe", None, None),  # a dense layer 0, then MoE layers
        ("deepseek_v3", None, 8),  # MLA, and a dense layer 0
        ("kimi_k25", None, None),  # its layers and head inside a multimodal wrapper
        ("llama4_text", False, None),  # its head is named `output`
        ("gemma3_text", True, None),  # tied: the last shard holds the embedding again
        ("qwen3_5_moe", None, None),  # linear-attention layers between attention ones
    ],
)
def test_shard_holds_only_its_own_weights(
    family: str, tie: bool | None, quantize: int | None
) -> None:
    """The planner's figure for each shard (from safetensors headers alone) is what the
    shard holds once loaded, whatever its family keeps where."""
    model = tiny_model(family, tie=tie, quantize=quantize)
    info = model_info(load_config_json(model), tensor_sizes(str(model), model))
    footprint = ModelFootprint(
        info.n_layers, info.layer_bytes, info.embed_bytes, info.head_bytes, info.layer_sizes
    )
    if family in ("qwen3_moe", "deepseek_v3"):
        assert info.layer_sizes[0] < info.layer_sizes[1] == info.layer_bytes
    for start, end in [(0, 1), (1, 3), (3, 5), (5, 7)]:
        before = mx.get_active_memory()
        shard = load_shard(model, start, end)
        expected = footprint.shard_bytes((start, end), first=start == 0, last=end == 7)
        assert shard.parameter_bytes() == expected, (start, end)
        grew = mx.get_active_memory() - before
        # 64 KiB of slack for small non-weight buffers (rope tables and the like).
        assert grew <= 1.05 * expected + 65536, (
            f"loading [{start}, {end}) took {grew} bytes, not ~{expected}"
        )
        del shard


def load_config_json(model: Path) -> dict[str, object]:
    import json

    return dict(json.loads((model / "config.json").read_text()))
