"""llama4_text: the head is named ``output``, and a tied head multiplies by the embedding's
weight directly (mlx-lm's llama4_text.py)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxring.model.families.base import Family, Shape


class Llama4Text(Family):
    model_types: tuple[str, ...] = ("llama4_text",)
    architecture = "Llama4ForCausalLM"
    covers = "Llama 4 text-only decoders"

    def head_module(self, model: nn.Module) -> nn.Module:
        if model.tie_word_embeddings:
            return self.inner(model).embed_tokens
        return model.output

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        if model.tie_word_embeddings:
            return x @ self.inner(model).embed_tokens.weight.T
        return model.output(x)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        n = base["num_hidden_layers"]
        return base | {
            "intermediate_size_mlp": shape.intermediate_size,
            "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(n)],
            "use_qk_norm": True,
        }
