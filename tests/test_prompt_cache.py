"""The ring's prompt cache: a conversation's next turn prefills only its new tokens, every shard
starting from its own layers' caches of the turn before, and the output stays mlx-lm's.

The oracle is mlx-lm doing what its own server does with a prompt cache: generate the first
turn on a cache, cut the cache to the tokens the next prompt shares with it, prefill the rest
on it. Turns are built from token ids (legacy completions take them), so the next prompt
starts with exactly the tokens the ring computed. Families cover every cache kind the ring
runs: plain, sliding-window (rotating), chunked, MLA, and the hybrids' linear-attention state,
which cannot be cut shorter and is reused only whole."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from .ringutil import (
    OpenAIRing,
    decode,
    loaded,
    openai_ring,
    post_json,
    reference,
    tiny_model,
)

FIRST = [(7 * i + 3) % 200 + 20 for i in range(40)]  # a first prompt of 40 token ids
MORE = [31, 41, 59, 26, 53, 58, 97, 93]  # the next turn's new tokens


def mlx_lm_turns(model: Path, first: list[int], n1: int, more: list[int], n2: int) -> Any:
    """mlx-lm with a prompt cache: the first turn's tokens, the second prompt (the first, its
    answer, `more`), the positions of the cache it reuses, and the second turn's tokens.

    The cache holds what the ring's shards keep: the prompt and every answer token but the
    last (sampled, never fed). mlx-lm's generate_step feeds each token it yields, so the
    first turn runs on the cache for n1 - 1 tokens (then it holds exactly that), and its
    last token comes from a run without one."""
    m, tok = loaded(model)
    out1 = reference(model, first, n1)
    assert len(out1) == n1, "choose another prompt: EOS came"
    cache = make_prompt_cache(m)
    fed = [
        int(t) for t, _ in generate_step(mx.array(first), m, max_tokens=n1 - 1, prompt_cache=cache)
    ]
    assert fed == out1[:-1]
    held = len(first) + n1 - 1
    second = [*first, *out1, *more]
    out2: list[int] = []
    for t, _ in generate_step(mx.array(second[held:]), m, max_tokens=n2, prompt_cache=cache):
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


FAMILIES = [
    pytest.param("qwen3", id="qwen3"),
    pytest.param("gemma3_text", id="gemma3-rotating"),
    pytest.param("qwen3_next", id="qwen3_next-linear-state"),
    *[
        pytest.param(f, marks=pytest.mark.slow, id=f)
        for f in ("llama", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text", "gemma2")
    ],
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
