"""Command line: ``python -m contrastive_kernels {info,check,bench}``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive_kernels",
                                     description="Fused contrastive-loss kernels: info, correctness check, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, what was built, which backends work here")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_check = sub.add_parser("check", help="every available backend against the float64 reference")
    from . import check as _check
    _check.add_arguments(p_check)
    p_bench = sub.add_parser("bench", help="fwd+bwd time and peak memory against the reference and peers")
    from . import bench as _bench
    _bench.add_arguments(p_bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .check import print_info
        return print_info(as_json=args.json)
    if args.command == "check":
        return _check.run(args)
    try:
        return _bench.run(args)
    except argparse.ArgumentTypeError as exc:  # a list option's item (--sizes, --dtype): usage, exit 2
        p_bench.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
