"""Zeroconf discovery: advertise `_mlxring._tcp.local.` and resolve peers of one cluster to IPv4.

Each hosted node is one service instance `{cluster}-{name}._mlxring._tcp.local.` whose A record
is the node's IPv4 and whose TXT properties carry what the planner and the ring need. Peers are
resolved from what the browser has seen into `PeerInfo` with an IPv4 address; `.local` host
names are never looked up (the data path must not depend on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

import ifaddr
import structlog
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mlxring.protocol.codec import PROTOCOL_VERSION
from mlxring.tasks import TaskScope

log = structlog.get_logger()

SERVICE_TYPE = "_mlxring._tcp.local."
RESOLVE_TIMEOUT = 3.0  # seconds to resolve one announced service (SRV + TXT + A)
REGISTER_TIMEOUT = 10.0  # probing takes ~1 s; a conflict answer comes within it
CLOSE_TIMEOUT = 5.0
PROBE_INTERVAL = 1.0  # wait_for asks for a missing node this often


@dataclass(frozen=True)
class PeerInfo:
    """One node as advertised: who it is, where its ring and API listen, what it has."""

    name: str
    cluster: str
    address: str  # IPv4, dotted quad
    ring_port: int
    api_port: int
    memory_bytes: int | None = None
    chip: str | None = None
    gpu_cores: int | None = None
    version: int = PROTOCOL_VERSION


def instance_name(cluster: str, name: str) -> str:
    """The service instance (first label of the service name) of a node."""
    return f"{cluster}-{name}"


def service_name(cluster: str, name: str) -> str:
    return f"{instance_name(cluster, name)}.{SERVICE_TYPE}"


def _host_name(cluster: str, name: str) -> str:
    # The A record's owner: a valid, unique host label (a digest keeps "a.b" and "a_b" apart).
    label = re.sub(r"[^A-Za-z0-9-]", "-", f"mlxring-{cluster}-{name}")[:40].strip("-")
    digest = hashlib.sha256(f"{cluster}\0{name}".encode()).hexdigest()[:8]
    return f"{label}-{digest}.local."


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def resolve_interfaces(interfaces: Sequence[str]) -> list[str]:
    """IPv4 addresses (of this host) for interface names ("bridge0", "en5") or IPv4 literals.

    Order is kept, duplicates dropped; an unknown name, an interface without IPv4 or an address
    that is not this host's raises ValueError naming it.
    """
    adapters = ifaddr.get_adapters()
    local: set[str] = set()
    by_name: dict[str, list[str]] = {}
    for adapter in adapters:
        v4 = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        local.update(v4)
        # Linux and macOS name adapters by their BSD name; Windows by nice_name.
        for key in {adapter.name, adapter.nice_name}:
            by_name.setdefault(key, []).extend(v4)
    out: list[str] = []
    for item in interfaces:
        if _ipv4(item) is not None:
            if item not in local:
                raise ValueError(f"interface {item!r}: {item} is not an IPv4 address of this host")
            found = [item]
        elif item in by_name:
            found = by_name[item]
            if not found:
                raise ValueError(f"interface {item!r} has no IPv4 address")
        else:
            known = ", ".join(sorted(by_name)) or "none"
            raise ValueError(f"unknown interface {item!r} (this host has: {known})")
        out.extend(ip for ip in found if ip not in out)
    return out


def local_ipv4_addresses() -> list[str]:
    """Every non-loopback IPv4 address of this host (what `InterfaceChoice.All` listens on)."""
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.") and ip.ip not in out:
                out.append(ip.ip)
    return out


def _properties(me: PeerInfo) -> dict[str, str]:
    props = {
        "cluster": me.cluster,
        "node": me.name,
        "ring_port": str(me.ring_port),
        "api_port": str(me.api_port),
        "version": str(me.version),
    }
    if me.memory_bytes is not None:
        props["memory"] = str(me.memory_bytes)
    if me.chip is not None:
        props["chip"] = me.chip
    if me.gpu_cores is not None:
        props["gpu_cores"] = str(me.gpu_cores)
    return props


def _optional_int(props: dict[str, str | None], key: str) -> int | None:
    value = props.get(key)
    return None if value is None or value == "" else int(value)


def parse_service(info: ServiceInfo) -> PeerInfo:
    """A resolved service as a PeerInfo; ValueError says what is missing or malformed."""
    props = info.decoded_properties
    missing = [k for k in ("cluster", "node", "ring_port", "api_port") if not props.get(k)]
    if missing:
        raise ValueError(f"TXT lacks {', '.join(missing)}")
    # LIFO: after a node moves, the newest A record comes first (the old one expires in ~1 s).
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses:
        raise ValueError("no IPv4 address")
    try:
        return PeerInfo(
            name=str(props["node"]),
            cluster=str(props["cluster"]),
            address=addresses[0],
            ring_port=int(str(props["ring_port"])),
            api_port=int(str(props["api_port"])),
            memory_bytes=_optional_int(props, "memory"),
            chip=props.get("chip") or None,
            gpu_cores=_optional_int(props, "gpu_cores"),
            version=_optional_int(props, "version") or 0,
        )
    except ValueError as e:
        raise ValueError(f"malformed TXT {props}: {e}") from None


class Discovery:
    """Advertise this process's nodes and track the other nodes of one cluster.

    `peers` holds every node of the cluster the browser has resolved, our own advertised ones
    included (they are known without the network). Other clusters' services are ignored.
    """

    def __init__(self, cluster: str, interfaces: Sequence[str] = ()) -> None:
        if not cluster:
            raise ValueError("discovery: cluster name is empty")
        self.cluster = cluster
        self.interfaces = list(interfaces)
        # Resolved now so a wrong name fails at start-up with a clear message.
        self.addresses = resolve_interfaces(interfaces) if interfaces else local_ipv4_addresses()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._own: dict[str, tuple[PeerInfo, ServiceInfo]] = {}
        self._found: dict[str, PeerInfo] = {}  # lower-cased service name -> peer
        self._gen: dict[str, int] = {}  # per service: newer events void older resolutions
        # Resolutions and announcements in flight: they end with stop().
        self._tasks = TaskScope("discovery")
        self._probing: set[str] = set()  # nodes wait_for is asking for right now
        self._changed = asyncio.Event()

    @property
    def peers(self) -> dict[str, PeerInfo]:
        out = {p.name: p for p in self._found.values()}
        out.update({name: peer for name, (peer, _) in self._own.items()})
        return out

    def lookup(self, name: str) -> PeerInfo | None:
        return self.peers.get(name)

    async def start(self) -> None:
        if self._zc is not None:
            return
        choice: InterfaceChoice | list[str | int] = InterfaceChoice.All
        if self.interfaces:
            choice = [*self.addresses]
        # IPv4 only: peers are addressed by IPv4 and v6 link-local scopes buy nothing here.
        zc = AsyncZeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await zc.zeroconf.async_wait_for_start()
        except BaseException:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await zc.async_close()
            raise
        self._zc = zc
        self._tasks = TaskScope("discovery")
        await self._tasks.open()
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )
        log.info("discovery started", cluster=self.cluster, addresses=self.addresses)

    async def advertise(self, me: PeerInfo) -> None:
        """Register one hosted node (call once per node this process hosts)."""
        if self._zc is None:
            raise RuntimeError("discovery: advertise() before start()")
        if me.cluster != self.cluster:
            raise ValueError(f"discovery of cluster {self.cluster!r} cannot advertise {me}")
        if _ipv4(me.address) is None:
            raise ValueError(f"node {me.name!r}: address {me.address!r} is not an IPv4 address")
        if me.name in self._own:
            raise ValueError(f"node {me.name!r} is already advertised by this process")
        if self.interfaces and me.address not in self.addresses:
            # Legal (e.g. a NAT), but usually a node advertising its Wi-Fi IP on the bridge.
            log.warning(
                "advertised address is not on the discovery interfaces",
                node=me.name,
                address=me.address,
                interfaces=self.addresses,
            )
        label = instance_name(me.cluster, me.name)
        if len(label.encode()) > 63:
            raise ValueError(f"cluster + node name {label!r} is longer than 63 bytes (DNS label)")
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            service_name(me.cluster, me.name),
            port=me.ring_port,
            properties=_properties(me),
            server=_host_name(me.cluster, me.name),
            parsed_addresses=[me.address],
        )
        try:
            # Returns once probing proved the name unique; the announcements go on meanwhile.
            async with asyncio.timeout(REGISTER_TIMEOUT):
                announcing = await self._zc.async_register_service(info)
        except NonUniqueNameException:
            raise ValueError(
                f"node {me.name!r} of cluster {me.cluster!r} is already advertised on the network"
            ) from None
        except BadTypeInNameException:
            raise ValueError(f"node name {me.name!r} is not usable in a service name") from None
        self._tasks.spawn(announcing, "announce")
        self._own[me.name] = (me, info)
        self._notify()
        log.info("advertised", node=me.name, address=me.address, ring_port=me.ring_port)

    async def wait_for(self, names: Sequence[str], timeout: float) -> dict[str, PeerInfo]:
        """Block until every named node is known; TimeoutError names the ones still missing.

        Besides listening to the browser, it asks for each missing node by service name every
        second: a lost announcement then costs a second, not the browser's next backed-off query.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    peers = self.peers
                    missing = [n for n in names if n not in peers]
                    if not missing:
                        return {n: peers[n] for n in names}
                    for n in missing:
                        self._probe(n)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(PROBE_INTERVAL):
                            await self._changed.wait()
        except TimeoutError:
            missing = [n for n in names if n not in self.peers]
            raise TimeoutError(
                f"discovery: no node {', '.join(missing)} of cluster {self.cluster!r} "
                f"found within {timeout:g} s"
            ) from None

    async def stop(self) -> None:
        """Send goodbyes for our nodes and close (peers see them leave at once)."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._tasks.close(CLOSE_TIMEOUT)
                if self._browser is not None:
                    await self._browser.async_cancel()
                # async_close also unregisters every service (goodbye packets, TTL 0).
                await zc.async_close()
        self._browser = None
        self._own.clear()
        self._found.clear()
        self._notify()

    # --- browser side ---------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Cheap filter first; the TXT cluster is checked after resolving ("a" vs "a-b").
        if not name.lower().startswith(f"{self.cluster}-".lower()):
            return
        key = name.lower()
        gen = self._gen[key] = self._gen.get(key, 0) + 1
        if state_change is ServiceStateChange.Removed:
            peer = self._found.pop(key, None)
            if peer is not None:
                log.info("peer left", node=peer.name, address=peer.address)
                self._notify()
            return
        self._tasks.spawn(
            self._resolve(zeroconf, name, key, gen, RESOLVE_TIMEOUT, quiet=False), "resolve"
        )

    def _probe(self, node: str) -> None:
        """Ask for one node's service directly (at most one question in flight per node)."""
        if self._zc is None or node in self._probing:
            return
        name = service_name(self.cluster, node)
        key = name.lower()
        gen = self._gen.get(key, 0)
        task = self._tasks.spawn(
            self._resolve(self._zc.zeroconf, name, key, gen, PROBE_INTERVAL), "probe"
        )
        if task is not None:
            self._probing.add(node)
            task.add_done_callback(lambda _: self._probing.discard(node))

    async def _resolve(
        self, zeroconf: Zeroconf, name: str, key: str, gen: int, timeout: float, quiet: bool = True
    ) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            ok = await info.async_request(zeroconf, timeout * 1000)
        except Exception as e:  # a closing Zeroconf must not kill the loop's callbacks
            log.debug("peer resolution failed", service=name, error=repr(e))
            return
        if self._gen.get(key, 0) != gen:
            return  # a newer event (removal, update) came in meanwhile
        if not ok:
            if not quiet:
                log.warning("peer did not resolve", service=name, timeout_s=timeout)
            return
        try:
            peer = parse_service(info)
        except ValueError as e:
            log.warning("ignoring malformed peer", service=name, error=str(e))
            return
        if peer.cluster != self.cluster:
            log.debug("ignoring node of another cluster", service=name, cluster=peer.cluster)
            return
        if instance_name(peer.cluster, peer.name).lower() + "." + SERVICE_TYPE != key:
            log.warning("ignoring peer whose TXT node name does not match", service=name)
            return
        if peer.version != PROTOCOL_VERSION:
            log.warning(
                "peer speaks another protocol",
                node=peer.name,
                version=peer.version,
                ours=PROTOCOL_VERSION,
            )
        old = self._found.get(key)
        if old == peer:
            return
        self._found[key] = peer
        if old is None:
            log.info("peer found", node=peer.name, address=peer.address, ring_port=peer.ring_port)
        else:
            log.info("peer updated", node=peer.name, address=peer.address, was=old.address)
        self._notify()
