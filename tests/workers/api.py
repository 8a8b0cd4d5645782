"""Peer worker: API contract checks that need a live run.

Modes (``params["mode"]``):
- ``too_few``: a lone peer's all-reduce raises ``TooFewPeers``.
- ``bad_args``: bad arguments raise ValueError/TypeError, both before ``connect()`` (so before
  any I/O) and on a connected peer of a run of ``world``; then a valid all-reduce still works.
- ``tags``: with ``pccl.aio``: two all-reduces in flight at once (tag 1 SUM float32, tag 2 MAX
  int32); a duplicate of tag 1 while it is in flight raises ValueError and does not disturb it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import digest, emit, join, params, run

import pccl


def classify(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run one bad call; report the exception class, its MRO names and message."""
    try:
        fn()
    except BaseException as e:
        return {
            "raised": type(e).__name__,
            "mro": [c.__name__ for c in type(e).__mro__],
            "value_or_type_error": isinstance(e, ValueError | TypeError),
            "pccl_error": isinstance(e, pccl.PCCLError),
            "message": str(e)[:300],
        }
    return {"raised": None}


def bad_calls(comm: Any) -> dict[str, Callable[[], Any]]:
    a = np.arange(64, dtype=np.float32)
    big_endian = np.arange(64, dtype=">f4")
    ro = np.zeros(64, dtype=np.float32)
    ro.flags.writeable = False
    base = np.zeros(128, dtype=np.float32)
    ar = comm.all_reduce
    return {
        "dtype_mismatch": lambda: ar(a, np.zeros(64, dtype=np.float64)),
        "dtype_mismatch_int": lambda: ar(a, np.zeros(64, dtype=np.int32)),
        "dtype_mismatch_torch_bf16_vs_f16": lambda: ar(
            torch.zeros(64, dtype=torch.bfloat16), np.zeros(64, dtype=np.float16)
        ),
        "size_mismatch": lambda: ar(a, np.zeros(63, dtype=np.float32)),
        "non_contiguous_send": lambda: ar(np.zeros(128, dtype=np.float32)[::2]),
        "non_contiguous_recv": lambda: ar(a, np.zeros(128, dtype=np.float32)[::2]),
        "non_contiguous_torch": lambda: ar(torch.zeros(8, 8).t()),
        "big_endian": lambda: ar(big_endian),
        "read_only_recv": lambda: ar(a, ro),
        "overlapping_buffers": lambda: ar(base[:64], base[32:96]),
        "unsupported_dtype_bool": lambda: ar(np.zeros(64, dtype=bool)),
        "unsupported_dtype_uint16": lambda: ar(np.zeros(64, dtype=np.uint16)),
        "unsupported_dtype_complex": lambda: ar(np.zeros(64, dtype=np.complex64)),
        "not_an_array": lambda: ar([1.0, 2.0, 3.0]),
        "quant_on_float64": lambda: ar(
            np.zeros(64, dtype=np.float64), quantization=pccl.Quantization.UINT8
        ),
        "quant_on_int32": lambda: ar(
            np.zeros(64, dtype=np.int32), quantization=pccl.Quantization.FP16
        ),
        "bad_op": lambda: ar(a, op=99),
        "bad_quantization": lambda: ar(a, quantization=42),
        "tag_negative": lambda: ar(a, tag=-1),
        "tag_too_big": lambda: ar(a, tag=2**32),
        "tag_float": lambda: ar(a, tag=1.5),
        "tag_bool": lambda: ar(a, tag=True),
        "tag_str": lambda: ar(a, tag="1"),
        "async_tag_negative": lambda: comm.all_reduce_async(a, tag=-1),
        "async_size_mismatch": lambda: comm.all_reduce_async(a, np.zeros(65, dtype=np.float32)),
    }


def mode_too_few(addr: str, p: dict[str, Any]) -> None:
    comm = pccl.Communicator(addr)
    comm.connect(timeout=30)
    world = comm.world_size
    out = classify(lambda: comm.all_reduce(np.ones(16, dtype=np.float32)))
    out_async = classify(lambda: comm.all_reduce_async(np.ones(16, dtype=np.float32)).wait(30))
    comm.close()
    emit("result", world=world, sync=out, async_=out_async)


