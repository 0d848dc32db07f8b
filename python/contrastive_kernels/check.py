"""``python -m contrastive_kernels info`` and ``check``.

``check`` runs every op on every kernel backend that works here, for every dtype, at
small odd sizes, and compares the loss and every input gradient with the float64
reference computed from the same (rounded) inputs, at SPEC.md's tolerances
(float32 1e-5, float16/bfloat16 2e-2, relative norm). It prints a pass/fail table and
exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import __version__, _ext, backends
from . import functional as F

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    name: str
    family: str
    make: Callable  # (gen, n, d, dtype, device) -> (tensors: dict, call: (backend, **tensors) -> Tensor)
    min_n: int = 1  # the loss's smallest batch (it needs negatives, or standardizes over the batch)


def _t(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _labels(gen, n, k, device):
    return torch.randint(0, k, (n,), generator=gen).to(device)


def _cases() -> list[Case]:
    def pair(extra=None, m=None):
        def make(gen, n, d, dtype, device):
            t = {"a": _t(gen, n, d, dtype=dtype, device=device), "b": _t(gen, m or n, d, dtype=dtype, device=device)}
            return t, extra
        return make

    def simple(fn, m=None):
        def make(gen, n, d, dtype, device):
            t = {"a": _t(gen, n, d, dtype=dtype, device=device), "b": _t(gen, m(n) if m else n, d, dtype=dtype,
                                                                       device=device)}
            return t, lambda be, a, b: fn(a, b, be)
        return make

    def info_nce_neg(gen, n, d, dtype, device):
        t = {"a": _t(gen, n, d, dtype=dtype, device=device), "b": _t(gen, n, d, dtype=dtype, device=device),
             "neg": _t(gen, 2 * n + 3, d, dtype=dtype, device=device)}
        return t, lambda be, a, b, neg: F.info_nce(a, b, negatives=neg, temperature=0.2, backend=be)

    def moco(gen, n, d, dtype, device):
        t = {"a": _t(gen, n, d, dtype=dtype, device=device), "b": _t(gen, n, d, dtype=dtype, device=device),
             "neg": _t(gen, 3 * n + 1, d, dtype=dtype, device=device)}
        return t, lambda be, a, b, neg: F.info_nce(a, b, negatives=neg, in_batch_negatives=False, temperature=0.07,
                                                   backend=be)

    def posidx(gen, n, d, dtype, device):
        m = n + 4
        idx = torch.randint(0, m, (n,), generator=gen).to(device)
        t = {"a": _t(gen, n, d, dtype=dtype, device=device), "b": _t(gen, m, d, dtype=dtype, device=device)}
        return t, lambda be, a, b: F.info_nce(a, b, positive_index=idx, decoupled=True, backend=be)

    def clip(gen, n, d, dtype, device):
        t = {"a": F.torch.nn.functional.normalize(_t(gen, n, d, dtype=torch.float64, device=device), dim=1).to(dtype),
             "b": F.torch.nn.functional.normalize(_t(gen, n, d, dtype=torch.float64, device=device), dim=1).to(dtype),
             "scale": torch.tensor(14.0, device=device), "bias": torch.tensor(-1.5, device=device)}
        return t, lambda be, a, b, scale, bias: F.clip_loss(a, b, scale, bias, backend=be)

    def siglip(negative_only):
        def make(gen, n, d, dtype, device):
            m = n + 3 if negative_only else n
            t = {"a": F.torch.nn.functional.normalize(_t(gen, n, d, dtype=torch.float64, device=device), dim=1).to(dtype),
                 "b": F.torch.nn.functional.normalize(_t(gen, m, d, dtype=torch.float64, device=device), dim=1).to(dtype),
                 "scale": torch.tensor(10.0, device=device), "bias": torch.tensor(-10.0, device=device)}
            return t, lambda be, a, b, scale, bias: F.siglip_loss(a, b, scale, bias, negative_only=negative_only,
                                                                  backend=be)
        return make

    def supcon(with_ref):
        def make(gen, n, d, dtype, device):
            lab = _labels(gen, n, max(2, n // 3), device)
            t = {"a": _t(gen, n, d, dtype=dtype, device=device)}
            if not with_ref:
                return t, lambda be, a: F.supcon_loss(a, lab, 0.1, backend=be)
            rl = _labels(gen, n + 5, max(2, n // 3), device)
            t["b"] = _t(gen, n + 5, d, dtype=dtype, device=device)
            return t, lambda be, a, b: F.supcon_loss(a, lab, 0.1, ref_embeddings=b, ref_labels=rl, backend=be)
        return make

    def uniform(gen, n, d, dtype, device):
        t = {"a": F.torch.nn.functional.normalize(_t(gen, n, d, dtype=torch.float64, device=device), dim=1).to(dtype)}
        return t, lambda be, a: F.uniformity_loss(a, 2.0, backend=be)

    def similarity(gen, n, d, dtype, device):
        w = _t(gen, n, n + 2, dtype=torch.float32, device=device)
        t = {"a": _t(gen, n, d, dtype=dtype, device=device), "b": _t(gen, n + 2, d, dtype=dtype, device=device),
             "scale": torch.tensor(3.0, device=device)}
        return t, lambda be, a, b, scale: (F.normalized_similarity(a, b, scale, backend=be).float()
                                           * w.to(a.device)).sum()

    def xcorr(gen, n, d, dtype, device):
        w = _t(gen, d, d, dtype=torch.float32, device=device)
        t = {"a": _t(gen, n, d, dtype=dtype, device=device), "b": _t(gen, n, d, dtype=dtype, device=device)}
        return t, lambda be, a, b: (F.cross_correlation(a, b, backend=be).float() * w.to(a.device)).sum()

    return [
        Case("normalized_similarity", "similarity", similarity),
        Case("cross_correlation", "xcorr", xcorr, min_n=2),
        Case("alignment_loss", "lse", simple(lambda a, b, be: F.alignment_loss(a, b, 2.0, backend=be))),
        Case("info_nce", "lse", simple(lambda a, b, be: F.info_nce(a, b, backend=be))),
        Case("info_nce[symmetric]", "lse", simple(lambda a, b, be: F.info_nce(a, b, symmetric=True, backend=be))),
        Case("info_nce[negatives]", "lse", info_nce_neg),
        Case("info_nce[moco]", "lse", moco),
        Case("info_nce[positive_index,decoupled]", "lse", posidx),
        Case("nt_xent", "lse", simple(lambda a, b, be: F.nt_xent(a, b, 0.5, backend=be))),
        Case("clip_loss", "lse", clip),
        Case("siglip_loss", "pairwise", siglip(False)),
        Case("siglip_loss[negative_only]", "pairwise", siglip(True)),
        Case("supcon_loss", "lse", supcon(False)),
        Case("supcon_loss[ref]", "lse", supcon(True)),
        Case("dcl_loss", "lse", simple(lambda a, b, be: F.dcl_loss(a, b, 0.1, backend=be)), min_n=2),
        Case("dcl_loss[weighted]", "lse", simple(lambda a, b, be: F.dcl_loss(a, b, 0.1, weight_sigma=0.5,
                                                                             backend=be)), min_n=2),
        Case("hard_negative_loss", "lse", simple(lambda a, b, be: F.hard_negative_loss(a, b, 0.5, backend=be)),
             min_n=2),
        Case("uniformity_loss", "lse", uniform, min_n=2),
        Case("barlow_twins_loss[gram]", "xcorr", simple(lambda a, b, be: F.barlow_twins_loss(
            a, b, backend=be, **({} if be == "reference" else {"path": "gram"}))), min_n=2),
        Case("barlow_twins_loss[tiled]", "xcorr", simple(lambda a, b, be: F.barlow_twins_loss(
            a, b, backend=be, **({} if be == "reference" else {"path": "tiled"}))), min_n=2),
        Case("vicreg_loss", "xcorr", simple(lambda a, b, be: F.vicreg_loss(a, b, backend=be)), min_n=2),
    ]


CASES = _cases()


ZERO_REF = 1e-12  # a reference this small is zero up to float64 rounding: compare absolutely


def _rel(x, ref):
    """Relative error |x - ref| / |ref|; absolute when the reference is (numerically) zero,
    e.g. a loss that is identically 0 (one candidate) or CLIP's logit_bias gradient."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    d = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / d if d > ZERO_REF else diff


