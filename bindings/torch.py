"""Torch adapters: CPU tensors as zero-copy numpy views, device tensors through host staging.

The only module family that imports torch (with :mod:`pccl.bindings.diloco` and
:mod:`pccl.bindings.fsdp`). Three layers:

* :func:`as_numpy` is what the core calls for every torch tensor it is handed (``send``/``recv``
  of a collective, entries of a :class:`pccl.SharedState`). CPU tensors become numpy views that
  share their memory (bfloat16 as ``uint16`` words, so nothing is converted). Everything the core
  cannot use in place is refused with a ``TypeError`` that says what to do instead: DTensors
  (pass ``t.to_local()``), non-contiguous tensors (``t.contiguous()``), sparse/quantized/
  conjugated tensors, unsupported dtypes, and tensors on an accelerator (the core has no hook to
  copy a result back, so it must not silently reduce a copy).
* :func:`all_reduce`, :func:`all_reduce_async` and :class:`TorchSharedState` accept tensors on
  any device. Device tensors are copied into reusable host buffers (page-locked when CUDA is
  available, so the copies run at full PCIe speed) from a :class:`StagingPool`, the operation runs
  on those buffers, and the result is copied back into the device tensor only when the operation
  succeeded, so a failed collective leaves the caller's tensors untouched, like the core does.
  CPU tensors pass straight through (zero-copy).
* :class:`DiLoCo` (defined in :mod:`pccl.bindings.diloco`, re-exported here) builds on them.

Threading: the helpers run on the caller's thread; a :class:`StagingPool` is thread-safe. Device
copies are synchronous (``non_blocking=False``) so a staging buffer is never reused while a copy
into or out of it is still queued on a CUDA stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pccl import adapters
from pccl.shared_state import SharedState
from pccl.types import DType, Quantization, ReduceInfo, ReduceOp, SyncInfo, SyncStrategy

if TYPE_CHECKING:  # pragma: no cover
    from pccl.peer.blocking import Communicator, ReduceFuture

__all__ = [
    "DiLoCo",
    "NonContiguousTensorError",
    "OuterStepInfo",
    "StagedReduce",
    "StagingPool",
    "TorchSharedState",
    "all_reduce",
    "all_reduce_async",
    "as_numpy",
    "default_pool",
    "is_device_tensor",
    "local_tensor",
]

_REFUSED_DTYPES = {torch.bool, torch.uint16, torch.uint32, torch.uint64}

_CUDA_HINT = (
    "the core reduces host memory only: use pccl.bindings.torch.all_reduce(comm, t, ...) / "
    "all_reduce_async(...) or TorchSharedState, which stage it through pinned host buffers and "
    "copy the result back (or pass t.cpu() and copy back yourself)"
)


class NonContiguousTensorError(TypeError, ValueError):
    """A non-contiguous tensor was passed where memory is shared with the core.

    Both a ``TypeError`` (how tensor arguments are refused) and a ``ValueError`` (how
    :class:`pccl.SharedState` and the numpy path refuse a non-contiguous array), so either
    handler catches it.
    """


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" or (
        isinstance(t, torch.Tensor) and callable(getattr(t, "to_local", None))
    )


def is_device_tensor(t: Any) -> bool:
    """True for a tensor that does not live in host memory (CUDA, XPU, MPS, ...)."""
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (it shares the DTensor's storage); other tensors unchanged."""
    if _is_dtensor(t):
        with torch.no_grad():
            return t.to_local()  # type: ignore[attr-defined]
    return t


