"""Shared-state election: which content wins, who is outdated, who fetches what from whom.

Pure functions over the votes of one peer group (no sockets, no tensor bytes).

Rules:
- Strategies: ENFORCE_POPULAR may not be mixed with SEND_ONLY/RECEIVE_ONLY in one sync; the
  non-enforcing peers are rejected. RECEIVE_ONLY peers never compete for the content. If nobody
  competes, every peer is rejected.
- Revision: the first sync of a group may start at any revision: the target is the highest
  revision voted. Afterwards the target is exactly previous + 1; a higher revision is rejected
  (increment violation), a lower one is outdated and dragged forward. If no competing peer holds
  the target (the up-to-date peers all left), the highest revision present becomes the target.
- Content: among competing peers at the target revision, the entry set (keys, dtypes, shapes,
  hashes; ``allow_content_inequality`` entries compare by layout only) held by the most peers
  wins; ties go to the set held by the lowest peer id (the longest-standing peer).
- A peer whose keys, dtypes or shapes differ from the winner is rejected with the difference
  spelled out; the others continue. A SEND_ONLY peer that does not hold the winning content is
  rejected (its content must not be overwritten).
- Every other peer fetches each entry whose hash differs from the winner's, from every peer at
  the target revision holding the winner's hash for that entry (the receiver stripes over them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pccl.types import DType, SyncStrategy

__all__ = ["EntryVote", "Plan", "SyncVote", "elect"]


@dataclass(frozen=True)
class EntryVote:
    dtype: int
    nbytes: int
    shape: tuple[int, ...]
    hash: bytes
    loose: bool  # allow_content_inequality


@dataclass(frozen=True)
class SyncVote:
    peer_id: int
    revision: int
    strategy: SyncStrategy
    entries: dict[str, EntryVote]

    def layout(self) -> tuple[tuple[str, int, int, tuple[int, ...], bool], ...]:
        return tuple(
            (k, e.dtype, e.nbytes, e.shape, e.loose) for k, e in sorted(self.entries.items())
        )

    def content(self) -> tuple[tuple[str, bytes], ...]:
        return tuple((k, b"" if e.loose else e.hash) for k, e in sorted(self.entries.items()))


@dataclass
class Plan:
    ok: bool
    reason: str = ""
    revision: int = 0
    fetch: dict[str, tuple[bytes, list[int]]] = field(default_factory=dict)  # key -> hash, srcs


def _dt(code: int) -> str:
    try:
        return DType(code).name.lower()
    except ValueError:
        return f"dtype#{code}"


def _layout_diff(mine: SyncVote, want: SyncVote) -> str:
    a, b = set(mine.entries), set(want.entries)
    parts = []
    if b - a:
        parts.append(f"missing {sorted(b - a)[:8]}")
    if a - b:
        parts.append(f"unexpected {sorted(a - b)[:8]}")
    for k in sorted(a & b):
        x, y = mine.entries[k], want.entries[k]
        if (x.dtype, x.nbytes, x.shape, x.loose) != (y.dtype, y.nbytes, y.shape, y.loose):
            parts.append(
                f"{k!r}: dtype/shape/opt-out ({_dt(x.dtype)}, {x.shape}, {x.loose}) "
                f"vs elected ({_dt(y.dtype)}, {y.shape}, {y.loose})"
            )
            if len(parts) > 8:
                break
    return "; ".join(parts)


def elect(votes: dict[int, SyncVote], next_revision: int | None) -> tuple[dict[int, Plan], int]:
    """Decide a sync.

    Args:
        votes: one vote per participating peer.
        next_revision: revision the group must reach now (None before its first sync).

    Returns:
        ``(plans, target)``: a plan per voter and the revision the group reaches.
    """
    plans: dict[int, Plan] = {}
    live = dict(votes)
    strategies = {v.strategy for v in live.values()}
    if SyncStrategy.ENFORCE_POPULAR in strategies and len(strategies) > 1:
        for pid, v in list(live.items()):
            if v.strategy != SyncStrategy.ENFORCE_POPULAR:
                plans[pid] = Plan(
                    False, f"{v.strategy.name} cannot be mixed with ENFORCE_POPULAR in one sync"
                )
                del live[pid]
    if next_revision is None:
        target = max((v.revision for v in live.values()), default=0)
    else:
        target = next_revision
        for pid, v in list(live.items()):
            if v.revision > target:
                plans[pid] = Plan(
                    False,
                    f"revision {v.revision} skips ahead: the group is at {target - 1}, "
                    f"a sync must carry exactly {target}",
                )
                del live[pid]
    competing = [v for v in live.values() if v.strategy != SyncStrategy.RECEIVE_ONLY]
    if not competing:
        for pid in live:
            plans[pid] = Plan(False, "no peer offers content (all RECEIVE_ONLY)")
        return plans, target
    if not any(v.revision == target for v in competing):
        target = max(v.revision for v in competing)
        for pid, v in list(live.items()):  # never move a peer's revision backwards
            if v.revision > target:
                plans[pid] = Plan(
                    False,
                    f"revision {v.revision} is ahead of every peer offering content "
                    f"(highest {target})",
                )
                del live[pid]
    holders = [v for v in competing if v.revision == target]
    counts = Counter((v.layout(), v.content()) for v in holders)
    first_holder: dict[tuple, int] = {}
    for v in sorted(holders, key=lambda v: v.peer_id):
        first_holder.setdefault((v.layout(), v.content()), v.peer_id)
    best = max(counts, key=lambda c: (counts[c], -first_holder[c]))
    winner = votes[first_holder[best]]
    for pid, v in list(live.items()):
        if v.layout() != winner.layout():
            plans[pid] = Plan(False, f"shared state layout differs: {_layout_diff(v, winner)}")
            del live[pid]
        elif v.strategy == SyncStrategy.SEND_ONLY and v.content() != winner.content():
            plans[pid] = Plan(
                False, f"SEND_ONLY peer does not hold the elected content (peer {winner.peer_id}'s)"
            )
            del live[pid]
    sources: dict[str, list[int]] = {}
    for k, e in winner.entries.items():
        if not e.loose:
            sources[k] = sorted(
                pid
                for pid, v in live.items()
                if v.revision == target and v.entries[k].hash == e.hash
            )
    for pid, v in live.items():
        fetch = {
            k: (winner.entries[k].hash, [s for s in srcs if s != pid])
            for k, srcs in sources.items()
            if v.entries[k].hash != winner.entries[k].hash
        }
        plans[pid] = Plan(True, "", target, fetch)
    return plans, target
