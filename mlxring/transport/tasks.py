"""One owner for an object's background tasks: they start with it and end with it.

Not an asyncio.TaskGroup: a group cancels the task that opened it when a child fails, and
discovery's tasks (resolving one peer, announcing one service) are opened from callbacks and
fail alone, logged where they run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


class TaskOwner:
    """Keeps its tasks referenced until they are done (the loop holds tasks only weakly), and
    on `close` cancels and awaits whatever is left; after that it refuses new ones."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[Any] | None:
        """Run `coro` as a task of this owner; None (and the coroutine closed) once closed."""
        if self.closed:
            coro.close()
            return None
        return self.adopt(asyncio.get_running_loop().create_task(coro))

    def adopt(self, task: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Own a task (or future) started elsewhere; cancelled at once when closed."""
        if self.closed:
            task.cancel()
            return task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, timeout: float) -> None:
        """Cancel every task and wait up to `timeout` for them to end."""
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*tasks, return_exceptions=True)