def _check_tensor(t: Any, name: str, *, allow_device: bool) -> torch.Tensor:
    """Refuse what no pccl path can use in place, with the fix in the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _is_dtensor(t):
        raise TypeError(
            f"{name} is a DTensor: pass its local shard (`{name}.to_local()`, which shares "
            "memory); with FSDP see pccl.bindings.fsdp"
        )
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}: pass a dense tensor (`.to_dense()`)")
    if t.is_quantized:
        raise TypeError(f"{name} is a quantized tensor: pass `.dequantize()`")
    if t.is_conj() or t.is_neg():
        raise TypeError(f"{name} is a lazily conjugated/negated view: pass `.resolve_conj()`")
    if (
        t.dtype in _REFUSED_DTYPES
        or t.is_complex()
        or (t.is_floating_point() and t.dtype.itemsize == 1)  # float8 variants
    ):
        raise TypeError(
            f"{name} has unsupported dtype {t.dtype}; pccl reduces float32/64, float16, "
            "bfloat16, int8-int64, uint8"
        )
    if not t.is_contiguous():
        raise NonContiguousTensorError(
            f"{name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}): pass "
            f"`{name}.contiguous()` (a copy: reduce the copy and copy the result back)"
        )
    if not allow_device and t.device.type != "cpu":
        raise TypeError(f"{name} is on {t.device}: {_CUDA_HINT}")
    return t


def as_numpy(t: Any, name: str = "tensor") -> tuple[np.ndarray, DType | None]:
    """Return a numpy view sharing ``t``'s memory, and its DType when numpy cannot express it.

    bfloat16 comes back as ``uint16`` words with ``DType.BFLOAT16``; every other dtype as its
    numpy equivalent with ``None``.

    Raises:
        TypeError: not a plain, contiguous CPU tensor of a supported dtype; the message says
            what to pass instead (``to_local()``, ``contiguous()``, the staging helpers here).
    """
    t = _check_tensor(t, name, allow_device=False)
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(np.uint16), DType.BFLOAT16
    return t.detach().numpy(), None


# ---------------------------------------------------------------------------------- staging


class StagingPool:
    """Reusable host buffers for device tensors, keyed by (dtype, element count).

    Buffers are page-locked ("pinned") when ``pin`` is true, by default when CUDA is available:
    a device-to-host copy into pageable memory goes through a driver bounce buffer at a fraction
    of the bandwidth. Allocating pinned memory is slow (it maps pages), hence the reuse. At most
    ``keep_bytes`` of idle buffers are kept; the rest are freed on release.

    Thread-safe.
    """

    def __init__(self, *, pin: bool | None = None, keep_bytes: int = 1 << 30) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.keep_bytes = keep_bytes
        self._free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.allocations = 0  #: buffers allocated so far (diagnostics, tests)

    def acquire(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A flat contiguous host tensor of ``numel`` elements (contents unspecified)."""
        key = (dtype, int(numel))
        with self._lock:
            lst = self._free.get(key)
            if lst:
                buf = lst.pop()
                self._idle_bytes -= buf.numel() * buf.element_size()
                return buf
            self.allocations += 1
        return torch.empty(int(numel), dtype=dtype, pin_memory=self.pin)

    def release(self, buf: torch.Tensor) -> None:
        """Return a buffer from :meth:`acquire` for reuse."""
        nbytes = buf.numel() * buf.element_size()
        with self._lock:
            if self._idle_bytes + nbytes > self.keep_bytes:
                return
            self._free.setdefault((buf.dtype, buf.numel()), []).append(buf)
            self._idle_bytes += nbytes

    def stage_in(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` (flat) in a pooled buffer."""
        buf = self.acquire(t.dtype, t.numel())
        buf.copy_(t.detach().reshape(-1))
        return buf

    @staticmethod
    def stage_out(buf: torch.Tensor, t: torch.Tensor) -> None:
        """Copy a staged result back into ``t`` (synchronous)."""
        with torch.no_grad():
            t.copy_(buf.view(t.shape))


_default_pool: StagingPool | None = None
_default_lock = threading.Lock()


def default_pool() -> StagingPool:
    """The process-wide :class:`StagingPool` used when none is passed."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = StagingPool()
        return _default_pool


class StagedReduce:
    """Handle of :func:`all_reduce_async`: ``wait()`` finishes the op and copies results back."""

    def __init__(
        self,
        fut: ReduceFuture,
        pool: StagingPool,
        copy_back: list[tuple[torch.Tensor, torch.Tensor]],
        staged: list[torch.Tensor],
    ) -> None:
        self._fut = fut
        self._pool = pool
        self._copy_back = copy_back
        self._staged = staged
        self._result: ReduceInfo | None = None
        self._error: BaseException | None = None
        self._finished = False
        self.tag = fut.tag

    def done(self) -> bool:
        """Whether the collective finished (the copy back happens in :meth:`wait`)."""
        return self._fut.done()

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        """Wait for the collective, then copy staged results into the device tensors.

        Idempotent: later calls return (or raise) the same outcome.

        Raises:
            TimeoutError: ``timeout`` elapsed; the operation keeps running and ``wait`` may be
                called again.
            What the collective raised (``CollectiveAborted``, ``TooFewPeers``...): the device
            tensors are left unmodified.
        """
        if not self._finished:
            try:
                info: ReduceInfo | None = self._fut.wait(timeout)
            except BaseException as e:
                if not self._fut.done():
                    raise  # timeout or interrupt: the ring may still write into the buffers
                self._error = e
                info = None
            try:
                if info is not None:
                    for host, dev in self._copy_back:
                        StagingPool.stage_out(host, dev)
                    self._result = info
            finally:
                self._finished = True
                for buf in self._staged:
                    self._pool.release(buf)
                self._staged = []
                self._copy_back = []
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def all_reduce_async(
    comm: Communicator,
    send: torch.Tensor,
    recv: torch.Tensor | None = None,
    *,
    op: ReduceOp = ReduceOp.SUM,
    quantization: Quantization = Quantization.NONE,
    tag: int = 0,
    pool: StagingPool | None = None,
) -> StagedReduce:
    """Start ``comm.all_reduce_async`` on tensors of any device; see :func:`all_reduce`.

    Raises:
        TypeError/ValueError: bad tensors (before any copy or I/O).
        TooFewPeers: fewer than two peers in the group.
    """
    pool = pool or default_pool()
    _check_tensor(send, "send", allow_device=True)
    in_place = recv is None or recv is send
    if not in_place:
        _check_tensor(recv, "recv", allow_device=True)
        assert recv is not None
        if recv.dtype != send.dtype or recv.numel() != send.numel():
            raise TypeError(
                f"send is {send.dtype}[{send.numel()}] but recv is {recv.dtype}[{recv.numel()}]"
            )
    staged: list[torch.Tensor] = []
    copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        s_host = send
        if is_device_tensor(send):
            s_host = pool.stage_in(send)
            staged.append(s_host)
            if in_place:
                copy_back.append((s_host, send))
        r_host: torch.Tensor | None = None
        if not in_place:
            assert recv is not None
            r_host = recv
            if is_device_tensor(recv):
                r_host = pool.acquire(recv.dtype, recv.numel())
                staged.append(r_host)
                copy_back.append((r_host, recv))
        fut = comm.all_reduce_async(s_host, r_host, op=op, quantization=quantization, tag=tag)
    except BaseException:
        for buf in staged:
            pool.release(buf)
        raise
    return StagedReduce(fut, pool, copy_back, staged)


def all_reduce(
    comm: Communicator,
    send: torch.Tensor,
    recv: torch.Tensor | None = None,
    *,
    op: ReduceOp = ReduceOp.SUM,
    quantization: Quantization = Quantization.NONE,
    tag: int = 0,
    pool: StagingPool | None = None,
) -> ReduceInfo:
    """``comm.all_reduce`` for tensors on any device (CPU tensors are used zero-copy).

    A device tensor is copied into a pooled (pinned) host buffer, reduced there and copied back
    on success only: on failure ``send`` and ``recv`` are exactly as before (the core's own
    guarantee for host buffers). ``recv=None`` or ``recv is send`` reduces in place.

    Args:
        comm: a connected blocking :class:`pccl.Communicator`.
        send, recv, op, quantization, tag: as :meth:`pccl.Communicator.all_reduce`.
        pool: staging buffers (default: :func:`default_pool`).

    Returns:
        The :class:`pccl.ReduceInfo` of the operation.

    Raises:
        CollectiveAborted: a peer left mid-operation; ``update_topology()`` and retry.
        TooFewPeers, ConnectionLost: as the core.
        TypeError/ValueError: bad tensors (non-contiguous, DTensor, dtype), before any I/O.
    """
    return all_reduce_async(
        comm, send, recv, op=op, quantization=quantization, tag=tag, pool=pool
    ).wait()


# ---------------------------------------------------------------------------------- shared state


class TorchSharedState:
    """A :class:`pccl.SharedState` over torch tensors of any device (and DTensor shards).

    CPU tensors are shared zero-copy. Each device tensor gets a persistent host mirror (pinned
    when CUDA is available); :meth:`sync` copies device -> mirror before hashing and voting, and
    mirror -> device after the sync when it received bytes (commit). DTensors are replaced by
    their local shard (``to_local()``), which is what each FSDP rank owns.

    Args:
        entries: ``{name: tensor}``; tensors must be contiguous.
        revision: initial revision (see :class:`pccl.SharedState`).
        allow_content_inequality: names exempt from comparison and transfer.
        pin: page-lock the mirrors (default: when CUDA is available).

    Raises:
        TypeError/ValueError: as :class:`pccl.SharedState`, plus the checks of :func:`as_numpy`.
    """

    def __init__(
        self,
        entries: Mapping[str, torch.Tensor],
        revision: int = 0,
        *,
        allow_content_inequality: Iterable[str] = (),
        pin: bool | None = None,
    ) -> None:
        pin = torch.cuda.is_available() if pin is None else pin
        self.tensors: dict[str, torch.Tensor] = {}
        self._mirrors: dict[str, torch.Tensor] = {}
        host: dict[str, torch.Tensor] = {}
        for key, value in entries.items():
            t = _check_tensor(local_tensor(value), str(key), allow_device=True)
            self.tensors[key] = t
            if is_device_tensor(t):
                m = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                self._mirrors[key] = m
                host[key] = m
            else:
                host[key] = t
        self.stage()
        self.state = SharedState(host, revision, allow_content_inequality=allow_content_inequality)

    @property
    def revision(self) -> int:
        return self.state.revision

    @revision.setter
    def revision(self, value: int) -> None:
        self.state.revision = value

    def stage(self) -> None:
        """Copy every device tensor into its host mirror (before hashing or sending)."""
        with torch.no_grad():
            for key, m in self._mirrors.items():
                m.copy_(self.tensors[key])

    def commit(self) -> None:
        """Copy every host mirror into its device tensor (after receiving)."""
        with torch.no_grad():
            for key, m in self._mirrors.items():
                self.tensors[key].copy_(m)

    def hashes(self) -> dict[str, str]:
        """``{name: hex XXH3-128}`` of the current content (device tensors staged first)."""
        self.stage()
        return self.state.hashes()

    def sync(
        self,
        comm: Communicator,
        strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
        *,
        timeout: float | None = None,
    ) -> SyncInfo:
        """Stage, ``comm.sync_shared_state``, and commit what was received.

        Raises:
            What :meth:`pccl.Communicator.sync_shared_state` raises; on failure nothing is
            committed to the device tensors.
        """
        self.stage()
        info = comm.sync_shared_state(self.state, strategy, timeout=timeout)
        if info.rx_bytes:
            self.commit()
        return info


# Re-exported so that `from pccl.bindings.torch import DiLoCo` works (DESIGN.md §2); imported last
# because diloco builds on the helpers above.
adapters.register("torch", as_numpy)  # the core converts torch tensors through this

from pccl.bindings.diloco import DiLoCo, OuterStepInfo  # noqa: E402
