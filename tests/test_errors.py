"""Every bad input of SPEC.md gets a ValueError/TypeError naming the argument and what
was seen; non-finite inputs give a non-finite loss; backends that cannot run say why."""
import math
import re

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import BackendError

from helpers import kernel_backends, skip_interpreter_bf16

_g = torch.Generator().manual_seed(0)  # not the global generator: its state at import depends on collection order
X = torch.randn(6, 4, generator=_g)
Y = torch.randn(6, 4, generator=_g)
LAB = torch.tensor([0, 1, 0, 1, 2, 2])

# (call, exception type, regex that must appear: the argument's name and what was seen)
PAIR_FNS = {
    "info_nce": lambda a, b: ck.info_nce(a, b, backend="reference"),
    "nt_xent": lambda a, b: ck.nt_xent(a, b, backend="reference"),
    "clip_loss": lambda a, b: ck.clip_loss(a, b, 10.0, backend="reference"),
    "siglip_loss": lambda a, b: ck.siglip_loss(a, b, 10.0, -10.0, backend="reference"),
    "dcl_loss": lambda a, b: ck.dcl_loss(a, b, backend="reference"),
    "hard_negative_loss": lambda a, b: ck.hard_negative_loss(a, b, backend="reference"),
    "alignment_loss": lambda a, b: ck.alignment_loss(a, b),
    "cross_correlation": lambda a, b: ck.cross_correlation(a, b, backend="reference"),
    "barlow_twins_loss": lambda a, b: ck.barlow_twins_loss(a, b, backend="reference"),
    "vicreg_loss": lambda a, b: ck.vicreg_loss(a, b, backend="reference"),
}
FIRST = {"info_nce": "query", "clip_loss": "image", "siglip_loss": "image", "alignment_loss": "x"}
SECOND = {"info_nce": "key", "clip_loss": "text", "siglip_loss": "text", "alignment_loss": "y"}


def first(name):
    return FIRST.get(name, "z1")


def second(name):
    return SECOND.get(name, "z2")


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_wrong_rank(name):
    with pytest.raises(ValueError, match=rf"{first(name)} must be 2-D.*shape \(6, 4, 1\)"):
        PAIR_FNS[name](X[..., None], Y)
    with pytest.raises(ValueError, match=rf"{second(name)} must be 2-D.*shape \(6,\)"):
        PAIR_FNS[name](X, Y[:, 0])


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_not_a_tensor(name):
    with pytest.raises(TypeError, match=rf"{first(name)} must be a torch.Tensor.*list"):
        PAIR_FNS[name](X.tolist(), Y)


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_feature_dim_mismatch(name):
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(6, 5\)|4.*5"):
        PAIR_FNS[name](X, torch.randn(6, 5))


@pytest.mark.parametrize("name", sorted(n for n in PAIR_FNS if n not in ("info_nce",)))
def test_batch_mismatch(name):
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(5, 4\)"):
        PAIR_FNS[name](X, torch.randn(5, 4))


def test_info_nce_too_few_keys():
    with pytest.raises(ValueError, match=r"key has 5 rows but query has 6"):
        ck.info_nce(X, torch.randn(5, 4))


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_empty_batch(name):
    with pytest.raises(ValueError, match=rf"{first(name)} is empty: shape \(0, 4\)"):
        PAIR_FNS[name](X[:0], Y[:0])


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_dtype_mismatch(name):
    with pytest.raises(ValueError, match=r"float32.*float64|float64.*float32"):
        PAIR_FNS[name](X, Y.double())


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_integer_input(name):
    with pytest.raises(TypeError, match=rf"{first(name)} must be float32.*torch.int64"):
        PAIR_FNS[name](X.long(), Y.long())


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_device_mismatch(name):
    with pytest.raises(ValueError, match=r"cpu.*meta|meta.*cpu"):
        PAIR_FNS[name](X, Y.to("meta"))


@pytest.mark.parametrize("temperature", [0.0, -0.0, math.inf, -math.inf, math.nan, torch.tensor(0.0),
                                         torch.tensor(math.nan)])
@pytest.mark.parametrize("fn", ["info_nce", "nt_xent", "supcon_loss", "dcl_loss", "hard_negative_loss"])
def test_bad_temperature(fn, temperature):
    call = {"info_nce": lambda: ck.info_nce(X, Y, temperature=temperature),
            "nt_xent": lambda: ck.nt_xent(X, Y, temperature),
            "supcon_loss": lambda: ck.supcon_loss(X, LAB, temperature),
            "dcl_loss": lambda: ck.dcl_loss(X, Y, temperature),
            "hard_negative_loss": lambda: ck.hard_negative_loss(X, Y, temperature)}[fn]
    with pytest.raises(ValueError, match=r"temperature must be"):
        call()


