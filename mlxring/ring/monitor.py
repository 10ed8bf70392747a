"""The head's watch over the ring: a probe sent around it every heartbeat, and the view of what
came back (who answered, with which layers, how fast, each node's stats)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mlxring.config import Config
from mlxring.engine.lifecycle import RingEntry
from mlxring.protocol.messages import NodeStats, Probe

log = structlog.get_logger()

Hops = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class RingView:
    """What the head's last probe saw: who answered, with which layers, how fast."""

    ok: bool
    reason: str
    hops: Hops
    hop_s: float
    checked: float


class RingMonitor:
    """Sends a probe around the ring every heartbeat (while `run` runs); the ring is up while
    probes come back through exactly the expected nodes and layer ranges."""

    def __init__(
        self,
        config: Config,
        origin: str,
        expected: Hops,
        entry: RingEntry,
        on_down: Callable[[str], None],
    ) -> None:
        self.config = config
        self.origin = origin
        self.expected = expected
        self._entry = entry
        self._on_down = on_down
        self.view = RingView(False, "the ring has not formed yet", (), 0.0, 0.0)
        self.hop_samples: list[float] = []
        self.stats: dict[str, NodeStats] = {}  # each node's report from the last probe
        self._last_return = 0.0

    def returned(self, probe: Probe) -> None:
        """A probe of ours came back around the ring."""
        now = time.monotonic()
        if probe.hops != self.expected:
            self.view = RingView(
                False,
                f"the ring answered {list(probe.hops)}, expected {list(self.expected)}",
                probe.hops,
                0.0,
                now,
            )
            return
        self._last_return = now
        self.stats = {s.name: s for s in probe.stats}
        hop_s = (now - probe.sent) / max(1, len(probe.hops))
        self.hop_samples.append(hop_s)
        del self.hop_samples[:-512]
        if not self.view.ok:
            log.info(
                "ring_up", nodes=[h[0] for h in probe.hops], layers=[h[1:] for h in probe.hops]
            )
        self.view = RingView(True, "", probe.hops, hop_s, now)

    async def run(self) -> None:
        """Probe every heartbeat until cancelled; the ring is down when none came back for
        `down_after_s`."""
        c = self.config.cluster
        while True:
            await self._entry.enter(Probe(self.origin, time.monotonic()))
            await asyncio.sleep(c.heartbeat_s)
            if self.view.ok and time.monotonic() - self._last_return > c.down_after_s:
                self._down(f"no probe came back around the ring within {c.down_after_s:g} s")

    def _down(self, reason: str) -> None:
        if self.view.ok:
            log.warning("ring_down", reason=reason)
            self._on_down(reason)
        self.view = RingView(False, reason, self.view.hops, 0.0, time.monotonic())
