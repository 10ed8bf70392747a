"""`mlxring status` against the repository's default nodes.toml, started as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlxring.commands.status import render

from .ringutil import ROOT, packaged_model


def test_status_shows_every_node_of_the_default_config(tmp_path: Path) -> None:
    # The default model, smollm2, in the default cache (fetched once per test run, or a skip).
    packaged_model("smollm2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "node.log", "wb")  # noqa: SIM115 - closed below
    node = subprocess.Popen(
        [sys.executable, "-m", "mlxring", "node", "--config", "nodes.toml", "--log-json"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while b'"node_started"' not in (tmp_path / "node.log").read_bytes():
            assert node.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the default ring did not start"
            time.sleep(0.1)
        status = ["-m", "mlxring", "status", "--config", "nodes.toml"]
        table = subprocess.run(
            [sys.executable, *status],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        rows = {ln.split()[0]: ln for ln in lines if ln[:1] == "n" and ln[1:2].isdigit()}
        assert set(rows) == {"n1", "n2", "n3"}, table.stdout
        assert "prompt cache" in lines[lines.index("") + 1], table.stdout
        for name, layers in [("n1", "[0, 10)"), ("n2", "[10, 20)"), ("n3", "[20, 30)")]:
            assert layers in rows[name] and " up " in rows[name], rows[name]
        raw = subprocess.run(
            [sys.executable, *status, "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        body = json.loads(raw.stdout)
        assert body["ring"]["ok"] and body["head"] == "n1"
        assert [(n["name"], n["layers"], n["up"]) for n in body["nodes"]] == [
            ("n1", [0, 10], True),
            ("n2", [10, 20], True),
            ("n3", [20, 30], True),
        ]
        assert all(isinstance(n["prompt_cache_bytes"], int) for n in body["nodes"]), body
        assert body["requests"]["prompt_cache_hits"] == 0
    finally:
        node.terminate()
        node.wait(15)
        log.close()


def test_status_table_names_failing_tasks_and_the_prompt_cache() -> None:
    status = {
        "cluster": "c",
        "model": "m",
        "head": "n1",
        "ring": {"ok": False, "reason": "task membership failed: OSError: x (retry 2 in 1.0 s)"},
        "requests": {
            "generating": 0,
            "waiting": 0,
            "prompt_cache_hits": 1,
            "prompt_cache_misses": 0,
            "prompt_cache_tokens": 40,
        },
        "nodes": [
            {
                "name": "n1",
                "layers": [0, 3],
                "up": True,
                "head": True,
                "ring_port": 1,
                "memory_active_bytes": 3 << 30,
                "memory_total_bytes": 16 << 30,
                "prompt_cache_bytes": 12 << 20,
                "prompt_cache_entries": 3,
            },
            {"name": "n2", "layers": [3, 6], "up": False, "ring_port": 2},
        ],
        "tasks": [
            {"task": "membership", "nodes": ["n1"], "text": "task membership failed: OSError: x"},
            {"task": "sweep", "nodes": ["n2", "n3"], "text": "task sweep failed: KeyError: 'r'"},
        ],
    }
    lines = render(status).splitlines()
    at = lines.index("failing tasks:")
    assert lines[at + 1 : at + 3] == [
        "  n1: task membership failed: OSError: x",
        "  n2,n3: task sweep failed: KeyError: 'r'",
    ]
    assert "failing tasks:" not in render({**status, "tasks": []})
    # Each node's prompt cache beside its memory, the head's hits on the requests line.
    assert "requests: 0 generating, 0 waiting, prompt cache 1 hit, 40 tokens reused" in lines
    n1 = next(line for line in lines if line.startswith("n1 "))
    assert "3.0 / 16.0    12.0 MB (3)" in n1, n1
    n2 = next(line for line in lines if line.startswith("n2 "))
    assert " - / -         -  " in n2, n2
    assert all(len(line) <= 100 for line in lines)
