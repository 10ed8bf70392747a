"""Random-weight models in mlx-lm's exact on-disk format, for tests, demos and benchmarks.

`make_model` writes a directory that `mlx_lm.load` reads unchanged: ``config.json``,
``model.safetensors`` + ``model.safetensors.index.json`` (written by mlx-lm's own
``save_model`` / ``save_config``; ``shards`` splits the weights along layer boundaries into
``model-0000k-of-0000n.safetensors``, as a large checkpoint on the hub is), and a real
byte-level BPE tokenizer trained on the bundled ``data/corpus.txt`` with a ChatML chat template.

Weights are drawn from numpy's ``default_rng`` (one stream per tensor, keyed by the seed and
the tensor's name), so the same seed gives byte-identical files on every machine and the
global ``mx.random`` state is never consulted. A random transformer at the usual init scale
collapses to repeating one token; the weights here are deliberately larger (``scale``) so
greedy decoding wanders through the vocabulary and depends on the prompt, which is what
ring/engine tests need to tell one token stream from another.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import quantize_model, save_config, save_model

from mlxring.model.checkpoint import LAYER_KEY
from mlxring.model.families import MADE, Family, Shape
from mlxring.model.sharded import build_model

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Preset",
    "add_arguments",
    "make_model",
    "run",
]

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
GROUP_SIZE = 64

# ChatML, as Qwen uses it. Content may be a string or a list of OpenAI-style text parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


#: Chat formats a made model's tokenizer may have: "chatml" (the default, text only) or
#: "qwen3" (Qwen3's own template with tools and thinking, and its marker tokens, so that
#: mlx-lm finds thinking and the json_tools parser in it as in a real Qwen3).
CHATS = ("chatml", "qwen3")
QWEN3_MARKERS: tuple[str, ...] = ("<tool_call>", "</tool_call>", "<tool_response>")
QWEN3_MARKERS += ("</tool_response>", "<think>", "</think>")


#: make-model's families: every family the ring runs (mlxring.model.families), by name.
FAMILIES = MADE


@dataclass(frozen=True)
class Preset:
    """Model shapes. ``vocab_size=None`` means: exactly the tokenizer's size."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tokenizer_vocab: int
    vocab_size: int | None
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie: bool | None  # None: the family's default
    scale: float  # default weight gain, see _init_tensor


PRESETS: dict[str, Preset] = {
    # A few hundred KB; 7 layers so no 2/3/4-way split of the ring is even.
    "tiny": Preset(
        hidden_size=64,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        tokenizer_vocab=512,
        vocab_size=None,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie=None,
        scale=3.0,
    ),
    # Tens of MB: big enough that compute shows up in CPU benchmarks, small enough to run in
    # seconds.
    "small": Preset(
        hidden_size=768,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=2048,
        tokenizer_vocab=2048,
        vocab_size=None,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie=None,
        scale=3.0,
    ),
    # The real Qwen3-1.7B shapes; the tokenizer is ours, so ids >= 2048 are never produced
    # by encoding but the embedding and head keep the true size.
    "qwen3-1.7b": Preset(
        hidden_size=2048,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=6144,
        tokenizer_vocab=2048,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie=True,
        scale=3.0,
    ),
}


# ---------------------------------------------------------------------------------------------
# Tokenizer


@functools.lru_cache(maxsize=8)
def tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE on the bundled corpus; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("mlxring").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet means any text encodes, with no unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    return tok.to_str(pretty=True)


def _tokenizer_size(tok_json: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_json).get_vocab_size(with_added_tokens=True)


