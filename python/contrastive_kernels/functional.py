"""The public functional API: argument checks, backend choice, and each loss as a
thin composition over the kernel families (``_families``) or, on the reference
backend, the plain-PyTorch formula (``reference``).

Fused backends never form an N x M matrix: normalization is fused into the
kernels as per-row scales (``q_rscale``) computed once in O(N D), positive logits
are row-wise dot products, and every log-sum-exp / softplus sum over candidates
runs in the tiled kernels.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from . import _families as fam
from . import _validation as V
from . import backends, reference
from .reference import LSE_LABELS, LSE_NORM, LSE_TARGET, MASK_DIAG, MASK_POS, PAIR_NEGATIVE_ONLY

Tensor = torch.Tensor

__all__ = [
    "normalized_similarity", "info_nce", "nt_xent", "clip_loss", "siglip_loss", "supcon_loss", "dcl_loss",
    "hard_negative_loss", "uniformity_loss", "alignment_loss", "cross_correlation", "barlow_twins_loss",
    "vicreg_loss",
]


# ----------------------------------------------------------------------- helpers
def _amp_cast(x, amp, done):
    """x cast to its device's autocast dtype when it is a floating tensor other than float64;
    `done` holds (input, cast) pairs so that one tensor passed twice stays one tensor."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64):
        return x
    dt = amp.get(x.device.type)
    if dt is None or x.dtype == dt:
        return x
    for orig, cast in done:
        if orig is x:
            return cast
    y = x.to(dt)
    done.append((x, y))
    return y


def _amp_boundary(*embeddings: str):
    """Decorator of the public functions: torch.autocast stops at them.

    Inside an autocast region (CPU or CUDA), the arguments named in `embeddings` (the
    embeddings of the similarity losses) are cast to the region's dtype when they are
    floating and not float64, as torch.matmul's and scaled_dot_product_attention's inputs
    are (the peers' logits are such products): an AMP step runs the 16-bit kernels, and
    each gradient comes back in its input's dtype through the cast.  The function itself
    then runs with autocast disabled, so that the reference formulas and the float32 glue
    keep their own precision (the statistics losses cast nothing: their standardization,
    distances and Gram products stay float32).  The kernels' C++ implementations exclude
    autocast themselves (csrc/no_autocast.h), which also covers a backward run inside the
    region."""
    def deco(fn):
        params = list(inspect.signature(fn).parameters)
        where = [(name, params.index(name)) for name in embeddings]
        quiet = fam._no_autocast(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            amp = {dev: torch.get_autocast_dtype(dev) for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)}
            if not amp:
                return fn(*args, **kwargs)
            args, done = list(args), []
            for name, pos in where:
                if pos < len(args):
                    args[pos] = _amp_cast(args[pos], amp, done)
                elif name in kwargs:
                    kwargs[name] = _amp_cast(kwargs[name], amp, done)
            return quiet(*args, **kwargs)
        return wrapper
    return deco


def _scale(value, device, *, invert: bool) -> Tensor:
    """A 0-dim float32 tensor on `device`: value (or 1/value), keeping autograd for tensors."""
    if isinstance(value, torch.Tensor):
        v = value.reshape(()).to(device=device, dtype=torch.float32)
        return 1.0 / v if invert else v
    return torch.tensor(1.0 / value if invert else float(value), dtype=torch.float32, device=device)


def _rscale(x: Tensor, normalize: bool):
    """1 / max(|x_i|, 1e-12) in float32 (the F.normalize convention), or None."""
    if not normalize:
        return None
    return x.float().norm(dim=1).clamp_min(1e-12).reciprocal()


def _kn(r):
    """A row scale as the kernels take it with LSE_NORM (mask bit 32, `_norm_bit`): without
    autograd history, its Jacobian folded into the input's gradient in float32 before the one
    rounding (autograd's two roundings cancelled on confident or clustered rows)."""
    return None if r is None else r.detach()


def _norm_bit(normalize: bool) -> int:
    return LSE_NORM if normalize else 0


def _pos_logit(a: Tensor, b: Tensor, scale, normalize: bool, dt=torch.float32) -> Tensor:
    """scale * a_hat_i . b_hat_i (in dt): each input's product and normalization gradients meet
    in one graph, rounded once (a row scale from a second float copy of the input sent a large
    radial gradient and its cancelling twin through two roundings)."""
    af, bf = a.to(dt), b.to(dt)
    d = (af * bf).sum(1) * scale
    if normalize:
        d = d / (af.norm(dim=1).clamp_min(1e-12) * bf.norm(dim=1).clamp_min(1e-12))
    return d


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() * b.float()).sum(1)


