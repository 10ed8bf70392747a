"""A process of the ring: the ring positions (nodes) it hosts, their shard actors and listeners,
links to every other node, membership and re-planning; on the head, the engine and the ring
monitor.

Membership: every process keeps a link (with heartbeats) to every remote node. The ring is the
live nodes in config order; the head is the first of them. When the live set changes and stays
changed for a moment, every survivor computes the same plan over the live nodes (plans are
deterministic), reloads what its new layer range needs, and the head serves again once a probe
comes back around the new ring. Messages between two nodes of one process skip the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_config, load_tokenizer

from mlxring.aio import wait_for
from mlxring.backends.cuda import gate
from mlxring.config import BUSY_POLL_MIN_CORES, Config, NodeConfig
from mlxring.engine.lifecycle import Engine
from mlxring.model import source
from mlxring.model.sharded import ModelInfo, check_model, load_shard, model_info
from mlxring.protocol.messages import (
    End,
    Failure,
    Forward,
    ForwardBatch,
    Message,
    NodeStats,
    Probe,
    Send,
    Token,
)
from mlxring.ring import machine as device
from mlxring.ring.hoptime import StepClock
from mlxring.ring.plan import ModelFootprint, Plan, PlanError, PlanNode, plan_layers
from mlxring.shard.actor import Reconfigure, ShardActor, Sweep
from mlxring.shard.compute import Compute
from mlxring.transport.discovery import Discovery, PeerInfo, resolve_interfaces
from mlxring.transport.link import LinkError, LinkSettings, Listener, Peer

log = structlog.get_logger()

COLD_START_WAIT_S = 30.0  # how long a starting node waits for the rest of the ring
# How often the busy-poll task looks again while it rests: with no requests here (an idle node
# wakes rarely), and while the compute thread works (a prompt chunk ends soon).
POLL_IDLE_S = 0.05
POLL_WAIT_S = 0.002
Hops = tuple[tuple[str, int, int], ...]


def next_in_ring(members: Sequence[str], name: str) -> str | None:
    """The member after `name` in ring order (wrapping around); None when it is not one."""
    if name not in members:
        return None
    return members[(members.index(name) + 1) % len(members)]


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


def make_plan(
    config: Config,
    info: ModelInfo,
    members: Sequence[str] | None = None,
    memory: dict[str, int] | None = None,
) -> Plan:
    """The layer plan every node computes alike: over all configured nodes, or over the live
    `members` after a failure (a manual plan cannot cover a missing node: then memory, or
    uniform where memory is unknown)."""
    memory = memory or {}
    nodes = [
        PlanNode(
            name=n.name,
            memory_bytes=n.memory_bytes if n.memory_bytes is not None else memory.get(n.name),
            compute=n.compute,
            layers=n.layers,
        )
        for n in config.nodes
        if members is None or n.name in members
    ]
    strategy = config.cluster.strategy
    if strategy == "manual" and len(nodes) < len(config.nodes):
        strategy = "memory" if all(n.memory_bytes is not None for n in nodes) else "uniform"
    footprint = ModelFootprint(
        info.n_layers, info.layer_bytes, info.embed_bytes, info.head_bytes, info.layer_sizes
    )
    return plan_layers(strategy, footprint, nodes)


def ring_bind_address(config: Config, cfg: NodeConfig) -> str:
    """Where a node's ring port listens: its own host, else the first of `interfaces` (ring
    traffic stays on the Thunderbolt bridge), else everywhere. The API binds separately."""
    if cfg.host:
        return cfg.host
    if config.cluster.interfaces:
        return resolve_interfaces(config.cluster.interfaces)[0]
    return "0.0.0.0"


@dataclass(frozen=True)
class RingView:
    """What the head's last probe saw: who answered, with which layers, how fast."""

    ok: bool
    reason: str
    hops: Hops
    hop_s: float
    checked: float


