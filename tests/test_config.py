"""``pccl.Config``: defaults, validation, ``PCCL_<FIELD>`` environment parsing.

A bad value must fail at construction with ``ValueError``/``TypeError`` naming the field (or the
environment variable), never later inside a collective. Pure; no sockets.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

import pccl
from pccl.config import MAX_CONTROL_FRAME, MAX_DATA_FRAME, Config

pytestmark = pytest.mark.timeout(30)

FIELDS = [f.name for f in dataclasses.fields(Config)]
TIMEOUTS = [n for n in FIELDS if n.endswith("_s")]
BOOLS = ["send_threads", "auto_optimize_topology", "tcp_bbr", "auto_streams"]
NUMBERS = [n for n in FIELDS if n not in BOOLS]
INTS = [
    "chunk_bytes",
    "quant_block",
    "socket_buffer_bytes",
    "local_socket_buffer_bytes",
    "local_streams",
    "probe_max_bytes",
    "tcp_notsent_lowat_bytes",
    "max_streams",
    "shm_link_bytes",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``PCCL_*`` variable from the outer environment leaks into a test."""
    import os

    for k in list(os.environ):
        if k.startswith("PCCL_"):
            monkeypatch.delenv(k)
    return monkeypatch


# --------------------------------------------------------------------------- defaults


ROOT = Path(__file__).resolve().parent.parent
_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20}


def _doc_table(path: Path, heading: str) -> dict[str, str]:
    """``{setting: default cell}`` of the first table after ``heading`` (a whole line)."""
    lines = path.read_text().splitlines()
    assert heading in lines, f"{path.name}: no section {heading!r}"
    rows: dict[str, str] = {}
    for line in lines[lines.index(heading) + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        m = re.match(r"\| `(\w+)` \| ([^|]+) \|", line)
        if m:
            assert m[1] not in rows, f"{path.name}: {m[1]} listed twice"
            rows[m[1]] = m[2].strip()
    assert rows, f"{path.name}: no table under {heading!r}"
    return rows


def _doc_value(cell: str) -> float | bool:
    """A documented default: ``true``/``false``, or a number with an optional KiB/MiB unit."""
    if cell in ("true", "false"):
        return cell == "true"
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(?: (KiB|MiB))?", cell)
    assert m, f"unparsable documented default {cell!r}"
    return float(m[1]) * _UNITS[m[2] or ""]


def _assert_documents_defaults(rows: dict[str, str], names: list[str], where: str) -> None:
    c = Config()
    assert set(rows) == set(names), f"{where}: lists {sorted(rows)}, Config has {sorted(names)}"
    for name in names:
        doc, default = _doc_value(rows[name]), getattr(c, name)
        assert isinstance(doc, bool) == isinstance(default, bool), (where, name, rows[name])
        assert doc == default, f"{where}: {name} documented as {rows[name]}, default {default!r}"


def test_defaults_are_valid_and_documented_values() -> None:
    c = Config()
    assert pccl.Config is Config
    assert c.heartbeat_interval_s == 0.5
    assert c.heartbeat_timeout_s == 3.0
    assert c.handshake_timeout_s == 5.0
    assert c.heartbeat_timeout_s > c.heartbeat_interval_s
    assert all(getattr(c, n) > 0 for n in TIMEOUTS)
    assert 4096 <= c.chunk_bytes <= 32 << 20
    assert 64 <= c.quant_block <= 1 << 20
    assert c.socket_buffer_bytes >= 0
    assert all(type(getattr(c, n)) is int for n in INTS)
    assert set(FIELDS) == set(TIMEOUTS) | set(INTS) | set(BOOLS)
    assert c.send_threads is True
    # The README's settings table lists every field with its default; the protocol's deadlines
    # table lists every timeout (the *_s fields) with its default.
    readme = _doc_table(ROOT / "README.md", "### Failure semantics and defaults")
    _assert_documents_defaults(readme, FIELDS, "README.md")
    protocol = _doc_table(
        ROOT / "docs" / "protocol.md", "## 9. Deadlines (`pccl.Config`, env `PCCL_<NAME>`)"
    )
    _assert_documents_defaults(protocol, TIMEOUTS, "docs/protocol.md")


def test_frame_bounds_are_sane() -> None:
    assert MAX_CONTROL_FRAME == 1 << 20
    assert Config().chunk_bytes <= MAX_DATA_FRAME
    assert MAX_DATA_FRAME >= 32 << 20  # the largest chunk_bytes Config accepts fits one frame


def test_config_is_frozen_and_hashable() -> None:
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.heartbeat_timeout_s = 1.0  # type: ignore[misc]
    assert hash(c) == hash(Config())
    assert c == Config()


def test_replace_validates_and_leaves_the_original() -> None:
    c = Config()
    d = c.replace(heartbeat_timeout_s=10.0, chunk_bytes=1 << 20)
    assert (d.heartbeat_timeout_s, d.chunk_bytes) == (10.0, 1 << 20)
    assert c == Config()
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        c.replace(heartbeat_interval_s=5.0)  # interval above the 3 s timeout
    with pytest.raises(TypeError):
        c.replace(no_such_field=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", TIMEOUTS)
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.001, math.nan])
def test_timeouts_must_be_positive(name: str, value: float) -> None:
    kw = {name: value}
    if name == "heartbeat_interval_s":
        kw["heartbeat_timeout_s"] = 3.0
    with pytest.raises(ValueError, match=name):
        Config(**kw)


