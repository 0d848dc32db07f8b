"""The fused normalized similarity (contrastive_kernels::similarity_forward / _backward)
on every fused backend against the float64 reference of the same rounded inputs:
values, output dtype, and the gradients of a, b and scale (the normalization
Jacobian included, and the clamp branch of rows with norm below 1e-12)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels import _families as fam

from helpers import _suffix, DTYPES, TOL, backend_params, rel_err

BACKENDS = backend_params("similarity")
SHAPES = [(1, 1, 1), (7, 129, 3), (129, 7, 64), (300, 129, 129), (33, 300, 1)]


def _rounded(shape, dtype):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _run(backend, a, b, scale, normalize, need, grad_out, *, same):
    """Forward and the gradients of the leaves named in `need` (a, b, scale)."""
    ref = backend == "reference"
    cast = (lambda t: t.detach().double()) if ref else (lambda t: t.detach().clone())
    aa = cast(a).requires_grad_("a" in need)
    bb = aa if same else cast(b).requires_grad_("b" in need)
    ss = cast(scale).requires_grad_("scale" in need)
    if ref:
        out = ck.normalized_similarity(aa, None if same else bb, ss, normalize=normalize, backend="reference")
    else:
        out = fam.similarity(backend, aa, bb, ss, normalize)
    leaves = {"a": aa, "b": bb, "scale": ss}
    names = [n for n in ("a", "b", "scale") if n in need and not (same and n == "b")]
    grads = {}
    if names:
        gs = torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), [leaves[n] for n in names])
        grads = dict(zip(names, gs))
    return out.detach(), grads


def _check(backend, n, m, d, dtype, normalize, need=("a", "b", "scale"), same=False, zero_rows=False, scale=3.0):
    a = _rounded((n, d), dtype)
    b = a if same else _rounded((m, d), dtype)
    if zero_rows:  # norm 0 and a tiny norm (< 1e-12): the clamp branch of F.normalize
        a[0] = 0
        if n > 1:
            a[1] = torch.full((d,), 1e-14, dtype=torch.float64).to(dtype)
    s = torch.tensor(scale, dtype=torch.float32)
    m = n if same else m
    grad_out = torch.randn(n, m, dtype=torch.float64)
    out, g = _run(backend, a, b, s, normalize, set(need), grad_out, same=same)
    rout, rg = _run("reference", a, b, s, normalize, set(need), grad_out, same=same)
    what = f"{backend} n={n} m={m} d={d} {dtype} normalize={normalize} same={same}"
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}"
    assert out.shape == (n, m)
    err = rel_err(out, rout)
    assert err <= TOL[dtype], f"{what}: value relative error {err:.3e}"
    assert set(g) == set(rg)
    for name in g:
        assert g[name].dtype == (torch.float32 if name == "scale" else dtype), f"{what}: d{name} dtype"
        assert torch.isfinite(g[name]).all()
        if normalize and (d == 1 or (same and n == 1)) and name in ("a", "b"):
            # x / |x| is the constant sign(x) when D = 1, and a_hat . a_hat = 1: the exact
            # gradient is 0, so the relative error is undefined; bound the absolute error by
            # the gradient's natural scale instead.
            x = a if name == "a" else b
            bound = TOL[dtype] * scale * grad_out.norm() / x.double().abs().clamp_min(1e-12).min()
            assert g[name].double().norm() <= bound, f"{what}: d{name} should vanish, got {g[name]}"
            continue
        err = rel_err(g[name], rg[name])
        assert err <= TOL[dtype], f"{what}: d{name} relative error {err:.3e} > {TOL[dtype]:.0e}"
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize", [True, False])
def test_similarity_matches_reference(backend, dtype, shape, normalize):
    _check(backend, *shape, dtype, normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 129])
def test_similarity_self(backend, dtype, n):
    """b = None in the public API: a against itself, one leaf, gradients summed."""
    _check(backend, n, n, 17, dtype, True, same=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_similarity_zero_rows(backend, dtype):
    # The gradient of a zero row is 1e12 x (upstream . b_hat): representable in float32 and
    # bfloat16, not in float16 (where F.normalize's own gradient overflows as well).
    _check(backend, 9, 11, 5, dtype, True, zero_rows=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need", [("a",), ("b",), ("scale",), ("a", "scale"), ("b", "scale")], ids="+".join)
def test_similarity_need_subsets(backend, need):
    g = _check(backend, 33, 40, 8, torch.float32, True, need=need)
    assert set(g) == set(need)


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_backward_returns_empty_for_unneeded(backend):
    a, b, s = torch.randn(6, 4), torch.randn(5, 4), torch.tensor(2.0)
    bwd = getattr(torch.ops.contrastive_kernels, "similarity_backward" + _suffix(backend))
    shapes = [(6, 4), (5, 4), ()]
    for i in range(3):
        flags = [j == i for j in range(3)]
        outs = bwd(torch.randn(6, 5), a, b, s, True, *flags)
        for j, t in enumerate(outs):
            assert (tuple(t.shape) == shapes[j]) if j == i else t.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_large_scale_half(backend):
    """scale 100 with float16 output: values up to 100 are representable, no overflow."""
    a = _rounded((64, 32), torch.float16)
    out = fam.similarity(backend, a, a, torch.tensor(100.0), True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.diagonal().float(), torch.full((64,), 100.0), rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_similarity_cpu_half_row_chunks(dtype):
    """The C++ kernel stages 16-bit inputs in float32 by chunks of 16 MiB of N x M rows
    (4 M entries): N = 4100, M = 1100 is two chunks, forward and backward (V = G^T a_hat
    sums the chunks' products: an overwrite passed every smaller shape).  (The GPU
    backends tile; they have no such chunks.)"""
    _check("cpu", 4100, 1100, 8, dtype, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_nonfinite(backend):
    a, b = torch.randn(5, 4), torch.randn(6, 4)
    a[2, 1] = float("nan")
    out = fam.similarity(backend, a, b, torch.tensor(1.0), True)
    assert not torch.isfinite(out[2]).any() and torch.isfinite(out[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalized_similarity_dtype_is_the_inputs_on_every_backend(dtype):
    """As PyTorch's expression: a's dtype, whichever backend (the reference too) computes it."""
    a, b = _rounded((5, 8), dtype), _rounded((6, 8), dtype)
    assert (F.normalize(a) @ F.normalize(b).T).dtype == dtype
    for be in ("cpu", "reference"):
        assert ck.normalized_similarity(a, b, 2.0, backend=be).dtype == dtype, be


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalized_similarity_public_cpu(dtype):
    """The public function with backend='cpu' equals scale * F.normalize(a) @ F.normalize(b).T."""
    a, b = _rounded((21, 10), dtype), _rounded((13, 10), dtype)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    out = ck.normalized_similarity(a, b, scale.float(), backend="cpu")
    ref = scale * F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T
    assert out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]
    (gs,) = torch.autograd.grad(out.float().sum(), [scale])
    (rgs,) = torch.autograd.grad(ref.sum(), [scale])
    assert rel_err(gs, rgs) <= TOL[dtype]
