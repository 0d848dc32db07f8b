"""The mutation audit's table (tests/mutation_audit.py) against the sources it edits: every mutant's
text occurs exactly once in its file and its edit changes it, and the names are unique.  The audit
itself takes minutes per mutant and is not in CI; without this check a refactor that moves a mutant's
code goes unnoticed until the next audit run stops at it (session 22: three mutants' texts had moved
with the online log-sum-exp's refactors, in the Triton and the CUDA kernels)."""
from __future__ import annotations

import os

import pytest

import mutation_audit as ma

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source(rel: str) -> str:
    """The mutant's file: kernels/ and csrc/ from the repository root, the Python glue relative to
    python/contrastive_kernels/ (mutation_audit.kind)."""
    if ma.kind(rel) == "py":
        return os.path.join(REPO, "python", "contrastive_kernels", rel)
    return os.path.join(REPO, rel)


def test_mutant_names_unique():
    names = [m[0] for m in ma.MUTANTS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("mutant", ma.MUTANTS, ids=[m[0] for m in ma.MUTANTS])
def test_mutant_text_occurs_once(mutant):
    name, rel, old, new = mutant[:4]
    path = _source(rel)
    if not os.path.exists(path):
        pytest.skip(f"{rel} is not in this checkout")  # (an installed package without its sources)
    count = open(path).read().count(old)
    assert count == 1, f"{name}: its text occurs {count} times in {rel} (the source moved: update the mutant)"
    assert old != new, f"{name}: the edit changes nothing"
