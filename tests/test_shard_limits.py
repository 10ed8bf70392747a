"""A shard's per-step limits on a real shard (tiny model, no ring): a bad row of a batch fails
its own request while the other rows go on, exact; the KV-cache bytes a shard's requests may
hold."""

import mlx.core as mx

from mlxring.backends import pick
from mlxring.model.sharded import load_shard
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import (
    Failure,
    Forward,
    ForwardBatch,
    Message,
    SamplingParams,
    Token,
)
from mlxring.shard.actor import ShardActor
from mlxring.shard.checks import GIB, KV_SHARE, kv_bound
from mlxring.shard.step import MEASURED_FROM, Stepper

from .ringutil import CONCURRENT_TEXTS, compute, encode, recorder, reference, tiny_model


def over_the_wire(msg: Message) -> Message:
    """`msg` as the next node reads it: its activations a wire `Tensor`, not an mx.array."""
    return wire.decode(wire.encode_bytes(msg)[wire.PREFIX.size :])


async def test_a_bad_row_of_a_batch_fails_its_request_and_the_others_go_on_exact() -> None:
    """Four requests decode as one batch through two shards. The second shard is sent, one
    pass at a time, a row of a request it does not know, a token id outside the vocabulary
    (r1) and one request's row twice (r2): each fails that request alone, and the other rows
    give mlx-lm's own tokens to the end (their convoy merges anew without the failed rows)."""
    path = tiny_model("qwen3")
    prompts = [encode(path, t) for t in CONCURRENT_TEXTS[:4]]
    steps = 10
    want = [reference(path, p, steps) for p in prompts]
    n = load_shard(path, 0, 1).n_layers
    first = Stepper("n0", load_shard(path, 0, 3), pick(gates=False))
    sent, keep = recorder()
    last = ShardActor("n1", load_shard(path, 3, n), keep, compute(), backend=pick(gates=False))
    vocab = last.stepper.limits.vocab  # type: ignore[union-attr]
    assert vocab
    rids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(rids, prompts, strict=True):
        out = first.step(Forward(rid, 0, tuple(p[:-1]), False))
        assert isinstance(out, Forward)
        await last.handle(out)
    assert sent == []  # prompt chunks leave nothing to send
    got: dict[str, list[int]] = {rid: [] for rid in rids}
    tokens = dict(zip(rids, (p[-1] for p in prompts), strict=True))
    failed: dict[str, str] = {}
    for i in range(steps):
        live = [rid for rid in rids if rid not in failed]
        (batch,) = first.step_batch([Forward(rid, 1 + i, (tokens[rid],), True) for rid in live])
        assert isinstance(batch, ForwardBatch) and isinstance(batch.h, mx.array)
        rows, h = list(batch.rows), batch.h
        if i == 2:  # a request this shard does not know, in the middle of the batch
            rows.insert(1, Forward("x", 3, (7,), True, layer=3))
            h = mx.concatenate([h[:1], mx.zeros_like(h[:1]), h[1:]])
        if i == 4:  # r1's row with a token id past the vocabulary
            rows[1] = Forward("r1", rows[1].seq, (vocab,), True, layer=3)
        if i == 6:  # r2's row twice: which is real cannot be known
            rows.append(rows[1])
            h = mx.concatenate([h, h[1:2]])
        sent.clear()
        await last.handle(over_the_wire(ForwardBatch(tuple(rows), h)))
        for m in sent:
            if isinstance(m, Failure):
                failed[m.rid] = m.message
            else:
                assert isinstance(m, Token)
                got[m.rid].append(m.token)
                tokens[m.rid] = m.token
    assert set(failed) == {"x", "r1", "r2"}
    assert "no state for request x" in failed["x"]
    assert "outside the vocabulary" in failed["r1"]
    assert "2 steps of request r2" in failed["r2"]
    assert set(last.requests) == {"r0", "r3"}
    assert [got[r] for r in rids] == [want[0], want[1][:4], want[2][:6], want[3]]


def test_a_batch_of_activations_of_the_wrong_shape_fails_every_row() -> None:
    path = tiny_model("qwen3")
    st = Stepper("n1", load_shard(path, 3, 5), pick(gates=False))
    width = st.limits.width  # type: ignore[union-attr]
    assert width
    for rid in "ab":
        st.step(Forward(rid, 0, (1, 2), False, h=mx.zeros((1, 2, width), mx.bfloat16), layer=3))
    rows = tuple(Forward(rid, 1, (5,), True, layer=3) for rid in "ab")
    good, refused = st.screen([ForwardBatch(rows, mx.zeros((2, 1, width + 1), mx.bfloat16))])
    assert good == [] and set(refused) == {"a", "b"}
    good, refused = st.screen([ForwardBatch(rows, mx.zeros((2, 1, width), mx.bfloat16))])
    assert refused == {} and len(good) == 1 and good[0].rows == rows  # type: ignore[union-attr]


def chunks(rid: str, prompt: list[int], size: int) -> list[Forward]:
    return [
        Forward(rid, i, tuple(prompt[at : at + size]), at + size >= len(prompt))
        for i, at in enumerate(range(0, len(prompt), size))
    ]


