"""The quorum-gate runner: this peer's arrivals at its group's quorum gates.

A gate (``P2M_GATE_ARRIVE`` / ``M2P_GATE_DONE``, see ``docs/protocol.md``) lets the master decide
which peers are in a round: every ring member arrives, ready (it has a contribution) or not yet,
and may upgrade to ready while the gate is open; the master decides once every member has
arrived and all are ready, or ``min_quorum`` are and ``grace_s`` has passed since they were. The
decision lists the ready peers. Straggler-tolerant DiLoCo (``min_quorum=``) is built on it.

Each arrival is an *attempt* numbered per peer and echoed by the master, so a decision about an
attempt this peer gave up on is never taken for a newer one. A local give-up (wait timeout,
cancellation) withdraws. Master link loss fails every open gate (retryable: the master drops a
disconnected peer and with it its arrivals, and the ring it was in is broken).

Runs on the peer's event loop; no bytes but the control messages.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pccl.peer.session import MasterSession

from pccl import messages as m
from pccl.errors import CollectiveAborted, PCCLError, ProtocolError
from pccl.frame import MsgType
from pccl.messages import AbortKind, GateState
from pccl.types import GateResult

__all__ = ["GateHandle", "GateRunner"]


@dataclass
class _Arrival:
    tag: int
    attempt: int
    min_quorum: int
    grace_ms: int
    done: asyncio.Future[m.GateDone]
    ready: bool
    opened: float
    quorum: bool = False  # the master said the quorum is in and the grace runs
    quorum_cbs: list[Callable[[], None]] = field(default_factory=list)


class GateHandle:
    """One arrival at a quorum gate (from ``quorum_gate_async``)."""

    def __init__(self, runner: GateRunner, st: _Arrival) -> None:
        self._runner = runner
        self._st = st
        self.tag = st.tag

    def done(self) -> bool:
        """The master decided (or refused) this arrival, or it failed locally."""
        return self._st.done.done()

    def mark_ready(self) -> None:
        """This peer's contribution is ready: tell the master (once; a no-op when decided)."""
        self._runner.mark_ready(self._st)

    def quorum_reached(self) -> bool:
        """The master said the quorum is in and the grace runs (this peer was not ready)."""
        return self._st.quorum

    def on_quorum(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` (on the event loop) when the master says the quorum is in; at once if
        it already has. A peer that can contribute now marks ready within the grace."""
        if self._st.quorum:
            cb()
        else:
            self._st.quorum_cbs.append(cb)

    async def wait(self, timeout: float | None = None) -> GateResult:
        """The decision. A ``timeout`` (seconds; default ``collective_timeout_s``) that
        expires withdraws the arrival.

        Raises:
            CollectiveAborted: refused or aborted by the master (a member left, the topology
                changed, a member did not arrive within ``start_timeout_s``), the master link
                was lost, or the local timeout expired: re-form and arrive again.
            ProtocolError: the members disagree on ``min_quorum``/``grace_s``.
        """
        st = self._st
        if timeout is None:
            timeout = self._runner.default_timeout_s
        try:
            async with asyncio.timeout(timeout):
                msg = await asyncio.shield(st.done)
        except TimeoutError:
            self._runner.withdraw(st, "timed out locally")
            raise CollectiveAborted(
                f"gate {st.tag}: no decision within {timeout:g} s (timed out locally; "
                "the arrival was withdrawn)",
                tag=st.tag,
                phase="quorum_gate",
            ) from None
        except asyncio.CancelledError:
            self._runner.withdraw(st, "cancelled")
            raise
        return self._runner.result(st, msg)


class GateRunner:
    """The gate arrivals of one communicator (see the module docstring)."""

    def __init__(self, session: MasterSession, default_timeout_s: float = 600.0) -> None:
        self.session = session
        self.default_timeout_s = default_timeout_s
        self.live: dict[int, _Arrival] = {}  # tag -> its current arrival
        self._numbers = itertools.count(1)
        session.subscribe(
            {MsgType.M2P_GATE_DONE: self._on_done, MsgType.M2P_GATE_QUORUM: self._on_quorum}
        )
        session.on_link_lost(self._on_link_lost)

    def start(self, tag: int, ready: bool, min_quorum: int, grace_s: float) -> GateHandle:
        """Arrive at gate ``tag`` (arguments already validated)."""
        old = self.live.get(tag)
        if old is not None and not old.done.done():
            raise ValueError(f"gate tag {tag} is already open on this peer")
        loop = asyncio.get_running_loop()
        st = _Arrival(
            tag,
            next(self._numbers),
            min_quorum,
            round(grace_s * 1000),
            loop.create_future(),
            ready,
            time.monotonic(),
        )
        self.live[tag] = st
        state = GateState.READY if ready else GateState.ARRIVED
        self.session.send(m.GateArrive(tag, st.attempt, int(state), min_quorum, st.grace_ms))
        return GateHandle(self, st)

    def mark_ready(self, st: _Arrival) -> None:
        if st.ready or st.done.done():
            return
        st.ready = True
        msg = m.GateArrive(st.tag, st.attempt, int(GateState.READY), st.min_quorum, st.grace_ms)
        self.session.send(msg)

    def withdraw(self, st: _Arrival, why: str) -> None:
        if st.done.done():
            return
        st.done.set_exception(
            CollectiveAborted(f"gate {st.tag}: withdrawn ({why})", tag=st.tag, phase="quorum_gate")
        )
        st.done.exception()  # retrieved
        if self.live.get(st.tag) is st:
            del self.live[st.tag]
        msg = m.GateArrive(st.tag, st.attempt, int(GateState.WITHDRAW), st.min_quorum, st.grace_ms)
        self.session.send(msg)

    def result(self, st: _Arrival, msg: m.GateDone) -> GateResult:
        if self.live.get(st.tag) is st:
            del self.live[st.tag]
        if not msg.ok:
            if self.session.error is not None:
                raise self.session.error
            if AbortKind.parse(msg.kind) is AbortKind.MISMATCH:
                raise ProtocolError(msg.reason, tag=st.tag, phase="quorum_gate")
            raise CollectiveAborted(f"gate {st.tag}: {msg.reason}", tag=st.tag, phase="quorum_gate")
        me = self.session.peer_id
        ready = tuple(int(q) for q in msg.ready)
        return GateResult(
            round_id=msg.round_id,
            ready=ready,
            members=tuple(int(q) for q in msg.members),
            included=me in ready,
            seconds=time.monotonic() - st.opened,
        )

    def _on_done(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GateDone)
        st = self.live.get(msg.tag)
        if st is None or st.attempt != msg.attempt or st.done.done():
            return  # about an attempt we gave up on
        st.done.set_result(msg)

    def _on_quorum(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GateQuorum)
        st = self.live.get(msg.tag)
        if st is None or st.attempt != msg.attempt or st.done.done() or st.quorum:
            return
        st.quorum = True
        cbs, st.quorum_cbs = st.quorum_cbs, []
        for cb in cbs:
            cb()

    def _on_link_lost(self, err: PCCLError) -> None:
        reason = f"master connection lost ({err})"
        for st in list(self.live.values()):
            if not st.done.done():
                # evicted or closed for good: that error; a lost link: retryable
                exc = self.session.error or CollectiveAborted(
                    reason, tag=st.tag, phase="quorum_gate"
                )
                st.done.set_exception(exc)
                st.done.exception()  # retrieved: nobody may be waiting
        self.live.clear()

    def fail_all(self, err: PCCLError) -> None:
        """The communicator closes: every open arrival fails with ``err``."""
        for st in list(self.live.values()):
            if not st.done.done():
                st.done.set_exception(err)
                st.done.exception()
        self.live.clear()
