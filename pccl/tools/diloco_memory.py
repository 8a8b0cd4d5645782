"""Host memory added by ``DiLoCo``: peak RSS of real peers before and after wrapping a model.

Run it (torch installed)::

    python -m pccl.tools.diloco_memory --params 64Mi            # sync DiLoCo, uint8 + EF
    python -m pccl.tools.diloco_memory --params 64Mi --delayed  # one-step-delayed
    python -m pccl.tools.diloco_memory --params 64Mi --fragments 4 --overlap 1  # streaming
    python -m pccl.tools.diloco_charlm --memory --params 64Mi   # the same, from the example

It starts a real ``pccl master`` and ``--peers`` peer processes on loopback. Each builds a model
of ``--params`` fp32 parameters (square linear layers, the same seed on every peer) with its
gradients allocated, connects, reads its peak RSS, wraps the model in ``DiLoCo`` (H = 1), runs
``--boundaries`` outer boundaries (real quantized all-reduces and shared-state syncs), and reads
its peak RSS again. The launcher prints
one JSON document: per peer, the peak RSS before and after and the difference per parameter
(``added_bytes_per_param``), plus the machine. Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss``,
so transient buffers count.

``python -m pccl.tools.diloco_memory --worker ADDR JSON`` is one peer (what the launcher spawns).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from pccl.tools.proc import read_line, spawn_master, stop

_UNITS = {"": 1, "k": 1000, "ki": 1 << 10, "m": 10**6, "mi": 1 << 20, "g": 10**9, "gi": 1 << 30}


def parse_count(text: str) -> int:
    """``"64Mi"`` -> 67108864; ``"1.5M"`` -> 1500000."""
    t = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if unit and t.endswith(unit):
            return int(float(t[: -len(unit)]) * _UNITS[unit])
    return int(t)


def _peak_rss() -> int:
    """Peak resident set size of this process, bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def run_worker(addr: str, p: dict[str, Any]) -> None:
    """One peer: build the model, measure, wrap, run the boundaries, measure; print JSON."""
    import torch

    import pccl
    from pccl.bindings.torch import DiLoCo

    torch.set_num_threads(1)
    width = int(p["width"])
    layers = max(1, int(p["params"]) // (width * width))
    torch.manual_seed(0)  # a run starts every replica from the same initial model
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for prm in model.parameters():
        prm.grad = torch.zeros_like(prm)
    numel = sum(prm.numel() for prm in model.parameters())
    comm = pccl.Communicator(addr)
    comm.connect(timeout=60)
    comm.wait_for_world(int(p["peers"]), timeout=120)
    before = _peak_rss()  # model, gradients and a connected communicator
    parts, tau = int(p.get("fragments", 1)), int(p.get("overlap", 0))
    period = tau + 1  # one (fragment) boundary every period inner steps
    diloco = DiLoCo(
        comm,
        model,
        sync_every=parts * period,
        fragments=parts,
        overlap=tau,
        quantization=pccl.Quantization[p["quantization"]],
        delayed=bool(p["delayed"]),
        error_feedback=True,
    )
    constructed = _peak_rss()
    t0 = time.perf_counter()
    for i in range(int(p["boundaries"]) * period):
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(1e-3 * (i + 1))
        diloco.step()
    diloco.flush()
    seconds = time.perf_counter() - t0
    after = _peak_rss()
    hashes = diloco.hashes()
    diloco.close()
    comm.close()
    print(
        json.dumps(
            {
                "params": numel,
                "peak_rss_before": before,
                "peak_rss_after_construct": constructed,
                "peak_rss_after": after,
                "added_bytes_per_param": (after - before) / numel,
                "boundary_seconds": seconds,
                "outer_digest": sorted(hashes.items())[0][1],
            }
        ),
        flush=True,
    )


def launch(args: argparse.Namespace) -> dict[str, Any]:
    """Start the master and the peers, collect their reports."""
    from pccl.tools.machine import describe as _machine

    master, addr = spawn_master()
    procs: list[subprocess.Popen[str]] = []
    try:
        params = {
            "params": parse_count(args.params),
            "width": args.width,
            "peers": args.peers,
            "boundaries": args.boundaries,
            "delayed": args.delayed,
            "quantization": args.quantization,
            "fragments": args.fragments,
            "overlap": args.overlap,
        }
        doc = json.dumps(params)
        for _ in range(args.peers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pccl.tools.diloco_memory", "--worker", addr, doc],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        peers = [json.loads(read_line(proc, args.timeout)) for proc in procs]
    finally:
        for proc in procs:
            stop(proc, grace_s=5.0)
        stop(master, grace_s=2.0)
    return {
        "mode": "delayed" if args.delayed else "sync",
        "fragments": args.fragments,
        "overlap": args.overlap,
        "quantization": args.quantization,
        "error_feedback": True,
        "peers": peers,
        "max_added_bytes_per_param": max(x["added_bytes_per_param"] for x in peers),
        "parity": len({x["outer_digest"] for x in peers}) == 1,
        "machine": _machine(),
        "command": "python -m pccl.tools.diloco_memory " + " ".join(sys.argv[1:]),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="64Mi", help="model parameters (default 64Mi)")
    p.add_argument("--width", type=int, default=4096, help="linear layer width (default 4096)")
    p.add_argument("--peers", type=int, default=2, help="peer processes (default 2)")
    p.add_argument("--boundaries", type=int, default=2, help="outer boundaries (default 2)")
    p.add_argument("--delayed", action="store_true", help="one-step-delayed DiLoCo")
    p.add_argument("--fragments", type=int, default=1, help="streaming: fragments P")
    p.add_argument("--overlap", type=int, default=0, help="streaming: overlap tau (H = P(tau+1))")
    p.add_argument("--quantization", default="UINT8", help="wire encoding (default UINT8)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per peer report (s)")
    p.add_argument("--out", help="also write the JSON document here")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        run_worker(argv[1], json.loads(argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    doc = launch(args)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
