"""Discovery over real multicast: one Python process per network namespace on a private bridge.

Each process advertises its node bound to its namespace's IPv4 and reports, as JSON lines on
stdout, what it discovered. Skipped (with the harness's reason) where namespaces cannot be made.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mlxring.protocol.codec import PROTOCOL_VERSION
from mlxring.transport.discovery import Discovery, PeerInfo, instance_name, resolve_interfaces
from tests.netns import Netns, skip_reason
from tests.ringutil import RING_HEAD, encode, reference, tiny_model

ROOT = Path(__file__).resolve().parent.parent

# Modes: "wait" (wait_for the named nodes, print them, then check `absent` stay unknown),
# "watch" (print {name: address} of the other nodes whenever it changes). Both then hold
# until stdin closes and stop cleanly (goodbye packets).
NODE_SCRIPT = textwrap.dedent(
    """
    import asyncio, dataclasses, json, sys
    sys.path.insert(0, sys.argv[2])
    from mlxring.transport.discovery import Discovery, PeerInfo
    from mlxring.log import setup_logging

    setup_logging(json_logs=True, level="debug")  # logs to stderr; stdout is for reports

    def out(obj):
        print(json.dumps(obj), flush=True)

    async def main():
        cfg = json.loads(sys.argv[1])
        d = Discovery(cfg["cluster"], interfaces=cfg["interfaces"])
        await d.start()
        try:
            for me in cfg["advertise"]:
                await d.advertise(PeerInfo(**me))
            if cfg["mode"] == "wait":
                found = await d.wait_for(cfg["names"], cfg["timeout"])
                absent = None
                if cfg["absent"]:
                    try:
                        await d.wait_for(cfg["absent"], cfg["absent_wait"])
                    except TimeoutError as e:
                        absent = str(e)
                out({
                    "found": {n: dataclasses.asdict(p) for n, p in found.items()},
                    "peers": sorted(d.peers),
                    "absent_error": absent,
                })
                await asyncio.to_thread(sys.stdin.read)
            else:
                mine = {me["name"] for me in cfg["advertise"]}
                hold = asyncio.ensure_future(asyncio.to_thread(sys.stdin.read))
                last = None
                out({"ready": True})
                while not hold.done():
                    now = {n: p.address for n, p in d.peers.items() if n not in mine}
                    if now != last:
                        out({"peers": now})
                        last = now
                    await asyncio.sleep(0.05)
        finally:
            await asyncio.wait_for(d.stop(), 10)

    asyncio.run(main())
    """
)


class Node:
    """One script process in a namespace; its stdout lines are read by a thread into a queue."""

    def __init__(self, net: Netns, host: int, script: Path, cfg: dict[str, Any]) -> None:
        self.proc = net.popen(
            host,
            [sys.executable, str(script), json.dumps(cfg), str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            return dict(json.loads(self.lines.get(timeout=timeout)))
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s; {self._stderr()}") from None

    def until(self, want: dict[str, Any], timeout: float) -> None:
        """Read lines until one equals `want` (watch mode)."""
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = json.loads(self.lines.get(timeout=left))
            except queue.Empty:
                break
            seen.append(line)
            if line == want:
                return
        raise AssertionError(f"never saw {want} within {timeout} s; saw {seen}")

    def finish(self, timeout: float = 15.0) -> None:
        """Close stdin (the script stops cleanly) and require a clean exit."""
        self.close_stdin()
        rc = self.proc.wait(timeout=timeout)
        assert rc == 0, self._stderr()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "process still running"
        assert self.proc.stderr is not None
        return f"exit {self.proc.returncode}, stderr:\n{self.proc.stderr.read()[-3000:]}"


def finish_all(nodes: list[Node]) -> None:
    for node in nodes:
        node.close_stdin()  # all stop at once
    for node in nodes:
        node.finish()


def _peer(name: str, cluster: str, address: str, i: int) -> dict[str, Any]:
    return {
        "name": name,
        "cluster": cluster,
        "address": address,
        "ring_port": 9100 + i,
        "api_port": 8100 + i,
        "memory_bytes": (32 + i) * 2**30,
        "chip": f"Apple M{i} Max",
        "gpu_cores": 30 + i,
    }


@pytest.fixture
def net3(tmp_path: Path) -> Any:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    with Netns(4) as net:
        yield net, script


def test_three_nodes_find_each_other_and_ignore_another_cluster(net3: Any) -> None:
    net, script = net3
    hosts = net.hosts
    # Another cluster on the same wire, two nodes in one process; its "n1" shares a node name
    # with ours, and its cluster name starts like ours (the TXT check, not only the prefix).
    other = [
        _peer("n1", "alpha-x", hosts[3].address, 7),
        _peer("n4", "alpha-x", hosts[3].address, 8),
    ]
    stranger = Node(
        net,
        3,
        script,
        {
            "cluster": "alpha-x",
            "interfaces": ["eth0"],
            "advertise": other,
            "mode": "wait",
            "names": ["n1", "n4"],
            "timeout": 10,
            "absent": [],
        },
    )
    assert stranger.next(15)["peers"] == ["n1", "n4"]

    mine = [_peer(f"n{i + 1}", "alpha", hosts[i].address, i + 1) for i in range(3)]
    nodes = [
        Node(
            net,
            i,
            script,
            {
                "cluster": "alpha",
                # An interface name on one node, the IPv4 on the others: both forms work.
                "interfaces": ["eth0"] if i == 0 else [hosts[i].address],
                "advertise": [mine[i]],
                "mode": "wait",
                "names": ["n1", "n2", "n3"],
                "timeout": 10,
                "absent": ["n4"],
                "absent_wait": 1.5,
            },
        )
        for i in range(3)
    ]
    reports = [node.next(20) for node in nodes]
    expected = {p["name"]: {**p, "version": PROTOCOL_VERSION} for p in mine}
    for report in reports:
        assert report["found"] == expected
        assert report["peers"] == ["n1", "n2", "n3"]
        assert report["absent_error"] is not None and "n4" in report["absent_error"]
    finish_all([*nodes, stranger])


def test_peer_leaves_returns_and_moves(net3: Any) -> None:
    net, script = net3
    hosts = net.hosts

    def n2_on(host: int) -> Node:
        me = _peer("n2", "alpha", hosts[host].address, 2)
        cfg = {"cluster": "alpha", "interfaces": ["eth0"], "advertise": [me], "mode": "watch"}
        node = Node(net, host, script, cfg)
        node.next(15)  # ready: advertised
        return node

    observer = Node(
        net,
        0,
        script,
        {
            "cluster": "alpha",
            "interfaces": ["eth0"],
            "advertise": [_peer("n1", "alpha", hosts[0].address, 1)],
            "mode": "watch",
        },
    )
    assert observer.next(15) == {"ready": True}
    observer.until({"peers": {}}, 5)

    n2 = n2_on(1)
    observer.until({"peers": {"n2": hosts[1].address}}, 10)
    # A second "n2" of the same cluster is refused by mDNS probing, with a clear error.
    twin = _peer("n2", "alpha", hosts[2].address, 2)
    cfg = {"cluster": "alpha", "interfaces": ["eth0"], "advertise": [twin], "mode": "watch"}
    proc = net.run(2, [sys.executable, str(script), json.dumps(cfg), str(ROOT)], input="")
    assert proc.returncode != 0
    assert "'n2' of cluster 'alpha' is already advertised on the network" in proc.stderr
    n2.finish()  # clean stop: goodbye packets
    observer.until({"peers": {}}, 5)

    n2 = n2_on(2)  # back, elsewhere
    observer.until({"peers": {"n2": hosts[2].address}}, 10)
    n2.proc.kill()  # a crash: no goodbye, the observer still has the old records
    n2.proc.wait(5)
    n2 = n2_on(1)
    observer.until({"peers": {"n2": hosts[1].address}}, 10)
    finish_all([n2, observer])


def test_resolve_interfaces() -> None:
    assert resolve_interfaces(["127.0.0.1", "lo", "127.0.0.1"]) == ["127.0.0.1"]
    with pytest.raises(ValueError, match="nosuch0"):
        resolve_interfaces(["nosuch0"])
    with pytest.raises(ValueError, match="203.0.113.9"):
        resolve_interfaces(["203.0.113.9"])


async def test_advertise_rejects_bad_input_before_the_network() -> None:
    d = Discovery("alpha", interfaces=["127.0.0.1"])
    with pytest.raises(RuntimeError, match="before start"):
        await d.advertise(PeerInfo("n1", "alpha", "127.0.0.1", 1, 2))
    assert d.lookup("n1") is None
    assert d.peers == {}
    assert instance_name("alpha", "n1") == "alpha-n1"
    with pytest.raises(ValueError, match="cluster name"):
        Discovery("")


def test_netns_harness_cleans_up_after_a_failure() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)

    def namespaces() -> str:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

    net = Netns(2)
    with pytest.raises(RuntimeError, match="boom"), net:
        sleeper = net.popen(1, ["sleep", "60"])
        listed = namespaces()
        assert all(h.ns in listed for h in net.hosts) and net.hub in listed
        # Only the namespaces hold the test subnet; this (the host's) namespace does not.
        assert (
            net.hosts[0].address
            not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        )
        assert net.run(0, ["ip", "-4", "route"]).stdout.count("default") == 0
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    listed = namespaces()
    assert not any(h.ns in listed for h in net.hosts) and net.hub not in listed


def test_a_zeroconf_node_links_out_from_the_address_it_advertises(tmp_path: Path) -> None:
    """Two hosts each with a second address on their one interface, and `interfaces` naming
    that one: each node advertises it, while the system's source towards the other host is the
    interface's first address. An open ring takes a node's name only from where it was found,
    so each node's links must leave from the address it advertises: the ring forms, both
    ways, and is exact."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    model = tiny_model("qwen3")
    prompt = encode(model, "Two addresses, one name.")
    want = reference(model, prompt, 16)
    with Netns(2) as net:
        prefix = net.hosts[0].address.rsplit(".", 1)[0]
        ring = [f"{prefix}.{101 + i}" for i in range(2)]
        configs = []
        for i, host in enumerate(net.hosts):
            # Secondary on eth0: the route to the subnet keeps the first address as its source.
            add = ["ip", "-n", host.ns, "addr", "add", f"{ring[i]}/24", "dev", host.interface]
            subprocess.run(add, check=True, capture_output=True, timeout=10)
            cfg = tmp_path / f"n{i}.toml"
            cfg.write_text(
                "\n".join(
                    [
                        "[cluster]",
                        'name = "twoaddr"',
                        f'model = "{model}"',
                        'strategy = "uniform"',
                        f'interfaces = ["{ring[i]}"]',
                        *(
                            f'[[nodes]]\nname = "n{k}"\nport = 5300\napi_port = 8300'
                            for k in (0, 1)
                        ),
                    ]
                )
                + "\n"
            )
            configs.append(cfg)
        source = net.run(0, ["ip", "-4", "route", "get", ring[1]]).stdout
        assert f"src {net.hosts[0].address} " in source, source  # not the advertised address
        log_path = tmp_path / "n1.log"
        with open(log_path, "wb") as log:
            net.popen(
                1,
                [sys.executable, "-m", "mlxring", "node", "--config", str(configs[1]),
                 "--name", "n1", "--log-json"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            )  # fmt: skip
            head = net.run(
                0,
                [sys.executable, "-c", RING_HEAD, str(configs[0]), json.dumps(prompt), "16"],
                timeout=120,
                cwd=ROOT,
            )
        n1_log = log_path.read_text(errors="replace")
    assert head.returncode == 0, head.stderr[-6000:]
    out = json.loads(head.stdout.strip().splitlines()[-1])
    assert out["hosts"] == {"n0": ring[0], "n1": ring[1]}
    assert out["members"] == ["n0", "n1"]
    assert out["tokens"] == want
    # Neither listener saw a node's name come from another address than the node's.
    assert "peer_refused" not in head.stdout + head.stderr
    assert "peer_refused" not in n1_log, n1_log[-3000:]
