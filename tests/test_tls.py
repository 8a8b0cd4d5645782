"""Mutual TLS end to end: ``pccl gen-certs`` material, the real ``pccl master --tls-*`` and two
peer processes all-reducing over TLS links (the data plane's transport path: no send thread
may write around the TLS layer), and a plaintext peer refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pccl.tls import generate
from pccl.tools.proc import spawn_master

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PEER = r"""
import json, sys
import numpy as np, xxhash, pccl
from pccl.tls import TLSConfig
addr, idx, ca, cert, key = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
comm = pccl.Communicator(addr, streams=3, tls=TLSConfig(ca, cert, key),
                         config=pccl.Config(local_streams=0, chunk_bytes=1 << 20))
comm.connect(timeout=60)
comm.wait_for_world(2, timeout=60)
n = (6 << 20) + 5
x = np.random.default_rng(idx).standard_normal(n).astype(np.float32)
out = np.empty_like(x)
info = comm.all_reduce(x, out)
want = sum(np.random.default_rng(i).standard_normal(n).astype(np.float32) for i in range(2))
exact = bool(np.array_equal(out, want))
print(json.dumps({"hash": xxhash.xxh3_128_hexdigest(out.data), "exact": exact,
                  "world": info.world_size, "tx": info.tx_bytes}), flush=True)
comm.close()
"""


def test_two_peers_all_reduce_over_mutual_tls(tmp_path: Path) -> None:
    tls = generate(tmp_path / "certs", ["127.0.0.1", "localhost"])
    master, addr = spawn_master(
        extra_args=("--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca)
    )
    try:
        argv = [sys.executable, "-c", PEER, addr]
        peers = [
            subprocess.Popen(
                [*argv, str(i), tls.ca, tls.cert, tls.key],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        results = []
        for p in peers:
            out, err = p.communicate(timeout=100)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        assert results[0]["hash"] == results[1]["hash"]
        assert all(r["exact"] and r["world"] == 2 and r["tx"] > 0 for r in results)

        # A peer speaking plaintext to the TLS master is refused, with a clear error.
        plain = _connect_once(addr, "None")
        assert "refused: MasterUnreachable" in plain and "TLS enabled on only one side" in plain
    finally:
        master.kill()
        master.wait()


def test_tls_peer_refused_by_a_plaintext_master(tmp_path: Path) -> None:
    tls = generate(tmp_path / "certs", ["127.0.0.1"])
    master, addr = spawn_master()
    try:
        out = _connect_once(addr, f"TLSConfig({tls.ca!r}, {tls.cert!r}, {tls.key!r})")
        assert "refused: MasterUnreachable" in out and "is TLS enabled on the master?" in out, out
    finally:
        master.kill()
        master.wait()


def _connect_once(addr: str, tls_expr: str) -> str:
    """Connect one peer with ``tls=<tls_expr>``; return what it printed."""
    code = (
        "import pccl\nfrom pccl.tls import TLSConfig\n"
        f"c = pccl.Communicator({addr!r}, tls={tls_expr})\n"
        "try:\n    c.connect(timeout=20)\n    print('admitted')\n"
        "except pccl.PCCLError as e:\n    print('refused:', type(e).__name__, e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr[-2000:]
