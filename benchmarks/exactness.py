"""Check on this machine (Mac, CUDA or CPU) that the ring's greedy output equals mlx-lm's.

In-process rings of 1-4 nodes over several tiny models, then concurrent requests that the
shards batch; prints one line per case and exits non-zero on any difference. Needs no pytest.

    python benchmarks/exactness.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.ringutil import encode, local_ring, reference, ring_tokens, tiny_model, write_config  # noqa: E402

PROMPTS = ["The ring carries activations.", "Batches of requests share a pass.", "x", "Macs!"]


async def case(model: Path, n_nodes: int, concurrent: bool) -> bool:
    prompts = [encode(model, p) for p in (PROMPTS if concurrent else PROMPTS[:1])]
    want = [reference(model, p, 48) for p in prompts]
    with tempfile.TemporaryDirectory() as d:
        async with local_ring(write_config(Path(d), model, n_nodes)) as rt:
            got = await asyncio.gather(*(ring_tokens(rt, p, 48) for p in prompts))
            batches = sum(n.actor.batches for n in rt.nodes.values())
    ok = list(got) == want
    kind = f"{len(prompts)} concurrent ({batches} batched passes)" if concurrent else "1 stream"
    print(f"{'exact' if ok else 'DIFFERENT':>9}  {model.name:<28} {n_nodes} nodes  {kind}")
    if not ok:
        for g, w in zip(got, want, strict=True):
            if g != w:
                pairs = enumerate(zip(g, w, strict=False))
                i = next((i for i, (a, b) in pairs if a != b), min(len(g), len(w)))
                print(f"  first difference at token {i}: ring {g[i:][:4]}, mlx-lm {w[i:][:4]}")
    return ok


async def main() -> int:
    models = [
        tiny_model("qwen3"),
        tiny_model("qwen3", tie=False, quantize=4),
        tiny_model("qwen2", quantize=8),
        tiny_model("llama"),
    ]
    results = []
    for m in models:
        for n in (1, 3):
            results.append(await case(m, n, concurrent=False))
        results.append(await case(m, 3, concurrent=True))
    print(f"{sum(results)} of {len(results)} cases exact")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
