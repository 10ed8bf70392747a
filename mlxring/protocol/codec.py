"""The frame codec: `| u32 big-endian length N | N bytes: msgpack map |`.

A message is a map of its dataclass's fields under their own names, plus `type` (its tag in
`TAGS`); nested dataclasses (a Forward's SamplingParams, a Probe's NodeStats, a batch's rows)
are maps too, tuples are arrays, and a field that is None is left out. `schema` derives each
type's encoder and decoder once from its fields and type hints (`messages.py`), so a field is
defined in one place. Decoding is strict: a missing field (unless its type allows None) or one
of the wrong type is a FrameError naming the frame type and the field; unknown keys are ignored.

Tensors travel as their raw bytes in the map's last key, `data`, after `dtype` and `shape`:
bf16 stays bf16 (viewed as uint16 to cross the buffer protocol) and the payload is handed to the
socket as a view of the mx.array's own memory, never copied into the msgpack buffer.
"""

from __future__ import annotations

import math
import struct
from typing import Any, cast

import mlx.core as mx
import msgpack
import numpy as np

from mlxring.fields import FieldErrors, Fields, Kind
from mlxring.protocol.messages import (
    End,
    Failure,
    Forward,
    ForwardBatch,
    Hello,
    Message,
    Ping,
    Pong,
    Probe,
    Proof,
    Tensor,
    Token,
)
from mlxring.protocol.schema import schema

PROTOCOL_VERSION = 6  # 6: prompt-cache fields (Forward.reuse, End.keep); 5: SPAKE2 handshake
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
PREFIX = struct.Struct(">I")

# mx dtype name -> (mx dtype, numpy dtype of the bytes as they cross the buffer protocol)
DTYPES: dict[str, tuple[mx.Dtype, type[np.generic]]] = {
    "bfloat16": (mx.bfloat16, np.uint16),
    "float16": (mx.float16, np.float16),
    "float32": (mx.float32, np.float32),
    "int32": (mx.int32, np.int32),
    "uint32": (mx.uint32, np.uint32),
}
_DTYPE_NAMES = {mx_dtype: name for name, (mx_dtype, _) in DTYPES.items()}


def dtype_name(dtype: mx.Dtype) -> str:
    """The wire's name of an mx dtype."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise FrameError(f"cannot send dtype {dtype}")
    return name


_ITEMSIZE = {name: np.dtype(np_dtype).itemsize for name, (_, np_dtype) in DTYPES.items()}


class FrameError(Exception):
    """A frame that cannot be decoded; the connection that sent it is closed."""


# --- the frame of each message type ----------------------------------------------------------

#: The `type` of each message's frame.
TAGS: dict[type, str] = {
    Forward: "fwd",
    ForwardBatch: "fwdb",
    Token: "tok",
    End: "end",
    Failure: "fail",
    Ping: "ping",
    Pong: "pong",
    Hello: "hello",
    Proof: "proof",
    Probe: "probe",
}


class _FrameErrors(FieldErrors):
    """The fields reader's mistakes as FrameErrors; `decode` puts the frame type in front."""

    def invalid(self, path: str, message: str) -> FrameError:
        return FrameError(f"'{path}': {message}")

    def missing(self, path: str) -> FrameError:
        return FrameError(f"'{path}' is missing")

    def wrong_type(self, path: str, kind: Kind, value: Any) -> Exception:
        if kind == "finite number":
            return super().wrong_type(path, kind, value)
        return FrameError(f"'{path}' has type {type(value).__name__}")


_ERRORS = _FrameErrors()
_SCHEMAS = {cls: schema(cls) for cls in TAGS}
_BY_TAG = {tag: _SCHEMAS[cls] for cls, tag in TAGS.items()}


# --- encoding -----------------------------------------------------------------------------------


def _buffer(a: mx.array) -> memoryview:
    # mx.array implements the buffer protocol; its stubs do not say so.
    return memoryview(cast(Any, a))


