"""Numpy reference kernels: the specification that ``pccl._native`` matches byte for byte.

These functions are also the fallback backend (``PCCL_FORCE_NUMPY=1`` or no compiled
extension). They trust their arguments: :mod:`pccl.kernels` validates types, dtypes, lengths
and overlap before calling either backend. Pure functions of their inputs; safe on any
thread (numpy may release the GIL inside).

Rules
-----
Arithmetic
    * float32/float64 are computed with single IEEE-754 operations in their own type,
      round-to-nearest-even, no fused multiply-add. Subnormals are computed exactly: flush to
      zero / denormals-are-zero are never enabled.
    * float16 and bfloat16 widen exactly to float32, compute there (one fp32 rounding), and
      round back to nearest-even (a second rounding). Overflow gives ±inf.
    * Integers wrap around (two's complement) on SUM and PROD.
    * MIN/MAX compare numerically and replace dst only when src is strictly smaller (larger):
      ties, including -0.0 against +0.0, keep dst's bits. A NaN in either operand gives NaN.
    * AVG is SUM followed by :func:`divide_inplace`: floats divide by
      ``divisor`` converted to the compute type (via a Python float, i.e. double, then
      float32 for 32/16-bit floats); integers truncate toward zero like C.
NaN
    * Every NaN any kernel writes is the canonical quiet NaN of its output type, sign clear,
      payload zero: float32 ``0x7FC00000``, float64 ``0x7FF8000000000000``, float16
      ``0x7E00``, bfloat16 ``0x7FC0``. This holds for arithmetic results, conversions
      (encode and decode alike) and dequantisation. NaN bits are thereby independent of
      operand order and of the CPU: numpy's own ``np.add`` picks different payloads for two
      NaN operands in its vector body and its scalar tail, so "whatever np.add does" cannot
      be matched (or even reproduced) bit for bit.
    * NaN stays NaN: no kernel turns a NaN into a number; ±inf stays ±inf through
      conversions.
Conversions
    * float32 -> float16 / bfloat16: IEEE round-to-nearest-even, subnormal results kept,
      overflow to ±inf (float16: |x| >= 65520 becomes inf).
    * float16 / bfloat16 -> float32: exact (bfloat16 is the word shifted left by 16).
uint8 block quantisation (``block`` elements per block, the last block may be shorter)
    * Per block: ``mn``, ``mx`` are the numeric min and max, each plus 0.0 (so a zero is
      +0.0); ``d = mx - mn`` and ``scale = d / 255`` in float32. Meta holds (mn, scale).
    * ``q = rint(min((x - mn) / scale, 255))`` (float32 division, round half to even).
      A block whose scale is 0 (constant, or a range so small that d / 255 underflows) has
      q = 0.
    * A block containing NaN or ±inf, or whose range ``d`` overflows float32, is stored as
      meta (NaN, NaN) and q = 0: it dequantises to NaN, so a non-finite gradient stays
      visible instead of silently turning finite.
    * Dequantise: ``mn + float32(q) * scale``, two roundings (no fma).
      ``dequantize_accumulate_u8`` equals dequantising into a temporary and then
      ``reduce_inplace(acc, tmp, FLOAT32, SUM)``.
    * Error bound: ``|dequantize(quantize(x)) - x| <= scale / 2`` up to the float32
      roundings of the subtraction, division and dequantisation.
Packed 4-bit / 2-bit block quantisation (``bits`` 4 or 2; ``levels = 2**bits - 1``)
    * Exactly the uint8 rules above with ``levels`` (15 or 3) in place of 255: meta (mn,
      ``scale = d / levels``) per block, ``q = rint(min((x - mn) / scale, levels))``, the same
      zero-scale and NaN/inf blocks, the same dequantisation ``mn + float32(q) * scale``.
    * Codes are packed ``8 // bits`` per byte, element ``i`` in byte ``i // (8 // bits)`` at
      bit ``bits * (i % (8 // bits))`` (least significant first); the unused high bits of a
      short last byte are zero. The packed array has ``ceil(n / (8 // bits))`` bytes.
    * ``block`` is a multiple of ``8 // bits``, so every block starts on a byte boundary.
    * Decoding reads only the code bits: a byte's padding bits do not change the result, so
      the decoded value is a pure function of the bytes that matter.
"""