def _work(x: Tensor) -> int:
    """rows x features of a loss's first input: the size class of `auto`'s cuda/triton rule."""
    return x.shape[0] * x.shape[-1] if x.dim() >= 2 else x.numel()


def _resolve(backend, family, x: Tensor) -> str:
    return backends.resolve(backend, family, x.device, x.dtype, _work(x))


def _temperature(temperature, device):
    return V.scalar("temperature", temperature, nonzero=True, device=device)


# ---------------------------------------------------------- normalized similarity
@_amp_boundary("a", "b")
def normalized_similarity(a: Tensor, b: Tensor | None = None, scale=1.0, *, normalize: bool = True,
                          backend: str | None = None) -> Tensor:
    """The N x M matrix ``scale * normalize(a) @ normalize(b).T`` (b=None: a with itself).

    Equals ``scale * F.normalize(a) @ F.normalize(b).T``; the result has a's dtype (float32
    accumulation) on every backend, as the PyTorch expression's has (under torch.autocast:
    the autocast dtype, a and b cast to it first)."""
    V.matrix("a", a)
    if b is not None:
        V.matrix("b", b)
        V.same_device_dtype(a=a, b=b)
        V.same_dim(a=a, b=b)
    V.scalar("scale", scale, device=a.device)
    be = _resolve(backend, "similarity", a)
    if be == "reference":
        return reference.normalized_similarity(a, b, scale, normalize=normalize).to(a.dtype)
    return fam.similarity(be, a, a if b is None else b, _scale(scale, a.device, invert=False), normalize)


# ------------------------------------------------------------------------ InfoNCE
def check_info_nce_args(query, key, negatives, temperature, positive_index, in_batch_negatives, symmetric,
                        decoupled, reduction):
    """The argument checks of `info_nce` (shared with its distributed form); returns the
    validated positive_index (int64) or None."""
    V.matrix("query", query)
    V.matrix("key", key)
    tensors = {"query": query, "key": key}
    if negatives is not None:
        V.matrix("negatives", negatives)
        tensors["negatives"] = negatives
    V.same_device_dtype(**tensors)
    V.same_dim(**tensors)
    _temperature(temperature, query.device)
    V.choice("reduction", reduction, ("mean", "sum", "none"))
    n, m = query.shape[0], key.shape[0]
    if positive_index is None:
        if m < n:
            raise ValueError(f"key has {m} rows but query has {n}: with positive_index=None the positive of query i "
                             "is key i, so key needs at least as many rows as query (or pass positive_index)")
    else:
        positive_index = V.index("positive_index", positive_index, n, m, query.device)
    if symmetric:
        if m != n:
            raise ValueError(f"symmetric=True needs as many keys as queries, got query {tuple(query.shape)} and key "
                             f"{tuple(key.shape)}")
        if negatives is not None:
            raise ValueError("symmetric=True cannot be combined with negatives (the key->query direction has none)")
        if positive_index is not None:
            raise ValueError("symmetric=True pairs query i with key i; positive_index must be None")
        if not in_batch_negatives:
            raise ValueError("symmetric=True needs in_batch_negatives=True")
    if decoupled and not in_batch_negatives and negatives is None:
        raise ValueError("decoupled=True with in_batch_negatives=False and no negatives leaves no candidates")
    return positive_index


