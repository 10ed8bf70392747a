"""Network-namespace test harness: N isolated "hosts" on one private Linux bridge.

Layout of `Netns(n)`::

    hub namespace  mlxr{pid}{tag}br : bridge br0 + veths p0..p{n-1} (no addresses)
    host namespace mlxr{pid}{tag}a  : eth0 = 10.X.Y.1/24, lo up, 224.0.0.0/4 dev eth0
    host namespace mlxr{pid}{tag}b  : eth0 = 10.X.Y.2/24, ...

Everything (the bridge included) lives inside namespaces created here, so the host's own
namespace is never touched and no packet can be routed to the outside world: the namespaces
have no default route and no link out. Deleting the namespaces deletes the bridge and veths.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

_IP_TIMEOUT = 10.0
_counter = itertools.count()


def _ip(*args: str) -> None:
    """Run one `ip` command; a failure raises with its stderr (tests show why set-up failed)."""
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


@functools.cache
def skip_reason() -> str | None:
    """Why netns tests cannot run here (None when they can): checked once, by trying it."""
    if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network-namespace tests need root (run the suite as root, e.g. in CI)"
    if shutil.which("ip") is None:
        return "network-namespace tests need the `ip` command (apt-get install iproute2)"
    try:
        with Netns(1):
            pass
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"cannot create network namespaces here: {e}"
    return None


@dataclass(frozen=True)
class Host:
    """One namespace on the bridge."""

    ns: str
    address: str  # IPv4 of eth0 inside the namespace
    interface: str = "eth0"


class Netns:
    """Context manager: create the namespaces on enter, remove all of it on exit (even on failure).

    Processes started with `popen` are killed on exit, before the namespaces go (a namespace
    with a live process in it would outlive `ip netns delete`).
    """

    def __init__(self, n: int) -> None:
        if not 1 <= n <= 26:
            raise ValueError(f"Netns supports 1..26 namespaces, not {n}")
        # pid + a per-process counter: concurrent runs and nested harnesses never clash.
        tag = f"mlxr{os.getpid()}n{next(_counter)}"
        self.hub = f"{tag}br"
        # A random /24 in 10/8 per run; it exists only inside these namespaces.
        x, y = random.randrange(256), random.randrange(256)
        self.subnet = f"10.{x}.{y}.0/24"
        self.hosts: list[Host] = [
            Host(f"{tag}{chr(ord('a') + i)}", f"10.{x}.{y}.{i + 1}") for i in range(n)
        ]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        # A leftover of a killed earlier run with our pid (only we can own that pid now).
        with contextlib.suppress(RuntimeError):
            _ip("netns", "delete", name)
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _create(self) -> None:
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        # Without an IGMP querier a snooping bridge may drop multicast: flood it all instead.
        _ip("-n", self.hub, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            self._add_ns(h.ns)
            port = f"p{i}"
            _ip(
                "-n",
                self.hub,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                h.interface,
                "netns",
                h.ns,
            )
            _ip("-n", self.hub, "link", "set", port, "master", "br0")
            _ip("-n", self.hub, "link", "set", port, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.address}/24", "dev", h.interface)
            _ip("-n", h.ns, "link", "set", h.interface, "up")
            # mDNS sends to 224.0.0.251; with no default route the kernel needs this one.
            _ip("-n", h.ns, "route", "add", "224.0.0.0/4", "dev", h.interface)

    def argv(self, host: Host | int, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` inside a host's namespace."""
        h = self.hosts[host] if isinstance(host, int) else host
        return ["ip", "netns", "exec", h.ns, *argv]

    def popen(self, host: Host | int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside a host's namespace; it is killed when the harness closes."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, host: Host | int, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run `argv` inside a host's namespace to completion (with a timeout)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(host, argv), timeout=timeout, check=False, **kwargs)

    def close(self) -> None:
        """Kill our processes, then delete every namespace (bridge and veths go with them)."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        errors: list[str] = []
        for name in reversed(self._created):
            try:
                _ip("netns", "delete", name)
            except (RuntimeError, subprocess.SubprocessError) as e:
                errors.append(str(e))
        self._created.clear()
        if errors:
            raise RuntimeError("netns clean-up failed: " + "; ".join(errors))


@contextlib.contextmanager
def netns(n: int) -> Iterator[Netns]:
    """`with netns(3) as net: net.popen(0, [...])` — the functional spelling of `Netns(n)`."""
    with Netns(n) as net:
        yield net
