"""``pccl hammer``: strangers hammer every listener while authenticated peers all-reduce.

The acceptance check users run to see that strangers cannot hurt a run (DESIGN.md §8). The
driver (this process) starts a real master with a token, a status endpoint and a state file, and
:data:`PEERS` peers (``python -m pccl.tools.hammer peer PARAMS``) that join with the token and loop
exact float32 SUM all-reduces. After a warm-up without attack it records every process's RSS,
then lets :mod:`pccl.tools.stranger` hammer each listener -- the master's control port, its status
port and every peer's p2p port -- at ``--rate`` connections/s each for ``--duration`` seconds,
sampling RSS every second. It then reads the master's ``/status`` with the token, lets the peers
stop together and prints one JSON summary on stdout (progress on stderr). ``ok`` is true iff no
operation aborted (peers and master agree), no peer was evicted or renumbered, every result was
exact, every peer completed operations and no RSS grew by more than ``--rss-limit-mib``. Exit
code 0 iff ok, 1 otherwise, 2 on bad arguments.

The peers stop by consensus: the last element of every all-reduce is a stop flag, so all of them
see the same sum and leave after the same operation (the driver closes their stdin; each also
has its own deadline). Children are killed on every exit path and die with the driver
(``PR_SET_PDEATHSIG``). The driver runs one event loop (uvloop when installed) on its main
thread: the strangers, the child readers and the RSS sampler all live on it. Linux only (RSS and
listening ports come from ``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pccl.frame import MsgType
from pccl.master.daemon import raise_fd_limit
from pccl.tools import machine
from pccl.tools.proc import PREEXEC as _PREEXEC
from pccl.tools.stranger import KINDS, Attacker, Target

__all__ = ["PEERS", "Options", "add_arguments", "main"]

PEERS = 3
STREAMS = 2
WARMUP_S = 3.0
JOIN_TIMEOUT_S = 90.0
MASTER_START_S = 30.0
DRAIN_S = 60.0
PROGRESS_EVERY_S = 5.0
PEER_PROGRESS_EVERY_S = 2.0
MAX_PEER_FAILURES = 5
#: What a peer counts besides completed operations; any of them fails the run.
COUNTED = ("aborts", "evictions", "id_changes", "wrong_results", "errors")


# =============================================================================== CLI


#: (flag, type, default, help) of the numeric options.
_NUMERIC: tuple[tuple[str, type, float, str], ...] = (
    ("--duration", float, 60.0, "seconds of attack"),
    ("--rate", float, 100.0, "connection attempts/s per listener"),
    ("--hold", int, 200, "half-open/partial connections kept open per listener"),
    ("--mib", float, 4.0, "all-reduce size in MiB"),
    ("--seed", int, 0, "attack seed"),
    ("--sources", int, 8, "loopback source addresses of the strangers (127.0.0.2...)"),
    ("--rss-limit-mib", float, 64.0, "allowed RSS growth of any process in MiB"),
)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hammer", help="strangers flood every listener during all-reduces")
    for flag, kind, default, text in _NUMERIC:
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default:g})")
    p.add_argument("--json", metavar="FILE", help="also write the summary here")
    p.add_argument("--log-dir", help="child logs (default: a new temp dir, printed)")
    p.set_defaults(func=_cmd_hammer)


@dataclass(frozen=True)
class Options:
    """Validated ``pccl hammer`` options (see :func:`add_arguments`)."""

    duration: float
    rate: float
    hold: int
    mib: float
    seed: int
    sources: int
    rss_limit_mib: float


def _cmd_hammer(args: argparse.Namespace) -> int:
    checks = [
        (0 < args.duration <= 86400, "--duration must be within (0, 86400]"),
        (0 < args.rate <= 10000, "--rate must be within (0, 10000]"),
        (0 <= args.hold <= 10000, "--hold must be within [0, 10000]"),
        (0 < args.mib <= 1024 and args.mib * (1 << 18) >= PEERS, "--mib must be within (0, 1024]"),
        (1 <= args.sources <= 250, "--sources must be within [1, 250]"),
        (args.rss_limit_mib > 0, "--rss-limit-mib must be > 0"),
        (sys.platform.startswith("linux"), "pccl hammer reads /proc: Linux only"),
    ]
    problems = [msg for good, msg in checks if not good]
    for msg in problems:
        print(f"pccl hammer: {msg}", file=sys.stderr)
    if problems:
        return 2
    opts = Options(
        args.duration, args.rate, args.hold, args.mib, args.seed, args.sources, args.rss_limit_mib
    )
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="pccl-hammer-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    _say(f"child logs in {log_dir}")
    from pccl.peer.blocking import new_event_loop

    loop = new_event_loop()
    try:
        summary = loop.run_until_complete(_main_task(Driver(opts, log_dir)))
    finally:
        loop.close()
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    _say("OK" if summary["ok"] else "FAILED: " + "; ".join(summary["failures"]))
    return 0 if summary["ok"] else 1


async def _main_task(driver: Driver) -> dict[str, Any]:
    """Run ``driver``; SIGTERM/SIGINT/SIGHUP cancel it (children are killed on the way out)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await driver.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


