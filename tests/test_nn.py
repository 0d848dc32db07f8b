"""The nn modules: same values as the functional API, learnable parameters get
gradients, the NT-Xent memory bank follows lightly's queue semantics."""
import math

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import nn as cknn

from helpers import kernel_backends

BACKENDS = ["reference"] + kernel_backends("lse")


def _pair(n=9, d=6, dtype=torch.float64):
    return torch.randn(n, d, dtype=dtype, requires_grad=True), torch.randn(n, d, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_equal_functional(backend, monkeypatch):
    """Each module equals its function on every backend (chosen here by the environment
    variable, which modules built without backend= follow like the functions)."""
    monkeypatch.setenv("CONTRASTIVE_KERNELS_BACKEND", backend)
    a, b = _pair(dtype=torch.float64 if backend == "reference" else torch.float32)
    lab = torch.randint(0, 3, (9,))
    clip, sig = cknn.ClipLoss(), cknn.SigLipLoss()
    cases = [
        (cknn.InfoNCELoss(0.2, symmetric=True)(a, b), ck.info_nce(a, b, temperature=0.2, symmetric=True)),
        (cknn.NTXentLoss(0.3)(a, b), ck.nt_xent(a, b, 0.3)),
        (clip(a, b), ck.clip_loss(a, b, clip.logit_scale.exp())),
        (sig(a, b), ck.siglip_loss(a, b, sig.logit_scale.exp(), sig.logit_bias)),
        (cknn.SupConLoss(0.2)(a, lab), ck.supcon_loss(a, lab, 0.2)),
        (cknn.DCLLoss(0.2)(a, b), ck.dcl_loss(a, b, 0.2)),
        (cknn.DCLWLoss(0.2, sigma=0.7)(a, b), ck.dcl_loss(a, b, 0.2, weight_sigma=0.7)),
        (cknn.HardNegativeLoss(0.5, beta=0.5, tau_plus=0.05)(a, b), ck.hard_negative_loss(a, b, 0.5, beta=0.5,
                                                                                           tau_plus=0.05)),
        (cknn.UniformityLoss(1.5)(a), ck.uniformity_loss(a, 1.5)),
        (cknn.BarlowTwinsLoss(0.01)(a, b), ck.barlow_twins_loss(a, b, 0.01)),
        (cknn.VICRegLoss(20.0, 15.0, 2.0)(a, b), ck.vicreg_loss(a, b, 20.0, 15.0, 2.0)),
    ]
    for i, (got, want) in enumerate(cases):
        assert torch.allclose(got.double(), want.double(), rtol=1e-12, atol=0), f"case {i}: {got} != {want}"


@pytest.mark.parametrize("cls", [cknn.InfoNCELoss, cknn.NTXentLoss, cknn.SupConLoss, cknn.DCLLoss, cknn.DCLWLoss,
                                 cknn.HardNegativeLoss])
def test_learnable_temperature_gets_gradient(cls):
    m = cls(0.25, learn_temperature=True)
    assert abs(float(m.temperature.detach()) - 0.25) < 1e-7
    a, b = _pair(dtype=torch.float32)
    loss = m(a, torch.randint(0, 3, (9,))) if cls is cknn.SupConLoss else m(a, b)
    loss.backward()
    g = m.log_temperature.grad
    assert g is not None and torch.isfinite(g) and g != 0
    # d loss / d log t, checked against a central difference of the module itself
    with torch.no_grad():
        eps = 1e-3
        m.log_temperature += eps
        up = m(a, torch.randint(0, 3, (9,))) if cls is cknn.SupConLoss else m(a, b)
        m.log_temperature -= 2 * eps
        down = m(a, torch.randint(0, 3, (9,))) if cls is cknn.SupConLoss else m(a, b)
    if cls is not cknn.SupConLoss:  # (labels are redrawn for SupCon above)
        assert abs((up - down).item() / (2 * eps) - g.item()) < 1e-2 * max(1.0, abs(g.item()))


def test_clip_and_siglip_parameters_get_gradients():
    a, b = _pair(dtype=torch.float32)
    clip = cknn.ClipLoss()
    clip(a, b).backward()
    assert clip.logit_scale.grad is not None and clip.logit_scale.grad != 0
    sig = cknn.SigLipLoss()
    assert abs(sig.logit_scale.exp().item() - 10.0) < 1e-5 and sig.logit_bias.item() == -10.0
    sig(a, b).backward()
    assert sig.logit_scale.grad != 0 and sig.logit_bias.grad != 0


def test_clip_logit_scale_clamped_at_100():
    clip = cknn.ClipLoss(init_logit_scale=math.log(1000.0), backend="reference")
    a, b = _pair()
    assert torch.allclose(clip(a, b), ck.clip_loss(a, b, 100.0, backend="reference"))


def _lightly_bank_formula(out0, out1, bank, temperature):
    """lightly's MoCo branch: logits = [pos, out0 @ bank.T] / t, label 0."""
    out0 = torch.nn.functional.normalize(out0, dim=1)
    out1 = torch.nn.functional.normalize(out1, dim=1)
    logits = torch.cat([(out0 * out1).sum(1, keepdim=True), out0 @ bank.T.to(out0)], 1) / temperature
    return torch.nn.functional.cross_entropy(logits, torch.zeros(len(out0), dtype=torch.long))


@pytest.mark.parametrize("size", [10, (10, 5)])
def test_memory_bank_queue(size):
    torch.manual_seed(3)
    m = cknn.NTXentLoss(0.2, memory_bank_size=size)
    # the bank's initial content: random unit rows drawn with the same RNG as lightly
    torch.manual_seed(3)
    expect_bank = torch.nn.functional.normalize(torch.randn(10, 5), dim=-1)
    if isinstance(size, int):
        assert m.bank.bank.numel() == 0  # dimension unknown until the first batch
        torch.manual_seed(3)
    ptr = 0
    for step in range(4):  # batches of 4 into a queue of 10: wraps at step 2
        a, b = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
        if isinstance(size, int) and step == 0:
            torch.manual_seed(3)
            expect_bank = torch.nn.functional.normalize(torch.randn(10, 5), dim=-1)
            torch.manual_seed(3)
            m.bank.bank = torch.empty(0)  # re-init from the same seed as the formula
        loss = m(a, b)
        want = _lightly_bank_formula(a, b, expect_bank, 0.2)
        assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6), (step, loss, want)
        nb = torch.nn.functional.normalize(b, dim=1)
        if ptr + 4 >= 10:
            expect_bank[ptr:] = nb[: 10 - ptr]
            ptr = 0
        else:
            expect_bank[ptr:ptr + 4] = nb
            ptr += 4
        assert int(m.bank.ptr) == ptr
        assert torch.allclose(m.bank.bank, expect_bank, atol=1e-7)


