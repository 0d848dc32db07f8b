"""Multi-process versions of the losses over ``torch.distributed`` with exact gradients.

Every function takes the arguments of its single-process counterpart in
``contrastive_kernels.functional`` plus ``mode`` (``"gather"`` or ``"ring"``) and
``group`` (a process group; None = the default group).  Each rank passes its local
batch; all ranks must pass the same number of rows (checked: unequal local batches
raise ValueError naming every rank's size) and make the same calls in the same order
with the same ``requires_grad`` pattern.

Semantics.  The global batch is the concatenation of the ranks' local batches in rank
order.  Each rank scores its local rows against all ranks' keys (positives and
labels offset by ``rank * local size``) and returns its share of the global loss:

    * the MEAN over ranks of the returned losses equals the single-process loss of
      the global batch (for mean-over-rows losses the rank's loss is simply the mean
      over its local rows);
    * the gradient each rank's inputs receive is ``world_size x`` the gradient of the
      global loss with respect to those rows (each rank's backward sums the
      contributions of every rank's loss to its rows), so that after
      DistributedDataParallel's gradient averaging every parameter of the model has
      exactly the single-process gradient of the global loss;
    * replicated scalar parameters (temperature, ``logit_scale``, ``logit_bias``)
      receive on each rank the gradient of that rank's loss; their DDP average is the
      global gradient.

Where the global normalizer is not a mean over rows the rank loss is scaled so that
the mean over ranks is exact: ``supcon_loss`` returns ``world_size * (sum of its
anchors' losses) / (global number of anchors with a positive)``; ``siglip_loss``
returns ``-(1/N_local) sum_{i local, j global} log sigmoid(...)`` (open_clip's
convention); ``info_nce(reduction="sum")`` returns ``world_size * local sum``;
``barlow_twins_loss`` and ``uniformity_loss`` return the global loss itself on every
rank; ``vicreg_loss`` returns the local invariance term plus the global variance and
covariance terms.

Modes.
    * ``"gather"``: the keys of all ranks are all-gathered with our own autograd
      all-gather (backward: reduce-scatter of the gradient, or all-reduce and own
      slice on gloo, which has no reduce-scatter); then the single-process kernel
      families run on local rows x global keys.  Memory per rank: the global keys,
      ``world_size * N * D`` elements per gathered input (and their gradient in the
      backward).
    * ``"ring"``: key blocks travel around the ranks by batched point-to-point
      exchange (``dist.batch_isend_irecv``), the next block's transfer overlapped
      with the computation on the current one; partial row log-sum-exps are merged
      stably (``logaddexp``).  Where a row has one positive (InfoNCE without
      decoupling, NT-Xent, CLIP) the partials are shifted by the positive logit: the own
      block's are the kernels' cross-entropies, whose backward forms the target's
      ``p - 1`` in float32 as in the gather mode, so low-loss bfloat16 gradients are as
      accurate in both modes.  The backward passes the blocks around again,
      recomputes each block's partials and sends the key gradients home travelling
      with the block.  No rank holds more than two remote key blocks (plus, in the
      backward, their gradient accumulators).  Same numbers as ``"gather"``.
    * Barlow Twins / VICReg: global batch statistics by an autograd all-reduce; the
      cross-correlation (covariance) term by all-gather of the standardized Z (cost
      ``2 world_size N D`` per rank, then the Gram or tiled kernel on the global
      batch) or by all-reduce of the local D x D products (cost ``D^2``), chosen by
      cost (``exchange="auto"``) or forced.  ``mode`` does not change their numbers.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _families as fam
from . import functional
from . import _validation as V
from . import backends
from .backends import FAMILY_REFERENCE
from . import reference
from .reference import LSE_LABELS, LSE_TARGET, MASK_DIAG, MASK_POS, PAIR_NEGATIVE_ONLY

Tensor = torch.Tensor

MODES = ("gather", "ring")
EXCHANGES = ("auto", "gather", "all_reduce")

__all__ = ["MODES", "info_nce", "nt_xent", "clip_loss", "siglip_loss", "supcon_loss", "dcl_loss",
           "hard_negative_loss", "uniformity_loss", "barlow_twins_loss", "vicreg_loss", "all_gather_with_grad",
           "all_reduce_with_grad", "gather_features"]


# ------------------------------------------------------------------ process group
class _Ctx:
    """The process group, this rank, the world size and the resolved family backend."""

    def __init__(self, group, what: str):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{what} needs an initialized torch.distributed process group (call "
                "torch.distributed.init_process_group first, or use the single-process loss / distributed=None)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise RuntimeError(f"{what}: this process is not a member of the given process group")

    def peer(self, group_rank: int) -> int:
        """The global rank of `group_rank` (P2P ops take global ranks)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def is_nccl(self) -> bool:
        return dist.get_backend(self.group) == "nccl"


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")


def _check_sizes(ctx: _Ctx, **tensors) -> None:
    """All ranks must pass equally shaped local batches (all-gather of the shapes)."""
    names = list(tensors)
    dev = next(iter(tensors.values())).device
    if ctx.is_nccl() and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([d for t in tensors.values() for d in t.shape], dtype=torch.int64, device=dev)
    allv = [torch.empty_like(mine) for _ in range(ctx.world)]
    dist.all_gather(allv, mine, group=ctx.group)
    allv = [v.tolist() for v in allv]
    if any(v != allv[0] for v in allv):
        per_rank = []
        for r, v in enumerate(allv):
            shapes, i = [], 0
            for n in names:
                nd = tensors[n].dim()
                shapes.append(f"{n} {tuple(v[i:i + nd])}")
                i += nd
            per_rank.append(f"rank {r}: " + ", ".join(shapes))
        raise ValueError("distributed losses need the same local batch size (and feature dimension) on every "
                         "rank; got " + "; ".join(per_rank))


