"""Typed control messages and their msgpack encoding.

Each message is a frozen dataclass registered under one :class:`~pccl.frame.MsgType`. A body is a
msgpack array of the fields in declaration order; trailing fields with defaults may be omitted.
Decoding walks the schema: every array's claimed length is checked against its :class:`Spec`
before any item is read, and every scalar is unpacked alone (containers refused, str/bin bounded)
and checked (type, numeric range, length) before the next byte is looked at. So a decoded message
is always well-formed, and a malformed body costs no more time or memory than its valid prefix:
nothing is materialised that the schema would not hold. Anything else raises
:class:`pccl.ProtocolError`. Pure functions; any thread.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, dataclass_transform

import msgpack

from pccl.config import MAX_KV_KEY, MAX_KV_VALUE
from pccl.errors import ProtocolError
from pccl.frame import MsgType, encode_frame, max_body

__all__ = [
    "MAX_GROUP_PEERS",
    "MAX_PEERS",
    "MAX_PEER_ID",
    "MESSAGES",
    "AbortKind",
    "GateState",
    "KickCode",
    "KvScope",
    "KvStatus",
    "Message",
    "Outcome",
    "VerdictState",
    "decode",
    "encode",
]

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
#: Ids (operations, syncs, epochs) stay below 2**63 so every language's signed int64 holds them.
U63 = (1 << 63) - 1
#: Peer ids are at most this; a hello asking to resume a larger one is refused.
MAX_PEER_ID = (1 << 31) - 1
#: Peers one master serves (``Topology.world_size``), and peers in one group (its ring, and
#: every list of a group's members on the wire).
MAX_PEERS = 1 << 16
MAX_GROUP_PEERS = 4096
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


class KvScope(enum.IntEnum):
    """Where a key of the key-value channel lives (``scope`` of ``P2M_KV_SET``/``GET``)."""

    RUN = 0  #: one key space for the whole run
    GROUP = 1  #: one key space per peer group (the requesting peer's)


class KvStatus(enum.IntEnum):
    """The outcome in ``M2P_KV_REPLY.status``."""

    OK = 0  #: stored, deleted, or found (``value``, ``version``)
    NOT_FOUND = 1  #: no such key (a get without wait, a delete of nothing)
    TIMEOUT = 2  #: waited ``wait_ms`` and no (newer) value came
    REFUSED = 3  #: beyond a bound, or the store could not be written (``reason``)


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


class Outcome(enum.IntEnum):
    """What a peer did with the result of one operation (``P2M_OUTCOMES``)."""

    KEPT = 1  #: verdict OK: the result stands
    RESTORED = 2  #: aborted (verdict, or its own ring failed): the input was restored
    IN_DOUBT = 3  #: its ring completed, no verdict yet: holding the result, asking


class GateState(enum.IntEnum):
    """A peer's state at a quorum gate (``P2M_GATE_ARRIVE.state``)."""

    ARRIVED = 0  #: present, no contribution ready yet
    READY = 1  #: present with a contribution (an upgrade of ARRIVED, or arriving ready)
    WITHDRAW = 2  #: gave up locally: forget the arrival


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


#: Reads one value of its spec from a ``msgpack.Unpacker`` positioned at it. It raises
#: :class:`ProtocolError` whose message starts with the path below the field
#: (``"[3][1]: expected ..."``) so that the caller can prefix the message and field name.
_Reader = Callable[[Any], Any]


def _malformed(e: Exception) -> ProtocolError:
    # msgpack raises ValueError, OutOfData, FormatError, StackError...; the ext hook raises ours.
    if isinstance(e, ProtocolError):
        return e
    return ProtocolError(f": malformed msgpack ({type(e).__name__}: {e!s:.80})")


#: Type bytes of array16 and array32 headers, and how many length bytes follow each.
_WIDE_ARRAYS = {0xDC: 2, 0xDD: 4}


def _read(u: Any, n: int) -> bytes:
    try:
        raw: bytes = u.read_bytes(n)
    except Exception as e:  # the pure-Python unpacker raises OutOfData; the C one returns less
        raise _malformed(e) from None
    if len(raw) < n:
        raise ProtocolError(": truncated")
    return raw


def _array_header(u: Any) -> int:
    """Read an array header, not its items: the caller checks the claimed count first.

    Parsed here from raw bytes because msgpack's ``read_array_header`` differs between its
    implementations: the C one ignores ``max_array_len`` (it returns any claim, even 2**32-1),
    the pure-Python one enforces it, which the readers' limit of 0 would then refuse.
    """
    t = _read(u, 1)[0]
    if t & 0xF0 == 0x90:  # fixarray
        return t & 0x0F
    width = _WIDE_ARRAYS.get(t)
    if width is None:
        raise ProtocolError(f": expected an array, got msgpack type byte 0x{t:02x}")
    return int.from_bytes(_read(u, width), "big")


