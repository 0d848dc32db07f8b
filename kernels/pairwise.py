"""Triton kernels of the pairwise sigmoid family (SigLIP and per-pair softplus sums).

x_ij = scale <q_i, k_j> + bias + row_offset_i.  Pair (i, j) is positive when
q_labels[i] == k_labels[j] (labels given) or j == i + diag_offset (no labels); mode
bits: 1 every pair negative, 2 only positive pairs count, 4 drop j == i + diag_offset.
Each pair gets a sign sg = -1 (positive), +1 (negative), 0 (dropped); its term is
softplus(sg x) and d term / d x = sg sigmoid(sg x).  The contract is that of the native
ops in csrc/op_schemas.h; `reference.pairwise_family` is the specification.

Kernels (no N x M buffer, no atomics, int64 offsets; each with column splits, a last grid axis
over the inner loop's tiles, where its programs alone would leave SMs idle: float32 partial
outputs per split, summed in split order):
  * forward: one program per row block, looping over column blocks; per-row sums.
  * backward, row kernel: one program per (row block, feature chunk): recomputes each
    tile, dS = g sg sigmoid(sg x), accumulates dq = scale dS k for its feature chunk,
    drow_offset_i = sum_j dS_ij and the block's partial dscale = sum dS <q,k>, dbias =
    sum dS (written per program, summed in torch in a fixed order).
  * backward, column kernel: one program per (column block, feature chunk):
    dk = scale dS^T q.
  * fused forward and gradient of the total (`pairwise_fused`, upstream 1 on every row):
    the row kernel also sums the terms, then the column kernel; 2 passes over the tiles
    instead of the forward's 1 and the backward's 2.
Float32 inputs are multiplied with input_precision="ieee" (no TF32: the float32
tolerance is 1e-5).  Half inputs use their own dtype in tl.dot with float32 accumulation.
On GPUs the tile sizes are autotuned; under TRITON_INTERPRET=1 one small config runs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import col_splits, half_ds_scale, split_parts, split_range, sum_splits

AVAILABLE = True

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Feature chunk: the whole (padded) D up to this size, so the backward accumulators
# cover D in one program; larger D is split over a second grid axis (each chunk
# recomputes the tile products).
_MAX_BLOCK_D = 64 if _INTERPRET else 256
_INTERP_META = {"BLOCK_M": 32, "BLOCK_N": 32}
_MIN_BLOCK = 32  # smallest BLOCK_M / BLOCK_N of any config (and the interpreter's): sizes the
                 # per-program partial sums, split counts' tiles
_MAX_BLOCK = 32 if _INTERPRET else 128  # largest: split counts count programs at it


def _block_d(d: int) -> int:
    return min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(max(int(d), 1))))


# --------------------------------------------------------------------------- tiles
@triton.jit
def _tile(q_ptr, k_ptr, ql_ptr, kl_ptr, off_ptr, rows, cols, N, M, D, scale, bias, diag_offset,
          HAS_LABELS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """(dot, y, keep, sg) of a BLOCK_M x BLOCK_N tile: dot = <q_i, k_j>, y = sg x."""
    row_ok = rows < N
    col_ok = cols < M
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        qt = tl.load(q_ptr + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(k_ptr + cols[:, None] * D + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        dot += tl.dot(qt, tl.trans(kt), input_precision=PREC)
    c = tl.zeros((BLOCK_M,), dtype=tl.float32) + bias
    if HAS_OFFSET:
        c += tl.load(off_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    x = scale * dot + c[:, None]

    diag = cols[None, :] == rows[:, None] + diag_offset
    if HAS_LABELS:
        ql = tl.load(ql_ptr + rows, mask=row_ok, other=0)
        kl = tl.load(kl_ptr + cols, mask=col_ok, other=0)
        pos = ql[:, None] == kl[None, :]
    else:
        pos = diag
    if MODE & 1:
        pos = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int1)
    keep = row_ok[:, None] & col_ok[None, :]
    if MODE & 2:
        keep = keep & pos
    if MODE & 4:
        keep = keep & (diag == 0)
    sg = tl.where(keep, tl.where(pos, -1.0, 1.0), 0.0)
    return dot, sg * x, keep, sg


@triton.jit
def _softplus(y):
    # max(y, 0) + log1p(exp(-|y|)); log1p(e) = log(u) e / (u - 1), u = 1 + e, undoes the rounding of u.
    # y = -inf (an infinite input) gives NaN, not the limit 0: a non-finite input never gives a
    # finite loss (NaN fails the comparison too).
    e = tl.exp(-tl.abs(y))
    u = 1.0 + e
    d = u - 1.0
    l1p = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.where(y > float("-inf"), tl.maximum(y, 0.0) + l1p, float("nan"))


@triton.jit
def _sigmoid(y):
    e = tl.exp(-tl.abs(y))
    inv = 1.0 / (1.0 + e)
    return tl.where(y >= 0.0, inv, e * inv)


# ------------------------------------------------------------------------- kernels
@triton.jit
def _pairwise_fwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, off_ptr, ql_ptr, kl_ptr, out_ptr, N, M, D, diag_offset,
                         HAS_LABELS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr,
                         PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_lo, c_hi = split_range(1, M, BLOCK_N)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dot, y, keep, sg = _tile(q_ptr, k_ptr, ql_ptr, kl_ptr, off_ptr, rows, cols, N, M, D, scale, bias,
                                 diag_offset, HAS_LABELS, HAS_OFFSET, MODE, BLOCK_M, BLOCK_N, BLOCK_D, PREC)
        acc += tl.sum(tl.where(keep, _softplus(y), 0.0), axis=1)
    tl.store(out_ptr + tl.program_id(1).to(tl.int64) * N + rows, acc, mask=rows < N)


@triton.jit
def _pairwise_bwd_rows_kernel(g_ptr, q_ptr, k_ptr, scale_ptr, bias_ptr, off_ptr, ql_ptr, kl_ptr, dq_ptr, drow_ptr,
                              part_ds_ptr, part_dsd_ptr, loss_ptr, ds_c_ptr, N, M, D, diag_offset,
                              HAS_LABELS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr,
                              PREC: tl.constexpr, NEED_Q: tl.constexpr, NEED_OFFSET: tl.constexpr,
                              NEED_LOSS: tl.constexpr, SCALE_DS: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dd = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if SCALE_DS:  # float16: dS times a power of two before rounding (_common.half_ds_scale)
        ds_c = tl.load(ds_c_ptr)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # The scalar gradients add O(N M) terms that can cancel: per-tile sums are float32
    # trees, their running sums float64.
    s_ds = tl.zeros((BLOCK_M,), dtype=tl.float64)
    s_dsd = tl.zeros((BLOCK_M,), dtype=tl.float64)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_lo, c_hi = split_range(2, M, BLOCK_N)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dot, y, keep, sg = _tile(q_ptr, k_ptr, ql_ptr, kl_ptr, off_ptr, rows, cols, N, M, D, scale, bias,
                                 diag_offset, HAS_LABELS, HAS_OFFSET, MODE, BLOCK_M, BLOCK_N, BLOCK_D, PREC)
        ds = tl.where(keep, g[:, None] * sg * _sigmoid(y), 0.0)
        if NEED_LOSS:
            loss += tl.sum(tl.where(keep, _softplus(y), 0.0), axis=1)
        s_ds += tl.sum(ds, axis=1).to(tl.float64)
        s_dsd += tl.sum(ds * dot, axis=1).to(tl.float64)
        if NEED_Q:
            kt = tl.load(k_ptr + cols[:, None] * D + dd[None, :], mask=(cols < M)[:, None] & d_ok[None, :],
                         other=0.0)
            dsd = ds
            if SCALE_DS:
                dsd = ds * ds_c
            dq += tl.dot(dsd.to(kt.dtype), kt, input_precision=PREC)
    split = tl.program_id(2).to(tl.int64)  # (split s's partial outputs at offset s)
    if NEED_Q:
        if SCALE_DS:
            dq = dq / ds_c
        tl.store(dq_ptr + split * N * D + rows[:, None] * D + dd[None, :], (scale * dq).to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        if NEED_OFFSET:
            tl.store(drow_ptr + split * N + rows, s_ds.to(tl.float32), mask=row_ok)
        if NEED_LOSS:
            tl.store(loss_ptr + split * N + rows, loss, mask=row_ok)
        part = split * tl.num_programs(0) + pid
        tl.store(part_ds_ptr + part, tl.sum(s_ds, axis=0))
        tl.store(part_dsd_ptr + part, tl.sum(s_dsd, axis=0))


@triton.jit
def _pairwise_bwd_cols_kernel(g_ptr, q_ptr, k_ptr, scale_ptr, bias_ptr, off_ptr, ql_ptr, kl_ptr, dk_ptr, ds_c_ptr, N, M,
                              D, diag_offset, HAS_LABELS: tl.constexpr, HAS_OFFSET: tl.constexpr, MODE: tl.constexpr,
                              PREC: tl.constexpr, SCALE_DS: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    if SCALE_DS:
        ds_c = tl.load(ds_c_ptr)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    r_lo, r_hi = split_range(2, N, BLOCK_M)  # (this kernel's splits are of the rows)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < N
        dot, y, keep, sg = _tile(q_ptr, k_ptr, ql_ptr, kl_ptr, off_ptr, rows, cols, N, M, D, scale, bias,
                                 diag_offset, HAS_LABELS, HAS_OFFSET, MODE, BLOCK_M, BLOCK_N, BLOCK_D, PREC)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        ds = tl.where(keep, g[:, None] * sg * _sigmoid(y), 0.0)
        qt = tl.load(q_ptr + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if SCALE_DS:
            ds = ds * ds_c
        dk += tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=PREC)
    if SCALE_DS:
        dk = dk / ds_c
    tl.store(dk_ptr + tl.program_id(2).to(tl.int64) * M * D + cols[:, None] * D + dd[None, :],
             (scale * dk).to(dk_ptr.dtype.element_ty), mask=(cols < M)[:, None] & d_ok[None, :])


# ------------------------------------------------------------------- autotuning
def _configs():
    out = []
    for bm in (32, 64, 128):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    # Keep the accumulators (BLOCK x BLOCK_D float32) and tiles in registers: fewer / smaller
    # configs for a wide feature chunk.
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * block_d <= 128 * 128 and c.kwargs["BLOCK_N"] * block_d <= 128 * 128]
    return keep or configs[:1]


_KEY = ["N", "M", "D", "HAS_LABELS", "MODE"]
_prune_cfg = {"early_config_prune": _prune}
_fwd_tuned = triton.autotune(_configs(), key=_KEY, prune_configs_by=_prune_cfg)(_pairwise_fwd_kernel)
_bwd_rows_tuned = triton.autotune(_configs(), key=_KEY, prune_configs_by=_prune_cfg)(_pairwise_bwd_rows_kernel)
_bwd_cols_tuned = triton.autotune(_configs(), key=_KEY, prune_configs_by=_prune_cfg)(_pairwise_bwd_cols_kernel)


def _launch(jit_fn, tuned_fn, grid, *args, **meta):
    if _INTERPRET:
        full = dict(meta, **_INTERP_META)
        return jit_fn[grid(full)](*args, num_warps=4, num_stages=1, **full)
    return tuned_fn[grid](*args, **meta)


# ------------------------------------------------------------------------ launchers
def _prepare(q, k, scale, bias, row_offset, q_labels, k_labels):
    q = q.contiguous()
    k = k.contiguous()
    scale = scale.reshape(1).to(device=q.device, dtype=torch.float32)
    bias = bias.reshape(1).to(device=q.device, dtype=torch.float32)
    off = row_offset.to(torch.float32).contiguous() if row_offset is not None else scale  # dummy pointer
    has_labels = q_labels is not None
    ql = q_labels.contiguous() if has_labels else scale
    kl = k_labels.contiguous() if has_labels else scale
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return q, k, scale, bias, off, ql, kl, has_labels, prec


def _check(q, k, mode):
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"pairwise (triton): q and k must be (N, D) and (M, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"pairwise (triton): q and k must share a float32/float16/bfloat16 dtype, got {q.dtype} and {k.dtype}")
    if not 0 <= int(mode) <= 7:
        raise ValueError(f"pairwise (triton): mode must be in [0, 7], got {mode}")


def pairwise_forward(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode):
    """Per-row sums (N,) float32 of softplus(-x) (positive pairs) / softplus(x) (negative pairs)."""
    _check(q, k, mode)
    n, d = q.shape
    m = k.shape[0]
    out = torch.zeros(n, dtype=torch.float32, device=q.device)
    if n == 0 or m == 0:
        return out
    q, k, scale, bias, off, ql, kl, has_labels, prec = _prepare(q, k, scale, bias, row_offset, q_labels, k_labels)
    splits = col_splits(triton.cdiv(n, _MAX_BLOCK), m, _MIN_BLOCK, q.device)
    parts = split_parts(splits, out, n)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
    _launch(_pairwise_fwd_kernel, _fwd_tuned, grid, q, k, scale, bias, off, ql, kl, parts, n, m, d, int(diag_offset),
            HAS_LABELS=has_labels, HAS_OFFSET=row_offset is not None, MODE=int(mode), PREC=prec,
            BLOCK_D=_block_d(d))
    sum_splits(((out, parts),))
    return out


def _grad_passes(g, q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode, need_q, need_k,
                 need_rows, need_offset, grad_dtype, loss):
    """Run the row kernel (dq, row offsets, scalars, and the per-row loss into `loss` when
    given) and the column kernel (dk); returns (dq, dk, dscale, dbias, drow)."""
    n, d = q.shape
    m = k.shape[0]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    gdt = grad_dtype or q.dtype
    dq = torch.zeros((n, d) if need_q else (0,), dtype=gdt, device=dev)
    dk = torch.zeros((m, d) if need_k else (0,), dtype=gdt, device=dev)
    drow = torch.zeros(n, **f32) if need_offset else torch.empty(0, **f32)
    dscale = torch.zeros((), **f32)
    dbias = torch.zeros((), **f32)
    if n == 0 or m == 0 or not (need_rows or need_k):
        return dq, dk, dscale, dbias, drow
    q, k, scale, bias, off, ql, kl, has_labels, prec = _prepare(q, k, scale, bias, row_offset, q_labels, k_labels)
    block_d = _block_d(d)
    d_chunks = triton.cdiv(d, block_d)
    ds_c = half_ds_scale(q.dtype, dev, g)
    common = dict(HAS_LABELS=has_labels, HAS_OFFSET=row_offset is not None, MODE=int(mode), PREC=prec,
                  SCALE_DS=q.dtype == torch.float16, BLOCK_D=block_d)
    # Column splits (row kernel: of the columns; column kernel: of the rows) where the programs
    # alone leave SMs idle: each split writes float32 partial outputs at its offset, summed here in
    # split order.
    if need_rows:
        rs = col_splits(triton.cdiv(n, _MAX_BLOCK) * (d_chunks if need_q else 1), m, _MIN_BLOCK, dev,
                        bytes_per_split=4 * n * ((d if need_q else 0) + 2))
        dq_p = split_parts(rs, dq if need_q else None, n, d)
        drow_p, loss_p = split_parts(rs, drow if need_offset else None, n), split_parts(rs, loss, n)
        # One partial per row program and split; sized for the smallest BLOCK_M, unused entries stay 0.
        parts = triton.cdiv(n, _MIN_BLOCK) * rs
        part_ds = torch.zeros(parts, dtype=torch.float64, device=dev)
        part_dsd = torch.zeros(parts, dtype=torch.float64, device=dev)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), d_chunks if need_q else 1, rs)  # noqa: E731
        _launch(_pairwise_bwd_rows_kernel, _bwd_rows_tuned, grid, g, q, k, scale, bias, off, ql, kl,
                dq_p if need_q else g, drow_p if need_offset else g, part_ds, part_dsd,
                loss_p if loss is not None else g,
                ds_c, n, m, d, int(diag_offset), NEED_Q=bool(need_q), NEED_OFFSET=bool(need_offset),
                NEED_LOSS=loss is not None, **common)
        sum_splits(((dq, dq_p), (drow, drow_p), (loss, loss_p)))
        dbias = part_ds.sum().float()
        dscale = part_dsd.sum().float()
    if need_k:
        cs = col_splits(triton.cdiv(m, _MAX_BLOCK) * d_chunks, n, _MIN_BLOCK, dev, bytes_per_split=4 * m * d)
        dk_p = split_parts(cs, dk, m, d)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), d_chunks, cs)  # noqa: E731
        _launch(_pairwise_bwd_cols_kernel, _bwd_cols_tuned, grid, g, q, k, scale, bias, off, ql, kl, dk_p, ds_c, n,
                m, d, int(diag_offset), **common)
        sum_splits(((dk, dk_p),))
    return dq, dk, dscale, dbias, drow


def _empty_unless(flag, t):
    return t if flag else torch.empty(0, dtype=torch.float32, device=t.device)


def pairwise_backward(grad_row, q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode, need_q, need_k,
                      need_scale, need_bias, need_offset):
    """(dq, dk, dscale (), dbias (), drow_offset (N,)); each empty when its need_* flag is false."""
    _check(q, k, mode)
    g = grad_row.to(device=q.device, dtype=torch.float32).contiguous()
    need_rows = need_q or need_scale or need_bias or need_offset
    dq, dk, dscale, dbias, drow = _grad_passes(g, q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset,
                                               mode, need_q, need_k, need_rows, need_offset, None, None)
    return dq, dk, _empty_unless(need_scale, dscale), _empty_unless(need_bias, dbias), drow


def pairwise_fused(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode, need_q, need_k, need_scale,
                   need_bias, need_offset):
    """(total (), dq, dk (float32), dscale (), dbias (), drow_offset (N,)) of the total of the per-row
    sums for an upstream gradient of 1; each gradient empty when its need_* flag is false."""
    _check(q, k, mode)
    n = q.shape[0]
    loss = torch.zeros(n, dtype=torch.float32, device=q.device)
    g = torch.ones(n, dtype=torch.float32, device=q.device)
    dq, dk, dscale, dbias, drow = _grad_passes(g, q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset,
                                               mode, need_q, need_k, True, need_offset, torch.float32, loss)
    total = loss.double().sum().float()
    return (total, dq, dk, _empty_unless(need_scale, dscale), _empty_unless(need_bias, dbias), drow)