# --------------------------------------------------------- autograd collectives
class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's x (rank order); backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x, dctx):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dctx.world)]
        dist.all_gather(parts, x, group=dctx.group)
        ctx.dctx = dctx
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        d = ctx.dctx
        grad = grad.contiguous()
        n = grad.shape[0] // d.world
        if d.is_nccl():
            out = grad.new_empty((n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=d.group)
        else:  # gloo has no reduce-scatter: all-reduce and keep our slice
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=d.group)
            out = grad[d.rank * n:(d.rank + 1) * n].clone()
        return out, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward: the sum over ranks of the gradient (every rank's loss
    depends on the sum, so each contribution gets all of their gradients)."""

    @staticmethod
    def forward(ctx, x, dctx):
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=dctx.group)
        ctx.dctx = dctx
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.dctx.group)
        return g, None


def _gather(x: Tensor, d: _Ctx) -> Tensor:
    if d.world == 1:
        return x
    if x.requires_grad:
        return _AllGather.apply(x, d)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x, group=d.group)
    return torch.cat(parts)


def _all_reduce(x: Tensor, d: _Ctx) -> Tensor:
    if d.world == 1:
        return x
    if x.requires_grad:
        return _AllReduceSum.apply(x, d)
    y = x.contiguous().clone()
    dist.all_reduce(y, group=d.group)
    return y


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenation of every rank's ``x`` along dim 0; the backward sums the gradient of
    every rank's copy into the owner's slice (reduce-scatter)."""
    return _gather(x, _Ctx(group, "all_gather_with_grad"))


def gather_features(x: Tensor, group=None, *, grad: str = "sum") -> Tensor:
    """Concatenation of every rank's ``x`` (rank order).  ``grad``: "sum" (autograd
    all-gather: every rank's gradient of each slice is summed into its owner), "local"
    (only this rank's own slice carries gradient, to this rank's ``x``: open_clip's
    ``gather_with_grad=False, local_loss=False``) or "none"."""
    V.choice("grad", grad, ("sum", "local", "none"))
    d = _Ctx(group, "gather_features")
    if grad == "sum":
        return _gather(x, d)
    if d.world == 1:
        return x if grad == "local" else x.detach()
    xd = x.detach().contiguous()
    parts = [torch.empty_like(xd) for _ in range(d.world)]
    dist.all_gather(parts, xd, group=d.group)
    if grad == "local":
        parts[d.rank] = x
    return torch.cat(parts)


def all_reduce_with_grad(x: Tensor, group=None) -> Tensor:
    """Sum of every rank's ``x``; the backward all-reduces the gradient."""
    return _all_reduce(x, _Ctx(group, "all_reduce_with_grad"))


# --------------------------------------------------------------------- the ring
def _exchange(d: _Ctx, tensors, tag: int):
    """Post sends of `tensors` to the next rank and receives of the same shapes from
    the previous one; returns (requests, received tensors)."""
    nxt, prv = d.peer((d.rank + 1) % d.world), d.peer((d.rank - 1) % d.world)
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, d.group, tag + i) for i, t in enumerate(tensors)]
    ops += [dist.P2POp(dist.irecv, t, prv, d.group, tag + i) for i, t in enumerate(recv)]
    return dist.batch_isend_irecv(ops), recv


def _wait(reqs):
    for r in reqs:
        r.wait()


_TAG_BLOCK, _TAG_GRAD = 0, 64


def _expand(received, need):
    it = iter(received)
    return [next(it) if n else None for n in need]


def _merge(acc, parts, kinds):
    if acc is None:
        return list(parts)
    return [torch.logaddexp(a, p) if k == "lse" else a + p for a, p, k in zip(acc, parts, kinds)]


