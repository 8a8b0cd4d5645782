"""``pccl demo``: a local cluster doing real work, with progress.

Starts the real master daemon and N peer processes on loopback. Every peer loops
``update_topology() -> all_reduce`` over a gradient-sized float32 buffer (exact and uint8),
checks the mean it received against what it can compute itself, and reports the hash of its result
so the launcher can show that every peer holds identical bytes. Midway one peer is SIGKILLed and
a fresh one joins: the survivors see ``CollectiveAborted``, re-wire, retry and carry on.

The launcher runs in the foreground; peers are child processes killed on every exit path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

__all__ = ["add_arguments", "main"]


def add_arguments(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a local master and peers doing all-reduces with churn")
    p.add_argument("--peers", type=int, default=3, help="peer processes (default 3)")
    p.add_argument("--steps", type=int, default=30, help="steps per peer (default 30)")
    p.add_argument("--mib", type=int, default=32, help="all-reduce size in MiB (default 32)")
    p.add_argument("--no-churn", action="store_true", help="skip the kill-and-join episode")
    p.set_defaults(func=_cmd_demo)


def _spawn_master() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pccl.cli",
            "master",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"master did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def _spawn_peer(port: int, idx: int, args: argparse.Namespace) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pccl.demo",
            "--worker",
            str(port),
            str(idx),
            str(args.steps),
            str(args.mib),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    import selectors

    if args.peers < 2 or args.steps < 1 or args.mib < 1:
        print("need --peers >= 2, --steps >= 1, --mib >= 1", file=sys.stderr)
        return 2
    master, port = _spawn_master()
    print(f"master on 127.0.0.1:{port}; starting {args.peers} peers ({args.mib} MiB all-reduces)")
    procs: dict[int, subprocess.Popen[str]] = {}
    sel = selectors.DefaultSelector()
    failures = 0
    try:
        for i in range(args.peers):
            procs[i] = _spawn_peer(port, i, args)
            sel.register(procs[i].stdout, selectors.EVENT_READ, i)  # type: ignore[arg-type]
        next_idx = args.peers
        killed = joined = args.no_churn
        hashes: dict[int, dict[int, str]] = {}
        deadline = time.monotonic() + 120 + args.steps * 5
        while procs and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                i = key.data
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    sel.unregister(key.fileobj)
                    code = procs.pop(i).wait()
                    if code not in (0, -signal.SIGKILL):
                        failures += 1
                        print(f"  peer #{i} exited with {code}")
                    continue
                ev: dict[str, Any] = json.loads(line)
                if ev["event"] == "step":
                    step = ev["step"]
                    hashes.setdefault(step, {})[i] = ev["hash"]
                    print(
                        f"  step {step:3d} peer #{i} (id {ev['peer_id']}) world {ev['world']} "
                        f"{ev['seconds'] * 1e3:7.1f} ms  {ev['gbps']:5.2f} GB/s  "
                        f"uint8 err {ev['quant_err']:.2e}  mean ok {ev['ok']}"
                    )
                    if not ev["ok"]:
                        failures += 1
                    group = hashes[step]
                    if len(group) >= ev["world"] and len(set(group.values())) > 1:
                        failures += 1
                        print(f"  PARITY VIOLATION at step {step}: {group}")
                    if not killed and step == args.steps // 3 and len(procs) > 2:
                        victim = max(procs)
                        print(f"  >>> SIGKILL peer #{victim}")
                        procs[victim].kill()
                        killed = True
                    if killed and not joined and step >= args.steps // 2:
                        print(f"  >>> starting peer #{next_idx}")
                        procs[next_idx] = _spawn_peer(port, next_idx, args)
                        sel.register(procs[next_idx].stdout, selectors.EVENT_READ, next_idx)  # type: ignore[arg-type]
                        next_idx += 1
                        joined = True
                elif ev["event"] == "retry":
                    print(f"  peer #{i}: {ev['error']} -> update_topology and retry")
                elif ev["event"] == "joined":
                    print(f"  peer #{i} admitted as id {ev['peer_id']} (world {ev['world']})")
        checked = sum(1 for g in hashes.values() if len(g) > 1)
        print(f"done: {checked} steps compared across peers, {failures} failures")
        return 1 if failures or procs else 0
    finally:
        for p in procs.values():
            p.kill()
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(5)
        except subprocess.TimeoutExpired:
            master.kill()


def _worker(port: int, idx: int, steps: int, mib: int) -> int:
    import numpy as np
    import xxhash

    import pccl

    def emit(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)

    n = mib * (1 << 20) // 4
    comm = pccl.Communicator(f"127.0.0.1:{port}", streams=4)
    comm.connect(timeout=60)
    emit(event="joined", peer_id=comm.peer_id, world=comm.world_size)
    grad = np.empty(n, dtype=np.float32)
    out = np.empty_like(grad)
    q = np.empty_like(grad)
    step = 0
    first = True
    while step < steps:
        if not first or comm.world_size < 2:
            comm.update_topology()
        first = False
        if comm.world_size < 2:
            time.sleep(0.2)
            continue
        try:
            # Agree on the step (a newcomer adopts the run's), then fill with step + 1 so the
            # exact mean is known everywhere.
            agreed = np.array([step], dtype=np.int64)
            comm.all_reduce(agreed, op=pccl.ReduceOp.MAX, tag=2)
            step = int(agreed[0])
            grad.fill(step + 1.0)
            grad[::97] += np.float32(comm.peer_id % 7)
            info = comm.all_reduce(grad, out, op=pccl.ReduceOp.AVG)
            comm.all_reduce(
                grad, q, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization.UINT8, tag=1
            )
        except pccl.CollectiveAborted as e:
            emit(event="retry", error=type(e).__name__)
            continue
        ok = bool(out[1] == np.float32(step + 1.0)) and bool(np.all(np.isfinite(q)))
        emit(
            event="step",
            step=step,
            peer_id=comm.peer_id,
            world=info.world_size,
            seconds=info.seconds,
            gbps=2 * (info.world_size - 1) / info.world_size * grad.nbytes / info.seconds / 1e9,
            quant_err=float(np.max(np.abs(q - out))),
            ok=ok,
            hash=xxhash.xxh3_64_hexdigest(out.tobytes()) + xxhash.xxh3_64_hexdigest(q.tobytes()),
        )
        step += 1
    comm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        port, idx, steps, mib = (int(a) for a in argv[1:5])
        return _worker(port, idx, steps, mib)
    from pccl.cli import main as cli_main

    return cli_main(["demo", *argv])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
