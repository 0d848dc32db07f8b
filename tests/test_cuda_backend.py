"""The CUDA kernels (backend "cuda") against the float64 family references.

Forward values and every gradient, on fresh random inputs at odd sizes (tile edges:
1, 7, 129 rows, feature dims that are not multiples of the 16/32-wide chunks), every
mask mode, every dtype.  Low-precision inputs are compared with the float64 reference
of the same rounded inputs.  Skipped when no CUDA GPU is available (or this build has
no CUDA kernel for the family, which is reported by name)."""
from __future__ import annotations

import pytest
import torch

from contrastive_kernels import _families as fam
from contrastive_kernels import backends, reference
from helpers import DTYPES, TOL, rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"


def _need(family):
    why = backends.unavailable_reason("cuda", family, DEV)
    if why is not None:
        pytest.fail(f"GPU present but the cuda backend cannot run {family}: {why}")


def _rows(n, d, dtype, unit=False):
    x = torch.randn(n, d, device=DEV, dtype=torch.float64)
    if unit:
        x = x / x.norm(dim=1, keepdim=True)
    return x.to(dtype)


def _check(got, ref, dtype, what):
    got, ref = got.detach(), ref.detach()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    # -inf entries (rows with no kept pair) must match exactly, the rest by relative norm.
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf), f"{what}: -inf pattern differs"
    assert torch.isfinite(got[~inf]).all(), f"{what}: non-finite values"
    err = rel_err(got[~inf], ref[~inf])
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype})"


def _leaf(t, dtype=None):
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


# ----------------------------------------------------------------------- lse family
LSE_SIZES = [(1, 1, 8), (7, 9, 5), (129, 65, 33), (64, 200, 40), (130, 129, 136), (33, 70, 264)]


def _lse_inputs(n, m, d, dtype, mask_mode, with_rscale, with_bias, same=False):
    q = _rows(n, d, dtype)
    k = q.clone() if same else _rows(m, d, dtype)
    m = k.shape[0]
    kw = dict(diag_offset=0, mask_mode=mask_mode)
    if with_rscale:
        kw["q_rscale"] = 1.0 / q.double().norm(dim=1).clamp_min(1e-12).float()
        kw["k_rscale"] = 1.0 / k.double().norm(dim=1).clamp_min(1e-12).float()
    if with_bias:
        kw["col_bias"] = torch.randn(m, device=DEV, dtype=torch.float32)
    if mask_mode & 1:
        kw["diag_offset"] = 1 if m > n else 0
    if mask_mode & 2:
        kw["pos_index"] = torch.randint(0, m, (n,), device=DEV)
    if mask_mode & 4:
        kw["q_labels"] = torch.randint(0, 3, (n,), device=DEV)
        kw["k_labels"] = torch.randint(0, 3, (m,), device=DEV)
    return q, k, kw


def _lse_run(backend, q, k, scale, kw, compute_col, g_row, g_col):
    q_, k_, s_ = _leaf(q), _leaf(k), _leaf(scale)
    extra = {name: _leaf(kw[name]) for name in ("q_rscale", "k_rscale", "col_bias") if name in kw}
    rest = {n: v for n, v in kw.items() if n not in extra}
    row, col = fam.lse(backend, q_, k_, s_, compute_col=compute_col, **extra, **rest)
    # -inf entries (no kept pair) get no cotangent: they receive no gradient by contract.
    loss = (torch.where(torch.isinf(row), torch.zeros_like(row), row) * g_row.to(row.dtype)).sum()
    if compute_col:
        loss = loss + (torch.where(torch.isinf(col), torch.zeros_like(col), col) * g_col.to(col.dtype)).sum()
    grads = torch.autograd.grad(loss, [q_, k_, s_, *extra.values()], allow_unused=True)
    return row, col, dict(zip(["q", "k", "scale", *extra.keys()], grads))


