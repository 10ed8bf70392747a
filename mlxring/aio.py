"""asyncio helpers that behave the same on Python 3.11 and 3.12."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """`asyncio.wait_for` without Python 3.11's race: there, a cancel that arrives just as the
    awaited thing completes is swallowed, so a task being stopped runs on (a node that never
    exits). 3.12's own wait_for is this."""
    async with asyncio.timeout(timeout):
        return await aw
