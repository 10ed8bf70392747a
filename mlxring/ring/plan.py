"""Partition a model's layers over the ring: contiguous ``[start, end)`` ranges in ring order.

Pure functions, no I/O: the same inputs give the same plan on every node, so nodes that plan
independently (e.g. survivors re-planning after a failure) agree without talking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

STRATEGIES = ("uniform", "memory", "compute", "manual")
GB = 1 << 30  # memory is counted in GiB and printed as "GB", as macOS does

Plan = list[tuple[int, int]]


class PlanError(ValueError):
    """The layers cannot be placed; the message says which node and why, on one line."""


@dataclass(frozen=True)
class PlanNode:
    name: str
    memory_bytes: int | None = None  # total memory; None = unknown (no fit check for this node)
    compute: float | None = None  # relative speed for the compute strategy; None = 1.0
    layers: tuple[int, int] | None = None  # [start, end) for the manual strategy


@dataclass(frozen=True)
class ModelFootprint:
    n_layers: int
    layer_bytes: int  # one transformer layer
    embed_bytes: int = 0  # token embedding, held by the first node
    head_bytes: int = 0  # final norm + LM head, held by the last node (tied: the embedding again)
    # Each layer's own bytes, where they differ (dense layers before mixture-of-experts ones);
    # empty: every layer takes `layer_bytes`. Shares are still counted in `layer_bytes` (the
    # largest), so a node's share never outgrows what the fit check allows.
    layer_sizes: tuple[int, ...] = ()

    def shard_bytes(self, layers: tuple[int, int], *, first: bool, last: bool) -> int:
        """Weight bytes a node needs for ``layers`` at that ring position."""
        start, end = layers
        extra = (self.embed_bytes if first else 0) + (self.head_bytes if last else 0)
        if self.layer_sizes:
            return sum(self.layer_sizes[start:end]) + extra
        return (end - start) * self.layer_bytes + extra


def usable_bytes(node: PlanNode, reserve_fraction: float = 0.1) -> int | None:
    """Memory the plan may fill on ``node``; the reserve is for the OS, KV caches, activations."""
    if node.memory_bytes is None:
        return None
    return int(node.memory_bytes * (1.0 - reserve_fraction))


def plan_layers(
    strategy: str,
    model: ModelFootprint,
    nodes: Sequence[PlanNode],
    *,
    reserve_fraction: float = 0.1,
) -> Plan:
    """Split ``model.n_layers`` layers over ``nodes`` (ring order) and check that the plan fits.

    uniform: equal shares. memory: shares proportional to the memory each node has left for
    layers (usable memory minus the embedding on the first node and the head on the last).
    compute: shares proportional to ``compute``. manual: each node's ``layers``, validated.
    Rounding is largest-remainder with ties to earlier nodes; every node gets at least one layer.
    Raises PlanError when the input is invalid or a node with known memory cannot hold its share.
    """
    _check_inputs(model, nodes, reserve_fraction)
    n = len(nodes)
    if strategy == "manual":
        plan = validate_manual(nodes, model.n_layers)
    elif strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r} (expected {', '.join(STRATEGIES)})")
    else:
        if model.n_layers < n:
            raise PlanError(
                f"cannot give each of {n} nodes a layer: the model has only {model.n_layers}"
            )
        if strategy == "uniform":
            weights = [Fraction(1)] * n
        elif strategy == "compute":
            weights = [Fraction(1 if node.compute is None else node.compute) for node in nodes]
        else:
            weights = _memory_weights(model, nodes, reserve_fraction)
        counts = _at_least_one(_largest_remainder(model.n_layers, weights))
        if strategy == "memory":
            counts = _respect_capacity(counts, _capacities(model, nodes, reserve_fraction))
        plan = _ranges(counts)
    check_fit(model, plan, nodes, reserve_fraction=reserve_fraction)
    return plan


def validate_manual(nodes: Sequence[PlanNode], n_layers: int) -> Plan:
    """The nodes' own ranges, if they tile ``[0, n_layers)`` in ring order; else PlanError."""
    plan: Plan = []
    prev_end, prev_name = 0, ""
    for i, node in enumerate(nodes):
        if node.layers is None:
            raise PlanError(f"manual plan: {node.name} has no layers")
        start, end = node.layers
        if not 0 <= start < end:
            raise PlanError(
                f"manual plan: {node.name} has an empty or negative range {_r(start, end)}"
            )
        if end > n_layers:
            raise PlanError(
                f"manual plan: {node.name} layers {_r(start, end)} go past the model's "
                f"{n_layers} layers"
            )
        if i == 0 and start != 0:
            raise PlanError(f"manual plan: gap: {node.name} is first but starts at layer {start}")
        if start < prev_end:
            raise PlanError(
                f"manual plan: {node.name} layers {_r(start, end)} overlap {prev_name} "
                f"(which ends at {prev_end})"
            )
        if start > prev_end:
            raise PlanError(
                f"manual plan: gap: layers {_r(prev_end, start)} belong to no node "
                f"(between {prev_name} and {node.name})"
            )
        plan.append((start, end))
        prev_end, prev_name = end, node.name
    if prev_end != n_layers:
        raise PlanError(
            f"manual plan: gap: layers {_r(prev_end, n_layers)} belong to no node "
            f"(the last node, {prev_name}, ends at {prev_end})"
        )
    return plan


