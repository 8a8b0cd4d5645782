"""Wire format: frame headers, data sub-headers and every control message schema.

Proves that every message in ``pccl.messages.MESSAGES`` survives encode -> ``FrameDecoder``
(fed whole, byte by byte, and in random splits) -> ``decode`` unchanged, and that every header
field and every message field is checked against its bound: anything out of bounds raises
``pccl.ProtocolError`` and nothing else. Wire version 2: typed kick codes and abort kinds,
attempt numbers, and the state-transfer hello split from the request. Decoding is checked with
both msgpack implementations (the C extension and its pure-Python fallback), every proper
prefix and any trailing byte of a body is refused. Pure functions; no sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import msgpack.fallback
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pccl
from pccl import messages as m
from pccl.config import MAX_CONTROL_FRAME, MAX_DATA_FRAME
from pccl.errors import PCCLError, ProtocolError
from pccl.frame import (
    DATA_HEADER,
    HEADER,
    MAGIC,
    VERSION,
    DataHeader,
    FrameDecoder,
    MsgType,
    encode_data_header,
    encode_frame,
    parse_data_header,
    parse_header,
)
from pccl.messages import MESSAGES, Spec

pytestmark = pytest.mark.timeout(120)

ALL_TYPES = sorted(MESSAGES, key=int)
#: Message types without a msgpack body (their payload is raw bytes on data links).
DATA_TYPES = [t for t in MsgType if t.name in ("P2P_DATA", "P2P_STATE_DATA")]
KNOWN = {int(t) for t in MsgType}
UNKNOWN_TYPES = [t for t in range(256) if t not in KNOWN]
#: msgpack's two implementations: ``decode`` must behave the same on both (they differ, e.g.,
#: in whether ``read_array_header`` honours ``max_array_len``).
IMPLS = ["c", "python"]


@contextlib.contextmanager
def unpacker_impl(impl: str) -> Iterator[None]:
    """Run ``decode`` on msgpack's C ``Unpacker`` (the default) or its pure-Python fallback."""
    with pytest.MonkeyPatch.context() as mp:
        if impl == "python":
            mp.setattr(msgpack, "Unpacker", msgpack.fallback.Unpacker)
        yield


# --------------------------------------------------------------------------- spec helpers


def fields_of(cls: type[m.Message]) -> list[tuple[str, Spec]]:
    return list(cls._fields)


def minimal(sp: Spec) -> Any:
    """The smallest valid value of a spec."""
    k = sp.kind
    if k == "int":
        return sp.lo
    if k == "float":
        return 0.0
    if k == "bool":
        return False
    if k == "str":
        return ""
    if k == "bytes":
        return b""
    if k == "list":
        return []
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        return tuple(minimal(i) for i in sp.items)
    raise AssertionError(k)


def at_bound(sp: Spec) -> Any:
    """The largest valid value of a spec (longest string/list, highest int)."""
    k = sp.kind
    if k == "int":
        return sp.hi
    if k == "float":
        return 1.7976931348623157e308
    if k == "bool":
        return True
    if k == "str":
        return "\u00e9" * sp.hi  # two UTF-8 bytes each: the bound counts characters
    if k == "bytes":
        return b"\xff" * sp.hi
    if k == "list":
        assert isinstance(sp.items, Spec)
        return [minimal(sp.items)] * sp.hi
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        return tuple(at_bound(i) if i.kind in ("int", "bool") else minimal(i) for i in sp.items)
    raise AssertionError(k)


def plain(v: Any) -> Any:
    """What msgpack puts on the wire for ``v`` (tuples travel as arrays)."""
    if isinstance(v, tuple | list):
        return [plain(x) for x in v]
    return v


