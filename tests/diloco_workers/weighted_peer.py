"""A DiLoCo peer for the token-weighting test: one outer step of a fixed toy model.

``python weighted_peer.py MASTER JSON`` with ``{"shard": i, "tokens": t, "world": n}``. Every
peer starts from the same parameters (seed 0), moves them by a shard-specific deterministic
step, and calls ``DiLoCo.step(tokens=t)`` once (H = 1, no quantization). It prints its
pseudo-gradient, the starting parameters and the outer parameters after the step as hex float32
bytes, so the test can recompute the token-weighted mean in numpy and compare bytes.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    import torch
    from pccl.bindings.torch import DiLoCo

    import pccl

    p = json.loads(sys.argv[2])
    torch.set_num_threads(1)
    comm = pccl.Communicator(sys.argv[1])
    comm.connect(timeout=60)
    comm.wait_for_world(int(p["world"]), timeout=60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))

    def flat() -> Any:
        return torch.cat([q.detach().reshape(-1) for q in model.parameters()]).numpy().copy()

    d = DiLoCo(comm, model, None, sync_every=1, quantization=pccl.Quantization.NONE)
    theta0 = flat()
    g = torch.Generator().manual_seed(1000 + int(p["shard"]))
    with torch.no_grad():
        for q in model.parameters():
            q.sub_(0.01 * torch.randn(q.shape, generator=g))
    local = flat()
    info = d.step(tokens=int(p["tokens"]))
    assert info is not None
    outer = torch.cat([t.reshape(-1) for t in d.outer_parameters().values()]).numpy()
    emit(
        "result",
        theta0=theta0.tobytes().hex(),
        grad=(theta0 - local).tobytes().hex(),
        outer=outer.tobytes().hex(),
        weight=info.weight,
        contributors=info.contributors,
        applied=info.applied,
    )
    d.close()
    comm.close()


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:
        emit("error", type=type(e).__name__, message=str(e), traceback=traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)
    sys.exit(0)