@_amp_boundary("query", "key", "negatives")
def info_nce(query: Tensor, key: Tensor, *, negatives: Tensor | None = None, temperature=0.1,
             positive_index: Tensor | None = None, in_batch_negatives: bool = True, symmetric: bool = False,
             decoupled: bool = False, normalize: bool = True, reduction: str = "mean",
             backend: str | None = None) -> Tensor:
    """InfoNCE: row i is ``LSE_{c in C_i} s(q_i, c)/tau - s(q_i, k_{p_i})/tau``.

    ``p_i = positive_index[i]`` (default i, needs M >= N); ``C_i`` = all keys (only
    ``k_{p_i}`` when ``in_batch_negatives=False``, MoCo-style) plus every row of
    ``negatives``; ``decoupled`` drops the positive from ``C_i``; ``symmetric``
    (M == N, no negatives, identity pairing) averages with the key->query direction.
    """
    positive_index = check_info_nce_args(query, key, negatives, temperature, positive_index, in_batch_negatives,
                                         symmetric, decoupled, reduction)
    n, m = query.shape[0], key.shape[0]
    if decoupled and in_batch_negatives and negatives is None and m == 1:
        raise ValueError("decoupled=True with a single key and no negatives leaves no candidates")

    be = _resolve(backend, "lse", query)
    if be == "reference":
        return reference.info_nce(query, key, negatives=negatives, temperature=temperature,
                                  positive_index=positive_index, in_batch_negatives=in_batch_negatives,
                                  symmetric=symmetric, decoupled=decoupled, normalize=normalize, reduction=reduction)

    scale = _scale(temperature, query.device, invert=True)
    qr, kr = _rscale(query, normalize), _rscale(key, normalize)
    p = positive_index if positive_index is not None else torch.arange(n, device=query.device)

    def positive_logits():
        return _pos_logit(query, key[p], scale, normalize)

    nb = _norm_bit(normalize)

    def negatives_lse():
        return fam.lse(be, query, negatives, scale, q_rscale=_kn(qr), k_rscale=_kn(_rscale(negatives, normalize)),
                       mask_mode=nb)[0]

    if in_batch_negatives and not decoupled:
        # The keys' log-sum-exp holds the positive: the kernels return the cross-entropies
        # (LSE_TARGET), with p - 1 formed in float32 inside the backward.
        ce, col = fam.lse(be, query, key, scale, q_rscale=_kn(qr), k_rscale=_kn(kr), pos_index=positive_index,
                          mask_mode=LSE_TARGET | nb, compute_col=symmetric)
        if negatives is None:
            return reference._reduce(0.5 * (ce + col) if symmetric else ce, reduction)
        # LSE(keys, negatives) - pos = ce + softplus(LSE(negatives) - LSE(keys)), LSE(keys) = ce + pos:
        # the positive's remaining gradient, -sigmoid(.), is the negatives' share (no cancellation).
        return reference._reduce(ce + F.softplus(negatives_lse() - ce - positive_logits()), reduction)
    pos = positive_logits()
    if not in_batch_negatives and not decoupled:
        # MoCo: LSE(pos, negatives) - pos = softplus(LSE(negatives) - pos), exact on confident rows
        # (formed as a log-sum-exp minus the positive, a 1e-6 row kept an ulp of the logits' size).
        # (NaN where the positive logit is +inf: the limit 0 would be a finite loss of an infinite input.)
        return reference._reduce(reference._softplus_nonfinite_nan(negatives_lse() - pos), reduction)

    parts = []
    col = None
    if in_batch_negatives:
        row, col = fam.lse(be, query, key, scale, q_rscale=_kn(qr), k_rscale=_kn(kr),
                           pos_index=p if decoupled else None, mask_mode=(MASK_POS if decoupled else 0) | nb,
                           compute_col=symmetric)
        parts.append(row)
    if negatives is not None:
        parts.append(negatives_lse())
    lse = parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), dim=0)
    loss = lse - pos
    if symmetric:
        loss = 0.5 * (loss + col - pos)
    return reference._reduce(loss, reduction)


@_amp_boundary("z1", "z2")
def nt_xent(z1: Tensor, z2: Tensor, temperature=0.5, *, normalize: bool = True, backend: str | None = None) -> Tensor:
    """SimCLR's NT-Xent: Z = [z1; z2]; row r's positive is its other view, its
    candidates every other row; mean over the 2N rows."""
    V.matrix("z1", z1)
    V.matrix("z2", z2)
    V.same_device_dtype(z1=z1, z2=z2)
    V.same_shape(z1=z1, z2=z2)
    _temperature(temperature, z1.device)
    be = _resolve(backend, "lse", z1)
    if be == "reference":
        return reference.nt_xent(z1, z2, temperature, normalize=normalize)
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    scale = _scale(temperature, z.device, invert=True)
    zr = _rscale(z, normalize)
    p = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    # Cross-entropies against the other view straight from the kernels (LSE_TARGET).
    zk = _kn(zr)
    row, _ = fam.lse(be, z, z, scale, q_rscale=zk, k_rscale=zk, pos_index=p,
                     mask_mode=MASK_DIAG | LSE_TARGET | _norm_bit(normalize))
    return row.mean()


# --------------------------------------------------------------------------- CLIP
def _logit_scale(logit_scale, device):
    return V.scalar("logit_scale", logit_scale, device=device)


