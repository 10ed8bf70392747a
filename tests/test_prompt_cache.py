"""The ring's prompt cache: a conversation's next turn prefills only its new tokens, every shard
starting from its own layers' caches of the turn before, and the output stays mlx-lm's.

The oracle is mlx-lm doing what its own server does with a prompt cache: generate the first
turn on a cache, cut the cache to the tokens the next prompt shares with it, prefill the rest
on it. Turns are built from token ids (legacy completions take them), so the next prompt
starts with exactly the tokens the ring computed. Families cover every cache kind the ring
runs: plain, sliding-window (rotating), chunked, MLA, and the hybrids' linear-attention state,
which cannot be cut shorter and is reused only whole."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlxring.model.families import MADE

from .ringutil import (
    OpenAIRing,
    decode,
    loaded,
    local_ring,
    openai_ring,
    post_json,
    reference,
    serve_api,
    tiny_model,
    wait_for,
    write_valid_config,
)

FIRST = [(7 * i + 3) % 200 + 20 for i in range(40)]  # a first prompt of 40 token ids
MORE = [31, 41, 59, 26, 53, 58, 97, 93]  # the next turn's new tokens


def mlx_lm_turns(
    model: Path, first: list[int], n1: int, more: list[int], n2: int, step: int = 2048
) -> Any:
    """mlx-lm with a prompt cache: the first turn's tokens, the second prompt (the first, its
    answer, `more`), the positions of the cache it reuses, and the second turn's tokens.

    The cache holds what the ring's shards keep: the prompt and every answer token but the
    last (sampled, never fed). mlx-lm's generate_step feeds each token it yields, so the
    first turn runs on the cache for n1 - 1 tokens (then it holds exactly that), and its
    last token comes from a run without one."""
    m, tok = loaded(model)
    out1 = reference(model, first, n1, prefill_step=step)
    assert len(out1) == n1, "choose another prompt: EOS came"
    cache = make_prompt_cache(m)
    fed = [
        int(t)
        for t, _ in generate_step(
            mx.array(first), m, max_tokens=n1 - 1, prompt_cache=cache, prefill_step_size=step
        )
    ]
    assert fed == out1[:-1]
    held = len(first) + n1 - 1
    second = [*first, *out1, *more]
    out2: list[int] = []
    rest = mx.array(second[held:])
    for t, _ in generate_step(rest, m, max_tokens=n2, prompt_cache=cache, prefill_step_size=step):
        if int(t) in tok.eos_token_ids:
            break
        out2.append(int(t))
    return out1, second, held, out2


async def complete(api: OpenAIRing, prompt: Sequence[int], n: int) -> dict[str, Any]:
    status, _, body = await post_json(
        f"{api.url}/v1/completions",
        {"prompt": list(prompt), "max_tokens": n, "temperature": 0},
    )
    assert status == 200, body
    return body


# Every cache kind in CI (plain, rotating, linear state); every other family in the slow set.
IN_CI = {
    "qwen3": "qwen3",
    "gemma3_text": "gemma3-rotating",
    "qwen3_next": "qwen3_next-linear-state",
}
FAMILIES = [pytest.param(f, id=name) for f, name in IN_CI.items()] + [
    pytest.param(f, marks=pytest.mark.slow, id=f) for f in MADE if f not in IN_CI
]


@pytest.mark.parametrize("family", FAMILIES)
async def test_the_next_turn_reuses_the_cache_and_is_mlx_lms(tmp_path: Path, family: str) -> None:
    model = tiny_model(family)
    out1, second, held, out2 = mlx_lm_turns(model, FIRST, 12, MORE, 10)
    async with openai_ring(tmp_path, model, 3) as api:
        turn1 = await complete(api, FIRST, 12)
        assert turn1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        turn2 = await complete(api, second, 10)
        # Every shard started from its entry: only the new tokens were prefilled.
        assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] == held
        engine = api.rt.engine
        assert engine is not None and engine.cache_hits == 1 and engine.cache_misses == 0
        assert turn1["choices"][0]["text"] == decode(model, out1)
        assert turn2["choices"][0]["text"] == decode(model, out2)
    # And the same as without any cache (mlx-lm prefilling the whole second prompt).
    assert out2 == reference(model, second, 10)


async def test_chunked_prefill_goes_on_from_the_entry(tmp_path: Path) -> None:
    """Prompts prefilled in chunks of 8: the next turn's new tokens go in chunks from where the
    entry ends, as mlx-lm prefills the rest of a prompt on its cache."""
    model = tiny_model("qwen3")
    more = [(5 * i) % 97 + 20 for i in range(21)]
    out1, second, held, out2 = mlx_lm_turns(model, FIRST, 6, more, 8, step=8)
    cfg = write_valid_config(tmp_path, model, 2, extra_cluster="prefill_chunk = 8")
    async with local_ring(cfg) as rt, serve_api(rt) as url:
        api = OpenAIRing(rt, url, None)  # type: ignore[arg-type]
        assert (await complete(api, FIRST, 6))["choices"][0]["text"] == decode(model, out1)
        turn2 = await complete(api, second, 8)
        assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] == held
        assert turn2["choices"][0]["text"] == decode(model, out2)


def oracle_from(
    model: Path, first: list[int], fed: int, prompt: list[int], reuse: int, n: int
) -> list[int]:
    """mlx-lm generating `prompt` on the cache of a first turn (`first`, then `fed` answer
    tokens fed one by one, as the ring computed them) cut back to its first `reuse`
    positions, as mlx-lm's server reuses its prompt cache."""
    m, tok = loaded(model)
    cache = make_prompt_cache(m)
    list(generate_step(mx.array(first), m, max_tokens=fed, prompt_cache=cache))
    trim_prompt_cache(cache, len(first) + fed - reuse)
    out: list[int] = []
    for t, _ in generate_step(mx.array(prompt[reuse:]), m, max_tokens=n, prompt_cache=cache):
        if int(t) in tok.eos_token_ids:
            break
        out.append(int(t))
    return out