def bad_values(sp: Spec) -> list[Any]:
    """Wire values that must be refused for a field of this spec (all msgpack-encodable)."""
    k = sp.kind
    foreign: list[Any] = [None, "x", b"x", [], {}, {"a": 1}, 1.5, True]
    if k == "int":
        out = [sp.lo - 1, -1, True, False, 1.0, float("nan"), "1", b"\x01", None, [1], {}]
        if sp.hi < (1 << 64) - 1:
            out.append(sp.hi + 1)
        return out
    if k == "float":
        return [float("nan"), float("inf"), float("-inf"), True, "1.0", None, b"", [], {}]
    if k == "bool":
        return [0, 1, None, "true", b"\x01", 1.0, [], {}]
    if k == "str":
        return ["x" * (sp.hi + 1), b"abc", 1, None, [], {}, True, 1.5]
    if k == "bytes":
        return [b"x" * (sp.hi + 1), "abc", 1, None, [], {}, True]
    if k == "list":
        assert isinstance(sp.items, Spec)
        out = [x for x in foreign if not isinstance(x, list)]
        out.append([minimal(sp.items)] * (sp.hi + 1))
        out.extend([bad] for bad in bad_values(sp.items)[:4])
        return out
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        good = [plain(minimal(i)) for i in sp.items]
        out = [x for x in foreign if not isinstance(x, list)]
        out += [good[:-1], [*good, 0], []]
        for i, isp in enumerate(sp.items):
            for bad in bad_values(isp)[:3]:
                out.append([*good[:i], bad, *good[i + 1 :]])
        return out
    raise AssertionError(k)


def strategy(sp: Spec) -> st.SearchStrategy[Any]:
    """Hypothesis strategy of valid values (short strings and lists, full int ranges)."""
    k = sp.kind
    if k == "int":
        return st.integers(sp.lo, sp.hi)
    if k == "float":
        return st.floats(allow_nan=False, allow_infinity=False)
    if k == "bool":
        return st.booleans()
    if k == "str":
        return st.text(max_size=min(sp.hi, 24))
    if k == "bytes":
        return st.binary(max_size=min(sp.hi, 24))
    if k == "list":
        assert isinstance(sp.items, Spec)
        return st.lists(strategy(sp.items), max_size=min(sp.hi, 4))
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        return st.tuples(*(strategy(i) for i in sp.items))
    raise AssertionError(k)


def message_strategy(cls: type[m.Message]) -> st.SearchStrategy[m.Message]:
    return st.builds(cls, **{name: strategy(sp) for name, sp in fields_of(cls)})


def minimal_message(cls: type[m.Message]) -> Any:  # Any: dataclasses.replace() takes it
    return cls(**{name: minimal(sp) for name, sp in fields_of(cls)})


def body_of(values: list[Any]) -> bytes:
    return msgpack.packb([plain(v) for v in values], use_bin_type=True)


def decode_stream(data: bytes, splits: list[int] | None = None, **kw: Any) -> list[Any]:
    """Feed ``data`` to a fresh decoder (whole, or cut at ``splits``) and decode every frame."""
    dec = FrameDecoder(**kw)
    cuts = [0, *sorted(splits or []), len(data)]
    out = []
    for a, b in itertools.pairwise(cuts):
        for mtype, body in dec.feed(data[a:b]):
            out.append(m.decode(mtype, body))
    assert dec.pending == 0
    return out


def frame(mtype: int, body: bytes, *, magic: int = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, mtype, len(body)) + body


# --------------------------------------------------------------------------- registry


