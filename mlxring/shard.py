"""The shard actor: runs its layer range for every request step, keeps per-request KV caches,
and on the last shard samples the next token (mlx-lm samplers and logits processors).

MLX work runs on the process's compute thread so the event loop keeps moving frames while a
shard computes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlxring import wire
from mlxring.actor import Actor
from mlxring.messages import End, Failure, Forward, Message, Probe, SamplingParams, Token
from mlxring.model import ShardModel

Send = Callable[[Message], Awaitable[None]]


class StepError(Exception):
    """A step that cannot run (unknown request, bad input); fails only that request."""


@dataclass(frozen=True)
class Reconfigure:
    """Local: the ring re-planned. Take the new layer range (or keep the model when None) and
    drop every request's caches: requests in flight have been failed at the head."""

    model: ShardModel | None = None


@dataclass(frozen=True)
class Sweep:
    """Local tick: drop the caches of requests idle for longer than the request timeout."""

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


def make_request_state(
    model: ShardModel, params: SamplingParams | None, now: float
) -> RequestState:
    st = RequestState(caches=model.make_cache(), last_used=now)
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
        st.logprobs = p.logprobs
        st.key = mx.random.key(p.seed) if p.seed is not None else None
    return st


class ShardActor(Actor[Message | Sweep | Reconfigure]):
    def __init__(
        self,
        name: str,
        model: ShardModel | None,
        send_next: Send,
        executor: Executor,
        request_timeout_s: float = 600.0,
    ) -> None:
        super().__init__(f"shard:{name}")
        self.node = name
        self.model = model
        self.send_next = send_next
        self.executor = executor
        self.request_timeout_s = request_timeout_s
        self.requests: dict[str, RequestState] = {}
        self.busy_s = 0.0
        self.steps = 0

    async def handle(self, msg: Message | Sweep | Reconfigure) -> None:
        match msg:
            case Reconfigure():
                if msg.model is not None:
                    self.model = msg.model
                self.requests.clear()
            case Forward():
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(self.executor, self._timed_step, msg)
                if out is not None:
                    await self.send_next(out)
            case End():
                self.requests.pop(msg.rid, None)
                if self.model is not None and not self.model.is_last:
                    await self.send_next(msg)
            case Failure():
                self.requests.pop(msg.rid, None)
                await self.send_next(msg)
            case Probe():
                m = self.model
                here = (self.node, m.start, m.end) if m is not None else (self.node, -1, -1)
                await self.send_next(Probe(msg.origin, msg.sent, (*msg.hops, here)))
            case Sweep():
                stale = [
                    rid
                    for rid, st in self.requests.items()
                    if msg.now - st.last_used > self.request_timeout_s
                ]
                for rid in stale:
                    self.log.warning("request_expired", rid=rid)
                    del self.requests[rid]
            case _:
                self.log.warning("unexpected_message", message=type(msg).__name__)

    async def on_error(self, msg: Message | Sweep | Reconfigure, error: Exception) -> None:
        if isinstance(msg, Forward):
            self.requests.pop(msg.rid, None)
            await self.send_next(Failure(msg.rid, f"{type(error).__name__}: {error}", self.node))

    def _timed_step(self, f: Forward) -> Message | None:
        t0 = time.perf_counter()
        try:
            return self.step(f)
        finally:
            self.busy_s += time.perf_counter() - t0
            self.steps += 1

    def step(self, f: Forward) -> Message | None:
        """One request step through this shard's layers (runs on the compute thread)."""
        model = self.model
        if model is None:
            raise StepError(f"{self.node} has not loaded its layers yet")
        if f.layer != model.start:
            raise StepError(
                f"step {f.seq} of {f.rid} is for layer {f.layer} but {self.node} holds "
                f"[{model.start}, {model.end}) (the ring re-planned)"
            )
        st = self.requests.get(f.rid)
        if st is None:
            if f.seq != 0:
                raise StepError(f"no state for request {f.rid} at step {f.seq} on {self.node}")
            st = self.requests[f.rid] = make_request_state(model, f.params, time.monotonic())
        st.last_used = time.monotonic()
        if model.is_first:
            x = mx.array([list(f.tokens)], dtype=mx.uint32)
        else:
            if f.h is None:
                raise StepError(f"step {f.seq} of {f.rid} reached {self.node} without activations")
            x = f.h if isinstance(f.h, mx.array) else wire.to_array(f.h)
        h = model(x, st.caches)
        if not model.is_last:
            mx.eval(h)
            return Forward(
                f.rid, f.seq, f.tokens, f.sample, h=h, layer=model.end, params=f.params, sent=f.sent
            )
        if st.processors:
            toks = mx.array(list(f.tokens), dtype=mx.uint32)
            st.history = toks if st.history is None else mx.concatenate([st.history, toks])
        if not f.sample:
            mx.eval([c.state for c in st.caches])
            return None
        return self._sample(f, st, model.logits(h))

    def _sample(self, f: Forward, st: RequestState, logits: mx.array) -> Token:
        for processor in st.processors:
            assert st.history is not None
            logits = processor(st.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        assert st.sampler is not None
        if st.key is not None:
            # mlx-lm's samplers draw from the global PRNG state: swap in this request's own.
            state = cast(list[mx.array], mx.random.state)
            saved = state[0]
            state[0] = st.key
            y = st.sampler(logprobs)
            mx.eval(y)
            st.key = state[0]
            state[0] = saved
        else:
            y = st.sampler(logprobs)
        token = cast(int, y.item())
        top: tuple[tuple[int, float], ...] = ()
        if st.logprobs is not None:
            row = logprobs[0]
            chosen = cast(float, row[token].item())
            if st.logprobs > 0:
                k = min(st.logprobs, row.shape[0])
                idx = mx.argpartition(-row, k - 1)[:k]
                vals = row[idx].tolist()
                top = tuple(
                    sorted(zip(idx.tolist(), vals, strict=True), key=lambda kv: -kv[1])  # type: ignore[arg-type]
                )
            return Token(f.rid, f.seq, token, chosen, top)
        return Token(f.rid, f.seq, token)
