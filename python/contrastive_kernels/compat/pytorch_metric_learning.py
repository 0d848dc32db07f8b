"""pytorch-metric-learning's losses, fused: ``NTXentLoss`` and ``SupConLoss``.

Same constructor (``temperature``) and forward signature
``(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)`` as
pytorch-metric-learning 2.x with its default distance (cosine similarity) and
reducers, and its semantics:

* pairs come from the labels: (a, p) positive when the labels are equal, (a, n)
  negative when they differ; the (i, i) pairs are dropped when the reference labels are
  the labels tensor itself (PML's identity rule): no ``ref_emb`` (the batch against
  itself), ``ref_labels=labels`` (the same object), or a ``ref_emb`` without
  ``ref_labels`` (PML then takes ``labels``; ``ref_emb`` must have as many rows);
* ``NTXentLoss``: one term per positive pair,
  ``-log(e^{s_ap/t} / (e^{s_ap/t} + sum_{n in neg(a)} e^{s_an/t}))``, averaged over the
  positive pairs (MeanReducer) -- computed here as ``softplus(LSE_neg(a) - s_ap/t)``
  with the per-anchor negative log-sum-exp from the fused kernels, without PML's
  (pairs x negatives) mask;
* ``SupConLoss``: per anchor ``-mean_{p} log softmax`` over every other row, averaged
  over the anchors whose loss is non-zero (AvgNonZeroReducer);
* both return 0 when there is no positive pair or no negative pair, or when every
  pair list has at most one entry (PML's early exit).

Miners: ``indices_tuple`` (a miner's output: ``(a1, p, a2, n)`` pairs or ``(a, p, n)``
triplets, taken as the pairs ``(a, p)``, ``(a, n)``; ``labels`` may then be None) gives
PML's loss over exactly those pairs: NT-Xent one term per listed positive pair against
the listed negatives of its anchor (a pair listed twice counts twice), SupCon the pair
*sets* (PML writes them into masks; a pair both positive and negative is an error).  A
pair list has no tile structure, so this path does not run the fused kernels: it scores
the listed pairs in chunks (``_pair_dots``) and reduces them per anchor by scatter, in
memory linear in the number of pairs (PML builds the N x M matrix and, for NT-Xent, a
positive-pairs x negative-pairs mask).

``distance``: PML's ``CosineSimilarity()`` (the default) or ``DotProductSimilarity``
(``normalize_embeddings=False``: raw dot products, the rows not normalized), with p = 2 and
power = 1.  ``reducer``: ``MeanReducer``, ``SumReducer`` or ``AvgNonZeroReducer`` (the
defaults: MeanReducer for NT-Xent, AvgNonZeroReducer for SupCon), over NT-Xent's
positive-pair terms or SupCon's per-anchor terms (every anchor; 0 for one without a
positive pair).  AvgNonZeroReducer counts the terms that are non-zero as computed here (to
float32's relative precision: an NT-Xent term is zero exactly when its anchor has no
negative pair); PML's float32 rounds terms below about 6e-8 to zero and leaves them out of
its count, so on a batch whose pairs are almost all that confident the two means differ.
Other distances, reducers, ``embedding_regularizer`` raise NotImplementedError (naming the
argument) rather than computing something else; an unknown keyword raises TypeError."""
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


_REDUCERS = {"MeanReducer": "mean", "SumReducer": "sum", "AvgNonZeroReducer": "nonzero"}
_DISTANCES = ("CosineSimilarity", "DotProductSimilarity")


def _pml_class(obj, package: str, names) -> Optional[str]:
    """obj's class name when it is one of pytorch-metric-learning's own `names` (from
    pytorch_metric_learning.<package>; a subclass may override what it computes: no)."""
    cls = type(obj)
    ok = cls.__module__.startswith(f"pytorch_metric_learning.{package}.") and cls.__name__ in names
    return cls.__name__ if ok else None


