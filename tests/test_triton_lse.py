"""Triton kernels of the log-sum-exp family and of the fused normalized similarity,
against the float64 family references (forward and every gradient).

Runs on CUDA when present, and on CPU under TRITON_INTERPRET=1 (how CI checks the
Triton kernels); without either the tests skip.  Half-precision inputs are compared
with the float64 reference of the same rounded inputs (SPEC.md tolerances).
"""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import _families as fam
from contrastive_kernels import backends
from contrastive_kernels.reference import LSE_NORM, MASK_DIAG, MASK_POS, MASK_SAME_LABEL

from helpers import TOL, assert_two_scales_close, rel_err, two_scale_case, two_scales_run

REF = backends.FAMILY_REFERENCE


def _device():
    if torch.cuda.is_available():
        return "cuda"
    if backends.triton_interpret():
        return "cpu"
    return None


DEV = _device()
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(DEV is None, reason="Triton needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors)"),
]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _check(out, ref, dtype, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values {out}"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype})"


def _problem(n, m, d, dtype, *, mask_mode=0, diag_offset=0, rscale=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(dtype).to(DEV)
    k = torch.randn(m, d, generator=g).to(dtype).to(DEV)
    p = dict(q=q, k=k, scale=torch.tensor(2.5, device=DEV), diag_offset=diag_offset, mask_mode=mask_mode)
    p["q_rscale"] = q.float().norm(dim=1).clamp_min(1e-12).reciprocal() if rscale else None
    p["k_rscale"] = k.float().norm(dim=1).clamp_min(1e-12).reciprocal() if rscale else None
    p["col_bias"] = (0.5 * torch.randn(m, generator=g)).to(DEV) if bias else None
    p["pos_index"] = torch.randint(0, m, (n,), generator=g).to(DEV) if mask_mode & MASK_POS else None
    if mask_mode & MASK_SAME_LABEL:
        p["q_labels"] = torch.randint(0, 3, (n,), generator=g).to(DEV)
        p["k_labels"] = torch.randint(0, 3, (m,), generator=g).to(DEV)
    else:
        p["q_labels"] = p["k_labels"] = None
    return p


_GRAD_NAMES = ("q", "k", "scale", "q_rscale", "k_rscale", "col_bias")


def _run(backend, p, compute_col, wants, dtype=None, seed=1):
    """(row_lse, col_lse, {name: grad}) of a fixed random linear functional of the LSEs.

    The reference runs in float64 on the same (rounded) inputs.  Rows / columns whose LSE
    is -inf get weight 0 (they have no kept pair, hence no gradient)."""
    leaves = {}
    args = {}
    for name in _GRAD_NAMES:
        t = p[name]
        if t is None:
            args[name] = None
            continue
        t = t.detach().to(dtype) if dtype is not None and (name in ("q", "k") or t.is_floating_point()) else t
        if name in wants:
            t = t.clone().requires_grad_(True)
            leaves[name] = t
        args[name] = t
    row, col = fam.lse(backend, args["q"], args["k"], args["scale"], q_rscale=args["q_rscale"],
                       k_rscale=args["k_rscale"], col_bias=args["col_bias"], pos_index=p["pos_index"],
                       q_labels=p["q_labels"], k_labels=p["k_labels"], diag_offset=p["diag_offset"],
                       mask_mode=p["mask_mode"], compute_col=compute_col)
    grads = {}
    if leaves:
        g = torch.Generator().manual_seed(seed)
        wr = torch.randn(row.shape[0], generator=g).to(row)
        loss = torch.where(torch.isfinite(row), row, torch.zeros_like(row)).mul(wr).sum()
        if compute_col:
            wc = torch.randn(col.shape[0], generator=g).to(col)
            loss = loss + torch.where(torch.isfinite(col), col, torch.zeros_like(col)).mul(wc).sum()
        names = list(leaves)
        grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    return row.detach(), col.detach(), grads


def _compare(p, compute_col, dtype, wants=_GRAD_NAMES, what=""):
    wants = tuple(w for w in wants if p[w] is not None)
    row, col, grads = _run("triton", p, compute_col, wants)
    rrow, rcol, rgrads = _run(REF, p, compute_col, wants, dtype=torch.float64)
    assert row.dtype == torch.float32 and col.dtype == torch.float32
    _check_lse(row, rrow, dtype, f"{what} row_lse")
    if compute_col:
        _check_lse(col, rcol, dtype, f"{what} col_lse")
    else:
        assert col.numel() == 0
    for name in wants:
        gt, gr = grads[name], rgrads[name]
        assert gt.dtype == p[name].dtype, f"{what} d{name}: dtype {gt.dtype} != {p[name].dtype}"
        _check(gt, gr, dtype, f"{what} d{name}")
    return grads


def _check_lse(out, ref, dtype, what):
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), f"{what}: finite pattern differs\n{out}\n{ref}"
    assert (out[~fin] == float("-inf")).all(), f"{what}: empty rows must be -inf"
    if fin.any():
        _check(out[fin], ref[fin], dtype, what)


# ------------------------------------------------------------------------- LSE
MASK_CASES = [
    pytest.param(0, 0, id="nomask"),
    pytest.param(MASK_DIAG, 0, id="diag0"),
    pytest.param(MASK_DIAG, 33, id="diagN"),
    pytest.param(MASK_DIAG, -5, id="diag-5"),
    pytest.param(MASK_POS, 0, id="pos"),
    pytest.param(MASK_SAME_LABEL, 0, id="label"),
    pytest.param(MASK_DIAG | MASK_POS | MASK_SAME_LABEL, 2, id="all"),
]


@pytest.mark.parametrize("compute_col", [False, True], ids=["row", "rowcol"])
@pytest.mark.parametrize("mask_mode,diag_offset", MASK_CASES)
def test_lse_masks(mask_mode, diag_offset, compute_col):
    p = _problem(33, 40, 64, F32, mask_mode=mask_mode, diag_offset=diag_offset)
    _compare(p, compute_col, F32, what=f"mask {mask_mode}/{diag_offset}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 7, 3), (1, 7, 129), (7, 129, 1), (33, 33, 64), (129, 33, 3),
                                   (129, 129, 129)])
