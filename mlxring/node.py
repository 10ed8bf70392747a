"""A process of the ring: the ring positions (nodes) it hosts, their shard actors, listeners and
links to the next node; on the head, the engine and the ring monitor.

Messages between two nodes of one process skip the socket: the next node's `deliver` is called
directly with the message object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_config, load_tokenizer

from mlxring import source
from mlxring.config import Config, NodeConfig
from mlxring.engine import Engine
from mlxring.link import LinkSettings, Listener, Peer
from mlxring.messages import End, Failure, Forward, Message, Probe, Token
from mlxring.model import ModelInfo, load_shard, model_info
from mlxring.plan import ModelFootprint, Plan, PlanNode, plan_layers
from mlxring.shard import ShardActor, Sweep

log = structlog.get_logger()

Send = Callable[[Message], Awaitable[None]]


def link_settings(config: Config, name: str) -> LinkSettings:
    c = config.cluster
    return LinkSettings(
        cluster=c.name,
        node=name,
        secret=c.secret,
        heartbeat_s=c.heartbeat_s,
        down_after_s=c.down_after_s,
        max_frame=c.max_frame_bytes,
    )


def make_plan(config: Config, info: ModelInfo, memory: dict[str, int] | None = None) -> Plan:
    """The layer plan every node computes alike from the config and the model's sizes."""
    memory = memory or {}
    nodes = [
        PlanNode(
            name=n.name,
            memory_bytes=n.memory_bytes if n.memory_bytes is not None else memory.get(n.name),
            compute=n.compute,
            layers=n.layers,
        )
        for n in config.nodes
    ]
    footprint = ModelFootprint(info.n_layers, info.layer_bytes, info.embed_bytes, info.head_bytes)
    return plan_layers(config.cluster.strategy, footprint, nodes)


@dataclass(frozen=True)
class RingView:
    """What the head's last probe saw: who answered, with which layers, how fast."""

    ok: bool
    reason: str
    hops: tuple[tuple[str, int, int], ...]
    hop_s: float
    checked: float


class RingMonitor:
    """Sends a probe around the ring every heartbeat; the ring is up while probes come back."""

    def __init__(
        self, config: Config, origin: str, send_first: Send, on_down: Callable[[str], None]
    ):
        self.config = config
        self.origin = origin
        self._send = send_first
        self._on_down = on_down
        self.expected = config.names
        self.view = RingView(False, "the ring has not formed yet", (), 0.0, 0.0)
        self._last_return = 0.0
        self._formed = asyncio.Event()

    def returned(self, probe: Probe) -> None:
        now = time.monotonic()
        names = tuple(h[0] for h in probe.hops)
        self._last_return = now
        if names != self.expected:
            self.view = RingView(
                False, f"ring order {names} is not {self.expected}", probe.hops, 0.0, now
            )
            return
        hop_s = (now - probe.sent) / max(1, len(probe.hops))
        if not self.view.ok:
            log.info("ring_up", nodes=list(names))
        self.view = RingView(True, "", probe.hops, hop_s, now)
        self._formed.set()

    async def wait_formed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._formed.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def run(self) -> None:
        c = self.config.cluster
        while True:
            try:
                await self._send(Probe(self.origin, time.monotonic()))
            except Exception as e:  # noqa: BLE001 - a down link is what we are watching for
                self._down(f"cannot send to the next node: {e}")
            await asyncio.sleep(c.heartbeat_s)
            if self.view.ok and time.monotonic() - self._last_return > c.down_after_s:
                self._down(f"no probe came back around the ring within {c.down_after_s:g} s")

    def _down(self, reason: str) -> None:
        if self.view.ok:
            log.warning("ring_down", reason=reason)
            self._formed.clear()
            self._on_down(reason)
        self.view = RingView(False, reason, self.view.hops, 0.0, time.monotonic())


class LocalNode:
    """One ring position hosted by this process."""

    def __init__(self, runtime: Runtime, cfg: NodeConfig, actor: ShardActor) -> None:
        self.runtime = runtime
        self.cfg = cfg
        self.name = cfg.name
        self.actor = actor
        self.listener = Listener(
            link_settings(runtime.config, cfg.name),
            cfg.host or "0.0.0.0",
            cfg.port,
            lambda msg, peer: self.deliver(msg),
        )

    def deliver(self, msg: Message) -> None:
        """Route a message that reached this node (from a socket or a local neighbour)."""
        rt = self.runtime
        is_head = rt.engine is not None and rt.head_name == self.name
        match msg:
            case Token() if is_head:
                assert rt.engine is not None
                rt.engine.deliver(msg)
            case Failure() if is_head:
                assert rt.engine is not None
                rt.engine.deliver(msg)
            case Probe() if msg.origin == self.name and msg.hops:
                if rt.monitor is not None:
                    rt.monitor.returned(msg)
            case Forward() | End() | Failure() | Probe():
                self.actor.send(msg)
            case _:
                log.warning("dropped_message", node=self.name, message=type(msg).__name__)


