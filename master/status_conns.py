"""Connection slots of the master's HTTP status endpoint: named states and who gets evicted.

Each status connection is a small state machine (:class:`ConnState`: reading its request →
responding → lingering → closed) whose only transitions are listed in :data:`TRANSITIONS`;
:meth:`SlotTable.advance` is the one function that moves it. :class:`SlotTable` decides
admission with two caps: at most :data:`MAX_CLIENTS` connections in all and at most
:data:`MAX_PER_ADDRESS` from one source address (an IPv6 client counts by its /64). When a cap
is reached, a connection past its useful life is evicted for the newcomer, in this order:

1. ``LINGERING``: its response is already in the kernel, only the closing handshake is left;
2. ``RESPONDING`` for longer than :data:`SLOW_RESPONSE_S`: a client too slow to take its answer;
3. ``READING_REQUEST``: a client that has not finished sending its request (oldest first).

Within a tier the victim comes from the address holding the most slots, then the oldest. Only
a response younger than :data:`SLOW_RESPONSE_S` is never evicted; a newcomer that finds nothing
else to evict is refused. So no number of clients that linger, trickle, stay silent or do not
read can lock the endpoint for longer than :data:`SLOW_RESPONSE_S`: holding it takes a flood of
complete requests from at least ``MAX_CLIENTS / MAX_PER_ADDRESS`` addresses, each answered.

Refusals, evictions and other early ends are counted by :class:`Reason` for ``/metrics``.
Pure logic with an injected clock: no sockets, no event loop; the server
(:class:`~pccl.master.status.StatusServer`) closes what this table tells it to.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "MAX_CLIENTS",
    "MAX_PER_ADDRESS",
    "SLOW_RESPONSE_S",
    "TRANSITIONS",
    "Admission",
    "ConnState",
    "InvalidTransition",
    "Reason",
    "Slot",
    "SlotTable",
    "address_key",
]

#: Status connections open at once, over all addresses.
MAX_CLIENTS = 64
#: Status connections one source address (IPv6: one /64) may hold at once.
MAX_PER_ADDRESS = 8
#: A response still being written after this long marks its client as slow (evictable).
SLOW_RESPONSE_S = 1.0


class ConnState(Enum):
    """Where one status connection is in its life."""

    READING_REQUEST = "reading_request"  #: connected; the request head has not fully arrived
    RESPONDING = "responding"  #: request judged; the response is being written and drained
    LINGERING = "lingering"  #: response handed to the kernel; waiting for the client to close
    CLOSED = "closed"  #: gone; holds no slot


#: The only moves :meth:`SlotTable.advance` allows. Any state may close (timeout, error,
#: eviction, shutdown); closing a closed connection is a no-op.
TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.READING_REQUEST: frozenset({ConnState.RESPONDING, ConnState.CLOSED}),
    ConnState.RESPONDING: frozenset({ConnState.LINGERING, ConnState.CLOSED}),
    ConnState.LINGERING: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset({ConnState.CLOSED}),
}


class Reason(Enum):
    """Why a status connection was refused or ended without a document (a metric label)."""

    REFUSED_FULL = "refused_full"  #: every slot held by a fresh response
    REFUSED_ADDRESS_FULL = "refused_address_full"  #: its address's slots all fresh responses
    EVICTED_LINGERING = "evicted_lingering"  #: closed after its response, for a newcomer
    EVICTED_SLOW_RESPONSE = "evicted_slow_response"  #: did not take its response in time
    EVICTED_READING = "evicted_reading"  #: had not sent a whole request, for a newcomer
    REQUEST_TIMEOUT = "request_timeout"  #: request head not received in time (408)
    UNAUTHORIZED = "unauthorized"  #: no valid credential while one is required (401)


class InvalidTransition(RuntimeError):
    """A move not in :data:`TRANSITIONS`: a bug in the server, never caused by a client."""


@dataclass(eq=False)
class Slot:
    """One admitted connection (hashable by identity).

    Attributes:
        address: the source address key (see :func:`address_key`).
        opened: clock reading at admission.
        state: current state.
        since: clock reading when it entered ``state``.
    """

    address: str
    opened: float
    state: ConnState = ConnState.READING_REQUEST
    since: float = 0.0


@dataclass(frozen=True)
class Admission:
    """What :meth:`SlotTable.admit` decided.

    Attributes:
        slot: the newcomer's slot, or None when it is refused.
        victim: a connection evicted to make room (already ``CLOSED`` and out of the table);
            the caller closes its socket.
        reason: why the victim was evicted, or why the newcomer was refused; None when
            neither happened.
    """

    slot: Slot | None
    victim: Slot | None = None
    reason: Reason | None = None


def address_key(host: str) -> str:
    """The per-address cap's key for a client's IP: itself, an IPv6 client's /64.

    IPv4-mapped IPv6 addresses count as their IPv4 address; something that is not an IP
    address (a unix socket path, say) is its own key.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


