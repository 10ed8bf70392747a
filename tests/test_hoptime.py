import time

import mlx.core as mx

from mlxring.protocol.messages import End, Forward, ForwardBatch, Token
from mlxring.ring import hoptime
from mlxring.ring.hoptime import StepClock


def decode_step(rid: str, seq: int) -> Forward:
    return Forward(rid, seq, (5,), True)


def test_a_step_leaving_carries_its_time_here_and_one_more_hop() -> None:
    clock = StepClock()
    clock.arrive(decode_step("a", 3))
    time.sleep(0.02)
    out = clock.leave(Forward("a", 3, (5,), True, h=mx.zeros((1, 1, 4)), spent=0.5, hops=2))
    assert isinstance(out, Forward)
    assert out.hops == 3 and 0.52 <= out.spent < 0.6
    assert out.h is not None and clock.pending == 0


def test_the_token_of_a_step_leaves_in_its_place() -> None:
    clock = StepClock()
    clock.arrive(decode_step("a", 7))
    out = clock.leave(Token("a", 7, 42, spent=0.25, hops=1))
    assert isinstance(out, Token) and out.token == 42 and out.hops == 2 and out.spent > 0.25
    # Reaching the engine in the same process adds the time here but no hop.
    clock.arrive(decode_step("b", 1))
    home = clock.home(Token("b", 1, 9, spent=0.1, hops=3))
    assert home.hops == 3 and home.spent > 0.1


def test_batched_rows_are_timed_each() -> None:
    clock = StepClock()
    clock.arrive(ForwardBatch((decode_step("a", 1), decode_step("b", 4))))
    out = clock.leave(ForwardBatch((decode_step("a", 1), decode_step("b", 4), decode_step("c", 2))))
    assert isinstance(out, ForwardBatch)
    assert [r.hops for r in out.rows] == [1, 1, 0]  # c never arrived here: left as it was
    assert out.rows[0].spent > 0 and out.rows[2].spent == 0


def test_prompt_chunks_and_other_messages_pass_untouched() -> None:
    clock = StepClock()
    chunk = Forward("a", 0, (1, 2, 3), False)
    clock.arrive(chunk)
    clock.arrive(End("a"))
    assert clock.pending == 0
    assert clock.leave(chunk) is chunk
    assert clock.leave(End("a")) == End("a")


def test_steps_that_never_leave_do_not_pile_up() -> None:
    clock = StepClock()
    for i in range(hoptime.MAX_PENDING + 10):
        clock.arrive(decode_step("a", i))
    assert clock.pending == hoptime.MAX_PENDING
    assert clock.leave(Token("a", 0, 1)) == Token("a", 0, 1)  # the oldest were dropped