@functools.cache
def _reader(sp: Spec) -> _Reader:
    """Compile ``sp`` into a reader; cached, as specs are frozen and shared between messages."""
    k, lo, hi = sp.kind, sp.lo, sp.hi
    # Scalars come from an Unpacker that refuses every non-empty container (its max_array_len
    # and max_map_len are 0), so each read materialises at most one object, which is checked
    # before the next byte is looked at.
    if k == "int":

        def read_int(u: Any) -> int:
            try:
                v = u.unpack()
            except Exception as e:
                raise _malformed(e) from None
            if type(v) is not int or not lo <= v <= hi:
                raise ProtocolError(f": expected int in [{lo}, {hi}], got {v!r:.40}")
            return v

        return read_int
    if k == "float":

        def read_float(u: Any) -> float:
            try:
                v = u.unpack()
            except Exception as e:
                raise _malformed(e) from None
            if type(v) is int:  # msgpack ints are at most 64-bit: float() cannot overflow
                v = float(v)
            if type(v) is not float or not math.isfinite(v):
                raise ProtocolError(f": expected a finite float, got {v!r:.40}")
            return v

        return read_float
    if k == "bool":

        def read_bool(u: Any) -> bool:
            try:
                v = u.unpack()
            except Exception as e:
                raise _malformed(e) from None
            if type(v) is not bool:
                raise ProtocolError(f": expected bool, got {v!r:.40}")
            return v

        return read_bool
    if k in ("str", "bytes"):
        want = str if k == "str" else bytes

        def read_text(u: Any) -> str | bytes:
            try:
                v = u.unpack()
            except Exception as e:
                raise _malformed(e) from None
            if type(v) is not want or len(v) > hi:
                raise ProtocolError(f": expected {k} of at most {hi}, got {v!r:.40}")
            return v

        return read_text
    if k == "list":
        assert isinstance(sp.items, Spec)
        item = _reader(sp.items)

        def read_list(u: Any) -> list[Any]:
            n = _array_header(u)
            if n > hi:  # judged from the header, before any item is read
                raise ProtocolError(f": expected a list of at most {hi} items, got {n}")
            out: list[Any] = []
            append = out.append  # items are appended as read: memory follows bytes consumed
            try:
                for _ in range(n):
                    append(item(u))
            except ProtocolError as e:
                raise ProtocolError(f"[{len(out)}]{e}") from None
            return out

        return read_list
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        items = tuple(_reader(i) for i in sp.items)
        width = len(items)

        def read_tuple(u: Any) -> tuple[Any, ...]:
            n = _array_header(u)
            if n != width:
                raise ProtocolError(f": expected a {width}-tuple, got an array of {n}")
            out: list[Any] = []
            try:
                for r in items:
                    out.append(r(u))
            except ProtocolError as e:
                raise ProtocolError(f"[{len(out)}]{e}") from None
            return tuple(out)

        return read_tuple
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
    raise ProtocolError(f": msgpack extension type {code} is not allowed")


def _limits(sp: Spec) -> tuple[int, int]:
    """Longest str (in UTF-8 bytes) and bytes value that ``sp`` admits anywhere inside it."""
    if sp.kind == "str":
        return 4 * sp.hi, 0  # the bound counts characters; UTF-8 needs up to 4 bytes each
    if sp.kind == "bytes":
        return 0, sp.hi
    subs = (sp.items,) if isinstance(sp.items, Spec) else sp.items or ()
    found = [_limits(i) for i in subs]
    return max((a for a, _ in found), default=0), max((b for _, b in found), default=0)


_Plan = tuple[dict[str, Any], tuple[tuple[str, _Reader], ...]]
_PLANS: dict[type[Message], _Plan] = {}


def _plan(cls: type[Message]) -> _Plan:
    """Unpacker settings sized to ``cls``'s schema, and one reader per field (cached)."""
    plan = _PLANS.get(cls)
    if plan is not None:
        return plan
    found = [_limits(sp) for _, sp in cls._fields]
    settings = {
        "raw": False,
        "max_str_len": max(a for a, _ in found),
        "max_bin_len": max(b for _, b in found),
        "max_array_len": 0,  # arrays are read header-first by the readers, never by unpack()
        "max_map_len": 0,  # no message uses maps
        "max_ext_len": 0,
        "ext_hook": _no_ext,
    }
    plan = settings, tuple((name, _reader(sp)) for name, sp in cls._fields)
    _PLANS[cls] = plan
    return plan


