"""Qwen3-Next and Qwen3.5 (dense and MoE): hybrid models whose linear-attention (gated delta
net) layers keep a fixed-size state instead of keys and values, with full attention every few
layers. A linear layer's mask covers padding only (mlx-lm's qwen3_next.py, qwen3_5.py)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxring.model.families.base import FULL, Family, Kind, Shape

LINEAR = Kind(linear=True)
# A made model's linear-attention shapes, with full attention every third layer.
HYBRID: dict[str, Any] = {
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 3,
}


def _experts(shape: Shape) -> dict[str, Any]:
    """A made model's mixture of experts, with a shared expert."""
    return {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": shape.intermediate_size // 2,
        "moe_intermediate_size": shape.intermediate_size // 2,
        "norm_topk_prob": True,
    }


class Qwen3Next(Family):
    model_types: tuple[str, ...] = ("qwen3_next",)
    architecture = "Qwen3NextForCausalLM"
    covers = "Qwen3-Next-80B-A3B"
    moe = True

    def kind(self, model: nn.Module, i: int) -> Kind:
        return LINEAR if self.inner(model).layers[i].is_linear else FULL

    def layer(self, layer: nn.Module, h: mx.array, mask: Any, cache: Any) -> mx.array:
        return layer(h, mask=mask, cache=cache)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return (
            base | HYBRID | _experts(shape) | {"mlp_only_layers": [], "partial_rotary_factor": 0.25}
        )


class Qwen35(Qwen3Next):
    """Qwen3.5: the same hybrid layers inside a multimodal wrapper (``language_model``)."""

    model_types: tuple[str, ...] = ("qwen3_5",)
    architecture = "Qwen3_5ForConditionalGeneration"
    covers = "Qwen3.5 dense (text)"
    moe = False

    def inner(self, model: nn.Module) -> nn.Module:
        return model.language_model.model

    def head_module(self, model: nn.Module) -> nn.Module:
        lm = model.language_model
        return lm.model.embed_tokens if lm.args.tie_word_embeddings else lm.lm_head

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        lm = model.language_model
        if lm.args.tie_word_embeddings:
            return lm.model.embed_tokens.as_linear(x)
        return lm.lm_head(x)

    def text_config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return (
            base
            | HYBRID
            | {
                "rope_parameters": {
                    "type": "default",
                    "mrope_section": [2, 1, 1],
                    "rope_theta": base["rope_theta"],
                    "partial_rotary_factor": 0.25,
                },
            }
        )

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return self.wrapper(self.text_config(base, shape))


class Qwen35Moe(Qwen35):
    model_types: tuple[str, ...] = ("qwen3_5_moe",)
    architecture = "Qwen3_5MoeForConditionalGeneration"
    covers = "Qwen3.5 MoE (e.g. 35B-A3B, 397B-A17B; text)"
    moe = True

    def text_config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return super().text_config(base, shape) | _experts(shape)
