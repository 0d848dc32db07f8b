"""Independent re-implementations ("peers") of every loss, written for the tests from
the papers and from the semantics of the original libraries' source, never by calling
`contrastive_kernels.reference`.

Each peer is plain PyTorch, float64-capable and autograd-capable, and follows the way
its original computes (cross-entropy over concatenated logits, masks that drop
columns, BatchNorm for standardization, explicit per-anchor loops where an original
works per pair), so that a shared mistake with our reference is unlikely. The peer
classes mirror the originals' constructor and forward signatures (parameter names,
order, kinds and defaults) for the signature tests of tests/test_compat.py.

Originals (source semantics):
  * info-nce-pytorch (RElbers): info_nce(query, positive_key, negative_keys, temperature,
    reduction), 'unpaired' negative mode;
  * MoCo (facebookresearch/moco builder): l_pos, l_neg against the queue, label 0;
  * lightly 1.6 (lightly/loss/ntx_ent_loss.py, dcl_loss.py, barlow_twins_loss.py,
    vicreg_loss.py, lightly/models/modules/memory_bank.py);
  * open_clip (src/open_clip/loss.py: ClipLoss, SigLipLoss), single process;
  * pytorch-metric-learning 2.x (losses/ntxent_loss.py, supcon_loss.py,
    generic_pair_loss.py, reducers MeanReducer / AvgNonZeroReducer, the early exits);
  * SupContrast (HobbitLong/SupContrast losses.py), Khosla et al. 2020;
  * HCL (joshr17/HCL image/main.py criterion, estimator 'hard'), Robinson et al. 2021;
  * barlowtwins (facebookresearch/barlowtwins main.py), vicreg (main_vicreg.py);
  * align_uniform (SsnL/align_uniform): align_loss / uniform_loss, Wang & Isola 2020.

Numerical guards that only exist to keep the originals' float32 code away from log(0)
(SupContrast's `+ 1e-9` inside the log, PML's `+ finfo.tiny`) are left out: they are
not part of the formula and would differ from it by far more than 1e-10 in float64.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def unit(x: Tensor) -> Tensor:
    """The F.normalize convention: x / max(|x|, 1e-12), per row."""
    return F.normalize(x, p=2.0, dim=-1, eps=1e-12)


# ------------------------------------------------------------------ similarity
def similarity(a: Tensor, b: Optional[Tensor] = None, scale=1.0, normalize: bool = True) -> Tensor:
    """SPEC: `scale * F.normalize(a) @ F.normalize(b).T` (b = None: a with itself)."""
    b = a if b is None else b
    if normalize:
        a, b = unit(a), unit(b)
    return scale * torch.einsum("nd,md->nm", a, b)


# --------------------------------------------------------------------- InfoNCE
def info_nce_pytorch(query, positive_key, negative_keys=None, temperature=0.1, reduction="mean"):
    """RElbers/info-nce-pytorch `info_nce`, 'unpaired' mode: with negative_keys the
    candidates are the positive key and every negative key (label 0); without, the
    candidates are all positive keys (label i)."""
    q, k = unit(query), unit(positive_key)
    if negative_keys is not None:
        nk = unit(negative_keys)
        pos = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, q @ nk.transpose(-2, -1)], dim=1)
        target = torch.zeros(q.shape[0], dtype=torch.long)
    else:
        logits = q @ k.transpose(-2, -1)
        target = torch.arange(q.shape[0])
    return F.cross_entropy(logits / temperature, target, reduction=reduction)


def moco_loss(q, k, queue, T=0.07):
    """MoCo (He et al. 2020) builder: q, k normalized by the encoders, the queue holds
    normalized keys; logits [l_pos, l_neg] / T with label 0."""
    q, k, queue = unit(q), unit(k), unit(queue)
    l_pos = torch.einsum("nc,nc->n", q, k)[:, None]
    l_neg = torch.einsum("nc,kc->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def _drop_column(logits: Tensor, col: Tensor) -> Tensor:
    """Row i of `logits` without its column col[i] (lightly DCL style: boolean select + view)."""
    n, m = logits.shape
    keep = torch.ones(n, m, dtype=torch.bool)
    keep[torch.arange(n), col] = False
    return logits[keep].view(n, m - 1)


def info_nce_general(query, key, negatives=None, temperature=0.1, positive_index=None, in_batch_negatives=True,
                     symmetric=False, decoupled=False, normalize=True, reduction="mean"):
    """SPEC's info_nce written as cross-entropies over explicit candidate lists:
    in-batch rows are CE(q K^T | neg, target p_i); MoCo rows CE([pos | neg], 0); decoupled
    rows drop the positive column and take -pos + LSE(rest); symmetric is the CLIP form."""
    q, k = (unit(query), unit(key)) if normalize else (query, key)
    nq = None
    if negatives is not None:
        nq = unit(negatives) if normalize else negatives
    n = q.shape[0]
    p = torch.arange(n) if positive_index is None else positive_index.long()
    pos = torch.einsum("nd,nd->n", q, k[p]) / temperature
    neg = None if nq is None else (q @ nq.T) / temperature
    if in_batch_negatives:
        full = (q @ k.T) / temperature
        if decoupled:
            rest = _drop_column(full, p)
            if neg is not None:
                rest = torch.cat([rest, neg], dim=1)
            rows = torch.logsumexp(rest, dim=1) - pos
        else:
            logits = full if neg is None else torch.cat([full, neg], dim=1)
            rows = F.cross_entropy(logits, p, reduction="none")
        if symmetric:
            back = full.T
            if decoupled:
                other = torch.logsumexp(_drop_column(back, torch.arange(n)), dim=1) - pos
            else:
                other = F.cross_entropy(back, torch.arange(n), reduction="none")
            rows = (rows + other) / 2
    else:
        if decoupled:
            rows = torch.logsumexp(neg, dim=1) - pos
        else:
            logits = pos[:, None] if neg is None else torch.cat([pos[:, None], neg], dim=1)
            rows = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long), reduction="none")
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# --------------------------------------------------------------------- lightly
class LightlyMemoryBank(nn.Module):
    """lightly.models.modules.MemoryBankModule (1.5), single process, dim_first=False view:
    `size` an int (the bank is created at the first forward, its dimension taken from the
    batch) or (size, dim) (created at construction); bank = F.normalize(randn(size, dim))
    in float32; forward returns a clone of the bank *before* the update; the update writes
    the batch at the pointer, or, when it does not fit before the end, only its first
    rows into the tail and the pointer goes back to 0."""

    def __init__(self, size: Union[int, Sequence[int]] = 65536):
        super().__init__()
        self.size = (size,) if isinstance(size, int) else tuple(size)
        self.bank = torch.empty(self.size, dtype=torch.float)
        self.ptr = 0
        if not isinstance(size, int):
            self._create(self.size)

    @torch.no_grad()
    def _create(self, shape):
        self.bank = unit(torch.randn(shape).float())
        self.ptr = 0

    @torch.no_grad()
    def forward(self, batch: Tensor, update: bool = False):
        if self.size[0] == 0:
            return None
        if self.bank.ndim == 1:
            self._create((self.size[0], batch.shape[1]))
        out = self.bank.clone()
        if update:
            b, s = batch.shape[0], self.size[0]
            if self.ptr + b >= s:
                self.bank[self.ptr:] = batch[: s - self.ptr].detach().float()
                self.ptr = 0
            else:
                self.bank[self.ptr:self.ptr + b] = batch.detach().float()
                self.ptr += b
        return out


class LightlyNTXentLoss(nn.Module):
    """lightly.loss.NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False).

    Without a bank: rows of view 0 score [out0 out1^T | out0 out0^T without the diagonal]
    with target i, rows of view 1 likewise; with a bank: MoCo, [out0.out1 | out0 bank^T]
    with target 0, the bank (float32, as in lightly) is queried, then updated with the
    normalized out1 when out0 requires grad. The bank is used in the inputs' dtype (lightly
    itself would fail on float64 inputs against its float32 bank)."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        if abs(temperature) < 1e-8:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(temperature))
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.memory_bank = LightlyMemoryBank(memory_bank_size)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        n = out0.shape[0]
        out0, out1 = unit(out0), unit(out1)
        bank = self.memory_bank(out1, update=out0.requires_grad)
        if bank is not None:
            bank = bank.to(out0.dtype)
            sim_pos = torch.einsum("nc,nc->n", out0, out1)[:, None]
            sim_neg = torch.einsum("nc,kc->nk", out0, bank)
            logits = torch.cat([sim_pos, sim_neg], dim=1) / self.temperature
            return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
        eye = torch.eye(n, dtype=torch.bool)
        t = self.temperature
        l00, l01 = out0 @ out0.T / t, out0 @ out1.T / t
        l10, l11 = out1 @ out0.T / t, out1 @ out1.T / t
        l00, l11 = l00[~eye].view(n, -1), l11[~eye].view(n, -1)
        logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)], 0)
        return F.cross_entropy(logits, torch.arange(n).repeat(2))


