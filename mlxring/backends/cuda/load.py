"""Received tensor bytes to a CUDA device in one transfer.

MLX's CUDA build keeps an array made from host memory in managed memory, whose pages then reach
the GPU one fault at a time (about 2 GB/s: 4 ms for a 2048-token chunk of a 2048-wide model).
Its Load primitive instead copies the bytes to device memory in one transfer, so there a large
tensor is read by mx.load from a file-like view of the bytes.
"""

from __future__ import annotations

import struct
from typing import Any, cast

import mlx.core as mx
import numpy as np

from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Tensor

# Received tensors at least this large go to the device through mx.load: a prompt chunk's
# activations. Decode passes (one position a row, at most max_batch = 32 rows, 512 KiB for an
# 8192-wide model) cost less the plain way: through mx.load, a pass of 16 rows of a 2048-wide
# model (64 KiB) makes the ring decode slower at concurrency 16.
LOAD_MIN_BYTES = 1 << 20

_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def to_array(t: Tensor) -> mx.array:
    """The mx.array of received tensor bytes (one copy, no dtype conversion)."""
    if len(t.data) < LOAD_MIN_BYTES:
        return wire.to_array(t)
    mx_dtype = wire.DTYPES[t.dtype][0]
    arr = load_array(t)
    return arr.view(mx_dtype) if arr.dtype != mx_dtype else arr


def load_array(t: Tensor) -> mx.array:
    """The tensor read by mx.load as an npy stream (as the wire's dtype, bf16 as uint16)."""
    descr = np.dtype(wire.DTYPES[t.dtype][1]).newbyteorder("<").str
    fields = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {t.shape!r}, }}"
    pad = -(len(_NPY_MAGIC) + 2 + len(fields) + 1) % 64  # the npy format aligns data to 64
    header = fields + " " * pad + "\n"
    stream = _JoinedReader(_NPY_MAGIC + struct.pack("<H", len(header)) + header.encode(), t.data)
    return cast(mx.array, mx.load(cast(Any, stream), format="npy"))


class _JoinedReader:
    """A read-only binary file over two byte strings, read as one without joining them."""

    closed = False

    def __init__(self, head: bytes, body: bytes) -> None:
        self._head = memoryview(head)
        self._body = memoryview(body).cast("B")
        self._size = len(self._head) + len(self._body)
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (0, self._pos, self._size)[whence] + offset
        return self._pos

    def readinto(self, buf: Any) -> int:
        out = memoryview(buf).cast("B")
        n = 0
        while n < len(out) and self._pos < self._size:
            if self._pos < len(self._head):
                part = self._head[self._pos : self._pos + len(out) - n]
            else:
                start = self._pos - len(self._head)
                part = self._body[start : start + len(out) - n]
            out[n : n + len(part)] = part
            n += len(part)
            self._pos += len(part)
        return n
