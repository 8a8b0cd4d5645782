"""``python -m pccl.tools.bench_state``: a newcomer pulling a shared state from 1 vs N sources.

The launcher starts the real master daemon (``python -m pccl.cli master``) and, for each source
count, that many source peers holding an identical ``--mib`` MiB state (``--entries`` float32
tensors). For each of ``--runs`` runs a fresh newcomer process joins with the same layout but
other content at revision 0; every peer calls ``sync_shared_state`` (the sources bump their
revision first) and the newcomer times its call. The newcomer pulls every entry, striped over the
sources, verifies and commits it; the report gives the median (and min/max) of its sync time,
its throughput, the newcomer's user/system CPU time and page faults during the call (all
threads: when CPU is close to the wall time the receiver is CPU-bound and more sources cannot
help), and whether its state ended hash-equal to the sources'. A fresh master serves
each source count.

On loopback every process shares this machine's cores and memory bandwidth, so extra sources
mostly add contention. ``--uplink RATE`` (root, iproute2) measures what several sources are for:
each process runs in its own network namespace (``deploy/netns.py``) and each source's link is
limited to ``RATE`` with ``tc tbf``, as an internet peer is bound by its uplink.

Then the launcher times ``SharedState.hashes()`` over a ``--hash-gib`` GiB state in its own
process (median of ``--runs``), the cost every peer pays per sync to vote, for comparison with
the transfer.

Children are driven over stdin and answer one JSON object per stdout line; each dies with the
launcher (parent-death signal, stdin EOF) and is SIGKILLed on every exit path. Progress goes to
stderr; the JSON result to stdout and ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pccl.tools.proc import PREEXEC as _PREEXEC
from pccl.tools.proc import spawn_master

__all__ = ["main", "run"]

MASTER_START_TIMEOUT_S = 30.0
MIB = 1 << 20


def _pattern(raw: np.ndarray, seed: int) -> None:
    """Fill a uint8 view with bytes that depend only on ``seed`` (fast, no RNG)."""
    words = -(-raw.nbytes // 8)
    pat = np.arange(words, dtype=np.uint64)
    pat *= np.uint64(0x9E3779B97F4A7C15)
    pat ^= np.uint64((seed * 0x2545F4914F6CDD1D + 1) & 0xFFFF_FFFF_FFFF_FFFF)
    raw[:] = pat.view(np.uint8)[: raw.nbytes]


def _make_state(mib: int, entries: int, seed: int) -> Any:
    import pccl

    total = mib * MIB // 4
    per, extra = divmod(total, entries)
    arrays = {}
    for i in range(entries):
        a = np.empty(per + (i < extra), np.float32)  # exactly --mib MiB in all
        _pattern(a.view(np.uint8), seed * 1000 + i)
        arrays[f"layer{i}"] = a
    return pccl.SharedState(arrays)


# ---------------------------------------------------------------------------------- children


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _peer_main(args: argparse.Namespace) -> None:
    """A source (``--role source``) or the newcomer (``--role newcomer``), driven over stdin."""
    import pccl

    comm = pccl.Communicator(args.master)
    state = _make_state(args.mib, args.entries, seed=1 if args.role == "source" else 2)
    comm.connect(timeout=args.timeout)
    _emit(event="connected", peer_id=comm.peer_id, world=comm.world_size)
    synced_once = False
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "admit":
            # At least one update: it also drops the newcomer of the previous run, which left.
            deadline = time.monotonic() + args.timeout
            comm.update_topology(timeout=args.timeout)
            while comm.world_size != cmd["world"]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"world {comm.world_size} != {cmd['world']}")
                comm.update_topology(timeout=left)
            _emit(event="admitted", world=comm.world_size)
        elif cmd["op"] == "sync":
            if synced_once:
                state.revision += 1
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            info = comm.sync_shared_state(state, timeout=args.timeout)
            dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            synced_once = True
            _emit(
                event="synced",
                seconds=dt,
                user_s=r1.ru_utime - r0.ru_utime,
                sys_s=r1.ru_stime - r0.ru_stime,
                minor_faults=r1.ru_minflt - r0.ru_minflt,
                revision=info.revision,
                tx=info.tx_bytes,
                rx=info.rx_bytes,
                hashes=state.hashes(),
            )
        elif cmd["op"] == "exit":
            break
    comm.close()


class _Child:
    """One child process: JSON commands in, JSON events out (read by a thread)."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.events.put(json.loads(raw))
            except ValueError:
                continue
        self.events.put(None)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"{self.name}: no {event!r} in {timeout}s\n{self.tail()}"
                ) from None
            if ev is None:
                raise RuntimeError(f"{self.name} exited (rc {self.proc.wait()})\n{self.tail()}")
            if ev.get("event") == event:
                return ev

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