def _with_markers(tok_json: str, markers: tuple[str, ...]) -> str:
    """The tokenizer with `markers` added as whole tokens that are not special (as Qwen3's:
    decoding keeps them in the text)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tok_json)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers])
    return cast(str, tok.to_str(pretty=True))


def _chat_template(chat: str) -> str:
    if chat == "qwen3":
        data = resources.files("mlxring").joinpath("data/qwen3_chat_template.jinja")
        return data.read_text(encoding="utf-8")
    return CHAT_TEMPLATE


def _tokenizer_config(max_length: int, chat: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_prefix_space": False,
        # Keeps decode(encode(s)) == s; the default would eat spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": _chat_template(chat),
    }


# ---------------------------------------------------------------------------------------------
# Config and weights


def _model_config(
    name: str, family: Family, preset: Preset, layers: int, tie: bool, vocab: int, eos_id: int
) -> dict[str, Any]:
    p = preset
    base: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_types[0] if family.model_types else name,
        "hidden_size": p.hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim,
        "intermediate_size": p.intermediate_size,
        "vocab_size": vocab,
        "max_position_embeddings": p.max_position_embeddings,
        "rope_theta": p.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": p.rms_norm_eps,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "torch_dtype": "float32" if family.moe else "bfloat16",
        "bos_token_id": None,
        "eos_token_id": eos_id,
    }
    shape = Shape(
        hidden_size=p.hidden_size,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.head_dim,
        intermediate_size=p.intermediate_size,
    )
    return family.config(base, shape)


def _normal(
    rng: np.random.Generator, shape: tuple[int, ...], std: float, dtype: mx.Dtype
) -> mx.array:
    """N(0, std) in `dtype` (bf16, or f32 for MoE), drawn in row blocks so that a 150k x 2k
    bf16 embedding never exists as f32."""
    rows = shape[0] if shape else 1
    row_size = math.prod(shape[1:])
    block = max(1, (1 << 24) // max(1, row_size))
    parts: list[mx.array] = []
    for start in range(0, rows, block):
        n = min(block, rows - start)
        draw = rng.standard_normal((n, *shape[1:]), dtype=np.float32)
        draw *= np.float32(std)
        part = mx.array(draw).astype(dtype)
        mx.eval(part)  # drop the f32 copy now rather than at save time
        parts.append(part)
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
    return out.reshape(shape)


def _init_tensor(
    name: str,
    fresh: mx.array,
    seed: int,
    scale: float,
    n_special: int,
    n_tokens: int,
    dtype: mx.Dtype,
    embed_std: float = 1.0,
) -> mx.array:
    """One parameter, from its own stream so names, not visiting order, fix the values.

    Matrices are N(0, scale / sqrt(fan_in)): with scale > 1 each block writes more into the
    residual stream than the embedding holds, so the output depends on the whole context
    instead of echoing the last token (at scale <= 1 a tied model just repeats its input).
    Layer norm scales are ones, and other vectors that a fresh mlx-lm model holds constant
    (Gemma 4's layer scalars, expert-score biases) keep that value. The embedding is
    N(0, embed_std): 1 / the family's own embedding gain, so every family's first layer gets
    an input of RMS 1. Gemma multiplies the embedding by sqrt(hidden_size) (its trained rows
    are that much smaller); rows of std 1 would outweigh all that its layers add through
    their output norms, and the tied head would echo the input token.
    """
    shape = tuple(fresh.shape)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        # qwen3 normalises q and k per head, which would cap attention logits near 1 and blur
        # attention into an average; a gain of `scale` makes it as sharp as in qwen2/llama.
        return mx.full(shape, scale, dtype=dtype)
    if name.endswith("post_feedforward_layernorm.weight"):
        # Families that normalise each block's output (gemma, olmo2) add no more than this
        # gain per block, whatever `scale` gives its matrices; at 1 the embedding outweighs it.
        return mx.full(shape, scale, dtype=dtype)
    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=dtype)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith(".bias"):
        return _normal(rng, shape, 0.1 * scale, dtype)
    if fresh.ndim <= 1 and mx.all(fresh == fresh.reshape(-1)[0]).item():
        return fresh.astype(dtype)
    if not name.endswith(("embed_tokens.weight", "lm_head.weight")) and name != "output.weight":
        return _normal(rng, shape, scale / math.sqrt(shape[-1]), dtype)
    # Shrink the rows of the special tokens, so a random head rarely picks <|im_end|> and cuts
    # generation short, and of ids past the tokenizer (qwen3-1.7b's 151936-row head over our
    # small tokenizer), so generated ids almost always decode to text.
    w = _normal(rng, shape, embed_std if name.endswith("embed_tokens.weight") else 1.0, dtype)
    ids = mx.arange(shape[0])[:, None]
    rows = (ids < n_special) | (ids >= n_tokens)
    w = mx.where(rows, w * 0.25, w).astype(dtype)
    mx.eval(w)
    return w


def _embedding_gain(family: Family, model: nn.Module) -> float:
    """How much the family scales the embedding before the first layer (Gemma: by
    sqrt(hidden_size); most families: not at all)."""
    ids = mx.zeros((1, 1), dtype=mx.int32)
    raw = family.inner(model).embed_tokens(ids).astype(mx.float32)
    scaled = family.embed(model, ids).astype(mx.float32)
    return cast(float, mx.sqrt(mx.sum(scaled * scaled) / mx.sum(raw * raw)).item())


def make_model(
    out: Path,
    family: str = "qwen3",
    preset: str = "tiny",
    layers: int | None = None,
    tie: bool | None = None,
    quantize: int | None = None,
    seed: int = 0,
    scale: float | None = None,
    shards: int = 1,
    chat: str = "chatml",
) -> Path:
    """Write a random-weight mlx-lm model directory at ``out`` and return ``out``.

    ``layers``, ``tie`` and ``scale`` override the preset; ``quantize`` (4 or 8) stores the
    linear and embedding weights affine-quantized with group size 64, as ``mlx_lm.convert -q``;
    ``shards`` > 1 writes that many weight files, split along layer boundaries; ``chat`` picks
    the tokenizer's chat format (CHATS).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if quantize not in (None, 4, 8):
        raise ValueError(f"quantize must be 4 or 8, not {quantize!r}")
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be >= 1, not {layers}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    if chat not in CHATS:
        raise ValueError(f"unknown chat format {chat!r}; choose from {', '.join(CHATS)}")
    fam, pre = FAMILIES[family], PRESETS[preset]
    n_layers = pre.num_hidden_layers if layers is None else layers
    tied = tie if tie is not None else (pre.tie if pre.tie is not None else fam.tie)
    gain = pre.scale if scale is None else scale

    tok_json = tokenizer_json(pre.tokenizer_vocab)
    if chat == "qwen3":
        tok_json = _with_markers(tok_json, QWEN3_MARKERS)
    tok_size = _tokenizer_size(tok_json)
    vocab = pre.vocab_size if pre.vocab_size is not None else tok_size
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)  # the trainer puts special tokens first
    config = _model_config(family, fam, pre, n_layers, tied, vocab, eos_id)
    dtype = mx.float32 if fam.moe else mx.bfloat16

    model = build_model(config)
    if tied and "lm_head" in model:
        model.pop("lm_head")  # a family that always builds a head drops it when tied (gemma3)
    # The module's own random init is lazy and is replaced before most of it is evaluated.
    shapes = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    n_special = len(SPECIAL_TOKENS)
    embed_std = 1.0 / _embedding_gain(fam, model)
    params = [
        (name, _init_tensor(name, arr, seed, gain, n_special, tok_size, dtype, embed_std))
        for name, arr in shapes
    ]
    model.update(tree_unflatten(params))
    del params, shapes
    model.eval()

    if quantize is not None:
        # quantize_model prints a bits-per-weight note; keep make_model quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, GROUP_SIZE, quantize)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors"):
        stale.unlink()  # mlx_lm.load globs model*.safetensors; old shards would mix in
    save_model(out, model, donate_model=True)
    if shards > 1:
        _split(out, shards, n_layers)
    save_config(config, out / "config.json")
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tok_config = _tokenizer_config(pre.max_position_embeddings, chat)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


