"""Peer worker: a shared-state sync whose transfer is large enough to report progress.

Params: ``world`` (peers of the run), ``mib`` (one float32 entry of this size), ``revision``
and ``seed`` (the entry's content: the holder of the higher revision is the source, the other
peer is the joiner that receives every byte). Logging goes to stderr at INFO, as an application
that configures ``logging`` would see it. Result: the ``SyncInfo`` bytes and a digest of the
entry after the sync.
"""

from __future__ import annotations

import logging

import numpy as np
from _common import digest, emit, join, params, run

import pccl


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    addr, p = params()
    w = np.full(int(p["mib"]) << 18, float(p["seed"]), dtype=np.float32)
    state = pccl.SharedState({"w": w}, revision=int(p["revision"]))
    comm = pccl.Communicator(addr)
    join(comm, int(p["world"]))
    emit("joined", peer_id=comm.peer_id)
    info = comm.sync_shared_state(state, timeout=60.0)
    emit("result", rx=info.rx_bytes, tx=info.tx_bytes, revision=state.revision, digest=digest(w))
    comm.close()


if __name__ == "__main__":
    run(main)
