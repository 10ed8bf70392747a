"""`mlxring top`: one frame (`--once`) and the live view, as subprocesses against a ring whose API
is up; the frame's arithmetic (busy share and rates from two refreshes) on made-up statuses."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Any

from mlxring import aio
from mlxring.commands.top import Sample, Style, bar, busy_share, render, tokens_per_s

from .ringutil import (
    ROOT,
    local_ring,
    post_json,
    serve_api,
    tiny_model,
    wait_for,
    write_valid_config,
)

MODEL = tiny_model("qwen3")
HOME = b"\x1b[H"  # each frame starts by moving the cursor home
FIRST = [(7 * i + 3) % 200 + 20 for i in range(40)]  # a prompt of 40 token ids
MORE = [31, 41, 59, 26, 53, 58, 97, 93]  # what the next one adds to it


async def run_top(
    config: Path, *args: str, stop_after_frames: int | None = None
) -> tuple[int, str]:
    """`python -m mlxring top` without blocking this loop (the ring runs on it); interrupted
    (as by Ctrl-C) once it has drawn `stop_after_frames` frames."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlxring",
        "top",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    seen = b""
    if stop_after_frames is not None:
        while seen.count(HOME) < stop_after_frames:
            chunk = await aio.wait_for(proc.stdout.read(4096), 30)
            assert chunk, seen.decode()
            seen += chunk
        proc.send_signal(signal.SIGINT)
    out, _ = await aio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, (seen + out).decode()


async def test_top_once_shows_every_node_with_its_layers(tmp_path: Path) -> None:
    cfg = write_valid_config(tmp_path, MODEL, 3)
    async with local_ring(cfg) as rt, serve_api(rt) as url:
        # Two prompts starting alike, so each node keeps a prompt and the head counts a hit.
        for prompt in (FIRST, FIRST + MORE):
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
            status, _, answer = await post_json(f"{url}/v1/completions", body)
            assert status == 200, answer
        monitor = rt.monitor
        assert monitor is not None
        await wait_for(  # a probe has brought every node's report back
            lambda: (
                len(monitor.stats) == 3 and all(st.cache_entries for st in monitor.stats.values())
            ),
            10,
        )
        rc, out = await run_top(cfg, "--once")
    assert rc == 0, out
    assert f"prompt cache 1 hit, {len(FIRST)} tokens reused" in out, out
    assert all(len(line) <= 100 for line in out.splitlines()), out
    assert "\x1b[" not in out  # not a terminal: no colours, no cursor moves
    assert "ring up" in out
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^[* ] (n\d)\s.*$", out, re.M)}
    assert list(rows) == ["n0", "n1", "n2"], out  # ring order
    for name, (start, end) in rt.layout.items():
        assert f"[{start}, {end})" in rows[name], rows[name]
        assert " up " in rows[name]
        assert re.search(r" \d+\.\d MB \([12]\)$", rows[name]), rows[name]  # its prompt cache
    assert rows["n0"].startswith("*")  # the head


async def test_top_refreshes_in_place_until_interrupted(tmp_path: Path) -> None:
    cfg = write_valid_config(tmp_path, MODEL, 2)
    async with local_ring(cfg) as rt, serve_api(rt):
        rc, out = await run_top(cfg, "--interval", "0.2", stop_after_frames=3)
    assert rc == 0, out
    frames = out.count("\x1b[H")
    assert frames >= 3, out
    assert out.startswith("\x1b[?25l\x1b[2J") and out.endswith("\x1b[?25h")
    assert out.count("n0 ") >= frames and out.count("n1 ") >= frames


async def test_top_once_without_a_ring_says_so(tmp_path: Path) -> None:
    cfg = write_valid_config(tmp_path, MODEL, 2)
    rc, out = await run_top(cfg, "--once")
    assert rc == 1
    assert "no node answered" in out and "n0" in out


def status(busy: dict[str, float], tokens: int, up: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    return {
        "cluster": "c",
        "model": "m",
        "head": "a",
        "answered_by": "a",
        "ring": {"ok": len(up) == 2, "reason": "b is down", "hop_ms": 0.5, "decode_hop_ms": 0.12},
        "requests": {
            "generating": 1,
            "waiting": 0,
            "tokens_generated": tokens,
            "tokens_per_s": 7.0,
            "prompt_cache_hits": 3,
            "prompt_cache_misses": 1,
            "prompt_cache_tokens": 120,
        },
        "nodes": [
            {
                "name": n,
                "layers": [i * 4, i * 4 + 4],
                "up": n in up,
                "head": n == "a",
                "memory_active_bytes": (i + 1) << 30,
                "memory_total_bytes": 4 << 30,
                "busy_s": busy.get(n),
                "busy_share": 0.25,
                "steps": 100 * (i + 1),
                "kv_requests": 1,
                "prompt_cache_bytes": (i + 1) * (3 << 20),
                "prompt_cache_entries": i + 1,
            }
            for i, n in enumerate(("a", "b"))
        ],
    }


def test_busy_share_and_rates_come_from_two_refreshes() -> None:
    first = Sample(10.0, status({"a": 1.0, "b": 2.0}, 100))
    second = Sample(12.0, status({"a": 2.0, "b": 2.5}, 160))
    assert busy_share(first, second, "a") == 0.5
    assert busy_share(first, second, "b") == 0.25
    assert busy_share(None, second, "a") == 0.25  # --once: what the status says
    assert tokens_per_s(first, second) == 30.0
    assert tokens_per_s(None, second) == 7.0
    restarted = Sample(14.0, status({"a": 0.1, "b": 2.6}, 5))
    assert busy_share(second, restarted, "a") == 0.25  # a counter went back: no delta
    assert tokens_per_s(second, restarted) == 7.0
    assert bar(1, 4, 8) == "[##......]" and bar(None, 4, 4) == "[????]"


def test_frame_marks_a_down_node_and_the_head() -> None:
    down = Sample(1.0, status({"a": 1.0}, 10, up=("a",)))
    lines = render(down, None, Style(color=False, bar_width=10))
    text = "\n".join(lines)
    assert "DOWN (b is down)" in text and "1 of 2 nodes up" in text
    assert "prompt cache 3 hits, 1 missed, 120 tokens reused" in text
    assert "hop 0.50 ms (decoding 0.12 ms)" in text
    a = next(line for line in lines if line[2:4] == "a ")
    b = next(line for line in lines if line[2:4] == "b ")
    assert a.startswith("*") and "[0, 4)" in a and "[##########]" not in a and "1.0 GB" in a
    assert a.endswith(" 3.0 MB (1)") and b.endswith(" 6.0 MB (2)")
    assert b.startswith(" ") and "DOWN" in b and "[4, 8)" in b
    coloured = "\n".join(render(down, None, Style(color=True, bar_width=10)))
    assert "\x1b[31mDOWN" in coloured


def test_frame_names_a_failing_task_of_a_node() -> None:
    failing = status({"a": 1.0}, 10)
    failing["tasks"] = [
        {
            "task": "sweep",
            "nodes": ["a"],
            "error": "RuntimeError: boom",
            "failures": 3,
            "retry_in_s": 4.0,
            "vital": False,
            "text": "task sweep failed: RuntimeError: boom (retry 3 in 4.0 s)",
        }
    ]
    lines = render(Sample(1.0, failing), None, Style(color=False, bar_width=10))
    assert "failing: a: task sweep failed: RuntimeError: boom (retry 3 in 4.0 s)" in lines
    calm = render(Sample(1.0, status({"a": 1.0}, 10)), None, Style(color=False, bar_width=10))
    assert not any("failing" in line for line in calm)
