"""Load only the weights one shard needs, and run that shard's part of the forward pass.

The mlx-lm model object is built lazily (`load_model(lazy=True)`): every parameter is an
unevaluated array backed by the safetensors file, so evaluating only the shard's own modules
reads only their bytes. Any mlx-lm decoder whose inner model is `embed_tokens -> layers ->
norm` (llama, mistral, qwen2, qwen3, ...) works; the per-layer call is the family's own block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ModelError(Exception):
    """A model that cannot be sharded (missing files, unsupported structure)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the planner needs to know about a model without loading any weights."""

    n_layers: int
    layer_bytes: int  # the largest layer's bytes
    embed_bytes: int
    head_bytes: int  # final norm + lm head (the embedding again when tied)
    model_type: str


def model_info(config: dict[str, Any], sizes: dict[str, int]) -> ModelInfo:
    """Per-layer and end bytes from tensor sizes (safetensors headers; no tensor data)."""
    n_layers = int(config.get("num_hidden_layers") or config["text_config"]["num_hidden_layers"])
    if not sizes:
        raise ModelError("the model has no weights")
    per_layer = [0] * n_layers
    embed = head = 0
    for key, n in sizes.items():
        m = _LAYER_KEY.search(key)
        if m is not None:
            layer = int(m.group(1))
            if layer < n_layers:
                per_layer[layer] += n
        elif "embed_tokens" in key:
            embed += n
        else:
            head += n
    if config.get("tie_word_embeddings", False) or not any("lm_head" in k for k in sizes):
        head += embed
    return ModelInfo(n_layers, max(per_layer), embed, head, str(config.get("model_type")))


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> bytes, read from a safetensors file's header only."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {
        k: v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    }


class ShardModel:
    """Layers [start, end) of a model, plus the embedding on the first shard and norm + head
    on the last."""

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        start: int,
        end: int,
        overlap_every: int | None = None,
    ) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
            raise ModelError(
                f"model type {config.get('model_type')!r} has no model.embed_tokens / "
                "model.layers / model.norm; it cannot be split into a ring"
            )
        n_layers = len(inner.layers)
        if not 0 <= start < end <= n_layers:
            raise ModelError(f"layer range [{start}, {end}) is outside the model's {n_layers}")
        self._model = model
        self.config = config
        self.start, self.end, self.n_layers = start, end, n_layers
        self.is_first = start == 0
        self.is_last = end == n_layers
        self.layers: list[nn.Module] = list(inner.layers[start:end])
        self.embed: nn.Module | None = inner.embed_tokens if self.is_first else None
        self.norm: nn.Module | None = inner.norm if self.is_last else None
        self.head: Callable[[mx.array], mx.array] | None = None
        if self.is_last:
            lm_head = getattr(model, "lm_head", None)
            self.head = lm_head if lm_head is not None else inner.embed_tokens.as_linear
            self._head_module = lm_head if lm_head is not None else inner.embed_tokens
        self.sliding_window: int | None = getattr(inner, "sliding_window", None)
        # Decode steps hand the device work every this many layers (0: once, at the end). By
        # default three times a step: each hand-off costs ~0.15 ms on CUDA, and one per layer
        # was 10% slower there than one per 3-4 layers (benchmarks/decode_profile.py).
        self.overlap_every = (
            overlap_every if overlap_every is not None else -(-len(self.layers) // 3)
        )

    def modules(self) -> list[nn.Module]:
        """The modules whose parameters this shard holds."""
        mods = list(self.layers)
        if self.embed is not None:
            mods.append(self.embed)
        if self.is_last:
            assert self.norm is not None
            mods.append(self.norm)
            if self._head_module is not self.embed:
                mods.append(self._head_module)
        return mods

    def parameters(self) -> list[mx.array]:
        # tree_flatten's stubs allow str leaves; parameters are always (name, array) pairs.
        flat = [
            cast(list[tuple[str, mx.array]], tree_flatten(m.parameters())) for m in self.modules()
        ]
        return [a for leaves in flat for _, a in leaves]

    def parameter_bytes(self) -> int:
        return sum(a.nbytes for a in self.parameters())

    def make_cache(self) -> list[Any]:
        """Fresh KV caches for this shard's layers, of the kinds the model itself would use."""
        return make_prompt_cache(self._model)[self.start : self.end]

    def __call__(self, x: mx.array, caches: list[Any], defer: bool = False) -> mx.array:
        """Token ids [B, L] on the first shard, hidden states [B, L, D] elsewhere. With
        `defer`, nothing is evaluated (the input is not there yet: see `ahead`)."""
        h = self.embed(x) if self.embed is not None else x
        # A decode step cannot overlap with the next one as in mlx-lm (the next token comes
        # around the ring first), so overlap within the step: the device runs the first layers
        # while Python builds the next ones.
        every = self.overlap_every if h.shape[1] == 1 and not defer else 0
        masks: dict[int | None, Any] = {}
        for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
            window = self.sliding_window if getattr(layer, "use_sliding", False) else None
            if window not in masks:
                masks[window] = create_attention_mask(h, cache, window_size=window)
            h = layer(h, masks[window], cache)
            if every and (i + 1) % every == 0:
                mx.async_eval(h)
        return h

    def warm_up(self) -> None:
        """Run once, on throwaway caches, the kinds of pass a ring makes: a short prompt chunk,
        a decode step, a decode pass of two rows, and greedy sampling on the last shard. MLX
        builds some kernels on first use; on CUDA a quantized model's took 40-130 s on an H200.
        Built while the shard loads (on the compute thread), they do not hold up a request's
        first steps, which run on the event loop's thread with every frame and heartbeat."""
        inner = self._model.model
        tokens = mx.zeros((1, 1), dtype=mx.int32)
        width = inner.embed_tokens(tokens)  # lazy: only its shape and dtype are read

        def x(rows: int, n: int) -> mx.array:
            if self.embed is not None:
                return mx.zeros((rows, n), dtype=mx.int32)
            return mx.zeros((rows, n, width.shape[-1]), dtype=width.dtype)

        rows = [self.make_cache() for _ in range(2)]
        outs = []
        for caches in rows:
            outs.append(self(x(1, 4), caches))
            outs.append(self(x(1, 1), caches))
        if all(hasattr(c, "merge") for c in rows[0]):
            merged = [a.merge([a, b]) for a, b in zip(*rows, strict=True)]
            outs.append(self(x(2, 1), merged))
        if self.is_last:
            logits = [self.logits(h) for h in outs[-2:]]
            outs += [
                mx.argmax(g - mx.logsumexp(g, axis=-1, keepdims=True), axis=-1) for g in logits
            ]
        mx.eval(outs)

    def logits(self, h: mx.array) -> mx.array:
        """Logits of the last position, [B, vocab] (the last shard only)."""
        assert self.norm is not None and self.head is not None
        return self.head(self.norm(h[:, -1:, :]))[:, -1, :]


def load_shard(path: Path, start: int, end: int) -> ShardModel:
    """Build the model lazily and evaluate only this shard's parameters."""
    try:
        model, config = load_model(path, lazy=True, strict=False)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model from {path}: {e}") from None
    shard = ShardModel(model, config, start, end)
    mx.eval(shard.parameters())
    return shard
