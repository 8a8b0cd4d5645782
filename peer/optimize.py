"""``optimize_topology()`` on the peer: the vote and the wait for the master's decision.

See :mod:`pccl.master.optimize` for the master's side and :mod:`pccl.peer.probe` for the link
probes the vote sets off. Runs on the communicator's event loop.
"""

from __future__ import annotations

import asyncio
import logging

from pccl.peer.session import MasterSession, SessionState

from pccl import messages as m
from pccl.errors import TopologyUpdateFailed

log = logging.getLogger("pccl.peer")

__all__ = ["optimize_topology"]


async def optimize_topology(
    session: MasterSession, timeout: float, min_gain: float, reprobe: bool
) -> bool:
    """Vote ``optimize_topology()`` and wait for the master's decision.

    The master (:mod:`pccl.master.optimize`) probes the links it has no fresh estimate of
    (``probe_time_s`` and at most ``probe_max_bytes`` per directed pair, in ``n - 1`` rounds
    of disjoint pairs, only pairs not cached), solves for the ring whose slowest hop is
    fastest and re-wires only when that beats the current ring's bottleneck by ``min_gain``.
    Re-wiring is one epoch set-up (every peer dials its new successor).

    Returns:
        True when the ring was re-ordered, False when it was kept.

    Raises:
        TopologyUpdateFailed: refused, failed (a departure, a deadline) or out of ``timeout``.
        ConnectionLost: the session ended.
    """

    session.check_usable()
    start = session.epoch
    before = session.last_done
    link = session.link
    try:
        async with asyncio.timeout(timeout):
            session._vote_refused = None
            session.send(m.OptimizeTopology(float(min_gain), bool(reprobe)))

            def settled() -> bool:
                done = session.last_done
                return (
                    session.epoch > start
                    or (done is not before and done is not None)
                    or session.link is not link
                    or session.state is not SessionState.ACCEPTED
                )

            await session.wait_for(settled)
            done = session.last_done
            if session.epoch > start:
                session._voted_epoch = session.epoch
                return True
            if done is not None and done is not before:
                session._vote_refused = None
                if done.ok:
                    log.info("optimize_topology: %s", done.reason or "order kept")
                    return False
                raise TopologyUpdateFailed(done.reason, phase="optimize_topology")
            raise TopologyUpdateFailed(
                "the master link was replaced during optimize_topology(); call "
                "update_topology() and retry",
                phase="optimize_topology",
            )
    except TimeoutError:
        raise TopologyUpdateFailed(
            "optimize_topology did not complete in time (does every peer call it?)",
            phase="optimize_topology",
        ) from None
