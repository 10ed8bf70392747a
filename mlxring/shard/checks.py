"""What a step must look like before MLX sees it: token ids inside the vocabulary, activations
of the shape and dtype this shard computes on, rows of a batch each of a distinct request under
way here, no more live requests than the shard keeps, no more KV cache than its bound. MLX does
not check: an id past the embedding table is read out of bounds (the process dies), so a frame
from the wire is checked here and a bad one fails its own requests only (`Screen`): a bad row of
a batch fails its request, the other rows run on; only activations of the wrong shape or dtype
fail a whole part (no row of them can be trusted).

Every data frame a node takes comes from the ring's previous member (`ring.routing`), so the
bounds here (requests, KV bytes) are per shard and, with that, per peer: one node cannot make
another hold more than them however it behaves."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx

from mlxring.model.sharded import ShardModel, config_value, context_length
from mlxring.protocol.messages import Forward, ForwardBatch, Tensor, rows_of
from mlxring.shard.grammar import MAX_GRAMMAR_CHARS
from mlxring.shard.state import RequestState

#: What activations may be made of (a frame's tensor may claim any dtype the codec knows).
FLOATS = {"float16", "bfloat16", "float32"}
GIB = 1 << 30
MAX_CONTEXT_SIZE = 1 << 20  # repetition_context_size: the API's bound
#: With `kv_cache_gb` unset, a shard's KV caches may take this share of the machine's memory
#: that its weights leave: the rest is for activations, MLX's buffer cache and the OS.
KV_SHARE = 0.5


def vocab_size(model: ShardModel) -> int | None:
    """How many token ids this shard's model knows: the rows of its embedding table on the
    first shard (what the lookup reads), the config's vocabulary elsewhere."""
    if model.is_first:
        embed = model.family.first_modules(model._model)[0]
        rows = getattr(embed, "num_embeddings", None)
        if rows is None and hasattr(embed, "weight"):
            rows = embed.weight.shape[0]
        if rows is not None:
            return int(rows)
    v = config_value(model.config, "vocab_size")
    return int(v) if v else None


def hidden_size(model: ShardModel) -> int | None:
    """The width of the activations between this model's layers."""
    d = config_value(model.config, "hidden_size")
    return int(d) if d else None


def kv_bound(model: ShardModel, kv_cache_gb: float | None, total_memory: int) -> int | None:
    """The KV-cache bytes a shard's live requests may hold: `kv_cache_gb`, else KV_SHARE of
    what `total_memory` leaves after this shard's weights (None: memory not known, no bound)."""
    if kv_cache_gb is not None:
        return int(kv_cache_gb * GIB)
    if total_memory <= 0:
        return None
    return int(max(0, total_memory - model.parameter_bytes()) * KV_SHARE)


#: The most drafted tokens a step may carry (engine/speculate.py drafts fewer).
MAX_DRAFT = 16


def drafts(f: Forward, st: RequestState | None, last: bool) -> str | None:
    """Why a step's speculation fields do not fit its request here, or None: drafts and
    trims come in later steps only, a trim within what the request holds, drafts only of
    requests the last shard can verify at every position at once (`sample.verify`): none
    whose logits depend on the tokens before each position (penalties, a grammar) or that
    asks for logprobs; a logit bias is the same at every position."""
    if not f.draft and not f.trim:
        return None
    if st is None:
        return f"step {f.seq} of {f.rid} drafts or trims a request not under way here"
    if f.draft > MAX_DRAFT or f.trim > MAX_DRAFT or f.trim > st.positions:
        return f"step {f.seq} of {f.rid} drafts {f.draft} and trims {f.trim} positions"
    if f.draft and (not f.sample or len(f.tokens) != f.draft + 1):
        return f"step {f.seq} of {f.rid} carries {len(f.tokens)} tokens for {f.draft} drafts"
    # mlx-lm makes the logit bias's processor first, a penalty's only for one other than 0.
    bias = 1 if st.params is not None and st.params.logit_bias else 0
    if f.draft and last and (st.grammar or st.logprobs is not None or len(st.processors) > bias):
        return f"request {f.rid} samples with penalties, a grammar or logprobs: no drafts"
    return None


def _dtype(h: mx.array | Tensor) -> str:
    return h.dtype if isinstance(h, Tensor) else str(h.dtype).removeprefix("mlx.core.")


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


