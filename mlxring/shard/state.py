"""What a shard keeps per request between its steps (KV caches, sampler, token history), and
the local messages that change a shard's state from outside the ring (a re-plan, a sweep)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlxring.model.sharded import ShardModel
from mlxring.protocol.messages import SamplingParams
from mlxring.shard.grammar import GrammarError, Grammars, Matcher

if TYPE_CHECKING:  # shard.prefix reads cache_bytes from here
    from mlxring.shard.prefix import Start


@dataclass(frozen=True)
class Reconfigure:
    """Local: the ring re-planned. Take the new layer range (or keep the model when None) and
    drop every request's caches: requests in flight have been failed at the head. `stages` is
    how many parts of the ring compute at the same time (processes, one per machine).
    `next_local`: the next node of the ring is in this process, so a step's output is computed
    on by this process's thread next, and building a step ahead would only delay it."""

    model: ShardModel | None = None
    stages: int = 1
    next_local: bool = False


@dataclass(frozen=True)
class Sweep:
    """Local tick: drop the caches of requests idle for longer than the request timeout, and
    MLX's buffer cache when no request is left."""

    now: float


@dataclass
class RequestState:
    caches: list[Any]
    last_used: float
    sampler: Callable[[mx.array], mx.array] | None = None
    processors: list[Callable[[mx.array, mx.array], mx.array]] = field(default_factory=list)
    history: mx.array | None = None
    logprobs: int | None = None
    key: mx.array | None = None  # per-request PRNG state when a seed was given
    params: SamplingParams | None = None
    grammar: Matcher | None = None  # where its output is in its grammar, when it has one
    kv_bytes: int = 0  # its KV caches' bytes after its last step (in a convoy: its share)
    positions: int = 0  # tokens it has had through this shard
    # The last shard keeps `history` (its processors read it; a prompt-cache entry made of
    # this request gives it to a later one whose processors do).
    remembers: bool = False

    def arrays(self) -> list[Any]:
        """Every array this request keeps between steps."""
        kept = [c.state for c in self.caches]
        return kept + [a for a in (self.history, self.key) if a is not None]

    def remember(self, tokens: tuple[int, ...]) -> None:
        """Add a step's tokens to the history that the logits processors look at."""
        toks = mx.array(list(tokens), dtype=mx.uint32)
        self.history = toks if self.history is None else mx.concatenate([self.history, toks])


def drop_positions(st: RequestState, n: int) -> None:
    """Drop a request's last `n` positions here (drafts the model did not agree with): its
    caches', and its history's on the last shard."""
    if not can_trim_prompt_cache(st.caches) or n > st.positions:
        raise ValueError(f"cannot drop {n} of {st.positions} positions from these caches")
    trim_prompt_cache(st.caches, n)
    forget_positions(st, n)


def forget_positions(st: RequestState, n: int) -> None:
    """Take a request's last `n` positions off its count and its history (its caches, or its
    convoy's merged ones, have dropped them)."""
    st.positions -= n
    if st.history is not None:
        st.history = st.history[:-n]


def cache_bytes(caches: list[Any]) -> int:
    """Bytes held by `caches` (a cache kind that cannot say counts as empty)."""
    total = 0
    for c in caches:
        try:
            total += int(c.nbytes)
        except (AttributeError, NotImplementedError, TypeError):
            continue
    return total


def make_request_state(
    model: ShardModel,
    params: SamplingParams | None,
    now: float,
    grammars: Grammars | None = None,
    start: Start | None = None,
    remember: bool = False,
) -> RequestState:
    """A new request's state, on fresh caches or on a prompt-cache entry's copy (`start`); on
    the last shard its sampler, processors and grammar matcher (`grammars`: the process's,
    None where it has no tokenizer); `remember`: keep the token history even without
    processors."""
    if start is None:
        st = RequestState(caches=model.make_cache(), last_used=now)
    else:
        st = RequestState(start.caches, now, history=start.history, positions=start.positions)
    if model.is_last:
        p = params or SamplingParams()
        st.sampler = make_sampler(temp=p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
        st.processors = make_logits_processors(
            logit_bias=dict(p.logit_bias) or None,
            repetition_penalty=p.repetition_penalty,
            repetition_context_size=p.repetition_context_size,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
        st.remembers = remember or bool(st.processors)
        st.logprobs = p.logprobs
        st.key = mx.random.key(p.seed) if p.seed is not None else None
        st.params = p
        if p.grammar is not None:
            if grammars is None:
                raise GrammarError("this shard has no tokenizer to run a grammar with")
            st.grammar = grammars.matcher(p.grammar)
    return st