def tensor_view(h: mx.array) -> tuple[str, tuple[int, ...], memoryview]:
    """The dtype name, shape and a zero-copy byte view of an mx.array.

    mlx exports bf16 through the buffer protocol with its own format code; cast to plain bytes
    it is exactly the uint16 view, without the cost of an mlx view op and its eval."""
    name = dtype_name(h.dtype)
    mx.eval(h)
    view = _buffer(h)
    if not view.c_contiguous:
        h = mx.contiguous(h)
        mx.eval(h)
        view = _buffer(h)
    return name, tuple(h.shape), view.cast("B")


def encode(msg: Message) -> list[bytes | memoryview]:
    """The buffers of one frame, for `transport.writelines` (the tensor payload is not copied)."""
    cls = type(msg)
    if cls not in TAGS:
        raise FrameError(f"cannot encode {cls.__name__}")
    form = _SCHEMAS[cls]
    m = form.to_map(msg, TAGS[cls])
    h = getattr(msg, form.tensor) if form.tensor is not None else None
    if h is None:
        body = msgpack.packb(m)
        return [PREFIX.pack(len(body)) + body]
    if isinstance(h, Tensor):  # relayed as received, never made into an array
        dtype, shape, payload = h.dtype, h.shape, memoryview(h.data)
    else:
        dtype, shape, payload = tensor_view(h)
    m["dtype"] = dtype
    m["shape"] = shape
    body = msgpack.packb(m)
    # The map is packed whole, then its header is made one entry longer for `data`, whose
    # payload follows as its own buffer.
    skip = len(_map_header(len(m)))
    header = b"".join(
        (_map_header(len(m) + 1), body[skip:], _DATA_KEY, _bin_header(payload.nbytes))
    )
    return [PREFIX.pack(len(header) + payload.nbytes) + header, payload]


_DATA_KEY = msgpack.packb("data")


def _map_header(n: int) -> bytes:
    """msgpack's fixmap / map 16 header."""
    return bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header, so the payload itself can follow as a separate buffer."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_bytes(msg: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(msg))


# --- received tensors ---------------------------------------------------------------------------


def _tensor(r: Fields) -> Tensor | None:
    """The tensor of a map that carries one (`dtype`, `shape`, `data`), else None."""
    if "data" not in r.data:
        return None
    name = r.string("dtype")
    if name not in DTYPES:
        raise r.error("dtype", f"unknown dtype {name!r}")
    shape = r.integers("shape", lo=0)
    data = r.binary("data")
    if math.prod(shape) * _ITEMSIZE[name] != len(data):
        raise r.error("data", f"{len(data)} bytes do not fill shape {list(shape)} of {name}")
    return Tensor(name, shape, data)


def to_array(t: Tensor) -> mx.array:
    """The mx.array of received tensor bytes (one copy, no dtype conversion)."""
    mx_dtype, np_dtype = DTYPES[t.dtype]
    arr = mx.array(np.frombuffer(t.data, dtype=np_dtype)).reshape(t.shape)
    return arr.view(mx_dtype) if arr.dtype != mx_dtype else arr


# --- decoding -----------------------------------------------------------------------------------


def decode(body: bytes | bytearray | memoryview) -> Message:
    """One frame's body (without the length prefix) back into its message."""
    try:
        m = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise FrameError(f"malformed msgpack: {e}") from None
    if not isinstance(m, dict):
        raise FrameError(f"frame is a {type(m).__name__}, not a map")
    kind = m.get("type")
    form = _BY_TAG.get(kind) if isinstance(kind, str) else None
    if form is None:
        raise FrameError(f"unknown frame type {kind!r}")
    try:
        msg: Message = form.read(Fields(m, _ERRORS), _tensor)
        if isinstance(msg, ForwardBatch):
            _check_batch(msg)
        return msg
    except FrameError as e:
        raise FrameError(f"{kind} frame: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise FrameError(f"{kind} frame: {e}") from None


def _check_batch(b: ForwardBatch) -> None:
    if not b.rows:
        raise FrameError("'rows' must not be empty")
    h = b.h
    if isinstance(h, Tensor) and (len(h.shape) != 3 or h.shape[0] != len(b.rows)):
        raise FrameError(f"{len(b.rows)} rows but a tensor of shape {list(h.shape)}")