class _PMLBase(nn.Module):
    _default_reducer = "mean"

    def __init__(self, temperature, backend=None, *, distance=None, reducer=None, embedding_regularizer=None,
                 embedding_reg_weight=1, collect_stats=None, **kwargs):
        super().__init__()
        name = type(self).__name__
        if kwargs:
            raise TypeError(f"{name}.__init__() got an unexpected keyword argument '{sorted(kwargs)[0]}'")
        if embedding_regularizer is not None:
            raise NotImplementedError(f"{name}: embedding_regularizer is not supported by the fused version (got "
                                      f"{type(embedding_regularizer).__name__}); add its term to the loss yourself")
        self.normalize = _distance_normalizes(name, distance)
        if reducer is None:
            self.reduction = self._default_reducer
        elif _pml_class(reducer, "reducers", _REDUCERS):
            self.reduction = _REDUCERS[type(reducer).__name__]
        else:
            raise NotImplementedError(f"{name}: reducer={type(reducer).__name__} is not supported by the fused "
                                      f"version (pytorch-metric-learning's {', '.join(_REDUCERS)} are)")
        self.temperature = temperature
        self.backend = backend

    def _reduce(self, terms: Tensor, embeddings: Tensor) -> Tensor:
        """The reducer over per-element terms (0 for a term PML leaves at 0)."""
        if self.reduction == "sum":
            return terms.sum()
        if self.reduction == "mean":
            return terms.mean()
        keep = terms > 0  # AvgNonZeroReducer
        if not bool(keep.any()):
            return self._zero(embeddings)
        return terms[keep].mean()

    def _prepare(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if labels is None:
            raise ValueError(f"{type(self).__name__}: labels are required (got labels=None and no indices_tuple)")
        # PML decides "the reference set is the batch itself" by identity, `ref_labels is
        # labels` (also when ref_labels is left out: it takes labels), and then drops the
        # (i, i) pairs: with ref_emb=embeddings that is the loss without a reference set;
        # with another ref_emb, the pairs across the two sets but (i, i).
        V.matrix("embeddings", embeddings)
        same_object = ref_labels is labels
        labels = _check_labels("labels", labels, embeddings)
        if ref_emb is None or (ref_emb is embeddings and same_object):
            return embeddings, labels, embeddings, labels, True
        _check_ref_emb(embeddings, ref_emb)
        if ref_labels is None or same_object:
            if ref_emb.shape[0] != embeddings.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: ref_emb has {ref_emb.shape[0]} rows but ref_labels is "
                    f"{'left out' if ref_labels is None else 'the labels tensor itself'}, so the labels "
                    f"({embeddings.shape[0]}) label ref_emb too (pytorch-metric-learning's rule): pass ref_labels "
                    "for a reference set of another size")
            return embeddings, labels, ref_emb, labels, True
        return embeddings, labels, ref_emb, _check_labels("ref_labels", ref_labels, ref_emb, "ref_emb"), False

    @staticmethod
    def _pair_counts(labels, ref_labels, exclude_diag):
        """Per-anchor numbers of positive and negative pairs (O(N + M), no N x M mask), and
        the labels renumbered 0, 1, ... (the anchors' and the reference rows')."""
        n, m = labels.shape[0], ref_labels.shape[0]
        _, inv = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
        same = torch.bincount(inv[n:], minlength=int(inv.max()) + 1)[inv[:n]]
        pos = same - int(exclude_diag)
        return pos, m - same, (inv[:n], inv[n:])

    @staticmethod
    def _zero(embeddings):
        return (embeddings * 0).sum().float()

    def _mined(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """The miner path's inputs: (the unit rows of x and of the reference set, in float32
        or float64, and (a1, p, a2, n) as validated int64 index vectors on x's device), or
        None for PML's early exit (every pair list of length <= 1, or no positive or no
        negative pair): a zero loss."""
        name = type(self).__name__
        V.matrix("embeddings", embeddings)
        if labels is not None:  # unused with a miner's pairs, but PML checks their shape
            _check_labels("labels", labels, embeddings)
        r = embeddings
        if ref_emb is not None:
            _check_ref_emb(embeddings, ref_emb)
            r = ref_emb
            if ref_labels is not None:
                _check_labels("ref_labels", ref_labels, ref_emb, "ref_emb")
        pairs = _pair_indices(name, indices_tuple, embeddings.shape[0], r.shape[0], embeddings.device)
        a1, _, a2, _ = pairs
        if all(t.numel() <= 1 for t in pairs) or a1.numel() == 0 or a2.numel() == 0:
            return None
        V.scalar("temperature", self.temperature, nonzero=True)
        cdt = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        xh = _unit(embeddings.to(cdt), self.normalize)
        rh = xh if r is embeddings else _unit(r.to(cdt), self.normalize)
        return xh, rh, pairs


def _distance_normalizes(name, distance) -> bool:
    """Whether the rows are normalized: PML's CosineSimilarity / DotProductSimilarity (its
    normalize_embeddings, with p = 2 when it is set; power = 1), the default None too."""
    if distance is None:
        return True
    if not _pml_class(distance, "distances", _DISTANCES):
        raise NotImplementedError(f"{name}: distance={type(distance).__name__} is not supported by the fused version "
                                  f"(pytorch-metric-learning's {' and '.join(_DISTANCES)} are)")
    if getattr(distance, "power", 1) != 1:
        raise NotImplementedError(f"{name}: distance={type(distance).__name__}(power={distance.power}) is not "
                                  "supported by the fused version (power=1 is)")
    normalize = bool(distance.normalize_embeddings)
    if normalize and getattr(distance, "p", 2) != 2:
        raise NotImplementedError(f"{name}: distance={type(distance).__name__}(p={distance.p}) normalizes with "
                                  "another norm than the Euclidean one; the fused version supports p=2")
    return normalize


def _unit(x: Tensor, normalize: bool) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1) if normalize else x


