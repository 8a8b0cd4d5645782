"""The WAN testbed's network: network namespaces with a heterogeneous link per peer pair.

Node ``m`` (the master) and peers ``p0 .. pN-1``, each in its own namespace on the control
bridge of a :class:`pccl.tools.netns.Cluster` (10.231.0.x/24). Every pair of peers also gets its
own veth link (``l<j>`` in peer i's namespace, ``l<i>`` in j's) and a /32 route to the other's
address over it, so peer-to-peer TCP takes the pair's own link while master traffic stays on the
bridge; each direction has its own ``tc tbf`` rate. Used by :mod:`pccl.tools.wantestbed` and
``pccl bench allreduce --testbed``. Needs root and iproute2.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
from pathlib import Path

from pccl.tools import netns

__all__ = ["Testbed", "brute_force", "planted_rates"]

RATE_BURST = "256kb"  # above the MTU-sized (GSO) packets of MTU 65535


def _rate_mbit(rate: str) -> float:
    r = rate.lower()
    for unit, k in (("gbit", 1000.0), ("mbit", 1.0), ("kbit", 1e-3)):
        if r.endswith(unit):
            return float(r[: -len(unit)]) * k
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


class Testbed:
    """Master node ``m`` and ``peers`` peer nodes with a link per pair (see the module
    docstring). ``rates[(i, j)]`` is the tbf rate of i -> j (``"200mbit"``); missing: none."""

    def __init__(self, peers: int, rates: dict[tuple[int, int], str], tag: str | None = None):
        if not 2 <= peers <= 16:
            raise ValueError("2..16 peers")
        self.peers = peers
        self.rates = dict(rates)
        self.names = [f"p{i}" for i in range(peers)]
        self.cluster = netns.Cluster(["m", *self.names], tag=tag)

    def up(self) -> Testbed:
        c = self.cluster.up()
        try:
            for i, j in itertools.combinations(range(self.peers), 2):
                a, b = c.ns(self.names[i]), c.ns(self.names[j])
                netns._ip(
                    "-n", a, "link", "add", f"l{j}", "mtu", str(c.mtu),
                    "type", "veth", "peer", "name", f"l{i}", "mtu", str(c.mtu), "netns", b,
                )  # fmt: skip
                for src, dst, ns in ((i, j, a), (j, i, b)):
                    dev = f"l{dst}"
                    netns._ip("-n", ns, "link", "set", dev, "up")
                    me, other = c.ip(self.names[src]), c.ip(self.names[dst])
                    netns._ip(
                        "-n", ns, "route", "add", f"{other}/32", "dev", dev, "src", me
                    )  # fmt: skip
                    rate = self.rates.get((src, dst))
                    if rate:
                        netns._run(
                            ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev,
                             "root", "tbf", "rate", rate, "burst", RATE_BURST, "latency", "50ms"]
                        )  # fmt: skip
        except BaseException:
            c.down()
            raise
        return self

    def down(self) -> None:
        self.cluster.down()

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def ip(self, node: str) -> str:
        return self.cluster.ip(node)

    def popen(self, node: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as err:
            return subprocess.Popen(
                self.cluster.exec_argv(node, argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )


def planted_rates(
    peers: int, fast: str, slow: str, seed: int, fast_share: float = 0.3
) -> dict[tuple[int, int], str]:
    """Symmetric pair rates: a hidden ring of ``fast`` links (a seeded shuffle), the other
    pairs ``fast`` with probability ``fast_share``, else ``slow``."""
    rng = random.Random(seed)
    ring = list(range(peers))
    rng.shuffle(ring)
    fast_pairs = {frozenset((ring[k], ring[(k + 1) % peers])) for k in range(peers)}
    out: dict[tuple[int, int], str] = {}
    for i, j in itertools.combinations(range(peers), 2):
        rate = fast if frozenset((i, j)) in fast_pairs or rng.random() < fast_share else slow
        out[(i, j)] = out[(j, i)] = rate
    return out


def _bottleneck(order: list[int], rates: dict[tuple[int, int], str]) -> float:
    n = len(order)
    return min(_rate_mbit(rates[(order[k], order[(k + 1) % n])]) for k in range(n))


def brute_force(peers: int, rates: dict[tuple[int, int], str]) -> tuple[list[int], list[int]]:
    """The orders (starting at 0) with the fastest and the slowest bottleneck of ``rates``
    (ties: fewer slowest hops, then the smallest order)."""

    def key(order: list[int]) -> tuple[float, int]:
        n = len(order)
        hops = [_rate_mbit(rates[(order[k], order[(k + 1) % n])]) for k in range(n)]
        low = min(hops)
        return (low, -sum(1 for h in hops if h == low))

    orders = [[0, *p] for p in itertools.permutations(range(1, peers))]
    best = max(orders, key=lambda o: (key(o), [-x for x in o]))
    worst = min(orders, key=lambda o: (key(o), o))
    return best, worst