@pytest.mark.parametrize("name", NUMBERS)
@pytest.mark.parametrize("value", ["5", None, True, False, [1], b"1", 1j])
def test_non_numbers_are_type_errors(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=name):
        Config(**{name: value})


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("value", ["1", None, 1, 0, 1.0])
def test_flags_must_be_bools(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=name):
        Config(**{name: value})


@pytest.mark.parametrize(
    ("raw", "want"), [("1", True), ("yes", True), (" off ", False), ("0", False)]
)
def test_flags_from_env(clean_env: pytest.MonkeyPatch, raw: str, want: bool) -> None:
    clean_env.setenv("PCCL_SEND_THREADS", raw)
    assert Config.from_env().send_threads is want
    clean_env.setenv("PCCL_SEND_THREADS", "maybe")
    with pytest.raises(ValueError, match="PCCL_SEND_THREADS"):
        Config.from_env()


@pytest.mark.parametrize(("interval", "timeout"), [(1.0, 1.0), (2.0, 1.0), (0.5, 0.5), (0.5, 0.49)])
def test_heartbeat_timeout_must_exceed_interval(interval: float, timeout: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        Config(heartbeat_interval_s=interval, heartbeat_timeout_s=timeout)


@pytest.mark.parametrize(
    ("name", "bad", "good"),
    [
        ("chunk_bytes", [0, 4095, (32 << 20) + 1, -4096], [4096, 32 << 20, 65536]),
        ("quant_block", [0, 63, (1 << 20) + 1, -64], [64, 1 << 20, 256]),
        ("socket_buffer_bytes", [-1, -(1 << 20)], [0, 1, 64 << 20]),
        ("local_socket_buffer_bytes", [-1], [0, 4096, 16 << 20]),
        ("local_streams", [-1, 65], [0, 1, 64]),
    ],
)
def test_integer_ranges(name: str, bad: list[int], good: list[int]) -> None:
    for v in bad:
        with pytest.raises(ValueError, match=name):
            Config(**{name: v})
    for v in good:
        assert getattr(Config(**{name: v}), name) == v


@pytest.mark.parametrize("name", INTS)
@pytest.mark.parametrize("value", [4096.5, 65536.25, math.nan, math.inf])
def test_integer_fields_refuse_non_integral_numbers(name: str, value: float) -> None:
    """``chunk_bytes=4096.5`` is meaningless; it must fail here, not inside a collective."""
    with pytest.raises((TypeError, ValueError), match=name):
        Config(**{name: value})


# --------------------------------------------------------------------------- environment


def test_from_env_without_variables_is_the_default(clean_env: pytest.MonkeyPatch) -> None:
    assert Config.from_env() == Config()


def test_from_env_reads_every_field(clean_env: pytest.MonkeyPatch) -> None:
    values = {
        "heartbeat_interval_s": "0.25",
        "heartbeat_timeout_s": "7",
        "handshake_timeout_s": "1.5",
        "connect_timeout_s": "2e1",
        "collective_timeout_s": "120",
        "progress_timeout_s": " 4.5 ",
        "chunk_bytes": "65536",
        "quant_block": "256",
        "socket_buffer_bytes": "0",
        "local_socket_buffer_bytes": "131072",
        "local_streams": "2",
        "send_threads": "false",
        "reconnect_timeout_s": "30",
        "restart_grace_s": "1.5",
        "start_timeout_s": "45",
        "vote_timeout_s": "9.5",
        "auto_optimize_topology": "1",
        "probe_time_s": "0.5",
        "probe_max_bytes": "1048576",
        "probe_max_age_s": "60",
        "tcp_bbr": "0",
        "tcp_notsent_lowat_bytes": "131072",
        "tcp_user_timeout_s": "12",
        "auto_streams": "yes",
        "max_streams": "8",
        "shm_link_bytes": "33554432",
    }
    assert set(values) == set(FIELDS)
    for k, v in values.items():
        clean_env.setenv(f"PCCL_{k.upper()}", v)
    c = Config.from_env()
    assert c.heartbeat_interval_s == 0.25
    assert c.heartbeat_timeout_s == 7.0
    assert c.handshake_timeout_s == 1.5
    assert c.connect_timeout_s == 20.0
    assert c.collective_timeout_s == 120.0
    assert c.progress_timeout_s == 4.5
    assert (c.chunk_bytes, c.quant_block, c.socket_buffer_bytes) == (65536, 256, 0)
    assert (c.local_socket_buffer_bytes, c.local_streams) == (131072, 2)
    assert c.send_threads is False
    assert (c.reconnect_timeout_s, c.restart_grace_s) == (30.0, 1.5)
    assert (c.start_timeout_s, c.vote_timeout_s) == (45.0, 9.5)
    assert (c.auto_optimize_topology, c.tcp_bbr, c.auto_streams) == (True, False, True)
    assert (c.probe_time_s, c.probe_max_bytes, c.probe_max_age_s) == (0.5, 1 << 20, 60.0)
    assert (c.tcp_notsent_lowat_bytes, c.tcp_user_timeout_s, c.max_streams) == (131072, 12.0, 8)
    assert c.shm_link_bytes == 32 << 20
    assert all(type(getattr(c, n)) is int for n in INTS)
    assert all(type(getattr(c, n)) is float for n in TIMEOUTS)


def test_from_env_overrides_win(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PCCL_HEARTBEAT_TIMEOUT_S", "9")
    clean_env.setenv("PCCL_CHUNK_BYTES", "8192")
    c = Config.from_env(heartbeat_timeout_s=4.0)
    assert c.heartbeat_timeout_s == 4.0
    assert c.chunk_bytes == 8192


def test_from_env_ignores_unrelated_pccl_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PCCL_FORCE_NUMPY", "1")
    clean_env.setenv("PCCL_NOT_A_FIELD", "banana")
    clean_env.setenv("HEARTBEAT_TIMEOUT_S", "banana")  # no prefix: not ours
    assert Config.from_env() == Config()


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("PCCL_HEARTBEAT_TIMEOUT_S", "fast"),
        ("PCCL_HEARTBEAT_TIMEOUT_S", ""),
        ("PCCL_HEARTBEAT_TIMEOUT_S", "3s"),
        ("PCCL_HANDSHAKE_TIMEOUT_S", "1,5"),
        ("PCCL_CHUNK_BYTES", "64KiB"),
        ("PCCL_CHUNK_BYTES", "1.5"),
        ("PCCL_QUANT_BLOCK", "0x100"),
        ("PCCL_SOCKET_BUFFER_BYTES", "four"),
    ],
)
def test_from_env_unparsable_names_the_variable(
    clean_env: pytest.MonkeyPatch, var: str, raw: str
) -> None:
    clean_env.setenv(var, raw)
    with pytest.raises(ValueError) as ei:
        Config.from_env()
    assert var in str(ei.value)
    assert repr(raw) in str(ei.value)
    assert "not a number" in str(ei.value)


