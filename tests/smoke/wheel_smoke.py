"""End-to-end smoke test of an installed pccl wheel (run with the venv it is installed in).

    python wheel_smoke.py            # master + 2 peers: all-reduce and a DiLoCo step

Uses nothing from a checkout: it checks that ``pccl`` is imported from site-packages, that
``import pccl`` does not import torch, then starts the installed master and two peer processes
(this file in ``peer`` mode). Each peer all-reduces a vector and takes DiLoCo outer steps on a
tiny model; the parent checks the sums and that both peers hold the same outer state.
Prints one JSON line per peer and ``smoke ok``; exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig


def peer() -> None:
    import numpy as np
    import torch
    from pccl.bindings.torch import DiLoCo

    import pccl

    comm = pccl.Communicator()  # PCCL_MASTER from the environment
    comm.connect(timeout=60)
    comm.wait_for_world(2, timeout=60)
    x = np.arange(1000, dtype=np.float32)
    comm.all_reduce(x)
    ok_sum = bool(np.array_equal(x, np.arange(1000, dtype=np.float32) * 2))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = DiLoCo(comm, model, opt, sync_every=2)
    info = None
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        info = diloco.step(tokens=16) or info
    assert info is not None and info.applied and info.contributors == 2
    digest = "".join(v for _, v in sorted(diloco.hashes().items()))
    shm = int(comm.metrics().get("p2p_shm_links", 0))  # the installed pccl._shm works
    out = {"sum_ok": ok_sum, "outer_step": diloco.outer_step, "digest": digest, "shm_links": shm}
    print(json.dumps(out))
    diloco.close()
    comm.close()


def main() -> int:
    import pccl

    site = sysconfig.get_paths()["purelib"]
    assert pccl.__file__.startswith(site), f"pccl imported from {pccl.__file__}, not {site}"
    assert "torch" not in sys.modules, "import pccl imported torch"
    from pccl.tools.proc import spawn_master

    master, addr = spawn_master("error")
    try:
        env = {**os.environ, "PCCL_MASTER": addr}
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "peer"], stdout=subprocess.PIPE, text=True, env=env
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=180)[0] for p in procs]
        codes = [p.returncode for p in procs]
    finally:
        master.terminate()
        master.wait(10)
    assert codes == [0, 0], (codes, outs)
    res = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    for r in res:
        print(json.dumps(r))
    assert all(r["sum_ok"] for r in res), res
    assert all(r["shm_links"] >= 1 for r in res), res  # loopback payloads went through /dev/shm
    assert res[0]["digest"] == res[1]["digest"] and res[0]["outer_step"] == 2, res
    print(f"smoke ok: pccl {pccl.__version__} from {os.path.dirname(pccl.__file__)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["peer"]:
        peer()
        sys.exit(0)
    sys.exit(main())
