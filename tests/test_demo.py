"""The main job (``make demo`` = ``pccl demo``): a real master and peer processes training with
DiLoCo through a kill and a join, and the torch-free all-reduce demo."""

from __future__ import annotations

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


@pytest.mark.timeout(120)
def test_allreduce_demo_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pccl.cli", "demo", "--allreduce", "--steps", "12", "--mib", "4"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failures" in proc.stdout
