#!/usr/bin/env python3
"""Network-namespace test hosts: each pccl process on its own address behind a private bridge.

Layout of one cluster (``TAG`` names it; every name below is private to the cluster)::

    netns pccl-TAG-hub:   br0 (bridge, no address) -- v0, v1, ... (veth ends)
    netns pccl-TAG-NODE:  eth0 (veth peer of vI) 10.231.0.(I+1)/24, MTU 65535, lo up

Nothing is created in the root namespace: each veth pair is created inside the hub namespace
with its peer end moved straight into the node's namespace. MTU 65535 avoids the spurious
retransmits veth shows at 1500 (machine-measurements.md section 3). ``tc tbf`` rate limits work
on these links (netem does not on this kernel).

Teardown never leaves namespaces behind: :meth:`Cluster.down` kills the processes still inside
each namespace and deletes it (idempotent, never raises); :meth:`Cluster.up` rolls back on any
failure and registers ``down`` with ``atexit``; the tag embeds the owner's pid, so
:func:`cleanup` (run by ``pccl chaos --netns``, the tests and ``netns.py cleanup``) removes the
clusters of owners that died without cleaning up (SIGKILL).

Needs root (``CAP_SYS_ADMIN`` + ``CAP_NET_ADMIN``) and iproute2. Stdlib only: import it by path
(``pccl chaos --netns`` and ``tests/test_netns.py`` do) or run it as a script::

    sudo deploy/netns.py up --nodes m,p0,p1,p2 --tag demo     # prints the addresses as JSON
    sudo deploy/netns.py exec demo m -- pccl master --host 10.231.0.1 --port 48148
    sudo deploy/netns.py rate demo p1 200mbit                 # or 'off'
    sudo deploy/netns.py link demo p2 down                    # or 'up'
    sudo deploy/netns.py down demo
    sudo deploy/netns.py cleanup [--all]                      # stale clusters of dead owners
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["Cluster", "NetnsError", "available", "cleanup", "list_clusters"]

PREFIX = "pccl"
SUBNET = "10.231.0"  # /24 inside every cluster; clusters are isolated, so they may all reuse it
MTU = 65535
MAX_NODES = 250
CMD_TIMEOUT_S = 20.0
_NODE_RE = re.compile(r"^[a-z0-9]{1,12}$")
# Manual clusters (CLI ``up --tag NAME``) are "m" + name; owned ones "o<pid hex>x<random>".
_OWNED_RE = re.compile(rf"^{PREFIX}-o([0-9a-f]+)x[0-9a-f]+-")


class NetnsError(RuntimeError):
    """A namespace command failed (message includes the command and its stderr)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{' '.join(argv)}: {e}") from None
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def available() -> tuple[bool, str]:
    """Whether namespaces can be created here, and if not why (for ``pytest.skip``)."""
    if not sys.platform.startswith("linux"):
        return False, "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return False, "needs root (ip netns add)"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' not found"
    probe = f"{PREFIX}-probe{os.getpid():x}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as e:
        return False, f"ip netns add is not permitted: {e}"
    try:
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except NetnsError as e:
        return False, f"veth links are not permitted: {e}"
    finally:
        _ip("netns", "del", probe, check=False)
    if shutil.which("tc") is None:
        return True, "tc not found: rate limits unavailable"
    return True, ""


def list_namespaces() -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def list_clusters() -> dict[str, list[str]]:
    """``{tag: [namespace, ...]}`` of every pccl cluster on this host."""
    out: dict[str, list[str]] = {}
    for ns in list_namespaces():
        parts = ns.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX:
            out.setdefault(parts[1], []).append(ns)
    return out


def _kill_inside(ns: str) -> None:
    r = _ip("netns", "pids", ns, check=False)
    for tok in r.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(tok), signal.SIGKILL)


def _delete(namespaces: Sequence[str]) -> None:
    for ns in namespaces:
        _kill_inside(ns)
    for ns in namespaces:
        for _ in range(3):
            if _ip("netns", "del", ns, check=False).returncode == 0 or ns not in list_namespaces():
                break
            time.sleep(0.1)


def cleanup(all_clusters: bool = False) -> list[str]:
    """Delete clusters whose owner process is gone (all pccl clusters with ``all_clusters``).

    Returns:
        The namespaces deleted.
    """
    gone: list[str] = []
    for ns in list_namespaces():
        m = _OWNED_RE.match(ns)
        owned_dead = m is not None and not os.path.exists(f"/proc/{int(m.group(1), 16)}")
        if (all_clusters and ns.startswith(f"{PREFIX}-")) or owned_dead:
            gone.append(ns)
    _delete(gone)
    return gone


