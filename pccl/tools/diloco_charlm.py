"""DiLoCo across local peers: a tiny character LM trained by N pccl peers, with churn.

Run it (with torch installed; ``examples/diloco_charlm.py`` in a checkout is the same)::

    python -m pccl.tools.diloco_charlm                    # 3 peers, sync DiLoCo, uint8
    python -m pccl.tools.diloco_charlm --delayed --churn  # async, a peer killed + a newcomer

It starts a real ``pccl master`` and N peer processes on loopback. Each peer trains the model of
:mod:`charlm` on its own data shard with AdamW and calls ``DiLoCo.step()`` after every inner step;
every ``--sync-every`` steps the peers average their uint8-quantized pseudo-gradients and take a
Nesterov outer step. For every outer step the launcher prints the held-out loss, the world size,
the bytes each peer sent so far against what fp32 DDP would have sent for the same inner steps, and
whether every peer's outer state hashes to the same value (parity). With ``--churn`` the last peer
is SIGKILLed a third of the way through and a newcomer takes over its shard half-way: the
survivors retry, the newcomer receives the outer state by a verified shared-state sync, and parity
holds throughout. At the end the launcher trains the fp32 DDP baseline on the same data and
compares.

``--compare`` runs :mod:`pccl.tools.diloco_compare` (streaming vs synchronous DiLoCo vs fp32 DDP:
held-out loss, bytes, peak bytes per boundary, time); ``--memory`` runs
:mod:`pccl.tools.diloco_memory` (peak host memory added by ``DiLoCo``).

``python -m pccl.tools.diloco_charlm --worker ADDR JSON`` is one peer (what the launcher spawns); it
prints one JSON event per line. :func:`run_worker` is reused by the test suite.

``python -m pccl.tools.diloco_charlm --peer [--outer-steps N ...]`` is one peer configured from the
environment, the way ``deploy/local-cluster`` and ``pccl chaos --cmd`` start a user's command:
``PCCL_MASTER``, ``PCCL_PEER_INDEX`` (its data shard; peers with an index below
``PCCL_NUM_PEERS`` form the run together, later ones join it).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from pccl.tools.proc import spawn_master

Emit = Callable[..., None]


def _emit_json(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


# ---------------------------------------------------------------------------------- one peer


def run_worker(addr: str, p: dict[str, Any], emit: Emit = _emit_json) -> None:
    """Train as one DiLoCo peer until the run reaches ``p["outer_steps"]`` outer steps.

    Params: ``shard``, ``outer_steps``, ``sync_every``, ``delayed``, ``quantization`` (name),
    ``error_feedback``, ``wait_world`` (peers to wait for before training; 0 for a late joiner),
    ``gate`` (import and build everything, print ``gated``, then wait for SIGUSR1 before
    connecting: a newcomer that joins at a moment the caller chooses), ``step_ms`` (sleep per
    inner step, to watch a run at human pace), ``task`` (TaskConfig overrides), ``threads``,
    ``streams``, ``config`` (pccl.Config overrides), ``slow`` (this peer's inner steps take
    ``slow`` times as long: a straggler), ``min_quorum``/``grace_s`` (quorum mode),
    ``weighted`` (pass the tokens of each inner step to ``step()``), ``lr_schedule``
    (``"cosine"``: a cosine LR schedule over the run, shared through ``extra_state``),
    ``fragments``/``overlap``/``mix``/``merge`` (streaming DiLoCo; ``outer_steps`` then counts
    fragment boundaries, one every ``sync_every / fragments`` inner steps).
    Events: ``gated``, ``joined``, ``outer`` (every boundary, with the held-out loss of the outer
    parameters and their digest), ``round`` (quorum mode: every round of the group, with its
    contributors and digest), ``result``; ``too_late`` (then it exits) when a late joiner
    finds itself alone: the run ended before it was admitted.
    """
    import torch
    import xxhash

    import pccl
    from pccl.bindings.torch import DiLoCo
    from pccl.tools import charlm as T

    torch.set_num_threads(int(p.get("threads", 1)))
    cfg = T.TaskConfig(**p.get("task", {}))
    shard = int(p["shard"])
    H = int(p.get("sync_every", 10))
    model = T.build(cfg)
    opt = T.inner_optimizer(cfg, model)
    ids = T.make_shard(cfg, shard)
    data = T.make_eval(cfg)
    step_s = float(p.get("step_ms", 0)) / 1000
    slow = float(p.get("slow", 1.0))
    min_quorum = p.get("min_quorum")
    extra: dict[str, Any] = {}
    sched = None
    if p.get("lr_schedule") == "cosine":
        total = int(p["outer_steps"]) * int(p.get("sync_every", 10))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=1e-4)
        extra["lr_schedule"] = sched

    if p.get("gate"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        emit("gated", pid=os.getpid())
        signal.sigwait({signal.SIGUSR1})
    comm = pccl.Communicator(
        addr, streams=int(p.get("streams", 2)), config=pccl.Config(**p.get("config", {}))
    )
    comm.connect(timeout=float(p.get("connect_timeout", 60)))
    wait_world = int(p.get("wait_world", 0))
    if wait_world == 0 and comm.world_size == 1:
        # A newcomer admitted alone: the run it came to join has already ended. Training on
        # its own would be a different run, so it leaves.
        emit("too_late", peer_id=comm.peer_id)
        comm.close()
        return
    # Initial formation only: all first peers wait here together, then build DiLoCo together.
    comm.wait_for_world(max(wait_world, 1), timeout=60)
    t0 = time.perf_counter()
    diloco = DiLoCo(
        comm,
        model,
        opt,
        sync_every=H,
        quantization=pccl.Quantization[p.get("quantization", "UINT8")],
        delayed=bool(p.get("delayed", False)),
        error_feedback=bool(p.get("error_feedback", True)),
        extra_state=extra,
        min_quorum=None if min_quorum is None else int(min_quorum),
        grace_s=float(p.get("grace_s", 0.0)),
        trace_hashes=min_quorum is not None,
        fragments=int(p.get("fragments", 1)),
        overlap=int(p.get("overlap", 0)),
        mix=float(p.get("mix", 0.0)),
        merge=str(p.get("merge", "eager")),
    )
    period = H // int(p.get("fragments", 1))  # inner steps between (fragment) boundaries
    emit(
        "joined",
        peer_id=comm.peer_id,
        world=comm.group_world_size,
        outer_step=diloco.outer_step,
        revision=diloco.revision,
        sync_rx=diloco.stats.sync_rx_bytes,
        params=diloco.numel,
        sched_epoch=None if sched is None else sched.last_epoch,
        lr=opt.param_groups[0]["lr"],
    )

    def outer_loss() -> float:
        with torch.no_grad():
            logits = torch.func.functional_call(model, diloco.outer_parameters(), (data[0],))
            return float(torch.nn.functional.cross_entropy(logits, data[1]))

    def digest() -> str:
        hs = diloco.hashes()
        return xxhash.xxh3_128_hexdigest("".join(f"{k}={hs[k]};" for k in sorted(hs)).encode())

    def emit_rounds() -> None:
        for r in diloco.rounds():
            emit(
                "round",
                step=r.outer_step,
                applied=r.applied,
                contributors=list(r.contributors),
                weight=r.weight,
                included=r.included,
                world=r.world_size,
                digest=r.digest,
                revision=r.revision,
            )

    inner_steps = 0
    losses: list[float] = []
    samples = 0
    target = int(p["outer_steps"])
    tokens = cfg.batch * cfg.context if p.get("weighted") else None
    while diloco.outer_step < target:
        step = diloco.outer_step * period + len(losses)  # global inner step: a newcomer lines up
        t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = T.loss_fn(model, *T.batch(cfg, ids, shard, step))
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        inner_steps += 1
        samples += cfg.batch
        pause = step_s * slow + (slow - 1) * (time.perf_counter() - t_step)
        if pause > 0:
            time.sleep(pause)
        info = diloco.step(tokens=tokens)
        emit_rounds()
        if info is None:
            continue
        emit(
            "outer",
            step=info.outer_step,
            fragment=info.fragment,
            boundary_tx=info.tx_bytes,  # this boundary's all-reduce bytes (retries included)
            applied=info.applied,
            world=info.world_size,
            contributors=info.contributors,
            loss=outer_loss(),
            train_loss=sum(losses) / len(losses),
            tx=diloco.stats.tx_bytes,
            sync_tx=diloco.stats.sync_tx_bytes,
            sync_rx=info.sync_rx_bytes,
            revision=info.revision,
            retries=info.retries,
            digest=digest() if min_quorum is None else "",  # quorum: see the round events
            seconds=info.seconds,
            inner_steps=inner_steps,
            weight=info.weight,
            inner=len(losses),  # inner steps this contribution covers
            sched_epoch=None if sched is None else sched.last_epoch,
            lr=opt.param_groups[0]["lr"],
        )
        losses = []
    flushed = diloco.flush()  # delayed mode: apply the last round too (all peers do it here)
    if flushed is not None:
        emit("flushed", loss=outer_loss(), digest=digest(), sync_rx=flushed.sync_rx_bytes)
    diloco.close()
    emit_rounds()
    s = diloco.stats
    emit(
        "result",
        peer_id=comm.peer_id,
        loss=outer_loss(),
        outer_step=diloco.outer_step,
        applied=diloco.applied_steps,
        digest=digest(),
        tx=s.tx_bytes,
        rx=s.rx_bytes,
        sync_tx=s.sync_tx_bytes,
        sync_rx=s.sync_rx_bytes,
        repairs=s.repairs,
        retries=s.retries,
        inner_steps=inner_steps,
        samples=samples,
        params=diloco.numel,
        seconds=time.perf_counter() - t0,
    )
    comm.close()


# ---------------------------------------------------------------------------------- launcher


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_row(
    step: int, r: dict[str, Any], d: dict[str, str], args: argparse.Namespace, n_params: int
) -> None:
    from pccl.tools import charlm as T

    parity = "identical" if len(set(d.values())) == 1 else "MISMATCH"
    ddp = T.ddp_bytes_per_step(n_params, args.peers) * step * args.sync_every
    print(
        f"  outer {step:3d}  loss {r['loss']:.3f}  world {r['world']}  "
        f"{'applied' if r['applied'] else 'DROPPED'} ({r['c']} contrib)  "
        f"sent {_fmt_bytes(r['tx']):>9} vs DDP {_fmt_bytes(ddp):>9} "
        f"({ddp / max(r['tx'], 1):3.0f}x less)  parity: {parity} on {len(d)} peers"
        + (f"  retries {r['retries']}" if r["retries"] else "")
        + (f"  [{r['event']}]" if "event" in r else ""),
        flush=True,
    )


def launch(args: argparse.Namespace) -> int:
    """Run master + peers (+ churn), print progress, compare with fp32 DDP. Returns exit code."""
    from pccl.tools import charlm as T

    # SIGTERM unwinds (so the peers and the master are killed below) instead of orphaning them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    master, addr = spawn_master("error")
    print(
        f"pccl master on {addr}; {args.peers} peers train a char-LM with "
        f"{'async (delayed) ' if args.delayed else ''}DiLoCo, H={args.sync_every}, "
        f"{args.quantization} pseudo-gradients"
        + (", churn: one peer SIGKILLed, one newcomer" if args.churn else ""),
        flush=True,
    )
    base = {
        "outer_steps": args.outer_steps,
        "sync_every": args.sync_every,
        "delayed": args.delayed,
        "quantization": args.quantization,
        "threads": 1,
        "step_ms": args.step_ms,
    }
    procs: dict[str, subprocess.Popen[str]] = {}
    shards: dict[str, int] = {}
    sel = selectors.DefaultSelector()

    def spawn(name: str, shard: int, wait_world: int, gate: bool = False) -> None:
        params = {**base, "shard": shard, "wait_world": wait_world, "gate": gate}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pccl.tools.diloco_charlm",
                "--worker",
                addr,
                json.dumps(params),
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs[name] = proc
        shards[name] = shard
        sel.register(proc.stdout, selectors.EVENT_READ, name)  # type: ignore[arg-type]

    failures: list[str] = []
    digests: dict[int, dict[str, str]] = {}
    rows: dict[int, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    printed = 0
    active: set[str] = set()
    killed = joined = not args.churn
    n_params = T.num_params(T.TaskConfig())
    try:
        for i in range(args.peers):
            spawn(f"peer{i}", i, args.peers)
        newcomer = f"peer{args.peers}"
        if args.churn:  # started now so that it has imported torch when it is let in
            spawn(newcomer, args.peers - 1, 0, gate=True)
        deadline = time.monotonic() + 120 + args.outer_steps * args.sync_every * 0.2
        while procs and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                name = key.data
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    sel.unregister(key.fileobj)
                    rc = procs.pop(name).wait()
                    if rc not in (0, -signal.SIGKILL):
                        failures.append(f"{name} exited with {rc}")
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    print(f"  [{name}] {line.rstrip()}")
                    continue
                if ev["event"] == "joined":
                    active.add(name)
                    late = " (late joiner: outer state received, "
                    late += f"{_fmt_bytes(ev['sync_rx'])})" if ev["outer_step"] else ""
                    print(
                        f"  {name} joined as peer {ev['peer_id']} at outer step "
                        f"{ev['outer_step']}{late if ev['outer_step'] else ''}",
                        flush=True,
                    )
                elif ev["event"] == "outer":
                    step = ev["step"]
                    digests.setdefault(step, {})[name] = ev["digest"]
                    rows.setdefault(step, {}).setdefault("world", ev["world"])
                    row = rows[step]
                    row.update(loss=ev["loss"], applied=ev["applied"], c=ev["contributors"])
                    row["tx"] = max(row.get("tx", 0), ev["tx"] + ev["sync_tx"])
                    row["retries"] = max(row.get("retries", 0), ev["retries"])
                    if not killed and step >= max(2, args.outer_steps // 3):
                        victim = f"peer{args.peers - 1}"
                        print(f"  >>> SIGKILL {victim} (pid {procs[victim].pid})", flush=True)
                        procs[victim].kill()
                        active.discard(victim)
                        killed = True
                        row["event"] = f"killed {victim}"
                    if killed and not joined and step >= args.outer_steps // 2:
                        print(
                            f"  >>> {newcomer} connects (takes over shard {shards[newcomer]})",
                            flush=True,
                        )
                        procs[newcomer].send_signal(signal.SIGUSR1)
                        joined = True
                    # a row is complete when every live peer reported it (or a later one)
                    while printed + 1 in rows and (
                        len(digests[printed + 1]) >= len(active) or printed + 2 in rows
                    ):
                        printed += 1
                        _print_row(printed, rows[printed], digests[printed], args, n_params)
                elif ev["event"] == "result":
                    results[name] = ev
                elif ev["event"] == "too_late":
                    print(f"  {name} arrived after the run had ended; it leaves", flush=True)
        while printed + 1 in rows:
            printed += 1
            _print_row(printed, rows[printed], digests[printed], args, n_params)
        if procs:
            failures.append(f"peers still running at the deadline: {sorted(procs)}")
        for step, d in sorted(digests.items()):
            if len(set(d.values())) != 1:
                failures.append(f"parity violation at outer step {step}: {d}")
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(5)
        except subprocess.TimeoutExpired:
            master.kill()

    if not results:
        print("no peer finished", file=sys.stderr)
        return 1
    final = {r["digest"] for r in results.values()}
    if len(final) != 1:
        failures.append(f"final outer states differ across peers: {final}")
    res = next(iter(results.values()))
    steps = args.outer_steps * args.sync_every
    print(f"training the fp32 DDP baseline ({args.peers} shards, {steps} steps) for comparison...")
    ddp_curve = T.ddp_baseline(T.TaskConfig(), args.peers, steps)
    ddp_tx = T.ddp_bytes_per_step(n_params, args.peers) * steps
    tx = max(r["tx"] + r["sync_tx"] for r in results.values())
    print(
        f"final held-out loss: DiLoCo {res['loss']:.3f} vs fp32 DDP {ddp_curve[-1]:.3f} "
        f"({res['loss'] / ddp_curve[-1]:.2f}x)"
    )
    print(
        f"bytes sent per peer: DiLoCo {_fmt_bytes(tx)} vs fp32 DDP {_fmt_bytes(ddp_tx)} "
        f"({ddp_tx / max(tx, 1):.0f}x less); parity: {len(digests)} outer steps checked, "
        f"{'all identical' if not any('parity' in f for f in failures) else 'VIOLATED'}"
    )
    for f in failures:
        print(f"FAILURE: {f}", file=sys.stderr)
    return 1 if failures else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", type=int, default=3, help="peer processes (default 3)")
    p.add_argument("--outer-steps", type=int, default=30, help="outer steps (default 30)")
    p.add_argument("--sync-every", type=int, default=10, help="inner steps per outer step (H)")
    p.add_argument("--delayed", action="store_true", help="one-step-delayed (async) DiLoCo")
    p.add_argument("--churn", action="store_true", help="SIGKILL a peer, then add a newcomer")
    p.add_argument(
        "--step-ms", type=float, default=0.0, help="sleep per inner step (watch at human pace)"
    )
    p.add_argument(
        "--quantization",
        default="UINT8",
        choices=["NONE", "FP16", "BF16", "UINT8", "INT4", "INT2"],
        help="pseudo-gradient wire encoding (default UINT8)",
    )


def peer_from_env(argv: list[str]) -> int:
    """``--peer``: one peer of a run started by a launcher that sets PCCL_MASTER,
    PCCL_PEER_INDEX and PCCL_NUM_PEERS (local-cluster, pccl chaos --cmd)."""
    p = argparse.ArgumentParser(prog="diloco_charlm.py --peer")
    add_arguments(p)
    args = p.parse_args(argv)
    index = int(os.environ.get("PCCL_PEER_INDEX", "0"))
    n = int(os.environ.get("PCCL_NUM_PEERS", str(args.peers)))
    params = {
        "shard": index % max(n, 1),
        "outer_steps": args.outer_steps,
        "sync_every": args.sync_every,
        "delayed": args.delayed,
        "quantization": args.quantization,
        "step_ms": args.step_ms,
        "wait_world": n if index < n else 0,
        "threads": 1,
    }
    run_worker(os.environ["PCCL_MASTER"], params)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        run_worker(argv[1], json.loads(argv[2]))
        return 0
    if argv and argv[0] == "--peer":
        return peer_from_env(argv[1:])
    if argv and argv[0] == "--compare":  # streaming vs sync DiLoCo vs fp32 DDP (a table)
        from pccl.tools.diloco_compare import main as compare

        return compare(argv[1:])
    if argv and argv[0] == "--memory":  # peak RSS added by DiLoCo (64 Mi parameters)
        from pccl.tools.diloco_memory import main as memory

        return memory(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.peers < 2 or args.outer_steps < 2 or args.sync_every < 1:
        p.error("need --peers >= 2, --outer-steps >= 2, --sync-every >= 1")
    if args.churn and args.peers < 3:
        p.error("--churn needs --peers >= 3 (two survivors keep all-reducing)")
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
