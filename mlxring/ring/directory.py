"""Where every node of the ring is and how much memory it has: nodes.toml first, else what
zeroconf found. Discovery runs only where the config leaves something out (a node without a host,
or a remote node's memory that the memory strategy needs); it also advertises this process's
nodes so that the others can find them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from mlxring.config import Config
from mlxring.ring.machine import DeviceFacts
from mlxring.transport.discovery import Discovery, PeerInfo, resolve_interfaces


class Directory:
    """The addresses and memory of the nodes of `config`; `names` are this process's own."""

    def __init__(self, config: Config, names: Sequence[str], facts: DeviceFacts) -> None:
        self.config = config
        self.names = list(names)
        self.facts = facts
        self.discovery: Discovery | None = None
        self.address: str | None = None  # what this process's nodes without a host advertise

    def needs_discovery(self) -> bool:
        """Zeroconf runs when a node has no host, or when planning needs remote memory."""
        remote = [n for n in self.config.nodes if n.name not in self.names]
        return any(n.host is None for n in self.config.nodes) or (
            self.config.cluster.strategy == "memory" and any(n.memory_bytes is None for n in remote)
        )

    async def start(self) -> None:
        """Start zeroconf and advertise this process's nodes, where it is needed."""
        if not self.needs_discovery():
            return
        self.discovery = Discovery(self.config.cluster.name, self.config.cluster.interfaces)
        await self.discovery.start()
        self.address = address = self.discovery.addresses[0]
        await asyncio.gather(
            *(self.discovery.advertise(self.advertised(n, address)) for n in self.names)
        )

    def advertised(self, name: str, address: str) -> PeerInfo:
        """What this process tells the others about its node `name`: its memory is what this
        node plans with (nodes.toml's memory_gb, else the memory detected here), so that every
        node computes the same plan."""
        node = self.config.node(name)
        return PeerInfo(
            name=name,
            cluster=self.config.cluster.name,
            address=node.host or address,
            ring_port=node.port,
            api_port=self.config.api_port(name),
            memory_bytes=self.memory_of(name),
            chip=self.facts.chip,
            gpu_cores=self.facts.gpu_cores,
        )

    def link_source(self, name: str) -> str | None:
        """Where the links that carry this process's node `name` leave from: its host, else the
        address it advertises while that is one of this host's own, else where the system
        picks. An open ring takes a node's name only from the address the node is found at, and
        a Mac with two networks (Wi-Fi and a Thunderbolt bridge) may pick the other one."""
        host = self.config.node(name).host
        if host is not None or self.address is None:
            return host
        try:
            return resolve_interfaces([self.address])[0]
        except ValueError:  # no longer this host's (its interface went down): the system picks
            return None

    async def wait_for(self, remote: Sequence[str], timeout: float) -> None:
        """Wait (up to `timeout`) until zeroconf has found what the `remote` nodes advertise."""
        if self.discovery is not None:
            with contextlib.suppress(TimeoutError):
                await self.discovery.wait_for(remote, timeout)

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()

    def ring_address(self, name: str) -> tuple[str, int] | None:
        """Where node `name`'s ring port is (None while zeroconf has not found it)."""
        n = self.config.node(name)
        if n.host:
            return n.host, n.port
        found = self.discovery.lookup(name) if self.discovery is not None else None
        return (found.address, found.ring_port) if found is not None else None

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
        if name in self.names:
            return self.facts.total_memory_bytes
        found = self.discovery.lookup(name) if self.discovery is not None else None
        return found.memory_bytes if found is not None else None
