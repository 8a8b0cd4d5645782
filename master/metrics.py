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

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pccl.master.optimize import link_samples
from pccl.master.state import Phase
from pccl.master.status_conns import ConnState, Reason
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from pccl.master.daemon import Master
    from pccl.master.status import Counters

__all__ = [
    "RENDER_SLICE",
    "MasterCollector",
    "metric_families",
    "metrics_body",
    "metrics_text",
    "new_registry",
]


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
    out = _head_families(master, counters, now)
    for spec_list, items, labels in (
        (GROUP_FAMILIES, sorted(state.groups.items()), _group_labels),
        (PEER_FAMILIES, sorted(state.peers.items()), _peer_labels),
    ):
        cols = _columns(master, spec_list, items, labels, now)
        for (name, kind, help_text, _), samples in zip(spec_list, cols, strict=True):
            out.append(_family(name, kind, help_text, samples))
    out.extend(_tail_families(master))
    return out


async def metrics_body(master: Master, counters: Counters, now: float) -> bytes:
    """``/metrics`` as :func:`metrics_text` renders it, built :data:`RENDER_SLICE` groups or
    peers at a time with the loop served between slices (10,000 peers are ~60,000 samples:
    a quarter of a second in one piece). A peer that leaves meanwhile still appears as it was
    when the render began (its record is kept by the snapshot).
    """
    state = master.state
    parts = [generate_latest(_Fixed(_head_families(master, counters, now)))]
    for spec_list, items, labels in (
        (GROUP_FAMILIES, sorted(state.groups.items()), _group_labels),
        (PEER_FAMILIES, sorted(state.peers.items()), _peer_labels),
    ):
        cols: list[list[Sample]] = [[] for _ in spec_list]
        for i in range(0, len(items), RENDER_SLICE):
            t0 = time.monotonic()
            for c, more in zip(
                cols, _columns(master, spec_list, items[i : i + RENDER_SLICE], labels, now)
            ):
                c.extend(more)
            t = time.monotonic()
            master.steps.note(t - t0, t)
            await asyncio.sleep(0)
        for (name, kind, help_text, _), samples in zip(spec_list, cols, strict=True):
            for i in range(0, max(len(samples), 1), RENDER_SLICE):
                t0 = time.monotonic()
                text = generate_latest(
                    _Fixed([_family(name, kind, help_text, samples[i : i + RENDER_SLICE])])
                )
                # Later slices of a family repeat its HELP and TYPE lines: drop them.
                parts.append(text.split(b"\n", 2)[2] if i else text)
                t = time.monotonic()
                master.steps.note(t - t0, t)
                await asyncio.sleep(0)
    parts.append(generate_latest(_Fixed(_tail_families(master))))
    return b"".join(parts)


