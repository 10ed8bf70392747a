"""Every supported model family runs through a ring of separate processes exactly as mlx-lm
runs the whole model: one request alone, then eight at once (their decode steps batched, the
families' caches merged). The in-process splits of every family are in test_families.py.

Quantized models (4-bit) run in one process at 3 nodes; the ring at 2 and 4 nodes and 8-bit
models run in the slow set (`bin/test -m slow`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlxring.model.families import MADE
from mlxring.ring.runtime import Runtime

from .ringutil import (
    CONCURRENT_TEXTS,
    encode,
    head_here,
    local_ring,
    reference,
    ring_tokens,
    tiny_model,
    write_config,
)

PROMPT = "The ring carries activations from one Mac to the next, layer after layer."
FAMILIES = sorted(MADE)


async def _lone_then_concurrent(
    rt: Runtime, lone: list[int], concurrent: list[list[int]]
) -> tuple[list[int], list[list[int]]]:
    first = await ring_tokens(rt, lone, 32)
    rest = await asyncio.gather(*(ring_tokens(rt, p, 24) for p in concurrent))
    return first, list(rest)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_exact_through_three_processes(tmp_path: Path, family: str) -> None:
    model = tiny_model(family)
    lone = encode(model, PROMPT)
    concurrent = [encode(model, t) for t in CONCURRENT_TEXTS]
    want_lone = reference(model, lone, 32)
    want = [reference(model, p, 24) for p in concurrent]
    assert len(set(want_lone)) >= 8, "the oracle output is degenerate; the test would prove little"

    async def run(rt: Runtime) -> tuple[list[int], list[list[int]]]:
        return await _lone_then_concurrent(rt, lone, concurrent)

    got_lone, got = head_here(tmp_path, model, 3, run)
    assert got_lone == want_lone
    assert got == want


SLOW = pytest.mark.slow


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("n_nodes", "quantize"),
    [
        (1, None),
        (3, 4),
        pytest.param(2, None, marks=SLOW),
        pytest.param(4, None, marks=SLOW),
        pytest.param(3, 8, marks=SLOW),
    ],
)
async def test_family_is_exact_in_one_process(
    tmp_path: Path, family: str, n_nodes: int, quantize: int | None
) -> None:
    model = tiny_model(family, quantize=quantize)
    lone = encode(model, PROMPT)
    concurrent = [encode(model, t) for t in CONCURRENT_TEXTS]
    async with local_ring(write_config(tmp_path, model, n_nodes)) as rt:
        got_lone, got = await _lone_then_concurrent(rt, lone, concurrent)
        # The concurrent requests' decode steps ran as batched passes over merged caches
        # (but for a family that cannot batch: they took turns).
        batched = [node.actor.batches > 0 for node in rt.nodes.values()]
        assert batched == [MADE[family].batches] * n_nodes
    assert got_lone == reference(model, lone, 32)
    assert got == [reference(model, p, 24) for p in concurrent]