def test_lse_sizes_dtypes(n, m, d, dtype):
    # Diagonal mask with offset 0: the 1 x 1 problem has nothing kept at all.
    p = _problem(n, m, d, dtype, mask_mode=MASK_DIAG)
    _compare(p, True, dtype, what=f"{n}x{m}x{d}")


@pytest.mark.parametrize("rscale", [False, True], ids=["raw", "rscale"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_lse_optional_inputs(rscale, bias, dtype):
    p = _problem(40, 33, 129, dtype, mask_mode=MASK_POS, rscale=rscale, bias=bias)
    _compare(p, True, dtype, what=f"rscale={rscale} bias={bias}")


@pytest.mark.parametrize("empty", ["rows", "cols"])
def test_lse_fully_masked(empty):
    """Rows (or columns) with no kept pair: LSE -inf, exactly zero gradient, no NaN; the other
    rows / columns equal the reference computed without them."""
    n, m, d = 33, 37, 16
    p = _problem(n, m, d, F32, mask_mode=MASK_SAME_LABEL)
    g = torch.Generator().manual_seed(5)
    if empty == "rows":  # every key has label 5: queries labelled 5 keep nothing
        p["k_labels"] = torch.full((m,), 5, device=DEV)
        p["q_labels"] = torch.randint(5, 7, (n,), generator=g).to(DEV)
        dead = p["q_labels"] == 5
    else:
        p["q_labels"] = torch.full((n,), 5, device=DEV)
        p["k_labels"] = torch.randint(5, 7, (m,), generator=g).to(DEV)
        dead = p["k_labels"] == 5
    assert 0 < dead.sum() < dead.numel()
    row, col, grads = _run("triton", p, True, _GRAD_NAMES)
    lse, side = (row, "q") if empty == "rows" else (col, "k")
    assert (lse[dead] == float("-inf")).all() and torch.isfinite(lse[~dead]).all()
    for name, gr in grads.items():
        assert torch.isfinite(gr).all(), f"d{name} has non-finite values"
    assert (grads[side][dead] == 0).all() and (grads[f"{side}_rscale"][dead] == 0).all()
    if empty == "cols":
        assert (grads["col_bias"][dead] == 0).all()
    # Reference on the live part only: the dead rows / columns contribute nothing.
    sub = dict(p)
    live = ~dead
    sub[side] = p[side][live]
    sub[f"{side}_rscale"] = p[f"{side}_rscale"][live]
    sub[f"{side}_labels"] = p[f"{side}_labels"][live]
    if empty == "cols":
        sub["col_bias"] = p["col_bias"][live]
    # The weights of the functional must follow the rows / columns: build them explicitly.
    wr = torch.randn(n, generator=g).to(DEV)
    wc = torch.randn(m, generator=g).to(DEV)

    def loss_of(backend, pp, keep_r, keep_c, dtype):
        leaves = {nm: pp[nm].detach().to(dtype).clone().requires_grad_(True) for nm in _GRAD_NAMES}
        r, c = fam.lse(backend, leaves["q"], leaves["k"], leaves["scale"], q_rscale=leaves["q_rscale"],
                       k_rscale=leaves["k_rscale"], col_bias=leaves["col_bias"], q_labels=pp["q_labels"],
                       k_labels=pp["k_labels"], mask_mode=MASK_SAME_LABEL, compute_col=True)
        fr = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
        fc = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        loss = (fr * wr[keep_r].to(dtype)).sum() + (fc * wc[keep_c].to(dtype)).sum()
        return dict(zip(_GRAD_NAMES, torch.autograd.grad(loss, [leaves[nm] for nm in _GRAD_NAMES])))

    all_r, all_c = torch.ones(n, dtype=torch.bool, device=DEV), torch.ones(m, dtype=torch.bool, device=DEV)
    got = loss_of("triton", p, all_r, all_c, torch.float32)
    keep_r, keep_c = (live, all_c) if empty == "rows" else (all_r, live)
    ref = loss_of(REF, sub, keep_r, keep_c, torch.float64)
    for name in _GRAD_NAMES:
        gt = got[name]
        if name in (side, f"{side}_rscale") or (empty == "cols" and name == "col_bias"):
            gt = gt[live]
        _check(gt, ref[name], F32, f"d{name}")


NEED_SUBSETS = [("q",), ("k",), ("scale",), ("col_bias",), ("q_rscale",), ("k_rscale",), ("q", "scale"),
                ("k", "col_bias", "k_rscale"), ("scale", "col_bias")]


@pytest.mark.parametrize("wants", NEED_SUBSETS, ids=["+".join(w) for w in NEED_SUBSETS])
@pytest.mark.parametrize("compute_col", [False, True], ids=["row", "rowcol"])
def test_lse_need_subsets(wants, compute_col):
    p = _problem(33, 20, 24, F32, mask_mode=MASK_DIAG, diag_offset=3)
    grads = _compare(p, compute_col, F32, wants=wants, what=f"needs {wants}")
    assert set(grads) == set(wants)


def test_lse_backward_op_returns_only_needed():
    p = _problem(9, 11, 5, F32, mask_mode=MASK_POS)
    row, col = fam.lse("triton", p["q"], p["k"], p["scale"], q_rscale=p["q_rscale"], k_rscale=p["k_rscale"],
                       col_bias=p["col_bias"], pos_index=p["pos_index"], mask_mode=MASK_POS, compute_col=True)
    op = torch.ops.contrastive_kernels.lse_backward_triton
    gr, gc = torch.ones_like(row), torch.ones_like(col)
    common = (p["q"], p["k"], p["scale"], p["q_rscale"], p["k_rscale"], p["col_bias"], p["pos_index"], None, None,
              0, MASK_POS, row, col, torch.empty(0, device=DEV))
    out = op(gr, gc, *common, False, False, False, False, False, False)
    assert all(t.numel() == 0 for t in out)
    dq, dk, ds, db, dqr, dkr = op(gr, gc, *common, True, False, True, False, False, True)
    assert dq.shape == p["q"].shape and ds.shape == () and dkr.shape == (11,)
    assert dk.numel() == 0 and db.numel() == 0 and dqr.numel() == 0


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("rscale", [True, False], ids=["normalized", "raw"])
def test_lse_scale_100(dtype, rscale):
    """Logit scale 100 (CLIP's maximum) in half precision: no overflow, reference accuracy."""
    p = _problem(40, 40, 32, dtype, rscale=rscale, bias=False)
    if not rscale:  # CLIP feeds unit vectors without rscale: logits up to 100
        p["q"] = torch.nn.functional.normalize(p["q"].float(), dim=1).to(dtype)
        p["k"] = torch.nn.functional.normalize(p["k"].float(), dim=1).to(dtype)
    p["scale"] = torch.tensor(100.0, device=DEV)
    _compare(p, True, dtype, what="scale 100")


def test_lse_no_nxm_in_kernel_args():
    """The Triton launchers allocate nothing of size N x M (checked by tracing torch allocations
    of the module: only (N,), (M,), (N, D), (M, D) and 0-dim tensors appear, and the fused
    forward's column states, (4, 1 + rows / 64, M) on a GPU for a launch of `rows` rows, within
    their 32 MB budget: past it the rows run in several launches)."""
    from contrastive_kernels.kernels import lse as klse
    n, m, d = 70, 90, 8
    p = _problem(n, m, d, F32, mask_mode=MASK_DIAG)
    seen = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def spy_empty(*a, **kw):
        t = real_empty(*a, **kw)
        seen.append(tuple(t.shape))
        return t

    def spy_like(x, *a, **kw):
        t = real_empty_like(x, *a, **kw)
        seen.append(tuple(t.shape))
        return t

    torch.empty, torch.empty_like = spy_empty, spy_like
    try:
        _run("triton", p, True, _GRAD_NAMES)
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
    assert seen, "the spy saw no allocation"
    slots = 1 + klse._cols_launch_rows(n, m) // klse._slot_rows()  # (slot 0: the running state)
    states = (4, slots, m)
    assert states in seen, f"the fused forward did not run: {seen}"
    assert slots < n and 16 * slots * m <= klse._COLS_BUDGET
    assert all(len(s) < 2 or s in ((n, d), (m, d), states) for s in seen), seen
    assert klse.AVAILABLE


# ----------------------------------------------------------------- similarity
def _sim_run(backend, a, b, scale, normalize, wants, gout, dtype):
    la = a.detach().to(dtype).clone().requires_grad_("a" in wants)
    lb = b.detach().to(dtype).clone().requires_grad_("b" in wants)
    ls = scale.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).clone()
    ls.requires_grad_("scale" in wants)
    out = fam.similarity(backend, la, lb, ls, normalize)
    leaves = [t for t, w in ((la, "a"), (lb, "b"), (ls, "scale")) if w in wants]
    grads = torch.autograd.grad((out.to(gout.dtype) * gout.to(out.dtype)).sum(), leaves) if leaves else ()
    return out.detach(), dict(zip([w for w in ("a", "b", "scale") if w in wants], grads))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("n,m,d", [(1, 7, 3), (7, 1, 64), (33, 129, 129), (129, 33, 64), (7, 7, 3)])
def test_similarity(n, m, d, dtype, normalize):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, d, generator=g).to(dtype).to(DEV)
    b = torch.randn(m, d, generator=g).to(dtype).to(DEV)
    if dtype == F32 and n > 3:
        a[2] = 0  # a zero row: F.normalize's clamp branch
    scale = torch.tensor(100.0 if dtype == F16 else 2.5, device=DEV)
    # The output gradient, rounded to the output dtype so both sides see the same values.
    gout = torch.randn(n, m, generator=g).to(dtype).to(DEV)
    wants = ("a", "b", "scale")
    out, grads = _sim_run("triton", a, b, scale, normalize, wants, gout, dtype)
    rout, rgrads = _sim_run(REF, a, b, scale, normalize, wants, gout.double(), torch.float64)
    assert out.dtype == dtype
    _check(out, rout, dtype, "similarity")
    for name in wants:
        _check(grads[name], rgrads[name], dtype, f"d{name}")
        assert grads[name].dtype == (dtype if name != "scale" else torch.float32)


