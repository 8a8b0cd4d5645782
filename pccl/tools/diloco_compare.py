"""Streaming DiLoCo against synchronous DiLoCo and fp32 DDP on the char-LM, same data and steps.

Run it (torch installed; also ``python -m pccl.tools.diloco_charlm --compare``)::

    python -m pccl.tools.diloco_compare --out docs/bench/2026-12-04/streaming

Every configuration trains the model of :mod:`pccl.tools.charlm` with ``--peers`` real peer
processes (``diloco_charlm --worker``) against a real ``pccl master`` on loopback, for the same
number of inner steps (``--rounds * --sync-every``) on the same shards:

* ``ddp-fp32``: fp32 data parallelism (the gradients of every shard averaged every step; computed
  in one process, bytes are what an fp32 ring all-reduce sends per peer);
* ``sync-uint8``: DiLoCo, the whole model every H steps, uint8 + error feedback;
* ``stream-{uint8,int4,int2}``: streaming DiLoCo, P = 4 fragments, overlap tau = 1, mix 0,
  the default merge ("eager": the local fragment takes its own estimate of the outer step at
  launch, corrected when the exchange lands), error feedback;
* ``stream-int4-replace``, ``stream-int4-carry``: the other merges (the Streaming DiLoCo
  paper's "replace" discards the tau overlapped inner steps);
* ``stream-uint8-mix0.5``, ``stream-{uint8,int4}-tau0``: the mixing factor and the overlap on
  their own.

Every configuration uses DiLoCo's default outer optimiser (lr 0.7, Nesterov momentum 0.9).
``--seed`` picks the task's seed (initialisation, shards, batches, held-out set).

Reported per configuration: final held-out loss of the outer parameters, all-reduce bytes sent
per peer (plus shared-state sync bytes), the peak all-reduce bytes of one boundary (what is in
flight at once), wall time and the peers' CPU seconds, parity (every peer's outer-state digest
equal after every boundary). Writes ``compare.json``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pccl.tools.proc import spawn_master, stop

#: name -> worker parameters (``fragments``/``overlap``/``mix``/``quantization``)
CONFIGS: dict[str, dict[str, Any]] = {
    "sync-uint8": {"quantization": "UINT8"},
    "stream-uint8": {"quantization": "UINT8", "fragments": 4, "overlap": 1, "mix": 0.0},
    "stream-int4": {"quantization": "INT4", "fragments": 4, "overlap": 1, "mix": 0.0},
    "stream-int2": {"quantization": "INT2", "fragments": 4, "overlap": 1, "mix": 0.0},
    # the merge on its own
    "stream-int4-replace": {
        "quantization": "INT4",
        "fragments": 4,
        "overlap": 1,
        "mix": 0.0,
        "merge": "replace",
    },
    "stream-int4-carry": {
        "quantization": "INT4",
        "fragments": 4,
        "overlap": 1,
        "mix": 0.0,
        "merge": "carry",
    },
    # the mixing factor and the overlap on their own
    "stream-uint8-mix0.5": {"quantization": "UINT8", "fragments": 4, "overlap": 1, "mix": 0.5},
    "stream-uint8-tau0": {"quantization": "UINT8", "fragments": 4, "overlap": 0, "mix": 0.0},
    "stream-int4-tau0": {"quantization": "INT4", "fragments": 4, "overlap": 0, "mix": 0.0},
}
DEFAULT = tuple(CONFIGS)


_WORKER = [sys.executable, "-m", "pccl.tools.diloco_charlm", "--worker"]


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_config(name: str, extra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train one DiLoCo configuration with real peers; return its figures."""
    parts = int(extra.get("fragments", 1))
    master, addr = spawn_master("error")
    events: dict[int, list[dict[str, Any]]] = {i: [] for i in range(args.peers)}
    procs: list[subprocess.Popen[str]] = []
    cpu0, t0 = _cpu_children(), time.perf_counter()
    try:
        for i in range(args.peers):
            p = {
                "shard": i,
                "outer_steps": args.rounds * parts,  # fragment boundaries
                "sync_every": args.sync_every,
                "error_feedback": True,
                "wait_world": args.peers,
                "threads": 1,
                **({"task": {"seed": args.seed}} if args.seed else {}),
                **extra,
            }
            procs.append(
                subprocess.Popen(
                    [*_WORKER, addr, json.dumps(p)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )

        def read(i: int, proc: subprocess.Popen[str]) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    events[i].append(json.loads(line))
                except ValueError:
                    pass

        readers = [threading.Thread(target=read, args=(i, p)) for i, p in enumerate(procs)]
        for t in readers:
            t.start()
        for proc in procs:
            proc.wait(args.timeout)
        for t in readers:
            t.join(10)
    finally:
        for proc in procs:
            stop(proc)
        stop(master, grace_s=2.0)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
    results = [next(e for e in evs if e["event"] == "result") for evs in events.values()]
    outer = [e for evs in events.values() for e in evs if e["event"] == "outer"]
    by_step: dict[int, set[str]] = {}
    for e in outer:
        by_step.setdefault(e["step"], set()).add(e["digest"])
    return {
        "name": name,
        **extra,
        "loss": results[0]["loss"],
        "tx_bytes_per_peer": max(r["tx"] for r in results),
        "sync_tx_bytes_per_peer": max(r["sync_tx"] for r in results),
        "peak_boundary_tx_bytes": max(e["boundary_tx"] for e in outer),
        "boundaries": len(by_step),
        "parity": all(len(v) == 1 for v in by_step.values())
        and len({r["digest"] for r in results}) == 1,
        "wall_s": wall,
        "cpu_s": cpu,
        "curve": [e["loss"] for e in events[0] if e["event"] == "outer"],
    }


def run_ddp(args: argparse.Namespace) -> dict[str, Any]:
    from pccl.tools import charlm as T

    steps = args.rounds * args.sync_every
    cfg = T.TaskConfig(seed=args.seed)
    t0 = time.process_time()
    w0 = time.perf_counter()
    curve = T.ddp_baseline(cfg, args.peers, steps)
    tx = T.ddp_bytes_per_step(T.num_params(cfg), args.peers) * steps
    return {
        "name": "ddp-fp32",
        "loss": curve[-1],
        "tx_bytes_per_peer": tx,
        "sync_tx_bytes_per_peer": 0,
        "peak_boundary_tx_bytes": T.ddp_bytes_per_step(T.num_params(cfg), args.peers),
        "boundaries": steps,
        "parity": True,
        "wall_s": time.perf_counter() - w0,  # one process simulating every rank, no network
        "cpu_s": time.process_time() - t0,
        "curve": curve[args.sync_every - 1 :: args.sync_every],
    }


def _table(rows: list[dict[str, Any]], h: int) -> str:
    ddp = next(r for r in rows if r["name"] == "ddp-fp32")
    sync = next((r for r in rows if r["name"] == "sync-uint8"), None)
    out = [
        "| config | held-out loss | vs sync uint8 | bytes/peer | x fewer than DDP | "
        "(/ H) | peak bytes/boundary | vs sync | wall s | CPU s | parity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = r["tx_bytes_per_peer"] + r["sync_tx_bytes_per_peer"]
        fewer = ddp["tx_bytes_per_peer"] / max(total, 1)
        vs = f"{(r['loss'] / sync['loss'] - 1) * 100:+.1f} %" if sync else "-"
        peak = (
            f"{r['peak_boundary_tx_bytes'] / sync['peak_boundary_tx_bytes']:.3f}"
            if sync and r["name"] != "ddp-fp32"
            else "-"
        )
        out.append(
            f"| {r['name']} | {r['loss']:.4f} | {vs} | {total:,} | {fewer:.1f}x | "
            f"{fewer / h:.2f} | {r['peak_boundary_tx_bytes']:,} | {peak} | {r['wall_s']:.1f} | "
            f"{r['cpu_s']:.1f} | {'yes' if r['parity'] else 'NO'} |"
        )
    return "\n".join(out)


def _plot(rows: list[dict[str, Any]], path: Path, h: int) -> None:
    from pccl.tools.plots import _pyplot, _save

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        curve = r["curve"]
        if r.get("fragments", 1) > 1:  # one point per fragment boundary: every P-th is a round
            curve = curve[r["fragments"] - 1 :: r["fragments"]]
        a.plot([(i + 1) * h for i in range(len(curve))], curve, label=r["name"])
    a.set_xlabel("inner steps")
    a.set_ylabel("held-out loss (nats/char)")
    a.legend()
    names = [r["name"] for r in rows]
    b.bar(names, [r["tx_bytes_per_peer"] + r["sync_tx_bytes_per_peer"] for r in rows])
    b.set_yscale("log")
    b.set_ylabel("bytes sent per peer")
    b.tick_params(axis="x", rotation=30)
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30, help="outer rounds of H steps (default 30)")
    p.add_argument("--sync-every", type=int, default=8, help="H (a multiple of 4; default 8)")
    p.add_argument("--configs", default=",".join(DEFAULT), help="comma-separated subset")
    p.add_argument("--seed", type=int, default=0, help="the task's seed (default 0)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", help="directory for compare.json / .md / .png")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from pccl.tools.machine import describe as _machine

    rows = [run_ddp(args)]
    for name in args.configs.split(","):
        rows.append(run_config(name, CONFIGS[name], args))
        r = rows[-1]
        print(
            f"{name}: loss {r['loss']:.4f}, {r['tx_bytes_per_peer']:,} B/peer, "
            f"peak {r['peak_boundary_tx_bytes']:,} B/boundary, {r['wall_s']:.1f} s, "
            f"parity {r['parity']}",
            flush=True,
        )
    table = _table(rows, args.sync_every)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "command": "python -m pccl.tools.diloco_compare " + " ".join(sys.argv[1:]),
            "peers": args.peers,
            "rounds": args.rounds,
            "sync_every": args.sync_every,
            "seed": args.seed,
            "rows": rows,
            "machine": _machine(),
        }
        (out / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "compare.md").write_text(table + "\n")
        try:
            _plot(rows, out / "compare.png", args.sync_every)
        except ImportError as e:  # matplotlib missing (PlotUnavailable)
            print(e, file=sys.stderr)
    return 0 if all(r["parity"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
