"""Mixture-of-experts families whose forward pass is mlx-lm's llama one (the defaults of
`Family`): mixtral, glm4_moe and minimax."""

from __future__ import annotations

from typing import Any

from mlxring.model.families.base import Family, Shape


class Mixtral(Family):
    model_types: tuple[str, ...] = ("mixtral",)
    architecture = "MixtralForCausalLM"
    covers = "Mixtral 8x7B / 8x22B"
    moe = True

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {"num_local_experts": 8, "num_experts_per_tok": 2}


class Glm4Moe(Family):
    model_types: tuple[str, ...] = ("glm4_moe",)
    architecture = "Glm4MoeForCausalLM"
    covers = "GLM-4.5 / 4.6 / 4.7, GLM-4.5-Air"
    moe = True

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "moe_intermediate_size": shape.intermediate_size // 2,
            "norm_topk_prob": True,
            "n_group": 1,
            "topk_group": 1,
            "n_shared_experts": 1,
            "n_routed_experts": 8,
            "routed_scaling_factor": 1.0,
            "num_experts_per_tok": 2,
            "first_k_dense_replace": 1,
            "use_qk_norm": True,
            "attention_bias": False,
            "partial_rotary_factor": 0.5,
        }


class MiniMax(Family):
    model_types: tuple[str, ...] = ("minimax", "minimax_m2")
    architecture = "MiniMaxM2ForCausalLM"
    covers = "MiniMax-M2 / M2.1"
    moe = True

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 0,
            "rotary_dim": shape.head_dim // 2,
            "use_qk_norm": True,
            "scoring_func": "sigmoid",
        }