async def test_concurrent_requests_share_an_entry_and_a_chat_turn_reuses_its_history(
    tmp_path: Path,
) -> None:
    """Three requests with one prefix at once each start from a copy of the entry (none
    writes another's), batched as usual; a chat's second turn, through the template, reuses
    what its first turn left, cut to the tokens the two prompts share."""
    model = tiny_model("qwen3")
    out1, _, held, _ = mlx_lm_turns(model, FIRST, 12, MORE, 1)
    seconds = [[*FIRST, *out1, *MORE[k:], k + 3] for k in range(3)]
    wants = [mlx_lm_turns(model, FIRST, 12, [*MORE[k:], k + 3], 8)[3] for k in range(3)]
    async with openai_ring(tmp_path, model, 3) as api:
        await complete(api, FIRST, 12)
        answers = await asyncio.gather(*(complete(api, p, 8) for p in seconds))
        for body, want in zip(answers, wants, strict=True):
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == held
            assert body["choices"][0]["text"] == decode(model, want)
        assert [reference(model, p, 8) for p in seconds] == wants

        _, tok = loaded(model)
        chat = [{"role": "user", "content": "Tell me about rings of Macs and their caches."}]
        r1 = await api.client.chat.completions.create(model="m", messages=chat, max_tokens=10)  # type: ignore[arg-type]
        answer = r1.choices[0].message.content or ""
        chat2 = [
            *chat,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Why?"},
        ]
        r2 = await api.client.chat.completions.create(model="m", messages=chat2, max_tokens=10)  # type: ignore[arg-type]
        assert r2.usage is not None and r2.usage.prompt_tokens_details is not None
        reused = r2.usage.prompt_tokens_details.cached_tokens or 0
        p1 = list(tok.apply_chat_template(chat, add_generation_prompt=True))
        p2 = list(tok.apply_chat_template(chat2, add_generation_prompt=True))
        answer_ids = reference(model, p1, 10)
        assert len(answer_ids) == 10, "choose another question: EOS came"
        fed = [*p1, *answer_ids[:-1]]
        assert reused == min(shared_start(fed, p2), len(p2) - 1) >= len(p1) - 1
        want = oracle_from(model, p1, 9, p2, reused, 10)
        assert r2.choices[0].message.content == decode(model, want)


