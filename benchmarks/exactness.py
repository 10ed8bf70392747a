"""Check on this machine (Mac, CUDA or CPU) that the ring's greedy output equals mlx-lm's.

In-process rings of 1-4 nodes over several tiny models, then concurrent requests that the
shards batch; prints one line per case and exits non-zero on any difference. Where concurrent
requests differ from lone generation, it also runs mlx-lm's own batched generation
(BatchGenerator) on the same prompts: where that differs from lone generation too, at the same
rows, the device's batched kernels round differently from lone rows (seen on CUDA). Needs no
pytest.

    python benchmarks/exactness.py                      # qwen3, qwen2 and llama, bf16 and quantized
    python benchmarks/exactness.py --families all       # every supported family (bf16)
    python benchmarks/exactness.py --families gpt_oss,qwen3_next --quantize 4
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.ringutil import (  # noqa: E402
    CONCURRENT_TEXTS,
    batch_reference,
    encode,
    local_ring,
    reference,
    ring_tokens,
    tiny_model,
    write_config,
)

PROMPTS = ["The ring carries activations.", "Batches of requests share a pass.", "x", "Macs!"]


async def case(model: Path, n_nodes: int, concurrent: bool) -> bool:
    prompts = [encode(model, p) for p in (CONCURRENT_TEXTS if concurrent else PROMPTS[:1])]
    want = [reference(model, p, 48) for p in prompts]
    kind = f"{len(prompts)} concurrent" if concurrent else "1 stream"
    try:
        with tempfile.TemporaryDirectory() as d:
            async with local_ring(write_config(Path(d), model, n_nodes)) as rt:
                got = await asyncio.gather(*(ring_tokens(rt, p, 48) for p in prompts))
                batches = sum(n.actor.batches for n in rt.nodes.values())
    except Exception as e:  # noqa: BLE001 - one failed case is reported, the rest still run
        print(f"   FAILED  {model.name:<28} {n_nodes} nodes  {kind}: {type(e).__name__}: {e}")
        return False
    ok = list(got) == want
    if concurrent:
        kind += f" ({batches} batched passes)"
    print(f"{'exact' if ok else 'DIFFERENT':>9}  {model.name:<28} {n_nodes} nodes  {kind}")
    if not ok:
        for row, (g, w) in enumerate(zip(got, want, strict=True)):
            if g != w:
                i = first_difference(g, w)
                print(
                    f"  row {row} first differs at token {i}: ring {g[i:][:4]}, mlx-lm {w[i:][:4]}"
                )
        if concurrent:
            batched = batch_reference(model, prompts, 48)
            rows = [
                f"row {row} at token {first_difference(b[: len(w)], w)}"
                for row, (b, w) in enumerate(zip(batched, want, strict=True))
                if b[: len(w)] != w
            ]
            print(f"  mlx-lm's batched generation against its lone: {', '.join(rows) or 'equal'}")
    return ok


def first_difference(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def main() -> int:
    from mlxring.model.families import MADE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", help="comma-separated families, or all (default: four)")
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    args = parser.parse_args()
    if args.families:
        names = sorted(MADE) if args.families == "all" else args.families.split(",")
        unknown = [n for n in names if n not in MADE]
        if unknown:
            parser.error(f"unknown families {unknown}; choose from {', '.join(MADE)}")
        models = [tiny_model(n, quantize=args.quantize) for n in names]
    else:
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