class Runtime:
    """Everything one `mlxring node` process runs."""

    def __init__(self, config: Config, names: Sequence[str]) -> None:
        self.config = config
        self.names = list(names)
        self.nodes: dict[str, LocalNode] = {}
        self.peers: list[Peer] = []
        self.engine: Engine | None = None
        self.monitor: RingMonitor | None = None
        self.tokenizer: TokenizerWrapper | None = None
        self.model_config: dict[str, Any] = {}
        self.model_dir: Path | None = None
        self.plan: Plan = []
        self.head_name = config.nodes[0].name
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mlx")
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def model_name(self) -> str:
        spec = self.config.cluster.model
        return Path(spec).name if source.is_local(spec) and spec != source.DEMO else spec

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        spec = self.config.cluster.model
        meta = await loop.run_in_executor(None, source.resolve_metadata, spec)
        self.model_config = load_config(meta)
        sizes = await loop.run_in_executor(None, source.tensor_sizes, spec, meta)
        info = model_info(self.model_config, sizes)
        self.plan = make_plan(self.config, info)
        self.model_dir = meta
        for name in self.names:
            cfg = self.config.node(name)
            start, end = self.plan[self.config.position(name)]
            path = await loop.run_in_executor(
                None, source.fetch_shard, spec, meta, start, end, info.n_layers
            )
            t0 = time.perf_counter()
            shard = await loop.run_in_executor(self.executor, load_shard, path, start, end)
            log.info(
                "shard_loaded",
                node=name,
                layers=f"[{start}, {end})",
                gb=round(shard.parameter_bytes() / 1e9, 3),
                seconds=round(time.perf_counter() - t0, 2),
            )
            actor = ShardActor(
                name,
                shard,
                self._sender(name),
                self.executor,
                self.config.cluster.request_timeout_s,
            )
            self.nodes[name] = node = LocalNode(self, cfg, actor)
            actor.start()
            await node.listener.start()
        if self.head_name in self.nodes:
            self.tokenizer = load_tokenizer(
                meta, eos_token_ids=self.model_config.get("eos_token_id")
            )
            head = self.nodes[self.head_name]

            async def send_first(msg: Message) -> None:
                head.deliver(msg)

            self.engine = Engine(
                send_first,
                self.tokenizer.eos_token_ids,
                prefill_chunk=self.config.cluster.prefill_chunk,
                step_timeout_s=self.config.cluster.request_timeout_s,
            )
            self.monitor = RingMonitor(
                self.config, self.head_name, send_first, self.engine.fail_all
            )
            self._tasks.append(loop.create_task(self.monitor.run(), name="ring-monitor"))
        self._tasks.append(loop.create_task(self._sweep(), name="sweep"))

    def _sender(self, name: str) -> Send:
        """How node `name` sends to the next node of the ring: directly or over TCP."""
        names = self.config.names
        nxt = names[(names.index(name) + 1) % len(names)]
        if nxt in self.names:

            async def local(msg: Message) -> None:
                self.nodes[nxt].deliver(msg)

            return local
        target = self.config.node(nxt)
        peer = Peer(
            link_settings(self.config, name),
            nxt,
            lambda: (target.host, target.port) if target.host else None,
            on_state=lambda up: self._link_state(name, nxt, up),
        )
        self.peers.append(peer)
        peer.start()
        return peer.send

    def _link_state(self, name: str, nxt: str, up: bool) -> None:
        if not up and self.engine is not None and self.monitor is not None:
            # The head's own outbound link broke: fail what is in flight now, not at the probe.
            self.engine.fail_all(f"link from {name} to {nxt} is down")

    async def wait_ready(self, timeout: float) -> bool:
        """True once the head has seen a probe come back around the whole ring."""
        if self.monitor is None:
            return True
        return await self.monitor.wait_formed(timeout)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.config.cluster.request_timeout_s / 4))
            for node in self.nodes.values():
                node.actor.send(Sweep(time.monotonic()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for p in self.peers:
            await p.stop()
        for node in self.nodes.values():
            await node.listener.stop()
            await node.actor.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
