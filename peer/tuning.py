"""TCP tuning of p2p links to other hosts: buffers, congestion control, timeouts, streams.

On Linux an explicit ``SO_SNDBUF``/``SO_RCVBUF`` turns that socket's autotuning off and is
silently capped by ``net.core.wmem_max``/``rmem_max`` (the kernel stores twice the value, half
being bookkeeping). So :func:`tune_wan_socket` sets an explicit size only where it is larger
than what autotuning may reach (``tcp_wmem``/``tcp_rmem`` max), reads back what the socket got
and returns it as the per-stream window. :func:`check_window` compares the windows of a link's
streams with that link's measured bandwidth-delay product and warns once per link and reason,
naming the sysctls to raise. :func:`auto_streams` picks the streams for a link from its BDP.

BBR (``Config.tcp_bbr``) is set where the kernel offers it
(``net.ipv4.tcp_available_congestion_control``); ``TCP_NOTSENT_LOWAT`` and ``TCP_USER_TIMEOUT``
come from the config. Every option is best effort: a kernel without one keeps its default.

Pure functions over sockets and ``/proc``; the peer's event-loop thread.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from dataclasses import dataclass

from pccl.config import Config

log = logging.getLogger("pccl.peer")

__all__ = [
    "Window",
    "auto_streams",
    "check_window",
    "kernel_limits",
    "stream_window",
    "tune_wan_socket",
]

#: Linux stores SO_SNDBUF/SO_RCVBUF doubled; about this share of it holds payload.
_PAYLOAD_SHARE = 0.5
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
_TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.cache
def kernel_limits() -> dict[str, int | str]:
    """The kernel's socket limits (0 or "" where unreadable): ``rmem_max``, ``wmem_max``,
    ``tcp_rmem_max``, ``tcp_wmem_max``, ``congestion`` (available algorithms)."""

    def num(path: str, field: int = 0) -> int:
        parts = _read(path).split()
        try:
            return int(parts[field]) if len(parts) > field else 0
        except ValueError:
            return 0

    return {
        "rmem_max": num("/proc/sys/net/core/rmem_max"),
        "wmem_max": num("/proc/sys/net/core/wmem_max"),
        "tcp_rmem_max": num("/proc/sys/net/ipv4/tcp_rmem", 2),
        "tcp_wmem_max": num("/proc/sys/net/ipv4/tcp_wmem", 2),
        "congestion": _read("/proc/sys/net/ipv4/tcp_available_congestion_control"),
    }


@dataclass(frozen=True)
class Window:
    """What one stream's socket may keep in flight (bytes), and how it was obtained."""

    send: int
    recv: int
    explicit: bool  # set explicitly (autotuning off) or left to autotuning
    requested: int  # the explicit size asked for (0: none)

    @property
    def bytes(self) -> int:
        return min(self.send, self.recv)

    @property
    def capped(self) -> bool:
        """An explicit request the kernel cut down (``rmem_max``/``wmem_max``)."""
        return self.explicit and self.bytes < int(self.requested * 0.95)


def tune_wan_socket(sock: socket.socket, cfg: Config) -> Window:
    """Apply the config's TCP options to a p2p socket to another host; return its window."""
    lim = kernel_limits()
    want = cfg.socket_buffer_bytes
    auto_max = min(int(lim["tcp_rmem_max"]) or 1 << 62, int(lim["tcp_wmem_max"]) or 1 << 62)
    explicit = bool(want) and want > auto_max  # smaller: autotuning reaches it by itself
    try:
        if explicit:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
        if cfg.tcp_notsent_lowat_bytes:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, cfg.tcp_notsent_lowat_bytes)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(cfg.tcp_user_timeout_s * 1000))
        if cfg.tcp_bbr and "bbr" in str(lim["congestion"]).split():
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, b"bbr")
    except OSError as e:  # not fatal: defaults still work
        log.debug("p2p socket option refused: %s", e)
    return read_window(sock, want if explicit else 0)


def read_window(sock: socket.socket, requested: int) -> Window:
    """Read back a socket's buffers: the explicit sizes it got, or autotuning's ceiling."""
    lim = kernel_limits()
    try:
        snd = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError:
        snd = rcv = 0
    if requested:
        return Window(int(snd * _PAYLOAD_SHARE), int(rcv * _PAYLOAD_SHARE), True, requested)
    send = int(int(lim["tcp_wmem_max"]) * _PAYLOAD_SHARE) or int(snd * _PAYLOAD_SHARE)
    recv = int(int(lim["tcp_rmem_max"]) * _PAYLOAD_SHARE) or int(rcv * _PAYLOAD_SHARE)
    return Window(send, recv, False, 0)


def stream_window(cfg: Config) -> int:
    """The window (bytes) one p2p stream to another host gets under ``cfg`` (a fresh socket,
    tuned and read back)."""
    with socket.socket() as s:
        return tune_wan_socket(s, cfg).bytes


_warned: set[tuple[int, bool]] = set()


def check_window(peer: int, window: Window, streams: int, gbps: float, rtt_ms: float) -> str | None:
    """Warn (once per peer and kind) when ``streams`` streams of ``window`` cannot hold the
    link's bandwidth-delay product; return the warning (None if none)."""
    bdp = gbps * 1e9 / 8 * rtt_ms / 1e3
    have = window.bytes * max(streams, 1)
    if bdp <= 0 or have >= bdp or (peer, window.explicit) in _warned:
        return None
    _warned.add((peer, window.explicit))
    need = math.ceil(bdp / max(streams, 1) / _PAYLOAD_SHARE)
    if window.explicit:
        fix = (
            f"the kernel capped the requested {window.requested} B to {window.bytes} B: "
            f"sysctl -w net.core.rmem_max={need} net.core.wmem_max={need}"
        )
    else:
        fix = (
            "autotuning stops at tcp_rmem/tcp_wmem max: "
            f"sysctl -w net.ipv4.tcp_rmem='4096 131072 {need}' "
            f"net.ipv4.tcp_wmem='4096 16384 {need}' (or more streams)"
        )
    msg = (
        f"p2p link to peer {peer}: {streams} stream(s) x {window.bytes} B of socket buffer "
        f"hold less than its bandwidth-delay product of {int(bdp)} B "
        f"({gbps:.3f} Gbit/s x {rtt_ms:.1f} ms); {fix}"
    )
    log.warning(msg)
    return msg


#: Streams are sized for this multiple of the bandwidth-delay product: a stream never keeps its
#: whole window in flight (ACK clocking, recovery). Measured on a 1 Gbit/s link with a 4 MiB
#: window per stream (``wantestbed streams``): exactly ``ceil(BDP / window)`` streams ran
#: 1.03x / 1.18x / 1.09x the best fixed count at 25 / 50 / 100 ms one-way.
AUTO_HEADROOM = 1.25


def auto_streams(gbps: float, rtt_ms: float, window: int, cap: int) -> int:
    """Streams that hold a link's bandwidth-delay product with ``window`` bytes each:
    ``ceil(AUTO_HEADROOM * BDP / window)`` within ``[1, cap]`` (1 when unmeasured)."""
    bdp = gbps * 1e9 / 8 * rtt_ms / 1e3
    if bdp <= 0 or window <= 0:
        return 1
    return max(1, min(cap, math.ceil(AUTO_HEADROOM * bdp / window)))
