"""siglip_loss on every backend against an independent implementation of open_clip's
SigLipLoss (its negative_only and logit_bias included), values and gradients, and a
peak-memory proof that the fused CPU backend never forms the N x N logit matrix."""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck
from helpers import TOL, backend_params, peak_rss_growth, rel_err

BACKENDS = [pytest.param("reference", id="reference")] + backend_params("pairwise")


def open_clip_siglip(image, text, logit_scale, logit_bias=None, negative_only=False):
    """open_clip SigLipLoss._loss: logits = scale I T^T (+ bias); labels +1 on the diagonal,
    -1 elsewhere (all -1 when negative_only); -sum log sigmoid(labels * logits) / N.
    log sigmoid(t) = min(t, 0) - log1p(exp(-|t|)) is written out here (not F.logsigmoid)."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n, m = logits.shape
    labels = -torch.ones(n, m, dtype=logits.dtype)
    if not negative_only:
        labels = labels + 2 * torch.eye(n, m, dtype=logits.dtype)
    t = labels * logits
    log_sig = torch.clamp(t, max=0) - torch.log1p(torch.exp(-t.abs()))
    return -log_sig.sum() / image.shape[0]


def _leaves(n, m, d, dtype, scale=10.0, bias=-10.0, aligned=False):
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    txt = torch.randn(m, d)
    if aligned:
        r = min(n, m)
        txt[:r] = img[:r] + 0.2 * txt[:r]
    txt = torch.nn.functional.normalize(txt, dim=1)
    log_scale = torch.tensor(scale).log()
    return (img.to(dtype), txt.to(dtype), log_scale, torch.tensor(bias))


def _loss_and_grads(fn, img, txt, log_scale, bias, dtype=None):
    leaves = [t.detach().clone() for t in (img, txt, log_scale, bias)]
    if dtype is not None:
        leaves = [t.to(dtype) for t in leaves]
    for t in leaves:
        t.requires_grad_()
    loss = fn(leaves[0], leaves[1], leaves[2].exp(), leaves[3])  # open_clip passes logit_scale.exp()
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("negative_only", [False, True], ids=["siglip", "negative_only"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_matches_open_clip(backend, negative_only):
    shapes = [(1, 1, 3), (7, 7, 5), (129, 129, 64)]
    if negative_only:
        shapes += [(7, 12, 5), (40, 9, 17)]  # negative_only allows N != M
    for n, m, d in shapes:
        for aligned, bias in ((False, -10.0), (True, 5.0)):
            inputs = _leaves(n, m, d, torch.float32, bias=bias, aligned=aligned)
            want, want_g = _loss_and_grads(
                lambda i, t, s, b: open_clip_siglip(i, t, s, b, negative_only), *inputs, dtype=torch.float64)
            if backend == "reference":  # the specification itself, in float64
                got, got_g = _loss_and_grads(
                    lambda i, t, s, b: ck.siglip_loss(i, t, s, b, negative_only=negative_only, backend=backend),
                    *inputs, dtype=torch.float64)
                tol = 1e-10
            else:
                got, got_g = _loss_and_grads(
                    lambda i, t, s, b: ck.siglip_loss(i, t, s, b, negative_only=negative_only, backend=backend),
                    *inputs)
                tol = TOL[torch.float32]
                assert got.dtype == torch.float32
            assert rel_err(got, want) <= tol, (n, m, d, got.item(), want.item())
            for name, g, w in zip(("image", "text", "logit_scale", "logit_bias"), got_g, want_g):
                assert torch.isfinite(g).all()
                assert rel_err(g, w) <= tol, (n, m, d, name, rel_err(g, w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_half(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bfloat16 Triton needs a GPU (the interpreter computes bf16 tl.dot wrongly, STYLE.md)")
    img, txt, log_scale, bias = _leaves(64, 64, 32, dtype, scale=100.0, bias=-10.0, aligned=True)
    got, got_g = _loss_and_grads(lambda i, t, s, b: ck.siglip_loss(i, t, s, b, backend=backend),
                                 img, txt, log_scale, bias)
    # float64 reference of the same rounded inputs
    want, want_g = _loss_and_grads(open_clip_siglip, img, txt, log_scale, bias, dtype=torch.float64)
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    assert rel_err(got, want) <= TOL[dtype]
    for name, g, w, src in zip(("image", "text", "logit_scale", "logit_bias"), got_g, want_g,
                               (img, txt, log_scale, bias)):
        assert g.dtype == src.dtype, name
        assert rel_err(g, w) <= TOL[dtype], (name, rel_err(g, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_python_scalars_and_rectangular_check(backend):
    img, txt, _, _ = _leaves(9, 9, 8, torch.float32)
    got = ck.siglip_loss(img, txt, 10.0, -10.0, backend=backend)
    want = open_clip_siglip(img.double(), txt.double(), 10.0, -10.0)
    assert rel_err(got, want) <= TOL[torch.float32]  # float32 inputs: float32 compute on every backend
    with pytest.raises(ValueError, match="same number of rows"):
        ck.siglip_loss(img, txt[:5], 10.0, -10.0, backend=backend)


@pytest.mark.slow
def test_siglip_cpu_peak_memory():
    """N = 16384, D = 64 fwd+bwd on the fused CPU backend: the N x N float32 logits would be
    1 GiB (and open_clip's formula holds several such matrices); growth must stay < 300 MB."""
    setup = """
        import torch, contrastive_kernels as ck
        torch.manual_seed(0)
        n, d = 16384, 64
        img = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
        txt = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
        s = torch.tensor(10.0, requires_grad=True)
        b = torch.tensor(-10.0, requires_grad=True)
        w = torch.randn(64, d, requires_grad=True)  # warm-up: load the op, autograd, thread pool
        ck.siglip_loss(w, w, s, b, backend="cpu").backward()
    """
    body = """
        loss = ck.siglip_loss(img, txt, s, b, backend="cpu")
        loss.backward()
        assert torch.isfinite(loss) and img.grad is not None and txt.grad is not None
    """
    res = peak_rss_growth(setup, body)
    assert res["growth"] < 300e6, res
