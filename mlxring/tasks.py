"""Tasks as structured concurrency: one `asyncio.TaskGroup` held open from `open()` to `close()`,
so that every task of its owner (a node runtime, discovery) starts inside it and none outlives it.

A long-lived task (`start`: the membership watch, a sweep, busy-poll, the head's monitor) is
supervised: it is given as a factory of its coroutine, and when it fails the failure is logged
with its cause, recorded as a `TaskFault` the owner shows (`faults`), and the task is started
anew after a backoff (RETRY_FIRST_S doubling to RETRY_MAX_S), for as long as it keeps failing: a
node must never stay down after the cause is gone, and one task's failure ends no other task. A
task that returns is done. A side task (`spawn`: passing one probe on, resolving one peer) that
fails is logged and ends alone: one lost probe is not worth a retry. The group lives in a host
task of its own, so no child ever cancels the caller that opened it; only `close()` ends it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import structlog

log = structlog.get_logger()

CLOSE_S = 10.0  # how long close() waits for the tasks to end once cancelled
# A failed task starts again after RETRY_FIRST_S, doubling up to RETRY_MAX_S (as a failed
# re-plan is retried): soon enough to heal quickly once the cause is gone, seldom enough not to
# fail in a tight loop meanwhile.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
# A restarted task that has run this long without failing is well again: its fault is cleared
# and a later failure starts the backoff from the beginning. Not at once on restart: a task
# that fails soon after each start would otherwise retry every RETRY_FIRST_S for ever, and its
# fault would flicker in and out of view.
HEALTHY_S = RETRY_MAX_S

Factory = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class TaskFault:
    """A long-lived task that failed, as its owner shows it: down until it starts again, then
    running again, and kept in view until it has run HEALTHY_S without failing."""

    task: str  # the task's name
    cause: str  # its last failure: "RuntimeError: ..."
    since: float  # time.monotonic() of the first of the failures in a row
    failures: int  # failures in a row
    retry_at: float  # time.monotonic() when it is due to start again
    vital: bool  # the node cannot serve while this task is down
    restarted: float | None = None  # time.monotonic() when it started again; None: still down

    @property
    def down(self) -> bool:
        """Whether the task is waiting to start again (not running)."""
        return self.restarted is None

    def healed(self, now: float) -> bool:
        return self.restarted is not None and now - self.restarted >= HEALTHY_S

    def describe(self, now: float) -> str:
        if self.restarted is None:
            state = f"retry {self.failures} in {max(0.0, self.retry_at - now):.1f} s"
        else:
            state = f"{self.failures} failures, running again for {now - self.restarted:.1f} s"
        return f"task {self.task} failed: {self.cause} ({state})"


class TaskScope:
    """The task group of one owner, hosted by a task of its own (the owner's start and stop are
    separate calls, and `async with` cannot span them)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._group: asyncio.TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._faults: dict[int, TaskFault] = {}  # per supervised task, while it is failing
        self._ids = itertools.count()

    def faults(self) -> tuple[TaskFault, ...]:
        """The long-lived tasks that failed and are not well again yet, oldest failure first."""
        now = time.monotonic()
        live = (f for f in self._faults.values() if not f.healed(now))
        return tuple(sorted(live, key=lambda f: f.since))

    async def open(self) -> None:
        """Open the group; returns once tasks can start in it."""
        opened = asyncio.Event()
        self._host = asyncio.get_running_loop().create_task(self._hold(opened), name=self.name)
        await opened.wait()

    def start(self, factory: Factory, name: str, vital: bool = False) -> asyncio.Task[None] | None:
        """Run a long-lived task, `factory()`, in the group, supervised: started anew after a
        backoff each time it fails, until it returns or is cancelled (cancel the returned task;
        close() cancels them all). `vital`: the node cannot serve while it is down. None (and
        nothing runs) when the group is closed."""
        return self._create(self._supervise(factory, name, vital), name)

    def spawn(self, coro: Awaitable[None], name: str = "side") -> asyncio.Task[None] | None:
        """Run a small side task in the group; its failure is logged and ends only itself. None
        (and `coro` is not run) when the group is closed."""
        task = self._create(self._guarded(coro, name), name)
        if task is None and isinstance(coro, Coroutine):
            coro.close()
        return task

    async def close(self, timeout: float = CLOSE_S) -> None:
        """Cancel every task of the group and wait (up to `timeout`) until they have ended."""
        host, self._host = self._host, None
        self._group = None
        if host is None:
            return
        host.cancel()
        await asyncio.wait({host}, timeout=timeout)
        if not host.done():
            log.warning("tasks_still_running", scope=self.name, after_s=timeout)

    def _create(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        if self._group is None:
            coro.close()
            return None
        try:
            return self._group.create_task(coro, name=name)
        except RuntimeError:  # the group is shutting down
            coro.close()
            return None

    async def _hold(self, opened: asyncio.Event) -> None:
        # Every child catches its own failures: the group ends only when close() cancels it.
        async with asyncio.TaskGroup() as group:
            self._group = group
            opened.set()
            await asyncio.get_running_loop().create_future()  # until close() cancels

    async def _supervise(self, factory: Factory, name: str, vital: bool) -> None:
        key = next(self._ids)
        delay = RETRY_FIRST_S
        try:
            while True:
                try:
                    await factory()
                    return  # done: a task that ends by itself is not restarted
                except Exception as e:  # noqa: BLE001 - logged, shown, retried: the node lives on
                    now = time.monotonic()
                    last = self._faults.get(key)
                    if last is not None and last.healed(now):
                        last, delay = None, RETRY_FIRST_S  # it ran well a while: a new failure
                    fault = TaskFault(
                        task=name,
                        cause=_describe(e),
                        since=last.since if last is not None else now,
                        failures=last.failures + 1 if last is not None else 1,
                        retry_at=now + delay,
                        vital=vital,
                    )
                    self._faults[key] = fault
                    log.error(
                        "task_failed",
                        scope=self.name,
                        task=name,
                        error=fault.cause,
                        failures=fault.failures,
                        retry_s=delay,
                        exc_info=e,
                    )
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                self._faults[key] = replace(fault, restarted=time.monotonic())
                log.info("task_restarted", scope=self.name, task=name, failures=fault.failures)
        finally:
            self._faults.pop(key, None)

    async def _guarded(self, coro: Awaitable[None], name: str) -> None:
        try:
            await coro
        except Exception as e:  # noqa: BLE001 - a side task's failure ends only itself
            log.error(
                "side_task_failed", scope=self.name, task=name, error=_describe(e), exc_info=e
            )


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
