"""Who is in the ring, as pure transitions: given the config, the live nodes, the current members
and the model, `decide` says what the ring becomes (nothing changes, a new ring with its plan, or
no ring because the live nodes cannot hold the model). The runtime carries the decision out.

The ring is the live nodes in config order; the head is the first of them. Every survivor
decides alike from the same inputs (plans are deterministic), so they agree without talking.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from mlxring.config import Config
from mlxring.model.sharded import ModelInfo
from mlxring.ring.plan import ModelFootprint, Plan, PlanError, PlanNode, plan_layers


@dataclass(frozen=True)
class Unchanged:
    """The live nodes are the ring's members already."""


@dataclass(frozen=True)
class NewRing:
    """The ring becomes `members` (in config order), each holding its range of `plan`."""

    members: tuple[str, ...]
    plan: Plan


@dataclass(frozen=True)
class CannotPlan:
    """The live nodes cannot hold the model; `error` says which node and why."""

    live: tuple[str, ...]
    error: str

    @property
    def reason(self) -> str:
        return f"the live nodes {list(self.live)} cannot hold the model: {self.error}"


Decision = Unchanged | NewRing | CannotPlan


def decide(
    config: Config,
    info: ModelInfo,
    live: tuple[str, ...],
    members: tuple[str, ...],
    memory: Mapping[str, int],
) -> Decision:
    """What the ring becomes when `live` are the nodes up and `members` the current ring;
    `memory` is each live node's memory where known (for the memory strategy)."""
    if live == members:
        return Unchanged()
    try:
        return NewRing(live, make_plan(config, info, live, memory))
    except PlanError as e:
        return CannotPlan(live, str(e))


def next_in_ring(members: Sequence[str], name: str) -> str | None:
    """The member after `name` in ring order (wrapping around); None when it is not one."""
    if name not in members:
        return None
    return members[(members.index(name) + 1) % len(members)]


def make_plan(
    config: Config,
    info: ModelInfo,
    members: Sequence[str] | None = None,
    memory: Mapping[str, int] | None = None,
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


def convoy_stages(convoys: int | None, members: Sequence[str], local: Collection[str]) -> int:
    """How many parts of the ring compute at the same time: the configured `convoys`, else one
    per process. Nodes in `local` share this process's compute; every other member is taken to
    be a process (a machine) of its own."""
    return convoys or (sum(n not in local for n in members) + any(n in local for n in members))
