"""Gates: a decode step launched before its input exists, held on the device until the host
lets it run. They need MLX's CUDA backend, so these tests skip elsewhere (CI's CPU); they run
on the GPU machine (`benchmarks/RESULTS.md` says when they last did)."""

import asyncio
import os
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mlxring.backends import pick
from mlxring.backends.cuda import ahead, gate
from mlxring.backends.cuda.attention import SWITCH
from mlxring.model.sharded import ShardModel, load_shard
from mlxring.protocol.messages import End, Forward, ForwardBatch, Message, Send
from mlxring.shard.actor import ShardActor
from mlxring.shard.step import Stepper

from .ringutil import compute, nowhere, recorder, tiny_model

pytestmark = pytest.mark.skipif(not gate.works(), reason="gates need MLX's CUDA backend")


def shard(name: str, model: ShardModel, send: Send = nowhere, gates: bool = True) -> ShardActor:
    """A shard actor with the backend its process would pick: gates, unless told not to."""
    return ShardActor(name, model, send, compute(), backend=pick(gates))


def stepper(name: str, model: ShardModel) -> Stepper:
    """Steps computed on arrival, to compare with."""
    return Stepper(name, model, pick(gates=False))


def _slot(values: list[int]) -> mx.array:
    slot = mx.array(np.array(values, np.int32))
    mx.eval(slot)
    return slot


def test_a_gate_holds_its_step_until_opened_then_lets_the_hosts_bytes_through() -> None:
    slot, flag = _slot([0, 0, 0]), gate.new_flag()
    out, status = gate.gate(slot, flag, 5.0)
    y = out * 2
    mx.async_eval(y, status)
    time.sleep(0.05)
    np.array(slot, copy=False)[:] = (3, 4, 5)  # written after the launch
    t0 = time.perf_counter()
    flag.open(gate.OPEN)
    mx.eval(y, status)
    assert time.perf_counter() - t0 < 1.0
    assert y.tolist() == [6, 8, 10] and status.item() == gate.OPEN


def test_a_gate_nobody_opens_gives_up_after_its_limit_and_says_so() -> None:
    slot, flag = _slot([1]), gate.new_flag()
    out, status = gate.gate(slot, flag, 0.2)
    t0 = time.perf_counter()
    mx.eval(out, status)
    assert 0.2 <= time.perf_counter() - t0 < 2.0
    assert status.item() == gate.GAVE_UP


def test_a_cancelled_gate_runs_at_once() -> None:
    slot, flag = _slot([1]), gate.new_flag()
    out, status = gate.gate(slot, flag, 5.0)
    mx.async_eval(out, status)
    flag.open(gate.CANCEL)
    t0 = time.perf_counter()
    mx.eval(status)
    assert time.perf_counter() - t0 < 1.0 and status.item() == gate.CANCEL


