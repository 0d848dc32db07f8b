"""Adapters for the libraries the benchmark compares against ("peers").

Each peer implementation is a name (``impl`` in the results) that builds, for one op
and one set of hyper-parameters, a callable taking the benchmark's inputs and
returning the scalar loss.  Two kinds:

* ``library``: the installed library itself (lightly, open_clip,
  pytorch-metric-learning, inf-cl).  When it is not installed, or cannot be
  imported here, the benchmark records the reason as ``skipped (...)``.
* ``replica``: our own re-statement of one library's computation, op for op as its
  source is written (named ``<library>-formula``), for when the library cannot be
  imported (lightly needs torchvision).  Replicas are labelled as such in every
  table; they are never reported as the library.  ``tests/test_bench.py`` checks
  each replica's value against the reference (and against the library where it is
  installed).

open_clip is used without ``import open_clip``: ``open_clip/__init__.py`` pulls in
torchvision and the model zoo, so ``open_clip/loss.py`` (which needs only torch) is
loaded by file path from the installed package.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os

import torch
import torch.nn.functional as F

# Peer implementations: name -> (kind, library distribution, description)
PEERS = {
    "lightly": ("library", "lightly", "lightly.loss (NTXentLoss, DCLLoss, BarlowTwinsLoss, VICRegLoss)"),
    "lightly-formula": ("replica", "lightly", "replica of lightly 1.6 loss code (lightly itself not imported)"),
    "open_clip": ("library", "open_clip_torch", "open_clip/loss.py (ClipLoss, SigLipLoss), loaded by path"),
    "open_clip-formula": ("replica", "open_clip_torch", "replica of open_clip 3.x loss.py (ClipLoss, SigLipLoss)"),
    "pml": ("library", "pytorch-metric-learning", "pytorch_metric_learning.losses (NTXentLoss, SupConLoss)"),
    "inf-cl": ("library", "inf-cl", "inf_cl.cal_inf_loss (Triton, CUDA only); symmetric = its two calls"),
    "fb-barlowtwins-formula": ("replica", None, "replica of facebookresearch/barlowtwins main.py BarlowTwins loss"),
    "fb-vicreg-formula": ("replica", None, "replica of facebookresearch/vicreg main_vicreg.py VICReg loss"),
}

# Which peer implementations serve which op of the benchmark.
OP_PEERS = {
    "nt_xent": ("lightly", "lightly-formula", "pml"),
    "info_nce_moco": ("lightly", "lightly-formula"),
    "clip_loss": ("open_clip", "open_clip-formula", "inf-cl"),
    "siglip_loss": ("open_clip", "open_clip-formula"),
    "supcon_loss": ("pml",),
    "dcl_loss": ("lightly", "lightly-formula"),
    "barlow_twins_loss": ("lightly", "lightly-formula", "fb-barlowtwins-formula"),
    "vicreg_loss": ("lightly", "lightly-formula", "fb-vicreg-formula"),
}

# The library a replica stands in for (a replica runs by default only when that
# library cannot run here; name it in --peers to run it anyway).
REPLICA_OF = {"lightly-formula": "lightly", "open_clip-formula": "open_clip"}


class PeerUnavailable(Exception):
    """The peer cannot run here; str(exc) is the reason (recorded as skipped)."""


# --------------------------------------------------------------------- loading
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _lightly_loss():
    if not _installed("lightly"):
        raise PeerUnavailable("not installed")
    try:
        return importlib.import_module("lightly.loss")
    except Exception as exc:  # lightly imports torchvision at package import
        raise PeerUnavailable(f"cannot import: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=None)
def _open_clip_loss():
    spec = importlib.util.find_spec("open_clip") if _installed("open_clip") else None
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable("not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        raise PeerUnavailable(f"installed, but {path} is missing")
    try:
        mspec = importlib.util.spec_from_file_location("_ck_peer_open_clip_loss", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    except Exception as exc:
        raise PeerUnavailable(f"cannot load open_clip/loss.py: {type(exc).__name__}: {exc}") from None
    return mod


@functools.lru_cache(maxsize=None)
def _pml_losses():
    if not _installed("pytorch_metric_learning"):
        raise PeerUnavailable("not installed")
    try:
        return importlib.import_module("pytorch_metric_learning.losses")
    except Exception as exc:
        raise PeerUnavailable(f"cannot import: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=None)
def _inf_cl():
    if not _installed("inf_cl"):
        raise PeerUnavailable("not installed")
    try:
        return importlib.import_module("inf_cl")
    except Exception as exc:
        raise PeerUnavailable(f"cannot import: {type(exc).__name__}: {exc}") from None


_LOADERS = {"lightly": _lightly_loss, "open_clip": _open_clip_loss, "pml": _pml_losses, "inf-cl": _inf_cl}


def unavailable_reason(impl: str, device: str) -> str | None:
    """None when peer `impl` can run on `device` here, else the reason (e.g. 'not installed')."""
    if impl not in PEERS:
        raise ValueError(f"unknown peer {impl!r}; known: {', '.join(PEERS)}")
    if impl == "inf-cl" and device != "cuda":
        # inf-cl is Triton kernels only: it needs a GPU
        if not _installed("inf_cl"):
            return "not installed"
        return "needs CUDA"
    loader = _LOADERS.get(impl)
    if loader is None:
        return None  # replicas need torch only
    try:
        loader()
    except PeerUnavailable as exc:
        return str(exc)
    return None


def version(impl: str) -> str | None:
    """Installed version of the library behind `impl` (None if not installed / a pure replica)."""
    dist = PEERS[impl][1]
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_peers(op: str, device: str) -> list[str]:
    """The peer implementations run for `op` by default: every library adapter (skipped
    when it cannot run), and a replica when the library it copies cannot run here or
    when it has no library (the facebookresearch formulas)."""
    out = []
    for name in OP_PEERS.get(op, ()):
        lib = REPLICA_OF.get(name)
        if lib is not None and unavailable_reason(lib, device) is None:
            continue
        out.append(name)
    return out


# ------------------------------------------------------------- the adapters
def build(impl: str, op: str, params: dict, device: str):
    """A callable(*inputs) -> scalar loss for peer `impl` on `op` (inputs as the
    benchmark makes them for that op); raises PeerUnavailable."""
    why = unavailable_reason(impl, device)
    if why:
        raise PeerUnavailable(why)
    key = (impl, op)
    if key not in _BUILDERS:
        raise PeerUnavailable(f"{impl} has no {op}")
    return _BUILDERS[key](params)


_BUILDERS = {}


def _builder(impl, op):
    def deco(fn):
        _BUILDERS[(impl, op)] = fn
        return fn
    return deco


# lightly (the library) -----------------------------------------------------
@_builder("lightly", "nt_xent")
def _(p):
    loss = _lightly_loss().NTXentLoss(temperature=p["temperature"])
    return lambda z1, z2: loss(z1, z2)


@_builder("lightly", "info_nce_moco")
def _(p):
    # lightly's memory bank holds the queue.  It enqueues the keys after each call
    # (out0 requires grad); the adapter reloads the benchmark's queue before each call
    # so that every repeat sees the same negatives (an O(K D) copy, like the clone
    # lightly itself makes of the bank on every call).
    lightly = _lightly_loss()
    state = {}

    def fn(query, key, queue):
        mod = state.get("mod")
        if mod is None:
            mod = lightly.NTXentLoss(temperature=p["temperature"], memory_bank_size=tuple(queue.shape))
            mod = mod.to(queue.device)
            state["mod"] = mod
        mod.memory_bank.bank.copy_(queue.float())
        mod.memory_bank.bank_ptr.zero_()
        return mod(query, key)
    return fn


@_builder("lightly", "dcl_loss")
def _(p):
    loss = _lightly_loss().DCLLoss(temperature=p["temperature"])
    return lambda z1, z2: loss(z1, z2)


@_builder("lightly", "barlow_twins_loss")
def _(p):
    loss = _lightly_loss().BarlowTwinsLoss(lambda_param=p["lambd"])
    return lambda z1, z2: loss(z1, z2)


@_builder("lightly", "vicreg_loss")
def _(p):
    loss = _lightly_loss().VICRegLoss(lambda_param=p["sim_coeff"], mu_param=p["std_coeff"],
                                      nu_param=p["cov_coeff"], eps=p["eps"])
    return lambda z1, z2: loss(z1, z2)


# lightly replicas: lightly 1.6 lightly/loss/*.py, single process --------------
@_builder("lightly-formula", "nt_xent")
def _(p):
    t = p["temperature"]

    def fn(out0, out1):
        n = out0.shape[0]
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        diag = torch.eye(n, device=out0.device, dtype=torch.bool)
        l00 = torch.einsum("nc,mc->nm", out0, out0) / t
        l01 = torch.einsum("nc,mc->nm", out0, out1) / t
        l10 = torch.einsum("nc,mc->nm", out1, out0) / t
        l11 = torch.einsum("nc,mc->nm", out1, out1) / t
        l00 = l00[~diag].view(n, -1)
        l11 = l11[~diag].view(n, -1)
        logits = torch.cat([torch.cat([l01, l00], dim=1), torch.cat([l10, l11], dim=1)], dim=0)
        labels = torch.arange(n, device=out0.device, dtype=torch.long).repeat(2)
        return F.cross_entropy(logits, labels)
    return fn


@_builder("lightly-formula", "info_nce_moco")
def _(p):
    # NTXentLoss with a memory bank: the bank (K, D) is cloned and transposed each call.
    t = p["temperature"]

    def fn(out0, out1, bank):
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        negatives = bank.clone().detach().transpose(0, -1)
        sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
        sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
        logits = torch.cat([sim_pos, sim_neg], dim=1) / t
        labels = torch.zeros(logits.shape[0], device=out0.device, dtype=torch.long)
        return F.cross_entropy(logits, labels)
    return fn


@_builder("lightly-formula", "dcl_loss")
def _(p):
    t = p["temperature"]

    def one_side(a, b):
        n = a.shape[0]
        diag = torch.eye(n, device=a.device, dtype=torch.bool)
        s00 = torch.einsum("nc,mc->nm", a, a) / t
        s01 = torch.einsum("nc,mc->nm", a, b) / t
        positive = -s01[diag]
        s00 = s00[~diag].view(n, -1)
        s01 = s01[~diag].view(n, -1)
        negative = torch.logsumexp(torch.cat([s00, s01], dim=1), dim=1)
        return (positive + negative).mean()

    def fn(out0, out1):
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        return 0.5 * (one_side(out0, out1) + one_side(out1, out0))
    return fn


def _off_diagonal(x):
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


@_builder("lightly-formula", "barlow_twins_loss")
def _(p):
    lambd = p["lambd"]

    def fn(z_a, z_b):
        za = F.batch_norm(z_a, None, None, None, None, training=True)
        zb = F.batch_norm(z_b, None, None, None, None, training=True)
        c = za.T @ zb
        c.div_(z_a.shape[0])
        inv = torch.diagonal(c).add_(-1).pow_(2).sum()
        red = _off_diagonal(c).pow_(2).sum()
        return inv + lambd * red
    return fn


@_builder("lightly-formula", "vicreg_loss")
def _(p):
    eps = p["eps"]

    def var_loss(x):
        return torch.mean(F.relu(1.0 - torch.sqrt(x.var(dim=0) + eps)))

    def cov_loss(x):
        x = x - x.mean(dim=0)
        n, d = x.shape[0], x.shape[-1]
        nondiag = ~torch.eye(d, device=x.device, dtype=torch.bool)
        cov = torch.einsum("b...c,b...d->...cd", x, x) / (n - 1)
        return (cov[..., nondiag].pow(2).sum(-1) / d).mean()

    def fn(z_a, z_b):
        inv = F.mse_loss(z_a, z_b)
        var = 0.5 * (var_loss(z_a) + var_loss(z_b))
        cov = cov_loss(z_a) + cov_loss(z_b)
        return p["sim_coeff"] * inv + p["std_coeff"] * var + p["cov_coeff"] * cov
    return fn


# facebookresearch replicas ----------------------------------------------------
@_builder("fb-barlowtwins-formula", "barlow_twins_loss")
def _(p):
    lambd = p["lambd"]
    state = {}

    def fn(z1, z2):
        bn = state.get("bn")
        if bn is None or bn.num_features != z1.shape[1]:
            bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False, device=z1.device, dtype=z1.dtype)
            state["bn"] = bn
        c = bn(z1).T @ bn(z2)
        c.div_(z1.shape[0])
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = _off_diagonal(c).pow_(2).sum()
        return on_diag + lambd * off_diag
    return fn


@_builder("fb-vicreg-formula", "vicreg_loss")
def _(p):
    eps = p["eps"]

    def fn(x, y):
        n, d = x.shape
        repr_loss = F.mse_loss(x, y)
        x = x - x.mean(dim=0)
        y = y - y.mean(dim=0)
        std_x = torch.sqrt(x.var(dim=0) + eps)
        std_y = torch.sqrt(y.var(dim=0) + eps)
        std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
        cov_x = (x.T @ x) / (n - 1)
        cov_y = (y.T @ y) / (n - 1)
        cov_loss = _off_diagonal(cov_x).pow_(2).sum().div(d) + _off_diagonal(cov_y).pow_(2).sum().div(d)
        return p["sim_coeff"] * repr_loss + p["std_coeff"] * std_loss + p["cov_coeff"] * cov_loss
    return fn


# open_clip (the library, loss.py by path) -----------------------------------
@_builder("open_clip", "clip_loss")
def _(p):
    loss = _open_clip_loss().ClipLoss()
    return lambda image, text, logit_scale: loss(image, text, logit_scale)


@_builder("open_clip", "siglip_loss")
def _(p):
    loss = _open_clip_loss().SigLipLoss()
    return lambda image, text, logit_scale, logit_bias: loss(image, text, logit_scale, logit_bias)


# open_clip replicas: open_clip 3.x loss.py, world_size 1 ----------------------
@_builder("open_clip-formula", "clip_loss")
def _(p):
    def fn(image, text, logit_scale):
        logits_per_image = logit_scale * image @ text.T
        logits_per_text = logit_scale * text @ image.T
        labels = torch.arange(logits_per_image.shape[0], device=image.device, dtype=torch.long)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return fn


@_builder("open_clip-formula", "siglip_loss")
def _(p):
    def fn(image, text, logit_scale, logit_bias):
        n = image.shape[0]
        logits = logit_scale * image @ text.T
        logits += logit_bias
        labels = 2 * torch.eye(n, device=image.device, dtype=image.dtype) - torch.ones(
            (n, n), device=image.device, dtype=image.dtype)
        return -F.logsigmoid(labels * logits).sum() / n
    return fn


# pytorch-metric-learning --------------------------------------------------------
@_builder("pml", "nt_xent")
def _(p):
    # SimCLR through pml: embeddings [z1; z2], row i and row N+i share label i.
    loss = _pml_losses().NTXentLoss(temperature=p["temperature"])

    def fn(z1, z2):
        n = z1.shape[0]
        labels = torch.arange(n, device=z1.device).repeat(2)
        return loss(torch.cat([z1, z2]), labels)
    return fn


@_builder("pml", "supcon_loss")
def _(p):
    loss = _pml_losses().SupConLoss(temperature=p["temperature"])
    return lambda embeddings, labels: loss(embeddings, labels)


# inf-cl -------------------------------------------------------------------------
@_builder("inf-cl", "clip_loss")
def _(p):
    inf_cl = _inf_cl()

    def fn(image, text, logit_scale):
        d = image.shape[1]
        head_dim = next((h for h in (256, 128, 64, 32, 16) if d % h == 0), None)
        if head_dim is None:
            raise ValueError(f"inf-cl needs D divisible by 16, got D={d}")
        a = inf_cl.cal_inf_loss(image, text, scale=logit_scale, head_dim=head_dim)
        b = inf_cl.cal_inf_loss(text, image, scale=logit_scale, head_dim=head_dim)
        return 0.5 * (a + b)
    return fn


def describe(impl: str) -> str:
    kind, _, what = PEERS[impl]
    v = version(impl)
    return f"{what}" + (f" [{PEERS[impl][1]} {v}]" if v and kind == "library" else "")


def is_peer(name: str) -> bool:
    return name in PEERS


__all__ = ["PEERS", "OP_PEERS", "PeerUnavailable", "build", "unavailable_reason", "version", "default_peers",
           "describe", "is_peer"]
