"""``pccl master``: the master daemon's command line (core: no tool is imported here).

``python -m pccl.master`` and ``pccl master`` run :func:`main`; tools that start a master in a
process of their own call it too (after arming a parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

__all__ = ["DEFAULT_PORT", "add_arguments", "main"]

DEFAULT_PORT = 48148
#: The collector thresholds of the master daemon (see ``_cmd_master``).
MASTER_GC_THRESHOLDS = (20_000, 20, 20)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Add the ``master`` sub-command to ``sub``."""
    p = sub.add_parser("master", help="run the master daemon")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free port)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--token-file",
        default=os.environ.get("PCCL_AUTH_TOKEN_FILE") or None,
        help="shared token peers must prove (HMAC; never sent); default: $PCCL_AUTH_TOKEN_FILE",
    )
    p.add_argument("--tls-cert", help="TLS certificate (see pccl gen-certs)")
    p.add_argument("--tls-key", help="TLS private key")
    p.add_argument("--tls-ca", help="CA that signed the peers' certificates")
    p.add_argument(
        "--status-host",
        default="127.0.0.1",
        help="address of the status endpoint (default 127.0.0.1: it lists peer addresses)",
    )
    p.add_argument(
        "--status-port",
        type=int,
        default=None,
        help="serve HTTP GET /status (JSON) and /metrics (Prometheus) on this port "
        "(0: any free port; default: off)",
    )
    p.add_argument(
        "--state-file",
        help="persist issued peer ids and the run's membership here (JSON, replaced "
        "atomically): a restarted master then never reissues an id and never lets newcomers "
        "start a second run beside the existing one. Recommended for every real deployment.",
    )
    p.add_argument(
        "--kv-max-bytes",
        type=int,
        default=None,
        help="bound on the key-value channel's entries together (default 16 MiB); with "
        "--state-file its values are durable in STATE_FILE.kv",
    )
    p.add_argument(
        "--status-token-file",
        help="read-only credential for the status endpoint (pccl status --token-file); with "
        "it or --token-file set, the endpoint requires Authorization: Bearer <either>",
    )
    p.set_defaults(func=_cmd_master)


def _cmd_master(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from pccl.master import Master
    from pccl.master.store import StoreError
    from pccl.peer.blocking import new_event_loop

    token = None
    status_token = None
    if args.token_file or args.status_token_file:
        from pccl.auth import load_token

        try:
            token = load_token(args.token_file) if args.token_file else None
            status_token = load_token(args.status_token_file) if args.status_token_file else None
        except (OSError, ValueError) as e:
            print(f"pccl master: {e}", file=sys.stderr)
            return 2

    if not 0 <= args.port <= 65535:
        print(f"pccl master: --port {args.port} is not within 0..65535", file=sys.stderr)
        return 2
    if args.status_port is not None and not 0 <= args.status_port <= 65535:
        print(
            f"pccl master: --status-port {args.status_port} is not within 0..65535", file=sys.stderr
        )
        return 2

    from pccl.master.kv import DEFAULT_MAX_BYTES, ENTRY_OVERHEAD

    from pccl.config import MAX_KV_KEY, MAX_KV_VALUE

    kv_max = DEFAULT_MAX_BYTES if args.kv_max_bytes is None else args.kv_max_bytes
    if kv_max < MAX_KV_VALUE + MAX_KV_KEY + ENTRY_OVERHEAD:
        print(
            f"pccl master: --kv-max-bytes {kv_max} cannot hold one full entry "
            f"({MAX_KV_VALUE + MAX_KV_KEY + ENTRY_OVERHEAD} bytes)",
            file=sys.stderr,
        )
        return 2

    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        from pccl.tls import TLSConfig

        if not (args.tls_cert and args.tls_key and args.tls_ca):
            print("pccl master: --tls-cert, --tls-key and --tls-ca go together", file=sys.stderr)
            return 2
        try:
            tls = TLSConfig(args.tls_ca, args.tls_cert, args.tls_key)
        except ValueError as e:
            print(f"pccl master: {e}", file=sys.stderr)
            return 2

    async def run() -> None:
        master = Master(
            args.host,
            args.port,
            token=token,
            tls=tls,
            status_port=args.status_port,
            status_host=args.status_host,
            state_file=args.state_file,
            kv_max_bytes=kv_max,
            status_token=status_token,
        )
        await master.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(master.stop()))
        print(f"pccl master listening on {args.host}:{master.port}", flush=True)
        if master.status_server is not None:
            print(
                f"pccl master status on {args.status_host}:{master.status_server.port}", flush=True
            )
        await master.serve_forever()
        logging.getLogger("pccl.master").info("master stopped")

    # The daemon's own process: a larger young generation lets the short-lived objects of a
    # message burst die before they are promoted, so the full passes over every peer's objects
    # (the longest steps the master runs at 10,000 peers) come rarely (PCCL_MASTER_GC=default
    # keeps the interpreter's thresholds).
    if os.environ.get("PCCL_MASTER_GC", "") != "default":
        gc.set_threshold(*MASTER_GC_THRESHOLDS)
    loop = new_event_loop()
    try:
        loop.run_until_complete(run())
    except StoreError as e:
        print(f"pccl master: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pccl master: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``pccl master ARGS`` (``argv`` without the ``master`` word)."""
    p = argparse.ArgumentParser(prog="pccl")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_arguments(sub)
    args = p.parse_args(["master", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)
