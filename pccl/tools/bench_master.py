"""``pccl bench master``: the master's control plane under thousands of peers.

The launcher starts the real master daemon (``pccl master``, with a token, a state file and its
status endpoint) and a few worker processes (``python -m pccl.tools.bench_master --worker``).
Each worker simulates whole peer groups on one event loop: every simulated peer opens its own
control connection from its own loopback address (127.10.x.y, as peers on the internet come
from distinct hosts), answers the challenge with a real HMAC proof, heartbeats, wires every
epoch (it reports ready without p2p links: no tensor byte moves), votes ``update_topology``,
initiates and completes collectives and votes shared-state syncs. The master cannot tell them
from real peers: the protocol is the same.

Phases, each timed by the launcher:

1. **admission**: every peer connects (handshakes paced per worker, as the master caps
   unauthenticated connections) and the groups vote until all ``N`` are accepted;
2. **steady state** for ``--duration`` seconds: each group runs collectives at ``--op-rate``
   per second, a topology round every ``--topology-every`` operations and a shared-state sync
   every ``--sync-every``, with ``--churn`` peers per second killed and replaced; the launcher
   samples the master's CPU time and RSS, and the latency of ``/status`` and ``/metrics``;
3. **failure detection**: in ``--kills`` groups a member goes silent in the middle of a
   collective (a hung or partitioned peer) and in as many it crashes (its connection resets);
   the time until the rest of its group sees the abort is recorded;
4. **restart**: the master is SIGKILLed and restarted on the same port and state file; the
   time until every peer is accepted again is recorded.

``--peers`` takes a comma list: the benchmark then runs once per size and the JSON document is
``{"runs": [...]}``; ``--plot`` draws the curve. The master's loop lag (its longest stall, from
``/status``) shows whether one step ever blocked the loop. Results go to stdout as JSON and to
``--json FILE``; progress to stderr. Every wait has a deadline; every child dies with the
launcher.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pccl._doc import plain
from pccl.tools import machine
from pccl.tools.proc import PREEXEC

__all__ = ["add_arguments", "main", "run"]

#: handshakes in flight per worker (the master admits 256 unauthenticated connections at once)
HANDSHAKES_PER_WORKER = 48
PHASE_TIMEOUT_S = 300.0
TOKEN = "bench-master-token-0123456789abcdef"


# ================================================================================== CLI


def add_arguments(bsub: argparse._SubParsersAction) -> None:
    """Add the ``master`` sub-command to the ``pccl bench`` sub-parsers."""
    p = bsub.add_parser(
        "master",
        help="the master daemon under N simulated peers (control plane only)",
        description=plain(__doc__.splitlines()[0]) if __doc__ else None,
    )
    p.add_argument(
        "--peers", type=_int_list, default=[1000], help="peers, or a comma list (default 1000)"
    )
    p.add_argument("--groups", type=int, help="peer groups (default: peers / --group-size)")
    p.add_argument("--group-size", type=int, default=10, help="peers per group (default 10)")
    p.add_argument("--workers", type=int, default=2, help="simulating processes (default 2)")
    p.add_argument("--duration", type=float, default=10.0, help="steady state, s (default 10)")
    p.add_argument("--op-rate", type=float, default=1.0, help="collectives per group per s")
    p.add_argument("--topology-every", type=int, default=5, help="a topology round every K ops")
    p.add_argument("--sync-every", type=int, default=3, help="a shared-state sync every K ops")
    p.add_argument("--churn", type=float, default=2.0, help="peers killed+replaced per second")
    p.add_argument("--kills", type=int, default=3, help="groups per failure-detection kind")
    p.add_argument("--no-restart", action="store_true", help="skip the master restart phase")
    p.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    p.add_argument("--plot", metavar="FILE.png", help="draw the curve over --peers (pccl[plot])")
    p.set_defaults(func=_cmd)


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int or comma list: {text!r}") from None
    if not out or any(n < 2 for n in out):
        raise argparse.ArgumentTypeError(f"peers must be >= 2: {text!r}")
    return out


def _cmd(args: argparse.Namespace) -> int:
    bad = []
    if args.workers < 1:
        bad.append("--workers must be >= 1")
    if args.duration <= 0 or args.op_rate <= 0:
        bad.append("--duration and --op-rate must be > 0")
    if args.group_size < 2 and args.groups is None:
        bad.append("--group-size must be >= 2")
    if args.groups is not None and any(args.groups > n or args.groups < 1 for n in args.peers):
        bad.append("--groups must lie within 1..peers")
    if min(args.topology_every, args.sync_every) < 1 or args.churn < 0 or args.kills < 0:
        bad.append("--topology-every/--sync-every must be >= 1, --churn/--kills >= 0")
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return 2
    runs = []
    for n in args.peers:
        groups = args.groups or max(1, n // args.group_size)
        params = BenchParams(
            peers=n,
            groups=groups,
            workers=min(args.workers, groups),
            duration=args.duration,
            op_rate=args.op_rate,
            topology_every=args.topology_every,
            sync_every=args.sync_every,
            churn=args.churn,
            kills=min(args.kills, groups),
            restart=not args.no_restart,
        )
        runs.append(run(params))
    doc: dict[str, Any] = runs[0] if len(runs) == 1 else {"runs": runs}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if args.plot:
        plot(runs, args.plot)
    return 0 if all(r["ok"] for r in runs) else 1


# ============================================================================ launcher


@dataclass
class BenchParams:
    peers: int
    groups: int
    workers: int = 2
    duration: float = 10.0
    op_rate: float = 1.0
    topology_every: int = 5
    sync_every: int = 3
    churn: float = 2.0
    kills: int = 3
    restart: bool = True


def _say(msg: str) -> None:
    print(f"[bench master] {msg}", file=sys.stderr, flush=True)


class _Proc:
    """A child speaking one JSON object per line on stdin/stdout."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=PREEXEC,
            start_new_session=True,
        )

    def send(self, obj: dict[str, Any]) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        import selectors

        assert self.p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise TimeoutError(f"worker {self.p.pid}: no answer within {timeout:.0f}s")
        finally:
            sel.close()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.p.pid} exited (rc {self.p.poll()})")
        return dict(json.loads(line))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.p.wait(10)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_mem_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def _get(url: str, timeout: float = 30.0) -> tuple[float, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return time.perf_counter() - t0, body


def _pcts(xs: Sequence[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))], 4)

    return {"n": len(s), "p50": q(0.5), "p99": q(0.99), "max": round(s[-1], 4)}


