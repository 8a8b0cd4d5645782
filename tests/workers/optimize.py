"""Peer worker for ``optimize_topology()``: all-reduce, optimise the ring, all-reduce again.

Params: ``idx``, ``world``, ``n`` (elements), ``min_gain`` (negative: any different order is
taken), ``reprobe``; ``tries``: call it until it re-orders, at most this often; ``victim``: this
peer sends its optimize vote and then exits at once (hard), so the others' optimisation meets a
departure. Inputs are integer-valued float32, so every sum is exact in any ring order: each
result is checked against the exact sum and reported by digest. Survivors of a victim expect a
retryable ``TopologyUpdateFailed``, then ``update_topology()`` until ``world - 1`` peers and an
all-reduce.
"""

from __future__ import annotations

import os
import time

import numpy as np
from _common import digest, emit, join, params, run

import pccl
from pccl import messages as m


def make_input(i: int, n: int, step: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) * (i + 3) + step * 11) % 4099).astype(np.float32)


def reduce_and_check(comm: pccl.Communicator, idx: list[int], me: int, n: int, step: int) -> str:
    x = make_input(me, n, step)
    out = np.zeros_like(x)
    comm.all_reduce(x, out)
    want = np.sum([make_input(i, n, step) for i in idx], axis=0, dtype=np.float32)
    if not np.array_equal(out, want):
        raise AssertionError(f"step {step}: result differs from the exact sum")
    return digest(out)


def ring(comm: pccl.Communicator) -> list[int]:
    return [pid for pid, _, _ in comm.aio._session.ring]


def main() -> None:
    addr, p = params()
    me, world, n = p["idx"], p["world"], p["n"]
    comm = pccl.Communicator(addr, streams=2)
    join(comm, world)
    everyone = list(range(world))
    before = reduce_and_check(comm, everyone, me, n, 0)
    emit("before", digest=before, ring=ring(comm), peer_id=comm.peer_id)
    if p.get("victim"):
        comm.aio._session.send(m.OptimizeTopology(p["min_gain"], p["reprobe"]))
        time.sleep(0.05)  # the vote leaves; then a hard exit (connections reset)
        os._exit(0)
    if p.get("auto"):  # auto_optimize_topology: the admitting update already ordered the ring
        emit(
            "result",
            failed=False,
            rewired=False,
            tries=0,
            ring=ring(comm),
            digest=before,
            optimize_s=0.0,
            probed=comm.aio._prober.rounds,
            links=len(comm.aio._prober.results),
        )
        comm.close()
        return
    t0 = time.monotonic()
    try:
        # Every peer sees the same outcome, so all make the same number of calls.
        tries = 0
        while tries < p.get("tries", 1):
            tries += 1
            rewired = comm.optimize_topology(
                timeout=60, min_gain=p["min_gain"], reprobe=p["reprobe"]
            )
            if rewired:
                break
    except pccl.TopologyUpdateFailed as e:
        emit("optimize_failed", retryable=e.retryable, reason=str(e), s=time.monotonic() - t0)
        survivors = [i for i in everyone if i != p["victim_idx"]]
        deadline = time.monotonic() + 60
        while comm.world_size != len(survivors):
            if time.monotonic() > deadline:
                raise TimeoutError("the survivors never re-formed") from None
            try:
                comm.update_topology(timeout=30)
            except pccl.TopologyUpdateFailed:
                continue
        after = reduce_and_check(comm, survivors, me, n, 1)
        emit("result", failed=True, digest=after, ring=ring(comm))
        return
    optimize_s = time.monotonic() - t0
    after = reduce_and_check(comm, everyone, me, n, 1)
    emit(
        "result",
        failed=False,
        rewired=rewired,
        tries=tries,
        ring=ring(comm),
        digest=after,
        optimize_s=optimize_s,
        probed=comm.aio._prober.rounds,
        links=len(comm.aio._prober.results),
    )
    comm.close()


if __name__ == "__main__":
    run(main)
