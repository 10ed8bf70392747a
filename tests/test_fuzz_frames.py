"""Fuzz, frames: every message type, drawn from its own dataclass, through live node processes.

Strategies are derived from `mlxring/protocol/messages.py` as the codec derives its wire form
(`dataclasses.fields`, `typing.get_type_hints`, `AtLeast` bounds; `schema.py`): a new message
type or field is fuzzed without editing this file, and `test_every_message_type_has_a_strategy`
fails for a type whose hints it cannot draw. The values are hostile on purpose: ints past int32
and below their bound, token ids past the vocabulary, NaN and infinite floats, empty and huge
tuples, rids of odd characters, tensors whose bytes disagree with their shape or dtype, unknown
dtypes, activations of the wrong width; and raw byte mutations of valid frames (flipped,
truncated, extended, a lying length prefix) through the length-prefixed frame format.

What the fuzz reaches: a 2-node ring of `mlxring node` processes (n0 the head and first shard,
n1 the last shard). A node's Listener takes any number of links that pass the handshake, and
names each after the node it claims to be (on an open ring, from that node's address): it does
not refuse a second link under a name already linked. So the fuzzer links to n0 as n1 and to n1
as n0, each node's PREVIOUS member, beside the ring's own links, and its data frames pass
routing (`LocalNode.received`) into the shards' checks (`mlxring/shard/checks.py`), MLX's
embedding (n0), layers and sampling (n1), the head's engine (tokens, failures) and monitor
(probes). A frame the codec refuses drops the fuzzer's link, which it dials again; the ring's
own links are untouched, so the ring can be checked afterwards.

Properties: both processes stay alive (checked after every example), n0's HTTP API answers and
no process's memory grows without bound (checked every few examples and at the end), and after
the fuzz a greedy completion through the ring equals mlx-lm's own (the fuzz corrupted no other
request's state). The fuzz is derandomized (the same frames every run): 800 frames, one per
example, each followed by a ping whose pong says the node still reads (a link left inside a
truncated frame is dropped after 1 s); about 30 s of wall time. Steps are drawn more often than
other messages, half of them aimed (`aimed`: activations of the claimed rows and width, the
shard's first layer, often a request's first step, token ids folded into the vocabulary) so
that hostile values the codec takes get past the checks into MLX.

A frame found to take a node down is kept below as its own test, the minimal frame: the
derandomized fuzz need not draw that conjunction of values again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import re
import time
import types
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import msgpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mlxring.config import load_config
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import (
    AtLeast,
    End,
    Forward,
    ForwardBatch,
    Message,
    Ping,
    Pong,
    SamplingParams,
    Tensor,
)
from mlxring.protocol.schema import schema
from mlxring.transport.conn import FrameConnection, connect
from mlxring.transport.link import HANDSHAKE_MAX_FRAME, LinkError, LinkSettings, handshake_connect

from .ringutil import (
    FAST,
    complete,
    decode,
    encode,
    process_ring,
    reference,
    tiny_model,
    write_config,
)

NAN, INF = math.nan, math.inf
# Names that recur, so that a step, a batch row and an end meet the same request, and probes
# meet the nodes' names; other strings are arbitrary text.
POOL = ("r0", "r1", "r2", "n0", "n1", "", "done")
INT_EDGES = (-1, 1 << 30, (1 << 31) - 1, 1 << 31, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1)
FLOAT_EDGES = (NAN, INF, -INF, -0.0, -1.0, 1e308, 5e-324)
DTYPE_NAMES = (*wire.DTYPES, "float64", "int8", "")
HUGE = 2000  # items of a huge tuple (one value repeated: drawing each would be slow)


# --- strategies derived from the dataclasses ----------------------------------------------------


def _bound(hint: Any) -> int | None:
    if get_origin(hint) is not Annotated:
        return None
    return next((m.bound for m in get_args(hint)[1:] if isinstance(m, AtLeast)), None)


def rarely(
    usual: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """`hostile` one time in 16: values the codec refuses (the fuzzer's link is dropped) are
    rare enough that most frames of an example get through to the node's shard."""
    return st.integers(0, 15).flatmap(lambda i: hostile if i == 0 else usual)


def integers(lo: int | None) -> st.SearchStrategy[int]:
    """Small values (seqs, layers, token ids), values around a vocabulary, the edges of
    int32/int64/uint64 and anything msgpack carries, at or above the bound if there is one;
    below it, rarely."""
    if lo is None:
        return st.one_of(
            st.integers(0, 8),
            st.integers(0, 700),
            st.sampled_from(INT_EDGES),
            st.integers(-(1 << 63), (1 << 64) - 1),
        )
    usual = st.one_of(
        st.integers(lo, lo + 8),
        st.integers(lo, lo + 700),
        st.sampled_from([e for e in INT_EDGES if e >= lo]),
        st.integers(lo, (1 << 64) - 1),
    )
    return rarely(usual, st.one_of(st.just(lo - 1), st.integers(-(1 << 63), lo - 1)))


def floats(lo: int | None) -> st.SearchStrategy[float]:
    """NaN and infinities too, which the codec takes where a field has no bound."""
    anything = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=64))
    if lo is None:
        return st.one_of(st.floats(0.0, 2.0), anything)
    return rarely(st.floats(float(lo), float(lo) + 2.0), anything)


