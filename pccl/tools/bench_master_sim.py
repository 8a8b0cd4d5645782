"""Simulated peers for ``pccl bench master`` (one worker process of it).

A :class:`SimPeer` is one control connection speaking the real protocol: challenge and HMAC
hello, heartbeats, topology (it reports ready without wiring p2p links), votes, collectives
(it completes as soon as an operation commences), shared-state votes (every peer holds the
same content, so plans are empty), reconnection with its id after a master restart. A
:class:`GroupSim` drives one peer group's rounds; a :class:`Worker` owns whole groups and
answers the launcher's commands (one JSON object per stdin/stdout line).

Runs on one event loop; nothing here touches tensor bytes.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

from pccl import messages as m
from pccl.auth import new_nonce, prove
from pccl.errors import ProtocolError
from pccl.frame import PROTOCOL_VERSION, FrameDecoder, MsgType
from pccl.types import DType, ReduceOp

__all__ = ["GroupSim", "SimPeer", "Worker"]

WAIT_S = 60.0  # deadline of every round a group waits for
_HB = m.Heartbeat(0).encode()


def address(idx: int) -> str:
    """A distinct loopback source address per simulated peer."""
    return f"127.{10 + idx // 62500}.{(idx // 250) % 250}.{idx % 250 + 1}"


class SimPeer(asyncio.Protocol):
    """One simulated peer's control connection (see the module docstring)."""

    def __init__(self, w: Worker, idx: int, group: int) -> None:
        self.w = w
        self.idx = idx
        self.group = group
        self.peer_id = 0
        self.transport: asyncio.Transport | None = None
        self.dec = FrameDecoder()
        self.alive = False  # welcomed, link up
        self.accepted = False
        self.accepted_at = 0.0
        self.silent = False  # hang victim: no heartbeat, no completion
        self.dropped = False  # killed on purpose: never reconnects
        self.resumed = False
        self.kicks: list[str] = []
        self.epoch = 0
        self.world = 0
        self.topo: m.Topology | None = None
        self.attempt = 0
        self.waiters: dict[Any, asyncio.Future[Any]] = {}
        self._nonce = b""
        self._welcome: asyncio.Future[m.Welcome] | None = None
        self._reconnecting = False

    # ------------------------------------------------------------------ connection

    async def connect(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        self.dec = FrameDecoder()
        self._welcome = loop.create_future()
        await asyncio.wait_for(
            loop.create_connection(
                lambda: self, "127.0.0.1", self.w.port, local_addr=(address(self.idx), 0)
            ),
            timeout,
        )
        welcome = await asyncio.wait_for(self._welcome, timeout)
        self.resumed = bool(self.peer_id) and welcome.peer_id == self.peer_id
        self.peer_id = welcome.peer_id
        self.alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.accepted = False
        self.transport = None
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(ConnectionError("lost before welcome"))
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_result(("lost", 0.0))
        self.waiters.clear()
        if not self.dropped and self.peer_id and not self._reconnecting:
            self._reconnecting = True
            asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        deadline = time.monotonic() + 90.0
        try:
            while not self.dropped and time.monotonic() < deadline:
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                try:
                    async with self.w.handshakes:
                        await self.connect(10.0)
                    return
                except (OSError, TimeoutError, ConnectionError):
                    if self.transport is not None:
                        self.transport.abort()
        finally:
            self._reconnecting = False

    def send(self, msg: m.Message) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(msg.encode())

    def drop(self) -> None:
        """Crash: reset the connection, never come back."""
        self.dropped = True
        if self.transport is not None:
            self.transport.abort()

    def wait(self, key: Any) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        old = self.waiters.get(key)
        if old is not None and not old.done():
            old.set_result(("superseded", 0.0))
        self.waiters[key] = fut
        if not self.alive:
            fut.set_result(("lost", 0.0))
        return fut

    def _resolve(self, key: Any, value: Any) -> None:
        fut = self.waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result((value, time.monotonic()))

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        try:
            for mtype, body in self.dec.feed(data):
                if mtype is MsgType.M2P_HEARTBEAT:
                    continue
                handler = _HANDLERS.get(mtype)
                if handler is not None:
                    handler(self, m.decode(mtype, body))
        except ProtocolError as e:
            self.kicks.append(f"protocol: {e}")
            if self.transport is not None:
                self.transport.abort()

    def on_challenge(self, msg: m.Challenge) -> None:
        self._nonce = new_nonce()
        proof = prove(self.w.token, b"pccl-hello", msg.nonce, self._nonce)
        port = 20000 + self.idx % 40000
        self.send(m.Hello(PROTOCOL_VERSION, self.group, port, "", self.peer_id, self._nonce, proof))

    def on_welcome(self, msg: m.Welcome) -> None:
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(msg)

    def on_topology(self, msg: m.Topology) -> None:
        self.topo = msg
        self.send(m.TopologyReady(msg.epoch, True))

    def on_topology_done(self, msg: m.TopologyDone) -> None:
        if msg.ok and self.topo is not None and self.topo.epoch == msg.epoch:
            self.epoch = msg.epoch
            self.world = self.topo.world_size
            if not self.accepted:
                self.accepted = True
                self.accepted_at = time.time()
            self._resolve("topo", True)
        elif not msg.ok:
            self._resolve("topo", msg.reason or "refused")

    def on_commence(self, msg: m.CollectiveCommence) -> None:
        self._resolve(("commence", msg.tag), True)
        if not self.silent:
            self.send(m.CollectiveComplete(msg.tag, msg.op_id, True, "", 1 << 20, 0.01))

    def on_collective_done(self, msg: m.CollectiveDone) -> None:
        self._resolve(("coll", msg.tag), msg.ok)

    def on_sync_plan(self, msg: m.SyncPlan) -> None:
        if msg.ok:
            self.send(m.SyncDone(msg.sync_id, True))
        else:
            self._resolve("sync", False)

    def on_sync_complete(self, msg: m.SyncComplete) -> None:
        self._resolve("sync", True)

    def on_kick(self, msg: m.Kick) -> None:
        self.kicks.append(f"{m.KickCode(msg.code).name}: {msg.reason}")


_HANDLERS: dict[MsgType, Any] = {
    MsgType.M2P_CHALLENGE: SimPeer.on_challenge,
    MsgType.M2P_WELCOME: SimPeer.on_welcome,
    MsgType.M2P_TOPOLOGY: SimPeer.on_topology,
    MsgType.M2P_TOPOLOGY_DONE: SimPeer.on_topology_done,
    MsgType.M2P_COLLECTIVE_COMMENCE: SimPeer.on_commence,
    MsgType.M2P_COLLECTIVE_DONE: SimPeer.on_collective_done,
    MsgType.M2P_SYNC_PLAN: SimPeer.on_sync_plan,
    MsgType.M2P_SYNC_COMPLETE: SimPeer.on_sync_complete,
    MsgType.M2P_KICK: SimPeer.on_kick,
}


async def _gather(futs: list[asyncio.Future[Any]], timeout: float) -> list[Any]:
    """Results of ``futs`` as (value, monotonic time); ("timeout", 0) for those not done."""
    if futs:
        await asyncio.wait(futs, timeout=timeout)
    out = []
    for f in futs:
        if f.done():
            out.append(f.result())
        else:
            f.cancel()
            out.append(("timeout", 0.0))
    return out


class GroupSim:
    """The members of one peer group and the rounds they run together."""

    def __init__(self, gid: int) -> None:
        self.gid = gid
        self.members: list[SimPeer] = []
        self.revision = 0
        self.tag = 0

    def live(self) -> list[SimPeer]:
        return [p for p in self.members if p.alive and not p.dropped]

    def voters(self) -> list[SimPeer]:
        return [p for p in self.live() if p.accepted]

    async def vote_round(self) -> tuple[bool, list[float]]:
        """Every accepted member votes ``update_topology``; pending members wait to be
        admitted. Returns (all accepted now, each voter's latency)."""
        voters = self.voters()
        if not voters:  # nobody to vote: a lone newcomer is admitted at once; wait for it
            futs = [p.wait("topo") for p in self.live()]
            await _gather(futs, 5.0)
            return all(p.accepted for p in self.live()), []
        t0 = time.monotonic()
        live = self.live()
        futs = []
        for p in live:
            futs.append(p.wait("topo"))
            if p.accepted:
                p.send(m.UpdateTopology(p.epoch))
        res = await _gather(futs, WAIT_S)
        lat = [t - t0 for (v, t), p in zip(res, live, strict=True) if v is True and p in voters]
        return all(v is True for v, _ in res), lat

    async def collective(self) -> tuple[bool, float]:
        members = self.voters()
        if len(members) < 2:
            return False, 0.0
        self.tag = (self.tag + 1) % 1000
        t0 = time.monotonic()
        futs = []
        for p in members:
            futs.append(p.wait(("coll", self.tag)))
            p.attempt += 1
            p.send(
                m.CollectiveInitiate(
                    self.tag, p.attempt, 1 << 18, int(DType.FLOAT32), int(ReduceOp.SUM), 0
                )
            )
        res = await _gather(futs, WAIT_S)
        ok = all(v is True for v, _ in res)
        return ok, max(t for _, t in res) - t0 if ok else 0.0

    async def sync(self) -> tuple[bool, float]:
        members = self.voters()
        if not members:
            return False, 0.0
        self.revision += 1
        entry = ("w", int(DType.FLOAT32), 1 << 20, [1 << 18], bytes(16), False)
        t0 = time.monotonic()
        futs = []
        for p in members:
            futs.append(p.wait("sync"))
            p.send(m.SyncSharedState(self.revision, 0, [entry]))
        res = await _gather(futs, WAIT_S)
        ok = all(v is True for v, _ in res)
        return ok, max(t for _, t in res) - t0 if ok else 0.0


class Worker:
    """One simulating process: whole groups, driven by the launcher's commands."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.port = int(spec["port"])
        self.token = str(spec["token"]).encode()
        n, g, w, ws = spec["peers"], spec["groups"], spec["worker"], spec["workers"]
        self.groups = {gid: GroupSim(gid) for gid in range(g) if gid % ws == w}
        self.peers: list[SimPeer] = []
        for i in range(n):
            if i % g in self.groups:
                p = SimPeer(self, i, i % g)
                self.groups[i % g].members.append(p)
                self.peers.append(p)
        self._next_idx = n + w
        self._stride = ws
        self.handshakes = asyncio.Semaphore(48)
        self.hb_interval = 0.5

    # ------------------------------------------------------------------ plumbing

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        hb = loop.create_task(self._heartbeats())
        self._out({"event": "up", "peers": len(self.peers)})
        try:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return 0
                cmd = json.loads(line)
                if cmd["cmd"] == "quit":
                    return 0
                try:
                    res = await getattr(self, f"cmd_{cmd['cmd']}")(cmd)
                except Exception as e:  # reported to the launcher, which fails the run
                    res = {"error": f"worker {self.spec['worker']}: {type(e).__name__}: {e}"}
                self._out(res)
        finally:
            hb.cancel()

    def _out(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def _heartbeats(self) -> None:
        """Every peer heartbeats every interval, spread over the interval in slices."""
        while True:
            peers = [p for p in self.peers if p.alive and not p.silent]
            slices = 10
            step = max(1, len(peers) // slices + 1)
            for k in range(0, max(len(peers), 1), step):
                for p in peers[k : k + step]:
                    t = p.transport
                    if t is not None and not t.is_closing() and not p.silent:
                        t.write(_HB)
                await asyncio.sleep(self.hb_interval / slices)

    async def _join(self, p: SimPeer) -> None:
        async with self.handshakes:
            await p.connect()

    def _new_peer(self, group: GroupSim) -> SimPeer:
        p = SimPeer(self, self._next_idx, group.gid)
        self._next_idx += self._stride
        group.members.append(p)
        self.peers.append(p)
        return p

    async def _admit_all(self, deadline: float) -> None:
        """Vote in every group with pending members until everyone is accepted."""

        async def one(g: GroupSim) -> None:
            while any(not p.accepted for p in g.live()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group {g.gid} not admitted in time")
                ok, _ = await g.vote_round()
                if not ok:
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one(g) for g in self.groups.values()))

    def _kicks(self) -> int:
        return sum(len(p.kicks) for p in self.peers)

    # ------------------------------------------------------------------ commands

    async def cmd_admit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + 240.0
        await asyncio.gather(*(self._join(p) for p in self.peers))
        await self._admit_all(deadline)
        return {
            "all_accepted_at": max(p.accepted_at for p in self.peers),
            "kicks": self._kicks(),
        }

    async def cmd_steady(self, cmd: dict[str, Any]) -> dict[str, Any]:
        end = time.monotonic() + float(cmd["duration"])
        period = 1.0 / float(cmd["op_rate"])
        topo_every, sync_every = int(cmd["topology_every"]), int(cmd["sync_every"])
        out: dict[str, Any] = {"collective": [], "topology": [], "sync": [], "aborted": 0}

        async def run_group(g: GroupSim) -> None:
            await asyncio.sleep(random.random() * period)  # groups do not move in lockstep
            step, stale = 0, False
            while time.monotonic() < end:
                t0 = time.monotonic()
                step += 1
                if stale or step % topo_every == 0:
                    ok, lat = await g.vote_round()
                    out["topology"].extend(lat)
                    stale = not ok
                    if stale:
                        await asyncio.sleep(0.05)
                        continue
                ok, dt = await g.collective()
                if ok:
                    out["collective"].append(dt)
                else:
                    out["aborted"] += 1
                    stale = True
                    continue
                if step % sync_every == 0:
                    ok, dt = await g.sync()
                    if ok:
                        out["sync"].append(dt)
                await asyncio.sleep(max(0.0, period - (time.monotonic() - t0)))

        churned = 0

        async def churn() -> None:
            nonlocal churned
            rate = float(cmd["churn"])
            if rate <= 0:
                return
            while time.monotonic() < end - 1.0:
                await asyncio.sleep(1.0 / rate)
                g = random.choice(list(self.groups.values()))
                victims = g.voters()
                if len(victims) < 3:
                    continue
                random.choice(victims).drop()
                churned += 1
                p = self._new_peer(g)
                asyncio.get_running_loop().create_task(self._join(p))

        await asyncio.gather(churn(), *(run_group(g) for g in self.groups.values()))
        await self._admit_all(time.monotonic() + 60.0)  # newcomers of the last seconds
        out["churned"] = churned
        return out

    async def cmd_kill(self, cmd: dict[str, Any]) -> dict[str, Any]:
        mode, k = str(cmd["mode"]), int(cmd["groups"])
        cands = [g for g in self.groups.values() if len(g.voters()) >= 3]
        chosen = random.sample(cands, min(k, len(cands)))

        async def one(g: GroupSim) -> float:
            await g.vote_round()  # a stable ring first
            members = g.voters()
            victim = members[-1]
            g.tag = (g.tag + 1) % 1000
            tag = g.tag
            others = [p.wait(("coll", tag)) for p in members[:-1]]
            commenced = [p.wait(("commence", tag)) for p in members[:-1]]
            victim.silent = True  # it never completes: a hang, or a crash once it commenced
            t_kill = time.monotonic()
            for p in members:
                p.attempt += 1
                p.send(
                    m.CollectiveInitiate(
                        tag, p.attempt, 1 << 18, int(DType.FLOAT32), int(ReduceOp.SUM), 0
                    )
                )
            if mode == "crash":
                await _gather(commenced, WAIT_S)
                t_kill = time.monotonic()
                victim.drop()
            res = await _gather(others, WAIT_S)
            if any(v is not False for v, _ in res):
                raise RuntimeError(f"group {g.gid}: the {mode} victim's operation was not aborted")
            victim.dropped = True
            if victim.transport is not None:
                victim.transport.abort()
            await g.vote_round()  # the group re-forms without it
            return max(t for _, t in res) - t_kill

        detect = await asyncio.gather(*(one(g) for g in chosen))
        return {"detect": list(detect)}

    async def cmd_settle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await self._admit_all(time.monotonic() + 60.0)
        return {}

    async def cmd_recover(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = float(cmd["t0"])
        deadline = time.monotonic() + 240.0
        live = [p for p in self.peers if not p.dropped]
        while any(not p.alive for p in live):  # reconnecting on their own
            if time.monotonic() > deadline:
                raise TimeoutError("peers did not reconnect in time")
            await asyncio.sleep(0.05)
        await self._admit_all(deadline)
        return {
            "all_accepted_at": max(p.accepted_at for p in live),
            "resumed": sum(p.resumed for p in live),
            "accepted_after_t0": sum(p.accepted_at >= t0 for p in live),
        }