@pytest.mark.parametrize(
    ("var", "raw", "field"),
    [
        ("PCCL_HEARTBEAT_TIMEOUT_S", "0", "heartbeat_timeout_s"),
        ("PCCL_HEARTBEAT_TIMEOUT_S", "-3", "heartbeat_timeout_s"),
        ("PCCL_HEARTBEAT_TIMEOUT_S", "nan", "heartbeat_timeout_s"),
        ("PCCL_HEARTBEAT_TIMEOUT_S", "0.1", "heartbeat_timeout_s"),  # below the interval
        ("PCCL_PROGRESS_TIMEOUT_S", "0", "progress_timeout_s"),
        ("PCCL_CHUNK_BYTES", "1024", "chunk_bytes"),
        ("PCCL_QUANT_BLOCK", "2", "quant_block"),
        ("PCCL_SOCKET_BUFFER_BYTES", "-1", "socket_buffer_bytes"),
        ("PCCL_LOCAL_SOCKET_BUFFER_BYTES", "-5", "local_socket_buffer_bytes"),
    ],
)
def test_from_env_out_of_range_is_a_value_error(
    clean_env: pytest.MonkeyPatch, var: str, raw: str, field: str
) -> None:
    clean_env.setenv(var, raw)
    with pytest.raises(ValueError, match=field):
        Config.from_env()