def test_temperature_wrong_type():
    with pytest.raises(TypeError, match=r"temperature must be a number or a one-element tensor, got str"):
        ck.nt_xent(X, Y, "0.5")
    with pytest.raises(ValueError, match=r"temperature must be a scalar.*\(2,\)"):
        ck.nt_xent(X, Y, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_bad_logit_scale_and_bias(bad):
    with pytest.raises(ValueError, match=r"logit_scale must be finite"):
        ck.clip_loss(X, Y, bad)
    with pytest.raises(ValueError, match=r"logit_bias must be finite"):
        ck.siglip_loss(X, Y, 10.0, bad)


def test_labels_checks():
    with pytest.raises(ValueError, match=r"labels must have one entry per row of embeddings \(length 6\), got length 5"):
        ck.supcon_loss(X, LAB[:5])
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got torch.float32"):
        ck.supcon_loss(X, LAB.float())
    with pytest.raises(ValueError, match=r"labels must be 1-D, got shape \(6, 1\)"):
        ck.supcon_loss(X, LAB[:, None])
    with pytest.raises(TypeError, match=r"labels must be a 1-D integer torch.Tensor, got list"):
        ck.supcon_loss(X, LAB.tolist())
    with pytest.raises(ValueError, match=r"ref_labels must have one entry per row of ref_embeddings \(length 4\)"):
        ck.supcon_loss(X, LAB, ref_embeddings=torch.randn(4, 4), ref_labels=LAB)
    with pytest.raises(ValueError, match=r"ref_embeddings and ref_labels must be given together"):
        ck.supcon_loss(X, LAB, ref_embeddings=torch.randn(4, 4))


def test_positive_index_checks():
    with pytest.raises(ValueError, match=r"positive_index must index the 6 keys.*\[0, 6\]"):
        ck.info_nce(X, Y, positive_index=torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(ValueError, match=r"positive_index must have shape \(6,\).*\(5,\)"):
        ck.info_nce(X, Y, positive_index=torch.arange(5))
    with pytest.raises(TypeError, match=r"positive_index must be an integer tensor"):
        ck.info_nce(X, Y, positive_index=torch.arange(6).float())


def test_info_nce_mode_conflicts():
    with pytest.raises(ValueError, match=r"symmetric=True needs as many keys as queries"):
        ck.info_nce(X, torch.randn(8, 4), symmetric=True)
    with pytest.raises(ValueError, match=r"symmetric=True cannot be combined with negatives"):
        ck.info_nce(X, Y, symmetric=True, negatives=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        ck.info_nce(X, Y, reduction="avg")
    with pytest.raises(ValueError, match=r"decoupled=True with in_batch_negatives=False and no negatives"):
        ck.info_nce(X, Y, decoupled=True, in_batch_negatives=False)


def test_path_and_small_batches():
    with pytest.raises(ValueError, match=r"path must be one of 'auto', 'gram', 'tiled', got 'dense'"):
        ck.barlow_twins_loss(X, Y, path="dense")
    with pytest.raises(ValueError, match=r"z1 needs at least 2 rows, got shape \(1, 4\)"):
        ck.vicreg_loss(X[:1], Y[:1])
    with pytest.raises(ValueError, match=r"x needs at least 2 rows"):
        ck.uniformity_loss(X[:1])
    # Batch standardization of one row (BatchNorm1d refuses it too): a constant loss, zero gradient.
    for be in ("cpu", "reference"):
        with pytest.raises(ValueError, match=r"barlow_twins_loss standardizes .*z1 needs at least 2 rows, got "
                                             r"shape \(1, 4\)"):
            ck.barlow_twins_loss(X[:1], Y[:1], backend=be)
        with pytest.raises(ValueError, match=r"cross_correlation standardizes .*z1 needs at least 2 rows"):
            ck.cross_correlation(X[:1], Y[:1], backend=be)
        # Unstandardized, one row is a plain outer product.
        c = ck.cross_correlation(X[:1], Y[:1], standardize=False, backend=be)
        torch.testing.assert_close(c.float(), X[:1].T @ Y[:1])
    with pytest.raises(ValueError, match=r"dcl_loss needs at least 2 pairs"):
        ck.dcl_loss(X[:1], Y[:1])


def test_eps_must_be_non_negative():
    """eps may be 0 (BatchNorm and lightly's VICReg take it), not negative or non-finite."""
    for fn in (ck.barlow_twins_loss, ck.vicreg_loss, ck.cross_correlation):
        with pytest.raises(ValueError, match=r"eps must be >= 0, got -0.001"):
            fn(X, Y, eps=-1e-3)
        with pytest.raises(ValueError, match=r"eps must be finite, got nan"):
            fn(X, Y, eps=float("nan"))
        assert torch.isfinite(fn(X, Y, eps=0.0)).all()


def test_unknown_backend_name():
    with pytest.raises(BackendError, match=r"backend must be one of auto, cuda, triton, cpu, reference; got 'gpu'"):
        ck.nt_xent(X, Y, backend="gpu")
    with pytest.raises(TypeError, match=r"backend must be a string"):
        ck.nt_xent(X, Y, backend=3)


def test_env_backend(monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_KERNELS_BACKEND", "nonsense")
    with pytest.raises(BackendError, match=r"CONTRASTIVE_KERNELS_BACKEND='nonsense' is not a backend"):
        ck.nt_xent(X, Y)
    with pytest.raises(BackendError, match=r"CONTRASTIVE_KERNELS_BACKEND='nonsense' is not a backend"):
        ck.alignment_loss(X, Y)  # (an O(N D) loss computed the same way on every backend: still checked)
    monkeypatch.setenv("CONTRASTIVE_KERNELS_BACKEND", "reference")
    assert torch.allclose(ck.nt_xent(X, Y), ck.nt_xent(X, Y, backend="reference"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_backend_unavailable_says_why(monkeypatch):
    monkeypatch.delenv("CONTRASTIVE_KERNELS_CUDA_EMULATE", raising=False)  # CPU tensors: no emulator either
    with pytest.raises(BackendError, match=r"backend 'cuda' cannot run the lse family here: .*CUDA tensors only"):
        ck.nt_xent(X, Y, backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match=r"backend 'triton' cannot run .*(TRITON_INTERPRET=1|no Triton kernel)"):
        ck.nt_xent(X, Y, backend="triton")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float64_on_kernel_backend(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendError, match=rf"backend '{backend}' supports float32, float16 and bfloat16 inputs; "
                                           r"got torch.float64"):
        ck.nt_xent(X.double(), Y.double(), backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("lse"))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_gives_non_finite_loss(backend, bad):
    a = X.clone()
    a[2, 1] = bad
    for loss in (ck.nt_xent(a, Y, backend=backend), ck.clip_loss(a, Y, 10.0, backend=backend),
                 ck.info_nce(a, Y, backend=backend, normalize=False)):
        assert not torch.isfinite(loss), f"{backend}: a {bad} input gave the finite loss {loss}"


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("lse"))
def test_infinite_target_logit_is_not_a_confident_row(backend):
    """Row 2's only +inf logit is its target and every other logit of row 2 and column 2 is -inf:
    the limit of the cross-entropy is 0, but the input is not finite, so the loss must not be."""
    a, b = X.clone(), Y.clone()
    a[2, 1] = math.inf
    b[:, 1] = -1.0
    b[2, 1] = 1.0
    for loss in (ck.clip_loss(a, b, 10.0, backend=backend), ck.info_nce(a, b, backend=backend, normalize=False),
                 ck.info_nce(a, b, backend=backend, normalize=False, symmetric=True)):
        assert not torch.isfinite(loss), f"{backend}: a +inf target logit gave the finite loss {loss}"


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("pairwise"))
def test_non_finite_siglip(backend):
    a = X.clone()
    a[0, 0] = math.nan
    assert not torch.isfinite(ck.siglip_loss(a, Y, 10.0, -10.0, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("pairwise"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_finite_siglip_terms_with_limit_zero(backend, dtype):
    """+inf at row 2's positive, -inf at its negatives: every term of row 2 has the limit 0, the
    loss must still not be finite.  (Both precisions: the CUDA float32 path splits its inputs,
    inf - inf, which would hide the 16-bit one.)"""
    skip_interpreter_bf16(backend, dtype)
    a, b = X.clone(), Y.clone()
    a[2, 1] = math.inf
    b[:, 1] = -1.0
    b[2, 1] = 1.0
    for negative_only in (False, True):
        loss = ck.siglip_loss(a.to(dtype), b.to(dtype), 10.0, -10.0, negative_only=negative_only, backend=backend)
        assert not torch.isfinite(loss), f"{backend}: an infinite {dtype} input gave the finite loss {loss}"


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("lse"))
def test_non_finite_uniformity(backend):
    a = X.clone()
    a[2, 1] = math.inf  # the pairs of row 2 have distance inf: exp(-t inf) = 0 in the limit
    assert not torch.isfinite(ck.uniformity_loss(a, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("xcorr"))
def test_non_finite_barlow(backend):
    a = X.clone()
    a[0, 0] = math.inf
    assert not torch.isfinite(ck.barlow_twins_loss(a, Y, backend=backend))
    assert not torch.isfinite(ck.vicreg_loss(a, Y, backend=backend))


def test_error_messages_name_argument_once_more():
    # A spot check that messages carry the shapes seen, not just "invalid input".
    with pytest.raises(ValueError) as info:
        ck.clip_loss(X, torch.randn(7, 4), 10.0)
    assert re.search(r"image.*text", str(info.value)) and "(6, 4)" in str(info.value) and "(7, 4)" in str(info.value)
