"""Dense families whose forward pass is mlx-lm's llama one (the defaults of `Family`), or that
add only an embedding multiplier or a logit scale: phi3, olmo2, granite and cohere."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxring.model.families.base import Family, Shape


class Phi3(Family):
    model_types: tuple[str, ...] = ("phi3",)
    architecture = "Phi3ForCausalLM"
    covers = "Phi-3 / Phi-3.5 mini and medium, Phi-4, Phi-4-mini"


class Olmo2(Family):
    model_types: tuple[str, ...] = ("olmo2",)
    architecture = "Olmo2ForCausalLM"
    covers = "OLMo 2 (7B / 13B / 32B)"


class Granite(Family):
    """Granite scales the embedding and divides the logits (mlx-lm's granite.py)."""

    model_types: tuple[str, ...] = ("granite",)
    architecture = "GraniteForCausalLM"
    covers = "Granite 3.x (dense)"
    tie = True

    def embed(self, model: nn.Module, tokens: mx.array) -> mx.array:
        inner = self.inner(model)
        return inner.embed_tokens(tokens) * inner.embedding_multiplier

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        return super().project(model, x) / model.logits_scaling

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "logits_scaling": 4.0,
            "attention_multiplier": shape.head_dim**-0.5,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_bias": False,
            "mlp_bias": False,
        }


class Cohere(Family):
    """Cohere's head is always the embedding, with the logits scaled (mlx-lm's cohere.py)."""

    model_types: tuple[str, ...] = ("cohere",)
    architecture = "CohereForCausalLM"
    covers = "Command R / R+ (cohere)"
    tie = True

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        inner = self.inner(model)
        return inner.embed_tokens.as_linear(x) * inner.args.logit_scale

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        out = base | {"layer_norm_eps": base["rms_norm_eps"], "logit_scale": 0.5}
        out["use_qk_norm"] = True
        return out
