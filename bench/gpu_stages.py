"""The timing stages of bench/gpu_round.sh: peak, shapes, tshapes.

    python bench/gpu_stages.py STAGE [--out DIR] [--smoke]

  peak     bf16 dense matmul ceiling (torch.mm 8192^3), float32 (TF32 off), the wgmma kernel
           against torch.mm on its NT product (bf16, fp16), device copy bandwidth: DIR/peak.json
  shapes   the CUDA lse forward and backward with one and two warp groups per block
           (CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS), the forward in one pass against two
           (CONTRASTIVE_KERNELS_CUDA_FUSED_COLS=0), with wgmma against mma.sync
           (CONTRASTIVE_KERNELS_CUDA_WGMMA=1), SupCon with one and two groups, column splits
           against none at small N (CONTRASTIVE_KERNELS_CUDA_COL_SPLITS=1): DIR/bwd_shapes.json
  tshapes  the Triton lse forward in one pass against two (CONTRASTIVE_KERNELS_TRITON_FUSED_COLS=0),
           the Triton lse (fwd, fwd + bwd) and SigLIP (fwd + bwd) with and without column splits
           (CONTRASTIVE_KERNELS_TRITON_COL_SPLITS=1): DIR/triton_shapes.json

DIR is $OUT by default.  --smoke runs every case of a stage once, at tiny sizes, on the CPU:
`shapes` and `peak`'s wgmma rows through the CUDA kernels' CPU emulator (CONTRASTIVE_KERNELS_CUDA_EMULATE=1, set here),
`tshapes` through the Triton interpreter (TRITON_INTERPRET=1, which must be set before Triton is
imported: the caller sets it).  Its times mean nothing; it proves, without a GPU, that the stage
runs to its end and writes its rows (tests/test_gpu_stages.py), so that a lent GPU's minutes are
not lost to a script error.  The cases are the same code at both sizes: only the size tables and
the repetitions differ.
"""
import argparse
import json
import os
import statistics
import time

import torch


def timed(fn, reps=30, warm=5, device="cuda"):
    """(median, min, max) milliseconds of fn() over `reps` runs after `warm` unmeasured ones, each
    between two CUDA events (wall clock off the GPU)."""
    for _ in range(warm):
        fn()
    ts = []
    if device != "cuda":
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts), min(ts), max(ts)
    torch.cuda.synchronize()
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)


class Results:
    """A stage's result rows: each printed as a JSON line when added, all saved in one file with
    the device and the versions."""

    def __init__(self, device):
        self.device = device
        self.rows = []

    def add(self, row):
        print(json.dumps(row), flush=True)
        self.rows.append(row)

    def save(self, path):
        import triton
        name = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu (--smoke: times mean nothing)"
        with open(path, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "results": self.rows}, f, indent=1)
        print(f"wrote {path} ({len(self.rows)} rows)")


class Env:
    """Environment variables set for one case ("" or None: unset), restored after it."""

    def __init__(self, env):
        self.env = env

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        for k, v in self.env.items():
            if v:
                os.environ[k] = v
            else:
                os.environ.pop(k, None)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Stage:
    def __init__(self, smoke):
        self.smoke = smoke
        self.dev = "cpu" if smoke else "cuda"
        self.res = Results(self.dev)

    def timed(self, fn, reps=10, warm=3):
        """(median, min, max) milliseconds (one unwarmed run with --smoke)."""
        return timed(fn, reps=1 if self.smoke else reps, warm=0 if self.smoke else warm, device=self.dev)

    def time(self, fn, reps=10, warm=3):
        """Median milliseconds."""
        return self.timed(fn, reps, warm)[0]

    def pick(self, full, smoke):
        return smoke if self.smoke else full

    def randn(self, *shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, device=self.dev, dtype=dtype, requires_grad=grad)