Wrap = Callable[[str, list[str]], list[str]]


def _here(node: str, argv: list[str]) -> list[str]:
    return argv  # loopback mode: every process in this namespace


def _start_master(
    logdir: Path, wrap: Wrap = _here, host: str = "127.0.0.1"
) -> tuple[subprocess.Popen[str], str]:
    with (logdir / "master.log").open("wb") as log:
        return spawn_master(
            None,
            host=host,
            prefix=wrap("m", []),
            stderr=log,
            preexec_fn=_PREEXEC,
            timeout=MASTER_START_TIMEOUT_S,
        )


def _peer_argv(args: argparse.Namespace, role: str, master: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pccl.tools.bench_state",
        "--role",
        role,
        "--master",
        master,
        "--mib",
        str(args.mib),
        "--entries",
        str(args.entries),
        "--timeout",
        str(args.timeout),
    ]


def _log(msg: str) -> None:
    print(f"[bench_state] {msg}", file=sys.stderr, flush=True)


def _bench_sources(args: argparse.Namespace, n_sources: int, logdir: Path) -> dict[str, Any]:
    if args.uplink:
        return _bench_sources_netns(args, n_sources, logdir)
    return _bench_sources_in(args, n_sources, logdir, _here, "127.0.0.1")


def _bench_sources_netns(args: argparse.Namespace, n_sources: int, logdir: Path) -> dict[str, Any]:
    """The same measurement with one network namespace per process and every source's link
    limited to ``--uplink`` (tc tbf): peers on the internet are bound by their uplinks, which is
    what pulling from several sources at once is for."""
    from pccl.tools.chaos import load_netns_harness

    netns = load_netns_harness()
    nodes = ["m", *(f"s{i}" for i in range(n_sources)), "nc"]
    with netns.Cluster(nodes) as cluster:
        for i in range(n_sources):
            cluster.set_rate(f"s{i}", args.uplink)
        _log(f"netns cluster {cluster.tag}: {n_sources} source(s) limited to {args.uplink}")

        def wrap(node: str, argv: list[str]) -> list[str]:
            return cluster.exec_argv(node, argv)

        out = _bench_sources_in(args, n_sources, logdir, wrap, cluster.ip("m"))
    out["uplink"] = args.uplink
    return out


def _bench_sources_in(
    args: argparse.Namespace, n_sources: int, logdir: Path, wrap: Wrap, master_host: str
) -> dict[str, Any]:
    master, addr = _start_master(logdir, wrap, master_host)
    children: list[_Child] = []
    try:
        sources = []
        for i in range(n_sources):
            c = _Child(
                f"s{n_sources}-source{i}", wrap(f"s{i}", _peer_argv(args, "source", addr)), logdir
            )
            children.append(c)
            sources.append(c)
            for s in sources[:-1]:  # one newcomer per epoch: the incumbents admit it
                s.send(op="admit", world=i + 1)
            c.wait("connected", args.timeout)
            for s in sources[:-1]:
                s.wait("admitted", args.timeout)
        for s in sources:
            s.send(op="sync")
        want = [s.wait("synced", args.timeout)["hashes"] for s in sources]
        assert all(h == want[0] for h in want), "sources disagree after their first sync"
        runs = []
        for r in range(args.runs):
            new = _Child(
                f"s{n_sources}-newcomer{r}", wrap("nc", _peer_argv(args, "newcomer", addr)), logdir
            )
            children.append(new)
            for s in sources:
                s.send(op="admit", world=n_sources + 1)
            new.wait("connected", args.timeout)
            for s in sources:
                s.wait("admitted", args.timeout)
            for s in sources:  # sources vote first: the newcomer times the transfer, not them
                s.send(op="sync")
            new.send(op="sync")
            got = new.wait("synced", args.timeout)
            tx = [s.wait("synced", args.timeout)["tx"] for s in sources]
            new.send(op="exit")
            new.proc.wait(args.timeout)
            ok = got["hashes"] == want[0] and got["rx"] == args.mib * MIB
            runs.append(
                {
                    "seconds": got["seconds"],
                    "newcomer_user_s": got["user_s"],
                    "newcomer_sys_s": got["sys_s"],
                    "newcomer_minor_faults": got["minor_faults"],
                    "rx_bytes": got["rx"],
                    "gbps": got["rx"] * 8 / got["seconds"] / 1e9,
                    "source_tx_bytes": tx,
                    "verified_equal": ok,
                }
            )
            _log(
                f"{n_sources} source(s), run {r}: {got['seconds'] * 1e3:.0f} ms "
                f"(newcomer user {got['user_s'] * 1e3:.0f} ms, sys {got['sys_s'] * 1e3:.0f} ms, "
                f"{got['minor_faults']} page faults), "
                f"{runs[-1]['gbps']:.2f} Gbit/s, per-source tx {[t // MIB for t in tx]} MiB, "
                f"verified={ok}"
            )
        secs = [x["seconds"] for x in runs]
        med = statistics.median(secs)
        return {
            "sources": n_sources,
            "median_s": med,
            "min_s": min(secs),
            "max_s": max(secs),
            "median_gbps": args.mib * MIB * 8 / med / 1e9,
            "all_verified": all(x["verified_equal"] for x in runs),
            "runs": runs,
        }
    finally:
        for c in children:
            c.kill()
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(5)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()


