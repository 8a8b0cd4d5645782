"""``pccl chaos``: churn against the real master and real peer processes, judged by its report.

The 60-second run is the default-suite version of the SRE acceptance run (``--peers 6
--duration 300``): kills, SIGSTOP hangs, clean leaves, joins and master kills (restarted on the
same port with its state file) every ~2.5 s, and the report
must show every one of those faults fired, zero parity violations (all peers' shared-state
hashes equal per revision, after every step and every sync), zero stalls, steady progress and
recoveries within a few heartbeat timeouts. Separate tests prove the driver leaves no process
behind when it is terminated or killed mid-run, and the pure pieces (parity book, fault plan).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pccl.tools.chaos import FaultPlan, ParityBook


def _chaos_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pccl.tools.chaos",
        "--json",
        str(tmp_path / "chaos.json"),
        "--log-dir",
        str(tmp_path / "logs"),
        *extra,
    ]


def _processes_of(driver_pid: int) -> list[str]:
    """Command lines of live chaos workers or masters started by ``driver_pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        worker = f'"parent": {driver_pid},' in cmd
        master = f"pccl.tools.chaos master {driver_pid} " in cmd
        if worker or master:
            found.append(cmd[:160])
    return found


@pytest.mark.chaos
@pytest.mark.e2e
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "duration", [pytest.param(60, marks=pytest.mark.slow), 25], ids=["60s", "25s"]
)
def test_churn_keeps_parity_and_progress(tmp_path, duration):
    # The default run churns for 25 s (every fault kind still fires, counted); `make soak`
    # runs the 60 s soak.
    argv = _chaos_argv(tmp_path, "--peers", "4", "--duration", str(duration), "--seed", "1")
    argv += ["--interval", "2.5"]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=200)
    wall = time.monotonic() - t0
    detail = f"rc={r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    report = json.loads((tmp_path / "chaos.json").read_text())
    assert r.returncode == 0, detail
    assert report["ok"] is True, detail
    assert report["parity_violations"] == 0, report["violations"]
    assert report["stalls"] == 0, report["stall_details"]
    assert report["worker_errors"] == [] and report["wrong_results"] == [], detail
    # Counted fault injection: each kind really fired.
    for kind in ("kill", "hang", "leave", "join", "masterkill"):
        assert report["faults"][kind] >= 1, (kind, report["faults"])
    assert sum(report["faults"].values()) >= duration // 6, report["faults"]
    # Progress: hundreds of steps (at 60 s), every one compared across peers.
    assert report["steps"] >= 100 * duration // 60, report
    assert report["parity_checks"] >= 3 * report["steps"] // 2, report
    assert report["throughput_steps_per_s"] > 1.0, report
    # Recovery: faults were measured and the run resumed within a few heartbeat timeouts.
    assert report["recoveries_measured"] >= max(2, 5 * duration // 60), report
    assert 0 < report["max_recovery_s"] < 15.0, report
    # A live summary at least every 10 s.
    summaries = [line for line in r.stdout.splitlines() if " steps/s)" in line]
    assert len(summaries) >= duration // 10, r.stdout[-2000:]
    assert wall < duration + 60, f"the run took {wall:.0f}s"
    # The summary line on stdout is the JSON's required subset.
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["steps"] == report["steps"] and set(last) >= {"faults", "stalls"}


@pytest.mark.chaos
@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_process_survives_the_driver(tmp_path, sig):
    argv = _chaos_argv(tmp_path, "--peers", "3", "--duration", "120", "--interval", "1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:  # wait until faults are flowing (a stopped peer is likely)
            if "hang:" in line or "kill:" in line or time.monotonic() > deadline:
                break
        assert len(_processes_of(proc.pid)) >= 4  # master + 3 peers
        proc.send_signal(sig)
        proc.wait(30)
        deadline = time.monotonic() + 15
        while _processes_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_of(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(30)
def test_usage_errors_exit_2():
    base = [sys.executable, "-m", "pccl.tools.chaos"]
    for extra in (["--faults", "linkcut"], ["--faults", "explode"], ["--peers", "1"]):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=20)
        assert r.returncode == 2, (extra, r.stderr)
        assert "pccl chaos:" in r.stderr


def test_parity_book_flags_a_second_hash_for_a_revision():
    book = ParityBook()
    assert book.record(1, "aa", "p1") is None
    assert book.record(1, "aa", "p2") is None
    assert book.record(2, "bb", "p1") is None
    bad = book.record(1, "ab", "p3")
    assert bad is not None and "revision 1" in bad and "p3" in bad and "p1" in bad
    assert book.checks == 2 and len(book.violations) == 1 and book.max_revision == 2


def test_fault_plan_rounds_contain_every_kind_and_follow_the_seed():
    kinds = ("kill", "hang", "leave", "join")
    a = FaultPlan(random.Random(5), kinds)
    b = FaultPlan(random.Random(5), kinds)
    seq_a = [a.next(set(kinds)) for _ in range(12)]
    seq_b = [b.next(set(kinds)) for _ in range(12)]
    assert seq_a == seq_b
    for i in range(0, 12, 4):
        assert sorted(seq_a[i : i + 4]) == sorted(kinds)  # type: ignore[type-var]
    # An ineligible kind waits in its round instead of being dropped.
    c = FaultPlan(random.Random(1), kinds)
    got = [c.next({"join"}), c.next({"join"}), c.next(set(kinds))]
    assert got[0] == "join" and got[1] is None and got[2] in {"kill", "hang", "leave"}


def test_cli_registers_chaos():
    from pccl.cli import build_parser

    args = build_parser().parse_args(["chaos", "--peers", "3", "--seed", "9"])
    assert args.cmd == "chaos" and args.peers == 3 and args.seed == 9
    args = build_parser().parse_args(["chaos", "--cmd", "python train.py", "--peers", "3"])
    assert args.cmd == "chaos" and args.user_cmd == "python train.py"  # no clash with the verb