@dataclass(frozen=True)
class Limits:
    """What one shard accepts: `vocab` token ids, activations `width` wide, `max_requests`
    requests with state at once, `kv_bytes` of KV cache held by them (None: not known, not
    checked)."""

    vocab: int | None
    width: int | None
    first: bool
    max_requests: int
    kv_bytes: int | None = None
    start: int = 0  # the shard's first layer: where its steps must be addressed
    context: int | None = None  # positions a request may reach (the model's context length)
    last: bool = False  # the last shard: it samples (and verifies drafts)

    @staticmethod
    def of(model: ShardModel, max_requests: int, kv_bytes: int | None = None) -> Limits:
        return Limits(
            vocab_size(model), hidden_size(model), model.is_first, max_requests, kv_bytes,
            model.start, context_length(model.config), model.is_last,
        )  # fmt: skip

    def place(self, f: Forward, known: bool) -> str | None:
        """Why `f` is not a step for this shard: addressed to another layer (a step in flight
        while the ring re-planned), or a later step of a request it has no state for."""
        if f.layer != self.start:
            return (
                f"step {f.seq} of {f.rid} is for layer {f.layer}, this shard starts at {self.start}"
            )
        if not known and f.seq != 0:
            return f"no state for request {f.rid} at step {f.seq}"
        if (f.reuse or f.reused) and (known or f.seq != 0 or not f.reuse or not f.reused):
            return f"step {f.seq} of {f.rid} names a prompt-cache entry it cannot start from"
        return None

    def tokens(self, f: Forward) -> str | None:
        if not f.tokens:
            return f"step {f.seq} of {f.rid} has no tokens"
        if self.vocab is not None and max(f.tokens) >= self.vocab:
            return f"token id {max(f.tokens)} of {f.rid} is outside the vocabulary of {self.vocab}"
        return None

    def sampling(self, f: Forward) -> str | None:
        """Why a step's sampling parameters would fail in mlx-lm's samplers and processors (a
        logit bias on an id past the vocabulary reads out of bounds: the process dies), or None.
        The bounds are the API's (`api.schema`): a frame from the wire may carry anything."""
        p = f.params
        if p is None:
            return None
        v = self.vocab
        numbers = (p.temperature, p.top_p, p.min_p, *(b for _, b in p.logit_bias))
        numbers += tuple(x for x in (p.repetition_penalty, p.presence_penalty) if x is not None)
        numbers += (p.frequency_penalty,) if p.frequency_penalty is not None else ()
        if not all(math.isfinite(x) for x in numbers):
            return f"sampling parameters of {f.rid} that are not finite numbers"
        if any(t < 0 or (v is not None and t >= v) for t, _ in p.logit_bias):
            return f"a logit bias of {f.rid} on a token id outside the vocabulary of {v}"
        if v is not None and (p.top_k >= v or (p.logprobs or 0) > v):
            return f"top_k or logprobs of {f.rid} past the vocabulary of {v}"
        if not (p.temperature >= 0 and 0 < p.top_p <= 1 and 0 <= p.min_p <= 1):
            return f"temperature, top_p or min_p of {f.rid} out of range"
        if p.repetition_penalty is not None and p.repetition_penalty < 0:
            return f"repetition_penalty of {f.rid} out of range"
        if not 0 < p.repetition_context_size <= MAX_CONTEXT_SIZE:
            return f"repetition_context_size of {f.rid} out of range"
        if p.seed is not None and not 0 <= p.seed < 1 << 64:  # mx.random.key's range
            return f"seed of {f.rid} out of range"
        if p.grammar is not None and len(p.grammar) > MAX_GRAMMAR_CHARS:
            return f"grammar of {f.rid} longer than {MAX_GRAMMAR_CHARS} characters"
        return None

    def activations(self, h: mx.array | Tensor | None, rows: int, length: int) -> str | None:
        """Why `h` is not the input of `rows` rows of `length` positions, or None."""
        if self.first:
            return None  # the first shard embeds token ids; it reads no activations
        if h is None:
            return "a step reached a shard without activations"
        shape = tuple(h.shape)
        want = (rows, length, self.width) if self.width is not None else None
        if len(shape) != 3 or shape[:2] != (rows, length) or (want and shape != want):
            return f"activations of shape {list(shape)}, not {list(want or (rows, length, 'D'))}"
        if _dtype(h) not in FLOATS:
            return f"activations of dtype {_dtype(h)}"
        return None


@dataclass(frozen=True)
class Kept:
    """Of a part of a pass, what may run: `part` itself, or for a batch some of its rows
    (`rows`, their indices in `part.rows`; None: all of them)."""

    part: Forward | ForwardBatch
    rows: tuple[int, ...] | None = None


