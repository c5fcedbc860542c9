"""Bytes this rank receives through accel's collectives, by kind, for `benchmarks/parallel_comm.py`.

Counted in eager mode only (a compiled region runs the same collectives without the count)."""
from __future__ import annotations

import collections

import torch

received: collections.Counter = collections.Counter()


def add(kind: str, tensor: torch.Tensor, fraction: float = 1.0) -> None:
    """Count `fraction` of `tensor`'s bytes as received for `kind`."""
    if not torch.compiler.is_compiling():
        received[kind] += int(tensor.numel() * tensor.element_size() * fraction)


def reset() -> None:
    received.clear()
