"""The reference backend: every loss of SPEC.md in plain PyTorch.

This module is the specification in code.  Each function is short, builds the full
N x M (or D x D) matrix, and is autograd-capable and float64-capable.  Inputs are
assumed valid (the public functions in `functional` check them).  Half-precision
inputs are computed in float32 (the loss is float32; gradients flow back in the
input dtype through the cast).

The fused backends are tested against these functions in float64, and these
functions are tested against independent formulas (tests/test_reference_formulas.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _up(x: Tensor | None) -> Tensor | None:
    """Compute in float32 for half inputs, in the input dtype otherwise."""
    if x is None:
        return None
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _norm(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=1, eps=1e-12) if normalize else x


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _no_neg_inf(s: Tensor) -> Tensor:
    """Logits with a -inf entry made NaN.  Only an infinite input (or an overflowing logit) gives
    one, and exp(-inf) = 0 would drop it silently from a log-sum-exp: a non-finite input never
    gives a finite loss (SPEC).  The kernels do the same to a kept -inf logit; masks are applied
    after this, as -inf."""
    return torch.where(s == float("-inf"), float("nan"), s)


def normalized_similarity(a: Tensor, b: Tensor | None = None, scale=1.0, *, normalize: bool = True) -> Tensor:
    a = _up(a)
    b = a if b is None else _up(b)
    return scale * (_norm(a, normalize) @ _norm(b, normalize).T)


def _exact_ce(s, raw, t):
    """Row i's cross-entropy log sum_{kept j} exp(s_ij) - raw_{i, t_i} (s: the logits with the
    dropped pairs -inf, raw: unmasked), exact for any size: where the target is kept, the
    softplus of the log-sum-exp of the other kept logits relative to the target's.  The
    plain logsumexp(s) - logit leaves an ulp of the logits (1e-14 at 100, in float64) in a
    cross-entropy that can be far smaller (a confident row: 1e-20), where it would be the
    reference, not the kernel, that is wrong."""
    t = t[:, None]
    x = raw.gather(1, t)
    kept = s.gather(1, t)[:, 0] > float("-inf")
    others = (s - x).scatter(1, t, float("-inf"))
    guard = torch.full_like(x, -1e4)  # exp(-1e4) = 0: a row without other logits stays finite, its gradient defined
    rest = torch.logsumexp(torch.cat([others, guard], 1), 1)
    exact = torch.logaddexp(torch.zeros_like(rest), rest)  # log(1 + e^rest) (F.softplus is linear above 20)
    # A non-finite target logit takes the plain form, so that it stays non-finite (SPEC: never a
    # silently finite loss): +inf - (others - inf) would otherwise give the limit 0.
    exact_ok = kept & torch.isfinite(x[:, 0])
    return torch.where(exact_ok, exact, torch.logsumexp(s, 1) - x[:, 0])


def _ce(logits, target):
    """-log softmax(logits)[target] per row, exactly (see _exact_ce)."""
    return _exact_ce(logits, logits, target)


def info_nce(query, key, *, negatives=None, temperature=0.1, positive_index=None,
             in_batch_negatives=True, symmetric=False, decoupled=False, normalize=True,
             reduction="mean"):
    q, k, neg = _up(query), _up(key), _up(negatives)
    q, k = _norm(q, normalize), _norm(k, normalize)
    if neg is not None:
        neg = _norm(neg, normalize)
    n, m = q.shape[0], k.shape[0]
    rows = torch.arange(n, device=q.device)
    p = rows if positive_index is None else positive_index.to(q.device).long()
    pos = (q * k[p]).sum(1) / temperature

    if in_batch_negatives:
        logits = _no_neg_inf((q @ k.T) / temperature)
        if decoupled:
            logits = logits.masked_fill(F.one_hot(p, m).bool(), float("-inf"))
    else:
        logits = pos[:, None] if not decoupled else q.new_empty((n, 0))
    if neg is not None:
        logits = torch.cat([logits, _no_neg_inf((q @ neg.T) / temperature)], dim=1)
    # (the positive among the logits: the cross-entropy, exactly; else the LSE minus the positive)
    if in_batch_negatives and not decoupled:
        loss = _ce(logits, p)
    elif not decoupled:  # MoCo: the positive is column 0
        loss = _ce(logits, torch.zeros_like(rows))
    else:
        loss = torch.logsumexp(logits, dim=1) - pos

    if symmetric:  # key -> query direction (M == N, no negatives, identity pairing)
        logits_t = _no_neg_inf((k @ q.T) / temperature)
        if decoupled:
            logits_t = logits_t.masked_fill(torch.eye(n, dtype=torch.bool, device=q.device), float("-inf"))
            loss = 0.5 * (loss + torch.logsumexp(logits_t, dim=1) - pos)
        else:
            loss = 0.5 * (loss + _ce(logits_t, rows))
    return _reduce(loss, reduction)


def nt_xent(z1, z2, temperature=0.5, *, normalize=True):
    z = _norm(torch.cat([_up(z1), _up(z2)]), normalize)
    n2 = z.shape[0]
    n = n2 // 2
    logits = _no_neg_inf((z @ z.T) / temperature)
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(n2, device=z.device) + n) % n2
    return _ce(logits, target).mean()


def clip_loss(image, text, logit_scale, logit_bias=None):
    i, t = _up(image), _up(text)
    logits = logit_scale * (i @ t.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    logits = _no_neg_inf(logits)
    target = torch.arange(i.shape[0], device=i.device)
    return 0.5 * (_ce(logits, target).mean() + _ce(logits.T, target).mean())


def _softplus_nonfinite_nan(y):
    """softplus(y) = -logsigmoid(-y) (exact: F.softplus is linear above its threshold 20), NaN where
    y is -inf or NaN: the limit 0 at -inf would give an infinite input a finite loss (SPEC)."""
    return torch.where(y > float("-inf"), -F.logsigmoid(-y), float("nan"))


def siglip_loss(image, text, logit_scale, logit_bias, *, negative_only=False):
    i, t = _up(image), _up(text)
    logits = logit_scale * (i @ t.T) + logit_bias
    labels = -torch.ones_like(logits)
    if not negative_only:
        labels = labels + 2 * torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device)
    return _softplus_nonfinite_nan(-labels * logits).sum() / i.shape[0]


def supcon_loss(embeddings, labels, temperature=0.1, *, ref_embeddings=None, ref_labels=None, normalize=True,
                reduction="mean", exclude_self=None):
    """exclude_self (default: when there is no reference set) drops the (i, i) pairs; with a
    reference set of as many rows, that is pytorch-metric-learning's `ref_labels is labels`."""
    x = _norm(_up(embeddings), normalize)
    if ref_embeddings is None:
        r, rl = x, labels
    else:
        r, rl = _norm(_up(ref_embeddings), normalize), ref_labels
    logits = _no_neg_inf((x @ r.T) / temperature)
    pos = labels[:, None] == rl[None, :]
    if (ref_embeddings is None) if exclude_self is None else exclude_self:
        self_mask = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        pos = pos & ~self_mask
    has = pos.sum(1) > 0
    anchor_loss = torch.where(has, _labels_rows(logits, logits, pos, torch.logsumexp(logits, dim=1)), 0.0)
    if reduction == "none":
        return anchor_loss
    # Anchors without a positive are left out of the mean; with none at all the loss is 0.
    return anchor_loss.sum() / has.sum().clamp(min=1)


