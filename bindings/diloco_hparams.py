"""What every peer of a DiLoCo run must agree on: the hyper-parameter vector shared as
``diloco/hparams``, its fingerprint in the control vector, and the check a peer runs after its
first sync (a newcomer with other settings is refused, naming each field).

Pure functions of a :class:`~pccl.bindings.diloco.DiLoCo`'s settings and its synced state;
training thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import xxhash
from pccl.bindings.diloco_common import _FINGERPRINT
from pccl.bindings.diloco_fragments import MERGES

if TYPE_CHECKING:  # pragma: no cover
    from pccl.bindings.diloco import DiLoCo

__all__ = ["check_hyperparameters", "fingerprint", "hyperparameters"]

#: Inner-optimizer param groups whose hyper-parameters are compared field by field.
_INNER_GROUPS = 4
_INNER_FIELDS = ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "dampening")


def hyperparameters(d: DiLoCo) -> tuple[list[str], list[float]]:
    """Names and values of what every peer of a run must agree on (``diloco/hparams``).

    The inner optimizer's hyper-parameters are its param groups' ``initial_lr`` (set by LR
    schedulers; else ``lr``), ``momentum``, ``weight_decay``, ``betas``, ``eps`` and
    ``dampening`` of the first few groups; NaN where absent (not compared).
    """
    names = [
        "sync_every",
        "delayed",
        "quantization",
        "outer_lr",
        "outer_momentum",
        "nesterov",
        "error_feedback",
        "bucket_bytes",
        "parameters",
        "extra_state_bytes",
        "min_quorum",
        "grace_s",
        "fragments",
        "overlap",
        "mix",
        "merge",
    ]
    values = [
        float(d.sync_every),
        float(d.delayed),
        float(int(d.quantization)),
        d.outer_lr,
        d.outer_momentum,
        float(d.nesterov),
        float(d.error_feedback),
        float(d.bucket_bytes),
        float(d.numel),
        float(d.extra_state_bytes),
        float(d.min_quorum or 0),
        d.grace_s,
        float(d.fragments),
        float(d.overlap),
        d.mix,
        float(MERGES.index(d.merge)),
    ]
    groups = d.inner_optimizer.param_groups if d.inner_optimizer is not None else []
    nan = float("nan")
    for i in range(_INNER_GROUPS):
        g = groups[i] if i < len(groups) else {}
        betas = g.get("betas")
        betas = betas if isinstance(betas, (tuple, list)) and len(betas) == 2 else (nan, nan)
        found = {
            "lr": g.get("initial_lr", g.get("lr", nan)),
            "momentum": g.get("momentum", nan),
            "weight_decay": g.get("weight_decay", nan),
            "beta1": betas[0],
            "beta2": betas[1],
            "eps": g.get("eps", nan),
            "dampening": g.get("dampening", nan),
        }
        for f in _INNER_FIELDS:
            v = found[f]
            names.append(f"inner_optimizer.param_groups[{i}].{f}")
            values.append(float(v) if isinstance(v, (int, float)) else nan)
    return names, values


def fingerprint(values: np.ndarray) -> int:
    """xxh64 of the float64 hyper-parameter vector, as a signed int64 (the control vector's)."""
    v = xxhash.xxh64_intdigest(values.tobytes())
    return v - (1 << 64) if v >= 1 << 63 else v


def check_hyperparameters(d: DiLoCo) -> None:
    """After the first sync: refuse to train with settings that differ from the run's,
    naming every field that differs (NaN = not set on one side: not compared)."""
    diffs = []
    for name, mine, run in zip(
        d._hparam_names, d._own_hparams.tolist(), d._hparams.tolist(), strict=True
    ):
        if np.isnan(mine) or np.isnan(run) or mine == run:
            continue
        diffs.append(f"{name}: this peer {mine:g}, the run {run:g}")
    if diffs:
        raise ValueError("this peer's DiLoCo settings differ from the run's: " + "; ".join(diffs))
    if int(d._ctrl[_FINGERPRINT]) != fingerprint(d._own_hparams):
        raise ValueError(
            "this peer's DiLoCo settings differ from the run's (fingerprint of "
            + ", ".join(d._hparam_names[:10])
            + ")"
        )
