"""A gate: a CUDA kernel that holds a launched decode step on the device until its input is in.

On MLX's CUDA backend most of a decode step's host time is MLX encoding its ops into CUDA graphs
(about 1.5 ms for 10 layers of qwen3-1.7b: benchmarks/decode_profile.py), and the device runs
nothing of the step until that is done. mlx-lm hides it behind the previous token's device time;
a shard cannot, as its input comes around the ring. With a gate it can: the step is built on the
gate's output and launched before the input exists; the gate spins on a flag in managed memory,
which the host sets once the input's bytes are in the placeholder, and then copies them through.
Only the device's own time stays on the ring's path.

A gate gives up after `LIMIT_S` (status GAVE_UP) so that a lost input never holds the device;
a step whose gate gave up is computed again. Apple silicon and the CPU have no such kernel:
there `works()` is False and steps are built ahead without being launched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

GAVE_UP, OPEN, CANCEL = 0, 1, 2
# Long enough for any ring's round trip between two tokens; a stalled ring costs the device
# one spinning thread for this long, then a recomputed step.
LIMIT_S = 1.0

_HEADER = """
__device__ inline unsigned long long mlxring_gate_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
"""

# One block: thread 0 waits (volatile reads: the host writes the flag while the kernel runs),
# then every thread copies its share of the input's bytes.
_SOURCE = """
  __shared__ int state;
  if (threadIdx.x == 0) {
    volatile const int* f = (volatile const int*)flag;
    unsigned long long start = mlxring_gate_now();
    unsigned long long limit = 1000ull * meta[1];
    int v = *f;
    while (v == 0 && mlxring_gate_now() - start < limit) {
      __nanosleep(128);
      v = *f;
    }
    state = v;
    status[0] = v;
  }
  __syncthreads();
  volatile const unsigned char* src = (volatile const unsigned char*)slot;
  for (unsigned int i = threadIdx.x; i < meta[0]; i += blockDim.x) out[i] = src[i];
"""


@functools.cache
def _kernel() -> Any:
    return mx.fast.cuda_kernel(
        name="mlxring_gate",
        input_names=["slot", "flag", "meta"],
        output_names=["out", "status"],
        source=_SOURCE,
        header=_HEADER,
    )


@dataclass(frozen=True)
class Flag:
    array: mx.array  # what the gate kernel reads
    # The host's view of the same bytes, taken before any launch: writing through it touches
    # nothing of MLX's while another thread may be encoding the gated step.
    host: np.ndarray[Any, Any]

    def open(self, value: int) -> None:
        """Let the gated step run: OPEN once the input is written, CANCEL to run it on
        nothing."""
        self.host[0] = value


def new_flag() -> Flag:
    flag = mx.array(np.zeros((1,), np.int32))
    mx.eval(flag)
    return Flag(flag, np.array(flag, copy=False))


def gate(slot: mx.array, flag: Flag, limit_s: float | None = None) -> tuple[mx.array, mx.array]:
    """`slot`'s bytes, once `flag` is set (or after `limit_s`, default LIMIT_S), and the gate's
    status."""
    raw = slot.view(mx.uint8)
    limit_us = int(1e6 * (LIMIT_S if limit_s is None else limit_s))
    meta = mx.array([raw.size, limit_us], dtype=mx.uint32)
    out, status = _kernel()(
        inputs=[raw, flag.array, meta],
        grid=(256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[raw.shape, (1,)],
        output_dtypes=[mx.uint8, mx.int32],
    )
    return out.view(slot.dtype), status


@functools.cache
def works() -> bool:
    """Whether gates run here, and hand the host's bytes through (compiles the kernel once)."""
    try:
        slot, flag = mx.array(np.zeros((2,), np.int32)), new_flag()
        mx.eval(slot)
        out, status = gate(slot, flag, 5.0)
        mx.async_eval(out, status)
        np.array(slot, copy=False)[:] = (5, 6)
        flag.open(OPEN)
        mx.eval(out, status)
        return bool(out.tolist() == [5, 6] and status.item() == OPEN)
    except Exception:  # noqa: BLE001 - no CUDA (CPU, Apple silicon) or no custom kernels
        return False