async def test_launched_steps_give_what_computing_them_on_arrival_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A middle shard launches each next decode step behind a gate; its outputs equal those of
    steps computed on arrival, bit for bit, also when another request's message comes first
    (the launched step is cancelled) and when the input comes after the gate gave up (the step
    is computed again)."""
    path = tiny_model("qwen3")
    prompt = Forward("r", 0, tuple(range(1, 9)), False)
    decodes = [Forward("r", 1 + i, (t,), True) for i, t in enumerate((9, 4, 17, 2, 30, 8))]
    first = stepper("f", load_shard(path, 0, 1))
    steps = [first.step(f) for f in [prompt, *decodes]]
    sent, keep = recorder()

    mid = shard("m", load_shard(path, 1, 2), keep)
    ref = stepper("d", load_shard(path, 1, 2))
    want = []
    for i, f in enumerate(steps):
        assert isinstance(f, Forward)
        want.append(ref.step(f))
        if i == 3:  # another message first: the launched step is cancelled
            assert isinstance(mid._built, ahead.Launch)
            await mid.handle(End("someone-else"))
            assert mid._built is None and sent.pop() == End("someone-else")
        if i == 4:
            monkeypatch.setattr(gate, "LIMIT_S", 0.05)  # the step launched next gives up early
        if i == 5:  # its input comes after the gate gave up
            assert isinstance(mid._built, ahead.Launch)
            await mid._built.task
            await asyncio.sleep(0.3)
        await mid.handle(f)
        if f.is_decode:
            assert isinstance(mid._built, ahead.Launch)
            assert mid._built.rows == (("r", f.seq + 1),)
    assert len(sent) == len(want)
    for got, exp in zip(sent, want, strict=True):
        assert isinstance(got, Forward) and isinstance(exp, Forward)
        assert isinstance(got.h, mx.array) and isinstance(exp.h, mx.array)
        assert mx.array_equal(got.h, exp.h), got.seq


async def test_a_convoys_launched_passes_give_what_computing_them_on_arrival_gives() -> None:
    """Two requests travelling as one convoy: a middle shard launches each next pass on their
    merged caches behind a gate; its outputs equal passes computed on arrival, bit for bit,
    also after one request ends while a pass is launched (it is cancelled and the merged
    caches are taken back before the other request goes on alone)."""
    path = tiny_model("qwen3")
    first = stepper("f", load_shard(path, 0, 1))
    sent, keep = recorder()

    mid = shard("m", load_shard(path, 1, 2), keep)
    ref = shard("d", load_shard(path, 1, 2), gates=False)
    want: list[Message | None] = []
    prompts = {"a": (1, 2, 3, 4, 5), "b": (7, 8, 9)}
    for rid, tokens in prompts.items():
        f = first.step(Forward(rid, 0, tokens, False))
        assert isinstance(f, Forward)
        want.append(ref.stepper.step(f))
        await mid.handle(f)
    for k, (ta, tb) in enumerate(((11, 12), (13, 14), (15, 16), (17, 18)), start=1):
        (fb,) = first.step_batch([Forward("a", k, (ta,), True), Forward("b", k, (tb,), True)])
        assert isinstance(fb, ForwardBatch)
        want += ref.stepper.step_batch([fb])
        await mid.handle(fb)
        assert isinstance(mid._built, ahead.Launch)
        assert mid._built.rows == (("a", k + 1), ("b", k + 1))
    await mid.handle(End("b"))  # a launched pass is cancelled, the convoy's caches taken back
    sent.pop()
    ref._forget("b")
    for k, t in enumerate((19, 20), start=5):
        f = first.step(Forward("a", k, (t,), True))
        assert isinstance(f, Forward)
        want.append(ref.stepper.step(f))
        await mid.handle(f)
    assert len(sent) == len(want)
    for got, exp in zip(sent, want, strict=True):
        assert type(got) is type(exp) and isinstance(got, Forward | ForwardBatch)
        assert isinstance(exp, Forward | ForwardBatch)
        assert isinstance(got.h, mx.array) and isinstance(exp.h, mx.array)
        assert mx.array_equal(got.h, exp.h), got


async def test_the_first_shard_launches_a_convoys_next_pass_from_its_tokens() -> None:
    """On the first shard a convoy's tokens come one message per request: gathered into one
    pass, they fill the pass launched behind a gate, and its outputs equal passes computed on
    arrival, bit for bit. Steps that come in another order than the launched pass's rows do
    not fill it: it is dropped and the pass computed on arrival."""
    path = tiny_model("qwen3")
    sent, keep = recorder()

    first = shard("f", load_shard(path, 0, 1), keep)
    ref = stepper("d", load_shard(path, 0, 1))
    want: list[Message | None] = []
    for rid, tokens in {"a": (1, 2, 3, 4, 5), "b": (7, 8, 9)}.items():
        want.append(ref.step(Forward(rid, 0, tokens, False)))
        await first.handle(Forward(rid, 0, tokens, False))
    for k, (ta, tb) in enumerate(((11, 12), (13, 14), (15, 16), (17, 18)), start=1):
        fa, fb = Forward("a", k, (ta,), True), Forward("b", k, (tb,), True)
        want += ref.step_batch([fa, fb])
        if k == 3:  # b's token first: not the launched pass's order
            first.send(fa)
            await first.handle(fb)
        else:
            first.send(fb)
            await first.handle(fa)
        assert not first.backlog
        assert isinstance(first._built, ahead.Launch)
        launched = first._built.rows
        assert sorted(launched) == [("a", k + 1), ("b", k + 1)]
    assert len(sent) == len(want)
    for got, exp in zip(sent, want, strict=True):
        assert type(got) is type(exp) and isinstance(got, Forward | ForwardBatch)
        assert isinstance(exp, Forward | ForwardBatch)
        assert isinstance(got.h, mx.array) and isinstance(exp.h, mx.array)
        if isinstance(got, ForwardBatch):
            assert isinstance(exp, ForwardBatch)
            order = [r.rid for r in exp.rows]
            rows = {r.rid: i for i, r in enumerate(got.rows)}
            got_h = got.h[mx.array([rows[rid] for rid in order])]
            assert mx.array_equal(got_h, exp.h), got
        else:
            assert mx.array_equal(got.h, exp.h), got


@pytest.mark.parametrize(
    ("preset", "wide", "expect"), [(None, True, "0"), ("1", True, "1"), (None, False, None)]
)
def test_a_speculating_process_keeps_wide_attention_off_cudnn_unless_the_user_chose(
    preset: str | None, wide: bool, expect: str | None
) -> None:
    """cuDNN builds a graph per key length for steps of several positions (64 ms a step on an
    H200): a process that speculates picks MLX's own attention, in a fresh process because
    MLX reads the switch once."""
    env = {k: v for k, v in os.environ.items() if k != SWITCH}
    if preset is not None:
        env[SWITCH] = preset
    code = (
        "import os; from mlxring.backends import pick; "
        f"pick(False, {wide}); print(os.environ.get({SWITCH!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(expect)
