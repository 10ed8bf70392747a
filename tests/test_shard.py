"""The shard's choice of what to run next, and its batch caches, on a real shard (tiny model,
no ring)."""

import asyncio
import itertools
from typing import cast

import mlx.core as mx
import pytest

from mlxring.backends import pick
from mlxring.backends.placeholder import Prebuilt
from mlxring.model.sharded import ShardModel, load_shard
from mlxring.protocol.messages import (
    End,
    Failure,
    Forward,
    ForwardBatch,
    Message,
    SamplingParams,
    Send,
    Tensor,
    Token,
)
from mlxring.shard.actor import ShardActor
from mlxring.shard.state import Reconfigure, make_request_state
from mlxring.shard.step import BatchError, Stepper

from .ringutil import (
    CONCURRENT_TEXTS,
    batch_reference,
    compute,
    encode,
    nowhere,
    recorder,
    tiny_model,
)


def shard(name: str, model: ShardModel, send: Send = nowhere, gates: bool = True) -> ShardActor:
    """A shard actor with the backend its process would pick (gates where they work)."""
    return ShardActor(name, model, send, compute(), backend=pick(gates))


def stepper(name: str, model: ShardModel) -> Stepper:
    """Steps computed on arrival, to compare with."""
    return Stepper(name, model, pick(gates=False))


def shard_with_requests(*rids: str) -> ShardActor:
    model = load_shard(tiny_model("qwen3"), 0, 3)
    actor = shard("n0", model, nowhere)
    for rid in rids:
        actor.requests[rid] = make_request_state(model, None, 0.0)
    return actor


def chunk(rid: str, seq: int) -> Forward:
    return Forward(rid, seq, (1, 2, 3, 4), False)


def decode(rid: str, seq: int) -> Forward:
    return Forward(rid, seq, (5,), True)


def order(actor: ShardActor) -> list[tuple[str, str, int]]:
    out = []
    while actor.backlog:
        m = actor.next_message()
        assert isinstance(m, Forward | End)
        out.append((type(m).__name__, m.rid, getattr(m, "seq", -1)))
    return out


def test_decode_steps_pass_a_prompt_chunk_once_but_never_their_own_requests_messages() -> None:
    actor = shard_with_requests("a", "b", "c")
    waiting: list[Message] = [chunk("b", 1), chunk("b", 2), decode("a", 9), decode("b", 3)]
    for m in [*waiting, End("c"), decode("c", 4)]:
        actor.send(m)
    assert order(actor) == [
        ("Forward", "a", 9),  # passes b's first chunk (and may take company: see handle)
        ("Forward", "b", 1),  # the chunk has waited once: it runs now
        ("Forward", "b", 2),  # nothing that may pass it is left: b's step waits behind its chunk
        ("Forward", "b", 3),
        ("End", "c", -1),
        ("Forward", "c", 4),  # c's step never passes c's own End
    ]


def test_a_convoy_that_passed_a_chunk_counts_as_its_wait() -> None:
    """A decode pass that gathered steps from behind a chunk is that chunk's one wait: a decode
    arriving later does not pass it again."""
    actor = shard_with_requests("a", "b", "c", "d")
    for m in [decode("a", 5), chunk("b", 1), decode("c", 7)]:
        actor.send(m)
    first = actor.next_message()
    assert first == decode("a", 5)
    assert actor._take_decodes(1, 4) == [decode("c", 7)]  # what handle() gathers into the batch
    actor.send(decode("d", 2))
    assert order(actor) == [("Forward", "b", 1), ("Forward", "d", 2)]


