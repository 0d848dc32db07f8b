"""The kernel families as torch.library ops, with fake (meta) and autograd registrations.

Each family has one forward and one backward op per kernel implementation:
  * native: ``contrastive_kernels::<family>_forward`` / ``_backward``, declared in
    csrc/op_schemas.h and implemented per dispatch key (CPU in csrc/cpu, CUDA in csrc/cuda);
  * cuda on the CPU emulator (tests, CONTRASTIVE_KERNELS_CUDA_EMULATE=1):
    ``contrastive_kernels::<family>_forward_cuda_emu`` / ``_backward_cuda_emu``, the CUDA
    sources and glue compiled for csrc/cuda/emu, CPU dispatch key;
  * triton: ``contrastive_kernels::<family>_forward_triton`` / ``_backward_triton``,
    Python custom ops whose bodies launch the kernels of
    ``contrastive_kernels.kernels.<family>`` (module functions ``<family>_forward`` and
    ``<family>_backward`` with exactly the native ops' arguments and results).
Fake implementations and autograd are registered once here for both, so every
backend of a family has the same inputs, outputs and gradient wiring, and
torch.compile(fullgraph=True) traces through them without graph breaks.

The family contracts (shapes, masks, dtypes) are documented in csrc/op_schemas.h and
written out with full matrices in `reference.lse_family` / `pairwise_family` /
`xcorr_family`, which the kernels are tested against.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _ext, reference
from .backends import FAMILY_REFERENCE
from .reference import LSE_LABELS, LSE_NORM, LSE_TARGET, MASK_DIAG

_C = _ext.load()  # load the C++ schemas before defining the Python fragment of the namespace
NS = "contrastive_kernels"
_EMPTY = (0,)


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(_EMPTY, dtype=dtype if dtype is not None else like.dtype)


def _f32_empty(like: Tensor, shape) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


# --------------------------------------------------------------------------- fakes
def _lse_forward_fake(q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, diag_offset,
                     mask_mode, compute_col):
    state = (2, q.shape[0]) if mask_mode & LSE_LABELS else (q.shape[0],) if mask_mode & LSE_TARGET else _EMPTY
    return (_f32_empty(q, (q.shape[0],)), _f32_empty(q, (k.shape[0],) if compute_col else _EMPTY),
            _f32_empty(q, state))


def _lse_backward_fake(grad_row, grad_col, q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels,
                       k_labels, diag_offset, mask_mode, row_lse, col_lse, target_state, need_q, need_k, need_scale,
                       need_bias, need_q_rscale, need_k_rscale):
    gdt = torch.float32 if mask_mode & LSE_NORM else None  # (LSE_NORM: dq / dk in float32)
    return (torch.empty_like(q, dtype=gdt) if need_q else _empty(q),
            torch.empty_like(k, dtype=gdt) if need_k else _empty(k),
            _f32_empty(q, ()) if need_scale else _f32_empty(q, _EMPTY),
            _f32_empty(q, (k.shape[0],)) if need_bias else _f32_empty(q, _EMPTY),
            _f32_empty(q, (q.shape[0],)) if need_q_rscale else _f32_empty(q, _EMPTY),
            _f32_empty(q, (k.shape[0],)) if need_k_rscale else _f32_empty(q, _EMPTY))


def _pairwise_forward_fake(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode):
    return _f32_empty(q, (q.shape[0],))


def _pairwise_backward_fake(grad_row, q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode,
                            need_q, need_k, need_scale, need_bias, need_offset):
    return (torch.empty_like(q) if need_q else _empty(q),
            torch.empty_like(k) if need_k else _empty(k),
            _f32_empty(q, ()) if need_scale else _f32_empty(q, _EMPTY),
            _f32_empty(q, ()) if need_bias else _f32_empty(q, _EMPTY),
            _f32_empty(q, (q.shape[0],)) if need_offset else _f32_empty(q, _EMPTY))


def _xcorr_forward_fake(a, b, path):
    return _f32_empty(a, ()), _f32_empty(a, (a.shape[1],))


def _xcorr_backward_fake(grad_offdiag, grad_diag, a, b, path, need_a, need_b):
    return (torch.empty_like(a) if need_a else _empty(a), torch.empty_like(b) if need_b else _empty(b))


def _similarity_forward_fake(a, b, scale, normalize):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=a.dtype)


def _similarity_backward_fake(grad, a, b, scale, normalize, need_a, need_b, need_scale):
    return (torch.empty_like(a) if need_a else _empty(a),
            torch.empty_like(b) if need_b else _empty(b),
            _f32_empty(a, ()) if need_scale else _f32_empty(a, _EMPTY))


# ------------------------------------------------------------------------ autograd
def _none_unless(flag, t):
    return t if flag else None


def _lse_setup(ctx, inputs, output):
    q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, diag_offset, mask_mode, _ = inputs
    ctx.save_for_backward(q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, *output)
    ctx.mark_non_differentiable(output[2])  # target_state: saved for the backward
    ctx.ints = (diag_offset, mask_mode)
    ctx.same_qk = q is k and q_rscale is k_rscale  # (LSE_NORM folds the two halves' sum)


# float32 1 / 1e-12: a row scale at least this large is F.normalize's clamp (|x| <= 1e-12),
# where the normalization has no Jacobian beyond the scale itself
_RSCALE_CLAMP = float(torch.tensor(1e-12, dtype=torch.float32).reciprocal())


def _fold_norm(x, r, dx):
    """LSE_NORM: the gradient of x through x_hat = r x, r = 1 / max(|x|, 1e-12), from the op's
    float32 dx (= scale r A, A the gradient of x_hat): r (A - (x_hat . A) x_hat) = dx - r^2 (x .
    dx) x, formed in float32 and rounded once to x's dtype.  Summed by autograd after two
    roundings, the two terms cancel wherever A is near x_hat (a confident or clustered row):
    SupCon bf16 gradients 3-6x the floor, HCL 40x.  The radial part comes from dx itself, not
    from the kernels' d r (= scale x . A, summed from their float32 dS where dx's product took dS
    rounded to 16 bits): so the projection removes exactly the radial part of the dx it is given,
    and rows whose A is radial (features collapsed to one direction) get 0, not 2^-9 of |A|
    (bfloat16, CUDA and Triton kernels: 3.6e-2 where the exact gradient is 0)."""
    if r is not None:
        xf = x.float()
        c = torch.where(r < _RSCALE_CLAMP, (xf * dx).sum(1) * r * r, torch.zeros_like(r))
        dx = dx - c[:, None] * xf
    return dx.to(x.dtype)


def _make_lse_backward(bwd):
    def backward(ctx, grad_row, grad_col, _grad_target_state):
        q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, row, col, xt = ctx.saved_tensors
        nq, nk, ns, nqr, nkr, nb = ctx.needs_input_grad[:6]
        nqr, nkr, nb = nqr and q_rscale is not None, nkr and k_rscale is not None, nb and col_bias is not None
        norm = ctx.ints[1] & LSE_NORM  # (fam.lse refuses rscales that need a gradient: folded into dq / dk)
        dq, dk, ds, db, dqr, dkr = bwd(
            grad_row.float().contiguous(), grad_col.float().contiguous(), q, k, scale, q_rscale, k_rscale, col_bias,
            pos_index, q_labels, k_labels, ctx.ints[0], ctx.ints[1], row, col, xt, nq, nk, ns, nb, nqr, nkr)
        if norm:
            if nq and nk and ctx.same_qk:
                # one tensor on both sides: fold the sum (autograd would add two rounded halves)
                dq = _fold_norm(q, q_rscale, dq + dk)
                dk = torch.zeros_like(k)
            else:
                dq = _fold_norm(q, q_rscale, dq) if nq else dq
                dk = _fold_norm(k, k_rscale, dk) if nk else dk
        return (_none_unless(nq, dq), _none_unless(nk, dk), _none_unless(ns, ds), _none_unless(nqr, dqr),
                _none_unless(nkr, dkr), _none_unless(nb, db), None, None, None, None, None, None)
    return backward


def _pairwise_setup(ctx, inputs, output):
    q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode = inputs
    ctx.save_for_backward(q, k, scale, bias, row_offset, q_labels, k_labels)
    ctx.ints = (diag_offset, mode)


def _make_pairwise_backward(bwd):
    def backward(ctx, grad_row):
        q, k, scale, bias, row_offset, q_labels, k_labels = ctx.saved_tensors
        nq, nk, ns, nb, no = ctx.needs_input_grad[:5]
        no = no and row_offset is not None
        dq, dk, ds, db, do = bwd(grad_row.float().contiguous(), q, k, scale, bias, row_offset, q_labels, k_labels,
                                 ctx.ints[0], ctx.ints[1], nq, nk, ns, nb, no)
        return (_none_unless(nq, dq), _none_unless(nk, dk), _none_unless(ns, ds), _none_unless(nb, db),
                _none_unless(no, do), None, None, None, None)
    return backward


def _xcorr_setup(ctx, inputs, output):
    a, b, path = inputs
    ctx.save_for_backward(a, b)
    ctx.path = path


def _make_xcorr_backward(bwd):
    def backward(ctx, grad_offdiag, grad_diag):
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad[:2]
        da, db = bwd(grad_offdiag.float().contiguous(), grad_diag.float().contiguous(), a, b, ctx.path, na, nb)
        return _none_unless(na, da), _none_unless(nb, db), None
    return backward


def _similarity_setup(ctx, inputs, output):
    a, b, scale, normalize = inputs
    ctx.save_for_backward(a, b, scale)
    ctx.normalize = normalize


def _make_similarity_backward(bwd):
    def backward(ctx, grad):
        a, b, scale = ctx.saved_tensors
        na, nb, ns = ctx.needs_input_grad[:3]
        da, db, ds = bwd(grad.contiguous(), a, b, scale, ctx.normalize, na, nb, ns)
        return _none_unless(na, da), _none_unless(nb, db), _none_unless(ns, ds), None
    return backward


FAMILY_SPECS = {
    # family: (fake fwd, fake bwd, setup_context, backward factory)
    "lse": (_lse_forward_fake, _lse_backward_fake, _lse_setup, _make_lse_backward),
    "pairwise": (_pairwise_forward_fake, _pairwise_backward_fake, _pairwise_setup, _make_pairwise_backward),
    "xcorr": (_xcorr_forward_fake, _xcorr_backward_fake, _xcorr_setup, _make_xcorr_backward),
    "similarity": (_similarity_forward_fake, _similarity_backward_fake, _similarity_setup, _make_similarity_backward),
}


def _named_op(name: str, suffix: str = ""):
    return getattr(getattr(torch.ops, NS), f"{name}{suffix}")


def _register(family: str, fwd_name: str, bwd_name: str) -> None:
    fake_fwd, fake_bwd, setup, make_backward = FAMILY_SPECS[family]
    torch.library.register_fake(f"{NS}::{fwd_name}")(fake_fwd)
    torch.library.register_fake(f"{NS}::{bwd_name}")(fake_bwd)
    bwd_op = _named_op(bwd_name)
    torch.library.register_autograd(f"{NS}::{fwd_name}", make_backward(bwd_op), setup_context=setup)


# ---------------------------------------------------------------- native (C++) ops
if _C is not None:
    for _fam in FAMILY_SPECS:
        _register(_fam, f"{_fam}_forward", f"{_fam}_backward")


# ------------------------------------------------------------------- Triton ops
def _triton_module(family):
    import importlib
    return importlib.import_module(f"contrastive_kernels.kernels.{family}")


def _no_autocast(fn):
    """`fn` run with torch.autocast disabled: the Triton ops' Python implementations, as the
    C++ ones (csrc/no_autocast.h), so that an op's own PyTorch steps keep their dtypes when a
    backward runs inside an autocast region; and the public functions' bodies
    (functional._amp_boundary)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@torch.library.custom_op(f"{NS}::lse_forward_triton", mutates_args=())
