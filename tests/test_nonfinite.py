"""SPEC: a non-finite input gives a non-finite loss, never a silently finite one.

A property test (hypothesis) over every public loss, every backend that runs here and both
precisions: one NaN / +inf / -inf anywhere in any input.  The other inputs' values in the
poisoned coordinate are drawn as signs, so that the search reaches the patterns whose limit is
finite (a +inf target logit with every other logit of its row and column -inf: a confident
cross-entropy row, a softplus(-inf) SigLIP term, exp(-inf) in the uniformity), which a
kernel's exact or overflow-safe formula can turn into a finite loss.  Seeded
(derandomize): the same examples in every run.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import LOSS_CASES as CASES
from helpers import LOSS_ROWS as N
from helpers import backend_params, skip_interpreter_bf16

D = 5


def _params():
    out = []
    for name, (family, _, _) in CASES.items():
        out.append(pytest.param(name, "reference", id=f"{name}-reference"))
        for p in backend_params(family):  # (carries the triton marker)
            out.append(pytest.param(name, p.values[0], marks=p.marks, id=f"{name}-{p.values[0]}"))
    return out


def _poisoned(n_inputs, which, row, col, bad, signs, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(N, D, generator=g) for _ in range(n_inputs)]
    if signs is not None:  # the other inputs' column `col`: the signs of the poisoned logits
        for i, x in enumerate(xs):
            if i != which:
                x[:, col] = torch.tensor(signs)
    xs[which][row, col] = bad
    return [x.to(dtype) for x in xs]


def _check(name, backend, dtype, which, row, col, bad, signs, seed):
    _, n_inputs, loss_fn = CASES[name]
    loss = loss_fn(_poisoned(n_inputs, which, row, col, bad, signs, seed, dtype), backend)
    assert loss.dim() == 0
    assert not torch.isfinite(loss), (f"{name} ({backend}, {dtype}): {bad} at input {which} [{row}, {col}] "
                                      f"(signs {signs}, seed {seed}) gave the finite loss {loss.item()}")


# -inf at [2, 1] of one input; the others' column 1: the signs that make every logit of the
# poisoned row -inf (all +1: an infinite negative, a diverged queue entry), only the partner's
# +inf (a confident row, a SigLIP positive with limit 0), and the two mirror patterns.
PATTERNS = {"all_plus": [1.0] * N, "all_minus": [-1.0] * N,
            "partner_minus": [1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0],
            "partner_plus": [-1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0]}


@pytest.mark.parametrize("name,backend", _params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_infinite_input_with_a_finite_limit(name, backend, dtype):
    """The patterns whose limit is finite, every input, every one (not left to the search)."""
    skip_interpreter_bf16(backend, dtype)
    for which in range(CASES[name][1]):
        for signs in PATTERNS.values():
            _check(name, backend, dtype, which, 2, 1, -math.inf, signs, 0)


@pytest.mark.parametrize("name,backend", _params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_finite_input_never_gives_a_finite_loss(name, backend, dtype):
    skip_interpreter_bf16(backend, dtype)
    n_inputs = CASES[name][1]
    # (the Triton interpreter and the emulator take ~0.1-1 s a call: fewer examples there)
    examples = 60 if backend in ("reference", "cpu") else 12

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, n_inputs - 1), row=st.integers(0, N - 1), col=st.integers(0, D - 1),
           bad=st.sampled_from([math.nan, math.inf, -math.inf]),
           signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=N, max_size=N) | st.none(),
           seed=st.integers(0, 2**16))
    def check(which, row, col, bad, signs, seed):
        _check(name, backend, dtype, which, row, col, bad, signs, seed)

    check()