@_amp_boundary("image", "text")
def clip_loss(image: Tensor, text: Tensor, logit_scale, logit_bias=None, *, backend: str | None = None) -> Tensor:
    """open_clip's ClipLoss: ``(CE(s I T^T + b, arange) + CE(s T I^T + b, arange)) / 2``.

    No normalization inside; ``logit_scale`` is the multiplier (already exponentiated).
    A scalar ``logit_bias`` shifts every logit of a row equally, so it cancels in the
    cross-entropy: its gradient is exactly zero."""
    V.matrix("image", image)
    V.matrix("text", text)
    V.same_device_dtype(image=image, text=text)
    V.same_shape(image=image, text=text)
    _logit_scale(logit_scale, image.device)
    if logit_bias is not None:
        V.scalar("logit_bias", logit_bias, device=image.device)
    be = _resolve(backend, "lse", image)
    if be == "reference":
        return reference.clip_loss(image, text, logit_scale, logit_bias)
    scale = _scale(logit_scale, image.device, invert=False)
    # Both directions' cross-entropies (targets on the diagonal) straight from the kernels.
    row, col = fam.lse(be, image, text, scale, compute_col=True, mask_mode=LSE_TARGET)
    loss = 0.5 * (row.mean() + col.mean())
    if isinstance(logit_bias, torch.Tensor):
        loss = loss + 0.0 * logit_bias.reshape(()).float()  # exact zero gradient, bias stays in the graph
    return loss


