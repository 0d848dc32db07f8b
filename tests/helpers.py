"""Shared test utilities: tolerances from SPEC.md, backends to test, error measures,
and an honest peak-memory probe (a fresh subprocess per measurement)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import contrastive_kernels as ck
from contrastive_kernels import _families as fam
from contrastive_kernels import backends
from contrastive_kernels.reference import LSE_NORM, MASK_DIAG, MASK_POS

# SPEC.md: relative error (norm of difference / norm of reference) against the float64
# reference of the same (rounded) inputs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_SIZES = (1, 7, 129)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    if denom <= 1e-12:  # the reference is zero up to float64 rounding: absolute error
        return diff
    return diff / denom


def assert_close_rel(x, ref, dtype, what=""):
    tol = TOL[dtype]
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} (dtype {dtype})"


def confident_pairs(n: int, d: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows x and their close copies y (float64, drawn from g: x first, then the noise): aligned
    pairs, the trained regime where at a temperature of 0.01 .. 0.1 the positive dominates."""
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = x + noise * torch.randn(n, d, generator=g, dtype=torch.float64) / d ** 0.5
    return x, y / y.norm(dim=1, keepdim=True)


def kernel_backends(family: str, device: str = "cpu") -> list[str]:
    """Fused backends that can run `family` on `device` here (cpu; triton under TRITON_INTERPRET=1;
    cuda under CONTRASTIVE_KERNELS_CUDA_EMULATE=1 with the emulator built)."""
    return [b for b in ("cpu", "triton", "cuda") if backends.unavailable_reason(b, family, device) is None]


def _suffix(backend: str, device: str = "cpu") -> str:
    """Name suffix of a backend's raw family ops for tensors on `device` (`<op>` + suffix)."""
    if backend == "triton":
        return "_triton"
    return "_cuda_emu" if backend == "cuda" and device == "cpu" else ""


def backend_params(family: str, device: str = "cpu") -> list:
    """`kernel_backends` as pytest params; Triton ones carry the `triton` marker, so CI can
    run them alone under TRITON_INTERPRET=1 (`pytest -m triton`)."""
    import pytest
    return [pytest.param(b, marks=[pytest.mark.triton] if b == "triton" else [], id=b)
            for b in kernel_backends(family, device)]


def interpreter_bf16_broken(backend: str) -> bool:
    """The Triton interpreter computes bfloat16 wrongly (triton-lang/triton#4972, seen with
    triton 3.9: a bf16 tl.dot + exp tile off by 1.0): bf16 Triton is checked on a GPU only."""
    return backend == "triton" and backends.triton_interpret() and not torch.cuda.is_available()


def skip_interpreter_bf16(backend: str, dtype) -> None:
    import pytest
    if dtype == torch.bfloat16 and interpreter_bf16_broken(backend):
        pytest.skip("bfloat16 Triton needs a GPU (the interpreter computes bfloat16 wrongly)")


