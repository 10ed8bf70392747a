"""How long a fresh process takes to form a ring and serve its first requests, per tiny model:
MLX builds some kernels on first use (on CUDA a quantized model's take minutes), and a build
inside a step on the event loop's thread would stop the process's frames and heartbeats.

In-process rings of 3 nodes; for each model, the time until the ring is ready (loading runs
`ShardModel.warm_up`), then 1 or 8 concurrent requests of 24 tokens: whether they finish, in
how long, and the longest shard steps (seconds, node, rows, step):

    python3 benchmarks/first_steps.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlxring.protocol.messages import rows_of  # noqa: E402
from mlxring.shard import actor as shard  # noqa: E402
from tests.ringutil import (  # noqa: E402
    CONCURRENT_TEXTS,
    encode,
    local_ring,
    ring_tokens,
    tiny_model,
    write_config,
)

steps: list[tuple[float, str, int, str]] = []  # (seconds, node, rows, step) of each shard step


def record_steps() -> None:
    """Time every shard step (measuring only: the bench's own counters are per node)."""
    timed = shard.ShardActor._timed

    def traced(self: shard.ShardActor, fn: Any, arg: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return timed(self, fn, arg)
        finally:
            rows = len(rows_of(arg)) if isinstance(arg, list) else 1
            seq = "-" if isinstance(arg, list) else str(arg.seq)
            steps.append((time.perf_counter() - t0, self.node, rows, seq))

    shard.ShardActor._timed = traced  # type: ignore[method-assign]


async def case(model: Path, n: int) -> bool:
    steps.clear()
    prompts = [encode(model, t) for t in CONCURRENT_TEXTS]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        try:
            async with local_ring(write_config(Path(d), model, 3), ready_s=900) as rt:
                print(f"  ring ready in {time.perf_counter() - t0:.1f} s", flush=True)
                await asyncio.gather(*(ring_tokens(rt, p, 24) for p in prompts[:n]))
            result = "finished"
        except Exception as e:  # noqa: BLE001 - reported, then the next case
            result = f"FAILED ({type(e).__name__}: {e})"
    longest = [(round(s, 2), node, rows, seq) for s, node, rows, seq in sorted(steps)[-4:][::-1]]
    took = time.perf_counter() - t0
    print(f"{model.name} {n} requests: {result} in {took:.1f} s; longest steps {longest}")
    return result == "finished"


async def main() -> int:
    record_steps()
    q4 = tiny_model("qwen3", tie=False, quantize=4)
    cases = [(q4, 1), (q4, 8), (tiny_model("qwen2", quantize=8), 8), (tiny_model("qwen3"), 8)]
    results = [await case(m, n) for m, n in cases]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
