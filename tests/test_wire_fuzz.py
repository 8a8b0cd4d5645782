"""Fuzzing the control-frame decoder: only ``ProtocolError`` may ever escape.

Random and mutated frames (hypothesis for structure, then a seeded mutation loop of more than
100k frames over valid frames of every message type: bit flips, truncation, length-field edits,
splicing, msgpack type confusion, nesting bombs) go through ``FrameDecoder`` and
``messages.decode`` exactly as the master and the peers use them. Any exception other than
``pccl.ProtocolError`` fails the test; every message that does decode is well-formed (it
re-encodes and decodes to itself). Memory stays bounded: a header claiming 4 GiB is refused
before anything is allocated for it, and expansion bombs (nested or wide empty containers, huge
count claims, maps, extension types, strings at the unpacker's limit) as large as each type's
frame bound (16 MiB for the state messages) are refused, at every position of every schema, in
well under a second with a peak of at most 8x the body plus 1 MiB. Pure functions; no sockets.
"""

from __future__ import annotations

import math
import random
import struct
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import msgpack.fallback
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pccl import messages as m
from pccl.config import MAX_CONTROL_FRAME
from pccl.errors import ProtocolError
from pccl.frame import HEADER, MAGIC, VERSION, FrameDecoder, MsgType, max_body
from pccl.messages import MESSAGES, Spec

pytestmark = pytest.mark.timeout(120)

KNOWN_TYPES = [int(t) for t in MsgType]
CONTROL_TYPES = sorted(MESSAGES, key=int)
MUTATION_FRAMES = 110_000
#: The largest control body of any type (the state messages': 16 MiB).
MAX_BODY = max(max_body(t) for t in CONTROL_TYPES)


# --------------------------------------------------------------------------- harness


def feed(data: bytes, chunks: list[int] | None = None, *, allow_data: bool = False) -> Counter:
    """Feed ``data`` to a fresh decoder the way a connection does; decode each frame.

    Returns counts of ``decoded`` messages and ``refused``/``waiting`` streams. Any exception
    other than ``ProtocolError`` propagates (and fails the calling test).
    """
    out: Counter = Counter()
    dec = FrameDecoder(allow_data=allow_data)
    pieces = [data] if not chunks else _split(data, chunks)
    try:
        for piece in pieces:
            for mtype, body in dec.feed(piece):
                assert len(body) <= max_body(mtype)
                if mtype not in MESSAGES:
                    continue  # raw data frame (allow_data only): no control body
                msg = m.decode(mtype, body)
                _check_well_formed(msg)
                out["decoded"] += 1
    except ProtocolError:
        out["refused"] += 1
        return out
    # An incomplete frame waits for more bytes; it never buffers more than one bounded frame.
    assert dec.pending < HEADER.size + MAX_BODY
    out["waiting" if dec.pending else "clean"] += 1
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    pts = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *pts], [*pts, len(data)])]


def conforms(v: Any, sp: Spec) -> bool:
    """Whether ``v`` lies within ``sp``: the fuzzers' oracle, independent of ``decode``."""
    k = sp.kind
    if k == "int":
        return type(v) is int and sp.lo <= v <= sp.hi
    if k == "float":
        return type(v) is float and math.isfinite(v)
    if k == "bool":
        return type(v) is bool
    if k in ("str", "bytes"):
        return type(v) is (str if k == "str" else bytes) and len(v) <= sp.hi
    if k == "list":
        assert isinstance(sp.items, Spec)
        item = sp.items
        return type(v) is list and len(v) <= sp.hi and all(conforms(x, item) for x in v)
    assert k == "tuple" and isinstance(sp.items, tuple)
    return (
        type(v) is tuple
        and len(v) == len(sp.items)
        and all(conforms(x, s) for x, s in zip(v, sp.items))
    )


