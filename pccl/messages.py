"""Typed control messages and their msgpack encoding.

Each message is a frozen dataclass registered under one :class:`~pccl.frame.MsgType`. A body is a
msgpack array of the fields in declaration order; trailing fields with defaults may be omitted.
Decoding uses bounded ``msgpack`` limits and then checks every field against its declared
:class:`Spec` (type, numeric range, length), so a decoded message is always well-formed.
Anything else raises :class:`pccl.ProtocolError`. Pure functions; any thread.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, dataclass_transform

import msgpack

from pccl.errors import ProtocolError
from pccl.frame import MsgType, encode_frame, max_body

__all__ = [
    "MAX_PEER_ID",
    "MESSAGES",
    "AbortKind",
    "KickCode",
    "Message",
    "VerdictState",
    "decode",
    "encode",
]

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
#: Ids (operations, syncs, epochs) stay below 2**63 so every language's signed int64 holds them.
U63 = (1 << 63) - 1
#: Peer ids are at most this; a hello asking to resume a larger one is refused.
MAX_PEER_ID = (1 << 31) - 1
MAX_PEERS = 4096
MAX_KEYS = 16384
MAX_DIMS = 32


class KickCode(enum.IntEnum):
    """Why the master closes a peer's connection (``M2P_KICK.code``)."""

    UNKNOWN = 0  #: a code this build does not know (newer master)
    PROTOCOL = 1  #: malformed, oversized, unknown or out-of-state message
    VERSION = 2  #: protocol version not spoken by the master
    AUTH = 3  #: token proof missing or wrong
    HANDSHAKE_TIMEOUT = 4  #: no valid hello within ``handshake_timeout_s``
    HEARTBEAT_TIMEOUT = 5  #: silent for ``heartbeat_timeout_s``
    OUT_OF_STATE = 6  #: a message its session state does not allow
    LEAVE = 7  #: the peer asked to leave
    SHUTDOWN = 8  #: the master is stopping (peers reconnect: it may be a restart)
    FULL = 9  #: no room for another peer or id
    BACKLOG = 10  #: the peer does not read its control link
    TOO_LARGE = 11  #: a message for this peer exceeds its wire bound
    P2P_TIMEOUT = 12  #: did not wire its ring links in time
    UNREACHABLE = 13  #: its ring predecessor could not reach it
    P2P_FAILED = 14  #: could not reach its successor
    BUSY = 15  #: too many unauthenticated connections (total or from its address)

    @classmethod
    def parse(cls, v: int) -> KickCode:
        try:
            return cls(v)
        except ValueError:
            return cls.UNKNOWN


class AbortKind(enum.IntEnum):
    """Kind of a collective verdict (``M2P_COLLECTIVE_DONE.kind``); ``OK`` for success."""

    OK = 0
    ABORTED = 1  #: a member left, hung, failed or withdrew mid-operation: retry
    MISMATCH = 2  #: members disagree on count/dtype/op/quantization (a programming error)
    STALE_TOPOLOGY = 3  #: the ring changed or is changing: ``update_topology()`` then retry
    START_TIMEOUT = 4  #: not every member initiated within ``start_timeout_s``: retry
    WITHDRAWN = 5  #: confirms this peer's own withdraw of an operation not yet started
    UNKNOWN = 255  #: a kind this build does not know

    @classmethod
    def parse(cls, v: int) -> AbortKind:
        try:
            return cls(v)
        except ValueError:
            return cls.UNKNOWN


class VerdictState(enum.IntEnum):
    """The master's record of an operation (``M2P_VERDICT.state``)."""

    UNKNOWN = 0  #: not in the master's record (too old, or the master restarted since)
    OK = 1  #: every member completed: keep the result
    ABORTED = 2  #: aborted for the whole group: restore the input
    RUNNING = 3  #: not decided yet: ask again later


@dataclass(frozen=True)
class Spec:
    """Shape of one field: ``kind`` is int/float/bool/str/bytes/list/tuple."""

    kind: str
    lo: int = 0
    hi: int = U64  # int range, or max length for str/bytes/list
    items: Spec | tuple[Spec, ...] | None = None


def u(hi: int = U64) -> Spec:
    return Spec("int", 0, hi)


def s(maxlen: int = 256) -> Spec:
    return Spec("str", 0, maxlen)


def y(maxlen: int = 1024) -> Spec:
    return Spec("bytes", 0, maxlen)


def lst(item: Spec, maxlen: int) -> Spec:
    return Spec("list", 0, maxlen, item)


