"""The master's authoritative state machine, free of sockets.

Holds membership (registered -> accepted) and, per peer group, its topology epoch and phase, its
ring, and its per-tag collective votes. Every transition is a unanimous vote of the peers
concerned -- a group's own accepted peers, also for admitting its newcomers -- re-evaluated on
every vote and every departure, so a departed voter can complete a vote but never block one.
Epoch numbers come from one counter, so they increase across groups and across restarts.

Cost: every message touches only its sender's group. Votes and readiness are counted in
per-group sets (O(1) per message); an operation's start and completion compare counts; an epoch
announcement is O(group). Only :meth:`tick` walks every group (O(groups) per heartbeat
interval), and only the status endpoint walks every peer.

Output goes through the two callbacks given at construction (``send(peer_id, message)`` and
``kick(peer_id, code, reason)``); the daemon wires them to sockets, tests wire them to lists.

Runs on the master's event-loop thread only; never touches tensor bytes.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pccl.master.election import EntryVote, SyncVote, elect
from pccl.master.optimize import Optimizer
from pccl.master.store import ID_BLOCK, RunRecord, RunStore

from pccl import messages as m
from pccl.config import Config
from pccl.messages import AbortKind, KickCode, Outcome, VerdictState
from pccl.types import SyncStrategy

log = logging.getLogger("pccl.master")

__all__ = ["MasterState", "PeerRecord", "Phase"]

#: Verdicts of this many recent operations are kept for peers that missed theirs.
VERDICT_MEMORY = 4096
#: Operations of a previous master incarnation being resolved from the peers' outcomes.
IN_DOUBT_MEMORY = 1024
#: Recent departures kept for ``/status``.
DEPARTURE_MEMORY = 64


def departure_kind(reason: str) -> str:
    """How a peer went, from the daemon's removal reason: ``left`` (it said so: a clean
    departure, e.g. on SIGTERM), ``timeout`` (silent: hung or partitioned), ``lost`` (its
    connection broke: crashed or killed), ``kicked`` (evicted for another reason)."""
    if reason.startswith("leave:"):
        return "left"
    if reason.startswith("heartbeat_timeout"):
        return "timeout"
    if reason.startswith(("connection lost", "disconnected")):
        return "lost"
    return "kicked"


class Phase(enum.Enum):
    """Global topology phase."""

    IDLE = "idle"  #: rings stable; collectives may run; votes to update may accumulate
    CONNECTING = "connecting"  #: a new epoch was announced; waiting for every peer's p2p links


@dataclass
class PeerRecord:
    """What the master knows of one connected peer."""

    peer_id: int
    group: int
    host: str
    port: int
    accepted: bool = False
    voted_update: bool = False
    in_epoch: bool = False  # part of the epoch being established / current
    ready: bool = False
    resumed: bool = False  # said hello with its id from before a master restart
    reported: bool = False  # sent its outcomes of recent operations (P2M_OUTCOMES)
    ops: dict[int, int] = field(default_factory=dict)  # tag -> attempt, initiated or running
    gates: dict[int, int] = field(default_factory=dict)  # gate tag -> attempt, arrived
    gate_floor: int = 0  # gate attempts up to this one are decided: later words are ignored
    tx_bytes: int = 0  # payload sent in completed collectives (as reported)
    last_gbps: float = 0.0  # send rate of its last completed collective
    ops_done: int = 0
    registered_at: float = field(default_factory=time.monotonic)


@dataclass
class OpState:
    """One collective of a group, from its first initiate vote to its verdict."""

    tag: int
    params: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # peer -> params
    attempts: dict[int, int] = field(default_factory=dict)  # peer -> its attempt number
    op_id: int = 0  # 0 until commenced
    members: tuple[int, ...] = ()
    completed: set[int] = field(default_factory=set)
    opened: float = field(default_factory=time.monotonic)  # first initiate (start deadline)


@dataclass
class SyncRound:
    """One shared-state sync of a group: votes, then transfers until everyone is done."""

    sync_id: int
    votes: dict[int, SyncVote] = field(default_factory=dict)
    waiting: set[int] = field(default_factory=set)  # planned peers not yet done
    members: set[int] = field(default_factory=set)  # peers told the plan (ok ones)
    target: int = -1  # -1 while voting


@dataclass
class GateRound:
    """One quorum gate of a group (see :meth:`MasterState.on_gate_arrive`)."""

    tag: int
    min_quorum: int
    grace_ms: int
    arrived: dict[int, int] = field(default_factory=dict)  # peer -> its attempt
    ready: set[int] = field(default_factory=set)
    opened: float = field(default_factory=time.monotonic)  # first arrival (start deadline)
    quorum_at: float = 0.0  # when min_quorum peers were first ready (0: not yet)
    told: set[int] = field(default_factory=set)  # told of the quorum (M2P_GATE_QUORUM)
    timer: object = None  # the pending grace timer, if any


@dataclass
class GroupState:
    """One peer group: its members, its epoch and phase, its ring and what runs on it."""

    ring: list[int] = field(default_factory=list)
    broken: str = ""  # why the current ring is unusable (a member left), "" if usable
    ops: dict[int, OpState] = field(default_factory=dict)
    gates: dict[int, GateRound] = field(default_factory=dict)
    sync: SyncRound | None = None
    next_revision: int | None = None  # None until the group's first sync
    phase: Phase = Phase.IDLE
    epoch: int = 0  # the group's current (or being set up) epoch; 0 before its first
    epoch_started: float = 0.0
    members: set[int] = field(default_factory=set)  # registered peers, accepted or pending
    accepted: set[int] = field(default_factory=set)
    voters: set[int] = field(default_factory=set)  # accepted peers that voted update_topology
    vote_opened: float = 0.0  # when the first vote of the pending update came
    in_epoch: set[int] = field(default_factory=set)  # members of the epoch being set up
    unready: set[int] = field(default_factory=set)  # ... that have not wired it yet


class MasterState:
    """Membership, topology and collective votes. See the module docstring.

    Args:
        send: ``send(peer_id, message)``.
        kick: ``kick(peer_id, code, reason)``; the daemon closes the connection and calls
            :meth:`remove` later.
        config: deadlines (``restart_grace_s``, ``start_timeout_s``, ``vote_timeout_s``,
            ``connect_timeout_s``, ``reconnect_timeout_s``).
        store: where ids and the last membership persist across restarts (None: nowhere; a
            restart then cannot tell incumbents from newcomers, see :mod:`pccl.master.store`).
        restart_grace_s: overrides ``config.restart_grace_s`` (tests).
        call_later: ``call_later(delay_s, fn)`` runs ``fn`` after a delay on this thread (the
            daemon's event loop): quorum-gate grace ends on time. Without it (tests) graces
            end at the next :meth:`tick`.
    """

    def __init__(
        self,
        send: Callable[[int, m.Message], None],
        kick: Callable[[int, KickCode, str], None],
        config: Config | None = None,
        store: RunStore | None = None,
        *,
        restart_grace_s: float | None = None,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self._send = send
        self._kick = kick
        self._call_later = call_later
        self.config = config or Config()
        self._restart_grace_s = (
            self.config.restart_grace_s if restart_grace_s is None else restart_grace_s
        )
        self._hold_until = 0.0  # after a restart: wait for returning peers before the 1st epoch
        self._formed = False
        self.peers: dict[int, PeerRecord] = {}
        self.groups: dict[int, GroupState] = {}
        self._connecting: set[int] = set()  # groups setting up an epoch
        self._members: set[int] = set()  # accepted peers (persisted as the run's membership)
        self._incumbents_present = 0  # registered peers that are in self._incumbents
        # Epochs, operation and sync ids start from the wall clock so they keep increasing
        # across a master restart: peers discard frames of older operations by id.
        base = int(time.time() * 1000) << 20
        self.epoch = base
        self._next_peer_id = 1
        self._next_op_id = base + 1
        self._next_sync_id = base + 1
        self.aborts: list[tuple[int, int, str]] = []  # (group, tag, reason), recent first-N
        #: recent departures, newest last: (wall time, peer id, group, kind, reason)
        self.departures: deque[tuple[float, int, int, str, str]] = deque(maxlen=DEPARTURE_MEMORY)
        self.departures_total: dict[str, int] = {"left": 0, "timeout": 0, "lost": 0, "kicked": 0}
        #: parity violations seen in shared-state votes (see _record_parity), newest last:
        #: (wall time, group, sync id, revision, peer id, differing entry names)
        self.parity_violations: deque[tuple[float, int, int, int, int, list[str]]] = deque(
            maxlen=DEPARTURE_MEMORY
        )
        self.parity_violations_total = 0
        self.syncs_judged = 0  # syncs in which at least two peers voted at the elected revision
        self.collectives_completed = 0  # lifetime totals (status / metrics)
        self.aborts_total = 0
        self.verdicts: OrderedDict[int, tuple[bool, str]] = OrderedDict()  # op_id -> verdict
        # Operations of a previous incarnation whose verdict a peer asked for: op_id -> members.
        self.in_doubt: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._started = time.monotonic()
        self.optimizer = Optimizer(self)  # link estimates, optimize_topology() rounds
        self._first_op_id = base + 1  # ops below this were decided by an earlier incarnation
        # Restart safety (see pccl.master.store).
        self._store = store
        self._record = RunRecord()
        self._dirty = False
        self._issued_floor = 1  # ids below this may have been issued before this start
        self._incumbents: set[int] = set()  # accepted peers of the run before a restart
        self._orphan_deadline = 0.0  # newcomers alone may form a run after this
        if store is not None:
            rec = store.load()
            if rec is not None:
                self._record = rec
                self._next_peer_id = self._issued_floor = rec.id_floor
                self.epoch = max(self.epoch, rec.epoch)
                self._incumbents = set(rec.members)
                self._members = set(rec.members)
                if self._incumbents:
                    budget = self.config.reconnect_timeout_s + self._restart_grace_s
                    self._orphan_deadline = time.monotonic() + budget
                    log.info(
                        "restarted: waiting up to %.0fs for the %d peers of the previous run "
                        "before newcomers may start a run of their own",
                        budget,
                        len(self._incumbents),
                    )
            self._record.id_floor = self._next_peer_id
            self._save(force=True)

    # ------------------------------------------------------------------ persistence

    def _save(self, force: bool = False) -> None:
        if self._store is None or not (force or self._dirty):
            return
        self._record.epoch = self.epoch
        self._record.members = sorted(self._members)
        try:
            self._store.save(self._record)
            self._dirty = False
        except OSError as e:
            log.error("cannot persist master state to %s: %s", self._store.path, e)

    # ------------------------------------------------------------------ membership

    def new_peer_id(self, wanted: int = 0) -> int:
        """Reserve the id of a peer about to register.

        ``wanted`` is the id a peer held before a master restart (or a lost link). It is
        granted when nobody holds it and, with a store, when it lies below the persisted floor
        (it was issued once); otherwise a fresh id is issued. Returns 0 when ids are exhausted.
        """
        ok = 0 < wanted <= m.MAX_PEER_ID and wanted not in self.peers
        if ok and self._store is not None and wanted >= self._issued_floor:
            ok = wanted < self._next_peer_id  # issued by this run of the master
        if ok:
            if self._store is None:
                self._next_peer_id = max(self._next_peer_id, wanted + 1)
            return wanted
        pid = self._next_peer_id
        if pid > m.MAX_PEER_ID:
            if self._store is not None:
                return 0  # every id was issued once: never reissue one
            # Without a store a resume may have moved the counter to the top (one hello asking
            # for MAX_PEER_ID): take a free id from the top down rather than refuse everyone.
            return next((q for q in range(m.MAX_PEER_ID, 0, -1) if q not in self.peers), 0)
        self._next_peer_id += 1
        if self._store is not None and self._next_peer_id > self._record.id_floor:
            self._record.id_floor = self._next_peer_id + ID_BLOCK
            self._save(force=True)  # on disk before the id is handed out
        return pid

    def register(
        self, pid: int, group: int, host: str, port: int, resumed: bool = False
    ) -> PeerRecord:
        """Record a new peer; admit it at once when its group has nobody accepted (first peer).

        A peer resuming after a master restart, arriving before any ring was formed, starts a
        grace period so its former ring-mates can rejoin into the same first epoch.
        """
        if len(self.peers) >= m.MAX_PEERS:  # Topology.world_size is bounded on the wire
            self._kick(pid, KickCode.FULL, f"the master already serves {m.MAX_PEERS} peers")
            return PeerRecord(pid, group, host, port)
        grp = self.groups.get(group)
        if grp is not None and len(grp.members) >= m.MAX_GROUP_PEERS:  # a ring is bounded too
            why = f"peer group {group} already has {m.MAX_GROUP_PEERS} peers"
            self._kick(pid, KickCode.FULL, why)
            return PeerRecord(pid, group, host, port)
        if resumed and not self._formed and not self._hold_until:
            self._hold_until = time.monotonic() + self._restart_grace_s
            log.info("peers are resuming: waiting %.1fs for the rest", self._restart_grace_s)
        rec = PeerRecord(pid, group, host, port, resumed=resumed)
        self.peers[pid] = rec
        if pid in self._incumbents:
            self._incumbents_present += 1
        if grp is None:
            grp = self.groups[group] = GroupState()
        grp.members.add(pid)
        log.info("peer %d registered (group %d, p2p %s:%d)", pid, group, host, port)
        self._reevaluate(group, grp)
        return rec

    def remove(self, pid: int, reason: str) -> None:
        """Forget a peer (disconnect, eviction, leave) and re-evaluate its group's votes."""
        rec = self.peers.pop(pid, None)
        if rec is None:
            return
        kind = departure_kind(reason)
        self.departures.append((time.time(), pid, rec.group, kind, reason[:500]))
        self.departures_total[kind] += 1
        log.warning(
            "peer %d removed (%s, group %d, %s)",
            pid,
            reason,
            rec.group,
            "accepted" if rec.accepted else "pending",
        )
        if pid in self._incumbents:
            self._incumbents_present -= 1
        if rec.accepted and pid in self._members:
            self._members.discard(pid)
            self._dirty = True
        gid = rec.group
        grp = self.groups.get(gid)
        if grp is None:
            return
        grp.members.discard(pid)
        grp.accepted.discard(pid)
        grp.voters.discard(pid)
        self.optimizer.on_departure(gid, pid)
        if pid in grp.ring:
            grp.broken = f"peer {pid} left ({reason})"
            for op in list(grp.ops.values()):
                self._finish(gid, op, ok=False, reason=grp.broken)
            for gate in list(grp.gates.values()):
                self._gate_abort(grp, gate, f"{grp.broken}; call update_topology()")
        else:  # a pending peer's initiates (refused, but be thorough)
            for op in list(grp.ops.values()):
                op.params.pop(pid, None)
                op.attempts.pop(pid, None)
                if not op.params and not op.op_id:
                    grp.ops.pop(op.tag, None)
        if grp.sync is not None:
            grp.sync.votes.pop(pid, None)
            grp.sync.waiting.discard(pid)
            grp.sync.members.discard(pid)
            self._check_sync(gid, grp)
        if not grp.members:  # the group is gone with its last peer
            self._connecting.discard(gid)
            for gate in list(grp.gates.values()):
                self._gate_close(grp, gate)
            del self.groups[gid]
            return
        if grp.phase is Phase.CONNECTING and pid in grp.in_epoch:
            log.info("peer %d left during group %d epoch set-up: re-announcing", pid, gid)
            self._start_epoch(gid, grp)
            return
        self._reevaluate(gid, grp)

    @property
    def phase(self) -> Phase:
        """CONNECTING while any group sets up an epoch (the per-group phase is authoritative:
        ``groups[g].phase``)."""
        return Phase.CONNECTING if self._connecting else Phase.IDLE

    @property
    def accepted(self) -> list[PeerRecord]:
        """Every accepted peer (O(peers): for status and tests, not for message handlers)."""
        return [p for p in self.peers.values() if p.accepted]

    @property
    def pending(self) -> list[PeerRecord]:
        return [p for p in self.peers.values() if not p.accepted]

    # ------------------------------------------------------------------ topology votes

    def on_update_topology(self, pid: int) -> None:
        """A vote to admit the group's pending peers and re-wire its ring. Untimely votes are
        answered, not kicked: during an epoch set-up the set-up's own completion answers it; a
        peer not accepted or with collectives outstanding gets a refusal (``TopologyDone``
        with ``ok=False``)."""
        rec = self.peers[pid]
        grp = self.groups[rec.group]
        if grp.phase is Phase.CONNECTING and pid in grp.in_epoch:
            return  # the epoch being set up completes the caller's update_topology()
        why = ""
        if not rec.accepted:
            why = "not accepted into the run yet"
        elif rec.ops:
            why = f"collectives outstanding (tags {sorted(rec.ops)})"
        if why:
            self._send(pid, m.TopologyDone(grp.epoch, False, f"update_topology refused: {why}"))
            return
        if not grp.voters:
            grp.vote_opened = time.monotonic()
        rec.voted_update = True
        grp.voters.add(pid)
        self._reevaluate(rec.group, grp)

    def on_topology_ready(self, pid: int, msg: m.TopologyReady) -> None:
        rec = self.peers[pid]
        grp = self.groups[rec.group]
        if grp.phase is not Phase.CONNECTING or msg.epoch != grp.epoch:
            return  # a report for an epoch already superseded
        if pid not in grp.in_epoch:
            return  # joined after this epoch was announced: the next one includes it
        if not msg.ok:
            log.warning("peer %d could not wire epoch %d: %s", pid, grp.epoch, msg.reason)
            bad = [u for u in msg.unreachable if u in self.peers and u != pid]
            for u in bad:  # the unreachable peer is evicted; retrying would fail the same way
                self._kick(u, KickCode.UNREACHABLE, f"peer {pid} could not reach it: {msg.reason}")
            if not bad:
                self._kick(pid, KickCode.P2P_FAILED, msg.reason or "could not establish p2p links")
            return  # each kick re-announces the epoch through remove()
        rec.ready = True
        grp.unready.discard(pid)
        self._reevaluate(rec.group, grp)

    def admits_at_once(self, pid: int, group: int = 0) -> bool:
        """Whether ``pid``, about to register in ``group``, enters the group's next epoch
        without a vote (what its ``Welcome.accepted`` says): nobody of the group accepted, no
        set-up of it running, and not a newcomer held back after a restart until the previous
        run's peers return."""
        grp = self.groups.get(group)
        if grp is not None and (grp.accepted or grp.phase is not Phase.IDLE):
            return False
        return pid in self._incumbents or not self._newcomers_wait(time.monotonic())

    def _newcomers_wait(self, now: float) -> bool:
        """After a restart with a stored membership: newcomers alone may not form a run until
        the previous run's peers had their reconnect budget (no second run beside it)."""
        if self._formed or not self._incumbents or now >= self._orphan_deadline:
            return False
        return not self._incumbents_present

    def _reevaluate(self, gid: int, grp: GroupState) -> None:
        if self.optimizer.busy(gid):
            return  # probing links; the optimizer starts the epoch
        if grp.phase is Phase.CONNECTING:
            if not grp.unready:
                self._complete_epoch(gid, grp)
            return
        if not grp.accepted:
            now = time.monotonic()
            if grp.members and now >= self._hold_until and not self._newcomers_wait(now):
                self._start_epoch(gid, grp)  # nobody to vote: admit whoever waits
            return
        if len(grp.voters) >= len(grp.accepted) and not self.optimizer.intercept_update(gid, grp):
            self._start_epoch(gid, grp)

    def stalled_epoch_members(self, now: float, limit_s: float) -> list[int]:
        """Peers that have not wired the epoch of their group within ``limit_s``."""
        late: list[int] = []
        for gid in sorted(self._connecting):
            grp = self.groups[gid]
            if now - grp.epoch_started >= limit_s:
                late.extend(sorted(grp.unready))
        return late

    def _start_epoch(self, gid: int, grp: GroupState, order: list[int] | None = None) -> None:
        """Admit the group's registered peers, order its ring (``order`` first, when given by
        the optimizer) and announce a new epoch."""
        self.epoch += 1
        grp.epoch = self.epoch
        grp.epoch_started = time.monotonic()
        grp.phase = Phase.CONNECTING
        self._connecting.add(gid)
        for q in grp.voters:
            self.peers[q].voted_update = False
        grp.voters.clear()
        for q in grp.members:
            p = self.peers[q]
            p.ready = False
            p.in_epoch = True
        grp.in_epoch = set(grp.members)
        grp.unready = set(grp.members)
        keep = [q for q in (grp.ring if order is None else order) if q in grp.members]
        kept = set(keep)  # incumbents keep their order (or take the optimizer's)
        grp.ring = keep + sorted(q for q in grp.members if q not in kept)
        if order is None:
            grp.ring = self.optimizer.order_for_epoch(gid, grp, grp.ring)
        grp.broken = ""
        for op in list(grp.ops.values()):  # initiates made for the old ring are void
            self._finish(gid, op, False, "the topology changed", AbortKind.STALE_TOPOLOGY)
        for gate in list(grp.gates.values()):
            why = "the topology changed; arrive again"
            self._gate_abort(grp, gate, why, AbortKind.STALE_TOPOLOGY)
        world = len(self.peers)
        log.info("group %d epoch %d: ring %s (%d peers in all)", gid, grp.epoch, grp.ring, world)
        ring = [(q, self.peers[q].host, self.peers[q].port) for q in grp.ring]
        msg = m.Topology(grp.epoch, world, len(grp.ring), len(self.groups), ring)
        for q in grp.ring:
            self._send(q, msg)

    def tick(self, now: float) -> None:
        """Enforce the master-side deadlines; called every heartbeat interval. O(groups).

        - an epoch whose members have not wired within ``2 * connect_timeout_s``: the laggards
          are evicted (they heartbeat but cannot wire);
        - a collective not started by every member within ``start_timeout_s`` of its first
          initiate: aborted for all, naming the laggards;
        - a topology vote not joined by every accepted peer of the group within
          ``vote_timeout_s``: the voters are told (retryable), naming the laggards; nobody is
          evicted for being slow;
        - the restart grace period; persisting the membership.
        """
        cfg = self.config
        for pid in self.stalled_epoch_members(now, cfg.connect_timeout_s * 2):
            self._kick(pid, KickCode.P2P_TIMEOUT, "did not establish its p2p links in time")
        for gid, grp in list(self.groups.items()):
            if self.groups.get(gid) is not grp:
                continue  # removed by an eviction above
            if grp.phase is Phase.IDLE and not grp.accepted and grp.members:
                self._reevaluate(gid, grp)  # the restart grace may have ended
            for op in list(grp.ops.values()):
                if op.op_id or now - op.opened <= cfg.start_timeout_s:
                    continue
                late = [q for q in grp.ring if q in self.peers and q not in op.params]
                why = (
                    f"peers {late} did not start tag {op.tag} within "
                    f"start_timeout_s={cfg.start_timeout_s:g}"
                )
                self._finish(gid, op, False, why, AbortKind.START_TIMEOUT)
            for gate in list(grp.gates.values()):
                present = [q for q in grp.ring if q in self.peers]
                late = [q for q in present if q not in gate.arrived]
                if late and now - gate.opened > cfg.start_timeout_s:
                    why = (
                        f"peers {late} did not arrive at gate {gate.tag} within "
                        f"start_timeout_s={cfg.start_timeout_s:g}"
                    )
                    self._gate_abort(grp, gate, why, AbortKind.START_TIMEOUT)
                else:
                    self._gate_check(grp, gate, now)
            voters = grp.voters
            if voters and grp.phase is Phase.IDLE and now - grp.vote_opened > cfg.vote_timeout_s:
                late = sorted(grp.accepted - voters)
                why = (
                    f"peers {late} did not call update_topology() within "
                    f"vote_timeout_s={cfg.vote_timeout_s:g}; retry"
                )
                log.warning("group %d topology vote timed out: %s", gid, why)
                done = m.TopologyDone(grp.epoch, False, why)
                for q in sorted(voters):
                    self.peers[q].voted_update = False
                    self._send(q, done)
                voters.clear()
        if self.in_doubt:
            self._resolve_in_doubt(now)
        self.optimizer.tick(now)
        self._save()

    def _complete_epoch(self, gid: int, grp: GroupState) -> None:
        grp.phase = Phase.IDLE
        self._connecting.discard(gid)
        if not self._formed:  # the run re-formed: who did not return is no member any more
            self._members = {q for q in self._members if q in self.peers}
        self._formed = True
        self._incumbents.clear()
        self._incumbents_present = 0
        for q in sorted(grp.in_epoch):
            p = self.peers[q]
            if not p.accepted:
                log.info("peer %d accepted into the run (epoch %d)", q, grp.epoch)
            p.accepted = True
        grp.accepted = set(grp.in_epoch)
        self._members |= grp.in_epoch
        self._dirty = True
        done = m.TopologyDone(grp.epoch, True)
        for q in grp.ring:
            self._send(q, done)
        self._reevaluate(gid, grp)  # votes that arrived meanwhile, or peers that left

    # ------------------------------------------------------------------ collectives

    def _refuse(self, pid: int, msg: m.CollectiveInitiate, why: str, kind: AbortKind) -> None:
        self._send(pid, m.CollectiveDone(msg.tag, msg.attempt, 0, False, why, int(kind)))

    def on_initiate(self, pid: int, msg: m.CollectiveInitiate) -> None:
        rec = self.peers[pid]
        if msg.tag in rec.ops:  # a retry must withdraw the previous attempt first
            self._kick(pid, KickCode.OUT_OF_STATE, f"tag {msg.tag} initiated twice")
            return
        if not rec.accepted:
            self._refuse(pid, msg, "not accepted into the run yet", AbortKind.STALE_TOPOLOGY)
            return
        grp = self.groups[rec.group]
        reason = grp.broken or ("topology is changing" if grp.phase is not Phase.IDLE else "")
        if reason:
            why = f"{reason}; call update_topology()"
            self._refuse(pid, msg, why, AbortKind.STALE_TOPOLOGY)
            return
        op = grp.ops.get(msg.tag)
        if op is None:
            op = grp.ops[msg.tag] = OpState(msg.tag)
        elif op.op_id:
            why = f"tag {msg.tag} is already running without this peer; retry"
            self._refuse(pid, msg, why, AbortKind.ABORTED)
            return
        rec.ops[msg.tag] = msg.attempt
        op.params[pid] = (msg.count, msg.dtype, msg.op, msg.quant)
        op.attempts[pid] = msg.attempt
        self._check_commence(rec.group, grp, op)

    def on_withdraw(self, pid: int, msg: m.CollectiveWithdraw) -> None:
        """The peer gave up locally: forget its initiate, or abort the operation it started.
        A withdraw of an attempt already decided (the verdict crossed it) is ignored."""
        rec = self.peers[pid]
        if rec.ops.get(msg.tag) != msg.attempt:
            return
        grp = self.groups[rec.group]
        op = grp.ops.get(msg.tag)
        if op is not None and op.attempts.get(pid) == msg.attempt:
            if op.op_id:
                why = f"peer {pid} gave up: {msg.reason or 'withdrawn'}"
                self._finish(rec.group, op, False, why)
                return
            op.params.pop(pid, None)
            op.attempts.pop(pid, None)
            if not op.params:
                grp.ops.pop(msg.tag, None)
        rec.ops.pop(msg.tag, None)
        # Not started: confirm (AbortKind.WITHDRAWN), so the peer knows no commence follows.
        kind = int(AbortKind.WITHDRAWN)
        self._send(pid, m.CollectiveDone(msg.tag, msg.attempt, 0, False, "withdrawn", kind))

    def _remember(self, op_id: int, ok: bool, reason: str) -> None:
        self.verdicts[op_id] = (ok, reason)
        self.verdicts.move_to_end(op_id)
        while len(self.verdicts) > VERDICT_MEMORY:
            self.verdicts.popitem(last=False)

    def on_verdict_query(self, pid: int, msg: m.VerdictQuery) -> None:
        """Answer a lost verdict from memory. An operation of a previous incarnation of the
        master (it restarted) is resolved from the members' outcomes (:meth:`on_outcomes`):
        ``RUNNING`` (ask again) until it is."""
        v = self.verdicts.get(msg.op_id)
        if v is None and msg.op_id < self._first_op_id and msg.members:
            if msg.op_id not in self.in_doubt:
                self.in_doubt[msg.op_id] = tuple(msg.members)
                while len(self.in_doubt) > IN_DOUBT_MEMORY:
                    self.in_doubt.popitem(last=False)
            self._resolve_in_doubt(time.monotonic())
            v = self.verdicts.get(msg.op_id)
            if v is None:
                self._send(pid, m.Verdict(msg.op_id, int(VerdictState.RUNNING), "resolving"))
                return
        if v is not None:
            state = VerdictState.OK if v[0] else VerdictState.ABORTED
            self._send(pid, m.Verdict(msg.op_id, int(state), v[1]))
            return
        rec = self.peers[pid]
        grp = self.groups.get(rec.group)
        running = grp is not None and any(o.op_id == msg.op_id for o in grp.ops.values())
        state = VerdictState.RUNNING if running else VerdictState.UNKNOWN
        why = "" if running else "no record of this operation (too old, or never started)"
        self._send(pid, m.Verdict(msg.op_id, int(state), why))

    def on_outcomes(self, pid: int, msg: m.Outcomes) -> None:
        """What a resuming peer did with its recent operations. A peer that kept a result
        proves the verdict was OK; one that restored its input proves it was an abort (the
        old master decides OK only when every member reported success)."""
        self.peers[pid].reported = True
        for op_id, outcome in msg.outcomes:
            if op_id in self.verdicts or op_id >= self._first_op_id:
                continue
            if outcome == Outcome.KEPT:
                self._remember(op_id, True, f"recovered from peer {pid} (it kept the result)")
            elif outcome == Outcome.RESTORED:
                why = f"recovered from peer {pid} (it restored its input)"
                self._remember(op_id, False, why)
        self._resolve_in_doubt(time.monotonic())

    def _resolve_in_doubt(self, now: float) -> None:
        """Decide operations of a previous incarnation that no outcome decided: once the
        resuming peers had ``restart_grace_s`` to return and every member still present has
        reported without objection (each holds the completed result), they keep it: OK.
        Members that did not return are gone; their bytes no longer matter."""
        for op_id, members in list(self.in_doubt.items()):
            if op_id in self.verdicts:
                del self.in_doubt[op_id]
                continue
            if now - self._started < self._restart_grace_s:
                continue
            present = [self.peers[q] for q in members if q in self.peers]
            if present and all(p.reported for p in present):
                why = "recovered after a master restart: every returning member completed it"
                self._remember(op_id, True, why)
                del self.in_doubt[op_id]

    def _check_commence(self, gid: int, grp: GroupState, op: OpState) -> None:
        if op.op_id or len(op.params) < len(grp.ring) or not all(q in op.params for q in grp.ring):
            return
        if len(set(op.params.values())) > 1:
            detail = ", ".join(
                f"peer {q}: count={c} dtype={d} op={o} quant={qq}"
                for q, (c, d, o, qq) in sorted(op.params.items())
            )
            op.members = tuple(op.params)
            why = f"peers disagree on the operation ({detail})"
            self._finish(gid, op, False, why, AbortKind.MISMATCH)
            return
        op.op_id = self._next_op_id
        self._next_op_id += 1
        op.members = tuple(grp.ring)
        for q in op.members:
            self._send(q, m.CollectiveCommence(op.tag, op.attempts[q], op.op_id, grp.epoch))

    def on_complete(self, pid: int, msg: m.CollectiveComplete) -> None:
        rec = self.peers[pid]
        grp = self.groups.get(rec.group)
        op = grp.ops.get(msg.tag) if grp else None
        if grp is None or op is None or op.op_id != msg.op_id or pid not in op.members:
            return  # verdict already given (abort raced the report)
        if not msg.ok:
            self._finish(rec.group, op, False, f"peer {pid}: {msg.reason}")
            return
        op.completed.add(pid)
        rec.ops_done += 1
        rec.tx_bytes += msg.tx_bytes
        if msg.seconds > 0:
            rec.last_gbps = msg.tx_bytes / msg.seconds / 1e9
            self.optimizer.on_complete(pid, rec.last_gbps)
        if len(op.completed) >= len(op.members) and all(q in op.completed for q in op.members):
            self._finish(rec.group, op, True, "")

    def _finish(
        self,
        gid: int,
        op: OpState,
        ok: bool,
        reason: str,
        kind: AbortKind = AbortKind.ABORTED,
    ) -> None:
        grp = self.groups[gid]
        grp.ops.pop(op.tag, None)
        if ok:
            self.collectives_completed += 1
        else:
            self.aborts_total += 1
            log.warning("group %d tag %d op %d aborted: %s", gid, op.tag, op.op_id, reason)
            self.aborts.insert(0, (gid, op.tag, reason))
            del self.aborts[64:]
        reason = reason if len(reason) <= 500 else reason[:497] + "..."
        if op.op_id:
            self._remember(op.op_id, ok, reason)
        k = int(AbortKind.OK if ok else kind)
        for q in set(op.members) | set(op.params):
            rec = self.peers.get(q)
            attempt = op.attempts.get(q)
            if rec is not None and attempt is not None and rec.ops.get(op.tag) == attempt:
                del rec.ops[op.tag]
                self._send(q, m.CollectiveDone(op.tag, attempt, op.op_id, ok, reason, k))

    # ------------------------------------------------------------------ quorum gates

    def on_gate_arrive(self, pid: int, msg: m.GateArrive) -> None:
        """A peer arrives at, upgrades to ready at, or withdraws from the group's gate
        ``msg.tag``. The gate is decided once every ring member present has arrived and either
        all of them are ready, or ``min(min_quorum, ring)`` are and ``grace_ms`` has passed
        since they first were; the decision names the ready peers (the round's contributors).
        Words about an attempt already decided are ignored (they crossed the decision)."""
        rec = self.peers[pid]
        held = rec.gates.get(msg.tag)
        if msg.attempt <= rec.gate_floor and held != msg.attempt:
            return  # (the floor rises with decisions at other tags: a held attempt is live)
        grp = self.groups.get(rec.group)
        gate = grp.gates.get(msg.tag) if grp is not None else None
        state = msg.state
        if state == int(m.GateState.WITHDRAW):
            if held != msg.attempt:
                return
            del rec.gates[msg.tag]
            rec.gate_floor = max(rec.gate_floor, msg.attempt)
            if grp is not None and gate is not None:
                gate.arrived.pop(pid, None)
                gate.ready.discard(pid)
                if not gate.arrived:
                    self._gate_close(grp, gate)
            kind = int(AbortKind.WITHDRAWN)
            self._send(pid, m.GateDone(msg.tag, msg.attempt, 0, False, "withdrawn", kind))
            return
        if held is not None:
            if held != msg.attempt:  # a retry must withdraw the previous attempt first
                self._kick(pid, KickCode.OUT_OF_STATE, f"gate {msg.tag} arrived at twice")
                return
            if gate is not None and state == int(m.GateState.READY):
                gate.ready.add(pid)
                self._gate_check(grp, gate, time.monotonic())  # type: ignore[arg-type]
            return
        why = ""
        if not rec.accepted or grp is None:
            why = "not accepted into the run yet"
        elif grp.broken or grp.phase is not Phase.IDLE:
            why = f"{grp.broken or 'topology is changing'}; call update_topology()"
        if why:
            rec.gate_floor = max(rec.gate_floor, msg.attempt)
            kind = int(AbortKind.STALE_TOPOLOGY)
            self._send(pid, m.GateDone(msg.tag, msg.attempt, 0, False, why, kind))
            return
        assert grp is not None
        if gate is None:
            gate = grp.gates[msg.tag] = GateRound(msg.tag, msg.min_quorum, msg.grace_ms)
        gate.arrived[pid] = msg.attempt
        rec.gates[msg.tag] = msg.attempt
        if (msg.min_quorum, msg.grace_ms) != (gate.min_quorum, gate.grace_ms):
            why = (
                f"peers disagree on gate {msg.tag}: peer {pid} min_quorum={msg.min_quorum} "
                f"grace_ms={msg.grace_ms}, others min_quorum={gate.min_quorum} "
                f"grace_ms={gate.grace_ms}"
            )
            self._gate_abort(grp, gate, why, AbortKind.MISMATCH)
            return
        if state == int(m.GateState.READY):
            gate.ready.add(pid)
        self._gate_check(grp, gate, time.monotonic())

    def _gate_check(self, grp: GroupState, gate: GateRound, now: float) -> None:
        if grp.gates.get(gate.tag) is not gate:
            return
        present = [q for q in grp.ring if q in self.peers]
        if not present:
            return
        ready = [q for q in present if q in gate.ready]
        quorum = min(gate.min_quorum, len(present))
        if len(ready) < quorum:
            gate.quorum_at = 0.0  # (a departure can only abort; kept for clarity)
            return
        if not gate.quorum_at:
            gate.quorum_at = now
        left = gate.quorum_at + gate.grace_ms / 1000 - now
        if left > 0:  # the grace runs: tell who has not said ready, so it can in time
            for q, attempt in gate.arrived.items():
                if q not in gate.ready and q not in gate.told:
                    gate.told.add(q)
                    self._send(q, m.GateQuorum(gate.tag, attempt, gate.grace_ms))
        if not all(q in gate.arrived for q in present):
            return
        if len(ready) < len(present) and left > 0:
            if self._call_later is not None and gate.timer is None:
                gate.timer = self._call_later(left + 1e-3, lambda: self._gate_timer(grp, gate))
            return
        round_id = self._next_op_id
        self._next_op_id += 1
        members = list(grp.ring)
        log.debug("gate %d round %d: %d of %d ready", gate.tag, round_id, len(ready), len(present))
        for q, attempt in gate.arrived.items():
            rec = self.peers.get(q)
            if rec is None:
                continue
            rec.gates.pop(gate.tag, None)
            rec.gate_floor = max(rec.gate_floor, attempt)
            ok = int(AbortKind.OK)
            self._send(q, m.GateDone(gate.tag, attempt, round_id, True, "", ok, ready, members))
        self._gate_close(grp, gate)

    def _gate_timer(self, grp: GroupState, gate: GateRound) -> None:
        gate.timer = None
        try:
            self._gate_check(grp, gate, time.monotonic())
        except Exception:  # a bug must not kill the event loop's callback machinery
            log.exception("gate %d: grace timer failed", gate.tag)

    def _gate_abort(
        self, grp: GroupState, gate: GateRound, why: str, kind: AbortKind = AbortKind.ABORTED
    ) -> None:
        log.warning("gate %d aborted: %s", gate.tag, why)
        why = why if len(why) <= 1000 else why[:997] + "..."
        for q, attempt in gate.arrived.items():
            rec = self.peers.get(q)
            if rec is None:
                continue
            rec.gates.pop(gate.tag, None)
            rec.gate_floor = max(rec.gate_floor, attempt)
            self._send(q, m.GateDone(gate.tag, attempt, 0, False, why, int(kind)))
        self._gate_close(grp, gate)

    def _gate_close(self, grp: GroupState, gate: GateRound) -> None:
        if grp.gates.get(gate.tag) is gate:
            del grp.gates[gate.tag]
        cancel = getattr(gate.timer, "cancel", None)
        if cancel is not None:
            cancel()
        gate.timer = None

    # ------------------------------------------------------------------ shared state

    def on_sync_vote(self, pid: int, msg: m.SyncSharedState) -> None:
        rec = self.peers[pid]
        if not rec.accepted:
            why = "not accepted into the run yet"
            self._send(pid, m.SyncPlan(0, False, why, 0, [], []))
            return
        grp = self.groups[rec.group]
        if grp.sync is None:
            grp.sync = SyncRound(self._next_sync_id)
            self._next_sync_id += 1
        rnd = grp.sync
        if rnd.target >= 0 and pid not in rnd.waiting:
            # Rejected from, done with, or gave up on the running sync: retryable, no violation.
            why = "the group is still completing a sync; retry"
            self._send(pid, m.SyncPlan(rnd.sync_id, False, why, 0, [], []))
            return
        if rnd.target >= 0:
            # Untimely, not hostile: the peer gave up locally before its plan reached it and
            # votes again. Its plan is void (it serves as a member until the group is done);
            # this vote gets a retryable refusal.
            rnd.waiting.discard(pid)
            why = "the group is still completing a sync you gave up on; retry"
            self._send(pid, m.SyncPlan(rnd.sync_id, False, why, 0, [], []))
            self._check_sync(rec.group, grp)
            return
        # A vote already recorded is a retry after a local timeout: the new one replaces it.
        if grp.phase is not Phase.IDLE:
            self._send(pid, m.SyncPlan(rnd.sync_id, False, "topology is changing", 0, [], []))
            return
        entries = {}
        for key, dtype, nbytes, shape, digest, loose in msg.entries:
            if key in entries:
                self._send(
                    pid, m.SyncPlan(rnd.sync_id, False, f"duplicate entry {key!r}", 0, [], [])
                )
                return
            entries[key] = EntryVote(dtype, nbytes, tuple(shape), digest, loose)
        rnd.votes[pid] = SyncVote(pid, msg.revision, SyncStrategy(msg.strategy), entries)
        self._check_sync(rec.group, grp)

    def _check_sync(self, gid: int, grp: GroupState) -> None:
        rnd = grp.sync
        if rnd is None:
            return
        if rnd.target < 0:
            if not grp.broken and len(rnd.votes) < len(grp.ring):
                return  # O(1) per vote until the last one
            present = [q for q in grp.ring if q in self.peers]
            if not rnd.votes or not all(q in rnd.votes for q in present):
                return
            plans, target = elect(rnd.votes, grp.next_revision)
            rnd.target = target
            self._record_parity(gid, rnd, plans, target)
            addr = {q: (q, self.peers[q].host, self.peers[q].port) for q in rnd.votes}
            for q, plan in sorted(plans.items()):
                if not plan.ok:
                    log.warning(
                        "group %d sync %d: peer %d rejected: %s", gid, rnd.sync_id, q, plan.reason
                    )
                    self._send(q, m.SyncPlan(rnd.sync_id, False, plan.reason[:1000], 0, [], []))
                    continue
                srcs = sorted({s for _, ids in plan.fetch.values() for s in ids})
                fetch = [(k, h, ids) for k, (h, ids) in sorted(plan.fetch.items())]
                rnd.waiting.add(q)
                rnd.members.add(q)
                self._send(
                    q, m.SyncPlan(rnd.sync_id, True, "", target, fetch, [addr[s] for s in srcs])
                )
            log.info(
                "group %d sync %d: revision %d, %d peers, %d fetching",
                gid,
                rnd.sync_id,
                target,
                len(rnd.members),
                sum(1 for p in plans.values() if p.ok and p.fetch),
            )
        if rnd.target >= 0 and not rnd.waiting:
            grp.sync = None
            if rnd.members:
                grp.next_revision = rnd.target + 1
            done = m.SyncComplete(rnd.sync_id, rnd.target)
            for q in rnd.members:
                self._send(q, done)

    def _record_parity(self, gid: int, rnd: SyncRound, plans: dict[int, Any], target: int) -> None:
        """A peer that votes at the elected revision claims to hold the group's state at it; if
        its hashes differ from the elected content (it is told to fetch entries), its replica
        had diverged: a parity violation, recorded per entry. Peers behind (newcomers, a
        first sync) fetching is normal and not counted. What ``pccl chaos --cmd`` judges."""
        holders = [q for q, v in rnd.votes.items() if v.revision == target]
        if len(holders) < 2:
            return
        self.syncs_judged += 1
        for q in sorted(holders):
            plan = plans.get(q)
            if plan is None or not plan.ok or not plan.fetch:
                continue
            keys = sorted(plan.fetch)
            self.parity_violations_total += 1
            self.parity_violations.append((time.time(), gid, rnd.sync_id, target, q, keys[:16]))
            log.error(
                "group %d sync %d: peer %d held different content at revision %d (%s): "
                "parity violation",
                gid,
                rnd.sync_id,
                q,
                target,
                ", ".join(keys[:8]),
            )

    def on_sync_done(self, pid: int, msg: m.SyncDone) -> None:
        rec = self.peers[pid]
        grp = self.groups.get(rec.group)
        rnd = grp.sync if grp else None
        if grp is not None and rnd is not None and rnd.target < 0 and msg.sync_id == 0:
            rnd.votes.pop(pid, None)  # withdrawn (the peer timed out before any plan)
            if not rnd.votes:
                grp.sync = None
            return
        if grp is None or rnd is None or rnd.sync_id != msg.sync_id or pid not in rnd.waiting:
            return
        if not msg.ok:
            log.warning(
                "group %d sync %d: peer %d failed: %s", rec.group, rnd.sync_id, pid, msg.reason
            )
        rnd.waiting.discard(pid)  # failed peers stay members: they serve until all are done
        self._check_sync(rec.group, grp)
