"""The master's read-only HTTP status endpoint: ``GET /status`` (JSON) and ``GET /metrics``.

A deliberately tiny HTTP/1.1 server on the master's own event loop (no thread): one request per
connection, ``GET`` only, the response is written and the connection closed. Everything a
client sends is untrusted: the request head is bounded (:data:`MAX_HEAD_BYTES`) and must arrive
whole within :data:`REQUEST_READ_TIMEOUT_S` (so a slowloris client is dropped), the response
must drain within :data:`RESPONSE_WRITE_TIMEOUT_S`, and the lingering close after it ends within
:data:`LINGER_S`. Connection states, the caps (total, per address) and whom a newcomer evicts
live in :mod:`pccl.master.status_conns`, so clients that linger, trickle, stay silent or never
read cannot lock anyone out. A bad request gets a 4xx and closes only its own connection; no
request can raise into the master. Rendering runs on the master's loop a slice of
:data:`~pccl.master.metrics.RENDER_SLICE` peers or groups at a time (no loop step waits on a
10,000-peer document), requests arriving during a render share it, and a rendered document is
reused for a while proportional to its cost (:data:`RENDER_REUSE_FACTOR`): a request flood
cannot starve the control plane.

With a master token or a read-only status token configured, every request must carry
``Authorization: Bearer <either>`` (compared in constant time), else 401 and no document:
``/status`` lists every peer's address. Without a token the endpoint is open, as it was.

Documents are built from :class:`~pccl.master.state.MasterState` and the daemon's connections
at request time; the functions that build them (:func:`status_document`,
:func:`metrics_text`) are pure and need no sockets. ``/metrics`` is ``prometheus_client``'s
exposition of a per-master registry holding a :class:`~pccl.master.metrics.MasterCollector`.
Completed collectives (one per group operation) and aborts are ``MasterState``'s own lifetime
counters. Never touches tensor bytes.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pccl.master.metrics import RENDER_SLICE, metrics_body, metrics_text, new_registry
from pccl.master.state import MasterState
from pccl.master.status_conns import (
    MAX_CLIENTS,
    MAX_PER_ADDRESS,
    ConnState,
    Reason,
    Slot,
    SlotTable,
    address_key,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

if TYPE_CHECKING:
    from pccl.master.daemon import Master

log = logging.getLogger("pccl.master.status")

__all__ = [
    "MAX_CLIENTS",
    "MAX_PER_ADDRESS",
    "BadRequest",
    "Counters",
    "Request",
    "StatusServer",
    "authorized",
    "credential_digest",
    "metrics_text",
    "parse_request",
    "status_document",
]

#: Largest request head (request line and headers) accepted; larger gets 431.
MAX_HEAD_BYTES = 8192
#: The whole request head must arrive within this; a slower client gets 408 and is closed.
REQUEST_READ_TIMEOUT_S = 5.0
#: A client that does not read its response within this is dropped.
RESPONSE_WRITE_TIMEOUT_S = 10.0
#: After answering, how long the server keeps reading (and discarding) until the client closes.
LINGER_S = 1.0
#: ... and at most this many bytes.
LINGER_MAX_BYTES = 1 << 20
#: How often :class:`Counters` samples the state between requests.
SAMPLE_INTERVAL_S = 0.25
#: A rendered document is served again while younger than this many times what rendering it
#: cost: a flood of requests then takes at most about 1/N of the master's loop per document
#: (rendering 4096 peers takes tens of milliseconds), while small runs always get fresh ones.
RENDER_REUSE_FACTOR = 20
#: How many recent aborts ``/status`` lists (``MasterState`` itself keeps 64).
STATUS_ABORTS = 32

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
JSON_CONTENT_TYPE = "application/json"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


# ---------------------------------------------------------------------------------- counters


class Counters:
    """Lifetime totals, read from ``MasterState`` (exact: it counts every verdict)."""

    def __init__(self, state: MasterState) -> None:
        self.collectives_completed = 0
        self.aborts = 0
        self.first_epoch = state.epoch

    def sample(self, state: MasterState) -> None:
        """Refresh the totals from ``state``."""
        self.collectives_completed = state.collectives_completed
        self.aborts = state.aborts_total

    def topology_changes(self, state: MasterState) -> int:
        """Epochs announced since this master started."""
        return max(state.epoch - self.first_epoch, 0)


# ---------------------------------------------------------------------------------- documents


def _round(x: float, digits: int = 3) -> float:
    return round(x, digits) if math.isfinite(x) else 0.0


def status_document(master: Master, counters: Counters, now: float) -> dict[str, Any]:
    """The ``/status`` JSON object.

    Args:
        master: the daemon (its state and connections are read, never changed).
        counters: lifetime totals, already sampled.
        now: ``time.monotonic()`` of the request.

    Returns:
        A JSON-serialisable dict: ``master``, ``peers``, ``groups``, ``aborts``, ``totals``.
    """
    state = master.state
    doc = _status_head(master, counters, now)
    peers = [_peer_entry(master, pid, rec, now) for pid, rec in sorted(state.peers.items())]
    groups = [_group_entry(state, gid, grp) for gid, grp in sorted(state.groups.items())]
    return {"master": doc.pop("master"), "peers": peers, "groups": groups, **doc}


async def status_body(master: Master, counters: Counters, now: float) -> bytes:
    """:func:`status_document` encoded, built :data:`RENDER_SLICE` peers or groups at a time
    with the loop served between slices (10,000 peers are 2.5 MB of JSON). A peer that leaves
    meanwhile still appears as it was when the render began."""
    state = master.state
    parts: dict[str, str] = {}
    for key, items, entry in (
        ("peers", sorted(state.peers.items()), lambda k, v: _peer_entry(master, k, v, now)),
        ("groups", sorted(state.groups.items()), lambda k, v: _group_entry(state, k, v)),
    ):
        chunks = []
        for i in range(0, len(items), RENDER_SLICE):
            t0 = time.monotonic()
            entries = [entry(k, v) for k, v in items[i : i + RENDER_SLICE]]
            chunks.append(json.dumps(entries, separators=_SEP)[1:-1])
            t = time.monotonic()
            master.steps.note(t - t0, t)
            await asyncio.sleep(0)
        parts[key] = "[" + ",".join(chunks) + "]"
    head = _status_head(master, counters, now)
    order = {"master": head.pop("master"), "peers": None, "groups": None, **head}
    body = ",".join(
        f"{json.dumps(k)}:{parts[k] if v is None else json.dumps(v, separators=_SEP)}"
        for k, v in order.items()
    )
    return ("{" + body + "}\n").encode()


_SEP = (",", ":")


def _peer_entry(master: Master, pid: int, rec: Any, now: float) -> dict[str, Any]:
    conn = master.by_id.get(pid)
    return {
        "id": pid,
        "group": rec.group,
        "address": f"{rec.host}:{rec.port}",
        "control_address": conn.addr if conn is not None else None,
        "accepted": rec.accepted,
        "registered_s_ago": _round(now - rec.registered_at),
        "last_seen_s_ago": _round(now - conn.last_seen) if conn is not None else None,
        "ops_done": rec.ops_done,
        "tx_bytes": rec.tx_bytes,
        "last_gbps": _round(rec.last_gbps, 6),
        "ops_in_flight": sorted(rec.ops),
    }


def _group_entry(state: MasterState, gid: int, grp: Any) -> dict[str, Any]:
    ops = [
        {
            "tag": op.tag,
            "op_id": op.op_id,  # 0 until every ring member has initiated it
            "initiated": sorted(op.params),
            "members": list(op.members),
            "completed": sorted(op.completed),
        }
        for op in sorted(grp.ops.values(), key=lambda o: o.tag)
    ]
    sync = None
    if grp.sync is not None:
        rnd = grp.sync
        sync = {
            "sync_id": rnd.sync_id,
            "phase": "voting" if rnd.target < 0 else "transferring",
            "voted": sorted(rnd.votes),
            "waiting": sorted(rnd.waiting),
            "target_revision": rnd.target if rnd.target >= 0 else None,
        }
    return {
        "id": gid,
        "ring": list(grp.ring),
        "world_size": len(grp.ring),
        "departed": [q for q in grp.ring if q not in state.peers],
        "broken": grp.broken or None,
        "ops_in_flight": ops,
        "next_revision": grp.next_revision,
        "sync": sync,
        "topology": state.optimizer.status(gid, grp),  # link matrix, last optimisation
    }


def _status_head(master: Master, counters: Counters, now: float) -> dict[str, Any]:
    """Everything in ``/status`` but the peers and groups (bounded in size)."""
    state = master.state
    server = master.status_server
    started = server.started if server is not None else now
    return {
        "master": {
            "host": master.host,
            "port": master.port,
            "uptime_s": _round(now - started),
            "phase": state.phase.value,
            "epoch": state.epoch,
            "topology_changes": counters.topology_changes(state),
            "connections": len(master.conns),
            "loop_lag_max_s": _round(master.lag.max, 6),
            "loop_lag_recent_s": _round(master.lag.recent(now), 6),
            "step_max_s": _round(master.steps.max, 6),
            "step_recent_s": _round(master.steps.recent(now), 6),
            "gc_max_s": _round(master.gc_max_s, 6),
            "gc_full_passes": gc.get_stats()[2]["collections"],
        },
        "aborts": [{"group": g, "tag": t, "reason": r} for g, t, r in state.aborts[:STATUS_ABORTS]],
        "departures": [
            {"peer_id": p, "group": g, "kind": k, "reason": r, "at": round(t, 3)}
            for t, p, g, k, r in reversed(state.departures)
        ],
        "parity": {
            "violations": state.parity_violations_total,
            "syncs_judged": state.syncs_judged,
            "recent": [
                {
                    "group": g,
                    "sync_id": s,
                    "revision": r,
                    "peer_id": p,
                    "entries": k,
                    "at": round(t, 3),
                }
                for t, g, s, r, p, k in reversed(state.parity_violations)
            ],
        },
        "kv": master.kv.describe(time.time()),
        "totals": {
            "collectives_completed": counters.collectives_completed,
            "aborts": counters.aborts,
            "departures": dict(state.departures_total),
        },
    }


# ---------------------------------------------------------------------------------- parsing


class BadRequest(Exception):
    """A request this server will not serve; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass(frozen=True)
