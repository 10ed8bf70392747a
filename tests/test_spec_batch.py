"""Speculative steps in batched passes: rows with drafts (several positions, padded on the right
to the widest) and rows that drop their previous step's rejected drafts first (a trim), beside
plain one-position rows, in one pass on the convoy's merged caches; greedy output exactly
mlx-lm's lone generation for every request.

The per-row drops are checked on mlx-lm's own caches against `KVCache.trim`, the passes on a
real shard against the same steps run alone, and the whole through a ring of three processes
with speculation and one convoy on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxring.backends import pick
from mlxring.model.families import MADE
from mlxring.model.sharded import load_shard
from mlxring.protocol.messages import Forward, ForwardBatch, Message, SamplingParams, Token
from mlxring.ring.runtime import Runtime
from mlxring.shard.convoys import drop_last, wide_rows
from mlxring.shard.step import Stepper

from .ringutil import head_here, local_ring, reference, tiny_model, write_valid_config
from .test_speculate import PERIODIC, SPEC


def _filled(length: int, seed: int) -> KVCache:
    """A KV cache of `length` positions of random keys and values."""
    c = KVCache()
    mx.random.seed(seed)
    k = mx.random.normal((1, 2, length, 8))
    c.update_and_fetch(k, k * 2 + 1)
    return c


def _held(c: KVCache) -> tuple[list[float], list[float]]:
    keys, values = c.keys_and_values()
    return keys.tolist(), values.tolist()


@pytest.mark.parametrize("counts", [[2, 0, 3], [1, 2, 1], [0, 0, 4], [3, 3, 3]])
def test_dropping_each_rows_last_positions_of_merged_caches_is_kvcache_trim(
    counts: list[int],
) -> None:
    """Rows of several lengths merged (left-padded), each row's last `counts` dropped: every
    row holds exactly what its own cache holds after `trim`, keys, values and offset, and a
    position written after lands where it lands in its own cache."""
    lengths = [5, 9, 7]
    own = [_filled(n, seed) for seed, n in enumerate(lengths)]
    merged = BatchKVCache.merge([_filled(n, seed) for seed, n in enumerate(lengths)])
    drop_last([merged], counts)
    for c, n in zip(own, counts, strict=True):
        c.trim(n)
    for i, c in enumerate(own):
        row = merged.extract(i)
        assert row.offset == c.offset and _held(row) == _held(c)
    assert merged.offset.tolist() == [c.offset for c in own]  # each row's RoPE position
    new = mx.random.normal((3, 2, 1, 8))
    merged.update_and_fetch(new, -new)
    for i, c in enumerate(own):
        c.update_and_fetch(new[i : i + 1], -new[i : i + 1])
        assert _held(merged.extract(i)) == _held(c)


def test_a_pass_of_draft_trim_and_plain_rows_gives_what_each_step_alone_gives() -> None:
    """Four requests through a shard split in two: a pass where one row verifies drafts,
    one drops positions first, one decodes greedily and one samples (a seed) gives each row
    the Token its step gives run alone, and leaves each request's caches as the lone steps
    leave them."""
    path = tiny_model("qwen3", scale=1.0)
    n = load_shard(path, 0, 1).n_layers
    halves = [(0, n // 2), (n // 2, n)]
    batched = [Stepper(f"b{a}", load_shard(path, a, b), pick(gates=False)) for a, b in halves]
    alone = [Stepper(f"a{a}", load_shard(path, a, b), pick(gates=False)) for a, b in halves]
    assert all(s.wide for s in batched)
    prompts = [PERIODIC[:30], [t + 1 for t in PERIODIC[:25]], [t + 2 for t in PERIODIC[:28]]]
    want = [reference(path, p, 8) for p in prompts]

    def through(shards: list[Stepper], parts: list[Forward]) -> list[Message]:
        out: list[Message] = list(parts)
        for s in shards:
            if len(out) == 1 and isinstance(out[0], Forward):
                m = s.step(out[0])
                out = [] if m is None else [m]
            else:
                out = s.step_batch(cast(list[Forward | ForwardBatch], out))
        return out

    sampled = SamplingParams(temperature=0.8, seed=3)  # r3: a row sampled on its own key
    firsts = []
    for shards in (batched, alone):
        for i, p in enumerate([*prompts, PERIODIC[:20]]):
            params = sampled if i == 3 else None
            through(shards, [Forward(f"r{i}", 0, tuple(p[:-1]), False, params=params)])
            tok = cast(Token, through(shards, [Forward(f"r{i}", 1, (p[-1],), True)])[0])
            assert i == 3 or tok.token == want[i][0]
        firsts.append(tok.token)
    assert firsts[0] == firsts[1]
    # r0 drafts its next four tokens, the last one wrong; r1 decodes with a trim of one (a
    # rejected draft it fed before: its last token, fed again); r2 and r3 decode plainly.
    steps = [
        Forward("r0", 2, (want[0][0], *want[0][1:4], 0), True, draft=4),
        Forward("r2", 2, (want[2][0],), True),
        Forward("r3", 2, (firsts[0],), True),
    ]
    for shards in (batched, alone):
        through(shards, [Forward("r1", 2, (want[1][0],), True)])  # fed, then "rejected"
    steps.insert(1, Forward("r1", 3, (want[1][0],), True, trim=1))
    together = through(batched, steps)
    lone = [through(alone, [f])[0] for f in steps]
    assert together == lone
    first = cast(Token, together[0])
    assert (first.token, *first.more) == tuple(want[0][1:5])  # three drafts kept
    assert [cast(Token, t).token for t in together[1:3]] == [want[1][1], want[2][1]]
    assert batched[0].batched_draft_rows == 1 and batched[0].convoys.merged
    # The convoy's next pass, on the caches the first left: r0 drops its rejected draft and
    # drafts again (none kept), the others decode plainly; then the caches are the lone ones.
    nxt = [
        Forward("r0", 3, (want[0][4], 0, 0), True, draft=2, trim=1),
        Forward("r1", 4, (want[1][1],), True),
        Forward("r2", 3, (want[2][1],), True),
        Forward("r3", 3, (cast(Token, together[3]).token,), True),
    ]
    assert through(batched, nxt) == [through(alone, [f])[0] for f in nxt]
    assert [len(b.convoys.merged) for b in batched] == [1, 1]  # one convoy all along
    for b, a in zip(batched, alone, strict=True):
        for rid in ("r0", "r1", "r2", "r3"):
            b.convoys.dissolve(rid, b.requests)
            assert b.requests[rid].positions == a.requests[rid].positions
            for cb, ca in zip(b.requests[rid].caches, a.requests[rid].caches, strict=True):
                assert all(map(mx.array_equal, cb.keys_and_values(), ca.keys_and_values()))


async def _generate(rt: Runtime, prompt: list[int], n: int, **kw: object) -> list[int]:
    engine = rt.engine
    assert engine is not None
    return [g.token async for g in engine.generate(prompt, max_tokens=n, **kw)]  # type: ignore[arg-type]


def test_speculating_and_plain_requests_share_passes_through_three_processes(
    tmp_path: Path,
) -> None:
    """Four requests at once through a ring of three processes with one convoy: three copy
    their own text (drafts), one opts out; every answer is mlx-lm's lone greedy one, and the
    head's shard ran passes whose rows carried drafts beside others."""
    model = tiny_model("qwen3", scale=1.0)
    prompts = [PERIODIC, [t + 1 for t in PERIODIC], [t + 2 for t in PERIODIC], PERIODIC[5:]]
    wants = [reference(model, p, 48) for p in prompts]

    async def body(rt: Runtime) -> tuple[list[list[int]], int, int, int]:
        engine = rt.engine
        assert engine is not None and engine.speculative and engine.one_convoy
        got = await asyncio.gather(
            *(_generate(rt, p, 48) for p in prompts[:3]),
            _generate(rt, prompts[3], 48, speculate=False),
        )
        a = rt.nodes["n0"].actor
        return list(got), a.batched_draft_rows, a.batches, engine.accepted

    got, draft_rows, batches, accepted = head_here(tmp_path, model, 3, body, f"{SPEC}\nconvoys = 1")
    assert got == wants
    assert accepted > 0, "the made model no longer repeats: pick another scale"
    assert batches > 0 and draft_rows > 0, (batches, draft_rows)


