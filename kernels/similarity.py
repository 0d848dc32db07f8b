"""Triton kernels of the fused normalized similarity: out = scale * a_hat b_hat^T.

a_hat = a / max(|a|, 1e-12) when normalize (the F.normalize convention).  The row
scales r_a = 1 / max(|a_i|, 1e-12) are computed once in float32 (O(N D)) and applied
to the float32 dot products in the epilogue, so no normalized copy of a or b is
formed or rounded.  Contract: csrc/op_schemas.h (similarity_forward / similarity_backward).

Backward, with G the gradient of out:
  C^a = G (r_b * b)  (N x D),  C^b = G^T (r_a * a)  (M x D)   -- the two tiled products
  da_i = r_a_i (v_i - a_hat_i (a_hat_i . v_i)),  v_i = scale C^a_i  (|a_i| > 1e-12; else r_a_i v_i)
  dscale = sum_i a_hat_i . C^a_i
The products run in the Triton kernel (G read in tiles, b scaled per tile); the
O((N + M) D) epilogue (normalization Jacobian, dscale) runs in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot as _dot
from ._common import INTERPRET, is_ieee, launch, pad_dim, smem_limit

AVAILABLE = True

_EPS = 1e-12


@triton.jit
def _sim_fwd_kernel(A, B, SCALE, A_RS, B_RS, OUT, N, M, D, stride_a, stride_b,
                    HAS_RS: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row blocks share the column blocks while they are in L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BLOCK_M)
    n_n = tl.cdiv(M, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    c_ok = cols < M
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + kk
        a = tl.load(A + rows[:, None] * stride_a + k[None, :], mask=r_ok[:, None] & (k[None, :] < D), other=0.0)
        b = tl.load(B + cols[:, None] * stride_b + k[None, :], mask=c_ok[:, None] & (k[None, :] < D), other=0.0)
        acc = _dot(a, tl.trans(b), acc, IEEE)
    scale = tl.load(SCALE).to(tl.float32)
    acc = acc * scale
    if HAS_RS:
        acc = acc * tl.load(A_RS + rows, mask=r_ok, other=1.0)[:, None]
        acc = acc * tl.load(B_RS + cols, mask=c_ok, other=1.0)[None, :]
    tl.store(OUT + rows[:, None] * M + cols[None, :], acc.to(OUT.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _sim_bwd_kernel(G, X, X_RS, C, P, Q, D, stride_gp, stride_gq, stride_x,
                    HAS_RS: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DO: tl.constexpr):
    """C[p, :] = sum_q G[p, q] (x_rs_q X[q, :]) in float32; G read through its strides
    (so G^T needs no copy).  The row scale goes on the X tile (|x_hat| <= 1: no overflow
    in float16), not on G."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    ps = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    dcol = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dcol < D
    acc = tl.zeros((BLOCK_P, BLOCK_DO), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        qs = (q0 + tl.arange(0, BLOCK_Q)).to(tl.int64)
        q_ok = qs < Q
        g = tl.load(G + ps[:, None] * stride_gp + qs[None, :] * stride_gq, mask=p_ok[:, None] & q_ok[None, :],
                    other=0.0)
        x = tl.load(X + qs[:, None] * stride_x + dcol[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_RS:
            x = (x.to(tl.float32) * tl.load(X_RS + qs, mask=q_ok, other=1.0)[:, None]).to(X.dtype.element_ty)
        acc = _dot(g, x, acc, IEEE)
    tl.store(C + ps[:, None] * D + dcol[None, :], acc, mask=p_ok[:, None] & d_ok[None, :])


def _fwd_prune(configs, named_args, **kwargs):
    args = dict(named_args, **kwargs)
    bk, el, limit = args["BLOCK_K"], args["A"].element_size(), smem_limit(args["A"])
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * bk * el * c.num_stages <= limit]
    return kept or configs[:1]


_FWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, bn, w, s in [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4),
                                     (64, 64, 4, 4)]]
_BWD_CONFIGS = [triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_DO": bd}, num_warps=w, num_stages=s)
                for bp, bq, bd, w, s in [(128, 64, 128, 8, 3), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4),
                                         (128, 32, 256, 8, 3), (64, 32, 64, 4, 4)]]
