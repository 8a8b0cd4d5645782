"""Quorum outer steps for :class:`pccl.bindings.diloco.DiLoCo` (``min_quorum=...``).

A slow peer must not slow the group down. In quorum mode every peer runs a *round driver*: a
thread that takes part in every outer round of the group, whether or not this peer's training
thread has a contribution ready. A round is::

    gate (the master decides who is in) -> all-reduce -> outer step -> update_topology -> sync

1. **Gate.** The driver arrives at the group's quorum gate (:meth:`pccl.Communicator.quorum_gate`)
   ready if the training thread has posted a pseudo-gradient, not ready otherwise; a post made
   while the gate is open marks it ready. The master decides the gate once every member has
   arrived and either all are ready, or ``min_quorum`` are and ``grace_s`` has passed since they
   were. The decision lists the ready peers: *which peers contributed is decided by the master*.
2. **All-reduce.** The ready peers contribute their weighted pseudo-gradient, the others zeros
   with weight 0 (the same SUM of weights and pseudo-gradients as synchronous DiLoCo). A
   departure aborts it; the drivers then re-form (``update_topology`` and a sync) and return
   to the gate with their posts intact, so nothing is lost or counted twice.
3. **Outer step** with the weighted mean, on the driver thread, bit-identical everywhere.
4. ``update_topology()`` admits newcomers, then the shared-state sync proves parity (and gives
   a newcomer the outer state: it enters at the next gate).

The training thread, at its boundary (every H inner steps), posts ``start - local`` weighted by
the tokens it trained on and waits until a round has applied it; it then restarts from the
outer parameters of that round. What a slower peer does:

- **Called early.** When the quorum is in and the grace runs, the master tells the members that
  are not ready (``M2P_GATE_QUORUM``). Their training thread then posts at its next inner step
  what it trained so far, weighted by its tokens, and so joins the round on time: its
  pseudo-gradient is fresh (taken against the round's own start) and weighs what it covers.
- **Adapts.** A peer called early after ``k`` steps aims at ``k - 1`` steps next time (ready
  before the quorum, so the group does not even wait the rest of its current step); one that
  idled more than a step waiting for its round aims one step higher, never above H (the
  dynamic local updates of asynchronous local-SGD, driven by the master's signal instead of a
  timing model). Fast peers keep H.
- **Late anyway.** A peer that cannot post within the grace (one inner step longer than
  ``grace_s``) keeps training; its pseudo-gradient, taken against the older outer parameters
  it started from, joins the first round after it is posted, weighted by what it covers.
  Nothing is dropped and nothing is counted twice.

A straggler is never evicted for being slow: its driver is present at every gate. Only a silent
peer (its process hung or dead) is removed, by the master's deadlines. Choose ``grace_s`` a
little above the slowest peer's inner-step time.

Extra state (schedulers, counters) is staged: a contributor's snapshot at its post. Each round
takes the snapshot of one contributor, the first of the gate's ready list (ring order), and
moves it to every peer in a small uint8 all-reduce next to the pseudo-gradient (that peer's
bytes plus zeros), so every peer enters the round's sync with the same bytes and no vote differs
(contributors whose schedules differ would otherwise be parity violations in the master's
eyes). A peer whose schedule lags adopts the run's when it picks up the new outer parameters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash
from pccl.bindings.diloco_exchange import average, launch, wait_all

from pccl.errors import CollectiveAborted, PCCLError, TooFewPeers
from pccl.types import ReduceOp

if TYPE_CHECKING:  # pragma: no cover
    from pccl.bindings.diloco import DiLoCo

log = logging.getLogger("pccl.diloco")

__all__ = ["QuorumDriver", "RoundRecord"]

#: Longest single wait of the driver on a gate before it re-checks for close() (seconds).
_GATE_SLICE_S = 0.5
#: Rounds kept for :meth:`DiLoCo.rounds`.
_ROUND_LOG = 4096


@dataclass(frozen=True)
class RoundRecord:
    """One outer round as seen by this peer's driver (quorum mode).

    Attributes:
        outer_step: the run's boundary counter after the round.
        applied: an outer update was applied (False: nobody had a contribution in it, or fewer
            than two peers were left).
        contributors: peer ids whose pseudo-gradients are in the update (the gate's decision).
        weight: their total weight.
        included: this peer's contribution is in it.
        world_size: members of the group at the gate.
        revision: shared-state revision after the round's sync.
        digest: XXH3-128 over the outer state's entry hashes after the sync ("" unless
            ``DiLoCo(trace_hashes=True)``): identical on every peer of a round.
        retries: aborted attempts (departures) before the round completed.
        tx_bytes, rx_bytes: all-reduce payload bytes of the round on this peer.
        sync_tx_bytes, sync_rx_bytes: shared-state bytes of the round's syncs on this peer.
        seconds: wall time of the round on this peer, gate wait included.
    """

    outer_step: int
    applied: bool
    contributors: tuple[int, ...]
    weight: int
    included: bool
    world_size: int
    revision: int
    digest: str
    retries: int
    tx_bytes: int
    rx_bytes: int
    sync_tx_bytes: int
    sync_rx_bytes: int
    seconds: float


@dataclass
class _Post:
    """A contribution waiting for a round, and what the training thread gets back."""

    weight: int
    token_weighted: bool
    extra: list[bytes]  # staged extra-state snapshots (entry order)
    done: threading.Event = field(default_factory=threading.Event)
    record: RoundRecord | None = None
    extra_after: list[bytes] = field(default_factory=list)


class QuorumDriver:
    """The round driver of one DiLoCo peer in quorum mode; see the module docstring."""

    def __init__(self, d: DiLoCo, min_quorum: int, grace_s: float) -> None:
        self.d = d
        self.min_quorum = min_quorum
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._post: _Post | None = None
        self._gate: Any = None  # the open gate's handle (mark_ready target)
        self._stop = threading.Event()
        #: set when the master says the open gate has its quorum and this peer is not ready:
        #: the training thread then posts at its next inner step (what it covers so far)
        self.post_now = threading.Event()
        self._error: BaseException | None = None
        self._log: deque[RoundRecord] = deque(maxlen=_ROUND_LOG)
        self._thread = threading.Thread(target=self._main, name="pccl-diloco-rounds", daemon=True)
        #: the round's extra-state snapshot travels here (one contributor's bytes, zeros else)
        self._xbuf = np.zeros(sum(s.buf.nbytes for s in d._extra), dtype=np.uint8)
        self._xvalid = False  # _xbuf holds this round's extra state

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------ training thread

    def post(self, weight: int, token_weighted: bool, extra: list[bytes]) -> _Post:
        """Hand a filled ``send`` (and its weight) to the driver; mark the open gate ready."""
        self.raise_error()
        p = _Post(weight, token_weighted, extra)
        self.post_now.clear()
        with self._lock:
            if self._post is not None:
                raise RuntimeError("a contribution is already waiting for a round")
            self._post = p
            gate = self._gate
        if gate is not None:
            gate.mark_ready()
        return p

    def wait(self, p: _Post) -> RoundRecord:
        """Until a round applied (or dropped) ``p``; raises the driver's error if it failed."""
        while not p.done.wait(0.2):
            self.raise_error()
        assert p.record is not None
        return p.record

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def rounds(self) -> list[RoundRecord]:
        """Completed rounds since the last call (oldest first)."""
        out = []
        while True:
            try:
                out.append(self._log.popleft())
            except IndexError:
                return out

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ driver thread

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                self._round()
        except BaseException as e:  # handed to the training thread at its next call
            if not self._stop.is_set():
                log.error("DiLoCo round driver failed: %s", e)
                self._error = e

    def _gate_wait(self) -> Any:
        """Arrive at the gate (ready iff a post waits) and wait for the master's decision.
        Returns None when closing (the arrival is withdrawn)."""
        comm = self.d.comm
        with self._lock:
            gate = comm.quorum_gate_async(
                self.d._tag,
                ready=self._post is not None,
                min_quorum=self.min_quorum,
                grace_s=self.grace_s,
            )
            self._gate = gate
            self.post_now.clear()
            if self._post is None:
                gate.on_quorum(self.post_now.set)
        try:
            while not gate.done():
                if self._stop.is_set():
                    try:
                        gate.wait(timeout=0.001)  # expires: withdraws the arrival
                    except PCCLError:
                        pass
                    return None
                gate.wait_done(_GATE_SLICE_S)
            return gate.wait()
        finally:
            with self._lock:
                self._gate = None

    def _round(self) -> None:
        d = self.d
        t0 = time.perf_counter()
        d._io = type(d._io)()
        retries = 0
        while True:
            try:
                res = self._gate_wait()
            except CollectiveAborted as e:
                if self._stop.is_set():
                    return
                retries += 1
                d.stats.retries += 1
                log.info("outer round gate aborted (%s); re-forming", e)
                self._reform()
                continue
            if res is None:
                return  # closing
            with self._lock:
                post = self._post if res.included else None
            if res.included and post is None:  # pragma: no cover - the gate reads our post
                raise RuntimeError("the master counted a contribution this peer never posted")
            first = bool(res.ready) and res.ready[0] == d.comm.peer_id
            try:
                applied, weight = self._reduce(post, first)
            except CollectiveAborted as e:
                retries += 1
                d.stats.retries += 1
                log.info("outer round all-reduce aborted (%s); re-forming", e)
                self._reform()
                continue
            break
        d._ctrl[0] += 1  # _BOUNDARY
        d._apply(applied)
        d.stats.boundaries += 1
        if d._extra and self._xvalid:  # the round's extra state, the same on every peer
            off = 0
            for slot in d._extra:
                n = slot.buf.nbytes
                slot.buf[...] = self._xbuf[off : off + n]
                off += n
        d._admit_and_sync_quorum()
        digest = ""
        if d.trace_hashes:
            hs = d.shared_state.hashes()
            digest = xxhash.xxh3_128_hexdigest(
                "".join(f"{k}={hs[k]};" for k in sorted(hs)).encode()
            )
        io = d._io
        rec = RoundRecord(
            outer_step=d.outer_step,
            applied=applied,
            contributors=tuple(res.ready),
            weight=weight if applied else 0,
            included=post is not None,
            world_size=len(res.members),
            revision=d.revision,
            digest=digest,
            retries=retries,
            tx_bytes=io.tx,
            rx_bytes=io.rx,
            sync_tx_bytes=io.sync_tx,
            sync_rx_bytes=io.sync_rx,
            seconds=time.perf_counter() - t0,
        )
        self._log.append(rec)
        if post is not None:
            np.copyto(d._anchor, d._theta)
            post.extra_after = [slot.buf.tobytes() for slot in d._extra]
            post.record = rec
            with self._lock:
                self._post = None
            post.done.set()

    def _reduce(self, post: _Post | None, first: bool) -> tuple[bool, int]:
        """The round's all-reduce: our post (weighted) or zeros; returns (applied, weight).
        ``first``: this peer is the round's first contributor, whose extra state the round
        takes (it goes into ``_xbuf``; the others send zeros)."""
        d = self.d
        self._xvalid = False
        if d._extra:
            if first and post is not None:
                self._xbuf[...] = np.frombuffer(b"".join(post.extra), dtype=np.uint8)
            else:
                self._xbuf.fill(0)
        if post is not None:
            d._weight = post.weight
            d._round_token_weighted = post.token_weighted
            src = d._send
        else:
            d._weight = 0
            d._round_token_weighted = False
            d._recv.fill(0)
            src = d._recv  # in place: the training thread may be filling send
        try:
            handles = launch(d, src)
        except TooFewPeers:
            log.info("outer step %d: fewer than 2 peers, round dropped", d.outer_step)
            self._xvalid = post is not None  # alone: its own snapshot is the run's
            return False, 0
        if d._extra:
            tag = d._tag + 1 + len(d._buckets)
            try:
                handles.append(d.comm.all_reduce_async(self._xbuf, op=ReduceOp.SUM, tag=tag))
            except BaseException:
                wait_all(d, handles)
                raise
        error = wait_all(d, handles)
        if error is not None:
            raise error
        self._xvalid = True
        applied = average(d)
        return applied, int(d._count_out[0])

    def _reform(self) -> None:
        """After an abort: admit/re-wire, then sync (the outer state is unchanged)."""
        if self._stop.is_set():
            return
        self.d._admit_and_sync_quorum()
