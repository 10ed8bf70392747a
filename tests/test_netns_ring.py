"""Three "hosts" in network namespaces on one bridge, a nodes.toml with no addresses: the ring
forms through zeroconf multicast and generates mlx-lm's exact greedy output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .netns import Netns, skip_reason
from .ringutil import RING_HEAD, ROOT, encode, reference, tiny_model


def test_ring_forms_through_zeroconf_in_namespaces(tmp_path: Path) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    model = tiny_model("qwen3")
    prompt = encode(model, "Found by multicast, linked by IP.")
    want = reference(model, prompt, 32)
    cfg = tmp_path / "nodes.toml"
    cfg.write_text(
        "\n".join(
            [
                "[cluster]",
                'name = "nsring"',
                f'model = "{model}"',
                'strategy = "uniform"',
                "[api]",
                'host = "0.0.0.0"',
                *(f'[[nodes]]\nname = "n{i}"\nport = 5300\napi_port = 8300' for i in range(3)),
            ]
        )
        + "\n"
    )
    with Netns(3) as net:
        for i in (1, 2):
            log = open(tmp_path / f"n{i}.log", "wb")  # noqa: SIM115 - closed with the harness
            net.popen(
                i,
                [
                    sys.executable,
                    "-m",
                    "mlxring",
                    "node",
                    "--config",
                    str(cfg),
                    "--name",
                    f"n{i}",
                    "--log-json",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        head = net.run(
            0,
            [sys.executable, "-c", RING_HEAD, str(cfg), json.dumps(prompt), "32"],
            timeout=120,
            cwd=ROOT,
        )
        assert head.returncode == 0, head.stderr[-12000:]
        out = json.loads(head.stdout.strip().splitlines()[-1])
        addresses = [h.address for h in net.hosts]
    assert out["hosts"] == {f"n{i}": addresses[i] for i in range(3)}
    assert out["plan"] == [[0, 3], [3, 5], [5, 7]]
    assert out["tokens"] == want
