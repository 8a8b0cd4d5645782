"""The ``optimize_topology()`` vote: measure a group's links, solve its ring, re-wire if it pays.

Per group, an :class:`OptRound` moves through :class:`OptPhase`: ``VOTING`` (accepted peers call
``optimize_topology()``; unanimous, like ``update_topology()``), ``PROBING`` (each member got its
``M2P_PROBE_PLAN`` for the pairs the :class:`~pccl.master.topology.LinkTable` lacks or holds too
old; waiting for their ``P2M_PROBE_REPORT``), then a decision: the solver's order becomes a new
epoch when its predicted bottleneck beats the current ring's by at least ``min_gain`` (the largest
any voter asked for), else the voters get ``TopologyDone(ok=True)`` for the epoch they have
("order kept"). A departure, a refused vote or a missed deadline ends the round with
``TopologyDone(ok=False)``: the caller's ``TopologyUpdateFailed`` (retryable), never a hang.

With ``Config.auto_optimize_topology`` an ``update_topology()`` vote goes through the same
probing (pending newcomers probe and are probed too) before its epoch is announced, and the epoch
takes the solver's order.

What it costs: probing sends at most ``max_bytes`` per directed pair and lasts about
``probe_time_s`` per round; ``n - 1`` rounds for ``n`` peers (``n`` when odd), only for pairs
not cached. Re-wiring is one epoch set-up: every peer closes its streams to the old successor
and dials the new one (one connect and hello per stream, a few RTTs), during which collectives
are refused. The solve is exact up to 9 peers (<= 20,160 orders, ~0.06 s) and runs on the
master's loop; above, the heuristic (bounded by a move budget: ~0.5 s at 32 peers, ~1 s at 256)
runs in a worker thread (phase ``SOLVING``) so the loop keeps serving every other group; a
departure meanwhile abandons the round and its result is dropped. Groups above
``MAX_OPTIMIZE_PEERS`` are refused.

Runs on the master's event-loop thread; owned by :class:`pccl.master.state.MasterState`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pccl.master.topology import (
    EXACT_MAX,
    LinkTable,
    RingPlan,
    evaluate,
    probe_rounds,
    solve_ring,
)

from pccl import messages as m

if TYPE_CHECKING:
    from pccl.master.state import GroupState, MasterState

log = logging.getLogger("pccl.master")

__all__ = ["MAX_OPTIMIZE_PEERS", "OptPhase", "OptRound", "Optimizer"]

#: Largest group whose ring is optimised (probing is quadratic in the group's size).
MAX_OPTIMIZE_PEERS = 256


class OptPhase(enum.Enum):
    """Phase of one group's optimisation round."""

    VOTING = "voting"  #: accepted peers are voting optimize_topology()
    PROBING = "probing"  #: plans sent; waiting for the members' reports
    SOLVING = "solving"  #: the heuristic runs in a worker thread (groups above EXACT_MAX)


@dataclass
class OptRound:
    """One optimisation of a group, from its first vote to its decision."""

    phase: OptPhase = OptPhase.VOTING
    voters: set[int] = field(default_factory=set)
    min_gain: float = 0.0
    reprobe: bool = False
    auto: bool = False  # started by an update_topology() vote (auto_optimize_topology)
    round_id: int = 0
    members: tuple[int, ...] = ()
    waiting: set[int] = field(default_factory=set)  # members whose report is due
    opened: float = field(default_factory=time.monotonic)
    probe_started: float = 0.0
    deadline: float = 0.0