class RingMonitor:
    """Sends a probe around the ring every heartbeat; the ring is up while probes come back
    through exactly the expected nodes and layer ranges."""

    def __init__(
        self,
        config: Config,
        origin: str,
        expected: Hops,
        send_first: Send,
        on_down: Callable[[str], None],
    ) -> None:
        self.config = config
        self.origin = origin
        self.expected = expected
        self._send = send_first
        self._on_down = on_down
        self.view = RingView(False, "the ring has not formed yet", (), 0.0, 0.0)
        self.hop_samples: list[float] = []
        self.stats: dict[str, NodeStats] = {}  # each node's report from the last probe
        self._last_return = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ring-monitor")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def returned(self, probe: Probe) -> None:
        now = time.monotonic()
        if probe.hops != self.expected:
            self.view = RingView(
                False,
                f"the ring answered {list(probe.hops)}, expected {list(self.expected)}",
                probe.hops,
                0.0,
                now,
            )
            return
        self._last_return = now
        self.stats = {s.name: s for s in probe.stats}
        hop_s = (now - probe.sent) / max(1, len(probe.hops))
        self.hop_samples.append(hop_s)
        del self.hop_samples[:-512]
        if not self.view.ok:
            log.info(
                "ring_up", nodes=[h[0] for h in probe.hops], layers=[h[1:] for h in probe.hops]
            )
        self.view = RingView(True, "", probe.hops, hop_s, now)

    async def _run(self) -> None:
        c = self.config.cluster
        while True:
            await self._send(Probe(self.origin, time.monotonic()))
            await asyncio.sleep(c.heartbeat_s)
            if self.view.ok and time.monotonic() - self._last_return > c.down_after_s:
                self._down(f"no probe came back around the ring within {c.down_after_s:g} s")

    def _down(self, reason: str) -> None:
        if self.view.ok:
            log.warning("ring_down", reason=reason)
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
            ring_bind_address(runtime.config, cfg),
            cfg.port,
            lambda msg, peer: self.received(msg),
        )

    def received(self, msg: Message) -> None:
        """A message off the wire from the previous node."""
        self.runtime.clock.arrive(msg)
        self.deliver(msg)

    def deliver(self, msg: Message) -> None:
        """Route a message that reached this node (from a socket or a local neighbour)."""
        rt = self.runtime
        is_head = rt.engine is not None and rt.head_name == self.name
        match msg:
            case Token() if is_head:
                assert rt.engine is not None
                rt.engine.deliver(rt.clock.home(msg))
            case Failure() if is_head:
                assert rt.engine is not None
                rt.engine.deliver(msg)
            case Probe() if msg.origin == self.name and msg.hops:
                if rt.monitor is not None:
                    rt.monitor.returned(msg)
            case Probe():
                rt.spawn(self.actor.pass_probe(msg))
            case Forward() | ForwardBatch() | End() | Failure():
                self.actor.send(msg)
            case _:
                log.debug("dropped_message", node=self.name, message=type(msg).__name__)


