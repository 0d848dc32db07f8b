"""pytorch-metric-learning's losses, fused: ``NTXentLoss`` and ``SupConLoss``.

Same constructor (``temperature``) and forward signature
``(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)`` as
pytorch-metric-learning 2.x with its default distance (cosine similarity) and
reducers, and its semantics:

* pairs come from the labels: (a, p) positive when the labels are equal and a != p
  (the diagonal is excluded when the reference set is the batch itself), (a, n)
  negative when they differ;
* ``NTXentLoss``: one term per positive pair,
  ``-log(e^{s_ap/t} / (e^{s_ap/t} + sum_{n in neg(a)} e^{s_an/t}))``, averaged over the
  positive pairs (MeanReducer) -- computed here as ``softplus(LSE_neg(a) - s_ap/t)``
  with the per-anchor negative log-sum-exp from the fused kernels, without PML's
  (pairs x negatives) mask;
* ``SupConLoss``: per anchor ``-mean_{p} log softmax`` over every other row, averaged
  over the anchors whose loss is non-zero (AvgNonZeroReducer);
* both return 0 when there is no positive pair or no negative pair, or when every
  pair list has at most one entry (PML's early exit).

Miners (``indices_tuple``) and non-default ``distance`` / ``reducer`` /
``embedding_regularizer`` arguments are not supported: they raise NotImplementedError
rather than silently computing something else."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _families as fam
from .. import _validation as V
from .. import backends
from ..reference import MASK_SAME_LABEL, PAIR_EXCLUDE_DIAG, PAIR_POSITIVES_ONLY
from .. import functional as F

__all__ = ["NTXentLoss", "SupConLoss"]


class _PMLBase(nn.Module):
    def __init__(self, temperature, backend=None, **kwargs):
        super().__init__()
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k != "collect_stats")
        if unsupported:
            raise NotImplementedError(
                f"{type(self).__name__}: arguments {unsupported} are not supported by the fused version (only the "
                "default CosineSimilarity distance and default reducer are)")
        self.temperature = temperature
        self.backend = backend

    def _prepare(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if indices_tuple is not None:
            raise NotImplementedError(f"{type(self).__name__}: indices_tuple (miners) is not supported by the fused "
                                      "version; pass labels")
        if labels is None:
            raise ValueError(f"{type(self).__name__}: labels are required (got labels=None)")
        # PML decides "the reference set is the batch itself" by identity, `ref_labels is
        # labels`, and then drops the (i, i) pairs; with ref_emb=embeddings as well that is
        # exactly the loss without a reference set.
        same_labels_object = ref_labels is labels
        if same_labels_object and ref_emb is embeddings:
            ref_emb = ref_labels = None
        elif same_labels_object and ref_emb is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: ref_labels is the labels tensor itself but ref_emb is not embeddings; "
                "pytorch-metric-learning then drops the (i, i) pairs between the two sets, which the fused version "
                "does not support. Pass ref_labels=labels.clone() for an ordinary reference set, or leave ref_emb and "
                "ref_labels out for the batch itself")
        V.matrix("embeddings", embeddings)
        labels = V.labels("labels", labels.to(embeddings.device) if isinstance(labels, Tensor) else labels,
                          embeddings.shape[0], embeddings.device)
        if ref_emb is None:
            return embeddings, labels, embeddings, labels, True
        V.matrix("ref_emb", ref_emb)
        V.same_device_dtype(embeddings=embeddings, ref_emb=ref_emb)
        V.same_dim(embeddings=embeddings, ref_emb=ref_emb)
        if ref_labels is None:
            raise NotImplementedError(f"{type(self).__name__}: ref_emb without ref_labels is not supported; pass "
                                      "ref_labels")
        ref_labels = V.labels("ref_labels", ref_labels.to(embeddings.device), ref_emb.shape[0], embeddings.device,
                              rows_name="ref_emb")
        return embeddings, labels, ref_emb, ref_labels, False

    @staticmethod
    def _pair_counts(labels, ref_labels, exclude_diag):
        """Per-anchor numbers of positive and negative pairs (O(N + M), no N x M mask)."""
        n, m = labels.shape[0], ref_labels.shape[0]
        _, inv = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
        same = torch.bincount(inv[n:], minlength=int(inv.max()) + 1)[inv[:n]]
        pos = same - int(exclude_diag)
        return pos, m - same

    @staticmethod
    def _zero(embeddings):
        return (embeddings * 0).sum().float()


class NTXentLoss(_PMLBase):
    """pytorch_metric_learning.losses.NTXentLoss(temperature=0.07, **kwargs)."""

    def __init__(self, temperature: float = 0.07, *, backend: Optional[str] = None, **kwargs):
        super().__init__(temperature, backend, **kwargs)

    @F._amp_boundary("embeddings", "ref_emb")
    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        x, lab, r, rlab, self_ref = self._prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        V.scalar("temperature", self.temperature, positive=True)
        pos_count, neg_count = self._pair_counts(lab, rlab, self_ref)
        n_pos, n_neg = int(pos_count.sum()), int(neg_count.sum())
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return self._zero(embeddings)
        be = backends.resolve(self.backend, "pairwise", x.device, x.dtype, x.numel())
        if be == "reference" or be == backends.FAMILY_REFERENCE:
            return _ntxent_reference(x, lab, r, rlab, self_ref, self.temperature) / n_pos
        be_lse = backends.resolve(self.backend, "lse", x.device, x.dtype, x.numel())
        xh = torch.nn.functional.normalize(x, dim=1)
        rh = xh if self_ref else torch.nn.functional.normalize(r, dim=1)
        scale = torch.tensor(1.0 / self.temperature, dtype=torch.float32, device=x.device)
        # LSE over each anchor's negatives (label differs; the anchor itself is dropped too).
        neg_lse, _ = fam.lse(be_lse, xh, rh, scale, q_labels=lab, k_labels=rlab, mask_mode=MASK_SAME_LABEL)
        # An anchor without negatives: PML's term is -log(1) = 0; softplus(-big) is exactly 0.
        offset = torch.where(neg_lse == -math.inf, torch.full_like(neg_lse, -1e4), neg_lse)
        mode = PAIR_POSITIVES_ONLY | (PAIR_EXCLUDE_DIAG if self_ref else 0)
        total = fam.pairwise_total(be, xh, rh, scale, torch.zeros((), dtype=torch.float32, device=x.device),
                                   row_offset=-offset, q_labels=lab, k_labels=rlab, mode=mode)
        return total / n_pos


def _ntxent_reference(x, lab, r, rlab, self_ref, temperature):
    """Sum over positive pairs of PML's NT-Xent term, materializing (reference backend)."""
    from ..reference import _up
    xh = torch.nn.functional.normalize(_up(x), dim=1)
    rh = torch.nn.functional.normalize(_up(r), dim=1)
    s = xh @ rh.T / temperature
    same = lab[:, None] == rlab[None, :]
    pos = same.clone()
    if self_ref:
        pos.fill_diagonal_(False)
    neg_lse = torch.logsumexp(s.masked_fill(same, -math.inf), dim=1, keepdim=True)
    # softplus(neg_lse - s), exactly: F.softplus is linear above its threshold 20 (off by
    # up to e^-20 there), -logsigmoid(-x) is not.
    terms = -torch.nn.functional.logsigmoid(s - neg_lse)
    return torch.where(pos, terms, torch.zeros_like(terms)).sum()


class SupConLoss(_PMLBase):
    """pytorch_metric_learning.losses.SupConLoss(temperature=0.1, **kwargs)."""

    def __init__(self, temperature: float = 0.1, *, backend: Optional[str] = None, **kwargs):
        super().__init__(temperature, backend, **kwargs)

    @F._amp_boundary("embeddings", "ref_emb")
    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        x, lab, r, rlab, self_ref = self._prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        pos_count, neg_count = self._pair_counts(lab, rlab, self_ref)
        n_pos, n_neg = int(pos_count.sum()), int(neg_count.sum())
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return self._zero(embeddings)
        per_anchor = F.supcon_loss(x, lab, self.temperature, ref_embeddings=None if self_ref else r,
                                   ref_labels=None if self_ref else rlab, reduction="none", backend=self.backend)
        keep = per_anchor > 0  # AvgNonZeroReducer
        if not bool(keep.any()):
            return self._zero(embeddings)
        return per_anchor[keep].mean()
