"""Where a ring's single-stream decode step goes, without sockets or processes.

Loads a model once and decodes greedily (a) with mlx-lm's `generate_step` (the baseline, which
builds step n+1 while the device runs step n) and (b) through the model split into shards run
one after the other, the way the ring runs them: each shard builds its layers, syncs, and its
output crosses the wire codec before the next shard starts. Variants hand work to the device
every k layers (`ShardModel.overlap_every`), one chains all shards without syncing between
them (what the boundaries cost), and "prebuilt" builds each shard's step before its input is
there, as a ring of processes does (`backends/cuda/ahead.py`), timing what is left on the ring's
path; "gated" also launches it behind a gate (CUDA only, `backends/cuda/gate.py`). Every variant's
tokens are checked against the baseline's. MLX's own knobs (say MLX_MAX_OPS_PER_BUFFER) are
read from the environment and reported.

    python benchmarks/decode_profile.py --preset qwen3-1.7b --shards 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from mlxring.backends import placeholder  # noqa: E402
from mlxring.backends.cuda import ahead, gate  # noqa: E402
from mlxring.commands.bench import make_prompt  # noqa: E402
from mlxring.model.sharded import ShardModel  # noqa: E402
from mlxring.model.source import cache_dir  # noqa: E402
from mlxring.protocol import codec as wire  # noqa: E402
from mlxring.protocol.messages import Forward, Tensor  # noqa: E402


def baseline(model: Any, prompt: list[int], n: int) -> tuple[list[int], float]:
    """mlx-lm's tokens and its mean decode seconds per token (the first token excluded)."""
    out, t0 = [], 0.0
    for i, (tok, _) in enumerate(generate_step(mx.array(prompt), model, max_tokens=n)):
        out.append(int(tok))
        if i == 0:
            t0 = time.perf_counter()
    return out, (time.perf_counter() - t0) / (n - 1)


