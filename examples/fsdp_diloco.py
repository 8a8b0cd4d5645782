"""FSDP replicas synchronised by DiLoCo: rank i of every replica joins pccl peer group i.

Run it (from the repository root)::

    python examples/fsdp_diloco.py                  # 2 replicas x 2 FSDP ranks, CPU + gloo

Each *replica* is an ordinary FSDP2 job (``fully_shard`` over a 1-D CPU device mesh, gloo inside
the replica, its ranks in lockstep). Replicas are independent FSDP jobs that never talk gloo to
each other; across replicas only pccl is used, and only between equal ranks:

* rank ``i`` of every replica creates ``pccl.Communicator(master, peer_group=i)``;
* its ``DiLoCo`` covers the rank's *local shards* (``DTensor.to_local()``, shared memory with the
  FSDP parameters), so group ``i`` keeps shard ``i`` byte-identical across replicas: pseudo-
  gradients of shard ``i`` are all-reduced within group ``i`` only, and the outer state of shard
  ``i`` is hashed and synced within group ``i``;
* every replica must use the same model, the same mesh size and the same sharding, so that equal
  ranks hold equal shard shapes (the master rejects a mismatch by name and shape).

The launcher starts a master and ``replicas x ranks`` processes, trains the character LM of
:mod:`charlm`, and checks after every outer step that each group's shards hash identically in
every replica. ``--json`` ends the output with one machine-readable summary line (used by the
tests).

Caveats of the recipe: ``update_topology()`` is global (every rank of every replica votes), so all
ranks must reach their boundaries together, which FSDP's own collectives ensure within a replica.
A replica that loses one rank is broken as an FSDP job; kill and restart the whole replica (its
ranks rejoin their groups as newcomers and receive their shards).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pccl.tools.proc import spawn_master

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def run_rank(addr: str, p: dict[str, Any]) -> None:
    """One FSDP rank of one replica, and one pccl peer of group ``rank``."""
    import torch
    import torch.distributed as dist
    import xxhash
    from pccl.bindings.fsdp import local_shards
    from pccl.bindings.torch import DiLoCo
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pccl
    from pccl.tools import charlm as T

    torch.set_num_threads(1)
    replica, rank, ranks = int(p["replica"]), int(p["rank"]), int(p["ranks"])
    H, outer_steps = int(p["sync_every"]), int(p["outer_steps"])
    dist.init_process_group("gloo", init_method=f"file://{p['store']}", rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    cfg = T.TaskConfig()
    model = T.build(cfg)
    for layer in (model.embed, model.fc1, model.fc2, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = T.inner_optimizer(cfg, model)
    shard = replica * ranks + rank  # every rank of every replica reads different data
    ids = T.make_shard(cfg, shard)
    data = T.make_eval(cfg)

    comm = pccl.Communicator(addr, peer_group=rank, streams=2)
    comm.connect(timeout=60)
    total = int(p["replicas"]) * ranks
    comm.wait_for_world(total, timeout=60)  # initial formation: every rank of every replica
    diloco = DiLoCo(comm, model, opt, sync_every=H, quantization=pccl.Quantization.UINT8)
    _emit(
        "joined",
        replica=replica,
        rank=rank,
        group_world=comm.group_world_size,
        shards={k: list(v.shape) for k, v in local_shards(model).items()},
    )
    for step in range(outer_steps * H):
        opt.zero_grad(set_to_none=True)
        loss = T.loss_fn(model, *T.batch(cfg, ids, shard, step))
        loss.backward()
        opt.step()
        info = diloco.step()
        if info is None:
            continue
        hs = diloco.hashes()
        digest = xxhash.xxh3_128_hexdigest("".join(f"{k}={hs[k]};" for k in sorted(hs)).encode())
        h = xxhash.xxh3_128()
        for t in local_shards(model).values():  # the FSDP parameters themselves
            h.update(t.detach().contiguous().numpy().tobytes())
        _emit(
            "outer",
            replica=replica,
            rank=rank,
            step=info.outer_step,
            digest=digest,
            shard_digest=h.hexdigest(),
            applied=info.applied,
            group_world=info.world_size,
            sync_rx=info.sync_rx_bytes,
            tx=diloco.stats.tx_bytes,
            loss=T.evaluate(model, data),  # a full FSDP forward: both ranks take part
        )
    diloco.close()
    comm.close()
    dist.destroy_process_group()
    _emit("result", replica=replica, rank=rank)


def launch(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # clean up children
    try:
        master, addr = spawn_master("error")
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    say = (lambda *a: None) if args.json else print
    say(
        f"pccl master on {addr}; {args.replicas} FSDP replicas x {args.ranks} ranks "
        f"(rank i of every replica in pccl peer group i), DiLoCo H={args.sync_every}"
    )
    procs: dict[tuple[int, int], subprocess.Popen[str]] = {}
    sel = selectors.DefaultSelector()
    digests: dict[tuple[int, int], dict[int, str]] = {}  # (rank, step) -> {replica: digest}
    losses: dict[int, float] = {}
    shapes: dict[tuple[int, int], Any] = {}
    failures: list[str] = []
    done = 0
    with tempfile.TemporaryDirectory(prefix="pccl-fsdp-") as tmp:
        try:
            for r in range(args.replicas):
                for i in range(args.ranks):
                    params = {
                        "replica": r,
                        "rank": i,
                        "ranks": args.ranks,
                        "replicas": args.replicas,
                        "store": os.path.join(tmp, f"replica{r}"),
                        "sync_every": args.sync_every,
                        "outer_steps": args.outer_steps,
                    }
                    proc = subprocess.Popen(
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "--worker",
                            addr,
                            json.dumps(params),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                        start_new_session=True,
                    )
                    procs[(r, i)] = proc
                    sel.register(proc.stdout, selectors.EVENT_READ, (r, i))  # type: ignore[arg-type]
            deadline = time.monotonic() + args.timeout
            live = set(procs)
            while live and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1.0):
                    line = key.fileobj.readline()  # type: ignore[union-attr]
                    if not line:
                        sel.unregister(key.fileobj)
                        live.discard(key.data)
                        rc = procs[key.data].wait()
                        if rc != 0:
                            failures.append(f"replica {key.data[0]} rank {key.data[1]}: rc {rc}")
                        continue
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        say(f"  [{key.data}] {line.rstrip()}")
                        continue
                    if ev["event"] == "joined":
                        shapes[(ev["replica"], ev["rank"])] = ev["shards"]
                        say(
                            f"  replica {ev['replica']} rank {ev['rank']} joined group "
                            f"{ev['rank']} ({ev['group_world']} peers); local shards "
                            + ", ".join(f"{k} {v}" for k, v in ev["shards"].items())
                        )
                    elif ev["event"] == "outer":
                        d = digests.setdefault((ev["rank"], ev["step"]), {})
                        d[ev["replica"]] = ev["digest"] + "/" + ev["shard_digest"]
                        losses[ev["step"]] = ev["loss"]
                        if ev["sync_rx"]:
                            failures.append(f"re-fetch at {ev}")
                        if len(d) == args.replicas:
                            same = len(set(d.values())) == 1
                            if not same:
                                failures.append(f"rank {ev['rank']} step {ev['step']}: {d}")
                            say(
                                f"  outer {ev['step']:3d}  group {ev['rank']}  loss "
                                f"{ev['loss']:.3f}  shard {ev['rank']} "
                                f"{'identical' if same else 'DIFFERS'} across "
                                f"{len(d)} replicas (outer state {ev['digest'][:10]}, "
                                f"FSDP shard {ev['shard_digest'][:10]})"
                            )
                    elif ev["event"] == "result":
                        done += 1
            if live:
                failures.append(f"still running at the deadline: {sorted(live)}")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(5)
            except subprocess.TimeoutExpired:
                master.kill()
    for i in range(args.ranks):
        for s in range(1, args.outer_steps + 1):
            if len(digests.get((i, s), {})) != args.replicas:
                failures.append(f"group {i} step {s}: reports {digests.get((i, s))}")
    for r in range(args.replicas):
        if shapes.get((r, 0)) != shapes.get((0, 0)):
            failures.append(f"replica {r} shards differ in shape from replica 0's")
    summary = {
        "event": "summary",
        "ok": not failures and done == args.replicas * args.ranks,
        "failures": failures,
        "replicas": args.replicas,
        "ranks": args.ranks,
        "outer_steps": args.outer_steps,
        "digests": {f"{i}/{s}": d for (i, s), d in sorted(digests.items())},
        "loss": [losses[s] for s in sorted(losses)],
        "shards": {f"{r}/{i}": v for (r, i), v in sorted(shapes.items())},
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        loss = summary["loss"]
        print(
            f"{'OK' if summary['ok'] else 'FAILED'}: loss {loss[0]:.3f} -> {loss[-1]:.3f}; "
            f"every group's shard identical across replicas after each of "
            f"{args.outer_steps} outer steps"
            if summary["ok"]
            else f"FAILED: {failures}"
        )
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        run_rank(argv[1], json.loads(argv[2]))
        # Everything is closed and reported. Skip interpreter finalisation: torch's gloo
        # process-group threads were seen to abort it once in ~10 runs ("terminate called
        # without an active exception", rc -6) after the rank had finished its work.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2, help="FSDP ranks per replica")
    p.add_argument("--outer-steps", type=int, default=6)
    p.add_argument("--sync-every", type=int, default=5)
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--json", action="store_true", help="print only a JSON summary line")
    args = p.parse_args(argv)
    if args.replicas < 2 or args.ranks < 1 or args.outer_steps < 1:
        p.error("need --replicas >= 2, --ranks >= 1, --outer-steps >= 1")
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