def test_every_control_type_has_a_message_and_data_types_do_not() -> None:
    """Every P2M/M2P/P2P control type has a schema; only raw data frames have none."""
    assert set(MESSAGES) == set(MsgType) - set(DATA_TYPES)
    for t, cls in MESSAGES.items():
        assert cls.TYPE is t
        assert fields_of(cls), f"{cls.__name__} has no fields"
        names = [n for n, _ in fields_of(cls)]
        assert names == [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def test_protocol_error_is_public_and_a_value_error() -> None:
    assert pccl.ProtocolError is ProtocolError
    assert issubclass(ProtocolError, PCCLError)
    assert issubclass(ProtocolError, ValueError)


def test_direction_prefixes_match_type_ranges() -> None:
    for t in MsgType:
        prefix = t.name.split("_", 1)[0]
        lo = {"P2M": 0, "M2P": 32, "P2P": 64}[prefix]
        assert lo <= int(t) < lo + 32, t


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mtype", ALL_TYPES, ids=lambda t: t.name)
def test_minimal_and_bound_instances_round_trip(mtype: MsgType) -> None:
    cls = MESSAGES[mtype]
    base = minimal_message(cls)
    frames = [base]
    for name, sp in fields_of(cls):
        frames.append(dataclasses.replace(base, **{name: at_bound(sp)}))
    data = b"".join(msg.encode() for msg in frames)
    assert decode_stream(data) == frames
    for msg in frames:
        t, length = parse_header(msg.encode())
        assert t is mtype
        assert length == len(msg.encode()) - HEADER.size


@pytest.mark.parametrize("mtype", ALL_TYPES, ids=lambda t: t.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_instances_round_trip(mtype: MsgType, data: st.DataObject) -> None:
    cls = MESSAGES[mtype]
    msg = data.draw(message_strategy(cls))
    enc = msg.encode()
    assert enc[: HEADER.size] == HEADER.pack(MAGIC, VERSION, mtype, len(enc) - HEADER.size)
    (decoded,) = decode_stream(enc)
    assert decoded == msg
    assert type(decoded) is cls
    # Byte by byte: every prefix leaves the decoder waiting, never erroring.
    (decoded,) = decode_stream(enc, list(range(1, len(enc))))
    assert decoded == msg
    # Decoding is canonical: re-encoding the decoded message gives the same bytes.
    assert decoded.encode() == enc


def big_strategy(sp: Spec) -> st.SearchStrategy[Any]:
    """Valid values up to their bounds: full-length strings, wide lists, any int or float."""
    k = sp.kind
    if k == "str":
        return st.text(max_size=24) | st.text(min_size=sp.hi, max_size=sp.hi)
    if k == "bytes":
        return st.binary(max_size=sp.hi)
    if k == "list":
        assert isinstance(sp.items, Spec)
        return st.lists(big_strategy(sp.items), max_size=min(sp.hi, 40))
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        return st.tuples(*(big_strategy(i) for i in sp.items))
    return strategy(sp)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mtype", ALL_TYPES, ids=lambda t: t.name)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_wide_random_instances_round_trip_on_both_unpackers(
    impl: str, mtype: MsgType, data: st.DataObject
) -> None:
    """Strings at their bound, lists of up to 40 items (nested lists too), extreme ints."""
    cls = MESSAGES[mtype]
    msg = data.draw(st.builds(cls, **{n: big_strategy(sp) for n, sp in fields_of(cls)}))
    body = msg.encode()[HEADER.size :]
    with unpacker_impl(impl):
        decoded = m.decode(mtype, body)
    assert decoded == msg
    assert type(decoded) is cls
    assert decoded.encode()[HEADER.size :] == body
    # Tuples come back as tuples and lists as lists, as the dataclass declared them.
    for name, sp in fields_of(cls):
        value = getattr(decoded, name)
        assert type(value) is {"list": list, "tuple": tuple}.get(sp.kind, type(value))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mtype", ALL_TYPES, ids=lambda t: t.name)
def test_truncated_bodies_and_trailing_bytes_are_refused(impl: str, mtype: MsgType) -> None:
    """Every proper prefix of a valid body is refused (msgpack is prefix-free, so none is a
    shorter valid message), and so is a valid body followed by anything at all."""
    cls = MESSAGES[mtype]
    rng = random.Random(int(mtype))
    base = minimal_message(cls)
    msgs = [base] + [dataclasses.replace(base, **{n: at_bound(sp)}) for n, sp in fields_of(cls)]
    trailers = [b"\x00", b"\xc0", b"\x90", b"\x91\x00", b"\xa1x", b"\xdd\xff\xff\xff\xff"]
    with unpacker_impl(impl):
        for msg in msgs:
            body = msg.encode()[HEADER.size :]
            assert m.decode(mtype, body) == msg
            # Short bodies: every cut; long ones (lists at their bound): a sample, and the last
            # bytes, where a cut leaves the most of the message decodable.
            cuts = list(range(len(body)))
            if len(body) > 600:  # the pure-Python unpacker takes ~0.1 s on these: fewer
                k = 16 if impl == "c" else 4
                cuts = [*rng.sample(cuts, k), *cuts[-k:]]
            for cut in cuts:
                with pytest.raises(ProtocolError):
                    m.decode(mtype, body[:cut])
            for extra in [*trailers, body]:
                with pytest.raises(ProtocolError, match="after the last field"):
                    m.decode(mtype, body + extra)


@settings(max_examples=150, deadline=None)
@given(
    msgs=st.lists(
        st.sampled_from(ALL_TYPES).flatmap(lambda t: message_strategy(MESSAGES[t])),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_streams_of_messages_survive_any_split(msgs: list[m.Message], seed: int) -> None:
    data = b"".join(x.encode() for x in msgs)
    rng = random.Random(seed)
    splits = rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 12)))
    assert decode_stream(data, splits) == msgs


