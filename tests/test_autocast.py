"""torch.autocast: the similarity losses cast their embeddings as torch.matmul does, and
autocast never reaches the products inside a kernel.

Inside an autocast region of the inputs' device type, the embeddings of the similarity
losses (InfoNCE, NT-Xent, CLIP, SigLIP, SupCon, DCL, HCL, normalized_similarity) are cast
to the region's dtype, as the peers' logits (a matmul) are, so an AMP step runs the 16-bit
kernels: the loss and the gradients must be exactly those of the same call outside
autocast on inputs cast by hand, with the backward run inside the region too (where
autocast once rounded the CPU kernels' float32 row dots and products to 16 bits).
float64 inputs are not cast; the statistics losses (uniformity, Barlow Twins, VICReg,
cross_correlation) keep their input dtype (their float32 standardization and distances
are the point) and equal their result outside autocast.
"""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck

from helpers import backend_params, skip_interpreter_bf16

N, D = 7, 5
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0])

# name: (family, number of (N, D) embeddings, call(embeddings, backend))
SIMILARITY = {
    "info_nce": ("lse", 2, lambda x, be: ck.info_nce(x[0], x[1], backend=be)),
    "info_nce_negatives": ("lse", 3, lambda x, be: ck.info_nce(x[0], x[1], negatives=x[2], decoupled=True,
                                                               backend=be)),
    "nt_xent": ("lse", 2, lambda x, be: ck.nt_xent(x[0], x[1], backend=be)),
    "clip": ("lse", 2, lambda x, be: ck.clip_loss(x[0], x[1], 10.0, backend=be)),
    "siglip": ("pairwise", 2, lambda x, be: ck.siglip_loss(x[0], x[1], 10.0, -10.0, backend=be)),
    "supcon_ref": ("lse", 2, lambda x, be: ck.supcon_loss(x[0], LABELS.to(x[0].device), ref_embeddings=x[1],
                                                          ref_labels=LABELS.to(x[0].device), backend=be)),
    "dcl": ("lse", 2, lambda x, be: ck.dcl_loss(x[0], x[1], weight_sigma=0.5, backend=be)),
    "hard_negative": ("lse", 2, lambda x, be: ck.hard_negative_loss(x[0], x[1], backend=be)),
    "similarity": ("similarity", 2, lambda x, be: ck.normalized_similarity(x[0], x[1], 3.0, backend=be)),
}
STATISTICS = {
    "uniformity": ("lse", 1, lambda x, be: ck.uniformity_loss(x[0], backend=be)),
    "barlow_twins": ("xcorr", 2, lambda x, be: ck.barlow_twins_loss(x[0], x[1], backend=be)),
    "vicreg": ("xcorr", 2, lambda x, be: ck.vicreg_loss(x[0], x[1], backend=be)),
    "cross_correlation": ("xcorr", 2, lambda x, be: ck.cross_correlation(x[0], x[1], backend=be)),
}


# CPU autocast here; CUDA autocast too on a machine with a GPU (the backends for CUDA tensors)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params(cases):
    out = []
    for device in DEVICES:
        for name, (family, _, _) in cases.items():
            out.append(pytest.param(name, "reference", device, id=f"{name}-reference-{device}"))
            for p in backend_params(family, device):
                out.append(pytest.param(name, p.values[0], device, marks=p.marks, id=f"{name}-{p.values[0]}-{device}"))
    return out


def _inputs(n_inputs, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, D, generator=g).to(device=device, dtype=dtype) for _ in range(n_inputs)]


def _run(fn, xs, backend, amp_dtype=None, backward_inside=None):
    """(output, gradients of the leaves xs) with the forward inside an autocast region of
    amp_dtype (None: no region) and the backward inside it too (default on the kernel
    backends; PyTorch's own autograd of the reference formula follows autocast in a
    backward run inside the region, as any PyTorch graph does, which is not ours to change)."""
    if backward_inside is None:
        backward_inside = backend != "reference"
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    device = xs[0].device
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = fn(leaves, backend)
        # (a fixed projection of a matrix output, so that every entry's gradient is checked)
        weights = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
        scalar = out if out.dim() == 0 else (out.float() * weights).sum()
        if backward_inside:
            scalar.backward()
    if not backward_inside:
        scalar.backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,backend,device", _params(SIMILARITY))
