"""Torch bindings and DiLoCo.

Unit tests (no processes): the tensor adapter contract (zero-copy CPU views, bfloat16, refusals
with guidance), the staging path used for CUDA tensors (exercised on CPU tensors by treating them
as device tensors; the real CUDA test is skipped without a GPU), ``TorchSharedState`` commit
rules, and the outer optimizer's arithmetic.

End-to-end tests (the real ``pccl master`` and real peer processes; ``tests/diloco_workers``):
three peers train the character LM of ``examples/charlm.py`` on different shards with DiLoCo
(H = 10, uint8 pseudo-gradients, error feedback), synchronous and delayed, and we require:

* the outer state hashes identically on every peer after every outer step, and every sync after
  a peer's first receives nothing (``rx_bytes == 0``), the revision growing by exactly one per sync;
* the final held-out loss within 10 % of an fp32 DDP baseline trained on the same shards for the
  same number of inner steps (computed here, in the test process), i.e. ``loss <= 1.10 * ddp``;
* far fewer bytes on the wire than fp32 DDP;
* with churn: a peer SIGKILLed mid-run (proved dead, the survivors retry) and a newcomer
  admitted later (receives the outer state, then reports the same hashes as everyone) break
  neither property.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from pccl.bindings import torch as bt
from pccl.bindings.diloco import DiLoCo, Phase, nesterov_step
from pccl.bindings.diloco_sync import NEXT_BUCKET

import pccl
from pccl.types import ReduceInfo, SyncInfo

WORKER = "../diloco_workers/diloco_peer.py"  # relative to tests/workers (conftest.WORKERS_DIR)
H = 10


# ====================================================================== adapters


def test_as_numpy_is_zero_copy_for_cpu_tensors() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    arr, forced = bt.as_numpy(t, "t")
    assert forced is None and arr.dtype == np.float32 and arr.shape == (2, 3)
    arr[1, 2] = 42.0
    assert t[1, 2].item() == 42.0
    tg = torch.ones(3, requires_grad=True)
    assert bt.as_numpy(tg, "tg")[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8, torch.int64, torch.uint8])
def test_as_numpy_dtypes(dtype: torch.dtype) -> None:
    t = torch.zeros(5, dtype=dtype)
    arr, forced = bt.as_numpy(t)
    assert forced is None and arr.nbytes == 5 * t.element_size()
    assert arr.ctypes.data == t.data_ptr()


def test_as_numpy_bfloat16_is_raw_words() -> None:
    t = torch.tensor([1.0, -2.5, 3.0e38], dtype=torch.bfloat16)
    arr, forced = bt.as_numpy(t)
    assert forced is pccl.DType.BFLOAT16 and arr.dtype == np.uint16
    assert arr.ctypes.data == t.data_ptr()
    assert arr.tolist() == t.view(torch.int16).numpy().view(np.uint16).tolist()


class _FakeDTensor(torch.Tensor):
    def to_local(self) -> torch.Tensor:
        return torch.Tensor(self)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: torch.zeros(4, 4).t(), "contiguous()"),
        (lambda: torch.zeros(4)[::2], "contiguous()"),
        (lambda: torch.zeros(3).as_subclass(_FakeDTensor), "to_local()"),
        (lambda: torch.zeros(3, device="meta"), "all_reduce"),
        (lambda: torch.zeros(3, dtype=torch.bool), "unsupported dtype"),
        (lambda: torch.zeros(3, dtype=torch.complex64), "unsupported dtype"),
        (lambda: torch.zeros(3, dtype=torch.uint32), "unsupported dtype"),
        (lambda: torch.zeros(3, dtype=torch.float8_e4m3fn), "unsupported dtype"),
        (lambda: torch.zeros(3, 3).to_sparse(), "dense"),
        (lambda: torch.zeros(3, dtype=torch.complex64).conj().imag, "resolve_conj"),
    ],
)
def test_as_numpy_refuses_with_guidance(make: Any, words: str) -> None:
    with pytest.raises(TypeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        bt.as_numpy(make(), "x")
    if make().device.type == "cpu" and make().layout == torch.strided:
        with pytest.raises(TypeError):
            pccl.SharedState({"x": make()})


def test_non_contiguous_is_both_type_and_value_error() -> None:
    # TypeError: the tensor contract; ValueError: SharedState's contract for arrays
    for exc in (TypeError, ValueError):
        with pytest.raises(exc, match="contiguous"):
            pccl.SharedState({"a": torch.zeros(4, 4).t()})


def test_shared_state_over_torch_tensors_hashes_raw_bytes() -> None:
    import xxhash

    t = torch.tensor([1.5, -2.0, 7.0], dtype=torch.bfloat16)
    st = pccl.SharedState({"w": t})
    assert st.hashes()["w"] == xxhash.xxh3_128_hexdigest(t.view(torch.int16).numpy().tobytes())


# ---------------------------------------------------------------------- staging (CUDA path)


class _Future:
    def __init__(self, tag: int, fail: BaseException | None) -> None:
        self.tag = tag
        self._fail = fail

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        if self._fail is not None:
            raise self._fail
        return ReduceInfo(2, 8, 8, 0.0)


class _FakeComm:
    """Records what the core would receive; "reduces" by doubling (a 2-peer SUM of equals)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[Any, Any]] = []

    def all_reduce_async(self, send: Any, recv: Any, *, op: Any, quantization: Any, tag: int):
        assert isinstance(send, torch.Tensor) and send.device.type == "cpu"
        self.calls.append((send, recv))
        if self.fail is None:
            out = send if recv is None else recv
            out.copy_(send * 2)
        return _Future(tag, self.fail)