def test_convoys_taking_turns_keep_their_merged_caches() -> None:
    """Two convoys alternating on a shard (one per stage, or requests that started apart) each
    reuse their merged caches; merging anew every step copied every cache (c16 fell 2x)."""
    model = load_shard(tiny_model("qwen3"), 0, 3)
    actor = shard("n0", model, nowhere)
    for rid in "abcd":
        actor.stepper.step(Forward(rid, 0, (1, 2, 3), True))  # a 3-token prompt
    actor.stepper.step_batch([decode("a", 1), decode("b", 1)])
    ab = actor.convoys.merged[("a", "b")]
    actor.stepper.step_batch([decode("c", 1), decode("d", 1)])
    cd = actor.convoys.merged[("c", "d")]
    actor.stepper.step_batch([decode("a", 2), decode("b", 2)])
    actor.stepper.step_batch([decode("c", 2), decode("d", 2)])
    assert actor.convoys.merged[("a", "b")] is ab and actor.convoys.merged[("c", "d")] is cd
    assert actor.requests["a"].caches == []  # while merged, the convoy holds a's KV

    actor.stepper.step(decode("a", 3))  # a alone: its convoy gives it its own caches back
    assert [c.offset for c in actor.requests["a"].caches] == [6] * 3  # 3 prompt + 3 steps
    assert [c.offset for c in actor.requests["b"].caches] == [5] * 3
    assert list(actor.convoys.merged) == [("c", "d")]

    sent, keep = recorder()

    actor.send_next = keep
    asyncio.run(actor.handle(End("c")))
    assert ("c", "d") in actor.convoys.merged  # d still lives in it
    asyncio.run(actor.handle(End("d")))
    assert actor.convoys.merged == {}  # nobody left: its caches are let go
    assert sent == [End("c"), End("d")]  # passed on to the next shard


def refused(st: Stepper, *parts: Forward | ForwardBatch) -> list[str]:
    """Why each request of `parts` that `st` would not run may not (in order)."""
    return list(st.screen(list(parts))[1].values())


def test_a_step_that_mlx_would_choke_on_is_refused_before_it_touches_a_cache() -> None:
    model = tiny_model("qwen3")
    first, middle = stepper("n0", load_shard(model, 0, 3)), stepper("n1", load_shard(model, 3, 5))
    vocab, width = first.limits.vocab, first.limits.width  # type: ignore[union-attr]
    assert vocab and width
    ok = Forward("a", 0, (1, vocab - 1), True)
    assert refused(first, ok) == []
    (why,) = refused(first, Forward("a", 0, (1, vocab), True))
    assert "outside the vocabulary" in why
    assert refused(first, Forward("a", 0, (), True)) == ["step 0 of a has no tokens"]

    def step(h: mx.array | Tensor, tokens: tuple[int, ...] = (1, 2)) -> Forward:
        return Forward("b", 0, tokens, False, h=h, layer=3)

    assert refused(middle, step(mx.zeros((1, 2, width), mx.bfloat16))) == []
    for bad in (
        mx.zeros((1, 2, width + 1), mx.bfloat16),  # another model's width
        mx.zeros((2, width), mx.bfloat16),  # 2-D
        mx.zeros((1, 3, width), mx.bfloat16),  # not one position per token
        Tensor("int32", (1, 2, width), bytes(8 * width)),  # ids where activations go
    ):
        assert len(refused(middle, step(bad))) == 1, bad
    assert len(refused(middle, step(mx.zeros((1, 1, width)), (1 << 40,)))) == 1
    assert middle.requests == {} and first.requests == {}


def test_a_batch_of_one_request_twice_or_unknown_rows_loses_those_rows_only() -> None:
    model = load_shard(tiny_model("qwen3"), 0, 3)
    st = stepper("n0", model)
    for rid in "abc":
        st.step(Forward(rid, 0, (1, 2, 3), True))
    assert refused(st, ForwardBatch((decode("a", 1), decode("b", 1)))) == []
    good, bad = st.screen([ForwardBatch((decode("a", 1), decode("a", 1), decode("b", 1)))])
    assert good == [ForwardBatch((decode("b", 1),))]
    assert bad == {"a": "a pass holds 2 steps of request a"}
    # Across the parts of one pass too: both of its steps fail, whichever part they are in.
    good, bad = st.screen(
        [decode("a", 1), ForwardBatch((decode("b", 1), decode("a", 1), decode("c", 1)))]
    )
    assert good == [ForwardBatch((decode("b", 1), decode("c", 1)))] and list(bad) == ["a"]
    good, bad = st.screen([ForwardBatch((decode("x", 1), decode("a", 1)))])
    assert good == [ForwardBatch((decode("a", 1),))]
    assert bad == {"x": "no state for request x at step 1"}


def test_a_shard_keeps_at_most_its_bound_of_live_requests() -> None:
    model = load_shard(tiny_model("qwen3"), 0, 3)
    st = Stepper("n0", model, pick(gates=False), max_requests=2)
    st.step(Forward("a", 0, (1, 2, 3), True))
    good, bad = st.screen([Forward("b", 0, (1,), True), Forward("c", 0, (1,), True)])
    assert good == [Forward("b", 0, (1,), True)]
    assert bad == {"c": "the shard keeps 2 requests at most"}
    st.step(Forward("b", 0, (1,), True))
    assert refused(st, decode("a", 1), decode("b", 1)) == []  # under way: they go on
    assert len(refused(st, Forward("c", 0, (1,), True))) == 1


