"""Strangers: connections that do not hold the token, thrown at pccl listeners.

The attack half of ``pccl hammer`` (:mod:`pccl.tools.hammer` runs the master and peers and
judges the outcome). An :class:`Attacker` opens connections to each :class:`Target` at a fixed
rate, each of one kind of :data:`KINDS` (seeded random choice per target), and counts per target
and kind what it tried and what the listener did: ``attempts``, ``connected``,
``connect_errors`` and ``closed_by_remote`` (the listener closed or reset it). The kinds:

- ``garbage``: 1-64 random bytes, then close.
- ``http``: ``GET /status`` without credentials; the answer's status code is recorded.
- ``oversized``: a valid frame header claiming the largest body of a random message type (or
  2**32 - 1 bytes), then a few KiB, held up to :data:`HOLD_MOMENT_S`.
- ``bomb``: the listener's hello header with a 1 KiB body of nested or huge msgpack arrays.
- ``half_open``: connect and send nothing; kept open.
- ``partial``: a hello header claiming 1 KiB and only half of it; kept open.

Kept-open connections stay up to ``hold`` per target, oldest closed first. Everything runs on
the caller's event loop; every attempt is bounded (connect, answer and hold deadlines), and
:meth:`Attacker.run` closes every connection before it returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pccl.frame import HEADER, MAGIC, PRE_AUTH_MAX_BODY, VERSION, MsgType, max_body

__all__ = ["HELD", "KINDS", "Attacker", "Target"]

KINDS = ("garbage", "http", "oversized", "bomb", "half_open", "partial")
#: Kinds whose connections stay open (up to ``hold`` per target).
HELD = ("half_open", "partial")
COUNTS = ("attempts", "connected", "connect_errors", "closed_by_remote")
CONNECT_TIMEOUT_S = 2.0
ANSWER_TIMEOUT_S = 2.0
HOLD_MOMENT_S = 1.0
#: Attempts in flight per target beyond which new ones are skipped (counted): a listener that
#: stops answering must not make the attacker grow without bound.
MAX_INFLIGHT = 512
HTTP_PROBE = b"GET /status HTTP/1.1\r\nHost: pccl\r\nUser-Agent: stranger\r\n\r\n"
NESTED_BOMB = b"\x91" * (PRE_AUTH_MAX_BODY - 1) + b"\x90"
WIDE_BOMB = b"\xdd\xff\xff\xff\xff" * (PRE_AUTH_MAX_BODY // 5)


class _Probe(asyncio.Protocol):
    """One stranger's connection: keeps the first bytes of the answer, notes who closed."""

    def __init__(self, counts: collections.Counter[str]) -> None:
        self.counts = counts
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport instances
        self.head = bytearray()
        self.changed = asyncio.Event()
        self.lost = False
        self.ours = False
        self.remote_eof = False
        self.on_lost: Callable[[_Probe], object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if len(self.head) < 4096:
            self.head += data[: 4096 - len(self.head)]
        self.changed.set()

    def eof_received(self) -> bool:
        self.remote_eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.remote_eof or not self.ours:
            self.counts["closed_by_remote"] += 1
        self.changed.set()
        if self.on_lost is not None:
            self.on_lost(self)

    def close(self, reset: bool = False) -> None:
        """Close from our side (``reset``: RST at once, no TIME_WAIT here)."""
        self.ours = True
        if self.transport is not None and not self.lost:
            if reset:
                self.transport.abort()
            else:
                self.transport.close()

    async def wait(self, timeout: float, until: Callable[[], bool]) -> None:
        """Wait up to ``timeout`` s until the connection is lost or ``until()`` is true."""
        deadline = time.monotonic() + timeout
        while not self.lost and not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


@dataclass
class Target:
    """One listener under attack.

    Attributes:
        name: how the report names it.
        host, port: where it listens.
        hello: the first message a legitimate dialler sends it (bombs and partials use it).
    """

    name: str
    host: str
    port: int
    hello: MsgType
    kinds: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: {k: collections.Counter() for k in KINDS}
    )
    skipped: int = 0
    http_status: collections.Counter[str] = field(default_factory=collections.Counter)
    held: dict[_Probe, None] = field(default_factory=dict)
    inflight: int = 0
    max_held: int = 0
    rounds: int = 0