@pytest.fixture
def as_device(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Make chosen CPU tensors look like device tensors to the staging code."""
    fake: set[int] = set()
    monkeypatch.setattr(bt, "is_device_tensor", lambda t: id(t) in fake)
    return fake


def test_staged_all_reduce_copies_back_only_on_success(as_device: set[int]) -> None:
    pool = bt.StagingPool(pin=False)
    dev = torch.arange(4, dtype=torch.float32)
    as_device.add(id(dev))
    comm = _FakeComm()
    info = bt.all_reduce(comm, dev, pool=pool)
    staged, recv = comm.calls[0]
    assert staged is not dev and recv is None  # the core saw a host staging buffer, in place
    assert dev.tolist() == [0.0, 2.0, 4.0, 6.0] and info.world_size == 2
    bt.all_reduce(comm, dev, pool=pool)
    assert comm.calls[1][0] is staged and pool.allocations == 1  # the buffer was reused

    comm = _FakeComm(fail=pccl.CollectiveAborted("peer left"))
    with pytest.raises(pccl.CollectiveAborted):
        bt.all_reduce(comm, dev, pool=pool)
    assert dev.tolist() == [0.0, 4.0, 8.0, 12.0]  # untouched by the failed op
    assert pool.allocations == 1  # released after the failure too


def test_staged_all_reduce_out_of_place_mixed_devices(as_device: set[int]) -> None:
    pool = bt.StagingPool(pin=False)
    send = torch.ones(3)
    recv = torch.zeros(3)
    as_device.add(id(recv))
    comm = _FakeComm()
    h = bt.all_reduce_async(comm, send, recv, pool=pool)
    host_send, host_recv = comm.calls[0]
    assert host_send is send and host_recv is not recv  # CPU send zero-copy, device recv staged
    assert recv.tolist() == [0.0, 0.0, 0.0]  # nothing copied back before wait()
    h.wait()
    assert recv.tolist() == [2.0, 2.0, 2.0] and send.tolist() == [1.0, 1.0, 1.0]
    h.wait()  # idempotent


def test_staged_all_reduce_validates_before_staging(as_device: set[int]) -> None:
    comm = _FakeComm()
    with pytest.raises(TypeError, match="contiguous"):
        bt.all_reduce(comm, torch.zeros(4, 4).t())
    with pytest.raises(TypeError, match="recv"):
        bt.all_reduce(comm, torch.zeros(4), torch.zeros(5))
    assert not comm.calls


def test_staging_pool_bounds_idle_memory() -> None:
    pool = bt.StagingPool(pin=False, keep_bytes=64)
    a, b = pool.acquire(torch.float32, 10), pool.acquire(torch.float32, 10)
    pool.release(a)
    pool.release(b)  # over the 64-byte budget: dropped
    assert pool.acquire(torch.float32, 10) is a
    assert pool.acquire(torch.float32, 10) is not b and pool.allocations == 3


class _SyncComm:
    def __init__(self, new_value: float | None) -> None:
        self.new_value = new_value

    def sync_shared_state(self, state: pccl.SharedState, strategy: Any, *, timeout: Any):
        e = state.entries["w"]
        if self.new_value is not None:  # what a fetch commits into the host arrays
            e.array[...] = np.float32(self.new_value)
        return SyncInfo(state.revision, 0, e.nbytes if self.new_value is not None else 0)


def test_torch_shared_state_stages_and_commits(as_device: set[int]) -> None:
    dev = torch.full((2, 2), 3.0)
    cpu = torch.zeros(3)
    as_device.add(id(dev))
    ts = bt.TorchSharedState({"w": dev, "c": cpu}, pin=False)
    host = ts.state.entries["w"].array
    assert host.ctypes.data != dev.data_ptr()  # a mirror
    assert ts.state.entries["c"].array.ctypes.data == cpu.data_ptr()  # zero-copy
    dev.fill_(5.0)
    before = ts.hashes()  # staged first: hashes the current device content
    assert before == pccl.SharedState({"w": torch.full((2, 2), 5.0), "c": cpu}).hashes()
    ts.sync(_SyncComm(None))
    assert dev.flatten().tolist() == [5.0] * 4
    ts.sync(_SyncComm(9.0))
    assert dev.flatten().tolist() == [9.0] * 4  # received bytes are committed to the device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_end_to_end() -> None:  # pragma: no cover - runs on GPU machines
    pool = bt.StagingPool()
    assert pool.pin
    dev = torch.arange(1000, dtype=torch.float32, device="cuda")
    comm = _FakeComm()
    bt.all_reduce(comm, dev, pool=pool)
    assert comm.calls[0][0].is_pinned()
    assert torch.equal(dev.cpu(), torch.arange(1000, dtype=torch.float32) * 2)
    with pytest.raises(TypeError, match="all_reduce"):
        bt.as_numpy(dev)
    ts = bt.TorchSharedState({"w": dev})
    ts.sync(_SyncComm(1.0))
    assert torch.equal(dev.cpu(), torch.ones(1000))


# ====================================================================== outer optimizer


@pytest.mark.parametrize("nesterov", [True, False])
def test_nesterov_step_matches_torch_sgd(nesterov: bool) -> None:
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(3000).astype(np.float32)
    ref = torch.tensor(theta.copy(), requires_grad=True)
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=nesterov)
    mom = np.zeros_like(theta)
    scratch = np.empty(777, np.float32)  # chunked: scratch shorter than the buffer
    for _ in range(5):
        g = rng.standard_normal(3000).astype(np.float32)
        ref.grad = torch.tensor(g)
        opt.step()
        nesterov_step(theta, g.copy(), mom, 0.7, 0.9, nesterov, scratch)
    np.testing.assert_allclose(theta, ref.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_nesterov_step_is_deterministic_bytes() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal(10_001).astype(np.float32)
    out = []
    for scratch_len in (1, 4096, 20_000):  # the chunking must not change a single bit
        theta, mom = np.ones(10_001, np.float32), np.full(10_001, 0.25, np.float32)
        nesterov_step(theta, g.copy(), mom, 0.7, 0.9, True, np.empty(scratch_len, np.float32))
        out.append(theta.tobytes() + mom.tobytes())
    assert out[0] == out[1] == out[2]


def test_diloco_rejects_bad_arguments_before_io() -> None:
    model = torch.nn.Linear(3, 2)
    comm: Any = object()  # never touched: validation precedes any I/O
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCo(comm, model, sync_every=0)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCo(comm, model, sync_every=5, outer_momentum=1.0)
    with pytest.raises(ValueError, match="nesterov"):
        DiLoCo(comm, model, sync_every=5, outer_momentum=0.0)
    other = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not trainable parameters"):
        DiLoCo(comm, model, other, sync_every=5)
    with pytest.raises(TypeError, match="non-float"):
        DiLoCo(comm, {"i": torch.zeros(3, dtype=torch.int64)}, sync_every=5)
    assert {p.value for p in Phase} == {0, 1, 2, 3}


def test_import_contract() -> None:
    from pccl.bindings.torch import DiLoCo as D

    assert D is DiLoCo


# ====================================================================== DiLoCo logic, in process


class _Done:
    """A finished collective: writes its result when waited, like the ring does on success."""

    def __init__(self, tag: int, result: Any, recv: np.ndarray, fail: BaseException | None):
        self.tag, self._result, self._recv, self._fail = tag, result, recv, fail

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        if self._fail is not None:
            raise self._fail
        self._recv[...] = self._result
        return ReduceInfo(2, self._recv.nbytes, self._recv.nbytes, 0.0)


class _GroupComm:
    """A fake group: this peer plus ``world - 1`` others that contribute ``others(send)``.

    By default the others mirror this peer (same pseudo-gradient, same weight), so the group mean
    is this peer's own contribution. Records topology updates and syncs (phase, revision).
    """

    def __init__(self, world: int = 2, aborts: int = 0, on_first_sync: Any = None) -> None:
        self.group_world_size = world
        self.aborts = aborts
        self.on_first_sync = on_first_sync
        self.updates = 0
        self.syncs: list[tuple[int, int]] = []
        self.launches: list[tuple[int, np.ndarray]] = []  # (tag, copy of send)
        self.others_send: np.ndarray | None = None
        self.others_count: np.ndarray | None = None

    def update_topology(self) -> None:
        self.updates += 1

    def sync_shared_state(self, state: pccl.SharedState, strategy: Any = None, *, timeout: Any):
        if not self.syncs and self.on_first_sync is not None:
            self.on_first_sync(state)
        ctrl = state.entries["diloco/ctrl"].array
        self.syncs.append((int(ctrl[2]), state.revision))
        return SyncInfo(state.revision, 0, 0)

    def all_reduce_async(self, send: Any, recv: Any, *, op: Any, quantization: Any = 0, tag: int):
        if self.group_world_size < 2:
            raise pccl.TooFewPeers("alone")
        self.launches.append((tag, np.array(send, copy=True)))
        fail = None
        if self.aborts and len(self.launches) % 2 == 0:  # abort each count+bucket pair
            self.aborts -= 1
            fail = pccl.CollectiveAborted("peer left")
        if send.dtype == np.int64:  # the contributor count
            others = send * (self.group_world_size - 1)
            result = send + (others if self.others_count is None else self.others_count)
        else:
            others = send * (self.group_world_size - 1)
            result = send + (others if self.others_send is None else self.others_send)
        return _Done(tag, result, recv, fail)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def _train(model: torch.nn.Module, diloco: DiLoCo, steps: int) -> Any:
    """``steps`` fake inner steps; returns (last boundary info, local params before it)."""
    info, before = None, None
    for i in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * (i + 1) * torch.ones_like(p))
        snapshot = _flat(model)
        out = diloco.step()
        if out is not None:
            info, before = out, snapshot
    return info, before


def _bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (nearest even) and back: how DiLoCo stores its residual."""
    from pccl import kernels

    bits = np.empty(x.size, np.uint16)
    out = np.empty(x.size, np.float32)
    kernels.encode_bf16(np.ascontiguousarray(x, np.float32), bits)
    kernels.decode_bf16(bits, out)
    return out


def _residual(d: DiLoCo) -> np.ndarray:
    from pccl import kernels

    assert d._residual is not None
    out = np.empty(d._residual.size, np.float32)
    kernels.decode_bf16(d._residual, out)
    return out


def _outer(d: DiLoCo) -> np.ndarray:
    return np.concatenate([t.reshape(-1).numpy() for t in d.outer_parameters().values()])


@pytest.mark.parametrize("quant", ["NONE", "UINT8", "INT4", "INT2"])
def test_sync_outer_step_is_the_reference_update(quant: str) -> None:
    from pccl import kernels

    model = _model()
    comm = _GroupComm(world=3)
    d = DiLoCo(comm, model, sync_every=4, quantization=pccl.Quantization[quant])
    theta0 = _flat(model)
    assert d.outer_step == 0 and comm.syncs == [(Phase.IDLE, 0)] and comm.updates == 0
    assert _train(model, d, 3)[0] is None  # no boundary before the 4th step
    info, local = _train(model, d, 1)
    assert info.applied and info.contributors == 3 and info.outer_step == 1
    g = theta0 - local  # the others mirror us: the group mean is our own pseudo-gradient
    expect, mom = theta0.copy(), np.zeros_like(theta0)
    nesterov_step(expect, g.copy(), mom, 0.7, 0.9, True, np.empty(8, np.float32))
    assert _outer(d).tobytes() == expect.tobytes()
    assert _flat(model).tobytes() == expect.tobytes()  # local <- outer
    assert comm.syncs[-1] == (Phase.IDLE, 1) and comm.updates == 1  # admit, then sync rev + 1
    assert [t for t, _ in comm.launches] == [d._tag, d._tag + 1]  # count + one bucket
    if quant != "NONE":  # error feedback: what the wire encoding loses of our contribution
        deq = np.empty_like(g)
        # the ring's chunks (one per peer: 66 elements, 3 peers -> 22 each), each quantized in
        # blocks from its own start
        for lo in range(0, g.size, 22):
            gc, dc = g[lo : lo + 22], deq[lo : lo + 22]
            if quant == "UINT8":
                qb = np.empty(gc.size, np.uint8)
                meta = np.empty(2 * kernels.num_blocks(gc.size, 4096), np.float32)
                kernels.quantize_u8(gc, qb, meta, 4096)
                kernels.dequantize_u8(qb, meta, dc, 4096)
            else:  # packed codes in blocks of PACKED_BLOCK, as the ring sends them
                bits = 4 if quant == "INT4" else 2
                qb = np.empty(kernels.packed_len(gc.size, bits), np.uint8)
                meta = np.empty(2 * kernels.num_blocks(gc.size, kernels.PACKED_BLOCK), np.float32)
                kernels.quantize_packed(gc, qb, meta, bits)
                kernels.dequantize_packed(qb, meta, dc, bits)
        residual = _bf16(g - deq)  # kept as bfloat16 bits, round to nearest even
        assert _residual(d).tobytes() == residual.tobytes()
        _, local2 = _train(model, d, 4)
        sent = comm.launches[-1][1]
        assert sent.tobytes() == ((expect - local2) + residual).tobytes()  # added to the next


def test_buckets_split_the_all_reduce_without_changing_the_result() -> None:
    outs = []
    for bucket_bytes in (4096, 1 << 20):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        comm = _GroupComm(world=2)
        d = DiLoCo(comm, model, sync_every=2, bucket_bytes=bucket_bytes)
        _train(model, d, 2)
        tags = [t for t, _ in comm.launches]
        assert tags == [d._tag, *range(d._tag + 1, d._tag + 1 + len(d._buckets))]
        outs.append((len(d._buckets), _outer(d).tobytes()))
    assert outs[0][0] == 5 and outs[1][0] == 1 and outs[0][1] == outs[1][1]


def test_retry_after_abort_admits_and_syncs_in_retry_phase() -> None:
    model = _model()
    comm = _GroupComm(world=3, aborts=2)
    d = DiLoCo(comm, model, sync_every=2, quantization=pccl.Quantization.NONE)
    info, _ = _train(model, d, 2)
    assert info.retries == 2 and info.applied and d.stats.retries == 2
    assert comm.updates == 3
    assert comm.syncs == [(0, 0), (Phase.RETRY, 1), (Phase.RETRY, 2), (Phase.IDLE, 3)]
    assert info.revision == 3 == d.revision
    sends = [s for t, s in comm.launches if t != d._tag]
    assert all(s.tobytes() == sends[0].tobytes() for s in sends)  # the same bytes retried


def test_lone_peer_drops_the_step_and_resets_local() -> None:
    model = _model()
    comm = _GroupComm(world=1)
    d = DiLoCo(comm, model, sync_every=3)
    theta0 = _flat(model)
    info, _ = _train(model, d, 3)
    assert not info.applied and info.contributors == 0 and d.stats.dropped == 1
    assert _flat(model).tobytes() == theta0.tobytes()  # the round's local progress is discarded
    assert d.outer_step == 1 and d.applied_steps == 0 and comm.updates == 1


def test_delayed_applies_one_step_late_with_eager_start() -> None:
    model = _model()
    comm = _GroupComm(world=2)
    d = DiLoCo(comm, model, sync_every=2, delayed=True, quantization=pccl.Quantization.NONE)
    theta0 = _flat(model)
    info1, local1 = _train(model, d, 2)
    g1 = theta0 - local1
    assert not info1.applied and comm.syncs[-1] == (Phase.LAUNCH, 1)
    assert _outer(d).tobytes() == theta0.tobytes()  # nothing applied yet
    # the next round starts from the step our own pseudo-gradient would give (eager start)
    preview, mom = theta0.copy(), np.zeros_like(theta0)
    nesterov_step(preview, g1.copy(), mom, 0.7, 0.9, True, np.empty(8, np.float32))
    np.testing.assert_allclose(_flat(model), preview, rtol=1e-6, atol=1e-7)
    start2 = _flat(model)
    info2, local2 = _train(model, d, 2)
    assert info2.applied and info2.contributors == 2
    # round 1 is applied one step late, exactly; round 2's pseudo-gradient is from its start
    theta1, mom1 = theta0.copy(), np.zeros_like(theta0)
    nesterov_step(theta1, g1.copy(), mom1, 0.7, 0.9, True, np.empty(8, np.float32))
    assert _outer(d).tobytes() == theta1.tobytes()
    assert comm.launches[-1][1].tobytes() == (start2 - local2).tobytes()
    fl = d.flush()
    assert fl is not None and fl.applied and comm.syncs[-1][0] == Phase.IDLE
    assert _flat(model).tobytes() == _outer(d).tobytes() and d.flush() is None
    assert d.applied_steps == 2 and d.outer_step == 2


@pytest.mark.parametrize("delayed", [False, True])
def test_newcomer_joins_a_retry_with_zero_weight(delayed: bool) -> None:
    incumbent = _model(seed=1)
    theta_run = _flat(incumbent)

    def receive(state: pccl.SharedState) -> None:  # the run's state arrives in the first sync
        ents = state.entries
        off = 0
        for name, p in incumbent.named_parameters():
            n = p.numel()
            ents[f"outer/{name}"].array[...] = theta_run[off : off + n]  # flat storage views
            off += n
        ctrl = ents["diloco/ctrl"].array
        ctrl[:3] = [7, 7, Phase.RETRY]
        state.revision = 12

    comm = _GroupComm(world=3, on_first_sync=receive)
    g_others = np.full(theta_run.size, 0.5, np.float32)
    comm.others_send = g_others * 2
    comm.others_count = np.array([2, 2, 0])  # total weight, contributors, token-weighted
    model = _model(seed=2)
    d = DiLoCo(comm, model, sync_every=5, delayed=delayed, quantization=pccl.Quantization.NONE)
    count_sent = [s for t, s in comm.launches if t == d._tag]
    grad_sent = [s for t, s in comm.launches if t != d._tag]
    assert count_sent[0].tolist() == [0, 0, 0] and not grad_sent[0].any()  # zeros, weight 0
    expect, mom = theta_run.copy(), np.zeros_like(theta_run)
    nesterov_step(expect, g_others.copy(), mom, 0.7, 0.9, True, np.empty(8, np.float32))
    assert _outer(d).tobytes() == expect.tobytes()  # the mean over the 2 contributors only
    assert d.outer_step == 8 and d.applied_steps == 8
    assert comm.syncs[1] == ((Phase.LAUNCH if delayed else Phase.IDLE), 13)
    if delayed:
        assert len(count_sent) == 2 and count_sent[1].tolist() == [0, 0, 0]  # joins the launch
    else:
        assert _flat(model).tobytes() == expect.tobytes()


class _FailAt(_GroupComm):
    """A group whose ``fail``-th launch (0-based, counts included) is aborted."""

    def __init__(self, fail: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail = fail
        self.next_at_syncs: list[int] = []

    def sync_shared_state(self, state: pccl.SharedState, strategy: Any = None, *, timeout: Any):
        self.next_at_syncs.append(int(state.entries["diloco/ctrl"].array[NEXT_BUCKET]))
        return super().sync_shared_state(state, strategy, timeout=timeout)

    def all_reduce_async(self, send: Any, recv: Any, *, op: Any, quantization: Any = 0, tag: int):
        done = super().all_reduce_async(send, recv, op=op, quantization=quantization, tag=tag)
        if len(self.launches) - 1 == self.fail:
            done._fail = pccl.CollectiveAborted("peer left")
        return done


def test_sync_bucket_abort_retries_from_that_bucket_and_applies_each_once() -> None:
    """Three buckets; bucket 1's all-reduce is aborted: bucket 0 stays applied (once), the
    retry syncs in RETRY with ctrl[NEXT_BUCKET] = 1, then recounts and reduces buckets 1 and 2.
    The others mirror us, so every bucket's mean is our pseudo-gradient: the outer state must be
    exactly the reference update (a bucket applied twice or skipped would differ)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 50)  # 2550 parameters: buckets of 1024, 1024, 502
    comm = _FailAt(fail=2, world=2)
    d = DiLoCo(comm, model, sync_every=2, bucket_bytes=4096, quantization=pccl.Quantization.NONE)
    assert len(d._buckets) == 3
    theta0 = _flat(model)
    info, local = _train(model, d, 2)
    assert info.applied and info.retries == 1 and d.outer_step == 1
    tags = [t for t, _ in comm.launches]
    t = d._tag
    assert tags == [t, t + 1, t + 2, t, t + 2, t + 3]  # count, b0, b1 (aborted), count, b1, b2
    assert comm.syncs[1][0] == Phase.RETRY and comm.next_at_syncs[1] == 1
    assert comm.next_at_syncs[-1] == 0  # reset for the next boundary
    expect, mom = theta0.copy(), np.zeros_like(theta0)
    nesterov_step(expect, theta0 - local, mom, 0.7, 0.9, True, np.empty(8, np.float32))
    assert _outer(d).tobytes() == expect.tobytes()
    assert _flat(model).tobytes() == expect.tobytes()


def test_sync_newcomer_resumes_at_the_next_bucket() -> None:
    """A newcomer whose first sync says RETRY at bucket 1 takes part (zeros, weight 0) in
    buckets 1 and 2 only; bucket 0 of the run's outer state is left as received."""
    torch.manual_seed(1)
    incumbent = torch.nn.Linear(50, 50)
    theta_run = _flat(incumbent)

    def receive(state: pccl.SharedState) -> None:
        off = 0
        for name, p in incumbent.named_parameters():
            n = p.numel()
            state.entries[f"outer/{name}"].array[...] = theta_run[off : off + n]  # flat views
            off += n
        ctrl = state.entries["diloco/ctrl"].array
        ctrl[:3] = [4, 4, Phase.RETRY]
        ctrl[NEXT_BUCKET] = 1
        state.revision = 9

    comm = _GroupComm(world=2, on_first_sync=receive)
    g_other = np.linspace(-1, 1, theta_run.size, dtype=np.float32)
    comm.others_send = None
    torch.manual_seed(2)
    model = torch.nn.Linear(50, 50)
    comm.others_count = np.array([1, 1, 0])
    orig = comm.all_reduce_async

    def others(send: Any, recv: Any, *, op: Any, quantization: Any = 0, tag: int) -> Any:
        if send.dtype == np.float32:  # the other peer's pseudo-gradient over this bucket
            a = (tag - d_tag - 1) * 1024
            comm.others_send = g_other[a : a + send.size]
        return orig(send, recv, op=op, quantization=quantization, tag=tag)

    d_tag = 0x0D10C000
    comm.all_reduce_async = others  # type: ignore[method-assign]
    d = DiLoCo(
        comm, model, sync_every=5, bucket_bytes=4096, quantization=pccl.Quantization.NONE, tag=d_tag
    )
    tags = [t for t, _ in comm.launches]
    assert tags == [d_tag, d_tag + 2, d_tag + 3]  # count, buckets 1 and 2
    assert not any(s.any() for _, s in comm.launches)  # zeros, weight 0
    expect, mom = theta_run.copy(), np.zeros_like(theta_run)
    nesterov_step(
        expect[1024:], g_other[1024:].copy(), mom[1024:], 0.7, 0.9, True, np.empty(8, np.float32)
    )
    assert _outer(d).tobytes() == expect.tobytes()
    assert d.outer_step == 5 and d.applied_steps == 5 and comm.syncs[1] == (Phase.IDLE, 10)
    assert _flat(model).tobytes() == expect.tobytes()


def test_newcomer_with_other_hyperparameters_is_refused() -> None:
    def receive(state: pccl.SharedState) -> None:
        state.entries["diloco/ctrl"].array[3] += 1

    with pytest.raises(ValueError, match="differ from the run"):
        DiLoCo(_GroupComm(on_first_sync=receive), _model(), sync_every=5)


def test_newcomer_with_a_different_field_is_refused_naming_it() -> None:
    def run_lr(state: pccl.SharedState) -> None:  # the run was started with outer_lr=0.5
        hp = state.entries["diloco/hparams"].array
        hp[3] = 0.5

    with pytest.raises(ValueError, match=r"outer_lr: this peer 0\.7, the run 0\.5"):
        DiLoCo(_GroupComm(on_first_sync=run_lr), _model(), sync_every=5)

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    names = DiLoCo(_GroupComm(), model, opt, sync_every=5)._hparam_names
    i = names.index("inner_optimizer.param_groups[0].lr")

    def run_inner_lr(state: pccl.SharedState) -> None:
        state.entries["diloco/hparams"].array[i] = 1e-3

    with pytest.raises(ValueError, match=r"inner_optimizer\.param_groups\[0\]\.lr: this peer"):
        DiLoCo(_GroupComm(on_first_sync=run_inner_lr), model, opt, sync_every=5)
    # a peer without an inner optimizer is not compared on its fields (NaN = unknown)
    DiLoCo(_GroupComm(on_first_sync=run_inner_lr), _model(), None, sync_every=5)


@pytest.mark.parametrize("quant", ["NONE", "UINT8"])
def test_token_weighted_mean_is_exact(quant: str) -> None:
    model = _model()
    comm = _GroupComm(world=2)
    d = DiLoCo(comm, model, sync_every=2, quantization=pccl.Quantization[quant])
    theta0 = _flat(model)
    g_other = np.linspace(-1, 1, theta0.size, dtype=np.float32)
    comm.others_send = g_other * np.float32(6)  # the other peer: 3 tokens per step, 2 steps
    comm.others_count = np.array([6, 1, 1])
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * (i + 1))
        local = _flat(model)
        info = d.step(tokens=1)  # this peer: 1 token per step (batch sizes 1:3)
    assert info is not None and info.applied and info.weight == 8 and info.contributors == 2
    g = theta0 - local
    sent = comm.launches[-1][1]
    assert sent.tobytes() == (g * np.float32(2)).tobytes()
    mean = (g * np.float32(2) + g_other * np.float32(6)) / np.float32(8)
    expect, mom = theta0.copy(), np.zeros_like(theta0)
    nesterov_step(expect, mean, mom, 0.7, 0.9, True, np.empty(8, np.float32))
    assert _outer(d).tobytes() == expect.tobytes()
    assert comm.launches[-2][1].tolist() == [2, 1, 1]  # weight, contributor, token-weighted
    if quant == "UINT8":  # the residual is kept per unit of weight
        from pccl import kernels

        x = g * np.float32(2)
        qb = np.empty(x.size, np.uint8)
        meta = np.empty(2 * kernels.num_blocks(x.size, 4096), np.float32)
        deq = np.empty_like(x)
        kernels.quantize_u8(x, qb, meta, 4096)
        kernels.dequantize_u8(qb, meta, deq, 4096)
        assert _residual(d).tobytes() == _bf16((x - deq) / np.float32(2)).tobytes()


def test_zero_tokens_contributes_nothing_and_bad_tokens_are_refused() -> None:
    model = _model()
    comm = _GroupComm(world=2)
    d = DiLoCo(comm, model, sync_every=1, quantization=pccl.Quantization.NONE)
    with pytest.raises(ValueError, match="tokens"):
        d.step(tokens=-1)
    with pytest.raises(ValueError, match="tokens"):
        d.step(tokens=1.5)  # type: ignore[arg-type]
    comm.others_count = np.array([0, 0, 0])
    comm.others_send = np.zeros(_flat(model).size, np.float32)
    info = d.step(tokens=0)
    assert info is not None and not info.applied and info.weight == 0
    assert comm.launches[-2][1].tolist() == [0, 0, 0] and not comm.launches[-1][1].any()


def _sched(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    return opt, sched


def test_extra_state_newcomer_adopts_scheduler_rng_and_dict() -> None:
    from pccl.bindings.extra_state import pack

    inc_model = _model()
    inc_opt, inc_sched = _sched(inc_model)
    for _ in range(37):
        inc_opt.step()
        inc_sched.step()
    inc_rng = torch.Generator().manual_seed(99)
    torch.rand(5, generator=inc_rng)
    inc_cfg = {"data_epoch": 3, "path": "/ckpt/7", "seen": [1, 2], "w": torch.arange(3.0)}
    inc_counter = np.array([123], np.int64)

    def receive(state: pccl.SharedState) -> None:
        e = state.entries
        d_inc = {"sched": inc_sched, "rng": inc_rng, "cfg": inc_cfg}
        from pccl.bindings.extra_state import stateful_adapter

        for name, v in d_inc.items():
            a = stateful_adapter(name, v)
            assert a is not None
            pack(a.get(), e[f"extra/{name}"].array, name)
        e["extra/counter"].array[...] = inc_counter

    model = _model(seed=3)
    opt, sched = _sched(model)
    rng = torch.Generator().manual_seed(1)
    cfg: dict[str, Any] = {"data_epoch": 0}
    counter = np.zeros(1, np.int64)
    DiLoCo(
        _GroupComm(on_first_sync=receive),
        model,
        opt,
        sync_every=5,
        extra_state={"sched": sched, "rng": rng, "cfg": cfg, "counter": counter},
    )
    assert sched.last_epoch == inc_sched.last_epoch == 37
    assert sched.get_last_lr() == inc_sched.get_last_lr()
    assert opt.param_groups[0]["lr"] == inc_opt.param_groups[0]["lr"]  # not just the scheduler
    assert torch.equal(rng.get_state(), inc_rng.get_state())
    assert cfg.keys() == inc_cfg.keys() and cfg["path"] == "/ckpt/7" and cfg["seen"] == [1, 2]
    assert torch.equal(cfg["w"], inc_cfg["w"])
    assert counter.tolist() == [123]


def test_quorum_arguments_are_checked_before_io() -> None:
    with pytest.raises(ValueError, match="delayed"):
        DiLoCo(_GroupComm(), _model(), sync_every=5, min_quorum=2, delayed=True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="min_quorum"):
            DiLoCo(_GroupComm(), _model(), sync_every=5, min_quorum=bad)  # type: ignore[arg-type]
    for bad in (-0.1, float("nan"), 1e9):
        with pytest.raises(ValueError, match="grace_s"):
            DiLoCo(_GroupComm(), _model(), sync_every=5, min_quorum=2, grace_s=bad)


def test_extra_state_refusals() -> None:
    with pytest.raises(TypeError, match="extra_state\\['x'\\] is a object"):
        DiLoCo(_GroupComm(), _model(), sync_every=5, extra_state={"x": object()})
    with pytest.raises(ValueError, match="extra_state_bytes"):
        DiLoCo(
            _GroupComm(),
            _model(),
            sync_every=5,
            extra_state={"big": {"a": "x" * 5000}},
            extra_state_bytes=1024,
        )
    with pytest.raises(TypeError, match="cannot share a set"):
        DiLoCo(_GroupComm(), _model(), sync_every=5, extra_state={"s": {"k": {1, 2}}})


def test_extra_state_blob_from_the_network_is_checked() -> None:
    from pccl.bindings.extra_state import unpack

    buf = np.zeros(64, np.uint8)
    buf[:4] = np.frombuffer((1000).to_bytes(4, "little"), np.uint8)
    with pytest.raises(pccl.SharedStateError, match="exceeds"):
        unpack(buf, "x")
    rng = np.random.default_rng(0)
    for _ in range(300):  # random bytes never raise anything but SharedStateError
        junk = rng.integers(0, 256, 64, dtype=np.uint8)
        junk[:4] = np.frombuffer(int(rng.integers(0, 61)).to_bytes(4, "little"), np.uint8)
        try:
            unpack(junk, "x")
        except pccl.SharedStateError:
            pass


# ====================================================================== end to end


@functools.lru_cache(maxsize=4)
def ddp_loss(outer_steps: int) -> float:
    from pccl.tools import charlm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return charlm.ddp_baseline(charlm.TaskConfig(), 3, outer_steps * H)[-1]
    finally:
        torch.set_num_threads(threads)


def ddp_bytes(outer_steps: int) -> int:
    from pccl.tools import charlm

    return charlm.ddp_bytes_per_step(charlm.num_params(charlm.TaskConfig()), 3) * outer_steps * H


def outer_events(w: Any) -> list[dict[str, Any]]:
    return [e for e in w.events if e.get("event") == "outer"]


def check_parity(ws: list[Any], outer_steps: int) -> dict[int, set[str]]:
    """Every outer step: every reporting peer has the same digest, sync rx is 0 after the first
    sync, and the revision grows by exactly one per sync (one per boundary plus one per retry)."""
    by_step: dict[int, dict[str, str]] = {}
    for w in ws:
        evs = outer_events(w)
        joined = next(e for e in w.events if e.get("event") == "joined")
        prev_rev = joined["revision"]
        for e in evs:
            by_step.setdefault(e["step"], {})[w.name] = e["digest"]
            assert e["sync_rx"] == 0, f"{w.name} re-fetched state at step {e['step']}: {e}"
            assert e["revision"] == prev_rev + 1 + e["retries"], (w.name, e, prev_rev)
            prev_rev = e["revision"]
    assert sorted(by_step) == list(range(1, outer_steps + 1)), sorted(by_step)
    for step, d in sorted(by_step.items()):
        assert len(set(d.values())) == 1, f"outer step {step}: digests differ: {d}"
        assert len(d) >= 2, f"outer step {step} reported by {sorted(d)} only"
    return {s: set(d) for s, d in by_step.items()}


def check_results(results: dict[str, dict[str, Any]], outer_steps: int) -> float:
    assert len({r["digest"] for r in results.values()}) == 1, results
    loss = next(iter(results.values()))["loss"]
    assert all(r["loss"] == loss for r in results.values())
    ddp = ddp_loss(outer_steps)
    tx = max(r["tx"] + r["sync_tx"] for r in results.values())
    print(  # shown with -s / -rP: the figures this run produced
        f"\nDiLoCo loss {loss:.4f} vs fp32 DDP {ddp:.4f} ({loss / ddp:.3f}x); bytes sent per "
        f"peer {tx} vs fp32 DDP {ddp_bytes(outer_steps)} ({ddp_bytes(outer_steps) / tx:.1f}x less)"
    )
    assert loss <= 1.10 * ddp, f"DiLoCo loss {loss:.4f} vs fp32 DDP {ddp:.4f}"
    for r in results.values():
        assert r["repairs"] == 0
        assert r["outer_step"] == outer_steps
        assert 0 < r["tx"] < ddp_bytes(outer_steps) / 20  # ~40x less than fp32 DDP
    return loss


def params(shard: int, outer_steps: int, delayed: bool, **kw: Any) -> dict[str, Any]:
    return {
        "shard": shard,
        "outer_steps": outer_steps,
        "sync_every": H,
        "delayed": delayed,
        "quantization": "UINT8",
        "error_feedback": True,
        "threads": 1,
        "streams": 2,
        **kw,
    }


@pytest.mark.e2e
@pytest.mark.timeout(150)
@pytest.mark.parametrize("delayed", [False, True], ids=["sync", "delayed"])
def test_diloco_three_peers_parity_and_loss(master: Any, workers: Any, delayed: bool) -> None:
    steps = 20
    ws = [
        workers.spawn(WORKER, master, params(i, steps, delayed, wait_world=3), name=f"peer{i}")
        for i in range(3)
    ]
    ddp_loss(steps)  # the baseline trains here while the peers start up
    results = workers.wait_exit(ws, 120)
    reporters = check_parity(ws, steps)
    assert all(len(r) == 3 for r in reporters.values())
    for w in ws:
        applied = [(e["applied"], e["contributors"]) for e in outer_events(w)]
        # delayed: the first boundary has no earlier round to apply (then `flush` applies the last)
        assert applied == [(False, 0)] * delayed + [(True, 3)] * (steps - delayed), applied
        assert all(e["retries"] == 0 and e["world"] == 3 for e in outer_events(w))
    check_results(results, steps)


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_diloco_int4_error_feedback_converges(master: Any, workers: Any) -> None:
    """Three peers, INT4 pseudo-gradients with error feedback: bit-identical parameters every
    outer step and a final loss within 10 % of fp32 DDP, on a quarter of UINT8's ring bytes."""
    steps = 20
    ws = [
        workers.spawn(
            WORKER, master, params(i, steps, False, wait_world=3, quantization="INT4"), name=f"p{i}"
        )
        for i in range(3)
    ]
    ddp_loss(steps)
    results = workers.wait_exit(ws, 120)
    check_parity(ws, steps)
    check_results(results, steps)


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["sync", "delayed", "streaming"])
def test_diloco_survives_kill_and_late_join(master: Any, workers: Any, mode: str) -> None:
    """SIGKILL of a peer, then a late join; parity after every (fragment) boundary. Streaming:
    P = 4 fragments, tau = 1, H = 8 (a fragment boundary every 2 inner steps, each fragment's
    exchange landing one inner step after it starts), so the faults hit fragment boundaries."""
    delayed = mode == "delayed"
    steps, kill_at, join_at = 24, 6, 9
    extra: dict[str, Any] = {}
    if mode == "streaming":
        steps, kill_at, join_at = 48, 12, 18
        extra = {"fragments": 4, "overlap": 1, "mix": 0.5, "sync_every": 8}
    else:
        ddp_loss(steps)
    # 20 ms per inner step: 0.2 s per outer step, so the faults land mid-run, not after it
    ws = [
        workers.spawn(
            WORKER,
            master,
            params(i, steps, delayed, wait_world=3, step_ms=20, **extra),
            name=f"peer{i}",
        )
        for i in range(3)
    ]
    late = workers.spawn(
        WORKER, master, params(2, steps, delayed, gate=True, step_ms=20, **extra), name="late"
    )
    workers.wait_event(lambda w, e: w is late and e["event"] == "gated", 60, "newcomer ready")

    victim = ws[2]
    workers.wait_event(
        lambda w, e: e["event"] == "outer" and e["step"] >= kill_at, 90, f"outer step {kill_at}"
    )
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.proc.wait(10) == -signal.SIGKILL  # the fault fired...
    assert max(e["step"] for e in outer_events(victim)) < steps  # ...mid-run

    workers.wait_event(
        lambda w, e: e["event"] == "outer" and e["step"] >= join_at, 90, f"outer step {join_at}"
    )
    late.proc.send_signal(signal.SIGUSR1)
    _, joined = workers.wait_event(
        lambda w, e: w is late and e["event"] == "joined", 60, "the newcomer's admission"
    )
    assert join_at <= joined["outer_step"] < steps and joined["world"] == 3
    assert joined["sync_rx"] > 0  # it received the outer state, verified by hash

    survivors = [ws[0], ws[1], late]
    results = workers.wait_exit(survivors, 150)
    reporters = check_parity([*survivors, victim], steps)
    # the kill was noticed: a retried all-reduce or a boundary with two peers
    evs = outer_events(ws[0])
    assert any(e["retries"] for e in evs) or any(e["world"] == 2 for e in evs)
    after = [s for s in reporters if s > joined["outer_step"]]
    assert after and all("late" in reporters[s] and len(reporters[s]) == 3 for s in after)
    contrib = [e["contributors"] for e in outer_events(late)]
    # delayed: the first boundary after joining applies the round the newcomer did not train
    assert contrib == ([2] if delayed else []) + [3] * (len(contrib) - delayed), contrib
    if mode == "streaming":  # every fragment in turn, each boundary sending ~1/4 of the model
        frags = [e["fragment"] for e in outer_events(ws[0])]
        assert frags == [(e["step"] - 1) % 4 for e in outer_events(ws[0])]
        assert len(set(frags)) == 4
        assert {r["digest"] for r in results.values()} and len(
            {r["digest"] for r in results.values()}
        ) == 1
        return
    check_results(results, steps)


def test_diloco_stats_is_a_dataclass() -> None:
    import dataclasses

    from pccl.bindings.diloco import DiLoCoStats

    assert dataclasses.is_dataclass(DiLoCoStats)
    stats = DiLoCoStats()
    assert dataclasses.asdict(stats) and stats == DiLoCoStats()


def round_events(w: Any) -> list[dict[str, Any]]:
    return [e for e in w.events if e.get("event") == "round"]


@pytest.mark.e2e
@pytest.mark.timeout(180)
@pytest.mark.parametrize("grace_s", [0.08, 0.0], ids=["called-early", "late"])
def test_quorum_straggler_parity_every_round_and_scheduler_follows_the_run(
    master: Any, workers: Any, grace_s: float
) -> None:
    """Four peers, one 3x slower, min_quorum=3: the group does not wait for the straggler.
    With a grace, told that the quorum is in, it contributes what it trained so far (fewer
    inner steps, a smaller token weight) and its local H adapts. Without one (``late``) it
    trains its H steps and its pseudo-gradient joins the next round (in fewer rounds). Either
    way every round's outer state is identical on every peer, the contributor set is the
    master's, and its LR schedule follows the run's."""
    steps = 12
    common = {
        "min_quorum": 3,
        "grace_s": grace_s,
        "wait_world": 4,
        "step_ms": 15,
        "lr_schedule": "cosine",
        "weighted": True,
    }
    ws = [
        workers.spawn(
            WORKER,
            master,
            params(i, steps, False, slow=3.0 if i == 3 else 1.0, **common),
            name=f"peer{i}",
        )
        for i in range(4)
    ]
    results = workers.wait_exit(ws, 150)
    ids = {w.name: results[w.name]["peer_id"] for w in ws}
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for w in ws:
        for e in round_events(w):
            by_step.setdefault(e["step"], {})[w.name] = e
    assert set(range(1, steps + 1)) <= set(by_step), sorted(by_step)
    straggler_rounds = 0
    for step in range(1, steps + 1):
        seen = by_step[step]
        digests = {e["digest"] for e in seen.values()}
        assert len(digests) == 1 and "" not in digests, (step, seen)
        contrib = {tuple(e["contributors"]) for e in seen.values()}
        assert len(contrib) == 1, (step, contrib)  # decided by the master, the same for all
        (c,) = contrib
        for name, e in seen.items():
            assert e["included"] == (ids[name] in c)
        straggler_rounds += ids["peer3"] in c
        assert len(c) >= 3 or step > steps - 2, (step, c)  # the quorum (the run's tail aside)
    fast_rounds = sum(
        ids["peer0"] in by_step[s]["peer0"]["contributors"] for s in range(1, steps + 1)
    )
    print(
        f"\nquorum: straggler in {straggler_rounds} rounds, a fast peer in {fast_rounds}; inner "
        f"steps {[results[w.name]['inner_steps'] for w in ws]}; seconds "
        f"{[round(results[w.name]['seconds'], 2) for w in ws]}"
    )
    # no grace: a fast peer a moment behind a quorum that the straggler's late post completed
    # waits for the next round too (grace_s is what avoids that)
    assert straggler_rounds >= 1 and fast_rounds >= (steps - 2 if grace_s else steps // 2)
    if not grace_s:
        assert straggler_rounds < fast_rounds  # late: its H steps land in fewer rounds
    # the straggler's contributions cover fewer inner steps, and weigh accordingly
    slow_h = [e["inner"] for e in outer_events(ws[3])]
    fast_h = [e["inner"] for e in outer_events(ws[0])]
    if grace_s:  # called early: fewer steps per contribution
        assert sum(slow_h) / len(slow_h) < H < 1.5 * sum(fast_h) / len(fast_h)
    else:
        assert set(slow_h) == {H}
    per_step = 32 * 8  # TaskConfig batch * context: tokens of one inner step
    for w in ws:  # the applied weight is the sum of the contributors' tokens
        applied = [e for e in outer_events(w) if e["applied"]]  # (alone at the end: dropped)
        assert applied and all(e["weight"] % per_step == 0 and e["weight"] > 0 for e in applied)
    assert results["peer3"]["inner_steps"] < results["peer0"]["inner_steps"]
    # the master judged every round's votes: nobody held other bytes (extra state included:
    # each round takes one contributor's schedule, moved to every peer before the sync)
    assert "parity violation" not in master.log.read_text(errors="replace")
    # the straggler's LR schedule is the run's after it picked up a round
    lead = {e["step"]: (e["sched_epoch"], e["lr"]) for e in outer_events(ws[0])}
    for e in outer_events(ws[3]):
        if e["step"] in lead:
            assert (e["sched_epoch"], e["lr"]) == lead[e["step"]], (e, lead[e["step"]])
    assert max(r["inner_steps"] for r in results.values()) > results["peer3"]["inner_steps"]
    for r in results.values():
        assert r["repairs"] == 0


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_two_peers_batch_1_to_3_give_exactly_the_token_weighted_mean(
    master: Any, workers: Any
) -> None:
    ws = [
        workers.spawn(
            "../diloco_workers/weighted_peer.py",
            master,
            {"shard": i, "tokens": t, "world": 2},
            name=f"peer{i}",
        )
        for i, t in enumerate((32, 96))  # batch sizes 1:3 (tokens per step)
    ]
    res = workers.wait_exit(ws, 80)
    r0, r1 = res["peer0"], res["peer1"]

    def arr(h: str) -> np.ndarray:
        return np.frombuffer(bytes.fromhex(h), dtype=np.float32).copy()

    assert r0["theta0"] == r1["theta0"] and r0["grad"] != r1["grad"]
    assert r0["weight"] == r1["weight"] == 128 and r0["contributors"] == 2 and r0["applied"]
    mean = (arr(r0["grad"]) * np.float32(32) + arr(r1["grad"]) * np.float32(96)) / np.float32(128)
    expect = arr(r0["theta0"])
    nesterov_step(expect, mean, np.zeros_like(expect), 0.7, 0.9, True, np.empty(8, np.float32))
    assert r0["outer"] == r1["outer"] == expect.tobytes().hex()
    # and it is not the unweighted mean
    plain = (arr(r0["grad"]) + arr(r1["grad"])) / np.float32(2)
    other = arr(r0["theta0"])
    nesterov_step(other, plain, np.zeros_like(other), 0.7, 0.9, True, np.empty(8, np.float32))
    assert other.tobytes().hex() != r0["outer"]


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_late_joiner_adopts_the_lr_schedule_and_a_different_lr_is_refused(
    master: Any, workers: Any
) -> None:
    steps = 16
    kw = {"step_ms": 20, "lr_schedule": "cosine"}
    ws = [
        workers.spawn(WORKER, master, params(i, steps, False, wait_world=2, **kw), name=f"peer{i}")
        for i in range(2)
    ]
    late = workers.spawn(WORKER, master, params(2, steps, False, gate=True, **kw), name="late")
    bad = workers.spawn(
        WORKER,
        master,
        params(2, steps, False, gate=True, task={"lr": 1e-3}, **kw),
        name="bad",
    )
    for w in (late, bad):
        workers.wait_event(lambda x, e, w=w: x is w and e["event"] == "gated", 60, "gated")
    workers.wait_event(lambda w, e: e["event"] == "outer" and e["step"] >= 4, 90, "outer step 4")
    late.proc.send_signal(signal.SIGUSR1)
    _, joined = workers.wait_event(
        lambda w, e: w is late and e["event"] == "joined", 60, "the newcomer's admission"
    )
    k = joined["outer_step"]
    assert 4 <= k < steps and joined["sched_epoch"] == k * H  # not 0: adopted from the run
    lead = {e["step"]: (e["sched_epoch"], e["lr"]) for e in outer_events(ws[0])}
    if k in lead:
        assert (joined["sched_epoch"], joined["lr"]) == lead[k]
    bad.proc.send_signal(signal.SIGUSR1)
    _, err = workers.wait_event(lambda w, e: w is bad and e["event"] == "error", 60, "refusal")
    assert bad.proc.wait(30) == 1
    assert err["type"] == "ValueError"
    assert "inner_optimizer.param_groups[0].lr: this peer 0.001, the run 0.003" in err["message"]
    results = workers.wait_exit([*ws, late], 150)
    lead = {e["step"]: (e["sched_epoch"], e["lr"]) for e in outer_events(ws[0])}
    mine = [(e["step"], e["sched_epoch"], e["lr"]) for e in outer_events(late)]
    assert mine and all((s_, lr) == lead[st] for st, s_, lr in mine), (mine, lead)
    assert len({r["digest"] for r in results.values()}) == 1


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(180)
def test_quorum_mode_survives_kill_and_late_join(master: Any, workers: Any) -> None:
    """Quorum mode under churn: a peer SIGKILLed mid-run aborts the round it was in (the
    drivers re-form and return to the gate with their posts intact), a newcomer joins at a
    round's sync and contributes from the next gate; every round is identical everywhere."""
    steps, kill_at, join_at = 20, 5, 9
    common = {"min_quorum": 2, "grace_s": 0.1, "step_ms": 20, "weighted": True}
    ws = [
        workers.spawn(
            WORKER, master, params(i, steps, False, wait_world=3, **common), name=f"peer{i}"
        )
        for i in range(3)
    ]
    late = workers.spawn(WORKER, master, params(2, steps, False, gate=True, **common), name="late")
    workers.wait_event(lambda w, e: w is late and e["event"] == "gated", 60, "newcomer ready")
    victim = ws[2]
    workers.wait_event(
        lambda w, e: e["event"] == "round" and e["step"] >= kill_at, 90, f"round {kill_at}"
    )
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.proc.wait(10) == -signal.SIGKILL
    workers.wait_event(
        lambda w, e: e["event"] == "round" and e["step"] >= join_at, 90, f"round {join_at}"
    )
    late.proc.send_signal(signal.SIGUSR1)
    _, joined = workers.wait_event(
        lambda w, e: w is late and e["event"] == "joined", 60, "the newcomer's admission"
    )
    assert joined["sync_rx"] > 0 and joined["outer_step"] >= join_at
    survivors = [ws[0], ws[1], late]
    results = workers.wait_exit(survivors, 150)
    by_step: dict[int, dict[str, str]] = {}
    for w in [*survivors, victim]:
        for e in round_events(w):
            by_step.setdefault(e["step"], {})[w.name] = e["digest"]
    assert set(range(1, steps + 1)) <= set(by_step)
    for step, d in sorted(by_step.items()):
        assert len(set(d.values())) == 1, f"round {step}: digests differ: {d}"
    late_in = [e for e in round_events(late) if results["late"]["peer_id"] in e["contributors"]]
    assert late_in, "the newcomer never contributed"
    assert len({r["digest"] for r in results.values()}) == 1
    assert all(r["repairs"] == 0 for r in results.values())
    assert "parity violation" not in master.log.read_text(errors="replace")


def _two_comms(master: Any) -> list[pccl.Communicator]:
    comms = [pccl.Communicator(master.address) for _ in range(2)]

    def up(c: pccl.Communicator) -> None:
        c.connect(timeout=30)
        c.wait_for_world(2, timeout=30)

    ts = [threading.Thread(target=up, args=(c,)) for c in comms]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert all(c.world_size == 2 for c in comms)
    return comms


def _in_threads(fns: list[Any]) -> list[Any]:
    """Run each function in its own thread (peers of one group); return their results."""
    out: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        out[i] = fns[i]()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out


def _loud_asyncio(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()  # a task destroyed pending / an unretrieved exception is logged on collection
    return [
        r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR
    ]


def test_close_with_an_all_reduce_in_flight_is_quiet(
    master: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Peer 0 starts an all-reduce peer 1 never joins, then closes: its handle raises
    ConnectionLost at once, and asyncio logs no task destroyed pending and no unretrieved
    exception (the operation's tasks are settled before the loop stops)."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    comms = _two_comms(master)
    buf = np.ones(1 << 16, np.float32)
    h = comms[0].all_reduce_async(buf, op=pccl.ReduceOp.SUM, tag=7)
    t0 = time.monotonic()
    comms[0].close()
    with pytest.raises(pccl.PCCLError):
        h.wait(timeout=10)
    assert time.monotonic() - t0 < 10
    comms[1].close()
    del h
    comms.clear()
    assert _loud_asyncio(caplog) == []


def test_diloco_close_with_the_exchange_in_flight_is_quiet(
    master: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Delayed DiLoCo on two peers, a boundary's all-reduce in flight: closing the
    communicators, then DiLoCo, returns promptly, raises nothing and logs nothing from asyncio."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    comms = _two_comms(master)
    models = [_model(seed=3), _model(seed=3)]
    ds = _in_threads(
        [lambda i=i: DiLoCo(comms[i], models[i], sync_every=1, delayed=True) for i in range(2)]
    )
    _in_threads([d.step for d in ds])
    assert all(d._inflight is not None for d in ds)
    t0 = time.monotonic()
    for c in comms:
        c.close()
    for d in ds:
        d.close()
    assert time.monotonic() - t0 < 15
    ds.clear()
    comms.clear()
    assert _loud_asyncio(caplog) == []


# ====================================================================== streaming (fragments)


def test_split_fragments_is_balanced_and_deterministic() -> None:
    from pccl.bindings.diloco_fragments import split_fragments

    sizes = [10, 1, 30, 5, 5, 40, 9]
    total = sum(sizes)
    for parts in range(1, 12):
        r = split_fragments(sizes, parts)
        assert r == split_fragments(list(sizes), parts) and len(r) == parts
        assert r[0][0] == 0 and r[-1][1] == total
        assert all(a < b for a, b in r) and all(r[i][1] == r[i + 1][0] for i in range(parts - 1))
        assert max(b - a for a, b in r) <= 1.04 * total / parts + 1  # balanced
    # whole parameters where a boundary is close enough; inside the big one otherwise
    assert split_fragments([25] * 8, 4) == [(0, 50), (50, 100), (100, 150), (150, 200)]
    assert split_fragments([49, 51, 100], 2) == [(0, 100), (100, 200)]
    assert split_fragments([10, 190], 2) == [(0, 100), (100, 200)]
    with pytest.raises(ValueError, match="at least 3"):
        split_fragments([1, 1], 3)


def _fragment_ranges(d: DiLoCo) -> list[tuple[int, int]]:
    assert d._fragments is not None
    return d._fragments.ranges


def test_fragments_sync_on_a_staggered_schedule_each_its_own_reference_update() -> None:
    """P = 2, H = 4, tau = 0: fragment 0 syncs at inner step 2, fragment 1 at step 4, each with
    the reference update of its own elements; the other fragment's outer state and local
    parameters are untouched."""
    model = _model()
    comm = _GroupComm(world=2)
    d = DiLoCo(comm, model, sync_every=4, fragments=2, quantization=pccl.Quantization.NONE)
    (a0, b0), (a1, b1) = _fragment_ranges(d)
    theta0 = _flat(model)
    assert _train(model, d, 1)[0] is None
    info, local = _train(model, d, 1)
    assert info.fragment == 0 and info.applied and d.outer_step == 1
    expect, mom = theta0.copy(), np.zeros_like(theta0)
    g = theta0 - local
    nesterov_step(
        expect[a0:b0], g[a0:b0].copy(), mom[a0:b0], 0.7, 0.9, True, np.empty(8, np.float32)
    )
    assert _outer(d).tobytes() == expect.tobytes()  # fragment 1's outer state untouched
    now = _flat(model)
    assert now[a0:b0].tobytes() == expect[a0:b0].tobytes()  # fragment 0: local <- outer
    assert now[a1:b1].tobytes() == local[a1:b1].tobytes()  # fragment 1 keeps training
    assert comm.syncs[-1] == (Phase.IDLE, 1)
    assert _train(model, d, 1)[0] is None
    info, local = _train(model, d, 1)
    assert info.fragment == 1 and d.outer_step == 2
    g = expect - local
    nesterov_step(
        expect[a1:b1], g[a1:b1].copy(), mom[a1:b1], 0.7, 0.9, True, np.empty(8, np.float32)
    )
    assert _outer(d).tobytes() == expect.tobytes()
    assert _flat(model)[a1:b1].tobytes() == expect[a1:b1].tobytes()


def _nudge(model: torch.nn.Module, by: float) -> None:
    """Move every parameter by -``by`` (stands in for inner steps)."""
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(by)


def _outer_step_of(theta0: np.ndarray, g: np.ndarray, a: int, b: int) -> np.ndarray:
    """``theta0`` after DiLoCo's default outer step (Nesterov, lr 0.7, mu 0.9, momentum from
    zero) of the elements ``[a, b)`` for pseudo-gradient ``g``."""
    expect, mom = theta0.copy(), np.zeros_like(theta0)
    nesterov_step(expect[a:b], g[a:b].copy(), mom[a:b], 0.7, 0.9, True, np.empty(8, np.float32))
    return expect


def test_overlapped_fragment_lands_tau_steps_later_and_mixes() -> None:
    """P = 2, H = 4, tau = 1, mix = 0.5, merge "replace": fragment 0's exchange starts at step 2
    from the local parameters then, lands at step 3 (outer step + sync) and the local fragment
    becomes 0.5 * local + 0.5 * outer."""
    model = _model()
    comm = _GroupComm(world=2)
    d = DiLoCo(
        comm,
        model,
        sync_every=4,
        fragments=2,
        overlap=1,
        mix=0.5,
        merge="replace",
        quantization=pccl.Quantization.NONE,
    )
    (a0, b0), _ = _fragment_ranges(d)
    theta0 = _flat(model)
    assert _train(model, d, 1)[0] is None
    launched = None
    _nudge(model, 0.05)
    launched = _flat(model)
    assert d.step() is None  # launched, in flight
    assert d._fragments is not None and d._fragments.inflight is not None
    _nudge(model, 0.03)
    before = _flat(model)
    info = d.step()
    assert info is not None and info.fragment == 0 and info.applied
    g = theta0 - launched
    expect = _outer_step_of(theta0, g, a0, b0)
    assert _outer(d).tobytes() == expect.tobytes()
    mixed = torch.tensor(before[a0:b0]).mul_(0.5).add_(torch.tensor(expect[a0:b0]), alpha=0.5)
    assert _flat(model)[a0:b0].tobytes() == mixed.numpy().tobytes()
    assert comm.syncs[-1] == (Phase.IDLE, 1)


@pytest.mark.parametrize("merge", ["eager", "carry"])
def test_overlapped_fragment_keeps_the_overlap_progress(merge: str) -> None:
    """P = 2, H = 4, tau = 1, mix = 0: at launch "eager" moves the local fragment to this peer's
    own estimate of the outer step, E = outer - lr * d(own pseudo-gradient) ("carry" leaves it
    at L); when the exchange lands the local fragment is the new outer parameters plus the
    inner-step progress made since (local - E, or local - L): nothing of the overlap is lost.
    Fragment 1 and the outer state of fragment 0 are as without overlap."""
    model = _model()
    comm = _GroupComm(world=2)
    d = DiLoCo(
        comm, model, sync_every=4, fragments=2, overlap=1, merge=merge,
        quantization=pccl.Quantization.NONE,
    )  # fmt: skip
    (a0, b0), (a1, b1) = _fragment_ranges(d)
    theta0 = _flat(model)
    assert _train(model, d, 1)[0] is None
    _nudge(model, 0.05)
    launched = _flat(model)
    assert d.step() is None  # launched, in flight
    g = theta0 - launched
    f32 = np.float32
    if merge == "eager":  # own Nesterov step from zero momentum, as _eager computes it
        start = theta0[a0:b0] - (g[a0:b0] * f32(0.9) + g[a0:b0]) * f32(0.7)
    else:
        start = launched[a0:b0]
    now = _flat(model)
    assert now[a0:b0].tobytes() == start.tobytes()
    assert now[a1:b1].tobytes() == launched[a1:b1].tobytes()  # fragment 1 untouched
    _nudge(model, 0.03)
    before = _flat(model)
    info = d.step()
    assert info is not None and info.fragment == 0 and info.applied
    expect = _outer_step_of(theta0, g, a0, b0)
    assert _outer(d).tobytes() == expect.tobytes()  # the exchange is what it was
    fix = torch.tensor(expect[a0:b0]) - torch.tensor(start)
    want = torch.tensor(before[a0:b0]).add_(fix, alpha=1.0)
    got = _flat(model)
    assert got[a0:b0].tobytes() == want.numpy().tobytes()
    np.testing.assert_allclose(got[a0:b0], expect[a0:b0] + (before[a0:b0] - start), atol=1e-6)
    assert got[a1:b1].tobytes() == before[a1:b1].tobytes()


def test_fragmented_newcomer_takes_the_schedule_phase() -> None:
    """A newcomer whose first sync shows 3 fragment boundaries done and the run at inner step 1
    of the period syncs fragment 1 (3 mod 2) after one more inner step."""
    from pccl.bindings.diloco_fragments import INNER_POS

    def receive(state: pccl.SharedState) -> None:
        ctrl = state.entries["diloco/ctrl"].array
        ctrl[:3] = [3, 3, Phase.IDLE]
        ctrl[INNER_POS] = 1
        state.revision = 5

    comm = _GroupComm(world=2, on_first_sync=receive)
    model = _model()
    d = DiLoCo(comm, model, sync_every=4, fragments=2, overlap=1)
    assert d._inner == 1
    info = d.step()
    assert info is None and d._fragments is not None and d._fragments.inflight is not None
    assert d._fragments.inflight[0] == 1
    info = d.step()
    assert info is not None and info.fragment == 1 and d.outer_step == 4


def test_streaming_arguments_are_checked_before_io() -> None:
    for kw, match in (
        ({"fragments": 3}, "divide sync_every"),
        ({"fragments": 2, "overlap": 2}, "overlap must be"),
        ({"fragments": 2, "mix": 1.5}, "mix"),
        ({"fragments": 2, "overlap": 1, "merge": "average"}, "merge must be"),
        ({"fragments": 2, "delayed": True}, "cannot be combined"),
    ):
        with pytest.raises(ValueError, match=match):
            DiLoCo(_GroupComm(), _model(), sync_every=4, **kw)


def test_sync_mode_keeps_no_full_model_scratch() -> None:
    """Host memory of synchronous DiLoCo: outer parameters and momentum (fp32), the residual
    (bf16 bits) and two buckets of scratch; no full-model pseudo-gradient or result buffer.
    Streaming with overlap keeps one fragment of each instead, and (merge "eager" or "carry")
    one fragment for where it stood at launch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])  # 16,640 params
    n = sum(p.numel() for p in model.parameters())
    d = DiLoCo(_GroupComm(), model, sync_every=4, bucket_bytes=4096)
    assert d._send.size == 0 and d._recv.size == 0 and d._anchor is d._theta
    assert d._residual is not None and d._residual.dtype == np.uint16 and d._residual.size == n
    assert d._sync_path is not None and d._sync_path.scratch_bytes == 2 * 4096
    s = DiLoCo(_GroupComm(), model, sync_every=8, fragments=4, overlap=1)
    assert s._fragments is not None
    assert s._fragments.scratch_bytes <= 3 * 4 * (1.04 * n / 4 + 1)  # one fragment each
    r = DiLoCo(_GroupComm(), model, sync_every=8, fragments=4, overlap=1, merge="replace")
    assert r._fragments is not None
    assert r._fragments.scratch_bytes <= 2 * 4 * (1.04 * n / 4 + 1)
    delayed = DiLoCo(_GroupComm(), model, sync_every=4, delayed=True)
    assert delayed._send.size == n and delayed._recv.size == n  # (delayed keeps full copies)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_compare_tool_streaming_sends_a_quarter_per_boundary(tmp_path: Any) -> None:
    """diloco_compare with real peers (2 rounds): streaming P = 4 keeps every peer's outer state
    identical after every fragment boundary and puts at most 1/4 (+5 %) of synchronous
    DiLoCo's all-reduce bytes in flight per boundary, for the same total bytes (+1 %)."""
    from pccl.tools import diloco_compare

    rc = diloco_compare.main(
        ["--rounds", "2", "--configs", "sync-uint8,stream-uint8", "--out", str(tmp_path)]
    )
    assert rc == 0  # parity in every configuration
    rows = {r["name"]: r for r in json.loads((tmp_path / "compare.json").read_text())["rows"]}
    sync, stream = rows["sync-uint8"], rows["stream-uint8"]
    assert stream["boundaries"] == 4 * sync["boundaries"] == 8
    assert stream["peak_boundary_tx_bytes"] <= 1.05 * sync["peak_boundary_tx_bytes"] / 4
    assert stream["tx_bytes_per_peer"] <= 1.01 * sync["tx_bytes_per_peer"]
    assert (tmp_path / "compare.md").exists()


def test_overlapped_fragment_retry_resends_the_launch_pseudo_gradient() -> None:
    """P = 2, tau = 1: fragment 0's all-reduce is aborted; when it lands the run re-forms, syncs
    in RETRY and reduces again the pseudo-gradient built at launch (not the local parameters
    that moved since): the outer state is the reference update of the launch-time pseudo-grad."""
    model = _model()
    comm = _FailAt(fail=1, world=2)  # launch 0: the count, launch 1: fragment 0's bucket
    d = DiLoCo(
        comm, model, sync_every=4, fragments=2, overlap=1, quantization=pccl.Quantization.NONE
    )
    (a0, b0), _ = _fragment_ranges(d)
    theta0 = _flat(model)
    _train(model, d, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.05)
    launched = _flat(model)
    assert d.step() is None
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.03)
    info = d.step()
    assert info is not None and info.applied and info.retries == 1 and info.fragment == 0
    assert comm.syncs[1][0] == Phase.RETRY and comm.syncs[-1] == (Phase.IDLE, 2)
    sent = [s for t, s in comm.launches if t != d._tag]
    assert len(sent) == 2 and sent[0].tobytes() == sent[1].tobytes()  # the same bytes resent
    expect, mom = theta0.copy(), np.zeros_like(theta0)
    g = theta0 - launched
    nesterov_step(
        expect[a0:b0], g[a0:b0].copy(), mom[a0:b0], 0.7, 0.9, True, np.empty(8, np.float32)
    )
    assert _outer(d).tobytes() == expect.tobytes()
