"""The main job (``make demo`` = ``pccl demo``): a real master and peer processes training with
DiLoCo through a kill and a join, and the torch-free all-reduce demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(240)
def test_diloco_demo_survives_a_kill_and_keeps_parity() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pccl.cli", "demo", "--outer-steps", "12", "--step-ms", "20"],
        capture_output=True,
        text=True,
        timeout=230,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert ">>> SIGKILL" in out
    assert "parity: 12 outer steps checked, all identical" in out
    # The newcomer either joined the run (receiving the outer state) or, if the run ended
    # first on a slow machine, said so and left instead of training alone.
    assert "late joiner: outer state received" in out or "arrived after the run had ended" in out
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
