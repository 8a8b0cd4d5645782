"""FSDP + DiLoCo: one pccl peer group per shard index.

Recipe (runnable version: ``examples/fsdp_diloco.py``). Every *replica* is an ordinary FSDP job
(torch.distributed inside the replica: NCCL on GPUs, gloo on CPUs); replicas never form a
torch.distributed group with each other. Across replicas only pccl is used, and rank ``i`` of
every replica talks only to rank ``i`` of the others::

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import pccl
    from pccl.bindings.fsdp import peer_group_for_rank
    from pccl.bindings.torch import DiLoCo

    dist.init_process_group(...)                        # this replica's ranks only
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)                                  # FSDP2: parameters become DTensors
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)   # after sharding

    comm = pccl.Communicator(MASTER, peer_group=peer_group_for_rank(dist.get_rank()))
    comm.connect()
    diloco = DiLoCo(comm, model, inner, sync_every=500)  # right after connect()
    for batch in data:
        loss = model(batch).loss; loss.backward(); inner.step(); inner.zero_grad()
        diloco.step()

``DiLoCo`` takes each DTensor parameter's local shard (``to_local()``, which shares memory with
the parameter), so the outer parameters, momentum and pseudo-gradients of group ``i`` are exactly
shard ``i``: its all-reduce moves ``1/ranks`` of the model, and its shared state is hashed and
repaired per shard. Requirements:

* every replica has the same model, mesh size and sharding, so equal ranks hold equal shard
  shapes (check with :func:`shard_layout`; the master rejects a mismatched sync by name and
  shape);
* all ranks reach their boundaries together: ``update_topology()`` is global (every peer of every
  group votes), which FSDP's own collectives guarantee within a replica;
* a replica that loses a rank is broken as an FSDP job: restart the whole replica; its ranks
  rejoin their groups as newcomers and receive their shards;
* FSDP1 (``FullyShardedDataParallel``) works the same way with ``use_orig_params=False``: each
  rank's parameters are its flat-parameter shards (plain tensors, passed through as they are).
  With ``use_orig_params=True`` the original parameters are views whose local sizes can differ
  between ranks; pass :func:`local_shards` of the FSDP2 model instead.

Pure helpers; no I/O.
"""

from __future__ import annotations

import torch
from pccl.bindings.torch import local_tensor

__all__ = ["local_shards", "peer_group_for_rank", "shard_layout"]


def peer_group_for_rank(rank: int, base: int = 0) -> int:
    """pccl peer group of FSDP rank ``rank`` (``base`` separates several runs on one master)."""
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    return base + rank


def local_shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: this rank's local shard}`` of every trainable parameter (shares memory)."""
    return {n: local_tensor(p) for n, p in model.named_parameters() if p.requires_grad}


def shard_layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str]]:
    """``{name: (local shape, global shape, placements)}``: equal on rank i of every replica."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        placements = str(tuple(getattr(p, "placements", ())))
        out[n] = (tuple(local_tensor(p).shape), tuple(p.shape), placements)
    return out
