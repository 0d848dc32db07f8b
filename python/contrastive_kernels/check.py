"""``python -m contrastive_kernels info`` and ``check``."""
from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def print_info(as_json: bool = False) -> int:
    raise SystemExit("not yet")


def run(args) -> int:
    raise SystemExit("not yet")