@pytest.mark.parametrize("wants", [("a",), ("b",), ("scale",), ("a", "scale")], ids=lambda w: "+".join(w))
def test_similarity_need_subsets(wants):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(9, 20, generator=g).to(DEV), torch.randn(13, 20, generator=g).to(DEV)
    gout = torch.randn(9, 13, generator=g).to(DEV)
    scale = torch.tensor(0.7, device=DEV)
    _, grads = _sim_run("triton", a, b, scale, True, wants, gout, F32)
    _, rgrads = _sim_run(REF, a, b, scale, True, wants, gout.double(), torch.float64)
    assert set(grads) == set(wants)
    for name in wants:
        _check(grads[name], rgrads[name], F32, f"d{name}")
    op = torch.ops.contrastive_kernels.similarity_backward_triton
    da, db, ds = op(gout, a, b, scale, True, "a" in wants, "b" in wants, "scale" in wants)
    assert (da.numel() > 0) == ("a" in wants) and (db.numel() > 0) == ("b" in wants)
    assert (ds.numel() > 0) == ("scale" in wants)


def test_similarity_d1_normalized_gradient_is_zero():
    """D = 1: a_hat = sign(a), so the normalized similarity has zero gradient wrt a and b."""
    a, b = torch.randn(5, 1).to(DEV), torch.randn(6, 1).to(DEV)
    _, grads = _sim_run("triton", a, b, torch.tensor(3.0, device=DEV), True, ("a", "b"),
                        torch.randn(5, 6).to(DEV), F32)
    assert grads["a"].abs().max() < 1e-6 and grads["b"].abs().max() < 1e-6


