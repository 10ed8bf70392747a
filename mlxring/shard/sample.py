"""The last shard's sampling: mlx-lm's samplers and logits processors on a step's logits, a
request's grammar mask (`grammar`), its own PRNG key when it gave a seed, and the
log-probabilities it asked for; and the verification of a step's drafts (`verify`)."""

from __future__ import annotations

import math
import time
from typing import cast

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from mlxring.protocol.messages import Failure, Forward, Message, SamplingParams, Token
from mlxring.shard.grammar import GrammarError
from mlxring.shard.state import RequestState


def _chain(p: SamplingParams, logprobs: mx.array) -> mx.array:
    """mlx-lm's filters of make_sampler's chain (top_p, min_p, top_k), row by row."""
    x = logprobs
    if 0 < p.top_p < 1:
        x = apply_top_p(x, p.top_p)
    if p.min_p:
        x = apply_min_p(x, p.min_p)
    if p.top_k > 0:
        x = apply_top_k(x, p.top_k)
    return x


def _draw(st: RequestState, logprobs: mx.array) -> tuple[mx.array, list[mx.array]]:
    """A token for each row of `logprobs` (consecutive positions), each drawn as a step of
    its own would draw it: mlx-lm's sampler (greedy, or its chain then categorical at the
    temperature) from MLX's global PRNG, or, for a request with a seed, the same chain drawn
    from its own key, split once per position so a seed gives the same text whatever else
    runs and however its positions were grouped into steps. Also the request's key after
    each row (none without a seed): the caller keeps the one after the last row it uses."""
    p = st.params
    if st.key is not None and p is not None and p.temperature > 0:
        scaled = _chain(p, logprobs) * (1 / p.temperature)
        key, keys, ys = st.key, [], []
        for i in range(logprobs.shape[0]):
            key, sub = mx.random.split(key)
            keys.append(key)
            ys.append(mx.random.categorical(scaled[i : i + 1], key=sub))
        return mx.concatenate(ys), keys
    assert st.sampler is not None
    try:
        y = st.sampler(logprobs)
        mx.eval(y)
    except Exception:
        # A failure inside mlx-lm's compiled samplers leaves the global PRNG state
        # unusable for every later request: give it a fresh one.
        mx.random.seed(time.time_ns() % (1 << 63))
        raise
    return y, []


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
    y, keys = _draw(st, logprobs)
    if keys:
        st.key = keys[0]
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
    token drawn at every position, kept while it is the draft that follows, and the first
    that is not (or the one after all of them). Each position draws as a step of its own
    would (`_draw`: its sampler, its key), so greedy output is what one position at a time
    gives, and sampled output is the speculative-sampling rule (Leviathan et al., Chen et
    al.) for drafts that are certain (q one-hot at the draft d): the draw y at a position is
    d with probability p(d), the rule's acceptance min(1, p(d)/q(d)); a y that is not d is
    drawn from p without d, renormalized, the rule's residual max(p - q, 0). The output's
    distribution is normal sampling's, and a seeded request's text does not depend on which
    positions were drafted (up to the last bits of logits computed in steps of other
    lengths, as for greedy text). The logit bias applies as in `sample`; requests with other
    processors, a grammar or logprobs are not drafted for (the screen refuses them:
    `checks.drafts`)."""
    rows = logits[0]
    for processor in st.processors:  # a logit bias: the same at every position
        assert st.history is not None
        rows = processor(st.history, rows)
    logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    y, keys = _draw(st, logprobs)
    ys = cast(list[int], y.tolist())
    drafts = f.tokens[1:]
    n = 0
    while n < len(drafts) and ys[n] == drafts[n]:
        n += 1
    if keys:  # the positions after the last token used draw again in later steps
        st.key = keys[n]
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
