"""``pccl bench master`` end to end on a small run (the real master process, simulated peers
speaking the real protocol)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(120)
def test_bench_master_small_run_reports_every_phase(tmp_path: Path) -> None:
    """``pccl bench master`` end to end on 40 simulated peers in 4 groups: the real master
    process admits them, runs collectives, topology rounds and syncs under churn, detects a
    hung and a crashed peer, and recovers them after a SIGKILL restart; the JSON says so."""
    out = tmp_path / "master.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pccl.cli",
            "bench",
            "master",
            "--peers",
            "40",
            "--group-size",
            "10",
            "--duration",
            "3",
            "--kills",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["params"]["peers"] == 40 and doc["params"]["groups"] == 4
    assert doc["machine"]["cores"] >= 1 and doc["admission_s"] > 0
    s = doc["steady"]
    assert s["ops"] > 0 and s["topology_round_s"]["n"] > 0 and s["sync_s"]["n"] > 0
    assert s["status_s"]["n"] > 0 and s["metrics_s"]["n"] > 0 and s["step_max_s"] > 0
    # A hung peer is found by the heartbeat timeout (3 s), a crash at once.
    assert 2.5 < doc["detect_hang_s"]["max"] < 10 and doc["detect_crash_s"]["max"] < 2
    assert doc["restart_recovery_s"] > 0 and doc["restart_resumed_ids"] >= 38
    assert "[bench master] restart: all accepted again" in proc.stderr