class _Ring(torch.autograd.Function):
    """Merged block partials of ``fn(local, block, own_start)`` over the blocks of all ranks.

    ``fn`` returns a tuple of partials (one per entry of ``kinds``: "lse" partials are
    merged by logaddexp, "sum" partials by addition); ``own_start`` is 0 for this rank's
    own block and None for a foreign one.  The backward passes the blocks around
    again, recomputes each block's partials under autograd with the upstream gradient
    of a partial ``p`` of an lse output ``L`` being ``g exp(p - L)``, accumulates the
    local gradients here and sends each block's gradient on with the block, so that it
    arrives at its owner after a full turn."""

    @staticmethod
    def forward(ctx, fn, kinds, d, n_local, *tensors):
        local, block = list(tensors[:n_local]), [t.detach().contiguous() for t in tensors[n_local:]]
        acc, cur = None, block
        for step in range(d.world):
            pending = None
            if step < d.world - 1:
                pending = _exchange(d, cur, _TAG_BLOCK)
            src = (d.rank - step) % d.world
            acc = _merge(acc, fn(local, cur, 0 if src == d.rank else None), kinds)
            if pending is not None:
                _wait(pending[0])
                cur = pending[1]
        ctx.fn, ctx.kinds, ctx.d, ctx.n_local = fn, kinds, d, n_local
        ctx.save_for_backward(*tensors, *acc)
        return tuple(acc)

    @staticmethod
    def backward(ctx, *grads):
        fn, kinds, d, n_local = ctx.fn, ctx.kinds, ctx.d, ctx.n_local
        saved = ctx.saved_tensors
        n_in = len(saved) - len(kinds)
        tensors, totals = saved[:n_in], saved[n_in:]
        need = ctx.needs_input_grad[4:]
        local, block = tensors[:n_local], [t.contiguous() for t in tensors[n_local:]]
        need_local, need_block = need[:n_local], need[n_local:]
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, totals)]
        local_grads = [None] * n_local
        send_grads = any(need_block)
        cur = block
        cur_acc = [torch.zeros_like(t) if nb else None for t, nb in zip(block, need_block)]
        acc_pending = None
        for step in range(d.world):
            pending = None
            if step < d.world - 1:
                pending = _exchange(d, cur, _TAG_BLOCK)
            src = (d.rank - step) % d.world
            with torch.enable_grad():
                loc = [t.detach().requires_grad_(n) for t, n in zip(local, need_local)]
                blk = [t.detach().requires_grad_(n) for t, n in zip(cur, need_block)]
                parts = fn(loc, blk, 0 if src == d.rank else None)
                outs, gouts = [], []
                for p, g, tot, kind in zip(parts, grads, totals, kinds):
                    if not p.requires_grad:
                        continue
                    if kind == "lse":
                        ok = torch.isfinite(tot) & torch.isfinite(p)
                        w = torch.where(ok, torch.exp(torch.where(ok, p - tot, torch.zeros_like(p))),
                                        torch.zeros_like(p))
                        g = g * w
                    outs.append(p)
                    gouts.append(g.to(p.dtype))
                wrt = [t for t in loc + blk if t.requires_grad]
                got = torch.autograd.grad(outs, wrt, gouts, allow_unused=True) if outs and wrt else []
            it = iter(got)
            for i, t in enumerate(loc):
                if t.requires_grad:
                    g = next(it)
                    if g is not None:
                        local_grads[i] = g if local_grads[i] is None else local_grads[i] + g
            contrib = [next(it) if t.requires_grad else None for t in blk]
            if send_grads:
                if acc_pending is not None:  # what the ranks this block visited before added to its gradient
                    _wait(acc_pending[0])
                    cur_acc = _expand(acc_pending[1], need_block)
                cur_acc = [None if a is None else (a if c is None else a + c) for a, c in zip(cur_acc, contrib)]
                # on to the next rank; after the last step this sends each block's gradient home
                acc_pending = _exchange(d, [a for a in cur_acc if a is not None], _TAG_GRAD)
            if pending is not None:
                _wait(pending[0])
                cur = pending[1]
        block_grads = [None] * len(block)
        if send_grads:  # after a full turn our own block's gradient has come home
            _wait(acc_pending[0])
            block_grads = _expand(acc_pending[1], need_block)
        return (None, None, None, None, *local_grads, *block_grads)


def _ring(d: _Ctx, fn, kinds, local, block):
    if d.world == 1:
        return tuple(fn(list(local), list(block), 0))
    return _Ring.apply(fn, tuple(kinds), d, len(local), *local, *block)


def _blocks(d: _Ctx, mode: str, fn, kinds, local, block):
    """The merged partials over all ranks' blocks: gathered keys with own block at
    rank * block rows, or the ring."""
    if mode == "gather":
        glob = [_gather(t, d) for t in block]
        return tuple(fn(list(local), glob, d.rank * block[0].shape[0]))
    return _ring(d, fn, kinds, local, block)


# ----------------------------------------------------------------------- helpers
def _setup(group, mode, what, x):
    _check_mode(mode)
    return _Ctx(group, what)


def _family_backend(backend, family, x):
    be = backends.resolve(backend, family, x.device, x.dtype, functional._work(x))
    return FAMILY_REFERENCE if be == "reference" else be


def _cdt(be, x):
    """Compute dtype of the non-kernel parts: float64 only on the reference path."""
    return torch.float64 if (be == FAMILY_REFERENCE and x.dtype == torch.float64) else torch.float32


def _scalar_tensor(value, x, dt, *, invert=False):
    if isinstance(value, torch.Tensor):
        v = value.reshape(()).to(device=x.device, dtype=dt)
        return 1.0 / v if invert else v
    return torch.tensor(1.0 / value if invert else float(value), dtype=dt, device=x.device)


def _rscale(x, normalize, dt):
    if not normalize:
        return None
    return x.to(dt).norm(dim=1).clamp_min(1e-12).reciprocal()


def _rowdot(a, b, dt):
    return (a.to(dt) * b.to(dt)).sum(1)


# positive logits in one graph per input; row scales for the kernels with LSE_NORM (detached,
# their Jacobian folded in) and its mask bit: as the single-process losses
_pos_logit, _kn, _norm_bit = functional._pos_logit, functional._kn, functional._norm_bit
_amp_boundary = functional._amp_boundary  # torch.autocast as in the single-process functions


def _pair_inputs(z1, z2):
    V.matrix("z1", z1)
    V.matrix("z2", z2)
    V.same_device_dtype(z1=z1, z2=z2)
    V.same_shape(z1=z1, z2=z2)


def _need_global_rows(what, d, name, t, least, unit="rows", why=""):
    """Refuse a global batch (the ranks' local rows together) of fewer than `least` rows,
    naming the argument, its local shape and the world size."""
    if t.shape[0] * d.world < least:
        raise ValueError(f"{what} needs at least {least} {unit} in the global batch{why}, got {name} "
                         f"{tuple(t.shape)} on {d.world} rank(s)")


def _two_view_setup(what, z1, z2, temperature, backend, mode, group, *, min_pairs=1, why=""):
    """The start of the two-view lse losses (NT-Xent, DCL, HCL): argument checks, the group,
    equal local batches, at least `min_pairs` pairs in the global batch; (ctx, backend,
    compute dtype)."""
    _pair_inputs(z1, z2)
    V.scalar("temperature", temperature, nonzero=True, device=z1.device)
    d = _setup(group, mode, f"distributed {what}", z1)
    _check_sizes(d, z1=z1, z2=z2)
    _need_global_rows(what, d, "z1", z1, min_pairs, "pairs", why)
    be = _family_backend(backend, "lse", z1)
    return d, be, _cdt(be, z1)


