"""A GGUF file (llama.cpp's, Ollama's) as a model source. Its metadata become an mlx-lm model
directory's `config.json` and tokenizer files; its tensors become safetensors files in MLX's own
layout, one file per layer (and one for the embedding, one for the head), converted only for the
layers a node holds, so each node reads only its own layers' bytes of the file.

MLX loads GGUF's Q4_0, Q4_1 and Q8_0 blocks natively (affine quantization, groups of 32, an fp16
scale and bias per group); this module repacks them block by block the way `mx.load` does, so a
converted tensor is bit for bit what MLX's own GGUF reader gives (tests check), without reading
the whole file into memory as `mx.load` would. Float tensors keep their stored dtype: the norms
of a quantized file are float32 in GGUF, and computing them in float16 makes a small model
ramble; BF16 stays bfloat16 (MLX's reader narrows it to float16, where a weight past 65504 is
inf). Anything else (K-quants, I-quants, other architectures) is refused in one line.

GGUF stores llama's query and key rows in the interleaved rotary order (llama.cpp's converter
permutes them), so the config says `rope_traditional`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import structlog

from mlxring.model.checkpoint import ModelError

log = structlog.get_logger()

GROUP = 32  # every native GGUF quantization MLX loads packs groups of 32 values
ARCHITECTURES = ("llama",)
# GGUF's name of a layer's tensor -> mlx-lm's (llama).
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
END_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
EMBED, HEAD = "embed", "head"  # the parts of a model that are not layers
# Pre-tokenizers llama.cpp knows that transformers' GGUF reader leaves at GPT-2's split: digits
# one by one, then GPT-2's split (llama.cpp's STARCODER, REFACT, SMOLLM pre-tokenizers).
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")


class GgufError(ModelError):
    """A GGUF file that cannot be served: unreadable, or of an architecture, tensor type or
    tokenizer this module does not convert."""


def _quant_bits() -> dict[int, int]:
    from gguf import GGMLQuantizationType as Q

    return {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}


def _float_types() -> dict[int, Any]:
    from gguf import GGMLQuantizationType as Q

    return {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: None}  # BF16: read as uint16


@dataclass(frozen=True)
class Part:
    """One tensor of the file: its GGUF name, mlx-lm's name (without `.weight`), and which part
    of the model holds it (a layer's index, EMBED or HEAD)."""

    gguf: str
    mlx: str
    part: int | str


def part_of(name: str) -> Part:
    """Where GGUF tensor `name` goes in mlx-lm's llama (GgufError for a name it has not)."""
    base, _, kind = name.rpartition(".")
    if kind != "weight":
        raise GgufError(f"tensor {name!r}: only weights are expected in a llama GGUF")
    fields = base.split(".")
    if fields[0] == "blk" and len(fields) == 3 and fields[1].isdigit() and fields[2] in LAYER_NAMES:
        i = int(fields[1])
        return Part(name, f"model.layers.{i}.{LAYER_NAMES[fields[2]]}", i)
    if base in END_NAMES:
        return Part(name, END_NAMES[base], EMBED if base == "token_embd" else HEAD)
    if base == "rope_freqs":
        raise GgufError(
            "this GGUF scales its rotary frequencies (rope_freqs, as Llama 3.1 files do), which "
            "is not supported yet"
        )
    raise GgufError(f"tensor {name!r} is not part of a llama model as mlx-lm builds it")


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Values `q` (rows, n), each below 2**bits, packed into uint32 words low bits first, as MLX
    lays out a quantized weight."""
    rows, n = q.shape
    per = 32 // bits
    words = q.reshape(rows, n // per, per).astype(np.uint32)
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
    return np.bitwise_or.reduce(words << shifts, axis=-1)


def _half(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of each block of `b` (rows, blocks, block bytes)."""
    return np.ascontiguousarray(b[..., at : at + 2]).view(np.float16)[..., 0]


def mlx_arrays(kind: int, data: np.ndarray) -> list[np.ndarray]:
    """A GGUF tensor's stored bytes as MLX's arrays: [weight] for a float tensor, [weight,
    scales, biases] for a quantized one (GgufError for a type MLX does not load)."""
    from gguf import GGMLQuantizationType as Q

    rows = data.shape[0] if data.ndim > 1 else 1
    if kind == Q.Q4_1:  # per block: fp16 scale, fp16 bias (min), 16 bytes of nibbles
        b = data.reshape(rows, -1, 20)
        qs = b[..., 4:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, -1)
        return [_pack(q, 4), _half(b, 0), _half(b, 2)]
    if kind == Q.Q4_0:  # per block: fp16 scale, 16 bytes of nibbles, value = scale * (q - 8)
        b = data.reshape(rows, -1, 18)
        scale = _half(b, 0)
        qs = b[..., 2:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, -1)
        return [_pack(q, 4), scale, scale * np.float16(-8)]
    if kind == Q.Q8_0:  # per block: fp16 scale, 32 int8, value = scale * q
        b = data.reshape(rows, -1, 34)
        scale = _half(b, 0)
        q = (np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return [_pack(q.reshape(rows, -1), 8), scale, scale * np.float16(-128)]
    if kind in (Q.F32, Q.F16, Q.BF16):
        return [np.asarray(data)]
    raise GgufError(f"GGUF type {Q(kind).name} is not one MLX loads natively")


def _to_mx(a: np.ndarray, bf16: bool) -> mx.array:
    if bf16:  # numpy has no bfloat16: the bits as uint16, reinterpreted
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


class GgufFile:
    """One GGUF file, read lazily (memory-mapped): its metadata and tensor table at once, a
    tensor's bytes only when converted."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except (OSError, ValueError, KeyError, IndexError) as e:
            # The reader runs past the end of a file cut short (a download that stopped) and
            # says so only in numpy's words: name the likely cause first.
            raise GgufError(
                f"{path}: not a readable GGUF file (cut short or corrupt: {e})"
            ) from None
        arch = self.value("general.architecture")
        if arch not in ARCHITECTURES:
            raise GgufError(
                f"{path}: GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.arch = str(arch)
        supported = {**_quant_bits(), **_float_types()}
        self.parts: dict[str, Part] = {}
        for t in self.reader.tensors:
            if t.tensor_type not in supported:
                raise GgufError(
                    f"{path}: tensor {t.name} is {t.tensor_type.name}, which MLX does not load "
                    "natively (supported: Q4_0, Q4_1, Q8_0, F16, BF16, F32)"
                )
            self.parts[t.name] = part_of(t.name)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str) -> Any:
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def arch_value(self, key: str) -> Any:
        return self.value(f"{self.arch}.{key}")

    @cached_property
    def config(self) -> dict[str, Any]:
        """mlx-lm's config.json for this file."""
        heads = self.arch_value("attention.head_count")
        hidden = self.arch_value("embedding_length")
        layers = self.arch_value("block_count")
        if not all(isinstance(v, int) and v > 0 for v in (heads, hidden, layers)):
            raise GgufError(f"{self.path}: its metadata do not give the model's shape")
        head_dim = self.arch_value("attention.key_length") or hidden // heads
        rope_dims = self.arch_value("rope.dimension_count") or head_dim
        if rope_dims != head_dim:
            raise GgufError(
                f"{self.path}: rotary embedding on {rope_dims} of {head_dim} dimensions is not "
                "supported"
            )
        tokens = self.value("tokenizer.ggml.tokens") or []
        cfg: dict[str, Any] = {
            "model_type": self.arch,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "intermediate_size": self.arch_value("feed_forward_length"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.arch_value("attention.head_count_kv") or heads,
            "head_dim": head_dim,
            "rms_norm_eps": self.arch_value("attention.layer_norm_rms_epsilon") or 1e-5,
            "rope_theta": self.arch_value("rope.freq_base") or 10000.0,
            "rope_traditional": True,
            "max_position_embeddings": self.arch_value("context_length") or 4096,
            "vocab_size": self.arch_value("vocab_size") or len(tokens),
            "tie_word_embeddings": "output.weight" not in self.parts,
        }
        scaling = self.arch_value("rope.scaling.type")
        if scaling == "linear":
            cfg["rope_scaling"] = {
                "type": "linear",
                "factor": float(self.arch_value("rope.scaling.factor")),
            }
        elif scaling not in (None, "none"):
            raise GgufError(f"{self.path}: rope scaling {scaling!r} is not supported")
        bits = [_quant_bits()[t.tensor_type] for t in self.tensors.values() if self._quantized(t)]
        if bits:
            # The most common width; mlx-lm infers each layer's own from its arrays' shapes.
            cfg["quantization"] = {"group_size": GROUP, "bits": max(set(bits), key=bits.count)}
        stops = [self.value(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        if stops := list(dict.fromkeys(s for s in stops if s is not None)):
            cfg["eos_token_id"] = stops if len(stops) > 1 else stops[0]
        if (bos := self.value("tokenizer.ggml.bos_token_id")) is not None:
            cfg["bos_token_id"] = bos
        return cfg

    def _quantized(self, t: Any) -> bool:
        return t.tensor_type in _quant_bits()

    def sizes(self) -> dict[str, int]:
        """mlx-lm tensor name -> bytes once converted, from the tensor table alone."""
        out = {}
        for name, t in self.tensors.items():
            p = self.parts[name]
            n = int(np.prod([int(d) for d in t.shape]))
            if self._quantized(t):
                bits = _quant_bits()[t.tensor_type]
                out[f"{p.mlx}.weight"] = n * bits // 8
                out[f"{p.mlx}.scales"] = out[f"{p.mlx}.biases"] = n // GROUP * 2
            else:
                out[f"{p.mlx}.weight"] = int(t.n_bytes)
        return out

    def arrays(self, part: int | str) -> dict[str, mx.array]:
        """The converted tensors of one part of the model (a layer's index, EMBED, HEAD)."""
        from gguf import GGMLQuantizationType as Q

        out = {}
        for name, p in self.parts.items():
            if p.part != part:
                continue
            t = self.tensors[name]
            arrays = mlx_arrays(t.tensor_type, t.data)
            keys = ("weight", "scales", "biases")[: len(arrays)]
            bf16 = t.tensor_type == Q.BF16
            for key, a in zip(keys, arrays, strict=True):
                out[f"{p.mlx}.{key}"] = _to_mx(a, bf16 and key == "weight")
        return out

    def write_tokenizer(self, out: Path) -> None:
        """tokenizer.json and tokenizer_config.json (with the chat template) for the file's
        tokenizer, built by transformers' GGUF tokenizer reader."""
        from tokenizers import pre_tokenizers
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )

        found = {
            name: v
            for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if (v := self.value(f"tokenizer.{key}")) is not None
        }
        if "tokens" not in found:
            raise GgufError(f"{self.path}: has no tokenizer")
        try:
            tokenizer, _ = convert_gguf_tokenizer(self.arch, found)
        except (ValueError, KeyError) as e:
            raise GgufError(f"{self.path}: its tokenizer cannot be converted: {e}") from None
        if found.get("pre_tokenizer_type") in DIGITS_THEN_GPT2:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        tokenizer.save(str(out / "tokenizer.json"))
        tokens = found["tokens"]

        def token(key: str) -> str | None:
            i = self.value(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        settings = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos"),
            "eos_token": token("eos"),
            "unk_token": token("unknown"),
            "pad_token": token("padding"),
            "add_bos_token": bool(self.value("tokenizer.ggml.add_bos_token")),
            "add_eos_token": bool(self.value("tokenizer.ggml.add_eos_token")),
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.config["max_position_embeddings"],
        }
        if (template := self.value("tokenizer.chat_template")) is not None:
            settings["chat_template"] = template
        _write_json(
            out / "tokenizer_config.json", {k: v for k, v in settings.items() if v is not None}
        )


def parts_for(config: dict[str, Any], start: int, end: int) -> list[int | str]:
    """The parts of a converted model that layers [start, end) need: those layers, the
    embedding on the first shard, the head (and a tied embedding) on the last."""
    n = config["num_hidden_layers"]
    parts: list[int | str] = list(range(start, end))
    if start == 0 or (end == n and config.get("tie_word_embeddings")):
        parts.append(EMBED)
    if end == n:
        parts.append(HEAD)
    return parts


def file_of(part: int | str) -> str:
    """The safetensors file of one part of a converted model (mlx-lm loads `model*.safetensors`)."""
    return (
        f"model-layer-{part:05d}.safetensors"
        if isinstance(part, int)
        else f"model-{part}.safetensors"
    )


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def cache_key(path: Path) -> str:
    """A file's cache directory name: its stem and a digest of where it is, its size and its
    time of change (hashing a file of hundreds of GB would take minutes)."""
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def metadata(path: Path, cache: Path) -> Path:
    """The model directory of GGUF file `path` under `cache` with its config and tokenizer (no
    weights yet); made on first use."""
    if not path.is_file():
        raise GgufError(f"GGUF file {path} does not exist")
    target = cache / "gguf" / cache_key(path)
    if (target / "config.json").exists():
        return target
    g = GgufFile(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
    try:
        g.write_tokenizer(tmp)
        _write_json(tmp / "config.json", g.config)
        _write_json(tmp / "gguf-sizes.json", g.sizes())
        with contextlib.suppress(OSError):  # another process of this machine made it first
            tmp.rename(target)
    finally:  # gone once renamed; else (made elsewhere, or a GgufError) nothing of it is kept
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sizes(directory: Path) -> dict[str, int]:
    """Tensor sizes of a converted GGUF's model directory (from its tensor table, written with
    the metadata: planning reads no tensor)."""
    return {
        str(k): int(v) for k, v in json.loads((directory / "gguf-sizes.json").read_text()).items()
    }


def missing(directory: Path, parts: Iterable[int | str]) -> list[int | str]:
    """The `parts` whose files `directory` does not hold yet."""
    return [p for p in parts if not (directory / file_of(p)).exists()]


def dequantized(
    arrays: dict[str, mx.array], quant: dict[str, int], dtype: mx.Dtype
) -> dict[str, mx.array]:
    """`arrays` with every quantized weight (its `scales` and `biases` beside it) dequantized,
    and every float array, in `dtype`."""
    out = {}
    for name, a in arrays.items():
        base = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if f"{base}.scales" in arrays:
            scales = arrays[f"{base}.scales"]
            group = quant["group_size"]
            # Bits per tensor from its shapes: GGUF files mix types (an 8-bit embedding).
            bits = a.shape[-1] * 32 // (scales.shape[-1] * group)
            a = mx.dequantize(a, scales, arrays[f"{base}.biases"], group, bits)
        out[name] = a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a
    return out


def convert(
    g: GgufFile, directory: Path, todo: list[int | str], dtype: mx.Dtype | None = None
) -> None:
    """Write the safetensors files of parts `todo` of the open GGUF `g` into `directory`, each
    whole or not at all; with `dtype`, dequantized to it (see `write_model`)."""
    if not todo:
        return
    t0 = time.perf_counter()
    log.info("gguf_converting", file=str(g.path), parts=len(todo))
    for i, part in enumerate(todo, 1):
        target = directory / file_of(part)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.safetensors")
        arrays = g.arrays(part)
        if dtype is not None and "quantization" in g.config:
            arrays = dequantized(arrays, g.config["quantization"], dtype)
        mx.save_safetensors(str(tmp), arrays, metadata={"format": "mlx"})
        os.replace(tmp, target)
        if i % 8 == 0 or i == len(todo):
            log.info(
                "gguf_converted", done=i, of=len(todo), seconds=round(time.perf_counter() - t0, 1)
            )


def fetch_shard(path: Path, directory: Path, start: int, end: int) -> Path:
    """Convert what layers [start, end) need into `directory` (made by `metadata`)."""
    config = json.loads((directory / "config.json").read_text())
    if todo := missing(directory, parts_for(config, start, end)):
        convert(GgufFile(path), directory, todo)  # the file is read only when a part is missing
    return directory


def write_model(path: Path, target: Path, dtype: mx.Dtype | None = None) -> None:
    """A whole mlx-lm model directory at `target` from GGUF `path`: config, tokenizer, every
    layer (what `mlx_lm.load` reads, as the packaged model is kept); with `dtype`, its
    quantized weights dequantized and every float in `dtype` (MLX's CPU kernels compute a
    quantized matmul position by position, a bf16 one several positions for little more
    than one: benchmarks/RESULTS.md, speculative decoding)."""
    g = GgufFile(path)
    target.mkdir(parents=True, exist_ok=True)
    g.write_tokenizer(target)
    config = dict(g.config)
    if dtype is not None:
        config.pop("quantization", None)
    _write_json(target / "config.json", config)
    convert(g, target, missing(target, parts_for(config, 0, config["num_hidden_layers"])), dtype)