TEXT = st.one_of(
    st.sampled_from(POOL),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=24),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=200, max_size=600),
)
PLAIN: dict[Any, st.SearchStrategy[Any]] = {
    str: TEXT,
    bool: st.booleans(),
    bytes: st.one_of(st.binary(max_size=40), st.binary(min_size=1000, max_size=2000)),
    int: integers(None),
    float: floats(None),
}


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...] | None = None, fits: bool = True) -> Tensor:
    """A tensor as the wire carries one: of any shape and a dtype the codec knows, its bytes
    filling it (random, so NaN and inf as bits fall, or all NaN, inf, zero); unless `fits` is
    False: then rarely an unknown dtype or bytes that disagree with the shape."""
    hostile = not fits and draw(st.integers(0, 7)) == 0
    dtype = draw(st.sampled_from(DTYPE_NAMES if hostile else tuple(wire.DTYPES)))
    if shape is None:
        dims = draw(st.lists(st.sampled_from((0, 1, 2, 3, 5)), max_size=3))
        width = draw(st.sampled_from((64, 64, 63, 65, 1, 0, 128)))
        shape = (*dims, width)
    itemsize = wire._ITEMSIZE.get(dtype, 4)
    size = math.prod(shape) * itemsize
    if hostile:
        size = max(0, size + draw(st.sampled_from((0, 1, -1, itemsize, -size))))
    seed = draw(st.integers(0, 1 << 32))
    fill = draw(st.sampled_from(("random", "random", "nan", "inf", "zero")))
    data = {
        "random": lambda: random.Random(seed).randbytes(size),
        "nan": lambda: (b"\xc0\x7f" * size)[:size],  # bf16 NaN; other dtypes: other bits
        "inf": lambda: (b"\x80\x7f" * size)[:size],
        "zero": lambda: bytes(size),
    }[fill]()
    return Tensor(dtype, shape, data)


