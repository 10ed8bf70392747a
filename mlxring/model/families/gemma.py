"""Gemma 2, 3 and 4 (text): the embedding is scaled by sqrt(hidden_size), layers alternate
sliding-window and global attention in a fixed pattern (by the layer's index in the whole
model), and the logits are soft-capped (mlx-lm's gemma2.py, gemma3_text.py, gemma4_text.py)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxring.model.families.base import FULL, Family, FamilyError, Kind, Shape


def _softcap(x: mx.array, cap: float | None) -> mx.array:
    return x if cap is None else mx.tanh(x / cap) * cap


class Gemma2(Family):
    model_types: tuple[str, ...] = ("gemma2",)
    architecture = "Gemma2ForCausalLM"
    covers = "Gemma 2 (2B / 9B / 27B)"
    tie = True
    # Its attention groups query heads in five dimensions, where a batch's (B, 1, L, S) mask
    # does not broadcast (mlx-lm's own batched generation fails the same way): concurrent
    # requests take turns instead.
    batches = False

    def embed(self, model: nn.Module, tokens: mx.array) -> mx.array:
        inner = self.inner(model)
        return inner.embed_tokens(tokens) * (inner.args.hidden_size**0.5)

    def kind(self, model: nn.Module, i: int) -> Kind:
        return Kind(array=True)  # its attention adds the mask to soft-capped scores

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        return _softcap(self.inner(model).embed_tokens.as_linear(x), model.final_logit_softcapping)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "attn_logit_softcapping": 50.0,
            # Near the tiny model's largest logits, so that the cap bends them: at Gemma's 30
            # it would leave them almost as they are, and a head without it would pass.
            "final_logit_softcapping": 10.0,
            # Not head_dim, as in Gemma 2 27B (hidden_size / heads there), so that a pass
            # scaling queries by head_dim differs; it also softens the tiny model's near
            # one-hot attention, which varies its greedy output more.
            "query_pre_attn_scalar": shape.hidden_size,
        }


class Gemma3Text(Family):
    model_types: tuple[str, ...] = ("gemma3_text",)
    architecture = "Gemma3ForCausalLM"
    covers = "Gemma 3 1B, and text-only conversions of Gemma 3 4B-27B"
    tie = True

    def embed(self, model: nn.Module, tokens: mx.array) -> mx.array:
        inner = self.inner(model)
        h = inner.embed_tokens(tokens)
        return h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)

    def kind(self, model: nn.Module, i: int) -> Kind:
        inner = self.inner(model)
        pattern = inner.sliding_window_pattern
        if i % pattern == pattern - 1:
            return FULL
        return Kind(window=inner.window_size)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        return base | {
            "query_pre_attn_scalar": shape.head_dim,
            "rope_local_base_freq": 10000.0,
            # Shorter than the test prompts, so the window matters; at 8 the tiny model's
            # greedy output falls into repeating one token more often.
            "sliding_window": 16,
            "sliding_window_pattern": 3,
        }


class Gemma4Text(Family):
    """Gemma 4 without per-layer input embeddings and without layers that reuse an earlier
    layer's keys and values: those need state from layers on other machines in every step."""

    model_types: tuple[str, ...] = ("gemma4_text",)
    architecture = "Gemma4ForCausalLM"
    covers = "Gemma 4 text decoders without per-layer embeddings or shared KV layers"
    tie = True
    # The made model has 26B-A4B's structure (a dense MLP beside the experts in every layer,
    # keys doubling as values), which runs every module the dense 31B has too.
    moe = True

    def check(self, model: nn.Module) -> None:
        super().check(model)
        args = self.inner(model).config
        if args.hidden_size_per_layer_input:
            raise FamilyError(
                "per-layer input embeddings (Gemma 4 E2B / E4B) feed every layer from the "
                "first; the ring does not carry them"
            )
        if args.num_kv_shared_layers:
            raise FamilyError(
                "layers that reuse earlier layers' keys and values (num_kv_shared_layers) "
                "cannot run apart from them"
            )

    def embed(self, model: nn.Module, tokens: mx.array) -> mx.array:
        inner = self.inner(model)
        return inner.embed_tokens(tokens) * inner.embed_scale

    def kind(self, model: nn.Module, i: int) -> Kind:
        inner = self.inner(model)
        if inner.layers[i].layer_type == "full_attention":
            return FULL
        return Kind(window=inner.window_size)

    def layer(self, layer: nn.Module, h: mx.array, mask: Any, cache: Any) -> mx.array:
        out: mx.array = layer(h, mask, cache)[0]  # (h, keys and values, offset)
        return out

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        return _softcap(super().project(model, x), model.final_logit_softcapping)

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        n = base["num_hidden_layers"]
        # Gemma 4 takes its rope from rope_parameters (mlx-lm's defaults); transformers, which
        # reads this config for the tokenizer, warns of a rope_scaling key.
        base = {k: v for k, v in base.items() if k != "rope_scaling"}
        return base | {
            "global_head_dim": shape.head_dim * 2,
            "num_global_key_value_heads": shape.num_key_value_heads,
            "num_kv_shared_layers": 0,
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": base["vocab_size"],
            "sliding_window": 8,  # shorter than the test prompts, so the window matters
            # Every third layer global, counted back from the last, which Gemma 4 (and
            # transformers, which reads this config for the tokenizer) wants global.
            "layer_types": [
                "full_attention" if (n - 1 - i) % 3 == 0 else "sliding_attention" for i in range(n)
            ],
            "final_logit_softcapping": 5.0,  # near the largest logits, as in Gemma2.config
            "use_double_wide_mlp": False,
            "enable_moe_block": True,
            "num_experts": 8,
            "top_k_experts": 2,
            "moe_intermediate_size": shape.intermediate_size // 2,
            "attention_k_eq_v": True,
        }
