"""DeepSeek V3 / R1, V3.2 and Kimi K2 / K2.5: MLA attention and mixture-of-experts after the
first dense layers. Their attention adds the mask as an array (mlx-lm's deepseek_v3.py,
deepseek_v32.py, kimi_k25.py); V3.2's caches are pairs (attention, indexer)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxring.model.families.base import Family, Kind, Shape

ARRAY = Kind(array=True)


class DeepseekV3(Family):
    model_types: tuple[str, ...] = ("deepseek_v3", "kimi_k2")
    architecture = "DeepseekV3ForCausalLM"
    covers = "DeepSeek V3 / V3.1 / R1, Kimi K2"
    moe = True

    def kind(self, model: nn.Module, i: int) -> Kind:
        return ARRAY

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "moe_intermediate_size": shape.intermediate_size // 2,
            "n_shared_experts": 1,
            "n_routed_experts": 8,
            "routed_scaling_factor": 2.5,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 8,
            "v_head_dim": shape.head_dim,
            "qk_nope_head_dim": shape.head_dim,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "n_group": 2,
            "topk_group": 1,
            "num_experts_per_tok": 2,
            "moe_layer_freq": 1,
            "first_k_dense_replace": 1,  # a split can cut between a dense and an MoE layer
            "attention_bias": False,
        }


class DeepseekV32(DeepseekV3):
    model_types: tuple[str, ...] = ("deepseek_v32",)
    architecture = "DeepseekV32ForCausalLM"
    covers = "DeepSeek V3.2 (sparse attention)"

    def mask(self, kind: Kind, h: mx.array, cache: Any) -> Any:
        return super().mask(kind, h, cache[0] if cache is not None else None)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return super().config(base, shape) | {
            "index_head_dim": 16,
            "index_n_heads": 2,
            "index_topk": 8,  # fewer than the test prompts' tokens, so the selection matters
        }


class KimiK25(DeepseekV3):
    """Kimi K2.5: DeepSeek V3's language model inside a multimodal wrapper."""

    model_types: tuple[str, ...] = ("kimi_k25",)
    architecture = "KimiK25ForConditionalGeneration"
    covers = "Kimi K2.5 (text)"

    def inner(self, model: nn.Module) -> nn.Module:
        return model.language_model.model

    def head_module(self, model: nn.Module) -> nn.Module:
        return model.language_model.lm_head

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        return model.language_model.lm_head(x)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        # Its language model always has its own head.
        text = super().config(base, shape) | {"model_type": "kimi_k2", "tie_word_embeddings": False}
        return self.wrapper(text)
