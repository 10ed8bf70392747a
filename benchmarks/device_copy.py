"""What a shard pays to take its input from the host and give its output back to it.

A shard in its own process gets its input as bytes off a socket and sends its output as bytes.
On Apple silicon the device reads and writes host memory as is. Elsewhere (MLX's CUDA build)
arrays live in device memory or in managed memory that pages move between host and device, so
each crossing may cost copies and page faults. This times one middle shard's forward pass with
its input resident (made on the device) or made from host bytes, and its output left on the
device or read as bytes, for a decode step (1 token) and a prompt chunk (T tokens). It also
times the crossings alone, and two ways around managed memory's page faults that mlxring does
not use: `mx.load` of the bytes (its Load primitive copies them to device memory itself) and a
bulk prefetch through the CUDA driver (where there is one):

    python benchmarks/device_copy.py --preset qwen3-1.7b --start 10 --end 19 --json
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load  # noqa: E402

from mlxring import backends  # noqa: E402
from mlxring.backends import placeholder  # noqa: E402
from mlxring.model.sharded import ShardModel  # noqa: E402
from mlxring.model.source import cache_dir  # noqa: E402
from mlxring.protocol import codec as wire  # noqa: E402
from mlxring.protocol.messages import Tensor  # noqa: E402


def timed(fn: Callable[[], object], n: int) -> float:
    """Median milliseconds of `fn` over n runs, after one warm-up."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


DEVICE, HOST = 1, 2  # CU_MEM_LOCATION_TYPE_DEVICE / _HOST


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def _driver() -> Any:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        fn = cuda.cuMemPrefetchAsync_v2
        fn.argtypes = [ctypes.c_uint64, ctypes.c_size_t, _Location, ctypes.c_uint, ctypes.c_void_p]
        return cuda
    except (OSError, AttributeError):
        return None


PREFETCH = _driver()


def prefetch(a: mx.array, where: int) -> None:
    """Move a managed array's pages in bulk (CUDA driver), then wait for it."""
    ptr = np.array(a.view(mx.uint8), copy=False).ctypes.data
    rc = PREFETCH.cuMemPrefetchAsync_v2(ptr, a.nbytes, _Location(where, 0), 0, None)
    if rc != 0:
        raise RuntimeError(f"cuMemPrefetchAsync_v2 -> {rc}")
    rc = PREFETCH.cuStreamSynchronize(None)
    if rc != 0:
        raise RuntimeError(f"cuStreamSynchronize -> {rc}")


def host_tensor(x: mx.array) -> Tensor:
    dtype, shape, view = wire.tensor_view(x)
    return Tensor(dtype, shape, bytes(view))


def measure(shard: ShardModel, t_len: int, context: int, n: int) -> dict[str, Any]:
    """One input length's timings (ms, medians of n)."""
    dim = int(shard.config["hidden_size"])
    x_dev = mx.random.normal((1, t_len, dim)).astype(mx.bfloat16)
    mx.eval(x_dev)
    x_host = host_tensor(x_dev)
    to_array = backends.pick(gates=False).to_array  # as a shard of this process takes its input
    grown = shard.make_cache()
    if t_len == 1:  # one growing cache, primed with context, as a decode step sees it
        mx.eval(shard(mx.random.normal((1, context, dim)).astype(mx.bfloat16), grown))

    def run(inp: str, out: str) -> None:
        x = x_dev if inp == "device" else to_array(x_host)
        y = shard(x, grown if t_len == 1 else shard.make_cache())
        mx.eval(y)
        if out == "host":
            bytes(wire.tensor_view(y)[2])

    # The crossings alone: host bytes to a device-usable array, a fresh device result to
    # host bytes, and ways around the page faults of managed memory.
    def to_device() -> None:
        mx.eval(to_array(x_host) * 1)

    def construct_only() -> None:
        mx.eval(to_array(x_host))

    npy = io.BytesIO()
    np.save(npy, np.frombuffer(x_host.data, np.uint16).reshape(x_dev.shape))
    npy_bytes = npy.getvalue()

    def to_device_load() -> None:
        # mx.load's Load primitive reads host bytes and copies them to the device itself.
        a = mx.load(io.BytesIO(npy_bytes), format="npy")
        assert isinstance(a, mx.array)
        mx.eval(a.view(mx.bfloat16) * 1)

    def to_device_prefetched() -> None:
        a = to_array(x_host)
        mx.eval(a)
        prefetch(a, DEVICE)
        mx.eval(a * 1)

    def to_host() -> None:
        b = x_dev * 1
        mx.eval(b)
        bytes(wire.tensor_view(b)[2])

    def view_only() -> None:  # the host view of a device result, one byte read per page
        b = x_dev * 1
        mx.eval(b)
        np.frombuffer(wire.tensor_view(b)[2], np.uint8)[::4096].sum()

    def to_host_prefetched() -> None:
        b = x_dev * 1
        mx.eval(b)
        wire.tensor_view(b)  # MLX moves a device buffer to managed memory here
        prefetch(b, HOST)
        bytes(wire.tensor_view(b)[2])

    def device_only() -> None:
        mx.eval(x_dev * 1)

    row: dict[str, Any] = {"tokens": t_len}
    for inp in ("device", "host"):
        for out in ("device", "host"):
            row[f"in_{inp}_out_{out}_ms"] = timed(functools.partial(run, inp, out), n)
    fns: list[Callable[[], object]] = [
        to_device,
        construct_only,
        to_device_load,
        to_host,
        view_only,
        device_only,
    ]
    if PREFETCH is not None:
        fns += [to_device_prefetched, to_host_prefetched]
    for fn in fns:
        try:
            row[f"{fn.__name__}_ms"] = timed(fn, n)
        except Exception as e:  # noqa: BLE001 - a variant this platform lacks
            row[f"{fn.__name__}_error"] = repr(e)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-1.7b")
    ap.add_argument("--start", type=int, default=10)
    ap.add_argument("--end", type=int, default=19)
    ap.add_argument("--tokens", default="1,2048", help="input lengths to time")
    ap.add_argument("--context", type=int, default=512, help="cached tokens for 1-token steps")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    path = cache_dir() / f"bench-qwen3-{args.preset}"
    if not (path / "config.json").exists():
        from mlxring.model.make import make_model

        make_model(path, family="qwen3", preset=args.preset)
    model, _ = load(str(path))[:2]
    config = json.loads((path / "config.json").read_text())
    shard = ShardModel(model, config, args.start, args.end)
    rows = [measure(shard, int(v), args.context, args.n) for v in args.tokens.split(",")]
    result = {
        "device": str(mx.default_device()),
        "shard": [args.start, args.end],
        "placeholders_work": placeholder.placeholders_work(),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['device']} shard {result['shard']}")
        print(f"placeholders_work={result['placeholders_work']}")
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
