"""Fuzzing the control-frame decoder: only ``ProtocolError`` may ever escape.

Random and mutated frames (hypothesis for structure, then a seeded mutation loop of more than
100k frames over valid frames of every message type: bit flips, truncation, length-field edits,
splicing, msgpack type confusion, nesting bombs) go through ``FrameDecoder`` and
``messages.decode`` exactly as the master and the peers use them. Any exception other than
``pccl.ProtocolError`` fails the test; every message that does decode is well-formed (it
re-encodes and decodes to itself). Memory stays bounded: a header claiming 4 GiB is refused
before anything is allocated for it. Pure functions; no sockets.
"""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pccl import messages as m
from pccl.config import MAX_CONTROL_FRAME
from pccl.errors import ProtocolError
from pccl.frame import HEADER, MAGIC, VERSION, FrameDecoder, MsgType
from pccl.messages import MESSAGES, Spec

pytestmark = pytest.mark.timeout(120)

KNOWN_TYPES = [int(t) for t in MsgType]
CONTROL_TYPES = sorted(MESSAGES, key=int)
MUTATION_FRAMES = 110_000


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
                assert len(body) <= MAX_CONTROL_FRAME or allow_data
                if mtype not in MESSAGES:
                    continue  # raw data frame (allow_data only): no control body
                msg = m.decode(mtype, body)
                _check_well_formed(msg)
                out["decoded"] += 1
    except ProtocolError:
        out["refused"] += 1
        return out
    # An incomplete frame waits for more bytes; it never buffers more than one bounded frame.
    assert dec.pending < HEADER.size + MAX_CONTROL_FRAME + 64
    out["waiting" if dec.pending else "clean"] += 1
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    pts = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *pts], [*pts, len(data)])]


def _check_well_formed(msg: m.Message) -> None:
    """A decoded message satisfies its schema: it re-encodes and decodes to itself."""
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
        frames = []
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


@pytest.mark.parametrize("filler", [b"\x90", b"\x80", b"\xa0"], ids=["lists", "maps", "strs"])
def test_expansion_bomb_in_a_maximum_control_frame_is_bounded(filler: bytes) -> None:
    """A 1 MiB body of 16384-wide arrays of empty containers expands to ~1M Python objects.

    It is refused, and its transient cost stays within a fixed bound. The bound documents the
    current amplification (about 70x for empty maps); it is not a target.
    """
    inner = b"\xdc" + struct.pack("!H", 16384) + filler * 16384
    n = (MAX_CONTROL_FRAME - 3) // len(inner)
    body = b"\xdc" + struct.pack("!H", n) + inner * n
    assert len(body) <= MAX_CONTROL_FRAME
    data = hdr(MsgType.P2M_HELLO, len(body)) + body
    t0 = time.perf_counter()
    assert feed(data)["refused"] == 1
    elapsed = time.perf_counter() - t0  # the master's loop is blocked this long per frame
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert feed(data)["refused"] == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 128 * MAX_CONTROL_FRAME, f"peak {peak / 2**20:.0f} MiB"
    assert elapsed < 1.0, f"{elapsed:.2f}s to refuse one frame"
