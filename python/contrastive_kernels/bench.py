"""Benchmark harness (``python -m contrastive_kernels bench``): see issue 7. Placeholder
interface only until the harness lands; it refuses to run rather than print numbers."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true")


def run(args) -> int:
    raise SystemExit("contrastive_kernels bench: the benchmark harness is not built yet")