@_no_autocast
def _lse_forward_triton(q: Tensor, k: Tensor, scale: Tensor, q_rscale: Optional[Tensor], k_rscale: Optional[Tensor],
                        col_bias: Optional[Tensor], pos_index: Optional[Tensor], q_labels: Optional[Tensor],
                        k_labels: Optional[Tensor], diag_offset: int, mask_mode: int,
                        compute_col: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_module("lse").lse_forward(q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels,
                                             k_labels, diag_offset, mask_mode, compute_col)


@torch.library.custom_op(f"{NS}::lse_backward_triton", mutates_args=())
@_no_autocast
def _lse_backward_triton(grad_row: Tensor, grad_col: Tensor, q: Tensor, k: Tensor, scale: Tensor,
                         q_rscale: Optional[Tensor], k_rscale: Optional[Tensor], col_bias: Optional[Tensor],
                         pos_index: Optional[Tensor], q_labels: Optional[Tensor], k_labels: Optional[Tensor],
                         diag_offset: int, mask_mode: int, row_lse: Tensor, col_lse: Tensor, target_state: Tensor,
                         need_q: bool, need_k: bool, need_scale: bool, need_bias: bool, need_q_rscale: bool,
                         need_k_rscale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _triton_module("lse").lse_backward(grad_row, grad_col, q, k, scale, q_rscale, k_rscale, col_bias,
                                              pos_index, q_labels, k_labels, diag_offset, mask_mode, row_lse,
                                              col_lse, target_state, need_q, need_k, need_scale, need_bias,
                                              need_q_rscale, need_k_rscale)


@torch.library.custom_op(f"{NS}::pairwise_forward_triton", mutates_args=())
@_no_autocast
def _pairwise_forward_triton(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, row_offset: Optional[Tensor],
                             q_labels: Optional[Tensor], k_labels: Optional[Tensor], diag_offset: int,
                             mode: int) -> Tensor:
    return _triton_module("pairwise").pairwise_forward(q, k, scale, bias, row_offset, q_labels, k_labels,
                                                       diag_offset, mode)


@torch.library.custom_op(f"{NS}::pairwise_backward_triton", mutates_args=())
@_no_autocast
def _pairwise_backward_triton(grad_row: Tensor, q: Tensor, k: Tensor, scale: Tensor, bias: Tensor,
                              row_offset: Optional[Tensor], q_labels: Optional[Tensor], k_labels: Optional[Tensor],
                              diag_offset: int, mode: int, need_q: bool, need_k: bool, need_scale: bool,
                              need_bias: bool, need_offset: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _triton_module("pairwise").pairwise_backward(grad_row, q, k, scale, bias, row_offset, q_labels, k_labels,
                                                        diag_offset, mode, need_q, need_k, need_scale, need_bias,
                                                        need_offset)


@torch.library.custom_op(f"{NS}::xcorr_forward_triton", mutates_args=())
@_no_autocast
def _xcorr_forward_triton(a: Tensor, b: Tensor, path: int) -> tuple[Tensor, Tensor]:
    return _triton_module("xcorr").xcorr_forward(a, b, path)


@torch.library.custom_op(f"{NS}::xcorr_backward_triton", mutates_args=())
@_no_autocast
def _xcorr_backward_triton(grad_offdiag: Tensor, grad_diag: Tensor, a: Tensor, b: Tensor, path: int, need_a: bool,
                           need_b: bool) -> tuple[Tensor, Tensor]:
    return _triton_module("xcorr").xcorr_backward(grad_offdiag, grad_diag, a, b, path, need_a, need_b)


@torch.library.custom_op(f"{NS}::similarity_forward_triton", mutates_args=())
@_no_autocast
def _similarity_forward_triton(a: Tensor, b: Tensor, scale: Tensor, normalize: bool) -> Tensor:
    return _triton_module("similarity").similarity_forward(a, b, scale, normalize)


@torch.library.custom_op(f"{NS}::similarity_backward_triton", mutates_args=())
@_no_autocast
def _similarity_backward_triton(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, normalize: bool, need_a: bool,
                                need_b: bool, need_scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_module("similarity").similarity_backward(grad, a, b, scale, normalize, need_a, need_b, need_scale)


for _fam in FAMILY_SPECS:
    _register(_fam, f"{_fam}_forward_triton", f"{_fam}_backward_triton")


# Two scales of one score matrix in one pass (HCL's l(S1) - l(S0); csrc/op_schemas.h's lse2 ops):
# internal ops of _LseTwoScales (its autograd, no registered autograd of their own).  Triton
# (kernels/lse.py), the C++ CPU and CUDA kernels (the native lse2_forward / lse2_backward, the
# emulator's *_cuda_emu).
def _lse2_forward_fake(q, k, scale1, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode):
    return _f32_empty(q, (q.shape[0],)), _f32_empty(q, (q.shape[0],))


def _lse2_backward_fake(grad1, grad0, q, k, scale1, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode,
                        row1, row0, need_q, need_k, need_scale1, need_scale0, need_q_rscale, need_k_rscale):
    def opt(flag, shape):
        return _f32_empty(q, shape if flag else _EMPTY)
    return (opt(need_q, tuple(q.shape)), opt(need_k, tuple(k.shape)), opt(need_scale1, ()), opt(need_scale0, ()),
            opt(need_q_rscale and q_rscale is not None, (q.shape[0],)),
            opt(need_k_rscale and k_rscale is not None, (k.shape[0],)))


def _register_lse2(suffix: str) -> None:
    torch.library.register_fake(f"{NS}::lse2_forward{suffix}")(_lse2_forward_fake)
    torch.library.register_fake(f"{NS}::lse2_backward{suffix}")(_lse2_backward_fake)


@torch.library.custom_op(f"{NS}::lse2_forward_triton", mutates_args=())
@_no_autocast
def _lse2_forward_triton(q: Tensor, k: Tensor, scale1: Tensor, scale0: Tensor, q_rscale: Optional[Tensor],
                         k_rscale: Optional[Tensor], pos_index: Optional[Tensor], diag_offset: int,
                         mask_mode: int) -> tuple[Tensor, Tensor]:
    return _triton_module("lse").lse2_forward(q, k, scale1, scale0, q_rscale, k_rscale, pos_index, diag_offset,
                                              mask_mode)


@torch.library.custom_op(f"{NS}::lse2_backward_triton", mutates_args=())
@_no_autocast
def _lse2_backward_triton(grad1: Tensor, grad0: Tensor, q: Tensor, k: Tensor, scale1: Tensor, scale0: Tensor,
                          q_rscale: Optional[Tensor], k_rscale: Optional[Tensor], pos_index: Optional[Tensor],
                          diag_offset: int, mask_mode: int, row1: Tensor, row0: Tensor, need_q: bool, need_k: bool,
                          need_scale1: bool, need_scale0: bool, need_q_rscale: bool,
                          need_k_rscale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _triton_module("lse").lse2_backward(grad1, grad0, q, k, scale1, scale0, q_rscale, k_rscale, pos_index,
                                               diag_offset, mask_mode, row1, row0, need_q, need_k, need_scale1,
                                               need_scale0, need_q_rscale, need_k_rscale)


_register_lse2("_triton")


# ------------------------------------------- one-pass forward and gradient (pairwise)
# ``pairwise_fused`` (native; csrc/op_schemas.h) / ``pairwise_fused_triton``: the total of the
# per-row sums and its gradients for an upstream gradient of 1, computed in the forward
# (float32), so that the backward only scales them by the upstream scalar.  Used where a
# loss is a multiple of that total (SigLIP, PML's NT-Xent) and an input needs a gradient:
# one pass over the tiles instead of a forward and a backward.  Kernels: C++ CPU (3 GEMMs
# per tile instead of 4), Triton and CUDA (the backward's row and column passes with a
# unit upstream, the row pass also summing the terms: 2 passes instead of 3).
_FUSED_BACKENDS = ("cpu", "triton", "cuda")
_FUSED_GRADS = 5  # dq, dk, dscale, dbias, drow_offset: the gradients of inputs 0..4


def _pairwise_fused_fake(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode, need_q, need_k,
                         need_scale, need_bias, need_offset):
    def grad(flag, shape):
        return _f32_empty(q, shape if flag else _EMPTY)
    return (_f32_empty(q, ()), grad(need_q, tuple(q.shape)), grad(need_k, tuple(k.shape)), grad(need_scale, ()),
            grad(need_bias, ()), grad(need_offset, (q.shape[0],)))


def _pairwise_fused_setup(ctx, inputs, output):
    grads = output[1:]
    ctx.save_for_backward(*grads)
    ctx.mark_non_differentiable(*grads)
    ctx.flags = tuple(inputs[9:14])
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs[:_FUSED_GRADS])


def _pairwise_fused_backward(ctx, grad_total, *unused):
    out = [None] * 14
    for idx, (needed, computed, d, dt) in enumerate(zip(ctx.needs_input_grad[:_FUSED_GRADS], ctx.flags,
                                                        ctx.saved_tensors, ctx.dtypes)):
        if needed:
            if not computed:
                raise RuntimeError(f"pairwise_fused: input {idx} needs a gradient but its need_* flag was false")
            out[idx] = (grad_total * d).to(dt)
    return tuple(out)


def _register_fused(name: str) -> None:
    torch.library.register_fake(f"{NS}::{name}")(_pairwise_fused_fake)
    torch.library.register_autograd(f"{NS}::{name}", _pairwise_fused_backward, setup_context=_pairwise_fused_setup)


if _C is not None:
    _register_fused("pairwise_fused")


@torch.library.custom_op(f"{NS}::pairwise_fused_triton", mutates_args=())
@_no_autocast
def _pairwise_fused_triton(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, row_offset: Optional[Tensor],
                           q_labels: Optional[Tensor], k_labels: Optional[Tensor], diag_offset: int, mode: int,
                           need_q: bool, need_k: bool, need_scale: bool, need_bias: bool,
                           need_offset: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _triton_module("pairwise").pairwise_fused(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset,
                                                     mode, need_q, need_k, need_scale, need_bias, need_offset)


_register_fused("pairwise_fused_triton")

# The CUDA kernels on the CPU emulator (tests; see _ext.cuda_emulate): same contracts.
if _C is not None and _ext.load_cuda_emu() is not None:
    for _fam in FAMILY_SPECS:
        _register(_fam, f"{_fam}_forward_cuda_emu", f"{_fam}_backward_cuda_emu")
    _register_fused("pairwise_fused_cuda_emu")


def _has_op(name: str) -> bool:
    return hasattr(getattr(torch.ops, NS), name)


# Op suffixes with the lse2 ops: "_triton", and "" (the native ops: C++ CPU and, in a CUDA build, CUDA
# kernels) / "_cuda_emu" (the emulator's) where the build has them.
_TWO_SCALES_FUSED = ("_triton",) + tuple(sfx for sfx in ("", "_cuda_emu") if _has_op(f"lse2_forward{sfx}"))
for _sfx in _TWO_SCALES_FUSED[1:]:
    _register_lse2(_sfx)


# ------------------------------------------------------------- family entry points
def _suffix(backend: str, x: Tensor) -> str:
    """Op name suffix of a backend: the Triton ops, the CUDA emulator's ops (cuda on CPU
    tensors, CONTRASTIVE_KERNELS_CUDA_EMULATE=1), or the native ops (CPU / CUDA by device)."""
    if backend == "triton":
        return "_triton"
    if backend == "cuda" and x.device.type == "cpu":
        return "_cuda_emu"
    return ""


def _op(family: str, backend: str, x: Tensor, part: str = "forward"):
    return _named_op(f"{family}_{part}", _suffix(backend, x))


def _check_detached_rscales(q_rscale, k_rscale) -> None:
    """LSE_NORM folds the rscales' gradients into the inputs' (_fold_norm): they must come detached."""
    for name, r in (("q_rscale", q_rscale), ("k_rscale", k_rscale)):
        if r is not None and r.requires_grad:
            raise ValueError(f"mask_mode bit 32 (LSE_NORM) folds {name}'s gradient into the input's: pass it "
                             f"detached (1 / max(|x|, 1e-12) of the input itself)")


def lse(backend: str, q: Tensor, k: Tensor, scale: Tensor, *, q_rscale=None, k_rscale=None, col_bias=None,
        pos_index=None, q_labels=None, k_labels=None, diag_offset: int = 0, mask_mode: int = 0,
        compute_col: bool = False):
    """(row_lse, col_lse) of the log-sum-exp family (cross-entropies with LSE_TARGET); see
    csrc/op_schemas.h for the contract.  LSE_NORM: q_rscale / k_rscale are q's and k's own
    1 / max(|x|, 1e-12), passed without autograd history: their Jacobian reaches q and k
    folded into dq / dk (see _fold_norm)."""
    if mask_mode & LSE_NORM:
        _check_detached_rscales(q_rscale, k_rscale)
    if backend == FAMILY_REFERENCE:
        return reference.lse_family(q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels,
                                    diag_offset, mask_mode, compute_col)
    row, col = _op("lse", backend, q)(q.contiguous(), k.contiguous(), scale, q_rscale, k_rscale, col_bias, pos_index,
                                      q_labels, k_labels, int(diag_offset), int(mask_mode), bool(compute_col))[:2]
    if backend == "cuda" and mask_mode & LSE_LABELS and not mask_mode & LSE_NORM:
        # The CUDA labels forward keeps a kept -inf logit as exp(-inf) = 0 (turning it into NaN
        # cost that kernel a block per SM: bench/NOTES.md); with LSE_NORM the zero rscale of an
        # infinite row makes its logits NaN already.  An infinite input: NaN (SPEC).
        row = row + _nonfinite_guard(q, k)
    return row, col


class _LseTwoScales(torch.autograd.Function):
    """The row log-sum-exps of one masked score matrix at two scales (the lse ops' forward, twice)
    with one backward: both ops' gradients in float32 (LSE_NORM's output, whatever the input
    dtype), summed, the normalization folded in and rounded once.  A loss that subtracts the two
    (HCL's reweighting, l(s1) - l(s0)) has nearly cancelling halves: autograd would add them
    after rounding each to the input dtype (bfloat16 gradients on confident rows 2-3x the floor
    single-process, up to 4.2x distributed).  qa / ka are the autograd inputs that receive dq /
    dk: q / k themselves (rounded to their dtype), or float32 copies of them (not rounded: the
    caller's other float32 terms of the same input join them before autograd's one rounding);
    qc / kc (detached) are what the kernels read.  Where the backend has them (_TWO_SCALES_FUSED),
    the lse2 ops do both scales in one pass over the tiles (one product per tile; the backward's
    dS of both scales summed before its product): half the work of the lse ops twice."""

    @staticmethod
    def forward(ctx, qa, ka, scale1, scale0, qc, kc, q_rscale, k_rscale, pos_index, diag_offset, mask_mode, sfx, same,
                fused):
        if same:  # (k's three passed as None: torch.compile traces no tensor passed twice to apply)
            ka, kc, k_rscale = qa, qc, q_rscale
        ctx.fused = fused
        if fused:
            row1, row0 = _named_op("lse2_forward", sfx)(qc, kc, scale1, scale0, q_rscale, k_rscale, pos_index,
                                                        diag_offset, mask_mode)
            ctx.save_for_backward(qa, ka, qc, kc, scale1, scale0, q_rscale, k_rscale, pos_index, row1, row0)
            ctx.args = (diag_offset, mask_mode, sfx, same)
            return row1, row0
        fwd = _named_op("lse_forward", sfx)
        mode = mask_mode | LSE_NORM  # (the forward ignores the bit; the backward's float32 outputs)
        outs = [fwd(qc, kc, s, q_rscale, k_rscale, None, pos_index, None, None, diag_offset, mode, False)
                for s in (scale1, scale0)]
        ctx.save_for_backward(qa, ka, qc, kc, scale1, scale0, q_rscale, k_rscale, pos_index, *outs[0], *outs[1])
        ctx.args = (diag_offset, mode, sfx, same)
        return outs[0][0], outs[1][0]

    @staticmethod
    def backward(ctx, g1, g0):
        qa, ka, q, k, s1, s0, qr, kr, pos, *saved = ctx.saved_tensors
        diag_offset, mode, sfx, same = ctx.args
        nq, nk, ns1, ns0 = ctx.needs_input_grad[:4]
        if same:
            nk = nq
        if ctx.fused:
            row1, row0 = saved
            dq, dk, ds1, ds0, _, _ = _named_op("lse2_backward", sfx)(
                g1.float().contiguous(), g0.float().contiguous(), q, k, s1, s0, qr, kr, pos, diag_offset, mode,
                row1, row0, nq, nk, ns1, ns0, False, False)
            ds = [ds1.to(s1.dtype) if ns1 else None, ds0.to(s0.dtype) if ns0 else None]
            return _LseTwoScales._finish(qa, ka, qr, kr, dq, dk, ds, nq, nk, same)
        bwd = _named_op("lse_backward", sfx)
        none = _f32_empty(q, _EMPTY)
        dq = dk = None
        ds = []
        for s, g, (row, col, xt), ns in ((s1, g1, saved[:3], ns1), (s0, g0, saved[3:], ns0)):
            a, b, d_s, _, _, _ = bwd(g.float().contiguous(), none, q, k, s, qr, kr, None, pos, None, None, diag_offset,
                                     mode, row, col, xt, nq, nk, ns, False, False, False)
            dq, dk = (a, b) if dq is None else (dq + a, dk + b)
            ds.append(d_s.to(s.dtype) if ns else None)
        return _LseTwoScales._finish(qa, ka, qr, kr, dq, dk, ds, nq, nk, same)

    @staticmethod
    def _finish(qa, ka, qr, kr, dq, dk, ds, nq, nk, same):
        """backward's return: the float32 dq / dk folded and rounded once."""
        if same:  # one tensor on both sides: the whole sum folded and rounded once
            dq = _fold_norm(qa, qr, dq + dk) if nq else None
            dk = None
        else:
            dq = _fold_norm(qa, qr, dq) if nq else None
            dk = _fold_norm(ka, kr, dk) if nk else None
        return dq, dk, ds[0], ds[1], None, None, None, None, None, None, None, None, None, None


def lse_two_scales(backend: str, q: Tensor, k: Tensor, scale1: Tensor, scale0: Tensor, *, q_rscale=None,
                   k_rscale=None, pos_index=None, diag_offset: int = 0, mask_mode: int = 0, grad_to=None):
    """(row_lse at scale1, row_lse at scale0) of the same masked scores: `lse` twice (no column
    log-sum-exp, column bias or labels), with the two gradients summed in float32 before their one
    rounding (_LseTwoScales).  q_rscale / k_rscale as `lse` takes them with LSE_NORM (detached).
    grad_to = (qa, ka): float32 copies of q and k (q.float(), with their own autograd history) that
    receive the gradients unrounded instead of q and k."""
    if mask_mode & (LSE_TARGET | LSE_LABELS):
        raise ValueError("lse_two_scales: plain log-sum-exps only (no LSE_TARGET / LSE_LABELS bit)")
    if backend == FAMILY_REFERENCE:
        kw = dict(q_rscale=q_rscale, k_rscale=k_rscale, pos_index=pos_index, diag_offset=diag_offset,
                  mask_mode=mask_mode)
        qq, kk = grad_to if grad_to is not None else (q, k)
        return lse(backend, qq, kk, scale1, **kw)[0], lse(backend, qq, kk, scale0, **kw)[0]
    _check_detached_rscales(q_rscale, k_rscale)
    same = q is k and q_rscale is k_rscale
    qa, ka = grad_to if grad_to is not None else (q, k)
    if grad_to is not None and (qa.dtype != torch.float32 or ka.dtype != torch.float32 or (qa is ka) != same):
        raise ValueError("lse_two_scales: grad_to must be float32 copies of q and k (one tensor when q is k)")
    qc = q.detach().contiguous()
    kc = None if same else k.detach().contiguous()
    sfx = _suffix(backend, q)
    fused = sfx in _TWO_SCALES_FUSED
    return _LseTwoScales.apply(qa, None if same else ka, scale1, scale0, qc, kc, q_rscale, None if same else k_rscale,
                               pos_index, int(diag_offset), int(mask_mode), sfx, same, fused)


class _SqDistLse(torch.autograd.Function):
    """u_i = LSE_j(-t |q_i - k_j|^2) over the kept pairs, from the lse ops on the expansion
    2t q_i.k_j - t|k_j|^2 (a column bias) - t|q_i|^2, with a backward that forms each gradient as
    a weighted sum of differences, 2t sum_j w_ij (k_j - q_i), instead of autograd's difference of
    weighted sums, 2t sum_j w_ij k_j - 2t q_i sum_j w_ij.  The kernels round their weights dS to
    16 bits for the product (and autograd rounds each term to the input's dtype): where the weights
    sit on near neighbours (collapsed features, features on a line), the two sums are |q| / |k_j - q_i|
    times the result and the roundings' 2^-9 came out as bfloat16 gradient errors of 0.04-0.4 (CUDA
    and C++ CPU kernels, 7 rows on a line in 16 features).

    The inputs go to the kernels with two columns more, q' = [q, 0, 1], k' = [k, 1, 0] (zero
    padded to 16-byte rows; q'.k' = q.k): the product's own extra columns are then dq'_i[D] =
    sum_j w^_ij and dk'_j[D + 1] = sum_i w^_ij of the very weights w^ (rounded as the kernel rounds
    them) that multiplied k_j and q_i, so dq'_i[:D] - q_i dq'_i[D] is exactly sum_j w^_ij (k_j -
    q_i) up to float32 sums: the weights' rounding costs 2^-9 of the result, not of the sums.  Both
    sides are formed in float32 (LSE_NORM's float32 outputs), added when q is k, and rounded once
    to the input's dtype.  t's gradient: the kernel's d scale and column-bias sums, as autograd
    formed it."""

    @staticmethod
    def forward(ctx, q, k, t, diag_offset, mask_mode, sfx, same):
        if same:
            k = q
        qa, ka = _SqDistLse._widen(q, q.shape[1] + 1), _SqDistLse._widen(k, k.shape[1])
        tt = t.detach()
        sq_q = _SqDistLse._sq(q)
        sq_k = sq_q if same else _SqDistLse._sq(k)
        scale, col_bias = 2 * tt, -tt * sq_k
        row, col, xt = _named_op("lse_forward", sfx)(qa, ka, scale, None, None, col_bias, None, None, None,
                                                     diag_offset, mask_mode, False)
        ctx.save_for_backward(qa, ka, scale, col_bias, sq_q, sq_k, row, col, xt)
        ctx.d = q.shape[1]
        ctx.args = (diag_offset, mask_mode | LSE_NORM, sfx, same)
        return row - tt * sq_q

    @staticmethod
    def _widen(x, one):
        """x with zero columns appended up to 16-byte rows (at least two), column `one` of them 1."""
        n, d = x.shape
        pad = 16 // x.element_size()
        out = x.new_zeros((n, -(-(d + 2) // pad) * pad))
        out[:, :d] = x.detach()
        out[:, one] = 1
        return out

    @staticmethod
    def _sq(x):
        return (x.detach().float() * x.detach().float()).sum(1)

    @staticmethod
    def backward(ctx, g):
        qa, ka, scale, col_bias, sq_q, sq_k, row, col, xt = ctx.saved_tensors
        diag_offset, mode, sfx, same = ctx.args
        nq, nk, nt = ctx.needs_input_grad[:3]
        if same:
            nq = nk = nq or nk
        d = ctx.d
        dq, dk, ds, db, _, _ = _named_op("lse_backward", sfx)(
            g.float().contiguous(), _f32_empty(qa, _EMPTY), qa, ka, scale, None, None, col_bias, None, None, None,
            diag_offset, mode, row, col, xt, nq, nk, nt, nt, False, False)
        # q / k are qa / ka's first d columns (the same values)
        gq = dq[:, :d] - qa[:, :d].float() * dq[:, d:d + 1] if nq else None
        gk = dk[:, :d] - ka[:, :d].float() * dk[:, d + 1:d + 2] if nk else None
        gt = 2 * ds - (db * sq_k).sum() - (g.float() * sq_q).sum() if nt else None
        if same:
            return (gq + gk).to(qa.dtype), None, gt, None, None, None, None
        return (None if gq is None else gq.to(qa.dtype), None if gk is None else gk.to(ka.dtype), gt, None, None,
                None, None)


def lse_sqdist(backend: str, q: Tensor, k: Tensor, t: Tensor, *, diag_offset: int = 0, mask_mode: int = 0):
    """Row log-sum-exps of -t |q_i - k_j|^2 over the pairs that mask_mode keeps (MASK_DIAG /
    diag_offset as `lse` takes them): the uniformity loss's rows.  t: a 0-dim float32 tensor.
    Gradients as differences formed before any rounding (_SqDistLse)."""
    if mask_mode & ~MASK_DIAG:
        raise ValueError(f"lse_sqdist: only the MASK_DIAG bit, got mask_mode {mask_mode}")
    if backend == FAMILY_REFERENCE:
        sq_k = (k.to(t.dtype) * k.to(t.dtype)).sum(1)
        sq_q = sq_k if q is k else (q.to(t.dtype) * q.to(t.dtype)).sum(1)
        return lse(backend, q, k, 2 * t, col_bias=-t * sq_k, diag_offset=diag_offset, mask_mode=mask_mode)[0] \
            - t * sq_q
    same = q is k
    return _SqDistLse.apply(q, None if same else k, t, int(diag_offset), int(mask_mode), _suffix(backend, q), same)


def _nonfinite_guard(*xs: Tensor) -> Tensor:
    """0 where every input is finite, NaN otherwise (float32 scalar, no host sync)."""
    ok = torch.stack([torch.isfinite(x).all() for x in xs]).all()
    return torch.where(ok, 0.0, float("nan")).to(torch.float32)


def pairwise(backend: str, q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, *, row_offset=None, q_labels=None,
             k_labels=None, diag_offset: int = 0, mode: int = 0):
    """Per-row sums of the pairwise sigmoid family; see csrc/op_schemas.h for the contract."""
    if backend == FAMILY_REFERENCE:
        return reference.pairwise_family(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode)
    return _op("pairwise", backend, q)(q.contiguous(), k.contiguous(), scale, bias, row_offset, q_labels, k_labels,
                                    int(diag_offset), int(mode))


def pairwise_total(backend: str, q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, *, row_offset=None,
                   q_labels=None, k_labels=None, diag_offset: int = 0, mode: int = 0) -> Tensor:
    """Sum of `pairwise`'s per-row sums (0-dim float32).  When an input needs a gradient and
    the backend has the kernel, one fused pass computes the total and its gradients (see
    ``pairwise_fused``)."""
    if backend == FAMILY_REFERENCE:
        return reference.pairwise_family(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode).sum()
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (q, k, scale, bias, row_offset)]
    if not any(need) or backend not in _FUSED_BACKENDS:
        return pairwise(backend, q, k, scale, bias, row_offset=row_offset, q_labels=q_labels, k_labels=k_labels,
                        diag_offset=diag_offset, mode=mode).sum()
    op = _op("pairwise", backend, q, "fused")
    return op(q.contiguous(), k.contiguous(), scale, bias, row_offset, q_labels, k_labels, int(diag_offset),
              int(mode), *need)[0]


def xcorr(backend: str, a: Tensor, b: Tensor, *, path: int = 0):
    """(sum of squared off-diagonal entries of a^T b, diagonal of a^T b)."""
    if backend == FAMILY_REFERENCE:
        return reference.xcorr_family(a, b)
    return _op("xcorr", backend, a)(a.contiguous(), b.contiguous(), int(path))


def similarity(backend: str, a: Tensor, b: Tensor, scale: Tensor, normalize: bool):
    """scale * normalize(a) @ normalize(b)^T."""
    if backend == FAMILY_REFERENCE:
        return reference.normalized_similarity(a, b, scale, normalize=normalize)
    return _op("similarity", backend, a)(a.contiguous(), b.contiguous(), scale, bool(normalize))


# ------------------------------------------------ label grouping (supervised losses)
def index_sum(index: Tensor, src: Tensor, n: int) -> Tensor:
    """out[g] = sum of src[j] over j with index[j] == g, for g < n (zeros where none): the same
    bits on every run, on every device.

    Not ``index_add``: on CUDA that adds with atomics, so the order of each group's float sum (and
    its last bits) changes from run to run unless torch.use_deterministic_algorithms is on.
    ``index_put`` with accumulate=True is PyTorch's deterministic path (CUDA: the indices sorted,
    each group summed in a fixed order; CPU: sequential).  Differentiable in src (a gather)."""
    return src.new_zeros((n,) + tuple(src.shape[1:])).index_put((index,), src, accumulate=True)


@torch.library.custom_op(f"{NS}::label_group_sum", mutates_args=())
def label_group_sum(labels: Tensor, ref_labels: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """sums_i = sum of ref_j over j with ref_labels_j == labels_i (float32), counts_i = how many.

    O((N + M) D) time and memory: no N x M label-equality matrix."""
    n = labels.shape[0]
    _, inverse = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    inv_q, inv_r = inverse[:n], inverse[n:]
    groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = index_sum(inv_r, ref.float(), groups)
    counts = torch.bincount(inv_r, minlength=groups).to(torch.float32)
    return sums[inv_q], counts[inv_q]


@label_group_sum.register_fake
def _(labels, ref_labels, ref):
    return ref.new_empty((labels.shape[0], ref.shape[1]), dtype=torch.float32), \
        ref.new_empty((labels.shape[0],), dtype=torch.float32)


def _lgs_setup(ctx, inputs, output):
    labels, ref_labels, ref = inputs
    ctx.save_for_backward(labels, ref_labels)
    ctx.ref_dtype = ref.dtype


def _lgs_backward(ctx, grad_sums, grad_counts):
    labels, ref_labels = ctx.saved_tensors
    if not ctx.needs_input_grad[2]:
        return None, None, None
    # d ref_j = sum of grad_sums_i over i with labels_i == ref_labels_j: the same grouping, transposed.
    d_ref, _ = label_group_sum(ref_labels, labels, grad_sums.float().contiguous())
    return None, None, d_ref.to(ctx.ref_dtype)


label_group_sum.register_autograd(_lgs_backward, setup_context=_lgs_setup)