async def test_a_refused_batch_fails_its_own_requests_and_leaves_other_convoys_alone() -> None:
    model = load_shard(tiny_model("qwen3"), 0, 3)
    sent, keep = recorder()
    actor = shard("n0", model, keep, gates=False)
    want = stepper("n0", model)
    for st in (actor.stepper, want):
        for rid in "ab":
            st.step(Forward(rid, 0, (1, 2, 3), True))
        st.step_batch([decode("a", 1), decode("b", 1)])
    merged = actor.convoys.merged[("a", "b")]
    await actor.handle(ForwardBatch((decode("x", 1), decode("x", 1))))
    assert [type(m).__name__ for m in sent] == ["Failure"]
    assert isinstance(sent[0], Failure) and sent[0].rid == "x"
    assert actor.convoys.merged[("a", "b")] is merged
    # A pass that fails in MLX fails the requests it ran, and only those.
    await actor.on_error(decode("a", 2), BatchError(("a",), "broken"))
    assert [m.rid for m in sent[1:]] == ["a"]  # type: ignore[attr-defined]
    assert "a" not in actor.requests and actor.convoys.merged == {}
    assert [c.offset for c in actor.requests["b"].caches] == [4] * 3  # its own KV back
    got, expected = actor.stepper.step(decode("b", 2)), want.step(decode("b", 2))
    assert isinstance(got, Forward) and isinstance(expected, Forward)
    assert isinstance(got.h, mx.array) and isinstance(expected.h, mx.array)
    assert mx.array_equal(got.h, expected.h).item()


async def test_decode_steps_run_on_the_loop_thread_and_prompt_chunks_off_it() -> None:
    """A prompt chunk must not hold the loop for its compute (frames and heartbeats would
    wait), however short: a new length may first build kernels (on CUDA, seconds). A decode
    step runs on the loop's thread, which saves two thread hand-offs. A request crosses
    threads between them: the chunk must leave none of its arrays unevaluated (MLX arrays are
    bound to the thread that scheduled them)."""
    import mlx.core as mx

    sent, keep = recorder()

    model = load_shard(tiny_model("qwen3"), 0, 3)
    actor = shard("n0", model, keep)
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    prompt = tuple(range(1, 257))
    before = turns
    await actor.handle(Forward("a", 0, prompt, False))
    during_chunk = turns - before
    before = turns
    await actor.handle(Forward("a", 1, (7,), True))
    during_decode = turns - before
    # A short chunk, to a shard with nothing else under way (no step built ahead to land,
    # no compute queued): only a hand-off to the compute thread lets the loop turn.
    fresh = shard("n1", model, keep, gates=False)
    before = turns
    await fresh.handle(Forward("s", 0, (3, 4), False))
    during_short = turns - before
    ticker.cancel()
    assert during_chunk > 5 and during_short > 0 and during_decode == 0, (
        during_chunk,
        during_short,
        during_decode,
    )
    # The same steps all at once on this thread give the same activations.
    whole = [
        actor.stepper.step(Forward("b", 0, prompt, False)),
        actor.stepper.step(Forward("b", 1, (7,), True)),
    ]
    for got, want in zip(sent[:2], whole, strict=True):
        assert isinstance(got, Forward) and isinstance(want, Forward)
        assert isinstance(got.h, mx.array) and isinstance(want.h, mx.array)
        assert mx.array_equal(got.h, want.h)


async def test_a_sampled_request_crosses_from_the_compute_thread_to_the_loop_cleanly() -> None:
    """A long prompt's chunk runs on the compute thread and the decode steps after it on the
    loop's. MLX binds an unevaluated array to the thread that made it, so the request's token
    history and caches must cross evaluated (a lazy history fails the first decode step with
    "There is no Stream(cpu, N) in current thread"). Seeded, the tokens and logprobs equal
    those of the same steps run all on this thread."""
    path = tiny_model("qwen3")
    n_layers = load_shard(path, 0, 1).n_layers
    params = SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=7, logprobs=2)
    # Two chunks: the second extends the token history (a lazy concatenation).
    steps = [
        Forward("r", 0, tuple(range(1, 41)), False, params=params),
        Forward("r", 1, tuple(range(41, 81)), False),
    ]
    steps += [Forward("r", 2 + i, (t,), True) for i, t in enumerate((81, 5, 9, 11))]
    sent, keep = recorder()

    actor = shard("n0", load_shard(path, 0, n_layers), keep)
    for f in steps:
        await actor.handle(f)
    direct = stepper("n1", load_shard(path, 0, n_layers))
    want = [direct.step(f) for f in steps][2:]
    assert all(isinstance(t, Token) for t in sent) and len(sent) == 4
    assert sent == want


