"""The pairwise sigmoid family (SigLIP and per-pair softplus sums) on every fused backend
against `reference.pairwise_family` in float64: forward and every gradient, every mode
bit combination, labels / no labels, diagonal offsets, row offsets, odd and rectangular
sizes, dtypes, extreme logits and need_* subsets.

Triton runs under TRITON_INTERPRET=1 on CPU (marker `triton`), on fewer shapes."""
from __future__ import annotations

import itertools

import pytest
import torch

from contrastive_kernels import _families as fam
from contrastive_kernels.backends import FAMILY_REFERENCE
from helpers import _suffix, DTYPES, TOL, backend_params, rel_err, skip_interpreter_bf16

BACKENDS = backend_params("pairwise")
NAMES = ("q", "k", "scale", "bias", "row_offset")


def _inputs(n, m, d, dtype=torch.float32, *, labels=False, n_classes=3, scale=3.0, bias=-2.0, offset=True,
            normalize=False, aligned=False):
    q = torch.randn(n, d)
    k = torch.randn(m, d)
    if aligned:  # k_i close to q_i, as after training: positive logits large, negative ones small
        r = min(n, m)
        k[:r] = q[:r] + 0.3 * k[:r]
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        k = torch.nn.functional.normalize(k, dim=1)
    q, k = q.to(dtype), k.to(dtype)
    s = torch.tensor(float(scale))
    b = torch.tensor(float(bias))
    ro = torch.randn(n) if offset else None
    ql = torch.randint(0, n_classes, (n,)) if labels else None
    kl = torch.randint(0, n_classes, (m,)) if labels else None
    return q, k, s, b, ro, ql, kl


def _run(backend, q, k, s, b, ro, ql, kl, diag_offset, mode, weights, wrt=NAMES, total=False):
    """Row sums and the gradients of sum(weights * rows) for the inputs named in `wrt`.
    With `total`, `weights` is one scalar c: the result is fam.pairwise_total (the fused
    forward-and-gradient op when a gradient is wanted) and the gradients those of c * total."""
    dt = torch.float64 if backend == FAMILY_REFERENCE else None
    leaves = {}
    for name, t in zip(NAMES, (q, k, s, b, ro)):
        if t is None:
            leaves[name] = None
            continue
        t = t.detach().to(dt) if dt is not None else t.detach().clone()
        leaves[name] = t.requires_grad_(name in wrt)
    fn = fam.pairwise_total if total else fam.pairwise
    out = fn(backend, leaves["q"], leaves["k"], leaves["scale"], leaves["bias"], row_offset=leaves["row_offset"],
             q_labels=ql, k_labels=kl, diag_offset=diag_offset, mode=mode)
    need = [n for n in wrt if leaves[n] is not None]
    grads = torch.autograd.grad((out * weights.to(out.dtype)).sum(), [leaves[n] for n in need]) if need else ()
    return out, dict(zip(need, grads))


def _check(backend, q, k, s, b, ro, ql, kl, diag_offset, mode, *, weights=None, tol=None, wrt=NAMES, total=False):
    n = q.shape[0]
    # Positive row weights: signed weights make the scalar gradients sums with cancellation,
    # whose relative error says nothing about the kernel (float32 torch misses too).
    # The fused total takes one scalar weight (its upstream gradient).
    if weights is None:
        weights = torch.rand(()) + 0.5 if total else torch.rand(n) + 0.5
    w = weights
    rows, grads = _run(backend, q, k, s, b, ro, ql, kl, diag_offset, mode, w, wrt, total)
    ref_rows, ref_grads = _run(FAMILY_REFERENCE, q, k, s, b, ro, ql, kl, diag_offset, mode, w, wrt, total)
    tol = TOL[q.dtype] if tol is None else tol
    what = (f"{backend} n={n} m={k.shape[0]} d={q.shape[1]} mode={mode} labels={ql is not None} off={diag_offset}"
            f"{' total' if total else ''}")
    assert rows.dtype == torch.float32 and rows.shape == (() if total else (n,))
    assert torch.isfinite(rows).all(), what
    err = rel_err(rows, ref_rows)
    assert err <= tol, f"{what}: rows relative error {err:.3e}"
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        src = {"q": q, "k": k}.get(name)
        if src is not None:
            assert g.dtype == src.dtype, f"{what}: d{name} dtype {g.dtype}"
        assert torch.isfinite(g).all(), f"{what}: d{name} not finite"
        err = rel_err(g, ref_grads[name])
        assert err <= tol, f"{what}: d{name} relative error {err:.3e}"
    return rows, grads


