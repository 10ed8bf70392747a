"""The shard actor: runs its layer range for every request step, keeps per-request KV caches,
and on the last shard samples the next token (mlx-lm samplers and logits processors).

Decode steps run on the event loop's thread, prompt chunks on the compute thread (`compute`
says why). MLX arrays are bound to the stream of the thread that scheduled them, so a prompt
chunk leaves its request's arrays evaluated: the request's next step may run on the other
thread. A shard's lone request has its next decode step built while its token travels the ring
(`ahead`), when the shard's output goes to another process: in one process the next shard would
wait for the build. Where gates work, so does a convoy that holds every request of the shard.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
)

from mlxring.backends.cuda import ahead, gate
from mlxring.model.sharded import ShardModel
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import (
    End,
    Failure,
    Forward,
    ForwardBatch,
    Message,
    NodeStats,
    Probe,
    SamplingParams,
    Send,
    Tensor,
    Token,
    rows_of,
)
from mlxring.shard.compute import Compute
from mlxring.shard.mailbox import Actor

T = TypeVar("T")


def _rows(msg: Forward | ForwardBatch) -> int:
    return len(msg.rows) if isinstance(msg, ForwardBatch) else 1


def _rids(msg: Forward | ForwardBatch | End | Failure) -> set[str]:
    return {r.rid for r in msg.rows} if isinstance(msg, ForwardBatch) else {msg.rid}


def _is_prompt_chunk(msg: object) -> bool:
    return isinstance(msg, Forward) and not msg.is_decode


def _array(h: mx.array | Tensor | None) -> mx.array:
    if h is None:
        raise StepError("a step reached a shard without activations")
    return h if isinstance(h, mx.array) else wire.to_array(h)


class StepError(Exception):
    """A step that cannot run (unknown request, bad input); fails only that request."""


class BatchError(Exception):
    """A batched step failed: every request in it fails."""

    def __init__(self, rids: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.rids = rids


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

    def arrays(self) -> list[Any]:
        """Every array this request keeps between steps."""
        kept = [c.state for c in self.caches]
        return kept + [a for a in (self.history, self.key) if a is not None]


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
        st.params = p
    return st


def _seeded_sample(st: RequestState, p: SamplingParams, logprobs: mx.array) -> mx.array:
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


class Convoys:
    """Merged KV caches of requests that run together. The same requests keep arriving together
    (a "convoy"), so their merged caches are kept and reused step after step; merging anew
    copies every cache. Several convoys take turns on a shard (one per stage computing at once,
    or requests that started apart), so each keeps its own. A request is in one at most, and
    while it is, the merged caches hold its KV (its own list is empty)."""

    def __init__(self) -> None:
        self.merged: dict[tuple[str, ...], list[Any]] = {}
        self._of: dict[str, tuple[str, ...]] = {}

    def caches(self, rids: tuple[str, ...], requests: dict[str, RequestState]) -> list[Any]:
        """The merged caches of `rids`, in this row order."""
        merged = self.merged.get(rids)
        if merged is None:
            for rid in rids:
                self.dissolve(rid, requests)
            per_request = [requests[r].caches for r in rids]
            merged = [
                per_request[0][i].merge([c[i] for c in per_request])
                for i in range(len(per_request[0]))
            ]
            self.merged[rids] = merged
            for rid in rids:
                requests[rid].caches = []
                self._of[rid] = rids
        return merged

    def dissolve(self, rid: str, requests: dict[str, RequestState]) -> None:
        """Give each live request of `rid`'s convoy its own caches back."""
        rids = self._of.get(rid)
        if rids is None:
            return
        merged = self.merged.pop(rids)
        for j, r in enumerate(rids):
            del self._of[r]
            st = requests.get(r)
            if st is not None:
                st.caches = [c.extract(j) for c in merged]

    def drop_dead(self, requests: dict[str, RequestState]) -> None:
        """Let go of convoys none of whose requests is live any more. One with some live ones
        stays until they run again: a new batch of them dissolves it then."""
        for rids in [k for k in self.merged if not any(r in requests for r in k)]:
            del self.merged[rids]
            for r in rids:
                del self._of[r]

    def clear(self) -> None:
        self.merged.clear()
        self._of.clear()


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
        gates: bool = True,
    ) -> None:
        super().__init__(f"shard:{name}")
        self.node = name
        self.model = model
        self.send_next = send_next
        self.compute = compute
        self.request_timeout_s = request_timeout_s
        self.max_batch = max_batch
        self.total_memory = total_memory
        self.gates = gates  # launch steps built ahead behind a gate, where gates work
        self.requests: dict[str, RequestState] = {}
        self.convoys = Convoys()
        self.stages = 1
        self.next_local = False
        self._chunk_waited = False  # the prompt chunk in front has let decode steps pass once
        # The next decode step, built or being launched behind a gate (see `ahead`, `gate`).
        self._ahead: ahead.Ahead | ahead.Launch | None = None
        self.busy_s = 0.0
        self.steps = 0
        self.decode_busy_s = 0.0  # of busy_s, steps of one token per request (decode)
        self.decode_steps = 0
        self.batches = 0  # forward passes that ran more than one request
        self.batched_rows = 0

    async def handle(self, msg: Message | Sweep | Reconfigure) -> None:
        built, self._ahead = self._ahead, None  # only the very next message may use it
        if isinstance(msg, Forward | ForwardBatch):
            await self._forward(msg, built)
            return
        if isinstance(built, ahead.Launch):
            await self._land(built, [])
        match msg:
            case Reconfigure():
                if msg.model is not None:
                    self.model = msg.model
                self.stages = max(1, msg.stages)
                self.next_local = msg.next_local
                self.requests.clear()
                self.convoys.clear()
            case End():
                self._forget(msg.rid)
                if self.model is not None and not self.model.is_last:
                    await self.send_next(msg)
            case Failure():
                self._forget(msg.rid)
                await self.send_next(msg)
            case Probe():
                await self.pass_probe(msg)
            case Sweep():
                stale = [
                    rid
                    for rid, st in self.requests.items()
                    if msg.now - st.last_used > self.request_timeout_s
                ]
                for rid in stale:
                    self.log.warning("request_expired", rid=rid)
                    self._forget(rid)
                if not self.requests:
                    # Hand freed buffers back once idle, so that processes sharing one GPU do
                    # not starve each other. Not at each request's end: the next one would
                    # allocate its prompt's buffers anew (10-15 ms of a 2048-token TTFT on CUDA).
                    mx.clear_cache()
            case _:
                self.log.warning("unexpected_message", message=type(msg).__name__)

    async def _forward(
        self, msg: Forward | ForwardBatch, built: ahead.Ahead | ahead.Launch | None
    ) -> None:
        parts: list[Forward | ForwardBatch] = [msg]
        if self._batches() and len(self.requests) > 1 and self._is_decode(msg):
            await asyncio.sleep(0)  # let the rest of a convoy reach the mailbox
            parts += self._take_decodes(_rows(msg), self.convoy_rows())
        if isinstance(built, ahead.Launch):
            built = await self._land(built, parts)
        elif built is not None and not self._fill(built.slot, parts):
            built = None
        outs: list[Message | None]
        if len(parts) == 1 and isinstance(msg, Forward):
            if built is not None:
                step = functools.partial(self.step_built, built=built)
                outs = [await self.compute.run_here(self._timed, step, msg)]
            else:
                # A prompt chunk of a new length may make MLX build kernels first (on CUDA, 19 s
                # for a quantized model's 16-token chunk after warm_up's 4-token one): off the
                # loop, frames and heartbeats go on meanwhile.
                run = self.compute.run_here if msg.is_decode else self.compute.run
                outs = [await run(self._timed, self.step, msg)]
        elif built is not None:
            step_batch = functools.partial(self.step_batch_built, built=built)
            outs = list(await self.compute.run_here(self._timed, step_batch, parts))
        else:
            outs = list(await self.compute.run_here(self._timed, self.step_batch, parts))
        for o in outs:
            if o is not None:
                await self.send_next(o)
        self._build_next(parts)
        if self.backlog:
            # A step on the loop's thread kept it from everything else: frames to read, the
            # other shards of this process, tokens for the engine. Give it a turn.
            await asyncio.sleep(0)

    async def pass_probe(self, msg: Probe) -> None:
        """Add this node to a probe and pass it on. Nodes call this as a probe arrives, not
        through the mailbox: a long prefill must not make a live ring look dead."""
        m = self.model
        here = (self.node, m.start, m.end) if m is not None else (self.node, -1, -1)
        stats = NodeStats(
            self.node, mx.get_active_memory(), mx.get_peak_memory(),
            self.total_memory, self.busy_s, self.steps, len(self.requests),
            self.decode_busy_s, self.decode_steps,
        )  # fmt: skip
        await self.send_next(Probe(msg.origin, msg.sent, (*msg.hops, here), (*msg.stats, stats)))

    async def on_error(self, msg: Message | Sweep | Reconfigure, error: Exception) -> None:
        if isinstance(msg, Forward | ForwardBatch):
            # A failed batch may have taken other requests' steps with it: fail them all.
            self.convoys.clear()
            rids = [r.rid for r in msg.rows] if isinstance(msg, ForwardBatch) else [msg.rid]
            if isinstance(error, BatchError):
                rids = list(error.rids)
            for rid in rids:
                self._forget(rid)
                await self.send_next(Failure(rid, f"{type(error).__name__}: {error}", self.node))

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

    def _batchable(self, f: Forward) -> bool:
        m = self.model
        return m is not None and f.is_decode and f.layer == m.start and f.rid in self.requests

    def _is_decode(self, msg: object) -> bool:
        if isinstance(msg, Forward):
            return self._batchable(msg)
        if isinstance(msg, ForwardBatch):
            return all(self._batchable(r) for r in msg.rows)
        return False

    def _batches(self) -> bool:
        return self.max_batch > 1 and self.model is not None and self.model.family.batches

    def convoy_rows(self) -> int:
        """How many requests one decode pass may carry. With several stages computing at once,
        the requests split into one convoy per stage, so that every stage has a convoy to run
        while the others run theirs (one convoy of all would leave all but one stage idle)."""
        return max(1, min(self.max_batch, -(-len(self.requests) // self.stages)))

    def _take_decodes(self, rows: int, limit: int) -> list[Forward | ForwardBatch]:
        """Decode steps waiting in the mailbox, up to `limit` rows in all. A step may pass
        other requests' messages but never an earlier one of its own request, nor a local
        control message (a re-plan, a sweep)."""
        room = limit - rows
        blocked: set[str] = set()
        passed_chunk = False

        def pick(m: object) -> bool | None:
            nonlocal room, passed_chunk
            if room <= 0 or not isinstance(m, Forward | ForwardBatch | End | Failure):
                return None
            rids = _rids(m)
            if self._is_decode(m) and not rids & blocked and _rows(m) <= room:  # type: ignore[arg-type]
                room -= _rows(m)  # type: ignore[arg-type]
                if passed_chunk:
                    self._chunk_waited = True  # this pass is the waiting chunk's one wait
                return True
            passed_chunk = passed_chunk or _is_prompt_chunk(m)
            blocked.update(rids)
            return False

        return cast(list[Forward | ForwardBatch], self.take_out(pick))

    def next_message(self) -> object:
        """Decode steps go before a prompt chunk in front of them, once per chunk: a long
        prompt's prefill then holds running generations up for one chunk at a time, not for
        the whole prompt, and the prompt itself waits at most one decode pass per chunk."""
        box = self._mailbox
        if not _is_prompt_chunk(box[0]):
            return box.popleft()
        if not self._chunk_waited:
            self._chunk_waited = True
            passing = self._take_decodes(0, self.convoy_rows())
            if passing:
                box.extendleft(reversed(passing))  # handle() takes the rest as one batch
                return box.popleft()
        self._chunk_waited = False
        return box.popleft()

    def step_batch(self, parts: list[Forward | ForwardBatch]) -> list[Message]:
        """Decode steps of several requests as one forward pass."""
        model = self.model
        assert model is not None
        rows = self._batch_rows(parts)
        rids = tuple(r.rid for r in rows)
        try:
            if model.is_first:
                x = mx.array([[r.tokens[0]] for r in rows], dtype=mx.int32)
            else:
                hs = [_array(p.h) for p in parts]
                x = hs[0] if len(hs) == 1 else mx.concatenate(hs, axis=0)
            return self._batch_out(model, rows, model(x, self.convoys.caches(rids, self.requests)))
        except BatchError:
            raise
        except Exception as e:
            raise BatchError(rids, f"{type(e).__name__}: {e}") from e

    def step_batch_built(
        self, parts: list[Forward | ForwardBatch], built: ahead.Ahead
    ) -> list[Message]:
        """A convoy's pass launched ahead (on its merged caches), its input in place."""
        model = self.model
        assert model is not None and built.status is not None
        if self._gave_up(built):
            return self.step_batch(parts)
        rows = self._batch_rows(parts)
        try:
            return self._batch_out(model, rows, built.h)
        except Exception as e:
            raise BatchError(tuple(r.rid for r in rows), f"{type(e).__name__}: {e}") from e

    def _batch_rows(self, parts: list[Forward | ForwardBatch]) -> list[Forward]:
        rows = rows_of(parts)
        rids = tuple(r.rid for r in rows)
        self.batches += 1
        self.batched_rows += len(rows)
        if len(set(rids)) != len(rids):
            raise BatchError(rids, "a batch holds two steps of one request")
        now = time.monotonic()
        for rid in rids:
            if rid in self.requests:
                self.requests[rid].last_used = now
        return rows

    def _batch_out(self, model: ShardModel, rows: list[Forward], h: mx.array) -> list[Message]:
        """A pass's output: its activations on to the next shard, or its rows' tokens."""
        if model.is_last:
            return self._sample_batch(rows, model.logits(h))
        mx.eval(h)
        out = tuple(
            Forward(r.rid, r.seq, r.tokens, r.sample, layer=model.end, spent=r.spent, hops=r.hops)
            for r in rows
        )
        return [ForwardBatch(out, h)]

    def _sample_batch(self, rows: list[Forward], logits: mx.array) -> list[Message]:
        states = [self.requests[r.rid] for r in rows]
        for r, st in zip(rows, states, strict=True):
            if st.processors:
                toks = mx.array(list(r.tokens), dtype=mx.uint32)
                st.history = toks if st.history is None else mx.concatenate([st.history, toks])
        if all(
            st.sampler is greedy_sampler and not st.processors and st.logprobs is None
            for st in states
        ):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tokens = cast(list[int], mx.argmax(logprobs, axis=-1).tolist())
            return [
                Token(r.rid, r.seq, t, spent=r.spent, hops=r.hops)
                for r, t in zip(rows, tokens, strict=True)
            ]
        return [
            self._sample(r, st, logits[i : i + 1])
            for i, (r, st) in enumerate(zip(rows, states, strict=True))
        ]

    def step(self, f: Forward) -> Message | None:
        """One request step through this shard's layers."""
        model = self.model
        if model is None:
            raise StepError(f"{self.node} has not loaded its layers yet")
        if f.layer != model.start:
            raise StepError(
                f"step {f.seq} of {f.rid} is for layer {f.layer} but {self.node} holds "
                f"[{model.start}, {model.end}) (the ring re-planned)"
            )
        self.convoys.dissolve(f.rid, self.requests)
        st = self.requests.get(f.rid)
        if st is None:
            if f.seq != 0:
                raise StepError(f"no state for request {f.rid} at step {f.seq} on {self.node}")
            st = self.requests[f.rid] = make_request_state(model, f.params, time.monotonic())
        st.last_used = time.monotonic()
        if model.is_first:
            x = mx.array([list(f.tokens)], dtype=mx.int32)
        else:
            if f.h is None:
                raise StepError(f"step {f.seq} of {f.rid} reached {self.node} without activations")
            x = _array(f.h)
        return self._finish(f, model, st, model(x, st.caches))

    def step_built(self, f: Forward, built: ahead.Ahead) -> Message | None:
        """A decode step whose graph was built ahead and whose input is in place."""
        model, st = self.model, self.requests[f.rid]
        assert model is not None
        if self._gave_up(built):
            return self.step(f)
        st.last_used = time.monotonic()
        st.caches = built.caches
        return self._finish(f, model, st, built.h)

    def _gave_up(self, built: ahead.Ahead) -> bool:
        """Whether the gate of a launched step gave up before its input came (the ring
        stalled): what the step computed is noise, written past the offsets that are now taken
        back. A step built but not launched has no gate."""
        if built.status is None:
            return False
        mx.eval(built.h, built.status)
        if built.status.item() == gate.OPEN:
            return False
        self.log.warning("gate_gave_up", rows=list(built.slot.rows))
        ahead.take_back(built.caches, built.slot)
        return True

    def _fill(self, slot: ahead.Slot, parts: list[Forward | ForwardBatch]) -> bool:
        """Write the input of `parts` into `slot` if they are the steps it was built for."""
        m = self.model
        rows = rows_of(parts)
        return (
            m is not None
            and tuple((r.rid, r.seq) for r in rows) == slot.rows
            and all(r.layer == m.start and r.is_decode and r.rid in self.requests for r in rows)
            and ahead.fill(slot, parts, m.is_first)
        )

    async def _land(
        self, launch: ahead.Launch, parts: list[Forward | ForwardBatch]
    ) -> ahead.Ahead | None:
        """Open a launched step's gate: with its input when `parts` bring it, else to let it
        run on nothing (it is dropped). Then wait for the launch, so that no other MLX work
        overlaps it; opening first means a launch that waits for the device cannot stall."""
        assert launch.slot.flag is not None
        use = self._fill(launch.slot, parts)
        launch.slot.flag.open(gate.OPEN if use else gate.CANCEL)
        try:
            built = await launch.task
        except Exception as e:  # noqa: BLE001 - the step is computed as if never built
            self.log.warning("launch_failed", error=f"{type(e).__name__}: {e}")
            built = None
        if built is None or not use:
            ahead.take_back(launch.caches, launch.slot)
            return None
        return built

    def _build_next(self, parts: list[Forward | ForwardBatch]) -> None:
        """Build the next decode step of the requests of `parts` now, while nothing else waits:
        only when they are every request of the shard (one, or one convoy: that one launched
        behind a gate only, as shadows would copy every cache), only while the output is on
        its way to another process, and only where MLX lets the placeholder's bytes through."""
        m = self.model
        rows = rows_of(parts)
        rids = tuple(r.rid for r in rows)
        gated = self.gates and gate.works()
        if (
            m is None
            or self.next_local
            or not all(r.is_decode for r in rows)
            or set(rids) != set(self.requests)
            or len(rids) != len(self.requests)
            or (len(rids) > 1 and not gated)
            or self.backlog
            or self.compute.queued
            or not ahead.placeholders_work()
        ):
            return
        caches = self.requests[rids[0]].caches if len(rids) == 1 else self.convoys.merged.get(rids)
        if caches is None or not ahead.can_build(caches):
            return
        # A convoy's activations come as one ForwardBatch; on the first shard its tokens come
        # one message per request, gathered into one pass as they are here.
        spec = (
            ahead.input_of(parts[0], len(rows), m.is_first)
            if len(parts) == 1 or m.is_first
            else None
        )
        if spec is None:
            return
        if len(rids) > 1:
            # A pass leaves its merged caches' new offsets unevaluated on this thread's stream;
            # the launch runs on the compute thread's.
            mx.eval([c.state for c in caches])
        slot = ahead.place([(r.rid, r.seq + 1) for r in rows], caches, *spec, gated=gated)
        if slot.flag is None:
            self._ahead = ahead.build(m, caches, slot)
        else:
            # Launching encodes the whole step (milliseconds on CUDA): on the compute thread,
            # so that this one keeps reading frames and can open the gate.
            task = asyncio.ensure_future(self.compute.run(ahead.build, m, caches, slot))
            self._ahead = ahead.Launch(slot, list(caches), task)

    def _finish(
        self, f: Forward, model: ShardModel, st: RequestState, h: mx.array
    ) -> Message | None:
        if model.is_last and st.processors:
            toks = mx.array(list(f.tokens), dtype=mx.uint32)
            st.history = toks if st.history is None else mx.concatenate([st.history, toks])
        # A prompt chunk leaves nothing of its request unevaluated (see the module docstring).
        # The last shard needs only the caches of a chunk, not its activations.
        kept = [] if f.sample else st.arrays()
        if not model.is_last:
            mx.eval(h, kept)
            return Forward(
                f.rid,
                f.seq,
                f.tokens,
                f.sample,
                h=h,
                layer=model.end,
                params=f.params,
                spent=f.spent,
                hops=f.hops,
            )
        if not f.sample:
            mx.eval(kept)
            return None
        return self._sample(f, st, model.logits(h))

    def _sample(self, f: Forward, st: RequestState, logits: mx.array) -> Token:
        for processor in st.processors:
            assert st.history is not None
            logits = processor(st.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        assert st.sampler is not None
        if st.key is not None and st.params is not None and st.params.temperature > 0:
            y = _seeded_sample(st, st.params, logprobs)
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
            return Token(f.rid, f.seq, token, chosen, top, f.spent, f.hops)
        return Token(f.rid, f.seq, token, spent=f.spent, hops=f.hops)
