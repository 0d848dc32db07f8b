"""The CUDA kernels (backend "cuda") against the float64 family references.

Forward values and every gradient, on fresh random inputs at odd sizes (tile edges:
1, 7, 129 rows, feature dims that are not multiples of the 16/32-wide chunks), every
mask mode, every dtype, for all four families (lse, pairwise, xcorr on both paths,
similarity).  Low-precision inputs are compared with the float64 reference of the same
rounded inputs.  Skipped only when no CUDA GPU is available; a GPU build without a
family's CUDA kernel fails, naming the family."""
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
LSE_SIZES = [(1, 1, 8), (7, 9, 5), (129, 65, 33), (64, 200, 40), (130, 129, 136), (33, 70, 264), (9, 70, 520)]


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
        0, 0, row.detach(), torch.empty(0, device=DEV), torch.empty(0, device=DEV), False, True, False, False, False,
        False)
    assert out[0].numel() == 0 and out[2].numel() == 0 and out[3].numel() == 0
    assert out[1].shape == k.shape


def test_lse_deterministic():
    _need("lse")
    q, k = _rows(300, 96, torch.bfloat16), _rows(257, 96, torch.bfloat16)
    scale = torch.tensor(9.0, device=DEV)
    args = (torch.randn(300, device=DEV), torch.randn(257, device=DEV), q, k, scale, None, None, None, None, None,
            None, 0, 0)
    row, col = fam.lse("cuda", q, k, scale, compute_col=True)
    xt = torch.empty(0, device=DEV)
    a = torch.ops.contrastive_kernels.lse_backward(*args, row, col, xt, True, True, True, False, False, False)
    b = torch.ops.contrastive_kernels.lse_backward(*args, row, col, xt, True, True, True, False, False, False)
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
def _pair_case(n, m, d, dtype, mode, labels, with_offset, diag_offset=0, total=False):
    """With `total`: fam.pairwise_total, i.e. the one-pass pairwise_fused op, whose
    gradients are those of c * total for a scalar upstream c."""
    _need("pairwise")
    q, k = _rows(n, d, dtype, unit=True), _rows(m, d, dtype, unit=True)
    scale = torch.tensor(10.0, device=DEV)
    bias = torch.tensor(-3.0, device=DEV)
    kw = dict(diag_offset=diag_offset, mode=mode)
    if labels:
        kw["q_labels"] = torch.randint(0, 4, (n,), device=DEV)
        kw["k_labels"] = torch.randint(0, 4, (m,), device=DEV)
    off = torch.randn(n, device=DEV) if with_offset else None
    g = torch.rand((), device=DEV) + 0.5 if total else torch.randn(n, device=DEV)
    fn = fam.pairwise_total if total else fam.pairwise

    def run(backend, q, k, scale, bias, off):
        leaves = [_leaf(q), _leaf(k), _leaf(scale), _leaf(bias)] + ([_leaf(off)] if off is not None else [])
        rows = fn(backend, *leaves[:4], row_offset=leaves[4] if off is not None else None, **kw)
        grads = torch.autograd.grad((rows * g.to(rows.dtype)).sum(), leaves)
        return rows, grads

    rows, grads = run("cuda", q, k, scale, bias, off)
    rrows, rgrads = run(backends.FAMILY_REFERENCE, q.double(), k.double(), scale.double(), bias.double(),
                        off.double() if off is not None else None)
    assert rows.dtype == torch.float32 and rows.shape == (() if total else (n,))
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", [0, 1, 2, 5])
@pytest.mark.parametrize("n,m,d", [(1, 1, 8), (7, 9, 5), (129, 65, 33), (65, 200, 136)])
def test_pairwise_fused_total(n, m, d, mode, dtype):
    """The one-pass forward and gradient (pairwise_fused): grad_row = 1 backward kernels
    that also sum the terms and write float32 dq / dk."""
    _pair_case(n, m, d, dtype, mode, mode == 2, True, diag_offset=1 if mode == 5 else 0, total=True)


