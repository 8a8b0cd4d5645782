"""Untimely is normal: late starts, local give-ups and lost verdicts, with real processes.

- A peer that keeps heartbeating but starts a collective late: the master's start deadline
  (``start_timeout_s``) aborts the operation for the others within that deadline, naming the
  laggard; everyone retries the same tag and it succeeds; ``update_topology()`` works; nobody
  is kicked (peer ids unchanged).
- A local give-up (the peer's own start deadline, shorter than the master's) withdraws its
  initiate: retrying the same tag and ``update_topology()`` work (they used to get the peer
  kicked for initiating twice).
- A peer that keeps heartbeating but never votes ``update_topology()``: the voters get a
  retryable ``TopologyUpdateFailed`` naming it within ``vote_timeout_s`` (they used to wait
  forever, and with them every admission).
- A verdict lost to a cut master link after the ring finished: the peer reconnects under its
  id, asks the master for the verdict of its operation and keeps the result, so every peer
  ends with the same bytes (it used to restore its input while the others kept the result).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from pccl import messages as m
from pccl.frame import HEADER, MsgType

pytestmark = pytest.mark.e2e

WORLD = 3


def _run(workers, master, params: dict, env: dict[str, str] | None = None, world: int = WORLD):
    ws = [
        workers.spawn("untimely.py", master, {"world": world, "idx": i, **params}, env=env)
        for i in range(world)
    ]
    return ws, workers.wait_exit(ws, 150)


def test_late_start_aborts_within_the_master_deadline_then_retry_works(master_factory, workers):
    master = master_factory(PCCL_START_TIMEOUT_S="2")
    late = WORLD - 1
    ws, res = _run(workers, master, {"late": late, "delay": 3.0})
    late_id = res[ws[late].name]["peer_id_before"]
    for i, w in enumerate(ws):
        r = res[w.name]
        assert r["ok"], r
        assert r["peer_id_before"] == r["peer_id_after"], "a peer was kicked and rejoined"
        assert r["first"] == r["exact"] and r["second"] == r["exact"], r
        if i == late:
            continue
        # The others were aborted by the master's start deadline, naming the laggard.
        first = r["errors"][0]
        assert f"[{late_id}]" in first["message"] and "start_timeout_s" in first["message"], r
        assert first["s"] < 2.0 + 1.5, first


def test_local_give_up_withdraws_so_retry_and_update_topology_work(master, workers):
    # The peers' own start deadline (0.5 + 2 * 1.5 = 3.5 s) is far shorter than the master's
    # (60 s): the early peers give up locally, withdraw, and retry the same tag.
    env = {"PCCL_START_TIMEOUT_S": "0.5", "PCCL_HEARTBEAT_TIMEOUT_S": "1.5"}
    late = WORLD - 1
    ws, res = _run(workers, master, {"late": late, "delay": 5.0}, env=env)
    for i, w in enumerate(ws):
        r = res[w.name]
        assert r["ok"] and r["peer_id_before"] == r["peer_id_after"], r
        assert r["first"] == r["exact"] and r["second"] == r["exact"], r
        if i != late:
            assert any("withdrawn" in e["message"] for e in r["errors"]), r
    assert "initiated twice" not in master.log_tail()


def test_a_peer_that_never_votes_gets_the_voters_a_named_retryable_error(master_factory, workers):
    master = master_factory(PCCL_VOTE_TIMEOUT_S="2")
    late = WORLD - 1
    ws, res = _run(workers, master, {"mode": "novote", "late": late, "delay": 4.0})
    late_id = res[ws[late].name]["peer_id"]
    for i, w in enumerate(ws):
        r = res[w.name]
        assert r["new_epoch"] and r["second"] == r["exact"], r
        if i == late:
            continue
        first = r["errors"][0]
        assert first["type"] == "TopologyUpdateFailed", r
        assert f"[{late_id}]" in first["message"] and "vote_timeout_s" in first["message"], r
        assert first["s"] < 2.0 + 1.5, first


class CuttingProxy:
    """A TCP proxy to the master that cuts the first connection on which the master sends a
    successful ``M2P_COLLECTIVE_DONE``, before forwarding it: the verdict is lost with the link.
    Later connections are forwarded untouched."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.cut = threading.Event()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return

        async def up() -> None:
            while data := await cr.read(65536):
                uw.write(data)
                await uw.drain()

        async def down() -> None:
            while True:
                hdr = await ur.readexactly(HEADER.size)
                _, _, mtype, length = HEADER.unpack(hdr)
                body = await ur.readexactly(length)
                if mtype == MsgType.M2P_COLLECTIVE_DONE and not self.cut.is_set():
                    done = m.decode(MsgType.M2P_COLLECTIVE_DONE, body)
                    assert isinstance(done, m.CollectiveDone)
                    if done.ok:
                        self.cut.set()
                        return  # drop the verdict with the link
                cw.write(hdr + body)
                await cw.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        # A closed side ends its pump with OSError/IncompleteReadError: expected, retrieved here.
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (cw, uw):
            w.transport.abort()


@pytest.fixture
def proxy(master) -> Iterator[CuttingProxy]:
    with CuttingProxy((master.host, master.port)) as p:
        yield p


def test_verdict_lost_to_a_link_cut_is_recovered_and_bytes_agree(master, workers, proxy):
    world = 2

    class Via:  # the peer behind the proxy dials it instead of the master
        address = f"127.0.0.1:{proxy.port}"

    params = {"world": world, "idx": 0, "rejoin": True}
    a = workers.spawn("untimely.py", Via, params)  # type: ignore[arg-type]
    b = workers.spawn("untimely.py", master, {"world": world, "idx": 1, "rejoin": True})
    res = workers.wait_exit([a, b], 150)
    assert proxy.cut.is_set(), "the verdict was never cut: the test did not test anything"
    ra, rb = res[a.name], res[b.name]
    # Peer a lost its verdict with its link, rejoined under its id and learnt the verdict.
    assert ra["ok"] and not ra["errors"], ra
    assert ra["peer_id_before"] == ra["peer_id_after"], ra
    assert ra["first"] == rb["first"] == ra["exact"], (ra, rb)
    assert ra["second"] == rb["second"] == ra["exact"], (ra, rb)
