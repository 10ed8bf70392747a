"""llama (with llama3 rope scaling), mistral and ministral3: mlx-lm's llama forward pass, the
defaults of `Family`; ministral3's layers also take an attention scale of the position."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.ministral3 import _get_llama_4_attn_scale

from mlxring.model.families.base import Family, Shape


class Llama(Family):
    model_types: tuple[str, ...] = ("llama",)
    architecture = "LlamaForCausalLM"
    covers = "Llama 2 / 3.x, SmolLM2, and every fine-tune of them"

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {"attention_bias": False, "mlp_bias": False}


class Llama3(Llama):
    """llama with Llama 3.1's rope scaling (a made model only: the model type is llama)."""

    model_types: tuple[str, ...] = ()
    covers = "Llama 3.1 / 3.2 / 3.3 (llama3 rope scaling)"

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return super().config(base, shape) | {
            "model_type": "llama",
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        }


class Mistral(Llama):
    model_types: tuple[str, ...] = ("mistral",)
    architecture = "MistralForCausalLM"
    covers = "Mistral 7B, Mistral Small / Nemo (text)"


class Ministral3(Family):
    model_types: tuple[str, ...] = ("ministral3",)
    architecture = "Ministral3ForCausalLM"
    covers = "Ministral 3 (3B / 8B / 14B)"

    def layer(self, layer: nn.Module, h: mx.array, mask: Any, cache: Any) -> mx.array:
        # The scale depends on the positions of this step's tokens, which start at the cache's
        # length before the layer adds them (every layer's cache has the same length).
        rope = layer.args.rope_parameters
        offset = cache.offset if cache is not None else 0
        scale = _get_llama_4_attn_scale(
            h.shape[1],
            offset,
            rope["llama_4_scaling_beta"],
            rope["original_max_position_embeddings"],
        ).astype(h.dtype)
        return layer(h, scale, mask, cache=cache)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": base["rope_theta"],
                "factor": 4.0,
                # The attention scale steps up every this many positions: within the test
                # prompts, so that a step computing it at the wrong position differs.
                "original_max_position_embeddings": 16,
                "llama_4_scaling_beta": 0.1,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        }
