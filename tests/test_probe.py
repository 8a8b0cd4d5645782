"""Link probes (pccl.peer.probe) between two real p2p listeners: authentication, RTT and rate,
and a window-bound link (a delay proxy capping each connection's in-flight bytes) probed again
over parallel connections, reporting the link's aggregate rate rather than one window's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pccl.peer.p2p import P2PNode
from pccl.peer.probe import Prober, probe_link, window_bound

from pccl import messages as m
from pccl.config import Config
from pccl.tools import wanproxy

pytestmark = pytest.mark.timeout(60)
TOKEN = b"t" * 32


class _Session:
    """The two things a Prober needs of a master session."""

    def __init__(self) -> None:
        self.sent: list[m.Message] = []

    def subscribe(self, handlers: Any) -> None:
        pass

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)


async def _nodes(cfg: Config) -> tuple[P2PNode, P2PNode, int]:
    a, b = P2PNode(cfg, 1, TOKEN), P2PNode(cfg, 1, TOKEN)
    await a.start("127.0.0.1")
    port = await b.start("127.0.0.1")
    a.my_id, b.my_id = 1, 2
    return a, b, port


def test_a_probe_authenticates_and_measures_rtt_and_rate() -> None:
    async def main() -> None:
        cfg = Config()
        a, b, port = await _nodes(cfg)
        try:
            gbps, rtt_ms = await probe_link(a, "127.0.0.1", port, 7, 8 << 20, 0.1)
            assert gbps > 0.05 and 0 < rtt_ms < 100
            assert b.stats["probed"] == 1
            stranger = P2PNode(cfg, 1, b"x" * 32)
            stranger.my_id = 3
            with pytest.raises(ConnectionRefusedError):
                await probe_link(stranger, "127.0.0.1", port, 7, 8 << 20, 0.1)
            assert b.stats["rejected"] == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_window_bound_link_is_probed_again_in_parallel() -> None:
    async def main() -> None:
        cfg = Config(max_streams=8)
        a, b, port = await _nodes(cfg)
        # 4 MiB in flight per connection over a 50 ms one-way path: ~42 MB/s per stream.
        with wanproxy.spawn(f"127.0.0.1:{port}", 50.0, 4.0) as px:
            try:
                single = await probe_link(a, "127.0.0.1", px.port, 7, 64 << 20, 0.5)
                assert window_bound(single, cfg)
                session = _Session()
                prober = Prober(session, a)  # type: ignore[arg-type]
                await prober._run(m.ProbePlan(9, 64 << 20, 0.5, [(2, "127.0.0.1", px.port)]))
                (report,) = session.sent
                assert isinstance(report, m.ProbeReport) and report.ok
                ((peer, gbps, rtt_ms),) = report.links
                assert peer == 2 and 90 < rtt_ms < 400
                assert gbps > 2.5 * single[0]  # the link's rate, not one window's
                assert a.links[2] == (gbps, rtt_ms)
            finally:
                await a.close()
                await b.close()

    asyncio.run(main())
