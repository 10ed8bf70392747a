"""mlxring.model.make: random-weight models that mlx-lm loads and generates from unchanged."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from mlxring.model import make as makemodel
from mlxring.model.make import FAMILIES, PRESETS, make_model

PROMPTS = ("Hello there", "The network is down again.", "How do I cook rice?")


def load(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """mlx_lm.load, typed (its return type is a union over return_config)."""
    return cast(tuple[Any, Any, dict[str, Any]], mlx_lm.load(str(path), return_config=True))


def weights_of(path: Path) -> dict[str, mx.array]:
    return cast(dict[str, mx.array], mx.load(str(path / "model.safetensors")))


def greedy_tokens(model: nn.Module, tokenizer: Any, prompt: str, n: int = 40) -> list[int]:
    """Token ids from mlx-lm's own generation loop with its default (greedy) sampler."""
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n)]


@pytest.mark.parametrize("quantize", [None, 4, 8])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_loads_and_generates_varied_text(
    tmp_path: Path, family: str, tie: bool, quantize: int | None
) -> None:
    out = make_model(tmp_path / "m", family=family, tie=tie, quantize=quantize)
    assert out == tmp_path / "m"
    for name in (
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name

    model, tokenizer, config = load(out)
    tiny = PRESETS["tiny"]
    assert config["model_type"] == family
    assert config["num_hidden_layers"] == tiny.num_hidden_layers == len(model.layers)
    assert config["tie_word_embeddings"] is tie
    assert config["vocab_size"] == tiny.tokenizer_vocab == len(tokenizer.vocab)
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"

    weights = weights_of(out)
    assert ("lm_head.weight" in weights) is not tie
    if quantize is None:
        assert "quantization" not in config
        assert all(w.dtype == mx.bfloat16 for w in weights.values())
        assert weights["model.norm.weight"].dtype == mx.bfloat16
    else:
        assert config["quantization"] == {"group_size": 64, "bits": quantize, "mode": "affine"}
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
        assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)
        assert model.layers[0].mlp.down_proj.bits == quantize

    outputs = [greedy_tokens(model, tokenizer, p) for p in PROMPTS]
    for prompt, tokens in zip(PROMPTS, outputs, strict=True):
        assert len(tokens) == 40, f"{prompt!r} stopped early: {tokens}"
        assert len(set(tokens)) >= 20, f"{prompt!r} -> only {len(set(tokens))} distinct"
    assert len({tuple(t) for t in outputs}) == len(PROMPTS), "output ignores the prompt"


def test_mlx_lm_generate_and_mistral(tmp_path: Path) -> None:
    out = make_model(tmp_path / "m", family="mistral", layers=3)
    model, tokenizer, _ = load(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"
    assert len(model.layers) == 3
    text = mlx_lm.generate(model, tokenizer, "Hello there", max_tokens=16)
    assert isinstance(text, str) and text


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    def weights(name: str, seed: int, quantize: int | None = None) -> bytes:
        out = make_model(tmp_path / name, family="qwen2", seed=seed, quantize=quantize)
        return (out / "model.safetensors").read_bytes()

    assert weights("a", 0) == weights("b", 0)
    assert weights("c", 1) != weights("a", 0)
    assert weights("d", 7, quantize=4) == weights("e", 7, quantize=4)
    # The tokenizer is trained afresh (cache cleared) and must come out identical.
    first = (tmp_path / "a" / "tokenizer.json").read_text()
    makemodel.tokenizer_json.cache_clear()
    make_model(tmp_path / "f")
    assert (tmp_path / "f" / "tokenizer.json").read_text() == first


def test_overrides_layers_tie_scale(tmp_path: Path) -> None:
    out = make_model(tmp_path / "m", family="qwen3", layers=5, tie=False, scale=2.5)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["tie_word_embeddings"] is False
    assert config["head_dim"] == 16
    weights = weights_of(out)
    assert "lm_head.weight" in weights
    assert "model.layers.4.self_attn.q_proj.weight" in weights
    assert "model.layers.5.self_attn.q_proj.weight" not in weights
    # Rewriting a directory replaces, rather than mixes with, what was there.
    make_model(out, family="llama", layers=2)
    model, _, _ = load(out)
    assert len(model.layers) == 2


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family"):
        make_model(tmp_path / "m", family="gpt2")
    with pytest.raises(ValueError, match="preset"):
        make_model(tmp_path / "m", preset="huge")
    with pytest.raises(ValueError, match="quantize"):
        make_model(tmp_path / "m", quantize=3)


def test_chat_template_and_round_trip(tmp_path: Path) -> None:
    _, tokenizer, _ = load(make_model(tmp_path / "m"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I cook rice?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHow do I cook rice?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == tokenizer.encode(text)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # special tokens stay single tokens
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")

    for s in (
        "Hello, world!  Two  spaces.\n\nNew paragraph\tand a tab.",
        "héllo wörld, ünïcode ✓ 日本語 🙂",
        " leading space and trailing ",
        "don't stop , . ? !",
    ):
        assert tokenizer.decode(tokenizer.encode(s)) == s
    # Trained on English: common words are single tokens.
    assert len(tokenizer.encode("the network")) <= 3


def test_cli_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="mlxring make-model")
    makemodel.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "--family",
            "llama",
            "--layers",
            "3",
            "--no-tie",
            "--quantize",
            "4",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    assert args.tie is False and args.preset == "tiny" and args.scale is None
    assert makemodel.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(out)
    assert "params" in lines[1] and "bytes" in lines[1] and "4-bit" in lines[1]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["quantization"]["bits"] == 4
    assert parser.parse_args(["--out", "x"]).tie is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "3", "--out", "x"])


def test_presets_and_families() -> None:
    assert {"qwen3", "qwen2", "llama"} <= set(FAMILIES)
    assert {"tiny", "small", "qwen3-1.7b"} <= set(PRESETS)
    tiny = PRESETS["tiny"]
    assert tiny.num_hidden_layers % 2 and tiny.num_hidden_layers % 3
    assert tiny.tokenizer_vocab % 64 == 0
    real = PRESETS["qwen3-1.7b"]
    assert (real.hidden_size, real.num_hidden_layers, real.intermediate_size) == (2048, 28, 6144)
    assert (real.num_attention_heads, real.num_key_value_heads, real.head_dim) == (16, 8, 128)
    assert real.vocab_size == 151936 and real.tie is True
