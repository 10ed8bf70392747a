"""Every model family, split into shards in this process, gives mlx-lm's own greedy tokens (and
first logits) on the whole model, token for token; and its tiny test model is one that a wrong
ring would not fool: its output varies, depends on the prompt, and changes when any one layer
is changed, or (in a mixture of experts) when either of two experts of a layer is zeroed.
Through rings of processes: test_ring_families.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlxring.model.families import MADE, Family, FamilyError, family_of
from mlxring.model.sharded import ShardModel, load_shard

from .ringutil import encode, loaded, reference, tiny_model

FAMILIES = sorted(MADE)
# 36 tokens: longer than the tiny models' sliding windows (8, 16) and DeepSeek V3.2's
# index_topk (8), so the windows and the token selection shape the output.
PROMPT = "The ring carries activations from one Mac to the next, layer after layer."
OTHER_PROMPT = "Once upon a time, in a land far away, there lived"
RING_TOKENS = 12  # compared with the oracle's, per split and prefill
GREEDY_TOKENS = 16  # the tiny model's own output, per change to it
# Shard boundaries (layer indices where a shard starts) on the tiny models' 7 layers: the
# whole model; three shards; one layer per shard at both ends. Between them they cut between
# layers of different kinds (dense | MoE at 1 in qwen3_moe, glm4_moe and the DeepSeeks;
# sliding | global, linear | full) and between two alike layers inside such a pattern.
CUTS: dict[str, tuple[int, ...]] = {
    "whole": (),
    "thirds": (3, 5),
    "ends": (1, 2, 6),
}
CHUNKS = (None, 5)  # None: the prompt prefilled whole
CHUNKED_SPLITS = ("thirds", "ends")  # the splits also run with the prompt in chunks
QUANTIZED = ["deepseek_v3", "gemma3_text", "gpt_oss", "llama", "qwen3_moe", "qwen3_next"]
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def shards_of(path: Path, cuts: Sequence[int]) -> list[ShardModel]:
    n = n_layers(path)
    bounds = [0, *cuts, n]
    return [load_shard(path, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def n_layers(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config["text_config"]["num_hidden_layers"])


def ring_greedy(
    shards: Sequence[ShardModel], prompt: Sequence[int], n: int, chunk: int | None, eos: set[int]
) -> tuple[list[int], mx.array]:
    """Greedy tokens through the shards in turn, step for step as mlx-lm's generate_step: all
    but the last prompt token prefilled (in chunks of `chunk`), then one token a step, the
    argmax of the log-probabilities; up to (not including) EOS, as `reference`. And the first
    step's logits."""
    caches = [s.make_cache() for s in shards]

    def forward(x: mx.array) -> mx.array:
        for shard, cache in zip(shards, caches, strict=True):
            x = shard(x, cache)
        return x

    head = list(prompt[:-1])
    step = chunk or max(1, len(head))
    for i in range(0, len(head), step):
        mx.eval(forward(mx.array([head[i : i + step]])))
    out: list[int] = []
    token = prompt[-1]
    first: mx.array | None = None
    for _ in range(n):
        logits = shards[-1].logits(forward(mx.array([[token]])))
        first = logits if first is None else first
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = cast(int, mx.argmax(logprobs, axis=-1).item())
        if token in eos:
            break
        out.append(token)
    assert first is not None
    return out, first


def first_logits(path: Path, prompt: Sequence[int], chunk: int | None) -> mx.array:
    """mlx-lm's logits for the token after `prompt`, on the whole model, reached as
    generate_step reaches them (all but the last token prefilled, then the last)."""
    model, _ = loaded(path)
    cache = make_prompt_cache(model)
    head = list(prompt[:-1])
    step = chunk or max(1, len(head))
    for i in range(0, len(head), step):
        mx.eval(model(mx.array([head[i : i + step]]), cache=cache))
    logits: mx.array = model(mx.array([list(prompt[-1:])]), cache=cache)[:, -1, :]
    return logits


def assert_splits_exact(path: Path, cuts: dict[str, tuple[int, ...]]) -> None:
    ids = encode(path, PROMPT)
    eos = set(loaded(path)[1].eos_token_ids)
    # The oracle prefills in the same chunks: mlx-lm's own result for that prefill.
    want = {c: reference(path, ids, RING_TOKENS, prefill_step=c or 512) for c in CHUNKS}
    # Greedy tokens do not show what leaves the argmax alone (soft-capping, a logit scale),
    # which sampling and log-probabilities see: the first step's logits must agree too (to
    # within rounding, which on some devices may differ with how a matmul is split).
    want_logits = {c: first_logits(path, ids, c) for c in CHUNKS}
    for name, cut in cuts.items():
        shards = shards_of(path, cut)
        for chunk in CHUNKS if name in CHUNKED_SPLITS else CHUNKS[:1]:
            got, logits = ring_greedy(shards, ids, RING_TOKENS, chunk, eos)
            where = f"split {name} {cut}, prefill chunk {chunk}"
            assert got == want[chunk], where
            assert mx.allclose(logits, want_logits[chunk], rtol=1e-2, atol=1e-2).item(), where


def expert_count(path: Path) -> int | None:
    config = json.loads((path / "config.json").read_text())
    for c in (config, config.get("text_config", {})):
        for key in EXPERT_COUNT_KEYS:
            if c.get(key):
                return int(c[key])
    return None


