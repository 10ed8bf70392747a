"""A decode step built before its input arrives, on a placeholder input.

mlx-lm builds the next token's graph while the device computes the current one. A shard cannot:
its input comes around the ring first. So a shard whose only request just took a decode step
builds that request's next step at once, on a placeholder input, while it waits. When the input
comes, its bytes are written into the placeholder's buffer and the built graph is evaluated:
the same graph, so the same arithmetic, without the graph building on the ring's path.

The built graph updates shadows of the request's KV caches, lazy copies that cost nothing once
they replace the originals (MLX then reuses the buffers). If anything else comes first, the
shadows are dropped and the originals were never touched. Where MLX runs on CUDA, the step can
also be launched before its input exists (`backends.cuda.ahead`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxring.backends.base import Built, Offload, Parts, Rows
from mlxring.backends.plain import Plain
from mlxring.model.sharded import ShardModel
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Forward, ForwardBatch, Tensor, rows_of


@dataclass(frozen=True)
class Slot:
    """Where a step's input is to be written."""

    rows: Rows
    buf: mx.array  # the placeholder; the input is written into its buffer
    host: np.ndarray[Any, Any]  # the host's view of that buffer, taken before any launch
    dtype: mx.Dtype  # the input's dtype (the buffer holds its bits as a numpy-friendly dtype)
    first: bool  # the input is token ids (the first shard), not activations


@dataclass(frozen=True)
class Prebuilt:
    slot: Slot
    caches: list[Any]  # the shadows of the request's caches, which the graph updates
    h: mx.array  # the built output, unevaluated

    @property
    def rows(self) -> Rows:
        return self.slot.rows


def _buffer(shape: Sequence[int], np_dtype: type[np.generic]) -> mx.array:
    # From numpy, so it is a dense buffer of its own (not a broadcast constant).
    buf = mx.array(np.zeros(tuple(shape), dtype=np_dtype))
    mx.eval(buf)
    return buf


def _writable(buf: mx.array) -> np.ndarray[Any, Any]:
    view = np.array(buf, copy=False)  # numpy 2 raises rather than copy
    if not view.flags.writeable:
        raise ValueError("read-only")
    return view


@functools.cache
def placeholders_work() -> bool:
    """Whether bytes written into an array's buffer after a graph was built on it reach that
    graph. They do on the CPU, on Apple silicon's shared memory and in CUDA's managed memory
    (tests/test_gate.py checks it on CUDA); wherever they do not, no step is built ahead."""
    try:
        buf = _buffer((2,), np.int32)
        out = buf + 1
        _writable(buf)[:] = (5, 6)
        mx.eval(out)
        return bool(out.tolist() == [6, 7])
    except Exception:  # noqa: BLE001 - any failure means: do not build ahead
        return False


def can_build(caches: Sequence[Any]) -> bool:
    return bool(caches) and all(
        type(c) in (KVCache, BatchKVCache) and c.keys is not None for c in caches
    )


def input_of(
    f: Forward | ForwardBatch, rows: int, width: int, first: bool
) -> tuple[tuple[int, ...], mx.Dtype] | None:
    """The shape and dtype of the input that the next step of `f`'s `rows` requests brings to
    a shard, `width` positions a row (token ids on the first); None when `f` carries no
    activations to go by."""
    if first:
        return (rows, width), mx.int32
    if isinstance(f.h, Tensor):
        return f.h.shape, wire.DTYPES[f.h.dtype][0]
    if f.h is not None:
        return tuple(f.h.shape), f.h.dtype
    return None


def next_slot(model: ShardModel, parts: Parts, caches: list[Any]) -> Slot | None:
    """The placeholder for the next step of the rows of `parts`, as wide as theirs (a decode
    step's one position, or a step's token and drafts), where one can be built: a convoy's
    activations come as one ForwardBatch; on the first shard its tokens come one message per
    request, gathered into one pass as they are in `parts`."""
    rows = rows_of(parts)
    widths = {len(r.tokens) for r in rows}
    if not can_build(caches) or (len(parts) > 1 and not model.is_first) or len(widths) != 1:
        return None
    if len(rows) > 1 and widths != {1}:  # a convoy's rows of several positions: as they come
        return None
    spec = input_of(parts[0], len(rows), widths.pop(), model.is_first)
    if spec is None:
        return None
    return place([(r.rid, r.seq + 1) for r in rows], *spec, model.is_first)


def place(
    rows: Sequence[tuple[str, int]], shape: Sequence[int], dtype: mx.Dtype, first: bool
) -> Slot:
    """The placeholder for the step of `rows` ((request, step) pairs), made on the thread that
    will write into it."""
    np_dtype = wire.DTYPES[wire.dtype_name(dtype)][1]
    buf = _buffer(shape, np_dtype)
    return Slot(tuple(rows), buf, _writable(buf), dtype, first)


def forward(model: ShardModel, inp: mx.array, caches: list[Any], dtype: mx.Dtype) -> mx.array:
    """The step's graph on `inp` (the placeholder, or what lets it through), unevaluated."""
    if inp.dtype != dtype:
        inp = inp.view(dtype)
    return model(inp, caches, defer=True)


def build(model: ShardModel, caches: Sequence[Any], slot: Slot) -> Prebuilt:
    """The step on `slot`'s placeholder, on shadows of `caches`."""
    shadows = [_shadow(c) for c in caches]
    return Prebuilt(slot, shadows, forward(model, slot.buf, shadows, slot.dtype))


def _shadow(c: KVCache) -> KVCache:
    s = KVCache()
    keys, values, offset = c.state
    s.state = (mx.array(keys), mx.array(values), offset)
    return s


def fill(slot: Slot, parts: Parts) -> bool:
    """Write the input of `parts` (the rows of `slot`) into the placeholder; False when it does
    not fit (then drop it)."""
    view = slot.host
    if slot.first:
        tokens = [t for r in rows_of(parts) for t in r.tokens]
        if view.size != len(tokens):
            return False
        view.reshape(-1)[:] = tokens
        return True
    if len(parts) != 1:  # activations of several messages: never built for (see next_slot)
        return False
    h = parts[0].h
    if isinstance(h, Tensor):
        if h.dtype != wire.dtype_name(slot.dtype) or tuple(h.shape) != view.shape:
            return False
        view[...] = np.frombuffer(h.data, dtype=view.dtype).reshape(view.shape)
        return True
    if h is None or h.dtype != slot.dtype or tuple(h.shape) != view.shape:
        return False
    bits = h.view(slot.buf.dtype) if h.dtype != slot.buf.dtype else h
    view[...] = np.array(bits, copy=False)
    return True


class Placeholders(Plain):
    """A shard's lone request has its next decode step built on a placeholder while its token
    travels the ring (Apple silicon, the CPU, and CUDA without gates). A convoy's is not: its
    shadows would copy every merged cache."""

    def build(
        self, model: ShardModel, parts: Parts, caches: list[Any], offload: Offload
    ) -> Built | None:
        if len(rows_of(parts)) > 1:
            return None
        slot = next_slot(model, parts, caches)
        return None if slot is None else build(model, caches, slot)

    async def land(self, built: Built, parts: Parts) -> Built | None:
        assert isinstance(built, Prebuilt)
        return built if fill(built.slot, parts) else None

    def output(self, built: Built) -> tuple[mx.array, list[Any]] | None:
        assert isinstance(built, Prebuilt)
        return built.h, built.caches
