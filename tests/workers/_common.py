"""Helpers shared by the peer worker scripts (run as real processes by ``tests/conftest.py``).

A worker is started as ``python tests/workers/<script>.py MASTER_ADDR JSON_PARAMS`` and speaks one
JSON object per stdout line: progress events, then ``{"event": "result", ...}``. An uncaught
exception becomes ``{"event": "error", ...}`` and exit code 1, so the test sees why.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def params() -> tuple[str, dict[str, Any]]:
    return sys.argv[1], json.loads(sys.argv[2])


def digest(buf: Any) -> str:
    """XXH3-128 of the raw bytes of a numpy array or CPU torch tensor."""
    if not isinstance(buf, np.ndarray):
        import torch

        if buf.dtype == torch.bfloat16:
            buf = buf.view(torch.int16)
        buf = buf.numpy()
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(buf).view(np.uint8).tobytes())


def join(comm: Any, expected: int, timeout: float = 60.0) -> None:
    """Connect, then take part in topology updates until ``expected`` peers are in the run.

    Every accepted peer must vote in an update for it to complete; peers of one run leave this
    loop at the same epoch because they all see the same world size.
    """
    comm.connect(timeout=timeout)
    comm.wait_for_world(expected, timeout=timeout)
    if comm.world_size != expected:
        raise RuntimeError(f"world size {comm.world_size}, expected {expected}")


def run(main: Callable[[], None]) -> None:
    """Run ``main``; on any exception report it and exit 1 at once.

    ``os._exit`` on failure: a communicator left open must not keep a failed worker alive
    (interpreter shutdown with an open blocking Communicator is tested on its own).
    """
    try:
        main()
    except BaseException as e:
        emit("error", type=type(e).__name__, message=str(e), traceback=traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(0)
