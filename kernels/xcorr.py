"""Triton kernels of the cross-correlation family (Barlow Twins, VICReg).

Same contract as the native ops (csrc/op_schemas.h): a, b (N, D); C = a^T b;
``xcorr_forward(a, b, path) -> (offdiag, diag)`` with offdiag = sum_{d != e} C_de^2
(0-dim float32) and diag = C_dd (D,) float32; ``xcorr_backward(grad_offdiag, grad_diag,
a, b, path, need_a, need_b) -> (da, db)`` with, for G_de = 2 g C_de (d != e) and
G_dd = grad_diag_d, da = b G^T and db = a G (input dtypes, empty when not needed).

Paths (csrc/cpu/xcorr.cpp explains the math):
  * Gram (path 1, auto when N is well below D): N x N Gram matrices of a and b with
    float64 products and accumulation (tl.dot on float64), offdiag = <Ga, Gb> - sum C_dd^2
    summed in float64 by torch; gradient da = 2 g Gb a + b (grad_diag - 2 g C_dd) in one
    kernel with a fused epilogue.  float64 because the subtraction cancels when the
    off-diagonal mass is small next to the diagonal one.
  * Tiled (path 2): programs own BD x BE tiles of C (float32 tl.dot, ieee), reduce them
    to squared sums (float64) in the epilogue; C is never written, the per-tile partials
    are summed by torch.  Backward: for each panel of P rows of C the G panel (P x D
    float32, bounded workspace) is formed from recomputed tiles, then da[:, panel] = b
    G_panel^T and db += a[:, panel] G_panel (read-modify-write by the owning program, in a
    fixed panel order: no atomics, deterministic).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

AVAILABLE = True

GRAM, TILED = 1, 2
# Auto rule, the same as the C++ kernels': Gram path when N * GRAM_CROSSOVER < D (measured on CPU;
# to be re-measured for the Triton kernels on a GPU).
GRAM_CROSSOVER = 2.0
# Tiled backward: rows of C per panel, so that the G panel (P x D float32) stays <= 16 MiB
# (CONTRASTIVE_KERNELS_XCORR_PANEL_ELEMS=n instead: tests, several panels at a small D).
PANEL_ELEMS = 1 << 22


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_path(path: int, n: int, d: int) -> int:
    if path not in (0, 1, 2):
        raise ValueError(f"path must be 0 (auto), 1 (Gram) or 2 (tiled), got {path}")
    if path != 0:
        return path
    return GRAM if n * GRAM_CROSSOVER < d else TILED


def _mm_configs():
    if _interpret():
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                     (128, 128, 32, 8, 3), (32, 32, 32, 2, 2))]


def _tile_configs():
    if _interpret():
        return [triton.Config({"BD": 64, "BE": 64, "BNK": 32}, num_warps=4)]
    return [triton.Config({"BD": bd, "BE": be, "BNK": bk}, num_warps=w, num_stages=s)
            for bd, be, bk, w, s in ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
                                     (64, 128, 32, 4, 4))]


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _to_f64(x):
    """x (2-D) as a float64 tl.dot operand.  A 16-bit x goes through a reduction over a size-1
    axis (the identity): Triton 3.6 (torch 2.11's) sizes a float64 dot operand's register
    layout by the narrowest type its elementwise producers read, here the 16-bit load, a
    layout its float64 mma lowering rejects ("fp64 don't support largeK MMA": every 16-bit
    Gram config failed to compile for sm_80 and sm_90); the reduction ends that walk.  Not for
    float32, whose layout is right and whose staging it would double."""
    if x.dtype == tl.float16 or x.dtype == tl.bfloat16:
        return tl.sum(tl.reshape(x.to(tl.float64), (x.shape[0], x.shape[1], 1)), axis=2)
    else:
        return x.to(tl.float64)


@triton.autotune(configs=_mm_configs(), key=["M", "N", "K", "F64", "EPILOGUE", "ACCUMULATE"],
                 restore_value=["OUT"])
@triton.jit
def _mm_kernel(X, Y, OUT, E, W, ALPHA, M, N, K,
               sxm, sxk, syk, syn, som, son, sem, sen,
               F64: tl.constexpr, EPILOGUE: tl.constexpr, ACCUMULATE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """OUT[M, N] = (OUT +) alpha * X[M, K] @ Y[K, N] (+ E[M, N] * W[None, :] when EPILOGUE).

    F64: float64 products and accumulation (the Gram path); else float32 (ieee)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    if F64:
        acc = tl.zeros((BM, BN), dtype=tl.float64)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        y = tl.load(Y + kk[:, None] * syk + rn[None, :] * syn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if F64:
            acc += tl.dot(_to_f64(x), _to_f64(y))
        else:
            acc += tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
    acc = acc * tl.load(ALPHA).to(acc.dtype)
    keep = (rm[:, None] < M) & (rn[None, :] < N)
    if EPILOGUE:
        e = tl.load(E + rm[:, None] * sem + rn[None, :] * sen, mask=keep, other=0.0)
        w = tl.load(W + rn, mask=rn < N, other=0.0)
        acc += e.to(acc.dtype) * w.to(acc.dtype)[None, :]
    out_ptr = OUT + rm[:, None] * som + rn[None, :] * son
    if ACCUMULATE:
        acc += tl.load(out_ptr, mask=keep, other=0.0).to(acc.dtype)
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=keep)


@triton.autotune(configs=_tile_configs(), key=["NR", "D", "MODE"], reset_to_zero=["OUT"])
@triton.jit
def _ctile_kernel(A, B, OUT, GD, TWO_G, NR, D, d_base, d_end, sa, sb,
                  MODE: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BNK: tl.constexpr):
    """One BD x BE tile of C = A^T B (rows d in [d_base, d_end), float32 ieee accumulation).

    MODE 0: OUT[pid] = sum of C_de^2 over the tile's d != e entries (float64 partial).
    MODE 1: OUT = the G panel, G_de = 2 g C_de (d != e), G_dd = grad_diag_d, rows d - d_base."""
    pid_d = tl.program_id(0)
    pid_e = tl.program_id(1)
    rd = (d_base + pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    re = (pid_e * BE + tl.arange(0, BE)).to(tl.int64)
    rk = tl.arange(0, BNK).to(tl.int64)
    dmask = rd < d_end
    emask = re < D
    acc = tl.zeros((BD, BE), dtype=tl.float32)
    for n0 in range(0, NR, BNK):
        nn = n0 + rk
        at = tl.load(A + nn[None, :] * sa + rd[:, None], mask=(nn[None, :] < NR) & dmask[:, None], other=0.0)
        bt = tl.load(B + nn[:, None] * sb + re[None, :], mask=(nn[:, None] < NR) & emask[None, :], other=0.0)
        acc += tl.dot(at.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
    on_diag = rd[:, None] == re[None, :]
    keep = dmask[:, None] & emask[None, :]
    if MODE == 0:
        v = tl.where(keep & (~on_diag), acc, 0.0).to(tl.float64)
        tl.store(OUT + pid_d * tl.num_programs(1) + pid_e, tl.sum(tl.sum(v * v, axis=1), axis=0))
    else:
        gd = tl.load(GD + rd, mask=dmask, other=0.0)
        g = tl.where(on_diag, gd[:, None], tl.load(TWO_G) * acc)
        tl.store(OUT + (rd - d_base)[:, None] * D + re[None, :], g, mask=keep)


@triton.jit
def _diag_kernel(A, B, OUT, NR, D, BD: tl.constexpr, BNK: tl.constexpr):
    """C_dd = sum_n a_nd b_nd with float64 products and accumulation (fixed order)."""
    rd = (tl.program_id(0) * BD + tl.arange(0, BD)).to(tl.int64)
    rk = tl.arange(0, BNK).to(tl.int64)
    acc = tl.zeros((BD,), dtype=tl.float64)
    for n0 in range(0, NR, BNK):
        nn = n0 + rk
        m = (nn[:, None] < NR) & (rd[None, :] < D)
        x = tl.load(A + nn[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float64)
        y = tl.load(B + nn[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float64)
        acc += tl.sum(x * y, axis=0)
    tl.store(OUT + rd, acc, mask=rd < D)


# --------------------------------------------------------------------------- launches
def _mm(x, y, out, *, alpha, f64, e=None, w=None, accumulate=False):
    """out = (out +) alpha x @ y (+ e * w[None, :]); x, y, out, e may be strided views."""
    m, k = x.shape
    n = y.shape[1]
    if m == 0 or n == 0:
        return out
    e_ = e if e is not None else out
    w_ = w if w is not None else alpha
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))
    _mm_kernel[grid](x, y, out, e_, w_, alpha, m, n, k,
                     x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
                     e_.stride(0), e_.stride(1), F64=f64, EPILOGUE=e is not None, ACCUMULATE=accumulate)
    return out


def _gram(x):
    """x x^T (N x N float64)."""
    n = x.shape[0]
    one = torch.ones((), dtype=torch.float64, device=x.device)
    return _mm(x, x.t(), torch.empty((n, n), dtype=torch.float64, device=x.device), alpha=one, f64=True)


def _diag(a, b):
    n, d = a.shape
    out = torch.empty((d,), dtype=torch.float64, device=a.device)
    if d:
        bd = 64
        _diag_kernel[(triton.cdiv(d, bd),)](a, b, out, n, d, BD=bd, BNK=32)
    return out


def _same(a, b) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _check(a, b, path):
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"xcorr: a and b must be 2-D of the same shape (N, D), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16) or b.dtype != a.dtype:
        raise TypeError(f"xcorr: a and b must be float32, float16 or bfloat16 of one dtype, got {a.dtype} and "
                        f"{b.dtype}")
    if a.device != b.device:
        raise ValueError(f"xcorr: a and b must be on one device, got {a.device} and {b.device}")
    return resolve_path(int(path), a.shape[0], a.shape[1])


def xcorr_forward(a: torch.Tensor, b: torch.Tensor, path: int):
    p = _check(a, b, path)
    same = _same(a, b)
    a = a.contiguous()
    b = a if same else b.contiguous()
    n, d = a.shape
    c = _diag(a, b)
    diag_sq = (c * c).sum()
    if n == 0 or d == 0:
        full = torch.zeros((), dtype=torch.float64, device=a.device)
        offdiag = full
    elif p == GRAM:
        ga = _gram(a)
        gb = ga if same else _gram(b)
        # A sum of squares: negative only by rounding (NaN stays NaN under clamp).
        offdiag = ((ga * gb).sum() - diag_sq).clamp_min(0.0)
    else:
        grid = lambda meta: (triton.cdiv(d, meta["BD"]), triton.cdiv(d, meta["BE"]))
        # Partials per tile; sized for the smallest tile config (64 x 64).
        partial = torch.zeros((triton.cdiv(d, 64) ** 2,), dtype=torch.float64, device=a.device)
        _ctile_kernel[grid](a, b, partial, c, c, n, d, 0, d, a.stride(0), b.stride(0), MODE=0)
        offdiag = partial.sum()
    return offdiag.to(torch.float32), c.to(torch.float32)


def xcorr_backward(grad_offdiag, grad_diag, a, b, path: int, need_a: bool, need_b: bool):
    p = _check(a, b, path)
    same = _same(a, b)
    a = a.contiguous()
    b = a if same else b.contiguous()
    n, d = a.shape
    da, db = a.new_empty((0,)), b.new_empty((0,))
    if not (need_a or need_b):
        return da, db
    if n == 0 or d == 0:
        return (torch.zeros_like(a) if need_a else da), (torch.zeros_like(b) if need_b else db)
    g = grad_offdiag.reshape(()).to(device=a.device, dtype=torch.float64)
    gdiag = grad_diag.reshape(d).to(device=a.device, dtype=torch.float32).contiguous()
    if p == GRAM:
        # da = 2g Gb a + b (grad_diag - 2g C_dd); db = 2g Ga b + a (grad_diag - 2g C_dd).
        w = gdiag.double() - 2.0 * g * _diag(a, b)
        two_g = (2.0 * g).contiguous()
        if same:
            grad = _mm(_gram(a), a, torch.empty_like(a), alpha=two_g, f64=True, e=a, w=w)
            return (grad if need_a else da), ((grad.clone() if need_a else grad) if need_b else db)
        if need_a:
            da = _mm(_gram(b), a, torch.empty_like(a), alpha=two_g, f64=True, e=b, w=w)
        if need_b:
            db = _mm(_gram(a), b, torch.empty_like(b), alpha=two_g, f64=True, e=a, w=w)
        return da, db

    two_g = (2.0 * g).to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=a.device)
    panel_elems = int(os.environ.get("CONTRASTIVE_KERNELS_XCORR_PANEL_ELEMS", "0") or 0)
    rows = max(64, min(d, ((panel_elems if panel_elems > 0 else PANEL_ELEMS) // d) // 64 * 64))
    panel = torch.empty((min(rows, d), d), dtype=torch.float32, device=a.device)
    want_da, want_db = need_a or same, need_b and not same
    da_full = torch.empty_like(a) if want_da else None
    db_acc = torch.empty((n, d), dtype=torch.float32, device=a.device) if want_db else None
    for i, d0 in enumerate(range(0, d, rows)):
        pr = min(rows, d - d0)
        gp = panel[:pr]
        grid = lambda meta: (triton.cdiv(pr, meta["BD"]), triton.cdiv(d, meta["BE"]))
        _ctile_kernel[grid](a, b, gp, gdiag, two_g, n, d, d0, d0 + pr, a.stride(0), b.stride(0), MODE=1)
        if want_da:  # da[:, panel] = b G_panel^T  (every column of da belongs to one panel)
            _mm(b, gp.t(), da_full[:, d0:d0 + pr], alpha=one, f64=False)
        if want_db:  # db += a[:, panel] G_panel
            _mm(a[:, d0:d0 + pr], gp, db_acc, alpha=one, f64=False, accumulate=i > 0)
    if same:
        return (da_full if need_a else da), ((da_full.clone() if need_a else da_full) if need_b else db)
    if want_da:
        da = da_full
    if want_db:
        db = db_acc.to(b.dtype)
    return da, db
