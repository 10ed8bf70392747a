"""Speculative sampling (temperature > 0): the last shard's rule for drafts, checked against
the exact distribution of plain sampling, and end to end through a ring.

The rule's output must be distributed exactly as one position at a time: the unit tests draw
thousands of steps through `verify` on fixed logits (real mlx arrays, mlx-lm's sampler chain)
and compare what comes out with the distribution worked out here in numpy from the same
logits, its own reading of mlx-lm's filters; a rule that resampled from p on a rejection, or
kept a draft more often than p(draft), is off by far more than the tolerance."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlxring.engine.lifecycle import Engine
from mlxring.protocol.messages import Forward, SamplingParams, Token
from mlxring.shard.checks import drafts
from mlxring.shard.sample import sample, verify
from mlxring.shard.state import RequestState

from .ringutil import loaded, local_ring, reference, tiny_model, write_valid_config
from .test_speculate import PERIODIC, SPEC, generate

# Three positions of an 8-token vocabulary: row i is the distribution after the step's i-th
# input (the last token, then the drafts).
LOGITS = np.array(
    [
        [3.0, 2.2, 1.5, 1.0, 0.2, -1.0, -2.0, -3.0],
        [0.5, 2.0, 1.8, 0.0, 1.2, -0.5, -4.0, 0.3],
        [1.0, 1.0, 0.5, 2.5, -1.0, 0.0, 0.7, -2.0],
    ]
)
DRAWS = 2000


def state(p: SamplingParams) -> RequestState:
    """A last shard's state of a request sampling with `p`, as make_request_state makes it."""
    return RequestState(
        caches=[],
        last_used=0.0,
        sampler=make_sampler(temp=p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k),
        processors=make_logits_processors(logit_bias=dict(p.logit_bias) or None),
        params=p,
        key=mx.random.key(p.seed) if p.seed is not None else None,
        history=mx.array([9], dtype=mx.uint32),  # the last shard remembers with processors
    )


def step(tokens: tuple[int, ...]) -> Forward:
    return Forward("r", 1, tokens, True, draft=len(tokens) - 1)


def exact(p: SamplingParams) -> np.ndarray:
    """Each row's distribution under plain sampling with `p`, in float64: the logit bias,
    then mlx-lm's filters on the log-probabilities (top_p keeps a token while the mass of
    the tokens above it is below top_p; min_p keeps those within min_p of the top; top_k
    the k likeliest), then the softmax at the temperature."""
    x = LOGITS.copy()
    for t, b in p.logit_bias:
        x[:, t] += b
    out = []
    for row in x:
        lp = row - np.log(np.exp(row).sum())
        probs = np.exp(lp)
        keep = np.ones_like(row, dtype=bool)
        if 0 < p.top_p < 1:
            keep &= np.array([probs[probs > q].sum() < p.top_p for q in probs])
        if p.min_p:
            keep &= probs >= probs.max() * p.min_p
        if p.top_k:
            keep &= np.argsort(np.argsort(-lp)) < p.top_k
        z = np.where(keep, lp / p.temperature, -np.inf)
        out.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
    return np.array(out)


def outcomes(q: np.ndarray, d: tuple[int, int]) -> dict[tuple[int, ...], float]:
    """The exact chance of each run of tokens one step with drafts `d` gives: a first token
    that is not d0 ends it; after d0, a second that is not d1 ends it; after both, a third."""
    chances: dict[tuple[int, ...], float] = {}
    v = q.shape[1]
    for a in range(v):
        if a != d[0]:
            chances[(a,)] = q[0, a]
    for b in range(v):
        if b != d[1]:
            chances[(d[0], b)] = q[0, d[0]] * q[1, b]
    for c in range(v):
        chances[(d[0], d[1], c)] = q[0, d[0]] * q[1, d[1]] * q[2, c]
    return chances


def close(seen: Counter[tuple[int, ...]], want: dict[tuple[int, ...], float], n: int) -> None:
    """Every outcome's frequency within 4.5 standard errors of its chance (none where the
    chance is 0: a token the filters drop never comes)."""
    for k in set(seen) | set(want):
        w, got = want.get(k, 0.0), seen[k] / n
        assert abs(got - w) <= 4.5 * math.sqrt(w * (1 - w) / n) + 1e-12, (k, got, w)


def draw(p: SamplingParams, d: tuple[int, int], n: int = DRAWS) -> Counter[tuple[int, ...]]:
    """What `n` steps with drafts `d` emit, one request's steps in a row (its key, when it has
    one, advancing as it does through a request)."""
    st = state(p)
    logits = mx.array(LOGITS, dtype=mx.float32)[None]
    seen: Counter[tuple[int, ...]] = Counter()
    for _ in range(n):
        t = verify(step((9, *d)), st, logits)
        seen[(t.token, *t.more)] += 1
    return seen


CASES = [
    # a likely first draft (0: p 0.67) and a second that top_p drops (5: p 0)
    (SamplingParams(temperature=0.7, top_p=0.9, seed=7), (0, 5)),
    # an unlikely first draft (3: p 0.10), a likelier second (1: p 0.31); min_p and top_k;
    # no seed: MLX's global PRNG
    (SamplingParams(temperature=1.3, min_p=0.05, top_k=6), (3, 1)),
    # a logit bias that makes token 4 likely (p 0.30 first), an unlikely second draft (7: p 0.017)
    (SamplingParams(temperature=0.9, top_p=0.95, logit_bias=((4, 2.5),), seed=3), (4, 7)),
]