def first_diff(a: list[int], b: list[int]) -> int | None:
    """The first step where two token lists differ (None: equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def over_wire(f: Forward) -> Forward:
    """`f` through the wire codec, as it would cross a socket."""
    g = wire.decode(wire.encode_bytes(f)[wire.PREFIX.size :])
    assert isinstance(g, Forward)
    return g


def prefill(shards: list[ShardModel], caches: list[list[Any]], prompt: list[int]) -> None:
    """mlx-lm's schedule with its default 2048-token prefill step: all but the last prompt
    token in one pass (caches only); the last token then goes through as the first step."""
    x: mx.array = mx.array([prompt[:-1]], dtype=mx.int32)
    for s, c in zip(shards, caches, strict=True):
        x = s(x, c)
    mx.eval([cc.state for c in caches for cc in c])


def through_prebuilt(
    shards: list[ShardModel], prompt: list[int], n: int, gated: bool = False
) -> tuple[list[int], float, list[float], list[float]]:
    """Greedy decode as a ring of processes runs it with steps built ahead: each shard's graph
    is built on a placeholder before its input comes (untimed: in a ring it overlaps the other
    shards' work), and with `gated` launched behind a gate too (`backends/cuda/gate.py`); timed is
    what stays on the ring's path: the input written in, the evaluation, the codec on the way
    out, and the last shard's logits and sampling. Returns tokens, seconds per token of the
    timed parts, per-shard seconds, per-shard build (and launch) seconds."""
    caches = [s.make_cache() for s in shards]
    per_shard = [0.0] * len(shards)
    per_build = [0.0] * len(shards)
    prefill(shards, caches, prompt)
    out: list[int] = []
    for k in range(n):
        timed = k > 0
        f = Forward("r", k, (prompt[-1] if k == 0 else out[-1],), True, layer=0)
        for i, s in enumerate(shards):
            t = time.perf_counter()
            spec = placeholder.input_of(f, 1, 1, s.is_first)
            assert spec is not None
            shape, dtype = spec
            slot = placeholder.place([("r", k)], shape, dtype, s.is_first)
            built: placeholder.Prebuilt | ahead.Launched
            if gated:
                built = ahead.launch(s, caches[i], ahead.hold(slot, caches[i]))
                time.sleep(0.0005)  # in a ring the input comes later: let the device reach the gate
            else:
                built = placeholder.build(s, caches[i], slot)
            t_built = time.perf_counter()
            assert placeholder.fill(slot, [f])
            if isinstance(built, ahead.Launched):
                built.hold.flag.open(gate.OPEN)
                mx.eval(built.h, built.status)
                if built.status.item() != gate.OPEN:
                    # The launch waited for the device (MLX does on its first steps) until the
                    # gate gave up; a ring opens gates from another thread. Build it again.
                    print(f"gate gave up at step {k}, shard {i}", file=sys.stderr)
                    ahead.take_back(built.caches, built.hold.marks)
                    slot = placeholder.place([("r", k)], shape, dtype, s.is_first)
                    built = placeholder.build(s, caches[i], slot)
                    assert placeholder.fill(slot, [f])
            caches[i] = built.caches
            if s.is_last:
                logits = s.logits(built.h)
                tok = cast(int, mx.argmax(logits - mx.logsumexp(logits, keepdims=True), -1).item())
            else:
                mx.eval(built.h)
                f = over_wire(Forward("r", k, f.tokens, True, h=built.h))
            if timed:
                per_build[i] += t_built - t
                per_shard[i] += time.perf_counter() - t_built
        out.append(tok)
    return (
        out,
        sum(per_shard) / (n - 1),
        [p / (n - 1) for p in per_shard],
        [p / (n - 1) for p in per_build],
    )


def through_shards(
    shards: list[ShardModel], prompt: list[int], n: int, chained: bool = False
) -> tuple[list[int], float, list[float], list[float]]:
    """Greedy decode through the shards in turn; tokens, seconds per token, per-shard seconds,
    and per-shard seconds spent building the graph (Python, before the shard's sync)."""
    caches = [s.make_cache() for s in shards]
    per_shard = [0.0] * len(shards)
    per_build = [0.0] * len(shards)

    def step(tokens: list[int], timed: bool) -> int:
        x: mx.array = mx.array([tokens], dtype=mx.int32)
        for i, (s, c) in enumerate(zip(shards, caches, strict=True)):
            t = time.perf_counter()
            x = s(x, c)
            if timed:
                per_build[i] += time.perf_counter() - t
            if not s.is_last and not chained:
                mx.eval(x)
                f = over_wire(Forward("r", 0, (0,), True, h=x))
                assert f.h is not None
                x = wire.to_array(f.h) if isinstance(f.h, Tensor) else f.h
            if s.is_last:
                logits = s.logits(x)
                tok = cast(int, mx.argmax(logits - mx.logsumexp(logits, keepdims=True), -1).item())
            if timed:
                per_shard[i] += time.perf_counter() - t
        return tok

    prefill(shards, caches, prompt)
    out = [step([prompt[-1]], False)]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        out.append(step([out[-1]], True))
    dt = time.perf_counter() - t0
    return out, dt / (n - 1), [p / (n - 1) for p in per_shard], [p / (n - 1) for p in per_build]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--preset", default="qwen3-1.7b")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--every", default="0,1,2,3,5", help="overlap_every values to try")
    ap.add_argument("--variants", default="serial,prebuilt,gated,one-shard,chained")
    ap.add_argument("--rounds", type=int, default=1, help="baseline + variants, this many times")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        from mlxring.model.make import make_model

        path = cache_dir() / f"bench-qwen3-{args.preset}"
        if not (path / "config.json").exists():
            make_model(path, family="qwen3", preset=args.preset)
    model, _ = load(str(path))[:2]
    config = json.loads((path / "config.json").read_text())
    prompt = make_prompt(path, args.prompt_tokens)
    n_layers = len(model.model.layers)
    sizes = [n_layers // args.shards + (i < n_layers % args.shards) for i in range(args.shards)]
    plan = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(args.shards)]
    baseline(model, prompt[:16], 4)  # warm-up
    want, _ = baseline(model, prompt, args.gen_tokens)
    again: list[int] = []
    rows: list[dict[str, Any]] = []
    base_ms: list[float] = []

    def record(
        rnd: int, base_s: float, name: str, every: int, chained: bool, layout: list[tuple[int, int]]
    ) -> None:
        shards = [ShardModel(model, config, a, b, every) for a, b in layout]

        def run(p: list[int], n: int) -> tuple[list[int], float, list[float], list[float]]:
            if name in ("prebuilt", "gated"):
                return through_prebuilt(shards, p, n, gated=name == "gated")
            return through_shards(shards, p, n, chained)

        run(prompt[:16], 4)  # warm-up
        best: tuple[list[int], float, list[float], list[float]] | None = None
        for _ in range(2):
            r = run(prompt, args.gen_tokens)
            best = r if best is None or r[1] < best[1] else best
        assert best is not None
        toks, sec, per, build = best
        rows.append(
            {
                "round": rnd,
                "variant": name,
                "overlap_every": every,
                "ms_per_token": 1000 * sec,
                "ratio": base_s / sec,
                "shard_ms": [round(1000 * p, 3) for p in per],
                "build_ms": [round(1000 * p, 3) for p in build],
                "exact": toks == want,
                "first_diff": first_diff(toks, want),
            }
        )

    # This machine's speed drifts over seconds: each round measures mlx-lm again right before
    # the variants, and a variant's ratio is to its own round's baseline.
    variants = set(args.variants.split(","))
    for rnd in range(args.rounds):
        again, a_s = baseline(model, prompt, args.gen_tokens)
        _, b_s = baseline(model, prompt, args.gen_tokens)
        base_s = min(a_s, b_s)
        base_ms.append(1000 * base_s)
        if "serial" in variants:
            for k in (int(v) for v in args.every.split(",")):
                record(rnd, base_s, "serial", k, False, plan)
        if "prebuilt" in variants:
            record(rnd, base_s, "prebuilt", 0, False, plan)
        if "gated" in variants and gate.works():
            record(rnd, base_s, "gated", 0, False, plan)
        # The whole model as one shard: what syncing once per token costs against mlx-lm.
        if "one-shard" in variants:
            record(rnd, base_s, "one-shard", 1, False, [(0, n_layers)])
            record(rnd, base_s, "one-shard", 0, False, [(0, n_layers)])
        if "chained" in variants:
            record(rnd, base_s, "chained", 1, True, plan)
    medians = {}
    for key in sorted({(r["variant"], r["overlap_every"]) for r in rows}):
        ratios = sorted(r["ratio"] for r in rows if (r["variant"], r["overlap_every"]) == key)
        medians[f"{key[0]} every={key[1]}"] = ratios[len(ratios) // 2]
    result = {
        "model": str(path),
        "device": str(mx.default_device()),
        "plan": plan,
        "baseline_ms_per_token": base_ms,
        "median_ratio": medians,
        # mlx-lm against itself: whether the device gives the same tokens twice.
        "baseline_first_diff": first_diff(again, want),
        "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"baseline (mlx-lm generate_step): {', '.join(f'{b:.3f}' for b in base_ms)} ms/token"
            f"  plan {plan}  repeat differs at {result['baseline_first_diff']}"
        )
        for r in rows:
            print(
                f"{r['round']} {r['variant']:>9} every={r['overlap_every']}"
                f"  {r['ms_per_token']:.3f} ms/token"
                f"  ratio {r['ratio']:.3f}  shards {r['shard_ms']} build {r['build_ms']}"
                f"  exact={r['exact']} first_diff={r['first_diff']}"
            )
        for name, ratio in medians.items():
            print(f"median ratio {name}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
