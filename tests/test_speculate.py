"""Speculative decoding over the ring: prompt-lookup drafts verified in one pass, greedy output
exactly mlx-lm's without speculation, lone and concurrent.

Random weights copy nothing, so the ring tests use models made with a small weight scale,
whose greedy text falls into runs of one token and out of them again: drafts copied from the
text are then accepted in part (each run's start and end rejects some), and the shards drop
the rejected positions. Acceptance is stated by each test that needs it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mlxring.engine.speculate import (
    MISSES,
    PAUSE,
    PLAIN_EVERY,
    WINDOW,
    Drafter,
    lookup,
)
from mlxring.model.families import MADE

from .ringutil import local_ring, reference, tiny_model, write_valid_config
from .test_prompt_cache import complete, mlx_lm_turns

PERIODIC = [20 + (i % 7) * 3 for i in range(60)]
SPEC = "speculative = true"


def test_lookup_copies_what_followed_the_latest_run_like_the_end() -> None:
    text = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert lookup(text, 3) == [7, 8, 1]  # the latest earlier "1 2 3" came before 7 8
    assert lookup([5, 6, 7, 8], 3) == []  # nothing repeats
    # What follows "4 4 4" runs into the end: the copy goes on from its own start.
    assert lookup([4, 4, 4, 4], 5) == [4, 4, 4, 4, 4]
    assert lookup([9, 1, 2, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # a period of two, whole
    assert lookup([1, 2, 3, 4, 8, 1, 2, 3], 2) == [4, 8]  # far from the end: copied as is
    assert lookup(text + [5], 4) == []  # "3 5" never came before, nor "1 2 3 5"


def test_a_drafter_whose_drafts_keep_failing_pauses_longer_each_time() -> None:
    d = Drafter(k=3)
    text = [1, 2, 3, 1, 2]
    assert d.draft(text) == []  # a plain step first: its time is what drafts must beat
    d.took(0, 0, 0.1)
    assert d.draft(text) == [3, 1, 2]
    for _ in range(MISSES):
        d.took(3, 0)
    assert [d.draft(text) for _ in range(PAUSE)] == [[]] * PAUSE
    assert d.draft(text) == [3, 1, 2]  # drafting again
    for _ in range(MISSES):
        d.took(3, 0)
    assert [d.draft(text) for _ in range(2 * PAUSE)] == [[]] * (2 * PAUSE)
    d.took(3, 2)  # an accepted draft ends the backoff
    assert (d.drafted, d.accepted, d.steps) == (21, 2, 7)


async def generate(rt: object, prompt: list[int], n: int, **kw: object) -> list[int]:
    engine = rt.engine  # type: ignore[attr-defined]
    return [g.token async for g in engine.generate(prompt, max_tokens=n, **kw)]


@pytest.mark.parametrize(
    ("family", "scale"),
    [("qwen3", 1.0), ("qwen3", 1.5), ("mixtral", 1.0), ("qwen3_moe", 1.5)],
)
async def test_greedy_output_with_drafts_is_mlx_lms_lone_and_concurrent(
    tmp_path: Path, family: str, scale: float
) -> None:
    model = tiny_model(family, scale=scale)
    prompts = [PERIODIC, [t + 1 for t in PERIODIC], [t + 2 for t in PERIODIC]]
    wants = [reference(model, p, 60) for p in prompts]
    cfg = write_valid_config(tmp_path, model, 3, extra_cluster=SPEC)
    async with local_ring(cfg) as rt:
        engine = rt.engine
        assert engine is not None and engine.speculative
        assert await generate(rt, prompts[0], 60) == wants[0]
        assert engine.accepted > 0, "the made model no longer repeats: pick another scale"
        got = await asyncio.gather(*(generate(rt, p, 60) for p in prompts))
        assert got == wants


async def test_stops_budgets_opt_out_and_the_prompt_cache_after_drafts(tmp_path: Path) -> None:
    """A stop token and max_tokens inside an accepted run end the answer exactly there; a
    request that opts out drafts nothing; a speculative turn's caches, its rejected drafts
    dropped, are the next turn's prompt-cache entry."""
    model = tiny_model("qwen3", scale=1.0)
    want = reference(model, PERIODIC, 48)
    stop = next(t for t in want if t != want[0])  # the token that ends the first run
    cfg = write_valid_config(tmp_path, model, 3, extra_cluster=SPEC)
    async with local_ring(cfg) as rt:
        engine = rt.engine
        assert engine is not None
        assert (
            await generate(rt, PERIODIC, 48, stop_token_ids=[stop]) == want[: want.index(stop) + 1]
        )
        assert await generate(rt, PERIODIC, 9) == want[:9]
        before = engine.drafted
        assert await generate(rt, PERIODIC, 48, speculate=False) == want
        assert engine.drafted == before

        first = [t + 5 for t in PERIODIC]
        out1, second, held, out2 = mlx_lm_turns(model, first, 24, [31, 41, 59, 26], 12)
        from .ringutil import OpenAIRing, decode, post_json, serve_api

        async with serve_api(rt) as url:
            api = OpenAIRing(rt, url, None)  # type: ignore[arg-type]
            drafted = engine.drafted
            turn1 = await complete(api, first, 24)
            assert engine.drafted > drafted  # the first turn drafted
            assert turn1["choices"][0]["text"] == decode(model, out1)
            turn2 = await complete(api, second, 12)
            assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] == held
            assert turn2["choices"][0]["text"] == decode(model, out2)
            # The API's opt-out, and the counters on /metrics.
            drafted = engine.drafted
            status, _, body = await post_json(
                f"{url}/v1/completions",
                {"prompt": PERIODIC, "max_tokens": 24, "temperature": 0, "speculative": False},
            )
            assert status == 200 and engine.drafted == drafted
            async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
                text = await r.text()
            name = 'mlxring_speculative_{}_tokens_total{{kind="ngram"}} {}'
            assert name.format("drafted", float(drafted)) in text
            assert name.format("accepted", float(engine.accepted)) in text


