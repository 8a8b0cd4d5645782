"""Numeric kernels for the ring: reduce, AVG finaliser, uint8 and packed 4/2-bit quantisation,
fp16/bf16 casts.

This module validates arguments and dispatches to one backend, chosen once at import:

* ``"native"``: the C extension ``pccl._native`` (vectorised, GIL released while it runs);
* ``"numpy"``: :mod:`pccl._reference`, which is also the specification the native build
  matches byte for byte (rounding, accumulation type, NaN rules are documented there).

``PCCL_FORCE_NUMPY=1`` selects numpy; a missing or broken extension falls back to numpy with
a WARNING on the ``pccl`` logger, never silently. :data:`BACKEND` names the live backend.

Arrays are 1-D, contiguous numpy arrays of the storage dtype (``DType.storage``; bfloat16 as
``uint16``, float16 as ``float16`` or ``uint16``), native byte order, at any byte offset;
length 0 is allowed. Arrays passed to one call must not share memory. Every check runs
before any byte is written, so a rejected call leaves its outputs untouched. Functions are
safe to call from any thread; none allocates on the native path.
"""

from __future__ import annotations

import logging
import operator
import os
from typing import Any

import numpy as np

from pccl import _reference
from pccl.types import DType, ReduceOp

__all__ = [
    "BACKEND",
    "DEFAULT_BLOCK",
    "PACKED_BLOCK",
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
    "packed_len",
    "quantize_packed",
    "quantize_u8",
    "reduce_inplace",
    "ring_hop_packed",
    "ring_hop_u8",
]

log = logging.getLogger("pccl")

#: Elements per quantisation block (one (min, scale) float32 pair each).
DEFAULT_BLOCK = 4096

#: Elements per block of the packed 4-bit and 2-bit codecs (INT4, INT2): one fp32 (min, scale)
#: pair per block, 64 / 512 = 0.125 bit per element, so INT4 costs 4.125 bits per element on
#: the wire (7.76x fewer bytes than fp32) and INT2 2.125. Smaller than DEFAULT_BLOCK because
#: with 16 (4) levels the step is range / 15 (3). Measured on char-LM pseudo-gradients
#: (docs/bench/2026-12-04/streaming/codec_blocks.json): int4 relative RMS error 0.090 at 128
#: (4.5 bits), 0.103 at 512 (4.125 bits), 0.097 at 256 with bf16 meta (4.125 bits); held-out
#: loss of streaming DiLoCo with error feedback equal at 256 and 512 within run-to-run noise
#: (4 seeds), so the wire keeps fp32 meta. It was 128 until the 7.5 H bytes target of issue 16.
PACKED_BLOCK = 512

_MAX_DIVISOR = 2**63 - 1


def _load_native() -> Any:
    if os.environ.get("PCCL_FORCE_NUMPY", "").strip().lower() in ("1", "true", "yes", "on"):
        log.info("PCCL_FORCE_NUMPY is set: using the numpy reference kernels")
        return None
    try:
        from pccl import _native
    except ImportError as exc:
        log.warning(
            "pccl._native is unavailable (%s); falling back to the numpy reference kernels, "
            "which are several times slower",
            exc,
        )
        return None
    return _native


_native: Any = _load_native()

#: ``"native"`` or ``"numpy"``: the backend every function here dispatches to.
BACKEND: str = "native" if _native is not None else "numpy"

_F32 = (np.dtype(np.float32),)
_U8 = (np.dtype(np.uint8),)
_F16 = (np.dtype(np.float16), np.dtype(np.uint16))
_BF16 = (np.dtype(np.uint16),)


def _storage_dtypes(dtype: DType) -> tuple[np.dtype, ...]:
    return _F16 if dtype is DType.FLOAT16 else (dtype.storage,)