class _Fixed:
    """A collector over families built beforehand (for ``generate_latest``)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


Sample = tuple[dict[str, object], float]
#: A per-group or per-peer family: name, kind, help, value(master, key, item, now) (``None``:
#: no sample for this one).
Spec = tuple[str, str, str, Callable[["Master", int, Any, float], "float | None"]]
#: Groups or peers handled per loop step by :func:`metrics_body`.
RENDER_SLICE = 512


def _columns(
    master: Master,
    specs: list[Spec],
    items: list[tuple[int, Any]],
    labels: Callable[[int, Any], dict[str, object]],
    now: float,
) -> list[list[Sample]]:
    """One sample list per spec over ``items`` (``(id, record)`` pairs)."""
    cols: list[list[Sample]] = [[] for _ in specs]
    for key, item in items:
        lab = labels(key, item)
        for col, (_, _, _, value) in zip(cols, specs, strict=True):
            v = value(master, key, item, now)
            if v is not None:
                col.append((lab, v))
    return cols


def _group_labels(gid: int, _grp: Any) -> dict[str, object]:
    return {"group": gid}


def _peer_labels(pid: int, rec: Any) -> dict[str, object]:
    return {"peer": pid, "group": rec.group}


def _last_seen(master: Master, pid: int, _rec: Any, now: float) -> float | None:
    conn = master.by_id.get(pid)
    return None if conn is None else _round(now - conn.last_seen)


GROUP_FAMILIES: list[Spec] = [
    (
        "pccl_group_world_size",
        "gauge",
        "Peers in the group's current ring.",
        lambda _m, _g, grp, _n: len(grp.ring),
    ),
    (
        "pccl_group_broken",
        "gauge",
        "1 when a ring member left and the ring awaits an update.",
        lambda _m, _g, grp, _n: int(bool(grp.broken)),
    ),
    (
        "pccl_group_ops_in_flight",
        "gauge",
        "Collectives initiated and not yet decided.",
        lambda _m, _g, grp, _n: len(grp.ops),
    ),
    (
        "pccl_group_sync_in_progress",
        "gauge",
        "1 while a shared-state sync is running.",
        lambda _m, _g, grp, _n: int(grp.sync is not None),
    ),
]
PEER_FAMILIES: list[Spec] = [
    (
        "pccl_peer_tx_bytes_total",
        "counter",
        "Payload bytes the peer sent in completed collectives (as it reported).",
        lambda _m, _p, rec, _n: rec.tx_bytes,
    ),
    (
        "pccl_peer_last_gbps",
        "gauge",
        "Send rate of the peer's last completed collective, in GB/s.",
        lambda _m, _p, rec, _n: rec.last_gbps if math.isfinite(rec.last_gbps) else 0.0,
    ),
    (
        "pccl_peer_collectives_completed_total",
        "counter",
        "Collectives the peer completed.",
        lambda _m, _p, rec, _n: rec.ops_done,
    ),
    (
        "pccl_peer_ops_in_flight",
        "gauge",
        "Collectives the peer initiated, not yet decided.",
        lambda _m, _p, rec, _n: len(rec.ops),
    ),
    (
        "pccl_peer_accepted",
        "gauge",
        "1 once the peer is admitted into the run.",
        lambda _m, _p, rec, _n: int(rec.accepted),
    ),
    (
        "pccl_peer_last_seen_seconds",
        "gauge",
        "Seconds since the master last heard from the peer.",
        _last_seen,
    ),
]


def _head_families(master: Master, counters: Counters, now: float) -> list[Metric]:
    """The run-wide families, first in the exposition."""
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
    family(
        "pccl_master_loop_lag_seconds",
        "gauge",
        "Longest delay of the master's event loop behind a timer in the last 10 s (a stall or "
        "a backlog of ready work).",
        [({}, _round(master.lag.recent(now), 6))],
    )
    family(
        "pccl_master_step_seconds",
        "gauge",
        "Longest single step the master's loop ran in the last 10 s (one connection's input, "
        "one heartbeat or render slice, one tick).",
        [({}, _round(master.steps.recent(now), 6))],
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
    kv = master.kv
    family(
        "pccl_kv_entries",
        "gauge",
        "Keys in the key-value channel (run and group scopes).",
        [({}, len(kv.entries))],
    )
    family(
        "pccl_kv_bytes",
        "gauge",
        "Bytes the key-value entries are charged (keys, values, bookkeeping).",
        [({}, kv.bytes)],
    )
    family(
        "pccl_kv_max_bytes",
        "gauge",
        "Bound on the key-value entries together.",
        [({}, kv.max_bytes)],
    )
    family(
        "pccl_kv_waiters",
        "gauge",
        "Key-value reads waiting for a value.",
        [({}, sum(len(w) for w in kv.waiters.values()))],
    )
    family(
        "pccl_kv_requests_total",
        "counter",
        "Key-value requests answered, by operation and outcome.",
        [({"op": op, "status": st}, n) for (op, st), n in sorted(kv.requests.items())],
    )
    return out


def _tail_families(master: Master) -> list[Metric]:
    """The families after the per-peer ones: status and control connection counts."""
    server = master.status_server
    out: list[Metric] = []

    def family(
        name: str, kind: str, help_text: str, samples: list[tuple[dict[str, object], float]]
    ) -> None:
        out.append(_family(name, kind, help_text, samples))

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
    for name, kind, help_text, samples in link_samples(master.state.optimizer):
        family(name, kind, help_text, samples)
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