_EVICTED = {
    ConnState.LINGERING: Reason.EVICTED_LINGERING,
    ConnState.RESPONDING: Reason.EVICTED_SLOW_RESPONSE,
    ConnState.READING_REQUEST: Reason.EVICTED_READING,
}


class SlotTable:
    """Admission, eviction and state of the status endpoint's connections.

    Args:
        max_total: connections open at once.
        max_per_address: connections one address key may hold (at most ``max_total``).
        slow_response_s: how long a response may be in progress before its client counts as
            slow and becomes evictable.

    Raises:
        ValueError: a cap below 1, or a negative ``slow_response_s``.
    """

    def __init__(
        self,
        max_total: int = MAX_CLIENTS,
        max_per_address: int = MAX_PER_ADDRESS,
        slow_response_s: float = SLOW_RESPONSE_S,
    ) -> None:
        if max_total < 1 or max_per_address < 1 or not slow_response_s >= 0:
            raise ValueError("caps must be >= 1 and slow_response_s >= 0")
        self.max_total = max_total
        self.max_per_address = min(max_per_address, max_total)
        self.slow_response_s = slow_response_s
        self._slots: dict[Slot, None] = {}  # insertion-ordered set
        self._per_address: Counter[str] = Counter()
        #: Lifetime count of refusals, evictions and early ends, by reason.
        self.rejected: Counter[Reason] = Counter()

    def __len__(self) -> int:
        return len(self._slots)

    def slots(self) -> list[Slot]:
        """The open connections, oldest first."""
        return list(self._slots)

    def by_state(self) -> dict[ConnState, int]:
        """Open connections per state (``CLOSED`` is always 0)."""
        counts = dict.fromkeys(ConnState, 0)
        for s in self._slots:
            counts[s.state] += 1
        return counts

    def held_by(self, address: str) -> int:
        """Slots ``address`` holds now."""
        return self._per_address[address]

    def admit(self, address: str, now: float) -> Admission:
        """Admit a newcomer from ``address``, evicting at most one connection for it.

        Args:
            address: the newcomer's address key (:func:`address_key`).
            now: clock reading.

        Returns:
            The decision; a refusal or eviction is already counted in :attr:`rejected`.
        """
        victim: Slot | None = None
        if self._per_address[address] >= self.max_per_address:
            victim = self._pick_victim([s for s in self._slots if s.address == address], now)
            if victim is None:
                self.rejected[Reason.REFUSED_ADDRESS_FULL] += 1
                return Admission(None, None, Reason.REFUSED_ADDRESS_FULL)
        elif len(self._slots) >= self.max_total:
            victim = self._pick_victim(list(self._slots), now)
            if victim is None:
                self.rejected[Reason.REFUSED_FULL] += 1
                return Admission(None, None, Reason.REFUSED_FULL)
        reason = None
        if victim is not None:
            reason = _EVICTED[victim.state]
            self.rejected[reason] += 1
            self.advance(victim, ConnState.CLOSED, now)
        slot = Slot(address, now, ConnState.READING_REQUEST, now)
        self._slots[slot] = None
        self._per_address[address] += 1
        return Admission(slot, victim, reason)

    def advance(self, slot: Slot, to: ConnState, now: float) -> None:
        """Move ``slot`` to ``to``; ``CLOSED`` frees its slot (again: a no-op).

        Raises:
            InvalidTransition: ``to`` is not in ``TRANSITIONS[slot.state]``.
        """
        if to not in TRANSITIONS[slot.state]:
            raise InvalidTransition(f"{slot.state.name} -> {to.name}")
        if slot.state is ConnState.CLOSED:
            return
        slot.state = to
        slot.since = now
        if to is ConnState.CLOSED:
            del self._slots[slot]
            self._per_address[slot.address] -= 1
            if self._per_address[slot.address] <= 0:
                del self._per_address[slot.address]

    def count(self, reason: Reason) -> None:
        """Count an early end the server saw itself (a request timeout, a 401)."""
        self.rejected[reason] += 1

    def _pick_victim(self, candidates: list[Slot], now: float) -> Slot | None:
        best: Slot | None = None
        best_rank: tuple[int, int, float] | None = None
        for s in candidates:
            if s.state is ConnState.LINGERING:
                tier = 0
            elif s.state is ConnState.RESPONDING:
                if now - s.since < self.slow_response_s:
                    continue  # a response in progress, not yet slow: never cut short
                tier = 1
            else:
                tier = 2
            rank = (tier, -self._per_address[s.address], s.since)
            if best_rank is None or rank < best_rank:
                best, best_rank = s, rank
        return best
