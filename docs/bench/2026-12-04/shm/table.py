"""Print the README's benchmark table from the JSON documents next to this file, or in the
directory given as the argument (``python table.py ../amd-epyc``).

Each row: medians over the runs of pccl (shared-memory links), pccl over TCP only, the raw TCP
ring floor and gloo, all from the same invocations; ratios as median (min-max) over runs; CPU
seconds per operation per peer (mean over peers, median over runs).
"""

import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [
    ("fp32 256 MiB, 4 peers", "fp32-4p-run*.json", 1, "s"),
    ("fp32 256 MiB, 2 peers", "fp32-2p-run*.json", 1, "s"),
    ("uint8 256 MiB, 4 peers (gloo fp32)", "uint8-4p-run*.json", 1, "s"),
    ("fp32 1 MiB, 4 peers", "1mib-4p-run*.json", 1000, "ms"),
]


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def main() -> None:
    where = sys.argv[1] if len(sys.argv) > 1 else HERE
    print(
        "| benchmark | pccl | pccl TCP only | floor | gloo | pccl / floor | gloo / pccl "
        "| TCP only / floor | CPU per op per peer: pccl, TCP only, floor, gloo |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, pattern, scale, unit in ROWS:
        docs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(where, pattern)))]
        if not docs:
            continue

        def secs(key: str, docs: list = docs, scale: int = scale) -> str:
            v = statistics.median(d[key]["seconds"] * scale for d in docs)
            return f"{v:.3f}" if scale == 1 else f"{v:.2f}"

        def cpu(key: str, docs: list = docs, scale: int = scale) -> str:
            per = [scale * sum(d[key]["cpu_s_per_op"]) / len(d[key]["cpu_s_per_op"]) for d in docs]
            return f"{statistics.median(per):.3f}"

        print(
            f"| {name} ({len(docs)} runs) | {secs('pccl')} {unit} | {secs('pccl_tcp')} {unit} "
            f"| {secs('floor')} {unit} | {secs('gloo')} {unit} "
            f"| {spread([d['floor_ratio'] for d in docs])} "
            f"| {spread([d['speedup'] for d in docs])}× "
            f"| {spread([d['tcp_floor_ratio'] for d in docs])} "
            f"| {cpu('pccl')}, {cpu('pccl_tcp')}, {cpu('floor')}, {cpu('gloo')} {unit} |"
        )


if __name__ == "__main__":
    main()
