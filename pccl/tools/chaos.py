"""``pccl chaos``: the churn script SREs run against a master and a fleet of peers.

The driver (this process) starts -- or attaches to -- a master and N peer processes. Every peer
loops ``update_topology -> sync_shared_state -> all_reduce x3 -> deterministic state update``
(:func:`_worker`) and prints one JSON event per stdout line. A seeded scheduler injects faults
every few seconds: SIGKILL, SIGSTOP/SIGCONT (a hang the master must evict by heartbeat
timeout), clean leave (SIGUSR1: the peer calls ``close()`` at its next call boundary), joins of
fresh peers, and -- in ``--netns`` mode, where every process has its own network namespace --
link cuts and ``tc tbf`` rate limits. The driver checks, after every step, that all peers
report the same shared-state hash for the same revision (a fork or a non-bit-identical
all-reduce shows up here), that no peer is silent past ``--stall-limit`` while it should run
(every library call has a deadline below that), and that the run keeps completing steps.

Policy for a peer that finds itself dropped (a hang outlived the heartbeat timeout, a link cut,
or the master evicted it): on ``ConnectionLost`` it closes its communicator and **rejoins as a
fresh peer in the same process** with a new id, keeping its stale arrays and revision; the
first sync drags it forward (the election marks it outdated and it fetches the group's
tensors). A library that reconnects by itself (``resume_id``) is fine too: the peer then just
retries its step.

Peer loop invariants (what keeps the peers in lock-step): every iteration starts with
``update_topology()`` (a newcomer skips it once, since the update that admitted it is the
current epoch); any retryable failure sends the peer back to the top without touching its
state; the state changes only after all three collectives succeeded, from their results, so
the revision equals the number of completed steps and ``hash(revision)`` is unique for the run.

The report (``--json``) carries a ``timeline``: every fault with its time, the world size the
peers' steps ran at (sampled when it changes and at least every half second) and each measured
recovery (fault time, seconds until the first step that started after it). ``--plot FILE.png``
draws it (:mod:`pccl.tools.plots`). On a terminal a bar on stderr shows how much of
``--duration`` has passed; the lines on stdout are the same with or without it.

Runs on the driver's main thread, with one reader thread per child. Every child is killed on
every exit path (``finally``, SIGTERM/SIGINT/SIGHUP), and children die with the driver
(``PR_SET_PDEATHSIG``) even if it is SIGKILLed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from pccl.tools.proc import die_with_parent as _kill_me_with_parent
from pccl.tools.proc import exit_if_orphaned as _die_with_parent
from pccl.tools.proc import master_banner
from pccl.tools.proc import send_signal as _signal
from pccl.tools.proc import stop as _kill
from pccl.tools.proc import tail as _tail

__all__ = ["FAULT_KINDS", "FaultPlan", "ParityBook", "add_arguments", "main"]

FAULT_KINDS = ("kill", "hang", "leave", "join", "linkcut", "ratelimit", "masterkill")
NETNS_ONLY = ("linkcut", "ratelimit")
DISRUPTIVE = ("kill", "hang", "leave", "linkcut")
DEFAULT_FAULTS = "kill,hang,leave,join,masterkill"
MIN_POPULATION = 2
SUMMARY_EVERY_S = 5.0
WORLD_SAMPLE_S = 0.5
DRAIN_S = 20.0
MASTER_START_S = 30.0
# Library deadlines the peers run under (exported as PCCL_* to master and peers). Every blocking
# call a peer makes is bounded by CALL_TIMEOUT_S, so silence past --stall-limit is a violation.
CHAOS_ENV = {
    "PCCL_HEARTBEAT_INTERVAL_S": "0.5",
    "PCCL_HEARTBEAT_TIMEOUT_S": "3",
    "PCCL_PROGRESS_TIMEOUT_S": "5",
    "PCCL_COLLECTIVE_TIMEOUT_S": "20",
    "PCCL_CONNECT_TIMEOUT_S": "5",
    "PCCL_RECONNECT_TIMEOUT_S": "15",
}
CALL_TIMEOUT_S = 20.0


# =============================================================================== CLI


def add_arguments(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="churn test: peers under kill/hang/leave/join faults")
    p.add_argument("--peers", type=int, default=4, help="initial peers N (default 4)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of churn (default 60)")
    p.add_argument("--seed", type=int, default=0, help="scheduler and data seed")
    p.add_argument(
        "--faults",
        default=DEFAULT_FAULTS,
        help=f"comma list of {','.join(FAULT_KINDS)} (default {DEFAULT_FAULTS}; "
        "linkcut/ratelimit need --netns)",
    )
    p.add_argument("--interval", type=float, default=3.0, help="mean seconds between faults")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw faults, world size and recoveries (pccl[plot])"
    )
    p.add_argument("--master", metavar="H:P", help="attach to this master instead of starting one")
    p.add_argument("--token-file", help="shared token for the master and peers")
    p.add_argument("--mib", type=int, default=1, help="largest all-reduce in MiB (default 1)")
    p.add_argument("--max-peers", type=int, help="population ceiling (default N+2)")
    p.add_argument("--stall-limit", type=float, default=30.0, help="max silence of a live peer")
    p.add_argument("--max-faults", type=int, default=100_000, help="stop injecting after this")
    p.add_argument("--netns", action="store_true", help="one network namespace per process")
    p.add_argument("--netns-harness", help="a harness file of your own (default: pccl.tools.netns)")
    p.add_argument("--log-dir", help="where child logs go (default: a temp dir, kept on failure)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail on anomalies (protocol errors seen by peers)",
    )
    p.add_argument(
        "--cmd",
        dest="user_cmd",
        metavar="COMMAND",
        help="churn N copies of your own training command instead of the built-in worker "
        "(each gets PCCL_MASTER, PCCL_PEER_INDEX, PCCL_NUM_PEERS); parity is judged from the "
        "master's shared-state hash votes",
    )
    p.add_argument(
        "--cmd-faults",
        metavar="LIST",
        help="with --cmd: comma list of kill,hang,leave,join (default all)",
    )
    p.set_defaults(func=_cmd_chaos)


def _cmd_chaos(args: argparse.Namespace) -> int:
    if args.user_cmd:
        from pccl.tools.chaos_cmd import main_cmd

        return main_cmd(args)
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    problems = []
    if bad:
        problems.append(f"unknown fault kinds {bad} (choose from {', '.join(FAULT_KINDS)})")
    if not args.netns and any(k in NETNS_ONLY for k in kinds):
        problems.append("linkcut and ratelimit need --netns (peers in their own namespaces)")
    if args.master and "masterkill" in kinds:
        problems.append("masterkill needs the master this command starts; drop --master")
    if args.netns and args.master:
        problems.append("--netns starts its own master inside a namespace; drop --master")
    if args.peers < MIN_POPULATION or args.duration <= 0 or args.mib < 1 or args.interval <= 0:
        problems.append("need --peers >= 2, --duration > 0, --mib >= 1, --interval > 0")
    max_peers = args.max_peers if args.max_peers is not None else args.peers + 2
    if max_peers < args.peers:
        problems.append("--max-peers must be >= --peers")
    if args.stall_limit <= CALL_TIMEOUT_S:
        problems.append(f"--stall-limit must exceed the per-call deadline {CALL_TIMEOUT_S}s")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        problems.append("--plot needs matplotlib: pip install 'pccl[plot]'")
    if problems:
        for msg in problems:
            print(f"pccl chaos: {msg}", file=sys.stderr)
        return 2
    opts = Options(
        peers=args.peers,
        duration=args.duration,
        seed=args.seed,
        kinds=tuple(dict.fromkeys(kinds)),
        interval=args.interval,
        master=args.master,
        token_file=args.token_file,
        mib=args.mib,
        max_peers=max_peers,
        stall_limit=args.stall_limit,
        max_faults=args.max_faults,
        netns=args.netns,
        harness=args.netns_harness,
        log_dir=args.log_dir,
        strict=args.strict,
    )
    try:
        report = Driver(opts).run()
    except ChaosSetupError as e:
        print(f"pccl chaos: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        from pccl.tools.plots import plot_chaos

        plot_chaos(report, args.plot)
    print(json.dumps({k: report[k] for k in SUMMARY_KEYS}))
    return 0 if report["ok"] else 1


SUMMARY_KEYS = (
    "steps",
    "faults",
    "parity_checks",
    "parity_violations",
    "stalls",
    "max_recovery_s",
    "throughput_steps_per_s",
)


# =============================================================================== pure logic


class ParityBook:
    """First hash reported for each revision; every later report must match it.

    A peer reports its state hash after each completed step (the revision it computed) and after
    each sync (the revision it adopted). The book is keyed by revision alone: with at least two
    up-to-date peers always alive, the group's history never forks, so a second hash for one
    revision is either a non-bit-identical all-reduce or a sync that lost state.
    """

    def __init__(self) -> None:
        self.first: dict[int, tuple[str, str]] = {}  # revision -> (hash, who)
        self.checks = 0
        self.violations: list[str] = []

    def record(self, revision: int, digest: str, who: str) -> str | None:
        """Record one report; return a description if it contradicts an earlier one."""
        seen = self.first.get(revision)
        if seen is None:
            self.first[revision] = (digest, who)
            return None
        self.checks += 1
        if seen[0] == digest:
            return None
        msg = f"revision {revision}: {who} has {digest[:16]}, {seen[1]} had {seen[0][:16]}"
        self.violations.append(msg)
        return msg

    @property
    def max_revision(self) -> int:
        return max(self.first, default=0)


class FaultPlan:
    """Seeded order of fault kinds: shuffled rounds containing every enabled kind once.

    ``next(eligible)`` returns the first kind of the current round that can fire now (its
    order fixed by the seed) and removes it, or None when none can (the round waits). Rounds
    guarantee every kind fires in a run long enough to hold one round.
    """

    def __init__(self, rng: random.Random, kinds: tuple[str, ...]) -> None:
        assert kinds
        self.rng = rng
        self.kinds = kinds
        self.round: list[str] = []

    def next(self, eligible: set[str]) -> str | None:
        if not self.round:
            self.round = list(self.kinds)
            self.rng.shuffle(self.round)
        for i, kind in enumerate(self.round):
            if kind in eligible:
                del self.round[i]
                return kind
        return None


# =============================================================================== driver


class ChaosSetupError(RuntimeError):
    """The run could not be set up (master did not start, namespaces unavailable...)."""


@dataclass(frozen=True)
class Options:
    peers: int
    duration: float
    seed: int
    kinds: tuple[str, ...]
    interval: float
    master: str | None = None
    token_file: str | None = None
    mib: int = 1
    max_peers: int = 6
    stall_limit: float = 30.0
    max_faults: int = 100_000
    netns: bool = False
    harness: str | None = None
    log_dir: str | None = None
    strict: bool = False


@dataclass
class Child:
    """One peer process as the driver sees it."""

    idx: int
    proc: subprocess.Popen[bytes]
    log: Path
    spawned: float
    slot: str = ""  # netns node name
    peer_id: int = 0
    incarnation: int = 0
    established: bool = False  # holds the group's state (synced at least once this incarnation)
    stopped: bool = False
    cut: bool = False
    leaving: bool = False
    expect_kill: bool = False
    eof: bool = False
    last_event: float = 0.0
    stalled: bool = False
    synced_once: bool = False
    errored: bool = False
    last_rev: int = -1  # revision of its last step or sync report

    @property
    def name(self) -> str:
        return f"#{self.idx}(id {self.peer_id})"

    @property
    def running(self) -> bool:
        """Alive and expected to report (not stopped, cut off, leaving, or being killed)."""
        return not (self.eof or self.stopped or self.cut or self.leaving or self.expect_kill)


@dataclass
class Stats:
    faults: dict[str, int]
    joins_restart: int = 0
    stalls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrong_results: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    join_latencies: list[float] = field(default_factory=list)
    retries: dict[str, int] = field(default_factory=dict)
    retry_samples: dict[str, list[str]] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    anomalies: list[str] = field(default_factory=list)
    unexpected_fetches: int = 0
    max_silence_s: float = 0.0
    max_silence_at: str = ""
    skipped_ticks: int = 0
    #: ``{"t": s, "kind": k, "peer": name}`` per fault (also restarts and master restarts).
    fault_times: list[dict[str, Any]] = field(default_factory=list)
    #: ``[t, world]`` of steps: when the world changes, and at least every WORLD_SAMPLE_S.
    world: list[list[float]] = field(default_factory=list)
    #: ``[t of the fault, seconds to recover]`` per measured recovery.
    recovery_times: list[list[float]] = field(default_factory=list)


class Driver:
    """Runs one chaos session; see the module docstring. ``run()`` returns the report dict."""

    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.rng = random.Random(opts.seed)
        self.plan = FaultPlan(self.rng, tuple(k for k in opts.kinds))
        self.q: queue.Queue[tuple[Child, dict[str, Any] | None]] = queue.Queue()
        self.children: list[Child] = []
        self.book = ParityBook()
        self.stats = Stats(faults={k: 0 for k in opts.kinds})
        self.timers: list[tuple[float, str, Child | None, str]] = []  # (when, action, who, arg)
        self.pending_faults: list[float] = []  # disruptive fault times awaiting recovery
        self.master_proc: subprocess.Popen[bytes] | None = None
        self.master_addr = opts.master or ""
        self.cluster: Any = None
        self.slots: list[str] = []
        self.rates: set[str] = set()
        self.cuts: set[str] = set()
        self.next_idx = 0
        self.last_step_t = 0.0
        self.t0 = 0.0
        self.log_dir = Path(opts.log_dir) if opts.log_dir else None
        self.own_log_dir = False
        self.elapsed = 0.0
        self.master_down = False
        self.pbar: Any = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> dict[str, Any]:
        old = _install_exit_signals()
        try:
            self._setup()
            self._loop()
            self._drain()
            return self._report()
        finally:
            self._teardown()
            _restore_signals(old)

    def _setup(self) -> None:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="pccl-chaos-"))
            self.own_log_dir = True
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.o.netns:
            netns = load_netns_harness(self.o.harness)
            ok, why = netns.available()
            if not ok:
                raise ChaosSetupError(f"--netns needs network namespaces: {why}")
            self.slots = [f"p{i}" for i in range(self.o.max_peers)]
            self.cluster = netns.Cluster(["m", *self.slots])
            self.cluster.up()
        if not self.master_addr:
            self._start_master(0)
        self.t0 = time.monotonic()
        self.last_step_t = self.t0
        for _ in range(self.o.peers):
            self._spawn()

    def _start_master(self, port: int) -> None:
        """Start the master (``port`` 0: any free one; a restart reuses the first one)."""
        assert self.log_dir is not None
        host = self.cluster.ip("m") if self.cluster is not None else "127.0.0.1"
        argv = [sys.executable, "-m", "pccl.tools.chaos", "master", str(os.getpid())]
        argv += ["--host", host, "--port", str(port), "--log-level", "info"]
        # A restart must neither reissue ids nor let newcomers form a second run.
        argv += ["--state-file", str(self.log_dir / "master-state.json")]
        if self.o.token_file:
            argv += ["--token-file", self.o.token_file]
        if self.cluster is not None:
            argv = self.cluster.exec_argv("m", argv)
        with (self.log_dir / "master.log").open("ab") as err:
            self.master_proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **CHAOS_ENV},
                start_new_session=True,
                preexec_fn=_kill_me_with_parent,
            )
        try:
            self.master_addr = master_banner(self.master_proc, host, MASTER_START_S)[0]
        except RuntimeError as e:
            raise ChaosSetupError(
                f"master did not start ({e}); log: {self.log_dir / 'master.log'}"
            ) from None

    def _teardown(self) -> None:
        for c in self.children:
            _kill(c.proc)
        if self.master_proc is not None:
            _kill(self.master_proc, grace_s=3.0)
        if self.cluster is not None:
            self.cluster.down()

    # ------------------------------------------------------------------ children

    def _alive(self) -> list[Child]:
        return [c for c in self.children if not c.eof]

    def _spawn(self) -> Child | None:
        assert self.log_dir is not None
        slot = ""
        if self.cluster is not None:
            busy = {c.slot for c in self._alive()} | self.cuts | self.rates
            free = [s for s in self.slots if s not in busy]
            if not free:
                return None
            slot = free[0]
        idx = self.next_idx
        self.next_idx += 1
        params = {
            "master": self.master_addr,
            "seed": self.o.seed,
            "mib": self.o.mib,
            "idx": idx,
            "parent": os.getpid(),
            "max_s": self.o.duration + DRAIN_S + 60.0,
            "token_file": self.o.token_file,
        }
        argv = [sys.executable, "-m", "pccl.tools.chaos", "worker", json.dumps(params)]
        if self.cluster is not None:
            argv = self.cluster.exec_argv(slot, argv)
        log = self.log_dir / f"peer{idx}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **CHAOS_ENV, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=_kill_me_with_parent,
            )
        now = time.monotonic()
        c = Child(idx, proc, log, now, slot=slot, last_event=now)
        self.children.append(c)
        threading.Thread(target=self._read, args=(c,), daemon=True).start()
        return c

    def _read(self, c: Child) -> None:
        assert c.proc.stdout is not None
        for raw in c.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"event": "text", "line": raw.decode("utf-8", "replace")[:200]}
            if isinstance(ev, dict):
                self.q.put((c, ev))
        self.q.put((c, None))

    # ------------------------------------------------------------------ main loop

    def _loop(self) -> None:
        from pccl import progress  # here, not at the top: workers start faster without tqdm

        with progress.bar(round(self.o.duration), "chaos", unit="s") as self.pbar:
            self._churn()
        self.pbar = None

    def _churn(self) -> None:
        end = self.t0 + self.o.duration
        next_fault = self.t0 + max(2.0, self.o.interval)
        next_summary = self.t0 + SUMMARY_EVERY_S
        fired = 0
        pbar = self.pbar
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if not pbar.disable and int(now - self.t0) > pbar.n:
                pbar.set_postfix_str(
                    f"rev {self.book.max_revision}, faults {sum(self.stats.faults.values())}",
                    refresh=False,
                )
                pbar.update(int(now - self.t0) - pbar.n)
            self._run_timers(now)
            if now >= next_fault:
                if fired < self.o.max_faults and self.book.max_revision > 0:
                    fired += self._inject()
                next_fault = now + self.rng.uniform(0.5, 1.5) * self.o.interval
            if now >= next_summary:
                self._summary(now)
                next_summary = now + SUMMARY_EVERY_S
            self._check_stalls(now)
            wake = min([end, next_fault, next_summary, *(t[0] for t in self.timers)])
            self._pump(max(0.0, min(wake - now, 0.25)))

    def _pump(self, timeout: float) -> None:
        try:
            c, ev = self.q.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._on_event(c, ev)
            try:
                c, ev = self.q.get_nowait()
            except queue.Empty:
                return

    def _on_event(self, c: Child, ev: dict[str, Any] | None) -> None:
        now = time.monotonic()
        if ev is None:
            self._on_exit(c)
            return
        if not c.stopped and not c.cut and now - c.last_event > self.stats.max_silence_s:
            self.stats.max_silence_s = now - c.last_event
            self.stats.max_silence_at = (
                f"peer {c.name} until t={now - self.t0:.1f}s, then {ev.get('event')}"
            )
        c.last_event = now
        c.stalled = False
        kind = ev.get("event")
        if kind == "joined":
            c.peer_id = int(ev["peer_id"])
            c.incarnation = int(ev["incarnation"])
            c.established = False
        elif kind == "synced":
            who = f"peer {c.name} sync"
            self._parity(int(ev["revision"]), str(ev["hash"]), who)
            if c.last_rev == int(ev["revision"]) and ev.get("rx", 0):
                # Up to date with the elected state, yet bytes were fetched: wasted transfer.
                self.stats.unexpected_fetches += 1
            c.last_rev = int(ev["revision"])
            if not c.synced_once:
                c.synced_once = True
                self.stats.join_latencies.append(now - c.spawned)
            c.established = True
        elif kind == "step":
            self._parity(int(ev["revision"]), str(ev["hash"]), f"peer {c.name} step")
            c.last_rev = int(ev["revision"])
            self.last_step_t = now
            self._sample_world(now, int(ev.get("world", 0)))
            t_start = float(ev["t_start"])
            still = []
            for t_fault in self.pending_faults:
                if t_start >= t_fault:
                    self.stats.recoveries.append(float(ev["t"]) - t_fault)
                    self.stats.recovery_times.append(
                        [round(t_fault - self.t0, 3), round(float(ev["t"]) - t_fault, 3)]
                    )
                else:
                    still.append(t_fault)
            self.pending_faults = still
            if not ev.get("ok", True):
                self.stats.wrong_results.append(f"peer {c.name}: {ev.get('why')}")
        elif kind == "retry":
            err = str(ev.get("error", "?"))
            self.stats.retries[err] = self.stats.retries.get(err, 0) + 1
            samples = self.stats.retry_samples.setdefault(err, [])
            if len(samples) < 3:
                samples.append(f"{ev.get('phase')}: {str(ev.get('message'))[:200]}")
        elif kind == "evicted":
            why = _reason(str(ev.get("error", "")))
            self.stats.evictions[why] = self.stats.evictions.get(why, 0) + 1
            c.established = False
            if "protocol error" in why:  # a correct master never sends a malformed frame
                self.stats.anomalies.append(f"peer {c.name}: {ev.get('error')}")
                self._say(f"ANOMALY peer {c.name}: {ev.get('error')}")
        elif kind == "error":
            c.errored = True
            self.stats.errors.append(f"peer {c.name}: {ev.get('type')}: {ev.get('message')}")
        elif kind == "left":
            c.leaving = True

    def _sample_world(self, now: float, world: int) -> None:
        samples = self.stats.world
        t = round(now - self.t0, 3)
        if not samples or samples[-1][1] != world or t - samples[-1][0] >= WORLD_SAMPLE_S:
            samples.append([t, world])

    def _mark(self, kind: str, who: str = "") -> None:
        """Put a fault (or a restart) on the report's timeline."""
        t = round(time.monotonic() - self.t0, 3)
        self.stats.fault_times.append({"t": t, "kind": kind, "peer": who})

    def _parity(self, revision: int, digest: str, who: str) -> None:
        bad = self.book.record(revision, digest, who)
        if bad:
            self._say(f"PARITY VIOLATION {bad}")

    def _on_exit(self, c: Child) -> None:
        c.eof = True
        try:
            rc = c.proc.wait(10)
        except subprocess.TimeoutExpired:
            _kill(c.proc)
            rc = c.proc.wait(10)
        expected = (c.expect_kill and rc == -signal.SIGKILL) or (c.leaving and rc == 0)
        if not expected and not c.errored:
            tail = _tail(c.log)
            self.stats.errors.append(f"peer {c.name} exited with {rc}: {tail[-400:]!r}")
            self._say(f"peer {c.name} exited unexpectedly with {rc}; log {c.log}")

    def _check_stalls(self, now: float) -> None:
        limit = self.o.stall_limit
        m = self.master_proc
        if m is not None and not self.master_down and m.poll() is not None:
            self.stats.errors.append(f"the master exited with {m.returncode} mid-run")
            self._say(f"the master exited with {m.returncode}; log {self.log_dir}/master.log")
            self.master_down = True  # report once; nothing restarts it
        for c in self._alive():
            if c.running and not c.stalled and now - c.last_event > limit:
                c.stalled = True
                msg = f"peer {c.name} silent for {now - c.last_event:.1f}s (limit {limit}s)"
                self.stats.stalls.append(msg)
                self._say(f"STALL {msg}; log {c.log}")
        if now - self.last_step_t > limit:
            msg = f"no step completed for {now - self.last_step_t:.1f}s (limit {limit}s)"
            self.stats.stalls.append(msg)
            self._say(f"STALL {msg}")
            self.last_step_t = now  # one report per episode

    # ------------------------------------------------------------------ faults

    def _effective(self) -> list[Child]:
        """Peers that hold the group's state and will take part in the next step."""
        return [c for c in self._alive() if c.running and c.established]

    def _victims(self) -> list[Child]:
        eff = len(self._effective())
        return [
            c
            for c in self._alive()
            if c.running and eff - (1 if c.established else 0) >= MIN_POPULATION
        ]

    def _inject(self) -> int:
        victims = self._victims()
        alive = len(self._alive())
        eligible = set()
        if victims:
            eligible |= {"kill", "hang", "leave", "linkcut"}
        if alive < self.o.max_peers:
            eligible.add("join")
        if any(c.running and c.slot not in self.rates for c in self._alive()):
            eligible.add("ratelimit")
        if self.master_proc is not None and not self.master_down:
            eligible.add("masterkill")
        kind = self.plan.next(eligible)
        if kind is None:
            self.stats.skipped_ticks += 1
            return 0
        now = time.monotonic()
        if kind == "join":
            if self._spawn() is None:
                return 0
            self._say(f"join: peer #{self.next_idx - 1}")
            self._mark(kind, f"#{self.next_idx - 1}")
        elif kind == "masterkill":
            self._fault_masterkill(now)
            self._mark(kind, "master")
        else:
            pool = victims if kind in DISRUPTIVE else [c for c in self._alive() if c.running]
            pool = [c for c in pool if not (kind == "ratelimit" and c.slot in self.rates)]
            victim = self.rng.choice(sorted(pool, key=lambda c: c.idx))
            getattr(self, f"_fault_{kind}")(victim, now)
            self._mark(kind, victim.name)
            if kind in DISRUPTIVE:
                self.pending_faults.append(now)
        self.stats.faults[kind] += 1
        return 1

    def _fault_masterkill(self, now: float) -> None:
        """SIGKILL the master; restart it on the same address a moment later (peers resume)."""
        assert self.master_proc is not None
        d = self.rng.uniform(0.5, 3.0)
        self._say(f"masterkill: SIGKILL the master, restart in {d:.1f}s")
        _kill(self.master_proc)
        self.master_down = True
        self.pending_faults.append(now)
        self.timers.append((now + d, "master_up", None, ""))

    def _fault_kill(self, c: Child, now: float) -> None:
        self._say(f"kill: peer {c.name}")
        c.expect_kill = True
        _signal(c.proc, signal.SIGKILL)
        self._replace(now)

    def _fault_hang(self, c: Child, now: float) -> None:
        d = self.rng.uniform(1.0, 8.0)
        self._say(f"hang: peer {c.name} SIGSTOP for {d:.1f}s")
        c.stopped = True
        _signal(c.proc, signal.SIGSTOP)
        self.timers.append((now + d, "cont", c, ""))

    def _fault_leave(self, c: Child, now: float) -> None:
        self._say(f"leave: peer {c.name} closes")
        c.leaving = True
        _signal(c.proc, signal.SIGUSR1)
        self._replace(now)

    def _fault_linkcut(self, c: Child, now: float) -> None:
        d = self.rng.uniform(2.0, 6.0)
        self._say(f"linkcut: peer {c.name} ({c.slot}) link down for {d:.1f}s")
        c.cut = True
        self.cuts.add(c.slot)
        self.cluster.set_link(c.slot, up=False)
        self.timers.append((now + d, "uncut", c, c.slot))

    def _fault_ratelimit(self, c: Child, now: float) -> None:
        d = self.rng.uniform(3.0, 8.0)
        rate = self.rng.choice(["50mbit", "200mbit", "1gbit"])
        self._say(f"ratelimit: peer {c.name} ({c.slot}) tbf {rate} for {d:.1f}s")
        self.rates.add(c.slot)
        self.cluster.set_rate(c.slot, rate)
        self.timers.append((now + d, "unrate", c, c.slot))

    def _replace(self, now: float) -> None:
        """A restart: keep the population near N with a fresh peer a moment later."""
        if len(self._alive()) - 1 < self.o.peers:
            self.timers.append((now + self.rng.uniform(0.5, 2.0), "spawn", None, ""))

    def _run_timers(self, until: float) -> None:
        """Run every timer due by ``until``."""
        due = [t for t in self.timers if t[0] <= until]
        self.timers = [t for t in self.timers if t[0] > until]
        for _, action, c, arg in due:
            now = time.monotonic()
            if action == "cont" and c is not None:
                c.stopped = False
                c.last_event = now
                _signal(c.proc, signal.SIGCONT)
                self._say(f"resume: peer {c.name} SIGCONT")
            elif action == "uncut" and c is not None:
                self.cluster.set_link(arg, up=True)
                self.cuts.discard(arg)
                c.cut = False
                c.last_event = now
            elif action == "unrate":
                self.cluster.set_rate(arg, None)
                self.rates.discard(arg)
            elif action == "master_up":
                try:
                    self._start_master(int(self.master_addr.rsplit(":", 1)[1]))
                    self._say("masterkill: master restarted")
                except ChaosSetupError as e:
                    self.stats.errors.append(f"master restart failed: {e}")
                    self._say(f"master restart failed: {e}")
                self.master_down = False
            elif (
                action == "spawn"
                and len(self._alive()) < self.o.max_peers
                and self._spawn() is not None
            ):
                self.stats.joins_restart += 1
                self.stats.faults["join"] = self.stats.faults.get("join", 0) + 1
                self._say(f"restart: peer #{self.next_idx - 1}")
                self._mark("restart", f"#{self.next_idx - 1}")

    # ------------------------------------------------------------------ end of run

    def _drain(self) -> None:
        """Stop injecting, resume stopped peers, make everyone leave, collect the last events."""
        now = time.monotonic()
        self.timers = [t for t in self.timers if t[1] != "spawn"]
        self._run_timers(math.inf)  # resume, reconnect, lift limits, restart the master
        self.elapsed = now - self.t0
        for c in self._alive():
            c.leaving = True
            _signal(c.proc, signal.SIGUSR1)
        deadline = now + DRAIN_S
        while any(not c.eof for c in self.children) and time.monotonic() < deadline:
            self._pump(0.25)
        for c in self._alive():  # did not leave in time: not a violation of the run itself
            c.expect_kill = True
            _kill(c.proc)
        while any(not c.eof for c in self.children) and time.monotonic() < deadline + 10:
            self._pump(0.25)
        m = self.master_proc
        if m is not None and not self.master_down and m.poll() is not None:
            self.stats.errors.append(f"the master exited with {m.returncode}")

    def _report(self) -> dict[str, Any]:
        s = self.stats
        steps = self.book.max_revision
        elapsed = self.elapsed or time.monotonic() - self.t0
        missing = [k for k in self.o.kinds if k != "join" and s.faults.get(k, 0) == 0]
        ok = not (self.book.violations or s.stalls or s.errors or s.wrong_results) and steps > 0
        ok = ok and not (self.o.strict and s.anomalies)
        report: dict[str, Any] = {
            "steps": steps,
            "faults": s.faults,
            "parity_checks": self.book.checks,
            "parity_violations": len(self.book.violations),
            "stalls": len(s.stalls),
            "max_recovery_s": round(max(s.recoveries, default=0.0), 3),
            "throughput_steps_per_s": round(steps / elapsed, 3) if elapsed > 0 else 0.0,
            "ok": ok,
            "seed": self.o.seed,
            "peers": self.o.peers,
            "duration_s": round(elapsed, 1),
            "restarts": s.joins_restart,
            "processes_spawned": self.next_idx,
            "evictions_rejoined": s.evictions,
            "anomalies": s.anomalies[:20],
            "retries": s.retries,
            "retry_samples": s.retry_samples,
            "median_recovery_s": round(_median(s.recoveries), 3),
            "recoveries_measured": len(s.recoveries),
            "max_join_s": round(max(s.join_latencies, default=0.0), 3),
            "max_silence_s": round(s.max_silence_s, 3),
            "max_silence_at": s.max_silence_at,
            "unexpected_fetches": s.unexpected_fetches,
            "fault_kinds_not_fired": missing,
            "worker_errors": s.errors[:20],
            "wrong_results": s.wrong_results[:20],
            "violations": self.book.violations[:20],
            "stall_details": s.stalls[:20],
            "netns": self.o.netns,
            "log_dir": str(self.log_dir),
            "timeline": {
                "faults": s.fault_times,
                "world": s.world,
                "recoveries": s.recovery_times,
            },
        }
        if ok and self.own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            report["log_dir"] = None
        return report

    # ------------------------------------------------------------------ output

    def _say(self, msg: str) -> None:
        from pccl import progress

        with progress.printing():
            print(f"[chaos {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def _summary(self, now: float) -> None:
        alive = self._alive()
        rev = self.book.max_revision
        faults = " ".join(f"{k}={v}" for k, v in self.stats.faults.items())
        self._say(
            f"rev {rev} ({rev / max(now - self.t0, 1e-9):.1f} steps/s)  peers "
            f"{sum(c.running for c in alive)} running/{sum(c.stopped for c in alive)} stopped  "
            f"faults {faults}  parity {self.book.checks} ok/{len(self.book.violations)} bad  "
            f"stalls {len(self.stats.stalls)}  errors {len(self.stats.errors)}  "
            f"max recovery {max(self.stats.recoveries, default=0.0):.1f}s"
        )


# =============================================================================== process helpers


def _reason(message: str) -> str:
    """An error message without its numbers, to count by kind."""
    return re.sub(r"\d+(\.\d+)?", "N", message)[:120]


def _median(xs: list[float]) -> float:
    if not xs:
        return 0.0
    ys = sorted(xs)
    return ys[len(ys) // 2]


def _install_exit_signals() -> dict[int, Any]:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks kill the children."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def bail(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    return {s: signal.signal(s, bail) for s in (signal.SIGTERM, signal.SIGHUP)}


def _restore_signals(old: dict[int, Any]) -> None:
    for s, h in old.items():
        signal.signal(s, h)


def load_netns_harness(path: str | None = None) -> ModuleType:
    """The network-namespace harness: :mod:`pccl.tools.netns`, or the file at ``path`` (a
    harness of your own with the same interface).

    Raises:
        ChaosSetupError: the file cannot be found or loaded.
    """
    if not path:
        from pccl.tools import netns

        return netns
    p = Path(path)
    if not p.is_file():
        raise ChaosSetupError(f"netns harness not found at {p}")
    spec = importlib.util.spec_from_file_location("pccl_custom_netns", p)
    if spec is None or spec.loader is None:
        raise ChaosSetupError(f"cannot load {p}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


# =============================================================================== peer worker


class _Leave(Exception):
    """SIGUSR1 arrived, or the worker's own deadline passed: leave at this call boundary."""


def _emit(event: str, **fields: Any) -> None:
    try:
        print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)
    except BrokenPipeError:  # the driver is gone
        os._exit(0)


def _initial_state(seed: int, mib: int) -> dict[str, Any]:
    import numpy as np

    n = max(4096, mib * (1 << 20) // 4)
    rng = np.random.default_rng([seed, 0xC4A05])
    w = rng.standard_normal(n, dtype=np.float32)
    return {
        "w": w,
        "q": np.zeros(n // 2, np.float32),
        "acc": np.zeros(1024, np.float64),
        "half": w[:4096].astype(np.float16),
        "meta": np.zeros(4, np.int64),
    }


class _StepRunner:
    """One peer's deterministic training step: inputs from (seed, revision, peer id, state);
    the state changes only from all-reduce results, which are bit-identical on every peer."""

    QUANT0 = ("NONE", "BF16", "NONE", "FP16")

    def __init__(self, seed: int, arrays: dict[str, Any]) -> None:
        self.seed = seed
        self.a = arrays

    def sizes(self, rev: int) -> int:
        n = self.a["w"].size
        return (n, n // 3 + 1, 4097, 1)[rev % 4]

    def run(self, comm: Any, rev: int) -> tuple[int, str]:
        """All-reduce this step's inputs and update the state; returns (world, problem or '')."""
        import numpy as np

        import pccl

        a = self.a
        n0 = self.sizes(rev)
        rng = np.random.default_rng([self.seed, rev, comm.peer_id])
        g0 = rng.random(n0, dtype=np.float32)
        g0 -= np.float32(0.5)
        g0 += a["w"][:n0] * np.float32(1e-3)
        out0 = np.empty_like(g0)
        g1 = rng.random(a["q"].size, dtype=np.float32)
        out1 = np.empty_like(g1)
        x2 = rng.random(a["acc"].size)
        x2[0] = 1.0
        quant0 = pccl.Quantization[self.QUANT0[rev % 4]]
        i0 = comm.all_reduce(g0, out0, op=pccl.ReduceOp.AVG, quantization=quant0, tag=0)
        handles: list[Any] = []
        results: list[Any] = []
        try:
            handles.append(
                comm.all_reduce_async(
                    g1, out1, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization.UINT8, tag=1
                )
            )
            handles.append(comm.all_reduce_async(x2, op=pccl.ReduceOp.SUM, tag=2))
        finally:
            for h in handles:  # wait for every started op before raising: none left in flight
                try:
                    results.append(h.wait(timeout=CALL_TIMEOUT_S * 2))
                except TimeoutError:
                    raise RuntimeError(f"all_reduce tag {h.tag} ignored its deadline") from None
                except pccl.PCCLError as e:
                    results.append(e)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        world = i0.world_size
        problem = ""
        if x2[0] != world or any(r.world_size != world for r in results):
            problem = f"SUM of ones gave {x2[0]} in a world of {world}"
        elif not (np.all(np.isfinite(out0)) and np.all(np.isfinite(out1))):
            problem = "non-finite all-reduce result"
        w = a["w"]
        w[:n0] -= out0 * np.float32(0.01)
        a["q"] *= np.float32(0.9)
        a["q"] += out1 * np.float32(0.1)
        a["acc"] += x2
        np.copyto(a["half"], w[: a["half"].size], casting="same_kind")
        a["meta"] += np.array([1, world, n0, int(quant0)], np.int64)
        return world, problem


def _state_digest(state: Any) -> str:
    import xxhash

    hashes = state.hashes()
    return xxhash.xxh3_128_hexdigest("".join(hashes[k] for k in sorted(hashes)).encode())


def _worker(p: dict[str, Any]) -> int:
    """Run one peer; an unexpected exception is reported as an ``error`` event and exit 1."""
    _die_with_parent(int(p["parent"]))
    try:
        return _worker_main(p)
    except BaseException as e:
        import traceback

        _emit("error", type=type(e).__name__, message=str(e)[:500], tb=traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)


def _worker_main(p: dict[str, Any]) -> int:
    import pccl

    leave = threading.Event()
    signal.signal(signal.SIGUSR1, lambda s, f: leave.set())
    deadline = time.monotonic() + float(p["max_s"])
    token = Path(p["token_file"]).read_bytes().strip() if p.get("token_file") else None
    arrays = _initial_state(int(p["seed"]), int(p["mib"]))
    state = pccl.SharedState(arrays, revision=0)
    runner = _StepRunner(int(p["seed"]), arrays)
    incarnation = 0

    def check() -> None:
        if leave.is_set() or time.monotonic() > deadline:
            raise _Leave

    while True:
        try:
            check()
        except _Leave:
            _emit("left", incarnation=incarnation)
            return 0
        # Two real streams even on loopback (local_streams=0): faults must hit the striped path.
        cfg = pccl.Config.from_env(local_streams=0)
        comm = pccl.Communicator(p["master"], streams=2, auth_token=token, config=cfg)
        try:
            comm.connect(timeout=CALL_TIMEOUT_S)
        except pccl.PCCLError as e:
            comm.close()
            _emit("retry", error=type(e).__name__, phase="connect", message=str(e)[:300])
            time.sleep(0.5)
            continue
        incarnation += 1
        _emit("joined", peer_id=comm.peer_id, world=comm.world_size, incarnation=incarnation)
        try:
            _peer_loop(comm, state, runner, check)
        except _Leave:
            comm.close()
            _emit("left", incarnation=incarnation)
            return 0
        except pccl.ConnectionLost as e:
            # Dropped (evicted after a hang or link cut): rejoin as a fresh peer.
            comm.close()
            _emit("evicted", error=str(e)[:300], revision=state.revision)


def _peer_loop(comm: Any, state: Any, runner: _StepRunner, check: Any) -> None:
    import pccl

    retryable = (
        pccl.CollectiveAborted,
        pccl.VerdictUnknown,  # the step changed no state: redo it after the sync
        pccl.TopologyUpdateFailed,
        pccl.SharedStateError,
        pccl.TooFewPeers,
        pccl.MasterUnreachable,
    )
    first = True
    rev = state.revision
    last_wait = 0.0
    while True:
        phase = "update_topology"
        try:
            if not first or comm.group_world_size < 2:
                check()
                comm.update_topology(timeout=CALL_TIMEOUT_S)
            first = False
            t_start = time.monotonic()
            if comm.group_world_size < 2:
                if t_start - last_wait > 1.0:
                    _emit("waiting", world=comm.world_size)
                    last_wait = t_start
                time.sleep(0.1)
                continue
            phase = "sync"
            check()
            state.revision = rev
            info = comm.sync_shared_state(state, timeout=CALL_TIMEOUT_S)
            rev = state.revision
            _emit(
                "synced",
                revision=rev,
                hash=_state_digest(state),
                rx=info.rx_bytes,
                tx=info.tx_bytes,
                world=comm.group_world_size,
            )
            phase = "all_reduce"
            check()
            t0 = time.monotonic()
            world, problem = runner.run(comm, rev)
            rev += 1
            state.revision = rev
            _emit(
                "step",
                revision=rev,
                hash=_state_digest(state),
                world=world,
                t_start=t_start,
                seconds=round(time.monotonic() - t0, 6),
                ok=not problem,
                why=problem,
            )
        except retryable as e:
            first = False
            _emit("retry", error=type(e).__name__, phase=phase, message=str(e)[:300])


# =============================================================================== entry points


def _master_entry(argv: list[str]) -> int:
    """``python -m pccl.tools.chaos master PARENT_PID ARGS...``: ``pccl master`` that dies
    with us."""
    _die_with_parent(int(argv[0]))
    from pccl.master.cli import main as master_main

    return master_main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker(json.loads(argv[1]))
    if argv[:1] == ["master"]:
        return _master_entry(argv[1:])
    from pccl.tools.proc import run_subcommand

    return run_subcommand(add_arguments, "chaos", argv)


if __name__ == "__main__":
    sys.exit(main())