def _wide_families() -> list[str]:
    return [f for f in MADE if MADE[f].batches]


@pytest.mark.slow
@pytest.mark.parametrize("family", _wide_families())
async def test_every_family_is_exact_with_drafts_in_batched_passes(
    tmp_path: Path, family: str
) -> None:
    """Every family that batches: concurrent speculating and plain requests in one convoy
    equal mlx-lm's lone greedy output; where every cache is a plain KV cache, rows with drafts
    ran in batched passes, elsewhere none did."""
    model = tiny_model(family, scale=1.0)
    prompts = [PERIODIC, [t + 1 for t in PERIODIC], PERIODIC[3:]]
    wants = [reference(model, p, 32) for p in prompts]
    cfg = write_valid_config(tmp_path, model, 2, extra_cluster=f"{SPEC}\nconvoys = 1")
    async with local_ring(cfg) as rt:
        got = await asyncio.gather(
            _generate(rt, prompts[0], 32),
            _generate(rt, prompts[1], 32),
            _generate(rt, prompts[2], 32, speculate=False),
        )
        assert list(got) == wants
        engine, first = rt.engine, rt.nodes["n0"].actor
        assert engine is not None and first.model is not None
        if wide_rows(first.model):
            assert engine.speculative and first.batched_draft_rows > 0
        else:  # drafts, where the model drafts at all, ran alone
            assert first.batched_draft_rows == 0
