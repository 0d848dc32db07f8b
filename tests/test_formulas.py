"""Every loss of SPEC.md against an independent formula (tests/peers.py), values and
gradients (every float input, tensor temperature / scale / bias included):

* backend="reference" in float64 at 1e-10 relative, N in {1 where defined, 7, 129},
  odd D, random labels with singleton classes, every mode and reduction;
* torch.autograd.gradcheck in float64 on backend="reference";
* every fused backend of the function's kernel family (helpers.kernel_backends: cpu,
  triton under TRITON_INTERPRET=1, cuda on a GPU) plus the internal "_family_reference"
  (the fused compositions of functional.py over the materializing family references)
  in float32 at 1e-5 and float16 / bfloat16 at 2e-2, against the float64 formula of
  the same rounded inputs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels.backends import FAMILY_REFERENCE

import peers
from helpers import TOL, kernel_backends, rel_err, skip_interpreter_bf16

F64_TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These sizes are tiny: intra-op threads only add synchronization (on a loaded 2-core
    CI machine, 8x the run time)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
# D per N: odd, and on both sides of N (N < D takes the Gram path of Barlow Twins / VICReg).
DIM = {1: 5, 2: 7, 3: 5, 4: 3, 7: 13, 129: 19}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _labels(g, n, classes=None):
    """Random labels with a few singleton classes (anchors without a positive)."""
    classes = classes or max(1, n // 3)
    lab = torch.randint(0, classes, (n,), generator=g)
    if n >= 4:
        lab[0], lab[n // 2] = 1000, 1001
    return lab


@dataclasses.dataclass
class Case:
    name: str
    family: str
    build: Callable  # (n, d, g) -> dict of float64 tensors, 0-dim scalars, integer tensors, and Python values
    ours: Callable   # (inputs, backend) -> Tensor
    peer: Callable   # (inputs) -> Tensor
    sizes: tuple = (1, 7, 129)
    scalars: tuple = ()  # names of the scalar arguments that are tested as tensors too


CASES: list[Case] = []


def case(*args, **kwargs):
    CASES.append(Case(*args, **kwargs))


# ------------------------------------------------------------- similarity
case("similarity", "similarity",
     lambda n, d, g: dict(a=_randn(g, n, d), b=_randn(g, n + 2, d), scale=2.5),
     lambda t, be: ck.normalized_similarity(t["a"], t["b"], t["scale"], backend=be),
     lambda t: peers.similarity(t["a"], t["b"], t["scale"]), scalars=("scale",))
case("similarity_self", "similarity",
     lambda n, d, g: dict(a=_randn(g, n, d), scale=0.7),
     lambda t, be: ck.normalized_similarity(t["a"], None, t["scale"], backend=be),
     lambda t: peers.similarity(t["a"], None, t["scale"]), scalars=("scale",))
case("similarity_unnormalized", "similarity",
     lambda n, d, g: dict(a=_randn(g, n, d), b=_randn(g, n + 1, d), scale=1.5),
     lambda t, be: ck.normalized_similarity(t["a"], t["b"], t["scale"], normalize=False, backend=be),
     lambda t: peers.similarity(t["a"], t["b"], t["scale"], normalize=False), scalars=("scale",))


# ---------------------------------------------------------------- InfoNCE
def _info_inputs(n, d, g, *, extra_keys=0, negatives=0, positive_index=False, scale=1.0):
    m = n + extra_keys
    t = dict(query=_randn(g, n, d, scale=scale), key=_randn(g, m, d, scale=scale), temperature=0.2)
    if negatives:
        t["negatives"] = _randn(g, negatives, d, scale=scale)
    if positive_index:
        t["positive_index"] = torch.randint(0, m, (n,), generator=g)
    return t


INFO_MODES = {
    # name: (input options, info_nce options, sizes)
    "in_batch": (dict(), dict(), (1, 7, 129)),
    "more_keys": (dict(extra_keys=3), dict(), (1, 7, 129)),
    "positive_index": (dict(extra_keys=4, positive_index=True), dict(), (1, 7, 129)),
    "moco": (dict(negatives=17), dict(in_batch_negatives=False), (1, 7, 129)),
    "in_batch_and_negatives": (dict(negatives=11), dict(), (1, 7, 129)),
    "decoupled": (dict(extra_keys=1), dict(decoupled=True), (1, 7, 129)),
    "decoupled_moco": (dict(negatives=9), dict(in_batch_negatives=False, decoupled=True), (1, 7, 129)),
    "decoupled_index_negatives": (dict(extra_keys=2, negatives=5, positive_index=True), dict(decoupled=True),
                                  (1, 7, 129)),
    "symmetric": (dict(), dict(symmetric=True), (1, 7, 129)),
    "symmetric_decoupled": (dict(), dict(symmetric=True, decoupled=True), (2, 7, 129)),
    "unnormalized": (dict(negatives=6, scale=0.4), dict(normalize=False), (1, 7, 129)),
}


def _info_ours(opts, reduction):
    def f(t, be):
        return ck.info_nce(t["query"], t["key"], negatives=t.get("negatives"), temperature=t["temperature"],
                           positive_index=t.get("positive_index"), reduction=reduction, backend=be, **opts)
    return f


def _info_peer(mode, opts, reduction):
    def f(t):
        if mode == "in_batch":  # info-nce-pytorch without negative keys
            return peers.info_nce_pytorch(t["query"], t["key"], None, t["temperature"], reduction)
        if mode == "moco":  # info-nce-pytorch with negative keys (= MoCo with the queue)
            return peers.info_nce_pytorch(t["query"], t["key"], t["negatives"], t["temperature"], reduction)
        return peers.info_nce_general(t["query"], t["key"], t.get("negatives"), t["temperature"],
                                      t.get("positive_index"), reduction=reduction, **opts)
    return f


for _mode, (_inp, _opts, _sizes) in INFO_MODES.items():
    for _red in ("mean", "sum", "none"):
        case(f"info_nce-{_mode}-{_red}", "lse",
             (lambda inp: lambda n, d, g: _info_inputs(n, d, g, **inp))(_inp),
             _info_ours(_opts, _red), _info_peer(_mode, _opts, _red), sizes=_sizes, scalars=("temperature",))


# ------------------------------------------------------------- NT-Xent / CLIP / SigLIP
case("nt_xent", "lse",
     lambda n, d, g: dict(z1=_randn(g, n, d), z2=_randn(g, n, d), temperature=0.5),
     lambda t, be: ck.nt_xent(t["z1"], t["z2"], t["temperature"], backend=be),
     lambda t: peers.nt_xent(t["z1"], t["z2"], t["temperature"]), scalars=("temperature",))
case("nt_xent_cold", "lse",
     lambda n, d, g: dict(z1=_randn(g, n, d), z2=_randn(g, n, d), temperature=0.07),
     lambda t, be: ck.nt_xent(t["z1"], t["z2"], t["temperature"], backend=be),
     lambda t: peers.nt_xent(t["z1"], t["z2"], t["temperature"]), scalars=("temperature",))
case("clip", "lse",
     lambda n, d, g: dict(image=_randn(g, n, d, scale=0.3), text=_randn(g, n, d, scale=0.3), logit_scale=14.0),
     lambda t, be: ck.clip_loss(t["image"], t["text"], t["logit_scale"], backend=be),
     lambda t: peers.clip_loss(t["image"], t["text"], t["logit_scale"]), scalars=("logit_scale",))
case("clip_bias", "lse",
     lambda n, d, g: dict(image=_randn(g, n, d, scale=0.3), text=_randn(g, n, d, scale=0.3), logit_scale=14.0,
                          logit_bias=-3.0),
     lambda t, be: ck.clip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"], backend=be),
     lambda t: peers.clip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"]),
     scalars=("logit_scale", "logit_bias"))
case("clip_scale_100", "lse",
     lambda n, d, g: dict(image=peers.unit(_randn(g, n, d)), text=peers.unit(_randn(g, n, d)), logit_scale=100.0),
     lambda t, be: ck.clip_loss(t["image"], t["text"], t["logit_scale"], backend=be),
     lambda t: peers.clip_loss(t["image"], t["text"], t["logit_scale"]), scalars=("logit_scale",))
case("siglip", "pairwise",
     lambda n, d, g: dict(image=_randn(g, n, d, scale=0.3), text=_randn(g, n, d, scale=0.3), logit_scale=10.0,
                          logit_bias=-4.0),
     lambda t, be: ck.siglip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"], backend=be),
     lambda t: peers.siglip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"]),
     scalars=("logit_scale", "logit_bias"))
case("siglip_negative_only_rect", "pairwise",
     lambda n, d, g: dict(image=_randn(g, n, d, scale=0.3), text=_randn(g, n + 3, d, scale=0.3), logit_scale=10.0,
                          logit_bias=-4.0),
     lambda t, be: ck.siglip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"], negative_only=True,
                                  backend=be),
     lambda t: peers.siglip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"], negative_only=True),
     scalars=("logit_scale", "logit_bias"))
case("siglip_scale_100", "pairwise",
     lambda n, d, g: dict(image=peers.unit(_randn(g, n, d)), text=peers.unit(_randn(g, n, d)), logit_scale=100.0,
                          logit_bias=-10.0),
     lambda t, be: ck.siglip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"], backend=be),
     lambda t: peers.siglip_loss(t["image"], t["text"], t["logit_scale"], t["logit_bias"]),
     scalars=("logit_scale", "logit_bias"))

# ---------------------------------------------------------------- SupCon
case("supcon", "lse",
     lambda n, d, g: dict(embeddings=_randn(g, n, d), labels=_labels(g, n), temperature=0.1),
     lambda t, be: ck.supcon_loss(t["embeddings"], t["labels"], t["temperature"], backend=be),
     lambda t: peers.supcon(t["embeddings"], t["labels"], t["temperature"]), scalars=("temperature",))
def _supcon_ref(n, d, g):
    """A reference set of n + 5 rows; label 5000 (row 0 of the anchors, when n > 1) has no
    row in it, so that anchor has no positive."""
    labels = _labels(g, n, 4)
    if n > 1:
        labels[0] = 5000
    return dict(embeddings=_randn(g, n, d), labels=labels, ref_embeddings=_randn(g, n + 5, d),
                ref_labels=_labels(g, n + 5, 4), temperature=0.3)


case("supcon_ref", "lse", _supcon_ref,
     lambda t, be: ck.supcon_loss(t["embeddings"], t["labels"], t["temperature"], ref_embeddings=t["ref_embeddings"],
                                  ref_labels=t["ref_labels"], backend=be),
     lambda t: peers.supcon(t["embeddings"], t["labels"], t["temperature"], t["ref_embeddings"], t["ref_labels"]),
     scalars=("temperature",))
case("supcon_unnormalized", "lse",
     lambda n, d, g: dict(embeddings=_randn(g, n, d, scale=0.4), labels=_labels(g, n, 3), temperature=0.5),
     lambda t, be: ck.supcon_loss(t["embeddings"], t["labels"], t["temperature"], normalize=False, backend=be),
     lambda t: peers.supcon(t["embeddings"], t["labels"], t["temperature"], normalize=False),
     scalars=("temperature",))

# -------------------------------------------------------------- DCL / HCL
case("dcl", "lse",
     lambda n, d, g: dict(z1=_randn(g, n, d), z2=_randn(g, n, d), temperature=0.1),
     lambda t, be: ck.dcl_loss(t["z1"], t["z2"], t["temperature"], backend=be),
     lambda t: peers.dcl(t["z1"], t["z2"], t["temperature"]), sizes=(2, 7, 129), scalars=("temperature",))
case("dclw", "lse",
     lambda n, d, g: dict(z1=_randn(g, n, d), z2=_randn(g, n, d), temperature=0.2),
     lambda t, be: ck.dcl_loss(t["z1"], t["z2"], t["temperature"], weight_sigma=0.5, backend=be),
     lambda t: peers.dcl(t["z1"], t["z2"], t["temperature"], weight_sigma=0.5), sizes=(2, 7, 129),
     scalars=("temperature",))
case("hard_negative", "lse",
     lambda n, d, g: dict(z1=_randn(g, n, d), z2=_randn(g, n, d), temperature=0.5),
     lambda t, be: ck.hard_negative_loss(t["z1"], t["z2"], t["temperature"], backend=be),
     lambda t: peers.hcl(t["z1"], t["z2"], t["temperature"]), sizes=(2, 7, 129), scalars=("temperature",))
case("hard_negative_beta", "lse",
     lambda n, d, g: dict(z1=_randn(g, n, d), z2=_randn(g, n, d), temperature=0.3),
     lambda t, be: ck.hard_negative_loss(t["z1"], t["z2"], t["temperature"], beta=0.5, tau_plus=0.05, backend=be),
     lambda t: peers.hcl(t["z1"], t["z2"], t["temperature"], tau_plus=0.05, beta=0.5), sizes=(2, 7, 129),
     scalars=("temperature",))


def _hcl_clamped(n, d, g):
    """Close views and a large tau_plus: the debiased estimate goes below its clamp
    N e^{-1/t} for every row (the clamp branch; test_hcl_clamp_case_is_clamped)."""
    z1 = _randn(g, n, d)
    return dict(z1=z1, z2=z1 + 0.4 * _randn(g, n, d), temperature=0.5)


case("hard_negative_clamped", "lse", _hcl_clamped,
     lambda t, be: ck.hard_negative_loss(t["z1"], t["z2"], t["temperature"], beta=1.0, tau_plus=0.6, backend=be),
     lambda t: peers.hcl(t["z1"], t["z2"], t["temperature"], tau_plus=0.6, beta=1.0), sizes=(2, 7, 129),
     scalars=("temperature",))

# ------------------------------------------------------ uniformity / alignment
case("uniformity", "lse",
     lambda n, d, g: dict(x=peers.unit(_randn(g, n, d)), t=2.0),
     lambda t, be: ck.uniformity_loss(t["x"], t["t"], backend=be),
     lambda t: peers.uniform_loss(t["x"], t["t"]), sizes=(2, 7, 129), scalars=("t",))
case("uniformity_raw", "lse",
     lambda n, d, g: dict(x=_randn(g, n, d, scale=0.5), t=0.7),
     lambda t, be: ck.uniformity_loss(t["x"], t["t"], backend=be),
     lambda t: peers.uniform_loss(t["x"], t["t"]), sizes=(2, 7, 129), scalars=("t",))
case("alignment", "lse",
     lambda n, d, g: dict(x=_randn(g, n, d), y=_randn(g, n, d), alpha=2.0),
     lambda t, be: ck.alignment_loss(t["x"], t["y"], t["alpha"], backend=be),
     lambda t: peers.align_loss(t["x"], t["y"], t["alpha"]), scalars=("alpha",))
case("alignment_alpha", "lse",
     lambda n, d, g: dict(x=_randn(g, n, d), y=_randn(g, n, d), alpha=1.3),
     lambda t, be: ck.alignment_loss(t["x"], t["y"], t["alpha"], backend=be),
     lambda t: peers.align_loss(t["x"], t["y"], t["alpha"]), scalars=("alpha",))


# ------------------------------------------------------ cross-correlation family
def _views(n, d, g):
    """Two correlated views with feature scales on both sides of 1 (VICReg's hinge is
    active for some features and not for others)."""
    scales = torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    z1 = _randn(g, n, d) * scales + 0.5
    return dict(z1=z1, z2=0.6 * z1 + 0.8 * _randn(g, n, d) * scales)


# BatchNorm in training mode is undefined for one row (PyTorch refuses it), and with two
# rows every standardized entry is +-sqrt(v / (v + eps)) whatever the inputs (the gradient
# is all eps, ill-conditioned in float32), so the standardized forms start at N = 3;
# N = 1 is test_one_row_standardizes_to_zero.
case("cross_correlation", "xcorr", _views,
     lambda t, be: ck.cross_correlation(t["z1"], t["z2"], backend=be),
     lambda t: peers.batchnorm_cross_correlation(t["z1"], t["z2"]), sizes=(3, 7, 129))
case("cross_correlation_eps", "xcorr", _views,
     lambda t, be: ck.cross_correlation(t["z1"], t["z2"], eps=0.3, backend=be),
     lambda t: peers.batchnorm_cross_correlation(t["z1"], t["z2"], eps=0.3), sizes=(3, 7, 129))
case("cross_correlation_raw", "xcorr", _views,
     lambda t, be: ck.cross_correlation(t["z1"], t["z2"], standardize=False, backend=be),
     lambda t: t["z1"].T @ t["z2"] / t["z1"].shape[0])
case("barlow_twins", "xcorr", _views,
     lambda t, be: ck.barlow_twins_loss(t["z1"], t["z2"], backend=be),
     lambda t: peers.barlow_twins(t["z1"], t["z2"]), sizes=(3, 7, 129))
case("barlow_twins_lambd", "xcorr", lambda n, d, g: dict(_views(n, d, g), lambd=0.02),
     lambda t, be: ck.barlow_twins_loss(t["z1"], t["z2"], t["lambd"], eps=1e-3, backend=be),
     lambda t: peers.barlow_twins(t["z1"], t["z2"], t["lambd"], eps=1e-3), sizes=(3, 7, 129), scalars=("lambd",))
case("vicreg", "xcorr", _views,
     lambda t, be: ck.vicreg_loss(t["z1"], t["z2"], backend=be),
     lambda t: peers.vicreg(t["z1"], t["z2"]), sizes=(2, 7, 129))
case("vicreg_coeffs", "xcorr", _views,
     lambda t, be: ck.vicreg_loss(t["z1"], t["z2"], 10.0, 5.0, 2.0, eps=1e-3, backend=be),
     lambda t: peers.vicreg(t["z1"], t["z2"], 10.0, 5.0, 2.0, eps=1e-3), sizes=(2, 7, 129))

CASE_BY_NAME = {c.name: c for c in CASES}
FUNCTIONS = {"normalized_similarity": "similarity", "info_nce": "info_nce", "nt_xent": "nt_xent",
             "clip_loss": "clip", "siglip_loss": "siglip", "supcon_loss": "supcon", "dcl_loss": "dcl",
             "hard_negative_loss": "hard_negative", "uniformity_loss": "uniformity", "alignment_loss": "alignment",
             "cross_correlation": "cross_correlation", "barlow_twins_loss": "barlow_twins", "vicreg_loss": "vicreg"}


# ------------------------------------------------------------------ machinery
def _seed(name: str, n: int) -> int:
    return (sum(map(ord, name)) * 1009 + n) % (2 ** 31)


def _make(c: Case, n: int, d: int | None = None):
    return c.build(n, DIM[n] if d is None else d, _gen(_seed(c.name, n)))


def _prepare(raw: dict, dtype, tensor_scalars: bool, scalar_dtype):
    """(ours, peer's) argument dicts and the names to differentiate: the floating inputs
    cast to `dtype` (requiring grad), the scalars as `scalar_dtype` tensors when asked; the
    peer gets float64 copies of exactly the same (rounded) values."""
    ours, mine, wrt = {}, {}, []
    for k, v in raw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            x = v.to(dtype).requires_grad_()
            ours[k], mine[k] = x, x.detach().double().requires_grad_()
            wrt.append(k)
        elif isinstance(v, float) and tensor_scalars:
            x = torch.tensor(v, dtype=scalar_dtype, requires_grad=True)
            ours[k], mine[k] = x, x.detach().double().requires_grad_()
            wrt.append(k)
        else:
            ours[k] = mine[k] = v
    return ours, mine, wrt


def _scalarize(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A scalar whose gradient checks every entry of a non-scalar output (a fixed random
    cotangent), the output itself when it is a scalar. The weights are positive (0.5 to
    1.5): random signs would make the gradient of a scalar argument (temperature, scale)
    a cancelling sum, ill-conditioned for any float32 implementation."""
    if out.dim() == 0:
        return out
    w = 0.5 + torch.rand(out.shape, generator=_gen(seed), dtype=torch.float64)
    return (out.double() * w.to(out.device)).sum()


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def _permuted(x, perm):
    """x with its features (the columns of a 2-D floating input) in the order `perm`."""
    return x[:, perm] if perm is not None and x.is_floating_point() and x.dim() == 2 else x


def _torch_error(c: Case, ours: dict, wrt: list, seed: int, ref, g_ref, dtype=torch.float32, perm=None):
    """PyTorch's own error: the peer run in `dtype` on the same rounded inputs, against
    the float64 peer (loss, then each gradient); with `perm`, every input's features in that
    order (the same sums, added in another order; the gradients put back in the original)."""
    p32 = {k: (_permuted(v.detach(), perm).to(dtype).requires_grad_()
               if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in ours.items()}
    out = c.peer(p32)
    g = _grads(_scalarize(out, seed), [p32[k] for k in wrt])
    if perm is not None:
        g = [_permuted(a, torch.argsort(perm)) for a in g]
    return [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(g, g_ref)]


# PyTorch's error on an ill-conditioned quantity is a draw from its summation order: dcl's
# d/dtemperature at N = 2 (a difference ~170 times smaller than its terms) is 2.5e-6 to
# 1.4e-5 in float32 over 12 orders of the 7 features, 3.0e-6 in the given one on an AVX-512
# machine (where a bound of twice that failed every backend, at 1.8e-5) and larger on others.
# The rule's PyTorch error is the largest over the given order and these three.
_FEATURE_ORDERS = 3


def _torch_float32_error(c: Case, ours: dict, wrt: list, seed: int, ref, g_ref, dtype=torch.float32):
    """The larger of PyTorch's float32 error and, for float16/bfloat16, its error in that
    dtype (FlashAttention's rule: twice PyTorch's own error in the same dtype), each the
    largest over the inputs' feature order and _FEATURE_ORDERS others where the loss is a
    scalar (invariant under a common order of the features)."""
    errs = _torch_error(c, ours, wrt, seed, ref, g_ref)
    feats = {v.shape[1] for v in ours.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
             and v.dim() == 2}
    if ref.dim() == 0 and len(feats) == 1:
        d = feats.pop()
        for o in range(_FEATURE_ORDERS):
            perm = torch.randperm(d, generator=_gen(o))
            errs = [max(a, b) for a, b in zip(errs, _torch_error(c, ours, wrt, seed, ref, g_ref, perm=perm))]
    if dtype in (torch.float16, torch.bfloat16):
        try:
            same = _torch_error(c, ours, wrt, seed, ref, g_ref, dtype)
            errs = [max(a, b) if b == b else a for a, b in zip(errs, same)]
        except RuntimeError:  # an op PyTorch does not implement in that dtype on this device
            pass
    return errs


def _compare(c: Case, n: int, backend: str, dtype, tol: float, tensor_scalars: bool, scalar_dtype=None):
    """Loss and every gradient within `tol` of the float64 peer on the same (rounded)
    inputs. For fused backends, where plain PyTorch float32 on the same inputs already
    misses the SPEC tolerance (an ill-conditioned quantity, e.g. the temperature gradient
    of a single row), the bound is twice PyTorch's own error (the FlashAttention rule of
    STYLE.md) -- never looser than the SPEC tolerance."""
    raw = _make(c, n)
    ours, mine, wrt = _prepare(raw, dtype, tensor_scalars, scalar_dtype or dtype)
    out = c.ours(ours, backend)
    ref = c.peer(mine)
    assert out.shape == ref.shape, f"{c.name}: shape {tuple(out.shape)} != peer's {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{c.name}: the peer is not finite (bad test inputs)"
    if out.dim() == 0:
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), \
            f"{c.name}: loss dtype {out.dtype}"
    seed = _seed(c.name, n) + 7
    g_ours = _grads(_scalarize(out, seed), [ours[k] for k in wrt])
    g_ref = _grads(_scalarize(ref, seed), [mine[k] for k in wrt])
    errs = [rel_err(out, ref)] + [rel_err(go, gr) for go, gr in zip(g_ours, g_ref)]
    what = ["loss"] + [f"d/d{k}" for k in wrt]
    for k, go, gr in zip(wrt, g_ours, g_ref):
        assert go.dtype == ours[k].dtype, f"{c.name}: d/d{k} has dtype {go.dtype}, input {ours[k].dtype}"
        assert torch.isfinite(gr).all(), f"{c.name}: the peer's d/d{k} is not finite"
    if max(errs) <= tol:
        return
    torch_errs = [0.0] * len(errs)
    if dtype != torch.float64:
        torch_errs = _torch_float32_error(c, ours, wrt, seed, ref, g_ref, dtype)
    for w, e, te in zip(what, errs, torch_errs):
        bound = max(tol, 2 * te)
        assert e <= bound, (f"{c.name} N={n} {backend} {dtype}: {w} relative error {e:.3e} > {bound:.1e} "
                            f"(SPEC {tol:.0e}; PyTorch on the same inputs, float32 or this dtype: {te:.1e})")


# -------------------------------------------------------------------- tests
def test_every_spec_function_has_a_case():
    for fn, name in FUNCTIONS.items():
        assert hasattr(ck, fn), fn
        assert any(c.name == name or c.name.startswith(name + "-") for c in CASES), fn
    assert {f for f in ck.functional.__all__} == set(FUNCTIONS)


def _float64_params():
    """Every case at every size with its scalar arguments as Python floats, and again as
    float64 tensors (gradients w.r.t. them too) where it has some; info_nce's sum / none
    reductions only scale the rows, so their tensor-argument runs are left to 'mean'."""
    out = []
    for c in CASES:
        tensor_runs = [False] + ([True] if c.scalars and not c.name.endswith(("-sum", "-none")) else [])
        for n in c.sizes:
            for ts in tensor_runs:
                out.append(pytest.param(c.name, n, ts, id=f"{c.name}-N{n}-{'tensor' if ts else 'float'}_args"))
    return out


@pytest.mark.parametrize("name,n,tensor_scalars", _float64_params())
def test_reference_float64_equals_formula(name, n, tensor_scalars):
    _compare(CASE_BY_NAME[name], n, "reference", torch.float64, F64_TOL, tensor_scalars, torch.float64)


# One case per SPEC function gets the full Jacobian check, the other modes the fast
# (random projection) gradcheck; all of them are also compared with their peer above.
FULL_GRADCHECK = {"similarity", "info_nce-in_batch-mean", "info_nce-decoupled_index_negatives-mean",
                  "info_nce-symmetric_decoupled-mean", "nt_xent", "clip_bias", "siglip", "supcon_ref", "dcl",
                  "hard_negative", "hard_negative_clamped", "uniformity", "alignment", "cross_correlation",
                  "barlow_twins", "vicreg"}


@pytest.mark.parametrize("name", [c.name for c in CASES if not c.name.endswith(("-sum", "-none"))])
def test_reference_gradcheck(name):
    c = CASE_BY_NAME[name]
    n = 4 if min(c.sizes) <= 4 else min(c.sizes)
    raw = c.build(n, 3, _gen(_seed(name, 99)))
    ours, _, wrt = _prepare(raw, torch.float64, True, torch.float64)
    if name == "dclw":
        # DCLW's weights are constants by definition (lightly detaches them), so only the
        # temperature's derivative is the derivative of the loss as a function.
        wrt = ["temperature"]

    def fn(*xs):
        args = dict(ours, **dict(zip(wrt, xs)))
        return _scalarize(c.ours(args, "reference"), 3)

    assert torch.autograd.gradcheck(fn, tuple(ours[k] for k in wrt), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=name not in FULL_GRADCHECK)


def _backend_params():
    """Every dtype at every size; info_nce's sum / none reductions (an O(N) step after
    the kernels) only in-batch."""
    out = []
    for c in CASES:
        if c.name.startswith("info_nce-") and not c.name.startswith("info_nce-in_batch-") \
                and not c.name.endswith("-mean"):
            continue
        for be in [FAMILY_REFERENCE] + kernel_backends(c.family):
            marks = [pytest.mark.triton] if be == "triton" else []
            for dtype, n in [(dt, n) for dt in (torch.float32, torch.float16, torch.bfloat16) for n in c.sizes]:
                out.append(pytest.param(c.name, be, dtype, n, marks=marks,
                                        id=f"{c.name}-{be}-{str(dtype)[6:]}-N{n}"))
    return out


@pytest.mark.parametrize("name,backend,dtype,n", _backend_params())
def test_fused_backend_equals_formula(name, backend, dtype, n):
    skip_interpreter_bf16(backend, dtype)
    c = CASE_BY_NAME[name]
    _compare(c, n, backend, dtype, TOL[dtype], tensor_scalars=bool(c.scalars), scalar_dtype=torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["info_nce-in_batch-mean", "clip_bias", "siglip", "supcon_ref", "barlow_twins",
                                  "vicreg"])
def test_cuda_tensors_equal_formula(name):
    """On a GPU: the same comparison with CUDA tensors on every backend that runs them."""
    c = CASE_BY_NAME[name]
    fam = c.family
    for be in [FAMILY_REFERENCE] + kernel_backends(fam, "cuda"):
        raw = _make(c, 129)
        ours, mine, wrt = _prepare(raw, torch.float32, True, torch.float32)
        ours = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                for k, v in ours.items()}
        out = c.ours(ours, be)
        ref = c.peer(mine)
        assert rel_err(out.cpu(), ref) <= TOL[torch.float32], (name, be)
        g = _grads(_scalarize(out, 1), [ours[k] for k in wrt])
        gr = _grads(_scalarize(ref, 1), [mine[k] for k in wrt])
        for k, a, b in zip(wrt, g, gr):
            assert rel_err(a.cpu(), b) <= TOL[torch.float32], (name, be, k)