@_amp_boundary("image", "text")
def siglip_loss(image: Tensor, text: Tensor, logit_scale, logit_bias, *, negative_only: bool = False,
                backend: str | None = None) -> Tensor:
    """open_clip's SigLipLoss: ``-(1/N) sum_ij log sigmoid(z_ij (s i_i . t_j + b))``,
    z = +1 on the diagonal and -1 elsewhere (-1 everywhere when ``negative_only``,
    which also allows N != M)."""
    V.matrix("image", image)
    V.matrix("text", text)
    V.same_device_dtype(image=image, text=text)
    V.same_dim(image=image, text=text)
    if not negative_only and image.shape[0] != text.shape[0]:
        raise ValueError(f"image and text must have the same number of rows unless negative_only=True, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    _logit_scale(logit_scale, image.device)
    V.scalar("logit_bias", logit_bias, device=image.device)
    be = _resolve(backend, "pairwise", image)
    if be == "reference":
        return reference.siglip_loss(image, text, logit_scale, logit_bias, negative_only=negative_only)
    total = fam.pairwise_total(be, image, text, _scale(logit_scale, image.device, invert=False),
                               _scale(logit_bias, image.device, invert=False),
                               mode=PAIR_NEGATIVE_ONLY if negative_only else 0)
    return total / image.shape[0]


# ------------------------------------------------------------------------- SupCon
def _positive_counts(labels: Tensor, ref_labels: Tensor, *, exclude_self: bool) -> Tensor:
    """For each anchor, how many of ref_labels share its label (minus 1 for itself when exclude_self)."""
    _, inv = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    per_class = torch.bincount(inv[labels.shape[0]:], minlength=int(inv.max()) + 1 if inv.numel() else 0)
    return per_class[inv[:labels.shape[0]]] - (1 if exclude_self else 0)


def _supcon_anchors(be: str, x: Tensor, labels: Tensor, r: Tensor, rl: Tensor, temperature, normalize: bool, *,
                    exclude_self: bool) -> tuple[Tensor, Tensor]:
    """supcon_loss's per-anchor losses (0 for an anchor without a positive) and which anchors
    have a positive, on backend `be` (the reference materializes): x's rows against r's (r
    may be x itself), the (i, i) pairs dropped when exclude_self (r then has x's rows)."""
    has = _positive_counts(labels, rl, exclude_self=exclude_self) > 0
    if be == "reference":
        ref = None if r is x else r
        return reference.supcon_loss(x, labels, temperature, ref_embeddings=ref, ref_labels=None if ref is None else rl,
                                     normalize=normalize, reduction="none", exclude_self=exclude_self), has
    scale = _scale(temperature, x.device, invert=True)
    xr = _rscale(x, normalize)
    rr = xr if r is x else _rscale(r, normalize)
    # The anchors' losses straight from the kernels (LSE_LABELS: LSE minus the mean positive
    # logit, with p - 1/|P| formed in float32 inside the backward).
    xk = _kn(xr)
    row, _ = fam.lse(be, x, r, scale, q_rscale=xk, k_rscale=xk if r is x else _kn(rr), q_labels=labels,
                     k_labels=rl, mask_mode=LSE_LABELS | (MASK_DIAG if exclude_self else 0) | _norm_bit(normalize))
    return torch.where(has, row, torch.zeros_like(row)), has


@_amp_boundary("embeddings", "ref_embeddings")
def supcon_loss(embeddings: Tensor, labels: Tensor, temperature=0.1, *, ref_embeddings: Tensor | None = None,
                ref_labels: Tensor | None = None, normalize: bool = True, reduction: str = "mean",
                backend: str | None = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out).

    Anchor i: ``-(1/|P(i)|) sum_{p in P(i)} [s_ip/tau - LSE_{a != i} s_ia/tau]``, P(i) = the
    other rows with i's label (against ``ref_embeddings`` / ``ref_labels`` when given,
    where no row is excluded); mean over anchors with at least one positive (0 if none).
    ``reduction="none"`` returns the per-anchor losses (0 for an anchor without a positive)."""
    V.matrix("embeddings", embeddings)
    labels = V.labels("labels", labels, embeddings.shape[0], embeddings.device)
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is not None:
        V.matrix("ref_embeddings", ref_embeddings)
        V.same_device_dtype(embeddings=embeddings, ref_embeddings=ref_embeddings)
        V.same_dim(embeddings=embeddings, ref_embeddings=ref_embeddings)
        ref_labels = V.labels("ref_labels", ref_labels, ref_embeddings.shape[0], embeddings.device,
                              rows_name="ref_embeddings")
    _temperature(temperature, embeddings.device)
    V.choice("reduction", reduction, ("mean", "none"))
    be = _resolve(backend, "lse", embeddings)
    has_ref = ref_embeddings is not None
    anchor, has = _supcon_anchors(be, embeddings, labels, ref_embeddings if has_ref else embeddings,
                                  ref_labels if has_ref else labels, temperature, normalize, exclude_self=not has_ref)
    if reduction == "none":
        return anchor
    return anchor.sum() / has.sum().clamp_min(1)


# --------------------------------------------------------------------------- DCL
@_amp_boundary("z1", "z2")
def dcl_loss(z1: Tensor, z2: Tensor, temperature=0.1, *, weight_sigma=None, normalize: bool = True,
             backend: str | None = None) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2021, Eq. 6; lightly's DCLLoss >= 1.6), both
    views: ``-s_ii/tau + LSE over the 2N - 2 negatives`` (every row of either view but i's pair);
    ``weight_sigma`` applies DCLW's negative von Mises-Fisher weights
    ``2 - N softmax(<z1_i, z2_i> / sigma)`` (treated as constants)."""
    V.matrix("z1", z1)
    V.matrix("z2", z2)
    V.same_device_dtype(z1=z1, z2=z2)
    V.same_shape(z1=z1, z2=z2)
    _temperature(temperature, z1.device)
    if weight_sigma is not None:
        V.scalar("weight_sigma", weight_sigma, positive=True)
    if z1.shape[0] < 2:
        raise ValueError(f"dcl_loss needs at least 2 pairs (each row needs a negative), got z1 {tuple(z1.shape)}")
    be = _resolve(backend, "lse", z1)
    if be == "reference":
        return reference.dcl_loss(z1, z2, temperature, weight_sigma=weight_sigma, normalize=normalize)
    scale = _scale(temperature, z1.device, invert=True)
    ar, br = _rscale(z1, normalize), _rscale(z2, normalize)
    pos = _pos_logit(z1, z2, scale, normalize)
    if weight_sigma is not None:
        cos = _rowdot(z1, z2).detach()
        if normalize:
            cos = cos * ar.detach() * br.detach()
        pos = pos * (2 - z1.shape[0] * torch.softmax(cos / weight_sigma, dim=0))
    ak, bk, md = _kn(ar), _kn(br), MASK_DIAG | _norm_bit(normalize)
    aa, _ = fam.lse(be, z1, z1, scale, q_rscale=ak, k_rscale=ak, mask_mode=md)
    bb, _ = fam.lse(be, z2, z2, scale, q_rscale=bk, k_rscale=bk, mask_mode=md)
    ab, ba = fam.lse(be, z1, z2, scale, q_rscale=ak, k_rscale=bk, mask_mode=md, compute_col=True)
    # one log-sum-exp over all 2N - 2 negatives (same view and other view): DCL Eq. 6, lightly >= 1.6
    return 0.5 * ((torch.logaddexp(aa, ab) - pos).mean() + (torch.logaddexp(bb, ba) - pos).mean())