def _over_the_wire(msg: Message) -> Message:
    from mlxring.protocol import codec as wire

    return wire.decode(wire.encode_bytes(msg)[wire.PREFIX.size :])


async def test_a_lone_requests_next_decode_step_is_built_before_its_input_arrives() -> None:
    """While a shard's only request is around the ring, its next decode step is built on a
    placeholder input; filled in, it gives what building it on arrival gives, bit for bit, on
    a first-and-last shard (tokens in, tokens out) and on a middle one (activations in from
    this process or off the wire). Another request's message first drops the built step, and
    the request goes on exactly. (Launching built steps behind a gate is `test_gate`'s.)"""
    import mlx.core as mx

    path = tiny_model("qwen3")
    n_layers = load_shard(path, 0, 1).n_layers
    params = SamplingParams(logprobs=3)
    prompt = [Forward("r", 0, tuple(range(1, 9)), False, params=params)]
    decodes = [Forward("r", 1 + i, (t,), True) for i, t in enumerate((9, 4, 17, 2, 30))]

    sent, keep = recorder()

    whole = shard("a", load_shard(path, 0, n_layers), keep, gates=False)
    direct = stepper("b", load_shard(path, 0, n_layers))
    for f in prompt + decodes:
        await whole.handle(f)
        if f.is_decode:
            assert isinstance(whole._built, Prebuilt)
            assert whole._built.rows == (("r", f.seq + 1),)
    assert sent == [direct.step(f) for f in prompt + decodes][1:]

    # A middle shard, fed the first layer's activations in this process or as wire bytes.
    first = stepper("f", load_shard(path, 0, 1))
    steps = [first.step(f) for f in prompt + decodes]
    for wired in (False, True):
        sent.clear()
        mid = shard("m", load_shard(path, 1, 2), keep, gates=False)
        ref = stepper("d", load_shard(path, 1, 2))
        want = []
        for i, f in enumerate(steps):
            assert isinstance(f, Forward)
            want.append(ref.step(f))
            if wired and i == 3:  # another request comes first: the built step is dropped
                await mid.handle(Forward("s", 0, (5, 6), False, h=f.h, layer=1))
                assert mid._built is None
                sent.pop()
                ref.step(Forward("s", 0, (5, 6), False, h=f.h, layer=1))
            await mid.handle(_over_the_wire(f) if wired else f)
        assert len(sent) == len(want)
        for got, exp in zip(sent, want, strict=True):
            assert isinstance(got, Forward) and isinstance(exp, Forward)
            assert isinstance(got.h, mx.array) and isinstance(exp.h, mx.array)
            assert mx.array_equal(got.h, exp.h), (wired, got.seq)


@pytest.mark.parametrize("gates", [False, True])
async def test_a_step_with_drafts_has_its_next_built_as_wide_and_a_trim_computes_on_arrival(
    gates: bool,
) -> None:
    """A step verifying drafts has its request's next step built ahead as wide (the head drafts
    as many again while they are kept), on the first-and-last shard and on a middle one; a step
    of another width, or one that first drops rejected positions, does not fit and is computed
    on arrival. Every output equals computing each step on arrival. With `gates`, the
    process's backend builds (on CUDA: launched behind a gate)."""
    path = tiny_model("qwen3")
    n_layers = load_shard(path, 0, 1).n_layers
    steps = [
        Forward("r", 0, tuple(range(1, 9)), True),
        Forward("r", 1, (9, 4, 17), True, draft=2),
        Forward("r", 2, (2, 30, 5), True, draft=2),  # as wide: the built step takes it
        Forward("r", 3, (7,), True, trim=1),  # drops a position first: computed on arrival
        Forward("r", 4, (8, 1, 2, 3), True, draft=3),  # wider than built: on arrival
        Forward("r", 5, (4, 5, 6, 7), True, draft=3),  # as wide again: built
    ]
    widths = [None, 3, 3, 1, 4, 4]  # the width each step has its next one built at
    sent, keep = recorder()
    whole = shard("a", load_shard(path, 0, n_layers), keep, gates=gates)
    direct = stepper("b", load_shard(path, 0, n_layers))
    for f, width in zip(steps, widths, strict=True):
        await whole.handle(f)
        built = whole._built
        if width is None:
            assert built is None
        else:
            slot = built.slot if isinstance(built, Prebuilt) else built.hold.slot
            assert slot.buf.shape == (1, width)
    assert sent == [direct.step(f) for f in steps]

    first = stepper("f", load_shard(path, 0, 1))
    inputs = [first.step(f) for f in steps]
    sent.clear()
    mid = shard("m", load_shard(path, 1, 2), keep, gates=gates)
    ref = stepper("d", load_shard(path, 1, 2))
    want = []
    for f in inputs:
        assert isinstance(f, Forward)
        want.append(ref.step(f))
        await mid.handle(_over_the_wire(f))
    for got, exp in zip(sent, want, strict=True):
        assert isinstance(got, Forward) and isinstance(exp, Forward)
        assert isinstance(got.h, mx.array) and isinstance(exp.h, mx.array)
        assert mx.array_equal(got.h, exp.h), got.seq