def nt_xent(z1, z2, temperature=0.5):
    """lightly's NTXentLoss without a memory bank, as a function."""
    return LightlyNTXentLoss(temperature)(z1, z2)


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly's DCLW weights: 2 - N softmax(<out0_i, out1_i> / sigma), no gradient."""
    s = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return 2 - out0.shape[0] * torch.softmax(s, dim=0)


class LightlyDCLLoss(nn.Module):
    """lightly.loss.DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False):
    per direction, -w * s_ii/t + LSE over all negatives {s(out0_i, out0_j)/t, s(out0_i, out1_j)/t : j != i}
    (one log-sum-exp, DCL paper Eq. 6, as lightly >= 1.6; lightly <= 1.5 summed two separate ones),
    mean over i, averaged over both directions; weight_fn gets the normalized views."""

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0, out1 = unit(out0), unit(out1)
        return 0.5 * (self._one_way(out0, out1) + self._one_way(out1, out0))

    def _one_way(self, a, b):
        n = a.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        s00 = a @ a.T / self.temperature
        s01 = a @ b.T / self.temperature
        positive = -s01[eye]
        if self.weight_fn:
            positive = positive * self.weight_fn(a, b)
        negatives = torch.cat([s00[~eye].view(n, -1), s01[~eye].view(n, -1)], dim=1)
        return (positive + torch.logsumexp(negatives, dim=1)).mean()


