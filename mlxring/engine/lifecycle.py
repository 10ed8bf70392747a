"""The head's request lifecycle: prefill a prompt around the ring in chunks, then decode one
token per trip until EOS, a stop token or max_tokens; tokens come out as an async iterator.

The step schedule is mlx-lm's own (`generate_step`): the prompt but its last token in chunks,
then the last token alone, then one token at a time, so greedy output is bit-identical to
mlx-lm on one machine (with `prefill_step_size` equal to our chunk size).

With `one_convoy` (the config's `convoys = 1`), a request's next decode step waits until every
other decoding request's token is back, so that all go around as one wide pass, as mlx-lm's
batch generator steps them: where the shards share one accelerator, one pass of 16 rows costs
about what one of 5 does, and passes of several convoys cannot run at once anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from mlxring.aio import wait_for
from mlxring.engine.prefix import Hit, PrefixIndex
from mlxring.engine.speculate import Drafter, DraftSource
from mlxring.protocol.messages import End, Failure, Forward, Message, SamplingParams, Token

log = structlog.get_logger()


class RingEntry(Protocol):
    """Where the head's messages enter the ring: its own node, the first shard."""

    async def enter(self, msg: Message) -> None:
        """Hand `msg` to the first shard, as if it had arrived there."""


class RingUnavailable(Exception):
    """The ring cannot serve this request (a node is down, a step failed or timed out)."""


class CacheMissed(RingUnavailable):
    """A shard no longer holds the prompt-cache entry the request started from."""


@dataclass(frozen=True)
class GeneratedToken:
    token: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]
    finish_reason: str | None  # "stop" | "length" | None while generating
    cached: int = 0  # the first token's: prompt tokens the ring's prompt cache gave


