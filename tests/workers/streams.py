"""Peer worker: one all-reduce over ``streams`` streams; reports its per-stream send counters.

Params: ``idx``, ``world``, ``streams``, ``mib``. Reports the metrics snapshot's
``stream_tx_bytes_<i>`` counters, the exposition's ``pccl_comm_stream_tx_bytes_total`` samples
and the operation's own ``tx_bytes``.
"""

from __future__ import annotations

import numpy as np
from _common import emit, join, params, run
from prometheus_client.exposition import generate_latest

import pccl


def main() -> None:
    addr, p = params()
    comm = pccl.Communicator(addr, streams=p["streams"])
    join(comm, p["world"])
    x = np.full(p["mib"] << 18, float(p["idx"] + 1), dtype=np.float32)
    info = comm.all_reduce(x)
    if not np.all(x == sum(range(1, p["world"] + 1))):
        raise AssertionError("wrong sum")
    snap = comm.metrics()
    per_stream = {k: v for k, v in snap.items() if k.startswith("stream_tx_bytes_")}
    text = generate_latest(comm.metrics_registry).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("pccl_comm_stream_tx_bytes_total{")]
    emit("result", per_stream=per_stream, exposition=lines, tx_bytes=info.tx_bytes)
    comm.close()


if __name__ == "__main__":
    run(main)