def _spawn_master(
    tmp: Path, port: int = 0, status_port: int = 0
) -> tuple[subprocess.Popen[str], int, int]:
    from pccl.tools.proc import master_banner

    argv = [
        sys.executable,
        "-m",
        "pccl.master",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--token-file",
        str(tmp / "token"),
        "--state-file",
        str(tmp / "state.json"),
        "--status-port",
        str(status_port),
        "--status-host",
        "127.0.0.1",
    ]
    log = open(tmp / "master.log", "a")  # noqa: SIM115 (the child holds it)
    p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        preexec_fn=PREEXEC,
        start_new_session=True,
    )
    log.close()
    addr, status = master_banner(p, "127.0.0.1", 30.0, status=True)
    assert status is not None
    return p, int(addr.rsplit(":", 1)[1]), int(status.rsplit(":", 1)[1])


def _machine() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover
        loop = "asyncio"
    return {**machine.describe(), "event_loop": loop}


def run(params: BenchParams) -> dict[str, Any]:
    """Run every phase at ``params.peers``; return the result document."""
    from pccl.config import Config

    cfg = Config()
    doc: dict[str, Any] = {
        "benchmark": "master",
        "params": params.__dict__,
        "machine": _machine(),
        "config": {
            "heartbeat_interval_s": cfg.heartbeat_interval_s,
            "heartbeat_timeout_s": cfg.heartbeat_timeout_s,
            "restart_grace_s": cfg.restart_grace_s,
        },
        "ok": False,
    }
    tmp = Path(tempfile.mkdtemp(prefix="pccl-bench-master-"))
    (tmp / "token").write_text(TOKEN)
    master: subprocess.Popen[str] | None = None
    workers: list[_Proc] = []
    try:
        master, port, sport = _spawn_master(tmp)
        status_url = f"http://127.0.0.1:{sport}"
        time.sleep(0.3)
        mem0 = _proc_mem_kib(master.pid)
        doc["master_rss_idle_kib"] = mem0["VmRSS"]
        _say(f"N={params.peers} in {params.groups} groups, {params.workers} workers")
        for wi in range(params.workers):
            spec = {
                "worker": wi,
                "workers": params.workers,
                "peers": params.peers,
                "groups": params.groups,
                "port": port,
                "token": TOKEN,
            }
            argv = [sys.executable, "-m", "pccl.tools.bench_master", "--worker", json.dumps(spec)]
            workers.append(_Proc(argv))
        for w in workers:
            assert w.recv(60.0)["event"] == "up"

        # 1. admission
        t0 = time.time()
        for w in workers:
            w.send({"cmd": "admit", "t0": t0})
        res = [w.recv(PHASE_TIMEOUT_S) for w in workers]
        _check(res, "admission")
        admitted = max(r["all_accepted_at"] for r in res) - t0
        doc["admission_s"] = round(admitted, 3)
        doc["admission_kicks"] = sum(r["kicks"] for r in res)
        time.sleep(1.0)  # let the admission burst settle before measuring steady state
        mem1 = _proc_mem_kib(master.pid)
        doc["master_rss_kib"] = mem1["VmRSS"]
        doc["master_rss_per_peer_kib"] = round((mem1["VmRSS"] - mem0["VmRSS"]) / params.peers, 2)
        _say(f"admitted {params.peers} in {admitted:.2f}s")

        # 2. steady state
        cpu0, w0 = _proc_cpu_s(master.pid), time.monotonic()
        for w in workers:
            w.send(
                {
                    "cmd": "steady",
                    "duration": params.duration,
                    "op_rate": params.op_rate,
                    "topology_every": params.topology_every,
                    "sync_every": params.sync_every,
                    "churn": params.churn / params.workers,
                }
            )
        st_lat, mx_lat, lags, steps = [], [], [], []
        _, body = _get(f"{status_url}/status")
        gc0 = json.loads(body)["master"]["gc_full_passes"]
        end = time.monotonic() + params.duration
        while time.monotonic() < end - 0.5:
            dt, body = _get(f"{status_url}/status")
            st_lat.append(dt)
            lags.append(json.loads(body)["master"]["loop_lag_recent_s"])
            steps.append(json.loads(body)["master"]["step_recent_s"])
            dt, _ = _get(f"{status_url}/metrics")
            mx_lat.append(dt)
            time.sleep(0.5)
        res = [w.recv(params.duration + PHASE_TIMEOUT_S) for w in workers]
        cpu1, w1 = _proc_cpu_s(master.pid), time.monotonic()
        _check(res, "steady state")
        _, body = _get(f"{status_url}/status")
        status = json.loads(body)
        doc["steady"] = {
            "seconds": round(w1 - w0, 2),
            "master_cpu_core_fraction": round((cpu1 - cpu0) / (w1 - w0), 3),
            "collective_s": _pcts([x for r in res for x in r["collective"]]),
            "topology_round_s": _pcts([x for r in res for x in r["topology"]]),
            "sync_s": _pcts([x for r in res for x in r["sync"]]),
            "ops": sum(len(r["collective"]) for r in res),
            "aborted": sum(r["aborted"] for r in res),
            "churned": sum(r["churned"] for r in res),
            "status_s": _pcts(st_lat),
            "metrics_s": _pcts(mx_lat),
            "status_bytes": len(body),
            "loop_lag_max_s": max([*lags, status["master"]["loop_lag_recent_s"]]),
            "step_max_s": max([*steps, status["master"]["step_recent_s"]]),
            "gc_full_passes": status["master"]["gc_full_passes"] - gc0,
        }
        doc["master_rss_steady_kib"] = _proc_mem_kib(master.pid)["VmRSS"]
        doc["loop_lag_max_lifetime_s"] = status["master"]["loop_lag_max_s"]
        doc["step_max_lifetime_s"] = status["master"]["step_max_s"]
        doc["gc_max_s"] = status["master"]["gc_max_s"]
        s = doc["steady"]
        _say(
            f"steady: cpu {s['master_cpu_core_fraction']:.2f} core, topology p99 "
            f"{s['topology_round_s'].get('p99')}s, loop lag max {s['loop_lag_max_s']}s, "
            f"longest step {s['step_max_s']}s"
        )

        # 3. failure detection
        for kind in ("hang", "crash"):
            per = _split(params.kills, len(workers))
            for w, k in zip(workers, per, strict=True):
                w.send({"cmd": "kill", "mode": kind, "groups": k})
            res = [w.recv(PHASE_TIMEOUT_S) for w in workers]
            _check(res, f"{kind} detection")
            doc[f"detect_{kind}_s"] = _pcts([x for r in res for x in r["detect"]])
        _say(f"detect: hang {doc['detect_hang_s']}, crash {doc['detect_crash_s']}")

        # 4. restart
        if params.restart:
            for w in workers:
                w.send({"cmd": "settle"})
            _check([w.recv(PHASE_TIMEOUT_S) for w in workers], "settle")
            master.kill()
            master.wait(10)
            t0 = time.time()
            master, _, _ = _spawn_master(tmp, port, sport)
            for w in workers:
                w.send({"cmd": "recover", "t0": t0})
            res = [w.recv(PHASE_TIMEOUT_S) for w in workers]
            _check(res, "restart recovery")
            doc["restart_recovery_s"] = round(max(r["all_accepted_at"] for r in res) - t0, 3)
            doc["restart_resumed_ids"] = sum(r["resumed"] for r in res)
            _say(f"restart: all accepted again after {doc['restart_recovery_s']}s")
        doc["ok"] = True
    except Exception as e:  # the document says what failed; the exit code too
        doc["error"] = f"{type(e).__name__}: {e}"
        _say(f"FAILED: {doc['error']} (master log: {tmp / 'master.log'})")
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                w.send({"cmd": "quit"})
        for w in workers:
            w.kill()
        if master is not None:
            master.kill()
            master.wait(10)
    # The master warns of every loop stall over STALL_WARN_S (at most one per 10 s window).
    with contextlib.suppress(OSError):
        log = (tmp / "master.log").read_text(errors="replace").splitlines()
        doc["master_stalls"] = [
            ln for ln in log if "event loop ran" in ln or "garbage collection" in ln
        ][:20]
    return doc


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _check(res: list[dict[str, Any]], phase: str) -> None:
    bad = [r["error"] for r in res if r.get("error")]
    if bad:
        raise RuntimeError(f"{phase}: {bad[0]}")


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Admission, topology p99, CPU and RSS per peer against N (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("--plot needs matplotlib (pip install 'pccl-ft[plot]'); skipped")
        return
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return
    ns = [r["params"]["peers"] for r in ok]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    series = [
        ("admission (s)", [r["admission_s"] for r in ok]),
        ("topology round p99 (s)", [r["steady"]["topology_round_s"].get("p99") for r in ok]),
        ("master CPU (cores)", [r["steady"]["master_cpu_core_fraction"] for r in ok]),
        ("master RSS per peer (KiB)", [r["master_rss_per_peer_kib"] for r in ok]),
        ("hung peer detected (s, max)", [r["detect_hang_s"].get("max") for r in ok]),
        ("restart recovery (s)", [r.get("restart_recovery_s") for r in ok]),
    ]
    for ax, (title, ys) in zip(axes.flat, series, strict=True):
        ax.plot(ns, ys, marker="o")
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("peers")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"pccl master under load ({ok[0]['machine']['cpu_model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _say(f"plot written to {path}")


# ============================================================================== worker


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    from pccl.master.daemon import raise_fd_limit

    raise_fd_limit()
    from pccl.tools.bench_master_sim import Worker

    return asyncio.run(Worker(spec).main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        return _worker_main(argv[1])
    p = argparse.ArgumentParser(prog="pccl bench")
    add_arguments(p.add_subparsers(dest="bench", required=True))
    args = p.parse_args(["master", *argv])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
