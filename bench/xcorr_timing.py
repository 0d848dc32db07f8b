"""Timing of the cross-correlation family on CPU (not a test).

1. Barlow Twins and VICReg fwd+bwd at N x D (default 256 x 8192, float32) on the fused
   cpu backend (auto path) against the facebookresearch formulas (BatchNorm1d + the D x D
   matrix; vicreg: the D x D covariances).
2. The crossover batch size at which the tiled path (D x D tiles, O(N D^2)) beats the Gram
   path (N x N float64 Gram matrices, O(N^2 D)) for the xcorr family fwd+bwd at D; the auto
   rule in csrc/cpu/xcorr.cpp (Gram when N * kGramCrossover < D) should follow it.

    python bench/xcorr_timing.py [--n 256] [--d 8192] [--crossover 512,1024,2048,3072]

Wall-clock times on a shared machine are indicative only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from contrastive_kernels import _families as fam


def _off_diagonal(x):
    n, m = x.shape
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def fb_barlow(z1, z2, lambd=0.0051):
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False)
    c = bn(z1).T @ bn(z2)
    c.div_(z1.shape[0])
    return torch.diagonal(c).add_(-1).pow_(2).sum() + lambd * _off_diagonal(c).pow_(2).sum()


def fb_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow_(2).sum().div(d) + _off_diagonal(cov_y).pow_(2).sum().div(d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def time_fwd_bwd(fn, z1, z2, repeat):
    times = []
    for i in range(repeat + 1):
        a = z1.detach().clone().requires_grad_()
        b = z2.detach().clone().requires_grad_()
        t = time.perf_counter()
        fn(a, b).backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--d", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--crossover", default="512,1024,2048,3072", help="batch sizes for the path crossover at --d")
    p.add_argument("--skip-losses", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    if not args.skip_losses:
        n, d = args.n, args.d
        z1 = torch.randn(n, d)
        z2 = 0.6 * z1 + 0.5 * torch.randn(n, d)
        print(f"\nfwd+bwd, N={n}, D={d}, float32 (median of {args.repeat})")
        for name, ours, theirs in (
                ("barlow_twins", lambda a, b: ck.barlow_twins_loss(a, b, backend="cpu"), fb_barlow),
                ("vicreg", lambda a, b: ck.vicreg_loss(a, b, backend="cpu"), fb_vicreg)):
            t_ours = time_fwd_bwd(ours, z1, z2, args.repeat)
            t_fb = time_fwd_bwd(theirs, z1, z2, args.repeat)
            print(f"  {name:13s} contrastive_kernels cpu {t_ours * 1e3:9.1f} ms | facebookresearch "
                  f"{t_fb * 1e3:9.1f} ms | speed-up {t_fb / t_ours:5.1f}x")

    d = args.d
    print(f"\nxcorr family fwd+bwd, D={d}: Gram (path 1) vs tiled (path 2), float32 inputs")
    for n in [int(s) for s in args.crossover.split(",") if s]:
        a = torch.randn(n, d)
        b = torch.randn(n, d)
        row = []
        for path in (1, 2):
            def fn(x, y, path=path):
                off, diag = fam.xcorr("cpu", x, y, path=path)
                return off + diag.sum()
            row.append(time_fwd_bwd(fn, a, b, max(1, args.repeat - 2)))
        faster = "gram" if row[0] < row[1] else "tiled"
        print(f"  N={n:6d}  gram {row[0] * 1e3:9.1f} ms  tiled {row[1] * 1e3:9.1f} ms  -> {faster}")


if __name__ == "__main__":
    main()
