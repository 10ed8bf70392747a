"""The shard actor: takes each message for its node in turn, runs request steps through its
`Stepper` (decode steps on the event loop's thread, prompt chunks on the compute thread:
`compute` says why), gathers waiting decode steps into one pass, forwards what comes out to the
next node, and fails the requests whose step failed. While the shard's requests are around the
ring, the process's backend (`backends`) may build their next decode step: the actor lands it
when its input comes and gives it back when something else comes first.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import mlx.core as mx

from mlxring.backends.base import Backend, Built
from mlxring.backends.plain import Plain
from mlxring.model.sharded import ShardModel
from mlxring.protocol.messages import (
    End,
    Failure,
    Forward,
    ForwardBatch,
    Message,
    NodeStats,
    Probe,
    Send,
    rows_of,
)
from mlxring.shard.compute import Compute
from mlxring.shard.convoys import DecodePick, convoy_rows, is_prompt_chunk, rids_in, rows_in
from mlxring.shard.grammar import Grammars
from mlxring.shard.mailbox import Actor
from mlxring.shard.prefix import CacheMiss
from mlxring.shard.state import Reconfigure, Sweep
from mlxring.shard.step import BatchError, Stepper

T = TypeVar("T")


class ShardActor(Actor[Message | Sweep | Reconfigure]):
    def __init__(
        self,
        name: str,
        model: ShardModel | None,
        send_next: Send,
        compute: Compute,
        request_timeout_s: float = 600.0,
        max_batch: int = 32,
        total_memory: int = 0,
        backend: Backend | None = None,  # the process's (`backends.pick`); plain by default
        max_requests: int = 1024,  # requests with KV state at once; new ones beyond fail
        kv_cache_gb: float | None = None,  # KV bytes they may hold (None: `checks.kv_bound`)
        grammars: Grammars | None = None,  # the process's, for requests with a grammar
        prompt_cache_gb: float | None = None,  # kept prompts' bytes (None: `Stepper`'s)
    ) -> None:
        super().__init__(f"shard:{name}")
        self.node = name
        self.backend: Backend = backend or Plain()
        self.stepper = Stepper(
            name,
            model,
            self.backend,
            max_requests,
            kv_cache_gb,
            total_memory,
            grammars,
            prompt_cache_gb,
        )
        self.requests = self.stepper.requests  # the same dict and convoys, for short
        self.convoys = self.stepper.convoys
        self.send_next = send_next
        self.compute = compute
        self.request_timeout_s = request_timeout_s
        self.max_batch = max_batch
        self.total_memory = total_memory
        self.stages = 1
        self.next_local = False
        self._chunk_waited = False  # the prompt chunk in front has let decode steps pass once
        self._built: Built | None = None  # the next decode step, built by the backend
        self.busy_s = 0.0
        self.steps = 0
        self.decode_busy_s = 0.0  # of busy_s, steps of one token per request (decode)
        self.decode_steps = 0

    # What the stepper holds, read by the runtime and the metrics.
    @property
    def model(self) -> ShardModel | None:
        return self.stepper.model

    @property
    def batches(self) -> int:
        return self.stepper.batches

    @property
    def batched_rows(self) -> int:
        return self.stepper.batched_rows

    @property
    def batched_draft_rows(self) -> int:
        return self.stepper.batched_draft_rows

    async def handle(self, msg: Message | Sweep | Reconfigure) -> None:
        built, self._built = self._built, None  # only the very next message may use it
        if isinstance(msg, Forward | ForwardBatch):
            await self._forward(msg, built)
            return
        if built is not None:
            await self.backend.give_back(built)
        match msg:
            case Reconfigure():
                self.stepper.reset(msg.model)
                self.stages = max(1, msg.stages)
                self.next_local = msg.next_local
            case End():
                # On the loop's thread, as decode steps: a kept request's last steps left
                # arrays there to compute (the stepper computes them before keeping them).
                end = self.stepper.end
                await self.compute.run_here(end, msg.rid, msg.keep, msg.drop, msg.trim)
                if self.model is not None and not self.model.is_last:
                    await self.send_next(msg)
            case Failure():
                self._forget(msg.rid)
                await self.send_next(msg)
            case Probe():
                await self.pass_probe(msg)
            case Sweep():
                for rid in self.stepper.idle(msg.now, self.request_timeout_s):
                    self.log.warning("request_expired", rid=rid)
                    self._forget(rid)
                if not self.requests:
                    # Hand freed buffers back once idle, so that processes sharing one GPU do
                    # not starve each other. Not at each request's end: the next one would
                    # allocate its prompt's buffers anew, on its time to first token.
                    mx.clear_cache()
            case _:
                self.log.warning("unexpected_message", message=type(msg).__name__)

    async def _forward(self, msg: Forward | ForwardBatch, built: Built | None) -> None:
        parts: list[Forward | ForwardBatch] = [msg]
        if self._batches() and len(self.requests) > 1 and self._is_decode(msg):
            await asyncio.sleep(0)  # let the rest of a convoy reach the mailbox
            parts += self._take_decodes(rows_in(msg), self.convoy_rows())
        # A step that would fail in MLX (or crash it) fails here, alone: its request only; the
        # other rows of its batch run on. A convoy that lost rows merges its caches anew, as
        # when one of its requests ends (`Convoys.caches`).
        parts, refused = self.stepper.screen(parts)
        for rid, why in refused.items():
            self.log.warning("step_refused", rid=rid, error=why)
            await self._fail([rid], f"StepError: {why}")
        if not parts:
            if built is not None:
                await self.backend.give_back(built)
            return
        msg = parts[0]
        if built is not None:
            if self._fits(built, parts):
                built = await self.backend.land(built, parts)
            else:
                await self.backend.give_back(built)
                built = None
        s = self.stepper
        outs: list[Message | None]
        if len(parts) == 1 and isinstance(msg, Forward):
            # A prompt chunk of a new length may make MLX build kernels first (seconds for a
            # quantized model: `benchmarks/first_steps.py`): off the loop, frames and
            # heartbeats go on meanwhile.
            # A sampled step (a decode, a prompt's last token, drafts to verify) is short, and
            # runs where its request's decode steps ran (MLX streams are per thread).
            run = self.compute.run_here if msg.sample else self.compute.run
            outs = [await run(self._timed, functools.partial(s.step, built=built), msg)]
        else:
            step_batch = functools.partial(s.step_batch, built=built)
            outs = list(await self.compute.run_here(self._timed, step_batch, parts))
        for o in outs:
            if o is not None:
                await self.send_next(o)
        self._build_next(parts)
        if self.backlog:
            # A step on the loop's thread kept it from everything else: frames to read, the
            # other shards of this process, tokens for the engine. Give it a turn.
            await asyncio.sleep(0)

    def _fits(self, built: Built, parts: list[Forward | ForwardBatch]) -> bool:
        """Whether `parts` are the steps that `built` was built for."""
        rows = rows_of(parts)
        keys = tuple((r.rid, r.seq) for r in rows)
        return keys == built.rows and all(map(self.stepper.builds_on, rows))

    def _build_next(self, parts: list[Forward | ForwardBatch]) -> None:
        """Have the backend build the next step of the requests of `parts` now, while
        nothing else waits: only when they are every request of the shard (one, or one convoy)
        and only while the output is on its way to another process."""
        m = self.model
        rows = rows_of(parts)
        if m is None or self.next_local or self.backlog or self.compute.queued:
            return
        caches = self.stepper.caches_of_all(tuple(r.rid for r in rows))
        # The next step is built like this one: a decode step like a decode step, a step with
        # drafts like one with as many (the head drafts as many again while they are kept).
        if caches is not None and all(r.is_decode or r.is_speculative for r in rows):
            self._built = self.backend.build(m, parts, caches, self.compute.run)

    async def pass_probe(self, msg: Probe) -> None:
        """Add this node to a probe and pass it on. Nodes call this as a probe arrives, not
        through the mailbox: a long prefill must not make a live ring look dead."""
        m = self.model
        here = (self.node, m.start, m.end) if m is not None else (self.node, -1, -1)
        stats = NodeStats(
            self.node, mx.get_active_memory(), mx.get_peak_memory(),
            self.total_memory, self.busy_s, self.steps, len(self.requests),
            self.decode_busy_s, self.decode_steps,
            self.stepper.prompts.nbytes, len(self.stepper.prompts),
        )  # fmt: skip
        await self.send_next(Probe(msg.origin, msg.sent, (*msg.hops, here), (*msg.stats, stats)))

    async def on_error(self, msg: Message | Sweep | Reconfigure, error: Exception) -> None:
        if isinstance(msg, Forward | ForwardBatch):
            # A failed batch fails the requests it ran (the message's own, or every one of the
            # pass it was gathered into); the convoys of all others are theirs still.
            rids = sorted(rids_in(msg))
            if isinstance(error, BatchError):
                rids = list(dict.fromkeys(error.rids))
            kind = "cache_miss" if isinstance(error, CacheMiss) else ""
            await self._fail(rids, f"{type(error).__name__}: {error}", kind)

    async def _fail(self, rids: list[str], why: str, kind: str = "") -> None:
        """Fail `rids` here: their state goes, and a Failure for each goes on to the head."""
        for rid in rids:
            self.requests.pop(rid, None)
            # Any other request of its convoy takes its own caches back now: the merged ones
            # are gone with the failed rows.
            self.convoys.dissolve(rid, self.requests)
        self.convoys.drop_dead(self.requests)
        for rid in rids:
            await self.send_next(Failure(rid, why, self.node, kind))

    def _forget(self, rid: str) -> None:
        self.requests.pop(rid, None)
        self.convoys.drop_dead(self.requests)

    def _timed(self, fn: Callable[[Any], T], arg: Forward | list[Forward | ForwardBatch]) -> T:
        t0 = time.perf_counter()
        try:
            return fn(arg)
        finally:
            dt = time.perf_counter() - t0
            self.busy_s += dt
            self.steps += 1
            # Batched passes are always decode steps.
            if isinstance(arg, list) or arg.is_decode:
                self.decode_busy_s += dt
                self.decode_steps += 1
            if self.steps % 256 == 0:  # mlx-lm's own cadence during long generations
                mx.clear_cache()

    # --- batching -------------------------------------------------------------------------

    def _is_decode(self, msg: object) -> bool:
        return isinstance(msg, Forward | ForwardBatch) and all(
            map(self.stepper.joins, rows_of([msg]))
        )

    def _batches(self) -> bool:
        return self.max_batch > 1 and self.model is not None and self.model.family.batches

    def convoy_rows(self) -> int:
        return convoy_rows(self.max_batch, len(self.requests), self.stages)

    def _take_decodes(self, rows: int, limit: int) -> list[Forward | ForwardBatch]:
        """Decode steps waiting in the mailbox to join a pass of `rows`, up to `limit` rows in
        all (`DecodePick`). Steps taken from behind a prompt chunk are that chunk's one wait."""
        pick = DecodePick(rows, limit, self._is_decode)
        taken = cast(list[Forward | ForwardBatch], self.take_out(pick))
        if pick.took_past_chunk:
            self._chunk_waited = True
        return taken

    def next_message(self) -> object:
        """Decode steps go before a prompt chunk in front of them, once per chunk: a long
        prompt's prefill then holds running generations up for one chunk at a time, not for
        the whole prompt, and the prompt itself waits at most one decode pass per chunk."""
        box = self._mailbox
        if not is_prompt_chunk(box[0]):
            return box.popleft()
        if not self._chunk_waited:
            self._chunk_waited = True
            passing = self._take_decodes(0, self.convoy_rows())
            if passing:
                box.extendleft(reversed(passing))  # handle() takes the rest as one batch
                return box.popleft()
        self._chunk_waited = False
        return box.popleft()