class Request:
    """A parsed request head.

    Attributes:
        method: the request method, as sent (case-sensitive).
        path: the target without its query string.
        authorization: the ``Authorization`` header's value, or None when absent.
    """

    method: str
    path: str
    authorization: str | None = None


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and headers, without the blank line).

    Args:
        head: the bytes before the first empty line; at most :data:`MAX_HEAD_BYTES`.

    Returns:
        The method, the path with any query string removed, and the ``Authorization`` header.

    Raises:
        BadRequest: (400) anything that is not an HTTP/1.0 or HTTP/1.1 request head, or one
            with more than one ``Authorization`` header.
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request head is not ASCII") from None
    lines = text.split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not method or not set(method) <= _TOKEN_CHARS:
        raise BadRequest(400, "malformed method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(400, "unsupported HTTP version")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequest(400, "malformed request target")
    authorization: str | None = None
    for raw in lines[1:]:
        line = raw.rstrip("\r")
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise BadRequest(400, "malformed header line")
        if name.lower() == "authorization":
            if authorization is not None:
                raise BadRequest(400, "more than one Authorization header")
            authorization = value.strip(" \t")
    return Request(method, target.split("?", 1)[0], authorization)


def credential_digest(token: bytes) -> bytes:
    """What :func:`authorized` compares: SHA-256 of a credential (hides its length)."""
    return hashlib.sha256(token).digest()


def authorized(authorization: str | None, accepted: Sequence[bytes]) -> bool:
    """Whether an ``Authorization`` header value carries an accepted bearer credential.

    Every accepted digest is compared, each in constant time (:func:`hmac.compare_digest`
    over SHA-256 digests), so neither the answer's timing nor which credential matched
    depends on the secret.

    Args:
        authorization: the header value (``Bearer <credential>``), or None when absent.
        accepted: :func:`credential_digest` of each accepted credential; empty means the
            endpoint is open and every request is authorized.

    Returns:
        True when ``accepted`` is empty or the credential matches one of them.
    """
    if not accepted:
        return True
    if authorization is None:
        return False
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip(" \t")
    if scheme.lower() != "bearer" or not credential:
        return False
    given = credential_digest(credential.encode())
    ok = False
    for digest in accepted:
        ok |= hmac.compare_digest(given, digest)
    return ok


def _find_head_end(buf: bytearray) -> tuple[int, int] | None:
    """``(end of head, start of body)`` once an empty line arrived (CRLF or bare LF)."""
    best: tuple[int, int] | None = None
    for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        i = buf.find(sep)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(sep))
    return best


