"""Public enums and result records, and the mapping from numpy dtypes to wire dtypes.

``DType`` codes travel on the wire and select kernels; bfloat16 is stored as 16-bit words
(numpy has no native bfloat16; an ``ml_dtypes.bfloat16`` array or a torch bfloat16 tensor is
accepted and viewed as ``uint16``). Pure data; safe on any thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DType",
    "Quantization",
    "ReduceInfo",
    "ReduceOp",
    "SyncInfo",
    "SyncStrategy",
    "dtype_of",
    "storage_view",
]


class ReduceOp(enum.IntEnum):
    """Element-wise reduction applied by an all-reduce."""

    SUM = 0
    AVG = 1
    MIN = 2
    MAX = 3
    PROD = 4


class Quantization(enum.IntEnum):
    """How float32 payloads are encoded on the wire."""

    NONE = 0  #: raw bytes of the input dtype
    FP16 = 1  #: IEEE half, round-to-nearest-even
    BF16 = 2  #: bfloat16, round-to-nearest-even
    UINT8 = 3  #: block-wise min-max uint8, round-to-nearest, fp32 (min, scale) per block
    #: block-wise min-max 4-bit codes (16 levels), round-to-nearest, two per byte, fp32
    #: (min, scale) per block of ``kernels.PACKED_BLOCK`` (512) elements: 4.125 bits per element
    INT4 = 4
    #: as INT4 with 2-bit codes (4 levels), four per byte
    INT2 = 5


class SyncStrategy(enum.IntEnum):
    """Role a peer takes in a shared-state synchronisation."""

    ENFORCE_POPULAR = 0
    SEND_ONLY = 1
    RECEIVE_ONLY = 2


class DType(enum.IntEnum):
    """Element types pccl reduces. Values are wire codes; never renumber."""

    FLOAT32 = 0
    FLOAT64 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT8 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    UINT8 = 8

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def storage(self) -> np.dtype:
        """numpy dtype of the raw storage (bfloat16 is stored as uint16)."""
        return _STORAGE[DType(self)]

    @property
    def is_float(self) -> bool:
        return self in (DType.FLOAT32, DType.FLOAT64, DType.FLOAT16, DType.BFLOAT16)


_ITEMSIZE: dict[DType, int] = {
    DType.FLOAT32: 4,
    DType.FLOAT64: 8,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.INT8: 1,
    DType.INT16: 2,
    DType.INT32: 4,
    DType.INT64: 8,
    DType.UINT8: 1,
}
_STORAGE: dict[DType, np.dtype] = {
    DType.FLOAT32: np.dtype(np.float32),
    DType.FLOAT64: np.dtype(np.float64),
    DType.FLOAT16: np.dtype(np.float16),
    DType.BFLOAT16: np.dtype(np.uint16),
    DType.INT8: np.dtype(np.int8),
    DType.INT16: np.dtype(np.int16),
    DType.INT32: np.dtype(np.int32),
    DType.INT64: np.dtype(np.int64),
    DType.UINT8: np.dtype(np.uint8),
}
_FROM_NUMPY = {v: k for k, v in _STORAGE.items() if k is not DType.BFLOAT16}


def dtype_of(dtype: np.dtype) -> DType:
    """Return the :class:`DType` for a numpy dtype.

    Raises:
        TypeError: the dtype is not one pccl reduces (bool, uint16/32/64, complex, object...).
    """
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":  # ml_dtypes.bfloat16
        return DType.BFLOAT16
    try:
        return _FROM_NUMPY[dt.newbyteorder("=") if dt.byteorder not in "=|" else dt]
    except KeyError:
        raise TypeError(
            f"unsupported dtype {dt}; pccl reduces float32/64, float16, bfloat16, int8-int64, uint8"
        ) from None


def storage_view(arr: np.ndarray) -> tuple[np.ndarray, DType]:
    """Return ``(flat native-endian storage view, DType)`` of a C-contiguous array.

    Raises:
        TypeError: unsupported dtype or not a numpy array.
        ValueError: the array is not C-contiguous or not native byte order.
    """
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise ValueError("array must be C-contiguous (use np.ascontiguousarray)")
    if arr.dtype.byteorder == (">" if np.little_endian else "<"):
        raise ValueError("array must be in native byte order")
    dt = dtype_of(arr.dtype)
    return arr.reshape(-1).view(dt.storage), dt


@dataclass(frozen=True)
class GateResult:
    """The master's decision at a quorum gate (:meth:`pccl.Communicator.quorum_gate`).

    Attributes:
        round_id: id of the round the decision opens (increasing, unique per master run).
        ready: peer ids whose contributions are in the round, sorted by ring order.
        members: the group's ring at the decision.
        included: this peer is in ``ready``.
        seconds: from this peer's arrival to the decision.
    """

    round_id: int
    ready: tuple[int, ...]
    members: tuple[int, ...]
    included: bool
    seconds: float


@dataclass(frozen=True)
class ReduceInfo:
    """Outcome of one all-reduce.

    Attributes:
        world_size: peers that took part.
        tx_bytes: payload bytes this peer sent (headers excluded).
        rx_bytes: payload bytes this peer received.
        seconds: wall time from the master's go to completion on this peer.
    """

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float


@dataclass(frozen=True)
class SyncInfo:
    """Outcome of one shared-state synchronisation."""

    revision: int
    tx_bytes: int
    rx_bytes: int
