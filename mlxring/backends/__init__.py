"""Accelerator-specific machinery behind one seam (`base.Backend`), chosen once per process:
`plain` (every step on arrival), `placeholder` (a lone request's next step built ahead: Apple
silicon, the CPU) and `cuda` (steps launched ahead behind gates, tensors loaded in one
transfer). A shard asks only the chosen backend, never which one it is."""

from __future__ import annotations

import mlx.core as mx

from mlxring.backends.base import Backend
from mlxring.backends.cuda import attention, gate, load
from mlxring.backends.cuda.ahead import Gated
from mlxring.backends.placeholder import Placeholders, placeholders_work
from mlxring.backends.plain import Plain
from mlxring.protocol import codec as wire

__all__ = ["Backend", "Plain", "pick"]


def pick(gates: bool, wide_decode: bool = False) -> Backend:
    """The backend of this process; `gates`: whether its shards may launch steps behind gates
    (`config.tuning.gates`, in a process of one shard); `wide_decode`: whether decode steps of
    several positions come (speculative decoding), so attention over them must not cost a
    compile per cache length. Run it on the compute thread, before the first step: finding out
    whether gates work compiles their kernel (about 1.5 s on CUDA)."""
    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    if cuda and wide_decode:
        attention.keep_off_cudnn()
    to_array = load.to_array if cuda else wire.to_array
    if not placeholders_work():
        return Plain(to_array)
    if cuda and gates and gate.works():
        return Gated()
    return Placeholders(to_array)
