"""A re-plan that fails (here: the weight file is truncated after start, then a node dies) is
not a dead end: the survivors say why they cannot serve, retry with backoff, and serve exactly
again by themselves once the cause is gone."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlx_lm.utils import load_tokenizer

from mlxring.config import load_config

from .ringutil import (
    FAST,
    NodeProcess,
    encode,
    post_completion,
    process_ring,
    reference,
    tiny_model,
    write_config,
)


def _get(port: int, path: str) -> Any:
    """GET a JSON document, whatever its status."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def _until_served(port: int, prompt: list[int], n: int, timeout: float) -> tuple[int, Any]:
    """Ask until the answer is 200 or `timeout` s have passed; the last answer."""
    deadline = time.monotonic() + timeout
    while (answer := post_completion(port, prompt, n, timeout=15))[
        0
    ] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return answer


def test_a_failed_replan_is_shown_retried_and_heals(tmp_path: Path) -> None:
    # A copy of the tiny model: this test truncates its weights.
    model = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3"), model)
    weights = model / "model.safetensors"
    intact = weights.read_bytes()
    cfg = write_config(tmp_path, model, 3, extra_cluster=FAST)
    head_api = load_config(cfg).api_port("n0")
    prompt = encode(model, "A ring that cannot re-plan says so, and heals.")
    want = load_tokenizer(model).decode(reference(model, prompt, 24))
    with process_ring(cfg, ["n0", "n1", "n2"], tmp_path) as procs:
        for p in procs.values():
            p.wait_log('"node_started"', 60)
        code, body = _until_served(head_api, prompt, 24, 30)
        assert code == 200 and body["choices"][0]["text"] == want, body

        # The file goes bad under the running ring, then a node dies: the survivors' re-plan
        # cannot load their new layer ranges.
        with open(weights, "r+b") as f:
            f.truncate(len(intact) // 2)
        full = '"members": ["n0", "n1", "n2"]'
        full_plans = procs["n0"].log().count(full)
        procs["n1"].kill()
        # Told (the 503's message names the failure), and tried again and again meanwhile: the
        # third attempt waits 2 s.
        deadline = time.monotonic() + 20
        message = ""
        while time.monotonic() < deadline:
            code, body = post_completion(head_api, prompt, 24, timeout=15)
            assert code == 503, body
            message = body["error"]["message"]
            if "retrying in 2 s" in message:
                break
            time.sleep(0.1)
        assert "re-plan failed: cannot load layers [0, 4) from " in message, message
        assert str(model) in message and "retrying in 2 s" in message, message
        health = _get(head_api, "/health")
        assert health["status"] == "unavailable" and "re-plan failed" in health["reason"], health
        for name in ("n0", "n2"):
            assert procs[name].log().count('"replan_failed"') >= 2, procs[name].log()[-3000:]

        # The file is restored: the two survivors serve again, exactly, by themselves.
        weights.write_bytes(intact)
        code, body = _until_served(head_api, prompt, 24, 30)
        assert code == 200 and body["choices"][0]["text"] == want, body

        # The node returns: the three-node ring serves exactly again.
        procs["n1"] = NodeProcess(cfg, "n1", tmp_path)
        procs["n1"].wait_log('"node_started"', 60)
        deadline = time.monotonic() + 30
        while procs["n0"].log().count(full) == full_plans:
            assert time.monotonic() < deadline, procs["n0"].log()[-3000:]
            time.sleep(0.2)
        code, body = _until_served(head_api, prompt, 24, 30)
        assert code == 200 and body["choices"][0]["text"] == want, body
