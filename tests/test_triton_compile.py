"""Ahead-of-time compilation of every Triton kernel for sm_90 and sm_80 (no GPU needed).

CI runs the Triton kernels only under TRITON_INTERPRET=1, which never lowers them: type
errors, unsupported ops, layout / shape errors of tl.dot or dtype mismatches would only
show on the first GPU run.  Here each kernel (every @triton.jit function of kernels/*.py
that no other jit function calls; a test checks that the table below covers exactly those)
is compiled to PTX with ``triton.compile`` for GPUTarget("cuda", 90, 32) and
GPUTarget("cuda", 80, 32), with the pointer dtypes, flags and tile configs its launcher
passes (the dummy pointers included), over every input dtype, the flag combinations that
change the code, and tile configs from the autotune lists (the largest feature block a
launcher can pass included).  It checks:
  * compilation succeeds (a negative control, tl.dot with K = 8, must fail);
  * the kernels whose tl.dot takes 16-bit operands (log-sum-exp, pairwise, similarity)
    use tensor-core MMA (mma.sync / wgmma) for float16 and bfloat16 inputs;
  * float32 inputs never use TF32 (SPEC.md: float32 products are exact, input_precision
    "ieee"): no tf32 instruction in any float32 kernel's PTX;
  * the shared memory of each compiled config fits the target (so it can launch).
The xcorr kernels multiply in float32 (ieee) or float64 by design (the float64 Gram product
does use the f64 mma.sync), so they have no MMA check; they are checked to be free of tf32
for every input dtype.

The compiles run in worker subprocesses (TRITON_INTERPRET unset there, a fresh Triton cache,
so the test neither depends on nor pollutes earlier runs and behaves the same with or
without TRITON_INTERPRET=1 in the calling environment).  They compile kernels/*.py of the
checkout this file is in (the installed contrastive_kernels.kernels when there is none).
``python tests/test_triton_compile.py --worker JOBS.json`` compiles a JSON list of jobs
(how the test runs its workers).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.triton_compile

TARGETS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")
HALF = ("fp16", "bf16")
MODULES = ("lse", "pairwise", "similarity", "xcorr")
# Kernels whose tl.dot multiplies the input dtype: 16-bit inputs must run on tensor cores.
MMA_KERNELS = {
    "lse._lse_fwd_kernel", "lse._lse_bwd_kernel",
    "pairwise._pairwise_fwd_kernel", "pairwise._pairwise_bwd_rows_kernel", "pairwise._pairwise_bwd_cols_kernel",
    "similarity._sim_fwd_kernel", "similarity._sim_bwd_kernel",
}
# Kernels that upcast every product to float32 (ieee) or float64 whatever the input dtype.
NO_TF32_ANY_DTYPE = {"xcorr._mm_kernel", "xcorr._ctile_kernel", "xcorr._diag_kernel"}
# Shared memory a block may use (opt-in maximum): the configs compiled here are ones that launch.
SMEM_LIMIT = {90: 232448, 80: 166912}
_MMA_RE = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")
_TF32_RE = re.compile(r"\btf32\b")


# ------------------------------------------------------------------------- job table
@triton.jit
def _control_kernel(X, OUT, K: tl.constexpr):
    """Negative control: tl.dot with K = 8 runs under the interpreter but does not compile for a GPU
    (tl.dot needs K >= 16); the harness must report it as a compile error."""
    r = tl.arange(0, 16)
    k = tl.arange(0, K)
    a = tl.load(X + r[:, None] * K + k[None, :])
    b = tl.load(X + k[:, None] * 16 + r[None, :])
    tl.store(OUT + r[:, None] * 16 + r[None, :], tl.dot(a, b))


def _opts(num_warps, num_stages):
    return {"num_warps": num_warps, "num_stages": num_stages}


def _control_job():
    return {"id": "__control__", "kernel": "__control__", "module": None, "name": "_control_kernel",
            "dtype": "fp16", "types": {"X": "*fp16", "OUT": "*fp32"}, "constexprs": {"K": 8}, "options": _opts(4, 3),
            "cc": 90, "aligned_ints": False}


def _lse_fwd(dt, *, trans, on, d_pad, bo, bi, w, s, labels=False, cols=False, split=False, two=False):
    """_lse_pass: optional tensors are replaced by `out` (float32) when absent (TGT: the LSE_TARGET
    targets and XT the target scores, with `on`; CP the fused forward's column states, `cols`; RP
    the column splits' row states, `split`; SCALE0 / OUT0 / RP0 the second scale's, `two`: the
    lse2 pass, with the masks and rscales of `on` but no bias, target or labels, which it never takes)."""
    bd = d_pad if d_pad <= 128 else 64  # _block_d on a GPU
    types = {"O": "*" + dt, "I": "*" + dt, "SCALE": "*fp32", "O_RS": "*fp32", "I_RS": "*fp32", "BIAS": "*fp32",
             "POS": "*i64" if on else "*fp32", "O_LAB": "*i64" if on or labels else "*fp32",
             "I_LAB": "*i64" if on or labels else "*fp32", "TGT": "*i64" if on else "*fp32", "OUT": "*fp32",
             "XT": "*fp32", "CP": "*fp32", "RP": "*fp32", "SCALE0": "*fp32", "OUT0": "*fp32", "RP0": "*fp32"}
    types.update({n: "i32" for n in ("NO", "NI", "D", "stride_o", "stride_i", "diag_offset", "NSLOT", "ROW0")})
    if two:
        types.update(O_LAB="*fp32", I_LAB="*fp32", TGT="*fp32")
    cx = dict(COLS=cols, SLOT_ROWS=64, SPLIT=split,
              TRANS=trans, HAS_ORS=on, HAS_IRS=on, HAS_BIAS=on and not two, MASK_DIAG=on, MASK_POS=on,
              MASK_LAB=on and not two, TARGET=on and not two, LABELS=labels, TWO=two, NAT=dt == "fp32", IEEE=dt == "fp32",
              D_PAD=d_pad, BLOCK_D=bd, SINGLE=bd == d_pad, BLOCK_O=bo, BLOCK_I=bi)
    return types, cx, _opts(w, s)


def _merge_states(dt, *, target, labels=False, finish=True):
    """_lse_pass's merge of partial states (float32 whatever the input dtype): the fused forward's
    column states (into the running state, or finished) and the column splits' row states (XT:
    the target scores or the LSE_LABELS pair, `out` when absent)."""
    types = {"P": "*fp32", "OUT": "*fp32", "XT": "*fp32", "N": "i32", "NPART": "i32", "FIELD": "i32"}
    cx = dict(TARGET=target, LABELS=labels, WRITE_XT=target or labels, FINISH=finish, NAT=dt == "fp32", BLOCK=128)
    return types, cx, _opts(4, 1)


def _lse_bwd(dt, *, trans, on, oterm, iterm, need_out, need_ors, need_scale, need_bias, d_pad, bo, bi, bdo, w, s,
             out_f32=False, labels=False, split=False, two=False):
    """_bwd_pass: optional tensors are replaced by a float32 dummy (TGT, XT: the LSE_TARGET targets and
    target scores, with `on`); D_OUT is the gradient (input dtype,
    float32 when q is k in half precision) or `outer` (input dtype) without NEED_OUT; DS_C is the (1,)
    float32 half_ds_scale, applied (SCALE_DS) for float16."""
    bd = d_pad if d_pad <= 128 else 64
    types = {"O": "*" + dt, "I": "*" + dt, "SCALE": "*fp32", "O_RS": "*fp32", "I_RS": "*fp32", "BIAS": "*fp32",
             "POS": "*i64" if on else "*fp32", "O_LAB": "*i64" if on or labels else "*fp32",
             "I_LAB": "*i64" if on or labels else "*fp32", "TGT": "*i64" if on else "*fp32", "XT": "*fp32",
             "O_LSE": "*fp32",
             "O_G": "*fp32",
             "I_LSE": "*fp32",
             "I_G": "*fp32", "D_OUT": "*fp32" if (need_out and out_f32) else "*" + dt, "D_ORS": "*fp32",
             "D_SCALE": "*fp32", "D_BIAS": "*fp32", "DS_C": "*fp32", "SCALE0": "*fp32", "O_LSE0": "*fp32",
             "O_G0": "*fp32", "I_LSE0": "*fp32", "I_G0": "*fp32", "D_SCALE0": "*fp32"}
    types.update({n: "i32" for n in ("NO", "NI", "D", "stride_o", "stride_i", "diag_offset")})
    if two:  # (lse2_backward: the masks and rscales of `on`, no bias, target or labels)
        types.update(O_LAB="*fp32", I_LAB="*fp32", TGT="*fp32")
    cx = dict(TRANS=trans, HAS_ORS=on, HAS_IRS=on, HAS_BIAS=on and not two, MASK_DIAG=on, MASK_POS=on,
              MASK_LAB=on and not two, HAS_OTERM=oterm, HAS_ITERM=iterm, TARGET=on and not two, LABELS=labels,
              TWO=two, NAT=dt == "fp32", NEED_OUT=need_out, NEED_ORS=need_ors and on,
              NEED_SCALE=need_scale, NEED_BIAS=need_bias and on and not two, RS_ON_TILE=dt == "fp16", SCALE_DS=dt == "fp16",
              IEEE=dt == "fp32",
              D_PAD=d_pad, BLOCK_D=bd, SINGLE=bd == d_pad, SPLIT=split, BLOCK_O=bo, BLOCK_I=bi,
              BLOCK_DO=min(bdo, d_pad) if need_out else 16)
    return types, cx, _opts(w, s)


def _pw_common(dt, labels):
    """_prepare: offsets as float32 (or the float32 scale as a dummy), labels int64 (or the scale)."""
    types = {"q_ptr": "*" + dt, "k_ptr": "*" + dt, "scale_ptr": "*fp32", "bias_ptr": "*fp32", "off_ptr": "*fp32",
             "ql_ptr": "*i64" if labels else "*fp32", "kl_ptr": "*i64" if labels else "*fp32"}
    types.update({n: "i32" for n in ("N", "M", "D", "diag_offset")})
    return types


def _pw_cx(dt, labels, offset, mode, block_d, bm, bn):
    return dict(HAS_LABELS=labels, HAS_OFFSET=offset, MODE=mode, PREC="ieee" if dt == "fp32" else "tf32",
                BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn)


def _pw_fwd(dt, *, labels, offset, mode, block_d, bm, bn, w, s):
    types = dict(_pw_common(dt, labels), out_ptr="*fp32")
    return types, _pw_cx(dt, labels, offset, mode, block_d, bm, bn), _opts(w, s)


def _pw_rows(dt, *, labels, offset, mode, need_q, need_offset, need_loss, block_d, bm, bn, w, s):
    """_grad_passes: dq in the input dtype (pairwise_backward) or float32 (pairwise_fused, the only
    caller with NEED_LOSS); g (float32) stands in for dq / drow / loss when not needed; ds_c_ptr is the
    (1,) float32 half_ds_scale, applied (SCALE_DS) for float16."""
    gdt = "fp32" if need_loss else dt
    types = dict(_pw_common(dt, labels), g_ptr="*fp32", dq_ptr="*" + gdt if need_q else "*fp32",
                 drow_ptr="*fp32", part_ds_ptr="*fp64", part_dsd_ptr="*fp64", loss_ptr="*fp32", ds_c_ptr="*fp32")
    cx = dict(_pw_cx(dt, labels, offset, mode, block_d, bm, bn), NEED_Q=need_q, NEED_OFFSET=need_offset,
              NEED_LOSS=need_loss, SCALE_DS=dt == "fp16")
    return types, cx, _opts(w, s)


def _pw_cols(dt, *, labels, offset, mode, fused, block_d, bm, bn, w, s):
    types = dict(_pw_common(dt, labels), g_ptr="*fp32", dk_ptr="*fp32" if fused else "*" + dt, ds_c_ptr="*fp32")
    return types, dict(_pw_cx(dt, labels, offset, mode, block_d, bm, bn), SCALE_DS=dt == "fp16"), _opts(w, s)


def _sim_fwd(dt, *, rs, block_k, bm, bn, w, s):
    """similarity_forward: without normalize the float32 scale stands in for the row scales."""
    types = {"A": "*" + dt, "B": "*" + dt, "SCALE": "*fp32", "A_RS": "*fp32", "B_RS": "*fp32", "OUT": "*" + dt}
    types.update({n: "i32" for n in ("N", "M", "D", "stride_a", "stride_b")})
    cx = dict(HAS_RS=rs, IEEE=dt == "fp32", BLOCK_K=block_k, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8)
    return types, cx, _opts(w, s)


def _sim_bwd(dt, *, rs, bp, bq, bdo, w, s):
    """_rows_times: G is the upstream gradient cast to the input dtype; C (float32) stands in for X_RS."""
    types = {"G": "*" + dt, "X": "*" + dt, "X_RS": "*fp32", "C": "*fp32"}
    types.update({n: "i32" for n in ("P", "Q", "D", "stride_gp", "stride_gq", "stride_x")})
    cx = dict(HAS_RS=rs, IEEE=dt == "fp32", BLOCK_P=bp, BLOCK_Q=bq, BLOCK_DO=bdo)
    return types, cx, _opts(w, s)


def _mm(dt, *, call, cfg):
    """The four _mm calls of xcorr.py: (X, Y, OUT, E, W, ALPHA) dtypes and the flags."""
    f64 = "fp64"
    x, y, out, e, wt, alpha, cx = {
        # _gram(x): x @ x^T into float64, alpha float64, E = OUT, W = alpha.
        "gram": (dt, dt, f64, f64, f64, f64, dict(F64=True, EPILOGUE=False, ACCUMULATE=False)),
        # Gram backward: Gram(b) @ a into the input dtype, e = b, w float64, alpha = 2g float64.
        "gram_grad": (f64, dt, dt, dt, f64, f64, dict(F64=True, EPILOGUE=True, ACCUMULATE=False)),
        # Tiled backward: b @ G_panel^T into a column panel of da (input dtype), alpha float32 one.
        "tiled_da": (dt, "fp32", dt, dt, "fp32", "fp32", dict(F64=False, EPILOGUE=False, ACCUMULATE=False)),
        # Tiled backward: db (float32) += a[:, panel] @ G_panel.
        "tiled_db": (dt, "fp32", "fp32", "fp32", "fp32", "fp32",
                     dict(F64=False, EPILOGUE=False, ACCUMULATE=True)),
    }[call]
    types = {"X": "*" + x, "Y": "*" + y, "OUT": "*" + out, "E": "*" + e, "W": "*" + wt, "ALPHA": "*" + alpha}
    types.update({n: "i32" for n in ("M", "N", "K", "sxm", "sxk", "syk", "syn", "som", "son", "sem", "sen")})
    bm, bn, bk, w, s = cfg
    return types, dict(cx, BM=bm, BN=bn, BK=bk), _opts(w, s)


def _ctile(dt, *, mode, cfg):
    """MODE 0 (forward): float64 partials, C_dd (float64) passed as GD and TWO_G; MODE 1: float32 panel."""
    p = "*fp64" if mode == 0 else "*fp32"
    types = {"A": "*" + dt, "B": "*" + dt, "OUT": p, "GD": p, "TWO_G": p}
    types.update({n: "i32" for n in ("NR", "D", "d_base", "d_end", "sa", "sb")})
    bd, be, bk, w, s = cfg
    return types, dict(MODE=mode, BD=bd, BE=be, BNK=bk), _opts(w, s)


def _diag(dt):
    types = {"A": "*" + dt, "B": "*" + dt, "OUT": "*fp64", "NR": "i32", "D": "i32"}
    return types, dict(BD=64, BNK=32), _opts(4, 3)  # the launch defaults


def _variants():
    """(kernel, label, main, dtypes, build(dt) -> (types, constexprs, options)).

    The main variant of each kernel (every flag that adds code on, the largest feature block a
    launcher passes) is compiled for every dtype on both targets, the others on alternating
    targets for the 16-bit dtypes, and for float32 where it has code of its own (f32=...) or
    compiles fast (dtypes=DTYPES): float32 runs the same ieee product whatever the flags.  Tiles
    come from the kernel's autotune list: large ones for the 16-bit inputs (tensor cores), small
    ones for float32, whose ieee products compile to FMA loops that take seconds per tile size
    (and whose large tiles exceed the shared memory: the autotuner skips those at run time)."""
    V = []

    def add(kernel, label, fn, main=False, f32=None, dtypes=None, **kw):
        dtypes = dtypes or (DTYPES if main or f32 is not None else HALF)
        V.append((kernel, label, main, dtypes,
                  lambda dt: fn(dt, **(dict(kw, **(f32 or {})) if dt == "fp32" else kw))))

    # --- lse: row pass (masks, rscales, bias on, D in one tile of 128), column pass (TRANS, D_PAD
    # 512 in chunks of 64), then everything off at the smallest D.
    add("lse._lse_fwd_kernel", "row-all-on-D128", _lse_fwd, main=True, trans=False, on=True, d_pad=128,
        bo=128, bi=128, w=8, s=3, f32=dict(bo=64, bi=64, w=4, s=4))
    add("lse._lse_fwd_kernel", "col-all-on-D512", _lse_fwd, trans=True, on=True, d_pad=512, bo=64, bi=128, w=4,
        s=3)
    # the fused forward (compute_col): column states, BLOCK_O 128 = two slots (one empty)
    add("lse._lse_fwd_kernel", "fused-cols-all-on-D512", _lse_fwd, trans=False, on=True, cols=True, d_pad=512,
        bo=128, bi=64, w=8, s=3)
    # (float32 state whatever the input dtype: the dtypes compile the same kernel)
    add("lse._merge_states_kernel", "target", _merge_states, main=True, target=True)
    add("lse._merge_states_kernel", "plain-running", _merge_states, target=False, finish=False, dtypes=DTYPES)
    add("lse._merge_states_kernel", "labels", _merge_states, target=False, labels=True)
    # column splits: the row states to RP (row pass with every option; the labels row pass)
    add("lse._lse_fwd_kernel", "split-row-all-on-D128", _lse_fwd, trans=False, on=True, split=True, d_pad=128,
        bo=128, bi=64, w=8, s=3)
    add("lse._lse_fwd_kernel", "split-labels-D64", _lse_fwd, trans=False, on=False, labels=True,
        split=True, d_pad=64, bo=64, bi=128, w=4, s=3)
    add("lse._lse_fwd_kernel", "all-off-D16", _lse_fwd, trans=False, on=False, d_pad=16, bo=128, bi=256, w=8,
        s=3, f32=dict(bo=64, bi=64, w=4, s=4))
    # Row pass: dq with both terms (row and column LSE), d q_rscale and dscale.
    add("lse._lse_bwd_kernel", "row-dq-both-terms-D128", _lse_bwd, main=True, trans=False, on=True, oterm=True,
        iterm=True, need_out=True, need_ors=True, need_scale=True, need_bias=False, d_pad=128, bo=64, bi=64,
        bdo=128, w=4, s=2, f32=dict(bi=32, bdo=256, s=3))
    # The same row pass split over the columns (small N): float32 partials at split offsets.
    add("lse._lse_bwd_kernel", "split-row-dq-both-terms-D128", _lse_bwd, trans=False, on=True, oterm=True,
        iterm=True, need_out=True, need_ors=True, need_scale=True, need_bias=False, d_pad=128, bo=64, bi=64,
        bdo=128, w=4, s=2, out_f32=True, split=True)
    # Column pass without a column LSE (only the row term): dk over BLOCK_DO 512 (256 for float32,
    # the largest _bwd_prune keeps) of a D_PAD 1024 chunked feature dimension, dbias, d k_rscale.
    add("lse._lse_bwd_kernel", "col-dk-dbias-D1024", _lse_bwd, trans=True, on=True, oterm=False, iterm=True,
        need_out=True, need_ors=True, need_scale=False, need_bias=True, d_pad=1024, bo=64, bi=64, bdo=512, w=8,
        s=2, f32=dict(bi=32, bdo=256, w=4, s=3))
    add("lse._lse_bwd_kernel", "scale-only-D256", _lse_bwd, trans=False, on=False, oterm=True, iterm=False,
        need_out=False, need_ors=False, need_scale=True, need_bias=False, d_pad=256, bo=128, bi=128, bdo=128,
        w=8, s=2)
    # LSE_LABELS (SupCon): the positives' sum in the row pass; -g/|P| at the positives in both passes.
    add("lse._lse_fwd_kernel", "row-labels-D128", _lse_fwd, trans=False, on=False, labels=True, d_pad=128,
        bo=128, bi=128, w=8, s=3, f32=dict(bo=64, bi=64, w=4, s=4))
    add("lse._lse_bwd_kernel", "row-labels-D128", _lse_bwd, trans=False, on=False, labels=True, oterm=True,
        iterm=False, need_out=True, need_ors=False, need_scale=True, need_bias=False, d_pad=128, bo=64, bi=64,
        bdo=128, w=4, s=2, f32=dict(bi=32, bdo=256, s=3))
    add("lse._lse_bwd_kernel", "col-labels-D128", _lse_bwd, trans=True, on=False, labels=True, oterm=False,
        iterm=True, need_out=True, need_ors=False, need_scale=False, need_bias=False, d_pad=128, bo=64, bi=64,
        bdo=128, w=4, s=2, f32=dict(bi=32, bdo=256, s=3))
    # q is k in half precision: dq and dk in float32 (D_OUT a float32 pointer).
    add("lse._lse_bwd_kernel", "same-q-k-f32-grad-D32", _lse_bwd, trans=True, on=True, oterm=True, iterm=True,
        need_out=True, need_ors=True, need_scale=True, need_bias=True, d_pad=32, bo=64, bi=32, bdo=256, w=4, s=3,
        out_f32=True)
    # Two scales in one pass (lse2, HCL): the row pass with the masks and rscales, split and not; the
    # backward's row pass (dq, d q_rscale, both dscales) and column pass (dk), float32 gradients.
    add("lse._lse_fwd_kernel", "two-scales-row-D128", _lse_fwd, trans=False, on=True, two=True, d_pad=128,
        bo=128, bi=128, w=8, s=3, f32=dict(bo=64, bi=64, w=4, s=4), dtypes=DTYPES)
    add("lse._lse_fwd_kernel", "two-scales-split-D512", _lse_fwd, trans=False, on=True, two=True, split=True,
        d_pad=512, bo=64, bi=128, w=4, s=3)
    add("lse._lse_bwd_kernel", "two-scales-row-dq-D128", _lse_bwd, trans=False, on=True, two=True, oterm=True,
        iterm=False, need_out=True, need_ors=True, need_scale=True, need_bias=False, d_pad=128, bo=64, bi=64,
        bdo=128, w=4, s=2, out_f32=True, f32=dict(bi=32, bdo=256, s=3), dtypes=DTYPES)
    add("lse._lse_bwd_kernel", "two-scales-col-dk-split-D256", _lse_bwd, trans=True, on=True, two=True,
        oterm=False, iterm=True, need_out=True, need_ors=True, need_scale=False, need_bias=False, d_pad=256, bo=64,
        bi=64, bdo=256, w=8, s=2, out_f32=True, split=True)
    # --- pairwise: BLOCK_D 256 (the launcher's largest) with tiles _prune keeps for it.  Modes 3 and 7
    # keep no pair at all (the compiler drops the products): not used here.
    add("pairwise._pairwise_fwd_kernel", "labels-offset-mode5-D256", _pw_fwd, main=True, labels=True, offset=True,
        mode=5, block_d=256, bm=64, bn=64, w=4, s=3, f32=dict(bm=32, bn=32, s=2))
    add("pairwise._pairwise_fwd_kernel", "plain-mode6-D16", _pw_fwd, labels=False, offset=False, mode=6,
        block_d=16, bm=128, bn=128, w=8, s=3)
    add("pairwise._pairwise_bwd_rows_kernel", "fused-loss-labels-mode6-D256", _pw_rows, main=True, labels=True,
        offset=True, mode=6, need_q=True, need_offset=True, need_loss=True, block_d=256, bm=64, bn=64, w=4, s=3,
        f32=dict(bm=32, bn=32, s=2))
    add("pairwise._pairwise_bwd_rows_kernel", "dq-mode1-D64", _pw_rows, labels=False, offset=False, mode=1,
        need_q=True, need_offset=False, need_loss=False, block_d=64, bm=128, bn=128, w=8, s=2)
    add("pairwise._pairwise_bwd_rows_kernel", "scalars-only-mode0-D32", _pw_rows, labels=True, offset=True, mode=0,
        need_q=False, need_offset=True, need_loss=False, block_d=32, bm=32, bn=64, w=4, s=2)
    add("pairwise._pairwise_bwd_cols_kernel", "labels-offset-mode5-D256", _pw_cols, main=True, labels=True,
        offset=True, mode=5, fused=False, block_d=256, bm=64, bn=64, w=4, s=3, f32=dict(bm=32, bn=32, s=2))
    add("pairwise._pairwise_bwd_cols_kernel", "fused-mode2-D16", _pw_cols, labels=False, offset=False, mode=2,
        fused=True, block_d=16, bm=128, bn=128, w=8, s=3)
    # --- similarity
    add("similarity._sim_fwd_kernel", "normalize-K64", _sim_fwd, main=True, rs=True, block_k=64, bm=128, bn=256,
        w=8, s=3, f32=dict(bm=64, bn=64, w=4, s=4))
    add("similarity._sim_fwd_kernel", "plain-K16", _sim_fwd, rs=False, block_k=16, bm=64, bn=64, w=4, s=4,
        dtypes=DTYPES)
    add("similarity._sim_bwd_kernel", "normalize-DO256", _sim_bwd, main=True, rs=True, bp=128, bq=32, bdo=256,
        w=8, s=3, f32=dict(bp=64, bq=32, bdo=64, w=4, s=4))
    add("similarity._sim_bwd_kernel", "plain-DO64", _sim_bwd, rs=False, bp=64, bq=32, bdo=64, w=4, s=4,
        dtypes=DTYPES)
    # --- xcorr: the four _mm calls, both _ctile modes, the diagonal.
    add("xcorr._mm_kernel", "gram", _mm, main=True, call="gram", cfg=(128, 128, 32, 8, 3))
    add("xcorr._mm_kernel", "gram-grad-epilogue", _mm, call="gram_grad", cfg=(64, 64, 32, 4, 3), dtypes=DTYPES)
    add("xcorr._mm_kernel", "tiled-da", _mm, call="tiled_da", cfg=(64, 128, 32, 4, 3), dtypes=DTYPES)
    add("xcorr._mm_kernel", "tiled-db-accumulate", _mm, call="tiled_db", cfg=(32, 32, 32, 2, 2), dtypes=DTYPES)
    add("xcorr._ctile_kernel", "offdiag-partials", _ctile, main=True, mode=0, cfg=(128, 128, 32, 8, 3))
    add("xcorr._ctile_kernel", "grad-panel", _ctile, mode=1, cfg=(64, 128, 32, 4, 4), dtypes=DTYPES)
    add("xcorr._diag_kernel", "diag", _diag, main=True)
    return V


def _jobs():
    jobs, flip = [], 0
    for kernel, label, main, dtypes, build in _variants():
        for dt in dtypes:
            types, cx, opts = build(dt)
            if main:
                targets = TARGETS
            else:
                targets, flip = (TARGETS[flip % 2],), flip + 1
            for cc in targets:
                mod, name = kernel.split(".")
                jobs.append({"id": f"{kernel}[{label},{dt},sm_{cc}]", "kernel": kernel, "module": mod, "name": name,
                             "dtype": dt, "types": types, "constexprs": cx, "options": opts, "cc": cc,
                             # ints divisible by 16 (as the JIT specializes them) in every other job
                             "aligned_ints": len(jobs) % 2 == 0})
    return jobs


# --------------------------------------------------------------------------- worker side
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
_PKG = None


def _module(name):
    """kernels/<name>.py of this checkout (loaded as a package under a private name: no build of the
    extension needed, and the source next to this test is what is checked), else the installed
    contrastive_kernels.kernels.<name>."""
    global _PKG
    if _PKG is None:
        _PKG = "contrastive_kernels.kernels"
        init = os.path.join(_SRC, "__init__.py")
        if os.path.isfile(init):
            _PKG = "_ck_kernels_under_test"
            spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[_SRC])
            pkg = importlib.util.module_from_spec(spec)
            sys.modules[_PKG] = pkg
            spec.loader.exec_module(pkg)
    return importlib.import_module(f"{_PKG}.{name}")


def _unwrap(obj):
    from triton.runtime.jit import JITFunction
    for _ in range(4):  # Autotuner / Heuristics wrap the JITFunction as .fn
        if isinstance(obj, JITFunction) or not hasattr(obj, "fn"):
            break
        obj = obj.fn
    return obj if isinstance(obj, JITFunction) else None


def _discover():
    """Kernels = the jit functions defined in kernels/*.py that no jit function calls."""
    jits = {}
    for m in MODULES + ("_common",):
        mod = _module(m)
        for val in vars(mod).values():
            fn = _unwrap(val)
            if fn is not None and fn.fn.__module__ == mod.__name__:
                jits[f"{m}.{fn.__name__}"] = fn
    called = set()
    for g in jits.values():
        for gname, val in g.fn.__globals__.items():
            fn = _unwrap(val)
            if fn is not None and fn is not g and re.search(rf"(?<![\w.]){re.escape(gname)}\s*\(", g.src):
                called.update(k for k, f in jits.items() if f is fn)
    return sorted(set(jits) - called)


def _compile(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _unwrap(getattr(_module(job["module"]) if job["module"] else sys.modules[__name__], job["name"]))
    types, cx = job["types"], job["constexprs"]
    names = list(fn.arg_names)
    missing = [n for n in names if n not in types and n not in cx]
    unknown = [n for n in list(types) + list(cx) if n not in names]
    if missing or unknown:
        return {"ok": False, "error": f"signature mismatch: missing {missing}, unknown {unknown}"}
    sig = {n: "constexpr" if n in cx else types[n] for n in names}
    # What the JIT marks on a GPU launch: 16-byte aligned pointers, ints divisible by 16 (when aligned_ints).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in cx and (types[n].startswith("*") or job["aligned_ints"])}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", job["cc"], 32),
                           options=job["options"])
        ptx = k.asm["ptx"]
    except Exception as e:  # noqa: BLE001 -- report every compile error to the test
        msgs, seen = [], set()
        while e is not None and id(e) not in seen:  # the chain: the root cause comes last
            seen.add(id(e))
            msgs.append(f"{type(e).__name__}: {e}"[-3000:])
            e = e.__cause__ or e.__context__
        return {"ok": False, "error": "\n--- caused by ---\n".join(msgs)}
    return {"ok": True, "mma": bool(_MMA_RE.search(ptx)), "tf32": bool(_TF32_RE.search(ptx)),
            "shared": int(k.metadata.shared),
            "secs": round(time.perf_counter() - t0, 2)}


def _worker_main():
    with open(sys.argv[sys.argv.index("--worker") + 1]) as f:
        jobs = json.load(f)
    out = {}
    for job in jobs:
        if job.get("discover"):
            out["__discover__"] = _discover()
        else:
            out[job["id"]] = _compile(job)
    sys.stdout.write("\n@@RESULTS@@" + json.dumps(out) + "\n")


# ----------------------------------------------------------------------------- test side
def _n_workers():
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 2
    return max(2, min(8, n))


def _cost(job):  # rough compile seconds: float32 FMA products of the big tiles take longest
    return 4.0 if job["dtype"] == "fp32" and job["kernel"] in MMA_KERNELS else 1.0


@pytest.fixture(scope="module")
def compiled():
    jobs = _jobs()
    n = _n_workers()
    shards, loads = [[] for _ in range(n)], [0.0] * n
    shards[0] += [{"discover": True}, _control_job()]
    loads[0] += 2.0
    for job in sorted(jobs, key=_cost, reverse=True):  # greedy balance
        i = loads.index(min(loads))
        shards[i].append(job)
        loads[i] += _cost(job)
    spec = importlib.util.find_spec("contrastive_kernels")  # the install, used when kernels/ is not here
    pkg_root = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else ""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
        env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_root, env.get("PYTHONPATH")] if p)
        procs = []
        for i, shard in enumerate(shards):
            path = os.path.join(tmp, f"jobs{i}.json")
            with open(path, "w") as f:
                json.dump(shard, f)
            out, err = open(path + ".out", "w+"), open(path + ".err", "w+")
            procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", path],
                                           stdout=out, stderr=err, text=True, env=env, cwd=tmp), out, err))
        try:
            for p, out, err in procs:
                rc = p.wait(timeout=900)
                out.seek(0)
                err.seek(0)
                stdout, stderr = out.read(), err.read()
                out.close()
                err.close()
                if rc != 0 or "@@RESULTS@@" not in stdout:
                    pytest.fail(f"compile worker failed (rc {rc}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
                results.update(json.loads(stdout.rsplit("@@RESULTS@@", 1)[1]))
        finally:
            for p, out, err in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                out.close()
                err.close()
    return jobs, results


def test_harness_reports_compile_errors(compiled):
    """The negative control (tl.dot with K = 8, fine under the interpreter) must fail to compile."""
    r = compiled[1]["__control__"]
    assert not r["ok"], r
    assert "16" in r["error"], r["error"]


def test_every_kernel_is_covered(compiled):
    jobs, results = compiled
    found = results["__discover__"]
    covered = sorted({v[0] for v in _variants()})
    assert found == covered, f"kernels in kernels/*.py {found} != kernels this test compiles {covered}"


@pytest.mark.parametrize("kernel", sorted({v[0] for v in _variants()}))
def test_kernel_compiles(compiled, kernel):
    jobs, results = compiled
    mine = [j for j in jobs if j["kernel"] == kernel]
    assert {j["cc"] for j in mine} == set(TARGETS) and {j["dtype"] for j in mine} == set(DTYPES)
    failed = {j["id"]: results[j["id"]]["error"] for j in mine if not results[j["id"]]["ok"]}
    assert not failed, "compile errors:\n" + "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    for j in mine:
        r = results[j["id"]]
        if kernel in MMA_KERNELS and j["dtype"] in ("fp16", "bf16"):
            assert r["mma"], f"{j['id']}: no tensor-core MMA (mma.sync / wgmma) in the PTX"
        assert r["shared"] <= SMEM_LIMIT[j["cc"]], f"{j['id']}: {r['shared']} bytes of shared memory"
        if j["dtype"] == "fp32" or kernel in NO_TF32_ANY_DTYPE:
            assert not r["tf32"], f"{j['id']}: tf32 instruction in the PTX of an exact float32 product"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
