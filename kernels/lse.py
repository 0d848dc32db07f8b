"""Triton kernels of the log-sum-exp family (InfoNCE, NT-Xent, CLIP, SupCon, DCL, HCL, uniformity).

Contract (csrc/op_schemas.h): S_ij = scale (q_rscale_i q_i).(k_rscale_j k_j) + col_bias_j over the
pairs (i, j) the mask keeps; forward returns row_lse_i = LSE_j S_ij and, with compute_col,
col_lse_j = LSE_i S_ij; backward returns dq, dk, dscale, dcol_bias, dq_rscale, dk_rscale.

FlashAttention-2 shape of the computation, without the value matrix:
  * forward: one program per block of "outer" rows sweeps the "inner" rows in tiles,
    tile = tl.dot(outer, inner^T) in the input dtype with float32 accumulation, the
    rscales applied to the float32 dot (so normalized low-precision copies are never
    rounded), masks built in-tile from index vectors, online max / sum in the scores' unit:
    natural for float32 inputs (exp(s - m): the backward's recomputed scores minus the saved
    LSE then agree with the forward's to the last bit), base 2 for 16-bit ones (log2(e) folded
    into the scale, exp2 without a multiply: FlashAttention's saving; converting the saved
    natural LSE back to base 2 moves it by a few ulps of its size, a relative error of
    ~|S| 1e-7 in every p, invisible beside a 16-bit rounding but 7x float32's tolerance at
    |S| ~ 1000: a temperature of 1e-3, or raw rows of norm 10).
    Row LSE: outer = q, inner = k.  Column LSE: with compute_col the row pass also writes each
    tile's column states over its rows (COLS: max, exact 1s, the sum of the rest, in the unit),
    merged over the row blocks in order by _merge_states_kernel: one pass over S for both, in
    launches of as many rows as keep the states within _COLS_BUDGET.  With
    CONTRASTIVE_KERNELS_TRITON_FUSED_COLS=0 the column pass: the same kernel with TRANS
    (outer = k, inner = q; the masks and the bias read the swapped indices).
    Column splits (grid axis 1) where the row blocks alone would leave SMs idle: each split's
    row states merged in split order by the same merge kernel (the backward: grid axis 2, float32
    partial outputs summed in split order).
  * backward: tiles are recomputed from the saved LSEs,
    dS_ij = grad_row_i exp(S_ij - row_lse_i) + grad_col_j exp(S_ij - col_lse_j) on kept pairs.
    The online sums keep the running max's own term (an exact 1) out: count of scores at the
    max plus the sum below it, so a log-sum-exp is max + log1p(e) (_common.log1p).
    LSE_TARGET (mask bit 8): the forward keeps each row's own target score and writes the
    cross-entropy (max - target) + log1p(e); the backward forms exp((S_ij - x_i) - ce_i) with
    the saved target scores x (in the unit), and p - 1 = expm1(-ce_i) at a kept target itself
    (the -grad at a masked one), in float32.
    The row kernel (outer = q) accumulates A_i = sum_j dS_ij k_rscale_j k_j in registers
    (dq = scale q_rscale A); the TRANS kernel (outer = k) accumulates B_j and dcol_bias.
    d rscale and dscale need no second product: q_i . A_i = sum_j dS_ij k_rscale_j (q_i . k_j),
    a row sum of the tile.  dscale is written per outer row and summed in torch: no atomics,
    a fixed reduction order, nothing of size N x M.
  * D of any size: padded to a power of two >= 16 (masked); D_PAD > 128 loops over D chunks
    for the scores, and the gradient accumulator covers BLOCK_DO columns of D per program
    (a second grid axis over D groups when D_PAD > BLOCK_DO).
  * int64 row offsets for all pointer arithmetic.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import dot as _dot
from ._common import (INTERPRET, col_splits, expm1_neg, half_ds_scale, is_ieee, launch, log1p, pad_dim,
                      smem_limit, split_parts, split_range, sum_splits)

AVAILABLE = True

MASK_DIAG, MASK_POS, MASK_SAME_LABEL = 1, 2, 4
LSE_TARGET, LSE_LABELS, LSE_NORM = 8, 16, 32


# ----------------------------------------------------------------------- jit helpers
@triton.jit
def _load_rows(X, rows, rows_ok, cols, D, stride):
    """The tile X[rows, cols] of a row-major (., D) matrix with row stride `stride`, in X's
    dtype; 0 where a row is out of range (not rows_ok) or a column is padding (cols >= D)."""
    return tl.load(X + rows[:, None] * stride + cols[None, :], mask=rows_ok[:, None] & (cols[None, :] < D),
                   other=0.0)


@triton.jit
def _raw_scores_chunked(O, I, o64, o_ok, n64, n_ok, D, stride_o, stride_i,
                        IEEE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """(outer . inner) for one tile in float32, D in chunks of BLOCK_D (D_PAD > BLOCK_D)."""
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + d
        a = _load_rows(O, o64, o_ok, dd, D, stride_o)
        b = _load_rows(I, n64, n_ok, dd, D, stride_i)
        acc = _dot(a, tl.trans(b), acc, IEEE)
    return acc


@triton.jit
def _keep(o_idx, o_ok, n_idx, n_ok, diag_offset, o_pos, n_pos, o_lab, n_lab,
          TRANS: tl.constexpr, MASK_DIAG: tl.constexpr, MASK_POS: tl.constexpr, MASK_LAB: tl.constexpr):
    """Kept pairs of the tile, in terms of the original (i, j) = (outer, inner) or (inner, outer)."""
    keep = o_ok[:, None] & n_ok[None, :]
    if MASK_DIAG:  # drop j == i + diag_offset
        if TRANS:
            keep = keep & (o_idx[:, None] != n_idx[None, :] + diag_offset)
        else:
            keep = keep & (n_idx[None, :] != o_idx[:, None] + diag_offset)
    if MASK_POS:  # drop j == pos_index[i]
        if TRANS:
            keep = keep & (o_idx[:, None] != n_pos[None, :])
        else:
            keep = keep & (n_idx[None, :] != o_pos[:, None])
    if MASK_LAB:  # drop q_labels[i] == k_labels[j]
        keep = keep & (o_lab[:, None] != n_lab[None, :])
    return keep


# The scores' unit (NAT: float32 inputs, natural; else base 2, s = log2(e) S; see the docstring).
@triton.jit
def _exp_u(x, NAT: tl.constexpr):
    """e^x for x in the unit (natural: exp; base 2: exp2)."""
    if NAT:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _to_unit(x, NAT: tl.constexpr):
    """A natural-log quantity (a scale, bias or LSE) in the unit."""
    if NAT:
        return x
    else:
        return x * 1.4426950408889634


@triton.jit
def _to_nat(x, NAT: tl.constexpr):
    """A quantity in the unit, in natural log units."""
    if NAT:
        return x
    else:
        return x * 0.6931471805599453


@triton.jit
def _outer_rows(pid, SCALE, O_RS, BIAS, POS, O_LAB, NO,
                TRANS: tl.constexpr, HAS_ORS: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_POS: tl.constexpr,
                MASK_LAB: tl.constexpr, NAT: tl.constexpr, BLOCK_O: tl.constexpr):
    """The per-row values of the block `pid` of BLOCK_O outer rows, loaded once per program.

    Returns (o_idx, o_ok, scale, o_rs, c2, o_bias, o_pos, o_lab):
      o_idx   int64 outer row indices, o_ok = o_idx < NO;
      scale   the float32 scale;  o_rs = the outer rscale (1 without one);
      c2      the scale in the unit (NAT: scale; else scale log2(e)): a raw dot times
              (o_rs i_rs) c2 is the score in the unit, before the bias;
      o_bias  col_bias of the outer rows under TRANS (outer rows are columns), in the unit, else 0;
      o_pos   pos_index of the outer rows without TRANS, else o_idx (unused);
      o_lab   the outer rows' labels with MASK_LAB, else o_idx (unused)."""
    o_idx = pid.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o_idx < NO
    scale = tl.load(SCALE).to(tl.float32)
    o_rs = tl.full((BLOCK_O,), 1.0, tl.float32)
    if HAS_ORS:
        o_rs = tl.load(O_RS + o_idx, mask=o_ok, other=1.0)
    c2 = _to_unit(scale, NAT)
    o_bias = tl.zeros((BLOCK_O,), dtype=tl.float32)
    if HAS_BIAS and TRANS:
        o_bias = _to_unit(tl.load(BIAS + o_idx, mask=o_ok, other=0.0), NAT)
    o_pos = o_idx
    if MASK_POS and not TRANS:
        o_pos = tl.load(POS + o_idx, mask=o_ok, other=-1)
    o_lab = o_idx
    if MASK_LAB:
        o_lab = tl.load(O_LAB + o_idx, mask=o_ok, other=0)
    return o_idx, o_ok, scale, o_rs, c2, o_bias, o_pos, o_lab


