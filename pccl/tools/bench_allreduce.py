"""``pccl bench allreduce``: pccl's ring all-reduce against torch.distributed gloo, on loopback.

The launcher (the process running the CLI) starts the real master daemon and N peer processes
(``python -m pccl.tools.bench_allreduce --worker PARAMS``). Each peer joins the run,
preallocates its buffers and fills them deterministically, then runs ``warmup`` untimed and
``repeats`` timed all-reduces. A 1-element all-reduce on its own tag acts as a barrier before
every operation; each peer times only the big operation. An iteration takes the slowest peer's
time, and the report gives the median over iterations (and min/max). Every peer hashes its
result (XXH3-128) after every iteration, and ``parity`` says whether all peers held identical
bytes every time.

``--compare gloo`` then runs ``torch.distributed.all_reduce(SUM)`` on float32 buffers of the same
size in N processes (``--gloo-worker``), the method of reference/machine-measurements.md §4: TCP
rendezvous on loopback, ``GLOO_SOCKET_IFNAME=lo``, one torch thread, a barrier before each op,
max over ranks, median of ``repeats``. Gloo always reduces float32, also when pccl quantizes.

``--compare floor`` (or ``gloo,floor``) measures the raw transport floor in the same
invocation (``--floor-worker``): N processes in a ring of plain TCP connections on loopback
(default socket options, one connection per link), each ``sendall``-ing the bytes a ring
all-reduce moves per peer (``2 (N-1)/N`` of the buffer) in 4 MiB slices to its successor
from one thread while ``recv_into``-ing as many from its predecessor into one 4 MiB buffer;
no arithmetic, no framing. It is deliberately not pccl's transport, so it cannot move with
pccl's tuning: ``floor_ratio`` (pccl / floor) says how far pccl is from moving bytes alone.
A two-lap token round the ring acts as the barrier before each operation.

``--wan-delay-ms`` puts a delay proxy (:mod:`pccl.tools.wanproxy`, one process per peer) in front of
every peer's p2p listener: the peer listens on a fixed ``p2p_port`` and advertises the proxy's
port, so its ring predecessor dials through the proxy. Master traffic is not proxied.

``--mib`` and ``--streams`` take comma lists: the benchmark then runs every (size, streams)
configuration in turn (gloo once per size: it has no streams) and the JSON document is
``{"runs": [one document per configuration]}``. ``--plot FILE.png`` draws throughput against
size (and against streams when they vary) from those documents (:mod:`pccl.tools.plots`).

Progress goes to stderr (a bar over configurations and repetitions on a terminal); the JSON
result to stdout and ``--json FILE``. Every wait has a
deadline (``--timeout``), and every child is killed on every exit path: each runs in its own
session, dies with the launcher (parent-death signal and stdin EOF), and is SIGKILLed in
``finally``. Children talk to the launcher with one JSON object per stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pccl import progress
from pccl._doc import plain
from pccl.tools import machine
from pccl.tools.proc import PREEXEC as _PREEXEC

if TYPE_CHECKING:
    from pccl.config import Config

__all__ = ["add_arguments", "main", "run"]

MASTER_START_TIMEOUT_S = 30.0
JOIN_TIMEOUT_S = 120.0
#: Elements in one period of the deterministic input pattern (prime, so periods of different
#: peers never line up with chunk boundaries).
PATTERN = 65521
#: Largest world for which :func:`_pattern` sums are exact in every supported type.
EXACT_PEERS = 16
_DTYPES = ("float32", "float64", "float16", "bfloat16")
_QUANTS = ("none", "fp16", "bf16", "uint8", "int4", "int2")


# ================================================================================== CLI


def add_arguments(bsub: argparse._SubParsersAction) -> None:
    """Add the ``allreduce`` sub-command to the ``pccl bench`` sub-parsers."""
    p = bsub.add_parser(
        "allreduce",
        help="pccl ring all-reduce on loopback (optionally against torch gloo)",
        description=plain(__doc__.splitlines()[0]) if __doc__ else None,
    )
    p.add_argument("--peers", type=int, default=4, help="peer processes (default 4)")
    p.add_argument(
        "--mib",
        type=_float_list,
        default=[256.0],
        help="buffer size in MiB, or a comma list to sweep (default 256)",
    )
    p.add_argument(
        "--streams",
        type=_int_list,
        default=[4],
        help="TCP streams per ring link, or a comma list to sweep (default 4)",
    )
    p.add_argument("--quantization", choices=_QUANTS, default="none", help="pccl wire encoding")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="pccl element type")
    p.add_argument(
        "--compare",
        type=_compare_list,
        default=(),
        help="also run torch.distributed gloo, the raw TCP ring floor, and/or pccl with its "
        "same-host shared-memory links off (tcp): a comma list, e.g. gloo,floor,tcp",
    )
    p.add_argument("--repeats", type=int, default=7, help="timed operations (>= 5, default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed operations first (default 2)")
    p.add_argument("--in-place", action="store_true", help="pccl all-reduces in place")
    p.add_argument("--wan-delay-ms", type=float, help="emulate a WAN: one-way delay per link")
    p.add_argument("--wan-cap-mib", type=float, default=4.0, help="WAN in-flight cap per stream")
    p.add_argument(
        "--testbed",
        metavar="FAST,SLOW,SEED",
        help="run the pccl peers on the WAN testbed (root; pccl.tools.wantestbed): a namespace "
        "per peer, a tc tbf link per pair, seeded rates with a planted fast ring, e.g. "
        "200mbit,20mbit,1",
    )
    p.add_argument(
        "--optimize", action="store_true", help="pccl: optimize_topology() before timing"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="deadline of each half, seconds")
    p.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw throughput vs size/streams here (pccl[plot])"
    )
    p.set_defaults(func=_cmd)


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or comma list: {text!r}") from None


def _compare_list(text: str) -> tuple[str, ...]:
    got = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in got if x not in ("gloo", "floor", "tcp")]
    if bad or not got:
        raise argparse.ArgumentTypeError(
            f"--compare takes a comma list of gloo, floor and tcp: {text!r}"
        )
    return got


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or comma list: {text!r}") from None


def _cmd(args: argparse.Namespace) -> int:
    problems = []
    if args.peers < 2:
        problems.append("--peers must be >= 2")
    if not args.mib or not all(m > 0 for m in args.mib):
        problems.append("--mib must be > 0")
    if not args.streams or not all(1 <= s <= 64 for s in args.streams):
        problems.append("--streams must be within 1..64")
    if args.repeats < 5:
        problems.append("--repeats must be >= 5")
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    if args.quantization != "none" and args.dtype != "float32":
        problems.append("--quantization needs --dtype float32")
    if args.wan_delay_ms is not None and not args.wan_delay_ms >= 0:
        problems.append("--wan-delay-ms must be >= 0")
    if not args.wan_cap_mib > 0:
        problems.append("--wan-cap-mib must be > 0")
    if args.testbed is not None:
        if args.wan_delay_ms is not None:
            problems.append("--testbed and --wan-delay-ms exclude each other")
        if len(args.testbed.split(",")) != 3 or not args.testbed.split(",")[2].isdigit():
            problems.append("--testbed is FAST,SLOW,SEED (e.g. 200mbit,20mbit,1)")
        if not 2 <= args.peers <= 16:
            problems.append("--testbed takes 2 to 16 peers")
    if not args.timeout > 0:
        problems.append("--timeout must be > 0")
    if "gloo" in args.compare and not _have("torch"):
        problems.append("--compare gloo needs torch: pip install 'pccl[torch]'")
    if args.dtype == "bfloat16" and not _have("ml_dtypes"):
        problems.append("--dtype bfloat16 needs ml_dtypes: pip install ml_dtypes")
    if args.plot and not _have("matplotlib"):
        problems.append("--plot needs matplotlib: pip install 'pccl[plot]'")
    if problems:
        for msg in problems:
            print(f"pccl bench allreduce: {msg}", file=sys.stderr)
        return 2
    configs = [(mib, streams) for mib in args.mib for streams in args.streams]
    total = len(configs) * (args.warmup + args.repeats)
    total += len(args.mib) * (args.warmup + args.repeats) * len(args.compare)
    docs: list[dict[str, Any]] = []
    refs_of: dict[float, dict[str, Any]] = {}
    try:
        with progress.bar(total, "bench allreduce", unit="op") as pbar:
            for mib, streams in configs:
                one = argparse.Namespace(**{**vars(args), "mib": mib, "streams": streams})
                if mib in refs_of:  # gloo and the floor have no streams: once per size
                    one.compare = ()
                doc = run(one, pbar)
                if mib in refs_of:
                    doc = _with_refs(doc, refs_of[mib])
                else:
                    refs_of[mib] = {k: doc[k] for k in ("gloo", "floor", "pccl_tcp")}
                docs.append(doc)
    except BenchError as e:
        print(f"pccl bench allreduce: FAILED: {e}", file=sys.stderr)
        return 1
    result: dict[str, Any] = docs[0] if len(docs) == 1 else {"runs": docs}
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    if args.plot:
        from pccl.tools.plots import plot_bench

        plot_bench(docs, args.plot)
        _log(f"plot: {args.plot}")
    ok = all(d["pccl"]["parity"] and d["pccl"]["exact"] is not False for d in docs)
    return 0 if ok else 1


def _with_refs(doc: dict[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (a run without references) with gloo and the floor measured for its size
    earlier in the same invocation."""
    out = {**doc, **refs, "config": {**doc["config"], "references_reused": True}}
    return {**out, **_ratios(out["pccl"], out["gloo"], out["floor"], out["pccl_tcp"])}