# ------------------------------------------------------------------------ InfoNCE
@_amp_boundary("query", "key", "negatives")
def info_nce(query: Tensor, key: Tensor, *, negatives: Tensor | None = None, temperature=0.1,
             positive_index: Tensor | None = None, in_batch_negatives: bool = True, symmetric: bool = False,
             decoupled: bool = False, normalize: bool = True, reduction: str = "mean", backend: str | None = None,
             mode: str = "gather", group=None) -> Tensor:
    """InfoNCE over the global batch: local queries against every rank's keys.

    ``positive_index`` indexes this rank's local keys (global index ``rank * M + p``;
    default ``i``).  ``negatives`` are extra candidates of this rank's rows and are not
    gathered (pass the same queue on every rank for a replicated MoCo queue; with that
    queue the mean of the ranks' losses is the single-process loss with that queue).
    ``symmetric`` also gathers the queries (key -> query direction).  ``reduction``:
    "mean" returns the mean over local rows, "sum" ``world_size x`` the local sum, "none"
    the local rows."""
    # the single-process checks; a lone local key is fine here (the global batch has more)
    positive_index = functional.check_info_nce_args(query, key, negatives, temperature, positive_index,
                                                    in_batch_negatives, symmetric, decoupled, reduction)
    n = query.shape[0]
    d = _setup(group, mode, "distributed info_nce", query)
    _check_sizes(d, query=query, key=key)
    be = _family_backend(backend, "lse", query)
    dt = _cdt(be, query)
    scale = _scalar_tensor(temperature, query, dt, invert=True)
    qr, kr = _rscale(query, normalize, dt), _rscale(key, normalize, dt)
    p = positive_index if positive_index is not None else torch.arange(n, device=query.device)

    pos = _pos_logit(query, key[p], scale, normalize, dt)
    nb = _norm_bit(normalize)

    def negatives_lse():
        return fam.lse(be, query, negatives, scale, q_rscale=_kn(qr), k_rscale=_kn(_rscale(negatives, normalize, dt)),
                       mask_mode=nb)[0]

    # Without decoupling, the block holding the positives (the own block) gives the
    # cross-entropies straight from the kernels (LSE_TARGET: p - 1 formed in float32 in
    # the backward) and every other ring block LSE - positive: logaddexp commutes with the
    # common shift, so the merged partial is the cross-entropy of the whole row.
    target = in_batch_negatives and not decoupled

    def rows(loc, blk, own):
        q_, qr_, pos_, s_ = loc[0], _kn(loc[1]) if normalize else None, loc[-2], loc[-1]
        k_ = blk[0]
        kr_ = _kn(_rscale(k_, normalize, dt))
        if target:
            out = [fam.lse(be, q_, k_, s_, q_rscale=qr_, k_rscale=kr_, pos_index=p + own,
                           mask_mode=LSE_TARGET | nb)[0]
                   if own is not None else fam.lse(be, q_, k_, s_, q_rscale=qr_, k_rscale=kr_, mask_mode=nb)[0] - pos_]
        else:  # decoupled: the own block masks the positives
            masked = own is not None
            out = [fam.lse(be, q_, k_, s_, q_rscale=qr_, k_rscale=kr_, pos_index=p + own if masked else None,
                           mask_mode=(MASK_POS if masked else 0) | nb)[0]]
        if symmetric:  # local keys against every rank's queries; key i's positive is query i
            qb = blk[1]
            kw = dict(q_rscale=_kn(loc[3]) if normalize else None, k_rscale=_kn(_rscale(qb, normalize, dt)),
                      diag_offset=own or 0)
            if target:
                out.append(fam.lse(be, loc[2], qb, s_, **kw, mask_mode=LSE_TARGET | nb)[0] if own is not None
                           else fam.lse(be, loc[2], qb, s_, **kw, mask_mode=nb)[0] - pos_)
            else:
                out.append(fam.lse(be, loc[2], qb, s_, **kw,
                                   mask_mode=(MASK_DIAG if own is not None else 0) | nb)[0])
        return out

    if not in_batch_negatives:
        # the positive and the extra negatives only (decoupled: the negatives only)
        rest = negatives_lse() - pos
        # (MoCo: LSE(pos, negatives) - pos as softplus(LSE(negatives) - pos), exact on confident rows)
        return _reduce_rows(rest if decoupled else reference._softplus_nonfinite_nan(rest), reduction, d)
    local = [query, qr if normalize else query.new_empty(0)]
    block = [key]
    if symmetric:
        local += [key, kr if normalize else key.new_empty(0)]
        block.append(query)
    res = _blocks(d, mode, rows, ("lse", "lse") if symmetric else ("lse",), local + [pos, scale], block)
    if target:
        loss = res[0]
        if symmetric:
            loss = 0.5 * (loss + res[1])
        elif negatives is not None:  # LSE(keys, negatives) - pos = ce + softplus(LSE(negatives) - LSE(keys))
            loss = loss + F.softplus(negatives_lse() - loss - pos)
        return _reduce_rows(loss, reduction, d)
    lse = res[0] if negatives is None else torch.logaddexp(res[0], negatives_lse())
    loss = lse - pos
    if symmetric:
        loss = 0.5 * (loss + res[1] - pos)
    return _reduce_rows(loss, reduction, d)


def _reduce_rows(loss: Tensor, reduction: str, d: _Ctx) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum() * d.world
    return loss


