"""Which part of a model (a layer, the embedding, the head, or nothing the text forward pass
uses) each checkpoint tensor belongs to, read from tensor names and safetensors headers alone.

A safetensors file is checked whole here, from its header and its size: a truncated or garbled
file is one `ModelError` naming it, at start-up, before any node listens or loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

# A transformer layer's tensor, and its index: "model.layers.12.mlp.up_proj.weight".
LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Tensors a checkpoint may carry that no text forward pass uses (the families' sanitize drops
# them): vision towers and projectors of multimodal wrappers, multi-token-prediction layers.
UNUSED_PREFIXES = (
    "vision_tower.",
    "vision_model.",
    "multi_modal_projector.",
    "mm_projector.",
    "model.visual.",
    "mtp.",
)


# A safetensors header is a few KiB to a few MiB of JSON; a length past this is a garbled file.
MAX_HEADER_BYTES = 100 << 20


class ModelError(Exception):
    """A model that cannot be sharded (missing or broken files, unsupported structure)."""


def is_unused(key: str) -> bool:
    return key.startswith(UNUSED_PREFIXES)


def is_head(key: str) -> bool:
    """An output head's tensor (``lm_head``, or llama4's ``output``)."""
    return "lm_head." in key or key.startswith("output.")


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> bytes, read from a safetensors file's header only; the file's size is
    checked against the data the header describes, so a truncated file fails here."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise ModelError(
                    f"{path}: not a whole safetensors file: its header would be {n} bytes, "
                    f"the file has {size} (an incomplete download?)"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: the safetensors header is not valid JSON: {e}") from None
    sizes: dict[str, int] = {}
    end = 0
    try:
        for k, v in header.items():
            if k != "__metadata__":
                lo, hi = v["data_offsets"]
                if not 0 <= int(lo) <= int(hi):
                    raise ValueError(f"offsets {lo}, {hi}")
                sizes[k] = int(hi) - int(lo)
                end = max(end, int(hi))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(
            f"{path}: a malformed safetensors header ({type(e).__name__}: {e})"
        ) from None
    if 8 + n + end > size:
        raise ModelError(
            f"{path}: truncated: its header describes {8 + n + end} bytes, the file has {size} "
            "bytes (an incomplete download?)"
        )
    return sizes
