"""`mlxring bench` end to end: mlx-lm, then a ring of two node processes, one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys

from .ringutil import ROOT, tiny_model

KEYS = (  # the list
    "baseline_decode_tok_s",
    "ring_decode_tok_s",
    "decode_ratio",
    "baseline_prefill_tok_s",
    "ring_prefill_tok_s",
    "prefill_ratio",
    "ttft_s",
    "hop_us_p50",
    "hop_us_p99",
)


def test_bench_measures_mlx_lm_and_a_two_process_ring() -> None:
    model = tiny_model("qwen3")
    out = subprocess.run(
        [sys.executable, "-m", "mlxring", "bench", "--model", str(model), "--nodes", "2"]
        + ["--prompt-tokens", "48", "--gen-tokens", "12", "--concurrency", "1,3"]
        + ["--prefill-chunk", "16", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)  # one object, nothing else on stdout
    assert all(isinstance(r[k], float) and r[k] > 0 for k in KEYS), {k: r.get(k) for k in KEYS}
    assert r["decode_ratio"] == r["ring_decode_tok_s"] / r["baseline_decode_tok_s"]
    # mlx-lm ran before the ring and again after it; the ratios use the better run.
    for k in ("baseline_decode_tok_s", "baseline_prefill_tok_s"):
        runs = r[f"{k}_runs"]
        assert len(runs) == 2 and all(v > 0 for v in runs) and r[k] == max(runs), k
    assert r["hop_us_p50"] <= r["hop_us_p99"]
    assert set(r["aggregate_tok_s"]) == {"1", "3"} and all(
        v > 0 for v in r["aggregate_tok_s"].values()
    )
    for k in ("shard_step_ms", "shard_prefill_ms"):
        assert set(r[k]) == {"b0", "b1"} and all(v > 0 for v in r[k].values()), k
    assert sum(r["shard_prefill_ms"].values()) < 1000 * r["ttft_s"] * 1.5  # ttft is the best run
    # A 48-token prompt in chunks of 16 arriving while a stream decodes.
    assert 0 < r["decode_gap_ms"] and 0 < r["decode_gap_ms_during_prefill"]
    assert r["ttft_s_during_decode"] > 0
