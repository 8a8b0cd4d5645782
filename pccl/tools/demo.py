"""``pccl demo``: a local cluster training a small language model with DiLoCo, with churn.

By default this runs :mod:`pccl.tools.diloco_charlm` (``examples/diloco_charlm.py``; torch
needed): the real master daemon and 3 peer processes on loopback train a character-level
language model with DiLoCo (uint8 pseudo-gradients, error feedback, Nesterov outer steps). Every
outer step prints the held-out loss, the world size, the bytes each peer sent against what fp32
DDP would have sent, and whether every peer's outer state hashes identically. A third of the way
through one peer is SIGKILLed (the survivors retry and carry on) and half-way a newcomer joins
(it receives the outer state by a verified shared-state sync and takes over the dead peer's data
shard). At the end the same data is trained with fp32 DDP for comparison.

``pccl demo --allreduce`` (or an install without torch) runs the
torch-free demo instead: every peer loops ``update_topology() -> all_reduce`` over a
gradient-sized float32 buffer (exact and uint8-quantized), checks the mean it received against
what it can compute itself, and reports the hash of its result so the launcher can show that
every peer holds identical bytes; the same kill-and-join episode happens midway.

The launcher runs in the foreground; peers are child processes killed on every exit path. On a
terminal the all-reduce demo draws a bar over its steps on stderr; its stdout lines are the same
with or without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

from pccl import progress
from pccl.tools.proc import spawn_master

__all__ = ["add_arguments", "main"]

ALONE_TIMEOUT_S = 10.0  # an all-reduce demo peer left alone this long gives up


def _exit_on_sigterm() -> None:
    """Make SIGTERM unwind the launcher (running its cleanup) instead of killing it outright."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def add_arguments(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a local master and peers training a small LM with DiLoCo, with a peer "
        "killed and a newcomer joining",
    )
    p.add_argument("--peers", type=int, default=3, help="peer processes (default 3)")
    p.add_argument("--outer-steps", type=int, default=30, help="DiLoCo outer steps (default 30)")
    p.add_argument("--sync-every", type=int, default=10, help="inner steps per outer step")
    p.add_argument("--delayed", action="store_true", help="one-step-delayed (async) DiLoCo")
    p.add_argument(
        "--step-ms", type=float, default=20.0, help="pause per inner step, to watch (default 20)"
    )
    p.add_argument("--no-churn", action="store_true", help="skip the kill-and-join episode")
    p.add_argument(
        "--allreduce", action="store_true", help="the torch-free all-reduce demo instead"
    )
    p.add_argument("--steps", type=int, default=30, help="--allreduce: steps per peer")
    p.add_argument("--mib", type=int, default=32, help="--allreduce: all-reduce size in MiB")
    p.set_defaults(func=_cmd_demo)


def _load_diloco_example() -> ModuleType | str:
    """The DiLoCo demo module (:mod:`pccl.tools.diloco_charlm`), or why it cannot run here."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'pccl-ft[torch]')"
    from pccl.tools import diloco_charlm

    return diloco_charlm


def _cmd_demo(args: argparse.Namespace) -> int:
    _exit_on_sigterm()
    if args.allreduce:
        return _cmd_allreduce(args)
    if args.peers < 2 or args.outer_steps < 2 or args.sync_every < 1:
        print("need --peers >= 2, --outer-steps >= 2, --sync-every >= 1", file=sys.stderr)
        return 2
    churn = not args.no_churn
    if churn and args.peers < 3:
        print("the kill-and-join episode needs --peers >= 3 (or pass --no-churn)", file=sys.stderr)
        return 2
    example = _load_diloco_example()
    if isinstance(example, str):
        print(f"DiLoCo demo unavailable: {example}; running the all-reduce demo", flush=True)
        return _cmd_allreduce(args)
    return int(
        example.launch(
            argparse.Namespace(
                peers=args.peers,
                outer_steps=args.outer_steps,
                sync_every=args.sync_every,
                delayed=args.delayed,
                churn=churn,
                step_ms=args.step_ms,
                quantization="UINT8",
            )
        )
    )


def _spawn_peer(port: int, idx: int, args: argparse.Namespace) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pccl.tools.demo",
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


def _say(msg: str) -> None:
    """Print one line of the demo's output (lifting the progress bar for it)."""
    with progress.printing():
        print(msg, flush=True)


def _cmd_allreduce(args: argparse.Namespace) -> int:
    import selectors

    if args.peers < 2 or args.steps < 1 or args.mib < 1:
        print("need --peers >= 2, --steps >= 1, --mib >= 1", file=sys.stderr)
        return 2
    master, addr = spawn_master()
    port = int(addr.rsplit(":", 1)[1])
    _say(f"master on 127.0.0.1:{port}; starting {args.peers} peers ({args.mib} MiB all-reduces)")
    procs: dict[int, subprocess.Popen[str]] = {}
    sel = selectors.DefaultSelector()
    failures = 0
    pbar = progress.bar(args.steps, "demo", unit="step")
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
                        _say(f"  peer #{i} exited with {code}")
                    continue
                ev: dict[str, Any] = json.loads(line)
                if ev["event"] == "step":
                    step = ev["step"]
                    hashes.setdefault(step, {})[i] = ev["hash"]
                    if step + 1 > pbar.n:
                        pbar.update(step + 1 - pbar.n)
                    _say(
                        f"  step {step:3d} peer #{i} (id {ev['peer_id']}) world {ev['world']} "
                        f"{ev['seconds'] * 1e3:7.1f} ms  {ev['gbps']:5.2f} GB/s  "
                        f"uint8 err {ev['quant_err']:.2e}  mean ok {ev['ok']}"
                    )
                    if not ev["ok"]:
                        failures += 1
                    group = hashes[step]
                    if len(group) >= ev["world"] and len(set(group.values())) > 1:
                        failures += 1
                        _say(f"  PARITY VIOLATION at step {step}: {group}")
                    if not killed and step == args.steps // 3 and len(procs) > 2:
                        victim = max(procs)
                        _say(f"  >>> SIGKILL peer #{victim}")
                        procs[victim].kill()
                        killed = True
                    if killed and not joined and step >= args.steps // 2:
                        _say(f"  >>> starting peer #{next_idx}")
                        procs[next_idx] = _spawn_peer(port, next_idx, args)
                        sel.register(procs[next_idx].stdout, selectors.EVENT_READ, next_idx)  # type: ignore[arg-type]
                        next_idx += 1
                        joined = True
                elif ev["event"] == "alone":
                    _say(f"  peer #{i}: no other peer for {ALONE_TIMEOUT_S:.0f} s, leaving")
                elif ev["event"] == "retry":
                    _say(f"  peer #{i}: {ev['error']} -> update_topology and retry")
                elif ev["event"] == "joined":
                    _say(f"  peer #{i} admitted as id {ev['peer_id']} (world {ev['world']})")
        checked = sum(1 for g in hashes.values() if len(g) > 1)
        _say(f"done: {checked} steps compared across peers, {failures} failures")
        return 1 if failures or procs else 0
    finally:
        pbar.close()
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
    alone_since: float | None = None
    while step < steps:
        if not first or comm.world_size < 2:
            comm.update_topology()
        first = False
        if comm.world_size < 2:
            # Alone: wait for company, but not forever (the others may have finished the run).
            alone_since = alone_since or time.monotonic()
            if time.monotonic() - alone_since > ALONE_TIMEOUT_S:
                emit(event="alone", peer_id=comm.peer_id)
                break
            time.sleep(0.2)
            continue
        alone_since = None
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
    from pccl.tools.proc import run_subcommand

    return run_subcommand(add_arguments, "demo", argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