class Screen:
    """Sorts the rows of a pass into those that may run and those that fail before any cache is
    touched, each request that fails with why. `requests` are the requests with state on the
    shard; `held` the KV-cache bytes they hold, `per_position` the bytes a position of KV cache
    takes here as measured so far (0: not yet)."""

    def __init__(
        self,
        limits: Limits,
        requests: Mapping[str, RequestState],
        held: int = 0,
        per_position: float = 0.0,
    ) -> None:
        self.limits = limits
        self.requests = requests
        self.held = held
        self.per_position = per_position
        self.new = 0  # requests a single step starts here
        self.refused: dict[str, str] = {}  # rid: why, one reason per request

    def sort(self, parts: list[Forward | ForwardBatch]) -> list[Kept]:
        """What of `parts` may run; the requests that may not are in `refused` after."""
        counts = Counter(r.rid for r in rows_of(parts))
        for rid, n in counts.items():
            if n > 1:
                # Which of its steps is the real one cannot be known: none runs.
                self._refuse(rid, f"a pass holds {n} steps of request {rid}")
        kept = []
        for p in parts:
            k = self._part(p) if isinstance(p, Forward) else self._batch(p)
            if k is not None:
                kept.append(k)
        return kept

    def _refuse(self, rid: str, why: str) -> None:
        self.refused.setdefault(rid, why)

    def _part(self, f: Forward) -> Kept | None:
        lim = self.limits
        fresh = f.rid not in self.requests
        why = lim.place(f, not fresh) or lim.tokens(f) or lim.sampling(f)
        why = why or drafts(f, self.requests.get(f.rid), lim.last)
        why = why or lim.activations(f.h, 1, len(f.tokens)) or self._length(f, len(f.tokens))
        if why is None and fresh and len(self.requests) + self.new >= lim.max_requests:
            why = f"the shard keeps {lim.max_requests} requests at most"
        if why is None and (fresh or not f.is_decode):
            # A request that starts from a prompt-cache entry holds a copy of its positions.
            why = self._room(len(f.tokens) + (f.reused if fresh else 0))
        if why is not None:
            self._refuse(f.rid, why)
        if f.rid in self.refused:
            return None
        self.new += fresh
        return Kept(f)

    def _length(self, f: Forward, more: int) -> str | None:
        """Why `more` positions of `f`'s request would take it past the model's context (a
        step that no honest head sends: it trims prompts and max_tokens to fit), or None."""
        st, context = self.requests.get(f.rid), self.limits.context
        total = (st.positions if st is not None else f.reused) + more
        if context is not None and total > context:
            return f"request {f.rid} would reach {total} positions, past the context of {context}"
        return None

    def _room(self, positions: int) -> str | None:
        """Why a new request or a prompt chunk of `positions` may not add to the KV cache
        here, or None; one that may counts. Decode steps are not asked: each adds one position
        to a request the shard took in, up to its max_tokens; failing it mid-answer for the
        bytes of other requests would fail it through no fault of its own. So the bytes held
        may pass the bound by the decodes of requests under way, never by new work."""
        bound = self.limits.kv_bytes
        if bound is None:
            return None
        more = int(positions * self.per_position)
        if self.held + more > bound:
            return f"the shard holds {_gib(self.held)} of KV cache, its bound is {_gib(bound)}" + (
                f" and the chunk would add {_gib(more)}" if more else ""
            )
        self.held += more
        return None

    def _batch(self, b: ForwardBatch) -> Kept | None:
        lim = self.limits
        # Rows with drafts carry several positions; the others are padded to the widest.
        whole = lim.activations(b.h, len(b.rows), max(len(r.tokens) for r in b.rows))
        keep = []
        for i, r in enumerate(b.rows):
            why = whole or lim.place(r, r.rid in self.requests) or lim.tokens(r)
            why = why or lim.sampling(r) or drafts(r, self.requests.get(r.rid), lim.last)
            why = why or self._length(r, len(r.tokens))
            if why is None and r.rid not in self.requests:
                why = f"no state for request {r.rid} at step {r.seq}"
            if why is None and len(r.tokens) != 1 + r.draft:
                why = f"a batched step of {r.rid} carries {len(r.tokens)} tokens"
            if why is not None:
                self._refuse(r.rid, why)
            if r.rid not in self.refused:
                keep.append(i)
        if not keep:
            return None
        return Kept(b, None if len(keep) == len(b.rows) else tuple(keep))