async def test_a_prompt_past_the_kv_bound_fails_with_why_and_small_ones_go_on() -> None:
    """A whole shard of the tiny model keeps 896 bytes of KV a position (7 layers, 2 heads of
    16, K and V in bfloat16); its bound here is 1 MiB, about 1170 positions. A 2048-token
    prompt in chunks of 512: the first two run; the third would add 512 positions to 1024
    (the bytes of a position measured by then), so it fails before it runs, and the request
    with it. Then short requests run as before."""
    path = tiny_model("qwen3")
    model = load_shard(path, 0, load_shard(path, 0, 1).n_layers)
    sent, keep = recorder()
    actor = ShardActor("n0", model, keep, compute(), kv_cache_gb=1 / 1024)
    assert actor.stepper.limits is not None and actor.stepper.limits.kv_bytes == 1 << 20
    long = [(7 * i) % 500 + 1 for i in range(2048)]
    for c in chunks("long", long, 512):
        await actor.handle(c)
        if "long" not in actor.requests:
            break
    (failure,) = sent
    assert isinstance(failure, Failure) and failure.rid == "long"
    assert "the shard holds 0.000854 GiB of KV cache, its bound is 0.000977 GiB" in failure.message
    assert "would add 0.000427 GiB" in failure.message
    assert actor.stepper.per_position == 896 and actor.requests == {}
    sent.clear()
    short = encode(path, CONCURRENT_TEXTS[0])
    await actor.handle(Forward("short", 0, tuple(short), True))
    (tok,) = sent
    assert isinstance(tok, Token) and tok.token == reference(path, short, 1)[0]
    assert actor.requests["short"].kv_bytes == 256 * 896  # caches grow 256 positions at once


def test_new_requests_wait_out_a_full_shard_but_its_decodes_go_on() -> None:
    """Before any request has measured a position's bytes, what the shard holds is checked:
    at its bound, a new request fails and a running one's decode step runs."""
    path = tiny_model("qwen3")
    model = load_shard(path, 0, 3)
    st = Stepper("n0", model, pick(gates=False), kv_cache_gb=1 / 4096)  # 256 KiB
    for rid in "ab":
        st.step(Forward(rid, 0, (1, 2, 3), True))  # 256 positions of 3 layers each: 96 KiB
    assert st.kv_held() == 2 * 256 * 384 and st.per_position == 0
    good, refused = st.screen([Forward("c", 0, (1,), True)])
    assert good == [Forward("c", 0, (1,), True)] and refused == {}
    st.step(Forward("c", 0, (1,), True))
    good, refused = st.screen([Forward("d", 0, (1,), True), Forward("a", 1, (4,), True)])
    assert good == [Forward("a", 1, (4,), True)]
    assert refused == {"d": "the shard holds 0.000275 GiB of KV cache, its bound is 0.000244 GiB"}
    assert MEASURED_FROM > 3  # three tokens do not say what a position costs


def test_the_kv_bound_is_the_setting_else_a_share_of_the_memory_the_weights_leave() -> None:
    model = load_shard(tiny_model("qwen3"), 0, 3)
    weights = model.parameter_bytes()
    assert kv_bound(model, 2.0, 64 * GIB) == 2 * GIB
    assert kv_bound(model, None, 64 * GIB) == int((64 * GIB - weights) * KV_SHARE)
    assert kv_bound(model, None, 0) is None  # memory not known: no bound
    st = Stepper("n0", model, pick(gates=False), total_memory=64 * GIB)
    assert st.limits is not None
    assert st.limits.kv_bytes == int((64 * GIB - weights) * KV_SHARE)


async def test_steps_a_head_would_never_send_fail_their_own_request_with_why() -> None:
    """What no honest head sends is refused before MLX, each with why, and the shard goes on:
    a step addressed to another layer, a later step of a request it never saw, prompt chunks
    that take a request past the model's context, a logit bias on an id past the vocabulary
    (mlx-lm's processor wrote out of bounds: the process died), a negative penalty."""
    path = tiny_model("qwen3")
    sent, keep = recorder()
    shard = ShardActor("n0", load_shard(path, 0, 3), keep, compute(), backend=pick(gates=False))
    limits = shard.stepper.limits
    assert limits is not None and limits.context and limits.vocab
    chunk = limits.context // 2 + 1
    evil = [
        Forward("far", 0, (1,), False, layer=2),
        Forward("late", 5, (1,), False),
        Forward("long", 0, (1,) * chunk, False),
        Forward("long", 1, (1,) * chunk, False),
        Forward("bias", 0, (1,), True, params=SamplingParams(logit_bias=((limits.vocab, 1.0),))),
        Forward("neg", 0, (1,), True, params=SamplingParams(repetition_penalty=-1.0)),
    ]
    for f in evil:
        await shard.handle(f)
    failed = {m.rid: m.message for m in sent if isinstance(m, Failure)}
    assert set(failed) == {"far", "late", "long", "bias", "neg"}, failed
    assert "is for layer 2, this shard starts at 0" in failed["far"]
    assert "no state for request late at step 5" in failed["late"]
    assert (
        f"would reach {2 * chunk} positions, past the context of {limits.context}"
        in (failed["long"])
    )
    assert "logit bias" in failed["bias"] and "out of range" in failed["neg"]
    # The first chunk of "long" ran: the shard keeps serving what is sound.
    prompt = encode(path, "Still serving.")
    sent.clear()
    await shard.handle(Forward("ok", 0, tuple(prompt), True))
    assert [type(m) for m in sent] == [Forward]
