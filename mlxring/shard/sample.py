"""The last shard's sampling: mlx-lm's samplers and logits processors on a step's logits, a
request's grammar mask (`grammar`), its own PRNG key when it gave a seed, and the
log-probabilities it asked for."""

from __future__ import annotations

import math
import time
from typing import cast

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from mlxring.protocol.messages import Failure, Forward, Message, SamplingParams, Token
from mlxring.shard.grammar import GrammarError
from mlxring.shard.state import RequestState


def _seeded(st: RequestState, p: SamplingParams, logprobs: mx.array) -> mx.array:
    """mlx-lm's sampling chain (top_p, min_p, top_k, then categorical at the temperature)
    drawn from the request's own key, so a seed gives the same text whatever else runs."""
    x = logprobs
    if 0 < p.top_p < 1:
        x = apply_top_p(x, p.top_p)
    if p.min_p:
        x = apply_min_p(x, p.min_p)
    if p.top_k > 0:
        x = apply_top_k(x, p.top_k)
    assert st.key is not None
    st.key, sub = mx.random.split(st.key)
    return mx.random.categorical(x * (1 / p.temperature), key=sub)


def sample(f: Forward, st: RequestState, logits: mx.array) -> Token | Failure:
    """The token of one request's step (its history already holds the step's tokens); a
    Failure of its request alone when its grammar cannot go on."""
    for processor in st.processors:
        assert st.history is not None
        logits = processor(st.history, logits)
    if st.grammar is not None:
        if (why := st.grammar.error()) is not None:
            return Failure(f.rid, f"GrammarError: {why}")
        logits = st.grammar(st.history, logits)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    assert st.sampler is not None
    if st.key is not None and st.params is not None and st.params.temperature > 0:
        y = _seeded(st, st.params, logprobs)
    else:
        try:
            y = st.sampler(logprobs)
            mx.eval(y)
        except Exception:
            # A failure inside mlx-lm's compiled samplers leaves the global PRNG state
            # unusable for every later request: give it a fresh one.
            mx.random.seed(time.time_ns() % (1 << 63))
            raise
    token = cast(int, y.item())
    if st.grammar is not None:
        try:
            st.grammar.advance(token)
        except GrammarError as e:
            return Failure(f.rid, f"GrammarError: {e}")
    top: tuple[tuple[int, float], ...] = ()
    if st.logprobs is not None:
        row = logprobs[0]
        chosen = cast(float, row[token].item())
        if st.logprobs > 0:
            k = min(st.logprobs, row.shape[0])
            idx = mx.argpartition(-row, k - 1)[:k]
            ids = cast(list[int], idx.tolist())
            vals = cast(list[float], row[idx].tolist())
            # Tokens masked out (a grammar's) have no chance at all: not alternatives.
            pairs = [(i, v) for i, v in zip(ids, vals, strict=True) if v > -math.inf]
            top = tuple(sorted(pairs, key=lambda kv: -kv[1]))
        return Token(f.rid, f.seq, token, chosen, top, f.spent, f.hops)
    return Token(f.rid, f.seq, token, spent=f.spent, hops=f.hops)


def verify(f: Forward, st: RequestState, logits: mx.array) -> Token:
    """A step with drafts (`f.tokens`: the last token, then `f.draft` drafted ones): the
    model's greedy token at every position, kept while it agrees with the draft that follows,
    and the first that does not (or the one after all of them): what one position at a time
    would have given. Greedy requests without processors, grammar or logprobs only (the
    head drafts for no others; the screen refuses a draft step of one)."""
    ys = cast(list[int], mx.argmax(logits[0], axis=-1).tolist())
    drafts = f.tokens[1:]
    n = 0
    while n < len(drafts) and ys[n] == drafts[n]:
        n += 1
    return Token(f.rid, f.seq, ys[0], spent=f.spent, hops=f.hops, more=tuple(ys[1 : n + 1]))


def sample_rows(rows: list[Forward], states: list[RequestState], logits: mx.array) -> list[Message]:
    """The tokens of a batched pass's rows: greedy rows in one argmax, others (a grammar's
    among them, each masked by its own) one by one."""
    for r, st in zip(rows, states, strict=True):
        if st.remembers:
            st.remember(r.tokens)
    if all(
        st.sampler is greedy_sampler
        and not st.processors
        and st.grammar is None
        and st.logprobs is None
        for st in states
    ):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = cast(list[int], mx.argmax(logprobs, axis=-1).tolist())
        return [
            Token(r.rid, r.seq, t, spent=r.spent, hops=r.hops)
            for r, t in zip(rows, tokens, strict=True)
        ]
    return [
        sample(r, st, logits[i : i + 1]) for i, (r, st) in enumerate(zip(rows, states, strict=True))
    ]
