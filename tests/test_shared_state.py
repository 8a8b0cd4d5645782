"""End-to-end shared-state sync: the real ``pccl master`` and real peer processes on loopback.

Each peer is ``tests/state_workers/peer.py``, driven command by command over its stdin (connect,
build a state, change an entry, bump the revision, sync) so a test reads like the training loop
it stands for. Peers report what a user can see: ``SyncInfo``, ``state.revision``, the library's
``state.hashes()`` and an independent XXH3-128 of each tensor's raw bytes. Every test ends by
checking that all surviving peers of a group hold byte-identical state (``converged``).

Contents come from seeds, so a test knows the exact bytes each peer must end with; entry sizes
are chosen so that ``rx``/``tx`` pin down which entries moved.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

import pccl
from pccl.tools.proc import stop

WORKER = Path(__file__).resolve().parent / "state_workers" / "peer.py"
REPLY_TIMEOUT_S = 30.0
KIB, MIB = 1 << 10, 1 << 20


class Peer:
    """One peer process; ``call`` sends a command and waits for its reply."""

    def __init__(
        self, name: str, address: str, tmp_path: Path, master_log: Any = lambda: ""
    ) -> None:
        self.name = name
        self.master_log = master_log
        self.stderr = tmp_path / f"{name}.stderr"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.peer_id = 0
        self.eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"event": "text", "line": raw.decode("utf-8", "replace")}
            self._q.put(ev)
        self._q.put(None)

    def send(self, op: str, **kw: Any) -> int:
        self._next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": self._next_id, "op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        return self._next_id

    def _pump(self, deadline: float) -> None:
        try:
            ev = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return
        if ev is None:
            self.eof = True
        elif ev.get("event") == "reply":
            self.replies[ev["id"]] = ev
        else:
            self.events.append(ev)

    def reply(self, cid: int, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while cid not in self.replies:
            if self.eof:
                raise AssertionError(f"{self.name} exited before replying\n{self.log()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: no reply to #{cid} in {timeout}s\n{self.log()}")
            self._pump(deadline)
        rep = self.replies.pop(cid)
        if "traceback" in rep:
            raise AssertionError(f"{self.name}: {rep['op']} raised\n{rep['traceback']}")
        return rep

    def call(self, op: str, timeout: float = REPLY_TIMEOUT_S, **kw: Any) -> dict[str, Any]:
        return self.reply(self.send(op, **kw), timeout)

    def wait_event(self, name: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """The first not yet consumed ``name`` event whose ``fields`` match."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                match = all(ev.get(k) == v for k, v in fields.items())
                if ev.get("event") == name and match and not ev.get("_seen"):
                    ev["_seen"] = True
                    return ev
            if self.eof or time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: no {name!r} event in {timeout}s\n{self.log()}")
            self._pump(deadline)

    def wait_stopped(self, timeout: float = REPLY_TIMEOUT_S) -> None:
        """Wait until the process is in the stopped state (it SIGSTOPs itself after emitting
        ``signalled``: a SIGCONT sent before that point would be lost)."""
        deadline = time.monotonic() + timeout
        stat = Path(f"/proc/{self.proc.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise AssertionError(f"{self.name} did not stop in {timeout}s\n{self.log()}")
            time.sleep(0.001)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        """This peer's stderr tail and the master's (for failure messages)."""
        try:
            mine = self.stderr.read_text(errors="replace")[-3000:]
        except OSError:
            mine = "<no log>"
        return f"--- {self.name} stderr\n{mine}\n--- master log\n{self.master_log()}"

    def kill(self) -> None:
        stop(self.proc)


def gather(peers: list[Peer], op: str, timeout: float = REPLY_TIMEOUT_S, **kw: Any) -> list[dict]:
    """Send the same command to every peer at once (a barrier call), then collect the replies."""
    ids = [p.send(op, **kw) for p in peers]
    return [p.reply(i, timeout) for p, i in zip(peers, ids)]


class Cluster:
    """Peer processes of one test against one master; all are killed at teardown."""

    def __init__(self, master: Any, tmp_path: Path) -> None:
        self.master = master
        self.tmp_path = tmp_path
        self.peers: list[Peer] = []

    def spawn(self, n: int) -> list[Peer]:
        new = [
            Peer(
                f"peer{len(self.peers) + i}",
                self.master.address,
                self.tmp_path,
                self.master.log_tail,
            )
            for i in range(n)
        ]
        self.peers.extend(new)
        return new

    def start(self, n: int, group: int = 0, **connect: Any) -> list[Peer]:
        """The first ``n`` peers of the run, in ``group``; ``[0]`` has the lowest peer id.

        The master admits the first peer alone at once; it then admits the rest (``join``).
        """
        assert not self.peers, "start() is for the first peers of a run; use join()"
        new = self.spawn(n)
        first = new[0].call("connect", group=group, **connect)
        assert first["world_size"] == 1, first
        new[0].peer_id = first["peer_id"]
        self.join(new[1:], incumbents=[new[0]], group=group, **connect)
        return new

    def join(self, new: list[Peer], incumbents: list[Peer], group: int = 0, **connect: Any) -> None:
        """Connect ``new`` peers while ``incumbents`` vote topology updates to admit them."""
        if not new:
            return
        # Incumbents vote once every newcomer is registered, so one epoch admits them all. A
        # newcomer admitted early votes for the rest itself: it queues an admit loop right
        # behind its connect.
        world = len(incumbents) + len(new)
        ids = [
            (p.send("connect", group=group, **connect), p.send("admit", world=world)) for p in new
        ]
        for p in new:
            p.wait_event("registered", timeout=REPLY_TIMEOUT_S)
        admits = [p.send("admit", world=world) for p in incumbents]
        for p, (c, a) in zip(new, ids):
            p.peer_id = p.reply(c)["peer_id"]
            assert p.reply(a)["world_size"] == world
        for p, i in zip(incumbents, admits):
            assert p.reply(i)["world_size"] == world

    def close(self) -> None:
        for p in self.peers:
            p.kill()


@pytest.fixture
def cluster(master: Any, tmp_path: Path):
    c = Cluster(master, tmp_path)
    try:
        yield c
    finally:
        c.close()


HEARTBEAT_TIMEOUT_S = 1.5


@pytest.fixture
def fast_cluster(master_factory: Any, tmp_path: Path):
    """A cluster whose master evicts a silent peer after ``HEARTBEAT_TIMEOUT_S``."""
    c = Cluster(master_factory(PCCL_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S)), tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def patient_cluster(master_factory: Any, tmp_path: Path):
    """A cluster whose master tolerates 20 s of silence: for many processes on few cores."""
    c = Cluster(master_factory(PCCL_HEARTBEAT_TIMEOUT_S="20"), tmp_path)
    try:
        yield c
    finally:
        c.close()


def spec(sizes: dict[str, int], seed: int, dtype: str = "float32", **extra: Any) -> list[dict]:
    """Entries ``{name: element count}`` of one dtype whose contents depend on ``seed``."""
    return [
        {"name": k, "dtype": dtype, "shape": [n], "seed": seed * 1000 + i, **extra}
        for i, (k, n) in enumerate(sizes.items())
    ]


def converged(peers: list[Peer], skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Assert all peers hold byte-identical state at one revision; return the digests.

    ``state.hashes()`` must equal the independent digest of the bytes on every peer, and both
    must agree across peers (``skip``: ``allow_content_inequality`` entries).
    """
    reps = gather(peers, "describe")
    for p, r in zip(peers, reps):
        assert r["hashes"] == r["digests"], f"{p.name}: hashes() disagree with the bytes"
    views = [{k: v for k, v in r["hashes"].items() if k not in skip} for r in reps]
    assert all(v == views[0] for v in views), {p.name: v for p, v in zip(peers, views)}
    assert len({r["state_revision"] for r in reps}) == 1, [r["state_revision"] for r in reps]
    return views[0]


def synced(rep: dict[str, Any]) -> dict[str, Any]:
    assert rep["synced"], f"sync failed: {rep.get('error')}: {rep.get('message')}"
    return rep


def rejected(rep: dict[str, Any]) -> str:
    assert not rep["synced"], f"sync unexpectedly succeeded: {rep}"
    assert rep["shared_state_error"], f"expected SharedStateError, got {rep['error']}"
    return rep["message"]


SMALL = {"w": 64 * KIB, "b": 3 * KIB, "m": 100 * KIB}  # float32 elements: 256 KiB, 12 KiB, 400 KiB


# ---------------------------------------------------------------------------------- steady state


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_identical_states_advanced_identically_move_no_bytes(cluster):
    peers = cluster.start(3)
    gather(peers, "state", entries=spec(SMALL, seed=1))
    seen: set[str] = set()
    for step in range(21):
        if step:
            gather(peers, "step", k=step)
            gather(peers, "bump")
        reps = gather(peers, "sync")
        for p, r in zip(peers, reps):
            synced(r)
            assert (r["revision"], r["state_revision"]) == (step, step), p.name
            assert (r["tx"], r["rx"]) == (0, 0), f"step {step}: {p.name} tx={r['tx']} rx={r['rx']}"
        digests = converged(peers)
        assert digests["w"] not in seen, "the step did not change the content"
        seen.add(digests["w"])


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_one_dirty_entry_moves_only_that_entry_striped_over_sources(cluster):
    sizes = {"w": 64 * KIB, "dirty": MIB, "m": 100 * KIB}  # "dirty": 4 MiB of float32
    peers = cluster.start(3)
    gather(peers, "state", entries=spec(sizes, seed=1))
    assert all(r["tx"] == r["rx"] == 0 for r in map(synced, gather(peers, "sync")))
    want = converged(peers)
    dirty = peers[2].call("fill", name="dirty", seed=99)
    nbytes = dirty["nbytes"]["dirty"]
    gather(peers, "bump")
    a, b, c = map(synced, gather(peers, "sync"))
    assert c["rx"] == nbytes and c["tx"] == 0
    assert a["rx"] == b["rx"] == 0
    assert a["tx"] + b["tx"] == nbytes
    assert a["tx"] > 0 and b["tx"] > 0, "the entry was not striped over both sources"
    assert converged(peers) == want


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_many_small_entries_are_spread_over_all_sources(cluster):
    sizes = {f"t{i:02d}": 128 * KIB for i in range(18)}  # 18 x 512 KiB
    peers = cluster.start(4)
    gather(peers[:3], "state", entries=spec(sizes, seed=1))
    total = sum(peers[3].call("state", entries=spec(sizes, seed=2))["nbytes"].values())
    reps = list(map(synced, gather(peers, "sync")))
    assert reps[3]["rx"] == total
    served = [r["tx"] for r in reps[:3]]
    assert sum(served) == total
    assert max(served) <= total // 2, f"one source served most of the state: {served}"
    converged(peers)


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_majority_wins_even_when_minority_votes_first(cluster):
    peers = cluster.start(3)
    minority, majority = peers[0], peers[1:]  # the minority also has the lowest peer id
    gather(peers, "state", entries=spec(SMALL, seed=1))
    minority.call("fill", name="w", seed=42)
    minority.call("fill", name="m", seed=43)
    want = majority[0].call("describe")["digests"]
    first = minority.send("sync")
    minority.wait_event("vote_sent", timeout=REPLY_TIMEOUT_S)
    others = [p.send("sync") for p in majority]
    m = synced(minority.reply(first))
    x, y = (synced(p.reply(i)) for p, i in zip(majority, others))
    nbytes = m["nbytes"]
    assert m["rx"] == nbytes["w"] + nbytes["m"]
    assert x["rx"] == y["rx"] == 0
    assert x["tx"] + y["tx"] == m["rx"]
    assert converged(peers) == want


# ---------------------------------------------------------------------------------- membership


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_late_joiner_receives_full_state_then_moves_nothing(cluster):
    incumbents = cluster.start(2)
    gather(incumbents, "state", entries=spec(SMALL, seed=1))
    for step in range(3):
        if step:
            gather(incumbents, "step", k=step)
            gather(incumbents, "bump")
        gather(incumbents, "sync")
    [late] = cluster.spawn(1)
    total = late.call("state", entries=spec(SMALL, seed=7))  # same layout, other content
    cluster.join([late], incumbents)
    gather(incumbents, "bump")
    reps = list(map(synced, gather([*incumbents, late], "sync")))
    size = sum(total["nbytes"].values())
    assert reps[2]["rx"] == size and reps[2]["state_revision"] == 3
    assert sum(r["tx"] for r in reps) == size
    assert reps[0]["rx"] == reps[1]["rx"] == 0
    converged([*incumbents, late])
    gather([*incumbents, late], "bump")
    for r in map(synced, gather([*incumbents, late], "sync")):
        assert (r["tx"], r["rx"], r["revision"]) == (0, 0, 4)
    converged([*incumbents, late])


# ---------------------------------------------------------------------------------- revisions


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_revision_rules_resume_skip_and_drag(cluster):
    a, b, c = peers = cluster.start(3)
    # Resume from a checkpoint at 13: a and b restored it; c starts fresh at 0 with other bytes.
    a.call("state", entries=spec(SMALL, seed=13), revision=13)
    b.call("state", entries=spec(SMALL, seed=13), revision=13)
    fresh = c.call("state", entries=spec(SMALL, seed=5), revision=0)
    ra, rb, rc = map(synced, gather(peers, "sync"))
    assert ra["revision"] == rb["revision"] == rc["revision"] == rc["state_revision"] == 13
    assert rc["rx"] == sum(fresh["nbytes"].values()) and ra["rx"] == rb["rx"] == 0
    want = converged(peers)

    gather(peers, "bump")  # 14
    assert all((r["tx"], r["rx"]) == (0, 0) for r in map(synced, gather(peers, "sync")))

    a.call("bump")
    b.call("bump")
    c.call("bump", by=2)  # 16 while the group goes to 15
    ra, rb, rc = gather(peers, "sync")
    assert synced(ra)["revision"] == synced(rb)["revision"] == 15
    why = rejected(rc)
    assert "16" in why and "15" in why, why
    assert rc["state_revision"] == 16 and rc["digests"] == want  # untouched by the rejection

    # b never bumps (stays at 15) and is dragged to 16 with nothing to move; c is now right.
    a.call("bump")
    ra, rb, rc = map(synced, gather(peers, "sync"))
    assert rb["state_revision"] == rb["revision"] == 16 and rb["rx"] == 0
    assert ra["revision"] == rc["revision"] == 16
    assert converged(peers) == want


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(60)
def test_rejected_peer_retrying_while_the_group_transfers_stays_in_the_run(cluster):
    """An application that catches the rejection, fixes its revision and retries at once must
    not lose its place in the run because the rest of the group is still transferring."""
    sizes = {"big": 4 * MIB}  # 16 MiB of float32
    a, b, c = peers = cluster.start(
        3, config={"socket_buffer_bytes": 64 * KIB, "local_socket_buffer_bytes": 0}
    )
    gather(peers, "state", entries=spec(sizes, seed=1))
    gather(peers, "sync")
    b.call("fill", name="big", seed=5)  # b will fetch 16 MiB from a
    a.call("bump")
    b.call("bump")
    c.call("bump", by=2)
    a.call("arm_signal", min_tx=4 * MIB, signal_name="SIGSTOP")
    ids = [p.send("sync") for p in peers]
    assert "skips ahead" in rejected(c.reply(ids[2]))
    a.wait_event("signalled", timeout=REPLY_TIMEOUT_S)
    a.wait_stopped()  # the round stays open while a is stopped
    try:
        c.call("bump", by=-1)
        retry = c.send("sync")
        c.wait_event("vote_sent", timeout=REPLY_TIMEOUT_S, revision=1)  # the retry is out
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    ra, rb = synced(a.reply(ids[0])), synced(b.reply(ids[1]))
    assert rb["rx"] == 16 * MIB and ra["revision"] == 1
    # The next round: a and b sync again; c's pending retry completes with them (or was
    # refused cleanly and succeeds when c tries again).
    gather([a, b], "bump")
    nxt = [a.send("sync"), b.send("sync")]
    rc = c.reply(retry)
    if not rc["synced"]:
        assert rc["shared_state_error"], f"c was expelled from the run: {rc['message']}"
        rc = c.call("sync")
    assert synced(rc)["revision"] == 2
    for p, i in zip([a, b], nxt):
        synced(p.reply(i))
    converged(peers)


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_sync_timed_out_waiting_for_a_late_peer_can_be_retried(cluster):
    """``sync_shared_state`` documents "retrying is safe": a peer whose sync timed out because
    another peer had not called it yet retries, and the retry completes with that peer."""
    a, b = peers = cluster.start(2)
    gather(peers, "state", entries=spec(SMALL, seed=1))
    b.call("fill", name="w", seed=3)
    first = a.call("sync", budget=1.0)  # b is still busy elsewhere
    assert "within" in rejected(first)
    # a's withdrawal is on the wire before its reply, but the master serves its connections
    # in readiness order: under load b's vote can be read first, join a's dying sync and fail
    # with a retryable error (its source left). A bounded retry completes; nothing hangs.
    tries = 0
    while tries < 3:
        tries += 1
        ra, rb = gather(peers, "sync", budget=10.0, timeout=30)
        if ra["synced"] and rb["synced"]:
            break
        for r in (ra, rb):
            if not r["synced"]:
                rejected(r)
    assert synced(ra)["revision"] == synced(rb)["revision"] == 0
    if tries == 1:  # after that race b may have verified a's w already in the failed sync
        assert rb["rx"] == rb["nbytes"]["w"] or ra["rx"] == ra["nbytes"]["w"]
    assert converged(peers)["w"]
    gather(peers, "bump")
    for r in map(synced, gather(peers, "sync")):
        assert (r["tx"], r["rx"]) == (0, 0)
    converged(peers)


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_sync_timed_out_mid_transfer_releases_the_group(patient_cluster):
    a, n = peers = patient_cluster.start(
        2, config={"socket_buffer_bytes": 64 * KIB, "local_socket_buffer_bytes": 0}
    )
    a.call("state", entries=spec({"big": 4 * MIB}, seed=1))  # 16 MiB
    original = n.call("state", entries=spec({"big": 4 * MIB}, seed=2))["digests"]  # a wins tie
    a.call("arm_signal", min_tx=4 * MIB, signal_name="SIGSTOP")
    ia, i_n = a.send("sync", budget=8.0), n.send("sync", budget=1.5)
    a.wait_event("signalled", timeout=REPLY_TIMEOUT_S)
    a.wait_stopped()
    try:
        rn = n.reply(i_n, timeout=REPLY_TIMEOUT_S)  # n gives up while a is frozen
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert "within" in rejected(rn)
    assert rn["digests"] == original, "a timed-out sync left a half-written tensor"
    t0 = time.monotonic()
    ra = a.reply(ia, timeout=REPLY_TIMEOUT_S)
    assert synced(ra)["revision"] == 0, "a was held hostage by n's abandoned transfer"
    assert time.monotonic() - t0 < 4
    # n retries and the group is healthy.
    rs = list(map(synced, gather(peers, "sync")))
    assert rs[1]["rx"] == 16 * MIB
    converged(peers)


# ---------------------------------------------------------------------------------- layout

LAYOUT_CASES = {
    # name: (entries of the odd peer, words its error must contain)
    "missing_key": ([{"name": "w", "dtype": "float32", "shape": [64]}], ["missing", "'b'"]),
    "extra_key": (
        [
            {"name": "w", "dtype": "float32", "shape": [64]},
            {"name": "b", "dtype": "float32", "shape": [8]},
            {"name": "extra", "dtype": "float32", "shape": [8]},
        ],
        ["unexpected", "'extra'"],
    ),
    "shape": (
        [
            {"name": "w", "dtype": "float32", "shape": [16, 4]},
            {"name": "b", "dtype": "float32", "shape": [8]},
        ],
        ["'w'", "(16, 4)", "(64,)"],
    ),
    "dtype": (
        [
            {"name": "w", "dtype": "int32", "shape": [64]},  # same byte size as float32
            {"name": "b", "dtype": "float32", "shape": [8]},
        ],
        ["'w'", "int32", "float32"],
    ),
}
GOOD_LAYOUT = [
    {"name": "w", "dtype": "float32", "shape": [64], "seed": 1},
    {"name": "b", "dtype": "float32", "shape": [8], "seed": 2},
]


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_layout_mismatch_rejected_naming_the_difference_rest_continue(cluster, case):
    odd_entries, words = LAYOUT_CASES[case]
    a, b, odd = peers = cluster.start(3)
    a.call("state", entries=GOOD_LAYOUT)
    b.call("state", entries=GOOD_LAYOUT)
    before = odd.call("state", entries=[{**e, "seed": 50 + i} for i, e in enumerate(odd_entries)])
    ra, rb, ro = gather(peers, "sync")
    assert synced(ra)["revision"] == synced(rb)["revision"] == 0
    why = rejected(ro)
    for w in words:
        assert w in why, f"{w!r} not in {why!r}"
    assert ro["digests"] == before["digests"], "a rejected peer's tensors were modified"
    # The odd peer fixes its layout (own content, revision 0) and is dragged along next time.
    odd.call("state", entries=[{**e, "seed": 70 + i} for i, e in enumerate(GOOD_LAYOUT)])
    a.call("bump")
    b.call("bump")
    ra, rb, ro = map(synced, gather(peers, "sync"))
    assert ro["revision"] == 1 and ro["rx"] == sum(ro["nbytes"].values())
    converged(peers)


# ---------------------------------------------------------------------------------- strategies


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_two_send_only_peers_with_different_content_one_rejected(cluster):
    a, b = peers = cluster.start(2)
    ca = a.call("state", entries=spec(SMALL, seed=1))
    cb = b.call("state", entries=spec(SMALL, seed=2))
    ra, rb = gather(peers, "sync", strategy="SEND_ONLY")
    # Equal support: the longest-standing peer (lowest id, a) wins; b must not be overwritten.
    assert synced(ra)["rx"] == 0 and ra["digests"] == ca["digests"]
    assert "SEND_ONLY" in rejected(rb)
    assert rb["digests"] == cb["digests"]
    # b gives in: it receives a's content from a sender.
    a.call("bump")
    ra = a.send("sync", strategy="SEND_ONLY")
    rb = synced(b.call("sync", strategy="RECEIVE_ONLY"))
    assert synced(a.reply(ra))["tx"] == rb["rx"] == sum(cb["nbytes"].values())
    assert converged(peers) == ca["digests"]


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_all_receive_only_all_rejected(cluster):
    peers = cluster.start(3)
    before = [p.call("state", entries=spec(SMALL, seed=i % 2)) for i, p in enumerate(peers)]
    for p, r, s in zip(peers, gather(peers, "sync", strategy="RECEIVE_ONLY"), before):
        assert "RECEIVE_ONLY" in rejected(r), p.name
        assert r["digests"] == s["digests"] and r["state_revision"] == 0
    # Nothing was decided: the next sync is still a first sync, and the majority (seed 0) wins.
    for r in map(synced, gather(peers, "sync")):
        assert r["revision"] == 0
    assert converged(peers) == before[0]["digests"]


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("other", ["SEND_ONLY", "RECEIVE_ONLY"])
def test_enforce_popular_mixed_with_other_strategy_rejects_non_enforcing(cluster, other):
    a, b, c = peers = cluster.start(3)
    ca = a.call("state", entries=spec(SMALL, seed=1))
    b.call("state", entries=spec(SMALL, seed=1))
    b.call("fill", name="b", seed=9)
    cc = c.call("state", entries=spec(SMALL, seed=3))
    ids = [a.send("sync"), b.send("sync"), c.send("sync", strategy=other)]
    ra, rb, rc = (p.reply(i) for p, i in zip(peers, ids))
    why = rejected(rc)
    assert other in why and "ENFORCE_POPULAR" in why, why
    assert rc["digests"] == cc["digests"]
    assert synced(rb)["rx"] == rb["nbytes"]["b"] and synced(ra)["tx"] == rb["rx"]
    gather([a, b], "bump")
    rc = [synced(r) for r in gather(peers, "sync")][2]
    assert rc["rx"] == sum(rc["nbytes"].values())
    assert converged(peers) == ca["digests"]


# ---------------------------------------------------------------------------------- groups


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_peer_groups_with_same_key_names_never_interfere(cluster):
    g0 = cluster.start(3, group=0)
    g1 = cluster.spawn(3)
    cluster.join(g1, incumbents=g0, group=1)
    x = {p.name: p.call("state", entries=spec(SMALL, seed=100), revision=5) for p in g0[:2]}
    y = {p.name: p.call("state", entries=spec(SMALL, seed=200)) for p in g1[:2]}
    # Each group's odd peer holds the *other* group's content.
    g0[2].call("state", entries=spec(SMALL, seed=200), revision=5)
    g1[2].call("state", entries=spec(SMALL, seed=100))
    ids = [p.send("sync") for p in g0 + g1]
    reps = [synced(p.reply(i)) for p, i in zip(g0 + g1, ids)]
    size = sum(reps[0]["nbytes"].values())
    for group, rs in (("g0", reps[:3]), ("g1", reps[3:])):
        assert [r["rx"] for r in rs] == [0, 0, size], group
        assert sum(r["tx"] for r in rs) == size, f"{group}: bytes came from outside the group"
    assert {r["revision"] for r in reps[:3]} == {5} and {r["revision"] for r in reps[3:]} == {0}
    assert converged(g0) == x[g0[0].name]["digests"]
    assert converged(g1) == y[g1[0].name]["digests"]
    # Group 0 advances; group 1 is untouched and keeps its revision rule.
    gather(g0, "step", k=1)
    gather(g0 + g1, "bump")
    for r in map(synced, gather(g0 + g1, "sync")):
        assert (r["tx"], r["rx"]) == (0, 0)
    assert converged(g1) == y[g1[0].name]["digests"]
    assert converged(g0) != x[g0[0].name]["digests"]


# ---------------------------------------------------------------------------------- dtypes

DTYPE_ENTRIES = [
    {"name": "f32", "dtype": "float32", "shape": [1000, 3]},
    {"name": "f64", "dtype": "float64", "shape": [777]},
    {"name": "f16", "dtype": "float16", "shape": [3, 5, 7]},
    {"name": "f16_torch", "dtype": "float16", "shape": [513], "torch": True},
    {"name": "bf16_torch", "dtype": "bfloat16", "shape": [64, 9]},
    {"name": "f32_torch", "dtype": "float32", "shape": [31, 2], "torch": True},
    {"name": "i8", "dtype": "int8", "shape": [1001]},
    {"name": "i16", "dtype": "int16", "shape": [999]},
    {"name": "i16_torch", "dtype": "int16", "shape": [37], "torch": True},
    {"name": "i32", "dtype": "int32", "shape": [4, 4, 4]},
    {"name": "i64", "dtype": "int64", "shape": [129]},
    {"name": "u8", "dtype": "uint8", "shape": [3]},
    {"name": "scalar", "dtype": "float64", "shape": []},
    {"name": "local", "dtype": "float32", "shape": [50]},  # allow_content_inequality
]


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_every_dtype_transfers_and_verifies(cluster):
    peers = cluster.start(3)
    loose = ["local"]
    states = []
    for i, p in enumerate(peers):
        seed = 1 if i < 2 else 2  # the third peer differs in every entry
        ents = [
            {**e, "seed": seed * 100 + j + 10 * i * (e["name"] == "local")}
            for j, e in enumerate(DTYPE_ENTRIES)
        ]
        states.append(p.call("state", entries=ents, loose=loose, timeout=60))
    assert all(states[2]["digests"][k] != states[0]["digests"][k] for k in states[0]["digests"])
    ra, rb, rc = map(synced, gather(peers, "sync"))
    shared = {k: n for k, n in rc["nbytes"].items() if k not in loose}
    assert rc["rx"] == sum(shared.values()), "some dtype was skipped"
    assert ra["tx"] + rb["tx"] == rc["rx"]
    for k in shared:
        assert rc["digests"][k] == states[0]["digests"][k], f"{k} not transferred"
    assert rc["digests"]["local"] == states[2]["digests"]["local"], "an opt-out entry moved"
    converged(peers, skip=frozenset(loose))
    gather(peers, "bump")
    for r in map(synced, gather(peers, "sync")):
        assert (r["tx"], r["rx"]) == (0, 0)
    converged(peers, skip=frozenset(loose))


# ---------------------------------------------------------------------------------- faults


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_source_killed_mid_transfer_leaves_verified_state_or_clean_error(cluster):
    big = {"big": 64 * MIB}  # 256 MiB of float32, striped over 3 sources (~85 MiB each)
    # Small socket buffers on the sources keep each share in flight long enough to kill one.
    sources = cluster.start(
        3, config={"socket_buffer_bytes": 64 * KIB, "local_socket_buffer_bytes": 0}
    )
    gather(sources, "state", entries=spec(big, seed=1), timeout=60)
    for r in gather(sources, "sync", timeout=60):
        synced(r)
    want = converged(sources)
    [new] = cluster.spawn(1)
    original = new.call("state", entries=spec(big, seed=2), timeout=60)["digests"]
    cluster.join([new], sources)
    victim, survivors = sources[1], [sources[0], sources[2], new]
    share = 256 * MIB // 3
    victim.call("arm_signal", min_tx=8 * MIB)
    gather(sources, "bump")
    ids = {p.name: p.send("sync", budget=60) for p in [*sources, new]}
    killed = victim.wait_event("signalled", timeout=60)
    assert victim.wait_exit(timeout=10) == -9
    assert 8 * MIB <= killed["tx_bytes"] < share, f"the fault did not hit mid-transfer: {killed}"
    reps = {p.name: p.reply(ids[p.name], timeout=60) for p in survivors}
    got = reps[new.name]
    if got["synced"]:
        assert got["digests"] == want and got["rx"] == 256 * MIB and got["revision"] == 1
    else:
        assert got["shared_state_error"], got
        assert got["digests"] == original, "a failed sync left a half-written tensor"
        assert got["state_revision"] == 0
    for p in survivors[:2]:
        assert synced(reps[p.name])["rx"] == 0
    # The survivors served their own shares and the victim's unfinished tail.
    served = [reps[p.name]["tx"] for p in survivors[:2]]
    assert min(served) > 0
    if got["synced"]:
        assert 256 * MIB - killed["tx_bytes"] <= sum(served) <= 256 * MIB
    # The next sync of the survivors succeeds: a retry (dragged forward) or steady state.
    gather(survivors[:2], "bump")
    if got["synced"]:
        new.call("bump")
    reps2 = [synced(r) for r in gather(survivors, "sync", timeout=60)]
    assert reps2[2]["rx"] == (0 if got["synced"] else 256 * MIB)
    assert converged(survivors) == want


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_only_source_killed_mid_transfer_clean_error_then_retry_succeeds(cluster):
    big = {"big": 32 * MIB}  # 128 MiB of float32
    # v holds X, a (dirty) holds Y at the same revision: a tie, so v (lowest id) wins and is
    # the only source for both a and the newcomer n.
    v, a = cluster.start(
        2, config={"socket_buffer_bytes": 64 * KIB, "local_socket_buffer_bytes": 0}
    )
    gather([v, a], "state", entries=spec(big, seed=1), timeout=60)
    gather([v, a], "sync", timeout=60)
    dirty = a.call("fill", name="big", seed=77)["digests"]
    [n] = cluster.spawn(1)
    fresh = n.call("state", entries=spec(big, seed=2), timeout=60)["digests"]
    cluster.join([n], [v, a])
    v.call("arm_signal", min_tx=8 * MIB)
    gather([v, a], "bump")
    ids = {p.name: p.send("sync", budget=60) for p in (v, a, n)}
    killed = v.wait_event("signalled", timeout=60)
    assert v.wait_exit(timeout=10) == -9
    assert killed["tx_bytes"] < 2 * 128 * MIB, "v served both requesters before the kill"
    ra, rn = a.reply(ids[a.name], timeout=60), n.reply(ids[n.name], timeout=60)
    for r, before, rev in ((ra, dirty, 1), (rn, fresh, 0)):
        why = rejected(r)
        assert "retry" in why, why
        assert r["digests"] == before, "a failed sync left a half-written tensor"
        assert r["state_revision"] == rev
    # Retrying (no bump: the failed sync was not adopted) succeeds with the survivors' content.
    ra, rn = map(synced, gather([a, n], "sync", timeout=60))
    assert rn["rx"] == 128 * MIB and ra["rx"] == 0
    assert converged([a, n]) == dirty


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(60)
def test_bytes_not_matching_the_vote_are_never_committed(cluster):
    sizes = {"w": MIB, "small": KIB}  # "w": 4 MiB, striped over both sources
    a, b, c = peers = cluster.start(3)
    gather(peers, "state", entries=spec(sizes, seed=1))
    for r in gather(peers, "sync"):
        synced(r)
    want = converged(peers)
    c.call("fill", name="w", seed=9)
    dirty = c.call("fill", name="small", seed=9)
    b.call("arm_corrupt", name="w", seed=66)  # b's tensor changes after it voted
    gather(peers, "bump")
    ra, rb, rc = gather(peers, "sync")
    why = rejected(rc)
    assert "'w'" in why and "hash" in why, why
    assert rc["digests"]["w"] == dirty["digests"]["w"], "unverified bytes were committed"
    # Nothing is committed when any entry fails, not even the entries that verified.
    assert rc["digests"]["small"] == dirty["digests"]["small"] != want["small"]
    assert rc["state_revision"] == 1  # its own bump; the group's revision was not adopted
    assert synced(ra)["rx"] == 0 and synced(rb)["rx"] == 0
    # Next round: a (lowest id) wins the three-way tie; b and c are repaired from it.
    a.call("bump")
    b.call("bump")
    ra, rb, rc = map(synced, gather(peers, "sync"))
    assert rb["rx"] == rb["nbytes"]["w"]
    assert rc["rx"] == rc["nbytes"]["w"] + rc["nbytes"]["small"]
    assert converged(peers) == want


# ---------------------------------------------------------------------------------- SharedState


def _torch():
    return pytest.importorskip("torch")


NUMPY_DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8"]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_hash_is_xxh3_128_of_the_raw_little_endian_bytes(dtype):
    arr = (np.arange(1001) % 251).astype(dtype).reshape(7, 11, 13)
    st = pccl.SharedState({"x": arr})
    assert st.hashes() == {
        "x": xxhash.xxh3_128_hexdigest(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    }
    assert st.nbytes == arr.nbytes


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int16", "uint8"])
def test_torch_tensor_hash_matches_its_bytes_and_shares_its_memory(dtype):
    torch = _torch()
    t = torch.arange(300).to(getattr(torch, dtype))
    st = pccl.SharedState({"t": t})
    raw = t.view(torch.int16) if dtype == "bfloat16" else t
    assert st.hashes()["t"] == xxhash.xxh3_128_hexdigest(raw.numpy().tobytes())
    before = st.hashes()["t"]
    t[5] = 7  # the state is a view: a change is visible to the next hash
    assert st.hashes()["t"] != before
    assert st.entries["t"].dtype == pccl.DType[dtype.upper()]


def test_state_is_a_view_of_user_arrays_and_hash_tracks_changes():
    a = np.zeros(10, np.float32)
    st = pccl.SharedState({"a": a, "b": np.ones(3, np.int64)}, revision=4)
    h0 = st.hashes()
    a[3] = 1.0
    h1 = st.hashes()
    assert h1["a"] != h0["a"] and h1["b"] == h0["b"]
    assert st.revision == 4 and st.keys() == ["a", "b"] and len(st) == 2


def test_empty_and_scalar_entries_are_hashed():
    st = pccl.SharedState({"e": np.zeros(0, np.float32), "s": np.array(3.5)})
    assert st.hashes()["e"] == xxhash.xxh3_128_hexdigest(b"")
    assert st.entries["s"].shape == () and st.entries["s"].nbytes == 8


def test_hashes_include_opt_out_entries():
    st = pccl.SharedState({"a": np.zeros(2), "b": np.ones(2)}, allow_content_inequality={"b"})
    assert set(st.hashes()) == {"a", "b"}
    assert st.entries["b"].allow_content_inequality and not st.entries["a"].allow_content_inequality


@pytest.mark.parametrize(
    ("entries", "kwargs", "exc", "words"),
    [
        ({"a": np.zeros((4, 4)).T}, {}, ValueError, "contiguous"),
        ({"a": np.zeros(3, ">f4")}, {}, ValueError, "byte order"),
        ({"a": np.zeros(3, bool)}, {}, TypeError, "bool"),
        ({"a": np.zeros(3, np.uint16)}, {}, TypeError, "uint16"),
        ({"a": np.zeros(3, np.complex64)}, {}, TypeError, "complex64"),
        ({"a": [1.0, 2.0]}, {}, TypeError, "'a'"),
        ({1: np.zeros(3)}, {}, TypeError, "str"),
        ({"": np.zeros(3)}, {}, ValueError, "name"),
        ({"x" * 1025: np.zeros(3)}, {}, ValueError, "name"),
        ({"a": np.zeros(3)}, {"allow_content_inequality": {"zz"}}, ValueError, "zz"),
        ({"a": np.zeros(3)}, {"revision": -1}, ValueError, "revision"),
        ({"a": np.zeros(3)}, {"revision": True}, ValueError, "revision"),
        ([("a", np.zeros(3))], {}, TypeError, "mapping"),
    ],
)
def test_invalid_entries_are_refused_with_a_clear_error(entries, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        pccl.SharedState(entries, **kwargs)


def test_read_only_array_refused():
    a = np.zeros(3)
    a.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pccl.SharedState({"a": a})


def test_non_contiguous_torch_tensor_refused_like_numpy():
    torch = _torch()
    with pytest.raises(ValueError, match="contiguous"):
        pccl.SharedState({"a": torch.zeros(4, 4).t()})


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_requester_killed_mid_transfer_does_not_wedge_its_sources(cluster):
    big = {"big": 16 * MIB}  # 64 MiB
    a, b = sources = cluster.start(
        2, config={"socket_buffer_bytes": 64 * KIB, "local_socket_buffer_bytes": 0}
    )
    gather(sources, "state", entries=spec(big, seed=1), timeout=60)
    for r in gather(sources, "sync"):
        synced(r)
    [n] = cluster.spawn(1)
    n.call("state", entries=spec(big, seed=2), timeout=60)
    cluster.join([n], sources)
    # a freezes itself mid-share; while it is frozen the requester dies; then a resumes.
    a.call("arm_signal", min_tx=8 * MIB, signal_name="SIGSTOP")
    gather(sources, "bump")
    ids = [p.send("sync") for p in (a, b, n)]
    a.wait_event("signalled", timeout=REPLY_TIMEOUT_S)
    a.wait_stopped()
    n.kill()
    os.kill(a.proc.pid, signal.SIGCONT)
    t0 = time.monotonic()
    ra, _ = synced(a.reply(ids[0], timeout=20)), synced(b.reply(ids[1], timeout=20))
    assert time.monotonic() - t0 < 10, "sources waited long for a dead requester"
    assert ra["tx"] < 32 * MIB + 8 * MIB and ra["revision"] == 1
    gather(sources, "bump")
    for r in map(synced, gather(sources, "sync")):
        assert (r["tx"], r["rx"], r["revision"]) == (0, 0, 2)
    converged(sources)


@pytest.mark.e2e
@pytest.mark.chaos
@pytest.mark.timeout(90)
def test_source_hung_mid_transfer_fails_over_or_fails_fast(fast_cluster):
    """A SIGSTOPped source is evicted by the master; the newcomer must not wait on it for its
    whole sync budget (DESIGN §3 liveness): it fails over to the other sources or raises a clean
    SharedStateError soon after, and the group's next sync succeeds."""
    cluster = fast_cluster
    big = {"big": 16 * MIB}  # 64 MiB, striped over 2 sources
    progress_s = 2.0
    cfg = {
        "socket_buffer_bytes": 64 * KIB,
        "local_socket_buffer_bytes": 0,
        "progress_timeout_s": progress_s,
    }
    a, v = sources = cluster.start(2, config=cfg)
    gather(sources, "state", entries=spec(big, seed=1), timeout=60)
    for r in gather(sources, "sync"):
        synced(r)
    want = converged(sources)
    [n] = cluster.spawn(1)
    original = n.call("state", entries=spec(big, seed=2), timeout=60)["digests"]
    cluster.join([n], sources, config=cfg)
    v.call("arm_signal", min_tx=8 * MIB, signal_name="SIGSTOP")
    gather(sources, "bump")
    ids = [p.send("sync", budget=60) for p in (a, v, n)]
    v.wait_event("signalled", timeout=REPLY_TIMEOUT_S)
    v.wait_stopped()
    t0 = time.monotonic()
    deadline = HEARTBEAT_TIMEOUT_S + progress_s + 6  # far below the 60 s sync budget
    got = n.reply(ids[2], timeout=deadline)
    ra = a.reply(ids[0], timeout=deadline)
    assert time.monotonic() - t0 < deadline
    if got["synced"]:
        assert got["digests"] == want and got["rx"] == 64 * MIB
    else:
        assert got["shared_state_error"], got
        assert got["digests"] == original, "a failed sync left a half-written tensor"
    synced(ra)
    survivors = [a, n]
    gather([a], "bump")
    if got["synced"]:
        n.call("bump")
    rs = [synced(r) for r in gather(survivors, "sync", timeout=30)]
    assert rs[1]["rx"] == (0 if got["synced"] else 64 * MIB)
    assert converged(survivors) == want


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_thousands_of_long_named_entries_sync_across_eight_peers(patient_cluster):
    """7850 entries with 106-character names: each vote is ~1.04 MB and the plan of the peer
    fetching every entry from 7 sources ~1.06 MB, over the 1 MiB bound of ordinary control
    frames (regression: the master failed to encode that plan and wedged the group)."""
    n, key_len = 7850, 106
    peers = patient_cluster.start(8)
    ids = [
        p.send("state_many", n=n, key_len=key_len, seed=1 if i < 7 else 2)
        for i, p in enumerate(peers)
    ]
    want = [p.reply(i, timeout=60) for p, i in zip(peers, ids)]
    assert want[0]["digests"] != want[7]["digests"]
    ids = [p.send("sync", budget=30.0) for p in peers]
    reps = [synced(p.reply(i, timeout=60)) for p, i in zip(peers, ids)]
    assert reps[7]["rx"] == n * 8 and sum(r["tx"] for r in reps[:7]) == n * 8
    assert converged(peers) == want[0]["digests"]


# ---------------------------------------------------------------------------------- bench


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_bench_state_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pccl.tools.bench_state", "--mib", "16", "--entries", "2"]
    cmd += ["--sources", "1,2", "--runs", "1", "--hash-gib", "0.01", "--timeout", "60"]
    cmd += ["--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, timeout=110)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout) == res
    assert [p["sources"] for p in res["pull"]] == [1, 2]
    for p in res["pull"]:
        assert p["all_verified"] and p["median_s"] > 0
        [run] = p["runs"]
        assert run["rx_bytes"] == 16 * MIB == sum(run["source_tx_bytes"])
        assert len(run["source_tx_bytes"]) == p["sources"] and min(run["source_tx_bytes"]) > 0
    assert res["hash"]["bytes"] > 0 and res["hash"]["median_s"] > 0