async def test_a_model_whose_caches_cannot_drop_positions_does_not_draft(tmp_path: Path) -> None:
    model = tiny_model("gemma3_text", scale=1.0)  # sliding-window layers
    cfg = write_valid_config(tmp_path, model, 2, extra_cluster=SPEC)
    async with local_ring(cfg) as rt:
        assert rt.engine is not None and not rt.engine.speculative
        assert await generate(rt, PERIODIC, 16) == reference(model, PERIODIC, 16)


def test_drafts_that_give_fewer_tokens_a_second_than_plain_steps_are_misses() -> None:
    """Where each verified position costs about a step (a CPU), even kept drafts may not pay:
    such steps count as misses, and drafting pauses as for rejected ones."""
    text = [1, 2, 3, 1, 2]
    slow, fast = Drafter(k=3), Drafter(k=3)
    for d in (slow, fast):
        d.took(0, 0, 0.1)  # a plain step: 0.1 s
    for _ in range(WINDOW // 2):  # enough steps to weigh
        slow.took(3, 2, 0.4)  # 3 tokens in 0.4 s: fewer a second than plain steps
        fast.took(3, 2, 0.2)  # 3 tokens in 0.2 s: worth it
    assert [slow.draft(text) for _ in range(PAUSE)] == [[]] * PAUSE
    assert fast.draft(text) == [3, 1, 2]
    for _ in range(WINDOW // 2):  # slow again: the next pause is twice as long
        slow.took(3, 2, 0.4)
    assert [slow.draft(text) for _ in range(2 * PAUSE)] == [[]] * (2 * PAUSE)
    for _ in range(PLAIN_EVERY - WINDOW // 2):
        fast.took(3, 2, 0.2)
    assert fast.draft(text) == []  # a plain step now and then keeps its time known


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MADE))
async def test_every_family_is_exact_with_speculation_where_it_drafts(
    tmp_path: Path, family: str
) -> None:
    """Every family: greedy output with speculation on equals mlx-lm's; families whose caches
    cannot drop positions do not draft at all."""
    model = tiny_model(family, scale=1.0)
    want = reference(model, PERIODIC, 40)
    cfg = write_valid_config(tmp_path, model, 2, extra_cluster=SPEC)
    async with local_ring(cfg) as rt:
        assert await generate(rt, PERIODIC, 40) == want
        assert rt.engine is not None
        if not rt.engine.speculative:
            assert rt.engine.drafted == 0