def decode(mtype: MsgType, body: bytes) -> Message:
    """Decode a control ``body`` of type ``mtype`` into its message.

    The body is read along the schema: each array's claimed length is checked against its
    spec before any item is read, each scalar is unpacked alone (containers refused, str/bin
    bounded by the longest the message admits) and checked before the next, and the body must
    end with the last field. So a malformed body is refused at the first byte that leaves the
    schema; what was built before that is a valid prefix of the message plus at most one
    refused scalar (a few KiB at most), and time is linear in the bytes read.

    Raises:
        ProtocolError: not a control type, oversized, malformed or truncated msgpack, trailing
            bytes, a missing or extra field, or any field out of its spec. Never anything else.
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
    settings, readers = _plan(cls)
    # Sized to the body so feeding it copies it once and never grows a larger buffer.
    u = msgpack.Unpacker(max_buffer_size=max(len(body), 1), **settings)
    u.feed(body)
    try:
        n = _array_header(u)
    except ProtocolError as e:
        raise ProtocolError(f"{mtype.name}: expected an array of fields{e}") from None
    if not cls._required <= n <= len(readers):
        raise ProtocolError(
            f"{mtype.name}: expected {cls._required} to {len(readers)} fields, got {n}"
        )
    kwargs = {}
    for name, read in readers[:n]:
        try:
            kwargs[name] = read(u)
        except ProtocolError as e:
            raise ProtocolError(f"{mtype.name}.{name}{e}") from None
    if u.tell() != len(body):
        raise ProtocolError(f"{mtype.name}: {len(body) - u.tell()} bytes after the last field")
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

    want_epoch: int = spec(u(U63), default=0)


@message(MsgType.P2M_TOPOLOGY_READY)
class TopologyReady(Message):
    """The peer has (or failed to) establish its p2p links for ``epoch``."""

    epoch: int = spec(u(U63))
    ok: bool = spec(B)
    unreachable: list = spec(lst(u(MAX_PEER_ID), MAX_GROUP_PEERS), default=[])
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


@message(MsgType.P2M_GATE_ARRIVE)
class GateArrive(Message):
    """Arrive at (or upgrade to ready at, or withdraw from) the group's quorum gate ``tag``.
    Every arrival of one gate carries the same ``min_quorum`` and ``grace_ms``."""

    tag: int = spec(u(U32))
    attempt: int = spec(u(U63))
    state: int = spec(u(2))
    min_quorum: int = spec(Spec("int", 1, MAX_GROUP_PEERS))
    grace_ms: int = spec(u(3_600_000))


@message(MsgType.P2M_VERDICT_QUERY)
class VerdictQuery(Message):
    """What did the master decide for operation ``op_id``? (a verdict was lost). ``members``:
    the ring that ran it, so that a restarted master can resolve it from their outcomes."""

    op_id: int = spec(u(U63))
    members: list = spec(lst(u(MAX_PEER_ID), MAX_GROUP_PEERS), default=[])


@message(MsgType.P2M_OUTCOMES)
class Outcomes(Message):
    """Sent after every welcome on a resumed link: what this peer did with its recent
    operations, ``(op_id, Outcome)``, so a restarted master can rebuild lost verdicts."""

    outcomes: list = spec(lst(tup(u(U63), u(U8)), 256), default=[])


@message(MsgType.P2M_KV_SET)
class KvSet(Message):
    """Set (or delete) a key of the key-value channel (see :mod:`pccl.master.kv`)."""

    req: int = spec(u(U63))  # echoed in the reply
    scope: int = spec(u(U8))  # 0: the run, 1: the sender's group
    key: str = spec(s(MAX_KV_KEY))  # also at most MAX_KV_KEY bytes of UTF-8 (the master checks)
    value: bytes = spec(y(MAX_KV_VALUE), default=b"")
    delete: bool = spec(B, default=False)


@message(MsgType.P2M_KV_GET)
class KvGet(Message):
    """Read a key; with ``wait_ms``, wait that long for a value newer than ``after_version``."""

    req: int = spec(u(U63))
    scope: int = spec(u(U8))
    key: str = spec(s(MAX_KV_KEY))
    wait_ms: int = spec(u(U32), default=0)
    after_version: int = spec(u(U63), default=0)


@message(MsgType.P2M_OPTIMIZE_TOPOLOGY)
class OptimizeTopology(Message):
    """Vote to measure the group's links and re-order its ring (see :mod:`pccl.master.topology`):
    re-ordered only when the predicted bottleneck gain is at least ``min_gain`` (relative);
    ``reprobe`` measures cached links again."""

    min_gain: float = spec(F, default=0.1)
    reprobe: bool = spec(B, default=False)


@message(MsgType.P2M_PROBE_REPORT)
class ProbeReport(Message):
    """What the peer measured in probe round ``round_id``: (peer, Gbit/s to it, RTT ms)."""

    round_id: int = spec(u(U63))
    links: list = spec(lst(tup(u(MAX_PEER_ID), F, F), MAX_GROUP_PEERS), default=[])
    ok: bool = spec(B, default=True)
    reason: str = spec(s(512), default="")


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
    group_world_size: int = spec(u(MAX_GROUP_PEERS))
    num_groups: int = spec(u(MAX_PEERS))
    ring: list = spec(lst(tup(u(MAX_PEER_ID), s(255), u(U16)), MAX_GROUP_PEERS))  # (id, host, port)


@message(MsgType.M2P_TOPOLOGY_DONE)
class TopologyDone(Message):
    """The epoch is live (``ok``), or the peer's ``update_topology`` vote was refused or timed
    out (``ok=False``, ``epoch`` the current one, ``reason`` names the laggards)."""

    epoch: int = spec(u(U63))
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


@message(MsgType.M2P_GATE_DONE)
class GateDone(Message):
    """The master's decision on this peer's ``attempt`` at gate ``tag``: ``ready`` lists the
    peers whose contributions are in round ``round_id``, ``members`` the ring at the decision;
    ``ok=False`` is an abort (``kind`` an :class:`AbortKind`; retryable)."""

    tag: int = spec(u(U32))
    attempt: int = spec(u(U63))
    round_id: int = spec(u(U63))
    ok: bool = spec(B)
    reason: str = spec(s(1000), default="")
    kind: int = spec(u(U8), default=int(AbortKind.ABORTED))
    ready: list = spec(lst(u(MAX_PEER_ID), MAX_GROUP_PEERS), default=[])
    members: list = spec(lst(u(MAX_PEER_ID), MAX_GROUP_PEERS), default=[])


@message(MsgType.M2P_GATE_QUORUM)
class GateQuorum(Message):
    """Gate ``tag`` has its quorum and its grace is running: sent to the members (``attempt``:
    theirs) that have not said ready, so one that can contribute now does so in time."""

    tag: int = spec(u(U32))
    attempt: int = spec(u(U63))
    grace_ms: int = spec(u(3_600_000))


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
    fetch: list = spec(lst(tup(s(1024), y(16), lst(u(MAX_PEER_ID), MAX_GROUP_PEERS)), MAX_KEYS))
    sources: list = spec(lst(tup(u(MAX_PEER_ID), s(255), u(U16)), MAX_GROUP_PEERS))


@message(MsgType.M2P_SYNC_COMPLETE)
class SyncComplete(Message):
    sync_id: int = spec(u(U63))
    revision: int = spec(u())


@message(MsgType.M2P_KV_REPLY)
class KvReply(Message):
    """The answer to one ``P2M_KV_SET`` or ``P2M_KV_GET`` (``status``: ``KvStatus``)."""

    req: int = spec(u(U63))
    status: int = spec(u(U8))
    value: bytes = spec(y(MAX_KV_VALUE), default=b"")
    version: int = spec(u(U63), default=0)
    reason: str = spec(s(MAX_KV_KEY), default="")


@message(MsgType.M2P_PROBE_PLAN)
class ProbePlan(Message):
    """Measure links in ``round_id``: one target per round, in order ((0, "", 0): no probe that
    round); each probe sends at most ``max_bytes`` and lasts about ``seconds``."""

    round_id: int = spec(u(U63))
    max_bytes: int = spec(u())
    seconds: float = spec(F)
    targets: list = spec(lst(tup(u(MAX_PEER_ID), s(255), u(U16)), MAX_GROUP_PEERS))


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
    #: offered same-host shared-memory segment (pccl.peer.shm_link): its name under /dev/shm
    #: and ring capacity; empty / 0 when the dialler offers none. Covered by ``auth``.
    shm: str = spec(s(64), default="")
    shm_bytes: int = spec(u(U63), default=0)


@message(MsgType.P2P_HELLO_ACK)
class P2PHelloAck(Message):
    ok: bool = spec(B)
    reason: str = spec(s(512), default="")
    #: the acceptor mapped the offered segment: payloads of this stream go through it
    shm: bool = spec(B, default=False)


@message(MsgType.P2P_STATE_HELLO)
class StateHello(Message):
    """First frame of a state-transfer connection, from the requester (after the challenge):
    who asks, for which sync. Only after it verifies may a ``P2P_STATE_REQUEST`` follow."""

    peer_id: int = spec(u(MAX_PEER_ID))
    sync_id: int = spec(u(U63))
    auth: bytes = spec(y(64), default=b"")


@message(MsgType.P2P_PROBE_HELLO)
class ProbeHello(Message):
    """First frame of a link-probe connection, from the prober (after the challenge)."""

    peer_id: int = spec(u(MAX_PEER_ID))
    round_id: int = spec(u(U63))
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
