"""Load only the weights one shard needs, and run that shard's part of the forward pass.

The mlx-lm model object is built lazily (`load_model(lazy=True)`): every parameter is an
unevaluated array backed by the safetensors file, so evaluating only the shard's own modules
reads only their bytes. What a model does before its first layer, for each layer and after its
last is its family's (`mlxring.model.families`): the layers themselves are mlx-lm's own modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.utils import _get_classes, load_model

from mlxring.model.checkpoint import LAYER_KEY, ModelError, is_head, is_unused
from mlxring.model.families import Family, FamilyError, Kind, family_of, model_type


@dataclass(frozen=True)
class ModelInfo:
    """What the planner needs to know about a model without loading any weights."""

    n_layers: int
    layer_bytes: int  # the largest layer's bytes
    embed_bytes: int
    head_bytes: int  # final norm + lm head (the embedding again when tied)
    model_type: str
    # Each layer's bytes: dense layers before mixture-of-experts ones are much smaller.
    layer_sizes: tuple[int, ...] = ()


def config_value(config: dict[str, Any], key: str) -> Any:
    """A model config's `key`, else its text model's (multimodal wrappers keep the text model's
    settings under text_config); None when neither has it."""
    text = config.get("text_config")
    return config.get(key) or (text.get(key) if isinstance(text, dict) else None)


def context_length(config: dict[str, Any]) -> int | None:
    """How many positions the model takes (its config's, under any of the names families give
    it; None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = config_value(config, key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def model_info(config: dict[str, Any], sizes: dict[str, int]) -> ModelInfo:
    """Per-layer and end bytes from tensor sizes (safetensors headers; no tensor data)."""
    text = config.get("text_config") or {}
    n_layers = int(config.get("num_hidden_layers") or text["num_hidden_layers"])
    if not sizes:
        raise ModelError("the model has no weights")
    per_layer = [0] * n_layers
    embed = head = 0
    for key, n in sizes.items():
        if is_unused(key):
            continue
        m = LAYER_KEY.search(key)
        if m is not None:
            layer = int(m.group(1))
            if layer < n_layers:
                per_layer[layer] += n
        elif "embed_tokens" in key:
            embed += n
        else:
            head += n
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if tied or not any(is_head(k) for k in sizes):
        head += embed
    return ModelInfo(
        n_layers, max(per_layer), embed, head, str(config.get("model_type")), tuple(per_layer)
    )


def trims_anywhere(caches: Iterable[Any]) -> bool:
    """Whether every cache can drop its last positions at any length, as speculation's
    rejected drafts need: plain and quantized KV caches (a sliding window's cannot once it
    wrapped, a linear-attention state never can)."""
    return all(type(c) in (KVCache, QuantizedKVCache) for c in caches)


class ShardModel:
    """Layers [start, end) of a model, plus what its family does before the first layer (on
    the first shard) and after the last (on the last shard)."""

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        start: int,
        end: int,
        overlap_every: int | None = None,
        family: Family | None = None,
    ) -> None:
        self.family = family if family is not None else family_of(config)
        _check_structure(self.family, model, config)
        inner = self.family.inner(model)
        n_layers = len(inner.layers)
        if not 0 <= start < end <= n_layers:
            raise ModelError(f"layer range [{start}, {end}) is outside the model's {n_layers}")
        self._model = model
        self.config = config
        self.start, self.end, self.n_layers = start, end, n_layers
        self.is_first = start == 0
        self.is_last = end == n_layers
        self.layers: list[nn.Module] = list(inner.layers[start:end])
        # The mask kind of each of our layers, by its index in the whole model.
        self.kinds: list[Kind] = [self.family.kind(model, i) for i in range(start, end)]
        # Decode steps hand the device work every this many layers (0: once, at the end). By
        # default three times a step: each hand-off costs ~0.15 ms on CUDA, and one per layer
        # is slower there than one per 3-4 layers (benchmarks/decode_profile.py).
        self.overlap_every = (
            overlap_every if overlap_every is not None else -(-len(self.layers) // 3)
        )

    def modules(self) -> list[nn.Module]:
        """The modules whose parameters this shard holds."""
        mods = list(self.layers)
        ends = self.family.first_modules(self._model) if self.is_first else []
        if self.is_last:
            ends += self.family.last_modules(self._model)
        for m in ends:  # a tied head is the embedding again
            if not any(m is held for held in mods):
                mods.append(m)
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
        """Fresh caches for this shard's layers, of the kinds the model itself would use."""
        return self.family.make_cache(self._model)[self.start : self.end]

    def whole_cache(self) -> list[Any]:
        """Fresh caches for every layer of the model, not only this shard's: what every shard
        decides alike from."""
        return self.family.make_cache(self._model)

    def trims_every_layer(self) -> bool:
        """Whether every layer's cache of the whole model can drop its last positions."""
        return trims_anywhere(self.whole_cache())

    def __call__(self, x: mx.array, caches: list[Any], defer: bool = False) -> mx.array:
        """Token ids [B, L] on the first shard, hidden states [B, L, D] elsewhere. With
        `defer`, nothing is evaluated (the input is not there yet: see `ahead`)."""
        family = self.family
        h = family.embed(self._model, x) if self.is_first else x
        # A decode step cannot overlap with the next one as in mlx-lm (the next token comes
        # around the ring first), so overlap within the step: the device runs the first layers
        # while Python builds the next ones.
        every = self.overlap_every if h.shape[1] == 1 and not defer else 0
        masks: dict[Kind, Any] = {}
        for i, (layer, kind, cache) in enumerate(zip(self.layers, self.kinds, caches, strict=True)):
            if kind not in masks:
                masks[kind] = family.mask(kind, h, cache)
            h = family.layer(layer, h, masks[kind], cache)
            if every and (i + 1) % every == 0:
                mx.async_eval(h)
        return h

    def warm_up(self) -> None:
        """Run once, on throwaway caches, the kinds of pass a ring makes: a short prompt chunk,
        a decode step, a decode pass of two rows, and greedy sampling on the last shard. MLX
        builds some kernels on first use, which on CUDA takes minutes for a quantized model
        (benchmarks/RESULTS.md, "First use of a quantized model's kernels"). Built while the
        shard loads (on the compute thread), they do not hold up a request's first steps, which
        run on the event loop's thread with every frame and heartbeat."""
        tokens = mx.zeros((1, 1), dtype=mx.int32)
        width = self.family.embed(self._model, tokens)  # lazy: only its shape and dtype are read

        def x(rows: int, n: int) -> mx.array:
            if self.is_first:
                return mx.zeros((rows, n), dtype=mx.int32)
            return mx.zeros((rows, n, width.shape[-1]), dtype=width.dtype)

        rows = [self.make_cache() for _ in range(2)]
        outs = []
        for caches in rows:
            outs.append(self(x(1, 4), caches))
            outs.append(self(x(1, 1), caches))
        if self.family.batches and all(hasattr(c, "merge") for c in rows[0]):
            merged = [a.merge([a, b]) for a, b in zip(*rows, strict=True)]
            outs.append(self(x(2, 1), merged))
        if self.is_last:
            logits = [self.logits(h) for h in outs[-2:]]
            outs += [
                mx.argmax(g - mx.logsumexp(g, axis=-1, keepdims=True), axis=-1) for g in logits
            ]
        mx.eval(outs)

    def logits(self, h: mx.array, positions: int = 1) -> mx.array:
        """Logits of the last position, [B, vocab], or of the last `positions` > 1,
        [B, positions, vocab] (the last shard only)."""
        assert self.is_last
        x = self.family.inner(self._model).norm(h[:, -positions:, :])
        out = self.family.project(self._model, x)
        return out[:, -1, :] if positions == 1 else out


def build_model(config: dict[str, Any]) -> nn.Module:
    """The mlx-lm model a config.json describes, built without weights (its parameters stay
    lazy: nothing is computed or read)."""
    model_class, args_class = _get_classes(config)
    model: nn.Module = model_class(args_class.from_dict(config))
    return model


def _family(config: dict[str, Any], allow_unverified: bool) -> Family:
    try:
        return family_of(config, allow_unverified)
    except FamilyError as e:
        raise ModelError(str(e)) from None


def _check_structure(family: Family, model: nn.Module, config: dict[str, Any]) -> None:
    try:
        family.check(model)
    except FamilyError as e:
        raise ModelError(f"a {model_type(config)!r} model that cannot be split: {e}") from None


def check_model(config: dict[str, Any], allow_unverified: bool = False) -> Family:
    """The family that runs this config.json's model, after building the model (no weights)
    and checking it has what the family's forward pass uses. Anything else is one ModelError
    line: an unverified type, a config the family's code cannot build, a structure the family
    does not expect."""
    family = _family(config, allow_unverified)
    try:
        model = build_model(config)
    except Exception as e:  # noqa: BLE001 - whatever the family's code raises is one line
        raise ModelError(
            f"config.json does not describe a {model_type(config)!r} model mlx-lm can build: "
            f"{type(e).__name__}: {e}"
        ) from None
    _check_structure(family, model, config)
    return family


def load_shard(path: Path, start: int, end: int, allow_unverified: bool = False) -> ShardModel:
    """Build the model lazily and evaluate only this shard's parameters."""
    try:
        model, config = load_model(path, lazy=True, strict=False)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model from {path}: {e}") from None
    shard = ShardModel(model, config, start, end, family=_family(config, allow_unverified))
    try:
        missing = _not_loaded(model, config, path, shard)
        if missing:
            raise ModelError(
                f"{path} has no weights for {len(missing)} tensor(s) of layers [{start}, {end}) "
                f"(such as {', '.join(missing[:3])}): not a {model_type(config)!r} checkpoint "
                "in mlx-lm's layout"
            )
        mx.eval(shard.parameters())
    except (OSError, RuntimeError) as e:  # MLX reading a file changed or broken since start
        raise ModelError(f"cannot load layers [{start}, {end}) from {path}: {e}") from None
    return shard


def _not_loaded(
    model: nn.Module, config: dict[str, Any], path: Path, shard: ShardModel
) -> list[str]:
    """The shard's parameters that no checkpoint tensor filled. Loading is not strict (a node
    has only its own layers' files), so these would keep their random initial values and the
    ring would answer wrong. The family's own sanitize maps checkpoint names first, as in
    mlx-lm's loading, on a fresh model (some sanitize methods change the model they run on).
    Nothing is read but the files' headers: the arrays stay lazy."""
    weights: dict[str, mx.array] = {}
    for f in sorted(path.glob("model*.safetensors")):
        weights.update(cast(dict[str, mx.array], mx.load(str(f))))
    fresh = build_model(config)
    if hasattr(fresh, "sanitize"):
        weights = fresh.sanitize(weights)
    flat = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    names = {id(a): n for n, a in flat}
    return sorted(names[id(a)] for a in shard.parameters() if names[id(a)] not in weights)
