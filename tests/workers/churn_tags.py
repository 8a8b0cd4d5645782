"""Peer worker: a peer dies while two tagged all-reduces are in flight at once.

Every peer of a run of ``world`` starts, with the blocking API's ``all_reduce_async``, tag 1
(float32 SUM) and tag 2 (float32 MAX), both in place over ``mib`` MiB each, then waits for
both. The victim (the last index) prints ``progress`` once either operation has received payload
(see ``churn.watch_progress``). Survivors expect ``CollectiveAborted`` from *both* handles with
both buffers restored bit-exactly, then ``update_topology()`` down to ``world - 1`` peers and
run both again concurrently; the results must equal the survivors' exact SUM and MAX
(integer-valued float32).
"""

from __future__ import annotations

import threading
import time

import numpy as np
from _common import digest, emit, join, params, run
from churn import watch_progress
from pccl.peer.blocking import ReduceFuture

import pccl

OPS = {1: pccl.ReduceOp.SUM, 2: pccl.ReduceOp.MAX}


def make_input(i: int, tag: int, n: int) -> np.ndarray:
    return np.random.default_rng([77, i, tag]).integers(-1000, 1000, size=n).astype(np.float32)


def start_both(comm: pccl.Communicator, xs: dict[int, np.ndarray]) -> dict[int, ReduceFuture]:
    return {tag: comm.all_reduce_async(xs[tag], op=op, tag=tag) for tag, op in OPS.items()}


def main() -> None:
    addr, p = params()
    world, idx = p["world"], p["idx"]
    victim = world - 1
    n = p["mib"] * (1 << 20) // 4
    comm = pccl.Communicator(addr, streams=2)
    join(comm, world)
    xs = {tag: make_input(idx, tag, n) for tag in OPS}
    originals = {tag: digest(x) for tag, x in xs.items()}
    if idx == victim:
        threading.Thread(target=watch_progress, args=(comm, threading.Event()), daemon=True).start()
    emit("ready", peer_id=comm.peer_id)
    handles = start_both(comm, xs)
    outcome: dict[str, str] = {}
    t_abort: dict[str, float] = {}
    for tag, h in handles.items():
        try:
            h.wait(120)
            outcome[str(tag)] = "ok"
        except pccl.PCCLError as e:
            outcome[str(tag)] = type(e).__name__
            t_abort[str(tag)] = time.monotonic()
    intact = {str(tag): digest(xs[tag]) == originals[tag] for tag in OPS}
    emit("aborted", outcome=outcome, t_abort=t_abort, intact=intact)
    if "ok" in outcome.values():
        comm.close()
        emit("result", first_completed=True)
        return
    deadline = time.monotonic() + 60
    while True:
        comm.update_topology(timeout=60)
        if comm.world_size == world - 1:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"world size stuck at {comm.world_size}")
    infos = {tag: h.wait(120) for tag, h in start_both(comm, xs).items()}
    survivors = [i for i in range(world) if i != victim]
    exact = {
        "1": bool(np.array_equal(xs[1], np.sum([make_input(i, 1, n) for i in survivors], axis=0))),
        "2": bool(np.array_equal(xs[2], np.max([make_input(i, 2, n) for i in survivors], axis=0))),
    }
    comm.close()
    emit(
        "result",
        first_completed=False,
        exact=exact,
        worlds=[info.world_size for info in infos.values()],
        hashes=[digest(xs[1]), digest(xs[2])],
    )


if __name__ == "__main__":
    run(main)
