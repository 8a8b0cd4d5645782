"""Peer worker that returns with a blocking Communicator still open (no ``close()``).

Modes: ``connected`` (a lone peer admitted by the master) or ``unreachable`` (after ``connect()``
to ``params["address"]``, where nothing listens, raised ``MasterUnreachable``).

With ``slow_exit``, a C-level exit handler reads one byte from stdin. It runs after the
interpreter has been finalised (C exit handlers run after ``Py_FinalizeEx``, newest first), so
the process lingers in the state a slow native exit leaves it in (torch's static destructors
take tens of milliseconds there) until the parent closes stdin. Any thread that still runs
Python code in that window crashes the process; a clean library has none left.

Deliberately does not import torch (its finalisation is slow and hides the window).
"""

from __future__ import annotations

import ctypes
from typing import Any

from _common import emit, params, run

import pccl

# Module-level on purpose: released at interpreter shutdown, not when main() returns.
_left_open: list[Any] = []


def main() -> None:
    addr, p = params()
    if p["mode"] == "connected":
        comm = pccl.Communicator(addr)
        _left_open.append(comm)
        comm.connect(timeout=30)
        info: dict[str, Any] = {"world": comm.world_size}
    else:
        comm = pccl.Communicator(p["address"])
        _left_open.append(comm)
        try:
            comm.connect(timeout=5)
        except pccl.MasterUnreachable as e:
            info = {"raised": type(e).__name__}
        else:
            raise AssertionError("connect() to a closed port succeeded")
    if p.get("slow_exit"):
        libc = ctypes.CDLL(None)
        libc.__cxa_atexit(libc.getchar, None, None)
    emit("result", **info)


if __name__ == "__main__":
    run(main)
