"""Peer worker for master restarts: a training-like loop that must survive the master dying.

Each step: ``update_topology()`` (blocks while the master is away and the peer reconnects),
``sync_shared_state`` (revision bumped by exactly 1 per step after the first), an all-reduce of
a gradient derived from (step, peer), and a deterministic update of the state from the result.
Retryable errors (``CollectiveAborted``, ``SharedStateError``) repeat the step. Emits
``{"event": "step", step, revision, hash, world, rx}`` per completed step.
"""

from __future__ import annotations

import time

import numpy as np
from _common import digest, emit, join, params, run

import pccl


def main() -> None:
    addr, p = params()
    comm = pccl.Communicator(addr, streams=2)
    join(comm, p["world"])
    w = np.zeros(p["n"], dtype=np.float32)
    step_arr = np.zeros(1, dtype=np.int64)
    state = pccl.SharedState({"w": w, "step": step_arr}, revision=0)
    grad = np.empty_like(w)
    first = True
    deadline = time.monotonic() + p["max_seconds"]
    retries = 0
    while int(step_arr[0]) < p["steps"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {int(step_arr[0])} steps in {p['max_seconds']}s")
        try:
            if not first:
                comm.update_topology(timeout=60)
            info = comm.sync_shared_state(state)
            first = False
            step = int(step_arr[0])
            grad[:] = np.float32(step % 5 + comm.peer_id % 3)
            comm.all_reduce(grad, op=pccl.ReduceOp.AVG)
        except (pccl.CollectiveAborted, pccl.SharedStateError, pccl.TooFewPeers) as e:
            retries += 1
            emit("retry", error=type(e).__name__, message=str(e)[:200])
            continue
        w -= np.float32(0.01) * grad
        step_arr[0] = step + 1
        emit(
            "step",
            step=step,
            revision=state.revision,
            hash=digest(w) + digest(step_arr),
            world=comm.world_size,
            rx=info.rx_bytes,
        )
        state.revision += 1
        time.sleep(p.get("pause_s", 0.0))
    emit("result", retries=retries, revision=state.revision, hash=digest(w))
    comm.close()


if __name__ == "__main__":
    run(main)
