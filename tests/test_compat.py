"""The compat modules against the originals: constructor and forward signatures
(against the peer classes of tests/peers.py, which mirror the originals, and against
the real classes where the library is installed), defaults, values and gradients in
float64 (1e-10) and float32 (1e-5), memory banks over several steps, degenerate label
sets. pytorch-metric-learning and open_clip's loss.py are compared with the real
libraries too: those tests fail (never skip) when the library is missing, because the
README's test install provides both."""
from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import torch

from contrastive_kernels.backends import FAMILY_REFERENCE
from contrastive_kernels.compat import lightly as ck_lightly
from contrastive_kernels.compat import open_clip as ck_open_clip
from contrastive_kernels.compat import pytorch_metric_learning as ck_pml

import peers
from helpers import TOL, confident_pairs, kernel_backends, rel_err

F64_TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny sizes: intra-op threads only add synchronization on a loaded CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------ the real libraries
def real_pml():
    try:
        from pytorch_metric_learning import losses
    except ImportError as exc:
        pytest.fail("pytorch-metric-learning is not installed, so the compat module cannot be compared with it: "
                    f"pip install pytorch-metric-learning (the README's test install provides it) [{exc}]")
    return losses


def test_lightly_compat_matches_lightly_itself():
    """lightly's package needs torchvision (absent here), so the other lightly tests compare with
    replicas of its source; tests/crosscheck_lightly.py runs lightly's own loss modules (the
    README's pinned --no-deps install, torchvision's two imported names stubbed) against the compat
    modules: single process and gloo with 2 and 3 ranks, every loss and gradient within 1e-5."""
    if importlib.util.find_spec("lightly") is None:
        pytest.fail("lightly is not installed, so the compat module cannot be compared with it: pip install "
                    "--no-deps lightly==1.6.0 (the README's install command does this)")
    script = os.path.join(os.path.dirname(__file__), "crosscheck_lightly.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(lines) == 23 and all(ln.startswith("ok") for ln in lines), r.stdout


_OPEN_CLIP_LOSS = []


def real_open_clip_loss():
    """open_clip/loss.py loaded by file path: open_clip/__init__ imports torchvision, the
    loss module needs torch alone."""
    if _OPEN_CLIP_LOSS:
        return _OPEN_CLIP_LOSS[0]
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    path = None if spec is None or spec.origin is None else os.path.join(os.path.dirname(spec.origin), "loss.py")
    if path is None or not os.path.exists(path):
        pytest.fail("open-clip-torch is not installed, so the compat module cannot be compared with open_clip's "
                    "loss.py: pip install --no-deps open-clip-torch (the README's install command does this)")
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss_for_tests", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    _OPEN_CLIP_LOSS.append(mod)
    return mod


# --------------------------------------------------------------------- signatures
def _assert_same_signature(ours, original, what):
    """The original's parameters, in order, with the same kinds and defaults; anything
    we add is keyword-only with a default (so no original call changes meaning)."""
    p_ours = list(inspect.signature(ours).parameters.values())
    p_orig = list(inspect.signature(original).parameters.values())
    names = {p.name for p in p_orig}
    for p in p_ours:
        if p.name not in names:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty, \
                f"{what}: extra parameter {p} must be keyword-only with a default"
    mine = [(p.name, p.kind, p.default) for p in p_ours if p.name in names]
    theirs = [(p.name, p.kind, p.default) for p in p_orig]
    assert mine == theirs, f"{what}: {mine} != original {theirs}"


SIGNATURES = [
    ("lightly.NTXentLoss", ck_lightly.NTXentLoss, lambda: peers.LightlyNTXentLoss),
    ("lightly.DCLLoss", ck_lightly.DCLLoss, lambda: peers.LightlyDCLLoss),
    ("lightly.DCLWLoss", ck_lightly.DCLWLoss, lambda: peers.LightlyDCLWLoss),
    ("lightly.BarlowTwinsLoss", ck_lightly.BarlowTwinsLoss, lambda: peers.LightlyBarlowTwinsLoss),
    ("lightly.VICRegLoss", ck_lightly.VICRegLoss, lambda: peers.LightlyVICRegLoss),
    ("open_clip.ClipLoss", ck_open_clip.ClipLoss, lambda: peers.OpenClipClipLoss),
    ("open_clip.SigLipLoss", ck_open_clip.SigLipLoss, lambda: peers.OpenClipSigLipLoss),
    ("pml.NTXentLoss", ck_pml.NTXentLoss, lambda: peers.PMLNTXentLoss),
    ("pml.SupConLoss", ck_pml.SupConLoss, lambda: peers.PMLSupConLoss),
    ("real open_clip.ClipLoss", ck_open_clip.ClipLoss, lambda: real_open_clip_loss().ClipLoss),
    ("real open_clip.SigLipLoss", ck_open_clip.SigLipLoss, lambda: real_open_clip_loss().SigLipLoss),
    ("real pml.NTXentLoss", ck_pml.NTXentLoss, lambda: real_pml().NTXentLoss),
    ("real pml.SupConLoss", ck_pml.SupConLoss, lambda: real_pml().SupConLoss),
]


@pytest.mark.parametrize("what,ours,original", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_signatures_equal_originals(what, ours, original):
    orig = original()
    _assert_same_signature(ours.__init__, orig.__init__, what + ".__init__")
    _assert_same_signature(ours.forward, orig.forward, what + ".forward")


def test_default_attributes_equal_originals():
    """Defaults land in the same attributes as in the originals."""
    pairs = [(ck_lightly.NTXentLoss(), peers.LightlyNTXentLoss(), ("temperature", "gather_distributed")),
             (ck_lightly.DCLLoss(), peers.LightlyDCLLoss(), ("temperature", "weight_fn", "gather_distributed")),
             (ck_lightly.BarlowTwinsLoss(), peers.LightlyBarlowTwinsLoss(), ("lambda_param", "gather_distributed")),
             (ck_lightly.VICRegLoss(), peers.LightlyVICRegLoss(),
              ("lambda_param", "mu_param", "nu_param", "gather_distributed", "eps")),
             (ck_open_clip.ClipLoss(), real_open_clip_loss().ClipLoss(),
              ("local_loss", "gather_with_grad", "cache_labels", "rank", "world_size", "use_horovod")),
             (ck_open_clip.SigLipLoss(), real_open_clip_loss().SigLipLoss(),
              ("cache_labels", "rank", "world_size", "dist_impl")),
             (ck_pml.NTXentLoss(), real_pml().NTXentLoss(), ("temperature",)),
             (ck_pml.SupConLoss(), real_pml().SupConLoss(), ("temperature",))]
    for ours, orig, attrs in pairs:
        for a in attrs:
            assert getattr(ours, a) == getattr(orig, a), f"{type(ours).__name__}.{a}"


# ---------------------------------------------------------------- comparisons
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _labels(g, n, classes):
    lab = torch.randint(0, classes, (n,), generator=g)
    if n >= 5:
        lab[1], lab[n - 2] = 700, 701  # singleton classes: anchors without a positive
    return lab


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def _check(run_ours, run_ref, raw: dict, dtype, what: str, stateful: bool = False):
    """run_ours on `raw` cast to dtype, run_ref on float64 copies of the same rounded
    values: loss and the gradient of every floating input within the tolerance (1e-10 in
    float64, SPEC's otherwise; where plain PyTorch float32 on the same inputs misses
    SPEC's tolerance, twice its error, the FlashAttention rule of STYLE.md)."""
    tol = F64_TOL if dtype == torch.float64 else TOL[dtype]
    ours, ref_in, wrt = {}, {}, []
    for k, v in raw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            ours[k] = v.to(dtype).requires_grad_()
            ref_in[k] = ours[k].detach().double().requires_grad_()
            wrt.append(k)
        else:
            ours[k] = ref_in[k] = v
    out = run_ours(ours)
    ref = run_ref(ref_in)
    if isinstance(ref, dict):
        assert isinstance(out, dict) and out.keys() == ref.keys(), f"{what}: {out!r} vs {ref!r}"
        out, ref = out["contrastive_loss"], ref["contrastive_loss"]
    assert out.dim() == 0 and torch.isfinite(ref)
    g_out = _grads(out, [ours[k] for k in wrt])
    g_ref = _grads(ref, [ref_in[k] for k in wrt])
    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(g_out, g_ref)]
    names = ["loss"] + [f"d/d{k}" for k in wrt]
    for k, g in zip(wrt, g_out):
        assert g.dtype == ours[k].dtype, f"{what}: d/d{k} dtype {g.dtype}"
    if max(errs) <= tol:
        return
    torch_errs = [0.0] * len(errs)
    if dtype != torch.float64 and not stateful:  # (a module with state cannot be run twice)
        p32 = {k: (v.detach().float().requires_grad_() if k in wrt else v) for k, v in ours.items()}
        r32 = run_ref(p32)
        r32 = r32["contrastive_loss"] if isinstance(r32, dict) else r32
        torch_errs = [rel_err(r32, ref)] + [rel_err(a, b) for a, b in
                                            zip(_grads(r32, [p32[k] for k in wrt]), g_ref)]
    for name, e, te in zip(names, errs, torch_errs):
        bound = max(tol, 2 * te)
        assert e <= bound, f"{what} {dtype}: {name} relative error {e:.3e} > {bound:.1e} (PyTorch f32: {te:.1e})"


def _backends(*families):
    """None (the default, auto), the family references, and every kernel backend that
    runs all of `families` here."""
    common = set(kernel_backends(families[0]))
    for f in families[1:]:
        common &= set(kernel_backends(f))
    return [None, FAMILY_REFERENCE] + sorted(common)


def _runs(*families):
    """(dtype, backend): float64 on the default backend (the reference), float32 on every one."""
    return [pytest.param(torch.float64, None, id="float64")] + [
        pytest.param(torch.float32, be, id=f"float32-{be or 'default'}",
                     marks=[pytest.mark.triton] if be == "triton" else []) for be in _backends(*families)]


# ------------------------------------------------------------------- lightly
@pytest.mark.parametrize("dtype,backend", _runs("lse"))
@pytest.mark.parametrize("n,d,temperature", [(1, 5, 0.5), (7, 13, 0.5), (33, 9, 0.1), (7, 13, -0.3)])
def test_lightly_ntxent(dtype, backend, n, d, temperature):
    g = _gen(n)
    raw = dict(out0=_randn(g, n, d), out1=_randn(g, n, d))
    loss = ck_lightly.NTXentLoss(temperature, backend=backend)
    peer = peers.LightlyNTXentLoss(temperature)
    _check(lambda t: loss(t["out0"], t["out1"]), lambda t: peer(t["out0"], t["out1"]), raw, dtype,
           "lightly.NTXentLoss")


@pytest.mark.parametrize("dtype,backend", _runs("lse"))
@pytest.mark.parametrize("bank", ["int", "tuple"])
def test_lightly_ntxent_memory_bank(dtype, backend, bank):
    """Several steps through a bank of 10 rows with batches of 4: queried before the
    update, wrap-around (a batch that does not fit fills the tail, the pointer goes to 0),
    no update when out0 does not require grad; the bank drawn from the same RNG as the
    peer's (lightly's MemoryBankModule semantics)."""
    d, size, n = 6, 10, 4
    g = _gen(3)
    batches = [(_randn(g, n, d), _randn(g, n, d)) for _ in range(5)]
    update = [True, True, True, False, True]
    memory_bank_size = size if bank == "int" else (size, d)
    # The bank is the only draw from the global RNG: at construction for (size, dim), at
    # the first forward for an int. Seed before each module's construction and before its
    # first forward, so both draw the same bank either way.
    torch.manual_seed(99)
    ours = ck_lightly.NTXentLoss(0.2, memory_bank_size=memory_bank_size, backend=backend)
    torch.manual_seed(99)
    peer = peers.LightlyNTXentLoss(0.2, memory_bank_size=memory_bank_size)
    if bank == "tuple":
        assert torch.equal(ours.memory_bank.bank, peer.memory_bank.bank)
        assert torch.allclose(ours.memory_bank.bank.norm(dim=1), torch.ones(size))
    for step, ((a, b), up) in enumerate(zip(batches, update)):
        def run_ours(t, up=up, step=step):
            if step == 0:
                torch.manual_seed(7)
            out0 = t["out0"] if up else t["out0"].detach()
            return ours(out0, t["out1"])

        def run_peer(t, up=up, step=step):
            if step == 0:
                torch.manual_seed(7)
            out0 = t["out0"] if up else t["out0"].detach()
            return peer(out0, t["out1"])

        _check(run_ours, run_peer, dict(out0=a, out1=b), dtype, f"lightly.NTXentLoss bank {bank} step {step}",
               stateful=True)
        # The queued rows are normalized in the input dtype; the peer (the float64
        # reference) normalized the float64 copies, so in float32 they differ by rounding.
        atol = 0.0 if dtype == torch.float64 else 2e-7
        assert torch.allclose(ours.memory_bank.bank, peer.memory_bank.bank, rtol=0, atol=atol), \
            f"bank differs after step {step}"
        assert int(ours.memory_bank.ptr) == peer.memory_bank.ptr
    assert peer.memory_bank.ptr == 4  # 0 -> 4 -> 8 -> wrap to 0 -> (no update) 0 -> 4


@pytest.mark.parametrize("dtype,backend", _runs("lse"))
@pytest.mark.parametrize("n,d", [(2, 5), (7, 13), (33, 9)])
def test_lightly_dcl(dtype, backend, n, d):
    g = _gen(n + 1)
    raw = dict(out0=_randn(g, n, d), out1=_randn(g, n, d))

    def weight_fn(a, b):  # a weight with a gradient, as lightly allows
        return 1.0 + (a - b).pow(2).sum(1)

    for kwargs in [dict(), dict(temperature=0.3), dict(temperature=0.2, weight_fn=weight_fn), dict(temperature=-0.3)]:
        loss = ck_lightly.DCLLoss(backend=backend, **kwargs)
        peer = peers.LightlyDCLLoss(**kwargs)
        _check(lambda t: loss(t["out0"], t["out1"]), lambda t: peer(t["out0"], t["out1"]), raw, dtype,
               f"lightly.DCLLoss({kwargs})")
    for kwargs in [dict(), dict(temperature=0.25, sigma=0.8), dict(temperature=-0.25)]:
        loss = ck_lightly.DCLWLoss(backend=backend, **kwargs)
        peer = peers.LightlyDCLWLoss(**kwargs)
        _check(lambda t: loss(t["out0"], t["out1"]), lambda t: peer(t["out0"], t["out1"]), raw, dtype,
               f"lightly.DCLWLoss({kwargs})")


def _views(g, n, d):
    scales = torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    z1 = _randn(g, n, d) * scales + 0.5
    return dict(z_a=z1, z_b=0.6 * z1 + 0.8 * _randn(g, n, d) * scales)


@pytest.mark.parametrize("dtype,backend", _runs("xcorr"))
@pytest.mark.parametrize("n,d", [(3, 5), (7, 13), (33, 9)])
def test_lightly_barlow_twins_and_vicreg(dtype, backend, n, d):
    raw = _views(_gen(n + 2), n, d)
    for kwargs in [dict(), dict(lambda_param=0.02)]:
        loss = ck_lightly.BarlowTwinsLoss(backend=backend, **kwargs)
        peer = peers.LightlyBarlowTwinsLoss(**kwargs)
        _check(lambda t: loss(t["z_a"], t["z_b"]), lambda t: peer(t["z_a"], t["z_b"]), raw, dtype,
               f"lightly.BarlowTwinsLoss({kwargs})")
    # eps = 0: lightly takes it (sqrt(var + 0)); finite wherever no feature is constant
    for kwargs in [dict(), dict(lambda_param=10.0, mu_param=5.0, nu_param=2.0, eps=1e-3), dict(eps=0.0)]:
        loss = ck_lightly.VICRegLoss(backend=backend, **kwargs)
        peer = peers.LightlyVICRegLoss(**kwargs)
        _check(lambda t: loss(t["z_a"], t["z_b"]), lambda t: peer(t["z_a"], t["z_b"]), raw, dtype,
               f"lightly.VICRegLoss({kwargs})")


@pytest.mark.parametrize("dtype,backend", _runs("xcorr"))
@pytest.mark.parametrize("shape", [(7, 3, 5), (9, 2, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_lightly_vicreg_batch_positions_dim(dtype, backend, shape):
    """lightly.loss.VICRegLoss on (batch, ..., dim) inputs (VICRegL's local features)."""
    g = _gen(sum(shape))
    z1 = _randn(g, *shape) + 0.5
    raw = dict(z_a=z1, z_b=0.6 * z1 + 0.8 * _randn(g, *shape))
    for kwargs in [dict(), dict(lambda_param=10.0, mu_param=5.0, nu_param=2.0, eps=1e-3)]:
        loss = ck_lightly.VICRegLoss(backend=backend, **kwargs)
        peer = peers.LightlyVICRegLoss(**kwargs)
        _check(lambda t: loss(t["z_a"], t["z_b"]), lambda t: peer(t["z_a"], t["z_b"]), raw, dtype,
               f"lightly.VICRegLoss({kwargs}) on {shape}")
    with pytest.raises(ValueError, match=r"z_a and z_b must have the same shape, got \(7, 3, 5\) and \(7, 15\)"):
        ck_lightly.VICRegLoss()(torch.randn(7, 3, 5), torch.randn(7, 15))


def test_lightly_barlow_twins_equals_facebook_formula():
    """lightly (after PR #1806) and facebookresearch/barlowtwins are the same loss."""
    raw = _views(_gen(4), 9, 6)
    a = peers.LightlyBarlowTwinsLoss(0.0051)(raw["z_a"], raw["z_b"])
    b = peers.barlow_twins(raw["z_a"], raw["z_b"], 0.0051)
    assert rel_err(a, b) < 1e-13


# ------------------------------------------------------------------ open_clip
def _clip_raw(g, n, d, bias):
    raw = dict(image=peers.unit(_randn(g, n, d)), text=peers.unit(_randn(g, n, d)),
               logit_scale=torch.tensor(14.3, dtype=torch.float64))
    if bias is not None:
        raw["logit_bias"] = torch.tensor(bias, dtype=torch.float64)
    return raw


def _clip_call(module, output_dict):
    def run(t):
        return module(t["image"], t["text"], t["logit_scale"], t.get("logit_bias"), output_dict=output_dict)
    return run


@pytest.mark.parametrize("dtype,backend", _runs("lse"))
@pytest.mark.parametrize("bias", [None, -2.5])
@pytest.mark.parametrize("output_dict", [False, True])
@pytest.mark.parametrize("n,d", [(1, 5), (7, 13), (33, 9)])
def test_open_clip_clip_loss(dtype, backend, bias, output_dict, n, d):
    raw = _clip_raw(_gen(n + 5), n, d, bias)
    ours = ck_open_clip.ClipLoss(backend=backend)
    _check(_clip_call(ours, output_dict), _clip_call(peers.OpenClipClipLoss(), output_dict), raw,
           dtype, "open_clip.ClipLoss vs peer")
    _check(_clip_call(ours, output_dict), _clip_call(real_open_clip_loss().ClipLoss(), output_dict),
           raw, dtype, "open_clip.ClipLoss vs open_clip")


@pytest.mark.parametrize("dtype,backend", _runs("pairwise"))
@pytest.mark.parametrize("bias", [None, -10.0])
@pytest.mark.parametrize("output_dict", [False, True])
@pytest.mark.parametrize("n,d", [(1, 5), (7, 13), (33, 9)])
def test_open_clip_siglip_loss(dtype, backend, bias, output_dict, n, d):
    raw = _clip_raw(_gen(n + 6), n, d, bias)
    raw["logit_scale"] = torch.tensor(10.0, dtype=torch.float64)
    ours = ck_open_clip.SigLipLoss(backend=backend)
    _check(_clip_call(ours, output_dict), _clip_call(peers.OpenClipSigLipLoss(), output_dict),
           raw, dtype, "open_clip.SigLipLoss vs peer")
    _check(_clip_call(ours, output_dict),
           _clip_call(real_open_clip_loss().SigLipLoss(), output_dict), raw, dtype,
           "open_clip.SigLipLoss vs open_clip")


# ---------------------------------------------------- pytorch-metric-learning
def _pml_call(module, with_ref):
    def run(t):
        if with_ref:
            return module(t["embeddings"], t["labels"], ref_emb=t["ref_emb"], ref_labels=t["ref_labels"])
        return module(t["embeddings"], t["labels"])
    return run


PML_LABELS = {
    # name: (n, ref rows or None, labels builder)
    "labels": (17, None, lambda g, n: _labels(g, n, 4)),
    "labels_small": (5, None, lambda g, n: _labels(g, n, 2)),
    "ref": (9, 13, lambda g, n: _labels(g, n, 3)),
    "all_same": (6, None, lambda g, n: torch.zeros(n, dtype=torch.long)),
    "all_distinct": (6, None, lambda g, n: torch.arange(n)),
    "ref_all_same": (5, 7, lambda g, n: torch.full((n,), 3)),
    "ref_no_positive": (5, 7, lambda g, n: torch.arange(n) + 100),
    "one_pair": (2, None, lambda g, n: torch.tensor([4, 4])),
    # anchors 0, 1 have only positives in the reference set, anchors 2, 3 only negatives
    "ref_split": (4, 6, lambda g, n: torch.tensor([3, 3, 5, 6]) if n == 4 else torch.full((n,), 3)),
}


def _pml_raw(case, g, d=7):
    n, m, make = PML_LABELS[case]
    raw = dict(embeddings=_randn(g, n, d), labels=make(g, n))
    if m is not None:
        raw["ref_emb"] = _randn(g, m, d)
        raw["ref_labels"] = make(g, m) if case != "ref_no_positive" else torch.arange(m)
    return raw, m is not None


@pytest.mark.parametrize("dtype,backend", _runs("lse", "pairwise"))
@pytest.mark.parametrize("case", list(PML_LABELS))
def test_pml_ntxent(dtype, backend, case):
    raw, with_ref = _pml_raw(case, _gen(len(case)))
    for temperature in (0.07, 0.3, -0.3):  # (a negative one flips the similarities, as PML computes it)
        ours = ck_pml.NTXentLoss(temperature, backend=backend)
        _check(_pml_call(ours, with_ref), _pml_call(peers.PMLNTXentLoss(temperature), with_ref), raw, dtype,
               f"pml.NTXentLoss({temperature}) {case} vs peer")
        _check(_pml_call(ours, with_ref), _pml_call(real_pml().NTXentLoss(temperature), with_ref), raw, dtype,
               f"pml.NTXentLoss({temperature}) {case} vs pytorch-metric-learning")


@pytest.mark.parametrize("dtype,backend", _runs("lse"))
@pytest.mark.parametrize("case", list(PML_LABELS))
def test_pml_supcon(dtype, backend, case):
    raw, with_ref = _pml_raw(case, _gen(len(case) + 1))
    for temperature in (0.1, 0.25, -0.25):
        ours = ck_pml.SupConLoss(temperature, backend=backend)
        _check(_pml_call(ours, with_ref), _pml_call(peers.PMLSupConLoss(temperature), with_ref), raw, dtype,
               f"pml.SupConLoss({temperature}) {case} vs peer")
        _check(_pml_call(ours, with_ref), _pml_call(real_pml().SupConLoss(temperature), with_ref), raw, dtype,
               f"pml.SupConLoss({temperature}) {case} vs pytorch-metric-learning")


def _pml_distance(name):
    from pytorch_metric_learning import distances
    return {None: None, "cosine": lambda: distances.CosineSimilarity(),
            "dot": lambda: distances.DotProductSimilarity(),
            "dot_raw": lambda: distances.DotProductSimilarity(normalize_embeddings=False)}[name]


def _pml_options(distance, reducer):
    """Fresh keyword arguments (PML's modules keep state): its distance and reducer objects."""
    from pytorch_metric_learning import reducers
    kw = {}
    if distance is not None:
        kw["distance"] = _pml_distance(distance)()
    if reducer is not None:
        kw["reducer"] = getattr(reducers, reducer)()
    return kw


@pytest.mark.parametrize("dtype,backend", _runs("lse", "pairwise"))
@pytest.mark.parametrize("reducer", [None, "MeanReducer", "SumReducer", "AvgNonZeroReducer"])
@pytest.mark.parametrize("distance", [None, "cosine", "dot", "dot_raw"])
@pytest.mark.parametrize("loss", ["NTXentLoss", "SupConLoss"])
def test_pml_distances_and_reducers(loss, distance, reducer, dtype, backend):
    """PML's CosineSimilarity / DotProductSimilarity (raw dot products with
    normalize_embeddings=False) and its Mean / Sum / AvgNonZero reducers, passed as PML's own
    objects: the loss and every gradient as pytorch-metric-learning computes them, with labels
    (anchors without positives, without negatives: ref_split) and with a miner's pairs."""
    for i, case in enumerate(("labels", "ref", "ref_split")):
        raw, with_ref = _pml_raw(case, _gen(40 + i))
        if distance == "dot_raw":  # (logits of tens: raw products of 7-d rows over t = 0.2)
            raw = {k: v * 0.5 if k in ("embeddings", "ref_emb") else v for k, v in raw.items()}
        ours = getattr(ck_pml, loss)(0.2, backend=backend, **_pml_options(distance, reducer))
        theirs = getattr(real_pml(), loss)(0.2, **_pml_options(distance, reducer))
        _check(_pml_call(ours, with_ref), _pml_call(theirs, with_ref), raw, dtype,
               f"pml.{loss}({distance}, {reducer}) {case} vs pytorch-metric-learning")
    for case in ("multi_similarity", "repeats", "ref_multi_similarity"):
        raw, tup = _pml_mined_raw(case, _gen(len(case) + 50))
        ours = getattr(ck_pml, loss)(0.2, backend=backend, **_pml_options(distance, reducer))
        theirs = getattr(real_pml(), loss)(0.2, **_pml_options(distance, reducer))
        _check(_pml_mined_call(ours, tup), _pml_mined_call(theirs, tup), raw, dtype,
               f"pml.{loss}({distance}, {reducer}) mined {case} vs pytorch-metric-learning")


def test_pml_unsupported_options_are_refused():
    from pytorch_metric_learning import distances, reducers, regularizers

    class MyCosine(distances.CosineSimilarity):  # may compute anything: not taken for PML's
        pass
    for cls in (ck_pml.NTXentLoss, ck_pml.SupConLoss):
        name = cls.__name__
        for kw, pattern in ((dict(distance=distances.LpDistance()), "distance=LpDistance is not supported"),
                            (dict(distance=MyCosine()), "distance=MyCosine is not supported"),
                            (dict(distance=distances.CosineSimilarity(power=2)),
                             r"distance=CosineSimilarity\(power=2\) is not"),
                            (dict(distance=distances.DotProductSimilarity(p=1)),
                             r"distance=DotProductSimilarity\(p=1\) normalizes"),
                            (dict(reducer=reducers.ThresholdReducer(low=0.1)), "reducer=ThresholdReducer is not"),
                            (dict(reducer=reducers.DoNothingReducer()), "reducer=DoNothingReducer is not"),
                            (dict(embedding_regularizer=regularizers.LpRegularizer()),
                             "embedding_regularizer is not supported .*LpRegularizer")):
            with pytest.raises(NotImplementedError, match=f"^{name}: {pattern}"):
                cls(**kw)
        with pytest.raises(TypeError, match=f"{name}.__init__.. got an unexpected keyword argument 'temprature'"):
            cls(temprature=0.1)
        # accepted: what PML takes as no-ops here (stats, a weight without a regularizer, p
        # where nothing is normalized)
        cls(collect_stats=True, embedding_reg_weight=1.0,
            distance=distances.DotProductSimilarity(p=1, normalize_embeddings=False))


@pytest.mark.parametrize("backend", [pytest.param(be, marks=[pytest.mark.triton] if be == "triton" else [], id=str(be))
                                     for be in _backends("lse", "pairwise")])
def test_pml_ntxent_anchor_without_negatives_at_any_scale(backend):
    """Anchors whose every reference row shares their label have NT-Xent terms of exactly 0
    (PML's -log(1)), also where |s / t| passes 1e4 (t = 5e-5, raw dot products: an offset of
    -1e4 standing for 'no negative' gave 5000 here); a NaN in such an anchor's row still gives
    a NaN loss (NaN in, NaN out, as PML)."""
    from pytorch_metric_learning import distances
    g = _gen(11)
    x = _randn(g, 3, 5)
    r = -x[0].repeat(4, 1) * 3  # anchors 0, 1 (label 3): every reference row is a positive
    lab, rl = torch.tensor([3, 3, 5]), torch.tensor([3, 3, 3, 3])
    for t, dist in ((5e-5, None), (0.07, "dot_raw"), (1e-3, "dot_raw")):
        kw = {} if dist is None else {"distance": distances.DotProductSimilarity(normalize_embeddings=False)}
        ours = ck_pml.NTXentLoss(t, backend=backend, **kw)(x.float(), lab, ref_emb=r.float(), ref_labels=rl)
        kw = {} if dist is None else {"distance": distances.DotProductSimilarity(normalize_embeddings=False)}
        theirs = real_pml().NTXentLoss(t, **kw)(x, lab, ref_emb=r, ref_labels=rl)
        assert ours.item() == 0.0 and theirs.item() == 0.0, (t, dist, ours.item(), theirs.item())
    bad = x.float().clone()
    bad[1, 2] = float("nan")
    assert torch.isnan(ck_pml.NTXentLoss(0.1, backend=backend)(bad, lab, ref_emb=r.float(), ref_labels=rl))
    assert torch.isnan(real_pml().NTXentLoss(0.1)(bad.double(), lab, ref_emb=r, ref_labels=rl))


@pytest.mark.parametrize("case,zero", [("all_same", True), ("all_distinct", True), ("ref_all_same", True),
                                       ("ref_no_positive", True), ("one_pair", True), ("labels", False)])
def test_pml_degenerate_cases_are_zero(case, zero):
    """No negative pair (all one label), no positive pair (all distinct), or at most one
    pair of each kind: PML's early exit, a zero loss with zero gradients."""
    raw, with_ref = _pml_raw(case, _gen(1))
    for cls in (ck_pml.NTXentLoss, ck_pml.SupConLoss):
        emb = raw["embeddings"].clone().requires_grad_()
        args = dict(raw, embeddings=emb)
        loss = _pml_call(cls(), with_ref)(args)
        assert (loss.item() == 0.0) == zero, (cls.__name__, case, loss.item())
        if zero:
            (g,) = torch.autograd.grad(loss, [emb], allow_unused=True)
            assert g is None or g.abs().max() == 0


def test_pml_ref_labels_identity():
    """PML treats `ref_labels is labels` as "the reference set is the batch": it drops
    the (i, i) pairs. With ref_emb=embeddings too that is the plain self-referenced loss;
    a copy of the labels is an ordinary reference set; both equal PML."""
    g = _gen(12)
    emb = _randn(g, 8, 5)
    other = _randn(g, 8, 5)
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    for ours_cls, real_cls in ((ck_pml.NTXentLoss, real_pml().NTXentLoss), (ck_pml.SupConLoss, real_pml().SupConLoss)):
        for ref, ref_lab in ((emb, lab), (emb, lab.clone()), (other, lab.clone())):
            a = ours_cls(0.2)(emb, lab, ref_emb=ref, ref_labels=ref_lab)
            b = real_cls(0.2)(emb, lab, ref_emb=ref, ref_labels=ref_lab)
            assert rel_err(a, b) < F64_TOL, (ours_cls.__name__, ref is emb, ref_lab is lab)
        # int32 labels: the identity is the caller's object, not the int64 copy validation makes
        lab32 = lab.int()
        for ref in (emb, other):
            a = ours_cls(0.2)(emb, lab32, ref_emb=ref, ref_labels=lab32)
            b = real_cls(0.2)(emb, lab32, ref_emb=ref, ref_labels=lab32)
            assert rel_err(a, b) < F64_TOL, (ours_cls.__name__, "int32", ref is emb)


@pytest.mark.parametrize("dtype,backend", _runs("lse", "pairwise"))
@pytest.mark.parametrize("form", ["labels_object", "ref_labels_left_out"])
@pytest.mark.parametrize("loss", ["NTXentLoss", "SupConLoss"])
def test_pml_other_ref_emb_drops_the_diagonal(loss, form, dtype, backend):
    """Another ref_emb with `ref_labels=labels` (the same object) or without ref_labels: PML
    takes labels for the reference rows and, by the identity rule, drops the (i, i) pairs
    across the two sets (the second view's row i is not a positive of anchor i); values and
    gradients of both sets against the peer and pytorch-metric-learning."""
    g = _gen(len(form) + len(loss))
    lab = _labels(g, 11, 3)
    raw = dict(embeddings=_randn(g, 11, 6), labels=lab, ref_emb=_randn(g, 11, 6),
               ref_labels=lab if form == "labels_object" else None)
    for temperature in (0.1, 0.4):
        ours = getattr(ck_pml, loss)(temperature, backend=backend)
        for peer in (getattr(peers, "PML" + loss)(temperature), getattr(real_pml(), loss)(temperature)):
            _check(_pml_call(ours, True), _pml_call(peer, True), raw, dtype, f"pml.{loss}({temperature}) {form} vs {peer}")


def test_pml_ref_emb_of_another_size_needs_ref_labels():
    g = _gen(13)
    emb, other, lab = _randn(g, 6, 4), _randn(g, 9, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    for cls in (ck_pml.NTXentLoss, ck_pml.SupConLoss):
        with pytest.raises(ValueError, match="ref_emb has 9 rows but ref_labels is left out"):
            cls()(emb, lab, ref_emb=other)
        with pytest.raises(ValueError, match="ref_emb has 9 rows but ref_labels is the labels tensor itself"):
            cls()(emb, lab, ref_emb=other, ref_labels=lab)


# ------------------------------------------- pytorch-metric-learning with a miner's pairs
def real_pml_miners():
    real_pml()  # (fails with the install hint when the library is missing)
    from pytorch_metric_learning import miners
    return miners


def _idx(*vals):
    return tuple(torch.tensor(v, dtype=torch.long) for v in vals)


# name: (n rows, reference rows or None, classes, miner: (miners module, emb, labels, ref, ref_labels) -> tuple)
PML_MINED = {
    "multi_similarity": (14, None, 3, lambda M, e, l, r, rl: M.MultiSimilarityMiner(epsilon=0.5)(e, l)),
    "triplets_all": (10, None, 3, lambda M, e, l, r, rl: M.TripletMarginMiner(margin=0.5, type_of_triplets="all")(e, l)),
    "batch_hard": (12, None, 4, lambda M, e, l, r, rl: M.BatchHardMiner()(e, l)),
    "pair_margin": (13, None, 3, lambda M, e, l, r, rl: M.PairMarginMiner(pos_margin=0.3, neg_margin=0.6)(e, l)),
    "ref_multi_similarity": (9, 11, 3, lambda M, e, l, r, rl: M.MultiSimilarityMiner(epsilon=0.5)(e, l, r, rl)),
    # by hand: repeated pairs (NT-Xent counts them, SupCon's sets do not), an anchor with positives
    # and no negative (NT-Xent's term 0), an anchor with negatives only, a (i, i) pair
    "repeats": (6, None, 2, lambda M, e, l, r, rl: _idx([0, 0, 1, 2, 2, 5], [3, 3, 4, 2, 1, 1],
                                                       [0, 0, 2, 4, 4], [1, 5, 0, 0, 2])),
    "one_positive": (5, None, 2, lambda M, e, l, r, rl: _idx([3], [1], [3, 3, 3], [0, 2, 4])),
    "triplets_by_hand": (7, 5, 2, lambda M, e, l, r, rl: _idx([0, 0, 6, 3], [4, 4, 0, 2], [1, 2, 3, 3])),
}


def _pml_mined_raw(case, g, d=6):
    n, m, classes, mine = PML_MINED[case]
    raw = dict(embeddings=_randn(g, n, d), labels=torch.randint(0, classes, (n,), generator=g))
    if m is not None:
        raw["ref_emb"] = _randn(g, m, d)
        raw["ref_labels"] = torch.randint(0, classes, (m,), generator=g)
    M = real_pml_miners()
    with torch.no_grad():
        tup = mine(M, raw["embeddings"], raw["labels"], raw.get("ref_emb"), raw.get("ref_labels"))
    assert len(tup[0]) > 0 and len(tup[-1]) > 0 and max(map(len, tup)) > 1, f"{case}: the miner found nothing to test"
    return raw, tup


def _pml_mined_call(module, tup, labels=True):
    """labels=False: neither labels nor ref_labels (PML: "it also works with ref_emb")."""
    def run(t):
        kw = {"ref_emb": t["ref_emb"], "ref_labels": t["ref_labels"] if labels else None} if "ref_emb" in t else {}
        return module(t["embeddings"], t["labels"] if labels else None, tup, **kw)
    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(PML_MINED))
@pytest.mark.parametrize("loss", ["NTXentLoss", "SupConLoss"])
def test_pml_with_miner_pairs(loss, case, dtype):
    """indices_tuple (a miner's pairs or triplets): the loss over exactly those pairs, as
    the independent peer and pytorch-metric-learning compute it, values and gradients;
    labels=None (and ref_labels=None) works too (the pairs are all the loss reads)."""
    raw, tup = _pml_mined_raw(case, _gen(len(case) + len(loss)))
    for temperature in (0.07, 0.5):
        ours = getattr(ck_pml, loss)(temperature)
        _check(_pml_mined_call(ours, tup), _pml_mined_call(getattr(peers, "PML" + loss)(temperature), tup), raw,
               dtype, f"pml.{loss}({temperature}) {case} vs peer")
        _check(_pml_mined_call(ours, tup), _pml_mined_call(getattr(real_pml(), loss)(temperature), tup), raw,
               dtype, f"pml.{loss}({temperature}) {case} vs pytorch-metric-learning")
    if dtype == torch.float64:
        _check(_pml_mined_call(ours, tup, labels=False), _pml_mined_call(getattr(real_pml(), loss)(0.5), tup,
                                                                         labels=False), raw, dtype,
               f"pml.{loss} {case} labels=None vs pytorch-metric-learning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pml_mined_supcon_one_positive_confident(dtype):
    """The mined SupCon with one positive pair per anchor (SimCLR-style pairs) in the trained regime
    (aligned pairs, t = 0.05, mean loss ~4e-5), against the formula written here: softplus(LSE of the
    anchor's mined negatives - s_p) as log1p of the negatives relative to the positive.  Formed as
    s_p - LSE(s_p, negatives) the float32 loss was 1.2e-2 off, its gradient 1.2e-3 (an ulp of the
    logits' ~20 of the loss); bfloat16 gradients within 3x the floor."""
    n, d, inv_t = 32, 32, 20.0
    g = _gen(77)
    emb0 = torch.cat(confident_pairs(n, d, 0.2, g)).to(dtype)
    lab = torch.arange(n).repeat(2)
    i, j = torch.meshgrid(torch.arange(2 * n), torch.arange(2 * n), indexing="ij")
    same, mined = lab[:, None] == lab[None, :], torch.rand(2 * n, 2 * n, generator=g) < 0.7  # (a miner's subset)
    a1, p = i[same & (i != j)], j[same & (i != j)]
    a2, neg = i[~same & mined], j[~same & mined]

    def exact(e):  # float64, every anchor has its one positive and some negatives: loss > 0 for each
        e = e / e.norm(dim=1, keepdim=True)  # (PML's default distance, cosine similarity, normalizes)
        s = inv_t * e @ e.T
        others = torch.where(~same & mined, s - s[a1, p][:, None], torch.full_like(s, -torch.inf))
        return torch.log1p(torch.exp(others).sum(1)).mean()

    ref = emb0.double().requires_grad_()
    want = exact(ref)
    want_grad, = torch.autograd.grad(want, ref)
    emb = emb0.clone().requires_grad_()
    got = ck_pml.SupConLoss(temperature=1 / inv_t)(emb, lab, (a1, p, a2, neg))
    got_grad, = torch.autograd.grad(got, emb)
    assert 1e-5 < want.item() < 1e-3, want.item()  # the regime this test is about

    def rel(u, v):
        return ((u.double() - v).norm() / v.norm()).item()

    assert rel(got, want) <= TOL[dtype], f"loss relative error {rel(got, want):.2e}"
    e = rel(got_grad, want_grad)
    assert e <= TOL[dtype], f"gradient relative error {e:.2e}"
    if dtype != torch.float32:
        floor = rel(want_grad.to(dtype), want_grad)
        assert e <= 3 * floor, f"gradient error {e:.2e} > 3x the floor {floor:.2e}"


@pytest.mark.parametrize("chunk", [1, 4, 7])
@pytest.mark.parametrize("case", ["multi_similarity", "ref_multi_similarity", "repeats"])
@pytest.mark.parametrize("loss", ["NTXentLoss", "SupConLoss"])
def test_pml_miner_pairs_across_chunks(loss, case, chunk, monkeypatch):
    """The mined pairs are scored in chunks of 2^20 / D pairs (one chunk at the sizes above):
    chunks of 1, 4 and 7 pairs (pair counts a multiple of the chunk or not), forward and both
    gradients (the reference rows' too) against pytorch-metric-learning in float64.  (The
    mutation audit: every chunk's backward reading the first chunk's upstream gradient passed
    every other test.)"""
    monkeypatch.setattr(ck_pml._PairDots, "_chunk", staticmethod(lambda d: chunk))
    raw, tup = _pml_mined_raw(case, _gen(len(case) + chunk))
    ours = getattr(ck_pml, loss)(0.3)
    _check(_pml_mined_call(ours, tup), _pml_mined_call(getattr(real_pml(), loss)(0.3), tup), raw, torch.float64,
           f"pml.{loss} {case} chunks of {chunk} pairs vs pytorch-metric-learning")


@pytest.mark.parametrize("tup", [
    _idx([], [], [], []), _idx([1], [2], [0], [3]), _idx([0, 1], [1, 0], [], []), _idx([], [], [0, 2], [3, 1]),
    _idx([], [], []),
], ids=["empty", "one_of_each", "no_negative", "no_positive", "no_triplet"])
def test_pml_miner_degenerate_pairs_are_zero(tup):
    """PML's early exits with a miner's output (every list of length <= 1; no positive or no
    negative pair): 0 with zero gradients, as pytorch-metric-learning gives."""
    g = _gen(3)
    lab = torch.tensor([0, 0, 1, 1])
    for name in ("NTXentLoss", "SupConLoss"):
        emb = _randn(g, 4, 5).requires_grad_()
        loss = getattr(ck_pml, name)()(emb, lab, tup)
        assert loss.item() == 0.0 and getattr(real_pml(), name)()(emb.detach(), lab, tup).item() == 0.0, name
        (grad,) = torch.autograd.grad(loss, [emb], allow_unused=True)
        assert grad is None or grad.abs().max() == 0, name


def test_pml_miner_pairs_bad_input():
    g = _gen(4)
    emb, lab = _randn(g, 5, 3), torch.tensor([0, 0, 1, 1, 2])
    for cls in (ck_pml.NTXentLoss, ck_pml.SupConLoss):
        loss = cls()
        with pytest.raises(ValueError, match=r"indices_tuple must be .* tuple of 4 or 3 index tensors; got length 2"):
            loss(emb, lab, _idx([0], [1]))
        with pytest.raises(TypeError, match=r"indices_tuple\[1\] \(p\) must be an integer tensor"):
            loss(emb, lab, (torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), torch.tensor([2, 3])))
        with pytest.raises(ValueError, match=r"indices_tuple\[3\] \(n\) indexes rows of the reference set .* has "
                                             r"5: got values in \[2, 5\]"):
            loss(emb, lab, _idx([0, 1], [1, 0], [0, 1], [2, 5]))
        with pytest.raises(ValueError, match=r"indices_tuple\[0\] \(a1\) indexes rows of embeddings"):
            loss(emb, lab, _idx([-1, 1], [1, 0], [0, 1], [2, 3]))
        with pytest.raises(ValueError, match="positive pairs have 2 anchors but 1 partners"):
            loss(emb, lab, _idx([0, 1], [1], [0, 1], [2, 3]))
        with pytest.raises(ValueError, match=r"indices_tuple\[2\] \(n\) must be 1-D"):
            loss(emb, lab, (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([[2, 3]])))
        with pytest.raises(ValueError, match="labels are required .*no indices_tuple"):
            loss(emb, None)
    with pytest.raises(ValueError, match=r"lists the pair \(0, 2\) both as a positive and as a negative"):
        ck_pml.SupConLoss()(emb, lab, _idx([0, 0], [1, 2], [0, 1], [2, 3]))
    with pytest.raises(AssertionError, match="either be positive or negative"):  # (PML's own words)
        real_pml().SupConLoss()(emb, lab, _idx([0, 0], [1, 2], [0, 1], [2, 3]))


def test_pml_miner_pairs_memory_linear_in_pairs():
    """A miner's 2^19 pairs over D = 256: the pairs are scored in chunks, never gathered as a
    pairs x D matrix (512 MiB in float32; what the autograd of x[a] * y[p] would keep)."""
    from helpers import peak_rss_growth
    pairs, d = 1 << 19, 256
    setup = f"""
        import torch
        from contrastive_kernels.compat import pytorch_metric_learning as pml
        torch.manual_seed(0)
        x = torch.randn(2048, {d}, requires_grad=True)
        a1, p = torch.randint(0, 1024, ({pairs} // 2,)), torch.randint(1024, 2048, ({pairs} // 2,))
        a2, n = torch.randint(0, 1024, ({pairs} // 2,)), torch.randint(0, 1024, ({pairs} // 2,))
        tup = (a1, p, a2, n)
        pml.NTXentLoss(0.1)(x[:64], None, tuple(t[:64] % 64 for t in tup)).backward()
    """
    body = "pml.NTXentLoss(0.1)(x, None, tup).backward()"
    res = peak_rss_growth(setup, body)
    bound = pairs * d * 4 // 4
    print("peak growth", res)
    assert res["growth"] < bound, f"the mined NT-Xent grew the peak RSS by {res['growth']} bytes (bound {bound})"
