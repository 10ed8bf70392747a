"""A decode step built before its input arrives.

mlx-lm builds the next token's graph while the device computes the current one. A shard cannot:
its input comes around the ring first. So a shard whose only request just took a decode step
builds that request's next step at once, on a placeholder input, while it waits. When the input
comes, its bytes are written into the placeholder's buffer and the built graph is evaluated:
the same graph, so the same arithmetic, without the graph building on the ring's path.

The built graph updates shadows of the request's KV caches, lazy copies that cost nothing once
they replace the originals (MLX then reuses the buffers). If anything else comes first, the
shadows are dropped and the originals were never touched.

Where gates work (MLX on CUDA, `gate`), the step is also launched at once, held on the device
until its input is in: then not even MLX's encoding of the step is left on the ring's path. A
launched step runs on the request's own caches (shadows would be copied: the originals are
still referenced when it runs); if it is not used, `take_back` returns the caches' offsets, and
what it wrote past them the next step overwrites. A convoy's next pass (several requests whose
merged caches stay together, `shard.Convoys`) is launched the same way when it holds every
request of the shard.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxring.backends.cuda import gate
from mlxring.model.sharded import ShardModel
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Forward, ForwardBatch, Tensor, rows_of


@dataclass(frozen=True)
class Slot:
    """Where a step's input is to be written: the placeholder, and with a gate (`gate`) the
    flag that lets the launched step run."""

    rows: tuple[tuple[str, int], ...]  # (request, step) of each row, in the caches' order
    marks: tuple[Any, ...]  # where each cache stood before the step (see `take_back`)
    buf: mx.array  # the placeholder; the input is written into its buffer
    host: np.ndarray[Any, Any]  # the host's view of that buffer, taken before any launch
    dtype: mx.Dtype  # the input's dtype (the buffer holds its bits as a numpy-friendly dtype)
    flag: gate.Flag | None


@dataclass(frozen=True)
class Ahead:
    slot: Slot
    caches: list[Any]  # the caches the graph updates: shadows, or the request's own when gated
    h: mx.array  # the built output: unevaluated, or launched when gated
    status: mx.array | None  # the gate's status (gate.OPEN once it let the input through)


@dataclass(frozen=True)
class Launch:
    """A gated step whose building and launch run on the compute thread."""

    slot: Slot
    caches: list[Any]  # the request's own, which the step advances
    task: asyncio.Future[Ahead]


def _slot(shape: Sequence[int], np_dtype: type[np.generic]) -> mx.array:
    # From numpy, so it is a dense buffer of its own (not a broadcast constant).
    slot = mx.array(np.zeros(tuple(shape), dtype=np_dtype))
    mx.eval(slot)
    return slot


def _writable(slot: mx.array) -> np.ndarray[Any, Any]:
    view = np.array(slot, copy=False)  # numpy 2 raises rather than copy
    if not view.flags.writeable:
        raise ValueError("read-only")
    return view


@functools.cache
def placeholders_work() -> bool:
    """Whether bytes written into an array's buffer after a graph was built on it reach that
    graph. They do on the CPU, on Apple silicon's shared memory and in CUDA's managed memory
    (measured on an H200); wherever they do not, no step is built ahead."""
    try:
        slot = _slot((2,), np.int32)
        out = slot + 1
        _writable(slot)[:] = (5, 6)
        mx.eval(out)
        return bool(out.tolist() == [6, 7])
    except Exception:  # noqa: BLE001 - any failure means: do not build ahead
        return False


def can_build(caches: Sequence[Any]) -> bool:
    return bool(caches) and all(
        type(c) in (KVCache, BatchKVCache) and c.keys is not None for c in caches
    )


def input_of(
    f: Forward | ForwardBatch, rows: int, first: bool
) -> tuple[tuple[int, ...], mx.Dtype] | None:
    """The shape and dtype of the input that the next decode step of `f`'s `rows` requests
    brings to a shard (token ids on the first); None when `f` carries no activations to go by."""
    if first:
        return (rows, 1), mx.int32
    if isinstance(f.h, Tensor):
        return f.h.shape, wire.DTYPES[f.h.dtype][0]
    if f.h is not None:
        return tuple(f.h.shape), f.h.dtype
    return None


def place(
    rows: Sequence[tuple[str, int]],
    caches: Sequence[Any],
    shape: Sequence[int],
    dtype: mx.Dtype,
    gated: bool,
) -> Slot:
    """The placeholder for the step of `rows` ((request, step) pairs), made on the thread that
    will write into it."""
    np_dtype = wire.DTYPES[wire.dtype_name(dtype)][1]
    buf = _slot(shape, np_dtype)
    flag = gate.new_flag() if gated else None
    return Slot(tuple(rows), tuple(map(_mark, caches)), buf, _writable(buf), dtype, flag)


def _mark(c: Any) -> Any:
    # A batch cache counts its steps in `_idx` beside its per-row offsets (an immutable array,
    # so keeping it keeps its value).
    return (c.offset, c.state[4]) if isinstance(c, BatchKVCache) else c.offset


def build(model: ShardModel, caches: Sequence[Any], slot: Slot) -> Ahead:
    """The step on `slot`'s placeholder; with a flag, behind a gate and launched."""
    inp, status = slot.buf, None
    if slot.flag is None:
        updated = [_shadow(c) for c in caches]
    else:
        updated = list(caches)
        inp, status = gate.gate(inp, slot.flag)
    if inp.dtype != slot.dtype:
        inp = inp.view(slot.dtype)
    h = model(inp, updated, defer=True)
    if status is not None:
        # Arrays belong to the stream of the thread that made them: everything the launch
        # leaves in the caches (a batch cache's new offsets are not inputs of `h`) is
        # scheduled with it, so the loop's thread may use them.
        mx.async_eval(h, status, [c.state for c in updated if isinstance(c, BatchKVCache)])
    return Ahead(slot, updated, h, status)


def _shadow(c: KVCache) -> KVCache:
    s = KVCache()
    keys, values, offset = c.state
    s.state = (mx.array(keys), mx.array(values), offset)
    return s


def take_back(caches: Sequence[Any], slot: Slot) -> None:
    """Undo a launched step's advance of the request's caches (cancelled, failed, or its gate
    gave up)."""
    for c, mark in zip(caches, slot.marks, strict=True):
        if isinstance(c, BatchKVCache):
            keys, values, _, left_padding, _ = c.state
            offset, idx = mark
            c.state = (keys, values, offset, left_padding, idx)
        else:
            c.offset = mark


def fill(slot: Slot, parts: Sequence[Forward | ForwardBatch], first: bool) -> bool:
    """Write the input of `parts` (the rows of `slot`) into the placeholder; False when it does
    not fit (then drop it)."""
    view = slot.host
    if first:
        tokens = [t for r in rows_of(parts) for t in r.tokens]
        if view.size != len(tokens):
            return False
        view.reshape(-1)[:] = tokens
        return True
    if len(parts) != 1:  # activations of several messages: not launched for (see shard)
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
