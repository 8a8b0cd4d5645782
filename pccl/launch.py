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
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

__all__ = ["spawn_master", "spawn_master_with_status"]


def spawn_master(
    log_level: str | None = "warning",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_args: Sequence[str] = (),
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stderr: IO[Any] | int | None = None,
    preexec_fn: Callable[[], object] | None = None,
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[str], str]:
    """Start ``pccl master`` in its own session; return (process, "host:port").

    Args:
        log_level: ``--log-level`` (None: the daemon's default).
        host, port: where it listens (port 0: any free port, read back from the banner).
        extra_args: more ``pccl master`` arguments (``--token-file``, ``--tls-*``...).
        prefix: argv run in front, e.g. ``ip netns exec NS`` to start it in a namespace.
        env, stderr, preexec_fn: passed to :class:`subprocess.Popen` (``preexec_fn``: e.g. a
            parent-death signal, so a SIGKILLed launcher leaves no master behind).

    Raises:
        RuntimeError: no well-formed ``listening on`` banner within ``timeout`` (the process
            is killed).
    """
    proc, lines = _spawn(
        log_level, host, port, extra_args, prefix, env, stderr, preexec_fn, timeout, 1
    )
    return proc, _address(proc, lines[0], "listening on", host)


def spawn_master_with_status(
    log_level: str | None = "warning",
    *,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stderr: IO[Any] | int | None = None,
    preexec_fn: Callable[[], object] | None = None,
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[str], str, str]:
    """As :func:`spawn_master` on free ports, with the status endpoint on ``host`` too;
    returns (process, "host:port", "host:status_port") from the two banner lines."""
    args = [*extra_args, "--status-port", "0", "--status-host", host]
    proc, lines = _spawn(log_level, host, 0, args, (), env, stderr, preexec_fn, timeout, 2)
    return (
        proc,
        _address(proc, lines[0], "listening on", host),
        _address(proc, lines[1], "status on", host),
    )


def _spawn(
    log_level: str | None,
    host: str,
    port: int,
    extra_args: Sequence[str],
    prefix: Sequence[str],
    env: Mapping[str, str] | None,
    stderr: IO[Any] | int | None,
    preexec_fn: Callable[[], object] | None,
    timeout: float,
    lines: int,
) -> tuple[subprocess.Popen[str], list[str]]:
    argv = [sys.executable, "-m", "pccl.cli", "master", "--host", host, "--port", str(port)]
    if log_level is not None:
        argv += ["--log-level", log_level]
    proc = subprocess.Popen(
        [*prefix, *argv, *extra_args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=None if env is None else dict(env),
        preexec_fn=preexec_fn,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < lines:
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"master did not announce its port in {timeout}s: {buf!r}")
        buf += chunk
    return proc, [x.decode(errors="replace") for x in buf.split(b"\n")[:lines]]


def _address(proc: subprocess.Popen[str], line: str, what: str, host: str) -> str:
    addr = line.rsplit(" ", 1)[-1].strip()
    got_host, _, got_port = addr.rpartition(":")
    if what not in line or got_host != host or not got_port.isdigit():
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"unexpected master banner {line!r}")
    return addr