class HammerSetupError(RuntimeError):
    """The run could not be set up (master or peers did not start, a deadline passed)."""


def _say(msg: str) -> None:
    print(f"pccl hammer: {msg}", file=sys.stderr, flush=True)


# =============================================================================== driver


@dataclass
class Child:
    """A peer process and what it reported."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    eof: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Rss:
    """RSS of one process in MiB: after the warm-up, the largest since, at the attack's end."""

    pid: int
    baseline: float | None = None
    max: float | None = None
    end: float | None = None

    def sample(self) -> float | None:
        now = _rss_mib(self.pid)
        if now is not None and self.baseline is not None:
            self.max = max(self.max or now, now)
        return now

    def report(self) -> dict[str, Any]:
        growth = None
        if self.baseline is not None and self.max is not None:
            growth = round(self.max - self.baseline, 2)
        figures = {"baseline": self.baseline, "max": self.max, "end": self.end}
        rounded = {f"{k}_mib": None if v is None else round(v, 2) for k, v in figures.items()}
        return {"pid": self.pid, **rounded, "growth_mib": growth}


class Driver:
    """One ``pccl hammer`` run: master, peers, warm-up, attack, verdict."""

    def __init__(self, opts: Options, log_dir: Path) -> None:
        self.o = opts
        self.log_dir = log_dir
        self.master: subprocess.Popen[str] | None = None
        self.master_addr = ""
        self.status_addr: tuple[str, int] = ("", 0)
        self.token = b""
        self.children: list[Child] = []
        self.readers: list[asyncio.Task[None]] = []
        self.rss: dict[str, Rss] = {}
        self.attacker: Attacker | None = None
        self.status_before: dict[str, Any] = {}
        self.status_after: dict[str, Any] = {}
        self.notes: list[str] = []
        self.fatal: str | None = None
        #: each peer's completed operations when the warm-up starts, the attack starts and ends
        self.ops_marks: list[dict[str, int]] = []
        self.marks_t: list[float] = []

    async def run(self) -> dict[str, Any]:
        raise_fd_limit()
        with tempfile.TemporaryDirectory(prefix="pccl-hammer-secret-") as secret:
            try:
                await self._setup(Path(secret))
                await self._warm_up()
                await self._attack()
                self.status_after = await self._status()
                await self._stop_peers()
            except HammerSetupError as e:
                self.fatal = str(e)
            except asyncio.CancelledError:  # SIGTERM/SIGINT/SIGHUP: report what was measured
                self.fatal = "interrupted by a signal"
            finally:
                self._teardown()
        return _verdict(self)

    # ------------------------------------------------------------------ setup

    async def _setup(self, secret: Path) -> None:
        from pccl.auth import load_token
        from pccl.tools.proc import spawn_master_with_status

        token_file = secret / "token"
        token_file.write_text(secrets.token_hex(32) + "\n")
        token_file.chmod(0o600)
        self.token = load_token(token_file)
        extra = ["--token-file", str(token_file)]
        extra += ["--state-file", str(secret / "master-state.json")]
        with (self.log_dir / "master.log").open("wb") as err:
            try:
                self.master, self.master_addr, status = spawn_master_with_status(
                    "info",
                    extra_args=extra,
                    stderr=err,
                    preexec_fn=_PREEXEC,
                    timeout=MASTER_START_S,
                )
            except RuntimeError as e:
                raise HammerSetupError(f"{e}; log: {self.log_dir / 'master.log'}") from None
        s_host, _, s_port = status.rpartition(":")
        self.status_addr = (s_host, int(s_port))
        self.rss["master"] = Rss(self.master.pid)
        _say(
            f"master on {self.master_addr} (pid {self.master.pid}), status on "
            f"{self.status_addr[0]}:{self.status_addr[1]}"
        )
        nbytes = int(self.o.mib * (1 << 20))
        for idx in range(PEERS):
            params = {
                "idx": idx,
                "world": PEERS,
                "n": nbytes // 4,
                "master": self.master_addr,
                "token_file": str(token_file),
                "streams": STREAMS,
                "max_s": JOIN_TIMEOUT_S + WARMUP_S + self.o.duration + DRAIN_S,
            }
            self._spawn(f"peer{idx}", params)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        await self._wait(lambda c: c.ready is not None, deadline, "the peers to form a ring of 3")
        for c in self.children:
            assert c.ready is not None
            self.rss[c.name] = Rss(c.proc.pid)
            _say(
                f"{c.name}: peer {c.ready['peer_id']}, p2p port {c.ready['p2p_port']} "
                f"(pid {c.proc.pid})"
            )
        await self._wait(lambda c: c.progress.get("ops", 0) > 0, deadline, "first all-reduces")

    def _spawn(self, name: str, params: dict[str, Any]) -> None:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pccl.tools.hammer", "peer", json.dumps(params)],
                stdin=subprocess.PIPE,  # closing it asks the peer to stop
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        self.readers.append(asyncio.create_task(self._read(child)))

    async def _read(self, c: Child) -> None:
        assert c.proc.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), c.proc.stdout)
        try:
            async for raw in reader:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                kind = ev.get("event")
                if kind == "ready":
                    c.ready = ev
                elif kind == "progress":
                    c.progress = ev
                elif kind == "result":
                    c.result = ev
                    c.progress = ev
                elif kind == "error":
                    c.error = f"{ev.get('type')}: {ev.get('message')}"
                c.changed.set()
        except (OSError, ValueError) as e:
            c.error = c.error or f"reading its output: {e}"
        finally:
            c.eof = True
            c.changed.set()

    async def _wait(self, cond: Callable[[Child], bool], deadline: float, what: str) -> None:
        """Until ``cond(child)`` holds for every peer.

        Raises:
            HammerSetupError: a peer failed or exited first, or ``deadline`` passed.
        """
        while True:
            for c in self.children:
                if not cond(c) and (c.eof or c.error):
                    rc = c.proc.poll()
                    raise HammerSetupError(
                        f"{c.name} failed waiting for {what} (rc {rc}): {c.error or 'exited'}; "
                        f"log: {c.log}"
                    )
            if all(cond(c) for c in self.children):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise HammerSetupError(f"timed out waiting for {what}; logs in {self.log_dir}")
            waits = [asyncio.create_task(c.changed.wait()) for c in self.children]
            await asyncio.wait(waits, timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            for c in self.children:
                c.changed.clear()

    # ------------------------------------------------------------------ phases

    async def _warm_up(self) -> None:
        _say(f"warm-up: {WARMUP_S:g} s of all-reduces without strangers")
        self._mark()
        await asyncio.sleep(WARMUP_S)
        self.status_before = await self._status()
        for rss in self.rss.values():
            rss.baseline = rss.max = _rss_mib(rss.pid)
        self._mark()

    async def _attack(self) -> None:
        host, port = self.master_addr.rsplit(":", 1)
        targets = [
            Target("master", host, int(port), MsgType.P2M_HELLO),
            Target("status", self.status_addr[0], self.status_addr[1], MsgType.P2M_HELLO),
        ]
        for c in self.children:
            assert c.ready is not None
            targets.append(Target(c.name, "127.0.0.1", int(c.ready["p2p_port"]), MsgType.P2P_HELLO))
        self.attacker = Attacker(targets, self.o.rate, self.o.hold, self.o.seed, self.o.sources)
        _say(
            f"attack: {len(targets)} listeners x {self.o.rate:g} connections/s for "
            f"{self.o.duration:g} s ({', '.join(KINDS)})"
        )
        sampler = asyncio.create_task(self._sample(self.attacker))
        try:
            await self.attacker.run(self.o.duration)
        finally:
            sampler.cancel()
        self._mark()
        for rss in self.rss.values():
            rss.end = rss.sample()
        self._progress(self.attacker)

    def _mark(self) -> None:
        self.marks_t.append(time.monotonic())
        self.ops_marks.append({c.name: int(c.progress.get("ops", 0)) for c in self.children})

    def _ops_rate(self, name: str, phase: int) -> float | None:
        """Operations/s of peer ``name`` in phase 0 (warm-up) or 1 (attack)."""
        if len(self.ops_marks) < phase + 2:
            return None
        ops = self.ops_marks[phase + 1][name] - self.ops_marks[phase][name]
        return round(ops / max(self.marks_t[phase + 1] - self.marks_t[phase], 1e-9), 1)

    async def _sample(self, attacker: Attacker) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            for rss in self.rss.values():
                rss.sample()
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                self._progress(attacker)

    def _progress(self, attacker: Attacker) -> None:
        dt = (attacker.stopped or time.monotonic()) - attacker.started
        ops = "/".join(str(c.progress.get("ops", 0)) for c in self.children)
        aborts = sum(c.progress.get("aborts", 0) for c in self.children)
        evictions = sum(c.progress.get("evictions", 0) for c in self.children)
        growth = max(((r.max or 0.0) - (r.baseline or 0.0) for r in self.rss.values()), default=0.0)
        n = attacker.attempts()
        _say(
            f"t={dt:.0f}s strangers {n} ({n / max(dt, 1e-9):.0f}/s) ops {ops} aborts {aborts} "
            f"evictions {evictions} max RSS growth {growth:.1f} MiB"
        )

    async def _status(self) -> dict[str, Any]:
        from pccl.tools.status import StatusUnavailable, fetch_status

        host, port = self.status_addr
        try:
            body = await asyncio.to_thread(fetch_status, host, port, 10.0, self.token)
            doc: dict[str, Any] = json.loads(body)
            return doc
        except (StatusUnavailable, ValueError) as e:
            self.notes.append(f"status endpoint: {e}")
            return {}

    async def _stop_peers(self) -> None:
        _say("stopping the peers (they agree on the last operation)")
        for c in self.children:
            if c.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    c.proc.stdin.close()
        deadline = time.monotonic() + DRAIN_S
        with contextlib.suppress(HammerSetupError):
            await self._wait(lambda c: c.result is not None, deadline, "the peers' results")
        for c in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(c.proc.wait, max(deadline - time.monotonic(), 0.1))

    def _teardown(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(10)
        for task in self.readers:
            task.cancel()
        if self.master is not None and self.master.poll() is None:
            self.master.terminate()
            try:
                self.master.wait(5)
            except subprocess.TimeoutExpired:
                self.master.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.master.wait(10)
        if self.master is not None and self.master.stdout is not None:
            self.master.stdout.close()


# =============================================================================== verdict


def _peer_row(d: Driver, c: Child) -> dict[str, Any]:
    res, marks = c.result or c.progress, d.ops_marks
    return {
        "name": c.name,
        "peer_id": (c.ready or {}).get("peer_id"),
        "pid": c.proc.pid,
        "p2p_port": (c.ready or {}).get("p2p_port"),
        "exit_code": c.proc.poll(),
        "finished": c.result is not None,
        **{k: int(res.get(k, 0)) for k in ("ops", *COUNTED)},
        "ops_during_attack": marks[2][c.name] - marks[1][c.name] if len(marks) > 2 else 0,
        "ops_per_s_warmup": d._ops_rate(c.name, 0),
        "ops_per_s_attack": d._ops_rate(c.name, 1),
        "mean_op_s": res.get("mean_op_s"),
        "messages": res.get("messages", []) + ([c.error] if c.error else []),
    }


def _verdict(d: Driver) -> dict[str, Any]:
    """The summary document of a finished run (see the module docstring for ``ok``)."""
    failures = [d.fatal] if d.fatal else []
    peers = [_peer_row(d, c) for c in d.children]
    totals = {k: sum(p[k] for p in peers) for k in ("ops", *COUNTED)}
    for p in peers:
        if not p["finished"]:
            failures.append(f"{p['name']} did not finish ({p['messages'] or 'no result'})")
        if p["ops_during_attack"] <= 0:
            failures.append(f"{p['name']} completed no all-reduce during the attack")
    failures += [f"{totals[k]} {k.replace('_', ' ')} on the peers" for k in COUNTED if totals[k]]
    before, after = d.status_before, d.status_after
    master_aborts = after.get("totals", {}).get("aborts")
    if master_aborts is None:
        failures.append("no final /status from the master")
    elif master_aborts:
        failures.append(f"the master counted {master_aborts} aborted operations")
    epochs = [d.get("master", {}).get("epoch") for d in (before, after)]
    if None in epochs:
        failures.append(f"the topology could not be checked (no /status before or after: {epochs})")
    elif epochs[0] != epochs[1]:
        failures.append(f"the topology changed during the attack (epochs {epochs})")
    rss = {name: r.report() for name, r in d.rss.items()}
    limit = d.o.rss_limit_mib
    for name, r in rss.items():
        if r["growth_mib"] is None or r["growth_mib"] > limit:
            failures.append(f"{name} RSS grew by {r['growth_mib']} MiB (limit {limit:g})")
    attack = d.attacker.report() if d.attacker else {}
    if attack.get("attacker_errors"):
        failures.append(f"the attacker itself failed: {attack['attacker_errors']}")
    for name, t in attack.get("targets", {}).items():
        if not t["connected"]:
            failures.append(f"no stranger connected to {name} (the attack did not happen)")
        served = {c: n for c, n in t.get("http_status", {}).items() if c.startswith("2")}
        if served:
            failures.append(f"{name} answered strangers without a credential: {served}")
    elements = int(d.o.mib * (1 << 18))
    return {
        "ok": not failures,
        "failures": failures,
        "notes": d.notes,
        "machine": machine.describe(),
        "config": {
            **asdict(d.o),
            **{"peers": PEERS, "streams": STREAMS, "warmup_s": WARMUP_S},
            "kinds": list(KINDS),
            "all_reduce": f"float32 SUM of {elements} integer-valued elements, tag 0",
        },
        "duration_s": attack.get("seconds"),
        "attack": attack,
        "peers": peers,
        "totals": totals,
        "master": {
            "pid": d.master.pid if d.master else None,
            "address": d.master_addr,
            "status_address": ":".join(map(str, d.status_addr)),
            "totals": after.get("totals"),
            "epoch_before_after": epochs,
            "peer_ids": [p.get("id") for p in after.get("peers", [])],
            "connections": after.get("master", {}).get("connections"),
            "recent_aborts": after.get("aborts"),
        },
        "rss": rss,
        "log_dir": str(d.log_dir),
    }


def _rss_mib(pid: int) -> float | None:
    """VmRSS of ``pid`` in MiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


# =============================================================================== peer


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _pattern(idx: int, n: int) -> Any:
    """Peer ``idx``'s input: integers in [-1000, 1000], so every sum is exact in float32."""
    import numpy as np

    i = np.arange(n, dtype=np.int64)
    return ((i * (2 * idx + 3) + 17 * idx) % 2001 - 1000).astype(np.float32)


def _peer(p: dict[str, Any]) -> None:
    """Join with the token, wait for the ring of ``world``, all-reduce until told to stop."""
    import numpy as np

    import pccl
    from pccl.auth import load_token

    stop = threading.Event()

    def watch_stdin() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        stop.set()

    threading.Thread(target=watch_stdin, name="hammer-stdin", daemon=True).start()
    hard_stop = time.monotonic() + float(p["max_s"])
    world, n = int(p["world"]), int(p["n"])
    send = np.zeros(n + 1, dtype=np.float32)  # the last element is the stop flag
    send[:n] = _pattern(int(p["idx"]), n)
    recv = np.empty_like(send)
    expected = np.sum([_pattern(j, n) for j in range(world)], axis=0, dtype=np.float32)

    comm = pccl.Communicator(
        p["master"], auth_token=load_token(p["token_file"]), streams=p["streams"]
    )
    comm.connect(timeout=JOIN_TIMEOUT_S)
    comm.wait_for_world(world, timeout=JOIN_TIMEOUT_S)
    peer_id = comm.peer_id
    _emit("ready", peer_id=peer_id, p2p_port=comm.aio._node.port, pid=os.getpid())

    c = collections.Counter[str]()
    messages: list[str] = []
    busy = 0.0
    failures = 0
    last_progress = 0.0

    def note(e: BaseException) -> None:
        if len(messages) < 10:
            messages.append(f"{type(e).__name__}: {e}")

    def counts() -> dict[str, Any]:
        return {
            "peer_id": peer_id,
            **{k: c[k] for k in ("ops", *COUNTED)},
            "mean_op_s": round(busy / c["ops"], 4) if c["ops"] else None,
            "messages": messages,
        }

    while failures <= MAX_PEER_FAILURES:
        send[n] = 1.0 if stop.is_set() or time.monotonic() > hard_stop else 0.0
        t0 = time.perf_counter()
        try:
            comm.all_reduce(send, recv, op=pccl.ReduceOp.SUM, tag=0)
        except pccl.CollectiveAborted as e:
            c["aborts"] += 1
            failures += 1
            note(e)
            try:
                comm.update_topology()
            except pccl.PCCLError as e2:
                note(e2)
            continue
        except pccl.ConnectionLost as e:
            c["evictions"] += 1
            note(e)
            break
        except pccl.PCCLError as e:
            c["errors"] += 1
            failures += 1
            note(e)
            continue
        busy += time.perf_counter() - t0
        failures = 0
        c["ops"] += 1
        if not np.array_equal(recv[:n], expected):
            c["wrong_results"] += 1
        if comm.peer_id != peer_id:
            c["id_changes"] += 1
            peer_id = comm.peer_id
        if comm.world_size != world:  # someone left: the expected sum no longer holds
            messages.append(f"world size changed to {comm.world_size}")
            break
        if recv[n] > 0:  # every peer sees the same sum: all stop after this operation
            break
        if c["ops"] == 1 or time.monotonic() - last_progress >= PEER_PROGRESS_EVERY_S:
            last_progress = time.monotonic()
            _emit("progress", **counts())
    _emit("result", **counts())
    comm.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m pccl.tools.hammer``: ``peer PARAMS`` runs one peer, anything else is
    ``pccl hammer ARGS``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "peer":
        try:
            _peer(json.loads(argv[1]))
        except BaseException as e:
            _emit("error", type=type(e).__name__, message=str(e))
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)  # an open communicator must not keep a failed peer alive
        return 0
    from pccl.tools.proc import run_subcommand

    return run_subcommand(add_arguments, "hammer", argv)


if __name__ == "__main__":
    sys.exit(main())
