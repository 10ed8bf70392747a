"""Where a process's MLX work runs: long work (loading a shard, a prompt chunk) on one
compute thread, so that the event loop keeps moving frames and heartbeats meanwhile; short work
(a decode step) on the loop's own thread, which saves two thread hand-offs a step, each a
wake-up that costs as much as a network hop.

Short work waits while the compute thread works: it would share the cores with it and hold the
loop for as long. So MLX work never runs on both threads at once.

MLX asks every thread that used it to free its streams (`mx.clear_streams`) before it ends; a
process that leaves that to interpreter shutdown can abort ("terminate called without an active
exception"). The compute thread does it as its last job; the command line does it for the main
thread (`cli.main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import mlx.core as mx

from mlxring.aio import wait_for

P = ParamSpec("P")
T = TypeVar("T")


class Compute:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mlx")
        self._idle = asyncio.Event()
        self._idle.set()
        self.queued = 0  # jobs handed to the compute thread and not finished
        self._jobs: set[Future[Any]] = set()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn` on the compute thread."""
        self.queued += 1
        self._idle.clear()
        try:
            job = self._thread.submit(functools.partial(fn, *args, **kwargs))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
            return await asyncio.wrap_future(job)
        finally:
            self.queued -= 1
            if not self.queued:
                self._idle.set()

    async def run_here(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn` on this (the loop's) thread, once the compute thread has nothing to do."""
        while self.queued:
            await self._idle.wait()
        return fn(*args, **kwargs)

    async def shutdown(self, timeout: float) -> None:
        """Drop queued work and join the thread; a job still running gets `timeout` s."""
        for job in list(self._jobs):
            job.cancel()  # only those not started
        self._thread.submit(mx.clear_streams)  # after the running job, as the thread's last
        self._thread.shutdown(wait=False)
        join = asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown, True)
        with contextlib.suppress(TimeoutError):
            await wait_for(join, timeout)