def run_case(case: Case, backend: str, dtype: torch.dtype, n: int, d: int, device="cpu", seed: int = 0):
    """(max relative error over the loss and every gradient, detail string)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, call = case.make(gen, n, d, dtype, device)
    ins = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    ref_ins = {k: v.detach().double().clone().requires_grad_(True) for k, v in tensors.items()}
    out = call(backend, **ins)
    ref = call("reference", **ref_ins)
    keys = list(ins)
    grads = torch.autograd.grad(out, [ins[k] for k in keys], allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [ref_ins[k] for k in keys], allow_unused=True)
    errs = {"loss": _rel(out, ref)}
    for k, g, rg in zip(keys, grads, ref_grads):
        if rg is None and g is None:
            continue
        if g is None or rg is None:
            errs[f"d{k}"] = float("inf")
            continue
        if g.dtype != ins[k].dtype:
            errs[f"d{k}:dtype"] = float("inf")
        errs[f"d{k}"] = _rel(g, rg)
    worst = max(errs, key=lambda k: errs[k])
    return errs[worst], worst, errs


_CHECK_BACKENDS = ("cuda", "triton", "cpu")


def _comma_list(text: str, what: str):
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{what} is an empty list")
    return items


def _parse_backends(text: str):
    items = _comma_list(text, "--backends")
    allowed = _CHECK_BACKENDS + (backends.FAMILY_REFERENCE,)
    for b in items:
        if b not in allowed:
            raise argparse.ArgumentTypeError(f"--backends: each of {', '.join(_CHECK_BACKENDS)}; got {b!r}")
    return items


def _parse_dtypes(text: str):
    items = _comma_list(text, "--dtypes")
    for x in items:
        if x not in DTYPES:
            raise argparse.ArgumentTypeError(f"--dtypes: each of {', '.join(DTYPES)}; got {x!r}")
    return [DTYPES[x] for x in items]


def _parse_sizes(text: str):
    items = _comma_list(text, "--sizes")
    try:
        sizes = [int(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: a comma list of batch sizes N; got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"--sizes: batch sizes must be positive; got {text!r}")
    return sizes


def _positive_int(text: str):
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"a positive integer; got {text!r}")
    return v


def add_arguments(parser) -> None:
    parser.add_argument("--backends", type=_parse_backends, default=None,
                        help="comma list of cuda, triton, cpu (default: every kernel backend available); one "
                             "asked for that cannot run here fails the check")
    parser.add_argument("--dtypes", type=_parse_dtypes, default="float32,float16,bfloat16")
    parser.add_argument("--sizes", type=_parse_sizes, default="1,7,33", help="comma list of batch sizes N")
    parser.add_argument("--dim", type=_positive_int, default=13, help="feature dimension D")
    parser.add_argument("--op", action="append", default=None, help="only cases whose name starts with this")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cpu or cuda (default: cuda when available, else cpu)")


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("check: --device cuda, but CUDA is not available here (torch.cuda.is_available() is False): "
              "nothing was checked")
        return 1
    wanted, dtypes, sizes = args.backends, args.dtypes, args.sizes
    if args.op and not any(c.name.startswith(o) for c in CASES for o in args.op):
        print(f"check: no case name starts with {' or '.join(map(repr, args.op))}; the cases: "
              f"{', '.join(c.name for c in CASES)}")
        return 1
    rows, failures = [], 0
    t0 = time.perf_counter()
    for case in CASES:
        if args.op and not any(case.name.startswith(o) for o in args.op):
            continue
        why_not = {b: backends.unavailable_reason(b, case.family, device) for b in _CHECK_BACKENDS}
        bes = [b for b in _CHECK_BACKENDS if why_not[b] is None]
        if wanted is not None:
            # a backend asked for that cannot run here fails (never a silent skip)
            for b in wanted:
                if why_not.get(b) is not None:
                    failures += 1
                    rows.append((case.name, b, "-", "-", "FAIL", f"cannot run on {device} here: {why_not[b]}"))
            # FAMILY_REFERENCE (internal): the fused compositions over the materializing family references.
            bes = [b for b in bes if b in wanted] + [b for b in wanted if b == backends.FAMILY_REFERENCE]
        if not bes:
            if wanted is None:
                why = "; ".join(f"{b}: {r}" for b, r in why_not.items())
                rows.append((case.name, "-", "-", "-", "SKIP", f"no kernel backend here ({why})"))
            continue
        for be in bes:
            for dt in dtypes:
                if be == "triton" and dt == torch.bfloat16 and device == "cpu":
                    rows.append((case.name, be, "bfloat16", "-", "SKIP",
                                 "the Triton interpreter computes bfloat16 wrongly (triton#4972); checked on a GPU"))
                    continue
                worst, what, ok = 0.0, "", True
                try:
                    for n in sizes:
                        nn_ = max(n, case.min_n)
                        err, key, _ = run_case(case, be, dt, nn_, args.dim, device)
                        if not (err <= TOL[dt]):
                            ok = False
                        if err > worst or err != err:
                            worst, what = err, f"{key} at N={nn_}"
                    status = "PASS" if ok else "FAIL"
                except Exception as exc:  # a crash is a failure, reported with its message
                    status, what = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    worst = float("nan")
                failures += status == "FAIL"
                rows.append((case.name, be, str(dt).replace("torch.", ""), f"{worst:.1e}", status, what))
    widths = [max(len(str(r[i])) for r in rows + [("op", "backend", "dtype", "max rel err", "result", "worst")])
              for i in range(6)]
    header = ("op", "backend", "dtype", "max rel err", "result", "worst")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    passed = sum(r[4] == "PASS" for r in rows)
    print(f"\n{passed} passed, {failures} failed, {sum(r[4] == 'SKIP' for r in rows)} skipped on {device} "
          f"(sizes N={sizes}, D={args.dim}; tolerances float32 1e-5, float16/bfloat16 2e-2 relative to float64) "
          f"in {time.perf_counter() - t0:.1f} s")
    if passed == 0 and failures == 0:
        print(f"check: nothing was checked: no kernel backend runs these cases on {device} here")
        return 1
    return 1 if failures else 0


def info_dict() -> dict:
    import numpy
    info = {"contrastive_kernels": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "processor": platform.processor(),
            "cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # pragma: no cover
        info["triton"] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["extension"] = _ext.build_info()
    info["default_backend"] = backends.default_backend()
    fams = {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for fam in backends.FAMILIES:
            fams[f"{fam}@{dev}"] = {b: (backends.unavailable_reason(b, fam, dev) or "available")
                                    for b in ("cuda", "triton", "cpu")}
    info["backends"] = fams
    info["available_backends"] = backends.available_backends()
    return info


def print_info(as_json: bool = False) -> int:
    info = info_dict()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for k, v in info.items():
        if k in ("backends", "extension"):
            continue
        print(f"{k:20s} {v}")
    ext = info["extension"]
    print(f"{'extension _C':20s} {'built' if ext.get('built') else 'NOT LOADED: ' + str(ext.get('error'))}"
          + (f" (CUDA: {ext.get('with_cuda')}, archs: {ext.get('cuda_archs') or '-'}, OpenMP: {ext.get('openmp')}, "
             f"CPU ops: {', '.join(ext.get('cpu_ops', [])) or 'none'})" if ext.get("built") else ""))
    print("\nfamily@device        " + "  ".join(f"{b:10s}" for b in ("cuda", "triton", "cpu")))
    for key, d in info["backends"].items():
        print(f"{key:20s} " + "  ".join(f"{'yes' if d[b] == 'available' else 'no':10s}" for b in d))
    for key, d in info["backends"].items():
        for b, why in d.items():
            if why != "available":
                print(f"  {key} {b}: {why}")
    return 0
