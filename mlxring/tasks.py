"""Tasks as structured concurrency: one `asyncio.TaskGroup` held open from `open()` to `close()`,
so that every task of its owner (a node runtime, discovery) starts inside it and none outlives it.

A long-lived task (`start`) that fails ends the whole group: a node whose membership watch or
busy-poll died is not half alive; the failure is logged with its cause and reported to
`on_failure`. A side task (`spawn`: passing one probe on, resolving one peer) that fails is
logged and ends alone: one lost probe must not take the node's tasks down. The group lives in a
host task of its own, so a failing child never cancels the caller that opened it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger()

CLOSE_S = 10.0  # how long close() waits for the tasks to end once cancelled


class TaskScope:
    """The task group of one owner, hosted by a task of its own (the owner's start and stop are
    separate calls, and `async with` cannot span them)."""

    def __init__(self, name: str, on_failure: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._on_failure = on_failure
        self._group: asyncio.TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the group; returns once tasks can start in it."""
        opened = asyncio.Event()
        self._host = asyncio.get_running_loop().create_task(self._hold(opened), name=self.name)
        await opened.wait()

    def start(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        """Run a long-lived task in the group; its failure ends every task of the group. None
        (and `coro` is not run) when the group is closed or closing."""
        if self._group is None:
            coro.close()
            return None
        try:
            return self._group.create_task(coro, name=name)
        except RuntimeError:  # the group is shutting down after a failure
            coro.close()
            return None

    def spawn(self, coro: Awaitable[None], name: str = "side") -> asyncio.Task[None] | None:
        """Run a small side task in the group; its failure is logged and ends only itself. None
        (and `coro` is not run) when the group is closed."""
        task = self.start(self._guarded(coro, name), name)
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

    async def _hold(self, opened: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                opened.set()
                await asyncio.get_running_loop().create_future()  # until close() cancels
        except* Exception as failed:
            self._group = None
            for e in failed.exceptions:
                log.error("task_failed", scope=self.name, error=_describe(e), exc_info=e)
            if self._on_failure is not None:
                causes = "; ".join(_describe(e) for e in failed.exceptions)
                self._on_failure(f"a task of this node failed: {causes}")

    async def _guarded(self, coro: Awaitable[None], name: str) -> None:
        try:
            await coro
        except Exception as e:  # noqa: BLE001 - a side task's failure ends only itself
            log.error(
                "side_task_failed", scope=self.name, task=name, error=_describe(e), exc_info=e
            )


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
