"""A timeline of where a request's time goes across the ring's processes (benchmark aid).

With this folder first on PYTHONPATH and MLXRING_TRACE=1, every Python process started (the
bench and each node it spawns) wraps a few mlxring functions at start-up and appends one line
per event, `unix-time event detail`, to /tmp/trace/<pid>.txt: a prompt chunk's compute on each
shard, its encode and send, the frame's arrival and decode on the next node, the bytes' way to
the device (`wire.to_array`; on CUDA a large tensor's `load.load_array`), and each request's
first token at the head. Small messages (decode steps) are left out unless they carry more than
one token. `timeline.py` beside this file prints one request's events from all processes in
time order:

    rm -rf /tmp/trace
    MLXRING_TRACE=1 PYTHONPATH=benchmarks/trace:. python3 -m mlxring bench --preset qwen3-1.7b \
        --nodes 3 --prompt-tokens 2048 --gen-tokens 16 --concurrency 1 --prefill-chunk 2048
    python3 benchmarks/trace/timeline.py /tmp/trace 2    # the bench's second prefill request

Wrapping at import is for measuring only; nothing in mlxring depends on it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

BIG = 100_000  # bytes: frames of prompt chunks, not of decode steps


def _install() -> None:
    import mlxring.backends.cuda.load as load
    import mlxring.engine.lifecycle as engine
    import mlxring.protocol.codec as wire
    import mlxring.shard.actor as shard
    import mlxring.transport.conn as conn

    os.makedirs("/tmp/trace", exist_ok=True)
    out = open(f"/tmp/trace/{os.getpid()}.txt", "a", buffering=1)  # noqa: SIM115 - whole life
    out.write(f"# argv {' '.join(sys.argv)}\n")

    def event(name: str, detail: str = "") -> None:
        out.write(f"{time.time():.6f} {name} {detail}\n")

    def describe(msg: Any) -> str | None:
        h = getattr(msg, "h", None)
        n = 0 if h is None else (h.nbytes if hasattr(h, "nbytes") else len(h.data))
        if n < BIG and len(getattr(msg, "tokens", ())) <= 1:
            return None
        rid, seq, toks = getattr(msg, "rid", ""), getattr(msg, "seq", ""), len(msg.tokens)
        return f"{type(msg).__name__} rid={rid} seq={seq} toks={toks} bytes={n}"

    def wrap(owner: Any, name: str, label: str, detail: Callable[..., str | None]) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def traced(*args: Any, **kwargs: Any) -> Any:
            d = detail(*args, **kwargs)
            if d is None:
                return inner(*args, **kwargs)
            event(label + "+", d)
            try:
                return inner(*args, **kwargs)
            finally:
                event(label + "-", d)

        setattr(owner, name, traced)

    def big_bytes(b: Any) -> str | None:
        return f"n={len(b)}" if len(b) > BIG else None

    def step(self: Any, fn: Any, arg: Any) -> str | None:
        return None if isinstance(arg, list) else describe(arg) or f"rid={arg.rid} seq={arg.seq}"

    wrap(wire, "encode", "encode", describe)
    wrap(conn.FrameConnection, "send", "send", lambda self, msg: describe(msg))
    wrap(wire, "decode", "decode", big_bytes)
    wrap(wire, "to_array", "to_array", lambda t: big_bytes(t.data))
    wrap(load, "load_array", "to_array", lambda t: big_bytes(t.data))  # large tensors on CUDA
    wrap(shard.ShardActor, "_timed", "compute", step)

    received = conn.FrameConnection.buffer_updated

    def buffer_updated(self: Any, nbytes: int) -> None:
        was = self._big
        received(self, nbytes)
        if was is None and self._big is not None:
            event("big_frame_start", f"n={len(self._big)}")

    conn.FrameConnection.buffer_updated = buffer_updated  # type: ignore[method-assign]

    generate = engine.Engine.generate

    async def traced_generate(
        self: Any, prompt: Any, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        event("generate+", f"prompt={len(prompt)}")
        first = True
        async for t in generate(self, prompt, *args, **kwargs):
            if first:
                event("first_token", f"prompt={len(prompt)}")
                first = False
            yield t

    engine.Engine.generate = traced_generate  # type: ignore[method-assign]


if os.environ.get("MLXRING_TRACE") == "1":
    _install()
