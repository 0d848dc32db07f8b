"""Backend choice, the torch.library registrations (opcheck) and torch.compile(fullgraph=True)."""
import warnings

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import _ext, _families, backends

from helpers import _suffix, backend_params, kernel_backends


def test_available_backends_lists_reference_and_built_kernels():
    av = ck.available_backends()
    assert av[-1] == "reference"
    if _ext.load() is not None and kernel_backends("lse"):
        assert "cpu" in av


def test_auto_resolution():
    dev = torch.device("cpu")
    assert backends.resolve("auto", "lse", dev, torch.float64) == "reference"
    expected = "cpu" if "cpu" in kernel_backends("lse") else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends.resolve("auto", "lse", dev, torch.float32) == expected
    assert backends.resolve("REFERENCE", "lse", dev, torch.float32) == "reference"


def test_auto_float64_uses_the_reference_with_one_warning():
    """float64 has no kernel: `auto` computes it with the reference and says so once."""
    backends._warn_auto_dtype.cache_clear()
    x = torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = ck.nt_xent(x, x + 0.1)
        b = ck.info_nce(x, x + 0.2)
        c = ck.nt_xent(x, x + 0.1, backend="reference")  # asked for: no warning
    msgs = [str(m.message) for m in w if "float64 inputs" in str(m.message)]
    assert len(msgs) == 1 and "reference backend computes these" in msgs[0], msgs
    assert a.dtype == torch.float64 and torch.equal(a, c) and torch.isfinite(b)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "_native_error", lambda family, key: "simulated: no kernel built")
    _ext.warn_missing_once.cache_clear()
    x = torch.randn(5, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = ck.nt_xent(x, x + 0.1)
        b = ck.nt_xent(x, x + 0.2)
    msgs = [str(m.message) for m in w if "simulated" in str(m.message)]
    assert len(msgs) == 1 and "reference backend" in msgs[0]
    assert torch.isfinite(a) and torch.isfinite(b)
    _ext.warn_missing_once.cache_clear()


def _lse_args(dtype=torch.float32):
    q, k = torch.randn(7, 5, dtype=dtype), torch.randn(9, 5, dtype=dtype)
    return (q, k, torch.tensor(2.0), torch.rand(7) + 0.5, torch.rand(9) + 0.5, torch.randn(9), None,
            torch.randint(0, 3, (7,)), torch.randint(0, 3, (9,)), 0, 5, True)


def _op(name, backend):
    return getattr(torch.ops.contrastive_kernels, name + _suffix(backend))


@pytest.mark.parametrize("backend", backend_params("lse"))
def test_opcheck_lse(backend):
    args = list(_lse_args())
    args[0].requires_grad_(True)
    args[1].requires_grad_(True)
    torch.library.opcheck(_op("lse_forward", backend), tuple(args))


@pytest.mark.parametrize("backend", backend_params("pairwise"))
def test_opcheck_pairwise(backend):
    q, k = torch.randn(7, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
    torch.library.opcheck(_op("pairwise_forward", backend),
                          (q, k, torch.tensor(3.0), torch.tensor(-1.0), torch.randn(7), None, None, 0, 0))


@pytest.mark.parametrize("backend", backend_params("xcorr"))
@pytest.mark.parametrize("path", [1, 2])
def test_opcheck_xcorr(backend, path):
    a, b = torch.randn(6, 11, requires_grad=True), torch.randn(6, 11, requires_grad=True)
    torch.library.opcheck(_op("xcorr_forward", backend), (a, b, path))


@pytest.mark.parametrize("backend", backend_params("similarity"))
def test_opcheck_similarity(backend):
    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    torch.library.opcheck(_op("similarity_forward", backend), (a, b, torch.tensor(2.0), True))


@pytest.mark.parametrize("backend", backend_params("lse"))
def test_opcheck_lse2(backend):
    """The two-scale ops (HCL's one pass, every backend; _families._LseTwoScales is their autograd):
    schema, fake tensors and dispatch, forward and backward, q and k distinct, masks and rscales."""
    q, k = torch.randn(7, 5), torch.randn(9, 5)
    qr, kr = torch.rand(7) + 0.5, torch.rand(9) + 0.5
    s1, s0, pos = torch.tensor(3.0), torch.tensor(-1.0), torch.randint(0, 9, (7,))
    torch.library.opcheck(_op("lse2_forward", backend), (q, k, s1, s0, qr, kr, pos, 1, 3))
    r1, r0 = _op("lse2_forward", backend)(q, k, s1, s0, qr, kr, pos, 1, 3)
    torch.library.opcheck(_op("lse2_backward", backend),
                          (torch.randn(7), torch.randn(7), q, k, s1, s0, qr, kr, pos, 1, 3, r1, r0, True, True, True,
                           True, True, False))


def test_opcheck_label_group_sum():
    ref = torch.randn(9, 4, requires_grad=True)
    torch.library.opcheck(_families.label_group_sum, (torch.randint(0, 3, (7,)), torch.randint(0, 3, (9,)), ref))


def _losses(backend):
    def f(a, b, scale, bias, lab):
        return (ck.nt_xent(a, b, backend=backend) + ck.clip_loss(a, b, scale, backend=backend)
                + ck.info_nce(a, b, symmetric=True, backend=backend)
                + ck.supcon_loss(a, lab, backend=backend) + ck.hard_negative_loss(a, b, backend=backend)
                + ck.dcl_loss(a, b, weight_sigma=0.5, backend=backend) + ck.uniformity_loss(b, scale / 4, backend=backend))
    return f


@pytest.mark.parametrize("backend", backend_params("lse"))
def test_compile_fullgraph_lse_losses(backend):
    torch._dynamo.reset()
    a, b = torch.randn(9, 6, requires_grad=True), torch.randn(9, 6, requires_grad=True)
    scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(0.0)
    lab = torch.randint(0, 3, (9,))
    f = _losses(backend)
    eager = f(a, b, scale, bias, lab)
    ge = torch.autograd.grad(eager, [a, b, scale])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(a, b, scale, bias, lab)
    gc = torch.autograd.grad(out, [a, b, scale])
    assert torch.allclose(out, eager, rtol=1e-6)
    for x, y in zip(gc, ge):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params("pairwise"))
def test_compile_fullgraph_siglip(backend):
    torch._dynamo.reset()
    a, b = torch.randn(9, 6, requires_grad=True), torch.randn(9, 6, requires_grad=True)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    f = lambda a, b, s, c: ck.siglip_loss(a, b, s, c, backend=backend)  # noqa: E731
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b, scale, bias)
    assert torch.allclose(out, f(a, b, scale, bias), rtol=1e-6)
    out.backward()
    assert bias.grad is not None


