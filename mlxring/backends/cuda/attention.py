"""Which attention kernel MLX's CUDA build uses for steps of several positions.

MLX sends attention over more than one query position to cuDNN, whose compiled graphs it caches
by the keys' shape: a decode step that verifies drafts (a few positions against a cache one
longer each step) meets a new shape at every step and builds a graph for it, 64 ms on an H200
against 5 ms for the step itself (benchmarks/RESULTS.md, speculative decoding). MLX's own
composed attention has no such per-shape cost. MLX reads the switch once, at the first
attention on the GPU, so a process that speculates sets it before its first step.
"""

from __future__ import annotations

import os

# MLX's switch (mlx/backend/cuda/scaled_dot_product_attention: env MLX_CUDA_USE_CUDNN_SDPA,
# default 1); a value the user set is kept.
SWITCH = "MLX_CUDA_USE_CUDNN_SDPA"


def keep_off_cudnn() -> None:
    """Attention of several positions by MLX's own kernels in this process, unless the user
    chose otherwise."""
    os.environ.setdefault(SWITCH, "0")
