"""Block-wise uint8 quantisation: error bound, golden vectors, NaN/inf blocks.

Every test runs against the numpy reference (the specification) and through
:mod:`pccl.kernels` on the live backend, so with ``PCCL_FORCE_NUMPY=1`` the whole file still
checks the reference.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pccl import _reference as ref
from pccl import kernels
from pccl.types import DType, ReduceOp

BACKENDS = [pytest.param(ref, id="reference"), pytest.param(kernels, id="frontend")]

F32_NAN = 0x7FC00000
U = 2.0**-24  # unit roundoff of float32


def quantize(mod: ModuleType, x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    q = np.empty(x.size, np.uint8)
    meta = np.empty(2 * ref.num_blocks(x.size, block), np.float32)
    mod.quantize_u8(x, q, meta, block)
    return q, meta


def dequantize(mod: ModuleType, q: np.ndarray, meta: np.ndarray, block: int) -> np.ndarray:
    out = np.empty(q.size, np.float32)
    mod.dequantize_u8(q, meta, out, block)
    return out


def bits(a: np.ndarray) -> list[int]:
    return np.asarray(a, np.float32).view(np.uint32).tolist()


def check_error_bound(x: np.ndarray, meta: np.ndarray, y: np.ndarray, block: int) -> None:
    """|y - x| <= scale / 2 per element, plus float32 rounding slack.

    Slack, per block with M = max(|min|, |max|) and d = max - min:
      * 2^-21 * (d + M): 8 units of float32 roundoff on the block's magnitude, covering the
        roundings of x - min, of the division by scale, of q * scale and of min + that
        (each at most 1 unit of the value it rounds; 8 leaves margin);
      * 2^-141 (256 subnormal steps): when scale itself is subnormal it is only known to
        2^-150 absolutely, and up to 255 of those errors add up in q * scale.
    A block whose range overflows float32 is NaN by the spec and checked elsewhere.
    """
    for b in range(ref.num_blocks(x.size, block)):
        xs = x[b * block : (b + 1) * block].astype(np.float64)
        ys = y[b * block : (b + 1) * block].astype(np.float64)
        mn, scale = float(meta[2 * b]), float(meta[2 * b + 1])
        if math.isnan(scale):
            with np.errstate(over="ignore"):
                assert not math.isfinite(np.float32(xs.max()) - np.float32(xs.min()))
            assert np.isnan(ys).all()
            continue
        assert mn == xs.min()
        d = xs.max() - xs.min()
        allowed = scale / 2 + 2.0**-21 * (d + np.abs(xs).max()) + 2.0**-141
        err = np.abs(ys - xs)
        assert err.max() <= allowed, (b, err.max(), allowed, scale)


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate_f32 = st.floats(-(2.0**100), 2.0**100, width=32)
tiny_f32 = st.floats(-(2.0**-123), 2.0**-123, width=32)  # subnormal ranges and scales


@pytest.mark.parametrize("mod", BACKENDS)
@settings(max_examples=400, deadline=None)
@given(
    x=st.one_of(
        hnp.arrays(np.float32, st.integers(0, 60), elements=moderate_f32),
        hnp.arrays(np.float32, st.integers(0, 60), elements=finite_f32),
        hnp.arrays(np.float32, st.integers(0, 60), elements=tiny_f32),
    ),
    block=st.integers(1, 17),
)
def test_roundtrip_error_within_half_step(mod: ModuleType, x: np.ndarray, block: int) -> None:
    q, meta = quantize(mod, x, block)
    check_error_bound(x, meta, dequantize(mod, q, meta, block), block)


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize("scale_exp", [-30, -5, 0, 10, 30])
def test_roundtrip_error_gaussian(mod: ModuleType, scale_exp: int) -> None:
    """Realistic gradients: large arrays, default block, several magnitudes, odd length."""
    rng = np.random.default_rng(scale_exp + 100)
    x = (rng.standard_normal(3 * 4096 + 5) * 2.0**scale_exp).astype(np.float32)
    q, meta = quantize(mod, x, kernels.DEFAULT_BLOCK)
    y = dequantize(mod, q, meta, kernels.DEFAULT_BLOCK)
    check_error_bound(x, meta, y, kernels.DEFAULT_BLOCK)
    # Each block's min lands on code 0 exactly, its max on 255.
    for b in range(len(meta) // 2):
        xs, qs = x[b * 4096 : (b + 1) * 4096], q[b * 4096 : (b + 1) * 4096]
        assert qs[np.argmin(xs)] == 0 and qs[np.argmax(xs)] == 255
        assert y[b * 4096 + np.argmin(xs)] == xs.min()


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_minus_one_zero_one(mod: ModuleType) -> None:
    # scale = fl32(2/255) = 0x3C008081 (0.0078431377...); (0 - -1) / scale = 127.4999924
    # rounds to 127; -1 + 127 * scale = -0.003921509 (0xBB808000); 255 * scale rounds to
    # exactly 2.0, so the max comes back exactly.
    q, meta = quantize(mod, np.array([-1.0, 0.0, 1.0], np.float32), 4096)
    assert q.tolist() == [0, 127, 255]
    assert bits(meta) == [0xBF800000, 0x3C008081]
    assert bits(dequantize(mod, q, meta, 4096)) == [0xBF800000, 0xBB808000, 0x3F800000]


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_constant_and_zero_blocks(mod: ModuleType) -> None:
    x = np.array([2.5, 2.5, 2.5, -0.0, -0.0, 0.0, 7.0], np.float32)
    q, meta = quantize(mod, x, 3)
    assert q.tolist() == [0] * 7
    # -0.0 as a block min/max is stored as +0.0; a one-element block is constant.
    assert bits(meta) == [0x40200000, 0, 0, 0, 0x40E00000, 0]
    assert bits(dequantize(mod, q, meta, 3)) == bits(np.array([2.5] * 3 + [0.0] * 3 + [7.0]))


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_block_dequantizes_to_nan(mod: ModuleType, bad: float) -> None:
    x = np.arange(12, dtype=np.float32)
    x[5] = bad
    q, meta = quantize(mod, x, 4)
    assert bits(meta[2:4]) == [F32_NAN, F32_NAN]
    assert q[4:8].tolist() == [0, 0, 0, 0]
    y = dequantize(mod, q, meta, 4)
    assert bits(y[4:8]) == [F32_NAN] * 4  # the whole block, canonical NaN
    # Neighbouring blocks are unaffected.
    assert y[:4].tolist() == [0, 1, 2, 3] and y[8:].tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize("mod", BACKENDS)
def test_range_overflow_block_is_nan(mod: ModuleType) -> None:
    """max - min beyond FLT_MAX cannot be written as (min, scale): the block becomes NaN."""
    q, meta = quantize(mod, np.array([3e38, -3e38, 1e38, -1e38], np.float32), 2)
    assert bits(meta[:2]) == [F32_NAN, F32_NAN]
    big = np.float32(1e38)
    assert meta[2] == -big and meta[3] == (big + big) / np.float32(255)
    y = dequantize(mod, q, meta, 2)
    assert np.isnan(y[:2]).all() and np.isfinite(y[2:]).all()


@pytest.mark.parametrize("mod", BACKENDS)
def test_subnormal_block(mod: ModuleType) -> None:
    tiny = np.array([0.0, 1e-45, 5e-45, 1e-40, 3e-39], np.float32)
    q, meta = quantize(mod, tiny, 8)
    check_error_bound(tiny, meta, dequantize(mod, q, meta, 8), 8)
    # A range of 2 subnormal steps has a scale of 2/255 step: it underflows to 0, so q = 0.
    q, meta = quantize(mod, np.array([0.0, 3e-45], np.float32), 8)
    assert q.tolist() == [0, 0] and bits(meta) == [0, 0]


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize("out_of_place", [False, True])
def test_fused_dequantize_sum_equals_two_step(mod: ModuleType, out_of_place: bool) -> None:
    """``dequantize_accumulate_u8`` (acc += dequant) and ``dequantize_add_u8`` (out = base +
    dequant, the ring's out-of-place hop) give the bytes of dequantize-then-reduce."""
    rng = np.random.default_rng(11)
    n, block = 10_000, 1000
    q = rng.integers(0, 256, n, dtype=np.uint8)
    meta = rng.standard_normal(2 * ref.num_blocks(n, block)).astype(np.float32)
    meta[4:6] = np.nan
    meta[7] = np.inf
    base = rng.standard_normal(n).astype(np.float32)
    base[::97] = np.nan
    base[5::101] = -np.inf
    if out_of_place:
        fused = np.full(n, 7.0, np.float32)
        mod.dequantize_add_u8(q, meta, base, fused, block)
    else:
        fused = base.copy()
        mod.dequantize_accumulate_u8(q, meta, fused, block)
    two_step = dequantize(mod, q, meta, block)
    kernels.reduce_inplace(two_step, base, DType.FLOAT32, ReduceOp.SUM)
    assert fused.tobytes() == two_step.tobytes()
    assert np.isnan(fused).any()  # the NaN cases were exercised


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("keep", ["discard", "sum", "adopt"])
@pytest.mark.parametrize("block", [1000, 5000])  # 5000 > the native kernel's stack block
def test_ring_hop_equals_separate_kernels(with_base: bool, keep: str, block: int) -> None:
    """The fused uint8 hop gives the bytes of accumulate, quantize and (adopt) dequantize."""
    rng = np.random.default_rng(13)
    n = 10_007
    q = rng.integers(0, 256, n, dtype=np.uint8)
    meta = rng.standard_normal(2 * ref.num_blocks(n, block)).astype(np.float32)
    meta[4:6] = np.nan
    base = rng.standard_normal(n).astype(np.float32) if with_base else None
    acc0 = rng.standard_normal(n).astype(np.float32)
    acc0[::89] = np.inf
    acc = acc0.copy()
    qo, mo = np.empty(n, np.uint8), np.empty(2 * ref.num_blocks(n, block), np.float32)
    kernels.ring_hop_u8(q, meta, base, acc, qo, mo, block, keep)
    total = acc0.copy()
    if base is None:
        kernels.dequantize_accumulate_u8(q, meta, total, block)
    else:
        kernels.dequantize_add_u8(q, meta, base, total, block)
    q_want, m_want = quantize(kernels, total, block)
    assert qo.tobytes() == q_want.tobytes() and mo.tobytes() == m_want.tobytes()
    want = {"discard": acc0, "sum": total, "adopt": dequantize(kernels, q_want, m_want, block)}
    assert acc.tobytes() == want[keep].tobytes()
    # The reference gives the same bytes (it is the specification).
    acc_r, qo_r, mo_r = acc0.copy(), np.empty_like(qo), np.empty_like(mo)
    ref.ring_hop_u8(q, meta, base, acc_r, qo_r, mo_r, block, kernels.HOP_KEEP[keep])
    assert (acc_r.tobytes(), qo_r.tobytes(), mo_r.tobytes()) == (
        acc.tobytes(),
        qo.tobytes(),
        mo.tobytes(),
    )


@pytest.mark.parametrize("mod", BACKENDS)
def test_empty_input(mod: ModuleType) -> None:
    q, meta = quantize(mod, np.empty(0, np.float32), 4096)
    assert q.size == 0 and meta.size == 0
    assert dequantize(mod, q, meta, 4096).size == 0


def test_unaligned_views_through_frontend() -> None:
    x = np.linspace(-3, 5, 4099, dtype=np.float32)
    buf = bytearray(x.nbytes + 1)
    xv = np.frombuffer(buf, np.float32, x.size, offset=1)
    xv[...] = x
    qbuf, mbuf = bytearray(x.size + 3), bytearray(4 * 4 + 2)
    qv = np.frombuffer(qbuf, np.uint8, x.size, offset=3)
    mv = np.frombuffer(mbuf, np.float32, 4, offset=2)
    kernels.quantize_u8(xv, qv, mv)
    q, meta = quantize(ref, x, kernels.DEFAULT_BLOCK)
    assert qv.tobytes() == q.tobytes() and mv.tobytes() == meta.tobytes()


# ---- packed 4-bit / 2-bit codes (INT4, INT2) ---------------------------------------------------


def quantize_packed(
    mod: ModuleType, x: np.ndarray, nbits: int, block: int
) -> tuple[np.ndarray, np.ndarray]:
    q = np.empty(ref.packed_len(x.size, nbits), np.uint8)
    meta = np.empty(2 * ref.num_blocks(x.size, block), np.float32)
    mod.quantize_packed(x, q, meta, nbits, block)
    return q, meta


def dequantize_packed(
    mod: ModuleType, q: np.ndarray, meta: np.ndarray, n: int, nbits: int, block: int
) -> np.ndarray:
    out = np.empty(n, np.float32)
    mod.dequantize_packed(q, meta, out, nbits, block)
    return out


@pytest.mark.parametrize("mod", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(
    x=st.one_of(
        hnp.arrays(np.float32, st.integers(0, 60), elements=moderate_f32),
        hnp.arrays(np.float32, st.integers(0, 60), elements=finite_f32),
        hnp.arrays(np.float32, st.integers(0, 60), elements=tiny_f32),
    ),
    nbits=st.sampled_from([4, 2]),
    mult=st.integers(1, 5),
)
def test_packed_roundtrip_error_within_half_step(
    mod: ModuleType, x: np.ndarray, nbits: int, mult: int
) -> None:
    block = mult * (8 // nbits)
    q, meta = quantize_packed(mod, x, nbits, block)
    levels = (1 << nbits) - 1
    y = dequantize_packed(mod, q, meta, x.size, nbits, block)
    check_error_bound(x, meta, y, block)
    for b in range(ref.num_blocks(x.size, block)):  # the scale is the range over the levels
        xs = x[b * block : (b + 1) * block]
        if math.isfinite(meta[2 * b + 1]):
            d = np.float32(xs.max() + np.float32(0)) - np.float32(xs.min() + np.float32(0))
            assert meta[2 * b + 1] == d / np.float32(levels)


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize("nbits", [4, 2])
def test_packed_roundtrip_error_gaussian(mod: ModuleType, nbits: int) -> None:
    """Gaussian pseudo-gradients at the default packed block: every element within half a step,
    and the relative RMS error of the measurement that chose the block (512 elements: int4
    ~0.117, int2 ~0.59 on Gaussian data, docs/bench/2026-12-04/int4/codec_error.json)."""
    rng = np.random.default_rng(nbits)
    x = rng.standard_normal(64 * kernels.PACKED_BLOCK + 3).astype(np.float32)
    q, meta = quantize_packed(mod, x, nbits, kernels.PACKED_BLOCK)
    y = dequantize_packed(mod, q, meta, x.size, nbits, kernels.PACKED_BLOCK)
    check_error_bound(x, meta, y, kernels.PACKED_BLOCK)
    rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
    assert rel < {4: 0.12, 2: 0.61}[nbits], rel


@pytest.mark.parametrize("mod", BACKENDS)
def test_packed_golden_vectors(mod: ModuleType) -> None:
    """Codes, packing order (least significant first), round half to even, zero padding."""
    x = np.array([0, 1, 2, 15, 7, 0.5, 1.5, 15], np.float32)
    q, meta = quantize_packed(mod, x, 4, 8)
    assert meta.tolist() == [0.0, 1.0]
    assert q.tolist() == [0x10, 0xF2, 0x07, 0xF2]  # 0.5 -> 0 and 1.5 -> 2 (half to even)
    q, meta = quantize_packed(mod, x[:5], 4, 8)  # odd length: the last high nibble is 0
    assert q.tolist() == [0x10, 0xF2, 0x07]
    q, meta = quantize_packed(mod, np.array([0, 1, 2, 3, 3, 0], np.float32), 2, 4)
    assert meta.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert q.tolist() == [0xE4, 0x03]  # 0b11_10_01_00, then codes 3, 0 and zero padding
    y = dequantize_packed(mod, q, meta, 6, 2, 4)
    assert y.tolist() == [0, 1, 2, 3, 3, 0]


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize("nbits", [4, 2])
def test_packed_decode_ignores_padding_and_nan_blocks_stay_nan(mod: ModuleType, nbits: int) -> None:
    x = np.array([1.0, -2.0, 3.0, 0.25, np.nan, 1.0, 2.0, 3.0, 4.0], np.float32)
    block = 4
    q, meta = quantize_packed(mod, x, nbits, block)
    y = dequantize_packed(mod, q, meta, x.size, nbits, block)
    assert bits(meta[2:4]) == [F32_NAN, F32_NAN]  # the block holding the NaN
    assert np.isnan(y[4:8]).all() and np.isfinite(y[:4]).all() and np.isfinite(y[8:]).all()
    assert bits(y[4:8]) == [F32_NAN] * 4
    dirty = q.copy()
    dirty[-1] |= np.uint8(0xFF ^ ((1 << nbits) - 1))  # set every padding bit of the last byte
    assert dequantize_packed(mod, dirty, meta, x.size, nbits, block).tobytes() == y.tobytes()


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize("nbits", [4, 2])
@pytest.mark.parametrize("keep", ["discard", "sum", "adopt"])
def test_packed_ring_hop_equals_separate_kernels(mod: ModuleType, nbits: int, keep: str) -> None:
    """The fused packed hop gives the bytes of accumulate, quantize and (adopt) dequantize."""
    rng = np.random.default_rng([nbits, len(keep)])
    n, block = 1000 + nbits, 16
    q, meta = quantize_packed(kernels, rng.standard_normal(n).astype(np.float32), nbits, block)
    acc0 = rng.standard_normal(n).astype(np.float32)
    total = acc0.copy()
    kernels.dequantize_accumulate_packed(q, meta, total, nbits, block)
    q_want, m_want = quantize_packed(kernels, total, nbits, block)
    want = {
        "discard": acc0,
        "sum": total,
        "adopt": dequantize_packed(kernels, q_want, m_want, n, nbits, block),
    }[keep]
    acc = acc0.copy()
    qo, mo = np.empty_like(q_want), np.empty_like(m_want)
    if mod is ref:
        ref.ring_hop_packed(q, meta, None, acc, qo, mo, nbits, block, kernels.HOP_KEEP[keep])
    else:
        kernels.ring_hop_packed(q, meta, None, acc, qo, mo, nbits, block, keep)
    assert qo.tobytes() == q_want.tobytes() and mo.tobytes() == m_want.tobytes()
    assert acc.tobytes() == want.tobytes()


# ---- INT4 / INT2 on the ring: wire sizes checked on receive ------------------------------------


@pytest.mark.parametrize("quant", ["INT4", "INT2"])
def test_ring_accepts_exactly_the_packed_wire_size(quant: str) -> None:
    """A data frame's payload must be packed codes + 8 bytes per block of PACKED_BLOCK elements
    (whatever quant_block says): one byte more or less, or UINT8's size, is a ProtocolError,
    which closes that stream and fails the operation it feeds (peer/rx_stream.py)."""
    from pccl.peer.ring import BufferPool, RingOp, wire_len

    from pccl.errors import ProtocolError
    from pccl.frame import DataHeader
    from pccl.types import Quantization

    q = Quantization[quant]
    nbits = {"INT4": 4, "INT2": 2}[quant]
    n, world, sub = 10_001, 2, 1500  # sub-chunks round to whole packed blocks (1500 -> 1024)

    async def check() -> None:
        x = np.zeros(n, np.float32)
        ring = RingOp(
            op_id=1, tag=7, rank=0, world=world, src=x, work=np.zeros(n, np.float32),
            dtype=DType.FLOAT32, op=ReduceOp.SUM, quant=q, sub=sub, block=4096,
            send_frame=lambda h, p: None, pool=BufferPool(),
        )  # fmt: skip
        assert ring.sub == sub // kernels.PACKED_BLOCK * kernels.PACKED_BLOCK
        c = 1  # rank 0 receives chunk (0 - 0 - 1) % 2 at reduce-scatter step 0
        last_k = ring.nsub[c] - 1
        for k in (0, last_k):
            count = ring._sublen(c, k)
            size = kernels.packed_len(count, nbits) + 8 * kernels.num_blocks(count, 512)
            assert wire_len(count, 4, q, 4096) == size
            for bad in (size - 1, size + 1, count + 8 * kernels.num_blocks(count, 4096)):
                with pytest.raises(ProtocolError, match="payload"):
                    ring.recv_target(DataHeader(1, 7, 0, c, k * ring.sub, count, bad))
            assert len(ring.recv_target(DataHeader(1, 7, 0, c, k * ring.sub, count, size))) == size
        ring.close()
        ring.release()

    import asyncio

    asyncio.run(check())