def _ratios(
    pccl_res: dict[str, Any],
    gloo: dict[str, Any] | None,
    floor: dict[str, Any] | None,
    tcp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``speedup`` (gloo / pccl, > 1: pccl faster) and ``floor_ratio`` (pccl / floor, >= 1:
    how far pccl is from moving the bytes alone), from the medians; ``tcp_floor_ratio`` and
    ``tcp_speedup`` the same for pccl with its shared-memory links off (``--compare tcp``)."""
    return {
        "speedup": gloo["seconds"] / pccl_res["seconds"] if gloo else None,
        "floor_ratio": pccl_res["seconds"] / floor["seconds"] if floor else None,
        "tcp_speedup": gloo["seconds"] / tcp["seconds"] if gloo and tcp else None,
        "tcp_floor_ratio": tcp["seconds"] / floor["seconds"] if floor and tcp else None,
    }


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class BenchError(RuntimeError):
    """The benchmark could not complete (a child failed, a deadline passed)."""


def _log(msg: str) -> None:
    with progress.printing():
        print(msg, file=sys.stderr, flush=True)


# ================================================================================== launcher


def run(args: argparse.Namespace, pbar: Any = None) -> dict[str, Any]:
    """Run the benchmark described by parsed ``args`` (one size, one streams count); return the
    result document. ``pbar`` (a :func:`pccl.progress.bar`) counts every finished operation.

    Raises:
        BenchError: a child failed or a deadline passed (every child is killed first).
    """
    import pccl
    from pccl.config import Config
    from pccl.peer.p2p import streams_for

    nbytes = int(args.mib * (1 << 20))
    itemsize = 2 if args.dtype in ("float16", "bfloat16") else 8 if args.dtype == "float64" else 4
    n = nbytes // itemsize
    if n < args.peers:
        raise BenchError(f"{args.mib} MiB of {args.dtype} is fewer elements than peers")
    nbytes = n * itemsize
    cfg = Config.from_env()
    config: dict[str, Any] = {
        "peers": args.peers,
        "mib": args.mib,
        "bytes": nbytes,
        "elements": n,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "streams": args.streams,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "in_place": args.in_place,
        "compare": args.compare,
        "wan_delay_ms": args.wan_delay_ms,
        "wan_cap_mib": args.wan_cap_mib if args.wan_delay_ms is not None else None,
        "testbed": getattr(args, "testbed", None),  # (bench matrix builds its own args)
        "optimize": getattr(args, "optimize", False),
        "chunk_bytes": cfg.chunk_bytes,
        "quant_block": cfg.quant_block,
        "socket_buffer_bytes": cfg.socket_buffer_bytes,
        "local_socket_buffer_bytes": cfg.local_socket_buffer_bytes,
        "local_streams": cfg.local_streams,
        "shm_link_bytes": _peer_config(cfg, args.wan_delay_ms is not None).shm_link_bytes,
        "streams_used": streams_for(
            "127.0.0.1", args.streams, _peer_config(cfg, args.wan_delay_ms is not None)
        ),
        "backend": pccl.BACKEND,
        "simd": machine.simd() if pccl.BACKEND == "native" else None,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "machine": machine.describe(),
        "timing": "per iteration: max over peers of the op's wall time after a barrier; "
        "reported: median over iterations",
    }
    gloo: dict[str, Any] | None = None
    floor: dict[str, Any] | None = None
    tcp: dict[str, Any] | None = None
    with _handle_sigterm(), tempfile.TemporaryDirectory(prefix="pccl-bench-") as tmp:
        tmpdir = Path(tmp)
        _log(
            f"pccl: {args.peers} peers, {args.mib:g} MiB {args.dtype}, quantization "
            f"{args.quantization}, {args.streams} streams"
            + (
                f" ({config['streams_used']} opened: loopback links, Config.local_streams)"
                if config["streams_used"] != args.streams
                else ""
            )
            + (
                f", WAN {args.wan_delay_ms:g} ms / {args.wan_cap_mib:g} MiB cap"
                if args.wan_delay_ms is not None
                else ""
            )
        )
        with _Fleet(tmpdir) as fleet:
            pccl_res = _run_pccl(args, n, nbytes, fleet, pbar)
        if "gloo" in args.compare:
            config["torch"] = importlib.metadata.version("torch")
            _log(f"gloo: {args.peers} ranks, {args.mib:g} MiB float32")
            with _Fleet(tmpdir) as fleet:
                gloo = _run_gloo(args, nbytes // 4, fleet, pbar)
        if "floor" in args.compare:
            _log(f"floor: {args.peers} processes, plain TCP ring, {args.mib:g} MiB")
            with _Fleet(tmpdir) as fleet:
                floor = _run_floor(args, nbytes, fleet, pbar)
        if "tcp" in args.compare:
            _log("pccl over TCP only: the same run with Config.shm_link_bytes = 0")
            with _Fleet(tmpdir) as fleet:
                tcp = _run_pccl(args, n, nbytes, fleet, pbar, shm=False)
    ratios = _ratios(pccl_res, gloo, floor, tcp)
    if ratios["speedup"] is not None:
        _log(f"speedup (gloo / pccl median): {ratios['speedup']:.2f}x")
    if ratios["floor_ratio"] is not None:
        _log(f"floor ratio (pccl / floor median): {ratios['floor_ratio']:.2f}x")
    if ratios["tcp_floor_ratio"] is not None:
        _log(f"floor ratio of pccl over TCP only: {ratios['tcp_floor_ratio']:.2f}x")
    return {
        "pccl": pccl_res,
        "gloo": gloo,
        "floor": floor,
        "pccl_tcp": tcp,
        **ratios,
        "config": config,
    }


@contextlib.contextmanager
def _handle_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so ``finally`` blocks kill the children."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    buf: bytes = b""
    events: list[dict[str, Any]] = field(default_factory=list)
    eof: bool = False

    def tail(self, limit: int = 4000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return "<no log>"
        return data[-limit:].decode("utf-8", "replace")


class _Fleet:
    """Child processes of one half of the benchmark; all are killed when the block exits."""

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = tmpdir
        self.children: list[_Child] = []
        self.proxies: list[Any] = []
        self.testbed: Any = None  # a pccl.tools.wantestbed.Testbed the pccl half runs on
        self.sel = selectors.DefaultSelector()

    def __enter__(self) -> _Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, events: bool = True
    ) -> _Child:
        """Start ``cmd``; with ``events``, its stdout lines feed :meth:`events`."""
        log = self.tmpdir / f"{name}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,  # never written: EOF tells the child the launcher is gone
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        child = _Child(name, proc, log)
        self.children.append(child)
        assert proc.stdout is not None
        if events:
            os.set_blocking(proc.stdout.fileno(), False)
            self.sel.register(proc.stdout, selectors.EVENT_READ, child)
        return child

    def events(self, deadline: float, what: str) -> Iterator[tuple[_Child, dict[str, Any]]]:
        """Yield ``(child, event)`` as children print them, until the caller stops.

        Raises:
            BenchError: the deadline passed, a child reported an error, or exited early.
        """
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out waiting for {what}\n{self.report()}")
            for key, _ in self.sel.select(timeout=min(left, 1.0)):
                child: _Child = key.data
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    self.sel.unregister(key.fileobj)
                    child.eof = True
                    if any(ev.get("event") == "result" for ev in child.events):
                        continue  # done; wait_exit() checks its exit code
                    rc = child.proc.wait(10)
                    raise BenchError(
                        f"{child.name} exited (rc={rc}) while waiting for {what}\n" + self.report()
                    )
                child.buf += chunk
                *lines, child.buf = child.buf.split(b"\n")
                for raw in lines:
                    if not raw.strip():
                        continue
                    try:
                        ev = json.loads(raw)
                    except ValueError:
                        ev = {"event": "text", "line": raw.decode("utf-8", "replace")}
                    if ev.get("event") == "error":
                        raise BenchError(
                            f"{child.name} failed: {ev.get('type')}: {ev.get('message')}\n"
                            f"{ev.get('traceback', '')}\n{self.report()}"
                        )
                    child.events.append(ev)
                    yield child, ev

    def report(self) -> str:
        parts = []
        for c in self.children:
            parts.append(f"--- {c.name} (pid {c.proc.pid}, rc {c.proc.poll()}):\n{c.tail()}")
        return "\n".join(parts)

    def wait_exit(self, names: list[str], deadline: float) -> None:
        """Wait until the named children exit; raise unless each exits with 0."""
        for c in self.children:
            if c.name not in names:
                continue
            try:
                rc = c.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise BenchError(f"{c.name} did not exit\n{self.report()}") from None
            if rc != 0:
                raise BenchError(f"{c.name} exited with rc={rc}\n{self.report()}")

    def kill_all(self) -> None:
        if self.testbed is not None:
            self.testbed.down()  # kills every process inside its namespaces
            self.testbed = None
        for p in self.proxies:
            p.stop(grace_s=0.0)
        self.proxies.clear()
        for c in self.children:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
        for c in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(10)
            for f in (c.proc.stdin, c.proc.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        self.sel.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_master(fleet: _Fleet, host: str = "127.0.0.1") -> int:
    from pccl.tools.proc import master_banner

    cmd = [sys.executable, "-m", "pccl.cli", "master", "--host", host, "--port", "0"]
    cmd = [*cmd, "--log-level", "warning"]
    if fleet.testbed is not None:
        cmd = fleet.testbed.cluster.exec_argv("m", cmd)
    child = fleet.spawn("master", cmd, events=False)
    try:
        addr = master_banner(child.proc, host, MASTER_START_TIMEOUT_S)[0]
    except RuntimeError as e:
        raise BenchError(f"the master did not start: {e}\n{child.tail()}") from None
    return int(addr.rpartition(":")[2])


def _summary(times: list[float], nbytes: int, world: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "seconds": med,
        "busbw_gbps": _busbw(nbytes, world, med),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }


def _busbw(nbytes: int, world: int, seconds: float) -> float:
    return 2 * (world - 1) / world * nbytes / seconds / 1e9


def _collect(
    fleet: _Fleet,
    names: list[str],
    total: int,
    label: str,
    nbytes: int,
    world: int,
    warmup: int,
    deadline: float,
    pbar: Any = None,
) -> dict[str, dict[str, Any]]:
    """Print per-iteration progress (and advance ``pbar``); return each worker's result event."""
    results: dict[str, dict[str, Any]] = {}
    per_iter: dict[int, dict[str, float]] = {}
    for child, ev in fleet.events(deadline, f"{label} results"):
        kind = ev.get("event")
        if kind == "joined" and child.name == names[0]:
            _log(f"  {label}: all {world} peers joined")
        elif kind == "iter":
            it = int(ev["i"])
            row = per_iter.setdefault(it, {})
            row[child.name] = float(ev["seconds"])
            if len(row) == len(names):
                t = max(row.values())
                kind_s = "warmup" if it < warmup else f"iter {it - warmup + 1}/{total - warmup}"
                _log(
                    f"  {label} {kind_s:>11}: {t:8.4f} s  busbw {_busbw(nbytes, world, t):6.3f}"
                    " GB/s"
                )
                del per_iter[it]
                if pbar is not None:
                    pbar.update(1)
        elif kind == "result":
            results[child.name] = ev
            if len(results) == len(names):
                return results
    raise AssertionError("unreachable")  # pragma: no cover


def _run_pccl(
    args: argparse.Namespace,
    n: int,
    nbytes: int,
    fleet: _Fleet,
    pbar: Any = None,
    shm: bool = True,
) -> dict[str, Any]:
    from pccl.tools import wanproxy

    deadline = time.monotonic() + args.timeout
    host = "127.0.0.1"
    if getattr(args, "testbed", None):
        from pccl.tools import testbed

        fast, slow, seed = args.testbed.split(",")
        rates = testbed.planted_rates(args.peers, fast, slow, int(seed))
        fleet.testbed = testbed.Testbed(args.peers, rates).up()
        host = fleet.testbed.ip("m")
        _log(f"  testbed: {args.peers} namespaces, pair links {fast}/{slow} (seed {seed})")
    port = _start_master(fleet, host)
    _log(f"  master on {host}:{port}")
    names = [f"peer{i}" for i in range(args.peers)]
    for i, name in enumerate(names):
        p2p_port = advertise_port = 0
        if args.wan_delay_ms is not None:
            p2p_port = _free_port()
            log = (fleet.tmpdir / f"proxy{i}.log").open("wb")
            try:
                px = wanproxy.spawn(
                    f"127.0.0.1:{p2p_port}",
                    args.wan_delay_ms,
                    args.wan_cap_mib,
                    stderr=log.fileno(),
                    preexec_fn=_PREEXEC,
                )
            finally:
                log.close()
            fleet.proxies.append(px)
            advertise_port = px.port
        params = {
            "master": f"{host}:{port}",
            "idx": i,
            "world": args.peers,
            "n": n,
            "dtype": args.dtype,
            "quantization": args.quantization,
            "streams": args.streams,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "in_place": args.in_place,
            "p2p_port": p2p_port,
            "advertise_port": advertise_port,
            "wan": args.wan_delay_ms is not None,
            "optimize": getattr(args, "optimize", False),
            "shm": shm,
        }
        cmd = [sys.executable, "-m", "pccl.tools.bench_allreduce", "--worker", json.dumps(params)]
        if fleet.testbed is not None:
            cmd = fleet.testbed.cluster.exec_argv(f"p{i}", cmd)
        fleet.spawn(name, cmd)
    total = args.warmup + args.repeats
    res = _collect(fleet, names, total, "pccl", nbytes, args.peers, args.warmup, deadline, pbar)
    fleet.wait_exit(names, deadline + 30)
    rows = [res[name] for name in names]
    times = [max(r["times"][i] for r in rows) for i in range(args.warmup, total)]
    hashes = [r["hashes"] for r in rows]
    parity = all(h == hashes[0] for h in hashes)
    out = _summary(times, nbytes, args.peers)
    out.update(
        parity=parity,
        hash=hashes[0][-1],
        exact=all(r["exact"] for r in rows) if rows[0]["exact"] is not None else None,
        max_abs_err=max(r["max_abs_err"] for r in rows),
        tx_bytes=max(r["tx_bytes"] for r in rows),
        rx_bytes=max(r["rx_bytes"] for r in rows),
        info_seconds=statistics.median(
            max(r["info_seconds"][i] for r in rows) for i in range(args.warmup, total)
        ),
        cpu_s_per_op=[r["cpu_s_per_op"] for r in rows],
        # ring streams each peer received through a same-host shared-memory segment
        shm_links=[r.get("shm_links", 0) for r in rows],
        peer_ids=[r["peer_id"] for r in rows],
    )
    _log(
        f"pccl: median {out['seconds']:.4f} s (min {out['min_s']:.4f}, max {out['max_s']:.4f}), "
        f"busbw {out['busbw_gbps']:.3f} GB/s, parity {parity}, exact {out['exact']}"
    )
    if not parity:
        _log("pccl: PARITY VIOLATION: peers hold different bytes")
    return out


def _run_ranks(
    args: argparse.Namespace,
    fleet: _Fleet,
    label: str,
    params: list[dict[str, Any]],
    nbytes: int,
    pbar: Any,
    env: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one reference worker (``--<label>-worker``) per entry of ``params``; return their
    result events and the summary (per iteration the slowest rank, median over iterations)."""
    deadline = time.monotonic() + args.timeout
    names = [f"{label}{i}" for i in range(len(params))]
    for name, p in zip(names, params, strict=True):
        argv = [sys.executable, "-m", "pccl.tools.bench_allreduce", f"--{label}-worker"]
        fleet.spawn(name, [*argv, json.dumps(p)], env=env)
    total = args.warmup + args.repeats
    res = _collect(fleet, names, total, label, nbytes, args.peers, args.warmup, deadline, pbar)
    fleet.wait_exit(names, deadline + 30)
    rows = [res[name] for name in names]
    times = [max(r["times"][i] for r in rows) for i in range(args.warmup, total)]
    out = _summary(times, nbytes, args.peers)
    out["cpu_s_per_op"] = [r["cpu_s_per_op"] for r in rows]
    return rows, out


def _log_half(label: str, out: dict[str, Any]) -> None:
    _log(
        f"{label}: median {out['seconds']:.4f} s (min {out['min_s']:.4f}, "
        f"max {out['max_s']:.4f}), busbw {out['busbw_gbps']:.3f} GB/s"
    )


def _run_gloo(args: argparse.Namespace, n: int, fleet: _Fleet, pbar: Any = None) -> dict[str, Any]:
    port = _free_port()
    common = {"init": f"tcp://127.0.0.1:{port}", "world": args.peers, "n": n}
    common.update(warmup=args.warmup, repeats=args.repeats, timeout=args.timeout)
    params = [{**common, "rank": i} for i in range(args.peers)]
    env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    rows, out = _run_ranks(args, fleet, "gloo", params, n * 4, pbar, env)
    hashes = [r["hashes"] for r in rows]
    out.update(
        parity=all(h == hashes[0] for h in hashes),
        exact=all(r["exact"] for r in rows),
        rank0_seconds=statistics.median(rows[0]["times"][args.warmup :]),
    )
    _log_half("gloo", out)
    return out


def _run_floor(
    args: argparse.Namespace, nbytes: int, fleet: _Fleet, pbar: Any = None
) -> dict[str, Any]:
    ports = [_free_port() for _ in range(args.peers)]
    common = {"world": args.peers, "nbytes": nbytes, "ports": ports}
    common.update(warmup=args.warmup, repeats=args.repeats, timeout=args.timeout)
    params = [{**common, "rank": i} for i in range(args.peers)]
    rows, out = _run_ranks(args, fleet, "floor", params, nbytes, pbar)
    out.update(bytes_per_peer=rows[0]["bytes_per_op"], slice_bytes=FLOOR_SLICE)
    _log_half("floor", out)
    return out


# ================================================================================== workers


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _watch_stdin() -> None:
    """Exit at once when the launcher goes away (our stdin is its never-written pipe)."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(3)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _pattern(idx: int, dtype: Any) -> Any:
    """One period of peer ``idx``'s input: multiples of 0.5 in [-62.5, 62.5] (bfloat16: integers
    in [-7, 7]).

    Every partial sum over up to :data:`EXACT_PEERS` peers is representable in the element type,
    so the result is exact in any summation order and known in advance.
    """
    import numpy as np

    k = np.arange(PATTERN, dtype=np.int64)
    mixed = k * 7919 + idx * 104729
    if np.dtype(dtype).name == "bfloat16":  # 8 significant bits: 7 * 36 < 2**8
        vals = (mixed % 15 - 7).astype(np.float64)
    else:  # float16 has 11 significant bits: 125 half-units * 16 peers < 2**11
        vals = (mixed % 251 - 125).astype(np.float64) * 0.5
    return vals.astype(dtype)


def _fill(buf: Any, pat: Any) -> None:
    n, period = buf.size, pat.size
    for off in range(0, n, period):
        m = min(period, n - off)
        buf[off : off + m] = pat[:m]


def _check(out: Any, expected: Any) -> tuple[bool, float]:
    """(bit-exact, max abs error) of ``out`` against the periodic ``expected``."""
    import numpy as np

    period = expected.size
    n = out.size
    full = n // period * period
    exp64 = expected.astype(np.float64)
    err = 0.0
    exact = True
    if full:
        body = out[:full].reshape(-1, period)
        exact = bool(np.array_equal(body, np.broadcast_to(expected, body.shape)))
        for row in range(0, body.shape[0], 64):  # bounded temporaries
            d = np.abs(body[row : row + 64].astype(np.float64) - exp64)
            err = max(err, float(d.max()))
    if n > full:
        tail = out[full:]
        exact = exact and bool(np.array_equal(tail, expected[: n - full]))
        err = max(err, float(np.abs(tail.astype(np.float64) - exp64[: n - full]).max()))
    return exact, err


def _np_dtype(name: str) -> Any:
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _peer_config(cfg: Config, wan: bool) -> Config:
    """The peers' config. With WAN emulation the delay proxies sit on loopback but stand for
    remote hosts: use the network settings (every stream, large buffers, no shared-memory
    links, which would carry the payloads past the proxies), not the loopback ones."""
    if wan:
        return cfg.replace(local_streams=0, local_socket_buffer_bytes=0, shm_link_bytes=0)
    return cfg


def _worker(params: dict[str, Any]) -> None:
    import numpy as np
    import xxhash

    import pccl

    _watch_stdin()
    idx, world, n = params["idx"], params["world"], params["n"]
    dtype = _np_dtype(params["dtype"])
    quant = pccl.Quantization[params["quantization"].upper()]
    config = _peer_config(pccl.Config.from_env(), params["wan"])
    if not params.get("shm", True):
        config = config.replace(shm_link_bytes=0)
    comm = pccl.Communicator(
        params["master"],
        streams=params["streams"],
        p2p_port=params["p2p_port"],
        advertise_port=params["advertise_port"],
        config=config,
    )
    comm.connect(timeout=JOIN_TIMEOUT_S)
    comm.wait_for_world(world, timeout=JOIN_TIMEOUT_S)
    if comm.world_size != world:
        raise RuntimeError(f"world size {comm.world_size}, expected {world}")
    _emit("joined", peer_id=comm.peer_id)
    if params.get("optimize"):
        comm.optimize_topology(timeout=JOIN_TIMEOUT_S)

    send = np.empty(n, dtype=dtype)
    recv = send if params["in_place"] else np.empty(n, dtype=dtype)
    pat = _pattern(idx, dtype)
    if recv is not send:
        recv.fill(0)  # touch every page before timing
    _fill(send, pat)
    expected = np.sum([_pattern(j, np.float64) for j in range(world)], axis=0).astype(dtype)
    bar = np.zeros(1, dtype=np.float32)
    times: list[float] = []
    info_s: list[float] = []
    hashes: list[str] = []
    cpu = 0.0
    tx = rx = 0
    total = params["warmup"] + params["repeats"]
    for i in range(total):
        if params["in_place"] and i:
            _fill(send, pat)
        comm.all_reduce(bar, tag=1)  # barrier
        c0 = time.process_time()  # all threads: the peer's event loop does the work
        t0 = time.perf_counter()
        info = comm.all_reduce(send, None if params["in_place"] else recv, quantization=quant)
        dt = time.perf_counter() - t0
        if i >= params["warmup"]:
            cpu += time.process_time() - c0
        times.append(dt)
        info_s.append(info.seconds)
        tx, rx = info.tx_bytes, info.rx_bytes
        hashes.append(xxhash.xxh3_128_hexdigest(recv.view(np.uint8).data))
        _emit("iter", i=i, seconds=dt)
    bit_exact, err = _check(recv, expected)
    # Quantized results are approximations; beyond EXACT_PEERS the reference is not exact.
    exact_out = bit_exact if quant == pccl.Quantization.NONE and world <= EXACT_PEERS else None
    _emit(
        "result",
        peer_id=comm.peer_id,
        times=times,
        info_seconds=info_s,
        hashes=hashes,
        tx_bytes=tx,
        rx_bytes=rx,
        exact=exact_out,
        max_abs_err=err,
        cpu_s_per_op=cpu / params["repeats"],
        shm_links=int(comm.metrics().get("p2p_shm_links", 0)),
    )
    comm.close()


def _gloo_worker(params: dict[str, Any]) -> None:
    import datetime

    import numpy as np
    import torch
    import torch.distributed as dist
    import xxhash

    _watch_stdin()
    if not (dist.is_available() and dist.is_gloo_available()):
        raise RuntimeError(f"this torch build ({torch.__version__}) has no gloo backend")
    torch.set_num_threads(1)
    rank, world, n = params["rank"], params["world"], params["n"]
    dist.init_process_group(
        "gloo",
        init_method=params["init"],
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=params["timeout"]),
    )
    try:
        _emit("joined")
        src = np.empty(n, dtype=np.float32)
        _fill(src, _pattern(rank, np.float32))
        work_np = np.empty_like(src)
        work = torch.from_numpy(work_np)
        expected = np.sum([_pattern(j, np.float64) for j in range(world)], axis=0)
        times: list[float] = []
        hashes: list[str] = []
        cpu = 0.0
        for i in range(params["warmup"] + params["repeats"]):
            np.copyto(work_np, src)  # gloo reduces in place: restore the input, untimed
            dist.barrier()
            c0 = time.process_time()
            t0 = time.perf_counter()
            dist.all_reduce(work, op=dist.ReduceOp.SUM)
            dt = time.perf_counter() - t0
            if i >= params["warmup"]:
                cpu += time.process_time() - c0
            times.append(dt)
            hashes.append(xxhash.xxh3_128_hexdigest(work_np.view(np.uint8).data))
            _emit("iter", i=i, seconds=dt)
        exact, _ = _check(work_np, expected.astype(np.float32))
        _emit(
            "result",
            times=times,
            hashes=hashes,
            exact=exact,
            cpu_s_per_op=cpu / params["repeats"],
        )
    finally:
        dist.destroy_process_group()


#: Send and receive slice of the floor's plain ring.
FLOOR_SLICE = 4 << 20


def _floor_worker(params: dict[str, Any]) -> None:
    """One process of the plain TCP ring (see the module docstring)."""
    _watch_stdin()
    rank, world, ports = params["rank"], params["world"], params["ports"]
    deadline = time.monotonic() + params["timeout"]
    srv = socket.create_server(("127.0.0.1", ports[rank]))
    srv.settimeout(max(1.0, deadline - time.monotonic()))
    nxt: socket.socket | None = None
    while nxt is None:
        try:
            nxt = socket.create_connection(("127.0.0.1", ports[(rank + 1) % world]), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    prv, _ = srv.accept()
    srv.close()
    for s in (nxt, prv):
        s.settimeout(max(1.0, deadline - time.monotonic()))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _emit("joined")
    total = 2 * (world - 1) * params["nbytes"] // world
    src = bytearray(os.urandom(1 << 16)) * (FLOOR_SLICE >> 16)  # one slice, sent again and again
    dst = bytearray(FLOOR_SLICE)
    view, dview = memoryview(src), memoryview(dst)

    def barrier() -> None:
        # Two laps of a one-byte token: after the second every process has passed the first.
        for _ in range(2):
            if rank == 0:
                nxt.sendall(b"t")
                if prv.recv(1) != b"t":
                    raise RuntimeError("barrier token lost")
            else:
                if prv.recv(1) != b"t":
                    raise RuntimeError("barrier token lost")
                nxt.sendall(b"t")

    def send_all() -> None:
        left = total
        while left:
            k = min(left, FLOOR_SLICE)
            nxt.sendall(view[:k])
            left -= k

    times: list[float] = []
    cpu = 0.0
    for i in range(params["warmup"] + params["repeats"]):
        barrier()
        c0 = time.process_time()
        t0 = time.perf_counter()
        sender = threading.Thread(target=send_all)
        sender.start()
        got = 0
        while got < total:
            k = prv.recv_into(dview[: min(FLOOR_SLICE, total - got)])
            if k == 0:
                raise ConnectionError("predecessor closed the floor ring")
            got += k
        sender.join()
        dt = time.perf_counter() - t0
        if i >= params["warmup"]:
            cpu += time.process_time() - c0
        times.append(dt)
        _emit("iter", i=i, seconds=dt)
    _emit("result", times=times, bytes_per_op=total, cpu_s_per_op=cpu / params["repeats"])
    nxt.close()
    prv.close()


def _run_worker(fn: Callable[[dict[str, Any]], None], raw: str) -> int:
    try:
        fn(json.loads(raw))
    except BaseException as e:
        _emit("error", type=type(e).__name__, message=str(e), traceback=traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)  # an open communicator must not keep a failed worker alive
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pccl.tools.bench_allreduce``: a worker (``--worker``/``--gloo-worker
    PARAMS``), or the same as ``pccl bench allreduce ARGS``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        return _run_worker(_worker, argv[1])
    if len(argv) == 2 and argv[0] == "--gloo-worker":
        return _run_worker(_gloo_worker, argv[1])
    if len(argv) == 2 and argv[0] == "--floor-worker":
        return _run_worker(_floor_worker, argv[1])
    from pccl.tools.proc import run_subcommand

    return run_subcommand(add_arguments, "allreduce", argv)


if __name__ == "__main__":
    sys.exit(main())
