"""SPEC: inputs "on CPU or CUDA; any strides".

Every public loss (and the two matrix functions) with its inputs as views the kernels must not
misread: a misaligned base (a contiguous tensor at an odd element offset: the CUDA kernels' 16-byte
cp.async copies would fault, the emulator reports it), column-major storage (a transpose), a
column stride of 2, and a zero stride (a column broadcast along the features).  Loss and the
gradient of every input view against the float64 reference of the same values, contiguous, with
SPEC's tolerances; each gradient has its input's shape, dtype and device.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import contrastive_kernels as ck

from helpers import DTYPES, LOSS_CASES, LOSS_ROWS, TOL, backend_params, rel_err, skip_interpreter_bf16

D = 16  # rows 16-byte aligned when contiguous at offset 0: the offset layout is what breaks it

# The matrix functions: the output matrix itself is compared, and the gradients of its sum
# weighted by fixed weights (exact in every dtype: multiples of 1/8 below 4).
def _weights(n, m, seed):
    return torch.randint(-31, 32, (n, m), generator=torch.Generator().manual_seed(seed)).double() / 8


MATRICES = {
    "normalized_similarity": ("similarity", 2, lambda x, be: ck.normalized_similarity(x[0], x[1], 3.0, backend=be)),
    "normalized_similarity_self": ("similarity", 1, lambda x, be: ck.normalized_similarity(
        x[0], None, 3.0, normalize=False, backend=be)),
    "cross_correlation": ("xcorr", 2, lambda x, be: ck.cross_correlation(x[0], x[1], backend=be)),
}
CASES = {**LOSS_CASES, **MATRICES}

LAYOUTS = ("offset", "transposed", "strided", "broadcast")


def _view(values: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, view): `view` holds `values` (broadcast: its first column) in `layout`."""
    n, d = values.shape
    if layout == "offset":
        leaf = torch.cat([values.new_zeros(1), values.reshape(-1)]).requires_grad_()
        view = leaf[1:].view(n, d)
        assert view.is_contiguous() and view.storage_offset() == 1
    elif layout == "transposed":
        leaf = values.T.contiguous().requires_grad_()
        view = leaf.T
        assert view.stride() == (1, n)
    elif layout == "strided":
        leaf = torch.stack([values, torch.zeros_like(values)], 2).reshape(n, 2 * d).clone().requires_grad_()
        view = leaf[:, ::2]
        assert view.stride() == (2 * d, 2)
    else:
        leaf = values[:, :1].clone().requires_grad_()
        view = leaf.expand(n, d)
        assert view.stride() == (1, 0)
    return leaf, view


def _params():
    out = []
    for name, (family, _, _) in CASES.items():
        for p in [pytest.param("reference", id="reference")] + backend_params(family):
            be = p.values[0]
            out.append(pytest.param(name, be, marks=p.marks, id=f"{name}-{be}"))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,backend", _params())
def test_any_strides(name, backend, layout, dtype):
    skip_interpreter_bf16(backend, dtype)
    _, n_inputs, loss_fn = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{layout}".encode()))
    values = [torch.randn(LOSS_ROWS, D, generator=g).to(dtype) for _ in range(n_inputs)]
    made = [_view(v, layout) for v in values]
    views = [v for _, v in made]
    assert all(v._base is leaf and v.dtype == dtype for leaf, v in made)

    out = loss_fn(views, backend)
    exact = [v.detach().double().contiguous().requires_grad_() for v in views]
    want = loss_fn(exact, "reference")
    tol, what = TOL[dtype], f"{name} [{backend}, {layout}, {dtype}]"
    e = rel_err(out, want)
    assert e <= tol, f"{what}: output relative error {e:.2e} > {tol:.0e}"
    if name in MATRICES:
        w = _weights(*out.shape, seed=5)
        out, want = (out.double() * w).sum(), (want * w).sum()
    else:
        assert out.dtype == torch.float32, f"{what}: the loss's dtype {out.dtype}"
    grads = torch.autograd.grad(out, views)
    want_grads = torch.autograd.grad(want, exact)
    for i, (gr, gw, v) in enumerate(zip(grads, want_grads, views)):
        assert gr.shape == v.shape and gr.dtype == dtype and gr.device == v.device, f"{what}: input {i}'s gradient"
        assert torch.isfinite(gr).all(), f"{what}: input {i}'s gradient not finite"
        e = rel_err(gr, gw)
        assert e <= tol, f"{what}: input {i}'s gradient relative error {e:.2e} > {tol:.0e}"
