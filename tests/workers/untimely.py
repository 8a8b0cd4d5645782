"""Peer worker: untimely starts, local give-ups and lost verdicts (``tests/test_untimely.py``).

Every peer of a run of ``world`` all-reduces (SUM, in place, float32 integers so the exact sum is
known) tag 5 over ``n`` elements; peer ``late`` first sleeps ``delay`` seconds. The others retry
the tag after each ``CollectiveAborted`` (up to ``tries``), then everyone calls
``update_topology()`` and runs tag 5 once more. The result event lists every error seen (type,
message, seconds into the attempt), the peer id before and after, and the digests.

With ``rejoin`` set, a peer keeps calling ``update_topology()`` until the world is back to
``world`` (a peer whose master link was cut comes back under its id).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from _common import digest, emit, join, params, run

import pccl


def value(idx: int, n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) % 1000) * np.float32(idx + 1)


def novote(comm: pccl.Communicator, p: dict[str, Any], idx: int, world: int) -> None:
    """Peer ``late`` keeps heartbeating but calls ``update_topology()`` only after ``delay``;
    the others' votes must fail within the master's vote deadline, naming it, then succeed."""
    errors: list[dict[str, Any]] = []
    epoch0 = comm.epoch
    if idx == p["late"]:
        time.sleep(p["delay"])
        comm.update_topology(timeout=30)
    else:
        for _ in range(p.get("tries", 4)):
            t0 = time.monotonic()
            try:
                comm.update_topology(timeout=30)
                break
            except pccl.TopologyUpdateFailed as e:
                errors.append(
                    {"type": type(e).__name__, "message": str(e), "s": time.monotonic() - t0}
                )
    x = value(idx, p.get("n", 1 << 16))
    comm.all_reduce(x, tag=1)
    emit(
        "result",
        errors=errors,
        new_epoch=comm.epoch > epoch0,
        second=digest(x),
        exact=digest(sum(value(i, p.get("n", 1 << 16)) for i in range(world))),
        peer_id=comm.peer_id,
    )
    comm.close()


def main() -> None:
    addr, p = params()
    world, idx, n = p["world"], p["idx"], p.get("n", 1 << 16)
    late, delay, tries = p.get("late", -1), p.get("delay", 0.0), p.get("tries", 4)
    comm = pccl.Communicator(addr, streams=2)
    join(comm, world, timeout=60)
    pid0 = comm.peer_id
    emit("ready", peer_id=pid0)
    if p.get("mode") == "novote":
        novote(comm, p, idx, world)
        return
    x = value(idx, n)
    errors: list[dict[str, Any]] = []
    if idx == late:
        time.sleep(delay)
    ok = False
    for _ in range(tries):
        x[:] = value(idx, n)
        t0 = time.monotonic()
        try:
            comm.all_reduce(x, tag=5)
            ok = True
            break
        except pccl.CollectiveAborted as e:
            errors.append({"type": type(e).__name__, "message": str(e), "s": time.monotonic() - t0})
            if digest(x) != digest(value(idx, n)):
                raise AssertionError("input not restored after an abort") from e
    emit("first", ok=ok)
    first = digest(x)
    # The step boundary: every peer calls update_topology() once (a peer re-admitted after a
    # lost link returns at once: the others' call re-formed the ring with it); with ``rejoin``
    # the survivor keeps calling until the cut peer is back.
    comm.update_topology(timeout=30)
    deadline = time.monotonic() + 60
    while p.get("rejoin") and comm.world_size < world and time.monotonic() < deadline:
        time.sleep(0.05)
        comm.update_topology(timeout=30)
    x[:] = value(idx, n)
    comm.all_reduce(x, tag=5)
    expect = sum(value(i, n) for i in range(world))
    emit(
        "result",
        ok=ok,
        errors=errors,
        first=first,
        second=digest(x),
        exact=digest(expect),
        peer_id_before=pid0,
        peer_id_after=comm.peer_id,
        world=comm.world_size,
    )
    comm.close()


if __name__ == "__main__":
    run(main)
