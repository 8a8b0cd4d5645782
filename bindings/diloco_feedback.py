"""Error feedback of DiLoCo's quantized pseudo-gradients: the residual each peer keeps of what
the wire encoding lost of its own contribution, added to its next one.

The residual is bfloat16 bits (``d._residual``, allocated by :class:`DiLoCo`), one per
parameter, per unit of weight; its scratch (``d._rscratch``, ``d._q``, ``d._meta``,
``d._half``) is allocated with it. Shared by the sync, delayed, quorum and streaming paths;
training thread (quorum mode: the driver thread, which owns the round).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pccl import kernels
from pccl.types import Quantization

if TYPE_CHECKING:  # pragma: no cover
    from pccl.bindings.diloco import DiLoCo

__all__ = ["residual_add", "store_residual"]


def residual_add(d: DiLoCo, x: np.ndarray, a: int) -> None:
    """``x += residual[a : a + len(x)]`` (bf16 bits decoded exactly to fp32)."""
    assert d._residual is not None
    step = d._rscratch.shape[0]
    for i in range(0, x.shape[0], step):
        j = min(x.shape[0], i + step)
        tmp = d._rscratch[: j - i]
        kernels.decode_bf16(d._residual[a + i : a + j], tmp)
        np.add(x[i:j], tmp, out=x[i:j])


def store_residual(d: DiLoCo, x: np.ndarray, a: int) -> None:
    """``residual[a : a + len(x)] = bf16((x - D(Q(x))) / weight)`` for one all-reduced
    buffer ``x``, with the blocks the ring quantized it in: the ring cuts it into one chunk
    per peer (``n // world`` elements, the first ``n % world`` one more; RingOp.start) and
    a chunk's blocks start at the chunk's start. Blocks aligned to ``x``'s start instead
    would give most elements the error of a block partition the wire never used."""
    world = max(1, int(getattr(d.comm, "group_world_size", 1) or 1))
    blockwise = d.quantization in (Quantization.UINT8, Quantization.INT4, Quantization.INT2)
    n = x.shape[0]
    if not blockwise or world < 2 or n < world:
        _store_span(d, x, a)
        return
    base, rem = divmod(n, world)
    for c in range(world):
        lo, hi = c * base + min(c, rem), (c + 1) * base + min(c + 1, rem)
        _store_span(d, x[lo:hi], a + lo)


def _store_span(d: DiLoCo, x: np.ndarray, a: int) -> None:
    """:func:`store_residual` over one span, the quantization blocks aligned to its start."""
    assert d._residual is not None
    numel = x.shape[0]
    step = d._scratch.shape[0]
    bits = {Quantization.INT4: 4, Quantization.INT2: 2}.get(d.quantization, 0)
    block = kernels.PACKED_BLOCK if bits else d._block  # INT4/INT2: the ring's block
    if (d.quantization == Quantization.UINT8 or bits) and step > block:
        step -= step % block  # whole blocks per chunk: the blocks of a single pass
    if bits and getattr(d, "_packed_meta", None) is None:  # first INT4/INT2 pass
        d._packed_meta = np.empty(2 * kernels.num_blocks(step, block), dtype=np.float32)
    for i in range(0, numel, step):
        j = min(numel, i + step)
        n = j - i
        xi, deq = x[i:j], d._scratch[:n]
        if d.quantization == Quantization.UINT8:
            meta = d._meta[: 2 * kernels.num_blocks(n, d._block)]
            kernels.quantize_u8(xi, d._q[:n], meta, d._block)
            kernels.dequantize_u8(d._q[:n], meta, deq, d._block)
        elif bits:
            q = d._q[: kernels.packed_len(n, bits)]
            meta = d._packed_meta[: 2 * kernels.num_blocks(n, block)]
            kernels.quantize_packed(xi, q, meta, bits, block)
            kernels.dequantize_packed(q, meta, deq, bits, block)
        elif d.quantization == Quantization.FP16:
            kernels.encode_f16(xi, d._half[:n])
            kernels.decode_f16(d._half[:n], deq)
        else:
            kernels.encode_bf16(xi, d._half[:n])
            kernels.decode_bf16(d._half[:n], deq)
        r = d._rscratch[:n]
        with np.errstate(invalid="ignore", over="ignore"):
            np.subtract(xi, deq, out=r)
            if d._weight != 1:  # the residual is kept per unit of weight
                np.divide(r, np.float32(d._weight), out=r)
        r[~np.isfinite(r)] = 0  # a NaN/inf block must not poison every later step
        kernels.encode_bf16(r, d._residual[a + i : a + j])