class Engine:
    """One head's requests: each prompt's steps sent into the ring at `entry`, each returning
    token handed back to the request that waits for it."""

    def __init__(
        self,
        entry: RingEntry,
        eos_token_ids: Iterable[int],
        prefill_chunk: int = 512,
        step_timeout_s: float = 30.0,
        one_convoy: bool = False,
        prompt_cache: bool = False,
        speculative: bool = False,
        drafts: DraftSource | None = None,
    ) -> None:
        self._entry = entry
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_chunk = prefill_chunk
        self.step_timeout_s = step_timeout_s
        self._streams: dict[str, asyncio.Queue[Token | Failure]] = {}
        self.tokens_generated = 0
        self.trip_s: list[float] = []  # recent head-to-head times of decode steps
        self.hop_s: list[float] = []  # recent network latencies of one hop of a decode step
        self._step_sent: dict[str, float] = {}  # when each request's decode step left
        self.one_convoy = one_convoy
        # One convoy: requests whose sampled step is out (or whose token is not handled yet),
        # and the steps waiting for them to go along.
        self._out: set[str] = set()
        self._ready: list[Forward] = []
        self._flushed = asyncio.Event()
        # What the shards keep of finished requests, for prompts that start the same way.
        self.prefixes = PrefixIndex() if prompt_cache else None
        self.cache_hits = 0  # requests that started from an entry
        self.cache_misses = 0  # ... whose entry a shard no longer held
        self.cache_tokens = 0  # prompt tokens the entries gave
        # Prompt-lookup speculation (engine/speculate.py), for requests whose sampling allows.
        self.speculative = speculative
        self.drafts = drafts  # a draft model's drafts (engine/draft.py), where there is one
        # Requests that time their steps (speculating ones), and when their token came.
        self._timed: set[str] = set()
        self._arrived: dict[str, float] = {}
        self.drafted = 0  # tokens drafted
        self.accepted = 0  # ... that the model agreed with

    @property
    def active(self) -> int:
        return len(self._streams)

    def deliver(self, msg: Token | Failure) -> None:
        """A token or failure for one of our requests came back around the ring."""
        sent = self._step_sent.pop(msg.rid, None)
        if sent is not None and isinstance(msg, Token):
            trip = time.perf_counter() - sent
            _keep(self.trip_s, trip)
            if msg.hops:  # see mlxring/ring/hoptime.py
                _keep(self.hop_s, (trip - msg.spent) / msg.hops)
        q = self._streams.get(msg.rid)
        if q is not None:
            q.put_nowait(msg)
            if msg.rid in self._timed:
                self._arrived[msg.rid] = time.perf_counter()

    def fail_all(self, reason: str) -> None:
        """The ring broke: every request in flight ends now with this reason (and the prompt
        cache is forgotten: a re-plan drops it on the shards)."""
        if self.prefixes is not None:
            self.prefixes.clear()
        for rid, q in self._streams.items():
            q.put_nowait(Failure(rid, reason, "ring"))

    async def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        max_tokens: int = 256,
        stop_token_ids: Iterable[int] = (),
        rid: str | None = None,
        ignore_eos: bool = False,
        speculate: bool = True,
        cache_prompt: bool = True,
    ) -> AsyncIterator[GeneratedToken]:
        """The request's tokens as they come; `speculate`: draft tokens for it where the
        engine speculates and its sampling allows (no penalties, grammar or logprobs);
        `cache_prompt`: start from the prompt cache and leave an entry in it."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if max_tokens < 1:
            return
        rid = rid or uuid.uuid4().hex[:16]
        params = params or SamplingParams()
        stops = frozenset(stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)
        prefixes = self.prefixes if cache_prompt else None
        hit = prefixes.match(prompt) if prefixes is not None else None
        sent = list(prompt)  # the tokens the shards computed on: what they can keep
        # Positions the shards hold past `sent` that no step in flight drops (the last step's
        # rejected drafts, when no step follows): End drops them.
        trim = 0
        drafts: list[int] = []
        ended = False  # the request ran to its end (or its reader left): no step failed
        q = self._open(rid)
        try:
            try:
                seq, msg = await self._start(rid, q, prompt, params, hit)
            except CacheMissed as e:
                assert hit is not None and self.prefixes is not None
                log.info("prompt_cache_miss", rid=rid, reason=str(e))
                self.prefixes.discard(hit.eid)
                self.cache_misses += 1
                await self._end(End(rid, "cache_miss"))
                # Anew, under another id: late failures of the first start go nowhere.
                self._close(rid)
                rid, hit = f"{rid}-full", None
                q = self._open(rid)
                seq, msg = await self._start(rid, q, prompt, params, None)
            cached = 0
            if hit is not None:
                self.cache_hits += 1
                cached = hit.positions
                self.cache_tokens += cached
            # Not in the convoy yet: the others must not wait for a prompt still prefilling.
            # Its first token's step waits for them, and from then on they go together.
            drafter = (
                Drafter(rid=rid, source=self.drafts)
                if self.speculative and speculate and self._speculable(params)
                else None
            )
            if drafter is not None:
                self._timed.add(rid)
            history = list(prompt)  # the prompt and the answer so far: what drafts copy
            n = 0
            fed = 0  # positions that step gave the shards (0: the prompt's, all kept)
            sent_at = 0.0  # when that step left
            while True:
                if n:
                    msg = await self._next(q, rid)
                got = [msg.token, *msg.more]
                if drafter is not None and fed:
                    step_s = self._arrived.pop(rid, time.perf_counter()) - sent_at
                    drafter.took(len(drafts), len(got) - 1, step_s)
                    self.drafted += len(drafts)
                    self.accepted += len(got) - 1
                out: list[tuple[int, str | None]] = []
                for t in got:
                    n += 1
                    finish = "stop" if t in stops else "length" if n >= max_tokens else None
                    out.append((t, finish))
                    if finish is not None:
                        break
                self.tokens_generated += len(out)
                history += [t for t, _ in out]
                # The shards hold the step's inputs; those after the last token used (drafts
                # the model rejected, or past the end) go at the next step or at End.
                trim = fed - len(out) if fed else 0
                del sent[len(sent) - trim :]
                finish = out[-1][1]
                drafts, fed = [], 0
                if finish is None:
                    # The next step leaves before these tokens are handed out, so the ring
                    # computes while the client writes.
                    seq += 1
                    last = out[-1][0]
                    if drafter is not None:
                        drafts = await drafter.next(history, max_tokens - n - 1)
                    fed = 1 + len(drafts)
                    sent += [last, *drafts]
                    step = Forward(rid, seq, (last, *drafts), True, draft=len(drafts), trim=trim)
                    trim = 0  # the step carries it: End must not drop it again
                    sent_at = time.perf_counter()
                    # With drafts to verify or a trim too, a convoy's step: shards whose
                    # caches take rows of several positions run it in the convoy's pass
                    # (`shard.convoys.wide_rows`), others alone as it comes.
                    await self._decode_step(step)
                else:
                    await self._leave_convoy(rid)
                    ended = True
                for i, (t, fin) in enumerate(out):
                    first = n - len(out) + i == 0
                    yield GeneratedToken(
                        t,
                        msg.logprob if i == 0 else 0.0,
                        msg.top_logprobs if i == 0 else (),
                        fin,
                        cached if first else 0,
                    )
                if finish is not None:
                    return
        except GeneratorExit:
            # The reader stopped (a stop string, a client gone): the steps are good, but one
            # with drafts in flight leaves the shards holding what is not known yet.
            ended = not drafts
            raise
        finally:
            self._close(rid)
            await self._leave_convoy(rid)
            keep = 0
            drop: tuple[str, ...] = ()
            if ended and prefixes is not None and len(sent) >= prefixes.min_reuse:
                keep, drop = len(sent), prefixes.add(rid, sent)
            await self._end(End(rid, keep=keep, drop=drop, trim=trim))

    @staticmethod
    def _speculable(p: SamplingParams) -> bool:
        """Whether drafts can be verified for a request sampling with `p`: nothing whose
        logits depend on the tokens before each position (penalties, a grammar), no logprobs
        (shard.checks refuses others); greedy or sampled, a logit bias or not."""
        return (
            not p.repetition_penalty
            and not p.presence_penalty
            and not p.frequency_penalty
            and p.grammar is None
            and p.logprobs is None
        )

    def _open(self, rid: str) -> asyncio.Queue[Token | Failure]:
        q: asyncio.Queue[Token | Failure] = asyncio.Queue()
        self._streams[rid] = q
        return q

    def _close(self, rid: str) -> None:
        self._streams.pop(rid, None)
        self._step_sent.pop(rid, None)
        self._timed.discard(rid)
        self._arrived.pop(rid, None)
        if self.drafts is not None:
            self.drafts.release(rid)

    async def _end(self, end: End) -> None:
        try:
            await self._entry.enter(end)
        except Exception as e:  # noqa: BLE001 - the ring may be down; caches expire anyway
            log.warning("end_not_sent", rid=end.rid, error=str(e))

    async def _start(
        self,
        rid: str,
        q: asyncio.Queue[Token | Failure],
        prompt: Sequence[int],
        params: SamplingParams,
        hit: Hit | None,
    ) -> tuple[int, Token]:
        """Prefill `prompt` (from `hit`'s entry: only the tokens after it) and wait for its
        first token; the step number it came with."""
        skip = hit.positions if hit is not None else 0
        head = list(prompt[skip:-1])
        steps = [
            Forward(rid, seq, tuple(head[i : i + self.prefill_chunk]), False)
            for seq, i in enumerate(range(0, len(head), self.prefill_chunk))
        ]
        steps.append(Forward(rid, len(steps), (prompt[-1],), True))
        # The first step carries what every shard needs once: the sampling parameters, and
        # the entry to start from.
        steps[0] = replace(
            steps[0],
            params=params,
            reuse=hit.eid if hit is not None else "",
            reused=skip,
        )
        for f in steps:
            await self._step(f)
        seq = steps[-1].seq
        return seq, await self._next(q, rid)

    async def _decode_step(self, f: Forward) -> None:
        if not self.one_convoy:
            self._step_sent[f.rid] = time.perf_counter()
            await self._step(f)
            return
        self._ready.append(f)
        self._out.discard(f.rid)
        if self._out:
            # Wait for the others' tokens, but not longer than about one trip: a request whose
            # client reads slowly, or whose prompt is still prefilling, joins a later pass.
            flushed = self._flushed
            wait = min(0.1, 2 * self.trip_s[-1]) if self.trip_s else 0.1
            with contextlib.suppress(TimeoutError):
                await wait_for(flushed.wait(), wait)
            if flushed.is_set():
                return
        await self._flush()

    async def _leave_convoy(self, rid: str) -> None:
        """`rid` sends no more steps: the others need not wait for it."""
        if rid not in self._out and not any(f.rid == rid for f in self._ready):
            return
        self._out.discard(rid)
        self._ready = [f for f in self._ready if f.rid != rid]
        if self._ready and not self._out:
            await self._flush()

    async def _flush(self) -> None:
        """Send the steps that waited for each other, back to back (the first shard takes them
        as one pass)."""
        ready, self._ready = self._ready, []
        flushed, self._flushed = self._flushed, asyncio.Event()
        flushed.set()
        self._out.update(f.rid for f in ready)
        # Shielded: the others' steps still go if the request that sends them is cancelled.
        await asyncio.shield(self._send_all(ready))

    async def _send_all(self, steps: list[Forward]) -> None:
        for f in steps:
            self._step_sent[f.rid] = time.perf_counter()
            try:
                await self._entry.enter(f)
            except Exception as e:  # noqa: BLE001 - the ring is down: fail the step's request
                q = self._streams.get(f.rid)
                if q is not None:
                    q.put_nowait(Failure(f.rid, f"cannot reach the first shard: {e}", "ring"))

    async def _step(self, f: Forward) -> None:
        try:
            await self._entry.enter(f)
        except Exception as e:  # noqa: BLE001 - any send failure means the ring is down
            raise RingUnavailable(f"cannot reach the first shard: {e}") from None

    async def _next(self, q: asyncio.Queue[Token | Failure], rid: str) -> Token:
        try:
            msg = await wait_for(q.get(), self.step_timeout_s)
        except TimeoutError:
            raise RingUnavailable(
                f"no token came back within {self.step_timeout_s:g} s (request {rid})"
            ) from None
        if isinstance(msg, Failure):
            where = f" on {msg.origin}" if msg.origin else ""
            error = CacheMissed if msg.kind == "cache_miss" else RingUnavailable
            raise error(f"request {rid} failed{where}: {msg.message}")
        return msg


def _keep(samples: list[float], x: float) -> None:
    """Append to a list of recent samples that stays short."""
    samples.append(x)
    if len(samples) > 1024:
        del samples[:512]
