"""Peer worker for a frozen machine: join, say ``ready``, wait for ``go`` on stdin (the test
stops and resumes every process meanwhile), then all-reduce and report.

Params: ``world``, ``n``.
"""

from __future__ import annotations

import sys

import numpy as np
from _common import digest, emit, join, params, run

import pccl


def main() -> None:
    addr, p = params()
    comm = pccl.Communicator(addr)
    join(comm, p["world"])
    emit("ready", peer_id=comm.peer_id)
    if sys.stdin.readline().strip() != "go":
        raise RuntimeError("expected 'go' on stdin")
    x = np.arange(p["n"], dtype=np.float32)
    comm.all_reduce(x)
    ok = bool(np.array_equal(x, np.arange(p["n"], dtype=np.float32) * p["world"]))
    emit("result", peer_id=comm.peer_id, world=comm.world_size, ok=ok, digest=digest(x))
    comm.close()


if __name__ == "__main__":
    run(main)
