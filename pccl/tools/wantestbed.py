"""A WAN testbed of network namespaces with heterogeneous point-to-point links (run as root).

Layout (on top of :class:`pccl.tools.netns.Cluster`): node ``m`` (the master) and peers
``p0 .. pN-1``, each in its own namespace on the cluster's control bridge (10.231.0.x/24). Every
pair of peers also gets its own veth link (``l<j>`` in peer i's namespace, ``l<i>`` in j's) and
a /32 route to the other's address over it, so peer-to-peer TCP takes the pair's own link while
master traffic stays on the bridge. Each direction of a pair link has its own ``tc tbf`` rate,
so pairs differ (e.g. 20 Mbit/s and 200 Mbit/s); real kernel TCP end to end. This kernel has no
netem, so a per-pair delay is not emulated here (``pccl bench allreduce --wan-delay-ms`` adds
delay in user space on loopback).

``python -m pccl.tools.wantestbed topology`` is the ring-order benchmark: links drawn from a seed
with a planted fast ring, peers admitted in a chosen order (the master's ring is the admission
order), all-reduce timed in that order, then ``optimize_topology()`` and timed again; the same
for the brute-force best and worst orders of the configured rates. JSON result with the machine.

Needs root and iproute2 (``tc``); :func:`pccl.tools.netns.available` says why not.
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pccl.tools import netns
from pccl.tools.testbed import Testbed, _bottleneck, _rate_mbit, brute_force, planted_rates

__all__ = ["Testbed", "brute_force", "main", "planted_rates"]

# ---------------------------------------------------------------------------------- runs


def _events(procs: dict[str, subprocess.Popen[bytes]], deadline: float) -> Any:
    sel = selectors.DefaultSelector()
    for name, p in procs.items():
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ, name)
    open_ = set(procs)
    while open_:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"testbed run: {sorted(open_)} still running")
        for key, _ in sel.select(min(left, 1.0)):
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                sel.unregister(key.fileobj)
                open_.discard(key.data)
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            yield key.data, ev


def run_order(
    bed: Testbed,
    order: list[int],
    args: argparse.Namespace,
    optimize: bool,
    tmp: Path,
) -> dict[str, Any]:
    """Admit the peers in ``order`` (so the ring is that order), time all-reduces, and with
    ``optimize`` call ``optimize_topology()`` and time them again."""
    logs = tmp / f"run{int(time.monotonic() * 1000)}"
    logs.mkdir()
    master = bed.popen(
        "m",
        [sys.executable, "-m", "pccl.cli", "master", "--host", bed.ip("m"), "--port", "0"],
        logs / "master.log",
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        from pccl.tools.proc import master_banner

        addr = master_banner(master, bed.ip("m"), 30.0)[0]
        n = int(args.mib * (1 << 20)) // 4
        deadline = time.monotonic() + args.timeout
        results: dict[str, dict[str, Any]] = {}
        for k, idx in enumerate(order):
            params = {
                "master": addr,
                "idx": idx,
                "world": bed.peers,
                "n": n,
                "repeats": args.repeats,
                "streams": args.streams,
                "optimize": optimize,
                "min_gain": args.min_gain,
            }
            name = f"p{idx}"
            argv = [sys.executable, "-m", "pccl.tools.wantestbed", "--worker", json.dumps(params)]
            procs[name] = bed.popen(name, argv, logs / f"{name}.log")
            if k + 1 < len(order):  # admitted before the next one registers: ring = order
                for who, ev in _events({name: procs[name]}, deadline):
                    if ev.get("event") == "error":
                        raise RuntimeError(f"{who}: {ev}")
                    if who == name and ev.get("event") == "admitted":
                        break
        for who, ev in _events(procs, deadline):
            if ev.get("event") == "error":
                raise RuntimeError(f"{who}: {ev}\n{(logs / f'{who}.log').read_text()[-3000:]}")
            if ev.get("event") == "result":
                results[who] = ev
        rows = list(results.values())
        if len(rows) != bed.peers:
            raise RuntimeError(f"results from {sorted(results)} only")

        def phase(key: str) -> dict[str, Any]:
            times = [max(r[key][i] for r in rows) for i in range(args.repeats)]
            return {
                "median_s": statistics.median(times),
                "times": times,
                "ring": rows[0]["ring_" + key.split("_")[0]],
            }

        out: dict[str, Any] = {"admission_order": order, "before": phase("before_times")}
        out["before"]["parity"] = len({r["digest_before"] for r in rows}) == 1
        if optimize:
            out["after"] = phase("after_times")
            out["after"]["parity"] = len({r["digest_after"] for r in rows}) == 1
            out["optimize_s"] = max(r["optimize_s"] for r in rows)
            out["rewired"] = rows[0]["rewired"]
            out["probe_links"] = sum(r["links"] for r in rows)
            out["probes"] = {
                r["peer_id"]: {t: [round(g, 4), round(ms, 3)] for t, (g, ms) in r["probes"].items()}
                for r in rows
            }
            out["peer_ids"] = {r["idx"]: r["peer_id"] for r in rows}
        out["cpu_s"] = sum(r["cpu_s"] for r in rows)
        return out
    finally:
        for p in [*procs.values(), master]:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def _worker(params: dict[str, Any]) -> None:
    import numpy as np
    import xxhash

    import pccl

    def emit(event: str, **kw: Any) -> None:
        print(json.dumps({"event": event, **kw}), flush=True)

    try:
        cfg = pccl.Config.from_env()
        auto = params.get("auto", False)
        if auto:
            cfg = cfg.replace(auto_streams=True, max_streams=16)
        comm = pccl.Communicator(
            params["master"],
            streams=params["streams"],
            config=cfg,
            p2p_port=params.get("p2p_port", 0),
            advertise_port=params.get("advertise_port", 0),
        )
        comm.connect(timeout=120)
        emit("admitted", peer_id=comm.peer_id)
        comm.wait_for_world(params["world"], timeout=120)
        if auto:  # measure the link, then re-wire: the streams follow its BDP
            comm.optimize_topology(timeout=120, reprobe=True)
            comm.update_topology(timeout=120)
        x = np.full(params["n"], float(params["idx"] + 1), dtype=np.float32)
        out = np.empty_like(x)
        bar = np.zeros(1, dtype=np.float32)

        def timed() -> tuple[list[float], str]:
            ts = []
            for _ in range(params["repeats"]):
                comm.all_reduce(bar, tag=1)
                t0 = time.perf_counter()
                comm.all_reduce(x, out)
                ts.append(time.perf_counter() - t0)
            return ts, xxhash.xxh3_128_hexdigest(out.view(np.uint8).data)

        def ring() -> list[int]:
            return [pid for pid, _, _ in comm.aio._session.ring]

        c0 = time.process_time()
        res: dict[str, Any] = {}
        res["before_times"], res["digest_before"] = timed()
        res["ring_before"] = ring()
        if params["optimize"]:
            t0 = time.perf_counter()
            res["rewired"] = comm.optimize_topology(timeout=120, min_gain=params["min_gain"])
            res["optimize_s"] = time.perf_counter() - t0
            res["links"] = len(comm.aio._prober.results)
            res["probes"] = {str(k): v for k, v in comm.aio._prober.results.items()}
            res["after_times"], res["digest_after"] = timed()
            res["ring_after"] = ring()
        res["cpu_s"] = time.process_time() - c0
        res["streams_open"] = len(comm.aio._node.tx)
        res["link"] = {str(k): v for k, v in comm.aio._node.links.items()}
        emit("result", peer_id=comm.peer_id, idx=params["idx"], **res)
        comm.close()
    except Exception as e:
        emit("error", error=repr(e))
        raise


def _topology(args: argparse.Namespace) -> int:
    ok, why = netns.available()
    if not ok:
        print(f"wantestbed: network namespaces unavailable: {why}", file=sys.stderr)
        return 2
    from pccl.tools.machine import describe as _machine

    rates = planted_rates(args.peers, args.fast, args.slow, args.seed, args.fast_share)
    best, worst = brute_force(args.peers, rates)
    rng = random.Random(args.seed + 1)
    start = list(range(args.peers))
    while _bottleneck(start, rates) == _bottleneck(best, rates):
        rng.shuffle(start)  # an admission order with a slow hop
    doc: dict[str, Any] = {
        "config": {
            "peers": args.peers,
            "mib": args.mib,
            "streams": args.streams,
            "repeats": args.repeats,
            "fast": args.fast,
            "slow": args.slow,
            "seed": args.seed,
            "rates": {f"{i}->{j}": r for (i, j), r in sorted(rates.items())},
            "min_gain": args.min_gain,
            "machine": _machine(),
            "timing": "per operation: max over peers of the all-reduce's wall time after a "
            "barrier; median over repeats",
        },
        "brute_force": {
            "best": best,
            "best_bottleneck_mbit": _bottleneck(best, rates),
            "worst": worst,
            "worst_bottleneck_mbit": _bottleneck(worst, rates),
        },
    }
    with tempfile.TemporaryDirectory(prefix="pccl-testbed-") as tmpd, Testbed(args.peers, rates):
        pass  # a dry run: namespaces and links come up and go away cleanly
    with tempfile.TemporaryDirectory(prefix="pccl-testbed-") as tmpd:
        tmp = Path(tmpd)
        for label, order, opt in (
            ("start_then_optimized", start, True),
            ("best", best, False),
            ("worst", worst, False),
        ):
            with Testbed(args.peers, rates) as bed:
                print(f"wantestbed: {label}: admission order {order}", file=sys.stderr)
                doc[label] = run_order(bed, order, args, opt, tmp)
                print(f"wantestbed: {label}: {json.dumps(doc[label])}", file=sys.stderr)
    opt_s = doc["start_then_optimized"]["after"]["median_s"]
    doc["summary"] = {
        "start_s": doc["start_then_optimized"]["before"]["median_s"],
        "optimized_s": opt_s,
        "best_s": doc["best"]["before"]["median_s"],
        "worst_s": doc["worst"]["before"]["median_s"],
        "optimized_vs_best": opt_s / doc["best"]["before"]["median_s"],
        "worst_vs_optimized": doc["worst"]["before"]["median_s"] / opt_s,
        "optimize_s": doc["start_then_optimized"]["optimize_s"],
    }
    text = json.dumps(doc, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _streams(args: argparse.Namespace) -> int:
    """Streams vs one-way delay on a shaped link: ``pccl bench allreduce`` with 2 peers and its
    user-space delay proxy (``--wan-delay-ms``, a ``--wan-cap-mib`` window per stream) inside
    one namespace whose loopback is limited by ``tc tbf`` to ``4 x rate``: each byte crosses
    loopback twice per direction (peer -> proxy -> peer) and both ring directions share it, so
    each ring link gets about ``rate``. Adds what ``Config.auto_streams`` picks for that link
    (:func:`pccl.peer.tuning.auto_streams` with the proxy's window) and how it compares."""
    ok, why = netns.available()
    if not ok:
        print(f"wantestbed: network namespaces unavailable: {why}", file=sys.stderr)
        return 2
    from pccl.peer.tuning import auto_streams

    mbit = _rate_mbit(args.rate)
    cluster = netns.Cluster(["b"]).up()
    doc: dict[str, Any] = {"rate": args.rate, "delays_ms": args.delays, "runs": {}}
    try:
        ns = cluster.ns("b")
        netns._run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf",
             "rate", f"{4 * mbit:g}mbit", "burst", "1mb", "latency", "50ms"]
        )  # fmt: skip
        for d in args.delays:
            auto = auto_streams(mbit / 1000, 2 * d, int(args.cap_mib * (1 << 20)), 16)
            counts = sorted({*args.streams, auto})
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run(
                    cluster.exec_argv(
                        "b",
                        [
                            sys.executable,
                            "-m",
                            "pccl.cli",
                            "bench",
                            "allreduce",
                            "--peers",
                            "2",
                            "--mib",
                            f"{args.mib:g}",
                            "--streams",
                            ",".join(map(str, counts)),
                            "--wan-delay-ms",
                            f"{d:g}",
                            "--wan-cap-mib",
                            f"{args.cap_mib:g}",
                            "--repeats",
                            str(args.repeats),
                            "--warmup",
                            "1",
                            "--json",
                            f.name,
                        ],
                    ),
                    check=True,
                    timeout=args.timeout,
                )
                bench = json.loads(Path(f.name).read_text())
            times = {r["config"]["streams"]: r["pccl"]["seconds"] for r in bench["runs"]}
            best = min(times, key=lambda k: times[k])
            doc["runs"][str(d)] = {
                "seconds": times,
                "gbit_s": {k: r["pccl"]["busbw_gbps"] * 8 for k, r in
                           ((r["config"]["streams"], r) for r in bench["runs"])},
                "best_streams": best,
                "auto_streams": auto,
                "auto_vs_best": times[auto] / times[best],
                "bench": bench,
            }  # fmt: skip
            print(
                f"wantestbed: {d:g} ms: "
                + ", ".join(f"{k}: {v:.3f} s" for k, v in sorted(times.items()))
                + f"; auto {auto} = {times[auto] / times[best]:.2f}x the best ({best})",
                file=sys.stderr,
            )
    finally:
        cluster.down()
    text = json.dumps(doc, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.plot:
        from pccl.tools.plots import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for d, run in doc["runs"].items():
            ks = sorted(run["gbit_s"])
            ax.plot(ks, [run["gbit_s"][k] for k in ks], marker="o", label=f"{d} ms one-way")
            ax.plot([run["auto_streams"]], [run["gbit_s"][run["auto_streams"]]], "k*", ms=12)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("streams per link (star: auto)")
        ax.set_ylabel("all-reduce bus bandwidth, Gbit/s")
        ax.set_title(f"2 peers, {args.rate} link, {args.cap_mib:g} MiB window per stream")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
    return 0


def _streams_live(args: argparse.Namespace) -> int:
    """Streams vs delay on the testbed itself: 2 peers, one pair link of ``--rate`` (tbf), a
    delay proxy (:mod:`pccl.tools.wanproxy`, ``--cap-mib`` in flight per connection) in front
    of each peer's listener in its own namespace; fixed stream counts and ``auto``
    (``Config.auto_streams``: the peers probe with ``optimize_topology()`` and re-wire)."""
    ok, why = netns.available()
    if not ok:
        print(f"wantestbed: network namespaces unavailable: {why}", file=sys.stderr)
        return 2
    from pccl.tools.machine import describe as _machine
    from pccl.tools.proc import master_banner, read_line

    rates = {(0, 1): args.rate, (1, 0): args.rate}
    n = int(args.mib * (1 << 20)) // 4
    doc: dict[str, Any] = {
        "config": {
            "rate": args.rate,
            "mib": args.mib,
            "cap_mib": args.cap_mib,
            "repeats": args.repeats,
            "machine": _machine(),
            "timing": "per operation: max over the 2 peers of the all-reduce's wall time after "
            "a barrier; median over repeats",
        },
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="pccl-testbed-") as tmpd:
        tmp = Path(tmpd)
        for d in args.delays:
            runs: dict[str, Any] = {}
            for streams in [*args.streams, "auto"]:
                with Testbed(2, rates) as bed:
                    procs: list[subprocess.Popen[bytes]] = []
                    try:
                        m = bed.popen(
                            "m",
                            [sys.executable, "-m", "pccl.cli", "master", "--host", bed.ip("m"),
                             "--port", "0", "--log-level", "warning"],
                            tmp / "master.log",
                        )  # fmt: skip
                        procs.append(m)
                        addr = master_banner(m, bed.ip("m"), 30.0)[0]
                        for i in range(2):
                            ip = bed.ip(f"p{i}")
                            px = bed.popen(
                                f"p{i}",
                                [sys.executable, "-m", "pccl.tools.wanproxy", "--listen",
                                 f"{ip}:47001", "--upstream", f"{ip}:47000", "--delay-ms",
                                 f"{d:g}", "--cap-mib", f"{args.cap_mib:g}"],
                                tmp / f"proxy{i}.log",
                            )  # fmt: skip
                            procs.append(px)
                            read_line(px, 30.0)  # its banner: listening
                        workers = []
                        for i in range(2):
                            params = {
                                "master": addr,
                                "idx": i,
                                "world": 2,
                                "n": n,
                                "repeats": args.repeats,
                                "streams": 1 if streams == "auto" else streams,
                                "auto": streams == "auto",
                                "optimize": False,
                                "min_gain": 0.1,
                                "p2p_port": 47000,
                                "advertise_port": 47001,
                            }
                            argv = [sys.executable, "-m", "pccl.tools.wantestbed", "--worker",
                                    json.dumps(params)]  # fmt: skip
                            w = bed.popen(f"p{i}", argv, tmp / f"w{i}.log")
                            procs.append(w)
                            workers.append(w)
                        rows = []
                        deadline = time.monotonic() + args.timeout
                        for who, ev in _events(
                            {str(k): w for k, w in enumerate(workers)}, deadline
                        ):
                            if ev.get("event") == "error":
                                log = (tmp / f"w{who}.log").read_text()[-3000:]
                                raise RuntimeError(f"worker {who}: {ev}\n{log}")
                            if ev.get("event") == "result":
                                rows.append(ev)
                        times = [
                            max(r["before_times"][k] for r in rows) for k in range(args.repeats)
                        ]
                        med = statistics.median(times)
                        runs[str(streams)] = {
                            "median_s": med,
                            "gbit_s": args.mib * (1 << 20) * 8 / med / 1e9,
                            "streams_open": [r["streams_open"] for r in rows],
                            "links": [r["link"] for r in rows],
                            "parity": len({r["digest_before"] for r in rows}) == 1,
                            "times": times,
                        }
                        print(
                            f"wantestbed: {d:g} ms, {streams}: {runs[str(streams)]}",
                            file=sys.stderr,
                        )
                    finally:
                        for p in procs:
                            if p.poll() is None:
                                p.kill()
                            p.wait(10)
            fixed = {k: v for k, v in runs.items() if k != "auto"}
            best = min(fixed, key=lambda k: fixed[k]["median_s"])
            runs["best_fixed"] = best
            runs["auto_vs_best"] = runs["auto"]["median_s"] / fixed[best]["median_s"]
            doc["runs"][f"{d:g}"] = runs
    text = json.dumps(doc, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pccl.tools.wantestbed", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("topology", help="ring order: admission vs optimize_topology vs brute force")
    t.add_argument("--peers", type=int, default=6)
    t.add_argument("--mib", type=float, default=8.0)
    t.add_argument("--streams", type=int, default=1)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--fast", default="200mbit")
    t.add_argument("--slow", default="20mbit")
    t.add_argument("--fast-share", type=float, default=0.3)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--min-gain", type=float, default=0.1)
    t.add_argument("--timeout", type=float, default=600.0)
    t.add_argument("--json", metavar="FILE")
    st = sub.add_parser("streams", help="throughput vs streams and delay on a shaped link")
    st.add_argument("--rate", default="1gbit")
    st.add_argument("--delays", type=_floats, default=[25.0, 50.0, 100.0], help="one-way, ms")
    st.add_argument("--streams", type=_ints, default=[1, 2, 4, 8, 16])
    st.add_argument("--mib", type=float, default=32.0)
    st.add_argument("--cap-mib", type=float, default=4.0)
    st.add_argument("--repeats", type=int, default=5)
    st.add_argument("--timeout", type=float, default=900.0)
    st.add_argument("--json", metavar="FILE")
    st.add_argument("--plot", metavar="PNG")
    sl = sub.add_parser("streams-live", help="streams vs delay on the testbed, auto included")
    sl.add_argument("--rate", default="1gbit")
    sl.add_argument("--delays", type=_floats, default=[25.0, 50.0, 100.0], help="one-way, ms")
    sl.add_argument("--streams", type=_ints, default=[1, 2, 4, 8, 16])
    sl.add_argument("--mib", type=float, default=32.0)
    sl.add_argument("--cap-mib", type=float, default=4.0)
    sl.add_argument("--repeats", type=int, default=5)
    sl.add_argument("--timeout", type=float, default=300.0)
    sl.add_argument("--json", metavar="FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(json.loads(argv[1]))
        return 0
    args = build_parser().parse_args(argv)
    if args.cmd == "streams-live":
        return _streams_live(args)
    return _topology(args) if args.cmd == "topology" else _streams(args)


if __name__ == "__main__":
    sys.exit(main())