# ----------------------------------------------------------------- hard negatives
@_amp_boundary("z1", "z2")
def hard_negative_loss(z1: Tensor, z2: Tensor, temperature=0.5, *, beta=1.0, tau_plus=0.1, normalize: bool = True,
                       backend: str | None = None) -> Tensor:
    """Robinson et al. 2021 (HCL), SimCLR 2N setting: negatives reweighted by
    ``exp(beta s/tau)``, debiased with ``tau_plus``, clamped below at ``Nneg e^{-1/tau}``."""
    V.matrix("z1", z1)
    V.matrix("z2", z2)
    V.same_device_dtype(z1=z1, z2=z2)
    V.same_shape(z1=z1, z2=z2)
    _temperature(temperature, z1.device)
    V.scalar("beta", beta)
    V.scalar("tau_plus", tau_plus, lower=0.0, upper=1.0)
    if z1.shape[0] < 2:
        raise ValueError(f"hard_negative_loss needs at least 2 pairs (2N - 2 negatives per row), got z1 "
                         f"{tuple(z1.shape)}")
    be = _resolve(backend, "lse", z1)
    if be == "reference":
        return reference.hard_negative_loss(z1, z2, temperature, beta=beta, tau_plus=tau_plus, normalize=normalize)
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n_neg = n2 - 2
    zr = _rscale(z, normalize)
    p = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    inv_t = 1.0 / temperature
    # Every term's gradient of z meets in float32 and is rounded once (16-bit inputs): the positive
    # logit's, and the two log-sum-exps' (fam.lse_two_scales sums theirs in float32), which nearly
    # cancel each other on confident rows.
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    log_pos = _pos_logit(zf, zf[p], inv_t, normalize)
    mask = MASK_DIAG | MASK_POS | _norm_bit(normalize)
    zk = _kn(zr)
    # reweight = sum exp((1+beta) s/tau) / mean exp(beta s/tau), in log space
    l1, l0 = fam.lse_two_scales(be, z, z, _scale((1 + beta) * inv_t, z.device, invert=False),
                                _scale(beta * inv_t, z.device, invert=False), q_rscale=zk, k_rscale=zk, pos_index=p,
                                mask_mode=mask, grad_to=(zf, zf))
    return _hcl_rows(math.log(n_neg) + l1 - l0, log_pos, inv_t, n_neg, tau_plus).mean()


def _hcl_rows(log_rw: Tensor, log_pos: Tensor, inv_t, n_neg: int, tau_plus) -> Tensor:
    """HCL's per-row losses from the log reweighted negative sum and the positive logit:
    ``log(1 + Ng / pos)``, ``Ng = max((reweight - tau_plus Nneg pos) / (1 - tau_plus), Nneg e^{-1/tau})``
    (also the distributed form's, with the global Nneg).  Formed relative to the positive, as
    softplus(log(Ng / pos)): a confident row's loss (1e-6 .. 1e-15) is not an LSE minus a logit of
    ~1/tau, whose float32 ulp it would keep; and Ng / pos = (reweight / pos)(1 - a pos / reweight)
    with a = tau_plus Nneg, whose log is u + log(-expm1(-(u - log a))), u = log(reweight / pos):
    no exp of u to overflow, and the debiasing's cancellation only where it is the formula's own."""
    u = log_rw - log_pos
    a = tau_plus * n_neg
    if isinstance(a, Tensor):
        log_a = torch.log(a.to(u.dtype))
    else:
        log_a = math.log(a) if a > 0 else -math.inf
    v = u - log_a  # Ng > 0 iff v > 0 (tau_plus = 0: v = +inf, the log below 0)
    ok = ~(v <= 0)  # a NaN (a non-finite input) takes the log and stays NaN, never the clamp's finite floor
    v_ok = torch.where(ok, v, torch.ones_like(v))
    d = torch.where(ok, u + torch.log(-torch.expm1(-v_ok)), torch.full_like(v, -math.inf))
    d = d - math.log1p(-tau_plus)
    d = torch.maximum(d, (math.log(n_neg) - inv_t) - log_pos)  # the clamp, relative to the positive
    return reference._softplus_nonfinite_nan(d)


