"""Synchronous DiLoCo's outer boundary, one bucket at a time (bounded host memory).

The synchronous boundary keeps no full-model scratch: the pseudo-gradient of bucket ``k``
(``w * (outer - local + residual)`` over the bucket's element range) is built in a bucket-sized
send buffer, all-reduced into a bucket-sized receive buffer, averaged and applied to the outer
parameters and momentum of that range, and its error-feedback residual is stored, before bucket
``k + 1`` is built. Host memory is then the outer parameters and momentum (fp32), the residual
(bf16 bits) and two buckets of scratch, instead of five full fp32 copies.

Invariants:
    * Buckets are applied in order; ``ctrl[NEXT_BUCKET]`` (a shared-state entry) is the first
      bucket not applied yet. A bucket's all-reduce either succeeds everywhere (the master's
      verdict) or is retried after ``update_topology()`` and a sync in phase RETRY, from that
      bucket on; a newcomer admitted there learns the bucket from the sync and contributes zeros
      with weight 0 to the rest. The buckets already applied keep their update (the mean of the
      peers that took part in them), so no pseudo-gradient reaches the outer state twice.
    * One contributor count is all-reduced per attempt (next to its first bucket): the group
      only changes at ``update_topology()``, which only runs between attempts.
    * A bucket's pseudo-gradient is rebuilt from the outer parameters, the unchanged local model
      and the residual, so a retry sends the same bytes; a dropped bucket (fewer than two peers)
      keeps its residual.

Runs on the caller's (training) thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pccl.bindings.diloco_common import NEXT_BUCKET, Phase, apply_outer
from pccl.bindings.diloco_exchange import launch_count, read_count, wait_all
from pccl.bindings.diloco_feedback import residual_add

from pccl.errors import CollectiveAborted, TooFewPeers
from pccl.types import ReduceOp

if TYPE_CHECKING:  # pragma: no cover
    from pccl.bindings.diloco import DiLoCo

__all__ = ["NEXT_BUCKET", "SyncBoundary"]

log = logging.getLogger("pccl.diloco")


class SyncBoundary:
    """Bucket-by-bucket all-reduce and outer step of one synchronous boundary.

    Args:
        d: the owning :class:`DiLoCo` (its outer state, residual, buckets and counters).
        pin: allocate the two bucket buffers in pinned memory (model on CUDA).
    """

    def __init__(self, d: DiLoCo, pin: bool) -> None:
        self.d = d
        size = max([b - a for a, b in d._buckets] + [1])
        self._send_t = torch.zeros(size, dtype=torch.float32, pin_memory=pin)
        self._recv_t = torch.zeros(size, dtype=torch.float32, pin_memory=pin)
        self._send: np.ndarray = self._send_t.numpy()
        self._recv: np.ndarray = self._recv_t.numpy()

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the per-boundary buffers (two buckets)."""
        return int(self._send.nbytes + self._recv.nbytes)

    def _fill(self, a: int, b: int) -> np.ndarray:
        """``send = w * (outer - local + residual)`` over ``[a, b)``, or zeros (weight 0)."""
        d = self.d
        send = self._send[: b - a]
        if not d._weight:
            send.fill(0)
            return send
        d._local_range_to(self._send_t[: b - a], a, b)
        np.subtract(d._theta[a:b], send, out=send)
        if d._residual is not None:
            residual_add(d, send, a)
        if d._weight != 1:
            np.multiply(send, np.float32(d._weight), out=send)
        return send

    def run(self, retry_phase: Phase, hi: int | None = None) -> bool:
        """Buckets ``ctrl[NEXT_BUCKET] .. hi`` (default: all); True if any bucket was applied.

        Raises:
            pccl errors other than ``CollectiveAborted``/``TooFewPeers`` (handled).
        """
        d = self.d
        applied = False
        n = len(d._buckets) if hi is None else hi
        while int(d._ctrl[NEXT_BUCKET]) < n:
            first = int(d._ctrl[NEXT_BUCKET])
            error: BaseException | None = None
            dropped = False
            try:
                handles: list[Any] = [launch_count(d)]
            except CollectiveAborted as e:  # refused before any I/O: retried as an abort
                error, handles = e, []
            except TooFewPeers:
                log.info("outer step %d: fewer than 2 peers, step dropped", d.outer_step)
                break
            for k in range(first, n) if error is None else ():
                a, b = d._buckets[k]
                send = self._fill(a, b)
                recv = self._recv[: b - a]
                try:
                    handles.append(
                        d.comm.all_reduce_async(
                            send,
                            recv,
                            op=ReduceOp.SUM,
                            quantization=d.quantization,
                            tag=d._tag + 1 + k,
                        )
                    )
                except CollectiveAborted as e:
                    error = e
                except TooFewPeers:  # the group shrank without update_topology: drop the rest
                    dropped = True
                error = wait_all(d, handles) or error
                handles = []
                if error is not None or dropped:
                    break
                if k == first and not read_count(d):
                    dropped = True  # nobody contributed: nothing to apply
                    break
                self._apply(a, b, send, recv)
                applied = True
                d._ctrl[NEXT_BUCKET] = k + 1
            if dropped:
                break
            if error is None:
                continue
            if not isinstance(error, CollectiveAborted):
                raise error
            d.stats.retries += 1
            d._io.retries += 1
            log.info(
                "outer step %d: all-reduce of bucket %d aborted (%s); re-forming and retrying",
                d.outer_step,
                int(d._ctrl[NEXT_BUCKET]),
                error,
            )
            d._admit_and_sync(retry_phase)
        return applied

    def _apply(self, a: int, b: int, send: np.ndarray, recv: np.ndarray) -> None:
        """Average ``recv`` (the bucket's SUM), outer step on ``[a, b)``, store the residual."""
        apply_outer(self.d, a, b, send, recv, int(self.d._count_out[0]))
