"""The master's ``/metrics`` document: Prometheus text exposition (format 0.0.4).

A pure function of the daemon's state (:func:`metrics_text`), served by
:class:`pccl.master.status.StatusServer`. Runs on the master's event loop; never touches
tensor bytes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pccl.master.state import Phase
from pccl.master.status_conns import ConnState, Reason

if TYPE_CHECKING:
    from pccl.master.daemon import Master
    from pccl.master.status import Counters

__all__ = ["metrics_text"]


def _round(x: float, digits: int = 3) -> float:
    return round(x, digits) if math.isfinite(x) else 0.0


def _label_value(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Exposition:
    """Builds Prometheus text exposition (format 0.0.4), one family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: list[tuple[dict[str, object], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{inner}}} {_sample_value(value)}")
            else:
                self.lines.append(f"{name} {_sample_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def metrics_text(master: Master, counters: Counters, now: float) -> str:
    """The ``/metrics`` body in Prometheus text exposition format 0.0.4.

    Args:
        master: the daemon (read only).
        counters: lifetime totals, already sampled.
        now: ``time.monotonic()`` of the request.
    """
    state = master.state
    server = master.status_server
    started = server.started if server is not None else now
    e = _Exposition()
    e.family(
        "pccl_master_uptime_seconds",
        "gauge",
        "Seconds since the master started.",
        [({}, _round(now - started))],
    )
    accepted = sum(1 for p in state.peers.values() if p.accepted)
    e.family(
        "pccl_peers",
        "gauge",
        "Registered peers by admission state.",
        [({"state": "accepted"}, accepted), ({"state": "pending"}, len(state.peers) - accepted)],
    )
    e.family(
        "pccl_connections",
        "gauge",
        "Open control connections, registered or not.",
        [({}, len(master.conns))],
    )
    e.family(
        "pccl_phase",
        "gauge",
        "1 for the master's current topology phase, 0 for the others.",
        [({"phase": ph.value}, int(state.phase is ph)) for ph in Phase],
    )
    e.family(
        "pccl_epoch",
        "gauge",
        "Current topology epoch id (a large integer; float64 scrapers lose its low digits).",
        [({}, state.epoch)],
    )
    e.family(
        "pccl_topology_changes_total",
        "counter",
        "Topology epochs announced since start.",
        [({}, counters.topology_changes(state))],
    )
    e.family(
        "pccl_collectives_completed_total",
        "counter",
        "Collective completions reported by peers since start (a collective of N peers "
        "counts N), including peers that have left.",
        [({}, counters.collectives_completed)],
    )
    e.family(
        "pccl_aborts_total",
        "counter",
        "Collectives aborted since start.",
        [({}, counters.aborts)],
    )
    e.family(
        "pccl_departures_total",
        "counter",
        "Peers gone since start, by kind: left (said so, e.g. on SIGTERM), timeout (silent), "
        "lost (connection broke: crashed or killed), kicked.",
        [({"kind": k}, n) for k, n in sorted(state.departures_total.items())],
    )
    groups = sorted(state.groups.items())
    e.family(
        "pccl_group_world_size",
        "gauge",
        "Peers in the group's current ring.",
        [({"group": g}, len(grp.ring)) for g, grp in groups],
    )
    e.family(
        "pccl_group_broken",
        "gauge",
        "1 when a ring member left and the ring awaits an update.",
        [({"group": g}, int(bool(grp.broken))) for g, grp in groups],
    )
    e.family(
        "pccl_group_ops_in_flight",
        "gauge",
        "Collectives initiated and not yet decided.",
        [({"group": g}, len(grp.ops)) for g, grp in groups],
    )
    e.family(
        "pccl_group_sync_in_progress",
        "gauge",
        "1 while a shared-state sync is running.",
        [({"group": g}, int(grp.sync is not None)) for g, grp in groups],
    )
    peers = sorted(state.peers.items())

    def per_peer(value: Any) -> list[tuple[dict[str, object], float]]:
        return [({"peer": pid, "group": rec.group}, value(pid, rec)) for pid, rec in peers]

    e.family(
        "pccl_peer_tx_bytes_total",
        "counter",
        "Payload bytes the peer sent in completed collectives (as it reported).",
        per_peer(lambda _pid, rec: rec.tx_bytes),
    )
    e.family(
        "pccl_peer_last_gbps",
        "gauge",
        "Send rate of the peer's last completed collective, in GB/s.",
        per_peer(lambda _pid, rec: rec.last_gbps if math.isfinite(rec.last_gbps) else 0.0),
    )
    e.family(
        "pccl_peer_collectives_completed_total",
        "counter",
        "Collectives the peer completed.",
        per_peer(lambda _pid, rec: rec.ops_done),
    )
    e.family(
        "pccl_peer_ops_in_flight",
        "gauge",
        "Collectives the peer initiated, not yet decided.",
        per_peer(lambda _pid, rec: len(rec.ops)),
    )
    e.family(
        "pccl_peer_accepted",
        "gauge",
        "1 once the peer is admitted into the run.",
        per_peer(lambda _pid, rec: int(rec.accepted)),
    )
    last_seen = []
    for pid, rec in peers:
        conn = master.by_id.get(pid)
        if conn is not None:
            last_seen.append(({"peer": pid, "group": rec.group}, _round(now - conn.last_seen)))
    e.family(
        "pccl_peer_last_seen_seconds",
        "gauge",
        "Seconds since the master last heard from the peer.",
        last_seen,
    )
    if server is not None:
        table = server.slots
        e.family(
            "pccl_status_connections",
            "gauge",
            "Open connections to this status endpoint, by state.",
            [
                ({"state": st.value}, n)
                for st, n in table.by_state().items()
                if st is not ConnState.CLOSED
            ],
        )
        e.family(
            "pccl_status_connections_rejected_total",
            "counter",
            "Status connections refused, evicted for a newcomer, timed out or unauthorized.",
            [({"reason": r.value}, table.rejected[r]) for r in Reason],
        )
    e.family(
        "pccl_unauthenticated_connections",
        "gauge",
        "Control connections that have not proven the token yet (capped in all and per address).",
        [({}, len(master.unauthenticated))],
    )
    e.family(
        "pccl_unauthenticated_closed_total",
        "counter",
        "Control connections closed before authenticating: evicted at a cap, handshake timeout.",
        [({"reason": r}, n) for r, n in sorted(master.unauthenticated_closed.items())],
    )
    return e.text()
