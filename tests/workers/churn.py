"""Peer worker for fault injection: one large all-reduce that the test breaks, then a retry.

Every peer of a run of ``world`` prints ``ready`` right before a ``mib`` MiB float32 SUM
all-reduce. The victim (``idx == victim``) also prints ``progress`` as soon as its ring
operation has received payload bytes, so the test can kill or stop it while data is moving.
Survivors expect ``CollectiveAborted``: they report when it arrived, whether their input is
intact (restored bit-exactly when in place), then ``update_topology()`` until the run has
``world - 1`` peers and retry the same all-reduce, reporting its digest and exactness (a
lone survivor reports what its retry raised instead).

Inputs are integer-valued float32, so every sum is exact in any order and the retry's result
must equal the sum over the survivors exactly.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from _common import digest, emit, join, params, run

import pccl


def make_input(i: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([4242, i])
    return rng.integers(-1000, 1000, size=n).astype(np.float32)


def watch_progress(comm: pccl.Communicator, stop: threading.Event) -> None:
    """Print ``progress`` once a ring operation of ours has received payload (test probe).

    Reads the peer's operation registry from this thread; only a probe for timing the fault.
    """
    node = comm.aio._node
    while not stop.is_set():
        for op in list(node.ops.values()):
            rx = op.rx_bytes
            if rx > 0:
                emit("progress", rx_bytes=rx, total_bytes=op.n * 4)
                return
        time.sleep(0.001)


def main() -> None:
    addr, p = params()
    world, idx, victim, inplace = p["world"], p["idx"], p["victim"], p["inplace"]
    n = p["mib"] * (1 << 20) // 4
    # Every stream opened even on loopback (local_streams=0): the kill lands mid-stripe.
    cfg = pccl.Config(**{"local_streams": 0, **p.get("config", {})})
    comm = pccl.Communicator(addr, streams=p.get("streams", 4), config=cfg)
    join(comm, world)
    x = make_input(idx, n)
    original = digest(x)
    out: Any = None if inplace else np.zeros_like(x)
    stop = threading.Event()
    if idx == victim:
        threading.Thread(target=watch_progress, args=(comm, stop), daemon=True).start()
    emit("ready", peer_id=comm.peer_id, world=comm.world_size)
    try:
        comm.all_reduce(x, out)
    except pccl.CollectiveAborted as e:
        t_abort = time.monotonic()
        emit(
            "aborted",
            t_abort=t_abort,
            error=str(e),
            error_type=type(e).__name__,
            intact=digest(x) == original,
        )
    else:
        stop.set()
        emit("completed_despite_fault", peer_id=comm.peer_id)
        comm.close()
        emit("result", first_completed=True)
        return
    deadline = time.monotonic() + 60
    comm.update_topology(timeout=60)
    while comm.world_size != world - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"world size stuck at {comm.world_size}")
        comm.update_topology(timeout=60)
    survivors = [i for i in range(world) if i != victim]
    retry_out: Any = None if inplace else np.zeros_like(x)
    if len(survivors) < 2:  # a lone survivor cannot all-reduce
        raised: str | None = None
        try:
            comm.all_reduce(x, retry_out)
        except pccl.PCCLError as e:
            raised = type(e).__name__
        emit(
            "result",
            first_completed=False,
            world=comm.world_size,
            retry_raised=raised,
            send_intact_after_retry=digest(x) == original,
        )
        comm.close()
        return
    info = comm.all_reduce(x, retry_out)
    result = x if inplace else retry_out
    expected = np.sum([make_input(i, n) for i in survivors], axis=0, dtype=np.float32)
    emit(
        "result",
        first_completed=False,
        world=comm.world_size,
        info_world=info.world_size,
        exact=bool(np.array_equal(result, expected)),
        hash=digest(result),
        send_intact_after_retry=inplace or digest(x) == original,
    )
    comm.close()


if __name__ == "__main__":
    run(main)