class Cluster:
    """A private L2 network of namespaces, one per node, joined by a bridge.

    Args:
        nodes: node names (lowercase letters/digits, at most 12 chars); node ``i`` gets
            ``10.231.0.(i+1)``.
        tag: cluster name for the CLI (``m<tag>``); default: owned by this process.
        mtu: MTU of every link (65535 by default).
        rate: optional ``tc tbf`` rate for every node's link at creation (e.g. ``"1gbit"``).

    Use as a context manager, or call :meth:`up` / :meth:`down` (``down`` in ``finally``).
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        tag: str | None = None,
        mtu: int = MTU,
        rate: str | None = None,
    ) -> None:
        if not nodes or len(nodes) > MAX_NODES:
            raise ValueError(f"need 1..{MAX_NODES} nodes")
        if len(set(nodes)) != len(nodes) or not all(_NODE_RE.match(n) for n in nodes):
            raise ValueError(f"node names must be unique and match {_NODE_RE.pattern}: {nodes}")
        if tag is not None and not _NODE_RE.match(tag):
            raise ValueError(f"tag must match {_NODE_RE.pattern}")
        self.tag = f"m{tag}" if tag else f"o{os.getpid():x}x{secrets.token_hex(2)}"
        self.nodes = list(nodes)
        self.mtu = mtu
        self.initial_rate = rate
        self.hub = f"{PREFIX}-{self.tag}-hub"
        self._created: list[str] = []
        self._atexit = False

    # ------------------------------------------------------------------ naming

    def ns(self, node: str) -> str:
        """Namespace of ``node``."""
        self._index(node)
        return f"{PREFIX}-{self.tag}-{node}"

    def ip(self, node: str) -> str:
        """IPv4 address of ``node``."""
        return f"{SUBNET}.{self._index(node) + 1}"

    def _index(self, node: str) -> int:
        try:
            return self.nodes.index(node)
        except ValueError:
            raise KeyError(f"no node {node!r} in cluster {self.tag}") from None

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``node``'s namespace (``ip netns exec`` execs: same pid)."""
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def describe(self) -> dict[str, object]:
        return {
            "tag": self.tag,
            "hub": self.hub,
            "nodes": {n: {"ns": self.ns(n), "ip": self.ip(n)} for n in self.nodes},
        }

    # ------------------------------------------------------------------ lifecycle

    def up(self) -> Cluster:
        """Create every namespace and link; on failure delete what was made and raise.

        Raises:
            NetnsError: a command failed (not root, no iproute2, name clash...).
        """
        cleanup()  # clusters of owners that died without tearing down
        if not self._atexit:
            atexit.register(self.down)
            self._atexit = True
        try:
            self._add_ns(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "mtu", str(self.mtu), "up")
            for i, node in enumerate(self.nodes):
                ns = self.ns(node)
                self._add_ns(ns)
                hub_end = f"v{i}"
                _ip(
                    "-n", self.hub, "link", "add", hub_end, "mtu", str(self.mtu),
                    "type", "veth", "peer", "name", "eth0", "mtu", str(self.mtu), "netns", ns,
                )  # fmt: skip
                _ip("-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(node)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                if self.initial_rate:
                    self.set_rate(node, self.initial_rate)
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        """Kill every process left in the cluster's namespaces and delete them. Never raises."""
        with contextlib.suppress(Exception):
            mine = [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-{self.tag}-")]
            _delete(sorted(set(mine) | set(self._created)))
        self._created = []
        if self._atexit:
            atexit.unregister(self.down)
            self._atexit = False

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------------ faults

    def set_link(self, node: str, up: bool) -> None:
        """Bring ``node``'s only link down (a cut: nothing in or out) or back up."""
        _ip("-n", self.ns(node), "link", "set", "eth0", "up" if up else "down")

    def set_rate(
        self, node: str, rate: str | None, *, burst: str = "256kb", latency: str = "50ms"
    ) -> None:
        """Limit ``node``'s link to ``rate`` in both directions with ``tc tbf``; None removes it.

        The burst must exceed the MTU-sized (GSO) packets: 256 KiB covers MTU 65535.
        """
        i = self._index(node)
        for ns, dev in ((self.ns(node), "eth0"), (self.hub, f"v{i}")):
            if rate is None:
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], False)
            else:
                _run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                     "tbf", "rate", rate, "burst", burst, "latency", latency]
                )  # fmt: skip


