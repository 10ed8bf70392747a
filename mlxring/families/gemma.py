"""Gemma 2, 3 and 4 (text): the embedding is scaled by sqrt(hidden_size), layers alternate
sliding-window and global attention in a fixed pattern (by the layer's index in the whole
model), and the logits are soft-capped (mlx-lm's gemma2.py, gemma3_text.py, gemma4_text.py)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxring.families.base import FULL, Family, FamilyError, Kind, Shape


def _softcap(x: mx.array, cap: float | None) -> mx.array:
    return x if cap is None else mx.tanh(x / cap) * cap


class Gemma2(Family):
    model_types: tuple[str, ...] = ("gemma2",)
    architecture = "Gemma2ForCausalLM"
    covers = "Gemma 2 (2B / 9B / 27B)"
    tie = True

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
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": shape.head_dim,
        }


class Gemma3Text(Family):
    model_types: tuple[str, ...] = ("gemma3_text",)
    architecture = "Gemma3ForCausalLM"
    covers = "Gemma 3 (1B text; the text part of 4B / 12B / 27B)"
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
            "sliding_window": 8,  # shorter than the test prompts, so the window matters
            "sliding_window_pattern": 3,
        }


class Gemma4Text(Family):
    """Gemma 4 without per-layer input embeddings and without layers that reuse an earlier
    layer's keys and values: those need state from layers on other machines in every step."""

    model_types: tuple[str, ...] = ("gemma4_text",)
    architecture = "Gemma4ForCausalLM"
    covers = "Gemma 4 (26B-A4B, 31B; not E2B / E4B)"
    tie = True

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
        return base | {
            "global_head_dim": shape.head_dim * 2,
            "num_global_key_value_heads": shape.num_key_value_heads,
            "num_kv_shared_layers": 0,
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": base["vocab_size"],
            "sliding_window": 8,
            "sliding_window_pattern": 3,
            "final_logit_softcapping": 30.0,
            "use_double_wide_mlp": False,
        }