# ------------------------------------------------- the peers agree with each other
def test_peers_info_nce_forms_agree():
    """info_nce_general reproduces info-nce-pytorch, MoCo and CLIP where they overlap."""
    g = _gen(5)
    q, k, neg = _randn(g, 9, 7), _randn(g, 9, 7), _randn(g, 13, 7)
    for red in ("mean", "sum", "none"):
        a = peers.info_nce_general(q, k, None, 0.3, reduction=red)
        b = peers.info_nce_pytorch(q, k, None, 0.3, red)
        assert rel_err(a, b) < 1e-13
        a = peers.info_nce_general(q, k, neg, 0.3, in_batch_negatives=False, reduction=red)
        b = peers.info_nce_pytorch(q, k, neg, 0.3, red)
        assert rel_err(a, b) < 1e-13
    assert rel_err(peers.moco_loss(q, k, neg, 0.3), peers.info_nce_pytorch(q, k, neg, 0.3)) < 1e-13
    sym = peers.info_nce_general(q, k, None, 0.25, symmetric=True)
    clip = peers.clip_loss(peers.unit(q), peers.unit(k), 4.0)
    assert rel_err(sym, clip) < 1e-13


def test_peers_supcon_forms_agree():
    """The per-anchor SupCon equals SupContrast (two views: every anchor has a positive),
    and SupContrast without labels is SimCLR's NT-Xent (lightly's)."""
    g = _gen(6)
    bsz, d = 11, 7
    views = peers.unit(_randn(g, bsz, 2, d))
    lab = _labels(g, bsz, 4)
    flat = torch.cat([views[:, 0], views[:, 1]])
    a = peers.supcon(flat, lab.repeat(2), 0.2)
    b = peers.supcon_supcontrast(views, lab, 0.2, 0.2)
    assert rel_err(a, b) < 1e-13
    c = peers.supcon_supcontrast(views, None, 0.4, 0.4)
    assert rel_err(c, peers.nt_xent(views[:, 0], views[:, 1], 0.4)) < 1e-13


