"""What a batched decode pass costs on this device, without sockets or processes.

Three parts (`--parts`):
- steps: one decode pass of B requests (merged KV caches, as `shard/convoys.py`'s) through
  the model split into shards run one after the other, and through it whole: the host's time
  building each shard's graph and the time evaluating it. What bounds the ring's aggregate.
- ops: the ops a pass is made of as the batch grows: a bf16 matmul of M rows, attention over
  the caches with and without a mask (batched caches of unequal lengths need one).
- kernels: whether matmuls at the test models' tiny shapes give the right numbers here (bf16
  and 4-bit, one row and several, against float32 on the dequantized weights).

    python benchmarks/batch_profile.py --preset qwen3-1.7b --shards 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402

from mlxring.commands.bench import make_prompt  # noqa: E402
from mlxring.model.sharded import ShardModel  # noqa: E402
from mlxring.model.source import cache_dir  # noqa: E402


def steps(path: Path, n_shards: int, batches: list[int], prompt_tokens: int, n: int) -> None:
    model, _ = load(str(path))[:2]
    config = json.loads((path / "config.json").read_text())
    prompt = make_prompt(path, prompt_tokens + 8)
    n_layers = len(model.model.layers)
    sizes = [n_layers // n_shards + (i < n_layers % n_shards) for i in range(n_shards)]
    split = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(n_shards)]
    for b in batches:
        for name, layout in ((f"{n_shards} shards", split), ("whole", [(0, n_layers)])):
            shards = [ShardModel(model, config, start, end, 0) for start, end in layout]
            per_request = []
            for r in range(b):  # prompts of unequal lengths, as concurrent requests have
                caches = [s.make_cache() for s in shards]
                x = mx.array([prompt[r % 8 : r % 8 + prompt_tokens]], dtype=mx.int32)
                for s, c in zip(shards, caches, strict=True):
                    x = s(x, c)
                mx.eval([cc.state for c in caches for cc in c])
                per_request.append(caches)
            merged = [
                [
                    per_request[0][k][i].merge([p[k][i] for p in per_request])
                    if b > 1
                    else per_request[0][k][i]
                    for i in range(len(per_request[0][k]))
                ]
                for k in range(len(shards))
            ]
            tokens = mx.zeros((b, 1), dtype=mx.int32)
            build = [0.0] * len(shards)
            run = [0.0] * len(shards)
            for it in range(n + 5):  # 5 warm-up passes
                h = tokens
                for k, s in enumerate(shards):
                    t0 = time.perf_counter()
                    h = s(h, merged[k])
                    if k == len(shards) - 1:
                        h = mx.argmax(s.logits(h), axis=-1)
                    t1 = time.perf_counter()
                    mx.eval(h)
                    if it >= 5:
                        build[k] += t1 - t0
                        run[k] += time.perf_counter() - t1
                tokens = h.reshape(b, 1).astype(mx.int32)
            ms = 1000 * (sum(build) + sum(run)) / n
            print(
                f"B={b:<3d} {name:>9}: {ms:6.2f} ms a pass, {1000 * b / ms:6.0f} tok/s;"
                f" build {' '.join(f'{1000 * t / n:.2f}' for t in build)} ms,"
                f" eval {' '.join(f'{1000 * t / n:.2f}' for t in run)} ms",
                flush=True,
            )


def per_call_us(fn: Callable[..., mx.array], *args: Any, reps: int = 200, **kw: Any) -> float:
    """Microseconds a call of fn(*args, **kw) costs, evaluated 20 at a time."""
    mx.eval([fn(*args, **kw) for _ in range(10)])
    t0 = time.perf_counter()
    for _ in range(reps // 20):
        mx.eval([fn(*args, **kw) for _ in range(20)])
    return 1e6 * (time.perf_counter() - t0) / (reps // 20 * 20)


def ops() -> None:
    w = mx.random.normal((2048, 2048)).astype(mx.bfloat16)
    for m in (1, 2, 5, 16, 64):
        x = mx.random.normal((m, 1, 2048)).astype(mx.bfloat16)
        us = per_call_us(mx.matmul, x, w.T)
        print(f"matmul [{m},1,2048] x [2048,2048]^T bf16: {us:6.1f} µs", flush=True)
    sdpa = mx.fast.scaled_dot_product_attention
    for b in (1, 5, 16):
        q = mx.random.normal((b, 16, 1, 128)).astype(mx.bfloat16)
        k = mx.random.normal((b, 8, 256, 128)).astype(mx.bfloat16)
        v = mx.random.normal((b, 8, 256, 128)).astype(mx.bfloat16)
        mask = mx.ones((b, 1, 1, 256), dtype=mx.bool_)
        plain = per_call_us(sdpa, q, k, v, scale=0.1)
        masked = per_call_us(sdpa, q, k, v, scale=0.1, mask=mask)
        print(f"attention B={b:<2d} over 256: {plain:6.1f} µs, with a mask {masked:6.1f} µs")


def kernels() -> None:
    mx.random.seed(0)
    for m, n, k in ((1, 256, 64), (11, 256, 64), (1, 4096, 2048), (11, 4096, 2048)):
        w = mx.random.normal((n, k)).astype(mx.bfloat16)
        x = mx.random.normal((m, k)).astype(mx.bfloat16)
        wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
        wd = mx.dequantize(wq, scales, biases, group_size=64, bits=4)
        x32 = x.astype(mx.float32)
        for name, ref, outs in (
            ("bf16", x32 @ w.astype(mx.float32).T, [x @ w.T for _ in range(3)]),
            (
                "4-bit",
                x32 @ wd.astype(mx.float32).T,
                [
                    mx.quantized_matmul(x, wq, scales, biases, group_size=64, bits=4)
                    for _ in range(3)
                ],
            ),
        ):
            mx.eval(outs, ref)
            err = max(float(mx.abs(o.astype(mx.float32) - ref).max()) for o in outs)
            repeat = all(mx.array_equal(outs[0], o).item() for o in outs[1:])
            print(
                f"{name:>5} matmul M={m:<2d} N={n:<4d} K={k:<4d}: max error"
                f" {err / float(mx.abs(ref).max()):.4f} of the largest value,"
                f" repeats {'equal' if repeat else 'DIFFER'}",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--preset", default="qwen3-1.7b")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--batches", default="1,5,16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--parts", default="steps,ops,kernels")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    print(f"mlx on {mx.default_device()}", flush=True)
    if "kernels" in parts:
        kernels()
    if "ops" in parts:
        ops()
    if "steps" in parts:
        path = Path(args.model) if args.model else cache_dir() / f"bench-qwen3-{args.preset}"
        if not (path / "config.json").exists():
            from mlxring.model.make import make_model

            make_model(path, family="qwen3", preset=args.preset)
        batches = [int(b) for b in args.batches.split(",")]
        steps(path, args.shards, batches, args.prompt_tokens, args.passes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
