"""``pccl bench matrix``: the all-reduce benchmark over a grid users can trust.

Every row is one ``pccl bench allreduce`` configuration (:func:`pccl.tools.bench_allreduce.run`:
the real master, N peer processes, warm-up, timed repetitions, parity checked) together with
the references measured in the same invocation for its size and peer count: torch gloo
(float32, in place, as gloo always reduces) and the raw transport floor (a plain TCP ring
moving the same bytes; see :mod:`pccl.tools.bench_allreduce`). References are measured once
per (size, peers) and shared by the rows of that pair. The grid is the product of ``--mib``,
``--peers``, ``--kinds`` (``fp32``, ``bf16``, ``uint8``: uint8 is float32 data quantized on
the wire) and ``--placement`` (``out``, ``in``).

Prints a progress line per operation and a table at the end (stderr); the JSON document
(stdout and ``--json``) holds every row's full result and the machine; ``--plot`` draws time
against size per row kind with gloo and the floor (needs ``pccl[plot]``). Exit 1 if any row
broke parity or failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pccl import progress
from pccl.tools import bench_allreduce as ar
from pccl.tools import machine

__all__ = ["add_arguments", "run_matrix"]

KINDS = {
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "uint8": ("float32", "uint8"),
}


def add_arguments(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser(
        "matrix",
        help="all-reduce over sizes x peers x kinds x placement, each row with gloo and floor",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--mib", type=ar._float_list, default=[1.0, 16.0, 256.0, 1024.0])
    p.add_argument("--peers", type=ar._int_list, default=[2, 4, 8])
    p.add_argument("--kinds", default="fp32,bf16,uint8", help="comma list of fp32, bf16, uint8")
    p.add_argument("--placement", default="out,in", help="comma list of out, in")
    p.add_argument("--streams", type=int, default=4, help="TCP streams per ring link")
    p.add_argument("--compare", type=ar._compare_list, default=("gloo", "floor"))
    p.add_argument("--repeats", type=int, default=7, help="timed operations per row (>= 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="deadline of each half, s")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.set_defaults(func=_cmd)


def _rows(args: argparse.Namespace) -> list[tuple[float, int, str, bool]]:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    places = [x.strip() for x in args.placement.split(",") if x.strip()]
    bad = [k for k in kinds if k not in KINDS] + [x for x in places if x not in ("out", "in")]
    if bad or not kinds or not places:
        raise ValueError(f"unknown kinds or placements: {bad or 'none given'}")
    return [
        (mib, peers, kind, place == "in")
        for peers in args.peers
        for mib in args.mib
        for kind in kinds
        for place in places
    ]


def _cmd(args: argparse.Namespace) -> int:
    problems = []
    try:
        rows = _rows(args)
    except ValueError as e:
        problems.append(str(e))
        rows = []
    if not args.peers or min(args.peers) < 2:
        problems.append("--peers must be >= 2")
    if not args.mib or min(args.mib) <= 0:
        problems.append("--mib must be > 0")
    if args.repeats < 5 or args.warmup < 0:
        problems.append("--repeats must be >= 5 and --warmup >= 0")
    if "gloo" in args.compare and not ar._have("torch"):
        problems.append("--compare gloo needs torch: pip install 'pccl[torch]'")
    if any(r[2] == "bf16" for r in rows) and not ar._have("ml_dtypes"):
        problems.append("bf16 rows need ml_dtypes: pip install ml_dtypes")
    if args.plot and not ar._have("matplotlib"):
        problems.append("--plot needs matplotlib: pip install 'pccl[plot]'")
    if problems:
        for msg in problems:
            print(f"pccl bench matrix: {msg}", file=sys.stderr)
        return 2
    try:
        doc = run_matrix(args, rows)
    except ar.BenchError as e:
        print(f"pccl bench matrix: FAILED: {e}", file=sys.stderr)
        return 1
    text = json.dumps(doc, indent=2)
    print(text, flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    ar._log(table(doc["rows"]))
    if args.plot:
        plot(doc["rows"], args.plot)
        ar._log(f"plot: {args.plot}")
    return 0 if all(r["pccl"]["parity"] for r in doc["rows"]) else 1


def run_matrix(
    args: argparse.Namespace, rows: list[tuple[float, int, str, bool]]
) -> dict[str, Any]:
    """Run every row; return ``{"machine": ..., "rows": [...]}`` (see the module docstring).

    Raises:
        BenchError: a row could not complete.
    """
    per_row = args.warmup + args.repeats
    pairs = {(mib, peers) for mib, peers, _, _ in rows}
    total = len(rows) * per_row + len(pairs) * per_row * len(args.compare)
    refs: dict[tuple[float, int], dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    with progress.bar(total, "bench matrix", unit="op") as pbar:
        for i, (mib, peers, kind, in_place) in enumerate(rows, 1):
            dtype, quant = KINDS[kind]
            ar._log(
                f"[{i}/{len(rows)}] {mib:g} MiB, {peers} peers, {kind}, "
                f"{'in place' if in_place else 'out of place'}"
            )
            key = (mib, peers)
            one = argparse.Namespace(
                peers=peers,
                mib=mib,
                streams=args.streams,
                quantization=quant,
                dtype=dtype,
                compare=() if key in refs else args.compare,
                repeats=args.repeats,
                warmup=args.warmup,
                in_place=in_place,
                wan_delay_ms=None,
                wan_cap_mib=4.0,
                timeout=args.timeout,
            )
            doc = ar.run(one, pbar)
            if key in refs:
                doc = ar._with_refs(doc, refs[key])
            else:
                refs[key] = {"gloo": doc["gloo"], "floor": doc["floor"]}
            doc["row"] = {"mib": mib, "peers": peers, "kind": kind, "in_place": in_place}
            out.append(doc)
    return {"benchmark": "matrix", "machine": machine.describe(), "rows": out}


def _cpu(half: dict[str, Any] | None) -> float | None:
    if not half:
        return None
    xs = half.get("cpu_s_per_op") or []
    return sum(xs) / len(xs) if xs else None


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table: times, ratios and CPU seconds per op per peer."""

    def f(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lines = [
        "| MiB | peers | kind | place | pccl s | gloo s | floor s | vs gloo | vs floor "
        "| pccl cpu | gloo cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in rows:
        r = d["row"]
        lines.append(
            f"| {r['mib']:g} | {r['peers']} | {r['kind']} | {'in' if r['in_place'] else 'out'} "
            f"| {d['pccl']['seconds']:.4f} | {f(d['gloo'] and d['gloo']['seconds'], '.4f')} "
            f"| {f(d['floor'] and d['floor']['seconds'], '.4f')} | {f(d['speedup'], '.2f')}x "
            f"| {f(d['floor_ratio'], '.2f')}x | {f(_cpu(d['pccl']), '.3f')} "
            f"| {f(_cpu(d['gloo']), '.3f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Time per all-reduce against size: one panel per peer count, one line per row kind,
    gloo and the floor dashed."""
    from pccl.tools.plots import _pyplot

    plt = _pyplot()
    peers = sorted({d["row"]["peers"] for d in rows})
    fig, axes = plt.subplots(1, len(peers), figsize=(5.5 * len(peers), 4.2), squeeze=False)
    for ax, n in zip(axes[0], peers, strict=True):
        mine = [d for d in rows if d["row"]["peers"] == n]
        for label in sorted({(d["row"]["kind"], d["row"]["in_place"]) for d in mine}):
            pts = sorted(
                (d["row"]["mib"], d["pccl"]["seconds"])
                for d in mine
                if (d["row"]["kind"], d["row"]["in_place"]) == label
            )
            ax.plot(
                *zip(*pts, strict=True),
                "-o",
                label=f"pccl {label[0]} {'in' if label[1] else 'out'}",
            )
        for ref in ("gloo", "floor"):
            pts = sorted({(d["row"]["mib"], d[ref]["seconds"]) for d in mine if d.get(ref)})
            if pts:
                ax.plot(*zip(*pts, strict=True), "--", marker="x", label=ref)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("buffer (MiB)")
        ax.set_ylabel("seconds per all-reduce")
        ax.set_title(f"{n} peers")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from pccl.tools.proc import run_subcommand

    return run_subcommand(add_arguments, "matrix", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
