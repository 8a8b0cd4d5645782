"""Foreign tensor types seen as numpy views, through adapters that register themselves.

The core handles numpy arrays. A tensor of another library (torch) is converted by the adapter
of that library's bindings, which registers itself here when it is imported
(:mod:`pccl.bindings.torch` does). The core never imports torch or the bindings: handed a
tensor whose adapter is not loaded yet, it imports the adapter module named in
:data:`PROVIDERS` by name (the user has imported torch already: they hold a tensor).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from pccl.types import DType

__all__ = ["PROVIDERS", "as_numpy", "register"]

Converter = Callable[[Any, str], tuple[np.ndarray, DType | None]]

#: top-level module of a tensor type -> the module whose import registers its adapter
PROVIDERS: dict[str, str] = {"torch": "pccl.bindings.torch"}
_ADAPTERS: dict[str, Converter] = {}


def register(top_module: str, converter: Converter) -> None:
    """Convert objects whose type lives in ``top_module`` with ``converter(obj, name)``, which
    returns a numpy view sharing the object's memory and its DType when numpy cannot express it
    (bfloat16), else None."""
    _ADAPTERS[top_module] = converter


def as_numpy(value: Any, name: str) -> tuple[np.ndarray, DType | None] | None:
    """``value`` as ``(numpy view, forced DType or None)``, or None when no adapter knows it."""
    top = type(value).__module__.partition(".")[0]
    conv = _ADAPTERS.get(top)
    if conv is None and top in PROVIDERS:
        importlib.import_module(PROVIDERS[top])  # registers itself
        conv = _ADAPTERS.get(top)
    return None if conv is None else conv(value, name)
