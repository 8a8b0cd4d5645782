"""Peer worker for joins: loop ``update_topology() -> all_reduce`` until a newcomer is in.

Incumbents (``newcomer`` false) form a run of ``world`` peers, then loop. Each iteration agrees
on the step number (MAX all-reduce: a newcomer adopts the run's step), all-reduces a buffer whose
content depends on (step, peer index) and checks the result against the exact sum over the
peers present (indices 0..world_size-1; integer-valued float32, so exact in any order). A
newcomer connects while the others loop and is admitted at their next ``update_topology()``; its
first iteration skips the update, since the one that admitted it is the same epoch. Everyone stops
after ``after_join`` iterations at ``final`` peers, so all make the same calls.
"""

from __future__ import annotations

import time

import numpy as np
from _common import digest, emit, join, params, run

import pccl


def make_input(step: int, i: int, n: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) * (i + 3) + step * 7) % 4099).astype(np.float32)


def main() -> None:
    addr, p = params()
    idx, n, final = p["idx"], p["n"], p["final"]
    comm = pccl.Communicator(addr, streams=2)
    if p["newcomer"]:
        emit("connecting")
        comm.connect(timeout=60)
        emit("joined", peer_id=comm.peer_id, world=comm.world_size)
    else:
        join(comm, p["world"])
    first = True
    step = 0
    at_final = 0
    deadline = time.monotonic() + p["max_seconds"]
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"world never reached {final} (last {comm.world_size})")
        if not first:
            comm.update_topology(timeout=60)
        first = False
        agreed = np.array([step], dtype=np.int64)
        comm.all_reduce(agreed, op=pccl.ReduceOp.MAX)
        step = int(agreed[0])
        world = comm.world_size
        x = make_input(step, idx, n)
        out = np.zeros_like(x)
        info = comm.all_reduce(x, out)
        expected = np.sum([make_input(step, i, n) for i in range(world)], axis=0, dtype=np.float32)
        emit(
            "step",
            step=step,
            world=world,
            info_world=info.world_size,
            peer_id=comm.peer_id,
            ok=bool(np.array_equal(out, expected)),
            hash=digest(out),
        )
        if world == final:
            at_final += 1
            if at_final >= p["after_join"]:
                break
        step += 1
    comm.close()
    emit("result", last_step=step, world=comm.world_size)


if __name__ == "__main__":
    run(main)