def tup(*items: Spec) -> Spec:
    return Spec("tuple", 0, len(items), tuple(items))


F = Spec("float")
B = Spec("bool")


def spec(sp: Spec, *, default: Any = dataclasses.MISSING) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"spec": sp})
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: type(default)(default), metadata={"spec": sp})
    return field(default=default, metadata={"spec": sp})


def _check(v: Any, sp: Spec, where: str) -> Any:
    k = sp.kind
    if k == "int":
        if type(v) is not int or not (sp.lo <= v <= sp.hi):
            raise ProtocolError(f"{where}: expected int in [{sp.lo}, {sp.hi}], got {v!r:.40}")
        return v
    if k == "float":
        if type(v) is int:
            v = float(v)
        if type(v) is not float or not math.isfinite(v):
            raise ProtocolError(f"{where}: expected a finite float, got {v!r:.40}")
        return v
    if k == "bool":
        if type(v) is not bool:
            raise ProtocolError(f"{where}: expected bool, got {v!r:.40}")
        return v
    if k in ("str", "bytes"):
        want = str if k == "str" else bytes
        if type(v) is not want or len(v) > sp.hi:
            raise ProtocolError(f"{where}: expected {k} of at most {sp.hi}, got {v!r:.40}")
        return v
    if k == "list":
        if type(v) is not list or len(v) > sp.hi:
            raise ProtocolError(f"{where}: expected a list of at most {sp.hi} items")
        assert isinstance(sp.items, Spec)
        return [_check(x, sp.items, f"{where}[{i}]") for i, x in enumerate(v)]
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        if type(v) is not list or len(v) != len(sp.items):
            raise ProtocolError(f"{where}: expected a {len(sp.items)}-tuple")
        return tuple(_check(x, si, f"{where}[{i}]") for i, (x, si) in enumerate(zip(v, sp.items)))
    raise AssertionError(f"unknown spec kind {k}")


class Message:
    """Base of all control messages; subclasses are dataclasses with ``spec`` fields."""

    TYPE: ClassVar[MsgType]
    _fields: ClassVar[tuple[tuple[str, Spec], ...]]
    _required: ClassVar[int]

    def encode(self) -> bytes:
        return encode(self)


MESSAGES: dict[MsgType, type[Message]] = {}
_M = TypeVar("_M", bound=Message)


