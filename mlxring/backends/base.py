"""The seam between a shard and the accelerator: what a shard asks of the backend chosen for its
process (`backends.pick`), and the handle of a step built before its input came.

A shard runs every step when its input arrives unless the backend builds the next one ahead:
then the shard lands the built step when the input comes (or gives it back when something else
comes first), and the step's output is read from it instead of computing it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import mlx.core as mx

from mlxring.model.sharded import ShardModel
from mlxring.protocol.messages import Forward, ForwardBatch, Tensor

Parts = Sequence[Forward | ForwardBatch]
Rows = tuple[tuple[str, int], ...]  # (request, step) of each row, in the caches' order
# Runs a function off the event loop's thread, on the process's compute thread (`Compute.run`).
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]


class Built(Protocol):
    """A step built before its input came, for these rows."""

    @property
    def rows(self) -> Rows: ...


class Backend(Protocol):
    launches: bool  # whether built steps are launched on the device before their input comes
    to_array: Callable[[Tensor], mx.array]  # received tensor bytes as an array on this device

    def build(
        self, model: ShardModel, parts: Parts, caches: list[Any], offload: Offload
    ) -> Built | None:
        """The next decode step of the rows of `parts` (every request of the shard, on
        `caches`), built now (what takes long, through `offload`); None when this backend does
        not build it."""

    async def land(self, built: Built, parts: Parts) -> Built | None:
        """`built` with the input of `parts` (its rows' steps) written in; None when it does
        not take that input (it is given back, and the step is computed on arrival)."""

    async def give_back(self, built: Built) -> None:
        """Let go of `built`: something other than its input came first."""

    def output(self, built: Built) -> tuple[mx.array, list[Any]] | None:
        """A landed step's output and the caches it updated; None when it cannot be used
        (then it is computed again)."""