def _check_labels(name, lab, rows, rows_name="embeddings"):
    """`lab` as int64 labels of `rows`, moved to their device (PML moves them too)."""
    return V.labels(name, lab.to(rows.device) if isinstance(lab, Tensor) else lab, rows.shape[0], rows.device,
                    rows_name=rows_name)


def _check_ref_emb(embeddings, ref_emb):
    V.matrix("ref_emb", ref_emb)
    V.same_device_dtype(embeddings=embeddings, ref_emb=ref_emb)
    V.same_dim(embeddings=embeddings, ref_emb=ref_emb)


class NTXentLoss(_PMLBase):
    """pytorch_metric_learning.losses.NTXentLoss(temperature=0.07, **kwargs)."""

    def __init__(self, temperature: float = 0.07, *, backend: Optional[str] = None, **kwargs):
        super().__init__(temperature, backend, **kwargs)

    @F._amp_boundary("embeddings", "ref_emb")
    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        if indices_tuple is not None:
            mined = self._mined(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            if mined is None:
                return self._zero(embeddings)
            xh, rh, (a1, p, a2, n) = mined
            sp = _pair_dots(xh, rh, a1, p) / self.temperature
            sn = _pair_dots(xh, rh, a2, n) / self.temperature
            neg_lse = _segment_logsumexp(sn, a2, xh.shape[0])[a1]
            # -log(e^sp / (e^sp + sum e^sn)) = softplus(neg_lse - sp), exactly (0 without negatives)
            return self._reduce(-torch.nn.functional.logsigmoid(sp - neg_lse), embeddings)
        x, lab, r, rlab, drop_diag = self._prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        V.scalar("temperature", self.temperature, nonzero=True)
        pos_count, neg_count, (lab_id, rlab_id) = self._pair_counts(lab, rlab, drop_diag)
        n_pos, n_neg = int(pos_count.sum()), int(neg_count.sum())
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return self._zero(embeddings)
        # The terms are > 0 exactly for the pairs whose anchor has a negative (AvgNonZeroReducer's count).
        count = n_pos if self.reduction == "mean" else 1 if self.reduction == "sum" else \
            int(pos_count[neg_count > 0].sum())
        if count == 0:
            return self._zero(embeddings)
        be = backends.resolve(self.backend, "pairwise", x.device, x.dtype, x.numel())
        if be == "reference" or be == backends.FAMILY_REFERENCE:
            return _ntxent_reference(x, lab, r, rlab, drop_diag, self.temperature, self.normalize) / count
        be_lse = backends.resolve(self.backend, "lse", x.device, x.dtype, x.numel())
        xh = _unit(x, self.normalize)
        rh = xh if r is x else _unit(r, self.normalize)
        scale = torch.tensor(1.0 / self.temperature, dtype=torch.float32, device=x.device)
        # LSE over each anchor's negatives (label differs: (i, i) is never one when it is dropped).
        neg_lse, _ = fam.lse(be_lse, xh, rh, scale, q_labels=lab, k_labels=rlab, mask_mode=MASK_SAME_LABEL)
        # An anchor without negatives: PML's term is -log(1) = 0 for each of its positive pairs,
        # which are left out of the sum (its label -1 is no reference row's); an offset of -big
        # would give softplus(-big - s), not 0, where s/t reaches big (raw dot products, tiny t).
        has_neg = neg_count > 0  # (not neg_lse > -inf: a NaN row must stay NaN)
        offset = torch.where(has_neg, neg_lse, torch.zeros_like(neg_lse))
        pos_id = torch.where(has_neg, lab_id, torch.full_like(lab_id, -1))
        mode = PAIR_POSITIVES_ONLY | (PAIR_EXCLUDE_DIAG if drop_diag else 0)
        total = fam.pairwise_total(be, xh, rh, scale, torch.zeros((), dtype=torch.float32, device=x.device),
                                   row_offset=-offset, q_labels=pos_id, k_labels=rlab_id, mode=mode)
        # their terms are 0, but a NaN or inf in their rows gives PML's NaN (no host sync: a masked sum)
        lone = ~has_neg & (pos_count > 0)
        total = total + torch.where(lone[:, None], xh.float(), 0.0).mul(0).sum()
        return total / count


def _ntxent_reference(x, lab, r, rlab, drop_diag, temperature, normalize=True):
    """Sum over positive pairs of PML's NT-Xent term, materializing (reference backend)."""
    from ..reference import _up
    xh = _unit(_up(x), normalize)
    rh = _unit(_up(r), normalize)
    s = xh @ rh.T / temperature
    same = lab[:, None] == rlab[None, :]
    pos = same.clone()
    if drop_diag:
        pos.fill_diagonal_(False)
    neg_lse = torch.logsumexp(s.masked_fill(same, -math.inf), dim=1, keepdim=True)
    # softplus(neg_lse - s), exactly: F.softplus is linear above its threshold 20 (off by
    # up to e^-20 there), -logsigmoid(-x) is not.
    terms = -torch.nn.functional.logsigmoid(s - neg_lse)
    return torch.where(pos, terms, torch.zeros_like(terms)).sum()


class SupConLoss(_PMLBase):
    """pytorch_metric_learning.losses.SupConLoss(temperature=0.1, **kwargs)."""
    _default_reducer = "nonzero"

    def __init__(self, temperature: float = 0.1, *, backend: Optional[str] = None, **kwargs):
        super().__init__(temperature, backend, **kwargs)

    @F._amp_boundary("embeddings", "ref_emb")
    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        if indices_tuple is not None:
            return self._mined_supcon(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        x, lab, r, rlab, drop_diag = self._prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        pos_count, neg_count, _ = self._pair_counts(lab, rlab, drop_diag)
        n_pos, n_neg = int(pos_count.sum()), int(neg_count.sum())
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return self._zero(embeddings)
        # supcon_loss's per-anchor losses; (i, i) dropped also across two sets (PML's identity rule)
        F._temperature(self.temperature, x.device)
        per_anchor, _ = F._supcon_anchors(F._resolve(self.backend, "lse", x), x, lab, r, rlab, self.temperature,
                                          self.normalize, exclude_self=drop_diag)
        return self._reduce(per_anchor, embeddings)

    def _mined_supcon(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's SupConLoss over a miner's pairs: the pairs become sets (its masks), each
        anchor's log-softmax runs over its positive and negative pairs together, the loss
        is -mean over its positive pairs, averaged over the anchors whose loss is > 0."""
        mined = self._mined(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if mined is None:
            return self._zero(embeddings)
        xh, rh, (a1, p, a2, n) = mined
        n_rows, m = xh.shape[0], rh.shape[0]
        pos_key = torch.unique(a1 * m + p)
        neg_key = torch.unique(a2 * m + n)
        both = torch.isin(pos_key, neg_key)
        if bool(both.any()):
            k = int(pos_key[both][0])
            raise ValueError(f"{type(self).__name__}: indices_tuple lists the pair ({k // m}, {k % m}) both as a "
                             "positive and as a negative (pytorch-metric-learning asserts 'Each pair should be "
                             "either be positive or negative')")
        key = torch.cat([pos_key, neg_key])
        anchor, col = key // m, key % m
        s = _pair_dots(xh, rh, anchor, col) / self.temperature
        n_pos = pos_key.numel()
        pa = anchor[:n_pos]
        count = torch.bincount(pa, minlength=n_rows)
        # Each anchor's LSE over its positive and its negative pairs, from the two groups' own LSEs (the
        # positives' finite wherever a positive pair reads it).  An anchor with one positive pair:
        # s_p - LSE(s_p, negatives) as logsigmoid(s_p - LSE(negatives)), exact; the difference would
        # keep a float32 ulp of s_p (~1/t) of a confident anchor's small loss.
        neg_lse = _segment_logsumexp(s[n_pos:], anchor[n_pos:], n_rows)[pa]
        lse = torch.logaddexp(_segment_logsumexp(s[:n_pos], pa, n_rows)[pa], neg_lse)
        log_prob = torch.where((count == 1)[pa], torch.nn.functional.logsigmoid(s[:n_pos] - neg_lse),
                               s[:n_pos] - lse)
        total = fam.index_sum(pa, log_prob, n_rows)
        per_anchor = -total / count.clamp(min=1).to(s.dtype)  # (an anchor without positives: 0)
        return self._reduce(per_anchor, embeddings)


def _pair_indices(who, indices_tuple, n, m, device):
    """A miner's output as four int64 index vectors (a1, p, a2, n): pairs (a1, p), (a2, n)
    as given, triplets (a, p, n) as (a, p, a, n); anchors index the n embeddings, the
    others the m reference rows.  Bad input names indices_tuple and the entry."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        got = f"length {len(indices_tuple)}" if isinstance(indices_tuple, (tuple, list)) else \
            type(indices_tuple).__name__
        raise ValueError(f"{who}: indices_tuple must be a miner's (anchor1, positive, anchor2, negative) pairs or "
                         f"(anchor, positive, negative) triplets, a tuple of 4 or 3 index tensors; got {got}")
    roles = ("a1", "p", "a2", "n") if len(indices_tuple) == 4 else ("a", "p", "n")
    out = []
    for i, (role, t) in enumerate(zip(roles, indices_tuple)):
        what = f"{who}: indices_tuple[{i}] ({role})"
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a 1-D integer torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
        size = n if role.startswith("a") else m
        rows = "embeddings" if role.startswith("a") else "the reference set (ref_emb, or embeddings)"
        t = t.to(device=device, dtype=torch.long)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
            raise ValueError(f"{what} indexes rows of {rows}, which has {size}: got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        out.append(t)
    if len(out) == 3:
        out = [out[0], out[1], out[0], out[2]]
    for (i, j), kind in (((0, 1), "positive"), ((2, 3), "negative")):
        if out[i].numel() != out[j].numel():
            raise ValueError(f"{who}: indices_tuple's {kind} pairs have {out[i].numel()} anchors but "
                             f"{out[j].numel()} partners (one per anchor)")
    return tuple(out)


def _segment_logsumexp(v: Tensor, seg: Tensor, n: int) -> Tensor:
    """Per segment i < n, log sum_{seg[j] == i} exp(v[j]); -inf for an empty segment (with a
    zero gradient, not NaN)."""
    top = torch.full((n,), -math.inf, dtype=v.dtype, device=v.device)
    top = top.scatter_reduce(0, seg, v.detach(), "amax", include_self=True)
    has = top > -math.inf
    base = torch.where(has, top, torch.zeros_like(top))
    total = fam.index_sum(seg, torch.exp(v - base[seg]), n)
    return torch.where(has, base + torch.log(torch.where(has, total, torch.ones_like(total))),
                       torch.full_like(top, -math.inf))


class _PairDots(torch.autograd.Function):
    """s[k] = <x[i[k]], y[j[k]]> over a list of pairs, computed in chunks: neither direction
    holds more than a chunk of gathered rows (a list of P pairs never becomes P x D)."""

    @staticmethod
    def _chunk(d: int) -> int:
        return max(1, (1 << 20) // max(d, 1))  # (4 MiB of float32 rows per gathered operand)

    @staticmethod
    def forward(ctx, x, y, i, j):
        ctx.same = y is x
        ctx.save_for_backward(x, y, i, j)
        out = torch.empty(i.numel(), dtype=x.dtype, device=x.device)
        step = _PairDots._chunk(x.shape[1])
        for s in range(0, i.numel(), step):
            out[s:s + step] = (x[i[s:s + step]] * y[j[s:s + step]]).sum(1)
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, i, j = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        dx = torch.zeros_like(x) if need_x else None
        dy = (dx if ctx.same and need_x else torch.zeros_like(y)) if need_y else None
        step = _PairDots._chunk(x.shape[1])
        for s in range(0, i.numel(), step):
            gs = g[s:s + step, None]
            ii, jj = i[s:s + step], j[s:s + step]
            if need_x:
                dx.index_put_((ii,), gs * y[jj], accumulate=True)  # (fam.index_sum's deterministic sum)
            if need_y:
                dy.index_put_((jj,), gs * x[ii], accumulate=True)
        if ctx.same and need_x and need_y:
            return dx, None, None, None  # (one tensor: both terms are already in dx)
        return dx, dy, None, None


def _pair_dots(x: Tensor, y: Tensor, i: Tensor, j: Tensor) -> Tensor:
    return _PairDots.apply(x, y, i, j)
