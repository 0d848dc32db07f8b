"""Small helpers shared by the Triton kernel modules (kept small and stable).

* ``INTERPRET``: running under ``TRITON_INTERPRET=1`` (CPU tensors).  Modules then
  launch one small fixed tile config instead of autotuning (the autotuner would run
  every config through the slow interpreter).
* ``pad_dim``: a feature dimension padded to a power of two >= 16 (tl.dot needs K >= 16).
* ``is_ieee``: float32 inputs are multiplied with ``input_precision="ieee"`` (TF32 is
  off by SPEC.md; the 1e-5 tolerance needs full float32 products).
* ``launch``: run a kernel either autotuned (GPU) or with a fixed config (interpreter).
* ``half_ds_scale``: the power-of-two factor that keeps float16 dS tiles out of underflow.
* ``smem_limit``: the shared memory a block may use on a tensor's device, for the autotune
  config pruning (A100: 163 KiB, H100: 227 KiB).
* ``col_splits``: how many column splits a launch gets where its programs alone would leave
  SMs idle (CONTRASTIVE_KERNELS_TRITON_COL_SPLITS=n forces n); ``split_range`` a split's share
  of the inner loop; ``split_parts`` / ``sum_splits`` the float32 partial outputs and their sum.
* ``log1p`` / ``expm1_neg``: log(1 + z) and exp(-c) - 1 to float32's relative rounding for
  small arguments (a confident row's cross-entropy and its p - 1), from series where a GPU's
  approximate log / exp near 1 would leave an absolute error of ~1e-7.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 200 * 1024)


def smem_limit(t: torch.Tensor) -> int:
    """Bytes of shared memory one block may use on t's device (opt-in maximum); 200 KiB off a GPU."""
    if t.device.type != "cuda":
        return 200 * 1024
    return _smem_limit(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


SPLIT_WAVE = 2  # programs per SM a split launch aims for
SPLIT_MIN_COLS = 256  # columns per split at least (a split's loop 1-4 tiles deep)
SPLIT_BUDGET = 32 << 20  # bytes of float32 partial outputs a split launch may allocate


def col_splits(programs: int, inner: int, min_tile: int, device, bytes_per_split: int = 0) -> int:
    """Column splits for a launch of `programs` programs (counted at the largest tiles) that each
    walk `inner` columns in tiles of at least `min_tile`: 1 (none) off a GPU or where the programs
    fill SPLIT_WAVE per SM; else as many as do, each at least SPLIT_MIN_COLS columns, the partial
    outputs (`bytes_per_split` each) within SPLIT_BUDGET.  CONTRASTIVE_KERNELS_TRITON_COL_SPLITS=n
    forces n.  Always in [1, column tiles] and the grid's 65535."""
    env = os.environ.get("CONTRASTIVE_KERNELS_TRITON_COL_SPLITS", "")
    if env:
        want = int(env)
    elif device.type != "cuda":
        return 1
    else:
        wave = SPLIT_WAVE * sm_count(device)
        want = 1 if programs >= wave else min(wave // max(programs, 1), inner // SPLIT_MIN_COLS)
        if bytes_per_split:
            want = min(want, SPLIT_BUDGET // bytes_per_split)
    return max(1, min(want, triton.cdiv(inner, min_tile), 65535))


def split_parts(splits: int, t, *shape):
    """The float32 partial outputs [splits, *shape] of a split launch standing in for output `t`;
    `t` itself with one split (or None for an output not wanted)."""
    if splits == 1 or t is None:
        return t
    return torch.empty((splits, *shape), dtype=torch.float32, device=t.device)


def sum_splits(pairs) -> None:
    """Each (output, parts) of split_parts: the parts summed over the split axis into the output, in
    split order (a fixed-order reduction, one rounding to the output's dtype)."""
    for out, parts in pairs:
        if parts is not None and parts is not out:
            out.copy_(parts.sum(0))


@triton.jit
def split_range(AXIS: tl.constexpr, L, BLOCK: tl.constexpr):
    """[lo, hi) of the L inner indices that this program's split (grid axis AXIS) walks: whole
    tiles of BLOCK, the splits' shares as even as that allows (a late one may be empty)."""
    share = tl.cdiv(tl.cdiv(L, BLOCK), tl.num_programs(AXIS)) * BLOCK
    lo = tl.program_id(AXIS) * share
    return lo, tl.minimum(L, lo + share)


def pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(max(int(d), 1)))


def is_ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with float32 accumulation.  IEEE: float32 operands multiplied exactly (no
    TF32).  Under the interpreter, bfloat16 operands arrive with IEEE set and are widened
    first (exactly): the interpreter's own bfloat16 tl.dot is wrong (triton-lang/triton#4972);
    the GPU path never takes this branch."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def half_ds_scale(dtype: torch.dtype, device, *grads) -> torch.Tensor:
    """(1,) float32 power of two c for a float16 backward's dS tiles.

    A backward multiplies dS (upstream gradient times a probability or a sigmoid, in
    float32) with float16 rows in a float16 tl.dot.  With a mean over a large batch the
    upstream gradient is 1/N and the probabilities ~1/M: dS ~ 1/(N M) underflows float16
    (smallest subnormal 6e-8) and the gradient is lost.  The kernels multiply dS by c
    before rounding and the float32 accumulator by 1/c after: c = 2^(14 - ceil(log2 g)),
    g = max |upstream|, puts every |c dS| <= 2 * 2^14 < 65504 (each dS term is at most g)
    and the typical entries near 1.  Exact (a power of two); computed on the device, no
    synchronization.  1 for other dtypes (bfloat16 has float32's range) and for g = 0 or
    a non-finite g."""
    one = torch.ones(1, dtype=torch.float32, device=device)
    gs = [g for g in grads if g is not None and g.numel() > 0]
    if dtype != torch.float16 or not gs:
        return one
    gmax = torch.stack([g.detach().abs().amax().float() for g in gs]).amax().reshape(1)
    ok = torch.isfinite(gmax) & (gmax > 0)
    e = torch.clamp(14.0 - torch.ceil(torch.log2(torch.where(ok, gmax, one))), -100.0, 100.0)
    return torch.where(ok, torch.exp2(e), one)


def launch(jit_fn, tuned_fn, grid, interp_meta: dict, *args, **kwargs):
    """``tuned_fn[grid](...)`` on a GPU; ``jit_fn[grid](..., **interp_meta)`` under the interpreter.

    `grid` is a function of the meta-parameters (a dict) as for triton.autotune."""
    if INTERPRET:
        meta = dict(kwargs, **interp_meta)
        num_warps = meta.pop("num_warps", 4)
        num_stages = meta.pop("num_stages", 1)
        return jit_fn[grid(meta)](*args, num_warps=num_warps, num_stages=num_stages, **meta)
    return tuned_fn[grid](*args, **kwargs)


@triton.jit
def log1p(z):
    """log(1 + z), z >= 0, relative to itself however small z is: 2 atanh(w), w = z / (2 + z),
    by its series below 1/4 (|w| < 1/9: four terms, relative error < 3e-9), log(1 + z) above
    (>= 0.22 there: the rounding of 1 + z and an approximate log stay relative)."""
    w = z / (2.0 + z)
    w2 = w * w
    series = 2.0 * w * (1.0 + w2 * (0.3333333333333333 + w2 * (0.2 + w2 * 0.14285714285714285)))
    return tl.where(z < 0.25, series, tl.log(1.0 + z))


@triton.jit
def expm1_neg(c):
    """exp(-c) - 1 relative to itself however small c is: the Taylor series of e^x - 1 at x = -c
    below |x| = 1/2 (nine terms, relative error < 1e-9), exp(-c) - 1 above (>= 0.39 in size)."""
    x = -c
    p = 1.0 + x * (0.5 + x * (0.16666666666666666 + x * (0.041666666666666664 + x * (
        0.008333333333333333 + x * (0.001388888888888889 + x * (0.0001984126984126984 + x * (
            2.48015873015873e-05 + x * 2.7557319223985893e-06)))))))
    return tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)
