"""A user-space TCP proxy that emulates a long, fat WAN link on loopback.

This kernel has no netem (reference/machine-measurements.md §5), so delay is added here. The
proxy accepts connections on ``listen`` and dials ``upstream`` for each one. Every chunk it reads
from either side is written to the other side ``delay`` seconds later. The upstream dial is also
delayed by ``delay``, standing in for the SYN.

Each direction of each connection has an in-flight cap, like a TCP window. A chunk counts
against the cap from the moment it is read until its credit returns. With ``credit="ack"`` the
credit returns one further ``delay`` after delivery, as an ACK crossing back would, so one stream
is limited to ``cap / (2 * delay)``. With ``credit="delivery"`` it returns at delivery, giving
``cap / delay``. At the cap the proxy stops reading, so the sender's kernel buffers fill as they
would with a full window. Several connections therefore scale linearly, which is the effect
multi-stream collectives exist for.

Invariants: a direction never buffers more than ``cap`` plus one read plus the write high-water
mark. Bytes are forwarded unchanged and in order. A clean EOF is forwarded (as a half-close) after
the same delay. A reset on one side aborts the other at once.

Everything runs on one event loop (uvloop when installed). One loop tops out at about 0.5-1 GB/s,
so run one proxy process per link (:func:`spawn`). ``python -m pccl.tools.wanproxy --listen H:P
--upstream H:P --delay-ms D --cap-mib C`` runs one from the shell.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from pccl.tools.proc import read_lines

__all__ = ["DelayProxy", "ProxyProcess", "ProxyStats", "main", "read_line", "spawn"]

#: First stdout line of the CLI: ``"wanproxy listening on HOST:PORT"``.
BANNER = "wanproxy listening on "
#: Upstream dial deadline (after the emulated SYN delay).
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
#: Write-buffer high-water mark per leg; above it the proxy stops delivering to that leg.
_WRITE_HIGH = 1 << 20


@dataclass
class ProxyStats:
    """Counters of one proxy (since start).

    Attributes:
        connections: connections accepted.
        bytes_up: bytes delivered from clients to the upstream.
        bytes_down: bytes delivered from the upstream to clients.
        upstream_failures: connections closed because the upstream could not be dialed.
    """

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_failures: int = 0


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pipe:
    """One direction of one connection: bytes read from ``src`` reach ``dst`` after the delay."""

    __slots__ = (
        "ack",
        "cap",
        "conn",
        "dead",
        "delay",
        "delivered",
        "dst",
        "dst_paused",
        "eof_delivered",
        "eof_queued",
        "in_flight",
        "queue",
        "read_paused",
        "src",
        "timer",
    )

    def __init__(self, conn: _Conn, delay: float, cap: int, ack: bool) -> None:
        self.conn = conn
        self.delay = delay
        self.cap = cap
        self.ack = ack
        # (due time on the monotonic clock, chunk); None is the EOF marker.
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.in_flight = 0
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.read_paused = False
        self.dst_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.eof_queued = False
        self.eof_delivered = False
        self.delivered = 0
        self.dead = False

    def push(self, data: bytes) -> None:
        if self.dead:
            return
        self.queue.append((time.monotonic() + self.delay, data))
        self.in_flight += len(data)
        if self.in_flight >= self.cap and not self.read_paused and self.src is not None:
            self.read_paused = True
            self.src.pause_reading()
        self.schedule()

    def push_eof(self) -> None:
        if not self.eof_queued and not self.dead:
            self.eof_queued = True
            self.queue.append((time.monotonic() + self.delay, None))
            self.schedule()

    def schedule(self) -> None:
        if (
            self.dead
            or self.timer is not None
            or not self.queue
            or self.dst is None
            or self.dst_paused
        ):
            return
        wait = self.queue[0][0] - time.monotonic()
        self.timer = self.conn.loop.call_later(max(wait, 0.0), self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        dst = self.dst
        if dst is None or dst.is_closing():
            self.queue.clear()
            return
        now = time.monotonic()
        q = self.queue
        n = 0
        # The timer may fire a little early (millisecond clock): deliver only what is due, so
        # the added delay is never less than configured.
        while q and q[0][0] <= now and not self.dst_paused:
            data = q.popleft()[1]
            if data is None:
                self.eof_delivered = True
                if dst.can_write_eof():
                    dst.write_eof()
                else:  # pragma: no cover - TCP transports can always half-close
                    dst.close()
                self.conn.check_done()
                break
            dst.write(data)  # may call pause_writing synchronously
            n += len(data)
        if n:
            self.delivered += n
            if self.ack:
                self.conn.loop.call_later(self.delay, self._credit, n)
            else:
                self._credit(n)
        self.schedule()

    def _credit(self, n: int) -> None:
        self.in_flight -= n
        if self.read_paused and self.in_flight < self.cap and self.src is not None:
            self.read_paused = False
            if not self.src.is_closing():
                self.src.resume_reading()

    def stop(self) -> None:
        self.dead = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Leg(asyncio.Protocol):
    """One TCP connection of a proxied pair; ``inbound`` reads from it, ``outbound`` writes."""

    def __init__(self, conn: _Conn, inbound: _Pipe, outbound: _Pipe) -> None:
        self.conn = conn
        self.inbound = inbound
        self.outbound = outbound
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = t
        _nodelay(t)
        t.set_write_buffer_limits(high=_WRITE_HIGH)
        self.inbound.src = t
        self.outbound.dst = t
        self.outbound.schedule()

    def data_received(self, data: bytes) -> None:
        self.inbound.push(data)

    def eof_received(self) -> bool:
        self.inbound.push_eof()
        return True  # keep the other direction open until its own EOF

    def pause_writing(self) -> None:
        self.outbound.dst_paused = True

    def resume_writing(self) -> None:
        self.outbound.dst_paused = False
        self.outbound.schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.leg_lost(self, exc)


class _Conn:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        ack = proxy.credit == "ack"
        self.up = _Pipe(self, proxy.delay_s, proxy.cap_bytes, ack)
        self.down = _Pipe(self, proxy.delay_s, proxy.cap_bytes, ack)
        self.client = _Leg(self, self.up, self.down)
        self.server: _Leg | None = None
        self.dial: asyncio.Task[None] | None = None
        self.done = False

    def start(self) -> None:
        self.dial = self.loop.create_task(self._dial())
        self.proxy._conns.add(self)

    async def _dial(self) -> None:
        p = self.proxy
        try:
            await asyncio.sleep(p.delay_s)
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT_S):
                leg = _Leg(self, self.down, self.up)
                await self.loop.create_connection(lambda: leg, p.upstream_host, p.upstream_port)
            self.server = leg
            if self.done:
                self._close_all(abort=True)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError):
            p.stats.upstream_failures += 1
            self._close_all(abort=True)

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None:
        """A reset aborts the other leg at once; a clean close is forwarded as EOF."""
        leg.outbound.stop()  # nobody left to deliver to
        if exc is not None:
            self._close_all(abort=True)
            return
        leg.inbound.push_eof()
        self.check_done()

    def check_done(self) -> None:
        """Close both legs once each direction has delivered its EOF or lost its receiver."""
        server = self.server
        finished_up = self.up.eof_delivered or (server is not None and server.lost)
        finished_down = self.down.eof_delivered or self.client.lost
        if finished_up and finished_down:
            self._close_all(abort=False)

    def _close_all(self, abort: bool) -> None:
        self.done = True
        for pipe in (self.up, self.down):
            pipe.stop()
        for leg in (self.client, self.server):
            if leg is not None and leg.transport is not None and not leg.transport.is_closing():
                if abort:
                    leg.transport.abort()
                else:
                    leg.transport.close()
        if self.dial is not None and not self.dial.done() and self.server is None and abort:
            self.dial.cancel()
        self.proxy.stats.bytes_up += self.up.delivered
        self.proxy.stats.bytes_down += self.down.delivered
        self.up.delivered = self.down.delivered = 0
        self.proxy._conns.discard(self)


class DelayProxy:
    """The proxy on the running event loop; see the module docstring.

    Args:
        upstream_host, upstream_port: where each accepted connection is forwarded.
        delay_s: one-way delay added in each direction (>= 0).
        cap_bytes: in-flight cap per direction of each connection (> 0).
        credit: ``"ack"`` (credit returns one delay after delivery) or ``"delivery"``.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        delay_s: float,
        cap_bytes: int,
        credit: str = "ack",
    ) -> None:
        if not delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        if cap_bytes <= 0:
            raise ValueError(f"cap_bytes must be > 0, got {cap_bytes}")
        if credit not in ("ack", "delivery"):
            raise ValueError(f"credit must be 'ack' or 'delivery', got {credit!r}")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.delay_s = float(delay_s)
        self.cap_bytes = int(cap_bytes)
        self.credit = credit
        self.stats = ProxyStats()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port) and return the port.

        Raises:
            OSError: the address cannot be bound.
        """

        def accept() -> _Leg:
            conn = _Conn(self)
            self.stats.connections += 1
            conn.start()
            return conn.client

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(accept, host, port, backlog=256)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and abort every proxied connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn._close_all(abort=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()


# ------------------------------------------------------------------------------ processes


class ProxyProcess:
    """A proxy running in its own process (see :func:`spawn`). ``stop()`` ends it."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port

    def stop(self, grace_s: float = 2.0) -> None:
        """Close its stdin (it exits on EOF), then SIGKILL its process group after ``grace_s``."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(
    upstream: str,
    delay_ms: float,
    cap_mib: float,
    *,
    listen: str = "127.0.0.1:0",
    credit: str = "ack",
    timeout_s: float = 30.0,
    stderr: int | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> ProxyProcess:
    """Start ``python -m pccl.tools.wanproxy`` in a new session and wait for its listening port.

    The child exits when its stdin closes, so it ends with the process that spawned it even if
    that one is killed.

    Args:
        upstream: ``"host:port"`` to forward to.
        delay_ms, cap_mib, credit: as for the CLI.
        listen: ``"host:port"`` to listen on (port 0: any free port).
        timeout_s: deadline for the banner.
        stderr: where the child's stderr goes (default: inherited).
        preexec_fn: passed to :class:`subprocess.Popen` (e.g. to set a parent-death signal).

    Raises:
        RuntimeError: the proxy did not announce its port in time or exited.
    """
    host = listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
    cmd = [
        sys.executable, "-m", "pccl.tools.wanproxy", "--listen", listen, "--upstream", upstream,
        "--delay-ms", str(delay_ms), "--cap-mib", str(cap_mib), "--credit", credit,
        "--stop-on-stdin-eof",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    try:
        line = read_line(proc, timeout_s)
        if not line.startswith(BANNER):
            raise RuntimeError(f"wanproxy did not start (rc={proc.poll()}): {line!r}")
        port = int(line[len(BANNER) :].rpartition(":")[2])
    except BaseException:
        ProxyProcess(proc, host, 0).stop(grace_s=0.0)
        raise
    return ProxyProcess(proc, host, port)


def read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """First stdout line of ``proc`` (a banner), stripped; "" if it exits first.

    Raises:
        RuntimeError: no complete line within ``timeout_s``.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    lines = read_lines(proc.stdout.fileno(), 1, timeout_s)
    if not lines and time.monotonic() >= deadline:
        raise RuntimeError(f"no banner within {timeout_s}s")
    return lines[0].strip() if lines else ""


