"""Membership as pure transitions: what the ring becomes for a live set, on real configs. The
re-planning these decisions drive runs for real in test_faults."""

from __future__ import annotations

import pytest

from mlxring.config import Config, parse_config
from mlxring.model.sharded import ModelInfo
from mlxring.ring.membership import (
    CannotPlan,
    NewRing,
    Unchanged,
    convoy_stages,
    decide,
    make_plan,
    next_in_ring,
)

GIB = 1 << 30
INFO = ModelInfo(n_layers=12, layer_bytes=GIB, embed_bytes=GIB, head_bytes=GIB, model_type="qwen3")
ALL = ("n0", "n1", "n2")


def ring(strategy: str, extra_cluster: str = "", memory_gb: tuple[float, ...] = ()) -> Config:
    nodes = "\n".join(
        f'[[nodes]]\nname = "n{i}"\nport = {5000 + i}'
        + (f"\nmemory_gb = {memory_gb[i]}" if memory_gb else "")
        for i in range(3)
    )
    return parse_config(
        f'[cluster]\nmodel = "demo"\nstrategy = "{strategy}"\n{extra_cluster}\n{nodes}\n'
    )


def test_the_members_already_live_change_nothing() -> None:
    config = ring("uniform")
    assert decide(config, INFO, ALL, ALL, {}) == Unchanged()
    assert decide(config, INFO, ("n0", "n2"), ("n0", "n2"), {}) == Unchanged()


def test_a_cold_start_forms_the_whole_ring() -> None:
    config = ring("uniform")
    assert decide(config, INFO, ALL, (), {}) == NewRing(ALL, [(0, 4), (4, 8), (8, 12)])


def test_a_lost_node_gives_the_survivors_its_layers_and_a_returning_one_takes_them_back() -> None:
    config = ring("uniform")
    lost = decide(config, INFO, ("n0", "n2"), ALL, {})
    assert lost == NewRing(("n0", "n2"), [(0, 6), (6, 12)])
    back = decide(config, INFO, ALL, ("n0", "n2"), {})
    assert back == NewRing(ALL, [(0, 4), (4, 8), (8, 12)])


def test_memory_known_at_run_time_shapes_the_plan() -> None:
    config = ring("memory")
    memory = {"n0": 64 * GIB, "n1": 16 * GIB, "n2": 16 * GIB}
    assert decide(config, INFO, ALL, (), memory) == NewRing(ALL, [(0, 8), (8, 10), (10, 12)])
    # nodes.toml's memory_gb wins over what a node reports.
    configured = ring("memory", memory_gb=(16, 16, 64))
    assert decide(configured, INFO, ALL, (), memory) == NewRing(ALL, [(0, 2), (2, 4), (4, 12)])


def test_survivors_that_cannot_hold_the_model_say_which_node_and_why() -> None:
    config = ring("memory", memory_gb=(4, 40, 4))
    got = decide(config, INFO, ("n0", "n2"), ALL, {})
    assert isinstance(got, CannotPlan)
    assert got.live == ("n0", "n2")
    assert got.reason.startswith("the live nodes ['n0', 'n2'] cannot hold the model: ")
    assert got.error in got.reason and ("n0" in got.error or "n2" in got.error)


def test_a_ring_that_could_not_plan_tries_again_over_the_same_nodes() -> None:
    """After a failed plan the ring has no members, so the same live set is a change again."""
    config = ring("memory", memory_gb=(4, 4, 4))
    assert isinstance(decide(config, INFO, ALL, (), {}), CannotPlan)


def test_every_survivor_decides_alike() -> None:
    config = ring("memory")
    memory = {"n0": 32 * GIB, "n2": 48 * GIB}
    reversed_memory = dict(reversed(memory.items()))
    assert decide(config, INFO, ("n0", "n2"), ALL, memory) == decide(
        config, INFO, ("n0", "n2"), ("n0", "n1", "n2"), reversed_memory
    )


def test_a_manual_plan_survives_only_whole() -> None:
    config = parse_config(
        '[cluster]\nmodel = "demo"\nstrategy = "manual"\n'
        + "\n".join(
            f'[[nodes]]\nname = "n{i}"\nport = {5000 + i}\nlayers = [{a}, {b}]'
            for i, (a, b) in enumerate([(0, 2), (2, 9), (9, 12)])
        )
    )
    assert decide(config, INFO, ALL, (), {}) == NewRing(ALL, [(0, 2), (2, 9), (9, 12)])
    assert make_plan(config, INFO, ("n1", "n2")) == [(0, 6), (6, 12)]


@pytest.mark.parametrize(
    ("members", "name", "nxt"),
    [
        (ALL, "n0", "n1"),
        (ALL, "n2", "n0"),
        (("n0", "n2"), "n0", "n2"),
        (("n1",), "n1", "n1"),
        (("n0", "n2"), "n1", None),
        ((), "n0", None),
    ],
)
def test_next_in_ring_wraps_around_the_members(
    members: tuple[str, ...], name: str, nxt: str | None
) -> None:
    assert next_in_ring(members, name) == nxt


def test_convoys_are_one_per_process_unless_configured() -> None:
    assert convoy_stages(None, ALL, {"n0"}) == 3  # three processes
    assert convoy_stages(None, ALL, {"n0", "n1"}) == 2  # n0 and n1 share this process
    assert convoy_stages(None, ALL, set(ALL)) == 1
    assert convoy_stages(None, ("n1", "n2"), {"n0"}) == 2  # this process is not in the ring
    assert convoy_stages(1, ALL, {"n0"}) == 1
    config = ring("uniform", "convoys = 2")
    assert convoy_stages(config.tuning.convoys, ALL, {"n0"}) == 2
