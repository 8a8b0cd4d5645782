"""The master's ``/metrics`` document, through ``prometheus_client``.

:class:`MasterCollector` is a custom collector over the live daemon: every ``collect()`` reads
:class:`~pccl.master.state.MasterState` and the daemon's connections and yields metric
families; :class:`pccl.master.status.StatusServer` registers one in a per-master
``CollectorRegistry`` (never the process-wide default registry) and serves
``generate_latest(registry)``: Prometheus text exposition 0.0.4, names, escaping and number
formatting being the library's. Counters are emitted without ``_created`` samples. Runs on the
master's event loop; never touches tensor bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pccl.master.state import Phase
from pccl.master.status_conns import ConnState, Reason
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from pccl.master.daemon import Master
    from pccl.master.status import Counters

__all__ = ["MasterCollector", "metric_families", "metrics_text", "new_registry"]


def _round(x: float, digits: int = 3) -> float:
    return round(x, digits) if math.isfinite(x) else 0.0


def _family(
    name: str,
    kind: str,
    help_text: str,
    samples: list[tuple[dict[str, object], float]],
) -> Metric:
    """One family; every sample of it carries the same label names (in the same order)."""
    labels = list(samples[0][0]) if samples else []
    fam: CounterMetricFamily | GaugeMetricFamily
    if kind == "counter":
        fam = CounterMetricFamily(name, help_text, labels=labels)
    else:
        assert kind == "gauge", kind
        fam = GaugeMetricFamily(name, help_text, labels=labels)
    for lab, value in samples:
        assert list(lab) == labels, (name, lab)
        fam.add_metric([str(v) for v in lab.values()], float(value))
    return fam


def metric_families(master: Master, counters: Counters, now: float) -> list[Metric]:
    """The families of ``/metrics``: a pure function of the daemon's state.

    Args:
        master: the daemon (read only).
        counters: lifetime totals, already sampled.
        now: ``time.monotonic()`` of the request.

    Returns:
        ``prometheus_client`` metric families, in exposition order.
    """
    state = master.state
    server = master.status_server
    started = server.started if server is not None else now
    out: list[Metric] = []

    def family(
        name: str, kind: str, help_text: str, samples: list[tuple[dict[str, object], float]]
    ) -> None:
        out.append(_family(name, kind, help_text, samples))

    family(
        "pccl_master_uptime_seconds",
        "gauge",
        "Seconds since the master started.",
        [({}, _round(now - started))],
    )
    accepted = sum(1 for p in state.peers.values() if p.accepted)
    family(
        "pccl_peers",
        "gauge",
        "Registered peers by admission state.",
        [({"state": "accepted"}, accepted), ({"state": "pending"}, len(state.peers) - accepted)],
    )
    family(
        "pccl_connections",
        "gauge",
        "Open control connections, registered or not.",
        [({}, len(master.conns))],
    )
    family(
        "pccl_phase",
        "gauge",
        "1 for the master's current topology phase, 0 for the others.",
        [({"phase": ph.value}, int(state.phase is ph)) for ph in Phase],
    )
    family(
        "pccl_epoch",
        "gauge",
        "Current topology epoch id (a large integer: as a float64 sample it loses its low "
        "digits; /status has it exact).",
        [({}, state.epoch)],
    )
    family(
        "pccl_topology_changes_total",
        "counter",
        "Topology epochs announced since start.",
        [({}, counters.topology_changes(state))],
    )
    family(
        "pccl_collectives_completed_total",
        "counter",
        "Collective completions reported by peers since start (a collective of N peers "
        "counts N), including peers that have left.",
        [({}, counters.collectives_completed)],
    )
    family(
        "pccl_aborts_total",
        "counter",
        "Collectives aborted since start.",
        [({}, counters.aborts)],
    )
    family(
        "pccl_departures_total",
        "counter",
        "Peers gone since start, by kind: left (said so, e.g. on SIGTERM), timeout (silent), "
        "lost (connection broke: crashed or killed), kicked.",
        [({"kind": k}, n) for k, n in sorted(state.departures_total.items())],
    )
    family(
        "pccl_parity_violations_total",
        "counter",
        "Shared-state votes at the elected revision whose hashes differed from the elected "
        "content (a replica had diverged) since start.",
        [({}, state.parity_violations_total)],
    )
    family(
        "pccl_syncs_judged_total",
        "counter",
        "Shared-state syncs in which at least two peers voted at the elected revision (where "
        "parity could be judged) since start.",
        [({}, state.syncs_judged)],
    )
    groups = sorted(state.groups.items())
    family(
        "pccl_group_world_size",
        "gauge",
        "Peers in the group's current ring.",
        [({"group": g}, len(grp.ring)) for g, grp in groups],
    )
    family(
        "pccl_group_broken",
        "gauge",
        "1 when a ring member left and the ring awaits an update.",
        [({"group": g}, int(bool(grp.broken))) for g, grp in groups],
    )
    family(
        "pccl_group_ops_in_flight",
        "gauge",
        "Collectives initiated and not yet decided.",
        [({"group": g}, len(grp.ops)) for g, grp in groups],
    )
    family(
        "pccl_group_sync_in_progress",
        "gauge",
        "1 while a shared-state sync is running.",
        [({"group": g}, int(grp.sync is not None)) for g, grp in groups],
    )
    peers = sorted(state.peers.items())

    def per_peer(value: Any) -> list[tuple[dict[str, object], float]]:
        return [({"peer": pid, "group": rec.group}, value(pid, rec)) for pid, rec in peers]

    family(
        "pccl_peer_tx_bytes_total",
        "counter",
        "Payload bytes the peer sent in completed collectives (as it reported).",
        per_peer(lambda _pid, rec: rec.tx_bytes),
    )
    family(
        "pccl_peer_last_gbps",
        "gauge",
        "Send rate of the peer's last completed collective, in GB/s.",
        per_peer(lambda _pid, rec: rec.last_gbps if math.isfinite(rec.last_gbps) else 0.0),
    )
    family(
        "pccl_peer_collectives_completed_total",
        "counter",
        "Collectives the peer completed.",
        per_peer(lambda _pid, rec: rec.ops_done),
    )
    family(
        "pccl_peer_ops_in_flight",
        "gauge",
        "Collectives the peer initiated, not yet decided.",
        per_peer(lambda _pid, rec: len(rec.ops)),
    )
    family(
        "pccl_peer_accepted",
        "gauge",
        "1 once the peer is admitted into the run.",
        per_peer(lambda _pid, rec: int(rec.accepted)),
    )
    last_seen: list[tuple[dict[str, object], float]] = []
    for pid, rec in peers:
        conn = master.by_id.get(pid)
        if conn is not None:
            last_seen.append(({"peer": pid, "group": rec.group}, _round(now - conn.last_seen)))
    family(
        "pccl_peer_last_seen_seconds",
        "gauge",
        "Seconds since the master last heard from the peer.",
        last_seen,
    )
    if server is not None:
        table = server.slots
        family(
            "pccl_status_connections",
            "gauge",
            "Open connections to this status endpoint, by state.",
            [
                ({"state": st.value}, n)
                for st, n in table.by_state().items()
                if st is not ConnState.CLOSED
            ],
        )
        family(
            "pccl_status_connections_rejected_total",
            "counter",
            "Status connections refused, evicted for a newcomer, timed out or unauthorized.",
            [({"reason": r.value}, table.rejected[r]) for r in Reason],
        )
    family(
        "pccl_unauthenticated_connections",
        "gauge",
        "Control connections that have not proven the token yet (capped in all and per address).",
        [({}, len(master.unauthenticated))],
    )
    family(
        "pccl_unauthenticated_closed_total",
        "counter",
        "Control connections closed before authenticating: evicted at a cap, handshake timeout.",
        [({"reason": r}, n) for r, n in sorted(master.unauthenticated_closed.items())],
    )
    return out


class MasterCollector:
    """A ``prometheus_client`` collector over a live master (see the module docstring).

    Args:
        master: the daemon to report on (read only).
        counters: returns the lifetime totals to report (the status server's, already
            sampled by the caller of ``collect``).
        clock: the ``now`` of each collection (default ``time.monotonic``).
    """

    def __init__(
        self,
        master: Master,
        counters: Callable[[], Counters],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.master = master
        self.counters = counters
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        """The current families (read on the caller's thread: the master's loop)."""
        return iter(metric_families(self.master, self.counters(), self.clock()))


def new_registry(master: Master, counters: Callable[[], Counters]) -> CollectorRegistry:
    """A registry of its own for one master, holding its :class:`MasterCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(master, counters))
    return registry


def metrics_text(master: Master, counters: Counters, now: float) -> str:
    """The ``/metrics`` body at ``now``, in Prometheus text exposition format 0.0.4.

    Args:
        master: the daemon (read only).
        counters: lifetime totals, already sampled.
        now: ``time.monotonic()`` of the request.
    """
    collector = MasterCollector(master, lambda: counters, lambda: now)
    return generate_latest(collector).decode()