def dcl_weights(z1, z2, sigma):
    """DCLW's negative von Mises-Fisher weights 2 - N softmax(<z1_i, z2_i> / sigma) (no gradient)."""
    s = (z1.detach() * z2.detach()).sum(1) / sigma
    return 2 - z1.shape[0] * torch.softmax(s, dim=0)


def dcl_loss(z1, z2, temperature=0.1, *, weight_sigma=None, normalize=True):
    """Decoupled contrastive loss (Yeh et al. 2021, Eq. 6), as lightly >= 1.6 computes it:
    for each view, minus the positive logit plus ONE log-sum-exp over all negatives (the
    other rows of the same view and of the other view), averaged over both views.
    (lightly <= 1.5 summed two separate log-sum-exps; that is not the paper's loss.)"""
    a, b = _norm(_up(z1), normalize), _norm(_up(z2), normalize)
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)

    def one_way(x, y):
        s_xx = _no_neg_inf((x @ x.T) / temperature)
        s_xy = _no_neg_inf((x @ y.T) / temperature)
        pos = -torch.diagonal(s_xy)
        if weight_sigma is not None:
            pos = pos * dcl_weights(x, y, weight_sigma)
        neg = torch.logsumexp(torch.cat([s_xx.masked_fill(eye, float("-inf")),
                                         s_xy.masked_fill(eye, float("-inf"))], dim=1), dim=1)
        return (pos + neg).mean()

    return 0.5 * (one_way(a, b) + one_way(b, a))