def shared_start(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def test_an_entry_a_shard_dropped_is_a_miss_and_a_full_prefill(tmp_path: Path) -> None:
    """A bound that holds one entry per shard: a second prompt's entry pushes the first out
    on the shards while the head still lists it; the first prompt's next turn asks for it,
    misses, and is prefilled in full, with the same output."""
    model = tiny_model("qwen3")
    out1, second, _, out2 = mlx_lm_turns(model, FIRST, 12, MORE, 10)
    other = [t + 1 for t in FIRST]
    cfg = write_valid_config(tmp_path, model, 3, tuning="prompt_cache_gb = 0.00012")
    async with local_ring(cfg) as rt, serve_api(rt) as url:
        api = OpenAIRing(rt, url, None)  # type: ignore[arg-type]
        await complete(api, FIRST, 12)
        await complete(api, other, 4)
        for node in rt.nodes.values():  # one entry each: the other prompt's
            assert len(node.actor.stepper.prompts) == 1
        turn2 = await complete(api, second, 10)
        assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert turn2["choices"][0]["text"] == decode(model, out2)
        assert rt.engine is not None and rt.engine.cache_misses == 1
        # The miss dropped the entry at the head: the same prompt again reuses turn 2's.
        again = await complete(api, second, 10)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(second) - 1
        assert again["choices"][0]["text"] == decode(model, out2)


@pytest.mark.slow  # 13 s: the suite stays near its 15 minutes
async def test_two_hundred_long_prompts_stay_within_the_bound(tmp_path: Path) -> None:
    """Memory stays bounded: 200 different prompts of 128 tokens through the engine, each
    kept when it ends; every shard's entries stay within its byte bound (a few entries' worth),
    the head's index within its count, and the oldest entries are the ones gone."""
    model = tiny_model("qwen3")
    bound = 0.0005
    cfg = write_valid_config(tmp_path, model, 3, tuning=f"prompt_cache_gb = {bound}")
    async with local_ring(cfg) as rt:
        engine = rt.engine
        assert engine is not None and engine.prefixes is not None
        for i in range(200):
            prompt = [(i * 7919 + j * 104729) % 400 + 20 for j in range(128)]
            async for _ in engine.generate(prompt, max_tokens=1):
                pass
            for node in rt.nodes.values():
                prompts = node.actor.stepper.prompts
                assert prompts.nbytes <= bound * (1 << 30), (i, node.name, prompts.nbytes)

        # The last End is on its way round the ring when the engine's generator returns.
        def settled() -> bool:
            return all(
                len(n.actor.stepper.prompts) + n.actor.stepper.prompts.evicted == 200
                for n in rt.nodes.values()
            )

        await wait_for(settled, 10)
        for node in rt.nodes.values():
            prompts = node.actor.stepper.prompts
            assert 0 < len(prompts) < 20
            assert list(prompts._entries)[-1] in engine.prefixes._entries  # the latest kept
        assert len(engine.prefixes) <= engine.prefixes.max_entries


async def test_an_entry_gives_its_history_to_a_later_requests_penalty(tmp_path: Path) -> None:
    """Two first turns decode together (a batched pass, no processors); the next turn of one
    asks for a repetition penalty, which reads every token before it: the entry carried the
    whole history, so the output is mlx-lm's with the penalty over the whole prompt."""
    from mlx_lm.sample_utils import make_logits_processors

    model = tiny_model("qwen3")
    other = [t + 3 for t in FIRST]
    out1 = reference(model, FIRST, 12)
    second = [*FIRST, *out1, *MORE]
    m, tok = loaded(model)
    procs = make_logits_processors(repetition_penalty=1.5, repetition_context_size=64)
    want: list[int] = []
    for t, _ in generate_step(mx.array(second), m, max_tokens=10, logits_processors=procs):
        if int(t) in tok.eos_token_ids:
            break
        want.append(int(t))
    assert want != reference(model, second, 10)  # the penalty changes the answer
    async with openai_ring(tmp_path, model, 2) as api:
        first = await asyncio.gather(complete(api, FIRST, 12), complete(api, other, 12))
        assert first[0]["choices"][0]["text"] == decode(model, out1)
        assert any(n.actor.batches for n in api.rt.nodes.values())  # decoded in one pass
        status, _, body = await post_json(
            f"{api.url}/v1/completions",
            {
                "prompt": second,
                "max_tokens": 10,
                "temperature": 0,
                "repetition_penalty": 1.5,
                "repetition_context_size": 64,
            },
        )
        assert status == 200, body
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == len(FIRST) + 11
        assert body["choices"][0]["text"] == decode(model, want)


async def test_cache_prompt_false_neither_reuses_nor_keeps(tmp_path: Path) -> None:
    """llama.cpp's `cache_prompt: false`: the request prefills in full and leaves nothing."""
    model = tiny_model("qwen3")
    async with openai_ring(tmp_path, model, 2) as api:
        await complete(api, FIRST, 4)
        for _ in range(2):
            status, _, body = await post_json(
                f"{api.url}/v1/completions",
                {"prompt": FIRST, "max_tokens": 4, "temperature": 0, "cache_prompt": False},
            )
            assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert api.rt.engine is not None and len(api.rt.engine.prefixes or ()) == 1
        again = await complete(api, FIRST, 4)  # the first request's entry is still there
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(FIRST) - 1