# ------------------------------------------------------------------ end to end
def _loss_pair(fn, tensors, dtype=F32):
    outs = {}
    for be in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        loss = fn(leaves, be)
        outs[be] = (loss.detach(), torch.autograd.grad(loss, leaves))
    (lt, gt), (lr, gr) = outs["triton"], outs["reference"]
    _check(lt.reshape(1), lr.reshape(1), dtype, "loss")
    for i, (a, b) in enumerate(zip(gt, gr)):
        _check(a, b, dtype, f"grad {i}")


def test_end_to_end_losses():
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(19, 24, generator=g).to(DEV), torch.randn(19, 24, generator=g).to(DEV)
    ls = torch.tensor(14.0, device=DEV)
    _loss_pair(lambda t, be: ck.nt_xent(t[0], t[1], 0.5, backend=be), [z1, z2])
    _loss_pair(lambda t, be: ck.clip_loss(t[0], t[1], t[2], backend=be), [z1, z2, ls])
    _loss_pair(lambda t, be: ck.info_nce(t[0], t[1], temperature=t[2], symmetric=True, decoupled=True, backend=be),
               [z1, z2, torch.tensor(0.3, device=DEV)])
    labels = torch.randint(0, 4, (19,), generator=g).to(DEV)
    _loss_pair(lambda t, be: ck.supcon_loss(t[0], labels, 0.2, backend=be), [z1])
    _loss_pair(lambda t, be: ck.uniformity_loss(t[0], backend=be), [0.3 * z1])
    _loss_pair(lambda t, be: ck.normalized_similarity(t[0], t[1], 3.0, backend=be).pow(2).sum(), [z1, z2])


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_clip_peak_memory_cuda():
    """CLIP fwd+bwd at N = M = 16384 on the GPU: an N x M float32 buffer (1 GiB) never exists."""
    n, d = 16384, 256
    img = torch.randn(n, d, device="cuda", dtype=BF16, requires_grad=True)
    txt = torch.randn(n, d, device="cuda", dtype=BF16, requires_grad=True)
    ls = torch.tensor(30.0, device="cuda", requires_grad=True)
    ck.clip_loss(img, txt, ls, backend="triton").backward()  # warm-up (autotune, compile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ck.clip_loss(img, txt, ls, backend="triton").backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert growth < n * n * 4 // 16, f"peak growth {growth} bytes"


