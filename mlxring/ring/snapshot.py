"""One frozen snapshot of the ring as this process sees it, for everything that reports on it.

`take` reads the runtime once (config, membership and plan, the head's ring monitor and engine,
this process's shards and links) and returns plain frozen dataclasses: `RingSnapshot`, one
`NodeRow` per configured node, one `LinkRow` per outbound link and one `TaskRow` per failing
long-lived task of this process. `/cluster/status` (and so
`mlxring status`, `mlxring top` and the web page) renders its JSON from it, and the Prometheus
collector reads its metrics from it, so the two never disagree on what a node is.

What the API measures itself (its queue, the token rate and busy shares it samples over a few
seconds) is passed in, not read here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from mlxring.protocol.messages import NodeStats

if TYPE_CHECKING:
    from mlxring.ring.runtime import Runtime
    from mlxring.shard.actor import ShardActor

RECENT = 256  # hop and trip samples kept in a snapshot


@dataclass(frozen=True)
class QueueDepth:
    running: int  # requests generating
    waiting: int  # requests waiting for a generation slot


@dataclass(frozen=True)
class LocalShard:
    """Counters of a node whose shard runs in this process, read directly from its actor."""

    active_bytes: int  # MLX memory of this process (every local node shares it)
    peak_bytes: int
    total_bytes: int  # this machine's memory
    requests: int  # requests holding KV caches there
    busy_s: float
    steps: int
    kv_bytes: int
    mailbox: int  # messages waiting for the shard
    batched_steps: int
    batched_rows: int
    rejected: int  # connections or frames its listener refused


@dataclass(frozen=True)
class NodeRow:
    """One configured node. `layers` and `up` are the best view this process has: on a head
    whose last probe came back, what that probe found; otherwise the plan and the links."""

    name: str
    position: int
    address: str | None
    ring_port: int
    api_port: int
    head: bool
    member: bool
    layers: tuple[int, int] | None
    up: bool
    planned: tuple[int, int] | None  # its range in the current plan
    reachable: bool  # its shard runs here, or the heartbeat link to it is up
    report: NodeStats | None  # what it reported of itself as the head's last good probe passed
    busy_share: float | None  # share of recent seconds its shard computed (sampled by the API)
    local: LocalShard | None  # set when its shard runs in this process


@dataclass(frozen=True)
class LinkRow:
    peer: str
    up: bool
    reconnects: int
    rtt_s: float  # last heartbeat round trip


@dataclass(frozen=True)
class TaskRow:
    """A long-lived task of this process that failed and is not well again yet."""

    task: str
    nodes: tuple[str, ...]  # the nodes of the process it runs in
    cause: str  # its last failure
    failures: int  # in a row
    failing_s: float  # since the first of them
    retry_in_s: float | None  # until it starts again; None: it runs again (not yet long)
    vital: bool  # the ring cannot serve from this process while it is down
    text: str  # all of it in a line: "task sweep failed: RuntimeError: ... (retry 3 in 4.0 s)"


@dataclass(frozen=True)
class RingSnapshot:
    cluster: str
    model: str
    head: str
    answered_by: str  # this process's first node
    members: tuple[str, ...]
    ring_down: str  # why this process's part of the ring cannot serve ("" when it can)
    reason: str  # why a request sent here cannot be served now ("" when it can)
    hop_s: float | None  # per-hop time of the head's last probe, when it came back
    probe_age_s: float | None  # seconds since the head last checked the ring
    hop_samples_s: tuple[float, ...]  # recent per-hop times of the head's probes
    decode_hop_samples_s: tuple[float, ...]  # network time of one hop of recent decode steps
    decode_trip_samples_s: tuple[float, ...]  # head-to-head times of recent decode steps
    tokens_generated: int
    tokens_per_s: float | None  # sampled by the API
    queue: QueueDepth
    nodes: tuple[NodeRow, ...]
    links: tuple[LinkRow, ...]
    tasks: tuple[TaskRow, ...]

    @property
    def ok(self) -> bool:
        return not self.reason


def not_serving(rt: Runtime) -> str:
    """Why the head in this process cannot serve now ("" when it can)."""
    reason = rt.serving_reason()
    if not reason and rt.engine is None:
        reason = "the head is not serving yet"
    return reason


def kv_cache_bytes(actor: ShardActor) -> int:
    """Bytes held by a shard's KV caches: each request's own, plus the merged caches of its
    convoys (read defensively: a long prompt chunk on the compute thread may add a request)."""
    total = 0
    try:
        # list() copies in one C call, so a request added meanwhile cannot break the loop.
        caches = [c for st in list(actor.requests.values()) for c in st.caches]
        caches += [c for merged in list(actor.convoys.merged.values()) for c in merged]
    except RuntimeError:  # a dict changed size during the copy: report nothing this time
        return 0
    for c in caches:
        try:
            total += int(c.nbytes)
        except (AttributeError, NotImplementedError, TypeError):
            continue  # a cache kind without nbytes (or not filled yet) counts as empty
    return total


def take(
    rt: Runtime,
    queue: QueueDepth = QueueDepth(0, 0),
    tokens_per_s: float | None = None,
    busy_share: Mapping[str, float] | None = None,
) -> RingSnapshot:
    """The ring as this process sees it now."""
    monitor, engine = rt.monitor, rt.engine
    view = monitor.view if monitor is not None else None
    probed = {h[0]: (h[1], h[2]) for h in view.hops} if view is not None and view.ok else None
    # The plan is read only while it matches the members (a re-plan sets both in turn).
    planned = rt.layout if len(rt.members) == len(rt.plan) else {}
    reports = monitor.stats if monitor is not None else {}
    shares = busy_share or {}
    process_active, process_peak = mx.get_active_memory(), mx.get_peak_memory()
    rows = []
    for i, n in enumerate(rt.config.nodes):
        reachable = rt.is_up(n.name)
        local = rt.nodes.get(n.name)
        rows.append(
            NodeRow(
                name=n.name,
                position=i,
                address=n.host,
                ring_port=n.port,
                api_port=rt.config.api_port(n.name),
                head=n.name == rt.head_name,
                member=n.name in rt.members,
                layers=probed.get(n.name) if probed is not None else planned.get(n.name),
                up=n.name in probed if probed is not None else reachable,
                planned=planned.get(n.name),
                reachable=reachable,
                report=reports.get(n.name),
                busy_share=shares.get(n.name),
                local=LocalShard(
                    active_bytes=process_active,
                    peak_bytes=process_peak,
                    total_bytes=rt.facts.total_memory_bytes,
                    requests=len(local.actor.requests),
                    busy_s=local.actor.busy_s,
                    steps=local.actor.steps,
                    kv_bytes=kv_cache_bytes(local.actor),
                    mailbox=local.actor.backlog,
                    batched_steps=local.actor.batches,
                    batched_rows=local.actor.batched_rows,
                    rejected=local.listener.rejected,
                )
                if local is not None
                else None,
            )
        )
    links = tuple(LinkRow(name, p.up, p.reconnects, p.rtt_s) for name, p in rt.peers.items())
    now = time.monotonic()
    tasks = tuple(
        TaskRow(
            task=f.task,
            nodes=tuple(rt.names),
            cause=f.cause,
            failures=f.failures,
            failing_s=now - f.since,
            retry_in_s=max(0.0, f.retry_at - now) if f.down else None,
            vital=f.vital,
            text=f.describe(now),
        )
        for f in rt.task_faults()
    )
    return RingSnapshot(
        cluster=rt.config.cluster.name,
        model=rt.model_name,
        head=rt.head_name,
        answered_by=rt.names[0],
        members=tuple(rt.members),
        ring_down=rt.serving_reason(),
        reason=not_serving(rt),
        hop_s=view.hop_s if view is not None and view.ok else None,
        probe_age_s=time.monotonic() - view.checked if view is not None and view.checked else None,
        hop_samples_s=tuple(monitor.hop_samples[-RECENT:]) if monitor is not None else (),
        decode_hop_samples_s=tuple(engine.hop_s[-RECENT:]) if engine is not None else (),
        decode_trip_samples_s=tuple(engine.trip_s[-RECENT:]) if engine is not None else (),
        tokens_generated=engine.tokens_generated if engine is not None else 0,
        tokens_per_s=tokens_per_s,
        queue=queue,
        nodes=tuple(rows),
        links=links,
        tasks=tasks,
    )