# ------------------------------------------------------------------------------ CLI


def _address(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a core dependency on Linux/macOS
        return asyncio.new_event_loop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccl.tools.wanproxy",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--listen", type=_address, required=True, help="HOST:PORT (port 0: any)")
    p.add_argument("--upstream", type=_address, required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay, milliseconds")
    p.add_argument("--cap-mib", type=float, default=4.0, help="in-flight cap per direction")
    p.add_argument("--credit", choices=["ack", "delivery"], default="ack")
    p.add_argument(
        "--stop-on-stdin-eof", action="store_true", help="exit when stdin closes (for launchers)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until SIGINT/SIGTERM (or stdin EOF with ``--stop-on-stdin-eof``)."""
    args = build_parser().parse_args(argv)
    if args.delay_ms < 0 or not args.cap_mib > 0:
        print("--delay-ms must be >= 0 and --cap-mib > 0", file=sys.stderr)
        return 2
    (lhost, lport), (uhost, uport) = args.listen, args.upstream
    proxy = DelayProxy(
        uhost, uport, args.delay_ms / 1e3, max(1, int(args.cap_mib * (1 << 20))), args.credit
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def finish() -> None:
            if not stop.done():
                stop.set_result(None)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, finish)
        port = await proxy.start(lhost, lport)
        if args.stop_on_stdin_eof:

            def on_stdin() -> None:
                try:
                    data = os.read(0, 4096)
                except OSError:
                    data = b""
                if not data:
                    loop.remove_reader(0)
                    finish()

            loop.add_reader(0, on_stdin)
        print(f"{BANNER}{lhost}:{port}", flush=True)
        await stop
        await proxy.close()

    loop = _new_loop()
    try:
        loop.run_until_complete(run())
    except OSError as e:
        print(f"wanproxy: cannot listen on {lhost}:{lport}: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    s = proxy.stats
    print(
        f"wanproxy: {s.connections} connections, {s.bytes_up} bytes up, {s.bytes_down} bytes "
        f"down, {s.upstream_failures} upstream failures",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
