"""Progress reporting and plots, with real processes.

A joiner that receives at least 64 MiB of shared state logs progress lines through the
``pccl.peer`` logger (a log file shows the transfer, not only a terminal); ``pccl bench
allreduce --plot`` and ``pccl chaos --plot`` write PNG files that matplotlib really drew into
(skipped where matplotlib is not installed). The pure pieces (the progress line, the plot
functions on hand-made records) are tested without processes.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pccl.progress import MIN_TRANSFER_BYTES, TransferProgress

MIB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LINE = re.compile(
    r"state transfer: (?P<got>[\d.]+)/(?P<total>[\d.]+) MiB \((?P<pct>\d+) %\), "
    r"(?P<rate>\d+) MB/s, (?:ETA [\d.?]+ s|done in [\d.]+ s)"
)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    # An empty canvas of this size compresses to ~2 KB; axes, text and lines make it larger.
    assert len(data) > 8_000, f"{path}: only {len(data)} bytes, did matplotlib draw anything?"


# ------------------------------------------------------------------------ state transfer


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_joiner_logs_progress_of_a_large_state_transfer(master, workers) -> None:
    mib = 64  # float32 entry of 64 MiB: exactly the threshold
    source = workers.spawn(
        "state_progress.py", master, {"world": 2, "mib": mib, "revision": 1, "seed": 7}
    )
    joiner = workers.spawn(
        "state_progress.py", master, {"world": 2, "mib": mib, "revision": 0, "seed": 0}
    )
    res = workers.wait_exit([source, joiner], timeout=50)
    got_src, got_join = res[source.name], res[joiner.name]
    assert got_join["rx"] == mib * MIB and got_join["revision"] == 1
    assert got_join["digest"] == got_src["digest"]
    log = joiner.stderr.read_text()
    lines = [m for m in map(LINE.search, log.splitlines()) if m]
    assert lines, f"no progress line in the joiner's log:\n{log[-3000:]}"
    last = lines[-1]
    assert float(last["got"]) == float(last["total"]) == float(mib) and last["pct"] == "100"
    assert "done in" in last.group(0)
    assert f"pccl.peer INFO: {last.group(0)}" in log  # the library's logger, at INFO
    # The source received nothing, so it has nothing to report.
    assert got_src["rx"] == 0 and not LINE.search(source.stderr.read_text())


def test_transfer_progress_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("pccl.test.progress")
    p = TransferProgress(MIN_TRANSFER_BYTES, log, every_s=3600.0)
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(16):
            p.add(MIN_TRANSFER_BYTES // 16)  # the first line is due only in an hour
        assert caplog.messages == []
        p.close()
        p.close()
    assert len(caplog.messages) == 1
    m = LINE.search(caplog.messages[0])
    assert m and m["pct"] == "100" and m["got"] == m["total"] == "64.0"


def test_transfer_progress_reports_an_unfinished_transfer(caplog) -> None:
    log = logging.getLogger("pccl.test.progress")
    p = TransferProgress(4 * MIB, log, every_s=0.0)
    with caplog.at_level(logging.INFO, logger=log.name):
        p.add(MIB)
        p.close()
    first, last = caplog.messages
    assert "1.0/4.0 MiB (25 %)" in first and "ETA" in first
    assert "stopped after" in last


# ------------------------------------------------------------------------ plots


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_bench_allreduce_plot_is_a_drawn_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "plots" / "bench.png", tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pccl.cli", "bench", "allreduce", "--peers", "2"]
    cmd += ["--mib", "1,2", "--repeats", "5", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run([*cmd, "--plot", str(png)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    # A sweep: one document per configuration, each the single-run schema.
    assert [r["config"]["mib"] for r in doc["runs"]] == [1.0, 2.0]
    assert all(r["pccl"]["parity"] and r["pccl"]["busbw_gbps"] > 0 for r in doc["runs"])
    _assert_png(png)
    assert f"plot: {png}" in proc.stderr


@pytest.mark.chaos
@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_chaos_plot_is_a_drawn_png_of_the_timeline(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "chaos.png", tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "pccl.tools.chaos", "--peers", "3", "--duration", "8"]
    cmd += ["--interval", "1", "--faults", "kill,join", "--seed", "3", "--json", str(out)]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    tl = report["timeline"]
    fired = sum(report["faults"].values())
    assert fired >= 1 and len(tl["faults"]) == fired, (report["faults"], tl["faults"])
    assert tl["world"] and all(w[1] >= 2 for w in tl["world"])
    assert all(0 <= t <= 10 for t, _ in tl["world"])
    _assert_png(png)
    # The printed lines are the same as without a plot: summary lines, then the JSON subset.
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == report["steps"]


def test_plots_say_how_to_install_matplotlib(monkeypatch, tmp_path: Path) -> None:
    from pccl.tools import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plots.PlotUnavailable, match=r"pip install 'pccl\[plot\]'"):
        plots.plot_chaos({"timeline": {"faults": [], "world": [], "recoveries": []}}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_plot_bench_from_hand_made_documents(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from pccl.tools.plots import plot_bench

    def doc(mib: float, streams: int, gbps: float) -> dict[str, Any]:
        cfg = {"mib": mib, "streams": streams, "streams_used": streams, "peers": 4}
        cfg.update(dtype="float32", quantization="none")
        return {
            "config": cfg,
            "pccl": {"busbw_gbps": gbps},
            "gloo": {"busbw_gbps": gbps / 2},
            "floor": {"busbw_gbps": gbps * 2},
        }

    docs = [doc(m, s, m * s / 10) for m in (1, 4, 16) for s in (1, 4)]
    _assert_png(plot_bench(docs, tmp_path / "sweep.png"))
    with pytest.raises(ValueError):
        plot_bench([], tmp_path / "none.png")