class LightlyDCLWLoss(LightlyDCLLoss):
    """lightly.loss.DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False):
        super().__init__(temperature, partial(negative_mises_fisher_weights, sigma=sigma), gather_distributed)


def batchnorm_cross_correlation(z1, z2, eps=1e-5):
    """Barlow Twins' C: each view through BatchNorm1d(affine=False) in training mode
    (biased batch variance), then bn(z1)^T bn(z2) / N."""
    a = F.batch_norm(z1, None, None, training=True, eps=eps)
    b = F.batch_norm(z2, None, None, training=True, eps=eps)
    return a.T @ b / z1.shape[0]


def off_diagonal(c: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix (the barlowtwins / vicreg trick)."""
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins(z1, z2, lambd=0.0051, eps=1e-5):
    """facebookresearch/barlowtwins: on_diag = sum (C_ii - 1)^2, off_diag = sum C_ij^2."""
    c = batchnorm_cross_correlation(z1, z2, eps)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diag + lambd * off_diagonal(c).pow(2).sum()


class LightlyBarlowTwinsLoss(nn.Module):
    """lightly.loss.BarlowTwinsLoss(lambda_param=5e-3, gather_distributed=False), lightly
    after PR #1806: per-view batch norm (eps 1e-5), (C - I)^2 with the off-diagonal
    entries scaled by lambda."""

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False):
        super().__init__()
        self.lambda_param = lambda_param
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        c = batchnorm_cross_correlation(z_a, z_b, 1e-5)
        d = c.shape[0]
        eye = torch.eye(d, dtype=torch.bool)
        diff = (c - eye.to(c.dtype)).pow(2)
        weight = torch.where(eye, torch.ones_like(diff), torch.full_like(diff, self.lambda_param))
        return (diff * weight).sum()


def vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4):
    """facebookresearch/vicreg main_vicreg.py, one process."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum().div(d) + off_diagonal(cov_y).pow(2).sum().div(d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


class LightlyVICRegLoss(nn.Module):
    """lightly.loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0,
    gather_distributed=False, eps=0.0001)."""

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 0.0001):
        super().__init__()
        self.lambda_param, self.mu_param, self.nu_param = lambda_param, mu_param, nu_param
        self.gather_distributed = gather_distributed
        self.eps = eps

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        if z_a.dim() == 2:
            return vicreg(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, self.eps)
        # (batch, ..., dim), lightly's generalization (after VICRegL): statistics over the batch
        # at every position, the covariance as a batched Gram matrix per position
        def variance(x):
            x = x - x.mean(dim=0)
            return F.relu(1.0 - torch.sqrt(x.var(dim=0) + self.eps)).mean()

        def covariance(x):
            x = x - x.mean(dim=0)
            d = x.shape[-1]
            cov = torch.einsum("b...c,b...d->...cd", x, x) / (x.shape[0] - 1)
            off = cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
            return (off.pow(2).sum((-2, -1)) / d).mean()

        return (self.lambda_param * F.mse_loss(z_a, z_b) + self.mu_param * 0.5 * (variance(z_a) + variance(z_b))
                + self.nu_param * (covariance(z_a) + covariance(z_b)))


# -------------------------------------------------------------------- open_clip
class OpenClipClipLoss(nn.Module):
    """open_clip.loss.ClipLoss, single process: logits_per_image = s I T^T (+ b),
    logits_per_text = s T I^T (+ b), mean of the two cross-entropies against arange."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__()
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        per_image = logit_scale * image_features @ text_features.T
        per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image = per_image + logit_bias
            per_text = per_text + logit_bias
        target = torch.arange(per_image.shape[0])
        loss = (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


def clip_loss(image, text, logit_scale, logit_bias=None):
    return OpenClipClipLoss()(image, text, logit_scale, logit_bias)


class OpenClipSigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss, single process: labels 2I - 1 (all -1 when
    negative_only), loss -sum log sigmoid(labels * (s I T^T + b)) / N (N = image rows)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"

    @staticmethod
    def loss(image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = -torch.ones_like(logits)
        if not negative_only:
            labels = labels + 2 * torch.eye(*logits.shape, dtype=logits.dtype)
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        loss = self.loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


def siglip_loss(image, text, logit_scale, logit_bias, negative_only=False):
    return OpenClipSigLipLoss.loss(image, text, logit_scale, logit_bias, negative_only)


# ------------------------------------------------------------ supervised (Khosla)
def supcon_supcontrast(features, labels=None, temperature=0.07, base_temperature=0.07):
    """HobbitLong/SupContrast SupConLoss, contrast_mode='all': features [bsz, n_views, D]
    (already normalized by the model), anchors = every view of every sample; mean over
    all anchors (each has a positive when n_views >= 2). labels None = SimCLR."""
    bsz, views = features.shape[:2]
    mask = torch.eye(bsz) if labels is None else (labels[:, None] == labels[None, :]).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.to(features.dtype).repeat(views, views)
    not_self = 1 - torch.eye(bsz * views, dtype=features.dtype)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def supcon_per_anchor(embeddings, labels, temperature=0.1, ref_embeddings=None, ref_labels=None, normalize=True):
    """Khosla et al. L^sup_out, anchor by anchor (a Python loop: independent of any mask
    arithmetic): P(i) = rows with i's label other than i (all matching rows of the
    reference set when given), A(i) = every row but i (every reference row).
    Returns (per-anchor losses, has-positive flags); anchors without a positive get 0."""
    x = unit(embeddings) if normalize else embeddings
    self_ref = ref_embeddings is None
    if self_ref:
        r, rl = x, labels
    else:
        r = unit(ref_embeddings) if normalize else ref_embeddings
        rl = ref_labels
    lab, rlab = labels.tolist(), rl.tolist()
    losses, has = [], []
    for i in range(x.shape[0]):
        cand = [j for j in range(r.shape[0]) if not (self_ref and j == i)]
        pos = [j for j in cand if rlab[j] == lab[i]]
        if not pos:
            losses.append(x.new_zeros(()))
            has.append(False)
            continue
        s = (r[cand] @ x[i]) / temperature
        lse = torch.logsumexp(s, dim=0)
        sp = (r[pos] @ x[i]) / temperature
        losses.append(-(sp - lse).mean())
        has.append(True)
    return torch.stack(losses), torch.tensor(has)


def supcon(embeddings, labels, temperature=0.1, ref_embeddings=None, ref_labels=None, normalize=True):
    """SPEC's supcon_loss: mean over the anchors with >= 1 positive (0 when none has one)."""
    losses, has = supcon_per_anchor(embeddings, labels, temperature, ref_embeddings, ref_labels, normalize)
    if not bool(has.any()):
        return embeddings.sum() * 0
    return losses[has].mean()


# --------------------------------------------------------- pytorch-metric-learning
def _pml_pairs(labels, ref_labels, self_ref):
    """PML get_all_pairs_indices: positives = equal labels (minus the diagonal when the
    reference set is the batch itself), negatives = different labels."""
    match = labels[:, None] == ref_labels[None, :]
    pos = match.clone()
    if self_ref:
        pos.fill_diagonal_(False)
    return pos, ~match


def _pml_reference_set(embeddings, labels, ref_emb, ref_labels):
    """(reference rows, their labels, whether the (i, i) pairs are dropped): PML's
    set_ref_emb and get_all_pairs_indices -- no ref_emb is the batch itself; ref_labels
    left out means labels; the (i, i) pairs are dropped when the reference labels are the
    labels tensor itself (`ref_labels is labels`)."""
    r = embeddings if ref_emb is None else ref_emb
    rl = labels if ref_emb is None or ref_labels is None else ref_labels
    return r, rl, rl is labels


def _pml_zero(embeddings):
    return torch.sum(embeddings * 0)


def _pml_tuple(indices_tuple):
    """PML's convert_to_pairs: (a1, p, a2, n) as given, triplets (a, p, n) as (a, p, a, n)."""
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    a, p, n = indices_tuple
    return a, p, a, n


class PMLNTXentLoss(nn.Module):
    """pytorch_metric_learning.losses.NTXentLoss(temperature=0.07, **kwargs), default
    CosineSimilarity distance and MeanReducer: one term per positive pair (a, p),
    -log(e^{s_ap/t} / (e^{s_ap/t} + sum_{n in neg(a)} e^{s_an/t})), averaged over all
    positive pairs; 0 when there is no positive or no negative pair, or at most one of each."""

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        r, rl, self_ref = _pml_reference_set(embeddings, labels, ref_emb, ref_labels)
        if indices_tuple is not None:
            return self._mined(embeddings, r, _pml_tuple(indices_tuple))
        pos, neg = _pml_pairs(labels, rl, self_ref)
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        if (n_pos <= 1 and n_neg <= 1) or n_pos == 0 or n_neg == 0:
            return _pml_zero(embeddings)
        s = unit(embeddings) @ unit(r).T / self.temperature
        terms = []
        for a in range(embeddings.shape[0]):
            negs = s[a][neg[a]]
            for p in torch.nonzero(pos[a]).flatten().tolist():
                row = torch.cat([s[a, p].reshape(1), negs])
                terms.append(-(s[a, p] - torch.logsumexp(row, dim=0)))
        return torch.stack(terms).mean()

    def _mined(self, embeddings, r, pairs):
        """A miner's pairs, as listed (repeats count): one term per (a1[k], p[k]) against
        the negatives (a2[j], n[j]) with a2[j] == a1[k]."""
        a1, p, a2, n = pairs
        if all(len(t) <= 1 for t in pairs) or len(a1) == 0 or len(a2) == 0:
            return _pml_zero(embeddings)
        x, y = unit(embeddings), unit(r)
        terms = []
        for k in range(len(a1)):
            a = int(a1[k])
            row = [x[a] @ y[int(p[k])]] + [x[a] @ y[int(n[j])] for j in range(len(a2)) if int(a2[j]) == a]
            row = torch.stack(row) / self.temperature
            terms.append(torch.logsumexp(row, dim=0) - row[0])
        return torch.stack(terms).mean()


class PMLSupConLoss(nn.Module):
    """pytorch_metric_learning.losses.SupConLoss(temperature=0.1, **kwargs), default
    CosineSimilarity and AvgNonZeroReducer: per anchor -mean_{p} [s_ap/t - LSE_{pos or neg
    of a} s/t] (0 for an anchor without positives), averaged over the anchors whose loss
    is > 0; 0 when there is no positive or no negative pair, or at most one of each."""

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        r, rl, self_ref = _pml_reference_set(embeddings, labels, ref_emb, ref_labels)
        if indices_tuple is not None:
            a1, p, a2, n = pairs = _pml_tuple(indices_tuple)
            if all(len(t) <= 1 for t in pairs) or len(a1) == 0 or len(a2) == 0:
                return _pml_zero(embeddings)
            # the pairs as sets (PML's masks), which must not overlap
            pos = torch.zeros(embeddings.shape[0], r.shape[0], dtype=torch.bool)
            neg = torch.zeros_like(pos)
            pos[a1, p] = True
            neg[a2, n] = True
            assert not bool((pos & neg).any())
        else:
            pos, neg = _pml_pairs(labels, rl, self_ref)
            n_pos, n_neg = int(pos.sum()), int(neg.sum())
            if (n_pos <= 1 and n_neg <= 1) or n_pos == 0 or n_neg == 0:
                return _pml_zero(embeddings)
        s = unit(embeddings) @ unit(r).T / self.temperature
        keep = pos | neg
        rows = keep.any(1)  # (a miner may leave an anchor without pairs: no softmax there)
        s, keep, pos = s[rows], keep[rows], pos[rows]
        log_prob = s - torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
        per_anchor = -(torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)
                       / pos.sum(1).clamp(min=1).to(s.dtype))
        nonzero = per_anchor > 0
        if not bool(nonzero.any()):
            return _pml_zero(embeddings)
        return per_anchor[nonzero].mean()


# --------------------------------------------------------------------- DCL / HCL
def dcl(z1, z2, temperature=0.1, weight_sigma=None):
    """lightly's DCLLoss (DCLWLoss when weight_sigma is given), as a function."""
    if weight_sigma is None:
        return LightlyDCLLoss(temperature)(z1, z2)
    return LightlyDCLWLoss(temperature, sigma=weight_sigma)(z1, z2)


def hcl(out_1, out_2, temperature=0.5, tau_plus=0.1, beta=1.0, normalize=True):
    """joshr17/HCL image/main.py `criterion`, estimator 'hard' (the model's outputs are
    L2-normalized there; `normalize` does that here)."""
    if normalize:
        out_1, out_2 = unit(out_1), unit(out_2)
    bs = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(out @ out.t() / temperature)
    mask = torch.ones(bs, 2 * bs, dtype=torch.bool)
    for i in range(bs):
        mask[i, i] = False
        mask[i, i + bs] = False
    mask = torch.cat([mask, mask], dim=0)
    neg = neg.masked_select(mask).view(2 * bs, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    n_neg = 2 * bs - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    ng = (-tau_plus * n_neg * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n_neg * torch.exp(-1 / torch.as_tensor(temperature, dtype=out.dtype)))
    return (-torch.log(pos / (pos + ng))).mean()


# ------------------------------------------------------------- align / uniform
def align_loss(x, y, alpha=2):
    """SsnL/align_uniform."""
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def uniform_loss(x, t=2):
    """SsnL/align_uniform: log of the mean Gaussian potential over the pairs i < j
    (torch.pdist), which equals the mean over i != j."""
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()
