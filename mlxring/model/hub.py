"""A Hugging Face repo as a model source: its metadata files first, then only the weight files
a node's layer range needs; tensor sizes for planning from the hub's safetensors header reads."""

from __future__ import annotations

import json
from pathlib import Path

from mlxring.model.checkpoint import LAYER_KEY, ModelError, is_head, is_unused

META_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.txt",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
]


class HubError(ModelError):
    """A repo that cannot be found or fetched."""


def metadata(repo: str) -> Path:
    """The repo's config, tokenizer and weight index, fetched (or found in the hub's cache)."""
    return download(repo, META_PATTERNS)


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


def fetch_shard(repo: str, meta_dir: Path, start: int, end: int, n_layers: int) -> Path:
    """Fetch the weight files of layers [start, end) (and the ends they hold); returns the
    model directory."""
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
    return download(repo, sorted(files))


def tensor_sizes(repo: str) -> dict[str, int]:
    """Tensor name -> bytes from the hub's reads of the safetensors headers (no weights)."""
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo)
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear message
        raise HubError(f"cannot read tensor sizes of {repo!r} from Hugging Face: {e}") from None
    out = {}
    for file_meta in meta.files_metadata.values():
        for name, t in file_meta.tensors.items():
            out[name] = t.data_offsets[1] - t.data_offsets[0]
    return out


def download(repo: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear message
        raise HubError(f"cannot fetch {repo!r} from Hugging Face: {e}") from None
