"""Ring order from measured links: the bottleneck solver, the link table and the probe schedule.

A ring all-reduce moves every byte over every hop at the pace of the slowest one, so the order
to pick is the one whose slowest hop is fastest (the *bottleneck* objective); among orders with
the same bottleneck, the one with the least total round-trip time (every ring step pays one hop
latency). :func:`solve_ring` is exact for small groups (every cyclic order is tried) and a
deterministic heuristic for large ones (greedy widest-neighbour tour, then 2-opt and Or-opt moves
on the bottleneck objective under a fixed move budget). Same input, same output, on every
machine: nothing here reads a clock or a random source, and ties end on the order's ids.

:class:`LinkTable` caches what peers measured (``gbps``, ``rtt_ms`` per direction) and what the
ring itself reaches during real operations; :func:`probe_rounds` pairs peers so that each one
probes a single partner at a time (a round-robin tournament: no link shares an endpoint with
another probe of its round).

Pure functions and plain data; the master's event-loop thread uses them. Cost: exact search
is ``(n-1)!/2`` orders of ``n`` hops (``n <= EXACT_MAX``: at most 20,160 orders); the heuristic
costs at most ``MOVE_BUDGET`` hop evaluations.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "EXACT_MAX",
    "MOVE_BUDGET",
    "Link",
    "LinkTable",
    "RingPlan",
    "evaluate",
    "probe_rounds",
    "solve_ring",
]

#: Groups up to this size are solved exactly.
EXACT_MAX = 9
#: Hop evaluations the heuristic may spend on local search (deterministic: counted, not timed).
MOVE_BUDGET = 4_000_000
#: Round-trip time assumed for a link nobody measured (ms): it loses every tie.
UNKNOWN_RTT_MS = 1e6


@dataclass(frozen=True)
class RingPlan:
    """An order and what it is predicted to reach: its slowest hop (Gbit/s, 0 when a hop is
    unmeasured) and the sum of its hops' RTTs (ms)."""

    order: tuple[int, ...]
    bottleneck_gbps: float
    total_rtt_ms: float
    exact: bool = True


Weights = Mapping[tuple[int, int], float]


def _key(bottleneck: float, rtt: float) -> tuple[float, float]:
    return (-bottleneck, rtt)


def evaluate(order: Sequence[int], gbps: Weights, rtt_ms: Weights) -> tuple[float, float]:
    """``(bottleneck Gbit/s, total RTT ms)`` of the directed ring ``order`` (a -> next(a));
    an unmeasured hop counts 0 Gbit/s and ``UNKNOWN_RTT_MS``."""
    n = len(order)
    if n < 2:
        return (math.inf, 0.0)
    low, total = math.inf, 0.0
    for i in range(n):
        hop = (order[i], order[(i + 1) % n])
        low = min(low, gbps.get(hop, 0.0))
        total += rtt_ms.get(hop, UNKNOWN_RTT_MS)
    return (low, total)


def _canonical(order: Sequence[int]) -> tuple[int, ...]:
    """The rotation of ``order`` that starts at its smallest id."""
    i = min(range(len(order)), key=order.__getitem__)
    return tuple(order[i:]) + tuple(order[:i])


def _undirected(
    peers: Sequence[int], gbps: Weights, rtt_ms: Weights
) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """Both directions folded into one weight per pair: the mean rate and the mean RTT (links
    are near-symmetric, and a short probe errs low more often than high, so one low reading
    must not sink a fast pair; the final direction is chosen on the directed rates)."""
    w: dict[tuple[int, int], float] = {}
    r: dict[tuple[int, int], float] = {}
    for a, b in itertools.combinations(peers, 2):
        ab, ba = gbps.get((a, b)), gbps.get((b, a))
        known = [x for x in (ab, ba) if x is not None]
        w[(a, b)] = w[(b, a)] = sum(known) / len(known) if known else 0.0
        rs = [x for x in (rtt_ms.get((a, b)), rtt_ms.get((b, a))) if x is not None]
        r[(a, b)] = r[(b, a)] = sum(rs) / len(rs) if rs else UNKNOWN_RTT_MS
    return w, r


def _directed_best(order: Sequence[int], gbps: Weights, rtt_ms: Weights) -> tuple[int, ...]:
    """``order`` or its reverse, whichever is better on the directed links (ties: ids)."""
    fwd = _canonical(order)
    rev = _canonical(list(reversed(order)))
    kf = (_key(*evaluate(fwd, gbps, rtt_ms)), fwd)
    kr = (_key(*evaluate(rev, gbps, rtt_ms)), rev)
    return kf[1] if kf <= kr else kr[1]