# ------------------------------------------------------------------------ NT-Xent
@_amp_boundary("z1", "z2")
def nt_xent(z1: Tensor, z2: Tensor, temperature=0.5, *, normalize: bool = True, backend: str | None = None,
            mode: str = "gather", group=None) -> Tensor:
    """SimCLR's NT-Xent over the global batch (2 W N rows): each local row's positive is
    its other view, its candidates every other row of every rank; mean over the 2N
    local rows."""
    d, be, dt = _two_view_setup("nt_xent", z1, z2, temperature, backend, mode, group)
    z = torch.cat([z1, z2])  # this rank's block of the global [z1_0; z2_0; z1_1; z2_1; ...]
    n2 = z.shape[0]
    scale = _scalar_tensor(temperature, z, dt, invert=True)
    zr = _rscale(z, normalize, dt)
    p = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    pos = _pos_logit(z, z[p], scale, normalize, dt)
    nb = _norm_bit(normalize)

    def rows(loc, blk, own):  # own block: the cross-entropies (LSE_TARGET); others: LSE - positive
        kb = blk[0]
        kw = dict(q_rscale=_kn(loc[1]) if normalize else None, k_rscale=_kn(_rscale(kb, normalize, dt)))
        if own is not None:
            return (fam.lse(be, loc[0], kb, loc[2], **kw, pos_index=p + own, diag_offset=own,
                            mask_mode=MASK_DIAG | LSE_TARGET | nb)[0],)
        return (fam.lse(be, loc[0], kb, loc[2], **kw, mask_mode=nb)[0] - loc[3],)

    row, = _blocks(d, mode, rows, ("lse",), [z, zr if normalize else z.new_empty(0), scale, pos], [z])
    return row.mean()


# --------------------------------------------------------------------------- CLIP
@_amp_boundary("image", "text")
def clip_loss(image: Tensor, text: Tensor, logit_scale, logit_bias=None, *, backend: str | None = None,
              mode: str = "gather", group=None, key_grad: bool = True) -> Tensor:
    """open_clip's ClipLoss with ``local_loss=True, gather_with_grad=True``: local images
    against all texts and local texts against all images, each a mean over local rows.

    ``key_grad=False`` is open_clip's ``local_loss=True, gather_with_grad=False``: the
    gathered features (this rank's own slice included) carry no gradient, so each
    feature gets the gradient of its rows as a query only (not the exact global
    gradient; kept for compatibility)."""
    V.matrix("image", image)
    V.matrix("text", text)
    V.same_device_dtype(image=image, text=text)
    V.same_shape(image=image, text=text)
    V.scalar("logit_scale", logit_scale, device=image.device)
    if logit_bias is not None:
        V.scalar("logit_bias", logit_bias, device=image.device)
    d = _setup(group, mode, "distributed clip_loss", image)
    _check_sizes(d, image=image, text=text)
    be = _family_backend(backend, "lse", image)
    dt = _cdt(be, image)
    scale = _scalar_tensor(logit_scale, image, dt)
    block = [image, text] if key_grad else [image.detach(), text.detach()]
    if key_grad:
        pos_i = pos_t = _rowdot(image, text, dt) * scale
    else:
        pos_i, pos_t = _rowdot(image, text.detach(), dt) * scale, _rowdot(text, image.detach(), dt) * scale

    def rows(loc, blk, own):  # own block: the cross-entropies (LSE_TARGET); others: LSE - positive
        if own is not None:
            return (fam.lse(be, loc[0], blk[1], loc[2], diag_offset=own, mask_mode=LSE_TARGET)[0],
                    fam.lse(be, loc[1], blk[0], loc[2], diag_offset=own, mask_mode=LSE_TARGET)[0])
        return (fam.lse(be, loc[0], blk[1], loc[2])[0] - loc[3], fam.lse(be, loc[1], blk[0], loc[2])[0] - loc[4])

    row, col = _blocks(d, mode, rows, ("lse", "lse"), [image, text, scale, pos_i, pos_t], block)
    loss = 0.5 * (row.mean() + col.mean())
    if isinstance(logit_bias, torch.Tensor):
        loss = loss + 0.0 * logit_bias.reshape(()).to(loss.dtype)  # a scalar bias cancels: exact zero gradient
    return loss