# ------------------------------------------------------- uniformity and alignment
def _exact_shift(x: Tensor, center: Tensor, columns_ok=None) -> Tensor:
    """A per-column constant (`center` rounded to x's dtype) to subtract from x before the
    expansion -t|x_i - x_j|^2 = 2t x_i.x_j - t|x_i|^2 - t|x_j|^2 (and its backward, x_i sum w -
    sum w x_j with 16-bit weights): with a common offset, collapsed features included (what
    uniformity penalizes), both cancel the offset's magnitude (float32 gradients off by 4e-3 at an
    offset of 33x the spread, bfloat16 ones by 1.4e-1 on collapsed unit features: tests/
    test_lse_family.py, test_uniformity_offset_features).  float32 / float64 inputs: every
    column (the rounding of x - c moves a distance by ~1e-7 of itself).  16-bit inputs: 0 on the
    columns where some x - c would round (Sterbenz: exact where x is within a factor 2 of c), so
    that x minus it is an exact translation and every |x_i - x_j| the same number (a 16-bit
    rounding of the difference would cost 2^-9).  `columns_ok` (the distributed form) turns the
    local verdict into the global one.  No gradient: a constant shift changes none."""
    c = center.detach().to(x.dtype)
    if x.dtype not in (torch.float16, torch.bfloat16):
        return c
    diff = x.detach().double() - c.double()  # (exact in float64)
    ok = (diff.to(x.dtype).double() == diff).all(0)
    if columns_ok is not None:
        ok = columns_ok(ok)
    return torch.where(ok, c, torch.zeros_like(c))


@_amp_boundary()
def uniformity_loss(x: Tensor, t=2.0, *, backend: str | None = None) -> Tensor:
    """Wang & Isola 2020: ``log mean_{i != j} exp(-t |x_i - x_j|^2)`` (no normalization inside)."""
    V.matrix("x", x, min_rows=2)
    V.scalar("t", t)
    be = _resolve(backend, "lse", x)
    if be == "reference":
        return reference.uniformity_loss(x, t)
    n = x.shape[0]
    x = x - _exact_shift(x, x.detach().double().mean(0))
    # rows LSE_{j != i} -t|x_i - x_j|^2 (the kernels' 2t x_i.x_j - t|x_j|^2 - t|x_i|^2, gradients as
    # weighted differences: fam.lse_sqdist)
    row = fam.lse_sqdist(be, x, x, _scale(t, x.device, invert=False), mask_mode=MASK_DIAG)
    return torch.logsumexp(row, dim=0) - math.log(n * (n - 1))


@_amp_boundary()
def alignment_loss(x: Tensor, y: Tensor, alpha=2.0, *, backend: str | None = None) -> Tensor:
    """Wang & Isola 2020: ``mean_i |x_i - y_i|^alpha`` (O(N D) on every backend)."""
    V.matrix("x", x)
    V.matrix("y", y)
    V.same_device_dtype(x=x, y=y)
    V.same_shape(x=x, y=y)
    V.scalar("alpha", alpha, positive=True)
    _resolve(backend, "lse", x)  # validates the name (or CONTRASTIVE_KERNELS_BACKEND's) and availability
    return reference.alignment_loss(x, y, alpha)


# ---------------------------------------------------------- cross-correlation
_STANDARDIZE_CHUNK = 1 << 18  # float64 elements per column chunk