def test_nt_xent_is_supcon_without_labels():
    """SupContrast's remark: without labels SupCon degenerates to SimCLR; ours too."""
    g = _gen(8)
    z1, z2 = _randn(g, 10, 9), _randn(g, 10, 9)
    lab = torch.arange(10).repeat(2)
    a = ck.nt_xent(z1, z2, 0.3, backend="reference")
    b = ck.supcon_loss(torch.cat([z1, z2]), lab, 0.3, backend="reference")
    assert rel_err(a, b) < 1e-13


def test_one_row_refused_like_batchnorm():
    """N = 1: every standardized feature is 0 (z - mean = 0), so C = 0, the Barlow Twins loss is
    the constant D and every gradient 0.  The peers' BatchNorm1d (training mode) refuses such a
    batch; so do we, naming the argument, instead of returning a loss that cannot train."""
    z1 = torch.randn(1, 6, dtype=torch.float64)
    z2 = torch.randn(1, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm1d(6, affine=False, dtype=torch.float64).train()(z1)
    for be in ["reference", FAMILY_REFERENCE]:
        with pytest.raises(ValueError, match=r"z1 needs at least 2 rows, got shape \(1, 6\)"):
            ck.cross_correlation(z1, z2, backend=be)
        with pytest.raises(ValueError, match=r"z1 needs at least 2 rows, got shape \(1, 6\)"):
            ck.barlow_twins_loss(z1, z2, backend=be)
    # Two rows are the smallest batch: standardized features are +-1, so C_ii = +-1 exactly.
    z = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    c = ck.cross_correlation(z, z, eps=1e-300, backend="reference")
    assert abs(c[0, 0].item() - 1.0) < 1e-12 and abs(c[0, 1].item() + 1.0) < 1e-12


def test_hcl_clamp_case_is_clamped():
    """The clamped case really exercises the clamp (else it would test nothing new)."""
    c = CASE_BY_NAME["hard_negative_clamped"]
    t = _make(c, 7)
    z = peers.unit(torch.cat([t["z1"], t["z2"]]))
    n = 7
    s = z @ z.T / t["temperature"]
    neg_mask = ~torch.eye(2 * n, dtype=torch.bool)
    neg_mask[torch.arange(2 * n), (torch.arange(2 * n) + n) % (2 * n)] = False
    neg = s.exp()[neg_mask].view(2 * n, -1)
    pos = torch.cat([(z[:n] * z[n:]).sum(1)] * 2).div(t["temperature"]).exp()
    ng = (-0.6 * (2 * n - 2) * pos + (neg * neg).sum(1) / neg.mean(1)) / 0.4
    assert (ng < (2 * n - 2) * math.exp(-1 / t["temperature"])).all()


def _hcl_exact(z1, z2, temperature, beta, tau_plus, normalize):
    """The authors' HCL formula (peers.hcl) in 60-digit arithmetic (mpmath, which torch
    installs through sympy): no overflow at any temperature."""
    import mpmath as mp

    def rows(z):
        out = [[mp.mpf(v) for v in r] for r in z]
        if normalize:
            out = [[v / mp.sqrt(sum(u * u for u in r)) for v in r] for r in out]
        return out

    n = len(z1)
    z = rows(z1) + rows(z2)
    t, n_neg = mp.mpf(temperature), 2 * n - 2
    dot = lambda x, y: sum(u * v for u, v in zip(x, y))  # noqa: E731
    total = mp.mpf(0)
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        neg = [mp.exp(dot(z[i], z[j]) / t) for j in range(2 * n) if j not in (i, p)]
        pos = mp.exp(dot(z[i], z[p]) / t)
        imp = [v ** beta for v in neg]
        reweight = sum(a * b for a, b in zip(imp, neg)) / (sum(imp) / n_neg)
        ng = max((-tau_plus * n_neg * pos + reweight) / (1 - tau_plus), n_neg * mp.exp(-1 / t))
        total += mp.log1p(ng / pos)  # -log(pos / (pos + ng))
    return total / (2 * n)


@pytest.mark.parametrize("temperature,beta,tau_plus,normalize,scale", [
    (1e-3, 1.0, 0.1, True, 1.0), (5e-4, 0.5, 0.05, True, 1.0), (0.02, 1.0, 0.1, False, 3.0)],
    ids=["t1e-3", "t5e-4-beta0.5", "raw-t0.02"])
def test_hcl_at_small_temperatures_is_exact(temperature, beta, tau_plus, normalize, scale):
    """Where the authors' exp(s/t) overflows float64 (s/t > 709; it gave NaN in the reference
    backend, which float64 inputs take by default): the reference (float64) and every fused
    backend (float32, the same rounded inputs) against the formula in 60 digits, the loss and
    (finite differences in 60 digits) both gradients."""
    import mpmath as mp
    mp.mp.dps = 60
    g = torch.Generator().manual_seed(5)
    n, d = 3, 4
    z1 = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).float().double()
    z2 = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).float().double()
    kw = dict(beta=beta, tau_plus=tau_plus, normalize=normalize)
    x1, x2 = z1.tolist(), z2.tolist()
    want = _hcl_exact(x1, x2, temperature, beta, tau_plus, normalize)
    assert want > 1, "a loss of order s/t (the exps overflow float64; not a confident batch's ~0)"

    def exact_grad(which):
        out = torch.zeros(n, d, dtype=torch.float64)
        for i in range(n):
            for j in range(d):
                def f(v, i=i, j=j):
                    a, b = [r[:] for r in x1], [r[:] for r in x2]
                    (a if which == 0 else b)[i][j] = v
                    return _hcl_exact(a, b, temperature, beta, tau_plus, normalize)
                out[i, j] = float(mp.diff(f, mp.mpf((x1 if which == 0 else x2)[i][j])))
        return out
    grads = [exact_grad(0), exact_grad(1)]
    for be, dtype, tol in [("reference", torch.float64, F64_TOL)] + [
            (b, torch.float32, TOL[torch.float32]) for b in kernel_backends("lse")]:
        a, b = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
        loss = ck.hard_negative_loss(a, b, temperature, backend=be, **kw)
        got = torch.autograd.grad(loss, [a, b])
        assert torch.isfinite(loss) and abs(loss.item() - float(want)) <= tol * float(want), (be, loss.item(),
                                                                                           float(want))
        for k in range(2):
            assert rel_err(got[k], grads[k]) <= tol, (be, k, rel_err(got[k], grads[k]))