def strategy(hint: Any) -> st.SearchStrategy[Any]:
    """A strategy for a field of type `hint`, read as `schema._reader` reads it."""
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        if Tensor in args:  # the tensor field: `mx.array | Tensor | None`, sent as a Tensor
            return st.one_of(st.none(), tensors(fits=False))
        return st.one_of([strategy(a) for a in args])
    if hint is type(None):
        return st.none()
    if get_origin(hint) is Annotated:
        base, lo = args[0], _bound(hint)
        if base is int:
            return integers(lo)
        if base is float:
            return floats(lo)
        return strategy(base)
    if get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        each = strategy(args[0])
        # Huge: one value repeated; a dataclass's (a batch's rows, a probe's stats) less so, each
        # of them holding huge tuples of its own.
        most = HUGE // 30 if dataclasses.is_dataclass(args[0]) else HUGE
        some = st.lists(each, min_size=1, max_size=5).map(tuple)
        huge = st.builds(lambda x, n: (x,) * n, each, st.integers(most // 30, most))
        return rarely(st.one_of(some, some, huge), st.just(()))
    if get_origin(hint) is tuple:
        return st.tuples(*(strategy(a) for a in args))
    if dataclasses.is_dataclass(hint):
        return messages(hint)
    if hint in PLAIN:
        return PLAIN[hint]
    raise TypeError(f"no strategy for {hint!r}")


def messages(cls: Any) -> st.SearchStrategy[Any]:
    """Instances of dataclass `cls`, each field drawn from its own type hint (a field with a
    default is drawn too: the wire carries every field)."""
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: strategy(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.builds(cls, **fields)


MESSAGES: dict[type, st.SearchStrategy[Any]] = {cls: messages(cls) for cls in wire.TAGS}
ANY_MESSAGE: st.SearchStrategy[Message] = st.one_of(list(MESSAGES.values()))
# The types that carry activations (steps): drawn more often, and aimed (below).
STEPS: st.SearchStrategy[Message] = st.one_of(
    [MESSAGES[cls] for cls in wire.TAGS if schema(cls).tensor is not None]
)


def aimed(layer: int, width: int, vocab: int) -> Callable[[Message], st.SearchStrategy[Message]]:
    """A step made to pass a shard's checks but for its drawn values (tokens, params, flags): its
    activations of the width and rows it claims, its layer the shard's first, often the first
    step of its request; a batch's rows one token each. So hostile values that pass the codec
    reach MLX rather than fail early."""

    def aim(msg: Message) -> st.SearchStrategy[Message]:
        if isinstance(msg, Forward) and msg.tokens:
            # Half of them a request's first step (seq 0): its sampling params are taken; half
            # with token ids inside the vocabulary, so that the step computes.
            shape = (1, len(msg.tokens), width)
            inside = tuple(t % vocab for t in msg.tokens)
            return st.tuples(
                tensors(shape), st.sampled_from((0, msg.seq)), st.sampled_from((inside, msg.tokens))
            ).map(lambda x: dataclasses.replace(msg, h=x[0], seq=x[1], tokens=x[2], layer=layer))
        if isinstance(msg, ForwardBatch) and msg.rows:
            rows = tuple(
                dataclasses.replace(r, tokens=r.tokens[:1] or (1,), layer=layer, h=None)
                for r in msg.rows
            )
            return tensors((len(rows), 1, width)).map(lambda h: ForwardBatch(rows, h))
        return st.just(msg)

    return aim


@st.composite
def mutated(draw: st.DrawFn, frame: bytes) -> bytes:
    """A valid frame's bytes, mutated: bytes flipped, cut short, extended, the length prefix
    lying, or the body's msgpack re-typed."""
    how = draw(st.sampled_from(("flip", "truncate", "extend", "prefix", "retag")))
    if how == "flip":
        out = bytearray(frame)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if how == "extend":
        return frame + draw(st.binary(min_size=1, max_size=64))
    if how == "prefix":
        n = draw(st.sampled_from((0, 1, len(frame) - 5, len(frame) + 3, 1 << 20, 0xFFFFFFFF)))
        return wire.PREFIX.pack(n & 0xFFFFFFFF) + frame[wire.PREFIX.size :]
    # A well-formed map of another type's tag, or not a map at all.
    body = msgpack.unpackb(frame[wire.PREFIX.size :])
    tag = draw(st.sampled_from((*wire.TAGS.values(), "nope", 7)))
    value = draw(st.sampled_from(("map", "list", "int")))
    packed = msgpack.packb(
        {**body, "type": tag} if value == "map" else list(body) if value == "list" else 7
    )
    return wire.PREFIX.pack(len(packed)) + packed


# --- the codec alone -------------------------------------------------------------------------


def test_every_message_type_has_a_strategy() -> None:
    """Every class the codec has a tag for is drawn from its own fields, the nested
    dataclasses (SamplingParams, NodeStats, Tensor) with them."""
    assert set(MESSAGES) == set(wire.TAGS)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_each_strategy_draws_its_own_type(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(sorted(MESSAGES, key=lambda c: c.__name__)))
    assert isinstance(data.draw(MESSAGES[cls]), cls)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.data())
def test_decoding_any_frame_gives_a_message_or_a_frame_error(data: st.DataObject) -> None:
    """What a peer can send, decoded: the message it encodes, or a FrameError (which closes the
    connection), never another exception (which would escape the protocol's callback)."""
    msg = data.draw(ANY_MESSAGE)
    frame = wire.encode_bytes(msg)
    raw = data.draw(st.one_of(st.just(frame), mutated(frame)))
    body = raw[wire.PREFIX.size :]
    try:
        got = wire.decode(body)
    except wire.FrameError:
        return
    if raw == frame:
        assert type(got) is type(msg)


# --- a live ring -------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """Resident memory of process `pid` in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert m is not None
    return int(m.group(1)) * 1024


def api_answers(port: int) -> bool:
    """Whether a node's HTTP API answers /health (503 is an answer: the ring may be down)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 503


class Fuzzer:
    """The fuzzer's links to the ring's nodes, each under the name of that node's previous
    member; a link the node dropped (a frame it refused) is dialed again."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ports: dict[str, int],
        claim: dict[str, str],
        patience: float = 20.0,
    ) -> None:
        self.loop = loop
        self.patience = patience
        self.ports, self.claim = ports, claim
        self.conns: dict[str, FrameConnection] = {}
        self.awaiting: dict[float, asyncio.Future[None]] = {}  # pongs by the ping's stamp
        self.sent: dict[str, deque[str]] = {n: deque(maxlen=12) for n in ports}
        self.frames = 0
        self.redials = 0
        self.rids: set[str] = set()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def link(self, node: str) -> FrameConnection:
        conn = self.conns.get(node)
        if conn is not None and not conn.closing:
            return conn
        self.redials += conn is not None
        conn = await self._dial(node)
        conn.deliver(self._pong)
        self.conns[node] = conn
        return conn

    def _pong(self, msg: Message) -> None:
        fut = self.awaiting.pop(msg.sent, None) if isinstance(msg, Pong) else None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _dial(self, node: str) -> FrameConnection:
        """A new link through the handshake; dialed again while the node is slow to answer (a
        loaded machine), an AssertionError once it has not answered for `patience` seconds."""
        patience = self.patience
        deadline = time.monotonic() + patience
        while True:
            try:
                conn = await connect("127.0.0.1", self.ports[node], HANDSHAKE_MAX_FRAME, 5)
                try:
                    await handshake_connect(
                        conn, LinkSettings(cluster="test", node=self.claim[node])
                    )
                except BaseException:
                    await conn.wait_closed()
                    raise
                return conn
            except (OSError, TimeoutError, LinkError, wire.FrameError) as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{node} takes no link for {patience:g} s: {e!r}") from e
                await asyncio.sleep(0.2)

    async def send(self, node: str, frame: Message | bytes) -> None:
        conn = await self.link(node)
        self.sent[node].append(repr(frame)[:400])
        self.frames += 1
        for m in frame.rows if isinstance(frame, ForwardBatch) else (frame,):
            if isinstance(m, Forward | End):
                self.rids.add(m.rid)
        if isinstance(frame, bytes):
            assert conn.transport is not None
            conn.transport.write(frame)
        else:
            conn.send(frame)

    async def settle(self, node: str, timeout: float = 1.0) -> None:
        """A ping through the link and its pong back: the node still reads and answers. A link
        left inside a truncated frame, or closed by the node, is dropped and dialed again."""
        conn = await self.link(node)
        stamp = time.monotonic()
        try:
            conn.send(Ping(stamp))
        except ConnectionError:
            await self.link(node)
            return
        pong = self.awaiting[stamp] = asyncio.get_running_loop().create_future()
        await asyncio.wait({pong, conn.closed}, timeout=timeout, return_when="FIRST_COMPLETED")
        self.awaiting.pop(stamp, None)
        if not pong.done():
            conn.close()
        if conn.closing:
            await conn.wait_closed()
            await self.link(node)

    async def close(self) -> None:
        for conn in self.conns.values():
            await conn.wait_closed(5)


def ring_layers(log: str) -> list[list[int]]:
    """The [start, end) layers of each member, from the head's `ring_up` line."""
    for line in log.splitlines():
        if '"ring_up"' in line:
            return [list(x) for x in json.loads(line)["layers"]]
    raise AssertionError("no ring_up line")


EXAMPLES = 800
MEMORY_GROWTH = 768 * 1024 * 1024  # bounded: a few KV caches and a big-frame buffer per link


def test_fuzzed_frames_do_not_take_down_a_live_ring(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    model_config = json.loads((model / "config.json").read_text())
    hidden, vocab = int(model_config["hidden_size"]), int(model_config["vocab_size"])
    cfg = write_config(
        tmp_path,
        model,
        2,
        extra_cluster=f"{FAST}\nmax_frame_mb = 4",
        api="max_concurrent = 4\nmax_queue = 4",
    )
    config = load_config(cfg)
    prompt = encode(model, "A fuzzed frame must not corrupt this request.")
    want = decode(model, reference(model, prompt, 16))
    api = config.api_port("n0")
    with process_ring(cfg, ["n0", "n1"], tmp_path) as procs:
        procs["n0"].wait_log('"ring_up"', 60)
        assert complete(api, prompt, 16) == want
        layers = ring_layers(procs["n0"].log())
        base = {n: rss(p.proc.pid) for n, p in procs.items()}
        peak = dict(base)
        loop = asyncio.new_event_loop()
        fuzz = Fuzzer(
            loop,
            {n: config.node(n).port for n in ("n0", "n1")},
            {"n0": "n1", "n1": "n0"},  # each node's previous member
        )
        aims = {n: aimed(layers[i][0], hidden, vocab) for i, n in enumerate(("n0", "n1"))}
        examples = 0

        def alive(where: str) -> None:
            for name, p in procs.items():
                assert p.proc.poll() is None, (
                    f"{name} died ({p.proc.returncode}) {where}; last frames to it:\n"
                    + "\n".join(fuzz.sent[name])
                    + f"\n{p.log()[-2000:]}"
                )

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # a dead node makes shrinking meaningless
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def fuzz_one(data: st.DataObject) -> None:
            """One frame: a step aimed at the node's shard, any step, any message, or one of
            them as mutated bytes; then a ping and its pong (or a new link)."""
            nonlocal examples
            examples += 1
            node = data.draw(st.sampled_from(("n0", "n1")))
            aimed_step = STEPS.flatmap(aims[node])
            msg = data.draw(st.one_of(aimed_step, aimed_step, STEPS, ANY_MESSAGE))
            if data.draw(st.integers(0, 9)) == 0:
                fuzz.run(fuzz.send(node, data.draw(mutated(wire.encode_bytes(msg)))))
                # A lying length prefix leaves the node waiting inside a frame: not long.
                fuzz.run(fuzz.settle(node, 0.5))
            else:
                fuzz.run(fuzz.send(node, msg))
                fuzz.run(fuzz.settle(node))
            alive(f"after example {examples}")
            if examples % 20 == 0:
                assert api_answers(api)
                for n, p in procs.items():
                    peak[n] = max(peak[n], rss(p.proc.pid))

        try:
            fuzz_one()
            # What the fuzz started is ended, as a previous member would: the shards' request
            # slots are free for the completion below.
            for node in ("n0", "n1"):
                for rid in fuzz.rids:
                    fuzz.run(fuzz.send(node, End(rid)))
                fuzz.run(fuzz.settle(node))
        finally:
            fuzz.run(fuzz.close())
            loop.close()
        alive("after the fuzz")
        assert fuzz.frames >= EXAMPLES, fuzz.frames
        assert api_answers(api)
        assert complete(api, prompt, 16) == want
        for n, p in procs.items():
            peak[n] = max(peak[n], rss(p.proc.pid))
            assert peak[n] - base[n] < MEMORY_GROWTH, (n, base[n], peak[n])
        alive("after the completion")


def test_a_logit_bias_outside_the_vocabulary_fails_its_request_not_the_node(
    tmp_path: Path,
) -> None:
    """The minimal frame the fuzz's sampling path led to: a request's first step to the last
    shard, sampling, whose params bias one token id past the vocabulary (mlx-lm's logit bias
    processor wrote out of bounds: SIGSEGV). The shard's screen refuses it with why."""
    model = tiny_model("qwen3")
    model_config = json.loads((model / "config.json").read_text())
    hidden, vocab = int(model_config["hidden_size"]), int(model_config["vocab_size"])
    cfg = write_config(tmp_path, model, 2, extra_cluster=FAST)
    config = load_config(cfg)
    prompt = encode(model, "One frame must not take a node down.")
    want = decode(model, reference(model, prompt, 16))
    with process_ring(cfg, ["n0", "n1"], tmp_path) as procs:
        procs["n0"].wait_log('"ring_up"', 60)
        layer = ring_layers(procs["n0"].log())[1][0]
        h = Tensor("bfloat16", (1, 1, hidden), bytes(2 * hidden))
        evil = Forward("evil", 0, (1,), True, h=h, layer=layer)
        loop = asyncio.new_event_loop()
        fuzz = Fuzzer(loop, {"n1": config.node("n1").port}, {"n1": "n0"}, patience=1.0)
        try:
            for bias in (vocab, 10**9, -vocab - 1):
                params = SamplingParams(logit_bias=((bias, 1.0),))
                step = dataclasses.replace(evil, rid=f"evil{bias}", params=params)
                with contextlib.suppress(AssertionError):  # no link: the node died, said below
                    fuzz.run(fuzz.send("n1", step))
                    fuzz.run(fuzz.settle("n1"))
        finally:
            fuzz.run(fuzz.close())
            loop.close()
        # The step runs after its pong came back: give a crash the time to show.
        deadline = time.monotonic() + 2.0
        while procs["n1"].proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs["n1"].proc.poll() is None, f"n1 died ({procs['n1'].proc.returncode})"
        refused = [line for line in procs["n1"].log().splitlines() if "step_refused" in line]
        assert len(refused) == 3 and all("logit bias" in line for line in refused), refused
        api = config.api_port("n0")
        assert complete(api, prompt, 16) == want
        assert procs["n1"].proc.poll() is None, procs["n1"].log()[-2000:]
