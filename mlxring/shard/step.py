"""The forward pass of a shard: one request's step or a batched pass of several through this
shard's layers, on the requests' KV caches, then on to the next shard or, on the last, sampled.
Runs on whichever thread the actor gives it (`compute`); a step the backend built ahead (see
`backends.base`) gives its output instead of being computed again."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import mlx.core as mx

from mlxring.backends.base import Backend, Built
from mlxring.model.sharded import ShardModel
from mlxring.protocol.messages import Forward, ForwardBatch, Message, Tensor, rows_of
from mlxring.shard.checks import Limits, Screen, kv_bound
from mlxring.shard.convoys import Convoys, drop_last, wide_rows
from mlxring.shard.grammar import Grammars
from mlxring.shard.prefix import PromptCache
from mlxring.shard.sample import sample, sample_rows, verify
from mlxring.shard.state import (
    RequestState,
    cache_bytes,
    drop_positions,
    forget_positions,
    make_request_state,
)

#: A request measures the KV bytes of a position (`Stepper.per_position`) once it holds this
#: many: a cache allocates in steps (mlx-lm's KVCache: 256 positions), so a shorter one would
#: say each of its positions costs several times what it does.
MEASURED_FROM = 1024
#: Decode steps measure their requests' KV bytes every this many (a sum over every layer's
#: cache, tens of µs on a deep shard, each token otherwise). What the shard holds lags by at
#: most that many positions a request, and only new work is refused for it.
MEASURE_EVERY = 32


class StepError(Exception):
    """A step that cannot run (unknown request, bad input); fails only that request."""


class BatchError(Exception):
    """A batched step failed: every request in it fails."""

    def __init__(self, rids: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.rids = rids


class Stepper:
    """This shard's layers (`model`, None until loaded), the state of each request it has seen
    (`requests`, `convoys`) and the steps that run through them."""

    def __init__(
        self,
        node: str,
        model: ShardModel | None,
        backend: Backend,
        max_requests: int = 1024,
        kv_cache_gb: float | None = None,
        total_memory: int = 0,
        grammars: Grammars | None = None,
        prompt_cache_gb: float | None = None,
    ) -> None:
        self.node = node
        self.grammars = grammars  # the process's llguidance tokenizer (None: no grammars here)
        self.model = model
        self.backend = backend
        self.max_requests = max_requests  # requests with state at once; new ones beyond fail
        # KV-cache bytes the requests may hold (`checks.kv_bound`: None, a share of memory).
        self.kv_cache_gb = kv_cache_gb
        self.total_memory = total_memory
        self.limits = None if model is None else self._limits(model)
        # Whether batched passes carry rows with drafts and trims (`convoys.wide_rows`);
        # where not, such a step runs alone.
        self.wide = model is not None and wide_rows(model)
        # KV bytes of one position here, the least a request of MEASURED_FROM positions or
        # more has held (0: none yet). A cache's allocation step puts it at most a quarter
        # above what a position costs; a sliding window makes it less over time.
        self.per_position = 0.0
        self.requests: dict[str, RequestState] = {}
        self.convoys = Convoys()
        # Finished requests' caches kept for later requests with the same start (None: its
        # bound is the KV bound's; entries yield to live requests, see `screen`).
        self.prompt_cache_gb = prompt_cache_gb
        self.prompts = PromptCache(self._prompt_bound())
        self.batches = 0  # forward passes that ran more than one request
        self.batched_rows = 0
        self.batched_draft_rows = 0  # ... of those rows, steps with drafts to verify

    def reset(self, model: ShardModel | None) -> None:
        """Drop every request's state; take `model` (None: keep the current one)."""
        if model is not None:
            self.model = model
            self.limits = self._limits(model)
            self.wide = wide_rows(model)
            self.per_position = 0.0
            self.prompts.max_bytes = self._prompt_bound()
        self.requests.clear()
        self.convoys.clear()
        self.prompts.clear()  # a re-plan: the layers (and so the caches) may be others now

    def _limits(self, model: ShardModel) -> Limits:
        bound = kv_bound(model, self.kv_cache_gb, self.total_memory)
        return Limits.of(model, self.max_requests, bound)

    def _prompt_bound(self) -> int:
        """The prompt cache's bytes: `prompt_cache_gb`, else the live requests' KV bound (or
        1 GiB where memory is not known)."""
        if self.prompt_cache_gb is not None:
            return int(self.prompt_cache_gb * (1 << 30))
        bound = None if self.limits is None else self.limits.kv_bytes
        return bound if bound is not None else 1 << 30

    def end(self, rid: str, keep: int, drop: tuple[str, ...], trim: int = 0) -> None:
        """A request ended: its state goes, kept as a prompt-cache entry when `keep` is the
        positions it holds here after dropping `trim` (its last step's rejected drafts): the
        head's count of what it sent. `drop` entries go too."""
        self.prompts.drop(drop)
        if keep:
            # Its own caches back from its convoy's merged ones (the others', too: they merge
            # again at their next pass). A convoy otherwise stays merged while any is live.
            self.convoys.dissolve(rid, self.requests)
        st = self.requests.pop(rid, None)
        self.convoys.drop_dead(self.requests)
        if st is None or not keep:
            return  # nothing to keep: its rejected drafts go with the rest of it
        if trim:
            drop_positions(st, trim)
        if st.positions == keep:
            # Computed here: a later request's first step may run on the other thread, which
            # cannot compute what this one left (MLX streams are per thread).
            mx.eval(st.arrays())
            self.prompts.keep(rid, st.caches, st.history, st.positions)

    def kv_held(self) -> int:
        """KV-cache bytes the shard's requests hold, as of each one's last step."""
        return sum(st.kv_bytes for st in self.requests.values())

    def idle(self, now: float, longer_than: float) -> list[str]:
        """The requests whose last step ran more than `longer_than` seconds before `now`."""
        return [rid for rid, st in self.requests.items() if now - st.last_used > longer_than]

    def caches_of_all(self, rids: tuple[str, ...]) -> list[Any] | None:
        """The caches of `rids` (one request's own, or their convoy's merged ones) when they
        are every request of the shard; else None."""
        if set(rids) != set(self.requests) or len(rids) != len(self.requests):
            return None
        return self.requests[rids[0]].caches if len(rids) == 1 else self.convoys.merged.get(rids)

    def screen(
        self, parts: list[Forward | ForwardBatch]
    ) -> tuple[list[Forward | ForwardBatch], dict[str, str]]:
        """What of a pass may run, and the requests that may not, each with why (see
        `checks`): checked before any of it touches a cache or reaches MLX. A batch that
        loses rows runs on as a batch of the others, its activations cut to theirs."""
        if self.limits is None:
            return parts, {}  # no layers yet: the step itself says so
        adds = any(
            isinstance(p, Forward) and (not p.is_decode or p.rid not in self.requests)
            for p in parts
        )
        held = self.kv_held() if adds and self.limits.kv_bytes is not None else 0
        if adds and self.limits.kv_bytes is not None:
            # Kept prompts take only what live requests leave: new work comes first.
            new = sum(len(p.tokens) + p.reused for p in parts if isinstance(p, Forward))
            self.prompts.fit(self.limits.kv_bytes - held - int(new * self.per_position))
        screen = Screen(self.limits, self.requests, held, self.per_position)
        good: list[Forward | ForwardBatch] = []
        for kept in screen.sort(parts):
            p, rows = kept.part, kept.rows
            if rows is None or not isinstance(p, ForwardBatch):
                good.append(p)
                continue
            h = None if p.h is None else self._array(p.h)[mx.array(rows)]
            good.append(ForwardBatch(tuple(p.rows[i] for i in rows), h))
        return good, screen.refused

    def _here(self, f: Forward) -> bool:
        """Whether `f` is a step of a request under way here, at this shard's first layer."""
        m = self.model
        return m is not None and f.layer == m.start and f.rid in self.requests

    def continues(self, f: Forward) -> bool:
        """Whether `f` is a decode step of a request under way here, at this shard's first
        layer: one that may join a batched pass, or fill a step built ahead."""
        return f.is_decode and self._here(f)

    def builds_on(self, f: Forward) -> bool:
        """Whether a step built ahead can take `f`: a sampled step (a decode, or one verifying
        drafts) of a request under way here with no positions to drop first (a built step
        starts where the request's caches stood after its last one)."""
        return (f.is_decode or f.is_speculative) and not f.trim and self._here(f)

    def joins(self, f: Forward) -> bool:
        """Whether `f` may join a batched pass: a decode step of a request under way here
        (`continues`), or, where passes carry rows of several positions, such a request's
        step with drafts to verify or a trim first."""
        return (f.is_decode or (self.wide and f.is_speculative)) and self._here(f)

    def _array(self, h: mx.array | Tensor | None) -> mx.array:
        if h is None:
            raise StepError("a step reached a shard without activations")
        return h if isinstance(h, mx.array) else self.backend.to_array(h)

    def step(self, f: Forward, built: Built | None = None) -> Message | None:
        """One request's step through this shard's layers; `built`: the step built ahead,
        its input in place."""
        model = self.model
        if model is None:
            raise StepError(f"{self.node} has not loaded its layers yet")
        out = None if built is None else self.backend.output(built)
        if out is not None:
            waiting = self.requests[f.rid]
            waiting.last_used = time.monotonic()
            waiting.caches = out[1]
            return self._finish(f, model, waiting, out[0])
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
            # A prompt-cache entry to start from (CacheMiss when it is gone: the head then
            # starts the request again without one).
            start = self.prompts.start(f.reuse, f.reused) if f.reuse else None
            st = self.requests[f.rid] = make_request_state(
                model,
                f.params,
                time.monotonic(),
                self.grammars,
                start,
                remember=self.prompts.max_bytes > 0,
            )
        st.last_used = time.monotonic()
        if f.trim:
            drop_positions(st, f.trim)
        if model.is_first:
            x = mx.array([list(f.tokens)], dtype=mx.int32)
        else:
            if f.h is None:
                raise StepError(f"step {f.seq} of {f.rid} reached {self.node} without activations")
            x = self._array(f.h)
        return self._finish(f, model, st, model(x, st.caches))

    def step_batch(
        self, parts: list[Forward | ForwardBatch], built: Built | None = None
    ) -> list[Message]:
        """Decode steps of several requests as one forward pass; `built`: the pass built ahead
        on their merged caches, its input in place. Rows may carry drafts (several positions,
        padded on the right to the widest) and trims (`wide`)."""
        model = self.model
        assert model is not None
        out = None if built is None else self.backend.output(built)
        rows = self._batch_rows(parts)
        rids = tuple(r.rid for r in rows)
        try:
            if out is not None:
                h = out[0]
            else:
                width = max(len(r.tokens) for r in rows)
                if not self.wide and (width > 1 or any(r.trim for r in rows)):
                    raise StepError("this model's caches take no batched drafts or trims")
                caches = self.convoys.caches(rids, self.requests)
                self._trim_rows(rows, caches)
                if model.is_first:
                    x = mx.array(
                        [[*r.tokens, *[r.tokens[-1]] * (width - len(r.tokens))] for r in rows],
                        dtype=mx.int32,
                    )
                else:
                    hs = [self._array(p.h) for p in parts]
                    width = max(width, *(a.shape[1] for a in hs))
                    hs = [_pad_right(a, width) for a in hs]
                    x = hs[0] if len(hs) == 1 else mx.concatenate(hs, axis=0)
                h = model(x, caches)
                if width > 1:
                    # The rows' padding leaves their caches: it is no position of theirs.
                    drop_last(caches, [width - len(r.tokens) for r in rows])
            self._measure_rows(rows)
            return self._batch_out(model, rows, h)
        except Exception as e:
            raise BatchError(rids, f"{type(e).__name__}: {e}") from e

    def _trim_rows(self, rows: list[Forward], caches: list[Any]) -> None:
        """Drop each row's `trim` (its previous step's rejected drafts) from the merged
        caches, and from its count and history."""
        trims = [r.trim for r in rows]
        if not any(trims):
            return
        for r in rows:
            st = self.requests[r.rid]
            if r.trim > st.positions:
                raise ValueError(f"cannot drop {r.trim} of {st.positions} positions of {r.rid}")
        drop_last(caches, trims)
        for r in rows:
            if r.trim:
                forget_positions(self.requests[r.rid], r.trim)

    def _measure_rows(self, rows: list[Forward]) -> None:
        """Count a pass's positions of each of `rows`, and (see MEASURE_EVERY) each one's
        share of their merged caches' bytes: a left-padded row holds as much as any."""
        states = [self.requests[r.rid] for r in rows]
        for r, st in zip(rows, states, strict=True):
            st.positions += len(r.tokens)
        if self.batches % MEASURE_EVERY and all(st.kv_bytes for st in states):
            return
        share = cache_bytes(self.convoys.merged.get(tuple(r.rid for r in rows), [])) // len(rows)
        for st in states:
            st.kv_bytes = share

    def _batch_rows(self, parts: list[Forward | ForwardBatch]) -> list[Forward]:
        rows = rows_of(parts)
        rids = tuple(r.rid for r in rows)
        self.batches += 1
        self.batched_rows += len(rows)
        self.batched_draft_rows += sum(1 for r in rows if r.draft)
        if len(set(rids)) != len(rids):
            raise BatchError(rids, "a batch holds two steps of one request")
        now = time.monotonic()
        for rid in rids:
            if rid in self.requests:
                self.requests[rid].last_used = now
        return rows

    def _batch_out(self, model: ShardModel, rows: list[Forward], h: mx.array) -> list[Message]:
        """A pass's output: its activations on to the next shard, or its rows' tokens (each
        row with drafts verified on its own positions, the others sampled together from their
        first)."""
        if model.is_last:
            states = [self.requests[r.rid] for r in rows]
            if h.shape[1] == 1:
                return sample_rows(rows, states, model.logits(h))
            plain = [i for i, r in enumerate(rows) if not r.draft]
            outs: dict[int, Message] = {}
            if plain:
                logits = model.logits(h[mx.array(plain), :1])
                sampled = sample_rows([rows[i] for i in plain], [states[i] for i in plain], logits)
                outs.update(zip(plain, sampled, strict=True))
            for i, (r, st) in enumerate(zip(rows, states, strict=True)):
                if r.draft:
                    if st.remembers:
                        st.remember(r.tokens)
                    n = len(r.tokens)
                    outs[i] = verify(r, st, model.logits(h[i : i + 1, :n], positions=n))
            return [outs[i] for i in range(len(rows))]
        mx.eval(h)
        out = tuple(replace(r, h=None, layer=model.end) for r in rows)
        return [ForwardBatch(out, h)]

    def _measure(self, f: Forward, st: RequestState) -> None:
        """Count `f`'s positions and its request's KV bytes after it (lazy arrays say their
        size without being computed)."""
        st.positions += len(f.tokens)
        if f.is_decode and st.kv_bytes and st.positions % MEASURE_EVERY:
            return
        st.kv_bytes = cache_bytes(st.caches)
        if st.positions >= MEASURED_FROM:
            each = st.kv_bytes / st.positions
            self.per_position = min(self.per_position or each, each)

    def _finish(
        self, f: Forward, model: ShardModel, st: RequestState, h: mx.array
    ) -> Message | None:
        self._measure(f, st)
        if model.is_last and st.remembers:
            st.remember(f.tokens)
        # A prompt chunk leaves nothing of its request unevaluated: the request's next step
        # may run on the other thread (`compute`). The last shard needs only the caches of a
        # chunk, not its activations.
        kept = [] if f.sample else st.arrays()
        if not model.is_last:
            mx.eval(h, kept)
            # On to the next shard with everything it needs of the step (its parameters, the
            # prompt-cache entry to start from), at the layer where this shard ends.
            return replace(f, h=h, layer=model.end)
        if not f.sample:
            mx.eval(kept)
            return None
        if f.draft:
            return verify(f, st, model.logits(h, positions=f.draft + 1))
        return sample(f, st, model.logits(h))


def _pad_right(h: mx.array, width: int) -> mx.array:
    """Activations [B, L, D] padded with zeros to [B, width, D]: positions after a row's own,
    which causal attention keeps from them."""
    short = width - h.shape[1]
    return h if not short else mx.pad(h, [(0, 0), (0, short), (0, 0)])
