"""Where every message goes: the ring positions this process hosts (LocalNode) and the Router
that sends a message on to the next member of the ring, over a link or directly when the next
node is in this process, and delivers what reaches a node to its shard, engine or monitor.

Every hop is a named method: a node's listener calls `LocalNode.received`, its shard actor
`LocalNode.send_next`, the head's engine and monitor `LocalNode.enter`; those three hand over to
`Router.arrived` / `Router.send_from`, and `Router.deliver` picks the receiver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from mlxring.config import Config, NodeConfig
from mlxring.engine.lifecycle import Engine
from mlxring.protocol.messages import End, Failure, Forward, ForwardBatch, Message, Probe, Token
from mlxring.ring.hoptime import StepClock
from mlxring.ring.membership import next_in_ring
from mlxring.ring.monitor import RingMonitor
from mlxring.shard.actor import ShardActor
from mlxring.tasks import TaskScope
from mlxring.transport.discovery import resolve_interfaces
from mlxring.transport.link import LinkError, LinkSettings, Listener, Peer

log = structlog.get_logger()

#: What travels the ring from one member to the next, and only so.
DATA = (Forward, ForwardBatch, End, Failure, Token, Probe)


def link_settings(config: Config, name: str, bind: str | None = None) -> LinkSettings:
    """The link parameters of node `name`, as every node of the cluster must have them; its
    links leave from `bind`, else from its configured host."""
    c = config.cluster
    return LinkSettings(
        cluster=c.name,
        node=name,
        secret=c.secret,
        heartbeat_s=c.heartbeat_s,
        down_after_s=c.down_after_s,
        max_frame=c.max_frame_bytes,
        bind=bind if bind is not None else config.node(name).host,
    )


def sender_to(config: Config, local: Sequence[str], dest: str) -> str:
    """The name a process gives on its link to node `dest`: the one of its nodes `local` that
    sends to `dest`, the nearest before it in ring (config) order. A node takes steps only from
    its previous member (`LocalNode.received`), and a link carries one name."""
    names = list(config.names)
    i = names.index(dest)
    for k in range(1, len(names) + 1):
        if (n := names[(i - k) % len(names)]) in local:
            return n
    return local[0]


def ring_bind_address(config: Config, cfg: NodeConfig) -> str:
    """Where a node's ring port listens: its own host, else the first of `interfaces` (ring
    traffic stays on the Thunderbolt bridge), else everywhere. The API binds separately."""
    if cfg.host:
        return cfg.host
    if config.cluster.interfaces:
        return resolve_interfaces(config.cluster.interfaces)[0]
    return "0.0.0.0"


class LocalNode:
    """One ring position hosted by this process: its shard actor, and the listener that takes
    frames from the previous node. Its methods are this node's ends of the ring's hops."""

    def __init__(
        self,
        router: Router,
        config: Config,
        cfg: NodeConfig,
        make_actor: Callable[[LocalNode], ShardActor],
    ) -> None:
        self.router = router
        self.cfg = cfg
        self.name = cfg.name
        self.actor = make_actor(self)  # given `self.send_next`
        self.rejected = 0  # ring frames from a peer that may not send them here
        # Reading from the previous node pauses while this node's mailbox is full.
        self.listener = Listener(
            link_settings(config, cfg.name),
            ring_bind_address(config, cfg),
            cfg.port,
            self.received,
            inflow=self.actor,
        )

    def received(self, msg: Message, peer: str) -> None:
        """The listener's hand-over: `msg` came off the wire from `peer`. Steps, ends, failures,
        tokens and probes are taken only from the previous member of the ring (tokens only at
        the head, probes only on their way round: `Router.may_send`): from anyone else they are
        dropped, counted in `rejected`, never handled."""
        if isinstance(msg, Probe) and self.name not in self.router.members:
            # Not in the ring (not yet, or no more): the head's probes come before this node
            # has planned, and the head learns from their silence; nobody is misbehaving.
            log.debug("probe_before_membership", node=self.name, peer=peer)
            return
        if isinstance(msg, DATA) and not self.router.may_send(peer, self.name, msg):
            self.rejected += 1
            if self.rejected > 16 and self.rejected % 1024:
                return  # counted; a flood of them does not flood the log as well
            log.warning(
                "frame_dropped",
                node=self.name,
                peer=peer,
                message=type(msg).__name__,
                members=list(self.router.members),
                rejected=self.rejected,
            )
            return
        self.router.arrived(self.name, msg)

    async def send_next(self, msg: Message) -> None:
        """The shard actor's output: on to the next node of the ring."""
        await self.router.send_from(self.name, msg)

    async def enter(self, msg: Message) -> None:
        """The head's engine and monitor: `msg` enters the ring at this node (the first shard),
        as if it had arrived here (see `mlxring.engine.lifecycle.RingEntry`)."""
        self.router.arrived(self.name, msg)


