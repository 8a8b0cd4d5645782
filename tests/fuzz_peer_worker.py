"""Peer process for ``tests/test_master_robust.py``: all-reduces while the master is fuzzed.

Usage: ``python tests/fuzz_peer_worker.py MASTER_ADDR INDEX WORLD CONTROL_DIR``.

Joins a run of WORLD peers, then loops: a 1 MiB float32 SUM all-reduce whose exact result is
known (integer-valued inputs), then a one-element SUM of "stop" flags so every peer leaves after
the same iteration. After each iteration it writes ``progress-INDEX`` (the iteration count) into
CONTROL_DIR; the test creates ``fuzzing`` while it fuzzes and ``stop`` when the peers should
finish. At the end it writes ``result-INDEX.json`` (peer id, per-iteration SHA-256 of the result
bytes, iterations run while ``fuzzing`` existed) and exits 0; any error, wrong result or world-size
change writes ``error`` into the result and exits 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import pccl

N = (1 << 20) // 4  # 1 MiB of float32
MAX_SECONDS = 150.0


def make_input(it: int, idx: int) -> np.ndarray:
    # Integer-valued and < 2**24 summed over any world size used here: exact in any order.
    return ((np.arange(N, dtype=np.int64) * (idx + 1) + it * 13) % 65521).astype(np.float32)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    addr, idx, world, ctl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    out: dict[str, object] = {"index": idx, "hashes": [], "during_fuzz": 0, "iterations": 0}
    comm = pccl.Communicator(addr, streams=2)
    deadline = time.monotonic() + MAX_SECONDS
    try:
        comm.connect(timeout=60)
        comm.wait_for_world(world, timeout=max(1.0, deadline - time.monotonic()))
        if comm.world_size != world:
            raise RuntimeError(f"world size {comm.world_size}, expected {world}")
        out["peer_id"] = comm.peer_id
        write_atomic(ctl / f"progress-{idx}", "0")
        hashes: list[str] = []
        it = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no stop after {MAX_SECONDS}s")
            fuzzing = (ctl / "fuzzing").exists()
            x = make_input(it, idx)
            comm.all_reduce(x, op=pccl.ReduceOp.SUM)
            want = np.sum([make_input(it, i) for i in range(world)], axis=0, dtype=np.float32)
            if not np.array_equal(x, want):
                bad = int(np.count_nonzero(x != want))
                raise AssertionError(f"iteration {it}: {bad} wrong elements")
            if comm.world_size != world or comm.group_world_size != world:
                raise AssertionError(f"world changed to {comm.world_size} at iteration {it}")
            hashes.append(hashlib.sha256(x.tobytes()).hexdigest())
            if fuzzing:
                out["during_fuzz"] = int(out["during_fuzz"]) + 1  # type: ignore[call-overload]
            flag = np.array([1.0 if (ctl / "stop").exists() else 0.0], dtype=np.float32)
            comm.all_reduce(flag, op=pccl.ReduceOp.SUM, tag=1)
            it += 1
            write_atomic(ctl / f"progress-{idx}", str(it))
            if flag[0] > 0:
                break
        out["hashes"] = hashes
        out["iterations"] = it
        comm.close()
        rc = 0
    except BaseException as e:  # report everything, including KeyboardInterrupt from a kill
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
        rc = 1
    write_atomic(ctl / f"result-{idx}.json", json.dumps(out))
    return rc


if __name__ == "__main__":
    sys.exit(main())