def hard_negative_loss(z1, z2, temperature=0.5, *, beta=1.0, tau_plus=0.1, normalize=True):
    """Robinson et al. 2021 (HCL), the authors' 'hard' estimator in the SimCLR setting:
    ``Ng = max((reweight - tau_plus Nneg pos) / (1 - tau_plus), Nneg e^{-1/t})`` with
    ``reweight = sum_n e^{(1 + beta) s_n/t} / mean_n e^{beta s_n/t}``, ``pos = e^{s_pos/t}``, the loss
    ``-log(pos / (pos + Ng))``, written in log space: the authors' exp(s/t) overflows float64
    where s/t > 709 (t < 0.0014 on unit rows; float32 inputs here, t < 0.0114) and gave NaN."""
    a, b = _norm(_up(z1), normalize), _norm(_up(z2), normalize)
    n = a.shape[0]
    z = torch.cat([a, b])
    s = _no_neg_inf((z @ z.T) / temperature)
    idx = torch.arange(2 * n, device=z.device)
    neg_mask = torch.ones(2 * n, 2 * n, dtype=torch.bool, device=z.device)
    neg_mask[idx, idx] = False
    neg_mask[idx, (idx + n) % (2 * n)] = False
    n_neg = 2 * n - 2
    neg = s[neg_mask].view(2 * n, n_neg)
    log_pos = ((a * b).sum(1) / temperature).repeat(2)
    log_rw = torch.logsumexp((1 + beta) * neg, 1) - torch.logsumexp(beta * neg, 1) + math.log(n_neg)
    # log(reweight - tau_plus Nneg pos) = log_rw + log(1 - e^gap) where the difference is positive
    # (gap < 0); elsewhere -inf, for the clamp to take.  A NaN gap (a non-finite input) stays NaN.
    gap = log_pos + (math.log(tau_plus * n_neg) if tau_plus > 0 else -math.inf) - log_rw
    ok = ~(gap >= 0)
    safe = torch.where(ok, gap, torch.full_like(gap, -1.0))  # (no inf / NaN gradient from the unused branch)
    log_diff = torch.where(ok, log_rw + torch.log(-torch.expm1(safe)), torch.full_like(gap, -math.inf))
    # The floor depends on the temperature: keep it in the graph when that is a tensor.
    log_floor = math.log(n_neg) - 1 / torch.as_tensor(temperature, dtype=gap.dtype, device=gap.device)
    log_ng = torch.maximum(log_diff - math.log1p(-tau_plus), log_floor)
    return torch.logaddexp(torch.zeros_like(log_ng), log_ng - log_pos).mean()  # log(1 + Ng / pos), exactly


def uniformity_loss(x, t=2.0):
    x = _up(x)
    n = x.shape[0]
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return torch.logsumexp(_no_neg_inf(-t * d2[off]), dim=0) - math.log(n * (n - 1))


def alignment_loss(x, y, alpha=2.0):
    return (_up(x) - _up(y)).norm(p=2, dim=1).pow(alpha).mean()


def _standardize(z, eps, unbiased=False):
    z = z - z.mean(0)
    return z / torch.sqrt(z.var(0, unbiased=unbiased) + eps)


def cross_correlation(z1, z2, *, standardize=True, eps=1e-5):
    a, b = _up(z1), _up(z2)
    if standardize:
        a, b = _standardize(a, eps), _standardize(b, eps)
    return a.T @ b / a.shape[0]


def _off_diagonal(c):
    return c - torch.diag_embed(torch.diagonal(c))


def barlow_twins_loss(z1, z2, lambd=0.0051, *, eps=1e-5):
    c = cross_correlation(z1, z2, eps=eps)
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()