@pytest.mark.parametrize(("params", "d"), CASES)
def test_what_drafted_steps_emit_is_distributed_as_plain_sampling(
    params: SamplingParams, d: tuple[int, int]
) -> None:
    mx.random.seed(11)
    q = exact(params)
    want = outcomes(q, d)
    seen = draw(params, d)
    close(seen, want, DRAWS)
    # The first token's and the first two tokens' distributions in particular.
    first: Counter[tuple[int, ...]] = Counter()
    pair: Counter[tuple[int, ...]] = Counter()
    for k, c in seen.items():
        first[k[:1]] += c
        if len(k) > 1:
            pair[k[:2]] += c
    close(first, {(a,): q[0, a] for a in range(q.shape[1])}, DRAWS)
    close(pair, {(d[0], b): q[0, d[0]] * q[1, b] for b in range(q.shape[1])}, DRAWS)


def plain_token(st: RequestState, logits: mx.array) -> int:
    t = sample(step((9,)), st, logits)
    assert isinstance(t, Token)
    return t.token


def test_a_seeded_request_draws_each_position_as_a_plain_step_would() -> None:
    """With a seed, the tokens of a step with drafts are those that steps of one position
    would draw from the same logits, and the key after it is theirs: the text does not
    depend on which positions were drafted (drafting pauses with timing)."""
    p = SamplingParams(temperature=1.0, seed=5)
    logits = mx.array(LOGITS, dtype=mx.float32)
    for seed in range(20):
        plain, spec = state(p), state(p)
        plain.key = spec.key = mx.random.key(seed)
        one = [plain_token(plain, logits[i : i + 1]) for i in range(3)]
        # Drafts that agree with the first plain token, not the second: two tokens come.
        t = verify(step((9, one[0], (one[1] + 1) % 8)), spec, logits[None])
        assert (t.token, *t.more) == (one[0], one[1])
        # The key after the step is that after two plain steps: the next draw agrees.
        assert plain_token(spec, logits[2:3]) == one[2]
        assert (spec.key == plain.key).all().item()


def test_only_what_every_position_can_verify_drafts() -> None:
    """A temperature and a logit bias draft; penalties, a grammar and logprobs do not (their
    logits depend on the tokens before each position, or they need a logprob per token)."""
    f = step((1, 2, 3))
    ok = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(temperature=0.7, logit_bias=((3, 1.0),)),
        SamplingParams(temperature=0.7, repetition_penalty=0.0),  # mlx-lm: no processor
    ]
    refused = [
        SamplingParams(temperature=0.7, repetition_penalty=1.1),
        SamplingParams(presence_penalty=0.5, logit_bias=((3, 1.0),)),
        SamplingParams(temperature=0.7, frequency_penalty=0.5),
        SamplingParams(temperature=0.7, logprobs=0),
    ]
    for p in ok:
        st = state(p)
        st.positions = 10
        assert drafts(f, st, last=True) is None, p
        assert Engine._speculable(p), p
    for p in refused:
        st = state(p)
        st.positions = 10
        st.processors = make_logits_processors(
            logit_bias=dict(p.logit_bias) or None,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
        st.logprobs = p.logprobs
        assert drafts(f, st, last=True) is not None, p
        assert not Engine._speculable(p), p
    assert not Engine._speculable(SamplingParams(grammar="{}"))


def biased_reference(model: Path, prompt: list[int], n: int, bias: dict[int, float]) -> list[int]:
    """mlx-lm's greedy generation with a logit bias, up to EOS (as `reference`)."""
    m, tok = loaded(model)
    out = []
    for t, _ in generate_step(
        mx.array(prompt), m, max_tokens=n, logits_processors=make_logits_processors(bias)
    ):
        if t in tok.eos_token_ids:
            break
        out.append(int(t))
    return out


async def test_sampled_requests_draft_and_a_seed_repeats_through_the_ring(tmp_path: Path) -> None:
    """Through a ring of three nodes with speculation on: sampled requests are drafted for
    and keep drafts; a seeded request gives the same text twice, and the same as with
    speculation off; greedy output stays mlx-lm's, with a logit bias too."""
    model = tiny_model("qwen3", scale=1.5)  # sampled text that varies and repeats
    want = reference(model, PERIODIC, 40)
    cfg = write_valid_config(tmp_path, model, 3, extra_cluster=SPEC)
    p = SamplingParams(temperature=0.7, top_p=0.9, seed=1234)
    async with local_ring(cfg) as rt:
        engine = rt.engine
        assert engine is not None and engine.speculative
        first = await generate(rt, PERIODIC, 48, params=p)
        assert engine.drafted > 0 and engine.accepted > 0
        assert await generate(rt, PERIODIC, 48, params=p) == first
        other = await generate(rt, PERIODIC, 48, params=replace(p, seed=99))
        assert other != first  # the text is the seed's, not the same whatever it is
        drafted = engine.drafted
        assert await generate(rt, PERIODIC, 48, params=p, speculate=False) == first
        assert engine.drafted == drafted
        unseeded = SamplingParams(temperature=0.7, top_p=0.9)
        assert await generate(rt, PERIODIC, 32, params=unseeded)
        assert engine.drafted > drafted
        assert await generate(rt, PERIODIC, 40) == want
        # A logit bias drafts, and greedy output with it is mlx-lm's with the same bias.
        bias = ((want[3], 1.5),)
        drafted = engine.drafted
        got = await generate(rt, PERIODIC, 40, params=SamplingParams(logit_bias=bias))
        assert got == biased_reference(model, PERIODIC, 40, dict(bias))
        assert got != want and engine.drafted > drafted