def _check_well_formed(msg: m.Message) -> None:
    """A decoded message satisfies its schema (every value within its spec, lists as lists,
    tuples as tuples), and it re-encodes and decodes to itself."""
    for name, sp in msg._fields:
        assert conforms(getattr(msg, name), sp), f"{type(msg).__name__}.{name} out of spec"
    raw = msg.encode()
    _, _, t, n = HEADER.unpack_from(raw)
    assert t == msg.TYPE
    assert n == len(raw) - HEADER.size
    assert m.decode(msg.TYPE, raw[HEADER.size :]) == msg


def hdr(mtype: int, length: int, magic: int = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, mtype, length)


# --------------------------------------------------------------------------- valid corpus


def _value(sp: Spec, rng: random.Random) -> Any:
    k = sp.kind
    if k == "int":
        return rng.choice([sp.lo, sp.hi, rng.randint(sp.lo, sp.hi), min(sp.hi, 1)])
    if k == "float":
        return rng.choice([0.0, 0.5, 3.0, -1e300, 1e-300])
    if k == "bool":
        return rng.random() < 0.5
    if k == "str":
        return "".join(rng.choice("ab\u00e9\u4e2d") for _ in range(rng.randint(0, min(sp.hi, 12))))
    if k == "bytes":
        return rng.randbytes(rng.randint(0, min(sp.hi, 16)))
    if k == "list":
        assert isinstance(sp.items, Spec)
        return [_value(sp.items, rng) for _ in range(rng.randint(0, min(sp.hi, 3)))]
    if k == "tuple":
        assert isinstance(sp.items, tuple)
        return tuple(_value(i, rng) for i in sp.items)
    raise AssertionError(k)


def valid_message(cls: type[m.Message], rng: random.Random) -> m.Message:
    return cls(**{name: _value(sp, rng) for name, sp in cls._fields})


def corpus(seed: int, per_type: int = 12) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for t in CONTROL_TYPES:
        for _ in range(per_type):
            raw = valid_message(MESSAGES[t], rng).encode()
            assert feed(raw)["decoded"] == 1  # the corpus itself is valid
            out.append(raw)
    return out


# --------------------------------------------------------------------------- mutations

_CONFUSERS: list[Any] = [
    None,
    True,
    False,
    -1,
    -(2**63),
    2**64 - 1,
    2**32,
    0.5,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "x" * 300,
    "\u00e9" * 70,
    b"",
    b"\x00" * 80,
    [],
    [[]],
    [0] * 40,
    {},
    {"k": 1},
    {"a": [1, 2]},
    msgpack.ExtType(1, b"abc"),
    msgpack.Timestamp(1, 0),  # extension type -1
]


def _confuse(obj: Any, rng: random.Random, depth: int = 0) -> Any:
    """Replace one leaf (or subtree) of a decoded msgpack object by another type."""
    if isinstance(obj, list) and obj and depth < 6 and rng.random() < 0.8:
        i = rng.randrange(len(obj))
        obj = list(obj)
        obj[i] = _confuse(obj[i], rng, depth + 1)
        return obj
    return rng.choice(_CONFUSERS)


def _pack(obj: Any, rng: random.Random) -> bytes:
    bin_type = rng.random() < 0.7  # False: bytes travel as raw str (type confusion)
    if rng.random() < 0.2:
        try:
            return msgpack.packb(obj, use_bin_type=bin_type, use_single_float=True)
        except OverflowError:  # a double that float32 cannot hold
            pass
    return msgpack.packb(obj, use_bin_type=bin_type)


def _bomb(rng: random.Random) -> bytes:
    """Bodies that are small on the wire but claim or expand to a lot."""
    kind = rng.randrange(7)
    if kind == 0:
        return b"\x91" * rng.randint(100, 50_000)  # deep nesting
    if kind == 1:
        return b"\xdd" + struct.pack("!I", rng.choice([2**32 - 1, 2**31, 16385, 65536]))
    if kind == 2:
        return b"\xdb" + struct.pack("!I", rng.choice([2**32 - 1, 65537, 2**20]))
    if kind == 3:
        return b"\xc6" + struct.pack("!I", rng.choice([2**32 - 1, 65537])) + b"\x00" * 8
    if kind == 4:
        return b"\xdf" + struct.pack("!I", rng.choice([2**32 - 1, 1025, 3])) + b"\xa1a\x00"
    if kind == 5:
        return b"\xc9" + struct.pack("!I", 2**32 - 1) + b"\x01"  # ext32
    return b"\x9f" + b"\xdc\x3f\xff" + b"\x90" * rng.randint(0, 2000)  # wide, shallow


