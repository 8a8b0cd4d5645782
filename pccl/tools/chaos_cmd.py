"""``pccl chaos --cmd "python train.py ..."``: churn a team's own training command.

The built-in chaos worker reports its own hashes; a user's command reports nothing. So this
driver judges parity where it is decided anyway: on the master. It starts a master with its
status endpoint, launches N copies of the command (each with ``PCCL_MASTER``,
``PCCL_PEER_INDEX`` and ``PCCL_NUM_PEERS`` in its environment, output to a log file each),
injects faults at random (seeded) times, and polls ``/status``:

- ``kill``: SIGKILL a peer (a crash); a replacement joins after ``rejoin_s``;
- ``hang``: SIGSTOP a peer for ``hang_s`` (longer than the heartbeat timeout: it is evicted),
  then SIGCONT; the command is expected to notice it was evicted and exit; a replacement joins;
- ``leave``: SIGTERM a peer (a preempted spot machine: pccl leaves the run cleanly);
- ``join``: one more peer, up to ``max_peers``.

Every shared-state sync in which two or more peers vote at the elected revision is a parity
check: a peer holding other bytes at that revision had diverged. The master counts both
(``/status`` ``parity``); the run passes when parity was judged at least once and never
violated. Exits 0 on pass, 1 on a violation or when nothing could be judged, 2 on bad usage.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pccl.tools.proc import die_with_parent as _kill_me_with_parent
from pccl.tools.proc import send_signal as _signal
from pccl.tools.proc import spawn_master_with_status
from pccl.tools.proc import stop as _kill
from pccl.tools.proc import tail as _tail

__all__ = ["CmdOptions", "run_cmd_chaos"]

CMD_FAULTS = ("kill", "hang", "leave", "join")


@dataclass(frozen=True)
class CmdOptions:
    cmd: list[str]
    peers: int
    duration: float
    seed: int
    kinds: tuple[str, ...]
    interval: float
    max_peers: int
    hang_s: float = 8.0
    rejoin_s: float = 2.0
    log_dir: str | None = None
    heartbeat_timeout_s: float = 3.0


@dataclass
class _Proc:
    index: int
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    fault: str = ""  # the fault it received, if any
    rc: int | None = None


@dataclass
class _Run:
    opts: CmdOptions
    status: str
    procs: list[_Proc] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    world: list[tuple[float, int]] = field(default_factory=list)
    next_index: int = 0
    t0: float = 0.0


def run_cmd_chaos(opts: CmdOptions, say: Any = print) -> dict[str, Any]:
    """Run the churn; return the report (``ok``, parity figures, faults, exits, world size)."""
    logs = Path(opts.log_dir or tempfile.mkdtemp(prefix="pccl-chaos-cmd-"))
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PCCL_HEARTBEAT_TIMEOUT_S": str(opts.heartbeat_timeout_s),
        "PYTHONUNBUFFERED": "1",
    }
    with (logs / "master.log").open("wb") as mlog:
        master, addr, status = spawn_master_with_status(
            "info",
            extra_args=["--state-file", str(logs / "master-state.json")],
            env=env,
            stderr=mlog,
            preexec_fn=_kill_me_with_parent,
        )
    run = _Run(opts, status)
    rng = random.Random(opts.seed)
    try:
        run.t0 = time.monotonic()
        for _ in range(opts.peers):
            _spawn(run, addr, env, logs)
        say(f"pccl chaos --cmd: master {addr}, {opts.peers} x {shlex.join(opts.cmd)}; logs {logs}")
        next_fault = run.t0 + rng.expovariate(1 / opts.interval) + 2 * opts.interval
        pending: list[tuple[float, str, int]] = []  # (when, action, index)
        end = run.t0 + opts.duration
        while time.monotonic() < end:
            now = time.monotonic()
            doc = _status(status)
            if doc is not None:
                run.world.append((round(now - run.t0, 2), len(doc.get("peers", []))))
            for p in run.procs:
                if p.rc is None and p.proc.poll() is not None:
                    p.rc = p.proc.returncode
                    say(f"  t={now - run.t0:5.1f}s peer #{p.index} exited rc={p.rc}")
            for when, action, idx in list(pending):
                if now >= when:
                    pending.remove((when, action, idx))
                    if action == "cont":
                        _signal(run.procs[idx].proc, signal.SIGCONT)
                    elif action == "rejoin" and _alive(run) < opts.max_peers:
                        _spawn(run, addr, env, logs)
            while _alive(run) < 2 and not pending:  # keep a group to churn
                _spawn(run, addr, env, logs)
            if now >= next_fault:
                _inject(run, rng, pending, addr, env, logs, say)
                next_fault = now + rng.expovariate(1 / opts.interval)
            time.sleep(0.25)
        final = _status(status) or {}
    finally:
        for p in run.procs:
            _signal(p.proc, signal.SIGCONT)
            _signal(p.proc, signal.SIGTERM)
        for p in run.procs:
            _kill(p.proc, grace_s=10.0)
            if p.rc is None:
                p.rc = p.proc.returncode
        _kill(master, grace_s=5.0)
    parity = final.get("parity", {})
    judged = int(parity.get("syncs_judged", 0))
    violations = int(parity.get("violations", 0))
    report = {
        "ok": judged > 0 and violations == 0,
        "cmd": opts.cmd,
        "duration_s": opts.duration,
        "syncs_judged": judged,
        "parity_violations": violations,
        "violations": parity.get("recent", []),
        "faults": run.faults,
        "departures": final.get("totals", {}).get("departures", {}),
        "peers_started": len(run.procs),
        "exits": [
            {"index": p.index, "rc": p.rc, "fault": p.fault, "log": str(p.log)} for p in run.procs
        ],
        "world": run.world,
        "logs": str(logs),
    }
    if not report["ok"]:
        bad = [p for p in run.procs if p.rc not in (0, None, -signal.SIGTERM) and not p.fault]
        for p in bad[:3]:
            say(f"--- peer #{p.index} (rc={p.rc}) log tail:\n{_tail(p.log)}")
    return report


def _alive(run: _Run) -> int:
    return sum(1 for p in run.procs if p.proc.poll() is None and p.fault != "hang")


def _spawn(run: _Run, addr: str, env: dict[str, str], logs: Path) -> _Proc:
    i = run.next_index
    run.next_index += 1
    log = logs / f"peer{i}.log"
    penv = {
        **env,
        "PCCL_MASTER": addr,
        "PCCL_PEER_INDEX": str(i),
        "PCCL_NUM_PEERS": str(run.opts.peers),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            run.opts.cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=penv,
            preexec_fn=_kill_me_with_parent,
        )
    p = _Proc(i, proc, log, time.monotonic())
    run.procs.append(p)
    return p


def _inject(
    run: _Run,
    rng: random.Random,
    pending: list[tuple[float, str, int]],
    addr: str,
    env: dict[str, str],
    logs: Path,
    say: Any,
) -> None:
    opts = run.opts
    now = time.monotonic()
    victims = [p for p in run.procs if p.proc.poll() is None and not p.fault]
    kinds = [k for k in opts.kinds if k == "join" or len(victims) > 2]
    if "join" in kinds and _alive(run) >= opts.max_peers:
        kinds.remove("join")
    if not kinds:
        return
    kind = rng.choice(kinds)
    rec: dict[str, Any] = {"t": round(now - run.t0, 2), "kind": kind}
    if kind == "join":
        rec["peer"] = _spawn(run, addr, env, logs).index
    else:
        v = rng.choice(victims)
        v.fault = kind
        rec["peer"] = v.index
        if kind == "kill":
            _signal(v.proc, signal.SIGKILL)
            pending.append((now + opts.rejoin_s, "rejoin", v.index))
        elif kind == "hang":
            _signal(v.proc, signal.SIGSTOP)
            pending.append((now + opts.hang_s, "cont", v.index))
            pending.append((now + opts.hang_s, "rejoin", v.index))
        elif kind == "leave":
            _signal(v.proc, signal.SIGTERM)
            pending.append((now + opts.rejoin_s, "rejoin", v.index))
    run.faults.append(rec)
    say(f"  t={rec['t']:5.1f}s fault {kind} peer #{rec['peer']}")


def _status(status: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{status}/status", timeout=2) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except (OSError, ValueError):
        return None


def main_cmd(args: Any) -> int:
    """The ``--cmd`` branch of ``pccl chaos`` (arguments already parsed)."""
    cmd = shlex.split(args.user_cmd)
    kinds = [k.strip() for k in (args.cmd_faults or ",".join(CMD_FAULTS)).split(",") if k.strip()]
    bad = [k for k in kinds if k not in CMD_FAULTS]
    if not cmd or bad or args.peers < 2 or args.duration <= 0 or args.interval <= 0:
        why = f"unknown fault kinds {bad} for --cmd (choose from {', '.join(CMD_FAULTS)})"
        print(
            f"pccl chaos: {why if bad else 'need a --cmd, --peers >= 2, --duration > 0'}",
            file=sys.stderr,
        )
        return 2
    max_peers = args.max_peers if args.max_peers is not None else args.peers + 2
    opts = CmdOptions(
        cmd=cmd,
        peers=args.peers,
        duration=args.duration,
        seed=args.seed,
        kinds=tuple(dict.fromkeys(kinds)),
        interval=args.interval,
        max_peers=max_peers,
        log_dir=args.log_dir,
    )
    report = run_cmd_chaos(opts)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    keys = ("ok", "syncs_judged", "parity_violations", "peers_started", "departures")
    print(json.dumps({k: report[k] for k in keys} | {"faults": len(report["faults"])}))
    return 0 if report["ok"] else 1