from __future__ import annotations

import numpy as np

from pccl.types import DType, ReduceOp

__all__ = [
    "BF16_NAN",
    "F16_NAN",
    "F32_NAN",
    "F64_NAN",
    "accumulate_bf16",
    "accumulate_f16",
    "add_bf16",
    "add_f16",
    "decode_bf16",
    "decode_f16",
    "dequantize_accumulate_packed",
    "dequantize_accumulate_u8",
    "dequantize_add_packed",
    "dequantize_add_u8",
    "dequantize_packed",
    "dequantize_u8",
    "divide_inplace",
    "encode_bf16",
    "encode_f16",
    "num_blocks",
    "pack_codes",
    "packed_len",
    "quantize_packed",
    "quantize_u8",
    "reduce_inplace",
    "ring_hop_packed",
    "ring_hop_u8",
    "unpack_codes",
]

#: Canonical quiet NaN bit patterns, per output type.
F32_NAN = 0x7FC00000
F64_NAN = 0x7FF8000000000000
F16_NAN = 0x7E00
BF16_NAN = 0x7FC0

_F32 = np.dtype(np.float32)
_U16 = np.dtype(np.uint16)
_U32 = np.dtype(np.uint32)


def _quiet() -> np.errstate:
    """inf - inf, overflow to inf, ... are defined results here, not warnings."""
    return np.errstate(all="ignore")


