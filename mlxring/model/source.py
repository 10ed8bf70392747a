"""Where a model's files come from: the embedded demo, a local directory, or a Hugging Face repo
(downloading only the files a node's layer range needs)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import structlog

from mlxring.model.checkpoint import LAYER_KEY, ModelError, is_head, is_unused, safetensors_sizes

log = structlog.get_logger()

DEMO = "demo"
# The demo model: made by make-model on first use, so the default nodes.toml needs no download.
DEMO_FAMILY, DEMO_PRESET, DEMO_LAYERS, DEMO_SEED = "qwen3", "tiny", 9, 0
_META_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.txt",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
]


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


def is_local(spec: str) -> bool:
    return spec == DEMO or Path(spec).expanduser().is_dir()


def resolve_metadata(spec: str) -> Path:
    """A directory with the model's config and tokenizer (weights may still be missing)."""
    if spec == DEMO:
        return demo_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SourceError(f"{path} has no config.json: not an mlx-lm model directory")
        return path
    if spec.startswith((".", "/", "~")):
        raise SourceError(f"model directory {spec} does not exist")
    return _download(spec, _META_PATTERNS)


def shard_files(
    weight_map: dict[str, str], start: int, end: int, first: bool, last: bool, tied: bool
) -> set[str]:
    """The safetensors files holding the tensors of layers [start, end) and the ends we hold."""
    files = set()
    for key, f in weight_map.items():
        if is_unused(key):
            continue
        m = LAYER_KEY.search(key)
        if m is not None:
            if start <= int(m.group(1)) < end:
                files.add(f)
        elif "embed_tokens" in key:
            if first or (last and tied):
                files.add(f)
        elif last:
            files.add(f)
    return files


def fetch_shard(spec: str, meta_dir: Path, start: int, end: int, n_layers: int) -> Path:
    """Make sure the weights of one shard are local; returns the model directory."""
    if is_local(spec):
        return meta_dir
    index_file = meta_dir / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        config = json.loads((meta_dir / "config.json").read_text())
        text = config.get("text_config") or {}
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        files = shard_files(
            weight_map,
            start,
            end,
            start == 0,
            end == n_layers,
            bool(tied) or not any(is_head(k) for k in weight_map),
        )
    else:
        files = {"model.safetensors"}
    return _download(spec, sorted(files))


def tensor_sizes(spec: str, meta_dir: Path) -> dict[str, int]:
    """Tensor name -> bytes, from local safetensors headers or, for a hub repo, from the hub's
    header reads (so planning needs no weights)."""
    local = sorted(meta_dir.glob("model*.safetensors"))
    if local or is_local(spec):
        if not local:
            raise SourceError(f"{meta_dir} has no weights: no model*.safetensors file in it")
        sizes: dict[str, int] = {}
        for f in local:
            sizes.update(safetensors_sizes(f))
        return sizes
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(spec)
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear message
        raise SourceError(f"cannot read tensor sizes of {spec!r} from Hugging Face: {e}") from None
    out = {}
    for file_meta in meta.files_metadata.values():
        for name, t in file_meta.tensors.items():
            out[name] = t.data_offsets[1] - t.data_offsets[0]
    return out


def _download(repo: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear message
        raise SourceError(f"cannot fetch {repo!r} from Hugging Face: {e}") from None
