"""The asyncio API (``pccl.aio``) with pytest-asyncio, and the conventions around it.

Real master process, real sockets: two ``pccl.aio.Communicator`` peers in one event loop connect,
all-reduce, sync shared state and pass a quorum gate; the master address and the auth token
come from the environment (``PCCL_MASTER``, ``PCCL_AUTH_TOKEN_FILE``) as in a torchrun-style
launch; ``pccl --version`` and the help texts are checked from the installed entry point.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pccl
import pccl.aio

TOKEN = b"aio-test-token-0123456789abcdef"


async def _group(n: int, **kw: Any) -> list[pccl.aio.Communicator]:
    comms = [pccl.aio.Communicator(**kw) for _ in range(n)]

    async def start(c: pccl.aio.Communicator) -> None:
        await c.connect(timeout=30)
        await c.wait_for_world(n, timeout=30)

    await asyncio.gather(*(start(c) for c in comms))
    return comms


@pytest.mark.timeout(60)
async def test_aio_peers_in_one_loop_reduce_sync_and_gate(
    master: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PCCL_MASTER", master.address)
    comms = await _group(2)  # no address passed: PCCL_MASTER
    try:
        assert all(c.group_world_size == 2 for c in comms)
        data = [np.arange(1000, dtype=np.float32) * (i + 1) for i in range(2)]
        infos = await asyncio.gather(*(c.all_reduce(d) for c, d in zip(comms, data, strict=True)))
        for d in data:
            np.testing.assert_array_equal(d, np.arange(1000, dtype=np.float32) * 3)
        assert all(i.tx_bytes > 0 for i in infos)
        states = [pccl.SharedState({"w": np.full(64, float(i), np.float32)}) for i in range(2)]
        states[1].revision = 5  # the most up-to-date content wins
        await asyncio.gather(*(c.sync_shared_state(s) for c, s in zip(comms, states, strict=True)))
        assert states[0].hashes() == states[1].hashes()
        assert states[0].entries["w"].array.tolist() == [1.0] * 64
        gates = await asyncio.gather(
            *(c.quorum_gate(9, ready=True, min_quorum=2, timeout=10) for c in comms)
        )
        assert gates[0].ready == gates[1].ready and all(g.included for g in gates)
    finally:
        await asyncio.gather(*(c.close() for c in comms))


@pytest.mark.timeout(60)
async def test_aio_context_manager_and_errors(master: Any) -> None:
    async with pccl.aio.Communicator(master.address) as c:
        await c.connect(timeout=30)
        with pytest.raises(pccl.TooFewPeers):
            await c.all_reduce(np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="tag"):
            await c.all_reduce(np.zeros(4, np.float32), tag=-1)
    with pytest.raises(pccl.PCCLError):
        await c.all_reduce(np.zeros(4, np.float32))  # closed


def test_master_address_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCCL_MASTER", raising=False)
    with pytest.raises(ValueError, match="PCCL_MASTER"):
        pccl.Communicator()
    with pytest.raises(ValueError, match="PCCL_MASTER"):
        pccl.aio.Communicator()


@pytest.mark.timeout(60)
def test_token_file_from_the_environment(
    master_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_bytes(TOKEN + b"\n")
    m = master_factory(PCCL_AUTH_TOKEN_FILE=str(token))  # the master's --token-file default
    monkeypatch.setenv("PCCL_MASTER", m.address)
    monkeypatch.delenv("PCCL_AUTH_TOKEN_FILE", raising=False)
    with pccl.Communicator() as c, pytest.raises(pccl.AuthenticationFailed):
        c.connect(timeout=10)  # no token: refused, so the master really requires one
    monkeypatch.setenv("PCCL_AUTH_TOKEN_FILE", str(token))
    with pccl.Communicator() as c:
        c.connect(timeout=10)
        assert c.peer_id > 0
    monkeypatch.setenv("PCCL_AUTH_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="PCCL_AUTH_TOKEN_FILE"):
        pccl.Communicator()


def _pccl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pccl.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_version_and_help_texts_are_plain() -> None:
    out = _pccl("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"pccl {pccl.__version__}"
    for cmd in (
        [],
        ["master"],
        ["bench"],
        ["bench", "allreduce"],
        ["bench", "kernels"],
        ["demo"],
        ["status"],
        ["chaos"],
        ["hammer"],
        ["gen-certs"],
    ):
        h = _pccl(*cmd, "--help")
        assert h.returncode == 0, (cmd, h.stderr)
        for markup in ("``", ":class:", ":meth:", ":func:", ":mod:"):
            assert markup not in h.stdout, (cmd, markup, h.stdout)


@pytest.mark.timeout(60)
async def test_master_judges_parity_from_shared_state_votes() -> None:
    """A replica that diverged (different bytes at the revision everyone is at) is a parity
    violation in the master's /status and /metrics, naming the peer and the entry; it is
    repaired by the sync. Peers at the same bytes are judged and pass."""
    import json
    import urllib.request

    from pccl.master import Master

    async with Master("127.0.0.1", 0, status_port=0, status_host="127.0.0.1") as master:
        addr = f"127.0.0.1:{master.port}"
        comms = await _group(3, master=addr)
        try:
            arrays = [np.arange(256, dtype=np.float32) for _ in comms]
            states = [pccl.SharedState({"w": a, "m": np.ones(8, np.float32)}) for a in arrays]

            async def sync_all() -> list[pccl.SyncInfo]:
                return await asyncio.gather(
                    *(c.sync_shared_state(s) for c, s in zip(comms, states, strict=True))
                )

            await sync_all()
            for s in states:
                s.revision += 1
            arrays[2][7] += 1.0  # peer 2's replica diverges
            infos = await sync_all()
            assert infos[2].rx_bytes > 0 and arrays[2][7] == 7.0  # repaired
            url = f"http://127.0.0.1:{master.status_server.port}"  # type: ignore[union-attr]
            doc = json.loads(
                await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/status").read())
            )
            parity = doc["parity"]
            assert parity["violations"] == 1 and parity["syncs_judged"] == 2, parity
            (v,) = parity["recent"]
            assert v["peer_id"] == comms[2].peer_id and v["entries"] == ["w"] and v["revision"] == 1
            text = (
                await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/metrics").read())
            ).decode()
            assert (
                "pccl_parity_violations_total 1.0" in text and "pccl_syncs_judged_total 2.0" in text
            )
        finally:
            await asyncio.gather(*(c.close() for c in comms))