def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, *, eps=1e-4):
    x, y = _up(z1), _up(z2)
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(0)
    y = y - y.mean(0)
    std_x = torch.sqrt(x.var(0) + eps)
    std_y = torch.sqrt(y.var(0) + eps)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x = x.T @ x / (n - 1)
    cov_y = y.T @ y / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow(2).sum() / d + _off_diagonal(cov_y).pow(2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


# ---------------------------------------------------------------------------
# Kernel-family references: what each compiled/Triton family op computes, written
# with the full matrix.  The family ops are tested against these (forward, and
# backward through autograd).
# ---------------------------------------------------------------------------
MASK_DIAG, MASK_POS, MASK_SAME_LABEL = 1, 2, 4
LSE_TARGET = 8  # mask_mode bit: outputs are cross-entropies, LSE minus the target logit
LSE_LABELS = 16  # mask_mode bit: outputs are LSE minus the mean logit of the kept same-label pairs
LSE_NORM = 32  # mask_mode bit: the rscales are q's and k's own 1 / max(|x|, 1e-12), their Jacobian folded into dq / dk
PAIR_NEGATIVE_ONLY, PAIR_POSITIVES_ONLY, PAIR_EXCLUDE_DIAG = 1, 2, 4


def _diag_mask(n, m, offset, device):
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j == i + offset


def _with_norm_grad(x, r):
    own = 1.0 / x.norm(dim=1).clamp_min(1e-12)
    return _up(r).detach() + (own - own.detach())


def lse_family(q, k, scale, q_rscale=None, k_rscale=None, col_bias=None, pos_index=None, q_labels=None,
               k_labels=None, diag_offset=0, mask_mode=0, compute_col=False):
    """(row_lse, col_lse) of S = scale (q_rscale q)(k_rscale k)^T + col_bias over the kept pairs.
    With LSE_TARGET: row_i - S_{i, t_i} (t_i = pos_index[i], or i + diag_offset without one) and
    col_j - S_{j - diag_offset, j}, S unmasked at the target.  With LSE_LABELS (no column):
    row_i - mean of S_ij over the kept j with k_labels[j] == q_labels[i] (row_i without any)."""
    q, k = _up(q), _up(k)
    if mask_mode & LSE_NORM:  # the given scales' values, the gradient of 1 / max(|x|, 1e-12) of the inputs
        q_rscale = None if q_rscale is None else _with_norm_grad(q, q_rscale)
        k_rscale = None if k_rscale is None else _with_norm_grad(k, k_rscale)
    if q_rscale is not None:
        q = q * q_rscale[:, None]
    if k_rscale is not None:
        k = k * k_rscale[:, None]
    s = scale * (q @ k.T)
    if col_bias is not None:
        s = s + col_bias[None, :]
    s = _no_neg_inf(s)
    drop = torch.zeros_like(s, dtype=torch.bool)
    n, m = s.shape
    if mask_mode & MASK_DIAG:
        drop |= _diag_mask(n, m, diag_offset, s.device)
    if mask_mode & MASK_POS:
        drop |= F.one_hot(pos_index.long(), m).bool()
    if mask_mode & MASK_SAME_LABEL:
        drop |= q_labels[:, None] == k_labels[None, :]
    raw = s
    s = s.masked_fill(drop, float("-inf"))
    row = torch.logsumexp(s, dim=1)
    col = torch.logsumexp(s, dim=0) if compute_col else s.new_empty(0)
    if mask_mode & LSE_TARGET:
        t = pos_index.long() if pos_index is not None else torch.arange(n, device=s.device) + diag_offset
        row = _exact_ce(s, raw, t)
        if compute_col:  # (square, diag_offset 0: column j's target is row j)
            col = _exact_ce(s.T, raw.T, torch.arange(m, device=s.device))
    if mask_mode & LSE_LABELS:
        row = _labels_rows(s, raw, (q_labels[:, None] == k_labels[None, :]) & ~drop, row)
    return row, col


def _labels_rows(s, raw, pos, lse):
    """Each row's LSE minus the mean of its positives' logits (the LSE where it has none); a row
    with one positive its cross-entropy exactly (_exact_ce: that LSE minus a logit of ~1/t would
    leave an ulp of it in a confident row's small loss)."""
    cnt = pos.sum(1)
    mean = torch.where(pos, raw, torch.zeros_like(raw)).sum(1) / cnt.clamp_min(1)
    # (the other rows' cross-entropies, unused, of zeros: no infinity reaches autograd through them)
    sel = (cnt == 1)[:, None]
    one = _exact_ce(torch.where(sel, s, 0.0), torch.where(sel, raw, 0.0), pos.to(torch.int8).argmax(1))
    return torch.where(cnt == 1, one, torch.where(cnt > 0, lse - mean, lse))


def pairwise_family(q, k, scale, bias, row_offset=None, q_labels=None, k_labels=None,
                    diag_offset=0, mode=0):
    """Per-row sums of softplus(-x) (positive pairs) / softplus(x) (negative pairs)."""
    x = scale * (_up(q) @ _up(k).T) + bias
    if row_offset is not None:
        x = x + row_offset[:, None]
    n, m = x.shape
    diag = _diag_mask(n, m, diag_offset, x.device)
    positive = (q_labels[:, None] == k_labels[None, :]) if q_labels is not None else diag
    if mode & PAIR_NEGATIVE_ONLY:
        positive = torch.zeros_like(positive)
    term = _softplus_nonfinite_nan(torch.where(positive, -x, x))
    keep = torch.ones_like(positive)
    if mode & PAIR_POSITIVES_ONLY:
        keep = keep & positive
    if mode & PAIR_EXCLUDE_DIAG:
        keep = keep & ~diag
    return torch.where(keep, term, torch.zeros_like(term)).sum(1)


def xcorr_family(a, b):
    """(sum of squared off-diagonal entries of a^T b, its diagonal)."""
    c = _up(a).T @ _up(b)
    return _off_diagonal(c).pow(2).sum(), torch.diagonal(c)
