#!/usr/bin/env python3
"""The smallest complete pccl peer: the training-loop pattern every real job follows.

Reads its master from ``PCCL_MASTER`` (set by ``deploy/local-cluster``) or ``argv[1]``. Each
step: ``update_topology()`` (admit newcomers, drop the departed), ``sync_shared_state()`` (a
newcomer receives the weights here; everyone else transfers nothing), an all-reduce of the
"gradient", a deterministic update, and ``revision += 1``. A retryable error sends the loop back
to the top with the weights untouched, so every peer keeps making the same calls in the same
order. Prints one line per step with the state hash, which is identical on every peer.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import pccl


def main() -> int:
    master = os.environ.get("PCCL_MASTER") or (sys.argv[1] if len(sys.argv) > 1 else "")
    if not master:
        print("usage: example_peer.py HOST:PORT (or set PCCL_MASTER)", file=sys.stderr)
        return 2
    steps = int(os.environ.get("PCCL_EXAMPLE_STEPS", "50"))
    token = os.environ.get("PCCL_AUTH_TOKEN") or None
    weights = np.zeros(1 << 20, dtype=np.float32)
    state = pccl.SharedState({"weights": weights}, revision=0)
    comm = pccl.Communicator(master, streams=4, auth_token=token)
    comm.connect(timeout=60)
    first = True  # the update that admitted us is the current epoch: skip it once
    deadline = time.monotonic() + 600
    with comm:
        while state.revision < steps and time.monotonic() < deadline:
            try:
                if not first or comm.world_size < 2:
                    comm.update_topology(timeout=60)
                first = False
                if comm.world_size < 2:
                    time.sleep(0.2)  # alone: wait for someone to average with
                    continue
                comm.sync_shared_state(state, timeout=60)
                rng = np.random.default_rng([state.revision, comm.peer_id])
                grad = rng.standard_normal(weights.size, dtype=np.float32)
                comm.all_reduce(grad, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization.UINT8)
            except (pccl.CollectiveAborted, pccl.TopologyUpdateFailed, pccl.SharedStateError):
                continue  # a peer left or hung: weights untouched, start the step again
            except pccl.TooFewPeers:
                continue
            weights -= np.float32(0.01) * grad
            state.revision += 1
            digest = state.hashes()["weights"][:16]
            print(
                f"peer {comm.peer_id}: revision {state.revision} world {comm.world_size} "
                f"state {digest}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
