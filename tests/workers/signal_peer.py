"""Peer worker for the signal tests: all-reduces in a loop until told to stop or signalled.

``params``: ``world`` (peers to wait for), ``rounds`` (successful all-reduces before it exits
on its own). It retries aborted operations after ``update_topology()`` and reports every
success with the world size, so the test sees when the survivors carried on. SIGTERM and
SIGINT are left at Python's defaults: ``pccl.Communicator`` then leaves the run cleanly
before the signal takes effect (SIGTERM terminates; SIGINT raises KeyboardInterrupt, which
this worker turns into exit code 130 with an ``interrupted`` event).
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np
from _common import emit, join, params

import pccl


def main() -> None:
    addr, p = params()
    comm = pccl.Communicator(addr)
    join(comm, int(p["world"]))
    emit("joined", peer_id=comm.peer_id, world=comm.world_size)
    buf = np.ones(1 << 16, dtype=np.float32)
    done = 0
    while done < int(p["rounds"]):
        try:
            comm.all_reduce(buf, tag=1)
        except pccl.CollectiveAborted as e:
            emit("aborted", reason=str(e))
            comm.update_topology()
            continue
        except pccl.TooFewPeers:
            emit("alone")
            break
        done += 1
        buf.fill(1.0)
        emit("reduced", n=done, world=comm.group_world_size)
    emit("result", reduced=done)
    comm.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        emit("interrupted")
        sys.stdout.flush()
        os._exit(130)
    except BaseException as e:
        emit("error", type=type(e).__name__, message=str(e), traceback=traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)
    sys.exit(0)