@triton.jit
def _outer_tile(O, o_idx, o_ok, D, stride_o, SINGLE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_O, BLOCK_D) tile of the outer rows when SINGLE (all of D in one chunk: loaded once,
    out of the inner loop), else zeros (unused: the chunked product loads its own chunks)."""
    o_tile = tl.zeros((BLOCK_O, BLOCK_D), dtype=O.dtype.element_ty)
    if SINGLE:
        o_tile = _load_rows(O, o_idx, o_ok, tl.arange(0, BLOCK_D), D, stride_o)
    return o_tile


@triton.jit
def _scaled(acc, o_rs, i_rs, c2, HAS_ORS: tl.constexpr, HAS_IRS: tl.constexpr):
    """Scores (in the unit) of a raw float32 dot tile: acc (o_rs i_rs) c2, the rscales multiplied
    with each other first (the TRANS pass forms the same product bit for bit)."""
    if HAS_IRS:
        if HAS_ORS:
            s2 = acc * ((o_rs[:, None] * i_rs[None, :]) * c2)
        else:
            s2 = acc * (i_rs * c2)[None, :]
    else:
        s2 = acc * (o_rs * c2)[:, None]
    return s2


@triton.jit
def _kept(s, keep):
    """The scores of the kept pairs, -inf elsewhere; a kept -inf (from an infinite input) is NaN, not
    exp(-inf) = 0 (SPEC)."""
    return tl.where(keep, tl.where(s == float("-inf"), float("nan"), s), float("-inf"))


@triton.jit
def _online(m, l, k, s, NAT: tl.constexpr):
    """One tile of the online log-sum-exp (in the unit) of the rows of `s` (-inf where not kept): the
    running max m, the sum l of e^(s - m) over the scores below it and the count k of those equal
    to it (exact 1s), so that the sum is 1 + e, e = (k - 1) + l, formed without rounding 1 + tiny (a
    confident row's cross-entropy log1p(e) would lose all of a 1e-7 loss to a float32 ulp of 1)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # A row with nothing kept so far has m_new = -inf: use 0 as its reference so that
    # e^(-inf - ref) = 0 instead of NaN.
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    up = m_new > m  # the max rises: the old terms, maxima included, scale by e^(m - m_new) (in the unit)
    l = tl.where(up, (l + k) * _exp_u(m - ref, NAT), l)
    k = tl.where(up, 0.0, k)
    at = s == ref[:, None]
    k += tl.sum(tl.where(at, 1.0, 0.0), axis=1)
    l += tl.sum(tl.where(at, 0.0, _exp_u(s - ref[:, None], NAT)), axis=1)
    return m_new, l, k


@triton.jit
def _tile_scores(O, I, I_RS, BIAS, POS, I_LAB, start, NI, D, stride_o, stride_i, diag_offset,
                 o_idx, o_ok, o_rs, c2, o_bias, o_pos, o_lab, o_tile,
                 TRANS: tl.constexpr, HAS_ORS: tl.constexpr, HAS_IRS: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_DIAG: tl.constexpr,
                 MASK_POS: tl.constexpr, MASK_LAB: tl.constexpr, IEEE: tl.constexpr, SINGLE: tl.constexpr,
                 NAT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """The (BLOCK_O, BLOCK_I) tile of scores of the outer rows (the o_* of _outer_rows) against
    the inner rows start .. start + BLOCK_I.

    Returns (n64, n_ok, i_tile, acc, i_rs, s2, keep):
      n64     int64 inner row indices, n_ok = n64 < NI;
      i_tile  the (BLOCK_I, BLOCK_D) inner tile when SINGLE (the backward reuses it for the
              gradient product), else zeros (unused);
      acc     the raw float32 dot outer . inner (no rscales, no scale);
      i_rs    the inner rscale (1 without one);
      s2      the scores S_ij in the unit over the whole tile, masked pairs included; the
              rscales multiply each other first, so that the TRANS pass computes the same
              scores bit for bit (LSE_TARGET's backward relies on it);
      keep    the pairs the masks keep (and in range)."""
    n_idx = start + tl.arange(0, BLOCK_I)
    n_ok = n_idx < NI
    n64 = n_idx.to(tl.int64)
    if SINGLE:  # outer tile hoisted; the inner tile is reused by the gradient product
        i_tile = _load_rows(I, n64, n_ok, tl.arange(0, BLOCK_D), D, stride_i)
        acc = _dot(o_tile, tl.trans(i_tile), tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32), IEEE)
    else:
        i_tile = tl.zeros((BLOCK_I, BLOCK_D), dtype=I.dtype.element_ty)
        acc = _raw_scores_chunked(O, I, o_idx, o_ok, n64, n_ok, D, stride_o, stride_i,
                                  IEEE, BLOCK_D, BLOCK_O, BLOCK_I)
    i_rs = tl.full((BLOCK_I,), 1.0, tl.float32)
    if HAS_IRS:
        i_rs = tl.load(I_RS + n64, mask=n_ok, other=1.0)
    s2 = _scaled(acc, o_rs, i_rs, c2, HAS_ORS, HAS_IRS)
    if HAS_BIAS:
        if TRANS:
            s2 = s2 + o_bias[:, None]
        else:
            s2 = s2 + _to_unit(tl.load(BIAS + n64, mask=n_ok, other=0.0), NAT)[None, :]
    n_pos = n64
    if MASK_POS and TRANS:
        n_pos = tl.load(POS + n64, mask=n_ok, other=-1)
    n_lab = n64
    if MASK_LAB:
        n_lab = tl.load(I_LAB + n64, mask=n_ok, other=0)
    keep = _keep(o_idx, o_ok, n64, n_ok, diag_offset, o_pos, n_pos, o_lab, n_lab,
                 TRANS, MASK_DIAG, MASK_POS, MASK_LAB)
    return n64, n_ok, i_tile, acc, i_rs, s2, keep


# --------------------------------------------------------------------------- forward
@triton.jit
def _lse_fwd_kernel(O, I, SCALE, O_RS, I_RS, BIAS, POS, O_LAB, I_LAB, TGT, OUT, XT, CP, RP, SCALE0, OUT0, RP0,
                    NO, NI, D, stride_o, stride_i, diag_offset, NSLOT, ROW0,
                    COLS: tl.constexpr, SLOT_ROWS: tl.constexpr, SPLIT: tl.constexpr,
                    TRANS: tl.constexpr, HAS_ORS: tl.constexpr, HAS_IRS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    MASK_DIAG: tl.constexpr, MASK_POS: tl.constexpr, MASK_LAB: tl.constexpr, TARGET: tl.constexpr,
                    LABELS: tl.constexpr, TWO: tl.constexpr, NAT: tl.constexpr,
                    IEEE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    # Grid (row blocks of this launch, column splits).  ROW0: the launch's first row (a multiple of
    # every BLOCK_O).  Split s walks its share of the column tiles; with SPLIT (more than one) the
    # row states go to RP [fields][splits][NO], merged by _merge_states_kernel, else the outputs
    # are written here.  COLS (the fused forward, rows = q): each tile's column states over the
    # block's rows go to CP.
    pid = ROW0 // BLOCK_O + tl.program_id(0)
    o_idx, o_ok, scale, o_rs, c2, o_bias, o_pos, o_lab = _outer_rows(
        pid, SCALE, O_RS, BIAS, POS, O_LAB, NO, TRANS, HAS_ORS, HAS_BIAS, MASK_POS, MASK_LAB, NAT, BLOCK_O)
    o_tile = _outer_tile(O, o_idx, o_ok, D, stride_o, SINGLE, BLOCK_O, BLOCK_D)
    # Online log-sum-exp (in the unit, _online): running max m, sum l below it, count k at it.
    m = tl.full((BLOCK_O,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_O,), dtype=tl.float32)
    k = tl.zeros((BLOCK_O,), dtype=tl.float32)
    if TWO:  # the second scale's state (lse2_forward: plain row log-sum-exps, no bias, target or labels)
        c20 = _to_unit(tl.load(SCALE0).to(tl.float32), NAT)
        m0 = tl.full((BLOCK_O,), float("-inf"), tl.float32)
        l0 = tl.zeros((BLOCK_O,), dtype=tl.float32)
        k0 = tl.zeros((BLOCK_O,), dtype=tl.float32)
    x2 = tl.zeros((BLOCK_O,), dtype=tl.float32)  # LSE_TARGET: each row's own target score (in the unit)
    p2 = tl.zeros((BLOCK_O,), dtype=tl.float32)  # LSE_LABELS (rows only): sum and count of the kept
    pc = tl.zeros((BLOCK_O,), dtype=tl.float32)  # same-label scores (in the unit)
    if TARGET and not TRANS:
        o_t = tl.load(TGT + o_idx, mask=o_ok, other=-1)
    if LABELS:
        o_l = tl.load(O_LAB + o_idx, mask=o_ok, other=-1)
    c_lo, c_hi = split_range(1, NI, BLOCK_I)
    for start in range(c_lo, c_hi, BLOCK_I):
        n64, n_ok, _, acc, i_rs, s, keep = _tile_scores(
            O, I, I_RS, BIAS, POS, I_LAB, start, NI, D, stride_o, stride_i, diag_offset,
            o_idx, o_ok, o_rs, c2, o_bias, o_pos, o_lab, o_tile,
            TRANS, HAS_ORS, HAS_IRS, HAS_BIAS, MASK_DIAG, MASK_POS, MASK_LAB, IEEE, SINGLE, NAT, BLOCK_D, BLOCK_O,
            BLOCK_I)
        if TARGET:  # (column j's target is row j: TGT of the inner rows under TRANS)
            if TRANS:
                is_t = o_idx[:, None] == tl.load(TGT + n64, mask=n_ok, other=-1)[None, :]
            else:
                is_t = n64[None, :] == o_t[:, None]
            at_t = tl.where(is_t, s, 0.0)
            x2 += tl.sum(at_t, axis=1)
            if COLS:  # (square, diag_offset 0: column j's target is row j, at most one per column)
                cx2 = tl.sum(at_t, axis=0)
        if LABELS:
            is_p = keep & (o_l[:, None] == tl.load(I_LAB + n64, mask=n_ok, other=-2)[None, :])
            p2 += tl.sum(tl.where(is_p, s, 0.0), axis=1)
            pc += tl.sum(is_p.to(tl.float32), axis=1)
        s = _kept(s, keep)
        m, l, k = _online(m, l, k, s, NAT)
        if TWO:  # the same kept pairs' scores at the second scale, from the same product
            m0, l0, k0 = _online(m0, l0, k0, _kept(_scaled(acc, o_rs, i_rs, c20, HAS_ORS, HAS_IRS), keep), NAT)
        if COLS:
            # The tile's column states over this block's rows, in the row state's form (max, exact
            # 1s at it, the sum of the rest): their own exps, e^(s - row max) would underflow for
            # a column far below its rows' maxima.  CP is [4][NSLOT][NI] (max, sum, count, target
            # score), slot = this program's first SLOT_ROWS-row group; a block of BLOCK_O >
            # SLOT_ROWS rows writes its state in its first slot and empty states (-inf, 0, 0, 0) in
            # the others, so that every slot is written whichever BLOCK_O the autotuner picked.
            cm = tl.max(s, axis=0)
            cref = tl.where(cm == float("-inf"), 0.0, cm)
            cat = s == cref[None, :]
            ck = tl.sum(tl.where(cat, 1.0, 0.0), axis=0)
            cl = tl.sum(tl.where(cat, 0.0, _exp_u(s - cref[None, :], NAT)), axis=0)
            if not TARGET:
                cx2 = tl.zeros((BLOCK_I,), dtype=tl.float32)
            field = NSLOT.to(tl.int64) * NI
            slot = 1 + tl.program_id(0).to(tl.int64) * (BLOCK_O // SLOT_ROWS)  # (slot 0: the running state)
            base = CP + slot * NI + n64
            tl.store(base, cm, mask=n_ok)
            tl.store(base + field, cl, mask=n_ok)
            tl.store(base + 2 * field, ck, mask=n_ok)
            tl.store(base + 3 * field, cx2, mask=n_ok)
            for e in tl.static_range(1, BLOCK_O // SLOT_ROWS):
                tl.store(base + e * NI, tl.full((BLOCK_I,), float("-inf"), tl.float32), mask=n_ok)
                tl.store(base + e * NI + field, tl.zeros((BLOCK_I,), dtype=tl.float32), mask=n_ok)
                tl.store(base + e * NI + 2 * field, tl.zeros((BLOCK_I,), dtype=tl.float32), mask=n_ok)
                tl.store(base + e * NI + 3 * field, tl.zeros((BLOCK_I,), dtype=tl.float32), mask=n_ok)
    if SPLIT:  # this split's row states, in the merge's fields (m, l, k, x2, p2, pc)
        field = tl.num_programs(1).to(tl.int64) * NO
        base = RP + tl.program_id(1).to(tl.int64) * NO + o_idx
        tl.store(base, m, mask=o_ok)
        tl.store(base + field, l, mask=o_ok)
        tl.store(base + 2 * field, k, mask=o_ok)
        if TARGET:
            tl.store(base + 3 * field, x2, mask=o_ok)
        if LABELS:
            tl.store(base + 4 * field, p2, mask=o_ok)
            tl.store(base + 5 * field, pc, mask=o_ok)
        if TWO:
            base0 = RP0 + tl.program_id(1).to(tl.int64) * NO + o_idx
            tl.store(base0, m0, mask=o_ok)
            tl.store(base0 + field, l0, mask=o_ok)
            tl.store(base0 + 2 * field, k0, mask=o_ok)
    else:
        _finish_states(o_idx, o_ok, m, l, k, x2, p2, pc, OUT, XT, NO, TARGET, LABELS, TARGET and not TRANS, NAT)
        if TWO:
            _finish_states(o_idx, o_ok, m0, l0, k0, x2, p2, pc, OUT0, XT, NO, False, False, False, NAT)


@triton.jit
def _finish_states(idx, ok, m, l, k, x2, p2, pc, OUT, XT, N,
                   TARGET: tl.constexpr, LABELS: tl.constexpr, WRITE_XT: tl.constexpr, NAT: tl.constexpr):
    """The outputs of finished states (in the unit: max m, sum l below it, count k at it; x2 the target
    score, p2 / pc the positives' sum and count) at indices idx (< N where ok)."""
    # log of the sum relative to the max (natural): -inf with nothing kept, NaN from a NaN score
    empty = m == float("-inf")
    lg = tl.where(empty, tl.where(l == 0.0, float("-inf"), float("nan")),
                  log1p(tl.where(empty, 0.0, (k - 1.0) + l)))
    if TARGET:  # the cross-entropy (max - target) + log1p(e): rounded relative to itself
        tl.store(OUT + idx, _to_nat(m - x2, NAT) + lg, mask=ok)
        if WRITE_XT:  # (rows) saved for the backward in the unit, exactly the score it recomputes
            tl.store(XT + idx, x2, mask=ok)
    elif LABELS:
        # LSE minus the mean positive score xp, as (max - xp) + log1p(e): rounded relative to itself
        # (one positive at the max: exactly log1p(e)); XT: (2, N) xp (in the unit, the backward's x2,
        # as LSE_TARGET's) and 1 / |P_i| (0, 0 without a positive, whose output stays the LSE)
        has = pc > 0.0
        xp = tl.where(has, p2 / tl.maximum(pc, 1.0), 0.0)
        tl.store(OUT + idx, _to_nat(m - xp, NAT) + lg, mask=ok)  # (xp = 0 without a positive)
        tl.store(XT + idx, xp, mask=ok)
        tl.store(XT + N + idx, tl.where(has, 1.0 / tl.maximum(pc, 1.0), 0.0), mask=ok)
    else:
        lse = _to_nat(m, NAT) + lg  # -inf where nothing is kept
        tl.store(OUT + idx, lse, mask=ok)


@triton.jit
def _merge_states_kernel(P, OUT, XT, N, NPART, FIELD, TARGET: tl.constexpr, LABELS: tl.constexpr,
                         WRITE_XT: tl.constexpr, FINISH: tl.constexpr, NAT: tl.constexpr, BLOCK: tl.constexpr):
    """Partial states P[f][b][i] (field f at P + f FIELD, part b < NPART, index i < N; in the unit)
    merged in part order as the tile loop merges them: the maximum over all parts first, then the
    terms below it scaled down and the exact 1s at it added; the target score and the positives'
    sum and count added (one part holds a row's target: exact).  FINISH: the outputs (as the
    forward kernel writes them), else the merged state written back to part 0 (the fused
    forward's running column state between launches).  Used for the column splits' row states
    and the fused forward's column states."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = c < N
    n64 = N.to(tl.int64)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for b in range(0, NPART):
        m = tl.maximum(m, tl.load(P + b * n64 + c, mask=ok, other=float("-inf")))
    ref = tl.where(m == float("-inf"), 0.0, m)
    top = m != float("-inf")
    l = tl.zeros((BLOCK,), dtype=tl.float32)
    k = tl.zeros((BLOCK,), dtype=tl.float32)
    x2 = tl.zeros((BLOCK,), dtype=tl.float32)
    p2 = tl.zeros((BLOCK,), dtype=tl.float32)
    pc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(0, NPART):
        p = P + b * n64 + c
        ms = tl.load(p, mask=ok, other=float("-inf"))
        ls = tl.load(p + FIELD, mask=ok, other=0.0)
        ks = tl.load(p + 2 * FIELD, mask=ok, other=0.0)
        at = (ms == m) & top
        l += tl.where(at, ls, (ls + ks) * _exp_u(ms - ref, NAT))
        k += tl.where(at, ks, 0.0)
        if TARGET:
            x2 += tl.load(p + 3 * FIELD, mask=ok, other=0.0)
        if LABELS:
            p2 += tl.load(p + 4 * FIELD, mask=ok, other=0.0)
            pc += tl.load(p + 5 * FIELD, mask=ok, other=0.0)
    if FINISH:
        _finish_states(c, ok, m, l, k, x2, p2, pc, OUT, XT, N, TARGET, LABELS, WRITE_XT, NAT)
    else:
        tl.store(P + c, m, mask=ok)
        tl.store(P + FIELD + c, l, mask=ok)
        tl.store(P + 2 * FIELD + c, k, mask=ok)
        if TARGET:
            tl.store(P + 3 * FIELD + c, x2, mask=ok)


# -------------------------------------------------------------------------- backward
@triton.jit
def _lse_bwd_kernel(O, I, SCALE, O_RS, I_RS, BIAS, POS, O_LAB, I_LAB, TGT, XT,
                    O_LSE, O_G, I_LSE, I_G, D_OUT, D_ORS, D_SCALE, D_BIAS,
                    SCALE0, O_LSE0, O_G0, I_LSE0, I_G0, D_SCALE0,
                    NO, NI, D, stride_o, stride_i, diag_offset,
                    TRANS: tl.constexpr, HAS_ORS: tl.constexpr, HAS_IRS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    MASK_DIAG: tl.constexpr, MASK_POS: tl.constexpr, MASK_LAB: tl.constexpr,
                    HAS_OTERM: tl.constexpr, HAS_ITERM: tl.constexpr, TARGET: tl.constexpr, LABELS: tl.constexpr,
                    TWO: tl.constexpr, NAT: tl.constexpr,
                    NEED_OUT: tl.constexpr, NEED_ORS: tl.constexpr, NEED_SCALE: tl.constexpr,
                    NEED_BIAS: tl.constexpr, RS_ON_TILE: tl.constexpr, DS_C, SCALE_DS: tl.constexpr,
                    IEEE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_DO: tl.constexpr):
    # Grid (row blocks, D groups, column splits).  With SPLIT (more than one) split s walks its
    # share of the column tiles and writes its partial outputs at split offset s (float32
    # [splits][NO](D), summed in split order by the launcher); one split writes the outputs
    # themselves.  (SPLIT is also in the autotune key: a split launch has other tiles' best.)
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    if SPLIT:
        pid_s = tl.program_id(2).to(tl.int64)
        c_lo, c_hi = split_range(2, NI, BLOCK_I)
    else:
        pid_s = 0
        c_lo, c_hi = 0, NI
    o_idx, o_ok, scale, o_rs, c2, o_bias, o_pos, o_lab = _outer_rows(
        pid, SCALE, O_RS, BIAS, POS, O_LAB, NO, TRANS, HAS_ORS, HAS_BIAS, MASK_POS, MASK_LAB, NAT, BLOCK_O)
    # Each log-sum-exp (in the unit) as x2 + lse2: (0, lse), or with LSE_TARGET (the forward's target
    # score, the cross-entropy), so that s - x2 is exact at the target.
    o_lse2 = tl.zeros((BLOCK_O,), dtype=tl.float32)
    o_x2 = tl.zeros((BLOCK_O,), dtype=tl.float32)
    o_g = tl.zeros((BLOCK_O,), dtype=tl.float32)
    o_em1 = tl.zeros((BLOCK_O,), dtype=tl.float32)
    if HAS_OTERM:
        o_out = tl.load(O_LSE + o_idx, mask=o_ok, other=0.0)
        o_lse2 = _to_unit(o_out, NAT)
        o_g = tl.load(O_G + o_idx, mask=o_ok, other=0.0)
        if TARGET or LABELS:  # (LSE_LABELS: x2 the mean positive score, the output LSE - it)
            o_x2 = tl.load(XT + o_idx, mask=o_ok, other=0.0)
            o_em1 = expm1_neg(o_out)  # p - 1 at a kept target, exact for a tiny cross-entropy
    if TWO:  # lse2_backward: the second scale's log-sum-exps (plain rows: no target, labels or bias)
        scale0 = tl.load(SCALE0).to(tl.float32)
        c20 = _to_unit(scale0, NAT)
        if HAS_OTERM:
            o_lse02 = _to_unit(tl.load(O_LSE0 + o_idx, mask=o_ok, other=0.0), NAT)
            o_g0 = tl.load(O_G0 + o_idx, mask=o_ok, other=0.0)
        r_acc0 = tl.zeros((BLOCK_O,), dtype=tl.float32)
    if LABELS:  # LSE_LABELS: -g_i / |P_i| at the kept same-label pairs (XT[NQ:] = 1 / |P_i|, q rows)
        o_l = tl.load(O_LAB + o_idx, mask=o_ok, other=-1)
        if not TRANS:
            o_lw = tl.load(XT + NO + o_idx, mask=o_ok, other=0.0)
            o_pw = o_lw * o_g
            o_unit = o_lw == 1.0
    o_tile = _outer_tile(O, o_idx, o_ok, D, stride_o, SINGLE, BLOCK_O, BLOCK_D)
    dcol = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    if TARGET:  # the target column of each q row (TGT, validated < M); -1 never matches
        o_w = tl.zeros((BLOCK_O,), dtype=tl.float32)
        if HAS_OTERM:
            o_w = tl.where(o_lse2 > float("-inf"), o_g, 0.0)
        if not TRANS:
            o_t = tl.load(TGT + o_idx, mask=o_ok, other=-1)

    if SCALE_DS:  # float16: dS times a power of two before rounding (_common.half_ds_scale)
        ds_c = tl.load(DS_C)
    acc_out = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    r_acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for start in range(c_lo, c_hi, BLOCK_I):
        n64, n_ok, i_tile, acc, i_rs, s, keep = _tile_scores(
            O, I, I_RS, BIAS, POS, I_LAB, start, NI, D, stride_o, stride_i, diag_offset,
            o_idx, o_ok, o_rs, c2, o_bias, o_pos, o_lab, o_tile,
            TRANS, HAS_ORS, HAS_IRS, HAS_BIAS, MASK_DIAG, MASK_POS, MASK_LAB, IEEE, SINGLE, NAT, BLOCK_D, BLOCK_O,
            BLOCK_I)
        if TARGET:  # the target pairs (i, t_i); with a column term t_i = i, column i's target too
            if TRANS:
                is_t = o_idx[:, None] == tl.load(TGT + n64, mask=n_ok, other=-1)[None, :]
            else:
                is_t = n64[None, :] == o_t[:, None]
        ds = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        if HAS_OTERM:
            if TARGET or LABELS:  # exp((S - x) - out) (LSE_LABELS: x the mean positive score)
                pr = _exp_u((s - o_x2[:, None]) - o_lse2[:, None], NAT)
                if TARGET:  # at the target p - 1 = expm1(-ce): its S is the forward's x by definition (the
                    # TRANS pass, or a differently rounded product, may recompute it an ulp away), and
                    # exp(-ce) - 1 in float32 would keep nothing of a 1e-8 loss
                    pr = tl.where(is_t, o_em1[:, None], pr)
                ds += o_g[:, None] * pr
            else:
                ds += o_g[:, None] * _exp_u(s - o_lse2[:, None], NAT)
        if HAS_ITERM:
            i_out = tl.load(I_LSE + n64, mask=n_ok, other=0.0)
            i_lse2 = _to_unit(i_out, NAT)
            i_g = tl.load(I_G + n64, mask=n_ok, other=0.0)
            if TARGET or LABELS:  # (LSE_LABELS under TRANS: the q rows' term)
                i_x2 = tl.load(XT + n64, mask=n_ok, other=0.0)
                pr = _exp_u((s - i_x2[None, :]) - i_lse2[None, :], NAT)
                if TARGET:
                    pr = tl.where(is_t, expm1_neg(i_out)[None, :], pr)
                ds += i_g[None, :] * pr
            else:
                ds += i_g[None, :] * _exp_u(s - i_lse2[None, :], NAT)
        # Masked pairs (and rows / columns with nothing kept, whose LSE is -inf) get exactly 0.
        ds = tl.where(keep, ds, 0.0)
        if TWO:  # the second scale's dS0, from the same product
            s0 = _scaled(acc, o_rs, i_rs, c20, HAS_ORS, HAS_IRS)
            ds0 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            if HAS_OTERM:
                ds0 += o_g0[:, None] * _exp_u(s0 - o_lse02[:, None], NAT)
            if HAS_ITERM:
                i_lse02 = _to_unit(tl.load(I_LSE0 + n64, mask=n_ok, other=0.0), NAT)
                ds0 += tl.load(I_G0 + n64, mask=n_ok, other=0.0)[None, :] * _exp_u(s0 - i_lse02[None, :], NAT)
            ds0 = tl.where(keep, ds0, 0.0)
        if LABELS:  # (TRANS: the q rows are the inner ones, their row term the I term; no column term)
            # p - 1/|P| at a kept positive, and for a row with one positive (1/|P| = 1) p - 1 as
            # expm1(-output), as LSE_TARGET's target (its S is the forward's xp by definition)
            is_p = keep & (o_l[:, None] == tl.load(I_LAB + n64, mask=n_ok, other=-2)[None, :])
            if TRANS:
                i_lw = tl.load(XT + NI + n64, mask=n_ok, other=0.0)
                pw = i_lw * i_g
                ds = tl.where(is_p & (i_lw == 1.0)[None, :], (i_g * expm1_neg(i_out))[None, :],
                              ds - tl.where(is_p, pw[None, :], 0.0))
            else:
                ds = tl.where(is_p & o_unit[:, None], (o_g * o_em1)[:, None], ds - tl.where(is_p, o_pw[:, None], 0.0))
        if TARGET:  # LSE_TARGET, a masked target pair: the -grad of each side (a kept one has p - 1 above)
            w = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32) + o_w[:, None]
            if HAS_ITERM:
                w += tl.where(i_lse2 > float("-inf"), i_g, 0.0)[None, :]
            ds = ds - tl.where(is_t, tl.where(keep, 0.0, w), 0.0)
        if NEED_ORS or NEED_SCALE:
            t = ds * acc
            if HAS_IRS:
                t = t * i_rs[None, :]
            r_acc += tl.sum(t, axis=1)
            if TWO:
                t0 = ds0 * acc
                if HAS_IRS:
                    t0 = t0 * i_rs[None, :]
                r_acc0 += tl.sum(t0, axis=1)
        if NEED_BIAS:
            b_acc += tl.sum(ds, axis=1)
        if NEED_OUT:
            if SINGLE and BLOCK_DO == BLOCK_D:
                x = i_tile
            else:
                x = _load_rows(I, n64, n_ok, dcol, D, stride_i)
            if TWO:  # d/d(raw product): the two scales' terms summed in float32 before the one rounding
                p = ds * scale + ds0 * scale0
            else:
                p = ds
            if HAS_IRS:
                if RS_ON_TILE:  # float16: scale the inner rows (|x_hat| <= 1), not dS (could overflow)
                    x = (x.to(tl.float32) * i_rs[:, None]).to(I.dtype.element_ty)
                else:
                    p = p * i_rs[None, :]
            if SCALE_DS:
                p = p * ds_c
            acc_out = _dot(p.to(I.dtype.element_ty), x, acc_out, IEEE)

    first = (tl.zeros((BLOCK_O,), dtype=tl.int32) + pid_d) == 0  # the extras are written once
    if NEED_OUT:
        if TWO:  # (the scales are in dS already)
            g = acc_out * o_rs[:, None]
        else:
            g = acc_out * (o_rs * scale)[:, None]
        if SCALE_DS:
            g = g / ds_c
        tl.store(D_OUT + pid_s * NO * D + o_idx[:, None] * D + dcol[None, :], g.to(D_OUT.dtype.element_ty),
                 mask=o_ok[:, None] & (dcol[None, :] < D))
    if NEED_ORS:
        if TWO:
            tl.store(D_ORS + pid_s * NO + o_idx, scale * r_acc + scale0 * r_acc0, mask=o_ok & first)
        else:
            tl.store(D_ORS + pid_s * NO + o_idx, scale * r_acc, mask=o_ok & first)
    if NEED_SCALE:
        tl.store(D_SCALE + pid_s * NO + o_idx, o_rs * r_acc, mask=o_ok & first)
        if TWO:
            tl.store(D_SCALE0 + pid_s * NO + o_idx, o_rs * r_acc0, mask=o_ok & first)
    if NEED_BIAS:
        tl.store(D_BIAS + pid_s * NO + o_idx, b_acc, mask=o_ok & first)


# ------------------------------------------------------------------- tile configs
def _smem_ok(bo, bi, bd, stages, elsize, limit, extra=0):
    return (bo * bd + bi * bd) * elsize * max(stages, 1) + extra <= limit


def _fwd_prune(configs, named_args, **kwargs):
    args = dict(named_args, **kwargs)
    bd, elsize, limit = args["BLOCK_D"], args["O"].element_size(), smem_limit(args["O"])
    kept = [c for c in configs
            if _smem_ok(c.kwargs["BLOCK_O"], c.kwargs["BLOCK_I"], bd, c.num_stages, elsize, limit)]
    if kept:
        return kept
    # none fits (float32 with a 128-wide chunk on an A100): the smallest tile, as many stages as fit
    for tile, stages in ((64, 3), (64, 2), (64, 1), (32, 1)):
        if _smem_ok(tile, tile, bd, stages, elsize, limit) or tile == 32:
            return [triton.Config({"BLOCK_O": tile, "BLOCK_I": tile}, num_warps=4, num_stages=stages)]


def _bwd_prune(configs, named_args, **kwargs):
    args = dict(named_args, **kwargs)
    dpad, bd, elsize, need_out = args["D_PAD"], args["BLOCK_D"], args["O"].element_size(), args["NEED_OUT"]
    limit = smem_limit(args["O"])
    out, seen = [], set()
    for c in configs:
        bdo = min(c.kwargs["BLOCK_DO"], dpad) if need_out else 16
        kw = dict(c.kwargs, BLOCK_DO=bdo)
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key in seen:
            continue
        extra = c.kwargs["BLOCK_I"] * bdo * elsize * c.num_stages if need_out else 0
        if not _smem_ok(kw["BLOCK_O"], kw["BLOCK_I"], bd, c.num_stages, elsize, limit, extra):
            continue
        # The float32 gradient accumulator lives in registers: at most 128 per thread.
        if need_out and kw["BLOCK_O"] * bdo > 128 * 32 * c.num_warps:
            continue
        seen.add(key)
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    if out:
        return out
    # none fits: the smallest tiles, as many stages as fit
    bdo = min(64, dpad) if need_out else 16
    for tile, stages in ((64, 2), (64, 1), (32, 1)):
        extra = tile * bdo * elsize * stages if need_out else 0
        if _smem_ok(tile, tile, bd, stages, elsize, limit, extra) or tile == 32:
            return [triton.Config({"BLOCK_O": tile, "BLOCK_I": tile, "BLOCK_DO": bdo}, num_warps=4, num_stages=stages)]


_FWD_CONFIGS = [triton.Config({"BLOCK_O": bo, "BLOCK_I": bi}, num_warps=w, num_stages=s)
                for bo, bi, w, s in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3),
                                     (64, 64, 4, 4), (128, 256, 8, 3), (128, 64, 8, 4)]]
_BWD_CONFIGS = [triton.Config({"BLOCK_O": bo, "BLOCK_I": bi, "BLOCK_DO": do}, num_warps=w, num_stages=s)
                for bo, bi, do, w, s in [(64, 64, 128, 4, 2), (64, 64, 256, 8, 2), (128, 64, 128, 8, 2),
                                         (64, 128, 128, 4, 2), (128, 64, 256, 8, 2), (64, 64, 512, 8, 2),
                                         (128, 128, 128, 8, 2), (64, 32, 256, 4, 3)]]
_FWD_KEY = ["D_PAD", "TRANS", "HAS_IRS", "MASK_LAB", "COLS", "SPLIT", "TWO", "NAT"]
_BWD_KEY = ["D_PAD", "TRANS", "NEED_OUT", "HAS_OTERM", "HAS_ITERM", "HAS_IRS", "SPLIT", "TWO", "NAT"]

_lse_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_FWD_KEY,
                                 prune_configs_by={"early_config_prune": _fwd_prune})(_lse_fwd_kernel)
_lse_bwd_tuned = triton.autotune(_BWD_CONFIGS, key=_BWD_KEY,
                                 prune_configs_by={"early_config_prune": _bwd_prune})(_lse_bwd_kernel)

# Under the interpreter: one small config (tiles of 32 keep sizes like 33 and 129 multi-tile).
_INTERP_TILE = {"BLOCK_O": 32, "BLOCK_I": 32}


def _block_d(dpad: int) -> int:
    """Chunk of D per tl.dot in the score loop: the whole padded D up to 128 (outer tile
    hoisted out of the loop), else 64 on a GPU (128 under the interpreter: fewer steps)."""
    if dpad <= 128:
        return dpad
    return 128 if INTERPRET else 64


# ------------------------------------------------------------------- launchers
def _ieee(dtype):
    return is_ieee(dtype) or (INTERPRET and dtype == torch.bfloat16)


def _natural(dtype) -> bool:
    """The kernels' scores in natural units (float32 inputs), else in base 2 (the module docstring)."""
    return dtype == torch.float32


def _f32(t):
    return None if t is None else t.contiguous().to(torch.float32)


def _i64(t):
    return None if t is None else t.contiguous().to(torch.int64)


def _mask_flags(mask_mode):
    return bool(mask_mode & MASK_DIAG), bool(mask_mode & MASK_POS), bool(mask_mode & MASK_SAME_LABEL)


# Column splits: where the row blocks alone leave the GPU idle (N = 1024: 8 programs of 128 rows on
# 132 SMs) every program walks 1 / splits of the column tiles and writes its row states, merged in
# split order by _merge_states_kernel (forward), or its float32 partial outputs, summed in split
# order (backward) (_common.col_splits; bench/NOTES.md, "Triton column splits").
_MERGE_BLOCK = 128


def _col_splits(rows: int, ni: int, device, d_groups: int = 1, bytes_per_split: int = 0) -> int:
    """Column splits of a launch of `rows` outer rows against `ni` inner rows (1: none); the
    backward's programs are also `d_groups` feature groups (counted at the widest BLOCK_DO)."""
    return col_splits(triton.cdiv(rows, _max_block_o()) * d_groups, ni, _min_block_i(), device, bytes_per_split)


# The fused forward (compute_col): one pass over S for rows and columns.  Its column states, 16 bytes
# per (SLOT_ROWS rows, column), are bounded by _COLS_BUDGET: past it the rows run in launches of
# fewer rows, each followed by a fold into the columns' running state (slot 0), the last by the
# columns' outputs; the column splits keep such a launch filling the GPU.  Two passes (a row pass
# and a column pass) only where one launch of the largest BLOCK_O rows would not fit (M > 700k on a
# GPU) or with CONTRASTIVE_KERNELS_TRITON_FUSED_COLS=0; CONTRASTIVE_KERNELS_TRITON_COLS_CHUNK=n
# forces launches of n times the largest BLOCK_O rows (tests, measurements).
_COLS_BUDGET = 32 << 20


def _min_block_i() -> int:
    return _INTERP_TILE["BLOCK_I"] if INTERPRET else min(c.kwargs["BLOCK_I"] for c in _FWD_CONFIGS)


def _max_block_o() -> int:
    return _INTERP_TILE["BLOCK_O"] if INTERPRET else max(c.kwargs["BLOCK_O"] for c in _FWD_CONFIGS)


def _slot_rows() -> int:
    """The smallest BLOCK_O a launch can have (the autotune list's; the interpreter's tile)."""
    return _INTERP_TILE["BLOCK_O"] if INTERPRET else min(c.kwargs["BLOCK_O"] for c in _FWD_CONFIGS)


def _cols_launch_rows(no: int, ni: int) -> int:
    """Rows per launch of the fused forward: a multiple of every BLOCK_O, the states of a launch and
    the running state within the budget (at least the largest BLOCK_O rows), at most all rows; the
    launches as even as that allows (N = M = 16384 on a GPU: 3 launches of 5504, 5504, 5376 rows,
    not 8064, 8064, 256)."""
    top = _max_block_o()
    env = os.environ.get("CONTRASTIVE_KERNELS_TRITON_COLS_CHUNK", "")
    if env:
        return max(top, min(int(env) * top, triton.cdiv(no, top) * top))
    most = max(top, (_COLS_BUDGET // (16 * ni) - 1) * _slot_rows() // top * top)
    launches = triton.cdiv(no, most)
    return triton.cdiv(triton.cdiv(no, launches), top) * top


def _fused_cols(no: int, ni: int) -> bool:
    """One pass for rows and columns: not disabled by CONTRASTIVE_KERNELS_TRITON_FUSED_COLS=0, and
    one launch of the largest BLOCK_O rows within the budget."""
    if os.environ.get("CONTRASTIVE_KERNELS_TRITON_FUSED_COLS", "1") == "0" or no == 0 or ni == 0:
        return False
    return 16 * ni * (1 + _max_block_o() // _slot_rows()) <= _COLS_BUDGET


def _lse_pass(outer, inner, scale, o_rs, i_rs, bias, pos, o_lab, i_lab, diag_offset, mask_mode, trans,
              target=None, xt=None, col=None, scale0=None):
    """One direction's log-sum-exps; with `target` (the target column of every q row) the
    cross-entropies, and the row pass writes its target scores (in the kernel's unit) into `xt`; with
    LSE_LABELS the LSE minus the mean positive logit xp, `xt` (2, N) receiving xp (in the scores' unit)
    and 1/|P_i|.
    With `col` (an (M,) float32 tensor; rows = q, no LSE_LABELS) the same pass writes the column
    outputs there too (the fused forward).  With `scale0` (lse2_forward: no bias, target, labels
    or col) the same pass also forms the log-sum-exps at that scale: returns (out, out0)."""
    no, ni, d = outer.shape[0], inner.shape[0], outer.shape[1]
    out = torch.empty((no,), dtype=torch.float32, device=outer.device)
    two = scale0 is not None
    out0 = torch.empty_like(out) if two else out
    if no == 0:
        return (out, out0) if two else out
    dpad = pad_dim(d)
    bd = _block_d(dpad)
    md, mp, ml = _mask_flags(mask_mode)
    labels = bool(mask_mode & LSE_LABELS)
    nat = _natural(outer.dtype)
    dummy = out
    slot_rows = _slot_rows()
    launch_rows, nslot, cp = no, 0, dummy
    if col is not None:
        # [4][1 + slots][M]: slot 0 the columns' running state (max, sum, count, target score),
        # neutral at first; then the states of one launch's rows
        launch_rows = _cols_launch_rows(no, ni)
        nslot = 1 + launch_rows // slot_rows
        cp = torch.empty((4, nslot, ni), dtype=torch.float32, device=outer.device)
        cp[0, 0].fill_(float("-inf"))
        cp[1:, 0].zero_()
    splits = _col_splits(min(launch_rows, no), ni, outer.device)
    rp = (torch.empty((6 if labels else 4, splits, no), dtype=torch.float32, device=outer.device)
          if splits > 1 else dummy)
    rp0 = torch.empty((4, splits, no), dtype=torch.float32, device=outer.device) if two and splits > 1 else dummy
    for r0 in range(0, no, launch_rows):
        rows = min(launch_rows, no - r0)
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_O"]), splits)  # noqa: E731
        launch(_lse_fwd_kernel, _lse_fwd_tuned, grid, _INTERP_TILE,
               outer, inner, scale, o_rs if o_rs is not None else dummy, i_rs if i_rs is not None else dummy,
               bias if bias is not None else dummy, pos if pos is not None else dummy,
               o_lab if o_lab is not None else dummy, i_lab if i_lab is not None else dummy,
               target if target is not None else dummy, out, xt if xt is not None else dummy, cp, rp,
               scale0 if two else scale, out0, rp0, no, ni, d, outer.stride(0), inner.stride(0), int(diag_offset), nslot, r0,
               COLS=col is not None, SLOT_ROWS=slot_rows, SPLIT=splits > 1,
               TRANS=trans, HAS_ORS=o_rs is not None, HAS_IRS=i_rs is not None, HAS_BIAS=bias is not None,
               MASK_DIAG=md, MASK_POS=mp, MASK_LAB=ml, TARGET=target is not None, LABELS=labels, TWO=two,
               NAT=nat, IEEE=_ieee(outer.dtype), D_PAD=dpad, BLOCK_D=bd, SINGLE=bd == dpad)
        if col is not None:  # this launch's slots into the running state; the outputs after the last
            _merge_states_kernel[(triton.cdiv(ni, _MERGE_BLOCK),)](
                cp, col, dummy, ni, 1 + triton.cdiv(rows, slot_rows), nslot * ni, TARGET=target is not None,
                LABELS=False, WRITE_XT=False, FINISH=r0 + rows == no, NAT=nat, BLOCK=_MERGE_BLOCK)
    if splits > 1:
        _merge_states_kernel[(triton.cdiv(no, _MERGE_BLOCK),)](
            rp, out, xt if xt is not None else dummy, no, splits, splits * no, TARGET=target is not None,
            LABELS=labels, WRITE_XT=target is not None and not trans, FINISH=True, NAT=nat, BLOCK=_MERGE_BLOCK)
        if two:
            _merge_states_kernel[(triton.cdiv(no, _MERGE_BLOCK),)](
                rp0, out0, dummy, no, splits, splits * no, TARGET=False, LABELS=False, WRITE_XT=False, FINISH=True,
                NAT=nat, BLOCK=_MERGE_BLOCK)
    return (out, out0) if two else out


def _targets(q, k, pos, diag_offset, col):
    """LSE_TARGET (csrc/lse_target.h): the target column of every row, after checking that every
    target exists."""
    n, m = q.shape[0], k.shape[0]
    if pos is not None:
        if col:
            raise ValueError("mask_mode bit 8 (LSE_TARGET) with a column term (compute_col) needs pos_index None: "
                             "column j's target is row j")
        if n > 0 and pos.device.type == "cpu" and (int(pos.min()) < 0 or int(pos.max()) >= m):  # no GPU sync
            raise ValueError(f"pos_index values (LSE_TARGET targets) must lie in [0, M) = [0, {m}), got min "
                             f"{int(pos.min())} max {int(pos.max())}")
        t = pos
    else:
        if col and (n != m or diag_offset != 0):
            raise ValueError("mask_mode bit 8 (LSE_TARGET) with a column term (compute_col) needs N == M and "
                             f"diag_offset 0 (targets on the diagonal), got N = {n}, M = {m}, "
                             f"diag_offset {diag_offset}")
        if n > 0 and not (diag_offset >= 0 and n - 1 + diag_offset < m):
            raise ValueError("mask_mode bit 8 (LSE_TARGET) without pos_index: row i's target column i + diag_offset "
                             f"must exist for every row, got N = {n}, M = {m}, diag_offset {diag_offset}")
        t = torch.arange(n, device=q.device) + int(diag_offset)
    return t.contiguous()


def _labels_check(mask_mode, has_labels, col):
    """LSE_LABELS (csrc/lse_target.h's lse_labels_check): both labels, not with bits 4 or 8, rows only."""
    if not mask_mode & LSE_LABELS:
        return
    if not has_labels:
        raise ValueError("mask_mode bit 16 (LSE_LABELS) needs q_labels and k_labels")
    if mask_mode & (MASK_SAME_LABEL | LSE_TARGET):
        raise ValueError("mask_mode bit 16 (LSE_LABELS) cannot be combined with bit 4 (MASK_SAME_LABEL) or bit 8 "
                         f"(LSE_TARGET), got mask_mode {mask_mode}")
    if col:
        raise ValueError("mask_mode bit 16 (LSE_LABELS) has no column term (compute_col must be False)")


def lse_forward(q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, diag_offset, mask_mode,
                compute_col):
    q, k = q.contiguous(), k.contiguous()
    scale = scale.reshape(()).to(torch.float32).contiguous()
    qr, kr, bias = _f32(q_rscale), _f32(k_rscale), _f32(col_bias)
    pos, ql, kl = _i64(pos_index), _i64(q_labels), _i64(k_labels)
    target = _targets(q, k, pos, diag_offset, compute_col) if mask_mode & LSE_TARGET else None
    _labels_check(mask_mode, ql is not None and kl is not None, compute_col)
    # target_state (csrc/op_schemas.h): LSE_TARGET, the row pass's target scores in the kernels'
    # unit (S_{i, t_i} for float32 inputs, log2(e) S_{i, t_i} for 16-bit ones: _natural), exactly as
    # the backward recomputes them;
    # LSE_LABELS, (2, N) the rows' mean positive scores (in the unit) and 1/|P_i|
    if mask_mode & LSE_LABELS:
        xt = torch.empty((2, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        xt = torch.empty((q.shape[0] if target is not None else 0,), dtype=torch.float32, device=q.device)
    if compute_col and _fused_cols(q.shape[0], k.shape[0]):
        # one pass over S for rows and columns (_lse_pass with col)
        col = torch.empty((k.shape[0],), dtype=torch.float32, device=q.device)
        row = _lse_pass(q, k, scale, qr, kr, bias, pos, ql, kl, diag_offset, mask_mode, trans=False, target=target,
                        xt=xt, col=col)
        return row, col, xt
    row = _lse_pass(q, k, scale, qr, kr, bias, pos, ql, kl, diag_offset, mask_mode, trans=False, target=target,
                    xt=xt)
    if compute_col:  # (square: column j's target is row j)
        col = _lse_pass(k, q, scale, kr, qr, bias, pos, kl, ql, diag_offset, mask_mode, trans=True, target=target)
    else:
        col = torch.empty((0,), dtype=torch.float32, device=q.device)
    return row, col, xt


def _bwd_pass(outer, inner, scale, o_rs, i_rs, bias, pos, o_lab, i_lab, o_lse, o_g, i_lse, i_g, diag_offset,
              mask_mode, trans, need_out, need_ors, need_scale, need_bias, out_f32=False, target=None, xt=None,
              two=None):
    """One direction's gradients: (d_out, d_ors, d_scale, d_bias) per outer row (None where not
    needed).  two = (scale0, o_lse0, o_g0, i_lse0, i_g0) (lse2_backward; the LSEs and upstream
    gradients of the second scale's row terms, None for an absent side): the product takes
    scale g p + scale0 g0 p0 and a fifth output d_scale0 is returned (with need_scale)."""
    no, ni, d = outer.shape[0], inner.shape[0], outer.shape[1]
    dev = outer.device
    f32 = lambda n: torch.empty((n,), dtype=torch.float32, device=dev)  # noqa: E731
    d_out = (torch.empty_like(outer, dtype=torch.float32) if out_f32 else torch.empty_like(outer)) \
        if need_out else None
    d_ors = f32(no) if need_ors else None
    d_scale = f32(no) if need_scale else None
    d_bias = f32(no) if need_bias else None
    d_scale0 = f32(no) if need_scale and two is not None else None
    if no == 0:
        return (d_out, d_ors, d_scale, d_bias) + ((d_scale0,) if two is not None else ())
    # column splits: the programs write float32 partial outputs, summed here in split order
    splits = _col_splits(no, ni, dev, d_groups=triton.cdiv(d, 512) if need_out else 1,
                         bytes_per_split=4 * no * ((d if need_out else 0) + (3 if two is None else 4)))
    final = (d_out, d_ors, d_scale, d_bias, d_scale0)
    d_out, d_ors, d_scale, d_bias, d_scale0 = (
        split_parts(splits, d_out, no, d), split_parts(splits, d_ors, no), split_parts(splits, d_scale, no),
        split_parts(splits, d_bias, no), split_parts(splits, d_scale0, no))
    dpad = pad_dim(d)
    bd = _block_d(dpad)
    md, mp, ml = _mask_flags(mask_mode)
    dummy = f32(1)
    opt = lambda t: t if t is not None else dummy  # noqa: E731
    if two is None:
        ds_c = half_ds_scale(outer.dtype, dev, o_g, i_g)
        scale0, o_lse0, o_g0, i_lse0, i_g0 = scale, None, None, None, None
    else:  # dS in units of the raw product: each side's upstream gradients times their scale
        scale0, o_lse0, o_g0, i_lse0, i_g0 = two
        ds_c = half_ds_scale(outer.dtype, dev, *(g * sc for g, sc in ((o_g, scale), (o_g0, scale0), (i_g, scale),
                                                                      (i_g0, scale0)) if g is not None))
    if need_out:
        grid = lambda meta: (triton.cdiv(no, meta["BLOCK_O"]), triton.cdiv(d, meta["BLOCK_DO"]), splits)  # noqa: E731
    else:
        grid = lambda meta: (triton.cdiv(no, meta["BLOCK_O"]), 1, splits)  # noqa: E731
    interp = dict(_INTERP_TILE, BLOCK_DO=min(dpad, 128) if need_out else 16)
    launch(_lse_bwd_kernel, _lse_bwd_tuned, grid, interp,
           outer, inner, scale, opt(o_rs), opt(i_rs), opt(bias), opt(pos), opt(o_lab), opt(i_lab), opt(target), opt(xt),
           opt(o_lse), opt(o_g), opt(i_lse), opt(i_g), d_out if d_out is not None else outer,
           opt(d_ors), opt(d_scale), opt(d_bias),
           scale0, opt(o_lse0), opt(o_g0), opt(i_lse0), opt(i_g0), opt(d_scale0),
           no, ni, d, outer.stride(0), inner.stride(0), int(diag_offset),
           TRANS=trans, HAS_ORS=o_rs is not None, HAS_IRS=i_rs is not None, HAS_BIAS=bias is not None,
           MASK_DIAG=md, MASK_POS=mp, MASK_LAB=ml, HAS_OTERM=o_lse is not None, HAS_ITERM=i_lse is not None,
           TARGET=target is not None, LABELS=bool(mask_mode & LSE_LABELS), TWO=two is not None,
           NAT=_natural(outer.dtype), NEED_OUT=need_out, NEED_ORS=need_ors, NEED_SCALE=need_scale, NEED_BIAS=need_bias,
           RS_ON_TILE=outer.dtype == torch.float16, DS_C=ds_c, SCALE_DS=outer.dtype == torch.float16,
           IEEE=_ieee(outer.dtype), D_PAD=dpad, BLOCK_D=bd, SINGLE=bd == dpad, SPLIT=splits > 1)
    sum_splits(zip(final, (d_out, d_ors, d_scale, d_bias, d_scale0)))
    return final if two is not None else final[:4]


def lse_backward(grad_row, grad_col, q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels,
                 diag_offset, mask_mode, row_lse, col_lse, target_state, need_q, need_k, need_scale, need_bias,
                 need_q_rscale, need_k_rscale):
    q, k = q.contiguous(), k.contiguous()
    dev = q.device
    scale = scale.reshape(()).to(torch.float32).contiguous()
    qr, kr, bias = _f32(q_rscale), _f32(k_rscale), _f32(col_bias)
    pos, ql, kl = _i64(pos_index), _i64(q_labels), _i64(k_labels)
    need_q_rscale = bool(need_q_rscale) and qr is not None
    need_k_rscale = bool(need_k_rscale) and kr is not None
    need_bias = bool(need_bias) and bias is not None
    # The row term exists always; the column term only when the forward computed col_lse.
    has_col = col_lse is not None and col_lse.numel() > 0 and grad_col is not None and grad_col.numel() > 0
    r_lse, r_g = row_lse.contiguous().float(), grad_row.contiguous().float()
    c_lse, c_g = (col_lse.contiguous().float(), grad_col.contiguous().float()) if has_col else (None, None)
    tgt = xt = None
    if mask_mode & LSE_TARGET:  # the outputs are cross-entropies; xt: the forward's base-2 target scores
        tgt = _targets(q, k, pos, diag_offset, col_lse is not None and col_lse.numel() > 0)
        xt = target_state.contiguous().float()
        if xt.shape != (q.shape[0],):
            raise ValueError(f"target_state must have shape (N,) = ({q.shape[0]},) with mask_mode bit 8 "
                             f"(LSE_TARGET), got {tuple(xt.shape)}")
    if mask_mode & LSE_LABELS:  # the outputs are LSE - xp; target_state: (xp in the unit, 1/|P_i|)
        _labels_check(mask_mode, ql is not None and kl is not None, has_col)
        xt = target_state.contiguous().float()
        if xt.shape != (2, q.shape[0]):
            raise ValueError(f"target_state must have shape (2, N) = (2, {q.shape[0]}) with mask_mode bit 16 "
                             f"(LSE_LABELS), got {tuple(xt.shape)}")

    norm = bool(mask_mode & LSE_NORM)  # dq / dk in float32 (the caller folds the normalization in)
    run_row = need_q or need_q_rscale
    run_col = need_k or need_k_rscale or need_bias
    if need_scale and not run_row and not run_col:
        run_row = True
    scale_in_row = need_scale and run_row

    # q and k the same tensor (nt_xent, SupCon, HCL, DCL's same-view terms): autograd adds dq and
    # dk, which nearly cancel on the diagonal blocks; adding two rounded half-precision halves
    # loses the result, so both are kept in float32, summed here and returned once in dq (dk
    # zero), the contract csrc/op_schemas.h allows for this case.
    same = (need_q and need_k and q.data_ptr() == k.data_ptr() and q.shape == k.shape
            and q.dtype in (torch.float16, torch.bfloat16)
            and ((q_rscale is None and k_rscale is None) or (q_rscale is not None and k_rscale is not None
                                                            and q_rscale.data_ptr() == k_rscale.data_ptr())))
    dq = dk = dscale_rows = db = dqr = dkr = None
    if run_row:
        dq, dqr, dscale_rows, _ = _bwd_pass(q, k, scale, qr, kr, bias, pos, ql, kl, r_lse, r_g, c_lse, c_g,
                                            diag_offset, mask_mode, False, need_q, need_q_rscale, scale_in_row,
                                            False, out_f32=same or norm, target=tgt, xt=xt)
    if run_col:
        dk, dkr, ds_cols, db = _bwd_pass(k, q, scale, kr, qr, bias, pos, kl, ql, c_lse, c_g, r_lse, r_g,
                                         diag_offset, mask_mode, True, need_k, need_k_rscale,
                                         need_scale and not scale_in_row, need_bias, out_f32=same or norm, target=tgt, xt=xt)
        if need_scale and not scale_in_row:
            dscale_rows = ds_cols
    if same:
        dq, dk = (dq + dk) if norm else (dq + dk).to(q.dtype), torch.zeros_like(k, dtype=dq.dtype)

    def empty32():  # a fresh tensor per output: custom-op outputs may not alias each other
        return torch.empty((0,), dtype=torch.float32, device=dev)

    return (dq if need_q else q.new_empty((0,)),
            dk if need_k else k.new_empty((0,)),
            dscale_rows.double().sum().float() if need_scale else empty32(),
            db if need_bias else empty32(),
            dqr if need_q_rscale else empty32(),
            dkr if need_k_rscale else empty32())


# ------------------------------------------------- two scales of one score matrix (HCL)
def _two_scales_check(mask_mode):
    if mask_mode & (MASK_SAME_LABEL | LSE_TARGET | LSE_LABELS):
        raise ValueError("lse2: plain row log-sum-exps only (mask_mode bits 1, 2 and 32), got mask_mode "
                         f"{mask_mode}")


def lse2_forward(q, k, scale1, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode):
    """The row log-sum-exps of S at two scales, S1 = scale1 P and S0 = scale0 P of the same masked
    product P_ij = (q_rscale_i q_i).(k_rscale_j k_j): one pass over the tiles, one product per
    tile, two online log-sum-exps (HCL's reweighting l(S1) - l(S0); the lse ops twice would form
    every product twice).  Returns (row_lse1, row_lse0), (N,) float32 each."""
    _two_scales_check(mask_mode)
    q, k = q.contiguous(), k.contiguous()
    s1 = scale1.reshape(()).to(torch.float32).contiguous()
    s0 = scale0.reshape(()).to(torch.float32).contiguous()
    return _lse_pass(q, k, s1, _f32(q_rscale), _f32(k_rscale), None, _i64(pos_index), None, None, diag_offset,
                     mask_mode, trans=False, scale0=s0)


def lse2_backward(grad1, grad0, q, k, scale1, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode, row1,
                  row0, need_q, need_k, need_scale1, need_scale0, need_q_rscale, need_k_rscale):
    """Gradients of sum_i grad1_i row_lse1_i + grad0_i row_lse0_i (lse2_forward's outputs) with
    dS_ij = scale1 grad1_i p1_ij + scale0 grad0_i p0_ij (per unit of P_ij) formed in float32 before
    the one rounding of the product (HCL's two terms nearly cancel): one backward pass per side
    instead of two.  Returns (dq, dk, dscale1, dscale0, dq_rscale, dk_rscale): dq / dk float32
    (whatever the input dtype; the caller folds the normalization in), the rest float32, each
    empty where its need_* flag is false."""
    _two_scales_check(mask_mode)
    q, k = q.contiguous(), k.contiguous()
    dev = q.device
    s1 = scale1.reshape(()).to(torch.float32).contiguous()
    s0 = scale0.reshape(()).to(torch.float32).contiguous()
    qr, kr, pos = _f32(q_rscale), _f32(k_rscale), _i64(pos_index)
    need_q_rscale = bool(need_q_rscale) and qr is not None
    need_k_rscale = bool(need_k_rscale) and kr is not None
    need_scale = bool(need_scale1 or need_scale0)
    r1, g1 = row1.contiguous().float(), grad1.contiguous().float()
    r0, g0 = row0.contiguous().float(), grad0.contiguous().float()
    run_row = need_q or need_q_rscale or need_scale
    run_col = need_k or need_k_rscale
    dq = dk = dqr = dkr = ds1 = ds0 = None
    if run_row:
        dq, dqr, ds1, _, ds0 = _bwd_pass(q, k, s1, qr, kr, None, pos, None, None, r1, g1, None, None, diag_offset,
                                         mask_mode, False, need_q, need_q_rscale, need_scale, False, out_f32=True,
                                         two=(s0, r0, g0, None, None))
    if run_col:
        dk, dkr, _, _, _ = _bwd_pass(k, q, s1, kr, qr, None, pos, None, None, None, None, r1, g1, diag_offset,
                                     mask_mode, True, need_k, need_k_rscale, False, False, out_f32=True,
                                     two=(s0, None, None, r0, g0))

    def empty32():  # a fresh tensor per output: custom-op outputs may not alias each other
        return torch.empty((0,), dtype=torch.float32, device=dev)

    return (dq if need_q else empty32(), dk if need_k else empty32(),
            ds1.double().sum().float() if need_scale1 else empty32(),
            ds0.double().sum().float() if need_scale0 else empty32(),
            dqr if need_q_rscale else empty32(), dkr if need_k_rscale else empty32())