def mode_bad_args(addr: str, p: dict[str, Any]) -> None:
    world, idx = p["world"], p["idx"]
    unconnected = pccl.Communicator(addr)
    before_connect = {name: classify(fn) for name, fn in bad_calls(unconnected).items()}
    unconnected.close()
    comm = pccl.Communicator(addr)
    join(comm, world)
    connected = {name: classify(fn) for name, fn in bad_calls(comm).items()}
    # No bad call may have reached the master: the next valid collective (same tag 0) works.
    x = np.arange(1000, dtype=np.int64) * (idx + 1)
    comm.all_reduce(x)
    expected = np.arange(1000, dtype=np.int64) * sum(range(1, world + 1))
    ok = bool(np.array_equal(x, expected))
    world_after = comm.world_size
    comm.close()
    emit(
        "result",
        before_connect=before_connect,
        connected=connected,
        valid_ok=ok,
        hash=digest(x),
        world=world_after,
    )


async def mode_tags_async(addr: str, p: dict[str, Any]) -> None:
    world, idx, n = p["world"], p["idx"], p["n"]
    comm = pccl.aio.Communicator(addr, streams=2)
    await comm.connect(timeout=60)
    await comm.wait_for_world(world, timeout=60)

    def f(i: int) -> np.ndarray:  # integer-valued float32: sums are exact in any order
        return (np.arange(n, dtype=np.float32) % 1000 + i).astype(np.float32)

    def g(i: int) -> np.ndarray:
        return (np.arange(n, dtype=np.int32) * (i + 1)) ^ (i * 7919)

    a, ra = f(idx), np.zeros(n, dtype=np.float32)
    b, rb = g(idx), np.zeros(n, dtype=np.int32)
    c = np.full(n, 5.0, dtype=np.float32)
    rc = np.zeros(n, dtype=np.float32)
    h1 = comm.all_reduce_async(a, ra, op=pccl.ReduceOp.SUM, tag=1)
    # No await in between: tag 1 is certainly still in flight here.
    dup = classify(lambda: comm.all_reduce_async(c, rc, op=pccl.ReduceOp.MAX, tag=1))
    h1_done_at_dup = h1.done()
    h2 = comm.all_reduce_async(b, rb, op=pccl.ReduceOp.MAX, tag=2)
    i1, i2 = await asyncio.wait_for(asyncio.gather(h1.wait(), h2.wait()), 120)
    ref_a = np.sum([f(i) for i in range(world)], axis=0, dtype=np.float32)
    ref_b = np.max([g(i) for i in range(world)], axis=0)
    # A later collective reusing tag 1 works too (the failed duplicate left nothing behind).
    x = np.full(8, float(idx + 1), dtype=np.float64)
    await asyncio.wait_for(comm.all_reduce(x, tag=1), 60)
    await comm.close()
    emit(
        "result",
        dup=dup,
        h1_done_at_dup=h1_done_at_dup,
        sum_ok=bool(np.array_equal(ra, ref_a)),
        max_ok=bool(np.array_equal(rb, ref_b)),
        sends_intact=digest(a) == digest(f(idx)) and digest(b) == digest(g(idx)),
        dup_buffers_untouched=bool(np.all(c == 5.0) and np.all(rc == 0.0)),
        world=[i1.world_size, i2.world_size],
        hashes=[digest(ra), digest(rb)],
        reuse_ok=bool(np.all(x == sum(range(1, world + 1)))),
    )


def main() -> None:
    addr, p = params()
    mode = p["mode"]
    if mode == "too_few":
        mode_too_few(addr, p)
    elif mode == "bad_args":
        mode_bad_args(addr, p)
    elif mode == "tags":
        asyncio.run(mode_tags_async(addr, p))
    else:
        raise ValueError(mode)


if __name__ == "__main__":
    run(main)
