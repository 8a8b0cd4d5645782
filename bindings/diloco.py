"""DiLoCo and one-step-delayed (async) DiLoCo over a pccl peer group.

Every peer trains its own replica with its own inner optimizer and calls :meth:`DiLoCo.step`
after each inner step. Every ``sync_every`` (H) inner steps the peers meet at an *outer
boundary*:

1. pseudo-gradient ``g = start - local`` (+ the error-feedback residual), in fp32 flat buffers,
   where ``start`` is where the round began (the outer parameters in synchronous mode);
2. all-reduce of ``g`` over the group (quantized, one operation per <= ``bucket_bytes`` bucket,
   plus an 8-byte contributor count), retried after ``update_topology()`` when a peer leaves
   mid-operation (``CollectiveAborted``), dropped when fewer than two peers remain;
3. outer step on the flat buffers: SGD with (Nesterov) momentum, element-wise numpy float32
   (every operation exactly rounded, no FMA, no reduction), so every peer computes the same bytes
   from the same all-reduce result;
4. ``update_topology()`` (admits newcomers), then ``sync_shared_state`` of the *outer state*
   (outer parameters, momentum buffers and a control vector holding the boundary counter), which
   bumps the revision by exactly one and proves parity: the master compares the XXH3-128 hash of
   every entry, so an incumbent receiving bytes (``rx_bytes > 0``) means it had diverged and was
   repaired (counted in ``stats.repairs``; it never happens in steady state);
5. ``local <- outer``.

``delayed=True`` (async DiLoCo) overlaps communication with computation: the all-reduce of round
t runs in the background during the H inner steps of round t+1, and the group's mean is applied to
the outer parameters at the next boundary, one outer step late. Meanwhile each peer starts round
t+1 from an *eager* start: the outer step its own pseudo-gradient would give if it were the mean
(the "eager update" of Kallusky et al., 2025). Restarting every round from outer parameters that
lack the previous round instead makes each update land a round behind the point it was measured
at; with the default Nesterov momentum 0.9 that diverged here (held-out loss 6.0 against 0.67 for
DDP on ``examples/charlm.py``), while the eager start matches synchronous DiLoCo. A round's
pseudo-gradient is always taken against the point that round started from. The eager start is
local (it differs between peers); the outer state is shared and stays bit-identical. Call
:meth:`DiLoCo.flush` on every peer to apply the round still in flight (end of training,
evaluation, checkpoints).

Averaging and late joiners. The all-reduce is a SUM of pseudo-gradients plus a SUM of contributor
flags (1 from a peer that trained the round, 0 from one that did not), and the result is divided
by the count. A newcomer is admitted by ``update_topology()`` at some boundary and must then take
part in the group's collectives, but it has not trained the round being reduced: it contributes
zeros with weight 0, so the update is the mean over the peers that did train, bit-identical on
every peer, newcomer included. The control vector carries the phase the incumbents are in when
they sync (``Phase``), so the newcomer, whose first call is that same sync (made by the
constructor), knows whether to start training (IDLE), join the background all-reduce that is about
to start (LAUNCH, delayed mode) or join the retry of an aborted one (RETRY, FLUSH_RETRY). Every
``update_topology()`` DiLoCo makes is followed by a sync for this reason: construct ``DiLoCo``
right after ``comm.connect()``, before any other collective.

Error feedback (``error_feedback=True`` with a lossy ``quantization``): after an all-reduce
succeeds, each peer keeps ``e = g - D(Q(g))`` where Q/D are the wire encoding (block-wise uint8
min-max at ``Config.quant_block``, or fp16/bf16) applied to the pseudo-gradient it contributed,
and adds ``e`` to its next pseudo-gradient. This compensates the rounding of this peer's own
contribution at the wire's resolution. It does not compensate the ring's re-quantization of
partial sums nor the owner's final quantization of the sum (those errors belong to no single
peer; the blocks of the ring are aligned to its chunks, not to the whole buffer). A dropped step
keeps the residual (nothing of it reached the outer parameters).

A lone peer (group size 1) cannot all-reduce: its boundary is *dropped*, i.e. no outer update and
its local progress of the round is discarded (``local <- outer``), so a partitioned peer never
drifts from the run's outer parameters on its own.

Quorum mode (``min_quorum=``): a straggler-tolerant variant in which a round driver thread takes
part in every round and the master decides who contributes; see :mod:`pccl.bindings.diloco_quorum`.
Contributions are weighted by the tokens passed to :meth:`DiLoCo.step` (1 each without), and
``extra_state`` puts schedulers, RNGs and counters into the verified outer state.

Memory (host, per parameter): synchronous mode keeps the outer parameters and momentum (fp32,
4 + 4 bytes) and the error-feedback residual (bfloat16 bits, 2 bytes), and runs each boundary one
bucket at a time (:mod:`pccl.bindings.diloco_sync`) with two buckets of scratch (``bucket_bytes``
each, 32 MiB by default): 10 bytes plus a constant. Measured with
``python -m pccl.tools.diloco_memory --params 64Mi`` (peak RSS of real peers before and after).
Delayed and quorum modes also keep the pseudo-gradient, the all-reduce result and the round's
start as full fp32 copies. Host buffers are pinned when the model is on CUDA. Runs on the
caller's thread; in delayed mode the collective runs on the communicator's event-loop thread
concurrently with training, on buffers (pseudo-gradient, result, count) the training thread does
not touch until it waits for the collective.

Closing with an exchange in flight (delayed mode, or a boundary interrupted by an exception):
closing the communicator first fails the exchange at once (``ConnectionLost`` from its handle)
and logs nothing; :meth:`DiLoCo.close` then returns without waiting. Closing DiLoCo first waits
for the exchange to finish (or fail, within its deadline) and drops its result.

This module holds the public class and its state; the pieces live by role beside it:
:mod:`~pccl.bindings.diloco_common` (constants, records, the outer step),
:mod:`~pccl.bindings.diloco_exchange` (whole-model all-reduces, retries, averaging),
:mod:`~pccl.bindings.diloco_feedback` (error-feedback residual),
:mod:`~pccl.bindings.diloco_hparams` (what every peer must agree on), and the boundary paths
:mod:`~pccl.bindings.diloco_sync`, :mod:`~pccl.bindings.diloco_fragments` and
:mod:`~pccl.bindings.diloco_quorum`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pccl.bindings.diloco_common import (
    _APPLIED,
    _BOUNDARY,
    _CHUNK,
    _CTRL_LEN,
    _FINGERPRINT,
    _PHASE,
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TAG,
    NEXT_BUCKET,
    DiLoCoStats,
    OuterStepInfo,
    Phase,
    _BoundaryIO,
    _local,
    _named_params,
    nesterov_step,
)
from pccl.bindings.diloco_exchange import (
    fill_pseudo_grad,
    fill_quorum,
    launch_background,
    reduce_with_retry,
)
from pccl.bindings.diloco_fragments import MERGES, Fragments, split_fragments
from pccl.bindings.diloco_hparams import check_hyperparameters, fingerprint, hyperparameters
from pccl.bindings.diloco_quorum import QuorumDriver, RoundRecord
from pccl.bindings.diloco_sync import SyncBoundary
from pccl.bindings.extra_state import (
    DEFAULT_CAPACITY,
    Slot,
    array_slot,
    stateful_adapter,
    stateful_slot,
)

from pccl import kernels
from pccl.config import Config
from pccl.shared_state import SharedState
from pccl.types import Quantization

if TYPE_CHECKING:  # pragma: no cover
    from pccl.peer.blocking import Communicator, ReduceFuture

__all__ = ["DiLoCo", "DiLoCoStats", "OuterStepInfo", "Phase", "RoundRecord", "nesterov_step"]

log = logging.getLogger("pccl.diloco")


class DiLoCo:
    """DiLoCo outer optimisation over ``comm``'s peer group; see the module docstring.

    Args:
        comm: a connected blocking :class:`pccl.Communicator`. Construct DiLoCo right after
            ``connect()``: the constructor makes the peer's first shared-state sync, which is
            where a late joiner receives the run's outer state.
        model: an ``nn.Module`` (its trainable parameters), a mapping ``{name: tensor}`` or an
            iterable of tensors / ``(name, tensor)`` pairs. Tensors may live on any device and
            have any float dtype; DTensors (FSDP2) contribute their local shard. Every peer of
            the group must pass the same names and shapes.
        inner_optimizer: the optimizer the caller steps before each :meth:`step` (DiLoCo never
            steps or resets it; it is checked to optimise parameters of ``model``). May be None.
        sync_every: H, inner steps per outer step.
        outer_lr, outer_momentum, nesterov: the outer SGD (``torch.optim.SGD`` semantics).
        quantization: wire encoding of the pseudo-gradient all-reduce.
        delayed: one-step-delayed (async) DiLoCo.
        error_feedback: keep the local quantization residual (no-op without quantization).
        bucket_bytes: largest all-reduce (fp32 bytes); bigger models use several.
        tag: first collective tag used (``tag .. tag + buckets``); avoid them elsewhere.
        sync_timeout: deadline of each shared-state sync (default: the communicator's).
        extra_state: ``{name: value}`` kept identical across peers with the outer state and
            adopted by newcomers: LR schedulers, ``torch.Generator``, dicts of scalars and
            tensors, objects with ``state_dict()``/``load_state_dict()``, CPU tensors and numpy
            arrays (see :mod:`pccl.bindings.extra_state`). Every peer passes the same names.
        extra_state_bytes: capacity of each serialised (non-tensor) extra-state value.
        min_quorum: quorum mode (see :mod:`pccl.bindings.diloco_quorum`): an outer round
            starts once this many peers have a pseudo-gradient ready, plus ``grace_s``; the
            others keep training and join a later round. None (default): every boundary waits
            for every peer. Not combinable with ``delayed``.
        grace_s: quorum mode: how long a round waits for more peers once the quorum is ready.
        trace_hashes: quorum mode: record a digest of the outer state after every round
            (:meth:`rounds`), to check parity (costs one hash pass per round).
        fragments: streaming DiLoCo (:mod:`pccl.bindings.diloco_fragments`): P fragments,
            one synced every ``sync_every / P`` inner steps. 1 (default): the whole model.
        overlap: streaming: inner steps tau a fragment's exchange runs in the background
            before it lands (0: blocking).
        mix: streaming: share of the local fragment kept when its exchange lands (0: the
            fragment takes the outer parameters).
        merge: streaming with ``overlap >= 1``, how a landed fragment joins the local
            parameters: ``"eager"`` (default; the local fragment takes this peer's own
            estimate of the outer step at launch, corrected when the exchange lands),
            ``"carry"`` (the overlapped inner steps are kept on top of the new outer
            parameters) or ``"replace"`` (they are discarded; the Streaming DiLoCo paper's).
            ``mix`` applies on top; see :mod:`pccl.bindings.diloco_fragments`.

    Raises:
        TypeError/ValueError: bad arguments (before any I/O).
        ValueError: this peer's hyper-parameters differ from the run's (after the first sync;
            the message names each field, e.g. ``inner_optimizer.param_groups[0].lr``).
        pccl errors of the first sync (``SharedStateError``, ``ConnectionLost``...).
    """

    def __init__(
        self,
        comm: Communicator,
        model: Any,
        inner_optimizer: torch.optim.Optimizer | None = None,
        *,
        sync_every: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        quantization: Quantization = Quantization.UINT8,
        delayed: bool = False,
        error_feedback: bool = True,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        tag: int = DEFAULT_TAG,
        sync_timeout: float | None = None,
        extra_state: Mapping[str, Any] | None = None,
        extra_state_bytes: int = DEFAULT_CAPACITY,
        min_quorum: int | None = None,
        grace_s: float = 0.0,
        trace_hashes: bool = False,
        fragments: int = 1,
        overlap: int = 0,
        mix: float = 0.0,
        merge: str = "eager",
    ) -> None:
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if not (outer_lr > 0 and np.isfinite(outer_lr)):
            raise ValueError(f"outer_lr must be a finite number > 0, got {outer_lr!r}")
        if not 0 <= outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum!r}")
        if nesterov and outer_momentum == 0:
            raise ValueError("nesterov=True needs outer_momentum > 0")
        quantization = Quantization(quantization)
        if not isinstance(bucket_bytes, int) or bucket_bytes < 4096:
            raise ValueError(f"bucket_bytes must be an int >= 4096, got {bucket_bytes!r}")
        if not isinstance(tag, int) or not 0 <= tag <= 0xFFFF_FFFF:
            raise ValueError(f"tag must be an int in [0, 2**32), got {tag!r}")
        if (
            not isinstance(extra_state_bytes, int)
            or isinstance(extra_state_bytes, bool)
            or not 64 <= extra_state_bytes <= 1 << 30
        ):
            raise ValueError(
                f"extra_state_bytes must be an int in [64, 2**30], got {extra_state_bytes!r}"
            )
        if extra_state is not None and not isinstance(extra_state, Mapping):
            raise TypeError("extra_state must be a mapping {name: value}")
        if min_quorum is not None:
            if not isinstance(min_quorum, int) or isinstance(min_quorum, bool) or min_quorum < 1:
                raise ValueError(f"min_quorum must be an int >= 1 or None, got {min_quorum!r}")
            if delayed:
                raise ValueError("min_quorum (quorum mode) cannot be combined with delayed=True")
        for name, v in (("fragments", fragments), ("overlap", overlap)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if fragments < 1 or sync_every % fragments:
            raise ValueError(f"fragments must be >= 1 and divide sync_every, got {fragments!r}")
        if overlap and overlap >= sync_every // fragments:
            raise ValueError("overlap must be < sync_every / fragments (one exchange in flight)")
        if not (isinstance(mix, (int, float)) and 0 <= mix <= 1):
            raise ValueError(f"mix must be a number in [0, 1], got {mix!r}")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if (fragments > 1 or overlap) and (delayed or min_quorum is not None):
            raise ValueError("fragments/overlap (streaming) cannot be combined with delayed/quorum")
        if not (isinstance(grace_s, (int, float)) and 0 <= grace_s <= 3600):
            raise ValueError(f"grace_s must be a number of seconds in [0, 3600], got {grace_s!r}")
        self.comm = comm
        self.inner_optimizer = inner_optimizer
        self.sync_every = sync_every
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.nesterov = bool(nesterov)
        self.quantization = quantization
        self.delayed = bool(delayed)
        self.error_feedback = bool(error_feedback) and quantization != Quantization.NONE
        self.sync_timeout = sync_timeout
        self.extra_state_bytes = extra_state_bytes
        self.bucket_bytes = bucket_bytes
        self.min_quorum = min_quorum
        self.grace_s = float(grace_s)
        self.trace_hashes = bool(trace_hashes)
        self.quorum = min_quorum is not None
        self.fragments = fragments
        self.overlap = overlap
        self.mix = float(mix)
        self.merge = merge
        self.stats = DiLoCoStats()

        named = _named_params(model)
        if inner_optimizer is not None:
            own = {id(p) for _, p in named}
            foreign = [
                p for g in inner_optimizer.param_groups for p in g["params"] if id(p) not in own
            ]
            if foreign:
                raise ValueError(
                    f"inner_optimizer optimises {len(foreign)} tensor(s) that are not trainable "
                    "parameters of model (was it built before the model was wrapped/sharded?)"
                )
        self._params: list[tuple[str, torch.Tensor, int, int, tuple[int, ...]]] = []
        offset = 0
        on_cuda = False
        for name, p in named:
            loc = _local(p)
            if not loc.is_floating_point():
                raise TypeError(f"parameter {name!r} has non-float dtype {loc.dtype}")
            if not loc.is_contiguous():
                raise TypeError(f"parameter {name!r} is not contiguous")
            on_cuda |= loc.device.type == "cuda"
            n = loc.numel()
            self._params.append((name, p, offset, n, tuple(loc.shape)))
            offset += n
        self.numel = offset
        pin = on_cuda and torch.cuda.is_available()

        def flat() -> tuple[torch.Tensor, np.ndarray]:
            t = torch.zeros(max(self.numel, 1), dtype=torch.float32, pin_memory=pin)[: self.numel]
            return t, t.numpy()

        self._theta_t, self._theta = flat()
        # Where the current round started: the outer parameters, or in delayed mode the eager
        # start (see diloco_exchange.launch_background), or in quorum mode the outer parameters
        # of the round that applied this peer's last contribution (the driver moves theta
        # meanwhile).
        # Synchronous mode builds, reduces and applies the pseudo-gradient one bucket at a
        # time (diloco_sync) and needs no full-model send/recv buffers.
        separate = self.delayed or self.quorum
        self._anchor_t, self._anchor = flat() if separate else (self._theta_t, self._theta)
        empty = torch.zeros(0, dtype=torch.float32)
        self._send_t, self._send = flat() if separate else (empty, empty.numpy())
        self._recv_t, self._recv = flat() if separate else (empty, empty.numpy())
        self._mom = flat()[1] if self.outer_momentum > 0 else None
        # The error-feedback residual is kept as bfloat16 bits (round to nearest even): its
        # rounding is 2**-9 of a quantity already below half a quantization step, and it saves
        # 2 bytes per parameter.
        self._residual: np.ndarray | None = None
        if self.error_feedback:
            self._residual = (
                torch.zeros(max(self.numel, 1), dtype=torch.int16, pin_memory=pin)
                .numpy()[: self.numel]
                .view(np.uint16)
            )
        self._count = np.zeros(3, dtype=np.int64)
        self._count_out = np.zeros(3, dtype=np.int64)
        self._weight = 0
        self._round_token_weighted = False
        self._tokens = 0  # passed to step() since the last contribution
        self._token_weighted = False  # step() was given tokens this round
        self._mixed_warned = False
        self._scratch = np.empty(min(max(self.numel, 1), _CHUNK), dtype=np.float32)
        if self.error_feedback:
            self._rscratch = np.empty(self._scratch.shape[0], dtype=np.float32)
            cfg = getattr(getattr(comm, "aio", None), "config", None)
            self._block = int(cfg.quant_block if isinstance(cfg, Config) else Config().quant_block)
            self._q = np.empty(self._scratch.shape[0], dtype=np.uint8)
            self._meta = np.empty(
                2 * kernels.num_blocks(self._scratch.shape[0], self._block), dtype=np.float32
            )
            self._half = np.empty(self._scratch.shape[0], dtype=np.uint16)
        per = max(1, bucket_bytes // 4)
        streaming = fragments > 1 or overlap > 0
        frags = (
            split_fragments([n for _, _, _, n, _ in self._params], fragments)
            if streaming
            else [(0, self.numel)]
        )
        self._buckets = [(a, min(fb, a + per)) for fa, fb in frags for a in range(fa, fb, per)]
        self._tag = tag
        if tag + len(self._buckets) + 1 > 0xFFFF_FFFF:  # (+1: quorum mode's extra state)
            raise ValueError("tag + number of buckets exceeds 2**32 - 2")
        # (the overlapped streaming path keeps one fragment of scratch instead)
        self._sync_path = None if separate or overlap else SyncBoundary(self, pin)
        self._fragments = Fragments(self, frags, pin) if streaming else None

        self._hparam_names, hp = hyperparameters(self)
        self._hparams = np.array(hp, dtype=np.float64)
        self._own_hparams = self._hparams.copy()
        self._ctrl = np.zeros(_CTRL_LEN, dtype=np.int64)
        self._ctrl[_FINGERPRINT] = fingerprint(self._own_hparams)
        entries: dict[str, Any] = {}
        for name, _, off, n, shape in self._params:
            entries[f"outer/{name}"] = self._theta[off : off + n].reshape(shape)
            if self._mom is not None:
                entries[f"momentum/{name}"] = self._mom[off : off + n].reshape(shape)
        entries["diloco/ctrl"] = self._ctrl
        entries["diloco/hparams"] = self._hparams
        self._extra: list[Slot] = []
        for name, value in (extra_state or {}).items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"extra_state names must be non-empty str, got {name!r}")
            adapter = stateful_adapter(name, value)
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                raise TypeError(f"extra_state[{name!r}] must be a CPU tensor")
            if adapter is not None:
                slot = stateful_slot(adapter, extra_state_bytes)  # fails early if it can't travel
            elif self.quorum:
                slot = array_slot(name, value)  # a private copy: the driver syncs it
            else:
                entries[f"extra/{name}"] = value  # synced in place, between inner steps
                continue
            entries[f"extra/{name}"] = slot.entry
            self._extra.append(slot)
        self.shared_state = SharedState(entries, revision=0)
        self._synced = False
        self._contributing = False
        self._inflight: list[ReduceFuture] | None = None
        self._inner = 0
        self._io = _BoundaryIO()
        self._driver: QuorumDriver | None = None
        self._target = sync_every  # quorum mode: inner steps per contribution (adaptive)
        self._step_s = 0.0  # quorum mode: mean inner-step time (EMA)
        self._last_step_t = 0.0
        self._local_to(self._theta_t)
        self._join()
        if self.quorum:
            assert self.min_quorum is not None
            self._driver = QuorumDriver(self, self.min_quorum, self.grace_s)
            self._driver.start()

    # ------------------------------------------------------------------ public

    def step(self, tokens: int | None = None) -> OuterStepInfo | None:
        """Count one inner step; at every ``sync_every``-th, run the outer boundary.

        Args:
            tokens: how much data this inner step trained on (tokens or samples, any unit
                every peer uses). A round's contribution is weighted by the sum over its steps,
                so a peer with 3x the batch counts 3x in the mean. A round in which no step
                passed ``tokens`` weighs 1. Pass it on every step of every peer, or never.

        Returns:
            The boundary's :class:`OuterStepInfo`, or None between boundaries.

        Raises:
            pccl errors other than ``CollectiveAborted``/``TooFewPeers`` (which are handled):
            ``ConnectionLost``, ``SharedStateError``, ``TopologyUpdateFailed``. The peer should
            then close its communicator and rejoin as a newcomer.
        """
        if tokens is not None:
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
                raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
            self._tokens += tokens
            self._token_weighted = True
        self._inner += 1
        if self._driver is not None:
            return self._quorum_step()
        if self._fragments is not None:
            return self._fragments.step()
        if self._inner < self.sync_every:
            return None
        self._inner = 0
        t0 = time.perf_counter()
        self._io = _BoundaryIO()
        if self.delayed:
            applied = False
            if self._inflight is not None:
                handles, self._inflight = self._inflight, None
                applied = reduce_with_retry(self, handles, Phase.RETRY)
            fill_pseudo_grad(self)
            self._finish_boundary(applied)
        else:
            assert self._sync_path is not None
            self._take_weight()
            applied = self._sync_path.run(Phase.RETRY)
            self._finish_sync_boundary(applied)
        return self._info(applied, time.perf_counter() - t0)

    def _quorum_step(self) -> OuterStepInfo | None:
        """Quorum mode: is this inner step a boundary? At ``sync_every`` steps, or at this
        peer's own shorter target once it lags, or at once when the master says the quorum is
        in without us (we then contribute what we trained so far, weighted by it). A lagging
        peer's target adapts so it is ready when the others are: one step less after being
        called early, one more after idling a whole step waiting for the round."""
        assert self._driver is not None
        now = time.perf_counter()
        if self._last_step_t:
            dt = now - self._last_step_t
            self._step_s = dt if not self._step_s else 0.8 * self._step_s + 0.2 * dt
        self._last_step_t = now
        called = self._driver.post_now.is_set()
        if self._inner < self._target and not called:
            return None
        k, self._inner = self._inner, 0
        info, idle = self._quorum_boundary()
        if called and k < self.sync_every - 1:
            self._target = max(1, k - 1)  # late: the others were waiting for us
        elif not called and self._target < self.sync_every and idle > 1.5 * self._step_s:
            self._target += 1  # early by more than a step: train more next time
        self._last_step_t = time.perf_counter()
        return info

    def _quorum_boundary(self) -> tuple[OuterStepInfo, float]:
        """Quorum mode: post this round's pseudo-gradient, wait until a round applied it,
        restart from that round's outer parameters (and adopt the run's extra state).
        Returns the info and how long we waited for the round."""
        assert self._driver is not None
        t0 = time.perf_counter()
        self._driver.raise_error()
        weight, weighted = fill_quorum(self)
        snaps = [slot.snapshot() for slot in self._extra]
        post = self._driver.post(weight, weighted, snaps)
        t_wait = time.perf_counter()
        rec = self._driver.wait(post)
        idle = time.perf_counter() - t_wait
        self._copy_anchor_to_local()
        for slot, mine, run in zip(self._extra, snaps, post.extra_after, strict=True):
            if run != mine:  # the run's schedule/counters moved on: follow it
                slot.adopt(run)
        return OuterStepInfo(
            outer_step=rec.outer_step,
            applied=rec.applied,
            world_size=rec.world_size,
            contributors=len(rec.contributors) if rec.applied else 0,
            weight=rec.weight,
            tx_bytes=rec.tx_bytes,
            rx_bytes=rec.rx_bytes,
            sync_tx_bytes=rec.sync_tx_bytes,
            sync_rx_bytes=rec.sync_rx_bytes,
            revision=rec.revision,
            retries=rec.retries,
            seconds=time.perf_counter() - t0,
        ), idle

    def rounds(self) -> list[RoundRecord]:
        """Quorum mode: the outer rounds completed since the last call, oldest first (every
        round of the group, including those this peer did not contribute to). [] otherwise."""
        return self._driver.rounds() if self._driver is not None else []

    def flush(self) -> OuterStepInfo | None:
        """Delayed mode: wait for the background all-reduce and apply it now.

        Call it on every peer at the same point, right after a boundary (e.g. at the end of
        training or before evaluating or checkpointing the outer parameters): the outer state
        then includes every round trained so far, is verified by a sync, and the local model is
        reset to it. Training may continue afterwards (the next boundary has nothing to apply).
        A no-op (None) in synchronous mode or when nothing is in flight.

        Raises:
            As :meth:`step`.
        """
        if self._fragments is not None:
            return self._fragments.flush()
        if self._inflight is None:
            return None
        t0 = time.perf_counter()
        self._io = _BoundaryIO()
        handles, self._inflight = self._inflight, None
        applied = reduce_with_retry(self, handles, Phase.FLUSH_RETRY)
        self._finish_flush(applied)
        return self._info(applied, time.perf_counter() - t0)

    @property
    def outer_step(self) -> int:
        """Boundaries completed by the run (shared across peers)."""
        return int(self._ctrl[_BOUNDARY])

    @property
    def applied_steps(self) -> int:
        """Outer updates applied by the run (shared across peers)."""
        return int(self._ctrl[_APPLIED])

    @property
    def revision(self) -> int:
        return self.shared_state.revision

    def hashes(self) -> dict[str, str]:
        """``{entry: hex XXH3-128}`` of the outer state (identical on every peer after a step).
        Quorum mode: the live state moves on the driver thread; use the per-round digests of
        :meth:`rounds` (``trace_hashes=True``), or call this after :meth:`close`."""
        return self.shared_state.hashes()

    def outer_parameters(self) -> dict[str, torch.Tensor]:
        """``{name: fp32 CPU tensor}`` views of the outer parameters (do not modify). In
        quorum mode: those of the round that applied this peer's last contribution (the live
        ones move on the driver thread)."""
        src = self._anchor_t if self.quorum else self._theta_t
        return {name: src[off : off + n].view(shape) for name, _, off, n, shape in self._params}

    def close(self) -> None:
        """Wait for a background all-reduce (delayed mode) and drop its result; stop the round
        driver (quorum mode: a post not yet applied is dropped). Idempotent, quiet: an exchange
        that fails (e.g. because the communicator was closed first, which ends it at once)
        raises nothing here."""
        if self._driver is not None:
            self._driver.close()
        if self._fragments is not None:
            self._fragments.close()
        handles, self._inflight = self._inflight, None
        for h in handles or []:
            try:
                h.wait()
            except Exception:
                pass

    # ------------------------------------------------------------------ joining

    def _join(self) -> None:
        """First sync; a newcomer then enters the boundary the incumbents are in."""
        self._sync()
        check_hyperparameters(self)
        if self._anchor is not self._theta:
            np.copyto(self._anchor, self._theta)
        phase = Phase(int(self._ctrl[_PHASE]))
        if self.quorum and phase is not Phase.IDLE:
            raise ValueError(f"a quorum-mode run never syncs in phase {phase.name}")
        if phase is not Phase.IDLE:
            log.info("joining a boundary in phase %s at outer step %d", phase.name, self.outer_step)
        if self.quorum:  # the drivers of the group enter the next gate after this sync
            self._copy_anchor_to_local()
            self._contributing = True
            return
        if self._fragments is not None:
            self._fragments.join(phase)
            self._contributing = True
            return
        if self._sync_path is not None:
            if phase is not Phase.IDLE and phase is not Phase.RETRY:
                raise ValueError(f"a synchronous run never syncs in phase {phase.name}")
            if phase is Phase.RETRY:  # zeros, weight 0: we have not trained the pending round
                self._take_weight()
                self._finish_sync_boundary(self._sync_path.run(Phase.RETRY))
            else:
                self._copy_anchor_to_local()
            self._contributing = True
            return
        fill_pseudo_grad(self)  # zeros, weight 0: we have not trained the pending round
        if phase is Phase.RETRY:
            applied = reduce_with_retry(self, None, Phase.RETRY)
            if self.delayed:
                fill_pseudo_grad(self)
            self._finish_boundary(applied)
        elif phase is Phase.FLUSH_RETRY:
            self._finish_flush(reduce_with_retry(self, None, Phase.FLUSH_RETRY))
        elif phase is Phase.LAUNCH:
            launch_background(self)
            self._copy_anchor_to_local()
        else:
            self._copy_anchor_to_local()
        self._contributing = True

    # ------------------------------------------------------------------ boundary pieces

    def _apply(self, applied: bool) -> None:
        if applied:
            nesterov_step(
                self._theta,
                self._recv,
                self._mom,
                self.outer_lr,
                self.outer_momentum,
                self.nesterov,
                self._scratch,
            )
            self.stats.applied += 1
            self._ctrl[_APPLIED] += 1
        else:
            self.stats.dropped += 1

    def _finish_boundary(self, applied: bool) -> None:
        self._apply(applied)
        self.stats.boundaries += 1
        self._ctrl[_BOUNDARY] += 1
        self._admit_and_sync(Phase.LAUNCH if self.delayed else Phase.IDLE)
        if self.delayed:
            launch_background(self)
        self._copy_anchor_to_local()

    def _finish_sync_boundary(self, applied: bool) -> None:
        """Synchronous mode: count the boundary (its buckets are applied), admit and sync,
        restart from the outer parameters."""
        if applied:
            self.stats.applied += 1
            self._ctrl[_APPLIED] += 1
        else:
            self.stats.dropped += 1
        self.stats.boundaries += 1
        self._ctrl[_BOUNDARY] += 1
        self._ctrl[NEXT_BUCKET] = 0
        self._admit_and_sync(Phase.IDLE)
        self._copy_anchor_to_local()

    def _finish_flush(self, applied: bool) -> None:
        self._apply(applied)
        self._admit_and_sync(Phase.IDLE)
        if self._anchor is not self._theta:
            np.copyto(self._anchor, self._theta)
        self._copy_anchor_to_local()

    def _admit_and_sync(self, phase: Phase) -> None:
        self._ctrl[_PHASE] = int(phase)
        self.comm.update_topology()
        self._sync()

    def _admit_and_sync_quorum(self) -> None:
        """Quorum mode, driver thread: admit/re-wire and sync; the extra-state entries hold
        what the driver staged (the training thread's live values are not touched)."""
        self._ctrl[_PHASE] = int(Phase.IDLE)
        self.comm.update_topology()
        self._sync(live=False)

    def _sync(self, live: bool = True) -> None:
        """One shared-state sync. ``live``: snapshot the extra state into its entries first
        and adopt what the run holds after (training thread only)."""
        first = not self._synced
        if not first:
            self.shared_state.revision += 1
        before = []
        for slot in self._extra:
            if live:
                slot.buf[...] = np.frombuffer(slot.snapshot(), dtype=np.uint8)
            before.append(slot.buf.tobytes())
        info = self.comm.sync_shared_state(self.shared_state, timeout=self.sync_timeout)
        extra_rx = 0
        for slot, mine in zip(self._extra, before, strict=True):
            run = slot.buf.tobytes()
            if run == mine:
                continue
            extra_rx += len(run)
            if live:  # the run's value differs from ours: adopt it
                slot.adopt(run)
                if not first and not self.quorum:
                    log.warning("extra_state[%r] differed from the run's: adopted", slot.name)
        self._synced = True
        self.stats.syncs += 1
        self.stats.sync_tx_bytes += info.tx_bytes
        self.stats.sync_rx_bytes += info.rx_bytes
        self._io.sync_tx += info.tx_bytes
        self._io.sync_rx += info.rx_bytes
        if info.rx_bytes > extra_rx and not first:  # (quorum mode: lagging extra state is normal)
            self.stats.repairs += 1
            log.warning(
                "outer state diverged from the run's at revision %d: %d bytes re-fetched",
                info.revision,
                info.rx_bytes,
            )

    def _local_range_to(self, dst: torch.Tensor, a: int, b: int) -> None:
        """``dst = local[a:b]`` (fp32 flat view of the model's elements ``a .. b``)."""
        with torch.no_grad():
            for _, p, off, n, _ in self._params:
                lo, hi = max(a, off), min(b, off + n)
                if lo < hi:
                    dst[lo - a : hi - a].copy_(_local(p).reshape(-1)[lo - off : hi - off])

    def _take_weight(self) -> None:
        """Synchronous mode: this round's weight (0 for a newcomer or a round of no tokens)."""
        weight = self._tokens if self._token_weighted else 1
        self._round_token_weighted = self._token_weighted
        self._tokens, self._token_weighted = 0, False
        self._weight = weight if self._contributing else 0

    def _local_to(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for _, p, off, n, _ in self._params:
                flat[off : off + n].copy_(_local(p).reshape(-1))

    def _copy_anchor_to_local(self) -> None:
        with torch.no_grad():
            for _, p, off, n, shape in self._params:
                _local(p).copy_(self._anchor_t[off : off + n].view(shape))

    def _info(self, applied: bool, seconds: float, fragment: int = 0) -> OuterStepInfo:
        io = self._io
        return OuterStepInfo(
            outer_step=self.outer_step,
            applied=applied,
            world_size=self.comm.group_world_size,
            contributors=io.contributors if applied else 0,
            weight=io.weight if applied else 0,
            tx_bytes=io.tx,
            rx_bytes=io.rx,
            sync_tx_bytes=io.sync_tx,
            sync_rx_bytes=io.sync_rx,
            revision=self.revision,
            retries=io.retries,
            seconds=seconds,
            fragment=fragment,
        )
