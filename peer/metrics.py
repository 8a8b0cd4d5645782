"""Per-communicator metrics: what one peer did, as plain numbers and as Prometheus exposition.

:class:`PeerMetrics` holds counters (all-reduces completed, aborted and retried, their payload
bytes, shared-state syncs and the bytes they moved, quorum-gate decisions) and an all-reduce
latency histogram. The communicator's facade records into it when an operation ends (on the
communicator's event loop); :meth:`PeerMetrics.snapshot` is ``Communicator.metrics()``, and
:meth:`PeerMetrics.collect` makes it a ``prometheus_client`` collector, registered in a
registry of its own per communicator (never the process-wide default). :class:`MetricsServer`
serves that registry's exposition over HTTP on 127.0.0.1 from a ``prometheus_client`` server
thread, until :meth:`MetricsServer.stop`.

Readers on other threads (a scrape, ``pccl.Communicator.metrics()``) read plain attributes
without a lock: each number is whole, but a read racing the loop may see one operation's
counters half-recorded (its count and not yet its bytes); the next read is consistent.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from pccl.types import ReduceInfo, SyncInfo

__all__ = ["LATENCY_BUCKETS_S", "Live", "MetricsServer", "PeerMetrics"]

#: Upper bounds (seconds) of the all-reduce latency histogram's buckets; ``+Inf`` is implied.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
#: How many distinct tags whose last attempt failed are remembered (to count retries).
FAILED_TAG_MEMORY = 1024


@dataclass
class Live:
    """Numbers read from the communicator's parts at collection time (not recorded here)."""

    group_world_size: int = 0
    stale_frames: int = 0
    #: p2p connections by outcome (``P2PNode.stats``: accepted, authenticated, rejected...)
    p2p: Mapping[str, int] = field(default_factory=dict)
    #: payload bytes sent per stream index to the ring successor (``P2PNode.stream_tx_bytes``)
    stream_tx: Mapping[int, int] = field(default_factory=dict)


