"""Link tuning (pccl.peer.tuning): effective socket buffers read back and the once-only warning
when they cannot hold a link's bandwidth-delay product; streams from the BDP; one operation's
bytes spread over every stream of a link (per-stream counters, in the metrics too)."""

from __future__ import annotations

import logging
import socket

import pytest
from pccl.peer import tuning
from pccl.peer.tuning import Window, auto_streams, check_window, kernel_limits, tune_wan_socket

from pccl.config import Config


def test_capped_explicit_buffers_are_read_back_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lim = kernel_limits()
    auto_max = min(int(lim["tcp_rmem_max"]), int(lim["tcp_wmem_max"]))
    cap = min(int(lim["rmem_max"]), int(lim["wmem_max"]))
    if not auto_max or not cap:
        pytest.skip("kernel socket limits are not readable here")
    want = max(auto_max, cap) * 4  # above what autotuning reaches and above the core cap
    with socket.socket() as s:
        win = tune_wan_socket(s, Config(socket_buffer_bytes=want))
    assert win.explicit and win.requested == want
    assert win.capped and win.bytes <= cap  # the kernel's cap, read back, not what we asked
    gbps, rtt_ms = 1.0, 4.0 * win.bytes * 8 / 1e9 * 1e3 / 1.0  # BDP = 4 windows
    caplog.set_level(logging.WARNING, logger="pccl.peer")
    tuning._warned.discard((4242, True))
    msg = check_window(4242, win, 2, gbps, rtt_ms)
    assert msg is not None and "net.core.rmem_max=" in msg and "net.core.wmem_max=" in msg
    assert any("bandwidth-delay product" in r.getMessage() for r in caplog.records)
    assert check_window(4242, win, 2, gbps, rtt_ms) is None  # once per link
    assert check_window(4243, win, 8, gbps, rtt_ms) is None  # 8 windows hold the BDP


def test_autotuning_is_left_on_where_an_explicit_size_would_be_smaller() -> None:
    lim = kernel_limits()
    auto_max = min(int(lim["tcp_rmem_max"]), int(lim["tcp_wmem_max"]))
    if not auto_max:
        pytest.skip("kernel socket limits are not readable here")
    with socket.socket() as s:
        before = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        win = tune_wan_socket(s, Config(socket_buffer_bytes=auto_max // 2))
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before  # untouched
    assert not win.explicit and not win.capped
    tuning._warned.discard((77, False))
    msg = check_window(77, win, 1, 10.0, 1000.0)  # a BDP of 1.25 GB: no window holds it
    assert msg is not None and "net.ipv4.tcp_rmem=" in msg


def test_bbr_and_user_timeout_are_set_where_the_kernel_has_them() -> None:
    with socket.socket() as s:
        tune_wan_socket(s, Config(tcp_user_timeout_s=12.5, tcp_notsent_lowat_bytes=65536))
        assert s.getsockopt(socket.IPPROTO_TCP, tuning._TCP_USER_TIMEOUT) == 12500
        assert s.getsockopt(socket.IPPROTO_TCP, tuning._TCP_NOTSENT_LOWAT) == 65536
        cc = s.getsockopt(socket.IPPROTO_TCP, tuning._TCP_CONGESTION, 16).rstrip(b"\0")
    if "bbr" in str(kernel_limits()["congestion"]).split():
        assert cc == b"bbr"
    default = tuning._read("/proc/sys/net/ipv4/tcp_congestion_control").encode()
    with socket.socket() as s:
        tune_wan_socket(s, Config(tcp_bbr=False))  # the system default stays
        assert s.getsockopt(socket.IPPROTO_TCP, tuning._TCP_CONGESTION, 16).rstrip(b"\0") == default


def test_auto_streams_follow_the_bandwidth_delay_product() -> None:
    w = 4 << 20
    assert auto_streams(1.0, 0.0, w, 16) == 1  # unmeasured
    assert auto_streams(1.0, 10.0, w, 16) == 1  # 1.25 MB fits one window
    assert auto_streams(1.0, 50.0, w, 16) == 2  # 6.25 MB (x 1.25 headroom: 1.86 windows)
    assert auto_streams(1.0, 100.0, w, 16) == 4  # 12.5 MB: 3.73 windows
    assert auto_streams(1.0, 200.0, w, 16) == 8
    assert auto_streams(10.0, 200.0, w, 16) == 16  # capped
    assert Window(100, 50, False, 0).bytes == 50


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_one_operation_is_spread_over_every_stream_of_the_link(master, workers) -> None:
    world, streams, mib = 2, 4, 32
    ws = [
        workers.spawn(
            "streams.py",
            master,
            {"idx": i, "world": world, "streams": streams, "mib": mib},
            env={"PCCL_LOCAL_STREAMS": "0"},  # loopback: open every stream, like a WAN link
        )
        for i in range(world)
    ]
    res = workers.wait_exit(ws, timeout=80)
    for r in res.values():
        per = r["per_stream"]
        assert sorted(per) == [f"stream_tx_bytes_{i}" for i in range(streams)]
        total = sum(per.values())
        assert total == r["tx_bytes"]  # every payload byte of the operation, counted once
        assert min(per.values()) >= total / streams / 2  # striped, not piled on one stream
        assert len(r["exposition"]) == streams
