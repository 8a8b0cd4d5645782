"""The ``pccl`` command line: ``pccl master``, ``pccl bench ...``, ``pccl demo``.

Each subcommand parses its own options and calls into the library; exit codes: 0 success,
1 failure of the work itself, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from pccl._doc import plain

__all__ = ["main", "master_main"]

DEFAULT_PORT = 48148


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def _add_master(sub: argparse._SubParsersAction) -> None:
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


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (JSON output)")
    bsub = p.add_subparsers(dest="bench", required=True)
    k = bsub.add_parser("kernels", help="native kernels against the numpy reference")
    k.add_argument("--json", metavar="FILE", help="write results as JSON")
    k.add_argument("--mib", type=int, default=64, help="input size in MiB (default 64)")
    k.add_argument("--repeats", type=int, default=7, help="timed runs per kernel (median)")
    k.set_defaults(func=_cmd_bench_kernels)
    try:
        from pccl.tools import bench_allreduce
    except ImportError:  # pragma: no cover
        return
    bench_allreduce.add_arguments(bsub)


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    if args.mib < 1 or args.repeats < 5:
        print("--mib must be >= 1 and --repeats >= 5", file=sys.stderr)
        return 2
    from pccl.tools import bench_kernels

    bench_kernels.run(args.json, mib=args.mib, repeats=args.repeats)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pccl import __version__

    parser = argparse.ArgumentParser(prog="pccl", description=plain(__doc__.splitlines()[0]))
    parser.add_argument("--version", action="version", version=f"pccl {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_master(sub)
    _add_bench(sub)
    from pccl import tls as tls_mod

    tls_mod.add_arguments(sub)
    try:
        from pccl.tools import demo

        demo.add_arguments(sub)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pccl.tools import status

        status.add_arguments(sub)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pccl.tools import chaos

        chaos.add_arguments(sub)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pccl.tools import hammer

        hammer.add_arguments(sub)
    except ImportError:  # pragma: no cover
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def master_main(argv: list[str] | None = None) -> int:
    """``pccl-master``: alias of ``pccl master``."""
    return main(["master", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
