"""Pieces of the node runtime: where the ring port listens, plans over live nodes, which
processes use gates, and how the node's task group ends."""

from __future__ import annotations

from mlxring.config import parse_config
from mlxring.model.sharded import ModelInfo
from mlxring.ring.directory import Directory
from mlxring.ring.machine import DeviceFacts
from mlxring.ring.membership import make_plan
from mlxring.ring.routing import ring_bind_address
from mlxring.ring.runtime import Runtime

NODES = "\n".join(
    f'[[nodes]]\nname = "n{i}"\nport = {5000 + i}\nlayers = [{a}, {b}]'
    for i, (a, b) in enumerate([(0, 2), (2, 9), (9, 12)])
)
INFO = ModelInfo(n_layers=12, layer_bytes=100, embed_bytes=10, head_bytes=10, model_type="qwen3")


def test_ring_port_binds_the_node_host_or_the_chosen_interface() -> None:
    with_host = parse_config(
        '[cluster]\nmodel = "demo"\n[[nodes]]\nname = "a"\nhost = "127.0.0.3"\nport = 1\n'
    )
    assert ring_bind_address(with_host, with_host.nodes[0]) == "127.0.0.3"
    on_lo = parse_config(
        '[cluster]\nmodel = "demo"\ninterfaces = ["lo"]\n[[nodes]]\nname = "a"\nport = 1\n'
    )
    assert ring_bind_address(on_lo, on_lo.nodes[0]) == "127.0.0.1"
    anywhere = parse_config('[cluster]\nmodel = "demo"\n[[nodes]]\nname = "a"\nport = 1\n')
    assert ring_bind_address(anywhere, anywhere.nodes[0]) == "0.0.0.0"


def test_a_manual_plan_is_kept_whole_and_replaced_when_a_node_is_missing() -> None:
    config = parse_config(f'[cluster]\nmodel = "demo"\nstrategy = "manual"\n{NODES}\n')
    assert make_plan(config, INFO) == [(0, 2), (2, 9), (9, 12)]
    # n1 is gone: its manual range cannot be covered, so the survivors split all 12 layers.
    assert make_plan(config, INFO, ("n0", "n2")) == [(0, 6), (6, 12)]
    # With memory known, the survivors split by memory instead.
    assert make_plan(config, INFO, ("n0", "n2"), {"n0": 3 << 30, "n2": 1 << 30}) == [
        (0, 9),
        (9, 12),
    ]


def test_only_a_process_hosting_one_shard_uses_gates() -> None:
    """A waiting gate holds its process's compute stream: a second shard of the process could
    wait on it for the very input that would open it."""
    config = parse_config(f'[cluster]\nmodel = "demo"\nstrategy = "manual"\n{NODES}\n')
    assert Runtime(config, ["n1"]).gates
    assert not Runtime(config, ["n0", "n1"]).gates
    off = parse_config(f'[cluster]\nmodel = "demo"\nstrategy = "manual"\ngates = false\n{NODES}\n')
    assert not Runtime(off, ["n1"]).gates


def test_a_node_advertises_the_memory_it_plans_with() -> None:
    """Peers plan with what a node advertises; the node plans with its own memory_of. Without
    memory_gb both are the memory detected here, or plans would differ across the ring."""
    config = parse_config(
        '[cluster]\nmodel = "demo"\n[[nodes]]\nname = "a"\nport = 1\n'
        '[[nodes]]\nname = "b"\nport = 2\nmemory_gb = 2\n'
    )
    facts = DeviceFacts(
        total_memory_bytes=7 << 30, available_memory_bytes=None, chip="M9", gpu_cores=99,
        system="Darwin",
    )  # fmt: skip
    here = Directory(config, ["a", "b"], facts)
    a = here.advertised("a", "10.0.0.5")
    assert (a.memory_bytes, a.address, a.chip) == (7 << 30, "10.0.0.5", "M9")
    assert here.advertised("b", "10.0.0.5").memory_bytes == here.memory_of("b") == 2 << 30
