"""``pccl hammer``: strangers flood every listener while 3 authenticated peers all-reduce.

The end-to-end test is a short version of the acceptance run (``pccl hammer --duration 60``):
garbage, HTTP, oversized, msgpack-bomb, half-open and partial connections at ~100/s on each of
the master's control port, its status port and every peer's p2p port, and the summary must show
that the strangers really connected everywhere, while no operation aborted, no peer was evicted
or renumbered, every result was exact and no process's RSS grew by more than 64 MiB. The other
tests check argument validation and that the stranger's frames are what they claim to be.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pccl.cli import main as cli_main
from pccl.frame import HEADER, MAGIC, PRE_AUTH_MAX_BODY, VERSION, MsgType, max_body
from pccl.tools import hammer
from pccl.tools.stranger import KINDS, Attacker, Target

DURATION_S = 15


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_strangers_cannot_hurt_a_run(tmp_path: Path) -> None:
    out = tmp_path / "hammer.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pccl.cli",
            "hammer",
            "--duration",
            str(DURATION_S),
            "--json",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert out.exists(), f"rc {proc.returncode}\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert json.loads(proc.stdout) == doc  # one JSON document on stdout, the same as the file
    assert proc.returncode == 0 and doc["ok"], (doc["failures"], proc.stderr[-4000:])

    assert doc["totals"]["aborts"] == 0
    assert doc["totals"]["evictions"] == 0
    assert doc["totals"]["id_changes"] == 0
    assert doc["totals"]["wrong_results"] == 0
    assert doc["master"]["totals"]["aborts"] == 0
    assert len(doc["peers"]) == hammer.PEERS
    assert sorted(doc["master"]["peer_ids"]) == sorted(p["peer_id"] for p in doc["peers"])
    for peer in doc["peers"]:
        assert peer["finished"] and peer["exit_code"] == 0, peer
        assert peer["ops_during_attack"] > 0, peer

    targets = doc["attack"]["targets"]
    assert set(targets) == {"master", "status", "peer0", "peer1", "peer2"}
    for name, t in targets.items():
        assert t["attempts"] >= 300, (name, t)
        assert t["connected"] >= 300, (name, t)
        for kind in KINDS:
            assert t["kinds"][kind]["connected"] > 0, (name, kind, t["kinds"][kind])
        # The listeners dropped the strangers themselves (bad frames, caps, handshake deadline).
        assert t["closed_by_remote"] > 0, (name, t)
    assert targets["status"]["http_status"].get("401", 0) > 0  # no credential, no status
    for name, t in targets.items():  # ... and never a document, on any listener
        assert not [c for c in t.get("http_status", {}) if c.startswith("2")], (name, t)
    assert doc["attack"]["attempts_per_s"] >= 100

    assert set(doc["rss"]) == {"master", "peer0", "peer1", "peer2"}
    for name, rss in doc["rss"].items():
        assert rss["growth_mib"] is not None and rss["growth_mib"] <= 64, (name, rss)
    assert doc["machine"]["cores"] and doc["machine"]["kernel"]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_terminated_driver_reports_and_leaves_no_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pccl.tools.hammer", "--duration", "60", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # progress lines come every few seconds
            pids += [int(x) for x in re.findall(r"\(pid (\d+)\)", line)]
            if " strangers " in line or time.monotonic() > deadline:
                break  # the first progress line of the attack
        assert len(pids) == 1 + hammer.PEERS, pids
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, err[-3000:]
    doc = json.loads(out)
    assert not doc["ok"] and "interrupted by a signal" in doc["failures"]
    assert doc["attack"]["attempts"] > 0
    assert not [pid for pid in pids if _alive(pid)], pids


@pytest.mark.parametrize(
    "bad",
    [
        ["--duration", "0"],
        ["--duration", "-5"],
        ["--rate", "0"],
        ["--hold", "-1"],
        ["--mib", "0"],
        ["--sources", "0"],
        ["--rss-limit-mib", "0"],
    ],
)
def test_bad_arguments_exit_2_before_starting_anything(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["hammer", *bad]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no summary, nothing started
    assert "pccl hammer:" in captured.err


def test_unparsable_argument_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["hammer", "--rate", "fast"])
    assert exc.value.code == 2


def test_stranger_frames_are_what_they_claim() -> None:
    master = Target("master", "127.0.0.1", 1, MsgType.P2M_HELLO)
    peer = Target("peer0", "127.0.0.1", 2, MsgType.P2P_HELLO)
    attacker = Attacker([master, peer], rate=1, hold=1, seed=3)
    seen_lengths = set()
    for r in range(1024):
        for t in (master, peer):
            bomb = attacker.payload(t, "bomb", r)
            magic, version, mtype, length = HEADER.unpack_from(bomb)
            assert (magic, version) == (MAGIC, VERSION)
            assert length == len(bomb) - HEADER.size <= PRE_AUTH_MAX_BODY
            assert MsgType(mtype) in (
                (MsgType.P2M_HELLO,)
                if t is master
                else (MsgType.P2P_HELLO, MsgType.P2P_STATE_HELLO)
            )
            over = attacker.payload(t, "oversized", r)
            magic, version, mtype, length = HEADER.unpack_from(over)
            assert length in (max_body(mtype), 0xFFFFFFFF)
            assert len(over) - HEADER.size < length  # claims more than it sends
            seen_lengths.add(length)
            part = attacker.payload(t, "partial", r)
            assert HEADER.unpack_from(part)[2:] == (t.hello, PRE_AUTH_MAX_BODY)
            assert len(part) - HEADER.size == PRE_AUTH_MAX_BODY // 2
            garbage = attacker.payload(t, "garbage", r)
            assert 1 <= len(garbage) <= 64
            assert attacker.payload(t, "half_open", r) == b""
    assert 0xFFFFFFFF in seen_lengths
    assert {max_body(m) for m in MsgType} <= seen_lengths  # every type's bound is claimed