def test_similarity_losses_cast_like_matmul(name, backend, device, amp_dtype):
    skip_interpreter_bf16(backend, amp_dtype)
    _, n_inputs, fn = SIMILARITY[name]
    xs = _inputs(n_inputs, torch.float32, device=device)
    out, grads = _run(fn, xs, backend, amp_dtype)
    want, want_grads = _run(fn, [x.to(amp_dtype) for x in xs], backend)
    if backend != "reference":  # and with the backward after the region, as torch.amp's examples do it
        _, grads_after = _run(fn, xs, backend, amp_dtype, backward_inside=False)
        assert all(torch.equal(g, h) for g, h in zip(grads, grads_after))
    assert out.dtype == want.dtype  # the losses are float32; the similarity matrix the autocast dtype
    assert torch.equal(out, want), f"{name}: {out} != {want} (the same call on inputs cast by hand)"
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == torch.float32, f"input {i}: gradient in {g.dtype}, its input is float32"
        assert torch.equal(g, w.float()), f"{name}, input {i}: max difference {(g - w.float()).abs().max()}"


@pytest.mark.parametrize("name,backend,device", _params(SIMILARITY))
def test_mixed_dtypes_accepted_inside_autocast(name, backend, device):
    """As torch.matmul under autocast: a bfloat16 and a float32 embedding meet in the autocast
    dtype, float16 (outside autocast the same call is a dtype error naming both arguments)."""
    _, n_inputs, fn = SIMILARITY[name]
    xs = _inputs(n_inputs, torch.float32, seed=1, device=device)
    mixed = [xs[0].bfloat16()] + xs[1:]
    out, grads = _run(fn, mixed, backend, torch.float16)
    want, want_grads = _run(fn, [x.half() for x in mixed], backend)
    assert torch.equal(out, want)
    assert grads[0].dtype == torch.bfloat16 and torch.equal(grads[0], want_grads[0].bfloat16())
    with pytest.raises(ValueError, match="must have the same dtype"):
        fn(mixed, backend)


@pytest.mark.parametrize("name", list(SIMILARITY))
def test_float64_not_cast(name):
    _, n_inputs, fn = SIMILARITY[name]
    xs = _inputs(n_inputs, torch.float64, seed=2)
    out, grads = _run(fn, xs, "reference", torch.bfloat16)
    want, want_grads = _run(fn, xs, "reference")
    assert out.dtype == torch.float64 and torch.equal(out, want)
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))


@pytest.mark.parametrize("name,backend,device", _params(STATISTICS))
def test_statistics_losses_not_cast(name, backend, device):
    _, n_inputs, fn = STATISTICS[name]
    xs = _inputs(n_inputs, torch.float32, seed=3, device=device)
    # (cross_correlation's D x D product is PyTorch's matmul, whose backward follows autocast
    # when run inside the region, as in any PyTorch graph: its backward runs after the region)
    out, grads = _run(fn, xs, backend, torch.bfloat16,
                      backward_inside=False if name == "cross_correlation" or backend == "reference" else None)
    want, want_grads = _run(fn, xs, backend)
    assert out.dtype == want.dtype == torch.float32
    assert torch.equal(out, want), f"{name}: {out} != {want}"
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert torch.equal(g, w), f"{name}, input {i}: max difference {(g - w).abs().max()}"


def test_modules_and_compat_follow_autocast():
    """The nn modules and the compat modules go through the same functions."""
    from contrastive_kernels.compat import open_clip as oc
    from contrastive_kernels.compat import pytorch_metric_learning as pml
    xs = _inputs(2, torch.float32, seed=4)
    cases = [
        (lambda x, be: ck.nn.ClipLoss(backend=be)(x[0], x[1]), 2),
        (lambda x, be: oc.ClipLoss(backend=be)(x[0], x[1], 10.0), 2),
        (lambda x, be: pml.NTXentLoss(0.1, backend=be)(x[0], LABELS), 1),
        (lambda x, be: pml.SupConLoss(0.1, backend=be)(x[0], LABELS), 1),
    ]
    for i, (fn, n_inputs) in enumerate(cases):
        out, grads = _run(fn, xs[:n_inputs], "cpu", torch.bfloat16)
        want, want_grads = _run(fn, [x.bfloat16() for x in xs[:n_inputs]], "cpu")
        assert torch.equal(out, want), f"case {i}"
        assert all(torch.equal(g, w.float()) for g, w in zip(grads, want_grads)), f"case {i}"


def test_compile_fullgraph_inside_autocast():
    torch._dynamo.reset()
    a, b = _inputs(2, torch.float32, seed=5)

    def f(a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ck.clip_loss(a, b, 10.0, backend="cpu") + ck.nt_xent(a, b, backend="cpu")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    assert torch.equal(out, f(a, b))
    assert torch.equal(out, ck.clip_loss(a.bfloat16(), b.bfloat16(), 10.0, backend="cpu")
                       + ck.nt_xent(a.bfloat16(), b.bfloat16(), backend="cpu"))