def _exact(peers: list[int], w: Weights, r: Weights) -> tuple[int, ...]:
    first, rest = peers[0], peers[1:]
    best: tuple[tuple[float, float], tuple[int, ...]] | None = None
    for perm in itertools.permutations(rest):
        if len(perm) > 1 and perm[0] > perm[-1]:
            continue  # its reverse is the same undirected cycle
        order = (first, *perm)
        cand = (_key(*evaluate(order, w, r)), order)
        if best is None or cand < best:
            best = cand
    assert best is not None
    return best[1]


class _Tour:
    """An undirected tour under local search (2-opt, then Or-opt moves of 1-3 peers), with
    the first peer fixed (rotations are the same ring). ``score`` is minimised."""

    def __init__(self, order: list[int], w: Weights, r: Weights) -> None:
        self.order = order
        self.w = w
        self.r = r
        self.spent = 0
        self.threshold = -1.0  # < 0: leximin phase; else: constrained RTT phase

    def score(self, order: Sequence[int]) -> tuple:
        """Leximin phase: the hop rates sorted ascending, negated (raising the slowest hop,
        then the next slowest... a move that lifts any slow hop is progress, so the search
        does not stall on a plateau of equal bottlenecks). Constrained phase: (hops slower
        than the bottleneck found, total RTT)."""
        n = len(order)
        self.spent += n
        w, r = self.w, self.r
        hops = [(order[i], order[(i + 1) % n]) for i in range(n)]
        if self.threshold < 0:
            return (*tuple(sorted(-w[h] for h in hops)[::-1]), sum(r[h] for h in hops))
        t = self.threshold
        return (sum(1 for h in hops if w[h] < t), sum(r[h] for h in hops))

    def improve(self, budget: int) -> None:
        best = self.score(self.order)
        improved = True
        while improved and self.spent < budget:
            improved = False
            n = len(self.order)
            for i, j in itertools.combinations(range(1, n), 2):  # 2-opt: reverse [i, j]
                if self.spent >= budget:
                    return
                o = self.order
                cand = o[:i] + o[i : j + 1][::-1] + o[j + 1 :]
                s = self.score(cand)
                if s < best:
                    self.order, best, improved = cand, s, True
            for length in (1, 2, 3):  # Or-opt: move a segment of 1-3 peers elsewhere
                for i in range(1, n - length + 1):
                    for k in range(1, n - length + 1):
                        if self.spent >= budget:
                            return
                        o = self.order
                        seg, rest = o[i : i + length], o[:i] + o[i + length :]
                        if k == i:
                            continue
                        cand = rest[:k] + seg + rest[k:]
                        s = self.score(cand)
                        if s < best:
                            self.order, best, improved = cand, s, True


def _greedy(peers: list[int], w: Weights, r: Weights) -> list[int]:
    """Start at the smallest id; always go to the widest unvisited link (then lowest RTT,
    then smallest id)."""
    order = [peers[0]]
    left = set(peers[1:])
    while left:
        a = order[-1]
        nxt = min(left, key=lambda b: (-w[(a, b)], r[(a, b)], b))
        order.append(nxt)
        left.discard(nxt)
    return order


