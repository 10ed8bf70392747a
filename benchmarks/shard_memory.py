"""Resident weight bytes of each shard of a split model: what a node really holds.

For each node of an N-way uniform split, a fresh process loads only that shard and reports the
bytes of its loaded arrays and MLX's active memory, against the bytes its layers (+ embedding on
the first, norm + head on the last) take in the checkpoint.

    .venv/bin/python benchmarks/shard_memory.py --preset qwen3-1.7b --nodes 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mlxring.model.make import make_model
from mlxring.model.sharded import model_info
from mlxring.model.source import cache_dir, tensor_sizes
from mlxring.ring.plan import ModelFootprint, PlanNode, plan_layers

CHILD = """
import json, sys, mlx.core as mx
from pathlib import Path
from mlxring.model.sharded import load_shard
path, start, end = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
shard = load_shard(path, start, end)
print(json.dumps({"held": shard.parameter_bytes(), "active": mx.get_active_memory(),
                  "peak": mx.get_peak_memory()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="model directory (default: made from --preset)")
    ap.add_argument("--preset", default="qwen3-1.7b")
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    path = Path(args.model) if args.model else cache_dir() / f"bench-qwen3-{args.preset}"
    if not (path / "config.json").exists():
        print(f"making {args.preset} model in {path} ...", file=sys.stderr)
        make_model(path, family="qwen3", preset=args.preset)
    config = json.loads((path / "config.json").read_text())
    sizes = tensor_sizes(str(path), path)
    info = model_info(config, sizes)
    fp = ModelFootprint(
        info.n_layers, info.layer_bytes, info.embed_bytes, info.head_bytes, info.layer_sizes
    )
    plan = plan_layers("uniform", fp, [PlanNode(f"n{i}") for i in range(args.nodes)])
    total = sum(sizes.values())
    print(f"model {path.name}: {total / 1e9:.3f} GB in the checkpoint, {info.n_layers} layers")
    columns = ("expected GB", "held GB", "active GB", "held/expected")
    print(f"{'node':>5} {'layers':>10} " + " ".join(f"{c:>13}" for c in columns))
    for i, (start, end) in enumerate(plan):
        expected = fp.shard_bytes((start, end), first=start == 0, last=end == info.n_layers)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(start), str(end)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{'n' + str(i):>5} {f'[{start}, {end})':>10} {expected / 1e9:>13.3f} "
            f"{r['held'] / 1e9:>13.3f} {r['active'] / 1e9:>13.3f} {r['held'] / expected:>13.3f}"
        )


if __name__ == "__main__":
    main()