def _bench_hash(gib: float, runs: int) -> dict[str, Any]:
    nbytes = int(gib * (1 << 30))
    entries = 4
    state = _make_state(nbytes // MIB, entries, seed=3)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        state.hashes()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "bytes": state.nbytes,
        "entries": entries,
        "median_s": med,
        "min_s": min(times),
        "gb_per_s": state.nbytes / med / 1e9,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    logdir = Path(tempfile.mkdtemp(prefix="pccl-bench-state-"))
    _log(f"logs in {logdir}")
    result: dict[str, Any] = {
        "mib": args.mib,
        "entries": args.entries,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "uplink": args.uplink,
        "pull": [],
    }
    for n in args.sources:
        result["pull"].append(_bench_sources(args, n, logdir))
    h = _bench_hash(args.hash_gib, args.runs)
    result["hash"] = h
    fastest = min(p["median_s"] for p in result["pull"])
    # What hashing costs inside one pull: every peer hashes its state to vote, and the newcomer
    # hashes what it received before committing it (2x the state on the newcomer).
    per_sync_hash_s = 2 * h["median_s"] * (args.mib * MIB) / h["bytes"]
    result["hash_vs_sync"] = {
        "hash_1gib_s": h["median_s"] * (1 << 30) / h["bytes"],
        "fastest_pull_s": fastest,
        "newcomer_hash_share_of_pull": per_sync_hash_s / fastest,
    }
    if len(result["pull"]) > 1:
        base = result["pull"][0]["median_s"]
        result["speedup_vs_first"] = {
            str(p["sources"]): base / p["median_s"] for p in result["pull"][1:]
        }
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pccl.tools.bench_state", description=__doc__.split("\n")[0]
    )
    p.add_argument("--mib", type=int, default=256, help="state size in MiB (default 256)")
    p.add_argument(
        "--sources",
        default="1,3",
        type=lambda s: [int(x) for x in s.split(",")],
        help="source counts to compare, comma-separated (default 1,3)",
    )
    p.add_argument("--entries", type=int, default=8, help="tensors in the state (default 8)")
    p.add_argument("--runs", type=int, default=3, help="runs per source count (median)")
    p.add_argument("--hash-gib", type=float, default=1.0, help="state size for the hash timing")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of every step (s)")
    p.add_argument(
        "--uplink",
        help="run every process in its own network namespace and limit each source's link to "
        "this tc rate (e.g. 1gbit, 500mbit); needs root and iproute2",
    )
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--role", choices=["source", "newcomer"], help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mib < 1 or args.entries < 1 or args.runs < 1 or any(n < 1 for n in args.sources):
        p.error("--mib, --entries, --runs and --sources must be >= 1")
    if args.uplink and not args.role:
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit)", args.uplink):
            p.error(f"--uplink {args.uplink!r}: expected a tc rate such as 1gbit or 500mbit")
        from pccl.tools.chaos import load_netns_harness

        ok, why = load_netns_harness().available()
        if not ok:
            p.error(f"--uplink needs network namespaces: {why}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.role:
        _peer_main(args)
        return 0
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if all(p["all_verified"] for p in result["pull"]) else 1


if __name__ == "__main__":
    sys.exit(main())
