"""The main job (``make demo`` = ``pccl demo``): a real master and peer processes training with
DiLoCo through a kill and a join, and the torch-free all-reduce demo."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(240)
def test_diloco_demo_survives_a_kill_and_admits_a_newcomer() -> None:
    # 30 ms per inner step: the newcomer, let in at outer step 8, has about 2.4 s to be admitted
    # (it takes 2-3 outer steps here), so the run shows both the kill and the join.
    proc = subprocess.run(
        [sys.executable, "-m", "pccl.cli", "demo", "--outer-steps", "16", "--step-ms", "30"],
        capture_output=True,
        text=True,
        timeout=230,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert ">>> SIGKILL" in out
    assert "late joiner: outer state received" in out, out[-3000:]
    assert "parity: 16 outer steps checked, all identical" in out
    assert "final held-out loss: DiLoCo" in out


AR_STEPS = 200
STEP_LINE = re.compile(
    r"^  step +(\d+) peer #(\d+) \(id (\d+)\) world (\d+) .* mean ok (True|False)$", re.M
)


@pytest.mark.timeout(120)
def test_allreduce_demo_runs() -> None:
    # 200 steps of 4 MiB (about 5 s here): the newcomer, started at step 100, is admitted within
    # about 15 steps, so it really joins the running ring. With only a few steps the survivors
    # finish before it connects and it is admitted alone, after the run.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pccl.cli",
            "demo",
            "--allreduce",
            "--steps",
            str(AR_STEPS),
            "--mib",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    # Every step compared across peers, none failed (a wrong mean or a parity violation counts).
    done = re.findall(r"^done: (\d+) steps compared across peers, (\d+) failures$", out, re.M)
    assert len(done) == 1, out[-3000:]
    compared, failures = (int(x) for x in done[0])
    assert failures == 0, out[-3000:]
    assert compared == AR_STEPS
    steps = [(int(s), int(p), int(i), int(w), ok) for s, p, i, w, ok in STEP_LINE.findall(out)]
    assert {s for s, *_ in steps} == set(range(AR_STEPS))
    assert all(ok == "True" for *_, ok in steps)

    # The kill: one of the first three peers was SIGKILLed a third of the way in (the launcher
    # may read a few steps late), reported nothing after it, and the two survivors carried on
    # in a ring of two.
    killed = [int(v) for v in re.findall(r"^  >>> SIGKILL peer #(\d+)$", out, re.M)]
    assert len(killed) == 1 and killed[0] in range(3), out[-3000:]
    victim = killed[0]
    assert AR_STEPS // 3 - 1 <= max(s for s, p, *_ in steps if p == victim) < AR_STEPS // 2
    assert f"peer #{victim} exited" not in out  # SIGKILL is the expected exit, not a failure
    for p in {0, 1, 2} - {victim}:  # (a peer admitted after step 0 adopts the run's step)
        done_by_p = {s for s, q, *_ in steps if q == p}
        assert done_by_p == set(range(min(done_by_p), AR_STEPS)), p
        assert min(done_by_p) < AR_STEPS // 3
    assert any(w == 2 and s > AR_STEPS // 3 for s, _, _, w, _ in steps)

    # The join: peer #3 started after the kill, was admitted into the running ring under a new
    # id, and took part in steps with world 3 up to the last one.
    assert re.findall(r"^  >>> starting peer #(\d+)$", out, re.M) == ["3"], out[-3000:]
    admitted = dict(re.findall(r"^  peer #(\d+) admitted as id (\d+) \(world \d+\)$", out, re.M))
    assert set(admitted) == {"0", "1", "2", "3"}
    assert admitted["3"] not in {admitted[p] for p in "012"}
    assert f"peer #3 admitted as id {admitted['3']} (world 3)" in out
    late = [(s, i, w) for s, p, i, w, _ in steps if p == 3]
    assert late, "the newcomer finished no step in the running ring\n" + out[-3000:]
    assert {i for _, i, _ in late} == {int(admitted["3"])}
    assert all(w == 3 for *_, w in late)
    assert min(s for s, *_ in late) >= AR_STEPS // 2
    assert max(s for s, *_ in late) == AR_STEPS - 1
    assert "no other peer" not in out
