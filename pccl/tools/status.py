"""``pccl status``: show what a running master knows, from its HTTP status endpoint.

Fetches ``GET /status`` from a master started with ``--status-port`` and prints it as tables
(peers, groups and their rings, collectives in flight, recent aborts), or the JSON as received
with ``--json``. A plain HTTP client (stdlib only); imports nothing of the master. A master with
a token answers only requests that carry ``Authorization: Bearer <token>``: the status token
(``pccl master --status-token-file``) or the master's own token, read from ``--token-file`` or
the :data:`TOKEN_ENV` environment variable; it is sent only to the address given, never after a
redirect. Exit codes: 0 shown, 1 the endpoint could not be reached, refused the credential or
answered something unusable, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

__all__ = [
    "TOKEN_ENV",
    "StatusUnauthorized",
    "StatusUnavailable",
    "add_arguments",
    "fetch_status",
    "format_status",
    "parse_address",
    "read_token",
]

DEFAULT_TIMEOUT_S = 5.0
#: Longest /status body accepted (a master serves at most a few thousand peers).
MAX_BODY_BYTES = 64 << 20
#: Environment variable holding the status credential itself (``--token-file`` wins).
TOKEN_ENV = "PCCL_STATUS_TOKEN"


class StatusUnavailable(Exception):
    """The status endpoint could not be reached or did not answer with a status document."""


class StatusUnauthorized(StatusUnavailable):
    """The endpoint answered 401: it needs a credential, or refused the one sent."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the ``Authorization`` header elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Register ``pccl status`` on the ``pccl`` command's subparsers."""
    p = sub.add_parser("status", help="show peers, rings and collectives of a running master")
    p.add_argument(
        "--master",
        required=True,
        metavar="HOST:PORT",
        help="the master's status endpoint (its --status-port, not its peer port)",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON document")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="credential for a master with a token: its status token (pccl master "
        f"--status-token-file) or its token; default: ${TOKEN_ENV}, if set",
    )
    p.set_defaults(func=_cmd_status)


def read_token(token_file: str | None, environ: dict[str, str] | None = None) -> bytes | None:
    """The credential to send: from ``token_file``, else :data:`TOKEN_ENV`, else None.

    Surrounding whitespace is stripped, as the master does with its token files.

    Raises:
        OSError: ``token_file`` cannot be read.
        ValueError: the credential is empty or is not printable ASCII (it could not travel in
            an HTTP header).
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        with open(token_file, "rb") as f:
            token = f.read().strip()
        where = token_file
    elif env.get(TOKEN_ENV, "").strip():
        token = env[TOKEN_ENV].strip().encode("utf-8", "replace")
        where = f"${TOKEN_ENV}"
    else:
        return None
    if not token:
        raise ValueError(f"the token in {where} is empty")
    if not all(0x20 <= b < 0x7F for b in token):
        raise ValueError(f"the token in {where} is not printable ASCII (cannot send it)")
    return token


def parse_address(addr: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Raises:
        ValueError: no host, or a port that is not an integer within 1..65535.
    """
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host, int(port)


def fetch_status(
    host: str, port: int, timeout: float = DEFAULT_TIMEOUT_S, token: bytes | None = None
) -> bytes:
    """GET ``/status`` and return the body.

    Args:
        host: status endpoint host.
        port: status endpoint port.
        timeout: seconds for connecting and for each read.
        token: sent as ``Authorization: Bearer <token>`` when given (printable ASCII).

    Raises:
        StatusUnauthorized: the endpoint answered 401 (no credential sent, or a wrong one).
        StatusUnavailable: connection refused or timed out, another non-200 answer (a
            redirect included), or a body over :data:`MAX_BODY_BYTES`.
    """
    h = f"[{host}]" if ":" in host else host
    url = f"http://{h}:{port}/status"
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token.decode('ascii')}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            body: bytes = resp.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            if token is None:
                raise StatusUnauthorized(
                    f"{url} requires a credential: pass --token-file FILE (the master's "
                    f"status token or token) or set {TOKEN_ENV}"
                ) from None
            raise StatusUnauthorized(f"{url} refused the credential (401)") from None
        raise StatusUnavailable(f"{url} answered {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise StatusUnavailable(f"cannot reach {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed HTTP
        raise StatusUnavailable(f"cannot reach {url}: {e}") from None
    if len(body) > MAX_BODY_BYTES:
        raise StatusUnavailable(f"{url}: answer larger than {MAX_BODY_BYTES} bytes")
    return body


# ---------------------------------------------------------------------------------- tables


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    """Left-aligned columns, two spaces apart; the last column is never padded."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])]
        return (indent + "  ".join([*parts, row[-1]])).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _ids(ids: Sequence[Any]) -> str:
    return ",".join(str(i) for i in ids) if ids else "-"


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}s"


def format_status(doc: dict[str, Any]) -> str:
    """Render a ``/status`` document as text tables.

    Raises:
        KeyError, TypeError, ValueError: ``doc`` is not shaped like a status document.
    """
    ms = doc["master"]
    peers = doc["peers"]
    accepted = sum(1 for p in peers if p["accepted"])
    totals = doc.get("totals", {})
    out = [
        f"master {ms['host']}:{ms['port']}  phase {ms['phase']}  epoch {ms['epoch']}  "
        f"up {_seconds(ms['uptime_s'])}  peers {accepted} accepted, "
        f"{len(peers) - accepted} pending  collectives completed "
        f"{totals.get('collectives_completed', '?')}  aborts {totals.get('aborts', '?')}",
        "",
        f"PEERS ({len(peers)})",
    ]
    if peers:
        out.append(
            _table(
                [
                    "ID",
                    "GROUP",
                    "STATE",
                    "ADDRESS",
                    "LAST SEEN",
                    "OPS DONE",
                    "TX",
                    "GB/S",
                    "IN FLIGHT",
                ],
                [
                    [
                        p["id"],
                        p["group"],
                        "accepted" if p["accepted"] else "pending",
                        p["address"],
                        _seconds(p["last_seen_s_ago"]),
                        p["ops_done"],
                        _bytes(p["tx_bytes"]),
                        f"{p['last_gbps']:.3g}",
                        _ids(p["ops_in_flight"]),
                    ]
                    for p in peers
                ],
            )
        )
    else:
        out.append("  (none)")
    groups = doc["groups"]
    out += ["", f"GROUPS ({len(groups)})"]
    if groups:
        rows = []
        for g in groups:
            sync = g["sync"]
            rows.append(
                [
                    g["id"],
                    g["world_size"],
                    " -> ".join(str(q) for q in g["ring"]) or "-",
                    "-" if g["next_revision"] is None else g["next_revision"],
                    "-" if sync is None else f"{sync['phase']} (waiting {_ids(sync['waiting'])})",
                    g["broken"] or "-",
                ]
            )
        out.append(_table(["GROUP", "WORLD", "RING", "NEXT REV", "SYNC", "BROKEN"], rows))
    else:
        out.append("  (none)")
    ops = [(g["id"], op) for g in groups for op in g["ops_in_flight"]]
    out += ["", f"OPS IN FLIGHT ({len(ops)})"]
    if ops:
        out.append(
            _table(
                ["GROUP", "TAG", "OP ID", "INITIATED", "MEMBERS", "COMPLETED"],
                [
                    [
                        gid,
                        op["tag"],
                        op["op_id"] or "(waiting)",
                        _ids(op["initiated"]),
                        _ids(op["members"]),
                        _ids(op["completed"]),
                    ]
                    for gid, op in ops
                ],
            )
        )
    else:
        out.append("  (none)")
    aborts = doc["aborts"]
    out += ["", f"RECENT ABORTS ({len(aborts)})"]
    if aborts:
        out.append(
            _table(
                ["GROUP", "TAG", "REASON"],
                [[a["group"], a["tag"], " ".join(str(a["reason"]).split())] for a in aborts],
            )
        )
    else:
        out.append("  (none)")
    return "\n".join(out)


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        host, port = parse_address(args.master)
    except ValueError as e:
        print(f"pccl status: --master: {e}", file=sys.stderr)
        return 2
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        print("pccl status: --timeout must be a finite number > 0", file=sys.stderr)
        return 2
    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as e:
        print(f"pccl status: cannot use the token: {e}", file=sys.stderr)
        return 2
    try:
        body = fetch_status(host, port, args.timeout, token)
    except StatusUnauthorized as e:
        print(f"pccl status: {e}", file=sys.stderr)
        return 1
    except StatusUnavailable as e:
        print(f"pccl status: {e} (is the master running with --status-port?)", file=sys.stderr)
        return 1
    try:
        doc = json.loads(body)
        text = body.decode().rstrip("\n") if args.json else format_status(doc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        print(
            f"pccl status: {args.master} did not answer a status document: {e!r}", file=sys.stderr
        )
        return 1
    print(text)
    return 0
