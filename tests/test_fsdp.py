"""FSDP recipe: ``examples/fsdp_diloco.py`` runs 2 replicas x 2 FSDP ranks (CPU, gloo inside each
replica) with rank i of every replica in pccl peer group i, and every group's shard (outer state
and the FSDP parameters themselves) must hash identically across replicas after every outer step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pccl.bindings.fsdp import local_shards, peer_group_for_rank, shard_layout

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp_diloco.py"


def test_helpers_on_an_unsharded_model() -> None:
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    shards = local_shards(model)
    assert list(shards) == ["weight"] and shards["weight"] is model.weight
    assert shard_layout(model) == {"weight": ((2, 3), (2, 3), "()")}
    assert peer_group_for_rank(3, base=10) == 13
    with pytest.raises(ValueError):
        peer_group_for_rank(-1)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_fsdp_replicas_keep_shards_identical(tmp_path: Path) -> None:
    steps = 4
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--json",
            "--replicas",
            "2",
            "--ranks",
            "2",
            "--outer-steps",
            str(steps),
            "--sync-every",
            "5",
            "--timeout",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=230,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no summary (rc {proc.returncode})\n{proc.stdout}\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert summary["ok"], f"{summary['failures']}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0
    digests = summary["digests"]
    assert sorted(digests) == sorted(f"{g}/{s}" for g in (0, 1) for s in range(1, steps + 1))
    for key, by_replica in digests.items():
        assert sorted(by_replica) == ["0", "1"], key
        assert len(set(by_replica.values())) == 1, f"group/step {key}: {by_replica}"
    for s in range(1, steps + 1):  # the two groups hold different shards
        assert digests[f"0/{s}"]["0"] != digests[f"1/{s}"]["0"]
    shards = summary["shards"]
    assert shards["0/0"] == shards["1/0"] and shards["0/1"] == shards["1/1"]
    total = sum(v[0] for v in shards["0/0"].values()) + sum(v[0] for v in shards["0/1"].values())
    assert total > 0
    loss = summary["loss"]
    assert loss[-1] < loss[0] - 0.2, loss  # it trains