def _array(name: str, a: object, dtypes: tuple[np.dtype, ...], *, out: bool = False) -> int:
    """Check one array argument; return its length."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want} (native byte order), got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array must be contiguous")
    if out and not a.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    return a.shape[0]


def _same_length(name_a: str, n_a: int, name_b: str, n_b: int) -> None:
    if n_a != n_b:
        raise ValueError(f"{name_a} has {n_a} elements but {name_b} has {n_b}")


def _disjoint(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.size and b.size and np.may_share_memory(a, b):
        raise ValueError(f"{name_a} and {name_b} overlap in memory")


def _as_dtype(dtype: object) -> DType:
    if not isinstance(dtype, int) or isinstance(dtype, bool):
        raise TypeError(f"dtype must be a pccl.DType, got {type(dtype).__name__}")
    return DType(dtype)


def _as_op(op: object) -> ReduceOp:
    if not isinstance(op, int) or isinstance(op, bool):
        raise TypeError(f"op must be a pccl.ReduceOp, got {type(op).__name__}")
    return ReduceOp(op)


def _as_block(block: object) -> int:
    b = operator.index(block)  # type: ignore[arg-type]
    if b < 1:
        raise ValueError(f"block must be >= 1, got {b}")
    return b


def num_blocks(n: int, block: int = DEFAULT_BLOCK) -> int:
    """Number of quantisation blocks covering ``n`` elements: ``ceil(n / block)``.

    Raises:
        ValueError: ``n < 0`` or ``block < 1``.
    """
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _reference.num_blocks(n, _as_block(block))


def reduce_inplace(dst: np.ndarray, src: np.ndarray, dtype: DType, op: ReduceOp) -> None:
    """``dst[i] = dst[i] (op) src[i]`` element-wise.

    float16/bfloat16 are combined in float32 and rounded back to nearest-even; integers wrap
    around; MIN/MAX propagate NaN; every NaN written is canonical (see :mod:`pccl._reference`).

    Args:
        dst: accumulator, updated in place.
        src: the other operand, same length; must not overlap ``dst``.
        dtype: element type of both arrays.
        op: SUM, MIN, MAX or PROD.

    Raises:
        ValueError: ``op`` is AVG (callers SUM, then :func:`divide_inplace`), lengths differ,
            arrays overlap, are not 1-D contiguous or ``dst`` is read-only.
        TypeError: an array's dtype is not the storage dtype of ``dtype``.
    """
    dt = _as_dtype(dtype)
    rop = _as_op(op)
    if rop is ReduceOp.AVG:
        raise ValueError("AVG is not a kernel: reduce with SUM, then divide_inplace(dst, n)")
    want = _storage_dtypes(dt)
    _same_length("dst", _array("dst", dst, want, out=True), "src", _array("src", src, want))
    _disjoint("dst", dst, "src", src)
    if _native is not None:
        _native.reduce(dst, src, int(dt), int(rop))
    else:
        _reference.reduce_inplace(dst, src, dt, rop)


def divide_inplace(dst: np.ndarray, dtype: DType, divisor: int) -> None:
    """AVG finaliser: ``dst[i] /= divisor``.

    Floats divide in their compute type (float32 for float32/16/bfloat16, rounded back to
    nearest-even); integers truncate toward zero, like C.

    Raises:
        ValueError: ``divisor`` outside [1, 2**63 - 1], ``dst`` read-only or not 1-D
            contiguous.
        TypeError: ``dst``'s dtype is not the storage dtype of ``dtype``.
    """
    dt = _as_dtype(dtype)
    d = operator.index(divisor)
    if not 1 <= d <= _MAX_DIVISOR:
        raise ValueError(f"divisor must be in [1, 2**63 - 1], got {d}")
    _array("dst", dst, _storage_dtypes(dt), out=True)
    if _native is not None:
        _native.divide(dst, int(dt), d)
    else:
        _reference.divide_inplace(dst, dt, d)


def quantize_u8(
    src: np.ndarray, q_out: np.ndarray, meta_out: np.ndarray, block: int = DEFAULT_BLOCK
) -> None:
    """Block-wise min-max uint8 quantisation of float32 values.

    Per block: ``meta = (min, scale = (max - min) / 255)`` and
    ``q = rint(min((x - min) / scale, 255))``; a constant block has scale 0 and q 0; a block
    holding NaN/inf (or whose range overflows float32) gets meta (NaN, NaN) and q 0, so it
    dequantises to NaN.

    Args:
        src: float32[n].
        q_out: uint8[n], written.
        meta_out: float32[2 * num_blocks(n, block)], written.
        block: elements per block, >= 1.

    Raises:
        ValueError: bad lengths, ``block < 1``, overlap, read-only outputs.
        TypeError: wrong dtypes.
    """
    b = _as_block(block)
    n = _array("src", src, _F32)
    _check_quant_out("src", n, q_out, meta_out, b)
    _disjoint("src", src, "q_out", q_out)
    _disjoint("src", src, "meta_out", meta_out)
    _disjoint("q_out", q_out, "meta_out", meta_out)
    if _native is not None:
        _native.quantize_u8(src, q_out, meta_out, b)
    else:
        _reference.quantize_u8(src, q_out, meta_out, b)


def _check_quant_out(
    src_name: str, n: int, q_out: np.ndarray, meta_out: np.ndarray, b: int
) -> None:
    """The outputs of a quantisation of ``n`` elements: uint8[n] and float32[2 * blocks]."""
    _same_length("q_out", _array("q_out", q_out, _U8, out=True), src_name, n)
    _same_length(
        "meta_out",
        _array("meta_out", meta_out, _F32, out=True),
        "2 * num_blocks(n, block)",
        2 * _reference.num_blocks(n, b),
    )


def _check_dequant(q: np.ndarray, meta: np.ndarray, out_name: str, out: np.ndarray, b: int) -> None:
    n = _array("q", q, _U8)
    _same_length(out_name, _array(out_name, out, _F32, out=True), "q", n)
    _same_length(
        "meta",
        _array("meta", meta, _F32),
        "2 * num_blocks(n, block)",
        2 * _reference.num_blocks(n, b),
    )
    _disjoint(out_name, out, "q", q)
    _disjoint(out_name, out, "meta", meta)


def dequantize_u8(
    q: np.ndarray, meta: np.ndarray, out: np.ndarray, block: int = DEFAULT_BLOCK
) -> None:
    """``out[i] = min + float32(q[i]) * scale`` of element i's block (two roundings).

    Raises:
        ValueError: bad lengths, ``block < 1``, overlap, read-only ``out``.
        TypeError: wrong dtypes (q uint8, meta and out float32).
    """
    b = _as_block(block)
    _check_dequant(q, meta, "out", out, b)
    if _native is not None:
        _native.dequantize_u8(q, meta, out, b)
    else:
        _reference.dequantize_u8(q, meta, out, b)


def dequantize_accumulate_u8(
    q: np.ndarray, meta: np.ndarray, acc: np.ndarray, block: int = DEFAULT_BLOCK
) -> None:
    """``acc[i] += dequantize_u8(q, meta)[i]``, byte-identical to the two-step form.

    Raises:
        ValueError: bad lengths, ``block < 1``, overlap, read-only ``acc``.
        TypeError: wrong dtypes (q uint8, meta and acc float32).
    """
    b = _as_block(block)
    _check_dequant(q, meta, "acc", acc, b)
    if _native is not None:
        _native.dequantize_accumulate_u8(q, meta, acc, b)
    else:
        _reference.dequantize_accumulate_u8(q, meta, acc, b)


def dequantize_add_u8(
    q: np.ndarray,
    meta: np.ndarray,
    base: np.ndarray,
    out: np.ndarray,
    block: int = DEFAULT_BLOCK,
) -> None:
    """``out[i] = base[i] + dequantize_u8(q, meta)[i]`` in one pass.

    Byte-identical to :func:`dequantize_u8` into ``out`` followed by
    ``reduce_inplace(out, base, FLOAT32, SUM)``; the ring's out-of-place reduce-scatter hop.

    Raises:
        ValueError: bad lengths, ``block < 1``, overlap (``base`` included), read-only ``out``.
        TypeError: wrong dtypes (q uint8, meta, base and out float32).
    """
    b = _as_block(block)
    _check_dequant(q, meta, "out", out, b)
    _same_length("base", _array("base", base, _F32), "q", q.shape[0])
    _disjoint("out", out, "base", base)
    if _native is not None:
        _native.dequantize_add_u8(q, meta, base, out, b)
    else:
        _reference.dequantize_add_u8(q, meta, base, out, b)


#: ``keep`` values of :func:`ring_hop_u8`.
HOP_KEEP = {"discard": 0, "sum": 1, "adopt": 2}


def ring_hop_u8(
    q: np.ndarray,
    meta: np.ndarray,
    base: np.ndarray | None,
    acc: np.ndarray,
    q_out: np.ndarray,
    meta_out: np.ndarray,
    block: int = DEFAULT_BLOCK,
    keep: str = "sum",
) -> None:
    """One uint8 reduce-scatter hop of the ring, fused block by block.

    ``sum = (base if base is not None else acc) + dequantize_u8(q, meta)``, then
    ``quantize_u8(sum, q_out, meta_out)``, then by ``keep``: ``"discard"`` leaves ``acc``
    untouched (a forwarding hop needs the partial sum only on the wire, so it never goes to
    memory), ``"sum"`` stores it in ``acc``, ``"adopt"`` stores ``dequantize_u8(q_out,
    meta_out)`` (the owner adopting what every peer will decode). Byte-identical to those
    kernels called in turn; each block is re-read from L1 instead of memory.

    Raises:
        ValueError: bad lengths, ``block < 1``, unknown ``keep``, any two arrays overlap,
            read-only outputs.
        TypeError: wrong dtypes (q, q_out uint8; meta, meta_out, base, acc float32).
        MemoryError: no scratch block (``"discard"`` with ``block > 4096``).
    """
    b = _as_block(block)
    if keep not in HOP_KEEP:
        raise ValueError(f"keep must be one of {sorted(HOP_KEEP)}, got {keep!r}")
    _check_dequant(q, meta, "acc", acc, b)
    n = q.shape[0]
    _check_quant_out("q", n, q_out, meta_out, b)
    _check_hop_memory(q, meta, base, acc, q_out, meta_out, "q", n)
    if _native is not None:
        _native.ring_hop_u8(q, meta, base, acc, q_out, meta_out, b, HOP_KEEP[keep])
    else:
        _reference.ring_hop_u8(q, meta, base, acc, q_out, meta_out, b, HOP_KEEP[keep])


def _as_bits(bits: object) -> int:
    b = operator.index(bits)  # type: ignore[arg-type]
    if b not in (4, 2):
        raise ValueError(f"bits must be 4 or 2, got {b}")
    return b


def _as_packed_block(block: object, bits: int) -> int:
    b = _as_block(block)
    if b % (8 // bits):
        raise ValueError(f"block must be a multiple of {8 // bits} for {bits}-bit codes, got {b}")
    return b


def packed_len(n: int, bits: int) -> int:
    """Bytes of ``n`` packed ``bits``-bit codes: ``ceil(n / (8 // bits))``.

    Raises:
        ValueError: ``n < 0`` or ``bits`` not 4 or 2.
    """
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _reference.packed_len(n, _as_bits(bits))


def _check_packed(
    n_name: str,
    n: int,
    q_name: str,
    q: np.ndarray,
    meta_name: str,
    meta: np.ndarray,
    bits: int,
    block: int,
    *,
    out: bool,
) -> None:
    """``q``: uint8[packed_len(n)], ``meta``: float32[2 * num_blocks(n, block)]."""
    _same_length(
        q_name,
        _array(q_name, q, _U8, out=out),
        f"packed_len({n_name}, {bits})",
        _reference.packed_len(n, bits),
    )
    _same_length(
        meta_name,
        _array(meta_name, meta, _F32, out=out),
        "2 * num_blocks(n, block)",
        2 * _reference.num_blocks(n, block),
    )


def quantize_packed(
    src: np.ndarray,
    q_out: np.ndarray,
    meta_out: np.ndarray,
    bits: int,
    block: int = PACKED_BLOCK,
) -> None:
    """Block-wise min-max quantisation of float32 values to packed ``bits``-bit codes.

    :func:`quantize_u8` with ``2**bits - 1`` levels instead of 255: per block
    ``meta = (min, scale = (max - min) / levels)``, ``q = rint(min((x - min) / scale,
    levels))``; codes packed ``8 // bits`` per byte, least significant first, unused bits 0.

    Args:
        src: float32[n].
        q_out: uint8[packed_len(n, bits)], written.
        meta_out: float32[2 * num_blocks(n, block)], written.
        bits: 4 (INT4) or 2 (INT2).
        block: elements per block, a multiple of ``8 // bits``.

    Raises:
        ValueError: bad lengths, bits or block, overlap, read-only outputs.
        TypeError: wrong dtypes.
    """
    nbits = _as_bits(bits)
    b = _as_packed_block(block, nbits)
    n = _array("src", src, _F32)
    _check_packed("n", n, "q_out", q_out, "meta_out", meta_out, nbits, b, out=True)
    _disjoint("src", src, "q_out", q_out)
    _disjoint("src", src, "meta_out", meta_out)
    _disjoint("q_out", q_out, "meta_out", meta_out)
    if _native is not None:
        _native.quantize_packed(src, q_out, meta_out, nbits, b)
    else:
        _reference.quantize_packed(src, q_out, meta_out, nbits, b)


def _packed_dequant_args(
    q: np.ndarray, meta: np.ndarray, out_name: str, out: np.ndarray, bits: object, block: object
) -> tuple[int, int]:
    nbits = _as_bits(bits)
    b = _as_packed_block(block, nbits)
    n = _array(out_name, out, _F32, out=True)
    _check_packed(out_name, n, "q", q, "meta", meta, nbits, b, out=False)
    _disjoint(out_name, out, "q", q)
    _disjoint(out_name, out, "meta", meta)
    return nbits, b


def dequantize_packed(
    q: np.ndarray, meta: np.ndarray, out: np.ndarray, bits: int, block: int = PACKED_BLOCK
) -> None:
    """``out[i] = min + float32(code[i]) * scale`` of element i's block; ``out``'s length
    says how many codes ``q`` holds.

    Raises:
        ValueError: bad lengths, bits or block, overlap, read-only ``out``.
        TypeError: wrong dtypes (q uint8, meta and out float32).
    """
    nbits, b = _packed_dequant_args(q, meta, "out", out, bits, block)
    if _native is not None:
        _native.dequantize_packed(q, meta, out, nbits, b)
    else:
        _reference.dequantize_packed(q, meta, out, nbits, b)


def dequantize_accumulate_packed(
    q: np.ndarray, meta: np.ndarray, acc: np.ndarray, bits: int, block: int = PACKED_BLOCK
) -> None:
    """``acc[i] += dequantize_packed(q, meta)[i]``, byte-identical to the two-step form.

    Raises:
        ValueError: bad lengths, bits or block, overlap, read-only ``acc``.
        TypeError: wrong dtypes.
    """
    nbits, b = _packed_dequant_args(q, meta, "acc", acc, bits, block)
    if _native is not None:
        _native.dequantize_accumulate_packed(q, meta, acc, nbits, b)
    else:
        _reference.dequantize_accumulate_packed(q, meta, acc, nbits, b)


def dequantize_add_packed(
    q: np.ndarray,
    meta: np.ndarray,
    base: np.ndarray,
    out: np.ndarray,
    bits: int,
    block: int = PACKED_BLOCK,
) -> None:
    """``out[i] = base[i] + dequantize_packed(q, meta)[i]`` in one pass.

    Raises:
        ValueError: bad lengths, bits or block, overlap (``base`` included), read-only ``out``.
        TypeError: wrong dtypes.
    """
    nbits, b = _packed_dequant_args(q, meta, "out", out, bits, block)
    _same_length("base", _array("base", base, _F32), "out", out.shape[0])
    _disjoint("out", out, "base", base)
    if _native is not None:
        _native.dequantize_add_packed(q, meta, base, out, nbits, b)
    else:
        _reference.dequantize_add_packed(q, meta, base, out, nbits, b)


def ring_hop_packed(
    q: np.ndarray,
    meta: np.ndarray,
    base: np.ndarray | None,
    acc: np.ndarray,
    q_out: np.ndarray,
    meta_out: np.ndarray,
    bits: int,
    block: int = PACKED_BLOCK,
    keep: str = "sum",
) -> None:
    """:func:`ring_hop_u8` for packed ``bits``-bit codes: ``sum = (base or acc) +
    dequantize_packed(q, meta)``, ``quantize_packed(sum, q_out, meta_out)``, then ``keep``
    ("discard", "sum", "adopt") as there. ``acc``'s length is the element count.

    Raises:
        ValueError: bad lengths, bits, block or ``keep``, any two arrays overlap, read-only
            outputs.
        TypeError: wrong dtypes.
        MemoryError: no scratch block (``block > 4096``).
    """
    if keep not in HOP_KEEP:
        raise ValueError(f"keep must be one of {sorted(HOP_KEEP)}, got {keep!r}")
    nbits, b = _packed_dequant_args(q, meta, "acc", acc, bits, block)
    n = acc.shape[0]
    _check_packed("n", n, "q_out", q_out, "meta_out", meta_out, nbits, b, out=True)
    _check_hop_memory(q, meta, base, acc, q_out, meta_out, "acc", n)
    if _native is not None:
        _native.ring_hop_packed(q, meta, base, acc, q_out, meta_out, nbits, b, HOP_KEEP[keep])
    else:
        _reference.ring_hop_packed(q, meta, base, acc, q_out, meta_out, nbits, b, HOP_KEEP[keep])


def _check_hop_memory(
    q: np.ndarray,
    meta: np.ndarray,
    base: np.ndarray | None,
    acc: np.ndarray,
    q_out: np.ndarray,
    meta_out: np.ndarray,
    length_of: str,
    n: int,
) -> None:
    """A fused hop's ``base`` (if any) has ``n`` elements like ``length_of``, and no two of its
    arrays overlap, except the inputs ``q``, ``meta`` and ``base`` among themselves."""
    named = [("q", q), ("meta", meta), ("acc", acc), ("q_out", q_out), ("meta_out", meta_out)]
    if base is not None:
        _same_length("base", _array("base", base, _F32), length_of, n)
        named.append(("base", base))
    for i, (na, a) in enumerate(named):
        for nb_, b_ in named[i + 1 :]:
            if na in ("q", "meta") and nb_ in ("q", "meta", "base"):
                continue  # inputs may share memory with each other
            _disjoint(na, a, nb_, b_)


def _add16(
    name: str, src: np.ndarray, src_dtypes: tuple[np.dtype, ...], base: np.ndarray, out: np.ndarray
) -> None:
    n = _array("src", src, src_dtypes)
    _same_length("base", _array("base", base, _F32), "src", n)
    _same_length("out", _array("out", out, _F32, out=True), "src", n)
    _disjoint("out", out, "src", src)
    _disjoint("out", out, "base", base)
    if _native is not None:
        getattr(_native, name)(src, base, out)
    else:
        getattr(_reference, name)(src, base, out)


def add_f16(src: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = base[i] + decode_f16(src)[i]`` in float32 (one pass, same bytes as decode
    then add).

    Raises:
        ValueError: lengths differ, overlap, read-only ``out``.
        TypeError: wrong dtypes (src float16/uint16, base and out float32).
    """
    _add16("add_f16", src, _F16, base, out)


def add_bf16(src: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = base[i] + decode_bf16(src)[i]`` in float32 (one pass).

    Raises:
        ValueError: lengths differ, overlap, read-only ``out``.
        TypeError: wrong dtypes (src uint16, base and out float32).
    """
    _add16("add_bf16", src, _BF16, base, out)


def _unary(
    name: str,
    src: np.ndarray,
    src_dtypes: tuple[np.dtype, ...],
    out_name: str,
    out: np.ndarray,
    out_dtypes: tuple[np.dtype, ...],
) -> None:
    _same_length(
        "src", _array("src", src, src_dtypes), out_name, _array(out_name, out, out_dtypes, out=True)
    )
    _disjoint("src", src, out_name, out)
    if _native is not None:
        getattr(_native, name)(src, out)
    else:
        getattr(_reference, name)(src, out)


def encode_f16(src: np.ndarray, out: np.ndarray) -> None:
    """float32 -> IEEE half bits (``out`` float16 or uint16), round-to-nearest-even.

    Overflow gives ±inf, subnormals are kept, NaN becomes the canonical half NaN 0x7E00.

    Raises:
        ValueError: lengths differ, overlap, read-only ``out``.
        TypeError: wrong dtypes.
    """
    _unary("encode_f16", src, _F32, "out", out, _F16)


def decode_f16(src: np.ndarray, out: np.ndarray) -> None:
    """IEEE half (float16 or uint16 words) -> float32, exact; NaN -> canonical NaN.

    Raises:
        ValueError: lengths differ, overlap, read-only ``out``.
        TypeError: wrong dtypes.
    """
    _unary("decode_f16", src, _F16, "out", out, _F32)


def encode_bf16(src: np.ndarray, out: np.ndarray) -> None:
    """float32 -> bfloat16 bits in uint16, round-to-nearest-even; NaN -> 0x7FC0.

    Raises:
        ValueError: lengths differ, overlap, read-only ``out``.
        TypeError: wrong dtypes.
    """
    _unary("encode_bf16", src, _F32, "out", out, _BF16)


def decode_bf16(src: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 bits (uint16) -> float32, exact (shift left 16); NaN -> canonical NaN.

    Raises:
        ValueError: lengths differ, overlap, read-only ``out``.
        TypeError: wrong dtypes.
    """
    _unary("decode_bf16", src, _BF16, "out", out, _F32)


def accumulate_f16(src: np.ndarray, acc: np.ndarray) -> None:
    """``acc[i] += decode_f16(src)[i]`` in float32.

    Raises:
        ValueError: lengths differ, overlap, read-only ``acc``.
        TypeError: wrong dtypes (src float16/uint16, acc float32).
    """
    _unary("accumulate_f16", src, _F16, "acc", acc, _F32)


def accumulate_bf16(src: np.ndarray, acc: np.ndarray) -> None:
    """``acc[i] += decode_bf16(src)[i]`` in float32.

    Raises:
        ValueError: lengths differ, overlap, read-only ``acc``.
        TypeError: wrong dtypes (src uint16, acc float32).
    """
    _unary("accumulate_bf16", src, _BF16, "acc", acc, _F32)