def check_fit(
    model: ModelFootprint,
    plan: Sequence[tuple[int, int]],
    nodes: Sequence[PlanNode],
    *,
    reserve_fraction: float = 0.1,
) -> None:
    """Raise PlanError naming each node (of known memory) that cannot hold its share, and by how
    much it is short."""
    short = []
    for i, (node, layers) in enumerate(zip(nodes, plan, strict=True)):
        usable = usable_bytes(node, reserve_fraction)
        if usable is None:
            continue
        need = model.shard_bytes(layers, first=i == 0, last=i == len(plan) - 1)
        if need > usable:
            short.append(
                f"{node.name} needs {format_bytes(need)} for layers {_r(*layers)} but has "
                f"{format_bytes(usable)} usable ({format_bytes(need - usable)} short)"
            )
    if short:
        raise PlanError("plan does not fit: " + "; ".join(short))


def describe(
    plan: Sequence[tuple[int, int]],
    nodes: Sequence[PlanNode],
    model: ModelFootprint | None = None,
    *,
    reserve_fraction: float = 0.1,
) -> str:
    """A short table, one line per node: name, layers, count, weight bytes, usable memory."""
    rows = [("node", "layers", "n", "weights", "usable")]
    for i, (node, (start, end)) in enumerate(zip(nodes, plan, strict=True)):
        need = "?"
        if model is not None:
            need = format_bytes(
                model.shard_bytes((start, end), first=i == 0, last=i == len(plan) - 1)
            )
        usable = usable_bytes(node, reserve_fraction)
        rows.append(
            (node.name, _r(start, end), str(end - start), need,
             "?" if usable is None else format_bytes(usable))
        )  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if c == 2 else cell.ljust(w) for c, (cell, w) in
                  enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )  # fmt: skip


def format_bytes(n: int) -> str:
    """GB with one decimal, or MB below 0.1 GB where GB would round to nothing."""
    if n >= GB // 10:
        return f"{n / GB:.1f} GB"
    return f"{n / (1 << 20):.1f} MB"


def _check_inputs(
    model: ModelFootprint, nodes: Sequence[PlanNode], reserve_fraction: float
) -> None:
    if not nodes:
        raise PlanError("no nodes to place layers on")
    if model.n_layers < 1:
        raise PlanError(f"the model must have at least one layer, got {model.n_layers}")
    if min(model.layer_bytes, model.embed_bytes, model.head_bytes) < 0:
        raise PlanError("model byte sizes must be >= 0")
    if not 0.0 <= reserve_fraction < 1.0:
        raise PlanError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    seen: set[str] = set()
    for node in nodes:
        if node.name in seen:
            raise PlanError(f"duplicate node name {node.name!r}")
        seen.add(node.name)
        if node.memory_bytes is not None and node.memory_bytes <= 0:
            raise PlanError(f"{node.name}: memory_bytes must be > 0, got {node.memory_bytes}")
        if node.compute is not None and not (math.isfinite(node.compute) and node.compute > 0):
            raise PlanError(f"{node.name}: compute must be a finite number > 0, got {node.compute}")


def _memory_weights(
    model: ModelFootprint, nodes: Sequence[PlanNode], reserve_fraction: float
) -> list[Fraction]:
    missing = [node.name for node in nodes if node.memory_bytes is None]
    if missing:
        raise PlanError(
            f"strategy 'memory' needs the memory of every node; unknown for {', '.join(missing)}"
        )
    # Weight by room left for layers, so the node that also holds the embedding or the head
    # gets correspondingly fewer layers; exact fractions keep tie-breaking deterministic.
    room = [
        max(0, (usable_bytes(node, reserve_fraction) or 0) - _extras(model, i, len(nodes)))
        for i, node in enumerate(nodes)
    ]
    if sum(room) == 0:
        return [Fraction(1)] * len(nodes)  # nothing fits anywhere; check_fit will say so
    return [Fraction(r) for r in room]


def _capacities(
    model: ModelFootprint, nodes: Sequence[PlanNode], reserve_fraction: float
) -> list[int] | None:
    """Most layers each node can hold, or None when memory or layer size does not bound it."""
    if model.layer_bytes == 0:
        return None
    caps = []
    for i, node in enumerate(nodes):
        usable = usable_bytes(node, reserve_fraction)
        if usable is None:
            return None
        caps.append(max(0, usable - _extras(model, i, len(nodes))) // model.layer_bytes)
    return caps


def _extras(model: ModelFootprint, i: int, n: int) -> int:
    return (model.embed_bytes if i == 0 else 0) + (model.head_bytes if i == n - 1 else 0)


def _largest_remainder(total: int, weights: Sequence[Fraction]) -> list[int]:
    """Apportion ``total`` by ``weights``; leftover units go to the largest remainders, ties to
    the earlier node."""
    whole = sum(weights)
    quotas = [w * total / whole for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _at_least_one(counts: list[int]) -> list[int]:
    """Give every zero-layer node one layer taken from the largest share (earliest on ties).

    Needs sum(counts) >= len(counts), which plan_layers checks first.
    """
    counts = list(counts)
    for i, c in enumerate(counts):
        if c == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    return counts


def _respect_capacity(counts: list[int], caps: list[int] | None) -> list[int]:
    """Move layers off nodes that rounding pushed past their capacity onto the node with the most
    room left (earliest on ties). Left unchanged when the model cannot fit at all, so that
    check_fit reports the shortfall of the proportional plan."""
    if caps is None or min(caps) < 1 or sum(caps) < sum(counts):
        return counts
    counts = list(counts)
    for i in range(len(counts)):
        while counts[i] > caps[i]:
            j = max(range(len(counts)), key=lambda k: (caps[k] - counts[k], -k))
            counts[i] -= 1
            counts[j] += 1
    return counts


def _ranges(counts: Sequence[int]) -> Plan:
    plan, start = [], 0
    for c in counts:
        plan.append((start, start + c))
        start += c
    return plan


def _r(start: int, end: int) -> str:
    return f"[{start}, {end})"
