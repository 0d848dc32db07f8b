"""The cross-correlation family (csrc/op_schemas.h: xcorr_forward / xcorr_backward) on every
fused backend and both paths, against reference.xcorr_family in float64."""
import pytest
import torch

from contrastive_kernels import _families as fam
from contrastive_kernels import reference
from helpers import DTYPES, TOL, assert_close_rel, backend_params, rel_err

BACKENDS = backend_params("xcorr")
PATHS = [pytest.param(1, id="gram"), pytest.param(2, id="tiled")]
SIZES_N = (1, 2, 7, 129)
SIZES_D = (1, 3, 65, 257)


def _dtypes(backend):
    # The Triton interpreter computes bfloat16 wrongly (STYLE.md); bf16 Triton runs on a GPU.
    if backend == "triton" and not torch.cuda.is_available():
        return (torch.float32, torch.float16)
    return DTYPES


def _run(backend, a, b, path, g_off, g_diag):
    """offdiag, diag and the gradients of g_off * offdiag + g_diag . diag."""
    off, diag = fam.xcorr(backend, a, b, path=path)
    grads = torch.autograd.grad(off * g_off + (diag * g_diag).sum(), [t for t in (a, b) if t.requires_grad])
    return off, diag, grads


def _check_against_reference(backend, a, b, path, dtype):
    d = a.shape[1]
    g_off = torch.randn((), dtype=torch.float64)
    g_diag = torch.randn(d, dtype=torch.float64)
    off, diag, grads = _run(backend, a, b, path, g_off.float(), g_diag.float())
    assert off.dtype == torch.float32 and off.shape == ()
    assert diag.dtype == torch.float32 and diag.shape == (d,)
    a64 = a.detach().double().requires_grad_()
    b64 = a64 if b is a else b.detach().double().requires_grad_()
    roff, rdiag, rgrads = _run(fam.FAMILY_REFERENCE, a64, b64, path, g_off, g_diag)
    assert_close_rel(off, roff, dtype, "offdiag")
    assert_close_rel(diag, rdiag, dtype, "diag")
    assert len(grads) == len(rgrads)
    for name, gk, gr, x in zip("ab", grads, rgrads, (a, b)):
        assert gk.dtype == x.dtype and gk.shape == x.shape
        assert_close_rel(gk, gr, dtype, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", SIZES_N)
@pytest.mark.parametrize("d", SIZES_D)
def test_xcorr_matches_reference(backend, path, n, d):
    for dtype in _dtypes(backend):
        a = torch.randn(n, d).to(dtype).requires_grad_()
        b = torch.randn(n, d).to(dtype).requires_grad_()
        _check_against_reference(backend, a, b, path, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", [pytest.param(0, id="auto")] + PATHS)
@pytest.mark.parametrize("n,d", [(7, 65), (129, 3), (2, 257)])
def test_xcorr_same_tensor(backend, path, n, d):
    """a is b (VICReg's covariance): the symmetric shortcuts give d/da of both slots."""
    a = (torch.randn(n, d) + 0.5).requires_grad_()
    _check_against_reference(backend, a, a, path, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("same", [False, True], ids=["a_b", "a_a"])
def test_xcorr_tiled_backward_panels(backend, same, monkeypatch):
    """The tiled backward forms G in panels of rows (at most 4 Mi entries: one panel up to D =
    2048); db adds one panel's product after another.  CONTRASTIVE_KERNELS_XCORR_PANEL_ELEMS makes
    the panels small enough for a test size: D = 200 in four panels of 64 rows (the last 8).  The
    mutation audit found no test with two panels (an overwrite instead of the sum passed)."""
    monkeypatch.setenv("CONTRASTIVE_KERNELS_XCORR_PANEL_ELEMS", str(64 * 200))
    for dtype in _dtypes(backend)[:2]:
        a = (torch.randn(9, 200) + 0.3).to(dtype).requires_grad_()
        b = a if same else torch.randn(9, 200).to(dtype).requires_grad_()
        _check_against_reference(backend, a, b, 2, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("same", [False, True], ids=["a_b", "a_a"])
def test_xcorr_past_the_first_block(backend, same):
    """Sizes where the partial results of several blocks meet, which no other test reached
    (the mutation audit's survivors): D = 600 (the C++ tiled path's 512-wide tiles: a second
    tile row and column, and the symmetric forward's mirror tiles, counted twice), N = 300
    (the CUDA diag's row chunks of 256), both paths, values and gradients."""
    for n, d in ((16, 600), (300, 8)):
        a = (torch.randn(n, d) + 0.3).requires_grad_()
        b = a if same else torch.randn(n, d).requires_grad_()
        for path in (1, 2):
            _check_against_reference(backend, a, b, path, torch.float32)


@pytest.mark.parametrize("same", [False, True], ids=["a_b", "a_a"])
def test_xcorr_cpu_gram_column_chunks(same):
    """The C++ Gram path converts a and b to float64 in column chunks of 2^20 / N columns:
    N = 600, D = 2000 has two, and its backward weighs each chunk's columns by their own
    entries of the diagonal term (an index off by the chunk's start passed every smaller
    test).  (The other backends' Gram paths are whole-matrix PyTorch products.)"""
    a = torch.randn(600, 2000).requires_grad_()
    b = a if same else torch.randn(600, 2000).requires_grad_()
    _check_against_reference("cpu", a, b, 1, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_xcorr_paths_agree(backend):
    n, d = 33, 97
    a = torch.randn(n, d, requires_grad=True)
    b = (0.5 * a.detach() + torch.randn(n, d)).requires_grad_()
    g_off, g_diag = torch.randn(()), torch.randn(d)
    outs = [_run(backend, a, b, p, g_off, g_diag) for p in (0, 1, 2)]
    for off, diag, grads in outs[1:]:
        assert rel_err(off, outs[0][0]) <= 1e-5
        assert rel_err(diag, outs[0][1]) <= 1e-5
        for gk, g0 in zip(grads, outs[0][2]):
            assert rel_err(gk, g0) <= 1e-5


def _bwd_op(backend):
    ops = torch.ops.contrastive_kernels
    return ops.xcorr_backward_triton if backend == "triton" else ops.xcorr_backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_xcorr_need_flags(backend, path):
    """Inputs that need no gradient get an empty tensor (no gradient work) and None."""
    n, d = 5, 9
    a, b = torch.randn(n, d), torch.randn(n, d)
    go, gd = torch.randn(()), torch.randn(d)
    da, db = _bwd_op(backend)(go, gd, a, b, path, True, False)
    assert da.shape == a.shape and db.numel() == 0
    da2, db2 = _bwd_op(backend)(go, gd, a, b, path, False, True)
    assert da2.numel() == 0 and db2.shape == b.shape
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    roff, rdiag = reference.xcorr_family(a64, b64)
    ra, rb = torch.autograd.grad(roff * go.double() + (rdiag * gd.double()).sum(), [a64, b64])
    assert rel_err(da, ra) <= 1e-5 and rel_err(db2, rb) <= 1e-5
    a_leaf = a.clone().requires_grad_()
    off, diag = fam.xcorr(backend, a_leaf, b, path=path)
    (off + diag.sum()).backward()
    assert a_leaf.grad is not None and b.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_xcorr_bad_arguments(backend):
    fwd = torch.ops.contrastive_kernels.xcorr_forward_triton if backend == "triton" else \
        torch.ops.contrastive_kernels.xcorr_forward
    with pytest.raises((RuntimeError, ValueError), match="same shape"):
        fwd(torch.randn(3, 4), torch.randn(3, 5), 0)
    with pytest.raises((RuntimeError, ValueError), match="path"):
        fwd(torch.randn(3, 4), torch.randn(3, 4), 7)
    with pytest.raises((RuntimeError, TypeError), match="dtype|float32"):
        fwd(torch.randn(3, 4), torch.randn(3, 4).half(), 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_xcorr_nonfinite_propagates(backend, path):
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    a[1, 2] = float("nan")
    off, diag = fam.xcorr(backend, a, b, path=path)
    assert not torch.isfinite(off) and not torch.isfinite(diag[2])


def _standardized(x):
    x = x - x.mean(0)
    return x / x.std(0, unbiased=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_xcorr_cancellation_near_identity(backend, path):
    """D = 8192, N = 64, b = a + small noise (standardized columns): the diagonal carries the
    largest entries of C; offdiag = |C|^2 - sum C_dd^2 must still match float64 to 1e-5."""
    if backend in ("triton", "cuda") and path == 2 and not torch.cuda.is_available():
        # 16k programs of the tiled forward take minutes in the interpreter (or the CUDA
        # emulator, CONTRASTIVE_KERNELS_CUDA_EMULATE=1); the tiled path has no
        # |C|^2 - sum C_dd^2 subtraction (it sums the off-diagonal squares directly), and its
        # near-identity case runs below at a size the interpreter can do.
        n, d = 64, 512
    else:
        n, d = 64, 8192
    a = _standardized(torch.randn(n, d, dtype=torch.float64))
    b = _standardized(a + 1e-3 * torch.randn(n, d, dtype=torch.float64))
    a32, b32 = a.float(), b.float()
    off, diag = fam.xcorr(backend, a32, b32, path=path)
    roff, rdiag = reference.xcorr_family(a32.double(), b32.double())
    assert rel_err(off, roff) <= 1e-5, rel_err(off, roff)
    assert rel_err(diag, rdiag) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_xcorr_gram_path_guards_strong_cancellation(backend):
    """N >= D with orthogonal columns: C = a^T b is nearly N I, so |C|^2 exceeds offdiag by ~1e8.
    The Gram path (forced) computes its Gram matrices in float64 and still gets offdiag right."""
    n, d = 256, 16
    q, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64))
    a = (q * n ** 0.5).float()
    b = (a.double() + 1e-3 * torch.randn(n, d, dtype=torch.float64)).float()
    off, _ = fam.xcorr(backend, a, b, path=1)
    roff, rdiag = reference.xcorr_family(a.double(), b.double())
    assert (rdiag.pow(2).sum() / roff).item() > 1e6  # the case really cancels
    assert rel_err(off, roff) <= 1e-5, rel_err(off, roff)


def test_xcorr_deterministic():
    backend = "cpu"
    a, b = torch.randn(129, 257), torch.randn(129, 257)
    for path in (1, 2):
        r1 = fam.xcorr(backend, a, b, path=path)
        r2 = fam.xcorr(backend, a, b, path=path)
        assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
