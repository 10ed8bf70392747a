"""`mlxring bench` end to end: mlx-lm, then a ring of two node processes, one JSON object."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest

from mlxring.config import load_config

from .ringutil import ROOT, process_ring, tiny_model, write_valid_config

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


def bench(*args: str) -> tuple[dict[str, Any], str]:
    """`mlxring bench ARGS --json`: its one JSON object (nothing else on stdout) and stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "mlxring", "bench", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return cast(dict[str, Any], json.loads(out.stdout)), out.stderr


def test_bench_measures_mlx_lm_and_a_two_process_ring() -> None:
    model = tiny_model("qwen3")
    r, stderr = bench(
        *["--model", str(model), "--nodes", "2", "--prompt-tokens", "48", "--gen-tokens", "12"],
        *["--concurrency", "1,3", "--prefill-chunk", "16"],
    )
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
    # One stream's decode steps carry one request each; three streams share some steps.
    per_step = r["aggregate_requests_per_step"]
    assert per_step["1"] == {"b0": 1.0, "b1": 1.0}, per_step
    assert all(1.0 <= v <= 3.0 for v in per_step["3"].values()), per_step
    assert all(0 < v <= 1.05 for c in ("1", "3") for v in r["aggregate_shard_busy"][c].values())
    for k in ("shard_step_ms", "shard_prefill_ms"):
        assert set(r[k]) == {"b0", "b1"} and all(v > 0 for v in r[k].values()), k
    assert sum(r["shard_prefill_ms"].values()) < 1000 * r["ttft_s"] * 1.5  # ttft is the best run
    # A 48-token prompt in chunks of 16 arriving while a stream decodes.
    assert 0 < r["decode_gap_ms"] and 0 < r["decode_gap_ms_during_prefill"]
    assert r["ttft_s_during_decode"] > 0
    assert "\x1b[" not in stderr  # no progress display where stderr is not a terminal


def test_bench_attaches_to_a_running_ring_and_leaves_it_running(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    cfg = write_valid_config(tmp_path, model, 2, api='api_key = "bench-key"')
    config = load_config(cfg)
    attach = ("--config", str(cfg), "--prompt-tokens", "24", "--gen-tokens", "8")

    with process_ring(cfg, ["n0", "n1"], tmp_path) as procs:
        # Without --model: the ring alone, on token ids of its own.
        ring_only, _ = bench(*attach, "--concurrency", "1")
        assert ring_only["ring_decode_tok_s"] > 0 and ring_only["hop_us_p50"] > 0
        assert "baseline_decode_tok_s" not in ring_only and "decode_ratio" not in ring_only
        r, _ = bench(*attach, "--model", str(model), "--concurrency", "1,2")
        assert all(isinstance(r[k], float) and r[k] > 0 for k in KEYS), {k: r.get(k) for k in KEYS}
        assert r["nodes"] == 2 and "logs" not in r  # it spawned nothing
        assert set(r["aggregate_tok_s"]) == {"1", "2"}
        assert set(r["shard_step_ms"]) == {"n0", "n1"}
        # The ring it attached to is still up and still asks for the key.
        assert all(p.proc.poll() is None for p in procs.values())
        url = f"http://127.0.0.1:{config.api_port('n0')}/v1/models"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer bench-key"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


@pytest.mark.slow  # 13 s: the suite stays near its 15 minutes
def test_bench_shows_its_progress_on_a_tty_and_only_json_on_stdout() -> None:
    model = tiny_model("qwen3")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxring", "bench", "--model", str(model), "--nodes", "2"]
        + ["--prompt-tokens", "24", "--gen-tokens", "8", "--concurrency", "1", "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        reader.join(10)
        os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, tty[-3000:]
    assert json.loads(stdout)["ring_decode_tok_s"] > 0
    steps = [
        "baseline: single-process mlx-lm",
        "waiting for the ring",
        "ring: single-stream decode",
        "ring: 1 concurrent streams",
        "baseline again",
    ]
    at = [tty.find(s) for s in steps]
    assert all(i >= 0 for i in at) and at == sorted(at), (at, tty[-2000:])
    assert "\r\x1b[2K" in tty  # each line replaces the one before


# In the slow set (13 s of the suite): tests/test_prompt_cache.py checks the cache itself.
@pytest.mark.slow
def test_bench_turns_measures_a_conversation_with_the_prompt_cache_and_without() -> None:
    model = tiny_model("qwen3")
    r, _ = bench(
        *["--model", str(model), "--nodes", "2", "--turns", "2", "--history-tokens", "64"],
        *["--turn-tokens", "16", "--gen-tokens", "4"],
    )
    turns = r["turns"]
    assert len(turns) == 2 and r["history_tokens"] == 64 and r["gen_tokens"] == 4
    assert r["turn_tokens"] == 16
    for t in turns:
        assert t["ttft_on_s"] > 0 and t["ttft_off_s"] > 0
        assert t["ratio"] == t["ttft_off_s"] / t["ttft_on_s"]
        assert t["prefill_compute_on_s"] > 0 and t["prefill_compute_off_s"] > 0
    # Turn 2 is turn 1's prompt, its answer's 4 tokens and 16 more: with the cache on it
    # starts from all that the ring computed (the last answer token was never fed).
    assert [t["prompt_tokens"] for t in turns] == [64, 64 + 4 + 16]
    assert [t["cached_tokens"] for t in turns] == [0, 64 + 4 - 1]
    assert [t["cached_tokens_off"] for t in turns] == [0, 0]
    assert r["last_turn_ttft_ratio"] == turns[-1]["ratio"]
    assert r["same_answers"] is True  # the cache is exact


# In the slow set (9 s of the suite): tests/test_speculate.py checks speculation itself.
@pytest.mark.slow
def test_bench_speculative_measures_one_stream_with_drafts_and_without() -> None:
    """A model whose greedy text falls into runs (a small weight scale) copies some of its own
    text: drafts are accepted, and both rings answer the same."""
    model = tiny_model("qwen3", scale=1.0)
    r, _ = bench(
        *["--model", str(model), "--nodes", "2", "--speculative", "ngram"],
        *["--gen-tokens", "48"],
    )
    for k in ("baseline_decode_tok_s", "ring_decode_tok_s", "speculative_decode_tok_s"):
        assert isinstance(r[k], float) and r[k] > 0, k
    assert r["ratio_vs_ring"] == r["speculative_decode_tok_s"] / r["ring_decode_tok_s"]
    assert r["drafted"] > 0 and 0 < r["acceptance"] <= 1
    assert r["same_text"] is True