class Router:
    """The routing table of this process (its nodes, the links to the others, the ring's
    members in order, the head's engine and monitor when the head is here) and the routing."""

    def __init__(self, clock: StepClock, tasks: TaskScope) -> None:
        self.clock = clock  # per-hop timing: marks a step's arrival and departure here
        self.tasks = tasks  # where a probe is passed on, beside the shard's mailbox
        self.nodes: dict[str, LocalNode] = {}
        self.peers: dict[str, Peer] = {}
        self.members: tuple[str, ...] = ()  # the live ring, in config order
        self.engine: Engine | None = None
        self.monitor: RingMonitor | None = None

    def may_send(self, peer: str, node: str, msg: Message) -> bool:
        """Whether `peer` is the member before local node `node` in the live ring, the one
        that sends it steps; a token also needs `node` to be the head (the last member sends
        it home), and a probe must be on its way round (`on_its_way`)."""
        m = self.members
        if node not in m or peer not in m or peer in self.nodes:
            return False
        before = m[m.index(node) - 1]
        if isinstance(msg, Probe) and not self.on_its_way(node, msg):
            return False
        return peer == before and (not isinstance(msg, Token) or node == m[0])

    def on_its_way(self, node: str, probe: Probe) -> bool:
        """Whether a probe reaching local node `node` over a link is one the ring passes: sent
        by a live member, carrying one hop and one report per node it passed (at least the
        sender's), and fewer hops than the ring has members unless it is home. Any other probe
        would be passed on, a side task per hop, round and round (its origin never takes it
        home) or grow past the ring."""
        hops = len(probe.hops)
        limit = len(self.members) if probe.origin == node else len(self.members) - 1
        return probe.origin in self.members and len(probe.stats) == hops and 1 <= hops <= limit

    def arrived(self, node: str, msg: Message) -> None:
        """`msg` reached local node `node` from the previous node or from the head's engine:
        the step clock marks the arrival, then it is delivered."""
        self.clock.arrive(msg)
        self.deliver(node, msg)

    def deliver(self, node: str, msg: Message) -> None:
        """Hand a message that reached local node `node` (from a socket or a local neighbour)
        to its receiver: tokens and failures at the head to the engine, the head's own probe
        back to the monitor, any other probe on at once (not behind the shard's compute, so a
        long prefill does not look like a dead ring), steps, ends and failures to the shard."""
        head = self.engine if self.members and self.members[0] == node else None
        match msg:
            case Token() if head is not None:
                head.deliver(self.clock.home(msg))
            case Failure() if head is not None:
                head.deliver(msg)
            case Probe() if msg.origin == node and msg.hops:
                if self.monitor is not None:
                    self.monitor.returned(msg)
            case Probe():
                self.tasks.spawn(self.nodes[node].actor.pass_probe(msg), "pass-probe")
            case Forward() | ForwardBatch() | End() | Failure():
                self.nodes[node].actor.send(msg)
            case _:
                log.debug("dropped_message", node=node, message=type(msg).__name__)

    async def send_from(self, node: str, msg: Message) -> None:
        """Send from node `node` to the next member of the ring: delivered directly when that
        node is in this process, else over its link (dropped when `node` is not a member)."""
        nxt = next_in_ring(self.members, node)
        if nxt is None:
            return
        if nxt in self.nodes:
            self.deliver(nxt, msg)
            return
        try:
            await self.peers[nxt].send(self.clock.leave(msg))
        except LinkError as e:
            # The membership watch notices the dead link and fails what is in flight.
            log.warning("next_unreachable", node=node, next=nxt, error=str(e))
