"""Streaming DiLoCo: the model synced in fragments on a staggered schedule, optionally overlapped.

``DiLoCo(..., fragments=P, overlap=tau, mix=alpha)`` splits the parameters into P fragments
(:func:`split_fragments`: contiguous element ranges in model order, cut between parameters
where that keeps them balanced within 2 %, else inside one; the same on every peer) and runs a
*fragment boundary* every ``H / P`` inner steps, for fragment ``k mod P`` at the k-th one: every
fragment is synced every H inner steps, fragment p offset by ``p * H / P``.

* ``overlap = 0``: the boundary is blocking and runs bucket by bucket over the fragment
  (:class:`pccl.bindings.diloco_sync.SyncBoundary`), then admits, syncs and merges.
* ``overlap = tau >= 1`` (``tau < H / P``): the fragment's pseudo-gradient is built and its
  all-reduces started at the boundary; training goes on for tau inner steps; the exchange then
  *lands*: it is awaited (retried, blocking, after a departure, from the pseudo-gradient built
  at launch), applied to the fragment's outer parameters and momentum, the run admits and syncs,
  and the fragment's local parameters are merged.

Merging, over the fragment, with ``start`` where the local fragment stood when its exchange
launched (``merge`` only matters with ``overlap >= 1``; one fragment of fp32 scratch holds it):

* ``merge="eager"`` (default): at launch the local fragment jumps to this peer's own estimate of
  the outer step, ``start = outer - lr * d(own pseudo-gradient)`` with the fragment's outer
  momentum (not updated), so the tau overlapped inner steps run from about where the outer
  step will land; when the exchange lands the estimate is replaced by the real outer
  parameters: ``local = local - (1 - mix) * (start - outer)``. (The "eager update" of Kale et
  al., 2025, arXiv 2502.12996, applied to the fragment's overlap.)
* ``merge="carry"``: the same without the jump, ``start`` = the local fragment at launch: the
  tau inner steps are carried onto the outer parameters, ``local = outer + (local - start)``
  (``mix = 0``), but were taken from the pre-update point.
* ``merge="replace"``: ``local = mix * local + (1 - mix) * outer`` (the Streaming DiLoCo
  paper's; ``mix = 0`` replaces the fragment by the outer parameters, as unfragmented DiLoCo
  does, discarding the tau overlapped inner steps).

Measured on the char-LM at H = 8 (``docs/bench/2026-12-04/streaming``): with outer Nesterov
momentum the outer step moves the fragment well past the local models, and the inner steps
taken meanwhile from the old point cost more than the progress they carry; "eager" recovers
the loss of ``overlap = 0``.

With ``overlap = 0`` (``local == start``) both are the same. The pseudo-gradient of a fragment
is always ``outer - local`` for its own outer parameters, so local progress kept by a merge is
sent at the fragment's next boundary.

Shared state: every fragment's outer parameters and momentum are entries of the same
hash-verified :class:`SharedState` as before, synced at every fragment boundary (the sync that
ends it), so parity holds after every fragment boundary. The control vector holds the number of
fragment boundaries completed (which fragment is next), the bucket a retry resumes at, and the
inner step the run is at when it syncs (``INNER_POS``), so a newcomer admitted at any fragment
boundary takes the schedule's phase: it joins a retry (zeros, weight 0) or starts training at the
incumbents' inner step.

Host memory: ``overlap = 0`` adds two buckets of scratch; ``overlap >= 1`` one fragment's
pseudo-gradient and result, and for "eager"/"carry" its start (12 bytes per parameter of the
largest fragment; 8 with "replace"), so the bytes in
flight and the scratch of a boundary are about 1/P of unfragmented DiLoCo's.

Runs on the caller's (training) thread; the overlapped all-reduces run on the communicator's
event-loop thread, on buffers the training thread does not touch until the exchange lands.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pccl.bindings.diloco_common import (
    _APPLIED,
    _BOUNDARY,
    INNER_POS,
    NEXT_BUCKET,
    OuterStepInfo,
    Phase,
    _BoundaryIO,
    _local,
    _Refused,
    apply_outer,
    preview_step,
)
from pccl.bindings.diloco_exchange import launch_count, read_count, wait_all
from pccl.bindings.diloco_feedback import residual_add

from pccl.errors import CollectiveAborted, TooFewPeers
from pccl.types import ReduceOp

if TYPE_CHECKING:  # pragma: no cover
    from pccl.bindings.diloco import DiLoCo

__all__ = ["INNER_POS", "MERGES", "Fragments", "split_fragments"]

#: Ways a landed fragment is merged into the local parameters (see the module docstring).
MERGES = ("eager", "carry", "replace")

log = logging.getLogger("pccl.diloco")


def split_fragments(sizes: list[int], parts: int, tolerance: float = 0.02) -> list[tuple[int, int]]:
    """Element ranges ``[(a, b), ...]`` of ``parts`` fragments of the flat parameter vector.

    Fragment p ends at the parameter boundary nearest to ``(p + 1) / parts`` of the elements when
    that boundary is within ``tolerance`` of a fragment's size from it (whole modules), else
    exactly there (inside a parameter), so no fragment exceeds ``(1 + 2 * tolerance) / parts``
    of the model. Deterministic: every peer computes the same ranges.

    Raises:
        ValueError: more fragments than elements.
    """
    total = sum(sizes)
    if not 1 <= parts <= total:
        raise ValueError(f"fragments={parts} needs at least {parts} parameter elements")
    edges = np.cumsum([0, *sizes]).tolist()
    slack = tolerance * total / parts
    out: list[tuple[int, int]] = []
    start = 0
    for p in range(parts - 1):
        target = total * (p + 1) / parts
        inside = [e for e in edges if start < e <= total - (parts - 1 - p)]
        near = min(inside, key=lambda e: (abs(e - target), e)) if inside else None
        end = near if near is not None and abs(near - target) <= slack else round(target)
        end = min(max(end, start + 1), total - (parts - 1 - p))
        out.append((start, end))
        start = end
    out.append((start, total))
    return out


class Fragments:
    """Schedule and exchanges of streaming DiLoCo (see the module docstring)."""

    def __init__(self, d: DiLoCo, ranges: list[tuple[int, int]], pin: bool) -> None:
        self.d = d
        self.ranges = ranges
        self.parts = len(ranges)
        self.period = d.sync_every // self.parts
        self.tau = d.overlap
        self.mix = d.mix
        #: per fragment, its buckets ``[lo, hi)`` (indexes into ``d._buckets``)
        self.buckets: list[tuple[int, int]] = []
        for a, b in ranges:
            ks = [k for k, (x, _) in enumerate(d._buckets) if a <= x < b]
            self.buckets.append((ks[0], ks[-1] + 1))
        size = max(b - a for a, b in ranges) if self.tau else 0
        self._send_t = torch.zeros(size, dtype=torch.float32, pin_memory=pin and size > 0)
        self._recv_t = torch.zeros(size, dtype=torch.float32, pin_memory=pin and size > 0)
        self._send: np.ndarray = self._send_t.numpy()
        self._recv: np.ndarray = self._recv_t.numpy()
        #: merge "eager"/"carry": where the local fragment stood at launch (fp32, host)
        carry = size if d.merge != "replace" else 0
        self._start_t = torch.zeros(carry, dtype=torch.float32, pin_memory=pin and carry > 0)
        self.inflight: tuple[int, list[Any]] | None = None

    @property
    def scratch_bytes(self) -> int:
        return int(self._send.nbytes + self._recv.nbytes + self._start_t.numel() * 4)

    def next_fragment(self) -> int:
        return int(self.d._ctrl[_BOUNDARY]) % self.parts

    # ------------------------------------------------------------------ schedule

    def step(self) -> OuterStepInfo | None:
        """After ``d._inner`` was incremented: launch, land or run a fragment boundary."""
        d = self.d
        if self.inflight is not None and d._inner == self.tau:
            return self._land()
        if d._inner < self.period:
            return None
        d._inner = 0
        if self.tau:
            self._launch(self.next_fragment())
            return None
        return self._blocking(self.next_fragment())

    def _blocking(self, f: int) -> OuterStepInfo:
        d = self.d
        t0 = time.perf_counter()
        d._io = _BoundaryIO()
        d._take_weight()
        lo, hi = self.buckets[f]
        if int(d._ctrl[NEXT_BUCKET]) < lo:
            d._ctrl[NEXT_BUCKET] = lo
        assert d._sync_path is not None
        applied = d._sync_path.run(Phase.RETRY, hi)
        self._finish(f, applied, inner_pos=0)
        return d._info(applied, time.perf_counter() - t0, fragment=f)

    # ------------------------------------------------------------------ overlapped exchange

    def _fill(self, f: int) -> None:
        d = self.d
        a, b = self.ranges[f]
        send = self._send[: b - a]
        carry = self._start_t.numel() > 0
        if carry:
            d._local_range_to(self._start_t[: b - a], a, b)
        if not d._weight:
            send.fill(0)
            return
        if carry:
            np.subtract(d._theta[a:b], self._start_t[: b - a].numpy(), out=send)
        else:
            d._local_range_to(self._send_t[: b - a], a, b)
            np.subtract(d._theta[a:b], send, out=send)
        if d.merge == "eager":
            self._eager(a, b, send)
        if d._residual is not None:
            residual_add(d, send, a)
        if d._weight != 1:
            np.multiply(send, np.float32(d._weight), out=send)

    def _start(self, f: int) -> list[Any]:
        """Start the count and the fragment's bucket all-reduces from the built send."""
        d = self.d
        base = self.ranges[f][0]
        try:
            handles: list[Any] = [launch_count(d)]
        except CollectiveAborted as e:
            return [_Refused(e)]
        lo, hi = self.buckets[f]
        try:
            for k in range(lo, hi):
                a, b = d._buckets[k]
                handles.append(
                    d.comm.all_reduce_async(
                        self._send[a - base : b - base],
                        self._recv[a - base : b - base],
                        op=ReduceOp.SUM,
                        quantization=d.quantization,
                        tag=d._tag + 1 + k,
                    )
                )
        except CollectiveAborted as e:  # refused before any I/O: retried when it lands
            wait_all(d, handles)
            return [_Refused(e)]
        except BaseException:
            wait_all(d, handles)
            raise
        return handles

    def _launch(self, f: int) -> None:
        d = self.d
        d._take_weight()
        self._fill(f)
        try:
            self.inflight = (f, self._start(f))
        except TooFewPeers:
            log.info("fragment %d: fewer than 2 peers, boundary dropped", f)
            self.inflight = (f, [])

    def _land(self) -> OuterStepInfo:
        """Wait for the fragment's exchange (retrying after departures), apply it, sync."""
        d = self.d
        assert self.inflight is not None
        f, handles = self.inflight
        self.inflight = None
        t0 = time.perf_counter()
        d._io = _BoundaryIO()
        applied = False
        while handles:
            error = wait_all(d, handles)
            handles = []
            if error is None:
                applied = read_count(d)
                break
            if not isinstance(error, CollectiveAborted):
                raise error
            d.stats.retries += 1
            d._io.retries += 1
            log.info("fragment %d: all-reduce aborted (%s); re-forming and retrying", f, error)
            d._ctrl[INNER_POS] = self.tau
            d._admit_and_sync(Phase.RETRY)
            try:
                handles = self._start(f)
            except TooFewPeers:
                log.info("fragment %d: fewer than 2 peers, boundary dropped", f)
        if applied:
            weight = int(d._count_out[0])
            base = self.ranges[f][0]
            lo, hi = self.buckets[f]
            for k in range(lo, hi):
                a, b = d._buckets[k]
                send = self._send[a - base : b - base]
                apply_outer(d, a, b, send, self._recv[a - base : b - base], weight)
        self._finish(f, applied, inner_pos=self.tau)
        return d._info(applied, time.perf_counter() - t0, fragment=f)

    # ------------------------------------------------------------------ boundary end, joining

    def _finish(self, f: int, applied: bool, inner_pos: int) -> None:
        d = self.d
        if applied:
            d.stats.applied += 1
            d._ctrl[_APPLIED] += 1
        else:
            d.stats.dropped += 1
        d.stats.boundaries += 1
        d._ctrl[_BOUNDARY] += 1
        d._ctrl[NEXT_BUCKET] = 0
        d._ctrl[INNER_POS] = inner_pos
        d._admit_and_sync(Phase.IDLE)
        self._merge(*self.ranges[f])

    def _eager(self, a: int, b: int, grad: np.ndarray) -> None:
        """``start = outer - lr * d(grad)`` (this peer's estimate of the outer step, the outer
        state untouched) over ``[a, b)``, and the local fragment moved there."""
        d = self.d
        mom = None if d._mom is None else d._mom[a:b]
        start = self._start_t[: b - a].numpy()
        preview_step(
            d._theta[a:b], grad, mom, d.outer_lr, d.outer_momentum, d.nesterov, d._scratch, start
        )
        with torch.no_grad():
            for _, p, off, n, _ in d._params:
                lo, hi = max(a, off), min(b, off + n)
                if lo < hi:
                    loc = _local(p).reshape(-1)[lo - off : hi - off]
                    loc.copy_(self._start_t[lo - a : hi - a])

    def _merge(self, a: int, b: int) -> None:
        """Merge the outer parameters ``[a, b)`` into the local ones (module docstring)."""
        d = self.d
        carry = self.tau > 0 and self._start_t.numel() > 0
        if carry:  # start -> outer - start: the correction the exchange brought
            torch.sub(d._theta_t[a:b], self._start_t[: b - a], out=self._start_t[: b - a])
        with torch.no_grad():
            for _, p, off, n, _ in d._params:
                lo, hi = max(a, off), min(b, off + n)
                if lo >= hi:
                    continue
                loc = _local(p).reshape(-1)[lo - off : hi - off]
                if carry:
                    fix = self._start_t[lo - a : hi - a].to(loc.device, loc.dtype)
                    loc.add_(fix, alpha=1 - self.mix)
                    continue
                outer = d._theta_t[lo:hi]
                if self.mix == 0:
                    loc.copy_(outer)
                else:
                    loc.mul_(self.mix).add_(outer.to(loc.device, loc.dtype), alpha=1 - self.mix)

    def join(self, phase: Any) -> None:
        """A newcomer after its first sync: join a retry, then take the run's inner step."""
        d = self.d
        if phase is Phase.RETRY:
            d._take_weight()  # zeros, weight 0: we have not trained this round
            f = self.next_fragment()
            if self.tau:
                self._fill(f)
                try:
                    self.inflight = (f, self._start(f))
                except TooFewPeers:
                    self.inflight = (f, [])
                self._land()
            else:
                self._blocking(f)
        elif phase is not Phase.IDLE:
            raise ValueError(f"a fragmented run never syncs in phase {phase.name}")
        d._copy_anchor_to_local()
        d._inner = int(d._ctrl[INNER_POS])

    def flush(self) -> OuterStepInfo | None:
        """Land the exchange in flight now (every peer at the same inner step)."""
        return self._land() if self.inflight is not None else None

    def close(self) -> None:
        if self.inflight is None:
            return
        _, handles = self.inflight
        self.inflight = None
        for h in handles:
            try:
                h.wait()
            except Exception:
                pass