class Optimizer:
    """Link estimates and optimisation rounds of every group (see the module docstring)."""

    def __init__(self, state: MasterState) -> None:
        self.state = state
        self.table = LinkTable()
        self.rounds: dict[int, OptRound] = {}
        self._next_round = 1
        self.last: dict[int, dict[str, Any]] = {}  # group -> last decision, for /status
        self.rewired = 0
        self.kept = 0
        self.failed = 0

    @property
    def config(self) -> Any:
        return self.state.config

    def busy(self, gid: int) -> bool:
        """Whether ``gid`` is probing or solving (its epoch waits for the decision)."""
        rnd = self.rounds.get(gid)
        return rnd is not None and rnd.phase in (OptPhase.PROBING, OptPhase.SOLVING)

    # ------------------------------------------------------------------ votes

    def on_vote(self, pid: int, msg: m.OptimizeTopology) -> None:
        s = self.state
        rec = s.peers[pid]
        grp = s.groups[rec.group]
        why = ""
        if not rec.accepted:
            why = "not accepted into the run yet"
        elif rec.ops:
            why = f"collectives outstanding (tags {sorted(rec.ops)})"
        elif grp.phase.value != "idle" or self.busy(rec.group):
            why = "the topology is changing"
        elif grp.broken:
            why = f"{grp.broken}; call update_topology() first"
        elif len(grp.accepted) > MAX_OPTIMIZE_PEERS:
            why = f"groups above {MAX_OPTIMIZE_PEERS} peers are not optimised"
        if why:
            s._send(pid, m.TopologyDone(grp.epoch, False, f"optimize_topology refused: {why}"))
            return
        rnd = self.rounds.get(rec.group)
        if rnd is None:
            rnd = self.rounds[rec.group] = OptRound()
        rnd.voters.add(pid)
        rnd.min_gain = max(rnd.min_gain, msg.min_gain)
        rnd.reprobe = rnd.reprobe or msg.reprobe
        if all(q in rnd.voters for q in grp.accepted):
            members = tuple(sorted(grp.accepted))
            self._probe(rec.group, rnd, members)

    def intercept_update(self, gid: int, grp: GroupState) -> bool:
        """An update_topology() vote completed: with ``auto_optimize_topology``, probe the
        members' unmeasured links first (True: the epoch waits for :meth:`_decide`)."""
        if not self.config.auto_optimize_topology or gid in self.rounds:
            return False
        if len(grp.members) > MAX_OPTIMIZE_PEERS or len(grp.members) < 3:
            return False
        members = tuple(sorted(grp.members))
        if not self.table.missing(members, self.config.probe_max_age_s):
            return False
        rnd = self.rounds[gid] = OptRound(auto=True, voters=set(grp.voters))
        self._probe(gid, rnd, members)
        return True

    def order_for_epoch(self, gid: int, grp: GroupState, default: list[int]) -> list[int]:
        """The ring of an epoch an update_topology() vote starts: the solver's order over the
        members when ``auto_optimize_topology`` is on and every link among them is measured,
        else ``default`` (incumbents' order, newcomers by id)."""
        if not self.config.auto_optimize_topology or len(default) < 3:
            return default
        if len(default) > MAX_OPTIMIZE_PEERS or self.table.missing(default, 0):
            return default
        return list(self._solve(default).order)

    # ------------------------------------------------------------------ probing

    def _probe(self, gid: int, rnd: OptRound, members: tuple[int, ...]) -> None:
        s = self.state
        cfg = self.config
        rnd.members = members
        rnd.round_id = self._next_round
        self._next_round += 1
        age = 0.0 if rnd.reprobe else cfg.probe_max_age_s
        wanted = set(self.table.missing(members, age) if not rnd.reprobe else [])
        if rnd.reprobe:
            wanted = {(a, b) for i, a in enumerate(members) for b in members[i + 1 :]}
        rounds = [[p for p in r if p in wanted] for r in probe_rounds(members)]
        rounds = [r for r in rounds if r]
        if not rounds:
            self._decide(gid, rnd)
            return
        rnd.phase = OptPhase.PROBING
        rnd.probe_started = time.monotonic()
        # a probe, and a parallel re-probe of a window-bound link (pccl.peer.probe)
        per_round = 2 * (3 * cfg.probe_time_s + cfg.handshake_timeout_s) + 1.0
        rnd.deadline = rnd.probe_started + len(rounds) * per_round + cfg.heartbeat_timeout_s
        plans: dict[int, list[tuple[int, str, int]]] = {q: [] for q in members}
        for r in rounds:
            busy: dict[int, int] = {}
            for a, b in r:
                busy[a], busy[b] = b, a
            for q in members:
                partner = busy.get(q, 0)
                if partner:
                    p = s.peers[partner]
                    plans[q].append((partner, p.host, p.port))
                else:
                    plans[q].append((0, "", 0))
        log.info(
            "group %d: probing %d links of %d peers in %d rounds (round %d)",
            gid,
            len(wanted),
            len(members),
            len(rounds),
            rnd.round_id,
        )
        for q, targets in plans.items():
            if any(t[0] for t in targets):
                rnd.waiting.add(q)
                plan = m.ProbePlan(rnd.round_id, cfg.probe_max_bytes, cfg.probe_time_s, targets)
                s._send(q, plan)

    def on_report(self, pid: int, msg: m.ProbeReport) -> None:
        rec = self.state.peers[pid]
        rnd = self.rounds.get(rec.group)
        if rnd is None or rnd.round_id != msg.round_id or pid not in rnd.waiting:
            return  # a report of a round already decided or abandoned
        now = time.monotonic()
        members = set(rnd.members)
        for target, gbps, rtt_ms in msg.links:
            if target in members and target != pid and gbps >= 0 and rtt_ms >= 0:
                self.table.record_probe(pid, target, gbps, rtt_ms, now)
        if not msg.ok:
            log.warning(
                "group %d: peer %d could not probe every link: %s", rec.group, pid, msg.reason
            )
        rnd.waiting.discard(pid)
        if not rnd.waiting:
            self.table.probes += 1
            self.table.probe_seconds = now - rnd.probe_started
            self._decide(rec.group, rnd)

    # ------------------------------------------------------------------ decision

    def _solve(self, members: Any) -> RingPlan:
        g, r = self.table.weights(members)
        return solve_ring(members, g, r)

    def _decide(self, gid: int, rnd: OptRound) -> None:
        """Solve the round's ring: at once for small groups (or without a running loop, as in
        the pure state-machine tests), else in a worker thread (see the module docstring)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or len(rnd.members) <= EXACT_MAX:
            t0 = time.process_time()
            plan = self._solve(rnd.members)
            self._apply(gid, rnd, plan, time.process_time() - t0)
            return
        rnd.phase = OptPhase.SOLVING
        g, r = self.table.weights(rnd.members)  # fresh maps: the thread shares nothing
        t0 = time.monotonic()
        fut = loop.run_in_executor(None, functools.partial(solve_ring, rnd.members, g, r))

        def solved(f: asyncio.Future[RingPlan]) -> None:
            if f.cancelled():
                return
            err = f.exception()
            if self.rounds.get(gid) is not rnd or rnd.phase is not OptPhase.SOLVING:
                return  # abandoned meanwhile (a departure): nobody waits for this order
            if err is not None:
                self._abort(gid, f"the ring solver failed: {err!r}")
                return
            self._apply(gid, rnd, f.result(), time.monotonic() - t0)

        fut.add_done_callback(solved)

    def _apply(self, gid: int, rnd: OptRound, plan: RingPlan, solve_s: float) -> None:
        s = self.state
        grp = s.groups.get(gid)
        self.rounds.pop(gid, None)
        if grp is None:
            return
        g, r = self.table.weights(rnd.members)
        current = [q for q in grp.ring if q in set(rnd.members)]
        now_low, _ = evaluate(current, g, r) if len(current) == len(rnd.members) else (0, 0)
        gain = plan.bottleneck_gbps / now_low - 1 if now_low > 0 else float("inf")
        self.last[gid] = {
            "order": list(plan.order),
            "predicted_gbps": round(plan.bottleneck_gbps, 4),
            "current_gbps": round(now_low, 4),
            "gain": None if gain == float("inf") else round(gain, 4),
            "exact": plan.exact,
            "solve_s": round(solve_s, 4),
            "probe_s": round(self.table.probe_seconds, 3),
            "at": time.time(),
        }
        if rnd.auto:
            self.last[gid]["decision"] = "update"
            s._start_epoch(gid, grp, order=list(plan.order))
            return
        same = tuple(current) == plan.order
        if not same and gain >= rnd.min_gain:
            self.rewired += 1
            self.last[gid]["decision"] = "rewired"
            log.info(
                "group %d: re-ordering ring %s -> %s (bottleneck %.3f -> %.3f Gbit/s)",
                gid,
                current,
                list(plan.order),
                now_low,
                plan.bottleneck_gbps,
            )
            s._start_epoch(gid, grp, order=list(plan.order))
            return
        self.kept += 1
        self.last[gid]["decision"] = "kept"
        why = "order kept: " + (
            "already optimal"
            if same
            else f"predicted gain {gain:.1%} below min_gain {rnd.min_gain:.1%}"
        )
        log.info("group %d: %s", gid, why)
        done = m.TopologyDone(grp.epoch, True, why)
        for q in sorted(rnd.voters):
            if q in s.peers:
                s._send(q, done)

    def _abort(self, gid: int, why: str) -> None:
        rnd = self.rounds.pop(gid, None)
        if rnd is None:
            return
        self.failed += 1
        s = self.state
        grp = s.groups.get(gid)
        log.warning("group %d: optimize_topology failed: %s", gid, why)
        done = m.TopologyDone(grp.epoch if grp else 0, False, f"optimize_topology: {why}; retry")
        for q in sorted(rnd.voters):  # (pending members of an auto round did not vote)
            if q in s.peers:
                s._send(q, done)
        if rnd.auto and grp is not None:
            grp.voters.clear()  # the update vote failed with it: the voters were told

    # ------------------------------------------------------------------ events

    def on_departure(self, gid: int, pid: int) -> None:
        """A peer left: a round it votes or probes in, or of the ring it was in, fails
        (retryable: the ring is broken, the group calls update_topology() first)."""
        rnd = self.rounds.get(gid)
        grp = self.state.groups.get(gid)
        in_ring = grp is not None and pid in grp.ring
        if rnd is not None and (pid in rnd.voters or pid in rnd.members or in_ring):
            self._abort(gid, f"peer {pid} left during the optimisation")
        self.table.forget(pid)

    def on_complete(self, pid: int, gbps: float) -> None:
        """A peer sent at ``gbps`` to its successor in a completed operation (ring feedback)."""
        if not self.table.links:
            return  # nothing measured: O(1) on the master's hot path
        rec = self.state.peers.get(pid)
        grp = self.state.groups.get(rec.group) if rec else None
        if grp is None or not 2 <= len(grp.ring) <= MAX_OPTIMIZE_PEERS or pid not in grp.ring:
            return  # (the ring lookups below are O(group), bounded by MAX_OPTIMIZE_PEERS)
        i = grp.ring.index(pid)
        self.table.record_ring(pid, grp.ring[(i + 1) % len(grp.ring)], gbps * 8)

    def tick(self, now: float) -> None:
        for gid, rnd in list(self.rounds.items()):
            if rnd.phase is OptPhase.VOTING and now - rnd.opened > self.config.vote_timeout_s:
                grp = self.state.groups.get(gid)
                late = sorted((grp.accepted if grp else set()) - rnd.voters)
                self._abort(gid, f"peers {late} did not vote within vote_timeout_s")
            elif rnd.phase is OptPhase.PROBING and now > rnd.deadline:
                self._abort(gid, f"peers {sorted(rnd.waiting)} did not report their probes in time")

    def status(self, gid: int, grp: GroupState) -> dict[str, Any]:
        """The group's link matrix, its ring's predicted bottleneck and the last decision."""
        ids = sorted(grp.members)
        out: dict[str, Any] = {"links": self.table.matrix(ids) if len(ids) <= 64 else None}
        rnd = self.rounds.get(gid)
        out["round"] = None if rnd is None else rnd.phase.value
        out["last"] = self.last.get(gid)
        return out


def link_samples(
    opt: Optimizer,
) -> list[tuple[str, str, str, list[tuple[dict[str, object], float]]]]:
    """Prometheus families of the link table: ``(name, kind, help, samples)``."""
    rate: list[tuple[dict[str, object], float]] = [
        ({"src": a, "dst": b}, max(link.gbps, link.observed_gbps))
        for (a, b), link in sorted(opt.table.links.items())
    ]
    rtt: list[tuple[dict[str, object], float]] = [
        ({"src": a, "dst": b}, link.rtt_ms) for (a, b), link in sorted(opt.table.links.items())
    ]
    decisions: list[tuple[dict[str, object], float]] = [
        ({"decision": "rewired"}, float(opt.rewired)),
        ({"decision": "kept"}, float(opt.kept)),
        ({"decision": "failed"}, float(opt.failed)),
    ]
    return [
        ("pccl_link_gbps", "gauge", "Estimated rate of each measured p2p link (Gbit/s).", rate),
        ("pccl_link_rtt_ms", "gauge", "Measured round-trip time of each p2p link (ms).", rtt),
        (
            "pccl_topology_optimizations_total",
            "counter",
            "optimize_topology() rounds by outcome.",
            decisions,
        ),
        (
            "pccl_link_probe_rounds_total",
            "counter",
            "Link probe rounds completed.",
            [({}, float(opt.table.probes))],
        ),
    ]
