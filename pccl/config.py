"""Validated configuration shared by the master and the peers.

Every timeout is named by its role. Values can be given as keyword arguments, or through
``PCCL_<FIELD>`` environment variables (e.g. ``PCCL_HEARTBEAT_TIMEOUT_S=5``) for deployments that
cannot change code. Pure data; safe on any thread.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields

__all__ = [
    "MAX_CONTROL_FRAME",
    "MAX_DATA_FRAME",
    "MAX_KV_KEY",
    "MAX_KV_VALUE",
    "MAX_SMALL_FRAME",
    "MAX_STATE_FRAME",
    "Config",
]

#: Largest control (msgpack) frame body either side accepts; larger closes the connection.
MAX_CONTROL_FRAME = 1 << 20
#: Bound of the small control messages (hello, votes, verdicts, heartbeats...): a peer cannot
#: make the master decode a large body except in the few messages that need one.
MAX_SMALL_FRAME = 64 << 10
#: Largest shared-state vote or plan (they list every entry of a state).
MAX_STATE_FRAME = 16 << 20
#: Largest data frame payload a peer accepts.
MAX_DATA_FRAME = 64 << 20
#: Key-value channel: longest key (bytes of UTF-8) and value (bytes).
MAX_KV_KEY = 256
MAX_KV_VALUE = 64 << 10


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Config:
    """Tunables with safe defaults.

    Attributes:
        heartbeat_interval_s: how often each side sends a heartbeat on the master link.
        heartbeat_timeout_s: silence after which the master evicts a peer (and a peer declares
            the master lost). A SIGSTOPped peer is evicted after this long, so a collective it
            blocks fails within about this bound.
        handshake_timeout_s: a new connection must complete its hello within this.
        connect_timeout_s: TCP connect deadline for p2p links.
        collective_timeout_s: whole-operation budget of one all-reduce, all ring steps included.
        progress_timeout_s: an in-flight all-reduce fails when no byte arrives for this long.
        chunk_bytes: ring sub-chunk size; operations are pipelined and striped at this grain.
        quant_block: elements per uint8 quantization block (one fp32 min and scale each);
            INT4/INT2 always use ``kernels.PACKED_BLOCK`` (512).
        socket_buffer_bytes: SO_SNDBUF/SO_RCVBUF requested for p2p sockets to another host
            (0 = kernel default and autotuning).
        local_socket_buffer_bytes: the same for p2p sockets whose two ends are on this host
            (loopback): there the link is a memory copy, and small buffers keep the bytes in
            flight in the CPU cache. 0 = use ``socket_buffer_bytes``.
        local_streams: streams actually opened to a ring successor at a loopback address
            (at most the communicator's ``streams``). Striping fills long-fat network pipes; on
            loopback each extra stream only costs CPU (4 peers, 256 MiB fp32 on 2 cores: about
            15% more CPU per operation with 4 streams than with 1). 0 = always ``streams``
            (tests and WAN emulation through a local proxy use that).
        send_threads: each plain-TCP send stream writes from its own thread (GIL released in
            the copy), beside the event loop that receives and reduces. False: the loop writes.
        shm_link_bytes: ring capacity of the shared-memory segment offered to a ring successor
            on this host (:mod:`pccl.peer.shm_link`): payloads then skip the kernel's TCP path
            and headers stay on the stream (at least twice ``chunk_bytes`` is used). 0 = plain
            TCP. Needs ``send_threads``, Linux and /dev/shm, and is never used with TLS.
        reconnect_timeout_s: how long a peer keeps reconnecting to a lost master (restart)
            before giving up with ``ConnectionLost``.
        restart_grace_s: a restarted master waits this long for its previous peers to
            reconnect before forming the first ring.
        start_timeout_s: master-side deadline for a collective start: once the first member
            of a group initiates a tag, every other member must initiate it within this, or
            the master aborts it for all (``CollectiveAborted`` naming the laggards; retry).
        vote_timeout_s: master-side deadline for a topology vote: once the first accepted
            peer votes ``update_topology()``, every other one must within this, or the voters
            get ``TopologyUpdateFailed`` naming the laggards (retry).
        auto_optimize_topology: ``update_topology()`` also orders the ring by measured links
            (probing unmeasured pairs first, newcomers included), like
            ``optimize_topology()`` but without its ``min_gain`` threshold.
        probe_time_s: about how long one link probe sends (per direction and pair).
        probe_max_bytes: most bytes one link probe sends.
        probe_max_age_s: measured links older than this are probed again by the next
            ``optimize_topology()``.
        tcp_bbr: p2p sockets to other hosts use the BBR congestion control where the kernel
            has it (``tcp_bbr`` loaded or built in); else the system default stays.
        tcp_notsent_lowat_bytes: ``TCP_NOTSENT_LOWAT`` of p2p sockets to other hosts (0: the
            kernel's default, unlimited): caps unsent bytes queued in the kernel.
        tcp_user_timeout_s: ``TCP_USER_TIMEOUT`` of p2p sockets: a link whose sent data goes
            unacknowledged this long is reset by the kernel (a dead path ends its streams even
            when no byte is due to arrive).
        auto_streams: the streams to a ring successor on another host follow the measured
            bandwidth-delay product of that link (probed by ``optimize_topology()``):
            ``ceil(1.25 * BDP / per-stream window)`` within ``[1, max_streams]``; the
            communicator's ``streams`` until the link is measured.
        max_streams: cap of ``auto_streams``.
    """

    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 3.0
    handshake_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    collective_timeout_s: float = 600.0
    progress_timeout_s: float = 10.0
    chunk_bytes: int = 4 << 20
    quant_block: int = 4096
    socket_buffer_bytes: int = 4 << 20
    local_socket_buffer_bytes: int = 256 << 10
    local_streams: int = 1
    send_threads: bool = True
    shm_link_bytes: int = 16 << 20
    reconnect_timeout_s: float = 60.0
    restart_grace_s: float = 3.0
    start_timeout_s: float = 60.0
    vote_timeout_s: float = 60.0
    auto_optimize_topology: bool = False
    probe_time_s: float = 0.25
    probe_max_bytes: int = 64 << 20
    probe_max_age_s: float = 3600.0
    tcp_bbr: bool = True
    tcp_notsent_lowat_bytes: int = 0
    tcp_user_timeout_s: float = 30.0
    auto_streams: bool = False
    max_streams: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise TypeError(f"Config.{f.name} must be a bool, got {v!r}")
                continue
            whole = f.type in ("int", int)
            if isinstance(v, bool) or not isinstance(v, int if whole else int | float):
                kind = "an int" if whole else "a number"
                raise TypeError(f"Config.{f.name} must be {kind}, got {v!r}")
            if f.name.endswith("_s") and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"Config.{f.name} must be a finite number > 0, got {v}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        if not (4096 <= self.chunk_bytes <= (32 << 20)):
            raise ValueError("chunk_bytes must be within [4 KiB, 32 MiB]")
        if not (64 <= self.quant_block <= (1 << 20)):
            raise ValueError("quant_block must be within [64, 1 Mi] elements")
        if self.socket_buffer_bytes < 0:
            raise ValueError("socket_buffer_bytes must be >= 0")
        if self.local_socket_buffer_bytes < 0:
            raise ValueError("local_socket_buffer_bytes must be >= 0")
        if self.probe_max_bytes < (1 << 16):
            raise ValueError("probe_max_bytes must be >= 64 KiB")
        if self.tcp_notsent_lowat_bytes < 0:
            raise ValueError("tcp_notsent_lowat_bytes must be >= 0")
        if not (1 <= self.max_streams <= 64):
            raise ValueError("max_streams must be within [1, 64]")
        if not (0 <= self.local_streams <= 64):
            raise ValueError("local_streams must be within [0, 64]")
        if self.shm_link_bytes and not ((1 << 20) <= self.shm_link_bytes <= (1 << 30)):
            raise ValueError("shm_link_bytes must be 0 or within [1 MiB, 1 GiB]")

    @classmethod
    def from_env(cls, **overrides: float | bool) -> Config:
        """Build a config from ``PCCL_*`` environment variables, then ``overrides``.

        Raises:
            ValueError: a variable does not parse as a number or fails validation.
        """
        values: dict[str, float | bool] = {}
        for f in fields(cls):
            raw = os.environ.get(f"PCCL_{f.name.upper()}")
            if raw is None:
                continue
            if f.type in ("bool", bool):
                flag = raw.strip().lower()
                if flag not in _TRUE + _FALSE:
                    raise ValueError(f"PCCL_{f.name.upper()}={raw!r} is not a boolean (1/0)")
                values[f.name] = flag in _TRUE
                continue
            try:
                values[f.name] = int(raw) if f.type in ("int", int) else float(raw)
            except ValueError:
                raise ValueError(f"PCCL_{f.name.upper()}={raw!r} is not a number") from None
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: float | bool) -> Config:
        """Return a copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
