"""The plain backend: every step runs when its input comes, nothing is built ahead. What a shard
does where MLX does not let bytes written into a built graph's input reach it
(`placeholder.placeholders_work`); the other backends build on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlxring.backends.base import Built, Offload, Parts
from mlxring.model.sharded import ShardModel
from mlxring.protocol import codec as wire
from mlxring.protocol.messages import Tensor


class Plain:
    launches = False

    def __init__(self, to_array: Callable[[Tensor], mx.array] = wire.to_array) -> None:
        self.to_array = to_array

    def build(
        self, model: ShardModel, parts: Parts, caches: list[Any], offload: Offload
    ) -> Built | None:
        return None

    async def land(self, built: Built, parts: Parts) -> Built | None:
        return None

    async def give_back(self, built: Built) -> None:
        return None

    def output(self, built: Built) -> tuple[mx.array, list[Any]] | None:
        return None