def _column_slices(n, d):
    step = max(1, _STANDARDIZE_CHUNK // max(n, 1))
    return [slice(c0, min(d, c0 + step)) for c0 in range(0, d, step)]


class _Standardize(torch.autograd.Function):
    """Per-feature batch standardization with biased variance (BatchNorm1d(affine=False) in
    training mode), float32 out.

    Computed in float64, column chunk by column chunk (features are independent): at small N
    the BatchNorm Jacobian nearly cancels (N = 2: the standardized values are +-1 up to eps),
    and a float32 backward through it misses the float64 result by ~1e-4.  Saves only the
    input and the per-feature mean / 1/std, so its extra memory is the float32 output plus one
    float64 chunk."""

    @staticmethod
    def forward(ctx, z, eps):
        n, d = z.shape
        out = torch.empty((n, d), dtype=torch.float32, device=z.device)
        mean = torch.empty((d,), dtype=torch.float64, device=z.device)
        rstd = torch.empty_like(mean)
        for sl in _column_slices(n, d):
            y, m, r = torch.native_batch_norm(z[:, sl].double(), None, None, None, None, True, 0.0, eps)
            out[:, sl], mean[sl], rstd[sl] = y, m, r
        ctx.save_for_backward(z, mean, rstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        z, mean, rstd = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        dz = torch.empty_like(z)
        for sl in _column_slices(*z.shape):
            dz[:, sl] = torch.ops.aten.native_batch_norm_backward(
                grad[:, sl].double(), z[:, sl].double(), None, None, None, mean[sl], rstd[sl], True, ctx.eps,
                [True, False, False])[0]
        return dz, None


def _standardize(z: Tensor, eps: float) -> Tensor:
    return _Standardize.apply(z, float(eps))


def _check_standardizable(fn: str, z1: Tensor) -> None:
    """Per-feature batch standardization (BatchNorm1d in training mode, which refuses the same)
    of one row is 0 / sqrt(eps): a constant loss with zero gradient, not a loss to train on."""
    if z1.shape[0] < 2:
        raise ValueError(f"{fn} standardizes each feature over the batch (BatchNorm1d in training mode): z1 needs "
                         f"at least 2 rows, got shape {tuple(z1.shape)}")


@_amp_boundary()
def cross_correlation(z1: Tensor, z2: Tensor, *, standardize: bool = True, eps=1e-5,
                      backend: str | None = None) -> Tensor:
    """``z~1^T z~2 / N`` (D x D), z~ = per-feature batch standardization with biased
    variance (BatchNorm1d(affine=False) in training mode)."""
    V.matrix("z1", z1)
    V.matrix("z2", z2)
    V.same_device_dtype(z1=z1, z2=z2)
    V.same_shape(z1=z1, z2=z2)
    V.scalar("eps", eps, lower=0)
    if standardize:
        _check_standardizable("cross_correlation", z1)
    be = _resolve(backend, "xcorr", z1)
    if be == "reference":
        return reference.cross_correlation(z1, z2, standardize=standardize, eps=eps)
    a, b = (_standardize(z1, eps), _standardize(z2, eps)) if standardize else (z1.float(), z2.float())
    return a.T @ b / z1.shape[0]


@_amp_boundary()
def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd=0.0051, *, eps=1e-5, backend: str | None = None,
                      path: str = "auto") -> Tensor:
    """``sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2``, C = cross_correlation(z1, z2).

    The off-diagonal sum comes from the xcorr family: N x N Gram matrices when N < D
    (``|A^T B|_F^2 = <A A^T, B B^T>``), D x D tiles otherwise; ``path`` forces one."""
    V.matrix("z1", z1)
    V.matrix("z2", z2)
    V.same_device_dtype(z1=z1, z2=z2)
    V.same_shape(z1=z1, z2=z2)
    V.scalar("lambd", lambd)
    V.scalar("eps", eps, lower=0)
    _check_standardizable("barlow_twins_loss", z1)
    path_id = {"auto": 0, "gram": 1, "tiled": 2}[V.choice("path", path, ("auto", "gram", "tiled"))]
    be = _resolve(backend, "xcorr", z1)
    if be == "reference":
        return reference.barlow_twins_loss(z1, z2, lambd, eps=eps)
    n = z1.shape[0]
    # Standardized in float32 (O(N D)); the kernels take the float32 result so that
    # C_ii near 1 keeps its precision whatever the input dtype.
    off, diag = fam.xcorr(be, _standardize(z1, eps), _standardize(z2, eps), path=path_id)
    return (diag / n - 1).pow(2).sum() + lambd * off / (n * n)


@_amp_boundary()
def vicreg_loss(z1: Tensor, z2: Tensor, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, *, eps=1e-4,
                backend: str | None = None, path: str = "auto") -> Tensor:
    """VICReg (facebookresearch/vicreg): invariance MSE + variance hinge on
    ``sqrt(var_unbiased + eps)`` (each view /2) + off-diagonal covariance^2 / D per view."""
    V.matrix("z1", z1, min_rows=2)
    V.matrix("z2", z2, min_rows=2)
    V.same_device_dtype(z1=z1, z2=z2)
    V.same_shape(z1=z1, z2=z2)
    for name, v in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
        V.scalar(name, v)
    V.scalar("eps", eps, lower=0)
    path_id = {"auto": 0, "gram": 1, "tiled": 2}[V.choice("path", path, ("auto", "gram", "tiled"))]
    be = _resolve(backend, "xcorr", z1)
    if be == "reference":
        return reference.vicreg_loss(z1, z2, sim_coeff, std_coeff, cov_coeff, eps=eps)
    n, d = z1.shape
    x, y = z1.float(), z2.float()
    repr_loss = F.mse_loss(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    std_loss = (F.relu(1 - torch.sqrt(xc.var(0) + eps)).mean() + F.relu(1 - torch.sqrt(yc.var(0) + eps)).mean()) / 2
    off_x, _ = fam.xcorr(be, xc, xc, path=path_id)
    off_y, _ = fam.xcorr(be, yc, yc, path=path_id)
    cov_loss = (off_x + off_y) / ((n - 1) ** 2 * d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
