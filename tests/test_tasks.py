"""The task group's supervision, with real coroutines on the real clock: a long-lived task that
fails is logged, shown with its cause and started again after a growing backoff until it runs;
one that returns is done; close() ends a task waiting in its backoff at once; no failure ends the
other tasks. And on a real ring: a failing vital task is in the 503, /health, /cluster/status
and `mlxring status`, and the ring serves again by itself once the cause is gone."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from mlxring import aio
from mlxring.tasks import HEALTHY_S, RETRY_FIRST_S, TaskScope

from .ringutil import ROOT, local_ring, serve_api, tiny_model, wait_for, write_valid_config

MODEL = tiny_model("qwen3")


async def test_a_task_that_fails_twice_is_started_again_until_it_runs() -> None:
    scope = TaskScope("test")
    await scope.open()
    starts: list[float] = []
    running = asyncio.Event()

    async def flaky() -> None:
        starts.append(time.monotonic())
        if len(starts) <= 2:
            raise RuntimeError(f"broken {len(starts)}")
        running.set()
        await asyncio.Event().wait()

    task = scope.start(flaky, "flaky")
    assert task is not None
    await wait_for(lambda: len(starts) == 1 and scope.faults())
    (fault,) = scope.faults()
    now = time.monotonic()
    assert (fault.task, fault.cause, fault.failures) == ("flaky", "RuntimeError: broken 1", 1)
    assert fault.down and 0 < fault.retry_at - now <= RETRY_FIRST_S
    assert "task flaky failed: RuntimeError: broken 1 (retry 1 in " in fault.describe(now)
    await aio.wait_for(running.wait(), 10)
    assert len(starts) == 3
    # Running again: the fault stays in view (not down) until the task has run a while.
    (fault,) = scope.faults()
    now = time.monotonic()
    assert (fault.cause, fault.failures) == ("RuntimeError: broken 2", 2)
    assert starts[0] <= fault.since < starts[1]  # the first failure of the two
    assert not fault.down and not fault.healed(now) and fault.healed(now + HEALTHY_S)
    assert "2 failures, running again for " in fault.describe(now)
    assert not task.done()
    await scope.close()
    assert task.cancelled() and scope.faults() == ()


async def test_a_task_that_keeps_failing_waits_longer_each_time_and_says_why() -> None:
    scope = TaskScope("test")
    await scope.open()
    starts: list[float] = []
    sibling = scope.start(asyncio.Event().wait, "sibling")

    async def broken() -> None:
        starts.append(time.monotonic())
        raise ConnectionError("the socket is gone")

    scope.start(broken, "broken", vital=True)
    await wait_for(lambda: len(starts) == 4, timeout=15)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # 0.5, 1 and 2 s: each wait twice the last (a busy loop may wake late, never early).
    for gap, nominal in zip(gaps, (0.5, 1.0, 2.0), strict=True):
        assert nominal - 0.01 <= gap < nominal + 1.0, gaps
    await wait_for(lambda: scope.faults() and scope.faults()[0].failures == 4)
    (fault,) = scope.faults()
    now = time.monotonic()
    assert fault.vital and fault.down and fault.cause == "ConnectionError: the socket is gone"
    assert 2.0 < fault.retry_at - now <= 4.0 and starts[0] <= fault.since < starts[1]
    assert fault.describe(now).startswith("task broken failed: ConnectionError: the socket is gone")
    assert sibling is not None and not sibling.done()  # one task's failure ends no other
    # close() ends the task waiting in its 4 s backoff at once.
    began = time.monotonic()
    await scope.close()
    assert time.monotonic() - began < 1.0
    assert sibling.cancelled() and scope.faults() == ()
    assert scope.start(broken, "late") is None and len(starts) == 4  # nothing starts after close


async def test_a_task_that_returns_is_done_and_a_cancelled_one_leaves_no_fault() -> None:
    scope = TaskScope("test")
    await scope.open()
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    done = scope.start(once, "once")
    assert done is not None
    await aio.wait_for(done, 5)
    assert not done.cancelled() and calls == 1

    async def broken() -> None:
        raise ValueError("no")

    # Cancelled while waiting to start again (as the head's monitor is when the head moves).
    failing = scope.start(broken, "monitor")
    assert failing is not None
    await wait_for(lambda: scope.faults())
    failing.cancel()
    await asyncio.wait({failing}, timeout=5)
    assert failing.cancelled() and scope.faults() == ()
    await asyncio.sleep(2 * RETRY_FIRST_S)
    assert calls == 1  # the task that returned was never started again
    await scope.close()


async def test_a_failing_side_task_ends_alone_and_close_ends_the_rest() -> None:
    scope = TaskScope("test")
    await scope.open()
    watch = scope.start(asyncio.Event().wait, "watch")
    assert watch is not None
    lost = asyncio.Event()

    async def lost_probe() -> None:
        lost.set()
        raise ConnectionError("gone")

    probe = scope.spawn(lost_probe())
    assert probe is not None
    await aio.wait_for(lost.wait(), 5)
    await asyncio.wait({probe}, timeout=5)
    assert probe.done() and not watch.done() and scope.faults() == ()
    await scope.close()
    assert watch.cancelled()
    scope.spawn(asyncio.sleep(0))  # after close: not run, and no error


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url) as r:
        return r.status, await r.json()


async def _complete(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    body = {"model": MODEL.name, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    async with s.post(f"{url}/v1/completions", json=body) as r:
        return r.status, await r.json()


async def _status_command(config: Path, *args: str) -> tuple[int, str]:
    """`python -m mlxring status` without blocking this loop (the ring runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "mlxring", "status", "--config", str(config), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    out, _ = await aio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_a_failing_vital_task_is_shown_everywhere_and_the_ring_heals(
    tmp_path: Path,
) -> None:
    """No task of the node fails on cue from outside, so the test runs one of its own in the
    runtime's task group, through the same start() the node's tasks use."""
    cfg = write_valid_config(tmp_path, MODEL, 2)
    broken = True

    async def check() -> None:
        if broken:
            raise RuntimeError("the check cannot see the ring")
        await asyncio.Event().wait()

    async with local_ring(cfg) as rt, serve_api(rt) as url, aiohttp.ClientSession() as s:
        assert (await _complete(s, url))[0] == 200
        rt.tasks.start(check, "ring-check", vital=True)
        await wait_for(lambda: rt.task_faults(), timeout=5)

        code, body = await _complete(s, url)
        assert code == 503, body
        message = body["error"]["message"]
        assert "task ring-check failed: RuntimeError: the check cannot see the ring" in message
        assert "(retry " in message
        code, health = await _get(s, f"{url}/health")
        assert code == 503 and "task ring-check failed" in health["reason"], health
        assert health["tasks"] and "ring-check" in health["tasks"][0]
        code, status = await _get(s, f"{url}/cluster/status")
        assert code == 200 and not status["ring"]["ok"], status
        (task,) = status["tasks"]
        assert task["task"] == "ring-check" and task["nodes"] == ["n0", "n1"], task
        assert task["error"] == "RuntimeError: the check cannot see the ring" and task["vital"]
        assert task["failures"] >= 1 and task["retry_in_s"] is not None

        rc, table = await _status_command(cfg)
        assert rc == 1 and "failing tasks:" in table, table
        assert "n0,n1: task ring-check failed: RuntimeError: the check cannot see" in table
        rc, raw = await _status_command(cfg, "--json")
        assert json.loads(raw)["tasks"][0]["task"] == "ring-check"

        # The cause is gone: at its next start the task runs, and the ring serves by itself.
        broken = False
        deadline = time.monotonic() + 15
        while (answer := await _complete(s, url))[0] != 200:
            assert time.monotonic() < deadline, answer
            await asyncio.sleep(0.1)
        code, health = await _get(s, f"{url}/health")
        assert code == 200 and health["status"] == "ok", health
        # Still in view, running again, until it has run a while.
        assert "running again" in health["tasks"][0], health