def mutate(frames: list[bytes], rng: random.Random) -> tuple[str, bytes]:
    """One mutated input, and the name of the mutation that made it."""
    base = rng.choice(frames)
    body = base[HEADER.size :]
    mtype = base[3]
    op = rng.randrange(14)
    if op == 0:  # bit flips anywhere
        b = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return "bitflip", bytes(b)
    if op == 1:  # truncation (the decoder must simply wait)
        return "truncate", base[: rng.randrange(len(base))]
    if op == 2:  # body truncated, length field fixed to match
        cut = body[: rng.randrange(len(body) + 1)]
        return "truncate_body", hdr(mtype, len(cut)) + cut
    if op == 3:  # length field edits
        length = rng.choice(
            [
                0,
                1,
                len(body) - 1,
                len(body) + 1,
                MAX_CONTROL_FRAME,
                MAX_CONTROL_FRAME + 1,
                max_body(mtype),
                max_body(mtype) + 1,
                2**31,
                2**32 - 1,
                rng.randrange(2**32),
            ]
        )
        return "length", hdr(mtype, max(0, length)) + body + rng.randbytes(rng.randint(0, 16))
    if op == 4:  # splice two frames at random points
        other = rng.choice(frames)
        return "splice", base[: rng.randrange(len(base) + 1)] + other[rng.randrange(len(other)) :]
    if op == 5:  # header of one type, body of another
        other = rng.choice(frames)
        return "swap_body", hdr(mtype, len(other) - HEADER.size) + other[HEADER.size :]
    if op == 6:  # msgpack type confusion, re-framed with a correct length
        obj = msgpack.unpackb(body, raw=False)
        new = _pack(_confuse(obj, rng), rng)
        return "confuse", hdr(mtype, len(new)) + new
    if op == 7:  # insert / delete bytes inside the body, length fixed
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b) + 1)
            if rng.random() < 0.5 and b:
                del b[min(i, len(b) - 1)]
            else:
                b[i:i] = rng.randbytes(rng.randint(1, 3))
        return "indel", hdr(mtype, len(b)) + bytes(b)
    if op == 8:  # header fields: type, magic, version
        t = rng.choice([rng.randrange(256), *KNOWN_TYPES])
        magic = MAGIC if rng.random() < 0.7 else rng.randrange(2**16)
        version = VERSION if rng.random() < 0.7 else rng.randrange(256)
        return "header", hdr(t, len(body), magic, version) + body
    if op == 9:  # pure garbage
        return "garbage", rng.randbytes(rng.randint(0, 64))
    if op == 10:  # nesting / allocation bombs
        bomb = _bomb(rng)
        return "bomb", hdr(rng.choice(CONTROL_TYPES), len(bomb)) + bomb
    if op == 11:  # several valid frames, one mutated in the middle
        _, bad = mutate(frames, rng)
        return "stream", rng.choice(frames) + bad + rng.choice(frames)
    if op == 12:  # random array of fields, arity off by a few
        obj = msgpack.unpackb(body, raw=False)
        n = max(0, len(obj) + rng.choice([-2, -1, 1, 2, 5]))
        new = _pack((obj + [rng.choice(_CONFUSERS) for _ in range(8)])[:n], rng)
        return "arity", hdr(mtype, len(new)) + new
    # op == 13: random msgpack object as the whole body
    new = _pack(_confuse([rng.choice(_CONFUSERS) for _ in range(rng.randint(0, 6))], rng), rng)
    return "random_body", hdr(mtype, len(new)) + new


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(60)
def test_seeded_mutation_loop_only_raises_protocol_error() -> None:
    """More than 100k mutated frames: every one is decoded, refused or left waiting."""
    rng = random.Random(0x5EED_0001)
    frames = corpus(seed=1)
    totals: Counter = Counter()
    by_op: Counter = Counter()
    t0 = time.monotonic()
    for i in range(MUTATION_FRAMES):
        name, data = mutate(frames, rng)
        by_op[name] += 1
        chunks = None if i % 4 else [rng.randrange(len(data) + 1) for _ in range(3)]
        try:
            totals += feed(data, chunks, allow_data=(i % 16 == 0))
        except ProtocolError:  # pragma: no cover - feed() catches these itself
            raise
        except Exception as e:
            pytest.fail(f"{type(e).__name__} escaped for {name} input {data[:80].hex()}: {e}")
    elapsed = time.monotonic() - t0
    assert sum(by_op.values()) == MUTATION_FRAMES >= 100_000
    assert set(by_op) >= {"bitflip", "confuse", "length", "splice", "bomb", "truncate"}
    # The mutations must actually reach every outcome, or the fuzzer is not doing its job.
    assert totals["refused"] > MUTATION_FRAMES // 3, totals
    assert totals["decoded"] > 1000, totals
    assert totals["waiting"] > 1000, totals
    assert elapsed < 45, f"fuzz loop took {elapsed:.1f}s"


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mtype=st.sampled_from(KNOWN_TYPES) | st.integers(0, 255),
    magic=st.just(MAGIC) | st.integers(0, 2**16 - 1),
    version=st.just(VERSION) | st.integers(0, 255),
    length_delta=st.just(0) | st.integers(-8, 8) | st.integers(0, 2**32 - 1),
    body=msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)) | st.binary(),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
    allow_data=st.booleans(),
)
def test_structured_random_frames(
    mtype: int,
    magic: int,
    version: int,
    length_delta: int,
    body: bytes,
    cuts: list[int],
    allow_data: bool,
) -> None:
    length = length_delta if length_delta > 8 else max(0, len(body) + length_delta)
    data = HEADER.pack(magic, version, mtype, min(length, 2**32 - 1)) + body
    feed(data, cuts, allow_data=allow_data)


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mtype=st.sampled_from(CONTROL_TYPES),
    fields=st.lists(msgpack_values, max_size=9),
)
def test_structured_field_confusion(mtype: MsgType, fields: list[Any]) -> None:
    """Arrays of arbitrary msgpack values in every field position of every message type."""
    body = msgpack.packb(fields, use_bin_type=True)
    feed(hdr(mtype, len(body)) + body)
    try:
        msg = m.decode(mtype, body)
    except ProtocolError:
        return
    _check_well_formed(msg)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_arbitrary_byte_streams(data: bytes, cuts: list[int]) -> None:
    feed(data, cuts)
    feed(hdr(MsgType.P2M_HELLO, len(data)) + data, cuts)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    ("mtype", "allow_data"),
    [
        (MsgType.P2M_HELLO, False),
        (MsgType.M2P_TOPOLOGY, False),
        (MsgType.P2P_DATA, True),
        (MsgType.P2P_DATA, False),
    ],
    ids=["hello", "topology", "data-link", "data-on-control"],
)
def test_four_gib_claim_is_refused_before_allocating(mtype: MsgType, allow_data: bool) -> None:
    dec = FrameDecoder(allow_data=allow_data)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(ProtocolError):
            # The header alone is enough to refuse; the body that follows is never buffered.
            list(dec.feed(hdr(mtype, 0xFFFF_FFFF) + b"\x00" * 4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"peak {peak} bytes while refusing a 4 GiB claim"


def test_trickled_maximum_frame_buffers_only_what_arrived() -> None:
    """A legitimate maximum-size frame streamed in 64 KiB pieces: memory is a small multiple
    of the frame, never of the claimed size of anything else."""
    body = b"\x91\xa0" + b"\x00" * (MAX_CONTROL_FRAME - 2)  # valid header, decode refuses
    data = hdr(MsgType.M2P_TOPOLOGY, len(body)) + body  # a type whose bound admits 1 MiB
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        frames: list[tuple[MsgType, bytes]] = []
        for i in range(0, len(data), 64 << 10):
            frames.extend(dec.feed(data[i : i + (64 << 10)]))
            assert dec.pending <= i + (64 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frames) == 1
    assert dec.pending == 0
    assert peak < 6 * MAX_CONTROL_FRAME, f"peak {peak / 2**20:.1f} MiB for one 1 MiB frame"
    with pytest.raises(ProtocolError):
        m.decode(*frames[0])


def test_header_trickled_then_stalled_claim_costs_nothing() -> None:
    """A valid header claiming the maximum body, then silence: nothing is preallocated."""
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for byte in hdr(MsgType.M2P_TOPOLOGY, MAX_CONTROL_FRAME):
            assert list(dec.feed(bytes([byte]))) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dec.pending == HEADER.size
    assert peak < 64 << 10


# --------------------------------------------------------------------------- expansion bombs

_PACKER = msgpack.Packer(use_bin_type=True)


def _arr(n: int) -> bytes:
    return _PACKER.pack_array_header(n)


def _pk(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)  # tuples travel as arrays


def _u32(n: int) -> bytes:
    return struct.pack("!I", n)


def _minimal(sp: Spec) -> Any:
    if sp.kind == "tuple":
        assert isinstance(sp.items, tuple)
        return tuple(_minimal(i) for i in sp.items)
    return {"int": sp.lo, "float": 0.0, "bool": False, "str": "", "bytes": b"", "list": []}[sp.kind]


def _at_bound(sp: Spec) -> Any:
    """Lists at their bound, of minimal items: the most objects per byte a schema admits."""
    if sp.kind == "list":
        assert isinstance(sp.items, Spec)
        return [_minimal(sp.items)] * sp.hi
    if sp.kind == "tuple":
        assert isinstance(sp.items, tuple)
        return tuple(_at_bound(i) for i in sp.items)
    return _minimal(sp)


def _starts(sp: Spec) -> list[tuple[str, bytes]]:
    """Where a value of ``sp``, or of anything inside it, starts: (path, valid bytes before)."""
    out = [("", b"")]
    if sp.kind == "list":
        assert isinstance(sp.items, Spec)
        out += [(f"[0]{p}", _arr(1) + pre) for p, pre in _starts(sp.items)]
        # The list claiming its bound, every item valid but the last.
        out.append((f"[{sp.hi - 1}]", _arr(sp.hi) + _pk(_minimal(sp.items)) * (sp.hi - 1)))
    elif sp.kind == "tuple":
        assert isinstance(sp.items, tuple)
        for j, item in enumerate(sp.items):
            lead = _arr(len(sp.items)) + b"".join(_pk(_minimal(i)) for i in sp.items[:j])
            out += [(f"[{j}]{p}", lead + pre) for p, pre in _starts(item)]
    return out


def positions(cls: type[m.Message]) -> list[tuple[str, bytes]]:
    """Every position in ``cls``'s schema, named as decode's errors name it, with the valid
    bytes of a body up to it: the body itself, each field, each list item and tuple slot."""
    out = [("", b"")]
    fs = cls._fields
    for i, (name, sp) in enumerate(fs):
        lead = _arr(len(fs)) + b"".join(_pk(_minimal(s)) for _, s in fs[:i])
        out += [(f".{name}{p}", lead + pre) for p, pre in _starts(sp)]
    return out


def _str_limit(cls: type[m.Message]) -> int:
    """Longest str (UTF-8 bytes) that ``cls`` admits anywhere: 4 bytes per character."""

    def walk(sp: Spec) -> int:
        if sp.kind == "str":
            return 4 * sp.hi
        subs = [sp.items] if isinstance(sp.items, Spec) else list(sp.items or ())
        return max((walk(s) for s in subs), default=0)

    return max(walk(sp) for _, sp in cls._fields)


def _repeat(head: bytes, item: bytes, n: int) -> bytes:
    """An array32 of as many ``item`` as fit in ``n`` bytes (``head`` comes before it)."""
    k = (n - len(head) - 5) // len(item)
    return head + b"\xdd" + _u32(k) + item * k


def _run(item: bytes, n: int) -> bytes:
    return item * (n // len(item))


def _strs(n: int, limit: int, over: int) -> bytes:
    return _repeat(b"", _PACKER.pack("a" * (limit + over)), n)


#: Bodies (or body tails) of ``n`` bytes at most that are cheap on the wire and would be costly
#: to materialise; ``limit`` is the longest str the message admits.
BOMBS: dict[str, Callable[[int, int], bytes]] = {
    "deep_arrays": lambda n, _: b"\x91" * (n - 1) + b"\x90",  # the measured attack's shape
    "wide_empty_arrays": lambda n, _: _repeat(b"", b"\x90", n),
    # Each 3 bytes claim 65535 items: msgpack's C unpacker preallocates a list that long.
    "nested_wide_headers": lambda n, _: _run(b"\xdc\xff\xff", n),
    "array32_claims_4g": lambda n, _: b"\xdd\xff\xff\xff\xff" + b"\x90" * (n - 5),
    "deep_maps": lambda n, _: _run(b"\x81\xa0", n),
    "wide_empty_maps": lambda n, _: b"\xdf" + _u32((n - 5) // 2) + b"\xa0\x80" * ((n - 5) // 2),
    "map32_claims_4g": lambda n, _: b"\xdf\xff\xff\xff\xff" + b"\x80" * (n - 5),
    "fixexts": lambda n, _: _repeat(b"", b"\xd4\x01\x00", n),
    "empty_ext8s": lambda n, _: _run(b"\xc7\x00\x05", n),
    "timestamps": lambda n, _: _repeat(b"", b"\xd6\xff\x00\x00\x00\x01", n),
    "ext32_claims_4g": lambda n, _: b"\xc9\xff\xff\xff\xff\x01" + b"\x00" * (n - 6),
    "str32_claims_4g": lambda n, _: b"\xdb\xff\xff\xff\xff" + b"a" * (n - 5),
    "bin32_claims_4g": lambda n, _: b"\xc6\xff\xff\xff\xff" + b"\x00" * (n - 5),
    "strs_at_the_limit": lambda n, lim: _strs(n, lim, 0),
    "strs_over_the_limit": lambda n, lim: _strs(n, lim, 1),
    "str_run_at_the_limit": lambda n, lim: _run(_PACKER.pack("a" * lim), n),
    "negative_fixints": lambda n, _: _repeat(b"", b"\xe0", n),  # -32: not a cached int
    "uint16s": lambda n, _: _repeat(b"", b"\xcd\x01\x01", n),
    "float64s": lambda n, _: _repeat(b"", b"\xcb" + struct.pack("!d", 1e300), n),
    "nils": lambda n, _: _repeat(b"", b"\xc0", n),
}


LONG_LEAD_BOMBS = ("deep_arrays", "nested_wide_headers", "array32_claims_4g", "strs_at_the_limit")


def _measure(mtype: MsgType, body: bytes) -> tuple[str, int, float]:
    """Decode ``body`` (it must be refused); return the error, peak bytes allocated, seconds."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        m.decode(mtype, body)
    except ProtocolError as e:
        err = str(e)
    else:
        pytest.fail(f"{mtype.name} decoded {body[:40].hex()}...")
    elapsed = time.perf_counter() - t0
    return err, tracemalloc.get_traced_memory()[1] - before, elapsed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("mtype", CONTROL_TYPES, ids=lambda t: t.name)
def test_expansion_bombs_at_every_schema_position_are_refused_cheaply(
    mtype: MsgType, impl: str
) -> None:
    """Every bomb at every position of the schema, filling the body to its frame bound.

    Each is refused at the position it was put (the error names it), with a peak of at most
    8x the body plus 1 MiB (the unpacker's copy of the body, the valid prefix, one refused
    scalar) and in well under a second. The pure-Python unpacker gets bodies of up to 1 MiB.
    """
    cls = MESSAGES[mtype]
    bound = max_body(mtype) if impl == "c" else min(max_body(mtype), 1 << 20)
    limit = _str_limit(cls)
    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            if impl == "python":
                mp.setattr(msgpack, "Unpacker", msgpack.fallback.Unpacker)
            for where, prefix in positions(cls):
                # Behind a list at its bound (a long valid prefix, slow to decode under
                # tracemalloc), a few bombs suffice; the pure-Python unpacker skips these.
                long_lead = len(prefix) > 4096
                if long_lead and impl == "python":
                    continue
                for name, bomb in BOMBS.items():
                    if long_lead and name not in LONG_LEAD_BOMBS:
                        continue
                    body = prefix + bomb(bound - len(prefix), limit)
                    assert bound - 8192 <= len(body) <= bound
                    err, peak, elapsed = _measure(mtype, body)
                    what = f"{name} at {mtype.name}{where}"
                    assert err.startswith(f"{mtype.name}{where}"), f"{what}: {err}"
                    assert peak <= 8 * len(body) + (1 << 20), f"{what}: peak {peak} bytes"
                    assert elapsed < 2.0, f"{what}: {elapsed:.2f} s"
    finally:
        tracemalloc.stop()


def _bound_body(cls: type[m.Message]) -> bytes:
    return _pk([_at_bound(sp) for _, sp in cls._fields])


LISTED_TYPES = [t for t in CONTROL_TYPES if any(sp.kind == "list" for _, sp in MESSAGES[t]._fields)]


@pytest.mark.parametrize("mtype", LISTED_TYPES, ids=lambda t: t.name)
def test_garbage_after_a_valid_prefix_costs_no_more_than_the_prefix(mtype: MsgType) -> None:
    """The costliest prefix a bomb can have is a valid message with every list at its bound;
    what follows it (cut short, then a bomb up to the frame bound) adds only the unpacker's
    copy of the longer body."""
    cls = MESSAGES[mtype]
    valid = _bound_body(cls)
    assert len(valid) <= max_body(mtype)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        msg = m.decode(mtype, valid)
        valid_peak = tracemalloc.get_traced_memory()[1] - before
        del msg
        for name in ("deep_arrays", "wide_empty_arrays", "nested_wide_headers", "nils"):
            body = valid[:-1] + BOMBS[name](max_body(mtype) - len(valid) + 1, 0)
            _, peak, elapsed = _measure(mtype, body)
            assert peak <= valid_peak + len(body) + (1 << 20), (name, peak, valid_peak)
            assert elapsed < 2.0, (name, elapsed)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mtype", LISTED_TYPES, ids=lambda t: t.name)
def test_largest_valid_messages_cost_a_bounded_multiple_of_their_bytes(mtype: MsgType) -> None:
    """What a valid message may cost decoded: lists at their bound, inner lists full of small
    uncached ints (257: 3 bytes on the wire, 40 in Python), cut to fit 512 KiB. Those objects
    are the message itself; no input can cost more per byte than these do."""
    cls = MESSAGES[mtype]

    def dense(sp: Spec) -> Any:
        if sp.kind == "int":
            return min(sp.hi, 257)
        if sp.kind == "list":
            assert isinstance(sp.items, Spec)
            return [dense(sp.items)] * sp.hi
        if sp.kind == "tuple":
            assert isinstance(sp.items, tuple)
            return tuple(dense(i) for i in sp.items)
        return _minimal(sp)

    values = [dense(sp) for _, sp in cls._fields]
    budget = (512 << 10) // sum(type(v) is list for v in values)  # bytes per top-level list
    values = [v[: budget // len(_pk(v[0]))] if type(v) is list else v for v in values]
    body = _pk(values)
    assert len(body) <= 513 << 10
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        msg = m.decode(mtype, body)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert msg == cls(*values)
    assert peak <= 16 * len(body) + (4 << 20), f"{peak / len(body):.1f}x of {len(body)} bytes"


#: Pieces of msgpack that fragment-built bodies repeat: containers, claims, scalars and whole
#: valid items of the state messages' lists.
FRAGMENTS = [
    b"\x90",
    b"\x91",
    b"\x9f",
    b"\x80",
    b"\x81\xa0",
    b"\xa0",
    b"\xa1a",
    b"\xc0",
    b"\xc3",
    b"\x00",
    b"\xe0",
    b"\xcd\x01\x01",
    b"\xc4\x00",
    b"\xd4\x01\x00",
    b"\xdc\x40\x00",
    b"\xdd\xff\xff\xff\xff",
    b"\xdb\x00\x00\x10\x00",
    b"\x96\xa0\x00\x00\x90\xc4\x00\xc2",  # a vote entry ("", 0, 0, [], b"", False)
    b"\x93\xa0\xc4\x00\x91\x01",  # a plan fetch item ("", b"", [1])
    b"\x93\x01\xa0\x00",  # a ring or source entry (1, "", 0)
    b"\x93\xa0\x00\x00",  # a state range ("", 0, 0)
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    mtype=st.sampled_from(CONTROL_TYPES),
    where=st.integers(0, 10_000),
    runs=st.lists(
        st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 1 << 24) | st.just(1 << 24)),
        min_size=1,
        max_size=4,
    ),
)
def test_fragment_bodies_up_to_the_frame_bound(
    mtype: MsgType, where: int, runs: list[tuple[bytes, int]]
) -> None:
    """Bodies far past the old 4 KiB fuzz bound, up to each type's frame bound: a valid lead
    up to a random schema position, then runs of repeated fragments. Each decodes to a
    well-formed message or is refused, through the frame decoder too."""
    bound = max_body(mtype)
    places = positions(MESSAGES[mtype])
    _, lead = places[where % len(places)]
    body = lead + b"".join(f * min(n, bound // len(f) + 1) for f, n in runs)
    body = body[:bound]
    t0 = time.perf_counter()
    try:
        msg = m.decode(mtype, body)
    except ProtocolError:
        pass
    else:
        _check_well_formed(msg)
    assert time.perf_counter() - t0 < 5.0  # generous: a 16 MiB body takes tens of ms
    feed(hdr(mtype, len(body)) + body)


@pytest.mark.parametrize(
    ("filler", "nested"),
    [(b"\x90", False), (b"\x80", False), (b"\xa0", False), (b"\x91", True)],
    ids=["wide-lists", "wide-maps", "wide-strs", "deep-lists"],
)
def test_the_measured_16_mib_vote_bomb_is_refused_at_once(filler: bytes, nested: bool) -> None:
    """The measured attack: one 16 MiB shared-state vote of empty containers used to freeze a
    process for more than 3 s and take 1.2 GiB. Now the frame decoder buffers it and decode
    refuses it from its first array header: a few copies of the body, milliseconds."""
    mtype = MsgType.P2M_SYNC_SHARED_STATE
    n = max_body(mtype)
    body = filler * n if nested else b"\xdd" + _u32(n - 5) + filler * (n - 5)
    data = hdr(mtype, len(body)) + body
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        assert feed(data)["refused"] == 1
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # The decoder's buffer, the frame's body, the unpacker's copy: 3x, plus slack.
    assert peak <= 4 * len(body) + (1 << 20), f"peak {peak / 2**20:.0f} MiB"
    assert elapsed < 1.0, f"{elapsed:.2f} s to refuse one frame"