@pytest.mark.slow
@pytest.mark.skipif(DEV != "cpu", reason="CPU peak-RSS probe of the interpreter run (the CUDA test covers GPUs)")
def test_clip_peak_memory_interpreter():
    """CLIP fwd+bwd (row and column LSE, both backward kernels) at N = M = 2048 under the
    interpreter: peak RSS grows by far less than one N x M float32 matrix (16 MiB); the
    reference backend, which forms the matrix, grows by several."""
    from helpers import peak_rss_growth
    n = 2048
    setup = f"""
        import torch, contrastive_kernels as ck
        from contrastive_kernels.kernels import lse
        lse._INTERP_TILE.update(BLOCK_O=128, BLOCK_I=128)  # fewer interpreter steps; same kernels
        torch.manual_seed(0)
        img = torch.randn({n}, 8, requires_grad=True)
        txt = torch.randn({n}, 8, requires_grad=True)
        ls = torch.tensor(10.0, requires_grad=True)
        w = torch.randn(64, 8, requires_grad=True)
        ck.clip_loss(w, w, ls, backend=BE).backward()
        del w
        # Reset the high-water mark to the current RSS: the interpreter's start-up peaks above
        # the resident size, which would hide what the body allocates below that peak.
        open("/proc/self/clear_refs", "w").write("5")
    """
    body = "ck.clip_loss(img, txt, ls, backend=BE).backward()"
    env = {"TRITON_INTERPRET": "1"}
    nxm = n * n * 4
    tri = peak_rss_growth(setup.replace("BE", "'triton'"), body.replace("BE", "'triton'"), env=env)
    ref = peak_rss_growth(setup.replace("BE", "'reference'"), body.replace("BE", "'reference'"), env=env)
    assert ref["growth"] >= nxm, f"the probe did not see the reference's N x M matrices: {ref}"
    print("peak growth: triton", tri, "reference", ref)
    assert tri["growth"] < nxm // 4, f"Triton CLIP grew the peak RSS by {tri['growth']} bytes (N x M = {nxm})"


