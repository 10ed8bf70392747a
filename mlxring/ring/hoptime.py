"""Per-hop latency of real decode steps, without comparing clocks across machines.

Each process adds to a step the time the step spent inside it, from arriving (off the wire, or
from the head's engine) to leaving (onto the wire, or back into the engine), and counts every
network hop. Back at the head, the step's trip time less that sum is time on the network;
divided by the hops it is one hop's latency. Idle probes cannot show this: a process that
slept for a heartbeat wakes far slower than one in the middle of a generation.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TypeVar

from mlxring.protocol.messages import Forward, ForwardBatch, Message, Token

Step = TypeVar("Step", Forward, Token)
MAX_PENDING = 4096  # steps that never leave (a failed step) must not pile up forever


class StepClock:
    """One process's arrival times of decode steps that are inside it now."""

    def __init__(self) -> None:
        self._arrived: dict[tuple[str, int], float] = {}

    def arrive(self, msg: Message) -> None:
        """A message entered this process; remember when, if it is a decode step."""
        now = time.perf_counter()
        rows = msg.rows if isinstance(msg, ForwardBatch) else (msg,)
        for r in rows:
            if isinstance(r, Forward) and r.is_decode:
                self._arrived[(r.rid, r.seq)] = now
        while len(self._arrived) > MAX_PENDING:
            del self._arrived[next(iter(self._arrived))]

    def leave(self, msg: Message) -> Message:
        """The message going onto the wire: its steps' time here added, one more hop."""
        now = time.perf_counter()
        match msg:
            case Forward():
                return self._leave(msg, now, 1)
            case Token():
                return self._leave(msg, now, 1)
            case ForwardBatch():
                return ForwardBatch(tuple(self._leave(r, now, 1) for r in msg.rows), msg.h)
            case _:
                return msg

    def home(self, token: Token) -> Token:
        """A token reaching the head's engine in this process: its time here added."""
        return self._leave(token, time.perf_counter(), 0)

    def _leave(self, msg: Step, now: float, hops: int) -> Step:
        t = self._arrived.pop((msg.rid, msg.seq), None)
        if t is None:
            return msg
        return replace(msg, spent=msg.spent + (now - t), hops=msg.hops + hops)

    @property
    def pending(self) -> int:
        return len(self._arrived)
