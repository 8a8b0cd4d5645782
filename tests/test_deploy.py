"""Deployment files: the systemd unit, the container image's health check, deploy/local-cluster.

The unit is verified by ``systemd-analyze verify`` (skipped where systemd is absent), with a
negative control so the check is known to fail on a broken unit. The container health check is
run against a real master started on a non-default port. ``deploy/local-cluster`` runs a real
master and peers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pccl.tools.healthcheck import master_address

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = (DEPLOY / "pccl-master.service").read_text()
    pccl_bin = Path(sys.executable).with_name("pccl")
    assert "/opt/pccl/bin/pccl master" in text and pccl_bin.exists()
    unit = tmp_path / "pccl-master.service"
    unit.write_text(text.replace("/opt/pccl/bin/pccl", str(pccl_bin)))
    out = _verify(unit)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    # negative control: a misspelt key and a bad value are reported
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Type=exec", "Type=exce\nRestartSecc=1"))
    bad = _verify(broken)
    assert "service type" in bad.stderr and "RestartSecc" in bad.stderr, bad.stderr


def test_containerfile_health_check_follows_the_started_port() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    health = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)
    assert health is not None and '"pccl.tools.healthcheck"' in health.group(1), text
    assert "48148" not in health.group(1)  # no port written into the check
    assert 'ENTRYPOINT ["pccl", "master"]' in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None and master_address(["pccl", "master", *eval(cmd.group(1))]) == (
        "127.0.0.1",
        int(re.search(r"EXPOSE (\d+)/tcp", text).group(1)),  # type: ignore[union-attr]
    )


def _health(pid: int) -> int:
    return subprocess.run(
        [sys.executable, "-m", "pccl.tools.healthcheck", "--pid", str(pid)], timeout=30
    ).returncode


def test_health_check_against_a_master_on_another_port(master_factory: Any) -> None:
    import socket

    with socket.socket() as probe:  # a free port that is not the default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for m in (master_factory(port=port), master_factory()):  # explicit, and OS-assigned (0)
        assert m.port != 48148
        assert _health(m.proc.pid) == 0
        m.expect_exit = True
        m.proc.send_signal(signal.SIGSTOP)  # not answering is not the same as not listening...
        try:
            assert _health(m.proc.pid) == 0  # (the kernel still accepts into the backlog)
        finally:
            m.proc.send_signal(signal.SIGCONT)
    assert _health(os.getpid()) == 2  # not a master
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        unused = probe.getsockname()[1]
    fake = subprocess.Popen(  # says "master --port UNUSED"; nothing listens there
        [sys.executable, "-c", "import time; time.sleep(30)", "master", "--port", str(unused)]
    )
    try:
        assert _health(fake.pid) == 1
    finally:
        fake.kill()
        fake.wait()


def _cluster(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, str(DEPLOY / "local-cluster"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_local_cluster_runs_its_example_and_a_user_command() -> None:
    out = _cluster("-n", "2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    last: dict[str, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\[(\d)\] peer \d+: revision (\d+) world 2 state ([0-9a-f]+)", line)
        if m:
            last[m.group(1)] = f"{m.group(2)}:{m.group(3)}"
    assert set(last) == {"0", "1"} and last["0"] == last["1"], out.stdout[-2000:]
    probe = (
        "import os; e = os.environ; "
        "print('ENV', e['PCCL_MASTER'], e['PCCL_PEER_INDEX'], e['PCCL_NUM_PEERS'])"
    )
    out = _cluster("-n", "2", "--", sys.executable, "-c", probe)
    assert out.returncode == 0, out.stderr[-2000:]
    envs = sorted(re.findall(r"\[(\d)\] ENV 127\.0\.0\.1:\d+ (\d) 2", out.stdout))
    assert envs == [("0", "0"), ("1", "1")], out.stdout
    out = _cluster("-n", "2", "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert out.returncode == 3, (out.returncode, out.stderr[-2000:])
