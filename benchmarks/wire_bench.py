"""Frame cost: encode+decode of a [1, 4096] bf16 activation, and the loopback round trip of
one such frame through a real link (Peer -> Listener -> back), p50 / p99. `--tokens T` sends
[1, T, hidden] instead: a prompt chunk's activations. It also times encode and decode apart, per
call (best of 5 runs of n calls), for the messages every token carries: a decode step's
Forward (`fwd`), a request's first Forward with its sampling parameters and a 512-token prompt
chunk (`fwd_first`), a 16-row ForwardBatch (`fwdb16`) and a Token (`tok`). `--codec-only` skips
the round trip.

    .venv/bin/python benchmarks/wire_bench.py [--hidden 4096] [--tokens 1] [--n 2000] \
        [--processes] [--gap-ms 2] [--codec-only] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import mlx.core as mx

from mlxring.log import setup_logging
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import (
    Forward,
    ForwardBatch,
    Message,
    SamplingParams,
    Tensor,
    Token,
)
from mlxring.transport.link import LinkSettings, Listener, Peer


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def codec(hidden: int, tokens: int, n: int) -> dict[str, float]:
    h = mx.random.normal((1, tokens, hidden)).astype(mx.bfloat16)
    mx.eval(h)
    f = Forward("0123456789abcdef", 17, (1234,), True, h=h, spent=0.001, hops=1)
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


def best_us(fn: Callable[[], object], n: int) -> float:
    """Microseconds per call of `fn`: the best of 5 runs of n calls (the least disturbed)."""
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def codec_parts(hidden: int, n: int) -> dict[str, float]:
    """Encode and decode apart, per message kind."""
    rid = "0123456789abcdef"
    h1 = mx.random.normal((1, 1, hidden)).astype(mx.bfloat16)
    h16 = mx.random.normal((16, 1, hidden)).astype(mx.bfloat16)
    mx.eval(h1, h16)
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=7, logprobs=None)
    msgs: dict[str, Message] = {
        "fwd": Forward(rid, 17, (1234,), True, h=h1, layer=8, spent=0.001, hops=1),
        "fwd_first": Forward(rid, 0, tuple(range(512)), False, params=params),
        "fwdb16": ForwardBatch(
            tuple(
                Forward(f"{rid}{i}", 17, (i,), True, layer=8, spent=0.001, hops=1)
                for i in range(16)
            ),
            h16,
        ),
        "tok": Token(rid, 17, 1234, -0.5, (), 0.002, 2),
    }
    out = {}
    for name, msg in msgs.items():
        body = wire.encode_bytes(msg)[4:]
        assert isinstance(wire.decode(body), type(msg))
        out[f"{name}_encode_us"] = best_us(lambda m=msg: wire.encode(m), n)  # type: ignore[misc]
        out[f"{name}_decode_us"] = best_us(lambda b=body: wire.decode(b), n)  # type: ignore[misc]
    return out


def settings(node: str) -> LinkSettings:
    return LinkSettings(cluster="bench", node=node, heartbeat_s=1.0, down_after_s=5.0)


PORT_B, PORT_A = 47311, 47312


async def relay(port_in: int, port_out: int) -> None:
    """Node B: every frame that arrives on `port_in` goes straight back out to `port_out`."""
    to_a = Peer(settings("b"), "a", lambda: ("127.0.0.1", port_out))

    def at_b(msg: Message, peer: str) -> None:
        asyncio.get_running_loop().create_task(to_a.send(msg))  # relay as received

    lb = Listener(settings("b"), "127.0.0.1", port_in, at_b)
    await lb.start()
    to_a.start()
    try:
        await asyncio.Event().wait()
    finally:
        await to_a.stop()
        await lb.stop()


async def round_trip(
    hidden: int, tokens: int, n: int, processes: bool, gap_s: float
) -> dict[str, float]:
    """A -> B over one link and B -> A over another: the time of one ring hop there and back.
    B runs in this process, or (`processes`) in its own, as ring nodes do. With `gap_s`, A
    waits that long between round trips, as a node waits while the others compute: the hop then
    includes waking an idle process."""
    h = mx.random.normal((1, tokens, hidden)).astype(mx.bfloat16)
    mx.eval(h)
    back: asyncio.Queue[Message] = asyncio.Queue()
    la = Listener(settings("a"), "127.0.0.1", PORT_A, lambda m, p: back.put_nowait(m))
    await la.start()
    if processes:
        b: asyncio.subprocess.Process | asyncio.Task[None] = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--relay"
        )
    else:
        b = asyncio.get_running_loop().create_task(relay(PORT_B, PORT_A))
    to_b = Peer(settings("a"), "b", lambda: ("127.0.0.1", PORT_B))
    to_b.start()
    assert await to_b.wait_up(20)
    times = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        await to_b.send(Forward("r", i, (1,) * tokens, True, h=h))
        await back.get()
        if i >= 50:  # the first round trips wait for B's link back to come up
            times.append(time.perf_counter() - t0)
        if gap_s:
            time.sleep(gap_s)  # blocking: both processes go idle, as between decode steps
    await to_b.stop()
    if isinstance(b, asyncio.Task):
        b.cancel()
    else:
        b.terminate()
        await b.wait()
    await la.stop()
    return {
        "hop_us_p50": pct(times, 50) / 2 * 1e6,
        "hop_us_p99": pct(times, 99) / 2 * 1e6,
        "round_trip_us_mean": statistics.mean(times) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1, help="positions in the activation")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--processes", action="store_true", help="the relay node in its own process")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="idle time between round trips")
    ap.add_argument("--codec-only", action="store_true", help="skip the round trip")
    ap.add_argument("--relay", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    setup_logging(level="warning")  # stdout is for the results
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.relay:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(relay(PORT_B, PORT_A))
        return
    out = {
        "hidden": args.hidden,
        "tokens": args.tokens,
        "processes": args.processes,
        "gap_ms": args.gap_ms,
        **codec(args.hidden, args.tokens, args.n),
        **codec_parts(args.hidden, args.n),
    }
    if not args.codec_only:
        out |= asyncio.run(
            round_trip(args.hidden, args.tokens, args.n, args.processes, args.gap_ms / 1000)
        )
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>20}: {v:.1f}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