def test_byte_by_byte_stream_of_every_type() -> None:
    msgs = [minimal_message(MESSAGES[t]) for t in ALL_TYPES]
    data = b"".join(x.encode() for x in msgs)
    dec = FrameDecoder()
    out: list[m.Message] = []
    for i in range(len(data)):
        out.extend(m.decode(t, b) for t, b in dec.feed(data[i : i + 1]))
        assert dec.pending <= HEADER.size + MAX_CONTROL_FRAME
    assert out == msgs
    assert dec.pending == 0


@pytest.mark.parametrize("mtype", ALL_TYPES, ids=lambda t: t.name)
def test_trailing_defaults_may_be_omitted(mtype: MsgType) -> None:
    cls = MESSAGES[mtype]
    fs = dataclasses.fields(cls)  # type: ignore[arg-type]
    required = [
        f
        for f in fs
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    specs = dict(fields_of(cls))
    values = [minimal(specs[f.name]) for f in required]
    msg = m.decode(mtype, body_of(values))
    assert msg == cls(*values)
    # One field fewer than required, or one more than declared: refused.
    if required:
        with pytest.raises(ProtocolError):
            m.decode(mtype, body_of(values[:-1]))
    full = [minimal(sp) for _, sp in fields_of(cls)]
    with pytest.raises(ProtocolError):
        m.decode(mtype, body_of([*full, 0]))


def test_float_fields_accept_ints_and_float32_encodings() -> None:
    body = msgpack.packb([7, 1, 3, True])
    assert m.decode(MsgType.M2P_WELCOME, body) == m.Welcome(7, 1.0, 3.0, True)
    body32 = msgpack.packb([7, 0.5, 3.0, False], use_single_float=True)
    msg = m.decode(MsgType.M2P_WELCOME, body32)
    assert msg == m.Welcome(7, 0.5, 3.0, False)
    assert type(msg.heartbeat_interval_s) is float


# --------------------------------------------------------------------------- wire version 2


def test_wire_version_2_schemas() -> None:
    """The v2 layouts (kept by v3): attempts on collectives, typed codes as ints, split state
    hello."""
    assert VERSION == 3

    def names(cls: type[m.Message]) -> list[str]:
        return [n for n, _ in fields_of(cls)]

    assert names(m.CollectiveInitiate) == ["tag", "attempt", "count", "dtype", "op", "quant"]
    assert names(m.CollectiveCommence) == ["tag", "attempt", "op_id", "epoch"]
    assert names(m.CollectiveDone) == ["tag", "attempt", "op_id", "ok", "reason", "kind"]
    assert names(m.CollectiveWithdraw) == ["tag", "attempt", "reason"]
    # v3: the ring hello offers a same-host shared-memory segment, the ack answers it
    assert names(m.P2PHello) == ["peer_id", "epoch", "stream", "auth", "shm", "shm_bytes"]
    assert names(m.P2PHelloAck) == ["ok", "reason", "shm"]
    assert names(m.VerdictQuery) == ["op_id", "members"]
    assert names(m.Outcomes) == ["outcomes"]
    assert names(m.Verdict) == ["op_id", "state", "reason"]
    assert names(m.StateHello) == ["peer_id", "sync_id", "auth"]
    assert names(m.StateRequest) == ["ranges"]
    for cls, name in [(m.Kick, "code"), (m.CollectiveDone, "kind"), (m.Verdict, "state")]:
        assert dict(fields_of(cls))[name] == Spec("int", 0, 0xFF)
    # Ids: operations and syncs below 2**63 (any int64 holds them), peers below 2**31.
    specs = {(c.__name__, n): sp for c in MESSAGES.values() for n, sp in fields_of(c)}
    for (cls_name, name), sp in specs.items():
        if name in ("op_id", "sync_id", "attempt"):
            assert sp.hi == m.U63, (cls_name, name)
        if name in ("peer_id", "resume_peer_id"):
            assert sp.hi == m.MAX_PEER_ID, (cls_name, name)


@pytest.mark.parametrize(
    ("msg", "enum_field", "parse"),
    [
        (m.Kick(m.KickCode.AUTH, "bad token"), "code", m.KickCode.parse),
        (
            m.CollectiveDone(1, 2, 3, False, "x", m.AbortKind.STALE_TOPOLOGY),
            "kind",
            m.AbortKind.parse,
        ),
        (m.Verdict(9, m.VerdictState.RUNNING), "state", m.VerdictState),
    ],
    ids=["kick", "done", "verdict"],
)
def test_typed_codes_travel_as_ints(msg: m.Message, enum_field: str, parse: Any) -> None:
    out = m.decode(msg.TYPE, msg.encode()[HEADER.size :])
    assert out == msg
    value = getattr(out, enum_field)
    assert type(value) is int  # decode yields plain ints; the receiver parses the enum
    assert parse(value) == getattr(msg, enum_field)
    values = [plain(getattr(msg, n)) for n, _ in fields_of(type(msg))]
    index = [n for n, _ in fields_of(type(msg))].index(enum_field)
    # v1 sent these as free-text strings: refused now, as are values beyond a byte.
    for bad in ["auth", "aborted", 256, -1]:
        values[index] = bad
        with pytest.raises(ProtocolError, match=enum_field):
            m.decode(msg.TYPE, body_of(values))
    # A code from a newer build still decodes; parsing it names it UNKNOWN.
    values[index] = 200
    assert getattr(m.decode(msg.TYPE, body_of(values)), enum_field) == 200
    if parse is not m.VerdictState:
        assert parse(200).name == "UNKNOWN"


def test_version_1_layouts_are_refused() -> None:
    """Bodies in the v1 layouts (no attempt; state request carrying the hello) never decode as
    something else."""
    v1: list[tuple[MsgType, list[Any]]] = [
        (MsgType.P2P_STATE_REQUEST, [7, 1, [["k", 0, 8]], b""]),  # peer_id, sync_id, ranges, auth
        (MsgType.P2P_STATE_HELLO, [7, 1, [["k", 0, 8]], b""]),
        (MsgType.P2M_COLLECTIVE_INITIATE, [1, 1024, 0, 0, 0]),  # tag, count, dtype, op, quant
        (MsgType.M2P_COLLECTIVE_COMMENCE, [1, 5, 3]),  # tag, op_id, epoch
        (MsgType.M2P_COLLECTIVE_DONE, [1, 5, False, "peer left", "aborted"]),
        (MsgType.M2P_KICK, ["auth", "bad token"]),
    ]
    for mtype, values in v1:
        with pytest.raises(ProtocolError):
            m.decode(mtype, body_of(values))


# --------------------------------------------------------------------------- field bounds


def _field_cases() -> list[tuple[MsgType, str, int]]:
    cases = []
    for t in ALL_TYPES:
        for i, (name, _) in enumerate(fields_of(MESSAGES[t])):
            cases.append((t, name, i))
    return cases


@pytest.mark.parametrize(
    ("mtype", "name", "index"), _field_cases(), ids=lambda x: getattr(x, "name", str(x))
)
def test_every_field_rejects_out_of_bounds_values(mtype: MsgType, name: str, index: int) -> None:
    cls = MESSAGES[mtype]
    specs = fields_of(cls)
    sp = specs[index][1]
    good = [minimal(s) for _, s in specs]
    # The bound itself is accepted ...
    ok = list(good)
    ok[index] = at_bound(sp)
    assert getattr(m.decode(mtype, body_of(ok)), name) == at_bound(sp)
    # ... anything beyond it, or of another type, is a ProtocolError naming the field.
    for bad in bad_values(sp):
        values = list(good)
        values[index] = bad
        body = body_of(values)
        if len(body) > MAX_CONTROL_FRAME:
            continue
        with pytest.raises(ProtocolError) as ei:
            m.decode(mtype, body)
        assert not isinstance(ei.value, TypeError | KeyError | AttributeError)


@pytest.mark.parametrize("mtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x90\x00",  # a valid array followed by trailing garbage
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G items
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc6\x7f\xff\xff\xff",  # bin32 claiming 2 GiB
        b"\xd4\x01\x00",  # fixext: extension types are refused
        b"\x80",  # a map instead of an array
        b"\xc0",  # nil
        b"\x91" * 100_000,  # 100k-deep nesting
        msgpack.packb([b"\xff\xfe"], use_bin_type=False),  # invalid UTF-8 in a str
        msgpack.packb(list(range(20_000))),  # more than max_array_len
    ],
    ids=lambda b: b[:6].hex() or "empty",
)
def test_malformed_bodies_raise_protocol_error(mtype: MsgType, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.decode(mtype, body)


@pytest.mark.parametrize("mtype", DATA_TYPES, ids=lambda t: t.name)
def test_data_types_have_no_control_body(mtype: MsgType) -> None:
    with pytest.raises(ProtocolError):
        m.decode(mtype, msgpack.packb([]))


def test_oversized_control_body_is_refused_by_decode_and_encode() -> None:
    from pccl.frame import max_body

    bound = max_body(MsgType.P2M_LEAVE)  # small messages have a small bound
    assert bound < MAX_CONTROL_FRAME
    with pytest.raises(ProtocolError):
        m.decode(MsgType.P2M_LEAVE, b"\x91" + b"\x00" * bound)
    with pytest.raises(ValueError):
        encode_frame(MsgType.P2M_LEAVE, b"\x00" * (bound + 1))
    assert len(encode_frame(MsgType.P2M_LEAVE, b"\x00" * bound)) == HEADER.size + bound


def test_nan_and_inf_are_refused_in_every_float_field() -> None:
    for t in ALL_TYPES:
        specs = fields_of(MESSAGES[t])
        for i, (_, sp) in enumerate(specs):
            if sp.kind != "float":
                continue
            for bad in (math.nan, math.inf, -math.inf):
                values = [minimal(s) for _, s in specs]
                values[i] = bad
                with pytest.raises(ProtocolError):
                    m.decode(t, body_of(values))


# --------------------------------------------------------------------------- headers


def test_header_layout_is_big_endian_and_fixed() -> None:
    assert HEADER.format == "!HBBI"
    assert HEADER.size == 8
    raw = m.Heartbeat(5).encode()
    assert raw[:2] == b"PC"
    assert raw[2] == VERSION
    assert raw[3] == MsgType.P2M_HEARTBEAT
    assert struct.unpack("!I", raw[4:8])[0] == len(raw) - 8


@pytest.mark.parametrize(
    ("magic", "version", "mtype"),
    [
        (0x0000, VERSION, MsgType.P2M_HELLO),
        (0x4350, VERSION, MsgType.P2M_HELLO),  # byte-swapped magic
        (0xFFFF, VERSION, MsgType.P2M_HELLO),
        (MAGIC, 0, MsgType.P2M_HELLO),
        (MAGIC, VERSION + 1, MsgType.P2M_HELLO),
        (MAGIC, 255, MsgType.P2M_HELLO),
    ],
)
def test_bad_magic_or_version_is_refused(magic: int, version: int, mtype: MsgType) -> None:
    raw = frame(mtype, m.Hello(1, 0, 1).encode()[HEADER.size :], magic=magic, version=version)
    with pytest.raises(ProtocolError):
        parse_header(raw)
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        list(dec.feed(raw))


@pytest.mark.parametrize("mtype", UNKNOWN_TYPES)
def test_unknown_types_are_refused(mtype: int) -> None:
    raw = frame(mtype, msgpack.packb([]))
    with pytest.raises(ProtocolError):
        parse_header(raw)
    with pytest.raises(ProtocolError):
        list(FrameDecoder(allow_data=True).feed(raw))


def test_header_is_refused_as_soon_as_it_is_complete() -> None:
    """A bad header is refused from its 8 bytes alone, without waiting for the body."""
    for raw in (
        HEADER.pack(MAGIC ^ 1, VERSION, MsgType.P2M_HELLO, 10),
        HEADER.pack(MAGIC, VERSION, 200, 10),
        HEADER.pack(MAGIC, VERSION, MsgType.P2M_HELLO, MAX_CONTROL_FRAME + 1),
    ):
        dec = FrameDecoder()
        assert list(dec.feed(raw[:7])) == []
        with pytest.raises(ProtocolError):
            list(dec.feed(raw[7:]))


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.name)
def test_length_bounds_per_type(mtype: MsgType) -> None:
    if mtype.name == "P2P_DATA":
        bound = DATA_HEADER.size + MAX_DATA_FRAME
    elif mtype.name == "P2P_STATE_DATA":
        from pccl.frame import STATE_HEADER

        bound = STATE_HEADER.size + MAX_DATA_FRAME
    elif mtype.name in ("P2M_SYNC_SHARED_STATE", "M2P_SYNC_PLAN", "P2P_STATE_REQUEST"):
        from pccl.config import MAX_STATE_FRAME

        bound = MAX_STATE_FRAME  # they list every entry of a shared state
    elif mtype.name in ("M2P_TOPOLOGY", "M2P_PROBE_PLAN", "P2M_PROBE_REPORT"):
        bound = 4 * MAX_CONTROL_FRAME  # a ring (probe schedule, link report) of 4096 peers
    elif mtype.name in ("P2M_KV_SET", "M2P_KV_REPLY"):
        from pccl.config import MAX_KV_KEY, MAX_KV_VALUE

        bound = 2 * (MAX_KV_VALUE + 4 * MAX_KV_KEY + 64)  # a 64 KiB value and its key, twice
    else:
        from pccl.config import MAX_SMALL_FRAME

        bound = MAX_SMALL_FRAME
    assert parse_header(HEADER.pack(MAGIC, VERSION, mtype, bound)) == (mtype, bound)
    assert parse_header(HEADER.pack(MAGIC, VERSION, mtype, 0)) == (mtype, 0)
    for length in (bound + 1, 0xFFFF_FFFF):
        with pytest.raises(ProtocolError):
            parse_header(HEADER.pack(MAGIC, VERSION, mtype, length))