def peak(st):
    n = st.pick(8192, 256)
    torch.backends.cuda.matmul.allow_tf32 = False
    x, y = st.randn(n, n, dtype=torch.bfloat16), st.randn(n, n, dtype=torch.bfloat16)
    med, lo, hi = st.timed(lambda: torch.mm(x, y), reps=30, warm=5)
    st.res.add({"what": f"torch.mm bf16 {n}^3 (random data)", "ms_median": med, "ms_min": lo, "ms_max": hi,
                "tflops": 2 * n**3 / med / 1e9})
    n = st.pick(4096, 128)
    xf, yf = st.randn(n, n), st.randn(n, n)
    med, lo, hi = st.timed(lambda: torch.mm(xf, yf), reps=30, warm=5)
    st.res.add({"what": f"torch.mm fp32 {n}^3, TF32 off", "ms_median": med, "tflops": 2 * n**3 / med / 1e9})
    mib = st.pick(256, 4)
    src = st.randn(mib * 1024 * 1024 // 4)
    dst = torch.empty_like(src)
    med, lo, hi = st.timed(lambda: dst.copy_(src), reps=30, warm=5)
    st.res.add({"what": f"device copy {mib} MiB", "ms_median": med, "tb_per_s": 2 * src.numel() * 4 / med / 1e9})
    wgmma_rate(st)  # last: a fault of the never-run wgmma kernel (a sticky CUDA error) costs no other row
    return "peak.json"


def wgmma_rate(st):
    """The wgmma kernel (csrc/cuda/wgmma_gemm.cu: 64 x 128 tiles, one warpgroup, cp.async staging)
    against torch.mm on the same product: c = a b^T (both operands K-major) and c = a b (b read
    N-major, as the backward's dX = dS Y): the rate the wgmma path's tiles reach as they are staged
    now, the r of bench/NOTES.md "The CLIP target's arithmetic"."""
    import contrastive_kernels  # noqa: F401  (registers the op)
    n = st.pick(8192, 96)
    op = torch.ops.contrastive_kernels._wgmma_gemm_cuda_emu if st.smoke else torch.ops.contrastive_kernels._wgmma_gemm
    for dtype in (torch.bfloat16, torch.float16):
        for b_kn in (False, True):
            a, b = st.randn(n, n, dtype=dtype), st.randn(n, n, dtype=dtype)
            name = f"{n}^3 {str(dtype).replace('torch.', '')} c = a {'b' if b_kn else 'b^T'}"
            try:
                c = op(a, b, b_kn)
            except RuntimeError as e:  # not a 9.0 device / not an sm_90a build: say so, time nothing
                st.res.add({"what": f"wgmma_gemm {name}", "error": str(e).splitlines()[0]})
                continue
            ref = torch.mm(a.float(), b.float() if b_kn else b.float().T)
            err = ((c - ref).abs().max() / ref.abs().max()).item()
            med, lo, hi = st.timed(lambda: op(a, b, b_kn), reps=20, warm=3)
            st.res.add({"what": f"wgmma_gemm {name}", "ms_median": med, "ms_min": lo, "ms_max": hi,
                        "tflops": 2 * n**3 / med / 1e9, "max_err_vs_fp32_mm": err})
            med = st.time(lambda: torch.mm(a, b if b_kn else b.T), reps=20, warm=3)
            st.res.add({"what": f"torch.mm {name}", "ms_median": med, "tflops": 2 * n**3 / med / 1e9})


BF16, F32 = torch.bfloat16, torch.float32


def fused_vs_two_passes(st, backend, sizes):
    """The lse forward with compute_col in one pass over S (row and column lse from each tile: the
    default) against a row pass plus a column pass (CONTRASTIVE_KERNELS_<BACKEND>_FUSED_COLS=0)."""
    import contrastive_kernels._families as fam
    var = f"CONTRASTIVE_KERNELS_{backend.upper()}_FUSED_COLS"
    for dtype, n, d in sizes:
        for fused in ("0", "1"):
            with Env({var: fused}):
                torch.manual_seed(0)
                q, k = st.randn(n, d, dtype=dtype), st.randn(n, d, dtype=dtype)
                s = torch.tensor(10.0, device=st.dev)
                ms = st.time(lambda: fam.lse(backend, q, k, s, compute_col=True))
            st.res.add({"op": "lse forward, compute_col", "backend": backend, "dtype": str(dtype), "N": n, "M": n,
                        "D": d, "env": {var: fused}, "ms": ms, "tflops_counting_2NMD": 2 * n * n * d / ms / 1e9})


def wgmma_vs_mma(st, sizes):
    """The lse forward with compute_col and its backward (dq, dk from row and column gradients), the
    products from wgmma against mma.sync: ms, and the largest differences of the log-sum-exps and of
    the gradients (relative to the largest gradient) between the two (they round differently:
    small, not 0)."""
    import contrastive_kernels._families as fam
    var = "CONTRASTIVE_KERNELS_CUDA_WGMMA"
    for dtype, n, d in sizes:
        torch.manual_seed(0)
        q, k = st.randn(n, d, dtype=dtype, grad=True), st.randn(n, d, dtype=dtype, grad=True)
        s = torch.tensor(10.0, device=st.dev)
        gr, gc = st.randn(n), st.randn(n)
        outs, grads = {}, {}
        for wg in ("0", "1"):
            with Env({var: wg}):
                row, col = fam.lse("cuda", q, k, s, compute_col=True)
                outs[wg] = torch.cat([row.detach(), col.detach()])
                fwd_ms = st.time(lambda: fam.lse("cuda", q.detach(), k.detach(), s, compute_col=True))
                loss = (row * gr).sum() + (col * gc).sum()
                gq, gk = torch.autograd.grad(loss, [q, k], retain_graph=True)
                grads[wg] = torch.cat([gq.float().flatten(), gk.float().flatten()])
                bwd_ms = st.time(lambda: torch.autograd.grad(loss, [q, k], retain_graph=True))
            st.res.add({"op": "lse forward (compute_col) + backward", "backend": "cuda", "dtype": str(dtype), "N": n,
                        "M": n, "D": d, "env": {var: wg}, "ms": fwd_ms, "bwd_ms": bwd_ms,
                        "tflops_counting_2NMD": 2 * n * n * d / fwd_ms / 1e9,
                        "bwd_tflops_nominal_4x2NMD": 8 * n * n * d / bwd_ms / 1e9,
                        "max_lse_diff_vs_mma_sync": (outs[wg] - outs["0"]).abs().max().item(),
                        "max_grad_diff_vs_mma_sync_rel": ((grads[wg] - grads["0"]).abs().max()
                                                          / grads["0"].abs().max()).item()})


def shapes(st):
    import contrastive_kernels as ck
    import contrastive_kernels._families as fam

    def case(dtype, n, d, env):
        """lse forward (row + column) and backward ms with the variables in `env` set ("": unset)."""
        with Env(env):
            torch.manual_seed(0)
            q, k = st.randn(n, d, dtype=dtype, grad=True), st.randn(n, d, dtype=dtype, grad=True)
            s = torch.tensor(10.0, device=st.dev)
            fwd_ms = st.time(lambda: fam.lse("cuda", q.detach(), k.detach(), s, compute_col=True))
            row, col = fam.lse("cuda", q, k, s, compute_col=True)
            gr, gc = torch.randn_like(row), torch.randn_like(col)
            bwd_ms = st.time(lambda: torch.autograd.grad((row * gr).sum() + (col * gc).sum(), [q, k],
                                                         retain_graph=True))
        # nominal FLOPs: forward 2 passes x 2 N M D; backward S recomputed in both passes + dq, dk: 4 x 2 N M D
        st.res.add({"dtype": str(dtype), "N": n, "M": n, "D": d, "env": env, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
                    "fwd_tflops_nominal_2x2NMD": 4 * n * n * d / fwd_ms / 1e9,
                    "bwd_tflops_nominal_4x2NMD": 8 * n * n * d / bwd_ms / 1e9})

    # the backward's one or two warp groups per block (bwd_groups' D threshold), unsplit
    for dtype, n, d in st.pick([(BF16, 16384, 128), (BF16, 16384, 256), (BF16, 16384, 512), (BF16, 32768, 512),
                                (F32, 8192, 128), (F32, 8192, 512)],
                               [(BF16, 40, 136), (F32, 33, 64)]):
        for groups in ("1", "2"):
            case(dtype, n, d, {"CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS": groups, "CONTRASTIVE_KERNELS_CUDA_COL_SPLITS": "1"})
    # the forward in one pass (row and column lse from each S tile: the default) against a row pass
    # plus a column pass (CONTRASTIVE_KERNELS_CUDA_FUSED_COLS=0), forward only (Triton: stage tshapes)
    fused_vs_two_passes(st, "cuda", st.pick([(BF16, 32768, 512), (BF16, 16384, 128), (BF16, 8192, 512),
                                             (BF16, 4096, 512), (BF16, 1024, 128), (F32, 8192, 128)],
                                            [(BF16, 70, 64), (F32, 33, 40)]))
    # SupCon (the LSE_LABELS kernels, whose sm_90 bf16 column backward with two groups lost a block
    # per SM to ldmatrix: 131 registers, bench/NOTES.md), fwd + bwd with one and two groups
    n, classes = st.pick(16384, 40), st.pick(64, 5)
    for d in st.pick((256, 512), (136,)):
        for groups in ("1", "2"):
            env = {"CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS": groups}
            with Env(env):
                torch.manual_seed(0)
                x = st.randn(n, d, dtype=BF16, grad=True)
                labels = torch.randint(0, classes, (n,), device=st.dev)
                ms = st.time(lambda: torch.autograd.grad(ck.supcon_loss(x, labels, backend="cuda"), [x]))
            st.res.add({"op": "supcon_loss fwd+bwd", "dtype": str(BF16), "N": n, "D": d, "env": env, "ms": ms})
    # column splits at small N (plan_pass): none against the automatic count
    for dtype, n, d in st.pick([(BF16, 1024, 128), (BF16, 4096, 128), (BF16, 4096, 512), (BF16, 8192, 256),
                                (F32, 2048, 128)],
                               [(BF16, 65, 64)]):
        for splits in ("1", ""):
            case(dtype, n, d, {"CONTRASTIVE_KERNELS_CUDA_COL_SPLITS": splits})
    # the 16-bit kernels' products from wgmma (CONTRASTIVE_KERNELS_CUDA_WGMMA=1, sm_90a) against
    # mma.sync, forward and backward, with the largest differences of their outputs; last, so that a
    # fault of these never-run kernels (a sticky CUDA error) costs no other row
    wgmma_vs_mma(st, st.pick([(BF16, 32768, 512), (BF16, 16384, 128), (BF16, 4096, 512), (BF16, 1024, 128)],
                             [(BF16, 70, 72)]))
    return "bwd_shapes.json"


def tshapes(st):
    import contrastive_kernels as ck
    import contrastive_kernels._families as fam

    # the forward in one pass against a row pass plus a column pass (CONTRASTIVE_KERNELS_TRITON_FUSED_COLS=0),
    # forward only; at every size (N = 16384: 3 launches of rows, their column states within 32 MB)
    fused_vs_two_passes(st, "triton", st.pick([(BF16, 16384, 128), (BF16, 8192, 512), (BF16, 4096, 512),
                                               (BF16, 1024, 128), (F32, 8192, 128)],
                                              [(BF16, 70, 32), (F32, 33, 40)]))
    # Triton column splits at small N (kernels/_common.py col_splits): none against the automatic
    # count, the forward (row + column lse) and forward + backward
    for dtype, n, d in st.pick([(BF16, 1024, 128), (BF16, 4096, 128), (BF16, 4096, 512), (F32, 2048, 128)],
                               [(F32, 40, 32)]):
        for splits in ("1", ""):
            env = {"CONTRASTIVE_KERNELS_TRITON_COL_SPLITS": splits}
            with Env(env):
                torch.manual_seed(0)
                q, k = st.randn(n, d, dtype=dtype, grad=True), st.randn(n, d, dtype=dtype, grad=True)
                s = torch.tensor(10.0, device=st.dev)
                ms = st.time(lambda: fam.lse("triton", q.detach(), k.detach(), s, compute_col=True))

                def fwd_bwd():
                    row, col = fam.lse("triton", q, k, s, compute_col=True)
                    return torch.autograd.grad(row.sum() + col.sum(), [q, k])
                ms_fb = st.time(fwd_bwd)
            st.res.add({"op": "lse compute_col: forward, fwd + bwd", "backend": "triton", "dtype": str(dtype),
                        "N": n, "M": n, "D": d, "env": env, "fwd_ms": ms, "fwd_bwd_ms": ms_fb,
                        "fwd_tflops_counting_2NMD": 2 * n * n * d / ms / 1e9,
                        "fwd_bwd_tflops_counting_6NMD": 6 * n * n * d / ms_fb / 1e9})
    # Triton SigLIP (kernels/pairwise.py, the same split rule), fwd + bwd, none against the rule
    for n, d in st.pick([(1024, 512), (4096, 512)], [(40, 32)]):
        for splits in ("1", ""):
            env = {"CONTRASTIVE_KERNELS_TRITON_COL_SPLITS": splits}
            with Env(env):
                torch.manual_seed(0)
                img, txt = (torch.nn.functional.normalize(st.randn(n, d), dim=1).to(BF16).requires_grad_()
                            for _ in range(2))
                ls, lb = torch.tensor(2.3, device=st.dev), torch.tensor(-10.0, device=st.dev)
                ms = st.time(lambda: torch.autograd.grad(ck.siglip_loss(img, txt, ls, lb, backend="triton"),
                                                         [img, txt]))
            st.res.add({"op": "siglip_loss fwd+bwd", "backend": "triton", "dtype": str(BF16), "N": n, "M": n, "D": d,
                        "env": env, "ms": ms, "tflops_counting_3x2NMD": 6 * n * n * d / ms / 1e9})
    return "triton_shapes.json"


STAGES = {"peak": peak, "shapes": shapes, "tshapes": tshapes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the stage's JSON (default $OUT)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, once each, on the CPU (emulator / interpreter)")
    a = ap.parse_args(argv)
    if a.smoke and a.stage in ("shapes", "peak"):
        os.environ["CONTRASTIVE_KERNELS_CUDA_EMULATE"] = "1"
    if a.smoke and a.stage == "tshapes" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("tshapes --smoke runs the Triton kernels on the interpreter: set TRITON_INTERPRET=1")
    st = Stage(a.smoke)
    name = STAGES[a.stage](st)
    os.makedirs(a.out, exist_ok=True)
    st.res.save(os.path.join(a.out, name))


if __name__ == "__main__":
    main()
