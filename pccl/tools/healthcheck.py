"""Container health check: is the master of this container accepting connections?

    python -m pccl.tools.healthcheck [--pid 1] [--timeout 2]

Reads the master's own command line (``/proc/PID/cmdline``; in a container the entrypoint is
PID 1), takes the ``--port`` and ``--host`` it was started with (defaults 48148 and 0.0.0.0,
checked on 127.0.0.1; ``--port 0``: the TCP port that process listens on, other than its
``--status-port``), and opens a TCP connection to it. Exit status 0 when it connects,
1 when it does not, 2 when PID is not a ``pccl master``. A container started with another port
is therefore checked on that port, not on a number written into the image.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from pccl.tools.proc import listening_ports

__all__ = ["main", "master_address"]

DEFAULT_PORT = 48148


def master_address(argv: list[str]) -> tuple[str, int] | None:
    """``(host, port)`` a ``pccl master`` command line listens on, or None if it is not one."""
    if "master" not in argv:
        return None
    args = argv[argv.index("master") + 1 :]
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    known, _ = p.parse_known_args(args)
    host = known.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    return host, known.port


def _status_port(argv: list[str]) -> int | None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--status-port", type=int, default=None)
    return p.parse_known_args(argv)[0].status_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pccl.tools.healthcheck", description=__doc__.split("\n")[0]
    )
    p.add_argument("--pid", type=int, default=1, help="the master's process id (default 1)")
    p.add_argument("--timeout", type=float, default=2.0, help="connect timeout (seconds)")
    args = p.parse_args(argv)
    try:
        raw = Path(f"/proc/{args.pid}/cmdline").read_bytes()
    except OSError as e:
        print(f"healthcheck: cannot read the command line of pid {args.pid}: {e}", file=sys.stderr)
        return 2
    cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    addr = master_address(cmdline)
    if addr is None:
        print(f"healthcheck: pid {args.pid} is not a pccl master", file=sys.stderr)
        return 2
    if addr[1] == 0:  # an OS-assigned port: the one it listens on (not its status port)
        ports = sorted(listening_ports(args.pid) - {_status_port(cmdline)})
        if not ports:
            print(f"healthcheck: pid {args.pid} listens on no TCP port", file=sys.stderr)
            return 1
        addr = (addr[0], ports[0])
    try:
        socket.create_connection(addr, args.timeout).close()
    except OSError as e:
        print(f"healthcheck: {addr[0]}:{addr[1]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
