"""Frame codec: bit-exact round trips of every dtype mlx models use, and clear rejection of junk."""

from __future__ import annotations

import dataclasses
import struct

import mlx.core as mx
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxring.backends.cuda.load import load_array
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import (
    End,
    Failure,
    Forward,
    ForwardBatch,
    Hello,
    NodeStats,
    Ping,
    Probe,
    SamplingParams,
    Tensor,
    Token,
)

NP_RAW = {
    "bfloat16": np.uint16,
    "float16": np.uint16,
    "float32": np.uint32,
    "int32": np.uint32,
    "uint32": np.uint32,
}


def roundtrip(msg: object) -> object:
    data = wire.encode_bytes(msg)  # type: ignore[arg-type]
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    return wire.decode(data[4:])


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(sorted(wire.DTYPES)),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_tensor_round_trip_is_bit_exact(dtype: str, shape: list[int], seed: int) -> None:
    # Random raw bit patterns (NaNs, infinities, subnormals included): every bit must survive.
    raw = np.random.default_rng(seed).integers(
        0, 2**16 if "16" in dtype else 2**32, size=shape, dtype=np.uint64
    )
    bits = raw.astype(NP_RAW[dtype])
    mx_dtype = wire.DTYPES[dtype][0]
    h = mx.array(bits).view(mx_dtype)
    got = roundtrip(Forward("r", 3, (1, 2), True, h=h))
    assert isinstance(got, Forward) and isinstance(got.h, Tensor)
    raw_dtype = mx.uint16 if "16" in dtype else mx.uint32
    arr = wire.to_array(got.h)
    assert arr.dtype == mx_dtype and tuple(arr.shape) == tuple(shape)
    assert np.array_equal(np.array(arr.view(raw_dtype)), bits)
    # The way large tensors reach a CUDA device (mx.load of an npy view), run here on the CPU.
    loaded = load_array(got.h)
    assert tuple(loaded.shape) == tuple(shape)
    assert np.array_equal(np.array(loaded.view(raw_dtype)), bits)


def test_bf16_payload_is_the_raw_bytes() -> None:
    h = mx.array([[1.0, -2.5, 3.140625]], dtype=mx.bfloat16)
    parts = wire.encode(Forward("r", 0, (5,), False, h=h))
    assert len(parts) == 2, "the tensor payload must be a separate buffer, not copied in"
    assert bytes(parts[1]) == np.array(h.view(mx.uint16)).tobytes()
    assert len(bytes(parts[1])) == 3 * 2  # 2 bytes per value: no float32 round trip


@settings(max_examples=60, deadline=None)
@given(
    rid=st.text(max_size=20),
    seq=st.integers(0, 2**31),
    tokens=st.lists(st.integers(0, 2**31), max_size=20),
    temp=st.floats(0, 2),
    bias=st.lists(st.tuples(st.integers(0, 1000), st.floats(-100, 100)), max_size=3),
    seed=st.none() | st.integers(0, 2**31),
    logprobs=st.none() | st.integers(0, 20),
)
def test_message_round_trips(
    rid: str,
    seq: int,
    tokens: list[int],
    temp: float,
    bias: list[tuple[int, float]],
    seed: int | None,
    logprobs: int | None,
) -> None:
    params = SamplingParams(temperature=temp, logit_bias=tuple(bias), seed=seed, logprobs=logprobs)
    for msg in [
        Forward(rid, seq, tuple(tokens), True, params=params, spent=1.5, hops=2),
        Token(rid, seq, 7, -0.25, ((7, -0.25), (3, -2.0)), 0.75, 3),
        End(rid, "cancelled"),
        Failure(rid, "boom", "n2"),
        Ping(2.0),
        Probe(
            "n0",
            1.0,
            (("n0", 0, 3), ("n1", 3, 7)),
            (NodeStats("n0", 10, 20, 30, 0.5, 7, 1, 0.25, 3), NodeStats("n1", 1, 2, 3, 4.0, 5, 0)),
        ),
        ForwardBatch((Forward(rid, seq, (1,), True, layer=2), Forward("b", 1, (2,), True))),
        Hello(1, "home", rid, b"\x00" * 16, b"proof"),
        Hello(5, "home", rid, b"\x00" * 16, pake=b"A" + b"\x01" * 32),
    ]:
        assert roundtrip(msg) == msg


def fields_of(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_messages_travel_as_maps_of_their_own_fields() -> None:
    """One definition per field: a frame's keys are its dataclass's field names, nested
    dataclasses (NodeStats, SamplingParams) are maps of theirs, and a None field is left out."""
    stats = NodeStats("n0", 10, 20, 30, 0.5, 7, 1, 0.25, 3)
    probe = msgpack.unpackb(wire.encode_bytes(Probe("n0", 1.0, (("n0", 0, 3),), (stats,)))[4:])
    assert probe == {
        "type": "probe",
        "origin": "n0",
        "sent": 1.0,
        "hops": [["n0", 0, 3]],
        "stats": [dataclasses.asdict(stats)],
    }
    params = SamplingParams(seed=3)
    fwd = msgpack.unpackb(wire.encode_bytes(Forward("r", 1, (5,), True, params=params))[4:])
    assert set(fwd) == {"type"} | fields_of(Forward) - {"h"}
    unset = {k for k, v in dataclasses.asdict(params).items() if v is None}
    assert set(fwd["params"]) == fields_of(SamplingParams) - unset
    tok = msgpack.unpackb(wire.encode_bytes(Token("r", 1, 2))[4:])
    assert set(tok) == {"type"} | fields_of(Token)


def test_a_batch_carries_one_tensor_row_per_row() -> None:
    h = mx.arange(8, dtype=mx.float32).reshape(2, 1, 4)
    rows = (Forward("a", 1, (1,), True, layer=2), Forward("b", 1, (2,), True, layer=2))
    parts = wire.encode(ForwardBatch(rows, h))
    assert len(parts) == 2  # the payload is its own buffer
    got = wire.decode(b"".join(bytes(p) for p in parts)[4:])
    assert isinstance(got, ForwardBatch) and got.rows == rows
    assert isinstance(got.h, Tensor) and got.h.shape == (2, 1, 4)
    assert mx.array_equal(wire.to_array(got.h), h).item()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_junk_bodies_raise_frame_error_only(body: bytes) -> None:
    try:
        wire.decode(body)
    except wire.FrameError:
        pass


# A well-formed fwd and tok map; each bad case below breaks exactly one thing.
FWD = {"type": "fwd", "rid": "r", "seq": 0, "tokens": [], "sample": True, "layer": 0,
       "reuse": "", "reused": 0, "draft": 0, "trim": 0, "spent": 0.0, "hops": 0}  # fmt: skip
TOK = {"type": "tok", "rid": "r", "seq": 0, "token": 1, "logprob": 0.0, "top_logprobs": [],
       "spent": 0.0, "hops": 0, "more": []}  # fmt: skip
TENSOR = {"dtype": "bfloat16", "shape": [1, 4], "data": b"\x00" * 8}


def test_the_base_maps_decode() -> None:
    assert isinstance(wire.decode(msgpack.packb(FWD)), Forward)
    assert isinstance(wire.decode(msgpack.packb({**FWD, **TENSOR})), Forward)
    assert isinstance(wire.decode(msgpack.packb(TOK)), Token)


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        ([1, 2, 3], "not a map"),
        ({"type": "nope"}, "unknown"),
        ({"type": "fwd", "rid": "r"}, "fwd frame: 'seq' is missing"),
        ({**FWD, "rid": None}, "fwd frame: 'rid' is missing"),
        ({**FWD, "rid": 5}, "fwd frame: 'rid' has type int"),
        ({**FWD, "tokens": [-1]}, r"fwd frame: 'tokens': expected integers >= 0"),
        ({**FWD, "tokens": [1, True]}, r"fwd frame: 'tokens': expected integers >= 0"),
        ({**FWD, "sample": 1}, "fwd frame: 'sample' has type int"),
        ({**FWD, "spent": -1.0}, "fwd frame: 'spent': must be >= 0, got -1"),
        ({**FWD, "spent": float("nan")}, "fwd frame: 'spent': expected a finite number"),
        ({**FWD, "hops": -2}, "fwd frame: 'hops': must be >= 0, got -2"),
        ({**FWD, "params": {"temperature": 0.0}}, "fwd frame: 'params.top_p' is missing"),
        ({**FWD, "params": [1]}, "fwd frame: 'params' has type list"),
        ({**FWD, **TENSOR, "data": b"\x00" * 6}, "bytes"),
        ({**FWD, **TENSOR, "dtype": "complex64"}, "unknown dtype"),
        ({**FWD, **TENSOR, "shape": [1, -4]}, "'shape': expected integers >= 0"),
        ({**TOK, "top_logprobs": [[1]]}, r"tok frame: 'top_logprobs\[0\]': expected 2 items"),
        ({**TOK, "top_logprobs": [[1, "x"]]}, r"'top_logprobs\[0\]\[1\]' has type str"),
        ({**TOK, "hops": -1}, "tok frame: 'hops': must be >= 0"),
        (
            {"type": "probe", "origin": "a", "sent": 0.0, "hops": [["a", 0]], "stats": []},
            r"probe frame: 'hops\[0\]': expected 3 items, got 2",
        ),
        (
            {"type": "probe", "origin": "a", "sent": 0.0, "hops": [], "stats": [{"name": "a"}]},
            r"probe frame: 'stats\[0\].active_bytes' is missing",
        ),
        ({"type": "fwdb", "rows": []}, "fwdb frame: 'rows' must not be empty"),
        ({"type": "fwdb", "rows": [FWD], **TENSOR}, r"1 rows but a tensor of shape \[1, 4\]"),
        ({"type": "fwdb", "rows": [{**FWD, "seq": "x"}]}, r"'rows\[0\].seq' has type str"),
    ],
)
def test_malformed_maps_are_rejected(obj: object, why: str) -> None:
    with pytest.raises(wire.FrameError, match=why):
        wire.decode(msgpack.packb(obj))
