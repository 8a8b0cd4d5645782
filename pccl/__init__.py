"""pccl: fault-tolerant collective communication for training over the public internet.

This module re-exports the public API (DESIGN.md §2). ``pccl.BACKEND`` names the live kernel
backend (``"native"`` or ``"numpy"``); it is resolved on first access so importing pccl stays
cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pccl.config import Config
from pccl.errors import (
    AuthenticationFailed,
    CollectiveAborted,
    ConnectionLost,
    KVRefused,
    MasterUnreachable,
    PCCLError,
    PendingOperations,
    ProtocolError,
    SharedStateError,
    TooFewPeers,
    TopologyUpdateFailed,
    VerdictUnknown,
)
from pccl.shared_state import SharedState
from pccl.types import DType, GateResult, Quantization, ReduceInfo, ReduceOp, SyncInfo, SyncStrategy

if TYPE_CHECKING:  # resolved lazily at run time (see __getattr__)
    from pccl.peer.blocking import Communicator

__version__ = "0.1.0"

__all__ = [
    "BACKEND",
    "AuthenticationFailed",
    "CollectiveAborted",
    "Communicator",
    "Config",
    "ConnectionLost",
    "DType",
    "GateResult",
    "KVRefused",
    "MasterUnreachable",
    "PCCLError",
    "PendingOperations",
    "ProtocolError",
    "Quantization",
    "ReduceInfo",
    "ReduceOp",
    "SharedState",
    "SharedStateError",
    "SyncInfo",
    "SyncStrategy",
    "TooFewPeers",
    "TopologyUpdateFailed",
    "VerdictUnknown",
]


def __getattr__(name: str) -> Any:
    if name == "BACKEND":
        from pccl import kernels

        return kernels.BACKEND
    if name == "Communicator":
        from pccl.peer.blocking import Communicator

        return Communicator
    if name == "aio":
        import importlib

        return importlib.import_module("pccl.aio")
    raise AttributeError(f"module 'pccl' has no attribute {name!r}")