async def test_a_shard_whose_next_node_is_in_its_process_does_not_build_ahead() -> None:
    """Building ahead runs on the process's one loop thread: while the output crosses to another
    process that is free time, but when the next shard is in this process it would wait for
    the build. Such a shard computes each step on arrival, with the same outputs."""
    path = tiny_model("qwen3")
    steps = [Forward("r", 0, (1, 2, 3), False)] + [
        Forward("r", 1 + i, (t,), True) for i, t in enumerate((9, 4, 17))
    ]
    sent, keep = recorder()

    local = shard("a", load_shard(path, 0, 1), keep, gates=False)
    await local.handle(Reconfigure(stages=2, next_local=True))
    direct = stepper("b", load_shard(path, 0, 1))
    for f in steps:
        await local.handle(f)
        assert local._built is None
    import mlx.core as mx

    for got, f in zip(sent, steps, strict=True):
        want = direct.step(f)
        assert isinstance(got, Forward) and isinstance(want, Forward)
        assert isinstance(got.h, mx.array) and isinstance(want.h, mx.array)
        assert mx.array_equal(got.h, want.h)
    # Told its next node is in another process, the same shard builds ahead again.
    await local.handle(Reconfigure(stages=2, next_local=False))
    await local.handle(Forward("s", 0, (5, 6), False))
    await local.handle(Forward("s", 1, (7,), True))
    assert isinstance(local._built, Prebuilt) and local._built.rows == (("s", 2),)


async def test_freed_buffers_stay_cached_between_requests_and_go_back_when_idle() -> None:
    """A finished request's buffers stay in MLX's cache for the next request (allocating a
    prompt's buffers anew cost 10-15 ms of a 2048-token TTFT on CUDA); the sweep of an idle
    shard hands them back, and does not while a request is live."""
    import mlx.core as mx

    from mlxring.shard.state import Sweep

    sent, keep = recorder()

    model = load_shard(tiny_model("qwen3"), 0, 2)
    actor = shard("n0", model, keep)
    mx.clear_cache()
    await actor.handle(Forward("a", 0, tuple(range(1, 200)), False))
    await actor.handle(Forward("b", 0, tuple(range(1, 9)), False))
    await actor.handle(End("a"))
    cached = mx.get_cache_memory()
    assert cached > 0
    await actor.handle(Sweep(0.0))  # b is live: nothing is handed back
    assert mx.get_cache_memory() >= cached
    await actor.handle(End("b"))
    assert mx.get_cache_memory() >= cached
    await actor.handle(Sweep(0.0))
    assert mx.get_cache_memory() == 0
    assert [type(m) for m in sent] == [Forward, Forward, End, End]