@pytest.mark.parametrize("backend", backend_params("xcorr"))
def test_compile_fullgraph_barlow_vicreg(backend):
    torch._dynamo.reset()
    a, b = torch.randn(8, 20, requires_grad=True), torch.randn(8, 20, requires_grad=True)
    f = lambda a, b: ck.barlow_twins_loss(a, b, backend=backend) + ck.vicreg_loss(a, b, backend=backend)  # noqa
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    assert torch.allclose(out, f(a, b), rtol=1e-5)
    out.backward()


@pytest.mark.parametrize("missing, message", [
    ("contrastive_kernels.kernels", "are installed with the package"),
    ("contrastive_kernels.kernels.lse", "no Triton kernel for the lse family yet"),
    ("some_dependency", "failed to import (ModuleNotFoundError"),
])
def test_triton_import_errors_say_what_is_missing(monkeypatch, missing, message):
    """A ModuleNotFoundError while importing the Triton kernels names its real cause."""
    import importlib
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("contrastive_kernels.kernels"):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, *a, **k)

    monkeypatch.setattr(backends, "_triton_import_error", lambda: None)
    monkeypatch.setattr(backends.importlib, "import_module", fake)
    backends._triton_family_error_cached.cache_clear()
    try:
        assert message in backends._triton_family_error_cached("lse")
    finally:
        backends._triton_family_error_cached.cache_clear()


@pytest.mark.parametrize("triton_v, numpy_v, broken", [
    ("3.6.0", "2.4.6", True), ("3.5.1", "2.5.0rc1", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.0", False), ("3.9.0+git5ab1", "2.5.5", False),
])
def test_triton_interpreter_numpy_incompatibility_is_named(monkeypatch, triton_v, numpy_v, broken):
    """Triton < 3.7's interpreter cannot run our kernels with NumPy >= 2.4 (every launch failed with
    an InterpreterError about 0-dimensional arrays, seen with torch 2.11's triton 3.6): backend
    'triton' under TRITON_INTERPRET=1 says so, and what to install, instead."""
    import sys
    import types
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=triton_v))
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__=numpy_v))
    monkeypatch.setattr(backends, "_triton_family_error", lambda family: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends._interpreter_error_cached.cache_clear()
    try:
        why = backends.unavailable_reason("triton", "lse", "cpu")
    finally:
        monkeypatch.undo()
        backends._interpreter_error_cached.cache_clear()
    if broken:
        assert why is not None and f"Triton {triton_v}'s interpreter" in why and f"NumPy {numpy_v}" in why
        assert "numpy<2.4" in why
    else:
        assert why is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason on a machine without a GPU")
def test_no_backend_claims_cuda_tensors_without_cuda():
    """Without CUDA no kernel backend says it can run CUDA tensors (Triton said so when its
    kernels imported: `check --device cuda` then ran, and crashed, instead of saying why)."""
    for be in ("cuda", "triton", "cpu"):
        why = backends.unavailable_reason(be, "lse", "cuda")
        assert why is not None, be
        if be != "triton" or backends._triton_family_error("lse") is None:  # (else: why Triton is missing)
            assert "CUDA" in why or "cuda" in why, (be, why)