@dataclass_transform(frozen_default=True, field_specifiers=(spec, field))
def message(mtype: MsgType) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: make a frozen dataclass and register it for ``mtype``."""

    def wrap(cls: type[_M]) -> type[_M]:
        cls = dataclass(frozen=True)(cls)
        fs = dataclasses.fields(cls)  # type: ignore[arg-type]
        cls.TYPE = mtype
        cls._fields = tuple((f.name, f.metadata["spec"]) for f in fs)
        cls._required = sum(
            1
            for f in fs
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        MESSAGES[mtype] = cls
        return cls

    return wrap


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def encode(msg: Message) -> bytes:
    """Return the complete frame (header + msgpack body) for ``msg``."""
    body = msgpack.packb([_plain(getattr(msg, n)) for n, _ in msg._fields], use_bin_type=True)
    return encode_frame(msg.TYPE, body)


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode(mtype: MsgType, body: bytes) -> Message:
    """Decode a control ``body`` of type ``mtype`` into its message.

    Raises:
        ProtocolError: not a control type, malformed msgpack, or any field out of bounds.
    """
    try:
        mtype = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype!r}") from None
    cls = MESSAGES.get(mtype)
    if cls is None:
        raise ProtocolError(f"{mtype.name} has no control body")
    if len(body) > max_body(mtype):
        raise ProtocolError("control body too large")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=65536,
            max_bin_len=65536,
            max_array_len=MAX_KEYS,
            max_map_len=0,  # no message uses maps
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types: ValueError, FormatError, StackError...
        raise ProtocolError(f"malformed {mtype.name} body: {type(e).__name__}") from None
    if type(obj) is not list or not (cls._required <= len(obj) <= len(cls._fields)):
        raise ProtocolError(f"{mtype.name}: expected an array of {cls._required}+ fields")
    kwargs = {
        name: _check(v, sp, f"{mtype.name}.{name}") for (name, sp), v in zip(cls._fields, obj)
    }
    return cls(**kwargs)


# --------------------------------------------------------------------------- peer -> master


@message(MsgType.P2M_HELLO)
class Hello(Message):
    """First message of a peer: what it serves and where."""

    version: int = spec(u(U16))
    peer_group: int = spec(u(U32))
    p2p_port: int = spec(u(U16))
    advertise_host: str = spec(
        s(255), default=""
    )  # empty: the master uses the connection's address
    resume_peer_id: int = spec(u(MAX_PEER_ID), default=0)  # reconnect under this id (0: new)
    nonce: bytes = spec(y(32), default=b"")  # the peer's challenge to the master
    auth: bytes = spec(y(64), default=b"")  # HMAC over the master's challenge (see pccl.auth)


@message(MsgType.P2M_HEARTBEAT)
class Heartbeat(Message):
    seq: int = spec(u(), default=0)


@message(MsgType.P2M_UPDATE_TOPOLOGY)
class UpdateTopology(Message):
    """Vote to admit pending peers and re-wire the rings."""

    want_epoch: int = spec(u(), default=0)


@message(MsgType.P2M_TOPOLOGY_READY)
class TopologyReady(Message):
    """The peer has (or failed to) establish its p2p links for ``epoch``."""

    epoch: int = spec(u())
    ok: bool = spec(B)
    unreachable: list = spec(lst(u(), MAX_PEERS), default=[])
    reason: str = spec(s(512), default="")


@message(MsgType.P2M_COLLECTIVE_INITIATE)
class CollectiveInitiate(Message):
    """Vote to start collective ``tag``; ``attempt`` (increasing per peer) names this try, and
    every answer about it (commence, verdict) carries it back."""

    tag: int = spec(u(U32))
    attempt: int = spec(u(U63))
    count: int = spec(u(1 << 48))
    dtype: int = spec(u(U8))
    op: int = spec(u(U8))
    quant: int = spec(u(U8))


@message(MsgType.P2M_COLLECTIVE_WITHDRAW)
class CollectiveWithdraw(Message):
    """The peer gave up on ``attempt`` of ``tag`` locally (start timeout, cancel): forget its
    initiate, or abort the operation if it already started. Ignored if already decided."""

    tag: int = spec(u(U32))
    attempt: int = spec(u(U63))
    reason: str = spec(s(512), default="")


@message(MsgType.P2M_VERDICT_QUERY)
class VerdictQuery(Message):
    """What did the master decide for operation ``op_id``? (a verdict was lost)"""

    op_id: int = spec(u(U63))


@message(MsgType.P2M_COLLECTIVE_COMPLETE)
class CollectiveComplete(Message):
    tag: int = spec(u(U32))
    op_id: int = spec(u(U63))
    ok: bool = spec(B)
    reason: str = spec(s(512), default="")
    tx_bytes: int = spec(u(), default=0)  # payload this peer sent (for the master's bandwidth view)
    seconds: float = spec(F, default=0.0)


@message(MsgType.P2M_SYNC_SHARED_STATE)
class SyncSharedState(Message):
    """A peer's shared-state vote: revision, strategy, (key, dtype, nbytes, shape, hash, loose)."""

    revision: int = spec(u())
    strategy: int = spec(u(2))
    entries: list = spec(lst(tup(s(1024), u(U8), u(), lst(u(), MAX_DIMS), y(16), B), MAX_KEYS))


@message(MsgType.P2M_SYNC_DONE)
class SyncDone(Message):
    sync_id: int = spec(u(U63))
    ok: bool = spec(B)
    reason: str = spec(s(512), default="")


@message(MsgType.P2M_LEAVE)
class Leave(Message):
    reason: str = spec(s(512), default="")


# --------------------------------------------------------------------------- master -> peer


@message(MsgType.M2P_WELCOME)
class Welcome(Message):
    peer_id: int = spec(u(MAX_PEER_ID))
    heartbeat_interval_s: float = spec(F)
    heartbeat_timeout_s: float = spec(F)
    accepted: bool = spec(B)  # True when admitted at once (first peer or master restart)
    auth: bytes = spec(y(64), default=b"")  # the master's proof over the peer's nonce


@message(MsgType.M2P_HEARTBEAT)
class MasterHeartbeat(Message):
    seq: int = spec(u(), default=0)


@message(MsgType.M2P_TOPOLOGY)
class Topology(Message):
    """The ring this peer belongs to for ``epoch``; connect to the successor of us in ``ring``."""

    epoch: int = spec(u(U63))
    world_size: int = spec(u(MAX_PEERS))
    group_world_size: int = spec(u(MAX_PEERS))
    num_groups: int = spec(u(MAX_PEERS))
    ring: list = spec(lst(tup(u(MAX_PEER_ID), s(255), u(U16)), MAX_PEERS))  # (id, host, port)