# ====================================================================== CLI


def _selftest() -> int:
    """Two nodes, a TCP round trip across the bridge, then teardown; prints the result."""
    code = (
        "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),5);"
        "s.sendall(b'ping');print(s.recv(4).decode())"
    )
    server = (
        "import socket;l=socket.socket();l.bind(('0.0.0.0',0));l.listen();"
        "print(l.getsockname()[1],flush=True);c,_=l.accept();c.sendall(c.recv(4))"
    )
    with Cluster(["a", "b"]) as c:
        srv = subprocess.Popen(
            c.exec_argv("a", [sys.executable, "-c", server]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert srv.stdout is not None
            port = srv.stdout.readline().strip()
            r = _run(c.exec_argv("b", [sys.executable, "-c", code, c.ip("a"), port]))
            print(json.dumps({"ok": r.stdout.strip() == "ping", **c.describe()}))
        finally:
            srv.kill()
            srv.wait(5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netns.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create a named cluster (kept until 'down TAG')")
    u.add_argument("--nodes", required=True, help="comma list, e.g. m,p0,p1")
    u.add_argument("--tag", required=True)
    u.add_argument("--rate", help="tbf rate on every link, e.g. 1gbit")
    d = sub.add_parser("down", help="delete a named cluster")
    d.add_argument("tag")
    e = sub.add_parser("exec", help="run a command in a node's namespace")
    e.add_argument("tag")
    e.add_argument("node")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    lk = sub.add_parser("link", help="cut (down) or restore (up) a node's link")
    lk.add_argument("tag")
    lk.add_argument("node")
    lk.add_argument("state", choices=["up", "down"])
    r = sub.add_parser("rate", help="tbf rate limit on a node's link ('off' removes it)")
    r.add_argument("tag")
    r.add_argument("node")
    r.add_argument("rate")
    c = sub.add_parser("cleanup", help="delete clusters of dead owners")
    c.add_argument("--all", action="store_true", help="every pccl-* namespace")
    sub.add_parser("list", help="pccl clusters on this host")
    sub.add_parser("selftest", help="two nodes, one TCP round trip, teardown")
    a = p.parse_args(argv)

    def named(tag: str) -> Cluster:
        found = list_clusters().get(f"m{tag}")
        if not found:
            raise SystemExit(f"no cluster {tag!r}")
        nodes = [ns.split("-", 2)[2] for ns in found if not ns.endswith("-hub")]
        return Cluster(_order_by_address(tag, nodes), tag=tag)

    try:
        if a.cmd == "up":
            cl = Cluster(a.nodes.split(","), tag=a.tag, rate=a.rate)
            cl.up()
            atexit.unregister(cl.down)  # a named cluster outlives this command
            print(json.dumps(cl.describe(), indent=2))
        elif a.cmd == "down":
            named(a.tag).down()
        elif a.cmd == "exec":
            argv2 = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
            os.execvp("ip", named(a.tag).exec_argv(a.node, argv2))
        elif a.cmd == "link":
            named(a.tag).set_link(a.node, a.state == "up")
        elif a.cmd == "rate":
            named(a.tag).set_rate(a.node, None if a.rate == "off" else a.rate)
        elif a.cmd == "cleanup":
            print("\n".join(cleanup(all_clusters=a.all)))
        elif a.cmd == "list":
            print(json.dumps(list_clusters(), indent=2))
        elif a.cmd == "selftest":
            return _selftest()
    except (NetnsError, KeyError, ValueError) as err:
        print(f"netns.py: {err}", file=sys.stderr)
        return 1
    return 0


def _order_by_address(tag: str, nodes: list[str]) -> list[str]:
    """Node names of a named cluster in address order (node i has .i+1)."""
    by_host: dict[int, str] = {}
    for n in nodes:
        out = _ip("-n", f"{PREFIX}-m{tag}-{n}", "-4", "-o", "addr", "show", "eth0").stdout
        m = re.search(rf"{re.escape(SUBNET)}\.(\d+)/", out)
        if m:
            by_host[int(m.group(1))] = n
    if sorted(by_host) != list(range(1, len(by_host) + 1)):
        raise NetnsError(f"cluster {tag}: unexpected addresses {by_host}")
    return [by_host[h] for h in sorted(by_host)]


if __name__ == "__main__":
    sys.exit(main())