class Attacker:
    """Strangers against every target, each at ``rate`` connection attempts/s.

    Args:
        targets: the listeners.
        rate: attempts per second per target.
        hold: kept-open connections per target (oldest closed first).
        seed: seeds the kinds and bytes.
        sources: spread over this many source addresses (127.0.0.2...) when the target is an
            IPv4 loopback address, as distinct strangers would be (caps are per address).
    """

    def __init__(
        self, targets: list[Target], rate: float, hold: int, seed: int, sources: int = 1
    ) -> None:
        self.targets = targets
        self.rate = rate
        self.hold = hold
        self.seed = seed
        self.sources = sources
        self.tasks: set[asyncio.Task[None]] = set()
        self.noise = random.Random(seed).randbytes(64 << 10)
        self.started = 0.0
        self.stopped = 0.0
        self.bugs: list[str] = []

    def _sources(self, host: str) -> list[str | None]:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return [None]
        if self.sources <= 1 or addr.version != 4 or not addr.is_loopback:
            return [None]
        return [f"127.0.0.{2 + i}" for i in range(self.sources)]

    async def run(self, seconds: float) -> None:
        """Attack every target for ``seconds``; every connection is closed when this returns
        (on cancellation too)."""
        self.started = time.monotonic()
        until = self.started + seconds
        loops = [asyncio.create_task(self._target_loop(t, until)) for t in self.targets]
        try:
            await asyncio.gather(*loops)
        finally:
            for lp in loops:
                lp.cancel()
            self.stopped = time.monotonic()
            if self.tasks:  # each attempt is bounded (connect + answer + a moment)
                _, pending = await asyncio.wait(set(self.tasks), timeout=10.0)
                for task in pending:
                    task.cancel()
            for t in self.targets:
                for probe in list(t.held):
                    probe.close(reset=True)
                t.held.clear()

    async def _target_loop(self, t: Target, until: float) -> None:
        rng = random.Random(f"{self.seed}/{t.name}")
        sources = self._sources(t.host)
        interval = 1.0 / self.rate
        nxt = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= until:
                return
            if nxt > now:
                await asyncio.sleep(min(nxt, until) - now)
                continue
            nxt = max(nxt + interval, now - 1.0)  # behind schedule: skip ahead, never burst
            if t.inflight >= MAX_INFLIGHT:
                t.skipped += 1
                continue
            kind = rng.choice(KINDS)
            src = sources[t.rounds % len(sources)]
            t.rounds += 1
            task = asyncio.create_task(self._attempt(t, kind, src, rng.getrandbits(32)))
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug of this tool, not of the listener: reported, and it fails the run.
            self.bugs.append(repr(task.exception()))

    def payload(self, t: Target, kind: str, r: int) -> bytes:
        """The bytes a stranger of ``kind`` sends ``t``; ``r`` (32 random bits) picks variants."""
        if kind == "garbage":
            off = r % (len(self.noise) - 64)
            return self.noise[off : off + 1 + (r >> 16) % 64]
        if kind == "http":
            return HTTP_PROBE
        if kind == "oversized":
            mtype = list(MsgType)[(r >> 4) % len(MsgType)]
            length = max_body(mtype) if r & 1 else 0xFFFFFFFF
            extra = 1024 * (1 + (r >> 8) % 4)
            return HEADER.pack(MAGIC, VERSION, mtype, length) + self.noise[:extra]
        if kind == "bomb":
            body = NESTED_BOMB if r & 1 else WIDE_BOMB
            hello = t.hello
            if hello is MsgType.P2P_HELLO and r & 2:
                hello = MsgType.P2P_STATE_HELLO
            return HEADER.pack(MAGIC, VERSION, hello, len(body)) + body
        if kind == "partial":
            half = PRE_AUTH_MAX_BODY // 2
            return HEADER.pack(MAGIC, VERSION, t.hello, PRE_AUTH_MAX_BODY) + self.noise[:half]
        return b""  # half_open

    async def _attempt(self, t: Target, kind: str, src: str | None, r: int) -> None:
        counts = t.kinds[kind]
        counts["attempts"] += 1
        t.inflight += 1
        probe = _Probe(counts)
        loop = asyncio.get_running_loop()
        try:
            try:
                await asyncio.wait_for(
                    loop.create_connection(
                        lambda: probe, t.host, t.port, local_addr=(src, 0) if src else None
                    ),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError):
                counts["connect_errors"] += 1
                return
            counts["connected"] += 1
            payload = self.payload(t, kind, r)
            if payload:
                probe.transport.write(payload)
            if kind in HELD:
                self._hold(t, probe)
                return
            if kind == "http":
                await probe.wait(ANSWER_TIMEOUT_S, lambda: b"\r\n\r\n" in probe.head)
                t.http_status[_http_status(bytes(probe.head))] += 1
            elif kind in ("oversized", "bomb"):
                await probe.wait(HOLD_MOMENT_S, lambda: False)
            probe.close()
        except asyncio.CancelledError:
            probe.close(reset=True)
            raise
        finally:
            t.inflight -= 1

    def _hold(self, t: Target, probe: _Probe) -> None:
        if probe.lost:
            return
        if self.hold == 0:
            probe.close(reset=True)
            return
        probe.on_lost = lambda p: t.held.pop(p, None)
        t.held[probe] = None
        while len(t.held) > self.hold:
            oldest = next(iter(t.held))
            del t.held[oldest]
            oldest.close(reset=True)
        t.max_held = max(t.max_held, len(t.held))

    def attempts(self) -> int:
        """Connection attempts so far, all targets and kinds."""
        return sum(c["attempts"] for t in self.targets for c in t.kinds.values())

    def report(self) -> dict[str, Any]:
        """Counts per target and kind, totals, and the achieved rates."""
        seconds = max((self.stopped or time.monotonic()) - self.started, 1e-9)
        by_kind = {k: collections.Counter[str]() for k in KINDS}
        targets: dict[str, Any] = {}
        for t in self.targets:
            total = collections.Counter[str]()
            for k, c in t.kinds.items():
                total.update(c)
                by_kind[k].update(c)
            targets[t.name] = {
                "address": f"{t.host}:{t.port}",
                **_counts(total),
                "attempts_per_s": round(total["attempts"] / seconds, 1),
                "skipped_busy": t.skipped,
                "max_held_open": t.max_held,
                "http_status": dict(sorted(t.http_status.items())),
                "kinds": {k: _counts(c) for k, c in t.kinds.items()},
            }
        total = sum(by_kind.values(), collections.Counter[str]())
        return {
            "seconds": round(seconds, 2),
            **_counts(total),
            "attempts_per_s": round(total["attempts"] / seconds, 1),
            "connected_per_s": round(total["connected"] / seconds, 1),
            "source_addresses": len(self._sources(self.targets[0].host)) if self.targets else 0,
            "kinds": {k: _counts(c) for k, c in by_kind.items()},
            "targets": targets,
            "attacker_errors": self.bugs[:5],
        }


def _counts(c: collections.Counter[str]) -> dict[str, int]:
    return {k: c[k] for k in COUNTS}


def _http_status(head: bytes) -> str:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "none"
