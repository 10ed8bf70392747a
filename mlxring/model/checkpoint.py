"""Which part of a model (a layer, the embedding, the head, or nothing the text forward pass
uses) each checkpoint tensor belongs to, read from tensor names and safetensors headers alone."""

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


def is_unused(key: str) -> bool:
    return key.startswith(UNUSED_PREFIXES)


def is_head(key: str) -> bool:
    """An output head's tensor (``lm_head``, or llama4's ``output``)."""
    return "lm_head." in key or key.startswith("output.")


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> bytes, read from a safetensors file's header only."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {
        k: v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    }
