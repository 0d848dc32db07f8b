"""Gradient error of the fused backends on confident rows (the positive near probability 1),
against the float64 reference on the same rounded inputs: the regime where a cross-entropy's
gradient p - 1 is small and any implementation that forms it from two rounded terms loses it.

    python bench/confident_gradients.py [--backends cpu,cuda] [--n 64] [--d 32]

(`cuda` on a CPU machine: build with CONTRASTIVE_KERNELS_BUILD_CUDA_EMU=1 and set
CONTRASTIVE_KERNELS_CUDA_EMULATE=1.)  Rows: CLIP at logit scale 100 and InfoNCE with extra
negatives at temperature 0.01; text / keys are the images / queries plus noise (the larger
the noise, the higher the loss).  Printed: loss, relative error of the first input's
gradient (norm of the difference over norm of the reference), and the floor: the error of
the reference backend run in the input dtype (float32 math, the gradient rounded once to
that dtype).
"""
from __future__ import annotations

import argparse

import torch

import contrastive_kernels as ck


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _case(name, x, y, neg, be, dtype):
    a = x.to(dtype).requires_grad_()
    b = y.to(dtype).requires_grad_()
    if name == "clip":
        loss = ck.clip_loss(a, b, 100.0, backend=be)
    else:
        loss = ck.info_nce(a, b, negatives=neg.to(dtype), temperature=0.01, backend=be)
    (g,) = torch.autograd.grad(loss, [a])
    return loss.item(), g


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="cpu")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=32)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"{'case':9s} {'noise':>5s} {'backend':8s} {'dtype':9s} {'loss':>9s} {'grad err':>9s} {'floor':>9s}")
    for name in ("clip", "info_nce"):
        for noise in (1.7, 1.35, 1.15):
            x = _unit(torch.randn(args.n, args.d, generator=gen, dtype=torch.float64))
            y = _unit(x + noise * torch.randn(args.n, args.d, generator=gen, dtype=torch.float64) / args.d ** 0.5)
            neg = _unit(torch.randn(16, args.d, generator=gen, dtype=torch.float64))
            for dtype in (torch.bfloat16, torch.float32):
                xr, yr, nr = (t.to(dtype).double() for t in (x, y, neg))  # the rounded inputs, exactly
                loss64, g64 = _case(name, xr, yr, nr, "reference", torch.float64)
                _, gt = _case(name, xr, yr, nr, "reference", dtype)
                for be in args.backends.split(","):
                    _, g = _case(name, xr, yr, nr, be, dtype)
                    print(f"{name:9s} {noise:5.2f} {be:8s} {str(dtype)[6:]:9s} {loss64:9.3e} {_err(g, g64):9.2e} "
                          f"{_err(gt, g64):9.2e}")


if __name__ == "__main__":
    main()
