"""The frame codec: `| u32 big-endian length N | N bytes: msgpack map |`.

Tensors travel as their raw bytes in the map's last key, `data`: bf16 stays bf16 (viewed as
uint16 to cross the buffer protocol) and the payload is handed to the socket as a view of the
mx.array's own memory, never copied into the msgpack buffer.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
import msgpack
import numpy as np

from mlxring.protocol.messages import (
    End,
    Failure,
    Forward,
    ForwardBatch,
    Hello,
    Message,
    NodeStats,
    Ping,
    Pong,
    Probe,
    Proof,
    SamplingParams,
    Tensor,
    Token,
)

PROTOCOL_VERSION = 2
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


def _params_map(p: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "min_p": p.min_p,
        "repetition_penalty": p.repetition_penalty,
        "repetition_context_size": p.repetition_context_size,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "logit_bias": [list(kv) for kv in p.logit_bias],
        "seed": p.seed,
        "logprobs": p.logprobs,
    }


def _to_map(msg: Message) -> dict[str, Any]:
    match msg:
        case Forward():
            m: dict[str, Any] = {
                "type": "fwd",
                "rid": msg.rid,
                "seq": msg.seq,
                "tokens": list(msg.tokens),
                "sample": msg.sample,
                "layer": msg.layer,
                "spent": msg.spent,
                "hops": msg.hops,
            }
            if msg.params is not None:
                m["params"] = _params_map(msg.params)
            return m
        case ForwardBatch():
            return {"type": "fwdb", "rows": [_to_map(r) for r in msg.rows]}
        case Token():
            return {
                "type": "tok",
                "rid": msg.rid,
                "seq": msg.seq,
                "token": msg.token,
                "logprob": msg.logprob,
                "top": [list(kv) for kv in msg.top_logprobs],
                "spent": msg.spent,
                "hops": msg.hops,
            }
        case End():
            return {"type": "end", "rid": msg.rid, "reason": msg.reason}
        case Failure():
            return {"type": "fail", "rid": msg.rid, "message": msg.message, "origin": msg.origin}
        case Ping():
            return {"type": "ping", "sent": msg.sent}
        case Pong():
            return {"type": "pong", "sent": msg.sent}
        case Hello():
            return {
                "type": "hello",
                "version": msg.version,
                "cluster": msg.cluster,
                "node": msg.node,
                "nonce": msg.nonce,
                "proof": msg.proof,
            }
        case Proof():
            return {"type": "proof", "proof": msg.proof}
        case Probe():
            return {
                "type": "probe",
                "origin": msg.origin,
                "sent": msg.sent,
                "hops": [list(h) for h in msg.hops],
                "stats": [
                    [
                        s.name,
                        s.active_bytes,
                        s.peak_bytes,
                        s.total_bytes,
                        s.busy_s,
                        s.steps,
                        s.requests,
                        s.decode_busy_s,
                        s.decode_steps,
                    ]
                    for s in msg.stats
                ],
            }
    raise FrameError(f"cannot encode {type(msg).__name__}")


def encode(msg: Message) -> list[bytes | memoryview]:
    """The buffers of one frame, for `transport.writelines` (the tensor payload is not copied)."""
    m = _to_map(msg)
    packer = msgpack.Packer()
    payload: memoryview | None = None
    if isinstance(msg, Forward | ForwardBatch) and msg.h is not None:
        if isinstance(msg.h, Tensor):  # relayed as received, never made into an array
            dtype, shape, payload = msg.h.dtype, msg.h.shape, memoryview(msg.h.data)
        else:
            dtype, shape, payload = tensor_view(msg.h)
        m["dtype"] = dtype
        m["shape"] = list(shape)
    parts = [packer.pack_map_header(len(m) + (payload is not None))]
    for k, v in m.items():
        parts.append(packer.pack(k))
        parts.append(packer.pack(v))
    if payload is None:
        header = b"".join(parts)
        return [PREFIX.pack(len(header)) + header]
    parts.append(packer.pack("data"))
    parts.append(_bin_header(payload.nbytes))
    header = b"".join(parts)
    return [PREFIX.pack(len(header) + payload.nbytes) + header, payload]


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header, so the payload itself can follow as a separate buffer."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_bytes(msg: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(msg))


# --- decoding -----------------------------------------------------------------------------------


def _get(m: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    if key not in m:
        if optional:
            return None
        raise FrameError(f"{m.get('type')} frame without '{key}'")
    v = m[key]
    if optional and v is None:
        return None
    # bool is an int in Python; a flag is never a number here and a number never a flag.
    if not isinstance(v, kind) or (isinstance(v, bool) and bool not in _as_tuple(kind)):
        raise FrameError(f"{m.get('type')} frame: '{key}' has type {type(v).__name__}")
    return v


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


_NUM = (int, float)


def _pairs(v: Any, what: str) -> tuple[tuple[int, float], ...]:
    if not isinstance(v, list | tuple):
        raise FrameError(f"{what}: expected a list of pairs")
    out = []
    for kv in v:
        if (
            not isinstance(kv, list | tuple)
            or len(kv) != 2
            or not isinstance(kv[0], int)
            or not isinstance(kv[1], _NUM)
        ):
            raise FrameError(f"{what}: expected [int, number] pairs")
        out.append((int(kv[0]), float(kv[1])))
    return tuple(out)


def _params(v: Any) -> SamplingParams:
    if not isinstance(v, dict):
        raise FrameError("fwd frame: 'params' is not a map")
    v = {**v, "type": "params"}
    logprobs = _get(v, "logprobs", int, optional=True)
    return SamplingParams(
        temperature=float(_get(v, "temperature", _NUM)),
        top_p=float(_get(v, "top_p", _NUM)),
        top_k=int(_get(v, "top_k", int)),
        min_p=float(_get(v, "min_p", _NUM)),
        repetition_penalty=_opt_float(_get(v, "repetition_penalty", _NUM, optional=True)),
        repetition_context_size=int(_get(v, "repetition_context_size", int)),
        presence_penalty=_opt_float(_get(v, "presence_penalty", _NUM, optional=True)),
        frequency_penalty=_opt_float(_get(v, "frequency_penalty", _NUM, optional=True)),
        logit_bias=_pairs(_get(v, "logit_bias", list), "params.logit_bias"),
        seed=_get(v, "seed", int, optional=True),
        logprobs=logprobs,
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _tensor(m: dict[str, Any]) -> Tensor | None:
    if "data" not in m:
        return None
    name = _get(m, "dtype", str)
    if name not in DTYPES:
        raise FrameError(f"fwd frame: unknown dtype {name!r}")
    shape = _get(m, "shape", list)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FrameError("fwd frame: bad shape")
    data = _get(m, "data", bytes)
    if math.prod(shape) * _ITEMSIZE[name] != len(data):
        raise FrameError(f"fwd frame: {len(data)} bytes do not fill shape {shape} of {name}")
    return Tensor(name, tuple(shape), data)


def to_array(t: Tensor) -> mx.array:
    """The mx.array of received tensor bytes (one copy, no dtype conversion)."""
    mx_dtype, np_dtype = DTYPES[t.dtype]
    arr = mx.array(np.frombuffer(t.data, dtype=np_dtype)).reshape(t.shape)
    return arr.view(mx_dtype) if arr.dtype != mx_dtype else arr


def _tokens(v: Any) -> tuple[int, ...]:
    # map/set/min run in C: a 2 048-token prompt chunk is checked in microseconds.
    if v and (set(map(type, v)) != {int} or min(v) < 0):
        raise FrameError("fwd frame: tokens must be non-negative integers")
    return tuple(v)


def _forward(m: dict[str, Any]) -> Forward:
    params = m.get("params")
    spent, hops = _timing(m)
    return Forward(
        rid=_get(m, "rid", str),
        seq=_get(m, "seq", int),
        tokens=_tokens(_get(m, "tokens", list)),
        sample=_get(m, "sample", bool),
        h=_tensor(m),
        layer=_get(m, "layer", int),
        params=None if params is None else _params(params),
        spent=spent,
        hops=hops,
    )


def _timing(m: dict[str, Any]) -> tuple[float, int]:
    spent, hops = float(_get(m, "spent", _NUM)), _get(m, "hops", int)
    if spent < 0 or hops < 0:
        raise FrameError(f"{m.get('type')} frame: negative spent or hops")
    return spent, hops


def _forward_batch(m: dict[str, Any]) -> ForwardBatch:
    rows = _get(m, "rows", list)
    if not rows or not all(isinstance(r, dict) and r.get("type") == "fwd" for r in rows):
        raise FrameError("fwdb frame: rows must be a non-empty list of fwd maps")
    h = _tensor(m)
    if h is not None and (len(h.shape) != 3 or h.shape[0] != len(rows)):
        raise FrameError(f"fwdb frame: {len(rows)} rows but a tensor of shape {list(h.shape)}")
    return ForwardBatch(tuple(_forward(r) for r in rows), h)


def _token(m: dict[str, Any]) -> Token:
    spent, hops = _timing(m)
    return Token(
        rid=_get(m, "rid", str),
        seq=_get(m, "seq", int),
        token=_get(m, "token", int),
        logprob=float(_get(m, "logprob", _NUM)),
        top_logprobs=_pairs(_get(m, "top", list), "tok.top"),
        spent=spent,
        hops=hops,
    )


_DECODERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "fwd": _forward,
    "fwdb": _forward_batch,
    "tok": _token,
    "end": lambda m: End(rid=_get(m, "rid", str), reason=_get(m, "reason", str)),
    "fail": lambda m: Failure(
        rid=_get(m, "rid", str), message=_get(m, "message", str), origin=_get(m, "origin", str)
    ),
    "ping": lambda m: Ping(sent=float(_get(m, "sent", _NUM))),
    "pong": lambda m: Pong(sent=float(_get(m, "sent", _NUM))),
    "hello": lambda m: Hello(
        version=_get(m, "version", int),
        cluster=_get(m, "cluster", str),
        node=_get(m, "node", str),
        nonce=_get(m, "nonce", bytes),
        proof=_get(m, "proof", bytes),
    ),
    "proof": lambda m: Proof(proof=_get(m, "proof", bytes)),
    "probe": lambda m: Probe(
        origin=_get(m, "origin", str),
        sent=float(_get(m, "sent", _NUM)),
        hops=_hops(m),
        stats=_stats(m),
    ),
}


def _stats(m: dict[str, Any]) -> tuple[NodeStats, ...]:
    out = []
    for s in _get(m, "stats", list):
        if (
            not isinstance(s, list)
            or len(s) != 9
            or not isinstance(s[0], str)
            or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in (*s[1:4], *s[5:7], s[8])
            )
            or not isinstance(s[4], _NUM)
            or not isinstance(s[7], _NUM)
        ):
            raise FrameError("probe frame: bad node stats")
        out.append(NodeStats(s[0], s[1], s[2], s[3], float(s[4]), s[5], s[6], float(s[7]), s[8]))
    return tuple(out)


def _hops(m: dict[str, Any]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for h in _get(m, "hops", list):
        if (
            not isinstance(h, list)
            or len(h) != 3
            or not isinstance(h[0], str)
            or not all(isinstance(x, int) for x in h[1:])
        ):
            raise FrameError("probe frame: hops must be [name, start, end] triples")
        out.append((h[0], int(h[1]), int(h[2])))
    return tuple(out)


def decode(body: bytes | bytearray | memoryview) -> Message:
    """One frame's body (without the length prefix) back into its message."""
    try:
        m = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise FrameError(f"malformed msgpack: {e}") from None
    if not isinstance(m, dict):
        raise FrameError(f"frame is a {type(m).__name__}, not a map")
    kind = m.get("type")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise FrameError(f"unknown frame type {kind!r}")
    try:
        return decoder(m)
    except FrameError:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise FrameError(f"{kind} frame: {e}") from None
