"""Loading steps of a node: the model's metadata (config, tensor sizes, tokenizer) before the ring
forms, and one node's layer range each time the plan gives it a new one."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_config, load_tokenizer

from mlxring.model import source
from mlxring.model.sharded import (
    ModelError,
    ModelInfo,
    ShardModel,
    check_model,
    load_shard,
    model_info,
)
from mlxring.shard.compute import Compute

log = structlog.get_logger()


class LoadError(ModelError):
    """A node's layer range could not be fetched, loaded or warmed up; says which and why. A
    ModelError, so that at start it ends the node in one line as any model error does."""


@dataclass(frozen=True)
class ModelMeta:
    """What every node knows of the model before it loads any weights."""

    directory: Path  # config, tokenizer and weight index (the weights come per shard)
    config: dict[str, Any]
    info: ModelInfo
    tokenizer: TokenizerWrapper


async def load_metadata(spec: str, compute: Compute, allow_unverified: bool) -> ModelMeta:
    """Fetch and check the model's metadata. Refused here, on every node alike, before anything
    listens: a model whose family is not verified through the ring, or whose structure its
    family does not expect."""
    loop = asyncio.get_running_loop()
    meta = await loop.run_in_executor(None, source.resolve_metadata, spec)
    config = load_config(meta)
    # On the compute thread: building the model makes MLX arrays, and MLX's per-thread
    # streams must be freed by the thread that made them (the compute thread does).
    await compute.run(check_model, config, allow_unverified)
    sizes = await loop.run_in_executor(None, source.tensor_sizes, spec, meta)
    tokenizer = load_tokenizer(meta, eos_token_ids=config.get("eos_token_id"))
    return ModelMeta(meta, config, model_info(config, sizes), tokenizer)


async def load_layers(
    spec: str,
    meta: ModelMeta,
    node: str,
    rng: tuple[int, int],
    compute: Compute,
    allow_unverified: bool,
) -> ShardModel:
    """Node `node`'s layers `rng`: fetched where needed, loaded and warmed up on the compute
    thread. Any failure (a fetch, a bad or missing file, the model) is a LoadError naming the
    range and the model, so that a re-plan says what it could not do."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    try:
        path = await loop.run_in_executor(
            None, source.fetch_shard, spec, meta.directory, rng[0], rng[1], meta.info.n_layers
        )
        shard = await compute.run(load_shard, path, *rng, allow_unverified)
        await compute.run(shard.warm_up)
    except Exception as e:  # noqa: BLE001 - every cause is reported the same way, with its text
        cause = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
        raise LoadError(f"cannot load layers [{rng[0]}, {rng[1]}) from {spec}: {cause}") from e
    log.info(
        "shard_loaded",
        node=node,
        layers=f"[{rng[0]}, {rng[1]})",
        gb=round(shard.parameter_bytes() / 1e9, 3),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return shard