@_amp_boundary("image", "text")
def siglip_loss(image: Tensor, text: Tensor, logit_scale, logit_bias, *, negative_only: bool = False,
                backend: str | None = None, mode: str = "gather", group=None) -> Tensor:
    """open_clip's SigLipLoss over the global batch: ``-(1/N_local) sum_{i local, j global}
    log sigmoid(z_ij (s i_i . t_j + b))`` (z = +1 only for j = rank * N + i); the ring
    scores foreign text blocks with ``negative_only``."""
    V.matrix("image", image)
    V.matrix("text", text)
    V.same_device_dtype(image=image, text=text)
    V.same_dim(image=image, text=text)
    if not negative_only and image.shape[0] != text.shape[0]:
        raise ValueError(f"image and text must have the same number of rows unless negative_only=True, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    V.scalar("logit_scale", logit_scale, device=image.device)
    V.scalar("logit_bias", logit_bias, device=image.device)
    d = _setup(group, mode, "distributed siglip_loss", image)
    _check_sizes(d, image=image, text=text)
    be = _family_backend(backend, "pairwise", image)
    dt = _cdt(be, image)
    scale = _scalar_tensor(logit_scale, image, dt)
    bias = _scalar_tensor(logit_bias, image, dt)

    def rows(loc, blk, own):
        neg = negative_only or own is None
        return (fam.pairwise_total(be, loc[0], blk[0], loc[1], loc[2], diag_offset=own or 0,
                                   mode=PAIR_NEGATIVE_ONLY if neg else 0),)

    total, = _blocks(d, mode, rows, ("sum",), [image, scale, bias], [text])
    return total / image.shape[0]


# ------------------------------------------------------------------------- SupCon
@_amp_boundary("embeddings", "ref_embeddings")
def supcon_loss(embeddings: Tensor, labels: Tensor, temperature=0.1, *, ref_embeddings: Tensor | None = None,
                ref_labels: Tensor | None = None, normalize: bool = True, backend: str | None = None,
                mode: str = "gather", group=None) -> Tensor:
    """Supervised contrastive loss over the global batch: local anchors against every
    rank's embeddings (or every rank's ``ref_embeddings`` when given).  Returns
    ``world_size * (sum of local anchor losses) / (global count of anchors with a
    positive)``, whose mean over ranks is the global loss."""
    V.matrix("embeddings", embeddings)
    labels = V.labels("labels", labels, embeddings.shape[0], embeddings.device)
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    has_ref = ref_embeddings is not None
    if has_ref:
        V.matrix("ref_embeddings", ref_embeddings)
        V.same_device_dtype(embeddings=embeddings, ref_embeddings=ref_embeddings)
        V.same_dim(embeddings=embeddings, ref_embeddings=ref_embeddings)
        ref_labels = V.labels("ref_labels", ref_labels, ref_embeddings.shape[0], embeddings.device,
                              rows_name="ref_embeddings")
    V.scalar("temperature", temperature, nonzero=True, device=embeddings.device)
    d = _setup(group, mode, "distributed supcon_loss", embeddings)
    sizes = {"embeddings": embeddings}
    if has_ref:
        sizes["ref_embeddings"] = ref_embeddings
    _check_sizes(d, **sizes)
    be = _family_backend(backend, "lse", embeddings)
    dt = _cdt(be, embeddings)
    x = embeddings
    r, rl = (ref_embeddings, ref_labels) if has_ref else (x, labels)
    scale = _scalar_tensor(temperature, x, dt, invert=True)
    xr = _rscale(x, normalize, dt)
    if mode == "gather" and be != FAMILY_REFERENCE:
        # One block holding every positive: the anchors' losses straight from the kernels
        # (LSE_LABELS: p - 1/|P| formed in float32 in the backward), as functional.supcon_loss.
        own = d.rank * r.shape[0]
        kb, kl = _gather(r, d), _gather(rl, d)
        row, _ = fam.lse(be, x, kb, scale, q_rscale=_kn(xr), k_rscale=_kn(_rscale(kb, normalize, dt)),
                         q_labels=labels, k_labels=kl, diag_offset=own,
                         mask_mode=LSE_LABELS | (0 if has_ref else MASK_DIAG) | _norm_bit(normalize))
        has = functional._positive_counts(labels, kl, exclude_self=not has_ref) > 0
        total = _all_reduce(has.sum().to(torch.float64), d)
        return torch.where(has, row, torch.zeros_like(row)).sum() * d.world / total.clamp_min(1).to(row.dtype)
    nb = _norm_bit(normalize)

    # Per key block: the LSE_LABELS output (LSE minus the mean of the block's positive logits,
    # the plain LSE where the block holds none), split by whether the block holds a positive, and
    # the positives' logit sums and counts.  An anchor with a single positive in the global batch
    # is then (block holding it: its cross-entropy, exact) logaddexp (the other blocks' LSE minus
    # that logit): never a merged LSE minus a logit of ~1/t, which would keep a float32 ulp of
    # the logits (~1e-6 of 20) of a confident anchor's loss (1e-8 .. 1e-4).  Anchors with more
    # positives (loss >= log |P|) take the merged LSE minus the mean positive logit.
    def rows(loc, blk, own):
        xq, xr_, s_ = loc[0], loc[1] if normalize else None, loc[2]
        kb, kl = blk[0], blk[1]
        kr_ = _rscale(kb, normalize, dt)
        k_hat = kb.to(dt) * kr_[:, None] if normalize else kb.to(dt)
        self_mask = not has_ref and own is not None
        out = fam.lse(be, xq, kb, s_, q_rscale=_kn(xr_), k_rscale=_kn(kr_), q_labels=labels, k_labels=kl,
                      diag_offset=own or 0, mask_mode=LSE_LABELS | (MASK_DIAG if self_mask else 0) | nb)[0].to(dt)
        xh = xq.to(dt) * xr_[:, None] if normalize else xq.to(dt)
        if be == FAMILY_REFERENCE:  # materializing, in the compute dtype (float64 stays float64)
            same = (labels[:, None] == kl[None, :]).to(dt)
            psum, cnt = same @ k_hat, same.sum(1)
        else:
            psum, cnt = fam.label_group_sum(labels, kl, k_hat.float().contiguous())
        posdot, cnt = (xh * psum.to(dt)).sum(1), cnt.to(dt)
        if self_mask:  # the anchor is not its own positive
            posdot = posdot - (xh * k_hat[own:own + xq.shape[0]]).sum(1)
            cnt = cnt - 1
        held = cnt > 0.5
        ninf = torch.full_like(out, float("-inf"))
        raw = out + s_ * posdot / cnt.clamp_min(1)  # the block's plain LSE
        return (torch.where(held, out, ninf), torch.where(held, ninf, out), torch.where(held, raw, ninf),
                posdot, cnt)

    rel, free, held_lse, posdot, count = _blocks(d, mode, rows, ("lse", "lse", "lse", "sum", "sum"),
                                                 [x, xr if normalize else x.new_empty(0), scale], [r, rl])
    has = count > 0.5
    one = has & (count < 1.5)
    xp = scale * posdot / count.clamp_min(1)
    zero = torch.zeros_like(rel)
    # (the rows a branch does not take get zeros: no -inf - -inf reaches autograd through them)
    single = torch.logaddexp(torch.where(one, rel, zero), torch.where(one, free - xp, zero))
    rest = has & ~one
    many = torch.logaddexp(torch.where(rest, free, zero), torch.where(rest, held_lse, zero)) - xp
    anchor = torch.where(one, single, many)
    total = _all_reduce(has.sum().to(torch.float64), d)
    return torch.where(has, anchor, torch.zeros_like(anchor)).sum() * d.world / total.clamp_min(1).to(anchor.dtype)


# --------------------------------------------------------------------------- DCL
@_amp_boundary("z1", "z2")
def dcl_loss(z1: Tensor, z2: Tensor, temperature=0.1, *, weight_sigma=None, normalize: bool = True,
             backend: str | None = None, mode: str = "gather", group=None) -> Tensor:
    """Decoupled contrastive loss (lightly's DCLLoss / DCLWLoss) over the global batch:
    local rows against every rank's rows of both views, mean over local rows; the DCLW
    weights use the softmax over the global batch."""
    if weight_sigma is not None:
        V.scalar("weight_sigma", weight_sigma, positive=True)
    d, be, dt = _two_view_setup("dcl_loss", z1, z2, temperature, backend, mode, group, min_pairs=2,
                                why=" (each row needs a negative)")
    scale = _scalar_tensor(temperature, z1, dt, invert=True)
    ar, br = _rscale(z1, normalize, dt), _rscale(z2, normalize, dt)
    pos = _pos_logit(z1, z2, scale, normalize, dt)
    if weight_sigma is not None:
        cos = _rowdot(z1, z2, dt).detach()
        if normalize:
            cos = cos * ar.detach() * br.detach()
        logits = cos / weight_sigma
        lse_all = torch.logsumexp(_gather(logits, d), dim=0)
        pos = pos * (2 - z1.shape[0] * d.world * torch.exp(logits - lse_all))

    def rows(loc, blk, own):
        a, b, ar_, br_, s_ = loc
        ab_, bb_ = blk
        kar, kbr = _kn(_rscale(ab_, normalize, dt)), _kn(_rscale(bb_, normalize, dt))
        ar_, br_ = (_kn(ar_), _kn(br_)) if normalize else (None, None)
        kw = dict(diag_offset=own or 0, mask_mode=(MASK_DIAG if own is not None else 0) | _norm_bit(normalize))
        return (fam.lse(be, a, ab_, s_, q_rscale=ar_, k_rscale=kar, **kw)[0],
                fam.lse(be, a, bb_, s_, q_rscale=ar_, k_rscale=kbr, **kw)[0],
                fam.lse(be, b, bb_, s_, q_rscale=br_, k_rscale=kbr, **kw)[0],
                fam.lse(be, b, ab_, s_, q_rscale=br_, k_rscale=kar, **kw)[0])

    e = z1.new_empty(0)
    aa, ab, bb, ba = _blocks(d, mode, rows, ("lse",) * 4,
                             [z1, z2, ar if normalize else e, br if normalize else e, scale], [z1, z2])
    return 0.5 * ((torch.logaddexp(aa, ab) - pos).mean() + (torch.logaddexp(bb, ba) - pos).mean())


# ----------------------------------------------------------------- hard negatives
@_amp_boundary("z1", "z2")
def hard_negative_loss(z1: Tensor, z2: Tensor, temperature=0.5, *, beta=1.0, tau_plus=0.1, normalize: bool = True,
                       backend: str | None = None, mode: str = "gather", group=None) -> Tensor:
    """Robinson et al.'s hard-negative loss (HCL) over the global batch: the SimCLR 2N
    setting of all ranks' rows (each local row's negatives are the ``2 W N - 2`` rows of
    every rank but itself and its other view), mean over the 2N local rows."""
    V.scalar("beta", beta)
    V.scalar("tau_plus", tau_plus, lower=0.0, upper=1.0)
    d, be, dt = _two_view_setup("hard_negative_loss", z1, z2, temperature, backend, mode, group, min_pairs=2,
                                why=" (2N - 2 negatives per row)")
    z = torch.cat([z1, z2])  # this rank's block of the global [z1_0; z2_0; z1_1; z2_1; ...]
    n2 = z.shape[0]
    n_neg = n2 * d.world - 2
    inv_t = _scalar_tensor(temperature, z, dt, invert=True)
    zr = _rscale(z, normalize, dt)
    p = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    log_pos = _pos_logit(z, z[p], inv_t, normalize, dt)
    nb = _norm_bit(normalize)

    # reweight = sum exp((1+beta) s/tau) / mean exp(beta s/tau) over the negatives: two
    # log-sum-exps of the same rows (their gradients summed in float32: fam.lse_two_scales), the
    # own block masking each row itself and its positive
    def rows(loc, blk, own):
        kb = blk[0]
        kw = dict(q_rscale=_kn(loc[1]) if normalize else None, k_rscale=_kn(_rscale(kb, normalize, dt)))
        if own is not None:
            kw.update(pos_index=p + own, diag_offset=own, mask_mode=MASK_DIAG | MASK_POS | nb)
        else:
            kw.update(mask_mode=nb)
        return fam.lse_two_scales(be, loc[0], kb, loc[2], loc[3], **kw)

    l1, l0 = _blocks(d, mode, rows, ("lse", "lse"),
                     [z, zr if normalize else z.new_empty(0), (1 + beta) * inv_t, beta * inv_t], [z])
    return functional._hcl_rows(math.log(n_neg) + l1 - l0, log_pos, inv_t, n_neg, tau_plus).mean()


# --------------------------------------------------------------------- uniformity
@_amp_boundary()
def uniformity_loss(x: Tensor, t=2.0, *, backend: str | None = None, mode: str = "gather", group=None) -> Tensor:
    """Wang & Isola's uniformity of the global batch, ``log mean_{i != j} exp(-t |x_i - x_j|^2)``
    over every pair of all ranks' rows; every rank returns the global loss (its rows'
    log-sum-exps against every rank's rows, then a log-sum-exp of the ranks' partials)."""
    V.matrix("x", x)
    V.scalar("t", t)
    d = _setup(group, mode, "distributed uniformity_loss", x)
    _check_sizes(d, x=x)
    _need_global_rows("uniformity_loss", d, "x", x, 2)
    n = x.shape[0] * d.world
    be = _family_backend(backend, "lse", x)
    dt = _cdt(be, x)
    tt = _scalar_tensor(t, x, dt)
    # one exact translation of every rank's rows (functional._exact_shift): the global mean, on the
    # columns where it is exact on all ranks
    center = _all_reduce(x.detach().double().sum(0), d) / n
    x = x - functional._exact_shift(x, center, lambda ok: _all_reduce((~ok).double(), d) == 0)

    # LSE_j -t |x_i - x_j|^2 per block (fam.lse_sqdist: the expansion 2t x_i.x_j - t |x_j|^2 -
    # t |x_i|^2, its gradients as weighted differences)
    def rows(loc, blk, own):
        return (fam.lse_sqdist(be, loc[0], blk[0], loc[1], diag_offset=own or 0,
                               mask_mode=MASK_DIAG if own is not None else 0),)

    row, = _blocks(d, mode, rows, ("lse",), [x, tt], [x])
    part = torch.logsumexp(row, dim=0)
    return torch.logsumexp(_gather(part.reshape(1), d), dim=0) - math.log(n * (n - 1))


# ------------------------------------------------------- Barlow Twins and VICReg
def _global_center(z: Tensor, d: _Ctx, n_glob: int) -> Tensor:
    return z - _all_reduce(z.sum(0), d) / n_glob


def _choose_exchange(exchange, d, n, dim, views):
    V.choice("exchange", exchange, EXCHANGES)
    if exchange != "auto":
        return exchange
    # all-gather of Z moves views * world * N * D elements to each rank; all-reduce of C moves D^2
    return "gather" if views * d.world * n * dim <= dim * dim else "all_reduce"


def _offdiag_sq(c: Tensor) -> Tensor:
    return (c - torch.diag_embed(torch.diagonal(c))).pow(2).sum()


@_amp_boundary()
def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd=0.0051, *, eps=1e-5, backend: str | None = None,
                      path: str = "auto", mode: str = "gather", group=None, exchange: str = "auto") -> Tensor:
    """Barlow Twins with the cross-correlation of the global batch (global per-feature
    means and biased variances); every rank returns the global loss.  ``exchange``:
    "gather" all-gathers the standardized Z (then the Gram / tiled kernel runs on the
    global batch), "all_reduce" sums the local D x D products; "auto" picks the cheaper."""
    _pair_inputs(z1, z2)
    V.scalar("lambd", lambd)
    V.scalar("eps", eps, lower=0)
    path_id = {"auto": 0, "gram": 1, "tiled": 2}[V.choice("path", path, ("auto", "gram", "tiled"))]
    d = _setup(group, mode, "distributed barlow_twins_loss", z1)
    _check_sizes(d, z1=z1, z2=z2)
    be = _family_backend(backend, "xcorr", z1)
    dt = _cdt(be, z1)
    n, dim = z1.shape
    ng = n * d.world
    _need_global_rows("barlow_twins_loss", d, "z1", z1, 2,
                      why=" (it standardizes each feature over it, as BatchNorm1d in training mode)")

    def standardize(z):
        zc = _global_center(z.to(dt), d, ng)
        var = _all_reduce(zc.pow(2).sum(0), d) / ng
        return zc * torch.rsqrt(var + eps)

    a, b = standardize(z1), standardize(z2)
    if _choose_exchange(exchange, d, n, dim, 2) == "gather":
        off, diag = fam.xcorr(be, _gather(a, d).contiguous(), _gather(b, d).contiguous(), path=path_id)
    else:
        c = _all_reduce(a.T @ b, d)
        diag, off = torch.diagonal(c), _offdiag_sq(c)
    return (diag / ng - 1).pow(2).sum() + lambd * off / (ng * ng)


