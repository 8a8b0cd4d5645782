"""Torch adapters: CPU tensors as zero-copy numpy views (bfloat16 included).

The only module that imports torch. CUDA tensors, DTensors and non-contiguous tensors are refused
with guidance (staging for CUDA arrives with the DiLoCo bindings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pccl.types import DType

__all__ = ["as_numpy"]


def as_numpy(t: Any, name: str = "tensor") -> tuple[np.ndarray, DType | None]:
    """Return a numpy view sharing ``t``'s memory, and its DType when numpy cannot express it.

    Raises:
        TypeError: not a CPU, contiguous, plain tensor of a supported dtype.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if type(t).__name__ == "DTensor" or hasattr(t, "to_local"):
        raise TypeError(f"{name} is a DTensor: pass its local shard (`t.to_local()`)")
    if t.device.type != "cpu":
        raise TypeError(f"{name} is on {t.device}; pass a CPU tensor (or stage it with .cpu())")
    if not t.is_contiguous():
        raise TypeError(f"{name} is not contiguous: pass `t.contiguous()` (a copy)")
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(np.uint16), DType.BFLOAT16
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} has unsupported dtype {t.dtype}")
    return t.detach().numpy(), None
