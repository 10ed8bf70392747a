"""Local rings for `mlxring bench`: node processes on this machine (or one process hosting
every node), their config written for them, waited for until healthy, and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from mlxring.config import Config, load_config


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free on `host` now (the OS picks; fixed ones may be taken)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def spawn_ring(
    model: str | Path,
    n: int,
    prefill_chunk: int,
    work: Path,
    one_process: bool = False,
    gpus: Sequence[str] = (),
    busy_poll: str = "auto",
    gates: bool = True,
    convoys: str = "auto",
    prompt_cache: bool = True,
    speculative: bool = False,
    draft_model: str = "",
) -> tuple[Config, list[subprocess.Popen[bytes]]]:
    """N local nodes: N processes, or one process hosting all N shard actors. With `gpus`,
    process i sees only CUDA device gpus[i % len(gpus)]."""
    lines = [
        "[cluster]",
        'name = "bench"',
        f'model = "{model}"',
        'strategy = "uniform"',
        f"prefill_chunk = {prefill_chunk}",
        "heartbeat_s = 0.2",
        "down_after_s = 10.0",
        f"prompt_cache = {'true' if prompt_cache else 'false'}",
        f"speculative = {'true' if speculative else 'false'}",
        *([f"draft_model = {json.dumps(draft_model)}"] if draft_model else []),
        "[tuning]",
        # The node processes share this machine's accelerator: keep each one's cache modest.
        "cache_limit_gb = 2",
        "busy_poll = " + {"on": "true", "off": "false"}.get(busy_poll, '"auto"'),
        f"gates = {'true' if gates else 'false'}",
        "convoys = " + ('"auto"' if convoys == "auto" else convoys),
        "[api]",
        'host = "127.0.0.1"',
        "max_concurrent = 256",
    ]
    ports = free_ports(2 * n)
    for i in range(n):
        lines += ["[[nodes]]", f'name = "b{i}"', 'host = "127.0.0.1"']
        lines += [f"port = {ports[2 * i]}", f"api_port = {ports[2 * i + 1]}"]
    path = work / "nodes.toml"
    path.write_text("\n".join(lines) + "\n")
    config = load_config(path)
    groups = [[f"b{i}" for i in range(n)]] if one_process else [[f"b{i}"] for i in range(n)]
    procs = []
    for i, names in enumerate(groups):
        log = open(work / f"b{i}.log", "wb")  # noqa: SIM115 - lives as long as the process
        argv = [sys.executable, "-m", "mlxring", "node", "--config", str(path), "--log-json"]
        for name in names:
            argv += ["--name", name]
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        procs.append(
            subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        )
    return config, procs


async def wait_healthy(
    url: str,
    timeout: float,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    logs: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if p.poll() is not None:  # a node that died will never make the ring healthy
                    tail = (logs / f"b{i}.log").read_text()[-2000:] if logs else ""
                    raise RuntimeError(f"node b{i} exited with {p.returncode}:\n{tail}")
            try:
                async with s.get(f"{url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the ring at {url} did not become healthy in {timeout:g} s")


def head_url(config: Config) -> str:
    head = config.nodes[0]
    host = head.host or "127.0.0.1"
    return f"http://{host}:{config.api_port(head.name)}"


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
