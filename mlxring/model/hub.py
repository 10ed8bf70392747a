"""A Hugging Face repo as a model source: its metadata files first, then only the weight files
a node's layer range needs (after checking that the disk has room for them), each resumed
where an interrupted run left it and logged as it comes; tensor sizes for planning from the
hub's reads of the safetensors headers.

Files go into huggingface_hub's own cache (HF_HUB_CACHE) in its layout (blobs named by ETag,
snapshots/<commit>/<file> linking to them), so other Hugging Face tools see them. The transfer
is ours rather than hf_hub_download's: that one starts every run's download from zero (its
partial file is unique to the process and deleted on failure), and its tqdm bars are not what
a headless node's log wants."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from mlxring.model.checkpoint import LAYER_KEY, ModelError, is_head, is_unused

log = structlog.get_logger()

META_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.txt",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
]
PROGRESS_S = 5.0  # a file still downloading logs its progress this often


class HubError(ModelError):
    """A repo that cannot be found or fetched, or a disk without room for it."""


@dataclass(frozen=True)
class Repo:
    """A repo at one commit: every file's size, from the hub's file listing."""

    repo: str
    sha: str
    sizes: dict[str, int]


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def storage(repo: str) -> Path:
    """The repo's folder in huggingface_hub's cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _why(e: Exception) -> str:
    """One line for a hub failure."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, RepositoryNotFoundError):
        return "no such repo (or it is private or gated: set HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError | EntryNotFoundError):
        return str(e).splitlines()[0]
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        return f"the hub answered HTTP {status}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _failed(repo: str, e: Exception) -> HubError:
    return HubError(f"cannot fetch {repo!r} from {endpoint()}: {_why(e)}")


@functools.lru_cache(maxsize=8)
def _listing(repo: str) -> Repo:
    """The repo's current commit and file sizes (one API call; failures are not cached)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear message
        raise _failed(repo, e) from None
    if info.sha is None:
        raise HubError(f"cannot fetch {repo!r} from {endpoint()}: the hub gave no commit")
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    return Repo(repo, info.sha, sizes)


def metadata(repo: str) -> Path:
    """The repo's config, tokenizer and weight index, fetched (or found in the hub's cache);
    returns its snapshot directory, where the weight files come later."""
    try:
        snapshot = download(repo, META_PATTERNS)
    except HubError:
        cached = _cached_snapshot(repo)
        if cached is None:
            raise
        log.warning("model_hub_unreachable", repo=repo, using=str(cached))
        return cached
    refs = storage(repo) / "refs" / "main"
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(snapshot.name)
    return snapshot


def _cached_snapshot(repo: str) -> Path | None:
    """The snapshot a previous run fetched, for a node that cannot reach the hub now."""
    refs = storage(repo) / "refs" / "main"
    if not refs.exists():
        return None
    snapshot = storage(repo) / "snapshots" / refs.read_text().strip()
    return snapshot if (snapshot / "config.json").exists() else None


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
    """Fetch the weight files of layers [start, end) (and the ends they hold) into the
    snapshot `meta_dir`, refusing before the first byte when the disk has no room for them;
    returns the model directory."""
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
    missing = sorted(f for f in files if not (meta_dir / f).exists())
    if not missing:
        return meta_dir
    listing = _listing(repo)
    if listing.sha != meta_dir.name:  # the repo moved on since the metadata: stay on its commit
        listing = Repo(repo, meta_dir.name, listing.sizes)
    unknown = [f for f in missing if f not in listing.sizes]
    if unknown:
        raise HubError(f"cannot fetch {repo!r} from {endpoint()}: no file {unknown[0]} in it")
    check_room(repo, {f: listing.sizes[f] for f in missing})
    for name in missing:
        _fetch(listing, name)
    return meta_dir


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def check_room(repo: str, sizes: dict[str, int]) -> None:
    """Refuse a download the disk holding the cache cannot take, saying by how much. Bytes
    already in partial files count as had."""
    folder = storage(repo)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    partial = sum(p.stat().st_size for p in (folder / "blobs").glob("*.incomplete"))
    need = max(0, sum(sizes.values()) - partial)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise HubError(
            f"cannot fetch {repo!r}: its {len(sizes)} file(s) for this node need {_gb(need)} "
            f"in {folder}, {_gb(free)} free ({_gb(need - free)} missing)"
        )


