"""How one mlx-lm model family runs split into shards: the part of its forward pass before the
first layer, the call of each layer (with the mask that layer attends with, chosen by its index
in the whole model), and the part after the last. The defaults are mlx-lm's llama:
``embed_tokens -> layer(h, mask, cache) -> norm -> lm_head`` (or the tied embedding); a family
module overrides only what its own mlx-lm ``Model.__call__`` does differently.

A family also says how `mlxring make-model` writes a tiny random-weight model of it (`config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import make_prompt_cache


class FamilyError(Exception):
    """A model whose structure is not what its family's code expects (one line, no traceback)."""


@dataclass(frozen=True)
class Kind:
    """The mask a layer attends with. Layers of one kind share one mask per forward pass, made
    from the first of their caches in the shard (mlx-lm makes it from the first such cache of
    the whole model; every cache of a kind has the same length)."""

    window: int | None = None  # a sliding-window layer's window
    linear: bool = False  # a linear-attention (SSM) layer: its mask covers padding only
    array: bool = False  # the family's attention wants an array, never the "causal" shortcut


FULL = Kind()


@dataclass(frozen=True)
class Shape:
    """The tiny-model shape make-model starts from (a preset), for `Family.config`."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int


class Family:
    """mlx-lm's llama: what every family does unless its module says otherwise."""

    #: model_type values (as config.json spells them) that this family runs.
    model_types: tuple[str, ...] = ()
    #: the Hugging Face architecture name make-model writes into config.json.
    architecture: str = ""
    #: the real models it covers (for the README table and `mlxring make-model --help`).
    covers: str = ""
    #: mixture-of-experts: make-model stores float32, as MLX's CPU gather matmul wants.
    moe: bool = False
    #: tie the head to the embedding in a made model unless the preset says otherwise.
    tie: bool = False
    #: concurrent requests' decode steps may run as one pass over merged caches.
    batches: bool = True

    # --- structure --------------------------------------------------------------------------

    def inner(self, model: nn.Module) -> nn.Module:
        """The module holding ``embed_tokens``, ``layers`` and ``norm``."""
        return model.model

    def head_module(self, model: nn.Module) -> nn.Module:
        """The module whose weights the head uses (the embedding when tied)."""
        lm_head = getattr(model, "lm_head", None)
        return lm_head if lm_head is not None else self.inner(model).embed_tokens

    def check(self, model: nn.Module) -> None:
        """Raise FamilyError when the built model lacks what `embed`, `layer` and `project`
        use."""
        try:
            inner = self.inner(model)
        except AttributeError as e:
            raise FamilyError(f"no inner model ({e})") from None
        missing = [a for a in ("embed_tokens", "layers", "norm") if not hasattr(inner, a)]
        if missing:
            raise FamilyError(f"its inner model has no {', '.join(missing)}")
        try:
            self.head_module(model)
        except AttributeError as e:
            raise FamilyError(f"no output head ({e})") from None

    def first_modules(self, model: nn.Module) -> list[nn.Module]:
        """What the first shard holds besides its layers."""
        return [self.inner(model).embed_tokens]

    def last_modules(self, model: nn.Module) -> list[nn.Module]:
        """What the last shard holds besides its layers."""
        return [self.inner(model).norm, self.head_module(model)]

    def make_cache(self, model: nn.Module) -> list[Any]:
        """Fresh caches for every layer of the whole model, of the kinds the model uses."""
        return make_prompt_cache(model)

    # --- forward ----------------------------------------------------------------------------

    def embed(self, model: nn.Module, tokens: mx.array) -> mx.array:
        """Token ids [B, L] -> the first layer's input [B, L, D]."""
        return self.inner(model).embed_tokens(tokens)

    def kind(self, model: nn.Module, i: int) -> Kind:
        """The mask layer ``i`` (of the whole model) attends with."""
        inner = self.inner(model)
        if getattr(inner.layers[i], "use_sliding", False):
            return Kind(window=inner.sliding_window)
        return FULL

    def mask(self, kind: Kind, h: mx.array, cache: Any) -> Any:
        if kind.linear:
            return create_ssm_mask(h, cache)
        return create_attention_mask(h, cache, window_size=kind.window, return_array=kind.array)

    def layer(self, layer: nn.Module, h: mx.array, mask: Any, cache: Any) -> mx.array:
        return layer(h, mask, cache)

    def project(self, model: nn.Module, x: mx.array) -> mx.array:
        """The final norm's output -> logits (the head, and any soft-capping or scaling)."""
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None:
            return lm_head(x)
        return self.inner(model).embed_tokens.as_linear(x)

    # --- make-model -------------------------------------------------------------------------

    def config(self, base: dict[str, Any], shape: Shape) -> dict[str, Any]:
        """config.json for a made model: the llama-style ``base`` plus the family's own keys."""
        return base

    def wrapper(self, text: dict[str, Any]) -> dict[str, Any]:
        """config.json of a multimodal wrapper (this family's type) around the text model's
        config `text`; the layer count and tying are repeated at the top, as real ones do."""
        return {
            "model_type": self.model_types[0],
            "architectures": [self.architecture],
            "text_config": text,
            "num_hidden_layers": text["num_hidden_layers"],
            "tie_word_embeddings": text["tie_word_embeddings"],
            "eos_token_id": text.get("eos_token_id"),
        }