# ---------------------------------------------------------------------------------- server


@dataclass
class _Handle:
    """What the server needs to end one admitted connection."""

    task: asyncio.Task[Any]
    writer: asyncio.StreamWriter


class StatusServer:
    """Serves ``/status`` and ``/metrics`` for one :class:`~pccl.master.daemon.Master`.

    Credentials are read from the master at :meth:`start`: its ``token`` and its
    ``status_token``; with neither set the endpoint is open.

    Args:
        master: the daemon to report on.
        host: address to listen on.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
    """

    def __init__(self, master: Master, host: str, port: int = 0) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"status port must be within 0..65535, got {port!r}")
        self.master = master
        self.host = host
        self.port = port
        self.started = time.monotonic()
        self.counters = Counters(master.state)
        #: This master's own registry (never the process-wide default): ``/metrics`` is its
        #: exposition; the collector reads :attr:`counters` as sampled at each request.
        self.registry = new_registry(master, lambda: self.counters)
        #: Admission, eviction and state of the open connections (see ``status_conns``).
        self.slots = SlotTable()
        self._server: asyncio.AbstractServer | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._handles: dict[Slot, _Handle] = {}
        self._accepted: tuple[bytes, ...] = ()  # credential digests; empty: open endpoint
        self._rendered: dict[str, tuple[float, float, bytes]] = {}  # path -> (at, cost, body)
        self._rendering: dict[str, asyncio.Future[bytes]] = {}  # path -> the render under way

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            OSError: the address cannot be bound (the message names the status endpoint).
        """
        self.started = time.monotonic()
        self.counters = Counters(self.master.state)
        tokens = (self.master.token, self.master.status_token)
        self._accepted = tuple(credential_digest(t) for t in tokens if t)
        try:
            self._server = await asyncio.start_server(
                self._on_client, self.host, self.port, reuse_address=True, backlog=128
            )
        except OSError as e:
            raise OSError(
                e.errno, f"status endpoint {self.host}:{self.port}: {e.strerror or e}"
            ) from e
        self.port = self._server.sockets[0].getsockname()[1]
        self._sampler = asyncio.create_task(self._sample_forever(), name="pccl-master-status")
        log.info(
            "pccl master status on %s:%d (%s)",
            self.host,
            self.port,
            "bearer credential required" if self._accepted else "open: no token configured",
        )

    async def stop(self) -> None:
        """Stop listening and drop every open status connection."""
        if self._sampler is not None:
            self._sampler.cancel()
        if self._server is not None:
            self._server.close()
        now = time.monotonic()
        for slot in self.slots.slots():
            self.slots.advance(slot, ConnState.CLOSED, now)
            self._end(slot, graceful=False)
        if self._server is not None:
            try:  # uvloop waits for every connection here; never let that hold the master up
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            except TimeoutError:
                log.warning("status endpoint: connections still closing at shutdown")

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            self.counters.sample(self.master.state)

    def _end(self, slot: Slot, graceful: bool) -> None:
        """Close the connection of a slot the table already closed, and cancel its task.

        ``graceful`` (a lingering connection, whose response is already in the kernel) closes
        the socket so the kernel still delivers that response; otherwise it is reset.
        """
        handle = self._handles.pop(slot, None)
        if handle is None:
            return
        if graceful:
            handle.writer.transport.close()
        else:
            handle.writer.transport.abort()
        handle.task.cancel()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        address = address_key(str(peer[0])) if isinstance(peer, tuple) and peer else "?"
        admission = self.slots.admit(address, time.monotonic())
        if admission.victim is not None:
            graceful = admission.reason is Reason.EVICTED_LINGERING
            self._end(admission.victim, graceful)
        slot = admission.slot
        if slot is None:
            log.debug("status endpoint: refused %s (%s)", address, admission.reason)
            writer.transport.abort()
            return
        self._handles[slot] = _Handle(task, writer)
        try:
            await self._serve(reader, writer, slot)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or would not read its response
        except asyncio.CancelledError:
            # Evicted or server stopping. Not re-raised: Python 3.11's start_server callback
            # calls task.exception(), which raises on a cancelled task.
            pass
        except Exception:
            log.exception("status request failed")  # a bug here must not reach the master
        finally:
            self._handles.pop(slot, None)
            self.slots.advance(slot, ConnState.CLOSED, time.monotonic())
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slot: Slot
    ) -> None:
        try:
            async with asyncio.timeout(REQUEST_READ_TIMEOUT_S):
                head = await self._read_head(reader)
        except TimeoutError:
            self.slots.count(Reason.REQUEST_TIMEOUT)
            await self._respond(reader, writer, slot, 408, "request head not received in time\n")
            return
        except BadRequest as e:
            await self._respond(reader, writer, slot, e.status, f"{e}\n")
            return
        if head is None:
            return  # closed before sending a request
        try:
            req = parse_request(head)
        except BadRequest as e:
            await self._respond(reader, writer, slot, e.status, f"{e}\n")
            return
        if not authorized(req.authorization, self._accepted):
            # Checked before routing: without a credential nothing about the endpoint leaks.
            self.slots.count(Reason.UNAUTHORIZED)
            await self._respond(
                reader,
                writer,
                slot,
                401,
                "a status credential is required: Authorization: Bearer <token>\n",
                [("WWW-Authenticate", 'Bearer realm="pccl-status"')],
            )
            return
        if req.path not in ("/status", "/metrics"):
            await self._respond(reader, writer, slot, 404, "not found: try /status or /metrics\n")
            return
        if req.method != "GET":
            await self._respond(
                reader, writer, slot, 405, "only GET is served\n", [("Allow", "GET")]
            )
            return
        ctype = JSON_CONTENT_TYPE if req.path == "/status" else PROMETHEUS_CONTENT_TYPE
        try:
            body = await self._render(req.path)
        except Exception:
            log.exception("building %s failed", req.path)
            await self._respond(reader, writer, slot, 500, "internal error\n")
            return
        await self._respond(reader, writer, slot, 200, body, [("Content-Type", ctype)])

    async def _render(self, path: str) -> bytes:
        """The document at ``path``, encoded, reused while younger than its cost allows.

        Requests arriving while a render is under way share it (one render per burst); the
        render itself yields to the loop between slices (:func:`status_body`,
        :func:`~pccl.master.metrics.metrics_body`), so the control plane never waits on it.
        """
        now = time.monotonic()
        cached = self._rendered.get(path)
        if cached is not None and now - cached[0] < cached[1] * RENDER_REUSE_FACTOR:
            return cached[2]
        pending = self._rendering.get(path)
        if pending is None:
            pending = asyncio.ensure_future(self._render_now(path, now))
            self._rendering[path] = pending
            pending.add_done_callback(lambda f: self._render_done(path, f))
        return await asyncio.shield(pending)

    def _render_done(self, path: str, fut: asyncio.Future[bytes]) -> None:
        self._rendering.pop(path, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: every client that waited got it; none may be left

    async def _render_now(self, path: str, now: float) -> bytes:
        cpu0 = time.thread_time()
        self.counters.sample(self.master.state)
        if path == "/status":
            body = await status_body(self.master, self.counters, now)
        else:
            body = await metrics_body(self.master, self.counters, now)
        # The cost is the loop time the render took (not its wall time, which the slices
        # interleaved with the control plane stretch).
        self._rendered[path] = (time.monotonic(), time.thread_time() - cpu0, body)
        return body

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
        buf = bytearray()
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                if buf.strip():
                    raise BadRequest(400, "connection closed inside the request head")
                return None
            buf += chunk
            end = _find_head_end(buf)
            if end is not None and end[0] <= MAX_HEAD_BYTES:
                return bytes(buf[: end[0]]).lstrip(b"\r\n")
            if len(buf) > MAX_HEAD_BYTES:
                raise BadRequest(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")

    async def _respond(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        slot: Slot,
        status: int,
        body: str | bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Write the response, then close gracefully.

        ``slot`` moves to ``RESPONDING`` (evictable once slow) and, once the response is in the
        kernel, to ``LINGERING`` (evictable at once) while the client closes.

        Raises:
            TimeoutError: the client did not take the response within
                :data:`RESPONSE_WRITE_TIMEOUT_S`.
            ConnectionError: the client reset the connection.
        """
        self.slots.advance(slot, ConnState.RESPONDING, time.monotonic())
        payload = body.encode() if isinstance(body, str) else body
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
        hdrs = headers or []
        if not any(k == "Content-Type" for k, _ in hdrs):
            hdrs = [*hdrs, ("Content-Type", "text/plain; charset=utf-8")]
        for k, v in hdrs:
            lines.append(f"{k}: {v}")
        lines += [
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        # drain() then returns only once everything reached the kernel, so closing below
        # never leaves a response in a transport buffer that a non-reading client would pin.
        writer.transport.set_write_buffer_limits(high=0)
        writer.writelines([head, payload])
        async with asyncio.timeout(RESPONSE_WRITE_TIMEOUT_S):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        self.slots.advance(slot, ConnState.LINGERING, time.monotonic())
        # Lingering close: closing with unread request bytes in the socket would reset the
        # connection and could destroy the response before the client read it (a 431 after an
        # oversized head, say). So read and discard until the client closes, bounded; the
        # slot is evictable meanwhile, so clients that never close cannot hold it.
        try:
            async with asyncio.timeout(LINGER_S):
                discarded = 0
                while discarded < LINGER_MAX_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    discarded += len(chunk)
        except TimeoutError:
            pass
        writer.close()