def _lse_case(n, m, d, dtype, mask_mode, compute_col, with_rscale, with_bias, scale_value=7.0, same=False):
    _need("lse")
    q, k, kw = _lse_inputs(n, m, d, dtype, mask_mode, with_rscale, with_bias, same)
    scale = torch.tensor(scale_value, device=DEV, dtype=torch.float32)
    g_row = torch.randn(q.shape[0], device=DEV)
    g_col = torch.randn(k.shape[0], device=DEV)
    row, col, grads = _lse_run("cuda", q, k, scale, kw, compute_col, g_row, g_col)
    rkw = {n_: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for n_, v in kw.items()}
    rrow, rcol, rgrads = _lse_run(backends.FAMILY_REFERENCE, q.double(), k.double(), scale.double(), rkw,
                                  compute_col, g_row, g_col)
    assert row.dtype == torch.float32
    _check(row, rrow, dtype, "row_lse")
    if compute_col:
        _check(col, rcol, dtype, "col_lse")
    for name, g in grads.items():
        rg = rgrads[name]
        if rg is None:
            assert g is None or not g.abs().sum().item(), f"d{name}: expected no gradient"
            continue
        assert g is not None, f"d{name}: missing"
        expect_dtype = dtype if name in ("q", "k") else torch.float32
        assert g.dtype == expect_dtype, f"d{name}: dtype {g.dtype} != {expect_dtype}"
        _check(g, rg, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", LSE_SIZES)
def test_lse_plain_and_col(n, m, d, dtype):
    _lse_case(n, m, d, dtype, 0, True, True, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_mode", range(8))
def test_lse_mask_modes(mask_mode, dtype):
    _lse_case(129, 131, 40, dtype, mask_mode, True, True, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_self_similarity_diag(dtype):
    # NT-Xent / SupCon shape: q is k, the diagonal dropped, rscale shared.
    _lse_case(97, 97, 72, dtype, 1, False, True, False, scale_value=10.0, same=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_large_scale_no_overflow(dtype):
    # Logit scale 100 on unit rows: no overflow in any dtype.
    _need("lse")
    q, k = _rows(70, 48, dtype, unit=True), _rows(90, 48, dtype, unit=True)
    scale = torch.tensor(100.0, device=DEV)
    row, col = fam.lse("cuda", q, k, scale, compute_col=True)
    rrow, rcol = reference.lse_family(q.double(), k.double(), scale.double(), compute_col=True)
    _check(row, rrow, dtype, "row_lse")
    _check(col, rcol, dtype, "col_lse")


def test_lse_fully_masked_rows_are_neg_inf():
    _need("lse")
    q, k = _rows(5, 16, torch.float32), _rows(1, 16, torch.float32)
    scale = torch.tensor(3.0, device=DEV)
    # one key, the diagonal mask drops it for row 0 only
    row, _ = fam.lse("cuda", q, k, scale, diag_offset=0, mask_mode=1)
    assert torch.isinf(row[0]) and row[0] < 0
    assert torch.isfinite(row[1:]).all()


def test_lse_nonfinite_input_gives_nonfinite():
    _need("lse")
    q, k = _rows(9, 16, torch.float32), _rows(11, 16, torch.float32)
    q[3, 5] = float("nan")
    row, _ = fam.lse("cuda", q, k, torch.tensor(2.0, device=DEV))
    assert torch.isnan(row[3])
    assert torch.isfinite(row[torch.arange(9, device=DEV) != 3]).all()


def test_lse_only_needed_gradients():
    _need("lse")
    q, k = _rows(40, 24, torch.float32), _rows(50, 24, torch.float32)
    k_ = k.clone().requires_grad_(True)
    scale = torch.tensor(5.0, device=DEV)
    row, _ = fam.lse("cuda", q, k_, scale)
    (gk,) = torch.autograd.grad(row.sum(), [k_])
    (rk,) = torch.autograd.grad(reference.lse_family(q.double(), k_.double(), scale.double())[0].sum(), [k_])
    _check(gk, rk, torch.float32, "dk")
    out = torch.ops.contrastive_kernels.lse_backward(
        torch.ones(40, device=DEV), torch.empty(0, device=DEV), q, k, scale, None, None, None, None, None, None,
        0, 0, row.detach(), torch.empty(0, device=DEV), False, True, False, False, False, False)
    assert out[0].numel() == 0 and out[2].numel() == 0 and out[3].numel() == 0
    assert out[1].shape == k.shape


def test_lse_deterministic():
    _need("lse")
    q, k = _rows(300, 96, torch.bfloat16), _rows(257, 96, torch.bfloat16)
    scale = torch.tensor(9.0, device=DEV)
    args = (torch.randn(300, device=DEV), torch.randn(257, device=DEV), q, k, scale, None, None, None, None, None,
            None, 0, 0)
    row, col = fam.lse("cuda", q, k, scale, compute_col=True)
    a = torch.ops.contrastive_kernels.lse_backward(*args, row, col, True, True, True, False, False, False)
    b = torch.ops.contrastive_kernels.lse_backward(*args, row, col, True, True, True, False, False, False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_lse_argument_errors_name_the_argument():
    _need("lse")
    q, k = _rows(4, 8, torch.float32), _rows(5, 8, torch.float32)
    scale = torch.tensor(1.0, device=DEV)
    with pytest.raises(RuntimeError, match="k_rscale"):
        torch.ops.contrastive_kernels.lse_forward(q, k, scale, None, torch.ones(3, device=DEV), None, None, None,
                                                  None, 0, 0, False)
    with pytest.raises(RuntimeError, match="pos_index"):
        torch.ops.contrastive_kernels.lse_forward(q, k, scale, None, None, None,
                                                  torch.zeros(4, dtype=torch.int32, device=DEV), None, None, 0, 2,
                                                  False)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.contrastive_kernels.lse_forward(q, k.half(), scale, None, None, None, None, None, None, 0, 0,
                                                  False)


def test_lse_sanitizer_tiny():
    """Tiny case for `compute-sanitizer --tool memcheck/racecheck/initcheck pytest -k sanitizer`."""
    _need("lse")
    for dtype in DTYPES:
        q, k = _rows(3, 5, dtype), _rows(2, 5, dtype)
        _lse_case(3, 2, 5, dtype, 1, True, True, True)
        fam.lse("cuda", q, k, torch.tensor(2.0, device=DEV), compute_col=True)
    torch.cuda.synchronize()


# ------------------------------------------------------------------ pairwise family
def _pair_case(n, m, d, dtype, mode, labels, with_offset, diag_offset=0):
    _need("pairwise")
    q, k = _rows(n, d, dtype, unit=True), _rows(m, d, dtype, unit=True)
    scale = torch.tensor(10.0, device=DEV)
    bias = torch.tensor(-3.0, device=DEV)
    kw = dict(diag_offset=diag_offset, mode=mode)
    if labels:
        kw["q_labels"] = torch.randint(0, 4, (n,), device=DEV)
        kw["k_labels"] = torch.randint(0, 4, (m,), device=DEV)
    off = torch.randn(n, device=DEV) if with_offset else None
    g = torch.randn(n, device=DEV)

    def run(backend, q, k, scale, bias, off):
        leaves = [_leaf(q), _leaf(k), _leaf(scale), _leaf(bias)] + ([_leaf(off)] if off is not None else [])
        rows = fam.pairwise(backend, *leaves[:4], row_offset=leaves[4] if off is not None else None, **kw)
        grads = torch.autograd.grad((rows * g.to(rows.dtype)).sum(), leaves)
        return rows, grads

    rows, grads = run("cuda", q, k, scale, bias, off)
    rrows, rgrads = run(backends.FAMILY_REFERENCE, q.double(), k.double(), scale.double(), bias.double(),
                        off.double() if off is not None else None)
    assert rows.dtype == torch.float32
    _check(rows, rrows, dtype, "rows")
    for name, x, r in zip(("q", "k", "scale", "bias", "row_offset"), grads, rgrads):
        assert x.dtype == (dtype if name in ("q", "k") else torch.float32), f"d{name} dtype {x.dtype}"
        _check(x, r, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", [(1, 1, 8), (7, 7, 5), (129, 129, 33), (65, 200, 136)])
def test_pairwise_siglip(n, m, d, dtype):
    _pair_case(n, m, d, dtype, 0, False, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", range(8))
@pytest.mark.parametrize("labels", [False, True], ids=["diag", "labels"])
def test_pairwise_modes(mode, labels, dtype):
    _pair_case(70, 90, 40, dtype, mode, labels, True, diag_offset=3)


def test_pairwise_sanitizer_tiny():
    """Tiny case for compute-sanitizer runs."""
    for dtype in DTYPES:
        _pair_case(3, 4, 5, dtype, 4, False, True)
    torch.cuda.synchronize()


# ------------------------------------------------------ families without CUDA kernels
@pytest.mark.parametrize("family", ["xcorr", "similarity"])
def test_missing_families_are_reported_not_stubbed(family):
    why = backends.unavailable_reason("cuda", family, DEV)
    if why is None:
        pytest.skip(f"this build has a CUDA {family} kernel; its tests live with the backend-generic tests")
    assert family in why


# ---------------------------------------------------------------------- peak memory
@pytest.mark.slow
@pytest.mark.parametrize("family", ["lse", "pairwise"])
def test_no_n_by_m_buffer_on_device(family):
    """N = M = 16384: an N x M float32 buffer would be 1 GiB; fwd + bwd must stay O((N + M) D)."""
    _need(family)
    n, d = 16384, 64
    q = _rows(n, d, torch.bfloat16).requires_grad_(True)
    k = _rows(n, d, torch.bfloat16).requires_grad_(True)
    scale = torch.tensor(10.0, device=DEV, requires_grad=True)
    bias = torch.tensor(-5.0, device=DEV, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if family == "lse":
        row, col = fam.lse("cuda", q, k, scale, compute_col=True)
        (row.sum() + col.sum()).backward()
    else:
        fam.pairwise("cuda", q, k, scale, bias).sum().backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert q.grad is not None and k.grad is not None and scale.grad is not None
    assert growth < 64 * 2**20, f"peak device memory grew by {growth / 2**20:.1f} MiB (N x M would be 1024 MiB)"
