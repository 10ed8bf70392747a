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