def expert_params(layer: nn.Module, n_experts: int) -> list[tuple[str, mx.array]]:
    """A layer's expert-stacked weights: leading dimension one per expert, in the experts'
    own module (`switch_mlp`, `experts`; not the router, whose rows score the experts)."""
    flat = cast(list[tuple[str, mx.array]], tree_flatten(layer.parameters()))
    return [
        (name, a)
        for name, a in flat
        if ("switch_mlp." in name or "experts." in name) and a.ndim > 1 and a.shape[0] == n_experts
    ]


def layer_profiles(path: Path) -> list[tuple[object, bool]]:
    """Each layer's mask kind and whether it is an MoE layer."""
    whole = load_shard(path, 0, n_layers(path))
    n_experts = expert_count(path) or 0
    return [
        (kind, bool(n_experts and expert_params(layer, n_experts)))
        for kind, layer in zip(whole.kinds, whole.layers, strict=True)
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_splits_give_mlx_lms_tokens(family: str) -> None:
    path = tiny_model(family)
    # The cuts fall between layers of different kinds and between alike ones wherever this
    # family's own pattern of layers has them.
    profiles = layer_profiles(path)
    cuts = {c for cut in CUTS.values() for c in cut}
    for unlike in (True, False):
        if any((a != b) is unlike for a, b in zip(profiles, profiles[1:], strict=False)):
            assert any((profiles[c - 1] != profiles[c]) is unlike for c in cuts), profiles
    assert_splits_exact(path, CUTS)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", QUANTIZED)
def test_quantized_splits_give_mlx_lms_tokens(family: str, bits: int) -> None:
    path = tiny_model(family, quantize=bits)
    whole = load_shard(path, 0, n_layers(path))
    quantized = [
        m
        for layer in whole.layers
        for _, m in layer.named_modules()
        if getattr(m, "bits", None) == bits
    ]
    assert quantized, f"no {bits}-bit module in {family}'s layers"
    assert_splits_exact(path, {"ends": CUTS["ends"]})


def greedy(model: nn.Module, ids: Sequence[int]) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(list(ids)), model, max_tokens=GREEDY_TOKENS)]


def differs(model: nn.Module, ids: Sequence[int], base: Sequence[int]) -> bool:
    """Whether greedy output now differs from `base` (stopping at the first difference)."""
    steps = generate_step(mx.array(list(ids)), model, max_tokens=len(base))
    return any(int(t) != b for (t, _), b in zip(steps, base, strict=True))


def params_of(module: nn.Module) -> dict[str, int]:
    """Which array each parameter is (its id)."""
    flat = cast(list[tuple[str, mx.array]], tree_flatten(module.parameters()))
    return {name: id(a) for name, a in flat}


@contextmanager
def changed(module: nn.Module, params: list[tuple[str, mx.array]]) -> Iterator[None]:
    """The module with `params` in place of its own, restored on exit."""
    saved = cast(list[tuple[str, mx.array]], tree_flatten(module.parameters()))
    module.update(tree_unflatten(params))
    try:
        yield
    finally:
        module.update(tree_unflatten(saved))


def halved(layer: nn.Module) -> list[tuple[str, mx.array]]:
    """Every weight of the layer halved: its norms' gains too, so that it shows in families
    that normalise each block's output (gemma, olmo2), where scaling a projection would not."""

    def halve(a: mx.array) -> mx.array:
        return a * 0.5 if mx.issubdtype(a.dtype, mx.floating) else a

    return cast(list[tuple[str, mx.array]], tree_flatten(tree_map(halve, layer.parameters())))


def without_expert(stacked: list[tuple[str, mx.array]], e: int) -> list[tuple[str, mx.array]]:
    return [(name, a.at[e].multiply(0)) for name, a in stacked]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_would_catch_a_wrong_ring(family: str) -> None:
    path = tiny_model(family)
    fam: Family = MADE[family]
    # A model of its own: the layers are changed in place, and `loaded`'s copy is shared.
    model, tokenizer = mlx_lm.load(str(path))[:2]
    ids = list(tokenizer.encode(PROMPT))
    base = greedy(model, ids)
    assert len(set(base)) >= GREEDY_TOKENS // 2, f"greedy output is degenerate: {base}"
    assert greedy(model, tokenizer.encode(OTHER_PROMPT)) != base, "output ignores the prompt"

    layers = fam.inner(model).layers
    before = params_of(model)
    for i, layer in enumerate(layers):
        with changed(layer, halved(layer)):
            assert differs(model, ids, base), f"layer {i} halved leaves the output as it was"
    assert params_of(model) == before, "the layers are not back as they were"

    if not fam.moe:
        return
    n_experts = expert_count(path)
    assert n_experts, "an MoE family's config names no expert count"
    moe_layers = [(i, expert_params(layer, n_experts)) for i, layer in enumerate(layers)]
    moe_layers = [(i, stacked) for i, stacked in moe_layers if stacked]
    assert moe_layers, f"no expert-stacked weights with a leading dimension of {n_experts}"
    seen: dict[int, list[int]] = {}
    for i, stacked in moe_layers:
        seen[i] = []
        for e in range(n_experts):
            with changed(layers[i], without_expert(stacked, e)):
                if differs(model, ids, base):
                    seen[i].append(e)
            if len(seen[i]) == 2:
                return
    pytest.fail(f"no MoE layer has two experts that change the output when zeroed: {seen}")


def test_unsupported_model_type_is_refused() -> None:
    with pytest.raises(FamilyError) as e:
        family_of({"model_type": "gpt2"})
    assert "'gpt2'" in str(e.value) and "allow_unverified" in str(e.value)
    assert isinstance(family_of({"model_type": "gpt2"}, allow_unverified=True), Family)
