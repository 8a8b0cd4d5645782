"""The shared-state runner: one ``sync_shared_state`` from vote to completion, on one peer.

:class:`SyncState` names where a sync is: ``HASHING`` its entries (worker thread), ``VOTED``
(waiting for the master's plan), ``FETCHING`` the entries whose hash differs from the elected
one (from every peer that holds them, :mod:`pccl.peer.state_sync`), ``SERVING`` (done here;
still serving the others until the master says the group is complete), then ``IDLE`` again.

A local give-up is announced, like a collective's: before the plan a ``P2M_SYNC_DONE`` with
sync id 0 withdraws the vote; after it a failed ``P2M_SYNC_DONE`` releases the group. A plan
that arrives after the give-up is released the same way. Nothing unverified is ever written
into the caller's tensors. Runs on the peer's event loop; hashing runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import enum
import ssl

import numpy as np
from pccl.peer.p2p import P2PNode
from pccl.peer.ring import BufferPool
from pccl.peer.session import MasterSession
from pccl.peer.state_sync import fetch_entries

from pccl import messages as m
from pccl.config import Config
from pccl.errors import PCCLError, SharedStateError
from pccl.frame import MsgType
from pccl.shared_state import SharedState
from pccl.types import SyncInfo, SyncStrategy

__all__ = ["SyncRunner", "SyncState"]


class SyncState(enum.Enum):
    """Where one shared-state sync is."""

    IDLE = "idle"  #: no sync in progress
    HASHING = "hashing"  #: hashing the entries (worker thread)
    VOTED = "voted"  #: vote sent; waiting for the plan
    FETCHING = "fetching"  #: pulling the differing entries
    SERVING = "serving"  #: done here; serving the others until the group completes


class SyncRunner:
    """Runs the shared-state syncs of one communicator (one at a time)."""

    def __init__(
        self,
        session: MasterSession,
        node: P2PNode,
        config: Config,
        pool: BufferPool,
        token: bytes | None,
        client_ssl: ssl.SSLContext | None,
    ) -> None:
        self.session = session
        self.node = node
        self.config = config
        self.pool = pool
        self.token = token
        self.client_ssl = client_ssl
        self.state = SyncState.IDLE
        self._plan: asyncio.Future[m.SyncPlan] | None = None
        self._complete: asyncio.Future[m.SyncComplete] | None = None
        session.subscribe(
            {
                MsgType.M2P_SYNC_PLAN: self._on_plan,
                MsgType.M2P_SYNC_COMPLETE: self._on_complete,
            }
        )
        session.on_link_lost(self._on_link_lost)

    @property
    def busy(self) -> bool:
        return self.state is not SyncState.IDLE

    def _on_plan(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncPlan)
        if self._plan is None or self._plan.done() or self.state is not SyncState.VOTED:
            # The plan of a sync we already gave up on (local timeout; a retry may be hashing
            # already and has not voted): release the group.
            if msg.ok:
                self.session.send(m.SyncDone(msg.sync_id, False, "gave up before the plan"))
            return
        self._plan.set_result(msg)

    def _on_complete(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncComplete)
        if self._complete is not None and not self._complete.done():
            self._complete.set_result(msg)

    def _on_link_lost(self, err: PCCLError) -> None:
        final = self.session.error  # the session ended: surface its error as is
        for f in (self._plan, self._complete):
            if f is not None and not f.done():
                f.set_exception(
                    final or SharedStateError(f"master connection lost ({err})", phase="sync")
                )
                f.exception()

    async def run(self, state: SharedState, strategy: SyncStrategy, budget: float) -> SyncInfo:
        """One sync (see ``Communicator.sync_shared_state``)."""
        loop = asyncio.get_running_loop()
        plan_f: asyncio.Future[m.SyncPlan] = loop.create_future()
        complete_f: asyncio.Future[m.SyncComplete] = loop.create_future()
        self._plan, self._complete = plan_f, complete_f
        server = self.node.state_server
        snap = server.open(state)
        entries = state.entries
        staging: dict[str, np.ndarray] = {}
        done_sent = vote_sent = False
        error: Exception | None = None
        rx = 0
        session = self.session
        try:
            async with asyncio.timeout(budget):
                self.state = SyncState.HASHING
                digests = await asyncio.to_thread(
                    lambda: [(k, e.hash()) for k, e in entries.items()]
                )
                vote = [
                    (
                        k,
                        int(entries[k].dtype),
                        entries[k].nbytes,
                        list(entries[k].shape),
                        h,
                        entries[k].allow_content_inequality,
                    )
                    for k, h in digests
                ]
                session.send(m.SyncSharedState(state.revision, int(strategy), vote))
                vote_sent = True
                self.state = SyncState.VOTED
                plan = await plan_f
                if not plan.ok:
                    raise SharedStateError(plan.reason, phase="sync")
                snap.sync_id = plan.sync_id
                if plan.fetch:
                    self.state = SyncState.FETCHING
                    addresses = {pid: (host, port) for pid, host, port in plan.sources}
                    for key, _, _ in plan.fetch:
                        staging[key] = self.pool.get(entries[key].nbytes)
                    try:
                        res = await fetch_entries(
                            my_id=session.peer_id,
                            sync_id=plan.sync_id,
                            fetch=plan.fetch,
                            addresses=addresses,
                            state=state,
                            staging=staging,
                            token=self.token,
                            ssl=self.client_ssl,
                            progress_timeout=self.config.progress_timeout_s,
                            connect_timeout=self.config.connect_timeout_s,
                        )
                        rx = res.rx_bytes
                    except (SharedStateError, OSError, TimeoutError) as e:
                        error = e
                session.send(m.SyncDone(plan.sync_id, error is None, str(error or "")[:500]))
                done_sent = True
                self.state = SyncState.SERVING
                await complete_f  # keep serving until every peer of the group is done
        except TimeoutError:
            raise SharedStateError(
                f"shared-state sync did not complete within {budget}s", phase="sync"
            ) from None
        finally:
            ok_plan = plan_f.done() and not plan_f.cancelled() and plan_f.exception() is None
            if ok_plan and not done_sent:
                p = plan_f.result()
                if p.ok:  # release the group: we give up
                    session.send(m.SyncDone(p.sync_id, False, "gave up (timeout or cancel)"))
            elif not plan_f.done() and vote_sent:
                session.send(m.SyncDone(0, False, "vote withdrawn (timeout or cancel)"))
            server.close()
            self._plan = self._complete = None
            self.state = SyncState.IDLE
            for buf in staging.values():
                self.pool.put(buf)
        if error is not None:
            raise SharedStateError(f"state transfer failed: {error}", phase="sync") from error
        state.revision = plan.revision
        return SyncInfo(plan.revision, snap.tx_bytes, rx)