@_amp_boundary()
def vicreg_loss(z1: Tensor, z2: Tensor, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, *, eps=1e-4,
                backend: str | None = None, path: str = "auto", mode: str = "gather", group=None,
                exchange: str = "auto") -> Tensor:
    """VICReg over the global batch: the local invariance MSE (mean over ranks = global
    MSE) plus the variance and covariance terms of the global batch statistics."""
    _pair_inputs(z1, z2)
    for name, v in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
        V.scalar(name, v)
    V.scalar("eps", eps, lower=0)
    path_id = {"auto": 0, "gram": 1, "tiled": 2}[V.choice("path", path, ("auto", "gram", "tiled"))]
    d = _setup(group, mode, "distributed vicreg_loss", z1)
    _check_sizes(d, z1=z1, z2=z2)
    n, dim = z1.shape
    ng = n * d.world
    _need_global_rows("vicreg_loss", d, "z1", z1, 2, why=" (its variance term is unbiased: N - 1)")
    be = _family_backend(backend, "xcorr", z1)
    dt = _cdt(be, z1)
    x, y = z1.to(dt), z2.to(dt)
    repr_loss = F.mse_loss(x, y)
    xc, yc = _global_center(x, d, ng), _global_center(y, d, ng)
    vx = _all_reduce(xc.pow(2).sum(0), d) / (ng - 1)
    vy = _all_reduce(yc.pow(2).sum(0), d) / (ng - 1)
    std_loss = (F.relu(1 - torch.sqrt(vx + eps)).mean() + F.relu(1 - torch.sqrt(vy + eps)).mean()) / 2
    if _choose_exchange(exchange, d, n, dim, 2) == "gather":
        xg, yg = _gather(xc, d).contiguous(), _gather(yc, d).contiguous()
        off_x, _ = fam.xcorr(be, xg, xg, path=path_id)
        off_y, _ = fam.xcorr(be, yg, yg, path=path_id)
    else:
        off_x, off_y = _offdiag_sq(_all_reduce(xc.T @ xc, d)), _offdiag_sq(_all_reduce(yc.T @ yc, d))
    cov_loss = (off_x + off_y) / ((ng - 1) ** 2 * dim)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
