"""Link probing: measure the rate and round-trip time of p2p links, bounded in time and bytes.

The master hands each peer a plan (``M2P_PROBE_PLAN``): one partner per round, scheduled so that
no two probes of a round share an endpoint (:func:`pccl.master.topology.probe_rounds`); both
partners of a round probe each other at the same time, one direction each (links are
full-duplex). A probe is one authenticated connection to the partner's p2p listener:

* the partner's challenge, our ``P2P_PROBE_HELLO`` (HMAC over its nonce, our id and the round),
  its ``P2P_HELLO_ACK``;
* transfers: we send ``PROBE_HEADER`` (a byte count ``n``) then ``n`` bytes; the partner answers
  ``PROBE_REPLY`` (nanoseconds between the header's arrival and the last byte, and ``n``).
  ``n = 0`` is a ping: three of them give the RTT (the smallest). Transfers then grow from
  ``WARMUP_BYTES`` (at most 4x each, sized from the previous one's rate, at most ``max_bytes``)
  until one lasts a quarter of the plan's ``seconds`` or the next would overrun them; the last
  one's rate is the estimate. A single stream that kept at least half its window in flight
  may be window-bound, not link-bound: such a link is probed again over ``PARALLEL_PROBES``
  connections at once and their summed rate kept when higher.

The rate is what the receiver saw, so send-buffer filling does not inflate it. It is a short
single-stream measurement: on a long-fat link slow start may not finish inside it, so it
under-estimates such links; the ring's own throughput during real operations then raises the
estimate (:meth:`pccl.master.topology.LinkTable.record_ring`).

:class:`ProbeResponder` is the accepting side (an :class:`~pccl.peer.rx_stream.RxStream` in its
``PROBE`` state delegates to it); it allocates one 1 MiB scratch buffer once the hello verified,
and the connection closes at ``handshake_timeout_s`` like any handshake.
:class:`Prober` runs plans on the peer's event loop and reports (``P2M_PROBE_REPORT``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING

from pccl.peer.tuning import stream_window

from pccl import messages as m
from pccl.auth import prove
from pccl.config import Config
from pccl.errors import ProtocolError
from pccl.frame import HEADER, PRE_AUTH_MAX_BODY, MsgType, parse_header

if TYPE_CHECKING:
    from pccl.peer.p2p import P2PNode
    from pccl.peer.session import MasterSession

log = logging.getLogger("pccl.peer")

__all__ = [
    "MAX_PROBE_BYTES",
    "PROBE_HEADER",
    "PROBE_REPLY",
    "ProbeResponder",
    "Prober",
    "probe_link",
]

PROBE_HEADER = struct.Struct("!Q")
PROBE_REPLY = struct.Struct("!QQ")
#: Largest transfer a responder accepts in one probe.
MAX_PROBE_BYTES = 256 << 20
WARMUP_BYTES = 128 << 10
_SCRATCH = 1 << 20
_ZEROS = memoryview(bytes(_SCRATCH))
PURPOSE = b"pccl-probe"
#: Connections of the second probe of a link whose single stream looked window-bound.
PARALLEL_PROBES = 8


def window_bound(res: tuple[float, float], cfg: Config) -> bool:
    """Whether a single-stream probe result may be limited by the stream's window rather than
    the link: it kept at least half a window in flight (rate x RTT). (On a plain loopback or
    LAN link the RTT is far too short for that.)"""
    gbps, rtt_ms = res
    return gbps * 1e9 / 8 * rtt_ms / 1e3 >= 0.5 * stream_window(cfg)


class ProbeResponder:
    """The accepting end of one probe connection: reads transfers, answers each with its
    timing. :meth:`on_full` is called when the buffer it last returned is full and returns
    the next one to fill."""

    def __init__(self) -> None:
        self._hdr = memoryview(bytearray(PROBE_HEADER.size))
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._in_header = True
        self._left = 0
        self._size = 0
        self._t0 = 0
        self.transfers = 0

    def first(self) -> memoryview:
        return self._hdr

    def on_full(self, write: object) -> memoryview:
        """``write`` is the transport's ``write``; raises ProtocolError on an oversized
        transfer."""
        now = time.perf_counter_ns()
        if self._in_header:
            (n,) = PROBE_HEADER.unpack(self._hdr)
            if n > MAX_PROBE_BYTES:
                raise ProtocolError(f"probe transfer of {n} bytes (at most {MAX_PROBE_BYTES})")
            if n == 0:
                write(PROBE_REPLY.pack(0, 0))  # type: ignore[operator]
                return self._hdr
            self._in_header, self._left, self._size, self._t0 = False, n, n, now
        else:
            self._left -= len(self._last)
            if self._left <= 0:
                self.transfers += 1
                self._in_header = True
                write(PROBE_REPLY.pack(now - self._t0, self._size))  # type: ignore[operator]
                return self._hdr
        self._last = self._scratch[: min(self._left, _SCRATCH)]
        return self._last

    _last: memoryview = memoryview(b"")


async def _read_frame(reader: asyncio.StreamReader) -> m.Message:
    head = await reader.readexactly(HEADER.size)
    mtype, length = parse_header(head)
    if mtype not in (MsgType.P2P_CHALLENGE, MsgType.P2P_HELLO_ACK) or length > PRE_AUTH_MAX_BODY:
        raise ProtocolError(f"unexpected {mtype.name} ({length} bytes) from a probed peer")
    return m.decode(mtype, await reader.readexactly(length))


async def probe_link(
    node: P2PNode,
    host: str,
    port: int,
    round_id: int,
    max_bytes: int,
    seconds: float,
    last: list[tuple[int, float, float]] | None = None,
) -> tuple[float, float]:
    """Measure the link from this peer to the p2p listener at ``host:port``; ``last`` (if
    given) gets the last transfer's bytes and its start and end on our clock appended.

    Returns:
        ``(Gbit/s, RTT ms)``.

    Raises:
        OSError, ConnectionError, TimeoutError, ProtocolError, asyncio.IncompleteReadError:
        the probe failed (the caller's deadline covers a silent partner).
    """
    reader, writer = await asyncio.open_connection(host, port, ssl=node._client_ssl)
    try:
        node.tune(writer.transport)  # the options the ring's streams get
        ch = await _read_frame(reader)
        assert isinstance(ch, m.P2PChallenge)
        proof = prove(node.token, PURPOSE, ch.nonce, node.my_id, round_id)
        writer.write(m.ProbeHello(node.my_id, round_id, proof).encode())
        ack = await _read_frame(reader)
        if not isinstance(ack, m.P2PHelloAck) or not ack.ok:
            raise ConnectionRefusedError(getattr(ack, "reason", "probe refused"))
        rtt = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            writer.write(PROBE_HEADER.pack(0))
            await reader.readexactly(PROBE_REPLY.size)
            rtt = min(rtt, time.perf_counter() - t)

        span = [0.0, 0.0]  # the last transfer on our clock: first byte written, reply read

        async def transfer(n: int) -> tuple[float, float]:
            span[0] = time.perf_counter()
            writer.write(PROBE_HEADER.pack(n))
            left = n
            while left:
                k = min(left, _SCRATCH)
                writer.write(_ZEROS[:k])
                left -= k
                await writer.drain()
            ns, got = PROBE_REPLY.unpack(await reader.readexactly(PROBE_REPLY.size))
            span[1] = time.perf_counter()
            if got != n:
                raise ProtocolError(f"probe reply for {got} bytes, sent {n}")
            return n * 8 / max(ns, 1), ns / 1e9  # Gbit/s, receiver seconds

        # Growing transfers within ``seconds`` in all: each at most 4x the previous and sized
        # from its rate; the last (largest) one is the estimate. Small first transfers ride
        # the path's buffers and bursts; a transfer lasting a quarter of the budget does not.
        t0 = time.perf_counter()
        n = min(WARMUP_BYTES, max_bytes)
        while True:
            gbps, took = await transfer(n)
            if took >= seconds / 4 or n >= max_bytes:
                break
            rate = max(gbps, 1e-6) * 1e9 / 8  # bytes/s
            nxt = int(min(max_bytes, max(2 * n, min(4 * n, rate * seconds / 2))))
            if time.perf_counter() - t0 + 1.5 * nxt / rate > seconds:
                break
            n = nxt
        if last is not None:
            last.append((n, span[0], span[1]))
        return gbps, rtt * 1e3
    finally:
        writer.close()


class Prober:
    """Runs the master's probe plans for one peer and reports the results.

    Subscribes to ``M2P_PROBE_PLAN`` on the session; a new plan cancels a running one. Each
    probe has a deadline of ``3 * seconds + connect_timeout_s``-bounded slack; a failed probe
    is left out of the report (the master treats the link as unmeasured).
    """

    def __init__(self, session: MasterSession, node: P2PNode) -> None:
        self.session = session
        self.node = node
        self.task: asyncio.Task[None] | None = None
        self.results: dict[int, tuple[float, float]] = {}  # peer -> (gbps, rtt_ms), latest
        self.rounds = 0
        session.subscribe({MsgType.M2P_PROBE_PLAN: self.on_plan})

    def on_plan(self, msg: m.Message) -> None:
        assert isinstance(msg, m.ProbePlan)
        if self.task is not None:
            self.task.cancel()
        self.task = asyncio.get_running_loop().create_task(self._run(msg))

    async def _run(self, plan: m.ProbePlan) -> None:
        links: list[tuple[int, float, float]] = []
        failed: list[str] = []
        seconds = max(0.01, min(plan.seconds, 10.0))
        limit = 3 * seconds + self.node.config.handshake_timeout_s  # a probe's connection lives
        # at most handshake_timeout_s at the acceptor; the transfers take about ``seconds``
        for pid, host, port in plan.targets:
            if not pid:
                continue
            try:
                async with asyncio.timeout(limit):
                    res = await probe_link(
                        self.node, host, port, plan.round_id, plan.max_bytes, seconds
                    )
                if window_bound(res, self.node.config):
                    async with asyncio.timeout(limit):
                        res = await self._parallel(host, port, plan, seconds, res)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed probe: the link stays unmeasured
                log.info("probe of peer %d at %s:%d failed: %r", pid, host, port, e)
                failed.append(f"{pid}: {type(e).__name__}")
                continue
            self.results[pid] = res
            self.node.links[pid] = res
            links.append((pid, res[0], res[1]))
        self.rounds += 1
        reason = ("failed: " + ", ".join(failed))[:500] if failed else ""
        self.session.send(m.ProbeReport(plan.round_id, links, not failed, reason))

    async def _parallel(
        self, host: str, port: int, plan: m.ProbePlan, seconds: float, one: tuple[float, float]
    ) -> tuple[float, float]:
        """Probe again over ``PARALLEL_PROBES`` connections at once: their last transfers'
        bytes over the union of their spans on our clock (less one RTT, the replies' way
        back), when above the single stream's rate (a window-bound stream hides the link's
        capacity). Summing per-connection rates instead overstated a 1 Gbit/s link 2-20x on
        the testbed: the transfers do not run in step."""
        k = min(PARALLEL_PROBES, self.node.config.max_streams)
        each = max(plan.max_bytes // k, 1 << 16)
        last: list[tuple[int, float, float]] = []
        got = await asyncio.gather(
            *(
                probe_link(self.node, host, port, plan.round_id, each, seconds, last)
                for _ in range(k)
            )
        )
        rtt_s = min(one[1], *(r for _, r in got)) / 1e3
        span = max(e for _, _, e in last) - min(s for _, s, _ in last) - rtt_s if last else 0.0
        total = sum(n for n, _, _ in last) * 8 / span / 1e9 if span > 0 else 0.0
        return (total, rtt_s * 1e3) if total > one[0] else one

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