def test_memory_bank_not_updated_without_grad():
    m = cknn.NTXentLoss(memory_bank_size=(8, 3))
    before = m.bank.bank.clone()
    m(torch.randn(4, 3), torch.randn(4, 3))
    assert torch.equal(before, m.bank.bank) and int(m.bank.ptr) == 0


def test_memory_bank_bad_sizes():
    with pytest.raises(ValueError, match=r"memory_bank_size must be a non-negative int or \(size, dim\)"):
        cknn.NTXentLoss(memory_bank_size=-1)
    with pytest.raises(TypeError, match=r"memory_bank_size must be an int or a \(size, dim\) tuple"):
        cknn.NTXentLoss(memory_bank_size=2.5)
    m = cknn.NTXentLoss(memory_bank_size=(8, 3))
    with pytest.raises(ValueError, match=r"memory bank holds rows of dim 3, got a batch of shape \(4, 5\)"):
        m(torch.randn(4, 5), torch.randn(4, 5))


@pytest.mark.parametrize("name", cknn.__all__)
def test_distributed_argument_checked(name):
    """SPEC: every nn module takes distributed= and process_group= (checked when built)."""
    cls = getattr(cknn, name)
    with pytest.raises(ValueError, match=r"distributed must be None, 'gather' or 'ring'; got 'allgather'"):
        cls(distributed="allgather")
    with pytest.raises(ValueError, match=r"process_group is only used with distributed="):
        cls(process_group=object())
    cls(distributed="ring")  # accepted (the process group is needed at the first forward)


def test_hard_negative_module_checks_its_arguments():
    with pytest.raises(ValueError, match="tau_plus"):
        cknn.HardNegativeLoss(tau_plus=1.5)
    with pytest.raises((ValueError, TypeError), match="beta"):
        cknn.HardNegativeLoss(beta="x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_run_on_every_backend(backend):
    a, b = _pair(dtype=torch.float32)
    loss = cknn.NTXentLoss(backend=backend)(a, b) + cknn.ClipLoss(backend=backend)(a, b)
    loss.backward()
    assert torch.isfinite(loss) and a.grad is not None and b.grad is not None


def test_state_dict_roundtrip():
    m = cknn.SigLipLoss()
    m2 = cknn.SigLipLoss(init_logit_scale=0.0, init_logit_bias=0.0)
    m2.load_state_dict(m.state_dict())
    assert m2.logit_bias.item() == -10.0
