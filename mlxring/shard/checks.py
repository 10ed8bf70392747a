"""What a step must look like before MLX sees it: token ids inside the vocabulary, activations
of the shape and dtype this shard computes on, rows of a batch each of a distinct request under
way here, no more live requests than the shard keeps. MLX does not check: an id past the
embedding table is read out of bounds (the process dies), so a frame from the wire is checked
here and a bad one fails its own requests only (`Screen`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlxring.model.sharded import ShardModel, config_value
from mlxring.protocol.messages import Forward, ForwardBatch, Tensor

#: What activations may be made of (a frame's tensor may claim any dtype the codec knows).
FLOATS = {"float16", "bfloat16", "float32"}


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


def _dtype(h: mx.array | Tensor) -> str:
    return h.dtype if isinstance(h, Tensor) else str(h.dtype).removeprefix("mlx.core.")


@dataclass(frozen=True)
class Limits:
    """What one shard accepts: `vocab` token ids, activations `width` wide, `max_requests`
    requests with state at once (None: not known, not checked)."""

    vocab: int | None
    width: int | None
    first: bool
    max_requests: int

    @staticmethod
    def of(model: ShardModel, max_requests: int) -> Limits:
        return Limits(vocab_size(model), hidden_size(model), model.is_first, max_requests)

    def tokens(self, f: Forward) -> str | None:
        if not f.tokens:
            return f"step {f.seq} of {f.rid} has no tokens"
        if self.vocab is not None and max(f.tokens) >= self.vocab:
            return f"token id {max(f.tokens)} of {f.rid} is outside the vocabulary of {self.vocab}"
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


class Screen:
    """Sorts the parts of a pass into those that may run and those that fail before any cache is
    touched, each with why. `requests` are the requests with state on the shard."""

    def __init__(self, limits: Limits, requests: Collection[str]) -> None:
        self.limits = limits
        self.requests = requests
        self.seen: set[str] = set()
        self.new = 0  # requests a single step starts here

    def bad(self, part: Forward | ForwardBatch) -> str | None:
        """Why `part` may not run (its requests fail), or None; a part that may run counts."""
        lim = self.limits
        if isinstance(part, Forward):
            rows: Sequence[Forward] = (part,)
            why = lim.activations(part.h, 1, len(part.tokens)) if part.tokens else None
        else:
            rows = part.rows
            why = lim.activations(part.h, len(rows), 1)
        rids = [r.rid for r in rows]
        if len(set(rids)) != len(rids) or self.seen & set(rids):
            return f"a pass holds two steps of one request ({', '.join(sorted(set(rids)))})"
        for r in rows:
            why = why or lim.tokens(r)
            if isinstance(part, ForwardBatch) and r.rid not in self.requests:
                why = why or f"no state for request {r.rid} at step {r.seq}"
            if isinstance(part, ForwardBatch) and len(r.tokens) != 1:
                why = why or f"a batched step of {r.rid} carries {len(r.tokens)} tokens"
        fresh = isinstance(part, Forward) and part.rid not in self.requests
        if fresh and len(self.requests) + self.new >= lim.max_requests:
            why = why or f"the shard keeps {lim.max_requests} requests at most"
        if why is None:
            self.seen.update(rids)
            self.new += fresh
        return why
