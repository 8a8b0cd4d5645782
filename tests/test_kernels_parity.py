"""Native kernels against the numpy reference (byte equality), golden vectors, validation.

Tests marked ``native`` compare ``pccl._native`` with :mod:`pccl._reference` and skip when
the extension is missing or ``PCCL_FORCE_NUMPY=1``; the rest (golden vectors, argument
validation, backend selection) run on whichever backend is live.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pccl import _reference as ref
from pccl import kernels
from pccl.types import DType, ReduceOp

NATIVE = kernels._native
native = pytest.mark.native
requires_native = pytest.mark.skipif(
    NATIVE is None, reason="pccl._native not importable or PCCL_FORCE_NUMPY=1"
)

OPS = (ReduceOp.SUM, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.PROD)
SIZES = (0, 1, 7, 4095, 4096, 4097, (1 << 20) + 3)
OFFSETS = (0, 1, 3)
FLOATS = (DType.FLOAT32, DType.FLOAT64, DType.FLOAT16, DType.BFLOAT16)

# Values that stress rounding and NaN rules, per float storage type, as bit patterns.
SPECIAL_BITS: dict[DType, list[int]] = {
    DType.FLOAT32: [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
        0xFFBFFFFF, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,
        0x3F800000, 0xBF800000, 0x477FF000, 0x477FEFFF, 0x33800000, 0x33000000, 0x38800000,
        0x387FE000, 0x3F808000, 0x3F818000, 0x00008000, 0x00018000, 0x4B800000,
    ],
    DType.FLOAT64: [
        0x0, 0x8000000000000000, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000,
        0xFFF8000000000001, 0x7FF0000000000001, 0x0000000000000001, 0x7FEFFFFFFFFFFFFF,
        0x3FF0000000000000, 0xBFF0000000000000, 0x000FFFFFFFFFFFFF,
    ],
    DType.FLOAT16: [
        0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFDFF, 0x0001, 0x8001,
        0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00, 0x3C01, 0x7A00,
    ],
    DType.BFLOAT16: [
        0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFFBF, 0x0001, 0x8001,
        0x007F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80, 0x3F81,
    ],
}  # fmt: skip


def unaligned(a: np.ndarray, offset: int) -> np.ndarray:
    """A writable copy of ``a`` starting ``offset`` bytes into a fresh buffer."""
    buf = bytearray(a.nbytes + offset)
    view = np.frombuffer(buf, a.dtype, a.size, offset=offset)
    view[...] = a
    return view


def random_bits(rng: np.random.Generator, dtype: npt.DTypeLike, n: int) -> np.ndarray:
    """Uniformly random bytes: every bit pattern, NaN payloads and subnormals included."""
    return rng.integers(0, 256, n * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)


def special_mix(rng: np.random.Generator, dt: DType, n: int) -> np.ndarray:
    """Random draws from the special values (floats), or extreme values (integers)."""
    if dt in SPECIAL_BITS:
        bits_dtype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
        pool = np.array(SPECIAL_BITS[dt], dtype=bits_dtype)
        return rng.choice(pool, n).view(dt.storage)
    info = np.iinfo(dt.storage)
    pool = np.array([info.min, info.min + 1, -1 if info.min else 0, 0, 1, info.max], dt.storage)
    return rng.choice(pool, n)


def assert_same_bytes(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if got.tobytes() != want.tobytes():
        g = np.frombuffer(got.tobytes(), np.uint8)
        w = np.frombuffer(want.tobytes(), np.uint8)
        i = int(np.nonzero(g != w)[0][0]) // got.itemsize
        pytest.fail(
            f"{what}: first difference at element {i}: native {got[i : i + 1].tobytes().hex()}"
            f" reference {want[i : i + 1].tobytes().hex()}"
        )


# ---- native vs reference: reduce / divide ---------------------------------------------------


def check_reduce(a: np.ndarray, b: np.ndarray, dt: DType, op: ReduceOp, offset: int) -> None:
    want = a.copy()
    ref.reduce_inplace(want, b, dt, op)
    got = unaligned(a, offset)
    NATIVE.reduce(got, unaligned(b, offset + 1), int(dt), int(op))
    assert_same_bytes(got, want, f"reduce {dt.name} {op.name} n={a.size} offset={offset}")


@native
@requires_native
@pytest.mark.parametrize("dt", list(DType), ids=lambda d: d.name)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_reduce_parity(dt: DType, op: ReduceOp) -> None:
    rng = np.random.default_rng(1000 * dt + op)
    for n in SIZES:
        for k, offset in enumerate(OFFSETS if n < 5000 else (1,)):
            a, b = random_bits(rng, dt.storage, n), random_bits(rng, dt.storage, n)
            check_reduce(a, b, dt, op, offset)
            if k == 0:
                check_reduce(special_mix(rng, dt, n), special_mix(rng, dt, n), dt, op, offset)


@native
@requires_native
@pytest.mark.parametrize("dt", FLOATS, ids=lambda d: d.name)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_reduce_parity_all_special_pairs(dt: DType, op: ReduceOp) -> None:
    """Every (dst, src) pair of special values, so each NaN/inf/zero/subnormal rule fires."""
    bits_dtype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
    pool = np.array(SPECIAL_BITS[dt], dtype=bits_dtype)
    a, b = np.meshgrid(pool, pool)
    check_reduce(a.ravel().view(dt.storage), b.ravel().view(dt.storage), dt, op, 1)


@native
@requires_native
@pytest.mark.parametrize("dt", list(DType), ids=lambda d: d.name)
def test_divide_parity(dt: DType) -> None:
    rng = np.random.default_rng(77 + dt)
    for divisor in (1, 2, 3, 7, 128, 255, 1000, 2**31 + 1, 2**53 + 1, 2**63 - 1):
        for n in (0, 1, 4097):
            for gen in (random_bits, None):
                a = random_bits(rng, dt.storage, n) if gen else special_mix(rng, dt, n)
                want = a.copy()
                ref.divide_inplace(want, dt, divisor)
                got = unaligned(a, 1)
                NATIVE.divide(got, int(dt), divisor)
                assert_same_bytes(got, want, f"divide {dt.name} by {divisor}, n={n}")


@st.composite
def reduce_case(draw: st.DrawFn) -> tuple[DType, ReduceOp, bytes, bytes, int]:
    dt = draw(st.sampled_from(list(DType)))
    op = draw(st.sampled_from(OPS))
    n = draw(st.integers(0, 70))
    size = n * dt.itemsize
    a = draw(st.binary(min_size=size, max_size=size))
    b = draw(st.binary(min_size=size, max_size=size))
    return dt, op, a, b, draw(st.integers(0, 7))


@native
@requires_native
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reduce_case())
def test_reduce_parity_hypothesis(case: tuple[DType, ReduceOp, bytes, bytes, int]) -> None:
    dt, op, a, b, offset = case
    check_reduce(np.frombuffer(a, dt.storage), np.frombuffer(b, dt.storage), dt, op, offset)


# ---- native vs reference: conversions -------------------------------------------------------


@native
@requires_native
@pytest.mark.parametrize("name", ["decode_f16", "decode_bf16"])
def test_decode_parity_exhaustive(name: str) -> None:
    words = unaligned(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16), 1)
    want = np.empty(1 << 16, np.float32)
    getattr(ref, name)(words, want)
    got = unaligned(np.zeros(1 << 16, np.float32), 3)
    getattr(NATIVE, name)(words, got)
    assert_same_bytes(got, want, name)


def f32_bit_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random fp32 bit patterns, dense around the fp16/bf16 rounding and range edges."""
    uniform = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    # Low mantissa bits near ties: keep a random top, force the dropped bits to patterns
    # around the halfway point (0x1000 for fp16, 0x8000 for bf16).
    tops = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    near = np.array([0xFFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0x8001, 0, 0x1FFF, 0xFFFF], np.uint32)
    ties = (tops & np.uint32(0xFFFF0000)) | rng.choice(near, n)
    edges = np.array(SPECIAL_BITS[DType.FLOAT32], np.uint32)
    edges = (edges[:, None] + np.arange(-3, 4, dtype=np.int64)).astype(np.uint32).ravel()
    return np.concatenate([uniform, ties, edges, edges | np.uint32(0x80000000)]).view(np.float32)


