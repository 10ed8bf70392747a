"""qwen2, qwen3 and qwen3_moe: mlx-lm's llama forward pass (the defaults of `Family`)."""

from __future__ import annotations

from typing import Any

from mlxring.model.families.base import Family, Shape


class Qwen2(Family):
    model_types: tuple[str, ...] = ("qwen2",)
    architecture = "Qwen2ForCausalLM"
    covers = "Qwen2 / Qwen2.5 (incl. Coder), QwQ-32B, DeepSeek-R1 distills of Qwen"
    tie = True

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        # qwen2 derives head_dim from hidden_size / heads.
        return {k: v for k, v in base.items() if k != "head_dim"}


class Qwen3(Family):
    model_types: tuple[str, ...] = ("qwen3",)
    architecture = "Qwen3ForCausalLM"
    covers = "Qwen3 0.6B-32B (dense)"
    tie = True


class Qwen3Moe(Family):
    model_types: tuple[str, ...] = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"
    covers = "Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B / 480B"
    moe = True

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [0],  # one dense layer, so a split can cut between the kinds
            "moe_intermediate_size": shape.intermediate_size // 2,
            "norm_topk_prob": True,
        }