# ------------------------------------------------------------------- mode bits
@pytest.mark.parametrize("labels", [False, True], ids=["diag", "labels"])
@pytest.mark.parametrize("mode", range(8))
@pytest.mark.parametrize("backend", BACKENDS)
def test_modes(backend, mode, labels):
    # (300, 300, 8, 1): the diagonal of a full 256-row tile's last row is the next column
    # tile's first column (the C++ "positives only" tile skip at its edge)
    shapes = [(7, 9, 3, 1), (33, 20, 16, -2)] if backend == "triton" else \
        [(7, 7, 3, 0), (129, 300, 64, 2), (300, 129, 129, -1), (300, 300, 8, 1)]
    for n, m, d, off in shapes:
        q, k, s, b, ro, ql, kl = _inputs(n, m, d, labels=labels)
        _check(backend, q, k, s, b, ro, ql, kl, off, mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_nothing_kept_is_zero(backend):
    # negative_only | positives_only keeps no pair: zero rows and exactly zero gradients.
    q, k, s, b, ro, _, _ = _inputs(9, 5, 4)
    rows, grads = _run(backend, q, k, s, b, ro, None, None, 0, 3, torch.ones(9))
    assert torch.equal(rows, torch.zeros(9))
    for g in grads.values():
        assert torch.count_nonzero(g) == 0


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize("d", [1, 3, 64, 129])
@pytest.mark.parametrize("n", [1, 7, 129, 300])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sizes(backend, n, d):
    # SigLIP as trained: unit rows, logit scale 10, bias -10 (open_clip's initial values).
    # Not raw randn rows with scale 3: at n = 1, d = 129 the only term is softplus(-x) with
    # x ~ 3 sqrt(d) ~ 34, an e^-34 tail whose relative error is |x| times the float32
    # rounding of the dot product -- every float32 backend (the C++ one included: 6 of 300
    # seeds above 1e-5, one underflowing to 0) misses 1e-5 there on some seeds.  Large
    # logits have their own test (test_extreme_logits).
    q, k, s, b, ro, ql, kl = _inputs(n, n, d, offset=False, normalize=True, scale=10.0, bias=-10.0)
    _check(backend, q, k, s, b, None, None, None, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectangular(backend):
    shapes = [(5, 77, 16), (77, 5, 3), (1, 40, 7)] if backend == "triton" else \
        [(5, 300, 64), (300, 5, 3), (129, 1, 7), (1, 300, 129), (257, 513, 33)]
    for (n, m, d), mode, off in itertools.product(shapes, (0, 1, 4), (0, 3, -2)):
        q, k, s, b, ro, ql, kl = _inputs(n, m, d)
        _check(backend, q, k, s, b, ro, None, None, off, mode)
    # A diagonal entirely outside the matrix: every pair is negative.
    q, k, s, b, ro, _, _ = _inputs(6, 4, 5)
    rows, _ = _check(backend, q, k, s, b, ro, None, None, 10, 0)
    neg, _ = _check(backend, q, k, s, b, ro, None, None, 0, 1)
    assert rel_err(rows, neg) <= 1e-6


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bfloat16 Triton needs a GPU (the interpreter computes bf16 tl.dot wrongly, STYLE.md)")
    shapes = [(7, 9, 3), (40, 33, 64)] if backend == "triton" else [(7, 9, 3), (129, 300, 64), (300, 129, 129)]
    for (n, m, d), labels in itertools.product(shapes, (False, True)):
        q, k, s, b, ro, ql, kl = _inputs(n, m, d, dtype, labels=labels, normalize=True, scale=10.0, bias=-5.0)
        _check(backend, q, k, s, b, ro, ql, kl, 0, 0)
        _check(backend, q, k, s, b, ro, ql, kl, 1, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_tiny_upstream_gradient(backend, dtype):
    """SigLIP's mean over a large batch without loss scaling: upstream 2^-14 per row and
    sigmoids ~5e-4 (rows clustered around one direction, scale 30, bias -35), so dS =
    g sigmoid(x) ~3e-8 is below half of float16's smallest subnormal while dq, dk (sums
    of M such terms times near-parallel rows) are normal.  The kernels scale dS by a
    power of two before rounding it for the dS @ rows products."""
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bfloat16 Triton needs a GPU (the interpreter computes bf16 tl.dot wrongly, STYLE.md)")
    n, m, d = 129, 1000, 64
    u = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
    rows = lambda r: torch.nn.functional.normalize(u + 0.3 * torch.randn(r, d) / d ** 0.5, dim=1).to(dtype)  # noqa: E731
    q, k = rows(n), rows(m)
    s, b = torch.tensor(30.0), torch.tensor(-35.0)
    w = 2.0 ** -14 * (1 + 0.1 * torch.rand(n))
    _, ref = _run(FAMILY_REFERENCE, q, k, s, b, None, None, None, 0, 1, w, ("q", "k"))
    assert ref["q"].abs().max() > 2 ** -14 and ref["k"].abs().max() > 2 ** -14  # normal float16 gradients
    _check(backend, q, k, s, b, None, None, None, 0, 1, weights=w, wrt=("q", "k"))


# ------------------------------------------------------------------ extreme logits
@pytest.mark.parametrize("bias", [50.0, -50.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, bias):
    """scale 100, bias +-50: logits up to +-150 in both signs; softplus stays exact (no
    overflow of exp, no log(1 + tiny) rounding to 0, no inf/NaN).  Pairs are aligned as
    after training (positives large, negatives small): with random pairs the bias
    gradient is a sum of +-0.5 terms that cancels to ~0.1, ill-conditioned in float32
    for torch itself."""
    dtypes = (torch.float32, torch.float16)
    for dtype, mode in itertools.product(dtypes, (0, 1, 2, 5)):
        q, k, s, b, ro, _, _ = _inputs(37, 29, 16, dtype, normalize=True, scale=100.0, bias=bias, aligned=True)
        x = s * (q.double() @ k.double().T) + b + ro[:, None]
        assert x.abs().max() > 90  # the large logits are really there
        if mode == 2 and bias > 0:
            # Only positive pairs at x ~ 150: softplus(-x) ~ e^-150 is below float32's range.
            rows, grads = _run(backend, q, k, s, b, ro, None, None, 0, mode, torch.ones(37))
            assert (rows.abs() < 1e-37).all()
            for name, g in grads.items():
                assert torch.isfinite(g).all() and g.double().abs().max() < 1e-30, (name, g.abs().max())
            continue
        # fp16 dq / dk of ~1e-20 (positive pairs only, x ~ 46) are below float16's range.
        wrt = ("scale", "bias", "row_offset") if mode == 2 and dtype == torch.float16 else NAMES
        _check(backend, q, k, s, b, ro, None, None, 0, mode, wrt=wrt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_tails(backend):
    """Single pairs with chosen logits: softplus(x) for x from -120 to 120, exact to float32."""
    xs = torch.tensor([-120.0, -90.0, -60.0, -20.0, -1e-3, 0.0, 1e-6, 0.7, 15.0, 30.0, 87.0, 95.0, 120.0])
    q = xs[:, None].clone()
    k = torch.ones(1, 1)
    s, b = torch.tensor(1.0), torch.tensor(0.0)
    for mode in (1, 2):  # every pair negative: softplus(x); the single positive pair: softplus(-x)
        rows = fam.pairwise(backend, q, k, s, b, diag_offset=0, mode=1) if mode == 1 else torch.stack(
            [fam.pairwise(backend, q[i:i + 1], k, s, b, mode=2)[0] for i in range(len(xs))])
        exact = torch.nn.functional.softplus(xs.double() if mode == 1 else -xs.double(), threshold=1000)
        assert torch.isfinite(rows).all()
        small = exact < 1e-37  # below float32's normal range the value is flushed
        assert (rows[small].abs() <= 1e-37).all()
        rel = ((rows.double() - exact).abs() / exact)[~small]
        assert rel.max().item() <= 1e-6, (mode, rel)


# ------------------------------------------------------------------ need_* flags
def _backward_op(backend):
    name = "pairwise_backward" + _suffix(backend)
    return getattr(torch.ops.contrastive_kernels, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_need_subsets(backend):
    n, m, d = (9, 7, 5) if backend == "triton" else (129, 70, 33)
    q, k, s, b, ro, ql, kl = _inputs(n, m, d, labels=True)
    g = torch.rand(n) + 0.5
    op = _backward_op(backend)
    full = op(g, q, k, s, b, ro, ql, kl, 1, 4, True, True, True, True, True)
    ref = _run(FAMILY_REFERENCE, q, k, s, b, ro, ql, kl, 1, 4, g)[1]
    for name, got in zip(NAMES, full):
        assert rel_err(got, ref[name]) <= 1e-5, name
    for flags in itertools.product((False, True), repeat=5):
        out = op(g, q, k, s, b, ro, ql, kl, 1, 4, *flags)
        for name, flag, got, want in zip(NAMES, flags, out, full):
            if flag:
                # The CPU kernel computes dk by another pass when only dk is wanted: same values
                # up to the summation order.
                assert got.shape == want.shape, (flags, name)
                assert rel_err(got, want) <= 1e-6, (flags, name)
            else:
                assert got.numel() == 0, (flags, name)


@pytest.mark.parametrize("total", [False, True], ids=["rows", "total"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_only_requested(backend, total):
    q, k, s, b, ro, ql, kl = _inputs(7, 6, 4)
    for wrt in (("q",), ("k",), ("scale", "bias"), ("row_offset",), ("k", "row_offset")):
        _check(backend, q, k, s, b, ro, ql, kl, 0, 0, wrt=wrt, total=total)


# ------------------------------------------------------------------ properties
_SPLIT_ENV = {"cuda": "CONTRASTIVE_KERNELS_CUDA_COL_SPLITS", "triton": "CONTRASTIVE_KERNELS_TRITON_COL_SPLITS"}


@pytest.mark.parametrize("splits", ["2", "3", "4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in _SPLIT_ENV] or [
    pytest.param("cuda", marks=pytest.mark.skip(reason="no cuda or triton backend here"))])
def test_column_splits(backend, splits, dtype, monkeypatch):
    """The column splits of the CUDA kernels (csrc/cuda/family_tiles.cuh, plan_pass) and the Triton
    ones (kernels/_common.py, col_splits), forced by CONTRASTIVE_KERNELS_{CUDA,TRITON}_COL_SPLITS:
    the forward's row sums, the backward's per-row sums, dq, dscale and dbias partials, the column
    pass's dk (Triton: split over the rows) merged in split order, every mode (M = 200: 4 column
    tiles of 64 on CUDA, 7 of 32 under the Triton interpreter), and the fused pass at D = 300."""
    skip_interpreter_bf16(backend, dtype)
    monkeypatch.setenv(_SPLIT_ENV[backend], splits)
    for mode in range(8):
        q, k, s, b, ro, ql, kl = _inputs(70, 200, 40, dtype, labels=mode % 2 == 1, normalize=True, scale=10.0,
                                         bias=-10.0)
        _check(backend, q, k, s, b, ro, ql, kl, 1, mode)
    q, k, s, b, ro, ql, kl = _inputs(200, 200, 300, dtype, normalize=True, scale=10.0, bias=-10.0)
    _check(backend, q, k, s, b, ro, ql, kl, 0, 0, total=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    n, m, d = (40, 33, 16) if backend == "triton" else (600, 530, 40)
    q, k, s, b, ro, ql, kl = _inputs(n, m, d)
    g = torch.randn(n)
    op = _backward_op(backend)
    first = op(g, q, k, s, b, ro, None, None, 0, 0, True, True, True, True, True)
    for _ in range(2):
        again = op(g, q, k, s, b, ro, None, None, 0, 0, True, True, True, True, True)
        for x, y in zip(first, again):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_propagates(backend):
    q, k, s, b, _, _, _ = _inputs(5, 6, 3)
    q[2, 1] = float("nan")
    rows = fam.pairwise(backend, q, k, s, b)
    assert torch.isnan(rows[2])
    assert torch.isfinite(rows[[0, 1, 3, 4]]).all()
    q[2, 1] = float("inf")
    assert not torch.isfinite(fam.pairwise(backend, q, k, s, b)[2])
    # Every logit of row 2 infinite with the sign that makes its term's limit 0 (+inf at the
    # positive, -inf at the negatives): still not finite.
    k[:, 1] = -1.0
    k[2, 1] = 1.0
    rows = fam.pairwise(backend, q, k, s.abs(), b)
    assert torch.isnan(rows[2]), f"{backend}: softplus(-inf) terms gave {rows[2]}"
    assert torch.isfinite(rows[[0, 1, 3, 4]]).all()


# ------------------------------------------------------------------ CPU specifics
def _cpu_only(backend):
    if backend != "cpu":
        pytest.skip("C++ CPU kernel detail")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] == "cpu"])
@pytest.mark.parametrize("total", [False, True], ids=["rows", "total"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("partial_bytes", ["0", ""], ids=["column-pass", "fused"])
def test_cpu_dk_paths(backend, threads, partial_bytes, total, monkeypatch):
    """dk by per-thread partial buffers (fused row pass) and by the column pass agree with
    the reference, for the backward and the one-pass total; the fused path is chosen while
    the partials fit the byte budget."""
    monkeypatch.setenv("CONTRASTIVE_KERNELS_PAIRWISE_PARTIAL_BYTES", partial_bytes)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for labels, mode in ((False, 0), (True, 6)):
            q, k, s, b, ro, ql, kl = _inputs(700, 530, 40, labels=labels)
            _check(backend, q, k, s, b, ro, ql, kl, 3, mode, total=total)
            _check(backend, q, k, s, b, ro, ql, kl, 3, mode, total=total, wrt=("k",))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] == "cpu"])
def test_cpu_argument_checks(backend):
    op = torch.ops.contrastive_kernels.pairwise_forward
    q, k, s, b, ro, ql, kl = _inputs(4, 5, 3, labels=True)
    with pytest.raises(RuntimeError, match="q must be 2-D"):
        op(q[0], k, s, b, None, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="same D"):
        op(q, k[:, :2], s, b, None, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(q, k.double(), s, b, None, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(q.double(), k.double(), s, b, None, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="scale"):
        op(q, k, torch.ones(2), b, None, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="row_offset"):
        op(q, k, s, b, torch.zeros(3), None, None, 0, 0)
    with pytest.raises(RuntimeError, match="together"):
        op(q, k, s, b, None, ql, None, 0, 0)
    with pytest.raises(RuntimeError, match="k_labels"):
        op(q, k, s, b, None, ql, kl[:3], 0, 0)
    with pytest.raises(RuntimeError, match="q_labels"):
        op(q, k, s, b, None, ql.int(), kl, 0, 0)
    with pytest.raises(RuntimeError, match="mode"):
        op(q, k, s, b, None, None, None, 0, 8)
    with pytest.raises(RuntimeError, match="grad_row"):
        torch.ops.contrastive_kernels.pairwise_backward(torch.ones(3), q, k, s, b, None, None, None, 0, 0,
                                                        True, True, True, True, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    fwd = "pairwise_forward" + _suffix(backend)
    op = getattr(torch.ops.contrastive_kernels, fwd)
    q, k, s, b, ro, ql, kl = _inputs(6, 5, 4, labels=True)
    q.requires_grad_()
    k.requires_grad_()
    ro.requires_grad_()
    torch.library.opcheck(op, (q, k, s, b, ro, ql, kl, 1, 4))
    torch.library.opcheck(op, (q, k, s, b, None, None, None, 0, 0))


# ------------------------------------------------------------------ fused total
# fam.pairwise_total: the total of the row sums; with a gradient wanted, the one-pass
# pairwise_fused op computes the total and its unit-upstream gradients in the forward
# and the backward scales them.  Same contract, checked the same way.
FUSED_BACKENDS = [b for b in BACKENDS if b.values[0] in fam._FUSED_BACKENDS]


def _fused_op(backend):
    name = "pairwise_fused" + _suffix(backend)
    return getattr(torch.ops.contrastive_kernels, name)


@pytest.mark.parametrize("labels", [False, True], ids=["diag", "labels"])
@pytest.mark.parametrize("mode", range(8))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_total_modes(backend, mode, labels):
    shapes = [(7, 9, 3, 1), (33, 20, 16, -2)] if backend == "triton" else \
        [(1, 1, 1, 0), (7, 7, 3, 0), (129, 300, 64, 2), (300, 129, 129, -1)]
    for n, m, d, off in shapes:
        q, k, s, b, ro, ql, kl = _inputs(n, m, d, labels=labels)
        _check(backend, q, k, s, b, ro, ql, kl, off, mode, total=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_total_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bfloat16 Triton needs a GPU (the interpreter computes bf16 tl.dot wrongly, STYLE.md)")
    shapes = [(7, 9, 3), (40, 33, 64)] if backend == "triton" else [(7, 9, 3), (257, 513, 33), (300, 129, 129)]
    for (n, m, d), labels in itertools.product(shapes, (False, True)):
        q, k, s, b, ro, ql, kl = _inputs(n, m, d, dtype, labels=labels, normalize=True, scale=10.0, bias=-5.0)
        for off, mode in ((0, 0), (1, 5), (0, 1)):
            _, grads = _check(backend, q, k, s, b, ro, ql, kl, off, mode, total=True)
            assert grads["q"].dtype == dtype and grads["k"].dtype == dtype


@pytest.mark.parametrize("bias", [50.0, -50.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_total_extreme_logits(backend, bias):
    for mode in (0, 1, 5):
        q, k, s, b, ro, _, _ = _inputs(37, 29, 16, normalize=True, scale=100.0, bias=bias, aligned=True)
        _check(backend, q, k, s, b, ro, None, None, 0, mode, total=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_total_without_grad_is_the_same_total(backend):
    """No input needs a gradient (or grad mode is off): the forward op and a sum; the same
    total as the fused op's to float32 rounding."""
    q, k, s, b, ro, ql, kl = _inputs(70, 45, 16, labels=True)
    plain = fam.pairwise_total(backend, q, k, s, b, row_offset=ro, q_labels=ql, k_labels=kl, mode=4)
    with torch.no_grad():
        nograd = fam.pairwise_total(backend, q, k, s, b.requires_grad_(), row_offset=ro, q_labels=ql, k_labels=kl,
                                    mode=4)
    fused = fam.pairwise_total(backend, q, k, s, b, row_offset=ro, q_labels=ql, k_labels=kl, mode=4)
    assert fused.requires_grad and not plain.requires_grad and not nograd.requires_grad
    assert rel_err(plain, fused) <= 1e-6 and torch.equal(plain, nograd)
    ref = fam.pairwise_total(FAMILY_REFERENCE, q.double(), k.double(), s.double(), b.detach().double(),
                             row_offset=ro.double(), q_labels=ql, k_labels=kl, mode=4)
    assert rel_err(fused, ref) <= 1e-6


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_need_subsets(backend):
    n, m, d = (9, 7, 5) if backend == "triton" else (129, 70, 33)
    q, k, s, b, ro, ql, kl = _inputs(n, m, d, labels=True)
    op = _fused_op(backend)
    full = op(q, k, s, b, ro, ql, kl, 1, 4, True, True, True, True, True)
    ref_total, ref = _run(FAMILY_REFERENCE, q, k, s, b, ro, ql, kl, 1, 4, torch.tensor(1.0), total=True)
    assert full[0].shape == () and rel_err(full[0], ref_total) <= 1e-6
    for name, got in zip(NAMES, full[1:]):
        assert got.dtype == torch.float32, name  # unit-upstream gradients stay float32
        assert rel_err(got, ref[name]) <= 1e-5, name
    for flags in itertools.product((False, True), repeat=5):
        out = op(q, k, s, b, ro, ql, kl, 1, 4, *flags)
        assert torch.equal(out[0], full[0]) or rel_err(out[0], full[0]) <= 1e-7, flags
        for name, flag, got, want in zip(NAMES, flags, out[1:], full[1:]):
            if flag:
                assert got.shape == want.shape and rel_err(got, want) <= 1e-6, (flags, name)
            else:
                assert got.numel() == 0, (flags, name)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_flag_mismatch_is_an_error(backend):
    """Calling the op directly with need_q false for a q that needs a gradient would give
    a wrong (missing) gradient: the backward refuses, naming the input."""
    q, k, s, b, _, _, _ = _inputs(5, 4, 3)
    q.requires_grad_()
    total = _fused_op(backend)(q, k, s, b, None, None, None, 0, 0, False, False, False, False, False)[0]
    with pytest.raises(RuntimeError, match="input 0 needs a gradient"):
        total.backward()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_deterministic(backend):
    n, m, d = (40, 33, 16) if backend == "triton" else (600, 530, 40)
    q, k, s, b, ro, _, _ = _inputs(n, m, d)
    op = _fused_op(backend)
    first = op(q, k, s, b, ro, None, None, 0, 0, True, True, True, True, True)
    again = op(q, k, s, b, ro, None, None, 0, 0, True, True, True, True, True)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_opcheck(backend):
    q, k, s, b, ro, ql, kl = _inputs(6, 5, 4, labels=True)
    for t in (q, k, s, b, ro):
        t.requires_grad_()
    op = _fused_op(backend)
    torch.library.opcheck(op, (q, k, s, b, ro, ql, kl, 1, 4, True, True, True, True, True))
    torch.library.opcheck(op, (q, k, s.detach(), b, None, None, None, 0, 0, True, True, False, True, False))
