"""One DiLoCo peer for the end-to-end tests: the worker of ``examples/diloco_charlm.py``.

Started by ``tests/conftest.py``'s ``workers`` fixture as ``python diloco_peer.py MASTER JSON``;
the parameters are those of :func:`diloco_charlm.run_worker`. It prints one JSON event per line
(``gated``, ``joined``, ``outer`` per boundary, ``flushed``, ``result``); an uncaught exception
becomes ``{"event": "error"}`` and exit code 1, so the test sees why.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def main() -> None:
    from pccl.tools.diloco_charlm import run_worker

    run_worker(sys.argv[1], json.loads(sys.argv[2]), emit)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:
        emit("error", type=type(e).__name__, message=str(e), traceback=traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # an open communicator must not keep a failed worker alive
    sys.exit(0)