def test_pairwise_fused_need_subsets():
    _need("pairwise")
    op = torch.ops.contrastive_kernels.pairwise_fused
    q, k = _rows(70, 24, torch.bfloat16, unit=True), _rows(50, 24, torch.bfloat16, unit=True)
    s, b = torch.tensor(10.0, device=DEV), torch.tensor(-3.0, device=DEV)
    off = torch.randn(70, device=DEV)
    full = op(q, k, s, b, off, None, None, 0, 0, True, True, True, True, True)
    assert all(t.dtype == torch.float32 for t in full)
    for flags in [(True, False, False, False, False), (False, True, False, False, False),
                  (False, False, True, True, False), (False, False, False, False, True)]:
        out = op(q, k, s, b, off, None, None, 0, 0, *flags)
        assert torch.equal(out[0], full[0]), flags
        for flag, got, want in zip(flags, out[1:], full[1:]):
            assert got.numel() == 0 if not flag else torch.equal(got, want), flags


def test_pairwise_sanitizer_tiny():
    """Tiny case for compute-sanitizer runs."""
    for dtype in DTYPES:
        _pair_case(3, 4, 5, dtype, 4, False, True)
        _pair_case(3, 4, 5, dtype, 0, False, True, total=True)
    torch.cuda.synchronize()


# ------------------------------------------------------------ cross-correlation family
XCORR_PATHS = [pytest.param(1, id="gram"), pytest.param(2, id="tiled")]
# (n, d): tile edges (1, 7, 129, 300 are not multiples of 64), N < D/2 and N > D.
XCORR_SIZES = [(1, 1), (7, 129), (129, 7), (129, 300), (300, 129), (300, 300), (7, 1)]


def _xcorr_run(backend, a, b, path, g_off, g_diag):
    off, diag = fam.xcorr(backend, a, b, path=path)
    leaves = [t for t in ((a,) if b is a else (a, b)) if t.requires_grad]
    grads = torch.autograd.grad(off * g_off.to(off.dtype) + (diag * g_diag.to(diag.dtype)).sum(), leaves) \
        if leaves else ()
    return off, diag, grads


