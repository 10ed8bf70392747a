"""gpt-oss: each layer's attention kind (full or sliding window) is listed in the config's
``layer_types`` by its index in the whole model (mlx-lm's gpt_oss.py)."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from mlxring.model.families.base import FULL, Family, Kind, Shape


class GptOss(Family):
    model_types: tuple[str, ...] = ("gpt_oss",)
    architecture = "GptOssForCausalLM"
    covers = "gpt-oss-20b, gpt-oss-120b"
    moe = True

    def kind(self, model: nn.Module, i: int) -> Kind:
        inner = self.inner(model)
        if inner.layer_types[i] == "full_attention":
            return FULL
        return Kind(window=inner.window_size)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        n = base["num_hidden_layers"]
        return base | {
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "sliding_window": 8,  # shorter than the test prompts, so the window matters
            "layer_types": [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
            ],
        }
