"""Busy-polling: while a shard of this process has requests in flight, the event loop keeps
polling its sockets instead of sleeping until a frame wakes it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

from mlxring.config import BUSY_POLL_MIN_CORES
from mlxring.shard.actor import ShardActor
from mlxring.shard.compute import Compute

# How often the busy-poll task looks again while it rests: with no requests here (an idle node
# wakes rarely), and while the compute thread works (a prompt chunk ends soon).
POLL_IDLE_S = 0.05
POLL_WAIT_S = 0.002


def polls(configured: bool | None) -> bool:
    """Whether this process busy-polls: as configured, else where the machine has cores to
    spare for it."""
    return (os.cpu_count() or 1) >= BUSY_POLL_MIN_CORES if configured is None else configured


async def busy_poll(actors: Iterable[ShardActor], compute: Compute) -> None:
    """While a shard here has requests in flight, keep the loop polling its sockets (each pass
    schedules the next at once, so the loop's wait for I/O takes no time) instead of sleeping
    until a frame wakes it; not while the compute thread works, which needs the interpreter
    lock to build its graphs."""
    actors = list(actors)
    while True:
        if not any(a.requests for a in actors):
            await asyncio.sleep(POLL_IDLE_S)
        elif compute.queued:
            await asyncio.sleep(POLL_WAIT_S)
        else:
            await asyncio.sleep(0)
