"""The wgmma kernel (csrc/cuda/wgmma_gemm.cu, tile_wgmma.cuh): c = a b^T in float32 from
wgmma.mma_async tiles staged in 128-byte-swizzled shared memory, the first kernel of the wgmma
path (bench/NOTES.md "The wgmma path"); with b_kn=True, b is (k, n) and c = a b, b read N-major
(wgmma's transposed form, the layout of the backward's dX = dS Y).

On the CPU emulator (CONTRASTIVE_KERNELS_CUDA_EMULATE=1, CI) the kernel's own staging,
descriptors and fragment layout are checked against a float64 product: that checks the code
against the emulator's reading of the PTX ISA, which the GPU case then checks against the
hardware (on a compute capability 9.0 device with an sm_90a build; elsewhere the op must refuse
with an error that says why).  The products' bound: each k16 step adds 16 exact products to a
float32 accumulator, so |c - a b^T| <= steps * 2^-21 * |a| |b|^T elementwise (four float32
roundings' worth per step: room for the tensor core's undocumented accumulation, far below the
O(1) error of any misplaced element)."""
from __future__ import annotations

import math
import os

import pytest
import torch

# (m, n, k): one element; tile edges in every dimension; k not a multiple of 8 (element copies);
# several 64-deep chunks (both stages, the last one partial); more than one block each way; n and k
# multiples of 8 with partial tiles (16-byte copies up to the edges).
SIZES = [(1, 1, 1), (7, 9, 13), (64, 128, 64), (65, 129, 72), (129, 257, 200), (3, 300, 1000), (130, 200, 136)]
DTYPES = [torch.bfloat16, torch.float16]


def _misaligned(rows, cols, dtype, device):
    """A contiguous (rows, cols) matrix 2 bytes past a 16-byte boundary (the element-copy path)."""
    x = torch.randn(rows * cols + 1, device=device).to(dtype)[1:].view(rows, cols)
    assert x.data_ptr() % 16 != 0
    return x


def _inputs(m, n, k, dtype, device, misalign=False):
    if misalign:  # contiguous, but 2 bytes past a 16-byte boundary: the element-copy path
        return _misaligned(m, k, dtype, device), _misaligned(n, k, dtype, device)
    return torch.randn(m, k, device=device).to(dtype), torch.randn(n, k, device=device).to(dtype)


def _check(c, a, b, b_kn=False):
    a64, b64 = a.double(), (b.T if b_kn else b).double()
    ref = a64 @ b64.T
    bound = math.ceil(a.shape[1] / 16) * 2.0 ** -21 * (a64.abs() @ b64.abs().T)
    assert c.dtype == torch.float32 and c.shape == ref.shape
    err = (c.double() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0.0, f"wgmma_gemm: error {err.max().item():.3e} beyond the bound at {(err - bound).argmax().item()}"


# ------------------------------------------------------------------ emulator (CI)
@pytest.fixture(scope="module")
def emu_op():
    if os.environ.get("CONTRASTIVE_KERNELS_CUDA_EMULATE") != "1":
        pytest.fail("run the cuda_emu tests with CONTRASTIVE_KERNELS_CUDA_EMULATE=1")
    from contrastive_kernels import _ext
    assert _ext.load_cuda_emu() is not None, _ext.cuda_emu_error()
    return torch.ops.contrastive_kernels._wgmma_gemm_cuda_emu


@pytest.mark.cuda_emu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", SIZES)
def test_wgmma_gemm_emulated(emu_op, m, n, k, dtype):
    a, b = _inputs(m, n, k, dtype, "cpu")
    _check(emu_op(a, b), a, b)


@pytest.mark.cuda_emu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", SIZES)
def test_wgmma_gemm_emulated_b_kn(emu_op, m, n, k, dtype):
    a, b = _inputs(m, n, k, dtype, "cpu")
    bt = b.T.contiguous()  # (k, n)
    _check(emu_op(a, bt, True), a, bt, b_kn=True)


@pytest.mark.cuda_emu
@pytest.mark.parametrize("b_kn", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wgmma_gemm_emulated_unaligned(emu_op, dtype, b_kn):
    a = _misaligned(70, 96, dtype, "cpu")
    b = _misaligned(96, 130, dtype, "cpu") if b_kn else _misaligned(130, 96, dtype, "cpu")
    _check(emu_op(a, b, b_kn), a, b, b_kn)


@pytest.mark.cuda_emu
def test_wgmma_gemm_emulated_empty(emu_op):
    a, b = torch.randn(5, 0).bfloat16(), torch.randn(3, 0).bfloat16()
    assert torch.equal(emu_op(a, b), torch.zeros(5, 3))
    assert emu_op(torch.randn(0, 4).bfloat16(), torch.randn(3, 4).bfloat16()).shape == (0, 3)


@pytest.mark.cuda_emu
@pytest.mark.parametrize("a, b, message", [
    (torch.randn(4, 8), torch.randn(4, 8), "float16 or bfloat16"),
    (torch.randn(4, 8).half(), torch.randn(4, 8).bfloat16(), "same dtype"),
    (torch.randn(4, 8).half(), torch.randn(4, 9).half(), "same feature dimension"),
    (torch.randn(4).half(), torch.randn(4, 8).half(), "a must be 2-D"),
    (torch.randn(8, 4).half().T, torch.randn(4, 8).half(), "a must be contiguous"),
])
def test_wgmma_gemm_errors_name_the_argument(emu_op, a, b, message):
    with pytest.raises(RuntimeError, match=message):
        emu_op(a, b)


@pytest.mark.cuda_emu
@pytest.mark.parametrize("a, b, message", [
    (torch.randn(4, 8).half(), torch.randn(4, 8).half(), r"same feature dimension \(a.size\(1\) = 8, b.size\(0\) = 4\)"),
    (torch.randn(4, 8).half(), torch.randn(8, 5).bfloat16(), "same dtype"),
    (torch.randn(4, 8).half(), torch.randn(5, 8).half().T, "b must be contiguous"),
    (torch.randn(4, 8).half(), torch.randn(8).half(), r"b must be 2-D \(D, M\), features first"),
])
def test_wgmma_gemm_b_kn_errors_name_the_argument(emu_op, a, b, message):
    with pytest.raises(RuntimeError, match=message):
        emu_op(a, b, True)


# ------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", SIZES + [(1000, 1000, 1000), (4096, 2048, 512)])
def test_wgmma_gemm_cuda(m, n, k, dtype):
    import contrastive_kernels  # noqa: F401  (registers the op)
    from contrastive_kernels import _ext
    op = torch.ops.contrastive_kernels._wgmma_gemm
    a, b = _inputs(m, n, k, dtype, "cuda")
    if torch.cuda.get_device_capability() != (9, 0):
        with pytest.raises(RuntimeError, match="capability 9.0"):
            op(a, b)
        return
    if "9.0a" not in (_ext.build_info().get("cuda_archs") or ""):
        with pytest.raises(RuntimeError, match="sm_90a"):
            op(a, b)
        return
    _check(op(a, b), a, b)
    bt = b.T.contiguous()  # (k, n): B read N-major (the backward's dX = dS Y)
    _check(op(a, bt, True), a, bt, b_kn=True)
    if (m, n, k) == SIZES[3]:
        a, b = _inputs(m, n, k, dtype, "cuda", misalign=True)
        _check(op(a, b), a, b)
        bt = _misaligned(k, n, dtype, "cuda")
        _check(op(a, bt, True), a, bt, b_kn=True)
