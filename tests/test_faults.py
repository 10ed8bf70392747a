"""Faults: a node killed with SIGKILL ends what is in flight quickly, the survivors re-plan and
serve exact output, and the node is taken back in when it returns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mlxring import aio
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.ring.runtime import Runtime

from .ringutil import (
    FAST,
    NodeProcess,
    encode,
    local_ring,
    post_completion,
    process_ring,
    reference,
    ring_tokens,
    tiny_model,
    wait_for,
    write_config,
    write_valid_config,
)


async def stream(rt: Runtime, prompt: list[int], n: int) -> tuple[str, list[int], float]:
    """Generate; returns (outcome, tokens, seconds from start to the end of the request)."""
    assert rt.engine is not None
    t0 = time.monotonic()
    toks: list[int] = []
    try:
        async for g in rt.engine.generate(prompt, max_tokens=n):
            toks.append(g.token)
            await asyncio.sleep(0.01)  # a slow client keeps the stream open across the kill
        return "complete", toks, time.monotonic() - t0
    except RingUnavailable:
        return "unavailable", toks, time.monotonic() - t0


def test_kill_the_middle_node_then_bring_it_back(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    cfg = write_config(tmp_path, model, 3, extra_cluster=FAST)
    prompt = encode(model, "Nodes come and go, the answer stays the same.")
    want = reference(model, prompt, 40)

    async def run(procs: dict[str, NodeProcess]) -> None:
        async with local_ring(cfg, ["n0"]) as rt:
            assert rt.plan == [(0, 3), (3, 5), (5, 7)]
            streams = [asyncio.create_task(stream(rt, prompt, 2000)) for _ in range(8)]
            await asyncio.sleep(1.0)
            procs["n1"].kill()
            killed = time.monotonic()
            results = await aio.wait_for(asyncio.gather(*streams), 10)
            assert all(outcome == "unavailable" for outcome, _, _ in results)
            assert time.monotonic() - killed < 10
            # Survivors re-plan over two nodes and serve the exact output again.
            await wait_for(lambda: rt.members == ("n0", "n2"), 15)
            assert await rt.wait_ready(15)
            assert rt.plan == [(0, 4), (4, 7)]
            got = [t for _, t, _ in [await stream(rt, prompt, 40)]][0]
            assert got[: len(want)] == want
            # The node comes back: the original 3-node plan and exact output.
            procs["n1"] = NodeProcess(cfg, "n1", tmp_path)
            await wait_for(lambda: rt.members == ("n0", "n1", "n2"), 30)
            assert await rt.wait_ready(15)
            assert rt.plan == [(0, 3), (3, 5), (5, 7)]
            _, got, _ = await stream(rt, prompt, 40)
            assert got[: len(want)] == want
            procs["n1"].stop()

    with process_ring(cfg, ["n1", "n2"], tmp_path) as procs:
        asyncio.run(run(procs))


def test_kill_the_head_a_survivor_takes_over(tmp_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    from mlxring.config import load_config

    model = tiny_model("qwen3")
    # With a draft model (the model itself): whichever node is the head holds it, no other.
    cfg = write_config(tmp_path, model, 3, extra_cluster=f'{FAST}\ndraft_model = "{model}"')
    config = load_config(cfg)
    prompt = encode(model, "The head is gone; long live the head.")
    want = load_tokenizer(model).decode(reference(model, prompt, 24))
    with process_ring(cfg, ["n0", "n1", "n2"], tmp_path) as procs:
        for p in procs.values():
            p.wait_log('"node_started"', 60)
        n1_api, n2_api = config.api_port("n1"), config.api_port("n2")
        deadline = time.monotonic() + 30
        while (status := post_completion(n2_api, prompt, 24))[
            0
        ] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status[0] == 200 and status[1]["choices"][0]["text"] == want
        procs["n0"].kill()
        # Requests during the take-over are refused with 503, never hang; then n1 serves.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            code, body = post_completion(n1_api, prompt, 24, timeout=15)
            if code == 200:
                break
            assert code == 503 and body["error"]["type"] == "cluster_unavailable", body
            time.sleep(0.2)
        assert code == 200, body
        assert body["choices"][0]["text"] == want
        # A request sent to the other survivor is forwarded to the new head.
        code, body = post_completion(n2_api, prompt, 24)
        assert code == 200 and body["choices"][0]["text"] == want
        assert '"ring_plan"' in procs["n1"].log()
        assert '"draft_model_loaded"' in procs["n1"].log()
        # The first node comes back and is the head again: n1 gives its draft model back.
        procs["n0"] = NodeProcess(cfg, "n0", tmp_path)
        procs["n1"].wait_log('"draft_model_unloaded"', 30)
        deadline = time.monotonic() + 30  # n0's log holds its first life's lines too
        while procs["n0"].log().count('"draft_model_loaded"') < 2:
            assert time.monotonic() < deadline, procs["n0"].log()[-3000:]
            time.sleep(0.1)


def test_a_long_prefill_does_not_look_like_a_dead_ring(tmp_path: Path) -> None:
    """Probes pass a node at once, not behind its compute: a prefill longer than down_after_s
    must finish (exactly) instead of failing the ring."""
    big = tmp_path / "model"
    from mlxring.model.make import make_model

    make_model(big, family="qwen3", preset="small", layers=4)
    prompt = encode(big, "The ring stays up while a long prompt fills it. " * 60)[:700]
    want = reference(big, prompt, 8, prefill_step=4096)
    cfg = write_config(
        tmp_path,
        big,
        2,
        extra_cluster="heartbeat_s = 0.1\ndown_after_s = 0.3\nprefill_chunk = 4096",
    )

    async def run() -> tuple[list[int], float]:
        async with local_ring(cfg) as rt:
            t0 = time.monotonic()
            got = await ring_tokens(rt, prompt, 8)
            return got, time.monotonic() - t0

    got, took = asyncio.run(run())
    assert took > 0.3, f"the prefill took {took:.2f} s: too short to prove anything"
    assert got == want


def test_sigterm_to_every_node_at_once_all_exit_promptly(tmp_path: Path) -> None:
    """Stopping a whole ring (as a service manager or Ctrl-C in every terminal does): each node
    sees its neighbours vanish while it stops, and must still exit, cleanly and soon."""
    import signal

    model = tiny_model("qwen3")
    for round_ in range(2):
        where = tmp_path / str(round_)
        where.mkdir()
        cfg = write_valid_config(where, model, 3, extra_cluster=FAST)
        with process_ring(cfg, ["n0", "n1", "n2"], where) as procs:
            for p in procs.values():
                p.wait_log('"node_started"', 60)
            for p in procs.values():
                p.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 8
            for p in procs.values():
                code = p.proc.wait(max(0.1, deadline - time.monotonic()))
                assert code == 0, f"{p.name} exited {code}:\n{p.log()[-2000:]}"