def num_blocks(n: int, block: int) -> int:
    """Number of quantisation blocks for ``n`` elements: ceil(n / block)."""
    return -(-n // block)


def _canonicalize(x: np.ndarray) -> None:
    """Overwrite every NaN of a float32/float64 array with the canonical NaN."""
    nan = np.isnan(x)
    if nan.any():
        if x.dtype == _F32:
            x.view(_U32)[nan] = F32_NAN
        else:
            x.view(np.uint64)[nan] = F64_NAN


# ---- fp16 / bf16 <-> fp32 ------------------------------------------------------------------


def _widen_f16(w: np.ndarray) -> np.ndarray:
    out = w.view(np.float16).astype(_F32)
    _canonicalize(out)
    return out


def _narrow_f16(x: np.ndarray, out: np.ndarray) -> None:
    # numpy's float32 -> float16 cast is IEEE round-to-nearest-even (in software and with
    # F16C alike) except for NaN payloads, which are fixed up after.
    with _quiet():
        out.view(np.float16)[...] = x
    out.view(_U16)[np.isnan(x)] = F16_NAN


def _widen_bf16(w: np.ndarray) -> np.ndarray:
    out = (w.astype(_U32) << 16).view(_F32)
    _canonicalize(out)
    return out


def _narrow_bf16(x: np.ndarray, out: np.ndarray) -> None:
    u = x.view(_U32)
    # Round to nearest even on the 16 dropped bits; a carry runs into the exponent (and at
    # the top into inf). Wraps around only for NaN inputs, which are replaced below.
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r[np.isnan(x)] = BF16_NAN
    out[...] = r


# ---- reduce ----------------------------------------------------------------------------------


def _float_op(a: np.ndarray, b: np.ndarray, op: ReduceOp) -> None:
    """a = a (op) b for float32/float64 arrays, NaN canonical."""
    with _quiet():
        if op is ReduceOp.SUM:
            np.add(a, b, out=a)
        elif op is ReduceOp.PROD:
            np.multiply(a, b, out=a)
        else:
            nan = np.isnan(a) | np.isnan(b)
            better = b < a if op is ReduceOp.MIN else b > a
            np.copyto(a, b, where=better)
            a[nan] = np.nan
    _canonicalize(a)


_INT_UFUNC = {
    ReduceOp.SUM: np.add,
    ReduceOp.PROD: np.multiply,
    ReduceOp.MIN: np.minimum,
    ReduceOp.MAX: np.maximum,
}


def reduce_inplace(dst: np.ndarray, src: np.ndarray, dtype: DType, op: ReduceOp) -> None:
    """``dst[i] = dst[i] (op) src[i]`` for op in SUM, MIN, MAX, PROD (see module rules)."""
    if dtype in (DType.FLOAT32, DType.FLOAT64):
        _float_op(dst, src, op)
    elif dtype is DType.FLOAT16:
        a = _widen_f16(dst)
        _float_op(a, _widen_f16(src), op)
        _narrow_f16(a, dst)
    elif dtype is DType.BFLOAT16:
        a = _widen_bf16(dst)
        _float_op(a, _widen_bf16(src), op)
        _narrow_bf16(a, dst)
    else:
        _INT_UFUNC[op](dst, src, out=dst)


def divide_inplace(dst: np.ndarray, dtype: DType, divisor: int) -> None:
    """``dst[i] /= divisor``; floats round to nearest, integers truncate toward zero."""
    with _quiet():
        if dtype is DType.FLOAT64:
            np.divide(dst, float(divisor), out=dst)
            _canonicalize(dst)
        elif dtype is DType.FLOAT32:
            np.divide(dst, np.float32(float(divisor)), out=dst)
            _canonicalize(dst)
        elif dtype in (DType.FLOAT16, DType.BFLOAT16):
            widen, narrow = (
                (_widen_f16, _narrow_f16) if dtype is DType.FLOAT16 else (_widen_bf16, _narrow_bf16)
            )
            a = widen(dst)
            np.divide(a, np.float32(float(divisor)), out=a)
            narrow(a, dst)
        else:
            w = dst.astype(np.int64)
            q = w // divisor
            q += (w < 0) & (w % divisor != 0)  # floor -> toward zero
            dst[...] = q


# ---- uint8 block quantisation ----------------------------------------------------------------


def _blocks(a: np.ndarray, block: int) -> list[tuple[int, np.ndarray]]:
    """Split a 1-D array into 2-D views of whole blocks: [(first block index, rows)]."""
    n = a.shape[0]
    full = n // block
    parts = []
    if full:
        parts.append((0, a[: full * block].reshape(full, block)))
    if n % block:
        parts.append((full, a[full * block :].reshape(1, -1)))
    return parts


def quantize_u8(src: np.ndarray, q_out: np.ndarray, meta_out: np.ndarray, block: int) -> None:
    """Block-wise min-max uint8 quantisation; meta_out = (min, scale) per block."""
    _quantize_codes(src, q_out, meta_out, block, 255)


def _quantize_codes(
    src: np.ndarray, q_out: np.ndarray, meta_out: np.ndarray, block: int, levels: int
) -> None:
    """Min-max codes in [0, levels], one uint8 per element (see the module rules)."""
    nb = num_blocks(src.shape[0], block)
    if nb == 0:
        return
    mn = np.empty(nb, _F32)
    mx = np.empty(nb, _F32)
    for b0, rows in _blocks(src, block):
        np.min(rows, axis=1, out=mn[b0 : b0 + rows.shape[0]])
        np.max(rows, axis=1, out=mx[b0 : b0 + rows.shape[0]])
    with _quiet():
        mn += np.float32(0)  # -0.0 -> +0.0
        mx += np.float32(0)
        d = mx - mn
        bad = ~np.isfinite(d)  # NaN/inf inside, or the range overflows
        scale = d / np.float32(levels)
    zero = bad | (scale == 0)
    meta = meta_out.reshape(nb, 2)
    meta[:, 0] = mn
    meta[:, 1] = scale
    meta.view(_U32)[bad] = F32_NAN
    safe_mn = np.where(bad, np.float32(0), mn)
    safe_scale = np.where(zero, np.float32(1), scale)
    qparts = dict(_blocks(q_out, block))
    for b0, rows in _blocks(src, block):
        sl = slice(b0, b0 + rows.shape[0])
        with _quiet():
            t = (rows - safe_mn[sl, None]) / safe_scale[sl, None]
        np.minimum(t, np.float32(levels), out=t)
        np.rint(t, out=t)
        t[zero[sl]] = 0
        qparts[b0][...] = t


def dequantize_u8(q: np.ndarray, meta: np.ndarray, out: np.ndarray, block: int) -> None:
    """``out[i] = min + float32(q[i]) * scale`` of element i's block."""
    nb = num_blocks(q.shape[0], block)
    if nb == 0:
        return
    pairs = meta.reshape(nb, 2)
    mn, scale = pairs[:, 0], pairs[:, 1]
    oparts = dict(_blocks(out, block))
    with _quiet():
        for b0, rows in _blocks(q, block):
            sl = slice(b0, b0 + rows.shape[0])
            o = oparts[b0]
            np.multiply(rows, scale[sl, None], out=o)
            np.add(o, mn[sl, None], out=o)
    _canonicalize(out)


def dequantize_accumulate_u8(q: np.ndarray, meta: np.ndarray, acc: np.ndarray, block: int) -> None:
    """``acc[i] += dequantize_u8(q, meta)[i]`` (same bytes as the two-step form)."""
    tmp = np.empty(q.shape[0], _F32)
    dequantize_u8(q, meta, tmp, block)
    _float_op(acc, tmp, ReduceOp.SUM)


def dequantize_add_u8(
    q: np.ndarray, meta: np.ndarray, base: np.ndarray, out: np.ndarray, block: int
) -> None:
    """``out = base + dequantize_u8(q, meta)``: dequantise into ``out``, then add ``base``."""
    dequantize_u8(q, meta, out, block)
    _float_op(out, base, ReduceOp.SUM)


def ring_hop_u8(
    q: np.ndarray,
    meta: np.ndarray,
    base: np.ndarray | None,
    acc: np.ndarray,
    q_out: np.ndarray,
    meta_out: np.ndarray,
    block: int,
    keep: int,
) -> None:
    """One uint8 reduce-scatter hop: accumulate, re-quantize, then keep 0/1/2.

    ``sum = (base if given else acc) + dequantize_u8(q, meta)``; ``quantize_u8(sum) ->
    (q_out, meta_out)``; ``keep`` 0 leaves ``acc`` alone, 1 stores ``sum`` in it, 2 stores
    ``dequantize_u8(q_out, meta_out)`` in it.
    """
    total = np.empty(q.shape[0], _F32)
    dequantize_add_u8(q, meta, acc if base is None else base, total, block)
    quantize_u8(total, q_out, meta_out, block)
    if keep == 1:
        acc[...] = total
    elif keep == 2:
        dequantize_u8(q_out, meta_out, acc, block)


# ---- packed 4-bit / 2-bit block quantisation ------------------------------------------------


def packed_len(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits: ceil(n / (8 // bits))."""
    return -(-n // (8 // bits))


def pack_codes(codes: np.ndarray, out: np.ndarray, bits: int) -> None:
    """Pack uint8 codes (each < 2**bits) ``8 // bits`` per byte, least significant first."""
    per = 8 // bits
    n = codes.shape[0]
    padded = np.zeros(packed_len(n, bits) * per, np.uint8)
    padded[:n] = codes
    lanes = padded.reshape(-1, per)
    acc = lanes[:, 0].copy()
    for j in range(1, per):
        acc |= lanes[:, j] << np.uint8(bits * j)
    out[...] = acc


def unpack_codes(q: np.ndarray, n: int, bits: int) -> np.ndarray:
    """The ``n`` codes of a packed array, as uint8 (padding bits ignored)."""
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    lanes = np.empty((q.shape[0], per), np.uint8)
    for j in range(per):
        np.bitwise_and(q >> np.uint8(bits * j), mask, out=lanes[:, j])
    return lanes.reshape(-1)[:n]


def quantize_packed(
    src: np.ndarray, q_out: np.ndarray, meta_out: np.ndarray, bits: int, block: int
) -> None:
    """Block-wise min-max ``bits``-bit quantisation, codes packed; meta = (min, scale)."""
    codes = np.empty(src.shape[0], np.uint8)
    _quantize_codes(src, codes, meta_out, block, (1 << bits) - 1)
    pack_codes(codes, q_out, bits)


def dequantize_packed(
    q: np.ndarray, meta: np.ndarray, out: np.ndarray, bits: int, block: int
) -> None:
    """``out[i] = min + float32(code[i]) * scale`` of element i's block."""
    dequantize_u8(unpack_codes(q, out.shape[0], bits), meta, out, block)


def dequantize_accumulate_packed(
    q: np.ndarray, meta: np.ndarray, acc: np.ndarray, bits: int, block: int
) -> None:
    """``acc[i] += dequantize_packed(q, meta)[i]``."""
    dequantize_accumulate_u8(unpack_codes(q, acc.shape[0], bits), meta, acc, block)


def dequantize_add_packed(
    q: np.ndarray, meta: np.ndarray, base: np.ndarray, out: np.ndarray, bits: int, block: int
) -> None:
    """``out = base + dequantize_packed(q, meta)``."""
    dequantize_add_u8(unpack_codes(q, out.shape[0], bits), meta, base, out, block)


def ring_hop_packed(
    q: np.ndarray,
    meta: np.ndarray,
    base: np.ndarray | None,
    acc: np.ndarray,
    q_out: np.ndarray,
    meta_out: np.ndarray,
    bits: int,
    block: int,
    keep: int,
) -> None:
    """:func:`ring_hop_u8` for packed ``bits``-bit codes (same steps, same keep values)."""
    total = np.empty(acc.shape[0], _F32)
    dequantize_add_packed(q, meta, acc if base is None else base, total, bits, block)
    quantize_packed(total, q_out, meta_out, bits, block)
    if keep == 1:
        acc[...] = total
    elif keep == 2:
        dequantize_packed(q_out, meta_out, acc, bits, block)


# ---- conversions -----------------------------------------------------------------------------


def encode_f16(src: np.ndarray, out: np.ndarray) -> None:
    """float32 -> float16 words, round-to-nearest-even."""
    _narrow_f16(src, out)


def decode_f16(src: np.ndarray, out: np.ndarray) -> None:
    """float16 words -> float32, exact."""
    out[...] = src.view(np.float16)
    _canonicalize(out)


def encode_bf16(src: np.ndarray, out: np.ndarray) -> None:
    """float32 -> bfloat16 words, round-to-nearest-even."""
    _narrow_bf16(src, out)


def decode_bf16(src: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 words -> float32, exact."""
    out.view(_U32)[...] = src
    out.view(_U32)[...] <<= 16
    _canonicalize(out)


def accumulate_f16(src: np.ndarray, acc: np.ndarray) -> None:
    """``acc += decode_f16(src)`` in float32."""
    _float_op(acc, _widen_f16(src), ReduceOp.SUM)


def accumulate_bf16(src: np.ndarray, acc: np.ndarray) -> None:
    """``acc += decode_bf16(src)`` in float32."""
    _float_op(acc, _widen_bf16(src), ReduceOp.SUM)


def add_f16(src: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
    """``out = base + decode_f16(src)`` in float32."""
    decode_f16(src, out)
    _float_op(out, base, ReduceOp.SUM)


def add_bf16(src: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
    """``out = base + decode_bf16(src)`` in float32."""
    decode_bf16(src, out)
    _float_op(out, base, ReduceOp.SUM)