class PeerMetrics:
    """What one communicator did (see the module docstring).

    Args:
        live: called at each snapshot or collection for the numbers the communicator's parts
            keep themselves (group size, stale frames, p2p connection outcomes); None: zeros.
    """

    def __init__(self, live: Callable[[], Live] | None = None) -> None:
        self._live = live or Live
        self.all_reduce_completed = 0
        self.all_reduce_aborted = 0
        self.all_reduce_retried = 0
        self.all_reduce_tx_bytes = 0
        self.all_reduce_rx_bytes = 0
        self.all_reduce_seconds_sum = 0.0
        self.all_reduce_seconds_last = 0.0
        #: non-cumulative counts per bucket of :data:`LATENCY_BUCKETS_S`, then ``+Inf``
        self.all_reduce_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.state_syncs = 0
        self.state_syncs_failed = 0
        self.state_transfers = 0
        self.state_tx_bytes = 0
        self.state_rx_bytes = 0
        self.gates_included = 0
        self.gates_excluded = 0
        self.gates_aborted = 0
        self._failed_tags: collections.OrderedDict[int, None] = collections.OrderedDict()

    # ------------------------------------------------------------------ recording (loop)

    def all_reduce_started(self, tag: int) -> None:
        """An attempt of ``tag`` begins: a retry when the last attempt of ``tag`` failed."""
        if tag in self._failed_tags:
            del self._failed_tags[tag]
            self.all_reduce_retried += 1

    def all_reduce_done(self, tag: int, info: ReduceInfo | None) -> None:
        """An attempt of ``tag`` ended: ``info`` when it completed, None when it raised
        (aborted, refused, timed out, cancelled, verdict unknown)."""
        if info is None:
            self.all_reduce_aborted += 1
            self._failed_tags[tag] = None
            self._failed_tags.move_to_end(tag)
            while len(self._failed_tags) > FAILED_TAG_MEMORY:
                self._failed_tags.popitem(last=False)
            return
        self.all_reduce_completed += 1
        self.all_reduce_tx_bytes += info.tx_bytes
        self.all_reduce_rx_bytes += info.rx_bytes
        secs = info.seconds if math.isfinite(info.seconds) and info.seconds >= 0 else 0.0
        self.all_reduce_seconds_sum += secs
        self.all_reduce_seconds_last = secs
        i = next((i for i, le in enumerate(LATENCY_BUCKETS_S) if secs <= le), -1)
        self.all_reduce_buckets[i] += 1

    def sync_done(self, info: SyncInfo | None) -> None:
        """A shared-state sync ended: ``info`` when it completed, None when it raised."""
        if info is None:
            self.state_syncs_failed += 1
            return
        self.state_syncs += 1
        if info.tx_bytes or info.rx_bytes:
            self.state_transfers += 1
        self.state_tx_bytes += info.tx_bytes
        self.state_rx_bytes += info.rx_bytes

    def gate_done(self, included: bool | None) -> None:
        """A quorum-gate arrival was decided (``included``: this peer is in the round) or
        failed (None: refused, withdrawn, link lost)."""
        if included is None:
            self.gates_aborted += 1
        elif included:
            self.gates_included += 1
        else:
            self.gates_excluded += 1

    # ------------------------------------------------------------------ reading (any thread)

    def snapshot(self) -> dict[str, int | float]:
        """Every number by name (plain ints and floats; see ``Communicator.metrics``)."""
        live = self._live()
        out: dict[str, int | float] = {
            "all_reduce_completed": self.all_reduce_completed,
            "all_reduce_aborted": self.all_reduce_aborted,
            "all_reduce_retried": self.all_reduce_retried,
            "all_reduce_tx_bytes": self.all_reduce_tx_bytes,
            "all_reduce_rx_bytes": self.all_reduce_rx_bytes,
            "all_reduce_seconds_sum": self.all_reduce_seconds_sum,
            "all_reduce_seconds_count": sum(self.all_reduce_buckets),
            "all_reduce_seconds_last": self.all_reduce_seconds_last,
            "state_syncs": self.state_syncs,
            "state_syncs_failed": self.state_syncs_failed,
            "state_transfers": self.state_transfers,
            "state_tx_bytes": self.state_tx_bytes,
            "state_rx_bytes": self.state_rx_bytes,
            "gates_included": self.gates_included,
            "gates_excluded": self.gates_excluded,
            "gates_aborted": self.gates_aborted,
            "group_world_size": live.group_world_size,
            "stale_frames": live.stale_frames,
        }
        for outcome, n in sorted(dict(live.p2p).items()):
            out[f"p2p_{outcome}"] = n
        for index, n in sorted(dict(live.stream_tx).items()):
            out[f"stream_tx_bytes_{index}"] = n
        return out

    def collect(self) -> Iterator[Metric]:
        """The families of this communicator's ``/metrics`` (a ``prometheus_client`` collector)."""
        snap = self.snapshot()

        def counter(name: str, help_text: str, value: float) -> Metric:
            return CounterMetricFamily(name, help_text, value=value)

        yield counter(
            "pccl_comm_all_reduce_completed_total",
            "All-reduces this peer completed.",
            snap["all_reduce_completed"],
        )
        yield counter(
            "pccl_comm_all_reduce_aborted_total",
            "All-reduces that raised here: aborted, refused, timed out, cancelled or verdict "
            "unknown.",
            snap["all_reduce_aborted"],
        )
        yield counter(
            "pccl_comm_all_reduce_retried_total",
            "All-reduces started for a tag whose previous attempt here had failed.",
            snap["all_reduce_retried"],
        )
        yield counter(
            "pccl_comm_all_reduce_tx_bytes_total",
            "Payload bytes this peer sent in completed all-reduces (what it reports to the "
            "master).",
            snap["all_reduce_tx_bytes"],
        )
        yield counter(
            "pccl_comm_all_reduce_rx_bytes_total",
            "Payload bytes this peer received in completed all-reduces.",
            snap["all_reduce_rx_bytes"],
        )
        cumulative = []
        total = 0
        for le, n in zip((*LATENCY_BUCKETS_S, math.inf), list(self.all_reduce_buckets)):
            total += n
            cumulative.append((floatToGoString(le), total))
        yield HistogramMetricFamily(
            "pccl_comm_all_reduce_seconds",
            "Seconds of completed all-reduces, from the master's go to the result here.",
            buckets=cumulative,
            sum_value=self.all_reduce_seconds_sum,
        )
        yield counter(
            "pccl_comm_state_syncs_total",
            "Shared-state syncs this peer completed.",
            snap["state_syncs"],
        )
        yield counter(
            "pccl_comm_state_syncs_failed_total",
            "Shared-state syncs that raised here.",
            snap["state_syncs_failed"],
        )
        yield counter(
            "pccl_comm_state_transfers_total",
            "Completed shared-state syncs in which this peer sent or received entries.",
            snap["state_transfers"],
        )
        yield counter(
            "pccl_comm_state_tx_bytes_total",
            "Shared-state bytes this peer served to others in completed syncs.",
            snap["state_tx_bytes"],
        )
        yield counter(
            "pccl_comm_state_rx_bytes_total",
            "Shared-state bytes this peer fetched in completed syncs.",
            snap["state_rx_bytes"],
        )
        gates = CounterMetricFamily(
            "pccl_comm_quorum_gates_total",
            "Quorum-gate arrivals by outcome: included (in the round), excluded (decided "
            "without this peer), aborted (refused, withdrawn or failed).",
            labels=["outcome"],
        )
        for outcome in ("included", "excluded", "aborted"):
            gates.add_metric([outcome], snap[f"gates_{outcome}"])
        yield gates
        yield GaugeMetricFamily(
            "pccl_comm_group_world_size",
            "Peers in this peer's group ring (0 before connect).",
            value=snap["group_world_size"],
        )
        yield counter(
            "pccl_comm_stale_frames_total",
            "Frames of aborted or finished operations that were discarded.",
            snap["stale_frames"],
        )
        p2p = CounterMetricFamily(
            "pccl_comm_p2p_connections_total",
            "p2p connections to this peer by outcome (accepted, authenticated, rejected, ...).",
            labels=["outcome"],
        )
        for key, value in snap.items():
            if key.startswith("p2p_"):
                p2p.add_metric([key[4:]], value)
        yield p2p
        streams = CounterMetricFamily(
            "pccl_comm_stream_tx_bytes_total",
            "Payload bytes sent to the ring successor, by stream index (striping balance).",
            labels=["stream"],
        )
        for key, value in snap.items():
            if key.startswith("stream_tx_bytes_"):
                streams.add_metric([key[16:]], value)
        yield streams

    def registry(self) -> CollectorRegistry:
        """A new registry holding only this communicator's collector."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry

    def exposition(self) -> bytes:
        """Prometheus text exposition (format 0.0.4) of this communicator."""
        return generate_latest(self)


class MetricsServer:
    """``GET /metrics`` for one registry, on 127.0.0.1, served by a ``prometheus_client`` thread.

    Args:
        registry: what to expose.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        host: address to listen on.

    Raises:
        OSError: the address cannot be bound (at construction: before any other I/O).
    """

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"metrics_port must be within 0..65535, got {port!r}")
        server, thread = start_http_server(port, host, registry=registry)
        self._server: WSGIServer | None = server
        self._thread: threading.Thread | None = thread
        self.host = host
        self.port: int = server.server_port

    def stop(self) -> None:
        """Stop serving and release the port (idempotent; blocks up to ~0.5 s, the serving
        thread's poll interval)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def serving(self) -> bool:
        return self._server is not None
