"""One `mlxring node` process from start to stop: the ring positions (nodes) it hosts, their
shard actors and listeners, links to every other node, and the order in which they start and
stop; plus the views the API reads (members, plan, engine, monitor, why it cannot serve).

The parts: where messages go is `routing`; who is in the ring is `membership` (pure decisions)
carried out by `replan` (which also starts the head's engine and monitor); where the other nodes
are is `directory`; loading is `loading`; the node's long-lived tasks (membership watch, sweeps,
busy-poll, monitor) and side tasks (passing a probe on) live in one task group (`tasks`), open
from start() to stop(); a long-lived task that fails is retried with backoff, and shown until it
is well again (`task_faults`, and `serving_reason` while one the ring needs is down).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxring import backends
from mlxring.config import Config
from mlxring.engine.lifecycle import Engine
from mlxring.model import source
from mlxring.model.sharded import ModelInfo
from mlxring.ring import machine as device
from mlxring.ring.directory import Directory
from mlxring.ring.hoptime import StepClock
from mlxring.ring.loading import load_metadata
from mlxring.ring.monitor import RingMonitor
from mlxring.ring.plan import Plan
from mlxring.ring.poll import busy_poll, polls
from mlxring.ring.replan import Replanner
from mlxring.ring.routing import LocalNode, Router, link_settings, sender_to
from mlxring.shard.actor import ShardActor, Sweep
from mlxring.shard.compute import Compute
from mlxring.shard.grammar import Grammars
from mlxring.tasks import TaskFault, TaskScope
from mlxring.transport.discovery import Discovery
from mlxring.transport.link import Peer

log = structlog.get_logger()

COLD_START_WAIT_S = 30.0  # how long a starting node waits for the rest of the ring


class Runtime:
    """Everything one `mlxring node` process runs, from start() to stop()."""

    def __init__(self, config: Config, names: Sequence[str]) -> None:
        self.config = config
        self.names = [n for n in config.names if n in names]
        self.tokenizer: TokenizerWrapper | None = None
        self.grammars: Grammars | None = None  # with the tokenizer, for the last shard's use
        self.model_config: dict[str, Any] = {}
        self.info: ModelInfo | None = None
        self.compute = Compute()
        self.busy_poll = polls(config.tuning.busy_poll)
        # A waiting gate holds the compute thread's stream, and any device-wide sync, until it
        # opens: another shard of this process could wait on it for its own input.
        self.gates = config.tuning.gates and len(self.names) == 1
        self.backend: backends.Backend = backends.Plain()  # the one `start` picks
        self.clock = StepClock()  # per-hop timing of decode steps passing this process
        self.facts = device.detect()
        self.tasks = TaskScope("runtime")
        self.router = Router(self.clock, self.tasks)
        self.directory = Directory(config, self.names, self.facts)
        self.replanner = Replanner(
            config, self.router, self.compute, self.tasks, self.live, self.memory_of
        )

    # --- views ----------------------------------------------------------------------------

    @property
    def nodes(self) -> dict[str, LocalNode]:
        return self.router.nodes

    @property
    def peers(self) -> dict[str, Peer]:
        return self.router.peers

    @property
    def members(self) -> tuple[str, ...]:
        """The live ring, in config order."""
        return self.router.members

    @property
    def engine(self) -> Engine | None:
        return self.router.engine

    @property
    def monitor(self) -> RingMonitor | None:
        return self.router.monitor

    @property
    def plan(self) -> Plan:
        """One layer range per member."""
        return self.replanner.plan

    @property
    def unavailable(self) -> str:
        """Why the ring cannot serve, or ""."""
        return self.replanner.unavailable

    @property
    def discovery(self) -> Discovery | None:
        return self.directory.discovery

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
        return self.replanner.layout

    def is_up(self, name: str) -> bool:
        return name in self.nodes or (name in self.peers and self.peers[name].up)

    def live(self) -> tuple[str, ...]:
        return tuple(n for n in self.config.names if self.is_up(n))

    def address_of(self, name: str) -> str | None:
        return self.directory.address_of(name)

    def memory_of(self, name: str) -> int | None:
        return self.directory.memory_of(name)

    def _peer_host(self, name: str) -> str | None:
        return self.directory.address_of(name) if name in self.config.names else None

    def task_faults(self) -> tuple[TaskFault, ...]:
        """This process's long-lived tasks that failed and are not well again yet."""
        return self.tasks.faults()

    def serving_reason(self) -> str:
        """Why this process cannot serve requests now ("" when it can)."""
        now = time.monotonic()
        if down := [f.describe(now) for f in self.task_faults() if f.vital and f.down]:
            return "; ".join(down)
        if self.unavailable:
            return self.unavailable
        if self.monitor is not None and not self.monitor.view.ok:
            return self.monitor.view.reason
        return ""

    # --- start / stop ---------------------------------------------------------------------

    async def start(self, settle_s: float | None = None) -> None:
        """Load the model's metadata, start listeners and links, wait a moment for the other
        nodes, then plan and load this process's shards."""
        if self.config.tuning.cache_limit_gb is not None:
            mx.set_cache_limit(int(self.config.tuning.cache_limit_gb * (1 << 30)))
        c = self.config.cluster
        self.replanner.meta = meta = await load_metadata(c.model, self.compute, c.allow_unverified)
        self.model_config, self.info, self.tokenizer = meta.config, meta.info, meta.tokenizer
        # One llguidance tokenizer for the process, whichever of its shards comes to be last.
        self.grammars = Grammars(meta.tokenizer)
        await self.tasks.open()
        await self.directory.start()
        # Finding out whether gates work compiles their kernel: on the compute thread.
        wide = c.speculative or bool(c.draft_model)
        self.backend = await self.compute.run(backends.pick, self.gates, wide)
        for name in self.names:
            node = LocalNode(self.router, self.config, self.config.node(name), self._shard_actor)
            self.nodes[name] = node
            node.actor.start()
            # An open ring takes a node's name only from that node's address.
            node.listener.peer_host = self._peer_host
            await node.listener.start()
        for n in self.config.nodes:
            if n.name not in self.nodes:
                address = functools.partial(self.directory.ring_address, n.name)
                on_state = self.replanner.link_changed
                me = sender_to(self.config, self.names, n.name)  # the name n takes steps from
                # From the address `me` is known at: n's listener checks the name against it.
                settings = link_settings(self.config, me, self.directory.link_source(me))
                peer = Peer(settings, n.name, address, on_state)
                self.peers[n.name] = peer
                peer.start()
        # Wait for the other nodes, so that a cold start forms the full ring at once instead of
        # a degraded one followed by a re-plan; after that, form whatever is live.
        deadline = time.monotonic() + (COLD_START_WAIT_S if settle_s is None else settle_s)
        if len(self.live()) < len(self.config.nodes):
            log.info(
                "waiting_for_nodes", missing=[n for n in self.config.names if not self.is_up(n)]
            )
        while time.monotonic() < deadline and len(self.live()) < len(self.config.nodes):
            await asyncio.sleep(0.05)
        # The plan may need what the others advertise.
        remote = [n for n in self.live() if n not in self.nodes]
        await self.directory.wait_for(remote, c.down_after_s)
        if (decision := self.replanner.decide()) is not None:
            await self.replanner.apply(decision)
        # The watch is vital: while it is down, a node that leaves is never planned around.
        self.tasks.start(self.replanner.watch, "membership", vital=True)
        self.tasks.start(self._sweep, "sweep")
        if self.busy_poll:
            actors = [n.actor for n in self.nodes.values()]
            self.tasks.start(functools.partial(busy_poll, actors, self.compute), "busy-poll")

    def _shard_actor(self, node: LocalNode) -> ShardActor:
        return ShardActor(
            node.name,
            None,
            node.send_next,
            self.compute,
            self.config.cluster.request_timeout_s,
            self.config.tuning.max_batch,
            self.facts.total_memory_bytes,
            self.backend,
            max_requests=self.config.api.max_concurrent + self.config.api.max_queue,
            kv_cache_gb=self.config.tuning.kv_cache_gb,
            grammars=self.grammars,
            prompt_cache_gb=self.config.tuning.prompt_cache_gb,
        )

    async def stop(self) -> None:
        # The node's own tasks first (membership, sweeps, busy-poll, monitor, probes passing);
        # then inbound, then the actors (each finishes its message), then the links they send
        # on; last the compute thread, joined, so no MLX work outlives the runtime.
        await self.tasks.close()
        for node in self.nodes.values():
            await node.listener.stop()
        for node in self.nodes.values():
            await node.actor.stop()
        for p in self.peers.values():
            await p.stop()
        await self.directory.stop()
        await self.compute.shutdown(10)  # a step still running gets 10 s to finish
        await self.replanner.close()  # the draft model's thread, where this process has one

    async def wait_ready(self, timeout: float) -> bool:
        """True once the head has seen a probe come back around the whole ring (a process
        without the head is ready once it has planned)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.serving_reason():
                if self.monitor is not None and self.monitor.view.ok:
                    return True
                if self.members and self.head_name not in self.nodes:
                    return True
            await asyncio.sleep(0.02)
        return False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a small side task in the node's task group (its failure is logged)."""
        self.tasks.spawn(coro)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.config.cluster.request_timeout_s / 4))
            for node in self.nodes.values():
                node.actor.send(Sweep(time.monotonic()))
