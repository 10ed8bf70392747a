"""Where MLX work runs: long work on the compute thread, short work on the loop's thread but
only while the compute thread has nothing to do, so that the two never compute at once."""

import asyncio
import threading
import time

import mlx.core as mx
import pytest

from mlxring.shard.compute import Compute


async def test_short_work_runs_here_and_long_work_on_the_compute_thread() -> None:
    compute = Compute()
    here = threading.get_ident()
    assert await compute.run_here(threading.get_ident) == here
    assert await compute.run(threading.get_ident) != here
    await compute.shutdown(5)


async def test_short_work_waits_until_the_compute_thread_is_idle() -> None:
    """A decode step arriving while a prompt chunk computes runs after it: MLX work of the two
    threads never overlaps."""
    compute = Compute()
    release = threading.Event()
    order: list[str] = []
    running = 0
    overlapped = False

    def work(name: str, gate: threading.Event | None = None) -> None:
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        if gate is not None:
            assert gate.wait(5)
        order.append(name)
        running -= 1

    long = asyncio.create_task(compute.run(work, "long", release))
    await asyncio.sleep(0.05)
    assert compute.queued == 1
    short = asyncio.create_task(compute.run_here(work, "short"))
    await asyncio.sleep(0.05)
    assert order == []  # the short one waits
    release.set()
    await asyncio.gather(long, short)
    assert order == ["long", "short"] and not overlapped
    assert compute.queued == 0
    await compute.shutdown(5)


async def test_an_error_reaches_the_caller_and_leaves_the_thread_idle() -> None:
    compute = Compute()

    def fail() -> None:
        raise ValueError("bad step")

    with pytest.raises(ValueError, match="bad step"):
        await compute.run(fail)
    assert compute.queued == 0
    with pytest.raises(ValueError, match="bad step"):
        await compute.run_here(fail)
    assert await compute.run_here(threading.get_ident) == threading.get_ident()
    await compute.shutdown(5)


async def test_shutdown_lets_the_running_job_finish_and_drops_the_queued_ones() -> None:
    compute = Compute()
    ran: list[str] = []

    def job(name: str, seconds: float) -> None:
        time.sleep(seconds)
        mx.eval(mx.arange(4) + 1)  # MLX on the compute thread, whose streams shutdown frees
        ran.append(name)

    running = asyncio.ensure_future(compute.run(job, "running", 0.3))
    queued = asyncio.ensure_future(compute.run(job, "queued", 0))
    await asyncio.sleep(0.1)
    await compute.shutdown(5)
    assert await running is None and ran == ["running"]
    with pytest.raises(asyncio.CancelledError):
        await queued
