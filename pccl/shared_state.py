"""``pccl.SharedState``: named tensors that every peer of a group keeps bit-identical.

Each entry is hashed with XXH3-128 (the ``xxhash`` package, which releases the GIL: about
30 GB/s here, so a 1 GiB state hashes in ~35 ms) over its canonical little-endian bytes. Entries
marked ``allow_content_inequality`` are never compared nor transferred. The object only describes
and hashes state; synchronisation is :meth:`pccl.Communicator.sync_shared_state`. Not
thread-safe: do not mutate entries while a sync runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from pccl import adapters
from pccl.types import DType, storage_view

__all__ = ["Entry", "SharedState"]

MAX_KEY_LEN = 1024


@dataclass(frozen=True)
class Entry:
    """One shared tensor: its name, raw storage view and what peers must agree on."""

    key: str
    array: np.ndarray  # flat storage view (bf16 as uint16) sharing the user's memory
    dtype: DType
    shape: tuple[int, ...]
    allow_content_inequality: bool

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def raw(self) -> memoryview:
        return self.array.data.cast("B")

    def hash(self) -> bytes:
        """XXH3-128 of the canonical little-endian bytes (16 bytes)."""
        if sys.byteorder != "little" and self.dtype.itemsize > 1:  # pragma: no cover
            return xxhash.xxh3_128(self.array.byteswap().tobytes()).digest()
        return xxhash.xxh3_128(self.raw()).digest()


class SharedState:
    """Named tensors kept identical across a peer group, with a revision counter.

    Args:
        entries: ``{name: numpy array or CPU torch tensor}``; arrays must be C-contiguous and
            writable; they are updated in place by a sync.
        revision: revision this state is at (a sync must carry exactly the previous + 1; the
            first sync of a group may start anywhere, e.g. when resuming from a checkpoint).
        allow_content_inequality: names whose content may differ between peers; they are
            neither compared nor transferred.

    Raises:
        TypeError: an entry is not an array/tensor of a supported dtype, or a name is not a str.
        ValueError: empty name, duplicate, non-contiguous or read-only entry, bad revision.
    """

    def __init__(
        self,
        entries: Mapping[str, Any],
        revision: int = 0,
        *,
        allow_content_inequality: Iterable[str] = (),
    ) -> None:
        if not isinstance(entries, Mapping):
            raise TypeError("entries must be a mapping {name: array}")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise ValueError(f"revision must be an int >= 0, got {revision!r}")
        loose = set(allow_content_inequality)
        unknown = loose - set(entries)
        if unknown:
            raise ValueError(f"allow_content_inequality names unknown entries: {sorted(unknown)}")
        self.revision = revision
        self._entries: dict[str, Entry] = {}
        for key, value in entries.items():
            if not isinstance(key, str):
                raise TypeError(f"entry names must be str, got {type(key).__name__}")
            if not key or len(key.encode()) > MAX_KEY_LEN:
                raise ValueError(f"entry name must be 1..{MAX_KEY_LEN} bytes: {key!r:.60}")
            arr, dt, shape = _as_storage(value, key)
            if not arr.flags.writeable:
                raise ValueError(f"entry {key!r} is read-only")
            self._entries[key] = Entry(key, arr, dt, shape, key in loose)

    @property
    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def hashes(self) -> dict[str, str]:
        """``{name: hex XXH3-128}`` of every entry (``allow_content_inequality`` ones included)."""
        return {k: e.hash().hex() for k, e in self._entries.items()}


def _as_storage(value: Any, key: str) -> tuple[np.ndarray, DType, tuple[int, ...]]:
    if isinstance(value, np.ndarray):
        sv, dt = storage_view(value)
        return sv, dt, tuple(value.shape)
    converted = adapters.as_numpy(value, key)  # torch tensors, via their self-registered adapter
    if converted is not None:
        arr, forced = converted
        shape = tuple(int(d) for d in value.shape)
        if forced is not None:
            return arr.reshape(-1), forced, shape
        sv, dt = storage_view(arr)
        return sv, dt, shape
    raise TypeError(f"entry {key!r} must be a numpy array or a CPU torch tensor")
