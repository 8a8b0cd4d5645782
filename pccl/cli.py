"""The ``pccl`` command line: ``pccl master``, ``pccl bench ...``, ``pccl demo``.

Each subcommand parses its own options and calls into the library; exit codes: 0 success,
1 failure of the work itself, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

from pccl._doc import plain
from pccl.master.cli import add_arguments as _add_master

__all__ = ["main", "master_main"]


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
    from pccl.tools import bench_master, bench_matrix

    bench_master.add_arguments(bsub)
    bench_matrix.add_arguments(bsub)


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
