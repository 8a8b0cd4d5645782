"""Kernel throughput: the native extension against the numpy reference, one core.

``run()`` times every kernel on ``mib`` MiB of float32 input (16 Mi elements at the default
64 MiB; the 16-bit and uint8 operands have the same element count), prints a table and
returns ``{"kernels": {name: {"native_gbps", "numpy_gbps", "speedup", ...}}, ...}``.
Driven by ``pccl bench kernels [--json FILE]``; runs on the calling thread.

Method: inputs are standard-normal float32 (no NaN/inf) and all outputs are preallocated, so
no page faults are timed on the native side (the numpy reference allocates its own
temporaries, as it does in use). Each kernel runs once to warm up, then ``repeats`` times,
native and numpy runs interleaved so that drift on a noisy host hits both alike; the median
wall time is reported.

Bytes counted (GB = 1e9 bytes), the conventions of the machine measurements so the numbers
compare with them:

* reductions and accumulations (``sum_*``, ``max_f32``, ``accumulate_*``,
  ``dequant_accumulate_u8``): all memory traffic, reads plus writes; ``sum_f32`` in place is
  3 x 4 bytes per element (read dst, read src, write dst);
* quantisation and conversions (``quantize_u8``, ``dequantize_u8``, ``quantize_int4``,
  ``dequantize_int2``..., ``encode_*``, ``decode_*``): the float32 side only, 4 bytes per
  element;
* ``ring_hop_*`` (the fused reduce-scatter hop of a forwarding peer: partial + decoded
  received codes, re-quantized; the partial sum stays in an L1 scratch block): 4 bytes per
  element, the float32 operand read.

INT4/INT2 run at ``kernels.PACKED_BLOCK`` (their wire block), UINT8 at ``DEFAULT_BLOCK``.
Every row also records the median wall and CPU seconds of both backends, and the report
records the machine (CPU model, caches, cores).

``sum_f32`` is also timed against plain ``np.add(a, b, out=a)`` (``np_add_gbps``): the
reference adds a NaN-canonicalisation pass that numpy's add lacks.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pccl import _reference, kernels
from pccl.tools.machine import describe as _machine
from pccl.types import DType, ReduceOp

__all__ = ["run"]

Kernel = Callable[[], object]


def _median_seconds(fns: list[Kernel], repeats: int) -> list[tuple[float, float]]:
    """Median (wall, process CPU) seconds of each function; runs are interleaved so drift
    hits all alike."""
    for fn in fns:
        fn()  # warm-up: page in outputs, load code
    times: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts, cs in zip(fns, times, cpu):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
    return [(statistics.median(ts), statistics.median(cs)) for ts, cs in zip(times, cpu)]


def _cases(n: int, block: int) -> list[tuple[str, int, str, Kernel | None, Kernel]]:
    """(name, bytes per element, counting, native call or None, numpy reference call)."""
    native: Any = kernels._native
    rng = np.random.default_rng(1234)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    acc = np.zeros(n, np.float32)
    out32 = np.empty(n, np.float32)
    bf_a, bf_b = np.empty(n, np.uint16), np.empty(n, np.uint16)
    _reference.encode_bf16(x, bf_a)
    _reference.encode_bf16(y, bf_b)
    h_a, h_b = np.empty(n, np.uint16), np.empty(n, np.uint16)
    _reference.encode_f16(x, h_a)
    _reference.encode_f16(y, h_b)
    nb = _reference.num_blocks(n, block)
    q, meta = np.empty(n, np.uint8), np.empty(2 * nb, np.float32)
    _reference.quantize_u8(x, q, meta, block)
    out16 = np.empty(n, np.uint16)
    pb = kernels.PACKED_BLOCK
    packed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for nbits in (4, 2):
        pq = np.empty(_reference.packed_len(n, nbits), np.uint8)
        pm = np.empty(2 * _reference.num_blocks(n, pb), np.float32)
        _reference.quantize_packed(x, pq, pm, nbits, pb)
        packed[nbits] = (pq, pm, np.empty_like(pq), np.empty_like(pm))
    q_out, meta_out = np.empty_like(q), np.empty_like(meta)
    f32, f16, bf16 = int(DType.FLOAT32), int(DType.FLOAT16), int(DType.BFLOAT16)
    s, mx = int(ReduceOp.SUM), int(ReduceOp.MAX)
    traffic, fp32_side = "read+write", "fp32 side"

    def nat(fn: Callable[[], object]) -> Kernel | None:
        return fn if native is not None else None

    ref = _reference
    return [
        ("sum_f32", 12, traffic, nat(lambda: native.reduce(acc, y, f32, s)),
         lambda: ref.reduce_inplace(acc, y, DType.FLOAT32, ReduceOp.SUM)),
        ("sum_bf16", 6, traffic, nat(lambda: native.reduce(bf_a, bf_b, bf16, s)),
         lambda: ref.reduce_inplace(bf_a, bf_b, DType.BFLOAT16, ReduceOp.SUM)),
        ("sum_f16", 6, traffic, nat(lambda: native.reduce(h_a, h_b, f16, s)),
         lambda: ref.reduce_inplace(h_a, h_b, DType.FLOAT16, ReduceOp.SUM)),
        ("max_f32", 12, traffic, nat(lambda: native.reduce(acc, y, f32, mx)),
         lambda: ref.reduce_inplace(acc, y, DType.FLOAT32, ReduceOp.MAX)),
        ("quantize_u8", 4, fp32_side, nat(lambda: native.quantize_u8(x, q, meta, block)),
         lambda: ref.quantize_u8(x, q, meta, block)),
        ("dequantize_u8", 4, fp32_side, nat(lambda: native.dequantize_u8(q, meta, out32, block)),
         lambda: ref.dequantize_u8(q, meta, out32, block)),
        ("dequant_accumulate_u8", 9, traffic,
         nat(lambda: native.dequantize_accumulate_u8(q, meta, acc, block)),
         lambda: ref.dequantize_accumulate_u8(q, meta, acc, block)),
        ("ring_hop_u8", 4, fp32_side,
         nat(lambda: native.ring_hop_u8(q, meta, y, acc, q_out, meta_out, block, 0)),
         lambda: ref.ring_hop_u8(q, meta, y, acc, q_out, meta_out, block, 0)),
        *[row for nbits in (4, 2) for row in _packed_cases(nbits, packed[nbits], x, y, acc,
                                                           out32, native)],
        ("encode_f16", 4, fp32_side, nat(lambda: native.encode_f16(x, out16)),
         lambda: ref.encode_f16(x, out16)),
        ("decode_f16", 4, fp32_side, nat(lambda: native.decode_f16(h_a, out32)),
         lambda: ref.decode_f16(h_a, out32)),
        ("encode_bf16", 4, fp32_side, nat(lambda: native.encode_bf16(x, out16)),
         lambda: ref.encode_bf16(x, out16)),
        ("decode_bf16", 4, fp32_side, nat(lambda: native.decode_bf16(bf_a, out32)),
         lambda: ref.decode_bf16(bf_a, out32)),
        ("accumulate_f16", 10, traffic, nat(lambda: native.accumulate_f16(h_a, acc)),
         lambda: ref.accumulate_f16(h_a, acc)),
        ("accumulate_bf16", 10, traffic, nat(lambda: native.accumulate_bf16(bf_a, acc)),
         lambda: ref.accumulate_bf16(bf_a, acc)),
    ]  # fmt: skip


def _packed_cases(
    nbits: int,
    bufs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    acc: np.ndarray,
    out32: np.ndarray,
    native: Any,
) -> list[tuple[str, int, str, Kernel | None, Kernel]]:
    """The INT4 (nbits 4) or INT2 (2) rows, at their wire block."""
    q, meta, q_out, meta_out = bufs
    pb, ref, tag = kernels.PACKED_BLOCK, _reference, f"int{nbits}"

    def nat(fn: Callable[[], object]) -> Kernel | None:
        return fn if native is not None else None

    return [
        (f"quantize_{tag}", 4, "fp32 side",
         nat(lambda: native.quantize_packed(x, q_out, meta_out, nbits, pb)),
         lambda: ref.quantize_packed(x, q_out, meta_out, nbits, pb)),
        (f"dequantize_{tag}", 4, "fp32 side",
         nat(lambda: native.dequantize_packed(q, meta, out32, nbits, pb)),
         lambda: ref.dequantize_packed(q, meta, out32, nbits, pb)),
        (f"dequant_accumulate_{tag}", 8, "read+write",
         nat(lambda: native.dequantize_accumulate_packed(q, meta, acc, nbits, pb)),
         lambda: ref.dequantize_accumulate_packed(q, meta, acc, nbits, pb)),
        (f"ring_hop_{tag}", 4, "fp32 side",
         nat(lambda: native.ring_hop_packed(q, meta, y, acc, q_out, meta_out, nbits, pb, 0)),
         lambda: ref.ring_hop_packed(q, meta, y, acc, q_out, meta_out, nbits, pb, 0)),
    ]  # fmt: skip


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def run(json_path: str | None = None, mib: int = 64, repeats: int = 7) -> dict[str, Any]:
    """Time every kernel, print a table to stdout and return the results.

    Args:
        json_path: also write the results there as JSON (atomically, via a ``.tmp`` file).
        mib: float32 input size in MiB (elements = mib * 2**18).
        repeats: timed runs per kernel after one warm-up, at least 5; the median is kept.

    Returns:
        ``{"kernels": {name: {"native_gbps", "numpy_gbps", "speedup", "numpy_s",
        "numpy_cpu_s", "native_s", "native_cpu_s", "bytes_per_element", "bytes_counted"}},
        "config": {...}, "machine": {...}}``; ``sum_f32`` also carries ``np_add_gbps`` and
        ``speedup_vs_np_add``. Native figures are None when the numpy backend is live.

    Raises:
        ValueError: ``mib < 1`` or ``repeats < 5``.
    """
    if mib < 1:
        raise ValueError(f"mib must be >= 1, got {mib}")
    if repeats < 5:
        raise ValueError(f"repeats must be >= 5, got {repeats}")
    n = mib * (1 << 20) // 4
    block = kernels.DEFAULT_BLOCK
    native: Any = kernels._native
    results: dict[str, dict[str, Any]] = {}
    print(
        f"pccl kernels: {mib} MiB fp32 ({n} elements), median of {repeats}, backend "
        f"{kernels.BACKEND}" + (f" ({native.SIMD})" if native is not None else "")
    )
    print(f"{'kernel':<24}{'bytes/elem':>18}{'native GB/s':>13}{'numpy GB/s':>12}{'speedup':>9}")
    add_a = np.zeros(n, np.float32)
    add_b = np.random.default_rng(5).standard_normal(n, dtype=np.float32)
    for name, per_elem, counted, nat_fn, ref_fn in _cases(n, block):
        nbytes = per_elem * n
        fns = [ref_fn] + ([] if nat_fn is None else [nat_fn])
        if name == "sum_f32":
            fns.append(lambda: np.add(add_a, add_b, out=add_a))
        timed = _median_seconds(fns, repeats)
        secs = [t for t, _ in timed]
        numpy_gbps = _gbps(nbytes, secs[0])
        native_gbps = None if nat_fn is None else _gbps(nbytes, secs[1])
        speedup = None if native_gbps is None else native_gbps / numpy_gbps
        row: dict[str, Any] = {
            "native_gbps": native_gbps,
            "numpy_gbps": numpy_gbps,
            "speedup": speedup,
            "numpy_s": timed[0][0],
            "numpy_cpu_s": timed[0][1],
            "native_s": None if nat_fn is None else timed[1][0],
            "native_cpu_s": None if nat_fn is None else timed[1][1],
            "bytes_per_element": per_elem,
            "bytes_counted": counted,
        }
        results[name] = row
        nat_s = "-" if native_gbps is None else f"{native_gbps:.1f}"
        sp_s = "-" if speedup is None else f"{speedup:.2f}x"
        print(f"{name:<24}{f'{per_elem} ({counted})':>18}{nat_s:>13}{numpy_gbps:>12.1f}{sp_s:>9}")
        if name == "sum_f32":
            add_gbps = _gbps(nbytes, secs[-1])
            row["np_add_gbps"] = add_gbps
            row["speedup_vs_np_add"] = None if native_gbps is None else native_gbps / add_gbps
            vs = "-" if native_gbps is None else f"{native_gbps / add_gbps:.2f}x"
            print(f"{'  vs np.add(a, b, out=a)':<24}{'':>18}{'':>13}{add_gbps:>12.1f}{vs:>9}")
    report: dict[str, Any] = {
        "kernels": results,
        "config": {
            "mib": mib,
            "elements": n,
            "repeats": repeats,
            "block": block,
            "packed_block": kernels.PACKED_BLOCK,
            "backend": kernels.BACKEND,
            "simd": None if native is None else native.SIMD,
        },
        "machine": _machine(),
    }
    if json_path is not None:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, json_path)
    return report