@message(MsgType.M2P_TOPOLOGY_DONE)
class TopologyDone(Message):
    epoch: int = spec(u())
    ok: bool = spec(B)
    reason: str = spec(s(512), default="")


@message(MsgType.M2P_COLLECTIVE_COMMENCE)
class CollectiveCommence(Message):
    """Every member initiated ``attempt`` (this peer's) of ``tag``: run it as ``op_id``."""

    tag: int = spec(u(U32))
    attempt: int = spec(u(U63))
    op_id: int = spec(u(U63))
    epoch: int = spec(u(U63))


@message(MsgType.M2P_COLLECTIVE_DONE)
class CollectiveDone(Message):
    """Final verdict on this peer's ``attempt`` of ``tag`` (``op_id`` 0 if it never started);
    ``ok=False`` is an abort decided for the whole group. ``kind`` is an :class:`AbortKind`."""

    tag: int = spec(u(U32))
    attempt: int = spec(u(U63))
    op_id: int = spec(u(U63))
    ok: bool = spec(B)
    reason: str = spec(s(512), default="")
    kind: int = spec(u(U8), default=int(AbortKind.ABORTED))


@message(MsgType.M2P_VERDICT)
class Verdict(Message):
    """Answer to ``P2M_VERDICT_QUERY``: ``state`` is a :class:`VerdictState`."""

    op_id: int = spec(u(U63))
    state: int = spec(u(U8))
    reason: str = spec(s(512), default="")


@message(MsgType.M2P_SYNC_PLAN)
class SyncPlan(Message):
    """The master's decision for one peer: fetch ``fetch`` (key, hash, source ids) and adopt
    ``revision``; ``sources`` maps source ids to p2p addresses."""

    sync_id: int = spec(u(U63))
    ok: bool = spec(B)
    reason: str = spec(s(1024))
    revision: int = spec(u())
    fetch: list = spec(lst(tup(s(1024), y(16), lst(u(MAX_PEER_ID), MAX_PEERS)), MAX_KEYS))
    sources: list = spec(lst(tup(u(MAX_PEER_ID), s(255), u(U16)), MAX_PEERS))


@message(MsgType.M2P_SYNC_COMPLETE)
class SyncComplete(Message):
    sync_id: int = spec(u(U63))
    revision: int = spec(u())


@message(MsgType.M2P_CHALLENGE)
class Challenge(Message):
    """First frame of every master connection: a fresh nonce to prove the token over."""

    nonce: bytes = spec(y(32))
    auth_required: bool = spec(B)


@message(MsgType.M2P_KICK)
class Kick(Message):
    """The master is closing this connection, and why (``code``: a :class:`KickCode`)."""

    code: int = spec(u(U8))
    reason: str = spec(s(512), default="")


# --------------------------------------------------------------------------- peer -> peer


@message(MsgType.P2P_HELLO)
class P2PHello(Message):
    """First frame of a ring data stream, from the dialler (after the acceptor's challenge)."""

    peer_id: int = spec(u(MAX_PEER_ID))
    epoch: int = spec(u(U63))
    stream: int = spec(u(U16))
    auth: bytes = spec(y(64), default=b"")


@message(MsgType.P2P_HELLO_ACK)
class P2PHelloAck(Message):
    ok: bool = spec(B)
    reason: str = spec(s(512), default="")


@message(MsgType.P2P_STATE_HELLO)
class StateHello(Message):
    """First frame of a state-transfer connection, from the requester (after the challenge):
    who asks, for which sync. Only after it verifies may a ``P2P_STATE_REQUEST`` follow."""

    peer_id: int = spec(u(MAX_PEER_ID))
    sync_id: int = spec(u(U63))
    auth: bytes = spec(y(64), default=b"")


@message(MsgType.P2P_STATE_REQUEST)
class StateRequest(Message):
    """Ask a source for byte ranges of entries: (key, start, end); follows ``StateHello``."""

    ranges: list = spec(lst(tup(s(1024), u(), u()), MAX_KEYS))


@message(MsgType.P2P_CHALLENGE)
class P2PChallenge(Message):
    """First frame of every p2p connection, from the acceptor."""

    nonce: bytes = spec(y(32))


@message(MsgType.P2P_STATE_ERROR)
class StateError(Message):
    reason: str = spec(s(512))
