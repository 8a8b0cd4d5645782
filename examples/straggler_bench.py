"""Uneven peers: what one slow peer costs synchronous DiLoCo, and what quorum mode saves.

Runs the char-LM DiLoCo peers of :mod:`diloco_charlm` (real master, real peer processes on
loopback) in four configurations, each for the same number of outer steps:

* ``baseline``: 4 equal peers, synchronous DiLoCo (every boundary waits for everyone);
* ``sync_straggler``: the same with one peer 3x slower (every inner step takes 3x as long);
* ``quorum_straggler``: the same straggler with ``min_quorum=3`` and a short grace;
* ``three_peers``: the 3 fast peers alone ("the run without the straggler").

Reported per configuration: wall time for the run to reach the last outer step (on the fast
peers), outer steps per second, samples trained per second by the whole group, the final
held-out loss of the outer parameters, bytes sent per peer, and parity: every peer's outer state
hash identical at every boundary (quorum mode: at every round, on every peer, contributors or
not). Simulated compute (``--step-ms``) dominates the inner step, as on a real GPU peer.

    python examples/straggler_bench.py --out docs/bench/2026-12-03/straggler.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pccl.tools.proc import spawn_master

HERE = Path(__file__).resolve().parent


def _run(cfg: dict[str, Any], peers: int, slow_peer: int | None) -> dict[str, Any]:
    master, addr = spawn_master("error")
    procs: dict[str, subprocess.Popen[str]] = {}
    events: dict[str, list[dict[str, Any]]] = {}
    sel = selectors.DefaultSelector()
    try:
        for i in range(peers):
            p = {**cfg, "shard": i, "wait_world": peers, "threads": 1}
            if i == slow_peer:
                p["slow"] = 3.0
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "diloco_charlm.py"), "--worker", addr, json.dumps(p)],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            procs[f"peer{i}"] = proc
            events[f"peer{i}"] = []
            sel.register(proc.stdout, selectors.EVENT_READ, f"peer{i}")  # type: ignore[arg-type]
        deadline = time.monotonic() + 600
        live = set(procs)
        while live and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    sel.unregister(key.fileobj)
                    live.discard(key.data)
                    continue
                try:
                    events[key.data].append(json.loads(line))
                except ValueError:
                    print(f"  [{key.data}] {line.rstrip()}", file=sys.stderr)
        for name, proc in procs.items():
            if proc.wait(30) != 0:
                raise RuntimeError(f"{name} failed: {events[name][-1:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        master.terminate()
        master.wait(10)
    return _summarise(events, cfg, slow_peer)


def _summarise(
    events: dict[str, list[dict[str, Any]]], cfg: dict[str, Any], slow_peer: int | None
) -> dict[str, Any]:
    results = {n: next(e for e in evs if e["event"] == "result") for n, evs in events.items()}
    fast = [n for n in results if n != f"peer{slow_peer}"]
    quorum = cfg.get("min_quorum") is not None
    kind = "round" if quorum else "outer"
    by_step: dict[int, set[str]] = {}
    checked = 0
    for evs in events.values():
        for e in evs:
            if e["event"] == kind:
                by_step.setdefault(e["step"], set()).add(e["digest"])
    violations = [s for s, d in by_step.items() if len(d) != 1]
    checked = len(by_step)
    seconds = max(results[n]["seconds"] for n in fast)
    samples = sum(r["samples"] for r in results.values())
    rounds_in = {}
    if quorum:
        ids = {n: r["peer_id"] for n, r in results.items()}
        rounds = {e["step"]: e for e in events[fast[0]] if e["event"] == "round"}
        rounds_in = {n: sum(ids[n] in r["contributors"] for r in rounds.values()) for n in ids}
    return {
        "seconds": round(seconds, 3),
        "outer_steps": cfg["outer_steps"],
        "outer_steps_per_s": round(cfg["outer_steps"] / seconds, 4),
        "samples_per_s": round(samples / seconds, 1),
        "final_loss": round(results[fast[0]]["loss"], 5),
        "tx_bytes_per_peer": max(r["tx"] + r["sync_tx"] for r in results.values()),
        "inner_steps": {n: r["inner_steps"] for n, r in results.items()},
        "rounds_contributed": rounds_in,
        "parity_checked_steps": checked,
        "parity_violations": violations,
        "final_digests_identical": len({r["digest"] for r in results.values()}) == 1,
    }


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outer-steps", type=int, default=30)
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--step-ms", type=float, default=20.0, help="simulated compute per step")
    p.add_argument("--grace-s", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration (median)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument(
        "--configs",
        default="baseline,sync_straggler,quorum_straggler,three_peers",
        help="comma-separated subset to run",
    )
    args = p.parse_args(argv)
    base = {
        "outer_steps": args.outer_steps,
        "sync_every": args.sync_every,
        "step_ms": args.step_ms,
        "quantization": "UINT8",
        "lr_schedule": "cosine",
        "weighted": True,
    }
    configs = {
        "baseline": (base, 4, None),
        "sync_straggler": (base, 4, 3),
        "quorum_straggler": ({**base, "min_quorum": 3, "grace_s": args.grace_s}, 4, 3),
        "three_peers": (base, 3, None),
    }
    out: dict[str, Any] = {"machine": _machine(), "args": vars(args) | {"out": str(args.out)}}
    runs: dict[str, list[dict[str, Any]]] = {}
    wanted = args.configs.split(",")
    for name, (cfg, peers, slow) in configs.items():
        if name not in wanted:
            continue
        for rep in range(args.repeats):
            print(f"{name} run {rep + 1}/{args.repeats} ...", flush=True)
            runs.setdefault(name, []).append(_run(cfg, peers, slow))
    out["runs"] = runs
    med = {
        n: {
            k: statistics.median(r[k] for r in rs)
            for k in ("seconds", "outer_steps_per_s", "samples_per_s", "final_loss")
        }
        for n, rs in runs.items()
    }
    out["median"] = med
    b = med.get("baseline")
    q = med.get("quorum_straggler")
    if b and q and "three_peers" in med:
        out["quorum_vs_baseline"] = {
            "outer_steps_per_s": round(q["outer_steps_per_s"] / b["outer_steps_per_s"], 3),
            "samples_per_s": round(q["samples_per_s"] / b["samples_per_s"], 3),
            "samples_per_s_vs_three_peers": round(
                q["samples_per_s"] / med["three_peers"]["samples_per_s"], 3
            ),
            "final_loss": round(q["final_loss"] / b["final_loss"], 4),
            "final_loss_vs_three_peers": round(
                q["final_loss"] / med["three_peers"]["final_loss"], 4
            ),
        }
    out["parity_violations"] = sum(len(r["parity_violations"]) for rs in runs.values() for r in rs)
    print(f"{'config':18} {'s':>7} {'outer/s':>8} {'samples/s':>10} {'loss':>7}")
    for n, m in med.items():
        print(
            f"{n:18} {m['seconds']:7.2f} {m['outer_steps_per_s']:8.3f} "
            f"{m['samples_per_s']:10.1f} {m['final_loss']:7.4f}"
        )
    print(
        "quorum vs baseline:",
        out.get("quorum_vs_baseline"),
        "parity violations:",
        out["parity_violations"],
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if out["parity_violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