def _heuristic(ids: list[int], w: Weights, r: Weights, budget: int) -> tuple[int, ...]:
    """Greedy tours from a few starting peers, each improved on the leximin objective; the
    best one's bottleneck then fixed while its total RTT is minimised. Half the budget goes to
    the starts, the rest to the RTT phase."""
    starts = ids[: max(1, min(4, len(ids)))]
    share = budget // (2 * len(starts))
    best: tuple[tuple[float, float], list[int]] | None = None
    for s in starts:
        tour = _Tour(_greedy([s, *[q for q in ids if q != s]], w, r), w, r)
        tour.improve(share)
        i = tour.order.index(ids[0])
        order = tour.order[i:] + tour.order[:i]
        cand = (_key(*evaluate(order, w, r)), order)
        if best is None or cand < best:
            best = cand
    assert best is not None
    tour = _Tour(best[1], w, r)
    tour.threshold = -best[0][0]
    tour.improve(budget // 2)
    return tuple(tour.order)


def solve_ring(
    peers: Iterable[int],
    gbps: Weights,
    rtt_ms: Weights,
    *,
    exact_max: int = EXACT_MAX,
    budget: int = MOVE_BUDGET,
) -> RingPlan:
    """The ring order of ``peers`` whose slowest hop is fastest, ties broken by total RTT.

    Args:
        peers: peer ids (any order; duplicates ignored).
        gbps: measured rate of each directed link ``(a, b)`` (a sends to b), Gbit/s; a missing
            link counts as 0 (the solver avoids it when it can).
        rtt_ms: measured round-trip time of each link, ms.
        exact_max: groups up to this size are solved exactly.
        budget: hop evaluations the heuristic may spend (larger groups).

    Returns:
        The plan, its order rotated to start at the smallest id.
    """
    ids = sorted(set(peers))
    if len(ids) <= 2:
        order = tuple(ids)
        low, total = evaluate(order, gbps, rtt_ms)
        return RingPlan(order, low, total, True)
    w, r = _undirected(ids, gbps, rtt_ms)
    exact = len(ids) <= exact_max
    best = _exact(ids, w, r) if exact else _heuristic(ids, w, r, budget)
    order = _directed_best(best, gbps, rtt_ms)
    low, total = evaluate(order, gbps, rtt_ms)
    return RingPlan(order, low, total, exact)


def probe_rounds(peers: Iterable[int]) -> list[list[tuple[int, int]]]:
    """Pair every two of ``peers`` once, in rounds where each peer has at most one partner
    (the circle method: ``n - 1`` rounds for even ``n``, ``n`` for odd). Deterministic."""
    ids = sorted(set(peers))
    if len(ids) % 2:
        ids.append(0)  # 0 is never a peer id: its partner sits the round out
    n = len(ids)
    rounds: list[list[tuple[int, int]]] = []
    ring = ids[1:]
    for _ in range(n - 1):
        line = [ids[0], *ring]
        pairs = [(line[i], line[n - 1 - i]) for i in range(n // 2)]
        rounds.append([(min(a, b), max(a, b)) for a, b in pairs if a and b])
        ring = ring[-1:] + ring[:-1]
    return rounds


@dataclass
class Link:
    """One directed link's estimate: rate (Gbit/s) and RTT (ms); when probed, and the best
    rate the ring reached over it in real operations."""

    gbps: float = 0.0
    rtt_ms: float = 0.0
    probed_at: float = 0.0  # time.monotonic(); 0: never probed
    observed_gbps: float = 0.0


@dataclass
class LinkTable:
    """The master's estimates of every measured directed link, ``(a, b)``: a sends to b."""

    links: dict[tuple[int, int], Link] = field(default_factory=dict)
    probes: int = 0  # probe rounds completed
    probe_seconds: float = 0.0  # wall time of the last probe round

    def record_probe(self, a: int, b: int, gbps: float, rtt_ms: float, now: float) -> None:
        link = self.links.setdefault((a, b), Link())
        link.gbps = max(0.0, gbps)
        link.rtt_ms = max(0.0, rtt_ms)
        link.probed_at = now

    def record_ring(self, a: int, b: int, gbps: float) -> None:
        """The ring moved ``gbps`` over ``a -> b`` in a real operation: a lower bound of that
        link's rate (every hop runs at the slowest one's pace), so it raises an estimate that
        a short probe set too low and never lowers one."""
        if gbps <= 0 or not math.isfinite(gbps):
            return
        link = self.links.get((a, b))
        if link is None:
            return  # never probed: a lower bound alone would rank it above measured links
        link.observed_gbps = max(link.observed_gbps, gbps)

    def forget(self, peer: int) -> None:
        """Drop every link of a departed peer (its id is never reused)."""
        for key in [k for k in self.links if peer in k]:
            del self.links[key]

    def estimate(self, a: int, b: int) -> Link | None:
        return self.links.get((a, b))

    def weights(self, peers: Iterable[int]) -> tuple[dict, dict]:
        """``(gbps, rtt_ms)`` maps over the links among ``peers`` (for :func:`solve_ring`)."""
        ids = set(peers)
        g: dict[tuple[int, int], float] = {}
        r: dict[tuple[int, int], float] = {}
        for (a, b), link in self.links.items():
            if a in ids and b in ids:
                g[(a, b)] = max(link.gbps, link.observed_gbps)
                r[(a, b)] = link.rtt_ms
        return g, r

    def missing(
        self, peers: Iterable[int], max_age_s: float, now: float | None = None
    ) -> list[tuple[int, int]]:
        """Pairs ``(a < b)`` of ``peers`` with a direction never probed, or probed more than
        ``max_age_s`` ago (0: any age is fine)."""
        now = time.monotonic() if now is None else now
        ids = sorted(set(peers))
        out = []
        for a, b in itertools.combinations(ids, 2):
            for key in ((a, b), (b, a)):
                link = self.links.get(key)
                stale = max_age_s > 0 and link is not None and now - link.probed_at > max_age_s
                if link is None or not link.probed_at or stale:
                    out.append((a, b))
                    break
        return out

    def matrix(self, peers: Sequence[int]) -> dict[str, object]:
        """For ``/status``: ids, and row ``a`` column ``b`` the estimated Gbit/s and RTT ms of
        ``a -> b`` (None where unmeasured)."""
        ids = list(peers)
        gbps: list[list[float | None]] = []
        rtt: list[list[float | None]] = []
        for a in ids:
            grow: list[float | None] = []
            rrow: list[float | None] = []
            for b in ids:
                link = self.links.get((a, b)) if a != b else None
                grow.append(None if link is None else round(max(link.gbps, link.observed_gbps), 4))
                rrow.append(None if link is None else round(link.rtt_ms, 3))
            gbps.append(grow)
            rtt.append(rrow)
        return {"peers": ids, "gbps": gbps, "rtt_ms": rtt}