@native
@requires_native
@pytest.mark.parametrize("name", ["encode_f16", "encode_bf16"])
def test_encode_parity(name: str) -> None:
    rng = np.random.default_rng(5)
    x = f32_bit_samples(rng, 1 << 20)
    # fp16 subnormal range and overflow edge, every fp32 value in small windows.
    starts = (0x33000000 - 20000, 0x387FC000 - 20000, 0x477FF000 - 20000, 0)
    windows = [np.arange(lo, lo + 40000, dtype=np.uint32) for lo in starts]
    x = np.concatenate([x, np.concatenate(windows).view(np.float32)])
    want = np.empty(x.size, np.uint16)
    getattr(ref, name)(x, want)
    for offset in (0, 1):
        got = unaligned(np.zeros(x.size, np.uint16), offset)
        getattr(NATIVE, name)(unaligned(x, 3 - offset), got)
        assert_same_bytes(got, want, f"{name} offset={offset}")


@native
@requires_native
@pytest.mark.parametrize("name", ["accumulate_f16", "accumulate_bf16"])
def test_accumulate_parity(name: str) -> None:
    rng = np.random.default_rng(9)
    for n in SIZES:
        src = random_bits(rng, np.uint16, n)
        acc = random_bits(rng, np.float32, n)
        want = acc.copy()
        getattr(ref, name)(src, want)
        got = unaligned(acc, 1)
        getattr(NATIVE, name)(unaligned(src, 1), got)
        assert_same_bytes(got, want, f"{name} n={n}")


@native
@requires_native
def test_f16_kernels_accept_float16_and_uint16() -> None:
    x = np.array([1.5, -2.25, 65520.0, np.nan], np.float32)
    as_f16 = np.empty(4, np.float16)
    as_u16 = np.empty(4, np.uint16)
    NATIVE.encode_f16(x, as_f16)
    NATIVE.encode_f16(x, as_u16)
    assert as_f16.view(np.uint16).tolist() == as_u16.tolist() == [0x3E00, 0xC080, 0x7C00, 0x7E00]


@native
@requires_native
@settings(max_examples=800, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=64), st.integers(0, 3))
def test_conversion_parity_hypothesis(bits: list[int], offset: int) -> None:
    x = np.array(bits, np.uint32).view(np.float32)
    words = np.array(bits, np.uint32).astype(np.uint16)
    for name in ("encode_f16", "encode_bf16"):
        want = np.empty(x.size, np.uint16)
        getattr(ref, name)(x, want)
        got = unaligned(want * 0, offset)
        getattr(NATIVE, name)(unaligned(x, offset), got)
        assert_same_bytes(got, want, name)
    for name in ("decode_f16", "decode_bf16", "accumulate_f16", "accumulate_bf16"):
        want32 = x.copy()
        getattr(ref, name)(words, want32)
        got32 = unaligned(x, offset)
        getattr(NATIVE, name)(unaligned(words, 1), got32)
        assert_same_bytes(got32, want32, name)


# ---- native vs reference: quantisation ------------------------------------------------------


