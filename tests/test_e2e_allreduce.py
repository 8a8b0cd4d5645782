"""End-to-end all-reduce: the real ``pccl master`` and real peer processes on loopback.

Each peer process runs a whole matrix of cases over one connection (``tests/workers/matrix.py``)
and reports, per case, the digest of its result bytes, the elements outside the error bound
against a float64 / exact-integer reference (derivation in ``matrix.bound``), whether ``send``
is intact, and ``ReduceInfo``. Here we require byte-identical results across peers, zero bound
violations, sane ``ReduceInfo`` and full coverage of the matrix. API contract checks that need
a live run (too few peers, bad arguments, concurrent and duplicate tags) follow.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

SIZES = [0, 1, 2, 3, 1025, 100003]
FLOAT_DTYPES = ["float32", "float64", "float16", "bfloat16", "torch_float32"]
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8"]
OPS = ["SUM", "AVG", "MIN", "MAX", "PROD"]
ITEMSIZE = {
    "float32": 4,
    "torch_float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
}

# (streams, Config kwargs) per world size: one run with the defaults (one sub-chunk per chunk),
# two with the smallest sub-chunks and small uint8 blocks so 100003 elements are pipelined over
# hundreds of frames striped across several streams (``local_streams=0``: open every stream
# even though the successor is on loopback, where the default opens one).
SETUPS = {
    2: (1, {}),
    3: (4, {"chunk_bytes": 4096, "quant_block": 256, "local_streams": 0}),
    4: (3, {"chunk_bytes": 4096, "quant_block": 256, "local_streams": 0}),
}


def expected_matrix() -> set[tuple[str, str, int, bool, str]]:
    plain = itertools.product(FLOAT_DTYPES + INT_DTYPES, OPS, SIZES, (True, False), ["NONE"])
    quant = itertools.product(
        ["float32"], OPS, SIZES, (True, False), ["FP16", "BF16", "UINT8", "INT4", "INT2"]
    )
    return set(plain) | set(quant)


def run_workers(workers, master, script: str, world: int, timeout: float, **p: Any):
    ws = [
        workers.spawn(script, master, {"world": world, "idx": i, **p}, name=f"peer{i}")
        for i in range(world)
    ]
    return ws, workers.wait_exit(ws, timeout)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_matrix_results_identical_across_peers_and_within_bounds(master, workers, world):
    streams, config = SETUPS[world]
    ws, _ = run_workers(
        workers,
        master,
        "matrix.py",
        world,
        timeout=200,
        seed=1000 + world,
        sizes=SIZES,
        streams=streams,
        config=config,
    )
    per_peer = [{ev["k"]: ev for ev in w.events if ev.get("event") == "case"} for w in ws]
    want = expected_matrix()
    for w, cases in zip(ws, per_peer):
        got = {(c["dtype"], c["op"], c["n"], c["inplace"], c["quant"]) for c in cases.values()}
        assert got == want, f"{w.name} ran {len(got)} of {len(want)} cases"
    problems: list[str] = []
    for k in sorted(per_peer[0]):
        recs = [cases[k] for cases in per_peer]
        c = recs[0]
        label = (
            f"{c['dtype']}/{c['op']}/n={c['n']}/{'inplace' if c['inplace'] else 'out'}/{c['quant']}"
        )
        if len({r["hash"] for r in recs}) != 1:
            problems.append(f"{label}: results differ across peers")
        for i, r in enumerate(recs):
            if r["violations"]:
                problems.append(
                    f"{label}: peer{i} has {r['violations']} elements outside the bound "
                    f"(worst err/bound {r['worst']:.3g}, first {r.get('first_bad')})"
                )
            if not r["send_intact"]:
                problems.append(f"{label}: peer{i} send modified by an out-of-place all-reduce")
            if r["world"] != world:
                problems.append(f"{label}: peer{i} ReduceInfo.world_size={r['world']}")
            if not r["seconds_ok"]:
                problems.append(f"{label}: peer{i} ReduceInfo.seconds not a duration")
            if c["n"] > 0 and not (r["tx"] > 0 and r["rx"] > 0):
                problems.append(f"{label}: peer{i} tx={r['tx']} rx={r['rx']} for n>0")
        tx, rx = sum(r["tx"] for r in recs), sum(r["rx"] for r in recs)
        if tx != rx:
            problems.append(f"{label}: bytes sent {tx} != bytes received {rx} over the ring")
        # Ring volume: every element crosses W-1 reduce-scatter and W-1 all-gather hops.
        wire = {"NONE": ITEMSIZE[c["dtype"]], "FP16": 2, "BF16": 2}.get(c["quant"])
        if wire is not None and tx != 2 * (world - 1) * c["n"] * wire:
            problems.append(
                f"{label}: ring sent {tx} bytes, expected {2 * (world - 1) * c['n'] * wire}"
            )
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])


@pytest.mark.timeout(60)
def test_lone_peer_all_reduce_raises_too_few_peers(master, workers):
    w = workers.spawn("api.py", master, {"mode": "too_few"})
    res = workers.wait_exit([w], 45)[w.name]
    assert res["world"] == 1
    for call in ("sync", "async_"):
        assert res[call]["raised"] == "TooFewPeers", res[call]
        assert res[call]["pccl_error"], res[call]


EXIT_WINDOW_S = 2.0  # > the 0.5 s heartbeat interval: timers and heartbeats fire in the window


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["connected", "unreachable"])
def test_process_exits_cleanly_with_a_communicator_left_open(master, workers, mode):
    """A script that never calls close() (or whose connect() failed) must exit by itself, with
    status 0: the blocking facade may neither hang at interpreter shutdown nor leave its
    event-loop thread serving sockets and timers after the interpreter is gone.

    The worker lingers after ``Py_FinalizeEx`` (a C exit handler reads stdin) for
    ``EXIT_WINDOW_S``, the way torch's static destructors make real training scripts linger;
    heartbeats from the master and the peer's own timers fire in that window. Three sequential
    lone peers: a thread that happens to be parked during finalisation is only caught later.
    """
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    for attempt in range(3):
        w = workers.spawn(
            "exit.py",
            master,
            {"mode": mode, "address": closed, "slow_exit": True},
            name=f"{mode}{attempt}",
            stdin_pipe=True,
        )
        workers.wait_event(
            lambda ww, ev, w=w: ww is w and ev.get("event") == "result", 40, "result"
        )
        try:  # the fault window: the process must survive it (no early exit, no crash)
            rc = w.proc.wait(EXIT_WINDOW_S)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc is None, (
            f"{mode}: process died with {rc} after the interpreter was finalised (a thread "
            f"still ran Python code)\n{w.stderr_tail()}"
        )
        assert w.proc.stdin is not None
        w.proc.stdin.close()  # let the exit handler return
        try:
            rc = w.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{mode}: process hung at exit\n{w.stderr_tail()}")
        assert rc == 0, w.stderr_tail()


BAD_ARG_EXPECTED = {
    "dtype_mismatch": {"TypeError"},
    "dtype_mismatch_int": {"TypeError"},
    "dtype_mismatch_torch_bf16_vs_f16": {"TypeError"},
    "size_mismatch": {"ValueError"},
    "non_contiguous_send": {"ValueError"},
    "non_contiguous_recv": {"ValueError"},
    "non_contiguous_torch": {"ValueError", "TypeError"},
    "big_endian": {"ValueError", "TypeError"},
    "read_only_recv": {"ValueError"},
    "overlapping_buffers": {"ValueError"},
    "unsupported_dtype_bool": {"TypeError"},
    "unsupported_dtype_uint16": {"TypeError"},
    "unsupported_dtype_complex": {"TypeError"},
    "not_an_array": {"TypeError"},
    "quant_on_float64": {"TypeError", "ValueError"},
    "quant_on_int32": {"TypeError", "ValueError"},
    "bad_op": {"ValueError"},
    "bad_quantization": {"ValueError"},
    "tag_negative": {"ValueError"},
    "tag_too_big": {"ValueError"},
    "tag_float": {"ValueError", "TypeError"},
    "tag_bool": {"ValueError", "TypeError"},
    "tag_str": {"ValueError", "TypeError"},
    "async_tag_negative": {"ValueError"},
    "async_size_mismatch": {"ValueError"},
}


@pytest.mark.timeout(90)
def test_bad_arguments_raise_before_any_io(master, workers):
    """Before connect() (no I/O possible) and on a live peer, every bad call raises
    ValueError/TypeError (never a pccl runtime error); afterwards a valid all-reduce on the same
    tag succeeds on both peers, so no bad call left a vote at the master."""
    _, results = run_workers(workers, master, "api.py", 2, timeout=75, mode="bad_args")
    problems = []
    for name, res in results.items():
        for phase in ("before_connect", "connected"):
            for call, want in BAD_ARG_EXPECTED.items():
                got = res[phase][call]
                # A library subclass of the builtin (e.g. a more specific error) is fine.
                if not want.intersection(got.get("mro", [])) or got["pccl_error"]:
                    problems.append(f"{name} {phase} {call}: expected {want}, got {got}")
        assert res["valid_ok"], f"{name}: valid all-reduce after bad calls gave a wrong result"
        assert res["world"] == 2
    assert len({r["hash"] for r in results.values()}) == 1
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_concurrent_tags_complete_and_duplicate_tag_is_rejected(master, workers):
    """aio API: tag 1 (float32 SUM) and tag 2 (int32 MAX) in flight together both finish with
    exact results; a second all_reduce_async on tag 1 while it runs raises ValueError, leaves its
    own buffers untouched and does not disturb tag 1; tag 1 is reusable afterwards."""
    world = 3
    _, results = run_workers(workers, master, "api.py", world, timeout=100, mode="tags", n=1 << 20)
    for name, res in results.items():
        assert res["dup"]["raised"] == "ValueError" and not res["dup"]["pccl_error"], res["dup"]
        assert res["h1_done_at_dup"] is False
        assert res["sum_ok"], f"{name}: tag 1 SUM result wrong"
        assert res["max_ok"], f"{name}: tag 2 MAX result wrong"
        assert res["sends_intact"], f"{name}: an out-of-place send buffer was modified"
        assert res["dup_buffers_untouched"], f"{name}: the rejected call wrote into its buffers"
        assert res["world"] == [world, world]
        assert res["reuse_ok"], f"{name}: reusing tag 1 after it finished failed"
    assert len({tuple(r["hashes"]) for r in results.values()}) == 1