def _xcorr_case(n, d, dtype, path, same=False, need=("a", "b"), offset=0.0):
    _need("xcorr")
    a = (_rows(n, d, torch.float64) + offset).to(dtype)
    b = a if same else _rows(n, d, dtype)
    g_off = torch.randn((), device=DEV, dtype=torch.float64)
    g_diag = torch.randn(d, device=DEV, dtype=torch.float64)
    a_ = _leaf(a) if ("a" in need or same) else a.clone()
    b_ = a_ if same else (_leaf(b) if "b" in need else b.clone())
    off, diag, grads = _xcorr_run("cuda", a_, b_, path, g_off.float(), g_diag.float())
    a64 = a.double().requires_grad_(a_.requires_grad)
    b64 = a64 if same else b.double().requires_grad_(b_.requires_grad)
    roff, rdiag, rgrads = _xcorr_run(backends.FAMILY_REFERENCE, a64, b64, path, g_off, g_diag)
    assert off.dtype == torch.float32 and off.shape == ()
    assert diag.dtype == torch.float32 and diag.shape == (d,)
    _check(off, roff, dtype, "offdiag")
    _check(diag, rdiag, dtype, "diag")
    names = [nm for nm, t in (("a", a_), ("b", b_)) if t.requires_grad and not (same and nm == "b")]
    assert len(grads) == len(rgrads) == len(names)
    for name, gk, gr in zip(names, grads, rgrads):
        assert gk.dtype == dtype and gk.shape == (n, d), f"d{name}: {gk.dtype} {tuple(gk.shape)}"
        _check(gk, gr, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", XCORR_PATHS)
@pytest.mark.parametrize("n,d", XCORR_SIZES)
def test_xcorr_matches_reference(n, d, path, dtype):
    _xcorr_case(n, d, dtype, path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", [pytest.param(0, id="auto")] + XCORR_PATHS)
@pytest.mark.parametrize("n,d", [(7, 65), (129, 3), (33, 300)])
def test_xcorr_same_tensor(n, d, path, dtype):
    """a is b (VICReg's covariance): symmetric C, upper tiles only in the tiled forward."""
    _xcorr_case(n, d, dtype, path, same=True, offset=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_xcorr_tiled_several_panels(dtype):
    """D = 2100: the backward's G panels hold 1984 rows, so there are two of them (the last
    one partial), and D * 2 bytes is not 16-byte aligned (element copies)."""
    _xcorr_case(70, 2100, dtype, 2)


@pytest.mark.parametrize("path", XCORR_PATHS)
@pytest.mark.parametrize("need", [("a",), ("b",)], ids="+".join)
def test_xcorr_need_subsets(path, need):
    _xcorr_case(40, 72, torch.float32, path, need=need)
    a, b = _rows(9, 20, torch.float32), _rows(9, 20, torch.float32)
    go, gd = torch.randn((), device=DEV), torch.randn(20, device=DEV)
    flags = ("a" in need, "b" in need)
    da, db = torch.ops.contrastive_kernels.xcorr_backward(go, gd, a, b, path, *flags)
    assert (da.shape == a.shape) == flags[0] and (da.numel() == 0) == (not flags[0])
    assert (db.shape == b.shape) == flags[1] and (db.numel() == 0) == (not flags[1])
    none = torch.ops.contrastive_kernels.xcorr_backward(go, gd, a, b, path, False, False)
    assert none[0].numel() == 0 and none[1].numel() == 0


@pytest.mark.parametrize("path", XCORR_PATHS)
def test_xcorr_paths_agree_and_deterministic(path):
    _need("xcorr")
    a = _rows(150, 200, torch.bfloat16)
    b = (0.5 * a.double() + _rows(150, 200, torch.float64)).to(torch.bfloat16)
    go, gd = torch.randn((), device=DEV), torch.randn(200, device=DEV)
    f1 = torch.ops.contrastive_kernels.xcorr_forward(a, b, path)
    f2 = torch.ops.contrastive_kernels.xcorr_forward(a, b, path)
    g1 = torch.ops.contrastive_kernels.xcorr_backward(go, gd, a, b, path, True, True)
    g2 = torch.ops.contrastive_kernels.xcorr_backward(go, gd, a, b, path, True, True)
    for x, y in zip(f1 + g1, f2 + g2):
        assert torch.equal(x, y)
    other = torch.ops.contrastive_kernels.xcorr_forward(a, b, 3 - path)
    assert rel_err(f1[0], other[0]) <= 1e-5 and rel_err(f1[1], other[1]) <= 1e-5


def test_xcorr_zero_rows():
    _need("xcorr")
    a = torch.zeros(0, 5, device=DEV)
    for path in (1, 2):
        off, diag = torch.ops.contrastive_kernels.xcorr_forward(a, a.clone(), path)
        assert off.item() == 0.0 and torch.equal(diag, torch.zeros(5, device=DEV))
        da, db = torch.ops.contrastive_kernels.xcorr_backward(torch.ones((), device=DEV), torch.ones(5, device=DEV),
                                                              a, a.clone(), path, True, True)
        assert da.shape == (0, 5) and db.shape == (0, 5)


def test_xcorr_argument_errors_name_the_argument():
    _need("xcorr")
    a = _rows(3, 4, torch.float32)
    fwd, bwd = torch.ops.contrastive_kernels.xcorr_forward, torch.ops.contrastive_kernels.xcorr_backward
    with pytest.raises(RuntimeError, match="same shape"):
        fwd(a, _rows(3, 5, torch.float32), 0)
    with pytest.raises(RuntimeError, match="path"):
        fwd(a, a, 7)
    with pytest.raises(RuntimeError, match="same dtype"):
        fwd(a, a.half(), 0)
    with pytest.raises(RuntimeError, match="b is on"):
        fwd(a, a.cpu(), 0)
    with pytest.raises(RuntimeError, match="grad_diag"):
        bwd(torch.ones((), device=DEV), torch.ones(3, device=DEV), a, a, 2, True, True)
    with pytest.raises(RuntimeError, match="grad_offdiag"):
        bwd(torch.ones(1, device=DEV), torch.ones(4, device=DEV), a, a, 2, True, True)


def test_xcorr_sanitizer_tiny():
    """Tiny case for compute-sanitizer runs (both paths, every dtype)."""
    for dtype in DTYPES:
        for path in (1, 2):
            _xcorr_case(3, 5, dtype, path)
            _xcorr_case(2, 3, dtype, path, same=True)
    torch.cuda.synchronize()


# --------------------------------------------------------------- normalized similarity
SIM_SIZES = [(1, 1, 1), (7, 9, 5), (7, 129, 3), (129, 65, 33), (300, 129, 136), (33, 300, 64)]


def _sim_run(backend, a, b, scale, normalize, need, g_out, same):
    a_ = _leaf(a) if "a" in need else a.detach().clone()
    b_ = a_ if same else (_leaf(b) if "b" in need else b.detach().clone())
    s_ = _leaf(scale) if "scale" in need else scale.detach().clone()
    out = fam.similarity(backend, a_, b_, s_, normalize)
    names = [n for n in ("a", "b", "scale") if n in need and not (same and n == "b")]
    leaves = {"a": a_, "b": b_, "scale": s_}
    grads = {}
    if names:
        gs = torch.autograd.grad((out * g_out.to(out.dtype)).sum(), [leaves[n] for n in names])
        grads = dict(zip(names, gs))
    return out, grads


def _sim_case(n, m, d, dtype, normalize, need=("a", "b", "scale"), same=False, zero_rows=False, scale=3.0):
    _need("similarity")
    a = _rows(n, d, dtype)
    if zero_rows:  # norm 0 and a norm below 1e-12: the clamp branch
        a[0] = 0
        if n > 1:
            a[1] = torch.full((d,), 1e-14, device=DEV, dtype=torch.float64).to(dtype)
    b = a if same else _rows(m, d, dtype)
    m = b.shape[0]
    s = torch.tensor(scale, device=DEV)
    g_out = torch.randn(n, m, device=DEV, dtype=torch.float64).to(dtype)
    out, grads = _sim_run("cuda", a, b, s, normalize, set(need), g_out, same)
    rout, rgrads = _sim_run(backends.FAMILY_REFERENCE, a.double(), b.double(), s.double(), normalize, set(need),
                            g_out.double(), same)
    assert out.dtype == dtype and out.shape == (n, m)
    _check(out, rout, dtype, "out")
    assert set(grads) == set(rgrads)
    for name, g in grads.items():
        assert g.dtype == (torch.float32 if name == "scale" else dtype), f"d{name}: dtype {g.dtype}"
        if normalize and (d == 1 or (same and n == 1)) and name in ("a", "b"):
            # x / |x| is constant (sign) when D = 1: the exact gradient is 0, the relative
            # error undefined; bound the absolute error by the gradient's natural scale.
            x = a if name == "a" else b
            bound = TOL[dtype] * scale * g_out.double().norm() / x.double().abs().clamp_min(1e-12).min()
            assert torch.isfinite(g).all() and g.double().norm() <= bound, f"d{name} should vanish: {g}"
            continue
        _check(g, rgrads[name], dtype, f"d{name}")
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("n,m,d", SIM_SIZES)
def test_similarity_matches_reference(n, m, d, normalize, dtype):
    _sim_case(n, m, d, dtype, normalize)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 129])
def test_similarity_self(n, dtype):
    _sim_case(n, n, 17, dtype, True, same=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_similarity_zero_rows(dtype):
    # float16 cannot hold the 1e12-scaled gradient of a zero row (nor can F.normalize's).
    _sim_case(9, 11, 5, dtype, True, zero_rows=True)


@pytest.mark.parametrize("need", [("a",), ("b",), ("scale",), ("a", "scale"), ("b", "scale")], ids="+".join)
def test_similarity_need_subsets(need):
    g = _sim_case(33, 40, 8, torch.float32, True, need=need)
    assert set(g) == set(need)
    a, b, s = _rows(6, 4, torch.float32), _rows(5, 4, torch.float32), torch.tensor(2.0, device=DEV)
    flags = [n in need for n in ("a", "b", "scale")]
    outs = torch.ops.contrastive_kernels.similarity_backward(torch.randn(6, 5, device=DEV), a, b, s, True, *flags)
    for flag, t, shape in zip(flags, outs, [(6, 4), (5, 4), ()]):
        assert (tuple(t.shape) == shape) if flag else t.numel() == 0


def test_similarity_deterministic():
    _need("similarity")
    a, b = _rows(300, 96, torch.bfloat16), _rows(257, 96, torch.bfloat16)
    s, g = torch.tensor(7.0, device=DEV), torch.randn(300, 257, device=DEV).to(torch.bfloat16)
    ops = torch.ops.contrastive_kernels
    assert torch.equal(ops.similarity_forward(a, b, s, True), ops.similarity_forward(a, b, s, True))
    x = ops.similarity_backward(g, a, b, s, True, True, True, True)
    y = ops.similarity_backward(g, a, b, s, True, True, True, True)
    for p, q in zip(x, y):
        assert torch.equal(p, q)


def test_similarity_large_scale_half():
    """scale 100 with float16 output: values up to 100 are representable, no overflow."""
    _need("similarity")
    a = _rows(64, 32, torch.float16)
    out = fam.similarity("cuda", a, a, torch.tensor(100.0, device=DEV), True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.diagonal().float(), torch.full((64,), 100.0, device=DEV), rtol=1e-3)


def test_similarity_nonfinite():
    _need("similarity")
    a, b = _rows(5, 4, torch.float32), _rows(6, 4, torch.float32)
    a[2, 1] = float("nan")
    out = fam.similarity("cuda", a, b, torch.tensor(1.0, device=DEV), True)
    assert not torch.isfinite(out[2]).any() and torch.isfinite(out[[0, 1, 3, 4]]).all()


def test_similarity_argument_errors_name_the_argument():
    _need("similarity")
    a, b = _rows(4, 8, torch.float32), _rows(5, 8, torch.float32)
    s = torch.tensor(1.0, device=DEV)
    ops = torch.ops.contrastive_kernels
    with pytest.raises(RuntimeError, match="same feature dimension"):
        ops.similarity_forward(a, _rows(5, 7, torch.float32), s, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.similarity_forward(a, b.half(), s, True)
    with pytest.raises(RuntimeError, match="scale"):
        ops.similarity_forward(a, b, torch.ones(2, device=DEV), True)
    with pytest.raises(RuntimeError, match="grad"):
        ops.similarity_backward(torch.ones(4, 4, device=DEV), a, b, s, True, True, False, False)
    with pytest.raises(RuntimeError, match="grad"):
        ops.similarity_backward(torch.ones(4, 5, device=DEV).half(), a, b, s, True, True, False, False)


def test_similarity_sanitizer_tiny():
    """Tiny case for compute-sanitizer runs."""
    for dtype in DTYPES:
        for normalize in (True, False):
            _sim_case(3, 4, 5, dtype, normalize)
    torch.cuda.synchronize()


# ------------------------------------------------------------------ every family is built
@pytest.mark.parametrize("family", ["lse", "pairwise", "xcorr", "similarity"])
def test_every_family_has_a_cuda_kernel(family):
    """A CUDA build registers all four families for the CUDA dispatch key (none is stubbed
    or silently left to another backend)."""
    assert backends.unavailable_reason("cuda", family, DEV) is None


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


@pytest.mark.slow
def test_xcorr_no_d_by_d_buffer_on_device():
    """Tiled path at D = 16384: a D x D float32 buffer would be 1 GiB.  Forward + backward
    may hold the two gradients (N x D each) and bounded workspaces (G panel <= 16 MiB)."""
    _need("xcorr")
    n, d = 8192, 16384
    a = _rows(n, d, torch.bfloat16).requires_grad_(True)
    b = _rows(n, d, torch.bfloat16).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    off, diag = fam.xcorr("cuda", a, b, path=2)
    (off + diag.sum()).backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    grads = 2 * n * d * a.element_size()
    assert a.grad is not None and b.grad is not None and torch.isfinite(off)
    assert growth < grads + 64 * 2**20, \
        f"peak device memory grew by {growth / 2**20:.1f} MiB, gradients {grads / 2**20:.0f} MiB (D x D: 1024 MiB)"


@pytest.mark.slow
def test_similarity_no_extra_n_by_m_buffer_on_device():
    """N = M = 16384, D = 64, bf16: the output and its incoming gradient are the only N x M
    tensors (512 MiB each); a float32 N x M temporary (1 GiB) would show."""
    _need("similarity")
    n, d = 16384, 64
    a = _rows(n, d, torch.bfloat16).requires_grad_(True)
    b = _rows(n, d, torch.bfloat16).requires_grad_(True)
    scale = torch.tensor(10.0, device=DEV, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fam.similarity("cuda", a, b, scale, True)
    torch.cuda.synchronize()
    out_bytes = n * n * out.element_size()
    fwd_growth = torch.cuda.max_memory_allocated() - base
    assert fwd_growth < out_bytes + 16 * 2**20, f"forward grew by {fwd_growth / 2**20:.1f} MiB"
    g = torch.randn_like(out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(out, [a, b, scale], g)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(x).all() for x in grads)
    assert growth < 64 * 2**20, f"backward grew by {growth / 2**20:.1f} MiB (an N x M float32 copy: 1024 MiB)"


# ------------------------------------------------------- float16 dS below its range
def _clustered(r, d, dtype, u):
    x = u + 0.3 * torch.randn(r, d, device=DEV, dtype=torch.float64) / d ** 0.5
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("family", ["lse", "pairwise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_tiny_upstream_gradient(family, dtype):
    """A mean over a large batch without loss scaling: dS = upstream x probability (or
    sigmoid) ~1e-8, below float16's subnormals, while dq / dk are normal float16 numbers.
    The kernels stage dS times a power of two (family_tiles.cuh row scale)."""
    _need(family)
    n = m = 1500
    d = 64
    u = torch.randn(1, d, device=DEV, dtype=torch.float64)
    u = u / u.norm()
    q, k = _clustered(n, d, dtype, u), _clustered(m, d, dtype, u)
    g = 2.0 ** -16 * (1 + 0.1 * torch.rand(n, device=DEV, dtype=torch.float64))

    def run(backend, q, k):
        q, k = _leaf(q), _leaf(k)
        if family == "lse":
            rows = fam.lse(backend, q, k, torch.tensor(20.0, device=DEV, dtype=torch.float32 if backend == "cuda"
                                                        else torch.float64))[0]
        else:
            rows = fam.pairwise(backend, q, k, torch.tensor(30.0, device=DEV, dtype=q.dtype if backend != "cuda"
                                                            else torch.float32),
                                torch.tensor(-35.0, device=DEV, dtype=q.dtype if backend != "cuda" else torch.float32),
                                mode=1)
        return torch.autograd.grad((rows * g.to(rows.dtype)).sum(), [q, k])

    got = run("cuda", q, k)
    ref = run(backends.FAMILY_REFERENCE, q.double(), k.double())
    for name, x, r in zip(("q", "k"), got, ref):
        assert r.abs().max() > 2 ** -14, f"d{name} below float16's normal range: the case tests nothing"
        _check(x, r, dtype, f"{family} d{name} (tiny upstream)")