def peak_rss_growth(setup: str, body: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run `setup` then `body` in a fresh Python process; return the growth of the peak
    resident set size (bytes) caused by `body`, measured with getrusage (ru_maxrss).

    The setup's allocations (inputs, warm-up) are excluded by reading ru_maxrss after it;
    the body runs once. ru_maxrss is the process's high-water mark, so anything the body
    allocates transiently (an N x M matrix in a backward, say) shows up."""
    code = textwrap.dedent("""
        import json, resource, gc, torch
        torch.set_num_threads(torch.get_num_threads())
        {setup}
        gc.collect()
        _before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        {body}
        _after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("PEAK_JSON " + json.dumps({{"before": _before, "after": _after, "growth": _after - _before}}))
    """).format(setup=textwrap.dedent(setup), body=textwrap.dedent(body))
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                         timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"memory probe failed:\n{out.stdout}\n{out.stderr}")
    line = [l for l in out.stdout.splitlines() if l.startswith("PEAK_JSON ")][-1]
    return json.loads(line[len("PEAK_JSON "):])


# ------------------------------------------ two scales of one product (HCL's lse_two_scales)
def two_scale_case(case, n, d, dtype, device="cpu", seed=0):
    """(q, k or None when k is q, scale1, scale0, rscale?, pos_index, diag_offset, mask_mode) of the
    op's uses: HCL's (q is k, own rows and positives masked, normalized), the distributed ring's
    blocks (another k, diag_offset and pos_index shifted, normalized or not) and scales of every sign."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(dtype).to(device)
    if case == "hcl":  # 2N rows, i's positive i + N mod 2N; an odd n (not HCL's) the reversal n - 1 - i:
        # both involutions, so the C++ CPU kernels take their symmetric tile loop at every n
        pos = ((torch.arange(n) + n // 2) % n if n % 2 == 0 else torch.arange(n - 1, -1, -1)).to(device)
        return q, None, 4.0, 2.0, True, pos, 0, MASK_DIAG | MASK_POS
    m = n + 5
    k = torch.randn(m, d, generator=g).to(dtype).to(device)
    if case == "ring-plain":  # no normalization, a negative second scale
        return q, k, 1.5, -0.5, False, None, 3, MASK_DIAG
    pos = torch.randint(0, m, (n,), generator=g).to(device)  # beta = 0: the second scale is 0
    return q, k, 3.0, 0.0, True, pos, 2, MASK_DIAG | MASK_POS


def two_scales_run(backend, q, k, s1, s0, rscale, pos, diag, mode, dtype=None, seed=1):
    """(l1, l0, grads of q, k, scale1, scale0) of a fixed random linear functional of both outputs,
    its weights of the signs HCL's are (l1 - l0: positive on l1, negative on l0), so that d scale1 /
    d scale0 are sums of one sign's terms per row (random signs made them cancel: at n = 7, 76 times
    their size, past what float32 products can meet at 1e-5).  The kernels take detached rscales with
    LSE_NORM (their Jacobian folded in); the float64 reference differentiates through rscales that
    carry their history."""
    same = k is None
    qa = q.detach().to(dtype or q.dtype).clone().requires_grad_()
    ka = qa if same else k.detach().to(dtype or k.dtype).clone().requires_grad_()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    sc1 = torch.tensor(s1, dtype=sdt, device=q.device, requires_grad=True)
    sc0 = torch.tensor(s0, dtype=sdt, device=q.device, requires_grad=True)
    kw = dict(pos_index=pos, diag_offset=diag)
    if backend == backends.FAMILY_REFERENCE:
        if rscale:
            kw.update(q_rscale=1 / qa.norm(dim=1).clamp_min(1e-12), k_rscale=1 / ka.norm(dim=1).clamp_min(1e-12))
        l1, l0 = fam.lse_two_scales(backend, qa, ka, sc1, sc0, mask_mode=mode, **kw)
    else:
        if rscale:
            qr = qa.detach().float().norm(dim=1).clamp_min(1e-12).reciprocal()
            kw.update(q_rscale=qr, k_rscale=qr if same else ka.detach().float().norm(dim=1).clamp_min(1e-12).reciprocal())
        l1, l0 = fam.lse_two_scales(backend, qa, ka, sc1, sc0, mask_mode=mode | (LSE_NORM if rscale else 0), **kw)
    g = torch.Generator().manual_seed(seed)
    w1 = (0.5 + torch.rand(l1.shape[0], generator=g)).to(l1)
    w0 = -(0.5 + torch.rand(l0.shape[0], generator=g)).to(l0)
    fin = lambda x: torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # noqa: E731
    leaves = [qa, sc1, sc0] if same else [qa, ka, sc1, sc0]
    grads = list(torch.autograd.grad((fin(l1) * w1).sum() + (fin(l0) * w0).sum(), leaves))
    if same:
        grads.insert(1, None)
    return l1.detach(), l0.detach(), grads


def assert_two_scales_close(got, want, dtype, what, grad_dtype=None):
    """two_scales_run's results against another run's (the float64 reference, or the lse ops run
    twice): l1 and l0 with the same finite pattern (-inf where nothing is kept) and within SPEC's
    relative tolerance on the finite rows; dq, dk (of `grad_dtype`, the input's, when given), d scale1,
    d scale0 (float32) finite and within it."""
    for name, a, b in zip(("l1", "l0"), got[:2], want[:2]):
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"{what}: {name} finite pattern differs\n{a}\n{b}"
        assert (a[~fin] == float("-inf")).all(), f"{what}: {name}: rows with nothing kept must be -inf"
        e = rel_err(a[fin], b[fin]) if fin.any() else 0.0
        assert e <= TOL[dtype], f"{what}: {name} relative error {e:.2e}"
    for name, a, b in zip(("dq", "dk", "dscale1", "dscale0"), got[2], want[2]):
        if b is None:
            continue
        if grad_dtype is not None:
            assert a.dtype == (grad_dtype if name in ("dq", "dk") else torch.float32), f"{what}: {name} dtype {a.dtype}"
        assert a.shape == b.shape and torch.isfinite(a).all(), f"{what}: {name} shape or non-finite values"
        e = rel_err(a, b)
        assert e <= TOL[dtype], f"{what}: {name} relative error {e:.2e}"


# Every public loss as a function of its (LOSS_ROWS, D) float inputs, for the tests that run all of
# them alike (non-finite inputs, memory layouts).
# name: (family whose backends run it, number of (LOSS_ROWS, D) inputs, loss(inputs, backend))
LOSS_ROWS = 7
LOSS_LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0])
LOSS_REF_LABELS = torch.tensor([0, 1, 3, 0, 1, 2, 0])

LOSS_CASES = {
    "info_nce": ("lse", 2, lambda x, be: ck.info_nce(x[0], x[1], normalize=False, backend=be)),
    "info_nce_normalized": ("lse", 2, lambda x, be: ck.info_nce(x[0], x[1], backend=be)),
    "info_nce_symmetric": ("lse", 2, lambda x, be: ck.info_nce(x[0], x[1], normalize=False, symmetric=True,
                                                               backend=be)),
    "info_nce_negatives": ("lse", 3, lambda x, be: ck.info_nce(x[0], x[1], negatives=x[2], normalize=False,
                                                               backend=be)),
    "info_nce_decoupled": ("lse", 2, lambda x, be: ck.info_nce(x[0], x[1], decoupled=True, normalize=False,
                                                               backend=be)),
    "nt_xent": ("lse", 2, lambda x, be: ck.nt_xent(x[0], x[1], normalize=False, backend=be)),
    "clip": ("lse", 2, lambda x, be: ck.clip_loss(x[0], x[1], 10.0, backend=be)),
    "clip_bias": ("lse", 2, lambda x, be: ck.clip_loss(x[0], x[1], 10.0, -2.0, backend=be)),
    "siglip": ("pairwise", 2, lambda x, be: ck.siglip_loss(x[0], x[1], 10.0, -10.0, backend=be)),
    "siglip_negative_only": ("pairwise", 2, lambda x, be: ck.siglip_loss(x[0], x[1], 10.0, -10.0,
                                                                         negative_only=True, backend=be)),
    "supcon": ("lse", 1, lambda x, be: ck.supcon_loss(x[0], LOSS_LABELS, normalize=False, backend=be)),
    "supcon_ref": ("lse", 2, lambda x, be: ck.supcon_loss(x[0], LOSS_LABELS, ref_embeddings=x[1],
                                                          ref_labels=LOSS_LABELS, normalize=False, backend=be)),
    # (reference row 2, poisoned by the pattern tests, has a label no anchor has: a negative only)
    "supcon_ref_unshared": ("lse", 2, lambda x, be: ck.supcon_loss(x[0], LOSS_LABELS, ref_embeddings=x[1],
                                                                   ref_labels=LOSS_REF_LABELS, normalize=False,
                                                                   backend=be)),
    "dcl": ("lse", 2, lambda x, be: ck.dcl_loss(x[0], x[1], normalize=False, backend=be)),
    "dcl_weighted": ("lse", 2, lambda x, be: ck.dcl_loss(x[0], x[1], weight_sigma=0.5, normalize=False,
                                                         backend=be)),
    "hard_negative": ("lse", 2, lambda x, be: ck.hard_negative_loss(x[0], x[1], normalize=False, backend=be)),
    "uniformity": ("lse", 1, lambda x, be: ck.uniformity_loss(x[0], backend=be)),
    "alignment": ("lse", 2, lambda x, be: ck.alignment_loss(x[0], x[1], backend=be)),
    "barlow_twins": ("xcorr", 2, lambda x, be: ck.barlow_twins_loss(x[0], x[1], backend=be)),
    "vicreg": ("xcorr", 2, lambda x, be: ck.vicreg_loss(x[0], x[1], backend=be)),
}
