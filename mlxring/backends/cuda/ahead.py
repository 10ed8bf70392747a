"""A decode step launched before its input arrives, held on the device by a gate (`gate`).

On MLX's CUDA backend a step built on a placeholder (`backends.placeholder`) still leaves MLX's
encoding of it on the ring's path. Launched at once behind a gate, it does not: the gate lets it
run once the input is in. A launched step runs on the request's own caches (shadows would be
copied: the originals are still referenced when it runs); if it is not used, `take_back` returns
the caches' offsets, and what it wrote past them the next step overwrites. A convoy's next pass
(several requests whose merged caches stay together, `shard.convoys`) is launched the same way
when it holds every request of the shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import structlog
from mlx_lm.models.cache import BatchKVCache

from mlxring.backends.base import Built, Offload, Parts, Rows
from mlxring.backends.cuda import gate, load
from mlxring.backends.placeholder import Placeholders, Slot, fill, forward, next_slot
from mlxring.model.sharded import ShardModel
from mlxring.protocol.messages import rows_of

log = structlog.get_logger()


@dataclass(frozen=True)
class Hold:
    """What a launched step needs beside its placeholder."""

    slot: Slot
    flag: gate.Flag  # lets the launched step run
    marks: tuple[Any, ...]  # where each cache stood before the step (see `take_back`)

    @property
    def rows(self) -> Rows:
        return self.slot.rows


@dataclass(frozen=True)
class Launched:
    hold: Hold
    caches: list[Any]  # the request's own (or the convoy's merged) caches, which it advances
    h: mx.array  # the launched output
    status: mx.array  # the gate's status (gate.OPEN once it let the input through)

    @property
    def rows(self) -> Rows:
        return self.hold.rows


@dataclass(frozen=True)
class Launch:
    """A step whose building and launch run on the compute thread."""

    hold: Hold
    caches: list[Any]
    task: asyncio.Future[Launched]

    @property
    def rows(self) -> Rows:
        return self.hold.rows


def hold(slot: Slot, caches: Sequence[Any]) -> Hold:
    return Hold(slot, gate.new_flag(), tuple(map(_mark, caches)))


def _mark(c: Any) -> Any:
    # A batch cache counts its steps in `_idx` beside its per-row offsets (an immutable array,
    # so keeping it keeps its value).
    return (c.offset, c.state[4]) if isinstance(c, BatchKVCache) else c.offset


def launch(model: ShardModel, caches: Sequence[Any], held: Hold) -> Launched:
    """The step on `held`'s placeholder, behind its gate, launched."""
    inp, status = gate.gate(held.slot.buf, held.flag)
    updated = list(caches)
    h = forward(model, inp, updated, held.slot.dtype)
    # Arrays belong to the stream of the thread that made them: everything the launch leaves in
    # the caches (a batch cache's new offsets are not inputs of `h`) is scheduled with it, so
    # the loop's thread may use them.
    mx.async_eval(h, status, [c.state for c in updated if isinstance(c, BatchKVCache)])
    return Launched(held, updated, h, status)


def take_back(caches: Sequence[Any], marks: Sequence[Any]) -> None:
    """Undo a launched step's advance of the request's caches (cancelled, failed, or its gate
    gave up)."""
    for c, mark in zip(caches, marks, strict=True):
        if isinstance(c, BatchKVCache):
            keys, values, _, left_padding, _ = c.state
            offset, idx = mark
            c.state = (keys, values, offset, left_padding, idx)
        else:
            c.offset = mark


class Gated(Placeholders):
    """Every next decode step of the shard's requests (one, or one convoy) launched behind a
    gate (MLX on CUDA, in a process of one shard: a waiting gate holds the compute thread's
    stream, which another shard of the process could wait on for its own input)."""

    launches = True

    def __init__(self) -> None:
        super().__init__(load.to_array)

    def build(
        self, model: ShardModel, parts: Parts, caches: list[Any], offload: Offload
    ) -> Built | None:
        slot = next_slot(model, parts, caches)
        if slot is None:
            return None
        if len(rows_of(parts)) > 1:
            # A pass leaves its merged caches' new offsets unevaluated on this thread's stream;
            # the launch runs on the compute thread's.
            mx.eval([c.state for c in caches])
        held = hold(slot, caches)
        # Launching encodes the whole step (milliseconds on CUDA): on the compute thread, so
        # that this one keeps reading frames and can open the gate.
        task = asyncio.ensure_future(offload(lambda: launch(model, caches, held)))
        return Launch(held, list(caches), task)

    async def land(self, built: Built, parts: Parts) -> Built | None:
        """Open a launched step's gate with its input in, or give it back when `parts` do not
        fit it. Then wait for the launch, so that no other MLX work overlaps it; opening first
        means a launch that waits for the device cannot stall."""
        assert isinstance(built, Launch)
        use = fill(built.hold.slot, parts)
        built.hold.flag.open(gate.OPEN if use else gate.CANCEL)
        launched: Launched | None
        try:
            launched = await built.task
        except Exception as e:  # noqa: BLE001 - the step is computed as if never built
            log.warning("launch_failed", error=f"{type(e).__name__}: {e}")
            launched = None
        if launched is None or not use:
            take_back(built.caches, built.hold.marks)
            return None
        return launched

    async def give_back(self, built: Built) -> None:
        await self.land(built, [])

    def output(self, built: Built) -> tuple[mx.array, list[Any]] | None:
        """None when the gate gave up before the input came (the ring stalled): what the step
        computed is noise, written past the offsets that are taken back."""
        assert isinstance(built, Launched)
        mx.eval(built.h, built.status)
        if built.status.item() == gate.OPEN:
            return built.h, built.caches
        log.warning("gate_gave_up", rows=list(built.rows))
        take_back(built.caches, built.hold.marks)
        return None
