"""Extra state a training loop depends on, kept identical across peers with the outer state.

:class:`pccl.bindings.diloco.DiLoCo` takes ``extra_state={name: value}``. Each value becomes
one hash-verified shared-state entry next to the outer parameters, so a newcomer adopts it at
its first sync and an incumbent whose copy drifted is repaired (and told). What a value may be:

- a CPU ``torch.Tensor`` or a numpy array (contiguous, writable): shared in place, as is;
- a ``torch.optim.lr_scheduler.LRScheduler``: its ``state_dict()`` plus the learning rates of
  its optimizer's param groups (``load_state_dict`` alone leaves the optimizer's ``lr`` at the
  newcomer's initial value: the torchtitan#4598 failure);
- a ``torch.Generator``: its RNG state;
- any object with ``state_dict()``/``load_state_dict()`` (a data-loader position, a sampler, an
  optimizer if its moments should be shared after all);
- a ``dict`` of scalars, strings, lists, nested dicts and tensors: updated in place on adoption.

Stateful values are serialised with ``msgpack`` (never pickle: these bytes come from other
machines) into a fixed-capacity ``uint8`` entry, ``[u32 length][msgpack][zero padding]``:
every peer must declare the same shapes, so the capacity (``extra_state_bytes``) is part of the
run's hyper-parameters. Tensors and arrays inside a state dict travel as raw little-endian bytes
with dtype and shape. Decoding is bounded (msgpack's own limits, then a type check of every
value); a blob that does not decode raises ``SharedStateError`` naming the entry.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import torch

from pccl.errors import SharedStateError

__all__ = [
    "Slot",
    "StatefulEntry",
    "array_slot",
    "pack",
    "stateful_adapter",
    "stateful_slot",
    "unpack",
]

_EXT_TENSOR = 1
_EXT_NDARRAY = 2
_EXT_TUPLE = 3
_LEN = struct.Struct("<I")
#: Default capacity of one stateful entry (bytes, header included).
DEFAULT_CAPACITY = 64 << 10


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return msgpack.ExtType(_EXT_TENSOR, msgpack.packb([dtype, list(t.shape), raw]))
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return msgpack.ExtType(
            _EXT_NDARRAY, msgpack.packb([a.dtype.str, list(a.shape), a.tobytes()])
        )
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, _packb(list(obj)))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot share a {type(obj).__name__} (not a scalar, str, list, dict, tensor)")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(_unpackb(data))
    if code not in (_EXT_TENSOR, _EXT_NDARRAY):
        raise ValueError(f"unknown extension type {code}")
    dtype, shape, raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError("bad shape")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if code == _EXT_NDARRAY:
        dt = np.dtype(dtype)
        if dt.hasobject or n * dt.itemsize != len(raw):
            raise ValueError("array bytes do not match dtype and shape")
        return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    tdt = getattr(torch, str(dtype), None)
    if not isinstance(tdt, torch.dtype):
        raise ValueError(f"unknown tensor dtype {dtype!r}")
    itemsize = torch.empty((), dtype=tdt).element_size()
    if n * itemsize != len(raw):
        raise ValueError("tensor bytes do not match dtype and shape")
    if n == 0:
        return torch.empty(shape, dtype=tdt)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(tdt).reshape(shape).clone()


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True)


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


def pack(obj: Any, out: np.ndarray, name: str) -> None:
    """Serialise ``obj`` into the ``uint8`` entry ``out`` (length header, zero padding)."""
    try:
        blob = _packb(obj)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"extra_state[{name!r}]: {e}") from None
    if _LEN.size + len(blob) > out.nbytes:
        raise ValueError(
            f"extra_state[{name!r}] needs {_LEN.size + len(blob)} bytes, more than "
            f"extra_state_bytes={out.nbytes}; raise it (the same on every peer)"
        )
    out[: _LEN.size] = np.frombuffer(_LEN.pack(len(blob)), dtype=np.uint8)
    out[_LEN.size : _LEN.size + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    out[_LEN.size + len(blob) :] = 0


def unpack(buf: np.ndarray, name: str) -> Any:
    """Inverse of :func:`pack`. Raises ``SharedStateError`` for bytes that do not decode."""
    if buf.nbytes < _LEN.size:
        raise SharedStateError(f"extra_state[{name!r}]: entry shorter than its header")
    (n,) = _LEN.unpack(buf[: _LEN.size].tobytes())
    if n > buf.nbytes - _LEN.size:
        raise SharedStateError(f"extra_state[{name!r}]: length {n} exceeds the entry")
    try:
        return _unpackb(buf[_LEN.size : _LEN.size + n].tobytes())
    except Exception as e:  # msgpack raises many types on hostile input; all mean "bad blob"
        raise SharedStateError(f"extra_state[{name!r}] does not decode: {e}") from None


class StatefulEntry:
    """Adapter: ``get() -> msgpack-able object`` and ``set(object)`` for one shared value."""

    def __init__(self, name: str, get: Any, set_: Any, kind: str) -> None:
        self.name, self.get, self.set, self.kind = name, get, set_, kind


def _scheduler(name: str, s: Any) -> StatefulEntry:
    def get() -> Any:
        return {"scheduler": s.state_dict(), "lrs": [g["lr"] for g in s.optimizer.param_groups]}

    def set_(v: Any) -> None:
        if not isinstance(v, dict) or not isinstance(v.get("scheduler"), dict):
            raise SharedStateError(f"extra_state[{name!r}]: not a scheduler state")
        lrs = v.get("lrs")
        groups = s.optimizer.param_groups
        if not isinstance(lrs, list) or len(lrs) != len(groups):
            raise SharedStateError(
                f"extra_state[{name!r}]: the run's optimizer has {len(lrs or [])} param groups, "
                f"this peer's {len(groups)}"
            )
        s.load_state_dict(v["scheduler"])
        for g, lr in zip(groups, lrs, strict=True):
            g["lr"] = lr

    return StatefulEntry(name, get, set_, "lr_scheduler")


def _mapping(name: str, d: dict[str, Any]) -> StatefulEntry:
    def set_(v: Any) -> None:
        if not isinstance(v, dict):
            raise SharedStateError(f"extra_state[{name!r}]: not a dict")
        d.clear()
        d.update(v)

    return StatefulEntry(name, lambda: dict(d), set_, "dict")


def stateful_adapter(name: str, value: Any) -> StatefulEntry | None:
    """The adapter for ``value``, or None when it is a tensor/array shared as is.

    Raises:
        TypeError: a value of no supported kind.
    """
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return None
    if isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        return _scheduler(name, value)
    if isinstance(value, torch.Generator):
        return StatefulEntry(
            name, value.get_state, lambda v: value.set_state(_as_byte_tensor(name, v)), "generator"
        )
    if isinstance(value, dict):
        return _mapping(name, value)
    if isinstance(value, Mapping):
        raise TypeError(f"extra_state[{name!r}]: a read-only mapping cannot adopt the run's values")
    if callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    ):
        return StatefulEntry(name, value.state_dict, value.load_state_dict, type(value).__name__)
    raise TypeError(
        f"extra_state[{name!r}] is a {type(value).__name__}: expected a tensor, an array, an LR "
        "scheduler, a torch.Generator, a dict, or an object with state_dict()/load_state_dict()"
    )


def _as_byte_tensor(name: str, v: Any) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8:
        raise SharedStateError(f"extra_state[{name!r}]: not an RNG state")
    return v


class Slot:
    """One extra-state entry as DiLoCo handles it: the shared ``entry`` array, how to take a
    snapshot of the live value (bytes of the entry's size) and how to adopt the run's bytes.

    ``entry`` is the array registered in the shared state; ``buf`` its bytes (``uint8``).
    """

    def __init__(self, name: str, entry: np.ndarray, snapshot: Any, adopt: Any) -> None:
        self.name = name
        self.entry = entry
        self.buf = entry.reshape(-1).view(np.uint8)
        self.snapshot = snapshot
        self.adopt = adopt


def stateful_slot(adapter: StatefulEntry, capacity: int) -> Slot:
    """A serialised value in a ``capacity``-byte entry; the snapshot is packed at once, so a
    value that cannot travel fails before any I/O."""
    entry = np.zeros(capacity, dtype=np.uint8)
    scratch = np.zeros(capacity, dtype=np.uint8)

    def snapshot() -> bytes:
        pack(adapter.get(), scratch, adapter.name)
        return scratch.tobytes()

    def adopt(blob: bytes) -> None:
        adapter.set(unpack(np.frombuffer(blob, dtype=np.uint8), adapter.name))

    entry[...] = np.frombuffer(snapshot(), dtype=np.uint8)
    return Slot(adapter.name, entry, snapshot, adopt)


def array_slot(name: str, value: Any) -> Slot:
    """A tensor/array shared through a private copy (quorum mode: the driver thread syncs while
    the training thread owns the live value); snapshot and adoption copy whole bytes."""
    live = value.detach().numpy() if isinstance(value, torch.Tensor) else value
    if not isinstance(live, np.ndarray) or not live.flags.c_contiguous or not live.flags.writeable:
        raise TypeError(f"extra_state[{name!r}] must be a contiguous, writable CPU tensor/array")
    flat = live.reshape(-1).view(np.uint8)
    entry = live.copy()

    def adopt(blob: bytes) -> None:
        flat[...] = np.frombuffer(blob, dtype=np.uint8)

    return Slot(name, entry, lambda: flat.tobytes(), adopt)