class Runtime:
    """Everything one `mlxring node` process runs."""

    def __init__(self, config: Config, names: Sequence[str]) -> None:
        self.config = config
        self.names = [n for n in config.names if n in names]
        self.nodes: dict[str, LocalNode] = {}
        self.peers: dict[str, Peer] = {}
        self.engine: Engine | None = None
        self.monitor: RingMonitor | None = None
        self.tokenizer: TokenizerWrapper | None = None
        self.model_config: dict[str, Any] = {}
        self.model_dir: Path | None = None
        self.info: ModelInfo | None = None
        self.members: tuple[str, ...] = ()  # the live ring, in config order
        self.plan: Plan = []  # one range per member
        self.unavailable = "the ring has not formed yet"  # why the ring cannot serve, or ""
        self.compute = Compute()
        polls = config.tuning.busy_poll
        self.busy_poll = (os.cpu_count() or 1) >= BUSY_POLL_MIN_CORES if polls is None else polls
        # A waiting gate holds the compute thread's stream, and any device-wide sync, until it
        # opens: another shard of this process could wait on it for its own input.
        self.gates = config.tuning.gates and len(self.names) == 1
        self.clock = StepClock()  # per-hop timing of decode steps passing this process
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._replanning = asyncio.Lock()
        self.facts = device.detect()
        self.discovery: Discovery | None = None

    # --- views ----------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        spec = self.config.cluster.model
        return Path(spec).name if source.is_local(spec) and spec != source.DEMO else spec

    @property
    def head_name(self) -> str:
        return self.members[0] if self.members else self.config.names[0]

    @property
    def layout(self) -> dict[str, tuple[int, int]]:
        """Each live member's layer range."""
        return dict(zip(self.members, self.plan, strict=True))

    def is_up(self, name: str) -> bool:
        return name in self.nodes or (name in self.peers and self.peers[name].up)

    def live(self) -> tuple[str, ...]:
        return tuple(n for n in self.config.names if self.is_up(n))

    # --- start / stop ---------------------------------------------------------------------

    async def start(self, settle_s: float | None = None) -> None:
        """Load the model's metadata, start listeners and links, wait a moment for the other
        nodes, then plan and load this process's shards."""
        loop = asyncio.get_running_loop()
        if self.config.tuning.cache_limit_gb is not None:
            mx.set_cache_limit(int(self.config.tuning.cache_limit_gb * (1 << 30)))
        spec = self.config.cluster.model
        meta = await loop.run_in_executor(None, source.resolve_metadata, spec)
        self.model_dir = meta
        self.model_config = load_config(meta)
        # Refused here, on every node alike, before anything listens: a model whose family is
        # not verified through the ring, or whose structure its family does not expect.
        # On the compute thread: building the model makes MLX arrays, and MLX's per-thread
        # streams must be freed by the thread that made them (the compute thread does).
        await self.compute.run(check_model, self.model_config, self.config.cluster.allow_unverified)
        sizes = await loop.run_in_executor(None, source.tensor_sizes, spec, meta)
        self.info = model_info(self.model_config, sizes)
        self.tokenizer = load_tokenizer(meta, eos_token_ids=self.model_config.get("eos_token_id"))
        if self._needs_discovery():
            await self._start_discovery()
        for name in self.names:
            actor = ShardActor(
                name,
                None,
                self._sender(name),
                self.compute,
                self.config.cluster.request_timeout_s,
                self.config.tuning.max_batch,
                self.facts.total_memory_bytes,
                self.gates,
            )
            self.nodes[name] = node = LocalNode(self, self.config.node(name), actor)
            actor.start()
            await node.listener.start()
        me = self.names[0]
        for n in self.config.nodes:
            if n.name not in self.nodes:
                self.peers[n.name] = peer = Peer(
                    link_settings(self.config, me),
                    n.name,
                    self._address(n),
                    on_state=lambda up: self._changed.set(),
                )
                peer.start()
        # Wait for the other nodes, so that a cold start forms the full ring at once instead of
        # a degraded one followed by a re-plan; after that, form whatever is live.
        wait = COLD_START_WAIT_S if settle_s is None else settle_s
        deadline = time.monotonic() + wait
        if len(self.live()) < len(self.config.nodes):
            log.info(
                "waiting_for_nodes", missing=[n for n in self.config.names if not self.is_up(n)]
            )
        while time.monotonic() < deadline and len(self.live()) < len(self.config.nodes):
            await asyncio.sleep(0.05)
        if self.discovery is not None:  # the plan may need what the others advertise
            remote = [n for n in self.live() if n not in self.nodes]
            with contextlib.suppress(TimeoutError):
                await self.discovery.wait_for(remote, self.config.cluster.down_after_s)
        await self._apply(self.live())
        self._tasks.append(loop.create_task(self._watch_membership(), name="membership"))
        self._tasks.append(loop.create_task(self._sweep(), name="sweep"))
        if self.busy_poll:
            self._tasks.append(loop.create_task(self._poll(), name="busy-poll"))

    def _address(self, n: NodeConfig) -> Callable[[], tuple[str, int] | None]:
        def address() -> tuple[str, int] | None:
            if n.host:
                return n.host, n.port
            found = self.discovery.lookup(n.name) if self.discovery is not None else None
            return (found.address, found.ring_port) if found is not None else None

        return address

    def address_of(self, name: str) -> str | None:
        """A node's IPv4: from nodes.toml, or as zeroconf found it."""
        host = self.config.node(name).host
        if host is None and self.discovery is not None:
            found = self.discovery.lookup(name)
            host = found.address if found is not None else None
        return host

    def memory_of(self, name: str) -> int | None:
        """A node's memory for planning: nodes.toml's memory_gb, else what it reports."""
        configured = self.config.node(name).memory_bytes
        if configured is not None:
            return configured
        if name in self.nodes:
            return self.facts.total_memory_bytes
        found = self.discovery.lookup(name) if self.discovery is not None else None
        return found.memory_bytes if found is not None else None

    def _needs_discovery(self) -> bool:
        """Zeroconf runs when a node has no host, or when planning needs remote memory."""
        remote = [n for n in self.config.nodes if n.name not in self.names]
        return any(n.host is None for n in self.config.nodes) or (
            self.config.cluster.strategy == "memory" and any(n.memory_bytes is None for n in remote)
        )

    async def _start_discovery(self) -> None:
        self.discovery = Discovery(self.config.cluster.name, self.config.cluster.interfaces)
        await self.discovery.start()
        facts = self.facts
        await asyncio.gather(
            *(
                self.discovery.advertise(
                    PeerInfo(
                        name=n,
                        cluster=self.config.cluster.name,
                        address=self.config.node(n).host or self.discovery.addresses[0],
                        ring_port=self.config.node(n).port,
                        api_port=self.config.api_port(n),
                        memory_bytes=self.memory_of(n),
                        chip=facts.chip,
                        gpu_cores=facts.gpu_cores,
                    )
                )
                for n in self.names
            )
        )

    async def _poll(self) -> None:
        """While a shard here has requests in flight, keep the loop polling its sockets (each
        pass schedules the next at once, so the loop's wait for I/O takes no time) instead of
        sleeping until a frame wakes it; not while the compute thread works, which needs the
        interpreter lock to build its graphs."""
        while True:
            if not any(n.actor.requests for n in self.nodes.values()):
                await asyncio.sleep(POLL_IDLE_S)
            elif self.compute.queued:
                await asyncio.sleep(POLL_WAIT_S)
            else:
                await asyncio.sleep(0)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.monitor is not None:
            self.monitor.stop()
        # Inbound first, then the actors (each finishes its message), then the links they send
        # on; last the compute thread, joined, so no MLX work outlives the runtime.
        for node in self.nodes.values():
            await node.listener.stop()
        for node in self.nodes.values():
            await node.actor.stop()
        for p in self.peers.values():
            await p.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        await self.compute.shutdown(10)  # a step still running gets 10 s to finish

    async def wait_ready(self, timeout: float) -> bool:
        """True once the head has seen a probe come back around the whole ring (a process
        without the head is ready once it has planned)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.unavailable:
                if self.monitor is not None and self.monitor.view.ok:
                    return True
                if self.members and self.head_name not in self.nodes:
                    return True
            await asyncio.sleep(0.02)
        return False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a small side task (kept referenced until done)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- sending --------------------------------------------------------------------------

    def _sender(self, name: str) -> Send:
        async def send(msg: Message) -> None:
            await self.send_from(name, msg)

        return send

    async def send_from(self, name: str, msg: Message) -> None:
        """Send from node `name` to the next live node of the ring (directly when local)."""
        nxt = next_in_ring(self.members, name)
        if nxt is None:
            return
        if nxt in self.nodes:
            self.nodes[nxt].deliver(msg)
            return
        try:
            await self.peers[nxt].send(self.clock.leave(msg))
        except LinkError as e:
            # The membership watch notices the dead link and fails what is in flight.
            log.warning("next_unreachable", node=name, next=nxt, error=str(e))

    # --- membership -----------------------------------------------------------------------

    async def _watch_membership(self) -> None:
        """Re-plan when the live set changes and stays changed for a heartbeat (so that the
        survivors, which notice at slightly different moments, settle on the same view)."""
        settle = self.config.cluster.heartbeat_s
        while True:
            try:
                await wait_for(self._changed.wait(), settle / 2)
            except TimeoutError:
                pass
            self._changed.clear()
            live = self.live()
            if live == self.members:
                continue
            if self.engine is not None:
                self.engine.fail_all(f"ring membership changed: live nodes are {list(live)}")
            self.unavailable = "the ring is re-planning"
            await asyncio.sleep(settle)
            live = self.live()
            if live != self.members:
                await self._apply(live)
            else:  # it flapped back: nothing to re-plan
                self.unavailable = ""

    async def _apply(self, live: tuple[str, ...]) -> None:
        """Take the ring `live`: plan over it, reload what changed, (re)start the head."""
        async with self._replanning:
            assert self.info is not None and self.model_dir is not None
            self._stop_head()
            self.unavailable = "the ring is re-planning"
            old = self.layout
            self.members = live
            try:
                memory = {n: m for n in live if (m := self.memory_of(n)) is not None}
                self.plan = make_plan(self.config, self.info, live, memory)
            except PlanError as e:
                self.plan = []
                self.members = ()
                self.unavailable = f"the live nodes {list(live)} cannot hold the model: {e}"
                log.error("replan_failed", live=list(live), error=str(e))
                self._stop_head()
                return
            log.info("ring_plan", members=list(live), plan=[list(r) for r in self.plan])
            loop = asyncio.get_running_loop()
            # Nodes of this process share one process's compute; every other node is taken to
            # be a process (a machine) of its own, unless the config says how many compute.
            stages = self.config.tuning.convoys or (
                sum(n not in self.nodes for n in live) + any(n in self.nodes for n in live)
            )
            for name, node in self.nodes.items():
                rng = self.layout[name]
                local = next_in_ring(live, name) in self.nodes
                if old.get(name) == rng and node.actor.model is not None:
                    node.actor.send(Reconfigure(stages=stages, next_local=local))
                    continue
                path = await loop.run_in_executor(
                    None,
                    source.fetch_shard,
                    self.config.cluster.model,
                    self.model_dir,
                    rng[0],
                    rng[1],
                    self.info.n_layers,
                )
                t0 = time.perf_counter()
                shard = await self.compute.run(
                    load_shard, path, *rng, self.config.cluster.allow_unverified
                )
                await self.compute.run(shard.warm_up)
                if self.gates:
                    # Compiles the gate kernel now, not on a first decode step (about 1.5 s).
                    await self.compute.run(gate.works)
                log.info(
                    "shard_loaded",
                    node=name,
                    layers=f"[{rng[0]}, {rng[1]})",
                    gb=round(shard.parameter_bytes() / 1e9, 3),
                    seconds=round(time.perf_counter() - t0, 2),
                )
                node.actor.send(Reconfigure(shard, stages, local))
            self.unavailable = ""
            if self.head_name in self.nodes:
                self._start_head()
            else:
                self._stop_head()

    def _start_head(self) -> None:
        self._stop_head()
        head = self.nodes[self.head_name]
        assert self.tokenizer is not None

        async def send_first(msg: Message) -> None:
            self.clock.arrive(msg)
            head.deliver(msg)

        self.engine = Engine(
            send_first,
            self.tokenizer.eos_token_ids,
            prefill_chunk=self.config.cluster.prefill_chunk,
            step_timeout_s=self.config.cluster.request_timeout_s,
            one_convoy=self.config.tuning.convoys == 1,
        )
        expected = tuple((n, s, e) for n, (s, e) in self.layout.items())
        self.monitor = RingMonitor(
            self.config, head.name, expected, send_first, self.engine.fail_all
        )
        self.monitor.start()

    def _stop_head(self) -> None:
        if self.engine is not None:
            self.engine.fail_all("this node is no longer the head")
        if self.monitor is not None:
            self.monitor.stop()
        self.engine = None
        self.monitor = None

    def serving_reason(self) -> str:
        """Why this process cannot serve requests now ("" when it can)."""
        if self.unavailable:
            return self.unavailable
        if self.monitor is not None and not self.monitor.view.ok:
            return self.monitor.view.reason
        return ""

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.config.cluster.request_timeout_s / 4))
            for node in self.nodes.values():
                node.actor.send(Sweep(time.monotonic()))