def test_truncated_header_is_a_protocol_error() -> None:
    raw = HEADER.pack(MAGIC, VERSION, MsgType.P2M_HELLO, 0)
    for k in range(HEADER.size):
        with pytest.raises(ProtocolError):
            parse_header(raw[:k])
    with pytest.raises(ProtocolError):
        parse_header(raw, offset=1)


def test_parse_header_at_offset_in_memoryview() -> None:
    raw = b"junk" + m.Leave("bye").encode()
    t, n = parse_header(memoryview(raw), 4)
    assert t is MsgType.P2M_LEAVE
    assert n == len(raw) - 4 - HEADER.size


def test_decoder_refuses_data_frames_on_control_links() -> None:
    for t in DATA_TYPES:
        raw = frame(t, b"\x00" * 64)
        with pytest.raises(ProtocolError):
            list(FrameDecoder().feed(raw))
        # ... and the refusal needs only the header.
        with pytest.raises(ProtocolError):
            list(FrameDecoder().feed(raw[: HEADER.size]))


def test_decoder_keeps_partial_frames_and_stops_at_the_first_bad_one() -> None:
    good = m.Heartbeat(1).encode()
    bad = frame(MsgType.P2M_HEARTBEAT, b"\xc1")
    dec = FrameDecoder()
    seen = []
    with pytest.raises(ProtocolError):
        for t, body in dec.feed(good + good + bad + good):
            seen.append(m.decode(t, body))
    assert seen == [m.Heartbeat(1), m.Heartbeat(1)]
    # An incomplete frame stays pending with exactly the bytes received.
    dec = FrameDecoder()
    assert list(dec.feed(good + good[:5])) == [(MsgType.P2M_HEARTBEAT, good[HEADER.size :])]
    assert dec.pending == 5