@pytest.mark.parametrize("split", [None, 1])
def test_batched_passes_compute_what_mlx_lms_batch_generator_computes(split: int | None) -> None:
    """The oracle for a batched pass is mlx-lm's own batched generation on the same batch,
    where a batched kernel may round differently from a lone row's (a GPU's; on the CPU both
    equal lone generation too, which tests/test_ring checks through the ring). Eight prompts
    of 15-17 tokens are prefilled one at a time, then their last tokens and the decode steps
    run as one batch (left-padded caches): the shard's passes, whole or split in two, give
    mlx-lm's BatchGenerator's tokens, step for step."""
    path = tiny_model("qwen3")
    prompts = [encode(path, t) for t in CONCURRENT_TEXTS]
    steps = 24
    want = batch_reference(path, prompts, steps)

    n = load_shard(path, 0, 1).n_layers
    bounds = [0, n] if split is None else [0, split, n]
    shards = [
        stepper(f"n{i}", load_shard(path, a, b))
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    rids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(rids, prompts, strict=True):
        msg: Message | None = Forward(rid, 0, tuple(p[:-1]), False)
        for s in shards:
            assert isinstance(msg, Forward)
            msg = s.step(msg)
        assert msg is None  # a prompt chunk leaves the last shard nothing to send
    got: list[list[int]] = [[] for _ in rids]
    last = [p[-1] for p in prompts]
    for i in range(steps):
        parts: list[Message] = [
            Forward(rid, 1 + i, (t,), True) for rid, t in zip(rids, last, strict=True)
        ]
        for s in shards:
            assert all(isinstance(p, Forward | ForwardBatch) for p in parts)
            parts = s.step_batch(cast(list[Forward | ForwardBatch], parts))
        assert all(isinstance(t, Token) for t in parts)
        last = [cast(Token, t).token for t in parts]
        for row, t in zip(got, last, strict=True):
            row.append(t)
    assert got == want
    assert all(s.batches == steps for s in shards)


@pytest.mark.parametrize(("family", "quantize"), [("qwen3", None), ("llama", 4), ("mistral", 8)])
def test_a_warmed_up_shard_computes_what_a_fresh_one_does(
    family: str, quantize: int | None
) -> None:
    """Loading a node's shard runs its kinds of pass once (`ShardModel.warm_up`: kernels that
    MLX builds on first use are built then, not in a request's first step on the event loop).
    It runs on the first, a middle and the last shard, and leaves nothing behind: a request
    then gets the warmed shards' output bit for bit, activations and tokens."""
    import mlx.core as mx

    path = tiny_model(family, quantize=quantize)
    n = load_shard(path, 0, 1).n_layers
    bounds = [0, 1, n - 1, n]
    steps = [Forward("r", 0, (5, 9, 2, 7, 1), False), Forward("r", 1, (3,), True)]
    steps += [Forward("r", 2 + i, (t,), True) for i, t in enumerate((8, 4))]

    def run(warm: bool) -> list[Message | None]:
        shards = []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            model = load_shard(path, a, b)
            if warm:
                model.warm_up()
            shards.append(stepper(f"n{i}", model))
        outs: list[Message | None] = []
        for f in steps:
            msg: Message | None = f
            for s in shards:
                assert isinstance(msg, Forward)
                msg = s.step(msg)
                outs.append(msg)
        return outs

    for got, want in zip(run(True), run(False), strict=True):
        if isinstance(want, Forward):
            assert isinstance(got, Forward) and isinstance(got.h, mx.array)
            assert isinstance(want.h, mx.array) and mx.array_equal(got.h, want.h)
        else:
            assert got == want


def test_a_process_picks_its_backend_from_the_device_and_the_gates_setting() -> None:
    """Steps are built ahead wherever placeholders work (the CPU, Apple silicon, CUDA) and
    launched behind gates only where gates work and the process may use them."""
    from mlxring.backends.cuda import gate
    from mlxring.backends.placeholder import Placeholders, placeholders_work

    assert placeholders_work()
    assert isinstance(pick(gates=False), Placeholders) and not pick(gates=False).launches
    assert pick(gates=True).launches == gate.works()


def test_a_large_tensor_read_through_mx_load_equals_the_plain_way() -> None:
    """CUDA's backend reads a prompt chunk's activations through mx.load (one transfer to the
    device); run here on the CPU, it gives the plain way's array, dtype and bits."""
    import mlx.core as mx

    from mlxring.backends.cuda import load
    from mlxring.protocol import codec as wire
    from mlxring.protocol.messages import Tensor

    h = mx.random.normal((1, 300, 2048)).astype(mx.bfloat16)
    dtype, shape, view = wire.tensor_view(h)
    t = Tensor(dtype, shape, bytes(view))
    assert len(t.data) >= load.LOAD_MIN_BYTES
    got, plain = load.to_array(t), wire.to_array(t)
    assert got.dtype == plain.dtype == mx.bfloat16 and got.shape == plain.shape
    assert mx.array_equal(got.view(mx.uint16), plain.view(mx.uint16)).item()