@pytest.mark.parametrize("smem_kib", [163, 227], ids=["A100", "H100"])
@pytest.mark.parametrize("d", [1, 64, 129, 512, 1000])
def test_gpu_tile_configs_prune(d, smem_kib, monkeypatch):
    """The autotune config pruning (GPU path; not run by the interpreter): the gradient
    accumulator width BLOCK_DO never exceeds the padded D, fits the register budget, the
    tiles' estimated shared memory fits the device's block limit, and at least one config
    survives for every D and dtype."""
    from contrastive_kernels.kernels import lse as klse
    from contrastive_kernels.kernels._common import pad_dim
    limit = smem_kib * 1024
    monkeypatch.setattr(klse, "smem_limit", lambda t: limit)
    dpad = pad_dim(d)
    bd = dpad if dpad <= 128 else 64  # klse._block_d on a GPU
    for dtype in (F32, BF16):
        el = torch.empty(0, dtype=dtype).element_size()
        for c in klse._fwd_prune(klse._FWD_CONFIGS, {"O": torch.empty(2, d, dtype=dtype)}, BLOCK_D=bd):
            used = (c.kwargs["BLOCK_O"] + c.kwargs["BLOCK_I"]) * bd * el * c.num_stages
            assert used <= limit, (c.kwargs, c.num_stages, used)
        for need_out in (True, False):
            for c in klse._bwd_prune(klse._BWD_CONFIGS, {"O": torch.empty(2, d, dtype=dtype)}, D_PAD=dpad,
                                     BLOCK_D=bd, NEED_OUT=need_out):
                extra = c.kwargs["BLOCK_I"] * c.kwargs["BLOCK_DO"] * el * c.num_stages if need_out else 0
                used = (c.kwargs["BLOCK_O"] + c.kwargs["BLOCK_I"]) * bd * el * c.num_stages + extra
                assert used <= limit, (c.kwargs, c.num_stages, used)
    for dtype in (F32, BF16):
        x = torch.empty(2, d, dtype=dtype)
        for need_out in (True, False):
            kept = klse._bwd_prune(klse._BWD_CONFIGS, {"O": x}, D_PAD=dpad, BLOCK_D=klse._block_d(dpad),
                                   NEED_OUT=need_out)
            assert kept
            for c in kept:
                bdo = c.kwargs["BLOCK_DO"]
                assert bdo <= dpad and (bdo == 16 or need_out)
                assert not need_out or c.kwargs["BLOCK_O"] * bdo <= 128 * 32 * c.num_warps
        assert klse._fwd_prune(klse._FWD_CONFIGS, {"O": x}, BLOCK_D=klse._block_d(dpad))


# ----------------------------------------------- two scales of one product in one pass (HCL)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("case", ["hcl", "ring-plain", "ring-pos-beta0"])
def test_lse_two_scales_matches_float64(case, n, dtype):
    """fam.lse_two_scales on Triton (the lse2 kernels: both scales' log-sum-exps from one product per
    tile, the backward's dS of both summed in float32 before its one product) against the float64
    reference (the lse family at each scale, autograd through the normalization): both outputs, dq,
    dk, both dscales, at odd sizes, with the masks, every dtype."""
    if dtype == BF16 and DEV == "cpu":
        pytest.skip("bfloat16 Triton needs a GPU (the interpreter computes bfloat16 wrongly)")
    if case == "hcl" and n == 1:
        n = 2  # (HCL's smallest batch: one pair)
    q, k, s1, s0, rscale, pos, diag, mode = two_scale_case(case, n, 40, dtype, DEV)
    got = two_scales_run("triton", q, k, s1, s0, rscale, pos, diag, mode)
    want = two_scales_run(REF, q, k, s1, s0, rscale, pos, diag, mode, dtype=torch.float64)
    assert_two_scales_close(got, want, dtype, f"{case} n={n}", grad_dtype=q.dtype)