_sim_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["D", "HAS_RS"],
                                 prune_configs_by={"early_config_prune": _fwd_prune})(_sim_fwd_kernel)
_sim_bwd_tuned = triton.autotune(_BWD_CONFIGS, key=["D", "HAS_RS"])(_sim_bwd_kernel)


def _ieee(dtype):
    return is_ieee(dtype) or (INTERPRET and dtype == torch.bfloat16)


def _rscale(x):
    return x.float().norm(dim=1).clamp_min(_EPS).reciprocal()


def similarity_forward(a, b, scale, normalize):
    a, b = a.contiguous(), b.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    scale = scale.reshape(()).to(torch.float32).contiguous()
    out = torch.empty((n, m), dtype=a.dtype, device=a.device)
    if n == 0 or m == 0:
        return out
    ar, br = (_rscale(a), _rscale(b)) if normalize else (scale, scale)
    bk = min(pad_dim(d), 128 if INTERPRET else 64)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)  # noqa: E731
    launch(_sim_fwd_kernel, _sim_fwd_tuned, grid, {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4},
           a, b, scale, ar, br, out, n, m, d, a.stride(0), b.stride(0),
           HAS_RS=bool(normalize), IEEE=_ieee(a.dtype), BLOCK_K=bk)
    return out


def _rows_times(g, stride_gp, stride_gq, p, x, x_rs):
    """sum_q g[p, q] x_rs_q x_q for every p: (P, D) float32."""
    q, d = x.shape
    c = torch.empty((p, d), dtype=torch.float32, device=x.device)
    if p == 0:
        return c
    if q == 0:
        return c.zero_()
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_DO"]))  # noqa: E731
    interp = {"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_DO": min(pad_dim(d), 128)}
    launch(_sim_bwd_kernel, _sim_bwd_tuned, grid, interp,
           g, x, x_rs if x_rs is not None else c, c, p, q, d, stride_gp, stride_gq, x.stride(0),
           HAS_RS=x_rs is not None, IEEE=_ieee(x.dtype))
    return c


def _through_normalize(x, x_rs, v):
    """Gradient wrt x of x_hat . v (x_hat = x / max(|x|, eps)), given v per row."""
    if x_rs is None:
        return v
    xh = x.float() * x_rs[:, None]
    proj = (xh * v).sum(1, keepdim=True)
    big = (x.float().norm(dim=1, keepdim=True) > _EPS)
    return x_rs[:, None] * torch.where(big, v - xh * proj, v)


def similarity_backward(grad, a, b, scale, normalize, need_a, need_b, need_scale):
    a, b = a.contiguous(), b.contiguous()
    g = grad.to(a.dtype).contiguous()
    n, m = a.shape[0], b.shape[0]
    sc = scale.reshape(()).to(torch.float32)
    ar, br = (_rscale(a), _rscale(b)) if normalize else (None, None)
    empty32 = torch.empty((0,), dtype=torch.float32, device=a.device)
    da, db, dscale = a.new_empty((0,)), b.new_empty((0,)), empty32
    if need_a or need_scale:
        ca = _rows_times(g, g.stride(0), g.stride(1), n, b, br)  # G (r_b b)
        if need_a:
            da = _through_normalize(a, ar, sc * ca).to(a.dtype)
        if need_scale:
            ah = a.float() * ar[:, None] if normalize else a.float()
            if a.dtype == torch.float32:
                dscale = (ah.double() * ca.double()).sum().float()  # float64: the sum cancels
            else:
                # half inputs: the kernel's r_b * b tile is rounded to the input dtype, and this
                # sum cancels (random-sign G), so recompute it in float32 from float32 b_hat,
                # 16 MB row chunks of G at a time (G itself is the N x M input of this op).
                bh = b.float() * br[:, None] if normalize else b.float()
                step = max(1, (1 << 22) // max(m, 1))
                acc = torch.zeros((), dtype=torch.float64, device=a.device)
                for r0 in range(0, n, step):
                    c = g[r0:r0 + step].float() @ bh
                    acc += (ah[r0:r0 + step].double() * c.double()).sum()
                dscale = acc.float()
    if need_b:
        cb = _rows_times(g, g.stride(1), g.stride(0), m, a, ar)  # G^T (r_a a)
        db = _through_normalize(b, br, sc * cb).to(b.dtype)
    return da, db, dscale