def _fetch(listing: Repo, name: str) -> Path:
    """One file of the repo into the cache: resumed from its partial blob if an earlier run
    left one, with a progress line at start, every PROGRESS_S and at the end."""
    from filelock import FileLock
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    repo, folder = listing.repo, storage(listing.repo)
    pointer = folder / "snapshots" / listing.sha / name
    if pointer.exists():
        return pointer
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, name, revision=listing.sha))
        if meta.etag is None:
            raise HubError(f"cannot fetch {repo!r} from {endpoint()}: no ETag for {name}")
        blob = folder / "blobs" / meta.etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        # Nodes of one machine share the cache and may need the same file: one fetches it
        # (under the lock huggingface_hub itself takes for this blob).
        lock = folder.parent / ".locks" / folder.name / f"{meta.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            if not blob.exists():
                part = blob.with_name(blob.name + ".incomplete")
                with part.open("ab") as f:
                    _transfer(meta.location, f, name, meta.size)
                part.replace(blob)
            if not pointer.exists():
                pointer.parent.mkdir(parents=True, exist_ok=True)
                pointer.unlink(missing_ok=True)  # a link to a blob that is gone
                pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear message
        raise _failed(repo, e) from None
    return pointer


def _transfer(url: str, out: BinaryIO, name: str, size: int | None) -> None:
    """GET `url` into the open file `out`, asking only for the bytes it does not hold yet."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    done = out.tell()
    if size is not None and done == size:
        return
    resumed = done
    headers = build_hf_headers()
    if done:
        headers["Range"] = f"bytes={done}-"
    t0 = last = time.monotonic()
    log.info("model_download", file=name, done=done, total=size, resumed_from=resumed)
    with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
        hf_raise_for_status(response)
        if done and response.status_code != 206:  # the server sent the whole file again
            out.truncate(0)
            done = 0
        for chunk in response.iter_bytes():  # as it comes: a killed run keeps what it got
            out.write(chunk)
            done += len(chunk)
            if time.monotonic() - last >= PROGRESS_S:
                last = time.monotonic()
                log.info("model_download", file=name, done=done, total=size)
    out.flush()
    if size is not None and done != size:
        raise OSError(f"{name}: got {done} bytes of {size}")
    log.info(
        "model_downloaded",
        file=name,
        bytes=done,
        resumed_from=resumed,
        seconds=round(time.monotonic() - t0, 2),
    )


def tensor_sizes(repo: str) -> dict[str, int]:
    """Tensor name -> bytes from the hub's reads of the safetensors headers (no weights)."""
    try:
        from huggingface_hub import get_safetensors_metadata
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # a node logs; it has no terminal to draw bars on
        meta = get_safetensors_metadata(repo)
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear message
        raise HubError(
            f"cannot read tensor sizes of {repo!r} from {endpoint()}: {_why(e)}"
        ) from None
    out = {}
    for file_meta in meta.files_metadata.values():
        for name, t in file_meta.tensors.items():
            out[name] = t.data_offsets[1] - t.data_offsets[0]
    return out


def download(repo: str, patterns: list[str]) -> Path:
    """The repo's files matching `patterns` (glob patterns or names), fetched into the cache;
    returns the snapshot directory."""
    listing = _listing(repo)
    names = sorted(n for n in listing.sizes if any(fnmatch.fnmatch(n, p) for p in patterns))
    check_room(repo, {n: listing.sizes[n] for n in names})
    for name in names:
        _fetch(listing, name)
    return storage(repo) / "snapshots" / listing.sha
