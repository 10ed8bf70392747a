"""Frame cost: encode+decode of a [1, 4096] bf16 activation, and the loopback round trip of
one such frame through a real link (Peer -> Listener -> back), p50 / p99.

    .venv/bin/python benchmarks/wire_bench.py [--hidden 4096] [--n 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import mlx.core as mx

from mlxring import wire
from mlxring.link import LinkSettings, Listener, Peer
from mlxring.messages import Forward, Message, Tensor


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def codec(hidden: int, n: int) -> dict[str, float]:
    h = mx.random.normal((1, 1, hidden)).astype(mx.bfloat16)
    mx.eval(h)
    f = Forward("0123456789abcdef", 17, (1234,), True, h=h, sent=1.0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        parts = wire.encode(f)
        body = b"".join(bytes(p) for p in parts)[4:]
        got = wire.decode(body)
        times.append(time.perf_counter() - t0)
    assert isinstance(got, Forward) and isinstance(got.h, Tensor)
    assert mx.array_equal(wire.to_array(got.h), h).item()
    return {"codec_us_p50": pct(times, 50) * 1e6, "codec_us_p99": pct(times, 99) * 1e6}


async def round_trip(hidden: int, n: int) -> dict[str, float]:
    """A -> B over one link and B -> A over another: the time of one ring hop there and back."""
    s = dict(cluster="bench", heartbeat_s=1.0, down_after_s=5.0)
    h = mx.random.normal((1, 1, hidden)).astype(mx.bfloat16)
    mx.eval(h)
    back: asyncio.Queue[Message] = asyncio.Queue()
    port_b, port_a = 47311, 47312
    to_a = Peer(LinkSettings(node="b", **s), "a", lambda: ("127.0.0.1", port_a))  # type: ignore[arg-type]

    def at_b(msg: Message, peer: str) -> None:
        asyncio.get_running_loop().create_task(to_a.send(msg))  # relay as received

    lb = Listener(LinkSettings(node="b", **s), "127.0.0.1", port_b, at_b)  # type: ignore[arg-type]
    la = Listener(LinkSettings(node="a", **s), "127.0.0.1", port_a, lambda m, p: back.put_nowait(m))  # type: ignore[arg-type]
    await lb.start()
    await la.start()
    to_b = Peer(LinkSettings(node="a", **s), "b", lambda: ("127.0.0.1", port_b))  # type: ignore[arg-type]
    to_a.start()
    to_b.start()
    assert await to_b.wait_up(5) and await to_a.wait_up(5)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await to_b.send(Forward("r", i, (1,), True, h=h))
        await back.get()
        times.append(time.perf_counter() - t0)
    for x in (to_a, to_b):
        await x.stop()
    await la.stop()
    await lb.stop()
    return {
        "hop_us_p50": pct(times, 50) / 2 * 1e6,
        "hop_us_p99": pct(times, 99) / 2 * 1e6,
        "round_trip_us_mean": statistics.mean(times) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out = {
        "hidden": args.hidden,
        **codec(args.hidden, args.n),
        **asyncio.run(round_trip(args.hidden, args.n)),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>20}: {v:.1f}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