def test_zero_length_body_reaches_decode_and_is_refused() -> None:
    dec = FrameDecoder()
    ((t, body),) = list(dec.feed(frame(MsgType.P2M_HEARTBEAT, b"")))
    assert body == b""
    with pytest.raises(ProtocolError):
        m.decode(t, body)


# --------------------------------------------------------------------------- data headers


@pytest.mark.parametrize(
    "fields",
    [
        (0, 0, 0, 0, 0, 0, 0),
        (1, 7, 3, 2, 1000, 256, 1024),
        (2**64 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**64 - 1, 2**32 - 1, 17),
    ],
)
def test_data_header_round_trip(fields: tuple[int, ...]) -> None:
    op_id, tag, step, chunk, offset, count, payload = fields
    hdr = encode_data_header(op_id, tag, step, chunk, offset, count, payload)
    assert len(hdr) == HEADER.size + DATA_HEADER.size
    t, length = parse_header(hdr)
    assert t is MsgType.P2P_DATA
    assert length == DATA_HEADER.size + payload
    dh = parse_data_header(hdr, length, HEADER.size)
    assert dh == DataHeader(op_id, tag, step, chunk, offset, count, payload)
    # Through the decoder with the payload attached (data links allow data frames).
    data = bytes(range(256)) * (payload // 256 + 1)
    raw = hdr + data[:payload]
    ((t2, body),) = list(FrameDecoder(allow_data=True).feed(raw))
    assert t2 is MsgType.P2P_DATA
    assert parse_data_header(body, len(body)) == dh
    assert body[DATA_HEADER.size :] == data[:payload]


@settings(max_examples=200, deadline=None)
@given(
    op_id=st.integers(0, 2**64 - 1),
    tag=st.integers(0, 2**32 - 1),
    step=st.integers(0, 2**32 - 1),
    chunk=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**64 - 1),
    count=st.integers(0, 2**32 - 1),
    payload=st.integers(0, MAX_DATA_FRAME),
)
def test_data_header_round_trip_random(
    op_id: int, tag: int, step: int, chunk: int, offset: int, count: int, payload: int
) -> None:
    hdr = encode_data_header(op_id, tag, step, chunk, offset, count, payload)
    t, length = parse_header(hdr)
    assert t is MsgType.P2P_DATA
    assert parse_data_header(memoryview(hdr), length, HEADER.size) == DataHeader(
        op_id, tag, step, chunk, offset, count, payload
    )


def test_data_header_too_short_is_a_protocol_error() -> None:
    hdr = encode_data_header(1, 2, 3, 4, 5, 6, 0)[HEADER.size :]
    for body_length in range(DATA_HEADER.size):
        with pytest.raises(ProtocolError):
            parse_data_header(hdr, body_length)
    for k in range(DATA_HEADER.size):  # the buffer itself is cut short
        with pytest.raises(ProtocolError):
            parse_data_header(hdr[:k], DATA_HEADER.size)


def test_data_payload_over_the_bound_is_refused() -> None:
    hdr = encode_data_header(1, 0, 0, 0, 0, 0, MAX_DATA_FRAME + 1)
    with pytest.raises(ProtocolError):
        parse_header(hdr)
    with pytest.raises(ProtocolError):
        list(FrameDecoder(allow_data=True).feed(hdr))
