"""Layer partitioning: strategies, rounding, manual validation, fit checks, properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlxring.ring.plan import (
    GB,
    ModelFootprint,
    PlanError,
    PlanNode,
    check_fit,
    describe,
    plan_layers,
    usable_bytes,
    validate_manual,
)

MB = 1 << 20
SMALL = ModelFootprint(n_layers=28, layer_bytes=100 * MB, embed_bytes=50 * MB, head_bytes=50 * MB)


def nodes(*names: str, **kw: object) -> list[PlanNode]:
    return [PlanNode(name, **kw) for name in names]  # type: ignore[arg-type]


def counts(plan: list[tuple[int, int]]) -> list[int]:
    return [end - start for start, end in plan]


def assert_cover(plan: list[tuple[int, int]], n_layers: int, n_nodes: int) -> None:
    assert len(plan) == n_nodes
    assert plan[0][0] == 0 and plan[-1][1] == n_layers
    for (_, end), (start, _) in zip(plan, plan[1:], strict=False):
        assert end == start
    assert all(end - start >= 1 for start, end in plan)


def test_uniform_28_over_3() -> None:
    assert plan_layers("uniform", SMALL, nodes("a", "b", "c")) == [(0, 10), (10, 19), (19, 28)]


def test_uniform_even_and_single() -> None:
    assert counts(plan_layers("uniform", SMALL, nodes("a", "b", "c", "d"))) == [7, 7, 7, 7]
    assert plan_layers("uniform", SMALL, nodes("a")) == [(0, 28)]


def test_memory_16_16_48_is_about_1_1_3() -> None:
    ring = [PlanNode("m1", 16 * GB), PlanNode("m2", 16 * GB), PlanNode("studio", 48 * GB)]
    plan = plan_layers("memory", ModelFootprint(28, 100 * MB), ring)
    assert counts(plan) == [6, 5, 17]  # quotas 5.6/5.6/16.8; the remainder tie goes to m1
    assert_cover(plan, 28, 3)
    # The same with a real-ish embedding and head: still about 1:1:3, first node a bit lighter.
    c = counts(plan_layers("memory", SMALL, ring))
    assert sum(c) == 28 and abs(c[0] - c[1]) <= 1 and 16 <= c[2] <= 17


def test_memory_reserve_fraction_does_not_change_ratio() -> None:
    ring = [PlanNode("a", 8 * GB), PlanNode("b", 24 * GB)]
    model = ModelFootprint(32, 10 * MB)
    assert counts(plan_layers("memory", model, ring)) == [8, 24]
    assert counts(plan_layers("memory", model, ring, reserve_fraction=0.5)) == [8, 24]


def test_memory_needs_every_nodes_memory() -> None:
    ring = [PlanNode("a", 16 * GB), PlanNode("b"), PlanNode("c")]
    with pytest.raises(PlanError, match="unknown for b, c"):
        plan_layers("memory", SMALL, ring)


def test_memory_rounding_never_overfills_a_node() -> None:
    # Quotas 9.47 / 6.53 round to 9 / 7, but b holds only 6 whole layers: one moves to a.
    model = ModelFootprint(n_layers=16, layer_bytes=GB)
    ring = [PlanNode("a", 10 * GB), PlanNode("b", int(6.9 * GB))]
    assert counts(plan_layers("memory", model, ring, reserve_fraction=0.0)) == [10, 6]


def test_compute_weighted() -> None:
    ring = [PlanNode("a", compute=1.0), PlanNode("b", compute=3.0)]
    assert counts(plan_layers("compute", ModelFootprint(8, 0), ring)) == [2, 6]
    # missing compute counts as 1.0
    ring = [PlanNode("a"), PlanNode("b", compute=2.0), PlanNode("c", compute=1.0)]
    assert counts(plan_layers("compute", ModelFootprint(8, 0), ring)) == [2, 4, 2]


def test_every_node_gets_a_layer() -> None:
    ring = [PlanNode("tiny", compute=0.001), PlanNode("big", compute=1000.0), PlanNode("t2")]
    # quotas 0.005 / 4.99 / 0.005 round to 0 / 5 / 0; big gives one layer to each of the others
    assert counts(plan_layers("compute", ModelFootprint(5, 0), ring)) == [1, 3, 1]


def test_fewer_layers_than_nodes() -> None:
    with pytest.raises(PlanError, match="only 2"):
        plan_layers("uniform", ModelFootprint(2, 0), nodes("a", "b", "c"))


def test_manual_plan() -> None:
    ring = [PlanNode("a", layers=(0, 10)), PlanNode("b", layers=(10, 28))]
    assert plan_layers("manual", SMALL, ring) == [(0, 10), (10, 28)]


@pytest.mark.parametrize(
    ("layers", "words", "name"),
    [
        ([(0, 10), (8, 20), (20, 28)], "overlap", "b"),
        ([(0, 10), (12, 20), (20, 28)], "gap", "b"),
        ([(0, 10), (10, 20), (20, 30)], "go past the model's 28 layers", "c"),
        ([(0, 10), (10, 20), (20, 26)], "gap", "c"),
        ([(1, 10), (10, 20), (20, 28)], "gap", "a"),
        ([(0, 10), (10, 10), (10, 28)], "empty", "b"),
        ([(0, 10), None, (10, 28)], "no layers", "b"),
    ],
)
def test_manual_rejected(layers: list[tuple[int, int] | None], words: str, name: str) -> None:
    ring = [PlanNode(n, layers=r) for n, r in zip("abc", layers, strict=True)]
    with pytest.raises(PlanError) as info:
        plan_layers("manual", SMALL, ring)
    assert words in str(info.value) and name in str(info.value)
    with pytest.raises(PlanError):
        validate_manual(ring, 28)


def test_not_fitting_is_refused_with_shortfall() -> None:
    model = ModelFootprint(n_layers=30, layer_bytes=GB)
    ring = [PlanNode("mini1", 16 * GB), PlanNode("mini2", 10 * GB), PlanNode("mini3", 16 * GB)]
    with pytest.raises(PlanError) as info:
        plan_layers("uniform", model, ring)
    # mini2: 10 layers = 10.0 GB needed, 9.0 GB usable
    assert str(info.value) == (
        "plan does not fit: mini2 needs 10.0 GB for layers [10, 20) but has 9.0 GB usable "
        "(1.0 GB short)"
    )


def test_memory_strategy_refuses_a_model_too_big_for_the_ring() -> None:
    model = ModelFootprint(n_layers=40, layer_bytes=GB, embed_bytes=GB, head_bytes=GB)
    ring = [PlanNode("a", 16 * GB), PlanNode("b", 16 * GB)]
    with pytest.raises(PlanError, match="plan does not fit: .*short"):
        plan_layers("memory", model, ring)


def test_embedding_and_head_count_toward_fit() -> None:
    model = ModelFootprint(n_layers=2, layer_bytes=GB, embed_bytes=4 * GB, head_bytes=GB)
    ring = [PlanNode("a", 5 * GB), PlanNode("b", 5 * GB)]  # usable 4.5 GB each
    with pytest.raises(PlanError, match=r"a needs 5\.0 GB .* \(0\.5 GB short\)"):
        plan_layers("uniform", model, ring)
    check_fit(model, [(0, 1), (1, 2)], ring, reserve_fraction=0.0)  # 5 GB fits in 5 GB


def test_unknown_memory_is_not_checked() -> None:
    ring = [PlanNode("a"), PlanNode("b")]
    assert plan_layers("uniform", ModelFootprint(4, 1000 * GB), ring) == [(0, 2), (2, 4)]


def test_unknown_strategy() -> None:
    with pytest.raises(PlanError, match="unknown strategy 'fast'"):
        plan_layers("fast", SMALL, nodes("a"))


def test_bad_inputs() -> None:
    with pytest.raises(PlanError, match="no nodes"):
        plan_layers("uniform", SMALL, [])
    with pytest.raises(PlanError, match="duplicate"):
        plan_layers("uniform", SMALL, nodes("a", "a"))
    with pytest.raises(PlanError, match="compute"):
        plan_layers("compute", SMALL, [PlanNode("a", compute=0.0)])
    with pytest.raises(PlanError, match="reserve_fraction"):
        plan_layers("uniform", SMALL, nodes("a"), reserve_fraction=1.0)


def test_describe() -> None:
    ring = [PlanNode("mini1", 16 * GB), PlanNode("mini2")]
    text = describe([(0, 14), (14, 28)], ring, SMALL)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].split() == ["node", "layers", "n", "weights", "usable"]
    assert "mini1" in lines[1] and "[0, 14)" in lines[1] and "14.4 GB" in lines[1]
    assert lines[2].rstrip().endswith("?")


def test_deterministic() -> None:
    ring = [PlanNode("a", 16 * GB, 1.3), PlanNode("b", 24 * GB, 2.1), PlanNode("c", 8 * GB, 0.7)]
    for strategy in ("uniform", "memory", "compute"):
        first = plan_layers(strategy, SMALL, ring)
        assert all(plan_layers(strategy, SMALL, ring) == first for _ in range(5))


@st.composite
def plan_inputs(draw: st.DrawFn) -> tuple[str, ModelFootprint, list[PlanNode]]:
    strategy = draw(st.sampled_from(["uniform", "memory", "compute", "manual"]))
    n_nodes = draw(st.integers(1, 8))
    n_layers = draw(st.integers(n_nodes, 200))
    layer_bytes = draw(st.integers(0, 2 * GB))
    model = ModelFootprint(
        n_layers, layer_bytes, draw(st.integers(0, 4 * GB)), draw(st.integers(0, 4 * GB))
    )
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n_layers - 1)), min_size=n_nodes - 1,
                               max_size=n_nodes - 1)))  # fmt: skip
    bounds = [0, *cuts, n_layers]
    ring = [
        PlanNode(
            f"n{i}",
            memory_bytes=draw(st.none() | st.integers(1, 512 * GB))
            if strategy != "memory"
            else draw(st.integers(1, 512 * GB)),
            compute=draw(st.none() | st.floats(1e-3, 1e3)),
            layers=(bounds[i], bounds[i + 1]),
        )
        for i in range(n_nodes)
    ]
    return strategy, model, ring


@given(plan_inputs(), st.floats(0.0, 0.9))
def test_property_contiguous_cover(
    inputs: tuple[str, ModelFootprint, list[PlanNode]], reserve: float
) -> None:
    strategy, model, ring = inputs
    try:
        plan = plan_layers(strategy, model, ring, reserve_fraction=reserve)
    except PlanError as e:
        # The only way valid input can fail is a real shortage of memory.
        assert str(e).startswith("plan does not fit: ")
        return
    assert_cover(plan, model.n_layers, len(ring))
    if strategy == "manual":
        assert plan == [node.layers for node in ring]


@given(plan_inputs())
def test_property_memory_plan_fits_when_ring_has_room(
    inputs: tuple[str, ModelFootprint, list[PlanNode]],
) -> None:
    _, model, ring = inputs
    # Give every node room for the whole model: the memory plan must then always succeed.
    total = model.n_layers * model.layer_bytes + model.embed_bytes + model.head_bytes
    roomy = [PlanNode(n.name, memory_bytes=2 * total + 1) for n in ring]
    plan = plan_layers("memory", model, roomy)
    assert_cover(plan, model.n_layers, len(ring))


@given(plan_inputs(), st.floats(0.0, 0.9))
def test_property_memory_plan_fits_whenever_some_plan_fits(
    inputs: tuple[str, ModelFootprint, list[PlanNode]], reserve: float
) -> None:
    _, model, ring = inputs
    ring = [PlanNode(n.name, memory_bytes=n.memory_bytes or 1) for n in ring]
    n = len(ring)
    # Room for layers on each node once the first holds the embedding and the last the head.
    room = [
        (usable_bytes(node, reserve) or 0)
        - (model.embed_bytes if i == 0 else 0)
        - (model.head_bytes if i == n - 1 else 0)
        for i, node in enumerate(ring)
    ]
    if model.layer_bytes == 0:
        feasible = min(room) >= 0
    else:
        caps = [max(0, r) // model.layer_bytes for r in room]
        feasible = min(caps) >= 1 and sum(caps) >= model.n_layers
    if feasible:
        assert_cover(
            plan_layers("memory", model, ring, reserve_fraction=reserve), model.n_layers, n
        )
    else:
        with pytest.raises(PlanError, match="^plan does not fit: "):
            plan_layers("memory", model, ring, reserve_fraction=reserve)
