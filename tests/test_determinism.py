"""Same inputs, same bits: the package's sums have a fixed order on every device.

The tile kernels (CUDA, Triton, C++) reduce in a fixed order and use no float atomics (their
own tests repeat them bitwise).  The sums done with torch ops (the label-group sums of
distributed SupCon, the pair lists of pytorch-metric-learning's mined path) go through
``_families.index_sum`` (index_put with accumulate=True: sorted, in order), not ``index_add``,
whose CUDA kernel adds with atomics.  On CPU both are sequential, so here the source scan is
the check that can fail; the repeat tests run where a CUDA GPU is present."""
from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

import contrastive_kernels
from contrastive_kernels import _families as fam
from contrastive_kernels.compat import pytorch_metric_learning as ck_pml

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Calls whose float result depends on the order of atomic adds on CUDA (or in a Triton / CUDA
# kernel).  scatter_reduce with "amax" / "amin" is order-free and allowed.
_UNORDERED = re.compile(r"\.index_add_?\(|\bindex_add\(|scatter_add_?\(|\.index_reduce_?\(|\.put_\(|"
                        r"scatter_reduce_?\([^)]*[\"'](sum|mean|prod)[\"']|tl\.atomic_(add|xchg|cas)|"
                        r"\batomicAdd\(|\bred\.global\.add")


def _sources():
    """The imported package's Python (wherever it was imported from: a checkout, an install,
    the mutation audit's copy), its Triton kernels, and the checkout's C++ / CUDA sources."""
    dirs = [(pathlib.Path(contrastive_kernels.__file__).parent, ("*.py",)), (ROOT / "kernels", ("*.py",)),
            (ROOT / "csrc", ("*.cu", "*.cuh", "*.cpp", "*.h"))]
    spec = importlib.util.find_spec("contrastive_kernels.kernels")
    if spec is not None and spec.submodule_search_locations:
        dirs += [(pathlib.Path(p), ("*.py",)) for p in spec.submodule_search_locations]
    seen = set()
    for folder, patterns in dirs:
        for pattern in patterns:
            for path in sorted(folder.rglob(pattern)):
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    yield path


def test_no_unordered_float_sums_in_the_package():
    files = list(_sources())
    assert len(files) > 20, f"the scan found only {len(files)} source files under {ROOT}"
    hits = []
    for path in files:
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if path.suffix == ".py" else line.split("//", 1)[0]
            if _UNORDERED.search(code):
                hits.append(f"{path}:{no}: {line.strip()}")
    assert not hits, ("float sums whose order is not fixed on CUDA (use _families.index_sum, or a "
                      "fixed-order reduction in the kernel):\n" + "\n".join(hits))


def test_the_scan_sees_what_it_forbids():
    for bad in ("out.index_add_(0, i, v)", "torch.index_add(out, 0, i, v)", "x.scatter_add(0, i, v)",
                "x.scatter_reduce(0, i, v, \"sum\")", "tl.atomic_add(ptr, v)", "atomicAdd(p, v);",
                "x.put_(i, v, accumulate=True)", "x.index_reduce_(0, i, v, 'mean')"):
        assert _UNORDERED.search(bad), bad
    for fine in ("x.scatter_reduce(0, i, v, \"amax\", include_self=True)", "x.index_put((i,), v, accumulate=True)",
                 "fam.index_sum(i, v, n)", "x.index_select(0, i)"):
        assert not _UNORDERED.search(fine), fine


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,rows", [(1, 1), (7, 40), (129, 7), (5, 0)])
def test_index_sum_matches_a_loop(n, rows, dtype):
    """Groups hit many times, once, never (zeros), index 0 and n - 1; 1-D and 2-D src;
    the gradient is the gather of the output's gradient."""
    g = torch.Generator().manual_seed(n * 1000 + rows)
    index = torch.randint(0, n, (rows,), generator=g)
    if rows:
        index[0], index[-1] = 0, n - 1
    for shape in ((rows,), (rows, 3)):
        src = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        out = fam.index_sum(index, src, n)
        assert out.shape == (n,) + shape[1:] and out.dtype == dtype
        want = torch.zeros((n,) + shape[1:], dtype=torch.float64)
        for j in range(rows):
            want[index[j]] += src[j].double()
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        assert torch.allclose(out.double(), want, rtol=tol, atol=tol * (1 + want.abs().max().item())), shape
        up = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
        (grad,) = torch.autograd.grad(out, [src], up)
        assert torch.equal(grad, up[index]), shape


def test_label_group_sum_matches_the_equality_matrix():
    """sums_i = sum_j [labels_i == ref_labels_j] ref_j, counts_i the number of such j, a label
    missing from ref_labels gives 0 and 0; and the gradient (the transposed grouping)."""
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 42])  # 42: in no reference row
    ref_labels = torch.randint(0, 10, (129,), generator=g)
    ref = torch.randn(129, 6, generator=g, dtype=torch.float64).float().requires_grad_()
    sums, counts = fam.label_group_sum(labels, ref_labels, ref)
    same = (labels[:, None] == ref_labels[None, :]).double()
    assert torch.allclose(sums.double(), same @ ref.double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(counts.double(), same.sum(1)) and counts[-1] == 0 and (sums[-1] == 0).all()
    up = torch.randn(sums.shape, generator=g, dtype=torch.float64).float()
    (grad,) = torch.autograd.grad(sums, [ref], up)
    assert torch.allclose(grad.double(), same.T @ up.double(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ on a GPU
def _cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _repeat(fn, times=4):
    first = fn()
    for _ in range(times - 1):
        again = fn()
        for a, b in zip(first, again):
            assert torch.equal(a, b), "two runs on the same inputs gave different bits"
    return first


@_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_sums_repeat_bitwise_on_cuda(dtype):
    """Many rows per group (the case where atomic adds reorder): 2^16 rows in 3 groups."""
    g = torch.Generator(device="cuda").manual_seed(1)
    ref = torch.randn(1 << 16, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    ref_labels = torch.randint(0, 3, (1 << 16,), device="cuda", generator=g)
    labels = torch.randint(0, 3, (1 << 12,), device="cuda", generator=g)
    up = torch.randn(1 << 12, 64, device="cuda", generator=g)

    def run():
        sums, counts = fam.label_group_sum(labels, ref_labels, ref)
        (grad,) = torch.autograd.grad(sums, [ref], up)
        idx = fam.index_sum(ref_labels, ref.detach().float()[:, 0], 3)
        return sums, counts, grad, idx
    _repeat(run)


@_cuda
@pytest.mark.parametrize("loss", ["NTXentLoss", "SupConLoss"])
def test_pml_mined_pairs_repeat_bitwise_on_cuda(loss):
    """pytorch-metric-learning's path with a miner's pairs: every anchor in ~1000 pairs, every
    reference row in ~1000; loss and both gradients the same bits on every run."""
    g = torch.Generator(device="cuda").manual_seed(2)
    emb = torch.randn(256, 32, device="cuda", generator=g).requires_grad_()
    ref = torch.randn(512, 32, device="cuda", generator=g).requires_grad_()
    a1, p = torch.randint(0, 256, (1 << 17,), device="cuda", generator=g), \
        torch.randint(0, 512, (1 << 17,), device="cuda", generator=g)
    a2, n = torch.randint(0, 256, (1 << 18,), device="cuda", generator=g), \
        torch.randint(0, 512, (1 << 18,), device="cuda", generator=g)
    # a pair may not be both positive and negative: positives in even columns, negatives in odd ones
    p, n = p - p % 2, n - n % 2 + 1
    module = getattr(ck_pml, loss)(0.2)

    def run():
        out = module(emb, None, (a1, p, a2, n), ref_emb=ref)
        return (out,) + torch.autograd.grad(out, [emb, ref])
    _repeat(run)
