"""Pieces every DiLoCo module shares: constants, the control-vector layout, the boundary phase,
the per-boundary records and the deterministic outer step (:func:`nesterov_step`).

No state lives here; :mod:`pccl.bindings.diloco` re-exports the public names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pccl.bindings.diloco_feedback import store_residual

from pccl.errors import CollectiveAborted

#: Default all-reduce bucket: one operation per <= 32 MiB of fp32 pseudo-gradient. Synchronous
#: mode keeps two buckets of host scratch (see :mod:`pccl.bindings.diloco_sync`).
DEFAULT_BUCKET_BYTES = 32 << 20
#: Default first tag; the count uses it, bucket i uses ``tag + 1 + i``.
DEFAULT_TAG = 0x0D10C000
_CHUNK = 1 << 20  # elements per step of the chunked host loops (bounded scratch)


class Phase(enum.IntEnum):
    """What the incumbents do right after the sync a newcomer joins them in."""

    IDLE = 0  #: the boundary is over: inner steps next
    LAUNCH = 1  #: (delayed) the background all-reduce of the last round starts next
    RETRY = 2  #: the all-reduce a departure aborted is retried next, then the boundary ends
    FLUSH_RETRY = 3  #: as RETRY, inside :meth:`DiLoCo.flush` (no new round is launched after)


# Control vector (int64 shared-state entry "diloco/ctrl").
_BOUNDARY, _APPLIED, _PHASE, _FINGERPRINT = range(4)
#: the first bucket not applied yet (a retry resumes there; see diloco_sync)
NEXT_BUCKET = 4
#: the run's inner step within the fragment period at its last sync (see diloco_fragments)
INNER_POS = 5
_CTRL_LEN = 6
# Contributor count vector (int64, all-reduced with SUM next to the pseudo-gradient).
_WEIGHT, _CONTRIBUTORS, _TOKEN_WEIGHTED = range(3)


@dataclass(frozen=True)
class OuterStepInfo:
    """What happened at one outer boundary (returned by :meth:`DiLoCo.step`).

    Attributes:
        outer_step: boundaries completed by the run so far (shared; a newcomer adopts it).
        applied: an outer update was applied (False: dropped for lack of peers).
        world_size: peers in the group after the boundary.
        contributors: peers whose pseudo-gradient is in the applied update (0 when dropped).
        weight: total weight of the applied update: the sum over contributors of the tokens
            (or samples) each passed to :meth:`DiLoCo.step` during its round, 1 per
            contributor that passed none (0 when dropped).
        tx_bytes, rx_bytes: all-reduce payload bytes of this boundary, retries included.
        sync_tx_bytes, sync_rx_bytes: shared-state bytes of this boundary's syncs.
        revision: shared-state revision after the boundary.
        retries: all-reduce attempts aborted by a departure and retried.
        seconds: wall time of the boundary on this peer.
    """

    outer_step: int
    applied: bool
    world_size: int
    contributors: int
    weight: int
    tx_bytes: int
    rx_bytes: int
    sync_tx_bytes: int
    sync_rx_bytes: int
    revision: int
    retries: int
    seconds: float
    fragment: int = 0  #: the fragment this boundary synced (streaming DiLoCo; else 0)


class _Refused:
    """Stands for an all-reduce the communicator refused to start (``CollectiveAborted``
    before any I/O, e.g. after a reconnection re-formed the ring): waiting raises it, so the
    round takes the ordinary retry path."""

    def __init__(self, error: CollectiveAborted) -> None:
        self.error = error

    def wait(self, timeout: float | None = None) -> Any:
        raise self.error


@dataclass
class DiLoCoStats:
    """Cumulative counters of one :class:`DiLoCo` (this peer's view)."""

    boundaries: int = 0
    applied: int = 0
    dropped: int = 0
    retries: int = 0
    syncs: int = 0
    repairs: int = 0  #: syncs after the first that received bytes (divergence repaired)
    tx_bytes: int = 0
    rx_bytes: int = 0
    sync_tx_bytes: int = 0
    sync_rx_bytes: int = 0


def apply_outer(d: Any, a: int, b: int, send: np.ndarray, recv: np.ndarray, weight: int) -> None:
    """One span ``[a, b)`` of an outer step, shared by sync and streaming DiLoCo: average
    ``recv`` (the SUM over ``weight`` contributions) in place, store the error-feedback
    residual of what this peer sent, and take the Nesterov step on ``d``'s outer state."""
    if weight > 1:
        np.divide(recv, np.float32(weight), out=recv)
    if d._weight and d._residual is not None:
        store_residual(d, send, a)
    nesterov_step(
        d._theta[a:b],
        recv,
        None if d._mom is None else d._mom[a:b],
        d.outer_lr,
        d.outer_momentum,
        d.nesterov,
        d._scratch,
    )


def nesterov_step(
    theta: np.ndarray,
    grad: np.ndarray,
    momentum: np.ndarray | None,
    lr: float,
    mu: float,
    nesterov: bool,
    scratch: np.ndarray,
) -> None:
    """One SGD step ``theta -= lr * d`` on flat float32 buffers, in place, deterministic.

    ``buf = mu * buf + g``; ``d = g + mu * buf`` (Nesterov) or ``buf`` (heavy ball), as
    ``torch.optim.SGD`` with ``dampening=0``. Every operation is an element-wise float32 numpy
    ufunc (exactly rounded, never fused), so equal inputs give equal bytes on every platform.
    ``grad`` is overwritten; ``scratch`` is float32 of any length >= 1.
    """
    lr32, mu32 = np.float32(lr), np.float32(mu)
    n = theta.shape[0]
    step = max(1, min(_CHUNK, scratch.shape[0]))
    for a in range(0, n, step):
        b = min(n, a + step)
        g = grad[a:b]
        tmp = scratch[: b - a]
        d = g
        if momentum is not None:
            m = momentum[a:b]
            np.multiply(m, mu32, out=m)
            np.add(m, g, out=m)
            if nesterov:
                np.multiply(m, mu32, out=tmp)
                np.add(g, tmp, out=g)
            else:
                d = m
        np.multiply(d, lr32, out=tmp)
        np.subtract(theta[a:b], tmp, out=theta[a:b])


def preview_step(
    theta: np.ndarray,
    grad: np.ndarray,
    momentum: np.ndarray | None,
    lr: float,
    mu: float,
    nesterov: bool,
    scratch: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out = theta - lr * d``: where :func:`nesterov_step` would move ``theta`` for ``grad``,
    with ``theta``, ``grad`` and ``momentum`` untouched (the "eager" estimate of delayed and
    streaming DiLoCo). The same float32 operations as :func:`nesterov_step`; ``out`` may not
    alias the inputs; ``scratch`` is float32 of any length >= 1."""
    lr32, mu32 = np.float32(lr), np.float32(mu)
    n = theta.shape[0]
    step = max(1, min(_CHUNK, scratch.shape[0]))
    for a in range(0, n, step):
        b = min(n, a + step)
        tmp = scratch[: b - a]
        if momentum is not None:
            np.multiply(momentum[a:b], mu32, out=tmp)
            np.add(tmp, grad[a:b], out=tmp)
            if nesterov:
                np.multiply(tmp, mu32, out=tmp)
                np.add(tmp, grad[a:b], out=tmp)
        else:
            np.copyto(tmp, grad[a:b])
        np.multiply(tmp, lr32, out=tmp)
        np.subtract(theta[a:b], tmp, out=out[a:b])


def _named_params(model: Any) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]]
    if isinstance(model, torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elif isinstance(model, Mapping):
        named = list(model.items())
    else:
        named = []
        for i, item in enumerate(model):
            if isinstance(item, tuple):
                named.append((str(item[0]), item[1]))
            else:
                named.append((f"p{i}", item))
    if not named:
        raise ValueError("the model has no trainable parameters")
    seen: set[str] = set()
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
        if name in seen:
            raise ValueError(f"duplicate parameter name {name!r}")
        seen.add(name)
    return named


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor holding this peer's values: the local shard of a DTensor (shares storage).

    Fetched at every use: FSDP may re-point a DTensor at new storage (e.g. after ``.to()``).
    """
    if callable(getattr(p, "to_local", None)):
        return p.to_local()  # type: ignore[attr-defined]
    return p


@dataclass
class _BoundaryIO:
    tx: int = 0
    rx: int = 0
    sync_tx: int = 0
    sync_rx: int = 0
    retries: int = 0
    contributors: int = 0
    weight: int = 0
