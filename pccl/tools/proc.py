"""The process toolkit every tool shares: start the master and read its banner, tie children
to their parent's life, signal and stop them, read their output with deadlines.

Banners are read with a deadline, so a master that hangs before binding fails the launcher
instead of blocking it. Nothing else in the repository spawns, kills or reads banners by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "PREEXEC",
    "die_with_parent",
    "exit_if_orphaned",
    "listening_ports",
    "master_banner",
    "read_banner",
    "read_line",
    "read_lines",
    "run_subcommand",
    "send_signal",
    "spawn_master",
    "spawn_master_with_status",
    "stop",
    "tail",
]


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
    proc = _spawn(log_level, host, port, extra_args, prefix, env, stderr, preexec_fn)
    try:
        return proc, master_banner(proc, host, timeout)[0]
    except RuntimeError:
        proc.kill()
        proc.wait(10)
        raise


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
    proc = _spawn(log_level, host, 0, args, (), env, stderr, preexec_fn)
    try:
        addr, status = master_banner(proc, host, timeout, status=True)
    except RuntimeError:
        proc.kill()
        proc.wait(10)
        raise
    assert status is not None
    return proc, addr, status


def master_banner(
    proc: subprocess.Popen[Any], host: str, timeout: float, *, status: bool = False
) -> tuple[str, str | None]:
    """Read a starting master's banner (``pccl master listening on HOST:PORT``, then with
    ``status`` its ``status on HOST:PORT`` line) from ``proc``'s stdout; returns
    ("host:port", "host:status_port" or None).

    Raises:
        RuntimeError: no well-formed banner within ``timeout`` (the process is left running).
    """
    lines = read_banner(proc, 2 if status else 1, timeout)
    addr = _address(lines[0], "listening on", host)
    return addr, _address(lines[1], "status on", host) if status else None


def read_banner(proc: subprocess.Popen[Any], n: int, timeout: float) -> list[str]:
    """The first ``n`` stdout lines of ``proc`` (stripped).

    Raises:
        RuntimeError: fewer within ``timeout``, or the process closed its stdout first.
    """
    assert proc.stdout is not None
    lines = read_lines(proc.stdout.fileno(), n, timeout)
    if len(lines) < n:
        raise RuntimeError(f"no banner within {timeout}s (got {lines!r})")
    return [x.strip() for x in lines]


def _spawn(
    log_level: str | None,
    host: str,
    port: int,
    extra_args: Sequence[str],
    prefix: Sequence[str],
    env: Mapping[str, str] | None,
    stderr: IO[Any] | int | None,
    preexec_fn: Callable[[], object] | None,
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "pccl.cli", "master", "--host", host, "--port", str(port)]
    if log_level is not None:
        argv += ["--log-level", log_level]
    return subprocess.Popen(
        [*prefix, *argv, *extra_args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=None if env is None else dict(env),
        preexec_fn=preexec_fn,
        text=True,
        start_new_session=True,
    )


def _address(line: str, what: str, host: str) -> str:
    addr = line.rsplit(" ", 1)[-1].strip()
    got_host, _, got_port = addr.rpartition(":")
    if what not in line or got_host != host or not got_port.isdigit():
        raise RuntimeError(f"unexpected master banner {line!r}")
    return addr


def run_subcommand(
    add_arguments: Callable[[argparse._SubParsersAction], None], name: str, argv: Sequence[str]
) -> int:
    """``python -m pccl.tools.X ARGS``: run tool sub-command ``name`` as ``pccl NAME ARGS``
    does, from the tool's own ``add_arguments`` (tools never import the CLI that lists them)."""
    p = argparse.ArgumentParser(prog=f"pccl {name}")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_arguments(sub)
    args = p.parse_args([name, *argv])
    return int(args.func(args) or 0)


# ------------------------------------------------------------------ children and signals


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """``preexec_fn`` of a child: it gets SIGKILL when its parent dies (Linux
    ``PR_SET_PDEATHSIG``), set before it execs, so a child that is stopped or still starting
    when the parent is SIGKILLed dies with it too. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


#: ``preexec_fn`` for every child of a tool (None off Linux).
PREEXEC: Callable[[], None] | None = die_with_parent if sys.platform.startswith("linux") else None


def exit_if_orphaned(parent: int) -> None:
    """In a child started with :func:`die_with_parent`: exit at once if ``parent`` is already
    gone (it died before the signal was armed)."""
    die_with_parent()
    if os.getppid() != parent:
        os._exit(0)


def send_signal(proc: subprocess.Popen[Any], sig: int) -> None:
    """``proc.send_signal(sig)`` unless it has exited (no error for a process just gone)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def stop(proc: subprocess.Popen[Any], grace_s: float = 0.0, *, group: bool = False) -> None:
    """SIGTERM (after SIGCONT: works on stopped ones) then SIGKILL after ``grace_s``, or SIGKILL
    at once; reap. ``group``: signal the child's whole process group (it was started with
    ``start_new_session=True``)."""

    def sig(s: int) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, s)
            else:
                proc.send_signal(s)

    if grace_s > 0:
        sig(signal.SIGCONT)
        sig(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    sig(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """First stdout line of ``proc`` within ``timeout`` ('' on EOF or timeout)."""
    assert proc.stdout is not None
    lines = read_lines(proc.stdout.fileno(), 1, timeout)
    return lines[0] if lines else ""


def read_lines(fd: int, n: int, timeout: float) -> list[str]:
    """Up to ``n`` complete lines read from ``fd`` within ``timeout`` (fewer on EOF/timeout)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return [x.decode("utf-8", "replace") for x in buf.split(b"\n")[:-1][:n]]


def tail(path: Path, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a log file ('' when it cannot be read)."""
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except OSError:
        return ""


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (from ``/proc``; empty if unreadable)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports
