"""A user command for ``pccl chaos --cmd`` tests whose replicas diverge on purpose.

Configured like any command ``pccl chaos --cmd`` starts (``PCCL_MASTER``, ``PCCL_PEER_INDEX``,
``PCCL_NUM_PEERS``): the peers sync a small shared state every 0.1 s, bumping the revision by
one each time; the peer with index 1 flips one value at its 10th sync, so the master must see
a vote at the elected revision with other bytes (a parity violation). Runs until terminated.
"""

from __future__ import annotations

import os
import time

import numpy as np

import pccl


def main() -> None:
    index = int(os.environ["PCCL_PEER_INDEX"])
    comm = pccl.Communicator()
    comm.connect(timeout=60)
    comm.wait_for_world(int(os.environ["PCCL_NUM_PEERS"]), timeout=60)
    w = np.arange(1024, dtype=np.float32)
    state = pccl.SharedState({"w": w}, revision=0)
    n = 0
    while True:
        n += 1
        if n == 10 and index == 1:
            w[3] += 1.0
        comm.sync_shared_state(state)
        state.revision += 1
        time.sleep(0.1)


if __name__ == "__main__":
    main()