def quantize_inputs(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    normal = rng.standard_normal(n).astype(np.float32)
    tiny = (rng.standard_normal(n) * 1e-40).astype(np.float32)  # subnormal values and scales
    with_nan = normal.copy()
    with_nan[:: max(1, n // 3)] = np.nan
    with_inf = normal * np.float32(1e30)
    with_inf[1::5000] = np.inf
    huge = rng.choice(np.array([3e38, -3e38, 1.0], np.float32), n)
    noise = random_bits(rng, np.float32, n)
    special = special_mix(rng, DType.FLOAT32, n)
    return [normal, tiny, with_nan, with_inf, huge, noise, special, np.full(n, -0.0, np.float32)]


@native
@requires_native
@pytest.mark.parametrize("block", [1, 2, 7, 4096, 5000])
def test_quantize_dequantize_parity(block: int) -> None:
    rng = np.random.default_rng(block)
    for n in (0, 1, 7, 4095, 4096, 4097, 20000):
        nb = ref.num_blocks(n, block)
        for x in quantize_inputs(rng, n):
            q_want, m_want = np.empty(n, np.uint8), np.empty(2 * nb, np.float32)
            ref.quantize_u8(x, q_want, m_want, block)
            q_got = unaligned(np.zeros(n, np.uint8), 1)
            m_got = unaligned(np.zeros(2 * nb, np.float32), 1)
            NATIVE.quantize_u8(unaligned(x, 2), q_got, m_got, block)
            assert_same_bytes(q_got, q_want, f"quantize q n={n} block={block}")
            assert_same_bytes(m_got, m_want, f"quantize meta n={n} block={block}")

        # Dequantise arbitrary (wire-supplied) bytes too: any meta, any q.
        wire = (random_bits(rng, np.uint8, n), random_bits(rng, np.float32, 2 * nb))
        for q, meta in ((q_want, m_want), wire):
            want = np.empty(n, np.float32)
            ref.dequantize_u8(q, meta, want, block)
            got = unaligned(np.zeros(n, np.float32), 3)
            NATIVE.dequantize_u8(unaligned(q, 1), unaligned(meta, 1), got, block)
            assert_same_bytes(got, want, f"dequantize n={n} block={block}")

            acc = random_bits(rng, np.float32, n)
            want = acc.copy()
            ref.dequantize_accumulate_u8(q, meta, want, block)
            got = unaligned(acc, 1)
            NATIVE.dequantize_accumulate_u8(q, meta, got, block)
            assert_same_bytes(got, want, f"dequantize_accumulate n={n} block={block}")

            base = random_bits(rng, np.float32, n)
            want = np.empty(n, np.float32)
            ref.dequantize_add_u8(q, meta, base, want, block)
            got = unaligned(np.zeros(n, np.float32), 2)
            NATIVE.dequantize_add_u8(q, meta, unaligned(base, 3), got, block)
            assert_same_bytes(got, want, f"dequantize_add n={n} block={block}")

            for base_, keep in itertools.product((None, base), (0, 1, 2)):
                acc_w = acc.copy()
                qo_w, mo_w = np.empty(n, np.uint8), np.empty(2 * nb, np.float32)
                ref.ring_hop_u8(q, meta, base_, acc_w, qo_w, mo_w, block, keep)
                acc_g = unaligned(acc, 1)
                qo_g = unaligned(np.zeros(n, np.uint8), 3)
                mo_g = unaligned(np.zeros(2 * nb, np.float32), 2)
                b_g = None if base_ is None else unaligned(base_, 2)
                NATIVE.ring_hop_u8(q, meta, b_g, acc_g, qo_g, mo_g, block, keep)
                what = f"ring_hop base={base_ is not None} keep={keep} n={n} block={block}"
                assert_same_bytes(acc_g, acc_w, what + " acc")
                assert_same_bytes(qo_g, qo_w, what + " q_out")
                assert_same_bytes(mo_g, mo_w, what + " meta_out")


@native
@requires_native
@settings(max_examples=800, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=40),
    st.integers(1, 9),
)
def test_quantize_parity_hypothesis(values: list[float], block: int) -> None:
    x = np.array(values, np.float32)
    nb = ref.num_blocks(x.size, block)
    q_want, m_want = np.empty(x.size, np.uint8), np.empty(2 * nb, np.float32)
    ref.quantize_u8(x, q_want, m_want, block)
    q_got, m_got = np.empty(x.size, np.uint8), np.empty(2 * nb, np.float32)
    NATIVE.quantize_u8(unaligned(x, 1), q_got, m_got, block)
    assert_same_bytes(q_got, q_want, "quantize q")
    assert_same_bytes(m_got, m_want, "quantize meta")
    want, got = np.empty(x.size, np.float32), np.empty(x.size, np.float32)
    ref.dequantize_u8(q_want, m_want, want, block)
    NATIVE.dequantize_u8(q_got, m_got, got, block)
    assert_same_bytes(got, want, "dequantize")


@native
@requires_native
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("block", [4, 8, 128, 4096, 5000])
def test_packed_quantize_dequantize_parity(bits: int, block: int) -> None:
    """INT4/INT2 kernels: the bytes of the reference for every input class, wire bytes too."""
    rng = np.random.default_rng([bits, block])
    for n in (0, 1, 2, 3, 5, 127, 128, 129, 4097, 20001):
        nb, pl = ref.num_blocks(n, block), ref.packed_len(n, bits)
        for x in quantize_inputs(rng, n):
            q_want, m_want = np.empty(pl, np.uint8), np.empty(2 * nb, np.float32)
            ref.quantize_packed(x, q_want, m_want, bits, block)
            q_got = unaligned(np.full(pl, 0xAA, np.uint8), 1)  # padding bits must be written
            m_got = unaligned(np.zeros(2 * nb, np.float32), 1)
            NATIVE.quantize_packed(unaligned(x, 2), q_got, m_got, bits, block)
            what = f"quantize_packed bits={bits} n={n} block={block}"
            assert_same_bytes(q_got, q_want, what + " q")
            assert_same_bytes(m_got, m_want, what + " meta")

        # Wire-supplied bytes: any meta, any codes, padding bits set.
        wire = (random_bits(rng, np.uint8, pl), random_bits(rng, np.float32, 2 * nb))
        for q, meta in ((q_want, m_want), wire):
            what = f"bits={bits} n={n} block={block}"
            want = np.empty(n, np.float32)
            ref.dequantize_packed(q, meta, want, bits, block)
            got = unaligned(np.zeros(n, np.float32), 3)
            NATIVE.dequantize_packed(unaligned(q, 1), unaligned(meta, 1), got, bits, block)
            assert_same_bytes(got, want, "dequantize_packed " + what)

            acc = random_bits(rng, np.float32, n)
            want = acc.copy()
            ref.dequantize_accumulate_packed(q, meta, want, bits, block)
            got = unaligned(acc, 1)
            NATIVE.dequantize_accumulate_packed(q, meta, got, bits, block)
            assert_same_bytes(got, want, "dequantize_accumulate_packed " + what)

            base = random_bits(rng, np.float32, n)
            want = np.empty(n, np.float32)
            ref.dequantize_add_packed(q, meta, base, want, bits, block)
            got = unaligned(np.zeros(n, np.float32), 2)
            NATIVE.dequantize_add_packed(q, meta, unaligned(base, 3), got, bits, block)
            assert_same_bytes(got, want, "dequantize_add_packed " + what)

            for base_, keep in itertools.product((None, base), (0, 1, 2)):
                acc_w = acc.copy()
                qo_w, mo_w = np.empty(pl, np.uint8), np.empty(2 * nb, np.float32)
                ref.ring_hop_packed(q, meta, base_, acc_w, qo_w, mo_w, bits, block, keep)
                acc_g = unaligned(acc, 1)
                qo_g = unaligned(np.full(pl, 0x55, np.uint8), 3)
                mo_g = unaligned(np.zeros(2 * nb, np.float32), 2)
                b_g = None if base_ is None else unaligned(base_, 2)
                NATIVE.ring_hop_packed(q, meta, b_g, acc_g, qo_g, mo_g, bits, block, keep)
                hop = f"ring_hop_packed base={base_ is not None} keep={keep} {what}"
                assert_same_bytes(acc_g, acc_w, hop + " acc")
                assert_same_bytes(qo_g, qo_w, hop + " q_out")
                assert_same_bytes(mo_g, mo_w, hop + " meta_out")


@native
@requires_native
@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=40),
    st.sampled_from([4, 2]),
    st.integers(1, 6),
)
def test_packed_quantize_parity_hypothesis(values: list[float], bits: int, mult: int) -> None:
    x = np.array(values, np.float32)
    block = mult * (8 // bits)
    nb, pl = ref.num_blocks(x.size, block), ref.packed_len(x.size, bits)
    q_want, m_want = np.empty(pl, np.uint8), np.empty(2 * nb, np.float32)
    ref.quantize_packed(x, q_want, m_want, bits, block)
    q_got, m_got = np.full(pl, 0xFF, np.uint8), np.empty(2 * nb, np.float32)
    NATIVE.quantize_packed(unaligned(x, 1), q_got, m_got, bits, block)
    assert_same_bytes(q_got, q_want, "quantize_packed q")
    assert_same_bytes(m_got, m_want, "quantize_packed meta")
    want, got = np.empty(x.size, np.float32), np.empty(x.size, np.float32)
    ref.dequantize_packed(q_want, m_want, want, bits, block)
    NATIVE.dequantize_packed(q_got, m_got, got, bits, block)
    assert_same_bytes(got, want, "dequantize_packed")


# ---- every instruction-set level -------------------------------------------------------------

_LEVEL_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from pccl import _native as N, _reference as R
    from pccl.types import DType, ReduceOp
    rng = np.random.default_rng(3)
    def bits(dt, n):
        return rng.integers(0, 256, n * np.dtype(dt).itemsize, dtype=np.uint8).view(dt)
    def off(a, k):
        v = np.frombuffer(bytearray(a.nbytes + k), a.dtype, a.size, offset=k)
        v[...] = a
        return v
    def same(a, b, what):
        assert a.tobytes() == b.tobytes(), what
    for n in (0, 1, 31, 4097, 70001):
        for dt in DType:
            for op in (ReduceOp.SUM, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.PROD):
                a, b = bits(dt.storage, n), bits(dt.storage, n)
                w = a.copy(); R.reduce_inplace(w, b, dt, op)
                g = off(a, 1); N.reduce(g, off(b, 3), int(dt), int(op)); same(g, w, (dt, op))
            w = a.copy(); R.divide_inplace(w, dt, 3)
            g = off(a, 1); N.divide(g, int(dt), 3); same(g, w, (dt, "div"))
        x = bits(np.float32, n)
        for name in ("encode_f16", "encode_bf16"):
            w = np.empty(n, np.uint16); getattr(R, name)(x, w)
            g = off(w * 0, 1); getattr(N, name)(off(x, 1), g); same(g, w, name)
        h = bits(np.uint16, n)
        for name in ("decode_f16", "decode_bf16", "accumulate_f16", "accumulate_bf16"):
            w = x.copy(); getattr(R, name)(h, w)
            g = off(x, 1); getattr(N, name)(off(h, 1), g); same(g, w, name)
        for name in ("add_f16", "add_bf16"):
            base = bits(np.float32, n)
            w = x.copy(); getattr(R, name)(h, base, w)
            g = off(x, 1); getattr(N, name)(off(h, 1), off(base, 3), g); same(g, w, name)
        for x in (x, rng.standard_normal(n).astype(np.float32)):
            nb = R.num_blocks(n, 7)
            qw, mw = np.empty(n, np.uint8), np.empty(2 * nb, np.float32)
            R.quantize_u8(x, qw, mw, 7)
            qg, mg = off(qw * 0, 1), off(mw * 0, 1)
            N.quantize_u8(off(x, 1), qg, mg, 7); same(qg, qw, "q"); same(mg, mw, "meta")
            w = x.copy(); R.dequantize_accumulate_u8(qw, mw, w, 7)
            g = off(x, 1); N.dequantize_accumulate_u8(qw, mw, g, 7); same(g, w, "dqa")
            base = bits(np.float32, n)
            w = x.copy(); R.dequantize_add_u8(qw, mw, base, w, 7)
            g = off(x, 1); N.dequantize_add_u8(qw, mw, off(base, 2), g, 7); same(g, w, "dqadd")
            for keep in (0, 1, 2):
                for b_ in (None, base):
                    w, qo, mo = x.copy(), qw * 0, mw * 0
                    R.ring_hop_u8(qw, mw, b_, w, qo, mo, 7, keep)
                    g, qg, mg = off(x, 1), off(qw * 0, 3), off(mw * 0, 2)
                    N.ring_hop_u8(qw, mw, b_, g, qg, mg, 7, keep)
                    same(g, w, "hop"); same(qg, qo, "hop q"); same(mg, mo, "hop meta")
            for nbits in (4, 2):
                nb, pl = R.num_blocks(n, 8), R.packed_len(n, nbits)
                qw, mw = np.empty(pl, np.uint8), np.empty(2 * nb, np.float32)
                R.quantize_packed(x, qw, mw, nbits, 8)
                qg, mg = off(qw * 0, 1), off(mw * 0, 1)
                N.quantize_packed(off(x, 1), qg, mg, nbits, 8)
                same(qg, qw, ("pq", nbits)); same(mg, mw, ("pmeta", nbits))
                w = np.empty(n, np.float32); R.dequantize_packed(qw, mw, w, nbits, 8)
                g = off(w * 0, 1); N.dequantize_packed(qw, mw, g, nbits, 8); same(g, w, "pdq")
                w = x.copy(); R.dequantize_accumulate_packed(qw, mw, w, nbits, 8)
                g = off(x, 1); N.dequantize_accumulate_packed(qw, mw, g, nbits, 8)
                same(g, w, "pdqa")
                w = x.copy(); R.dequantize_add_packed(qw, mw, base, w, nbits, 8)
                g = off(x, 1); N.dequantize_add_packed(qw, mw, off(base, 2), g, nbits, 8)
                same(g, w, "pdqadd")
                for keep in (0, 1, 2):
                    for b_ in (None, base):
                        w, qo, mo = x.copy(), qw * 0, mw * 0
                        R.ring_hop_packed(qw, mw, b_, w, qo, mo, nbits, 8, keep)
                        g, qg, mg = off(x, 1), off(qw * 0, 3), off(mw * 0, 2)
                        N.ring_hop_packed(qw, mw, b_, g, qg, mg, nbits, 8, keep)
                        same(g, w, "phop"); same(qg, qo, "phop q"); same(mg, mo, "phop meta")
    print(N.SIMD)
    """
)


@native
@requires_native
@pytest.mark.parametrize("level", ["generic", "avx2", "avx512"])
def test_every_simd_level_matches_reference(level: str) -> None:
    """Each compiled instruction-set variant (capped via PCCL_SIMD) matches the reference.

    On a CPU without the level, the module picks the widest one it has; the check still
    runs on that.
    """
    env = dict(os.environ, PCCL_SIMD=level)
    env.pop("PCCL_FORCE_NUMPY", None)
    proc = subprocess.run(
        [sys.executable, "-c", _LEVEL_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    chosen = proc.stdout.strip()
    order = ["generic", "avx2", "avx512"]
    assert order.index(chosen) <= order.index(level)


# ---- golden vectors (reference and live backend) ----------------------------------------------

BACKENDS = [pytest.param(ref, id="reference"), pytest.param(kernels, id="frontend")]


def f32(*bits: int) -> np.ndarray:
    return np.array(bits, np.uint32).view(np.float32)


def u32(a: np.ndarray) -> list[int]:
    return a.view(np.uint32).tolist()


def _reduce(mod: ModuleType, dst: np.ndarray, src: np.ndarray, dt: DType, op: ReduceOp) -> None:
    mod.reduce_inplace(dst, src, dt, op)


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_bf16_encode(mod: ModuleType) -> None:
    cases = {
        0x3F800000: 0x3F80,  # 1.0
        0x3F808000: 0x3F80,  # tie, even below: down
        0x3F818000: 0x3F82,  # tie, odd below: up
        0x3F808001: 0x3F81,  # above the tie
        0x3F80FFFF: 0x3F81,
        0x7F7FFFFF: 0x7F80,  # FLT_MAX rounds to inf
        0x7F7F7FFF: 0x7F7F,
        0x80000000: 0x8000,  # -0.0
        0x00000001: 0x0000,  # subnormal below half a bf16 subnormal step
        0x00008000: 0x0000,  # subnormal tie, even: down
        0x00018000: 0x0002,  # subnormal tie, odd: up
        0x7F800000: 0x7F80,
        0xFF800000: 0xFF80,
        0xFFC00001: 0x7FC0,  # NaN -> canonical (sign dropped)
        0x7F800001: 0x7FC0,  # signalling NaN -> canonical quiet NaN
    }
    out = np.empty(len(cases), np.uint16)
    mod.encode_bf16(f32(*cases), out)
    assert out.tolist() == list(cases.values())


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_f16_encode(mod: ModuleType) -> None:
    cases = {
        65504.0: 0x7BFF,  # largest half
        65519.99: 0x7BFF,  # just below the overflow tie
        65520.0: 0x7C00,  # tie with 65536: even -> inf
        1e6: 0x7C00,
        -1e6: 0xFC00,
        2.0**-24: 0x0001,  # smallest subnormal half
        2.0**-25: 0x0000,  # tie at half of it: even -> 0
        3 * 2.0**-26: 0x0001,  # 0.75 step: rounds up
        3 * 2.0**-25: 0x0002,  # 1.5 steps: tie -> even 2
        2.0**-14: 0x0400,  # smallest normal
        1.0: 0x3C00,
        1 + 2.0**-11: 0x3C00,  # tie, even: down
        1 + 3 * 2.0**-11: 0x3C02,  # tie, odd: up
        -1e-10: 0x8000,
        float("inf"): 0x7C00,
        float("-inf"): 0xFC00,
        float("nan"): 0x7E00,
        -float("nan"): 0x7E00,
    }
    out = np.empty(len(cases), np.float16)
    mod.encode_f16(np.array(list(cases), np.float32), out)
    assert out.view(np.uint16).tolist() == list(cases.values())


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_decode(mod: ModuleType) -> None:
    half = np.array([0x0001, 0x8000, 0x7C00, 0xFC00, 0x7C01, 0xFE00, 0x3555, 0x03FF], np.uint16)
    out = np.empty(half.size, np.float32)
    mod.decode_f16(half, out)
    assert u32(out) == [
        0x33800000,  # 2^-24
        0x80000000,  # -0.0
        0x7F800000,
        0xFF800000,
        0x7FC00000,  # signalling NaN -> canonical
        0x7FC00000,  # negative NaN -> canonical
        0x3EAAA000,  # 0.333251953125
        0x387FC000,  # largest subnormal half: 1023 * 2^-24
    ]
    bf = np.array([0x3F80, 0x0001, 0xFF81, 0xFF80, 0x8000], np.uint16)
    out = np.empty(bf.size, np.float32)
    mod.decode_bf16(bf, out)
    assert u32(out) == [0x3F800000, 0x00010000, 0x7FC00000, 0xFF800000, 0x80000000]


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_integer_wraparound(mod: ModuleType) -> None:
    a = np.array([127, -128, 100, 16, -128], np.int8)
    _reduce(mod, a, np.array([1, -1, 100, 16, 1], np.int8), DType.INT8, ReduceOp.SUM)
    assert a.tolist() == [-128, 127, -56, 32, -127]
    a = np.array([16, -128, 3], np.int8)
    _reduce(mod, a, np.array([16, -1, -43], np.int8), DType.INT8, ReduceOp.PROD)
    assert a.tolist() == [0, -128, -129 + 256]
    a = np.array([300, -32768], np.int16)
    _reduce(mod, a, np.array([300, -1], np.int16), DType.INT16, ReduceOp.PROD)
    assert a.tolist() == [90000 - 65536, -32768]
    a = np.array([250, 3], np.uint8)
    _reduce(mod, a, np.array([10, 255], np.uint8), DType.UINT8, ReduceOp.SUM)
    assert a.tolist() == [4, 2]
    big = np.array([2**63 - 1, -(2**63)], np.int64)
    _reduce(mod, big, np.array([1, -1], np.int64), DType.INT64, ReduceOp.SUM)
    assert big.tolist() == [-(2**63), 2**63 - 1]
    m = np.array([-5, 7], np.int32)
    _reduce(mod, m, np.array([3, 9], np.int32), DType.INT32, ReduceOp.MIN)
    assert m.tolist() == [-5, 7]


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_divide(mod: ModuleType) -> None:
    div = mod.divide_inplace
    a = np.array([7, -7, -8, 8, 1, -1], np.int32)
    div(a, DType.INT32, 2)
    assert a.tolist() == [3, -3, -4, 4, 0, 0]  # truncation toward zero
    a = np.array([-128, -128, 127], np.int8)
    b, c = a.copy(), a.copy()
    div(a, DType.INT8, 3)
    div(b, DType.INT8, 128)
    div(c, DType.INT8, 200)
    assert (a.tolist(), b.tolist(), c.tolist()) == ([-42, -42, 42], [-1, -1, 0], [0, 0, 0])
    a = np.array([-(2**63), 2**63 - 1], np.int64)
    div(a, DType.INT64, 2**63 - 1)
    assert a.tolist() == [-1, 1]
    x = np.array([1.0, -0.0, np.inf, np.nan], np.float32)
    div(x, DType.FLOAT32, 3)
    assert u32(x) == [0x3EAAAAAB, 0x80000000, 0x7F800000, 0x7FC00000]
    h = np.array([1.0, 65504.0], np.float16)
    div(h, DType.FLOAT16, 3)
    assert h.view(np.uint16).tolist() == [0x3555, 0x7555]


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_float_nan_and_zero_rules(mod: ModuleType) -> None:
    # inf + -inf: canonical NaN, not the x86 default NaN 0xFFC00000.
    a = f32(0x7F800000, 0x7FC00001, 0xFFC00005, 0x3F800000)
    _reduce(
        mod, a, f32(0xFF800000, 0xFFC00007, 0x3F800000, 0xFF800001), DType.FLOAT32, ReduceOp.SUM
    )
    assert u32(a) == [0x7FC00000] * 4
    # MIN/MAX: ties keep dst (-0 vs +0); NaN on either side -> canonical NaN.
    a = f32(0x80000000, 0x00000000, 0x7FC00001, 0x3F800000, 0x3F800000)
    _reduce(
        mod,
        a,
        f32(0x00000000, 0x80000000, 0x3F800000, 0xFFC00002, 0x40000000),
        DType.FLOAT32,
        ReduceOp.MIN,
    )
    assert u32(a) == [0x80000000, 0x00000000, 0x7FC00000, 0x7FC00000, 0x3F800000]
    a = f32(0x00000000, 0x80000000, 0x3F800000)
    _reduce(mod, a, f32(0x80000000, 0x00000000, 0x40000000), DType.FLOAT32, ReduceOp.MAX)
    assert u32(a) == [0x00000000, 0x80000000, 0x40000000]
    d = np.array([np.inf, 1.0], np.float64)
    _reduce(mod, d, np.array([-np.inf, 2.0], np.float64), DType.FLOAT64, ReduceOp.SUM)
    assert d.view(np.uint64).tolist() == [0x7FF8000000000000, 0x4008000000000000]


@pytest.mark.parametrize("mod", BACKENDS)
def test_golden_half_arithmetic(mod: ModuleType) -> None:
    # bf16 1.0 + 2^-8 is a tie between 1.0 and 1.0078125: even -> 1.0; from 0x3F81: up.
    a = np.array([0x3F80, 0x3F81, 0x7F7F], np.uint16)
    _reduce(mod, a, np.array([0x3B80, 0x3B80, 0x7F7F], np.uint16), DType.BFLOAT16, ReduceOp.SUM)
    assert a.tolist() == [0x3F80, 0x3F82, 0x7F80]  # last: overflow to inf
    h = np.array([60000, 2.0**-24, -0.0, 1.0], np.float16)
    _reduce(
        mod, h, np.array([10000, 2.0**-24, 0.0, np.nan], np.float16), DType.FLOAT16, ReduceOp.SUM
    )
    assert h.view(np.uint16).tolist() == [0x7C00, 0x0002, 0x0000, 0x7E00]
    h = np.array([2.0, -3.0], np.float16)
    _reduce(mod, h, np.array([-1.5, np.inf], np.float16), DType.FLOAT16, ReduceOp.PROD)
    assert h.view(np.uint16).tolist() == [0xC200, 0xFC00]


# ---- front-end validation (whichever backend is live) ----------------------------------------


def test_backend_is_reported() -> None:
    forced = os.environ.get("PCCL_FORCE_NUMPY", "") == "1"
    assert kernels.BACKEND in ("native", "numpy")
    if forced:
        assert kernels.BACKEND == "numpy"
    assert (kernels.BACKEND == "native") == (kernels._native is not None)


def test_missing_extension_falls_back_with_warning() -> None:
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "sys.modules['pccl._native'] = None; "
        "from pccl import kernels; print(kernels.BACKEND)"
    )
    env = dict(os.environ)
    env.pop("PCCL_FORCE_NUMPY", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "numpy"
    assert "WARNING:pccl:pccl._native is unavailable" in proc.stderr


def test_num_blocks() -> None:
    assert [kernels.num_blocks(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert kernels.num_blocks(4097) == 2
    with pytest.raises(ValueError):
        kernels.num_blocks(5, 0)
    with pytest.raises(ValueError):
        kernels.num_blocks(-1)


Call = Callable[[], None]


def _rejections() -> list[tuple[str, type[Exception], Call]]:
    f = np.zeros(8, np.float32)
    g = np.zeros(8, np.float32)
    ro = np.zeros(8, np.float32)
    ro.flags.writeable = False
    q = np.zeros(8, np.uint8)
    meta = np.zeros(2, np.float32)
    u16 = np.zeros(8, np.uint16)
    R, S, F32 = kernels.reduce_inplace, ReduceOp.SUM, DType.FLOAT32
    return [
        ("avg", ValueError, lambda: R(f, g, F32, ReduceOp.AVG)),
        ("bad op code", ValueError, lambda: R(f, g, F32, 9)),  # type: ignore[arg-type]
        ("op not int", TypeError, lambda: R(f, g, F32, "sum")),  # type: ignore[arg-type]
        ("dtype not int", TypeError, lambda: R(f, g, np.float32, S)),  # type: ignore[arg-type]
        ("wrong dtype", TypeError, lambda: R(f, g.astype(np.float64), F32, S)),
        ("bf16 as float16", TypeError, lambda: R(u16.view(np.float16), u16, DType.BFLOAT16, S)),
        ("big endian", TypeError, lambda: R(f, g.astype(">f4"), F32, S)),
        ("length", ValueError, lambda: R(f, g[:7], F32, S)),
        ("2-D", ValueError, lambda: R(f.reshape(2, 4), g.reshape(2, 4), F32, S)),
        ("strided", ValueError, lambda: R(f[::2], g[::2], F32, S)),
        ("read-only", ValueError, lambda: R(ro, g, F32, S)),
        ("overlap", ValueError, lambda: R(f[1:], f[:-1], F32, S)),
        ("same array", ValueError, lambda: R(f, f, F32, S)),
        ("list", TypeError, lambda: R([0.0], g[:1], F32, S)),  # type: ignore[arg-type]
        ("divisor 0", ValueError, lambda: kernels.divide_inplace(f, F32, 0)),
        ("divisor huge", ValueError, lambda: kernels.divide_inplace(f, F32, 2**63)),
        ("divisor float", TypeError, lambda: kernels.divide_inplace(f, F32, 2.0)),  # type: ignore[arg-type]
        ("block 0", ValueError, lambda: kernels.quantize_u8(f, q, meta, 0)),
        ("meta length", ValueError, lambda: kernels.quantize_u8(f, q, meta, 4)),
        ("q length", ValueError, lambda: kernels.quantize_u8(f, q[:7], meta, 8)),
        ("q dtype", TypeError, lambda: kernels.quantize_u8(f, q.view(np.int8), meta, 8)),
        ("q read-only", ValueError, lambda: kernels.dequantize_u8(q, meta, ro, 8)),
        ("dq meta length", ValueError, lambda: kernels.dequantize_u8(q, meta[:1], f, 8)),
        ("dqa overlap", ValueError,
         lambda: kernels.dequantize_accumulate_u8(q, f[:2], f, 8)),
        ("encode out dtype", TypeError, lambda: kernels.encode_f16(f, np.zeros(8, np.int16))),
        ("encode bf16 to float16", TypeError,
         lambda: kernels.encode_bf16(f, np.zeros(8, np.float16))),
        ("decode length", ValueError, lambda: kernels.decode_bf16(u16, f[:4])),
        ("encode overlap", ValueError, lambda: kernels.encode_bf16(f, f.view(np.uint16)[:8])),
        ("accumulate ro", ValueError, lambda: kernels.accumulate_f16(u16, ro)),
        ("dq add base overlaps out", ValueError,
         lambda: kernels.dequantize_add_u8(q, meta, f, f, 8)),
        ("dq add base length", ValueError,
         lambda: kernels.dequantize_add_u8(q, meta, g[:4], f, 8)),
        ("dq add base dtype", TypeError,
         lambda: kernels.dequantize_add_u8(q, meta, g.astype(np.float64), f, 8)),
        ("add_f16 base overlaps out", ValueError, lambda: kernels.add_f16(u16, f, f)),
        ("add_bf16 out read-only", ValueError, lambda: kernels.add_bf16(u16, g, ro)),
        ("ring hop q_out is q", ValueError,
         lambda: kernels.ring_hop_u8(q, meta, None, f, q, meta.copy(), 8)),
        ("ring hop base is acc", ValueError,
         lambda: kernels.ring_hop_u8(q, meta, f, f, q.copy(), meta.copy(), 8)),
        ("ring hop meta_out length", ValueError,
         lambda: kernels.ring_hop_u8(q, meta, None, f, q.copy(), meta[:1].copy(), 8)),
        ("ring hop q_out dtype", TypeError,
         lambda: kernels.ring_hop_u8(q, meta, None, f, g, meta.copy(), 8)),
        ("ring hop keep", ValueError,
         lambda: kernels.ring_hop_u8(q, meta, None, f, q.copy(), meta.copy(), 8, "store")),
        ("packed bits 8", ValueError, lambda: kernels.quantize_packed(f, q[:4], meta, 8, 8)),
        ("packed bits 3", ValueError, lambda: kernels.quantize_packed(f, q[:4], meta, 3, 8)),
        ("int4 block odd", ValueError, lambda: kernels.quantize_packed(f, q[:4], meta, 4, 7)),
        ("int2 block 6", ValueError,
         lambda: kernels.quantize_packed(f, q[:2], np.zeros(4, np.float32), 2, 6)),
        ("int4 q length", ValueError, lambda: kernels.quantize_packed(f, q, meta, 4, 8)),
        ("int2 q length", ValueError, lambda: kernels.quantize_packed(f, q[:3], meta, 2, 8)),
        ("packed meta length", ValueError,
         lambda: kernels.quantize_packed(f, q[:4], meta[:1], 4, 8)),
        ("packed dq out read-only", ValueError,
         lambda: kernels.dequantize_packed(q[:4], meta, ro, 4, 8)),
        ("packed dq q length", ValueError, lambda: kernels.dequantize_packed(q, meta, f, 4, 8)),
        ("packed dqa overlap", ValueError,
         lambda: kernels.dequantize_accumulate_packed(q[:4], f[:2], f, 4, 8)),
        ("packed dq add base overlaps out", ValueError,
         lambda: kernels.dequantize_add_packed(q[:4], meta, f, f, 4, 8)),
        ("packed hop q_out is q", ValueError,
         lambda: kernels.ring_hop_packed(q[:4], meta, None, f, q[:4], meta.copy(), 4, 8)),
        ("packed hop keep", ValueError,
         lambda: kernels.ring_hop_packed(q[:4], meta, None, f, q[4:], meta.copy(), 4, 8, "x")),
        ("packed hop q_out length", ValueError,
         lambda: kernels.ring_hop_packed(q[:4], meta, None, f, q[4:7], meta.copy(), 4, 8)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _rejections(), ids=lambda c: c[0])
def test_frontend_rejects_bad_arguments(case: tuple[str, type[Exception], Call]) -> None:
    _, exc, call = case
    with pytest.raises(exc):
        call()


def test_rejected_call_writes_nothing() -> None:
    dst = np.arange(8, dtype=np.float32)
    with pytest.raises(ValueError):
        kernels.reduce_inplace(dst, np.ones(7, np.float32), DType.FLOAT32, ReduceOp.SUM)
    assert dst.tolist() == list(range(8))


@pytest.mark.parametrize("dt", list(DType), ids=lambda d: d.name)
def test_frontend_matches_reference(dt: DType) -> None:
    """The live backend (native or numpy) agrees with the reference through the front-end."""
    rng = np.random.default_rng(dt)
    a, b = random_bits(rng, dt.storage, 1001), random_bits(rng, dt.storage, 1001)
    for op in OPS:
        want, got = a.copy(), unaligned(a, 1)
        ref.reduce_inplace(want, b, dt, op)
        kernels.reduce_inplace(got, b, dt, op)
        assert_same_bytes(got, want, f"{dt.name} {op.name}")
    want, got = a.copy(), a.copy()
    ref.divide_inplace(want, dt, 5)
    kernels.divide_inplace(got, dt, 5)
    assert_same_bytes(got, want, f"{dt.name} divide")


# ---- the native module on its own never crashes on bad input ---------------------------------


@native
@requires_native
def test_native_rejects_bad_arguments_directly() -> None:
    f = np.zeros(8, np.float32)
    ro = np.zeros(8, np.float32)
    ro.flags.writeable = False
    q = np.zeros(8, np.uint8)
    meta = np.zeros(2, np.float32)
    bad_calls: list[tuple[type[Exception], Call]] = [
        (TypeError, lambda: NATIVE.reduce(f, f.copy(), 0)),
        (ValueError, lambda: NATIVE.reduce(f, f[:4].copy(), 0, 0)),
        (ValueError, lambda: NATIVE.reduce(ro, f, 0, 0)),
        (TypeError, lambda: NATIVE.reduce(f, np.zeros(8, np.float64), 0, 0)),
        (TypeError, lambda: NATIVE.reduce(f, np.zeros(8, np.int32), 0, 0)),
        (ValueError, lambda: NATIVE.reduce(f, f.copy(), 99, 0)),
        (ValueError, lambda: NATIVE.reduce(f, f.copy(), -1, 0)),
        (ValueError, lambda: NATIVE.reduce(f, f.copy(), 0, 1)),
        (ValueError, lambda: NATIVE.reduce(f, f, 0, 0)),
        (TypeError, lambda: NATIVE.reduce(f, "abc", 0, 0)),
        (TypeError, lambda: NATIVE.reduce(f, None, 0, 0)),
        (TypeError, lambda: NATIVE.reduce(f, f[::2], 0, 0)),
        (ValueError, lambda: NATIVE.reduce(np.frombuffer(bytes(32), np.float32), f, 0, 0)),
        (TypeError, lambda: NATIVE.reduce(bytearray(32), f, 0, 0)),
        (OverflowError, lambda: NATIVE.reduce(f, f.copy(), 2**70, 0)),
        (ValueError, lambda: NATIVE.divide(f, 0, 0)),
        (ValueError, lambda: NATIVE.divide(f, 0, 2**64)),
        (ValueError, lambda: NATIVE.divide(f, 0, -3)),
        (ValueError, lambda: NATIVE.quantize_u8(f, q, meta, 0)),
        (ValueError, lambda: NATIVE.quantize_u8(f, q, meta, 4)),
        (ValueError, lambda: NATIVE.quantize_u8(f, q[:3], meta, 8)),
        (ValueError, lambda: NATIVE.quantize_u8(f, q, f[:2], 8)),
        (TypeError, lambda: NATIVE.quantize_u8(f, f, meta, 8)),
        (ValueError, lambda: NATIVE.dequantize_u8(q, meta[:1], f, 8)),
        (ValueError, lambda: NATIVE.dequantize_u8(q, meta, ro, 8)),
        (ValueError, lambda: NATIVE.dequantize_accumulate_u8(q, f[:2], f, 8)),
        (TypeError, lambda: NATIVE.encode_f16(f, np.zeros(8, np.float32))),
        (ValueError, lambda: NATIVE.encode_bf16(f, np.zeros(4, np.uint16))),
        (ValueError, lambda: NATIVE.encode_bf16(f, f.view(np.uint16)[:8])),
        (TypeError, lambda: NATIVE.decode_bf16(np.zeros(8, np.float16), f)),
        (TypeError, lambda: NATIVE.accumulate_bf16(np.zeros(8, np.uint16))),
        (ValueError, lambda: NATIVE.dequantize_add_u8(q, meta, f, f, 8)),
        (ValueError, lambda: NATIVE.dequantize_add_u8(q, meta, f[:4], f.copy(), 8)),
        (ValueError, lambda: NATIVE.dequantize_add_u8(q, meta, f, ro, 8)),
        (TypeError, lambda: NATIVE.dequantize_add_u8(q, meta, q, f, 8)),
        (TypeError, lambda: NATIVE.dequantize_add_u8(q, meta, f, f.copy())),
        (ValueError, lambda: NATIVE.add_f16(np.zeros(8, np.uint16), f, f)),
        (ValueError, lambda: NATIVE.add_bf16(np.zeros(8, np.uint16), f[:4], f.copy())),
        (TypeError, lambda: NATIVE.add_bf16(np.zeros(8, np.float16), f, f.copy())),
        (ValueError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, q, meta.copy(), 8, 2)),
        (ValueError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, q.copy(), meta.copy(), 8, 3)),
        (ValueError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, q.copy(), meta.copy(), 8, -1)),
        (TypeError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, q.copy(), meta.copy(), 8, "x")),
        (ValueError, lambda: NATIVE.ring_hop_u8(q, meta, f, f, q.copy(), meta.copy(), 8, 0)),
        (ValueError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, q.copy(), meta, 8, 0)),
        (ValueError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, q[:4].copy(), meta.copy(), 8, 0)),
        (ValueError, lambda: NATIVE.ring_hop_u8(q, meta, None, ro, q.copy(), meta.copy(), 8, 0)),
        (TypeError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, f.copy(), meta.copy(), 8, 0)),
        (TypeError, lambda: NATIVE.ring_hop_u8(q, meta, None, f, q.copy(), meta.copy(), 8)),
        (ValueError, lambda: NATIVE.quantize_packed(f, q[:4], meta, 8, 8)),
        (ValueError, lambda: NATIVE.quantize_packed(f, q[:4], meta, 4, 7)),
        (ValueError, lambda: NATIVE.quantize_packed(f, q[:4], meta, 4, 0)),
        (ValueError, lambda: NATIVE.quantize_packed(f, q, meta, 4, 8)),
        (ValueError, lambda: NATIVE.quantize_packed(f, q[:2], meta[:1], 2, 8)),
        (TypeError, lambda: NATIVE.quantize_packed(f, f[:1], meta, 4, 8)),
        (ValueError, lambda: NATIVE.dequantize_packed(q, meta, f, 4, 8)),
        (ValueError, lambda: NATIVE.dequantize_packed(q[:4], meta, ro, 4, 8)),
        (ValueError, lambda: NATIVE.dequantize_accumulate_packed(q[:4], f[:2], f, 4, 8)),
        (ValueError, lambda: NATIVE.dequantize_add_packed(q[:4], meta, f, f, 4, 8)),
        (ValueError, lambda: NATIVE.dequantize_add_packed(q[:4], meta, f[:4], f.copy(), 4, 8)),
        (TypeError, lambda: NATIVE.dequantize_add_packed(q[:4], meta, f, f.copy(), 4)),
        (ValueError, lambda: NATIVE.ring_hop_packed(q[:4], meta, None, f, q[:4], meta, 4, 8, 0)),
        (
            ValueError,
            lambda: NATIVE.ring_hop_packed(q[:4], meta, None, f, q[4:], meta.copy(), 4, 8, 3),
        ),
        (
            ValueError,
            lambda: NATIVE.ring_hop_packed(q[:4], meta, f, f, q[4:], meta.copy(), 4, 8, 0),
        ),
        (
            ValueError,
            lambda: NATIVE.ring_hop_packed(q[:4], meta, None, f, q[4:7], meta.copy(), 4, 8, 0),
        ),
        (
            ValueError,
            lambda: NATIVE.ring_hop_packed(q[:4], meta, None, f, q[4:], meta.copy(), 2, 8, 0),
        ),
        (TypeError, lambda: NATIVE.ring_hop_packed(q[:4], meta, None, f, q[4:], meta.copy(), 4, 8)),
    ]
    for exc, call in bad_calls:
        with pytest.raises(exc):
            call()
    # Plain buffers work: bytearray / memoryview of the right element size.
    raw = bytearray(np.array([1.0, 2.0], np.float32).tobytes())
    NATIVE.reduce(memoryview(raw).cast("f"), np.array([0.5, 0.5], np.float32), 0, 0)
    assert np.frombuffer(raw, np.float32).tolist() == [1.5, 2.5]