def test_lse_two_scales_one_pass_per_side(monkeypatch):
    """The Triton path forms each product once: one forward pass for both scales (not one per
    scale), one backward pass per side (dq, dk); and it agrees with the lse kernels run twice."""
    from contrastive_kernels.kernels import lse as klse
    q, k, s1, s0, rscale, pos, diag, mode = two_scale_case("ring-pos-beta0", 33, 24, F32, DEV)
    calls = {"fwd": 0, "bwd": 0}
    fwd_pass, bwd_pass = klse._lse_pass, klse._bwd_pass

    def count(key, fn):
        def wrapped(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(klse, "_lse_pass", count("fwd", fwd_pass))
    monkeypatch.setattr(klse, "_bwd_pass", count("bwd", bwd_pass))
    fused = two_scales_run("triton", q, k, s1, s0, rscale, pos, diag, mode)
    assert calls == {"fwd": 1, "bwd": 2}, calls
    monkeypatch.setattr(fam, "_TWO_SCALES_FUSED", ())
    twice = two_scales_run("triton", q, k, s1, s0, rscale, pos, diag, mode)
    assert calls == {"fwd": 3, "bwd": 6}, calls  # the lse ops twice: 2 forward passes, 2 x (rows, columns)
    assert_two_scales_close(fused, twice, F32, "fused vs twice")


@pytest.mark.parametrize("case", ["hcl", "ring-plain"])
def test_lse_two_scales_column_splits(case, monkeypatch):
    """The lse2 kernels with column splits (a GPU's small-batch launches; forced here to 3): the
    second scale's row states merged in split order (RP0), its dscale summed over the splits'
    partials, against float64."""
    monkeypatch.setenv("CONTRASTIVE_KERNELS_TRITON_COL_SPLITS", "3")
    q, k, s1, s0, rscale, pos, diag, mode = two_scale_case(case, 129, 40, F16, DEV)
    got = two_scales_run("triton", q, k, s1, s0, rscale, pos, diag, mode)
    want = two_scales_run(REF, q, k, s1, s0, rscale, pos, diag, mode, dtype=torch.float64)
    assert_two_scales_close(got, want, F16, f"splits {case}")


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter's patching (tests/conftest.py) only")
def test_interpreter_patching_once_is_exact(monkeypatch):
    """tests/conftest.py skips the interpreter's repeated patching of triton.language on helper
    calls: every kernel of the family (forward with columns, backward, a float16 and a labels
    case) gives the same bits with Triton's own patching, and the skip is active here."""
    from triton.runtime import interpreter
    once = interpreter._patch_lang
    assert getattr(once, "_ck_once", False), "conftest's interpreter patching is not installed"
    walks = []  # the costly part of a patching: walking a module's members
    walk = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: (walks.append(1), walk(*a))[1])

    def run():
        outs = []
        for dtype, mask in ((F32, MASK_DIAG), (F16, MASK_DIAG), (F32, MASK_SAME_LABEL)):
            p = _problem(70, 67, 24, dtype, mask_mode=mask)
            q, k = p["q"].requires_grad_(), p["k"].requires_grad_()
            row, col = fam.lse("triton", q, k, p["scale"], mask_mode=mask, q_labels=p["q_labels"],
                               k_labels=p["k_labels"], compute_col=mask != MASK_SAME_LABEL)
            loss = row.sum() + (col.sum() if col is not None else 0)
            outs += [row, *([] if col is None else [col]), *torch.autograd.grad(loss, (q, k))]
        return [o.detach() for o in outs]

    fast = run()
    fast_walks = len(walks)
    walks.clear()
    monkeypatch.setattr(interpreter, "_patch_lang", once._ck_original)
    slow = run()
    assert len(walks) > 3 * fast_walks, f"{fast_walks} module walks with the skip, {len(walks)} without"
    assert len(fast) == len(slow) == 12
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
