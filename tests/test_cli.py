"""The command line as a person meets it: --help, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .ringutil import ROOT

BAD = {
    "missing key": ("[cluster]\nname = 'x'\n[[nodes]]\nname = 'a'\nport = 1\n", "cluster.model"),
    "duplicate name": (
        "[cluster]\nmodel = 'demo'\n[[nodes]]\nname = 'a'\nhost = '127.0.0.1'\nport = 1\n"
        "[[nodes]]\nname = 'a'\nhost = '127.0.0.2'\nport = 2\n",
        "nodes[1].name",
    ),
    "duplicate host:port": (
        "[cluster]\nmodel = 'demo'\n[[nodes]]\nname = 'a'\nhost = '127.0.0.1'\nport = 1\n"
        "api_port = 8\n[[nodes]]\nname = 'b'\nhost = '127.0.0.1'\nport = 1\napi_port = 9\n",
        "nodes[1]",
    ),
    "manual overlap": (
        "[cluster]\nmodel = 'demo'\nstrategy = 'manual'\n[[nodes]]\nname = 'a'\nport = 1\n"
        "layers = [0, 5]\n[[nodes]]\nname = 'b'\nport = 2\nlayers = [4, 9]\n",
        "nodes[1].layers",
    ),
    "manual gap": (
        "[cluster]\nmodel = 'demo'\nstrategy = 'manual'\n[[nodes]]\nname = 'a'\nport = 1\n"
        "layers = [0, 4]\n[[nodes]]\nname = 'b'\nport = 2\nlayers = [5, 9]\n",
        "nodes[1].layers",
    ),
    "unknown strategy": (
        "[cluster]\nmodel = 'demo'\nstrategy = 'fast'\n[[nodes]]\nname = 'a'\nport = 1\n",
        "cluster.strategy",
    ),
    "bad tuning value": (
        "[cluster]\nmodel = 'demo'\n[tuning]\nbusy_poll = 'yes'\n[[nodes]]\nname = 'a'\nport = 1\n",
        "tuning.busy_poll",
    ),
    "tuning key in both tables": (
        "[cluster]\nmodel = 'demo'\nconvoys = 1\n[tuning]\nconvoys = 2\n"
        "[[nodes]]\nname = 'a'\nport = 1\n",
        "cluster.convoys",
    ),
}


def mlxring(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxring", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    out = mlxring("--help")
    assert out.returncode == 0
    for command in ("node", "bench", "status", "make-model", "top"):
        assert command in out.stdout


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_config_is_one_line_naming_the_key_and_exit_2(tmp_path: Path, case: str) -> None:
    text, key = BAD[case]
    path = tmp_path / "nodes.toml"
    path.write_text(text)
    out = mlxring("node", "--config", str(path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert key in lines[0] and str(path) in lines[0], lines[0]


def test_a_tuning_key_in_cluster_is_one_warning_line(tmp_path: Path) -> None:
    """A file from before [tuning] still loads, and says where the key belongs (`status` loads
    the config as `node` does, then finds no node to ask)."""
    path = tmp_path / "nodes.toml"
    path.write_text(
        "[cluster]\nmodel = 'demo'\ngates = false\n"
        "[[nodes]]\nname = 'a'\nhost = '127.0.0.1'\nport = 1\napi_port = 9\n"
    )
    out = mlxring("status", "--config", str(path))
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"mlxring: warning: {path}: cluster.gates: a per-process setting; move it to [tuning] "
        "(tuning.gates)"
    ], out.stderr


def _relabelled(tmp_path: Path, family: str, **changes: object) -> Path:
    """A copy of a tiny model of `family` whose config.json says otherwise."""
    import json
    import shutil

    from .ringutil import tiny_model

    out = tmp_path / "model"
    shutil.copytree(tiny_model(family), out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    return out


REFUSED = {
    # a type mlx-lm runs but the ring is not verified for
    "unverified type": (("llama", {"model_type": "smollm3"}), ["'smollm3'", "allow_unverified"]),
    # a supported type whose structure its family cannot split
    "kv-shared gemma4": (
        ("gemma4_text", {"num_kv_shared_layers": 2}),
        ["'gemma4_text'", "keys and values"],
    ),
    # a supported type whose config mlx-lm cannot build
    "qwen3 without head_dim": (("qwen3", {"head_dim": None}), ["'qwen3'", "head_dim"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_model_the_ring_cannot_run_is_refused_in_one_line_with_exit_2(
    tmp_path: Path, case: str
) -> None:
    from .ringutil import write_config

    (family, changes), words = REFUSED[case]
    config = write_config(tmp_path, _relabelled(tmp_path, family, **changes), 1)
    out = mlxring("node", "--config", str(config))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mlxring: ") and all(w in lines[0] for w in words), lines[0]


async def test_allow_unverified_runs_an_unverified_type(tmp_path: Path) -> None:
    from .ringutil import encode, local_ring, reference, ring_tokens, write_config

    model = _relabelled(tmp_path, "llama", model_type="smollm3")
    prompt = encode(model, "An unverified family, at the user's risk.")
    config = write_config(tmp_path, model, 2, extra_cluster="allow_unverified = true")
    async with local_ring(config) as rt:
        # smollm3 is llama with some layers unrotated: the llama-style defaults happen to
        # run it exactly, which is what "unverified" cannot promise in general.
        assert await ring_tokens(rt, prompt, 16) == reference(model, prompt, 16)


def test_a_checkpoint_missing_a_layers_tensor_is_refused_in_one_line(tmp_path: Path) -> None:
    """Loading is not strict (each node has only its own layers' files), so a tensor the
    checkpoint lacks would keep its random initial value and the ring would answer wrong."""
    import mlx.core as mx

    from .ringutil import write_config

    model = _relabelled(tmp_path, "qwen3_moe")
    (weights_file,) = model.glob("model*.safetensors")
    weights = dict(mx.load(str(weights_file)).items())
    del weights["model.layers.4.mlp.switch_mlp.down_proj.weight"]
    mx.save_safetensors(str(weights_file), weights, metadata={"format": "mlx"})
    out = mlxring("node", "--config", str(write_config(tmp_path, model, 1)))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    # The node logged its plan before loading; the refusal is the last line.
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxring: ") and "layers.4.mlp.switch_mlp.down_proj" in last, last


def _broken(tmp_path: Path, how: str) -> Path:
    """A copy of the tiny qwen3 model whose weights file is broken `how`."""
    import shutil

    from .ringutil import tiny_model

    out = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3"), out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "truncated header":
        weights.write_bytes(data[: 8 + n // 2])
    elif how == "truncated data":
        weights.write_bytes(data[: 8 + n + (len(data) - 8 - n) // 2])
    elif how == "no weights":
        weights.unlink()
    return out


BROKEN = {
    "truncated header": ["model.safetensors", "header"],
    "truncated data": ["model.safetensors", "bytes"],
    "no weights": ["model*.safetensors", "no weights"],
    "no model": ["no-such-model", "does not exist"],
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_model_file_is_one_line_naming_it_and_exit_2_at_once(
    tmp_path: Path, case: str
) -> None:
    import time

    from .ringutil import write_config

    model = tmp_path / "no-such-model" if case == "no model" else _broken(tmp_path, case)
    t0 = time.monotonic()
    # n1 never comes: a node that knows its files are broken fails before waiting for it.
    out = mlxring("node", "--config", str(write_config(tmp_path, model, 2)), "--name", "n0")
    assert time.monotonic() - t0 < 20, "the node waited before failing"
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxring: ") and all(w in last for w in BROKEN[case]), out.stderr