def test_master_and_communicator_read_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    from pccl.master import Master

    clean_env.setenv("PCCL_HEARTBEAT_TIMEOUT_S", "11")
    clean_env.setenv("PCCL_HANDSHAKE_TIMEOUT_S", "0.75")
    assert Master("127.0.0.1", 0).config.heartbeat_timeout_s == 11.0
    assert Master("127.0.0.1", 0).config.handshake_timeout_s == 0.75
    cfg = Config(heartbeat_timeout_s=4.0)
    assert Master("127.0.0.1", 0, config=cfg).config is cfg
    clean_env.setenv("PCCL_HEARTBEAT_TIMEOUT_S", "zero")
    with pytest.raises(ValueError, match="PCCL_HEARTBEAT_TIMEOUT_S"):
        Master("127.0.0.1", 0)


def test_p2p_socket_buffers_small_on_loopback_large_across_hosts() -> None:
    """Loopback links get ``local_socket_buffer_bytes``; links to another host keep
    ``socket_buffer_bytes`` (WAN windows need the large buffer)."""
    import socket

    from pccl.peer.p2p import buffer_bytes, same_host, tune_socket

    cfg = Config(socket_buffer_bytes=4 << 20, local_socket_buffer_bytes=256 << 10)
    with (
        socket.create_server(("127.0.0.1", 0)) as srv,
        socket.create_connection(srv.getsockname()) as c,
    ):
        a, _ = srv.accept()
        with a:
            assert same_host(c) and same_host(a)
            assert buffer_bytes(c, cfg) == 256 << 10
            assert buffer_bytes(c, cfg.replace(local_socket_buffer_bytes=0)) == 4 << 20
            tune_socket(c, cfg)
            # Linux doubles the request for bookkeeping; the point is it is small.
            assert c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * (256 << 10)
    # A datagram socket "connected" to a routable non-local address sends nothing.
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with u:
        try:
            u.connect(("192.0.2.1", 9))  # TEST-NET-1
        except OSError:
            pytest.skip("no route to a non-local address here")
        assert not same_host(u)
        assert buffer_bytes(u, cfg) == 4 << 20
    unconnected = socket.socket()
    with unconnected:
        assert not same_host(unconnected)  # getpeername fails: treated as remote


def test_streams_opened_to_a_loopback_successor() -> None:
    """Striping is for network links: a loopback successor gets ``local_streams``."""
    from pccl.peer.p2p import P2PNode

    node = P2PNode(Config(), streams=4)
    assert node.streams_to("127.0.0.1") == 1
    assert node.streams_to("::1") == 1
    assert node.streams_to("localhost") == 1
    assert node.streams_to("10.1.2.3") == 4
    assert node.streams_to("peer7.example") == 4
    assert P2PNode(Config(local_streams=0), streams=4).streams_to("127.0.0.1") == 4
    assert P2PNode(Config(local_streams=8), streams=3).streams_to("127.0.0.1") == 3
