"""Start a local ``pccl master`` subprocess and read the address it announces.

Shared by the demo, the examples and the benchmarks' launchers. The banner is read with a
deadline, so a master that hangs before binding fails the launcher instead of blocking it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

__all__ = ["spawn_master"]


def spawn_master(
    log_level: str = "warning",
    *,
    host: str = "127.0.0.1",
    extra_args: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[str], str]:
    """Start ``pccl master --port 0`` in its own session; return (process, "host:port").

    Raises:
        RuntimeError: no ``listening on`` banner within ``timeout`` (the process is killed).
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pccl.cli",
            "master",
            "--host",
            host,
            "--port",
            "0",
            "--log-level",
            log_level,
            *extra_args,
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"master did not announce its port in {timeout}s: {buf!r}")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if "listening on" not in line:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"master did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()