def _split(out: Path, n: int, n_layers: int) -> None:
    """Rewrite the saved weights as `n` files, layer i in file i * n // n_layers, the embedding
    in the first and the final norm and head in the last, with an index naming each tensor's
    file: so the nodes of a ring need different files, as with a large checkpoint."""
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weights: dict[str, mx.array] = {}
    for f in sorted(out.glob("model*.safetensors")):
        weights.update(cast(dict[str, mx.array], mx.load(str(f))))
        f.unlink()

    def part(name: str) -> int:
        m = LAYER_KEY.search(name)
        if m is not None:
            return min(n - 1, int(m.group(1)) * n // n_layers)
        return 0 if "embed_tokens" in name else n - 1

    files: list[dict[str, mx.array]] = [{} for _ in range(n)]
    for name, w in weights.items():
        files[part(name)][name] = w
    weight_map: dict[str, str] = {}
    for i, tensors in enumerate(files):
        file_name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(out / file_name), tensors, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index, indent=4) + "\n")


# ---------------------------------------------------------------------------------------------
# CLI: mlxring make-model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--family",
        choices=list(FAMILIES),
        default="qwen3",
        metavar="FAMILY",
        help="model family: " + ", ".join(FAMILIES) + " (default qwen3)",
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument(
        "--tie",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tie the output head to the embedding (default: per family/preset)",
    )
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=None, help="weight gain override")
    parser.add_argument(
        "--shards", type=int, default=1, help="weight files, split along layer boundaries"
    )
    parser.add_argument(
        "--chat",
        choices=list(CHATS),
        default="chatml",
        help="chat format: chatml (text only), qwen3 (Qwen3's template: tools, thinking)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def run(args: argparse.Namespace) -> int:
    out = make_model(
        args.out,
        family=args.family,
        preset=args.preset,
        layers=args.layers,
        tie=args.tie,
        quantize=args.quantize,
        seed=args.seed,
        scale=args.scale,
        shards=args.shards,
        chat=args.chat,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    config = json.loads((out / "config.json").read_text())
    text = config.get("text_config") or config  # a multimodal wrapper keeps its text model's
    n_params = int(index["metadata"]["total_parameters"])
    n_bytes = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    quant = f"{config['quantization']['bits']}-bit" if "quantization" in config else "bf16"
    if "quantization" not in config and text.get("torch_dtype") == "float32":
        quant = "float32"
    print(out)
    print(
        f"{args.family}/{args.preset}: {text['num_hidden_layers']} layers, "
        f"hidden {text['hidden_size']}, vocab {text['vocab_size']}, "
        f"tied={text['tie_word_embeddings']}, {quant}, {n_params:,} params, "
        f"{n_bytes:,} bytes ({_human(n_bytes)})"
    )
    return 0
