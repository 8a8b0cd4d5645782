"""Peer worker: the key-value channel from a separate process.

Params: ``group``; ``reads``: keys (run scope) to read once connected, reported as
``{"event": "read", "values": {key: str | None}}``; ``wait``: a key to wait for (``wait_s``),
reported as ``{"event": "waited", "value": ..., "seconds": ...}``; ``set``: ``{key: value}`` to
store after the wait, reported with their versions. Prints ``ready`` once connected.
"""

from __future__ import annotations

import time

from _common import emit, params, run

import pccl


def main() -> None:
    addr, p = params()
    with pccl.Communicator(addr, peer_group=p.get("group", 0)) as comm:
        comm.connect(timeout=30)
        emit("ready", peer_id=comm.peer_id)
        if p.get("reads"):
            got = {k: comm.kv_get(k) for k in p["reads"]}
            emit("read", values={k: None if v is None else v.decode() for k, v in got.items()})
        if p.get("wait"):
            t0 = time.monotonic()
            value = comm.kv_wait(p["wait"], timeout=p["wait_s"])
            emit("waited", value=value.decode(), seconds=time.monotonic() - t0)
        versions = {k: comm.kv_set(k, v) for k, v in p.get("set", {}).items()}
        emit("result", versions=versions)


if __name__ == "__main__":
    run(main)
