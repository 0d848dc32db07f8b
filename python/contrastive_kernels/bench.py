"""``python -m contrastive_kernels bench``: fwd+bwd time and peak memory of every op,
on every available backend, against the reference and the installed peers.

What one measurement is (bench/README.md says the same for users):

* a *case* is an op at one size (N, M, D) and dtype on one device; an *impl* is a
  backend of this package ("cpu", "triton", "cuda", "reference"; "cpu:gram" /
  "cpu:tiled" force a Barlow Twins / VICReg path) or a peer (``_peers.py``).
* one *step* is the loss forward and ``backward()`` with gradients for every input
  that a training step would differentiate (features, ``logit_scale``, ``logit_bias``).
* ``ms`` is the median step time over the timed repeats, after warm-up; CUDA steps
  are timed with events and a synchronize, CPU steps with ``perf_counter``.
* ``peak_bytes`` is the growth of peak memory during one step above what the inputs
  already hold: on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``
  minus ``memory_allocated`` before the step; on CPU the growth of the process's
  resident high-water mark (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``, or ``ru_maxrss`` where that is not possible) in a fresh
  worker process per case, after a tiny warm-up of the same impl so that one-time
  initialisation is not counted.  Both include the inputs' gradients, which are
  reported apart as ``grad_bytes``.
* ``flops`` is the op's nominal fwd+bwd FLOP count (the same number for every impl
  of a case, so GFLOP/s ratios are speed ratios); ``frac_peak`` divides the achieved
  rate by this machine's ``torch.mm`` rate in the same dtype, measured in the run.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import traceback

import torch

from . import _peers
from . import backends as _backends

# ------------------------------------------------------------------------ the ops
# hyper-parameters shared by every impl of an op (so that loss values agree)
PARAMS = {
    "nt_xent": {"temperature": 0.5},
    "info_nce": {"temperature": 0.1},
    "info_nce_moco": {"temperature": 0.1},
    "clip_loss": {"logit_scale": 1 / 0.07},
    "siglip_loss": {"logit_scale": 10.0, "logit_bias": -10.0},
    "supcon_loss": {"temperature": 0.1, "per_class": 16},
    "dcl_loss": {"temperature": 0.1},
    "hard_negative_loss": {"temperature": 0.5, "beta": 1.0, "tau_plus": 0.1},
    "uniformity_loss": {"t": 2.0},
    "normalized_similarity": {"scale": 10.0},
    "barlow_twins_loss": {"lambd": 0.0051},
    "vicreg_loss": {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "eps": 1e-4},
}

FAMILY = {
    "nt_xent": "lse", "info_nce": "lse", "info_nce_moco": "lse", "clip_loss": "lse", "supcon_loss": "lse",
    "dcl_loss": "lse", "hard_negative_loss": "lse", "uniformity_loss": "lse", "siglip_loss": "pairwise",
    "normalized_similarity": "similarity", "barlow_twins_loss": "xcorr", "vicreg_loss": "xcorr",
}
OPS = tuple(PARAMS)

# What N and M are for each op, and the nominal fwd+bwd FLOPs.  One N x M x D product
# costs 2NMD; its backward costs 2NMD per side that needs a gradient (dQ = P K,
# dK = P^T Q).  Recomputation inside fused kernels is not counted.
M_RULE = {"nt_xent": "2N", "dcl_loss": "2N", "hard_negative_loss": "2N", "clip_loss": "N", "siglip_loss": "N",
          "supcon_loss": "N", "uniformity_loss": "N", "barlow_twins_loss": "N", "vicreg_loss": "N",
          "info_nce": "free", "info_nce_moco": "free", "normalized_similarity": "free"}
FLOPS_FORMULA = {
    "nt_xent": "6·(2N)²·D (Z=[z1;z2], 2N×2N similarity, fwd 2 + bwd 4)",
    "dcl_loss": "6·(2N)²·D (same 2N×2N similarity as NT-Xent)",
    "hard_negative_loss": "6·(2N)²·D (same 2N×2N similarity as NT-Xent)",
    "info_nce": "6·N·M·D",
    "info_nce_moco": "4·N·M·D (M = queue size; no gradient to key or queue)",
    "clip_loss": "6·N·M·D (one similarity matrix, row and column softmax)",
    "siglip_loss": "6·N·M·D",
    "supcon_loss": "6·N²·D",
    "uniformity_loss": "6·N²·D",
    "normalized_similarity": "6·N·M·D",
    "barlow_twins_loss": "min(6·N·D², 8·N²·D) (D×D cross-correlation vs N×N Gram path, the cheaper)",
    "vicreg_loss": "min(8·N·D², 8·N²·D) (two D×D covariances vs two N×N Grams, the cheaper)",
}


def nominal_flops(op: str, n: int, m: int, d: int) -> int:
    if op in ("nt_xent", "dcl_loss", "hard_negative_loss"):
        return 6 * (2 * n) ** 2 * d
    if op == "info_nce_moco":
        return 4 * n * m * d
    if op in ("supcon_loss", "uniformity_loss"):
        return 6 * n * n * d
    if op == "barlow_twins_loss":
        return min(6 * n * d * d, 8 * n * n * d)
    if op == "vicreg_loss":
        return 8 * n * d * min(n, d)
    return 6 * n * m * d


def derive_m(op: str, n: int, m: int | None) -> int:
    rule = M_RULE[op]
    if rule == "2N":
        return 2 * n
    if rule == "N":
        return n
    return n if m is None else m


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"dtype must be one of float32, float16, bfloat16; got {name!r}")
    return table[name]


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def make_inputs(op: str, n: int, m: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    """The op's inputs (a tuple); the tensors a training step differentiates require grad.
    For normalized_similarity the last element is the gradient fed to backward()."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = PARAMS[op]

    def feat(rows, grad=True, unit=False):
        x = torch.randn(rows, d, generator=g)
        if unit:
            x = torch.nn.functional.normalize(x, dim=1)
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    def scalar(v):
        return torch.tensor(float(v), dtype=torch.float32, device=device, requires_grad=True)

    if op in ("nt_xent", "dcl_loss", "hard_negative_loss", "barlow_twins_loss", "vicreg_loss"):
        return feat(n), feat(n)
    if op == "info_nce":
        return feat(n), feat(m)
    if op == "info_nce_moco":
        return feat(n), feat(n, grad=False, unit=True), feat(m, grad=False, unit=True)
    if op == "clip_loss":
        return feat(n, unit=True), feat(n, unit=True), scalar(p["logit_scale"])
    if op == "siglip_loss":
        return feat(n, unit=True), feat(n, unit=True), scalar(p["logit_scale"]), scalar(p["logit_bias"])
    if op == "supcon_loss":
        classes = max(2, n // p["per_class"])
        labels = torch.randint(0, classes, (n,), generator=g).to(device)
        return feat(n), labels
    if op == "uniformity_loss":
        return (feat(n, unit=True),)
    if op == "normalized_similarity":
        grad_out = torch.randn(n, m, generator=g).to(device=device, dtype=dtype)
        return feat(n), feat(m), grad_out
    raise ValueError(f"unknown op {op!r}")


def ck_callable(op: str, backend: str, path: str | None = None):
    """A callable(*inputs) -> output computing `op` with this package on `backend`."""
    import contrastive_kernels as ck
    p = PARAMS[op]
    kw = {"backend": backend}
    if op == "nt_xent":
        return lambda z1, z2: ck.nt_xent(z1, z2, p["temperature"], **kw)
    if op == "info_nce":
        return lambda q, k: ck.info_nce(q, k, temperature=p["temperature"], **kw)
    if op == "info_nce_moco":
        return lambda q, k, queue: ck.info_nce(q, k, negatives=queue, in_batch_negatives=False,
                                               temperature=p["temperature"], **kw)
    if op == "clip_loss":
        return lambda i, t, s: ck.clip_loss(i, t, s, **kw)
    if op == "siglip_loss":
        return lambda i, t, s, b: ck.siglip_loss(i, t, s, b, **kw)
    if op == "supcon_loss":
        return lambda e, lab: ck.supcon_loss(e, lab, p["temperature"], **kw)
    if op == "dcl_loss":
        return lambda z1, z2: ck.dcl_loss(z1, z2, p["temperature"], **kw)
    if op == "hard_negative_loss":
        return lambda z1, z2: ck.hard_negative_loss(z1, z2, p["temperature"], beta=p["beta"],
                                                    tau_plus=p["tau_plus"], **kw)
    if op == "uniformity_loss":
        return lambda x: ck.uniformity_loss(x, p["t"], **kw)
    if op == "normalized_similarity":
        return lambda a, b: ck.normalized_similarity(a, b, p["scale"], **kw)
    if path is not None:
        kw["path"] = path
    if op == "barlow_twins_loss":
        return lambda z1, z2: ck.barlow_twins_loss(z1, z2, p["lambd"], **kw)
    if op == "vicreg_loss":
        return lambda z1, z2: ck.vicreg_loss(z1, z2, p["sim_coeff"], p["std_coeff"], p["cov_coeff"],
                                             eps=p["eps"], **kw)
    raise ValueError(f"unknown op {op!r}")


# ----------------------------------------------------------------------- suites
# (op, [(N, M or None, D), ...], dtypes, xcorr paths to force besides "auto")
def _suite_cpu_default():
    f32 = ["float32"]
    return [
        ("nt_xent", [(n, None, 128) for n in (256, 512, 1024, 2048, 4096, 8192)], f32, []),
        ("clip_loss", [(n, None, 256) for n in (512, 1024, 2048, 4096, 8192)], f32, []),
        ("siglip_loss", [(n, None, 256) for n in (512, 1024, 2048, 4096)], f32, []),
        ("info_nce", [(2048, 4096, 128)], f32, []),
        ("info_nce_moco", [(256, 16384, 128)], f32, []),
        ("supcon_loss", [(2048, None, 128)], f32, []),
        ("dcl_loss", [(1024, None, 128)], f32, []),
        ("hard_negative_loss", [(1024, None, 128)], f32, []),
        ("uniformity_loss", [(2048, None, 128)], f32, []),
        ("normalized_similarity", [(2048, 2048, 128)], f32, []),
        ("barlow_twins_loss", [(256, None, 8192)] + [(n, None, 1024) for n in (128, 512, 2048)], f32,
         ["gram", "tiled"]),
        ("vicreg_loss", [(256, None, 8192)] + [(n, None, 1024) for n in (128, 512, 2048)], f32, ["gram", "tiled"]),
    ]


def _suite_cpu_quick():
    f32 = ["float32"]
    return [
        ("nt_xent", [(n, None, 64) for n in (128, 512)], f32, []),
        ("clip_loss", [(n, None, 64) for n in (128, 512)], f32, []),
        ("siglip_loss", [(256, None, 64)], f32, []),
        ("info_nce", [(256, 512, 64)], f32, []),
        ("info_nce_moco", [(64, 2048, 64)], f32, []),
        ("supcon_loss", [(256, None, 64)], f32, []),
        ("dcl_loss", [(256, None, 64)], f32, []),
        ("hard_negative_loss", [(256, None, 64)], f32, []),
        ("uniformity_loss", [(256, None, 64)], f32, []),
        ("normalized_similarity", [(256, 256, 64)], f32, []),
        ("barlow_twins_loss", [(64, None, 512)], f32, []),
        ("vicreg_loss", [(64, None, 512)], f32, []),
    ]


def _suite_gpu_default():
    bf16, both = ["bfloat16"], ["bfloat16", "float32"]
    return [
        ("clip_loss", [(n, None, 512) for n in (4096, 8192, 16384, 32768)], bf16, []),
        ("siglip_loss", [(n, None, 768) for n in (4096, 8192, 16384, 32768)], bf16, []),
        ("nt_xent", [(n, None, 128) for n in (2048, 4096, 8192, 16384)], bf16, []),
        ("info_nce", [(16384, 16384, 256)], bf16, []),
        ("info_nce_moco", [(1024, 65536, 128)], bf16, []),
        ("supcon_loss", [(8192, None, 128)], bf16, []),
        ("dcl_loss", [(8192, None, 128)], bf16, []),
        ("hard_negative_loss", [(8192, None, 128)], bf16, []),
        ("uniformity_loss", [(16384, None, 128)], bf16, []),
        ("normalized_similarity", [(8192, 8192, 256)], bf16, []),
        ("barlow_twins_loss", [(n, None, 8192) for n in (256, 1024, 4096)], both, ["gram", "tiled"]),
        ("vicreg_loss", [(n, None, 8192) for n in (256, 1024, 4096)], both, ["gram", "tiled"]),
    ]


def _suite_gpu_quick():
    bf16 = ["bfloat16"]
    return [(op, [(n, m, d) for (n, m, d) in sizes], bf16, []) for op, sizes, _, _ in _suite_cpu_quick()]


def _parse_sizes(text: str):
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes items are N, NxD or NxMxD; got {item!r}") from None
        if len(nums) == 1:
            out.append((nums[0], None, None))
        elif len(nums) == 2:
            out.append((nums[0], None, nums[1]))
        elif len(nums) == 3:
            out.append((nums[0], nums[1], nums[2]))
        else:
            raise argparse.ArgumentTypeError(f"--sizes items are N, NxD or NxMxD; got {item!r}")
        if any(v is not None and v < 1 for v in out[-1]):
            raise argparse.ArgumentTypeError(f"--sizes values must be positive; got {item!r}")
    return out


def _split_list(values):
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def build_cases(args, device: str):
    """The list of cases (dicts) this run measures."""
    if device == "cuda":
        suite = _suite_gpu_quick() if args.quick else _suite_gpu_default()
    else:
        suite = _suite_cpu_quick() if args.quick else _suite_cpu_default()
    ops = _split_list(args.op)
    for op in ops:
        if op not in OPS:
            raise SystemExit(f"bench: unknown --op {op!r}; choose from {', '.join(OPS)}")
    if ops:
        suite = [s for s in suite if s[0] in ops]
    sizes = _parse_sizes(args.sizes) if args.sizes else None
    dtypes = _split_list(args.dtype)
    for dt in dtypes:
        _dtype(dt)
    paths = _split_list(args.paths) if args.paths is not None else None
    cases = []
    for op, op_sizes, op_dtypes, op_paths in suite:
        default_d = op_sizes[0][2]
        use = op_sizes
        if sizes is not None:
            use = [(n, m, d if d is not None else default_d) for n, m, d in sizes]
        for dt in (dtypes or op_dtypes):
            for n, m, d in use:
                cases.append({"op": op, "N": n, "M": derive_m(op, n, m), "D": d,
                              "dtype": _dtype_name(_dtype(dt)), "device": device,
                              "paths": (paths if paths is not None else op_paths) if FAMILY[op] == "xcorr" else []})
    return cases


def impls_for(case, args):
    """[(impl, skip_reason or None)] for one case, in table order."""
    device, op, fam = case["device"], case["op"], FAMILY[case["op"]]
    wanted = _split_list(args.backends)
    out = []
    if wanted:
        for b in wanted:
            if b not in ("cpu", "triton", "cuda", "reference"):
                raise SystemExit(f"bench: unknown backend {b!r} in --backends (cpu, triton, cuda, reference)")
        names = [b for b in wanted if b != "reference"]
    else:
        names = [b for b in _backends.available_backends(fam, device) if b != "reference"]
        if device == "cpu":
            names = [b for b in names if b != "triton"]  # interpreted Triton is a correctness tool, not a speed
    for b in names:
        why = _backends.unavailable_reason(b, fam, device)
        out.append((b, f"skipped ({why})" if why else None))
        for path in case["paths"]:
            out.append((f"{b}:{path}", f"skipped ({why})" if why else None))
    if not wanted or "reference" in wanted:
        out.append(("reference", None))
    peers = _split_list(args.peers)
    if peers == ["none"]:
        return out
    if peers and peers != ["all"]:
        for p in peers:
            if p not in _peers.PEERS:
                raise SystemExit(f"bench: unknown peer {p!r}; known: {', '.join(_peers.PEERS)}, all, none")
        chosen = [p for p in peers if p in _peers.OP_PEERS.get(op, ())]
    elif peers == ["all"]:
        chosen = list(_peers.OP_PEERS.get(op, ()))
    else:
        chosen = _peers.default_peers(op, device)
    for p in chosen:
        why = _peers.unavailable_reason(p, device)
        out.append((p, f"skipped ({why})" if why else None))
    return out


def impl_kind(impl: str) -> str:
    if impl == "reference":
        return "reference"
    if _peers.is_peer(impl):
        return "peer" if _peers.PEERS[impl][0] == "library" else "replica"
    return "backend"


# ---------------------------------------------------------------- measuring
class _Skip(Exception):
    pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "not enough memory" in msg
                                              or "out of memory" in msg.lower())


def _build_impl(case, impl):
    if _peers.is_peer(impl):
        try:
            return _peers.build(impl, case["op"], PARAMS[case["op"]], case["device"])
        except _peers.PeerUnavailable as exc:
            raise _Skip(str(exc)) from None
    backend, _, path = impl.partition(":")
    return ck_callable(case["op"], backend, path or None)


def _step(fn, inputs, grad_out):
    out = fn(*inputs)
    if grad_out is not None:
        out.backward(grad_out)
    else:
        out.backward()
    return out


def _clear_grads(inputs):
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def _value(out) -> float:
    out = out.detach().float()
    return float(out.item() if out.numel() == 1 else out.norm().item())


def execute(task: dict) -> dict:
    """Measure one (case, impl) in this process; returns the record (never raises)."""
    case, impl = task["case"], task["impl"]
    rec = {"status": "ok"}
    device = case["device"]
    cuda = device == "cuda"
    dtype = _dtype(case["dtype"])
    op, n, m, d = case["op"], case["N"], case["M"], case["D"]
    inputs = out = None
    try:
        if task.get("threads"):
            torch.set_num_threads(task["threads"])
        torch.manual_seed(0)
        fn = _build_impl(case, impl)
        has_grad_out = op == "normalized_similarity"
        if not cuda:
            # one-time initialisation (thread pools, lazy imports, kernel caches) at a tiny size
            small = make_inputs(op, min(n, 8), min(m, 16), min(d, 16), dtype, device, seed=1)
            _step(fn, small[:-1] if has_grad_out else small, small[-1] if has_grad_out else None)
            del small
        inputs = make_inputs(op, n, m, d, dtype, device, seed=0)
        grad_out = inputs[-1] if has_grad_out else None
        args = inputs[:-1] if has_grad_out else inputs
        rec["input_bytes"] = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
        rec["grad_bytes"] = sum(t.numel() * t.element_size() for t in args
                                if isinstance(t, torch.Tensor) and t.requires_grad)
        warmup = task["warmup"]
        if cuda:
            for _ in range(max(1, warmup)):  # the first call compiles / autotunes
                _clear_grads(args)
                _step(fn, args, grad_out)
            _clear_grads(args)
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = _step(fn, args, grad_out)
            torch.cuda.synchronize()
            rec["peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)
            rec["mem_method"] = "cuda max_memory_allocated growth"
        else:
            _clear_grads(args)
            gc.collect()
            if _reset_hwm():
                base = _status_kb("VmRSS")
                t0 = time.perf_counter()
                out = _step(fn, args, grad_out)
                first = time.perf_counter() - t0
                rec["peak_bytes"] = int(_status_kb("VmHWM") - base)
                rec["mem_method"] = ("VmHWM growth (fresh worker, clear_refs)" if task.get("isolated")
                                     else "VmHWM growth (this process: freed memory may be reused, a lower bound)")
            else:
                base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                t0 = time.perf_counter()
                out = _step(fn, args, grad_out)
                first = time.perf_counter() - t0
                rec["peak_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
                rec["mem_method"] = "ru_maxrss growth (a lower bound: earlier peaks hide growth)"
            # the memory step is a warm-up; one more only when steps are short
            warmup = warmup if first < 0.5 else 0
        rec["loss"] = _value(out)
        out = None
        for _ in range(warmup if not cuda else 0):
            _clear_grads(args)
            _step(fn, args, grad_out)
        times = []
        budget = task["max_time"] * 1000.0
        while len(times) < task["repeats"]:
            _clear_grads(args)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _step(fn, args, grad_out)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                _step(fn, args, grad_out)
                times.append((time.perf_counter() - t0) * 1000.0)
            if len(times) >= min(task["min_repeats"], task["repeats"]) and sum(times) >= budget:
                break
        rec.update(ms=statistics.median(times), ms_min=min(times), ms_max=max(times), repeats=len(times))
    except _Skip as exc:
        rec = {"status": f"skipped ({exc})"}
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a record
        if isinstance(exc, KeyboardInterrupt):
            raise
        if _is_oom(exc):
            rec = {"status": "oom", "error": _short(exc)}
        else:
            rec = {"status": f"error: {type(exc).__name__}: {_short(exc)}",
                   "traceback": traceback.format_exc(limit=8)[-2000:]}
    finally:
        inputs = out = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rec


def _short(exc) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:300]


def measure_matmul(device: str, dtype_name: str, n: int, repeats: int = 5) -> float:
    """GFLOP/s of torch.mm on n x n x n in `dtype` (median of `repeats` after warm-up)."""
    dtype = _dtype(dtype_name)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def _child_main(conn, job, mem_limit):
    try:
        if mem_limit:
            try:
                resource.setrlimit(resource.RLIMIT_DATA, (mem_limit, mem_limit))
            except (ValueError, OSError):
                pass
        if job["kind"] == "matmul":
            if job.get("threads"):
                torch.set_num_threads(job["threads"])
            result = {"gflops": measure_matmul(job["device"], job["dtype"], job["n"])}
        else:
            result = execute(job)
    except BaseException as exc:  # noqa: BLE001
        result = {"status": f"error: {type(exc).__name__}: {_short(exc)}"}
    conn.send(result)
    conn.close()


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        # the server imports torch and this package once; each case is a fork of it
        preload = ["torch", "contrastive_kernels", "contrastive_kernels.bench"]
        if importlib_util_find("pytorch_metric_learning"):
            preload.append("pytorch_metric_learning.losses")
        ctx.set_forkserver_preload(preload)
        _CTX = ctx
    return _CTX


def importlib_util_find(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def run_isolated(job: dict, timeout: float, mem_limit: int | None) -> dict:
    """Run `job` in a fresh worker process (forked from a server that has only imported
    torch and this package); an out-of-memory kill or a crash becomes a record."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, job, mem_limit), daemon=True)
    proc.start()
    send.close()
    result = None
    try:
        if recv.poll(timeout):
            try:
                result = recv.recv()
            except EOFError:
                result = None
        else:
            proc.kill()
            proc.join()
            return {"status": f"timeout (>{timeout:.0f} s)"}
    finally:
        recv.close()
    proc.join(30)
    if result is None:
        code = proc.exitcode
        if code is not None and code < 0 and -code == 9:
            return {"status": "oom", "error": "worker killed by SIGKILL (out of memory)"}
        return {"status": f"error: worker exited with code {code}"}
    return result


# ------------------------------------------------------------------- metadata
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _version(dist: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine_info(device: str, threads: int | None = None) -> dict:
    import contrastive_kernels as ck
    info = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
        "memory_bytes": _mem_total(), "platform": platform.platform(), "python": platform.python_version(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    versions = {"torch": torch.__version__, "triton": _version("triton"), "contrastive_kernels": ck.__version__,
                "contrastive_kernels_git": _git_commit(), "numpy": _version("numpy")}
    for impl, (kind, dist, _) in _peers.PEERS.items():
        if dist and kind == "library":
            versions[dist] = _version(dist)
    info_build = ck.build_info()
    return {"machine": info, "versions": versions,
            "build": {k: info_build.get(k) for k in ("built", "with_cuda", "cuda_archs", "openmp")}}


# ------------------------------------------------------------------- reporting
def finish_records(records, peaks):
    """Derived fields: GFLOP/s, fraction of the matmul rate, loss difference to the reference."""
    refs = {}
    for r in records:
        if r["impl"] == "reference" and r["status"] == "ok":
            refs[_case_key(r)] = r.get("loss")
    for r in records:
        ok = r["status"] == "ok" and r.get("ms")
        r["gflops"] = r["flops"] / (r["ms"] / 1e3) / 1e9 if ok else None
        peak = peaks.get(f"{r['device']}/{r['dtype']}")
        r["matmul_gflops"] = peak
        r["frac_peak"] = r["gflops"] / peak if ok and peak else None
        ref = refs.get(_case_key(r))
        if ok and ref is not None and r.get("loss") is not None and math.isfinite(r["loss"]):
            r["loss_rel_diff"] = abs(r["loss"] - ref) / max(abs(ref), 1e-30)
        else:
            r["loss_rel_diff"] = None
    return records


def _case_key(r):
    return (r["op"], r["device"], r["dtype"], r["N"], r["M"], r["D"])


FUSED = ("cuda", "triton", "cpu")


def headline(records):
    """Per case: the fastest fused backend (auto path) against each peer and the reference."""
    cases = {}
    for r in records:
        cases.setdefault(_case_key(r), []).append(r)
    rows = []
    for key, recs in cases.items():
        fused = [r for r in recs if r["impl"] in FUSED and r["status"] == "ok"]
        if not fused:
            continue
        best = min(fused, key=lambda r: r["ms"])
        for r in recs:
            if impl_kind(r["impl"]) == "backend":
                continue
            row = {"op": key[0], "device": key[1], "dtype": key[2], "N": key[3], "M": key[4], "D": key[5],
                   "fused": best["impl"], "vs": r["impl"], "kind": impl_kind(r["impl"]), "status": r["status"]}
            if r["status"] == "ok":
                row["speedup"] = r["ms"] / best["ms"] if best["ms"] else None
                row["memory_ratio"] = (r["peak_bytes"] / best["peak_bytes"]
                                       if best.get("peak_bytes", 0) > 0 else None)
            rows.append(row)
    return rows


# Issue #8's targets (H100 / H200, bf16, fwd + bwd), judged in every run that has their cases (the
# default GPU suite does; `--op clip_loss,barlow_twins_loss` is the short run): (id, name, op, N, D,
# what, goal).  "frac_peak": the fastest fused backend's GFLOP/s (6 N M D for CLIP) over the torch.mm rate
# measured in the same run; "speedup": a peer's time over the fastest fused backend's; "memory": the
# fused backend's peak growth over its inputs against the gradients plus 64 MiB.
TARGETS = (
    ("clip_peak", "CLIP at >= 45% of the measured bf16 matmul peak", "clip_loss", 32768, 512, "frac_peak", 0.45),
    ("clip_inf_cl", "CLIP >= 3x inf-cl", "clip_loss", 32768, 512, ("speedup", "inf-cl"), 3.0),
    ("clip_open_clip", "CLIP >= 2x open_clip", "clip_loss", 32768, 512, ("speedup", "open_clip"), 2.0),
    ("clip_memory", "CLIP peak memory within 64 MiB of inputs + gradients", "clip_loss", 32768, 512, "memory",
     64 << 20),
    ("barlow_fb", "Barlow Twins >= 10x the facebookresearch formula", "barlow_twins_loss", 1024, 8192,
     ("speedup", "fb-barlowtwins-formula"), 10.0),
)


def targets(records, dtype="bfloat16"):
    """One row per target of TARGETS: the measured value, the goal, and "met", "missed" or why it
    could not be judged (the case or the peer did not run).  An open_clip target falls back to
    open_clip's replica, named as such, where the library itself did not run."""
    replica_of = {lib: rep for rep, lib in _peers.REPLICA_OF.items()}
    rows = []
    for tid, name, op, n, d, what, goal in TARGETS:
        row = {"id": tid, "target": name, "op": op, "dtype": dtype, "N": n, "D": d, "goal": goal, "value": None,
               "kind": what if isinstance(what, str) else what[0], "ran": False}
        rows.append(row)
        recs = [r for r in records if r["op"] == op and r["dtype"] == dtype and r["N"] == n and r["D"] == d
                and r["device"] == "cuda"]
        fused = [r for r in recs if r["impl"] in FUSED and r["status"] == "ok"]
        if not fused:
            row["verdict"] = "not measured (no fused backend ran this case on a GPU)"
            continue
        best = min(fused, key=lambda r: r["ms"])
        row["fused"], row["ran"] = best["impl"], True
        if what == "frac_peak":
            row["value"] = best.get("frac_peak")
        elif what == "memory":
            if best.get("peak_bytes") is not None and best.get("grad_bytes") is not None:
                row["value"] = best["peak_bytes"] - best["grad_bytes"]  # beyond inputs + gradients
        else:
            peer = what[1]
            names = (peer, replica_of[peer]) if peer in replica_of else (peer,)
            ran = [r for r in recs for nm in names if r["impl"] == nm and r["status"] == "ok"]
            if not ran:
                st = next((r["status"] for r in recs if r["impl"] == peer), "not in this run")
                row["verdict"] = f"not measured ({peer}: {st})"
                continue
            row["vs"] = ran[0]["impl"]
            row["value"] = ran[0]["ms"] / best["ms"] if best["ms"] else None
        if row["value"] is None:
            row["verdict"] = "not measured"
        elif what == "memory":
            row["verdict"] = "met" if row["value"] <= goal else "missed"
        else:
            row["verdict"] = "met" if row["value"] >= goal else "missed"
    return rows


def target_report(records):
    """The targets' markdown table, or [] where none of their cases ran on a GPU in `records`."""
    rows = targets(records)
    return target_lines(rows) if any(t["ran"] for t in rows) else []


def target_lines(rows):
    """Markdown table of `targets` rows."""
    lines = ["| target | case | fused | measured | goal | verdict |", "|---|---|---|---|---|---|"]
    for t in rows:
        v, goal = t["value"], t["goal"]
        if t["kind"] == "memory":  # bytes beyond inputs + gradients
            meas = "-" if v is None else f"{v / 2**20:+.1f} MiB beyond"
            goal_s = f"<= {goal / 2**20:.0f} MiB"
        elif t["kind"] == "frac_peak":
            meas = "-" if v is None else f"{100 * v:.1f}%"
            goal_s = f">= {100 * goal:.0f}%"
        else:
            meas = "-" if v is None else f"{v:.2f}x" + (f" vs {t['vs']}" if t.get("vs") else "")
            goal_s = f">= {goal:g}x"
        lines.append(f"| {t['target']} | {t['op']} {t['dtype']} N={t['N']} D={t['D']} | {t.get('fused', '-')} | "
                     f"{meas} | {goal_s} | {t['verdict']} |")
    return lines


def _fmt_bytes(b):
    if b is None:
        return "-"
    return f"{b / 2**20:.1f}"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _size_str(r):
    return f"{r['N']}×{r['M']}×{r['D']}"


def table_lines(records):
    head = ["op", "dtype", "N×M×D", "impl", "ms", "peak MiB", "GFLOP/s", "% mm peak", "status"]
    rows = []
    for r in records:
        rows.append([r["op"], r["dtype"], _size_str(r), r["impl"] + ("*" if impl_kind(r["impl"]) == "replica" else ""),
                     _fmt(r.get("ms"), ".2f"), _fmt_bytes(r.get("peak_bytes")), _fmt(r.get("gflops"), ".1f"),
                     _fmt(None if r.get("frac_peak") is None else 100 * r["frac_peak"], ".0f"), r["status"]])
    return head, rows


def print_table(records, file=None):
    file = sys.stdout if file is None else file
    head, rows = table_lines(records)
    rows = [[c if len(c) <= 60 else c[:57] + "..." for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line, file=file)
    print("-" * len(line), file=file)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=file)
    print("(* = our replica of the library's computation, not the library itself)", file=file)


def write_markdown(path, records, meta):
    m, v = meta["machine"], meta["versions"]
    lines = ["# contrastive_kernels benchmark", ""]
    lines.append(f"- command: `{meta['command']}`")
    lines.append(f"- date: {meta['date']}")
    dev = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads)"
    lines.append(f"- device: {meta['device']} — {dev}")
    lines.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    lines.append("- measured torch.mm rate: " + ", ".join(
        f"{k} {val:.1f} GFLOP/s" for k, val in meta["matmul_gflops"].items() if val))
    lines.append(f"- peak memory: {meta['memory_method']}")
    lines.append("")
    rows = headline(records)
    if rows:
        lines += ["## Headline: fastest fused backend against each peer and the reference", "",
                  "| op | dtype | N×M×D | fused | vs | ×faster | ×less memory |",
                  "|---|---|---|---|---|---|---|"]
        for h in rows:
            vs = h["vs"] + (" (replica)" if h["kind"] == "replica" else "")
            if h["status"] == "ok":
                sp, mr = _fmt(h.get("speedup"), ".2f"), _fmt(h.get("memory_ratio"), ".1f")
            else:
                sp, mr = h["status"], "-"
            lines.append(f"| {h['op']} | {h['dtype']} | {h['N']}×{h['M']}×{h['D']} | {h['fused']} | {vs} | {sp} "
                         f"| {mr} |")
        lines.append("")
    report = target_report(records)
    if report:
        lines += ["## Issue #8 targets (bf16, fwd + bwd, on this GPU)", ""] + report + [""]
    lines += ["## All measurements", "",
              "| op | dtype | N×M×D | impl | ms (median) | peak MiB | GFLOP/s | % mm peak | loss rel. diff | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        impl = r["impl"] + (" (replica)" if impl_kind(r["impl"]) == "replica" else "")
        lines.append(f"| {r['op']} | {r['dtype']} | {_size_str(r)} | {impl} | {_fmt(r.get('ms'), '.2f')} | "
                     f"{_fmt_bytes(r.get('peak_bytes'))} | {_fmt(r.get('gflops'), '.1f')} | "
                     f"{_fmt(None if r.get('frac_peak') is None else 100 * r['frac_peak'], '.0f')} | "
                     f"{_fmt(r.get('loss_rel_diff'), '.1e')} | {r['status'].replace('|', '/')} |")
    lines += ["", "FLOP counts (nominal fwd+bwd, the same for every impl of a case):", ""]
    for op in sorted({r["op"] for r in records}):
        lines.append(f"- {op}: {FLOPS_FORMULA[op]}")
    lines += ["", "Replicas (`*-formula`) are our op-for-op restatements of a library's loss code, run when the "
              "library itself cannot be imported here; they are not the library.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path, records, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {}
    for r in records:
        groups.setdefault((r["op"], r["dtype"], r["D"]), []).append(r)
    sweeps = {k: v for k, v in groups.items() if len({r["N"] for r in v}) >= 2}
    groups = sweeps or groups
    keys = sorted(groups)
    fig, axes = plt.subplots(max(1, len(keys)), 2, figsize=(11, 3.4 * max(1, len(keys))), squeeze=False)
    for row, key in enumerate(keys):
        recs = groups[key]
        ax_t, ax_m = axes[row]
        impls = []
        for r in recs:
            if r["impl"] not in impls:
                impls.append(r["impl"])
        for impl in impls:
            pts = sorted((r for r in recs if r["impl"] == impl), key=lambda r: r["N"])
            ok = [r for r in pts if r["status"] == "ok"]
            label = impl + (" (replica)" if impl_kind(impl) == "replica" else "")
            style = {"backend": "-", "reference": ":"}.get(impl_kind(impl), "--")
            if ok:
                ax_t.plot([r["N"] for r in ok], [r["ms"] for r in ok], style, marker="o", label=label)
                mem = [r for r in ok if r.get("peak_bytes", 0) > 0]
                if mem:
                    ax_m.plot([r["N"] for r in mem], [r["peak_bytes"] / 2**20 for r in mem], style, marker="o",
                              label=label)
            for r in pts:
                if r["status"] == "oom":  # drawn at the top of both panels, at its N
                    for ax in (ax_t, ax_m):
                        ax.annotate(f"{label}: oom", xy=(r["N"], 0.97), xycoords=("data", "axes fraction"),
                                    fontsize=7, color="red", ha="center", va="top", rotation=90)
        op, dtype, d = key
        for ax, what in ((ax_t, "fwd+bwd median time (ms)"), (ax_m, "peak memory growth (MiB)")):
            ax.set_xscale("log", base=2)
            if ax.lines:
                ax.set_yscale("log")
            ax.set_xlabel("batch size N")
            ax.set_ylabel(what)
            ax.set_title(f"{op} ({dtype}, D={d})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        if ax_t.lines:
            ax_t.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="small suite (under two minutes on a 2-core CPU)")
    parser.add_argument("--op", action="append", metavar="OP",
                        help=f"ops to run (repeat or comma-separate); default all: {', '.join(OPS)}")
    parser.add_argument("--sizes", metavar="LIST",
                        help="sizes for every selected op, comma-separated N, NxD or NxMxD (e.g. 1024,4096x256)")
    parser.add_argument("--dtype", action="append", metavar="DTYPE",
                        help="float32, bfloat16, float16 (repeat or comma-separate); default per suite")
    parser.add_argument("--backends", action="append", metavar="NAME",
                        help="backends to run (cpu, triton, cuda, reference); default every available one "
                             "(Triton on CPU only when named)")
    parser.add_argument("--peers", action="append", metavar="NAME",
                        help=f"peers to run, 'all' or 'none'; default each op's installed peers, plus the replicas "
                             f"of those that cannot run here; known: {', '.join(_peers.PEERS)}")
    parser.add_argument("--paths", metavar="LIST",
                        help="Barlow Twins / VICReg paths to force besides auto (gram,tiled; '' for none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=None,
                        help="at most this many timed repeats per measurement (default 10 on CPU, 30 on GPU)")
    parser.add_argument("--min-repeats", type=int, default=3, help="at least this many timed repeats")
    parser.add_argument("--max-time", type=float, default=None,
                        help="stop timing after min-repeats once this many seconds are spent (default 2 CPU, 1 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1 on CPU, 3 on GPU)")
    parser.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                        help="run each measurement in a fresh worker process (auto: on CPU, where peak memory "
                             "needs it) or in this process")
    parser.add_argument("--mm-size", type=int, default=None,
                        help="n of the n×n×n torch.mm that measures this machine's matmul rate (default 2048 on CPU, "
                             "8192 on GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per measurement (default: torch's default, the physical cores)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement before it is killed")
    parser.add_argument("--mem-limit", type=float, default=None, metavar="GIB",
                        help="CPU: cap each worker's memory (RLIMIT_DATA); a case above it is recorded as oom "
                             "(default 75%% of the memory available at start)")
    parser.add_argument("--out", metavar="DIR", help="write DIR/results.json, meta.json, results.md, results.png")
    parser.add_argument("--no-plot", action="store_true", help="do not draw results.png")
    parser.add_argument("--list", action="store_true", help="print the planned measurements and exit")
    parser.add_argument("--derive-auto", metavar="RESULTS_JSON",
                        help="do not run: derive auto's cuda/triton rule table from a GPU run's results.json "
                             "and write it (default: the package's _auto_cuda_rules.py; see --auto-out)")
    parser.add_argument("--auto-out", metavar="PATH", help="where --derive-auto writes the rule module")
    parser.set_defaults(_bench_parser=parser)


def _command(args) -> str:
    parser = getattr(args, "_bench_parser", None)
    parts = ["python", "-m", "contrastive_kernels", "bench"]
    if parser is None:
        return " ".join(parts)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        val = getattr(args, action.dest, None)
        if val is None or val == action.default:
            continue
        opt = action.option_strings[0]
        if action.nargs == 0:
            parts.append(opt)
        elif isinstance(val, list):
            for item in val:
                parts += [opt, shlex.quote(str(item))]
        else:
            parts += [opt, shlex.quote(str(val))]
    return " ".join(parts)


def run(args) -> int:
    if args.derive_auto:
        from . import autoselect
        out = args.auto_out or autoselect.RULES_MODULE
        rules = autoselect.write_from_results(args.derive_auto, out)
        for family, per_dtype in rules.items():
            for dtype, classes in per_dtype.items():
                print(f"{family:10s} {dtype:9s} " + ", ".join(
                    f"{'rest' if b is None else f'work <= {b}'}: {who}" for b, who in classes))
        print(f"wrote {out}")
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA GPU is available")
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cases = build_cases(args, device)
    repeats = args.repeats if args.repeats is not None else (30 if cuda else (5 if args.quick else 10))
    if repeats < 1:
        raise SystemExit("bench: --repeats must be at least 1")
    job_opts = {"repeats": repeats, "min_repeats": max(1, args.min_repeats),
                "max_time": args.max_time if args.max_time is not None else (1.0 if cuda or args.quick else 2.0),
                "warmup": args.warmup if args.warmup is not None else (3 if cuda else 1), "threads": args.threads}
    isolate = args.isolate == "process" or (args.isolate == "auto" and not cuda)
    mem_limit = None
    if not cuda:
        if args.mem_limit is not None:
            mem_limit = int(args.mem_limit * 2**30) if args.mem_limit > 0 else None
        else:
            avail = _mem_available()
            mem_limit = int(0.75 * avail) if avail else None

    plan = []
    for case in cases:
        for impl, skip in impls_for(case, args):
            plan.append((case, impl, skip))
    if args.list:
        for case, impl, skip in plan:
            print(f"{case['op']:22s} {case['dtype']:9s} {case['N']}×{case['M']}×{case['D']:<8} {impl:24s} "
                  f"{skip or ''}")
        return 0

    def launch(job):
        if isolate:
            return run_isolated(job, args.timeout, mem_limit)
        if job["kind"] == "matmul":
            if job.get("threads"):
                torch.set_num_threads(job["threads"])
            return {"gflops": measure_matmul(job["device"], job["dtype"], job["n"])}
        return execute(job)

    # this machine's matmul rate, once per dtype in the run
    peaks = {}
    mm_size = args.mm_size or (8192 if cuda else 2048)
    for dt in sorted({c["dtype"] for c in cases}):
        res = launch({"kind": "matmul", "device": device, "dtype": dt, "n": mm_size,
                      "threads": args.threads})
        peaks[f"{device}/{dt}"] = res.get("gflops")

    try:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc="bench", unit="case", file=sys.stderr,
                   disable=not sys.stderr.isatty() and os.environ.get("CK_BENCH_PROGRESS") != "1")
    except ImportError:  # pragma: no cover - tqdm is a dependency of the bench extra
        bar = None
    records = []
    for case, impl, skip in plan:
        if bar is not None:
            bar.set_postfix_str(f"{case['op']} N={case['N']} {impl}")
        base = {k: case[k] for k in ("op", "device", "dtype", "N", "M", "D")}
        base.update(impl=impl, kind=impl_kind(impl), flops=nominal_flops(case["op"], case["N"], case["M"], case["D"]),
                    flops_formula=FLOPS_FORMULA[case["op"]])
        base["device_name"] = torch.cuda.get_device_name(0) if cuda else _cpu_model()
        if _peers.is_peer(impl):
            base["peer"] = _peers.describe(impl)
            base["peer_version"] = _peers.version(impl)
        if skip:
            res = {"status": skip}
        else:
            res = launch({"kind": "case", "case": case, "impl": impl, "isolated": isolate, **job_opts})
        rec = {**base, "ms": None, "peak_bytes": None, **res}
        records.append(rec)
        if bar is not None:
            bar.update(1)
        elif not sys.stderr.isatty():
            pass
    if bar is not None:
        bar.close()
    finish_records(records, peaks)

    meta = machine_info(device, args.threads)
    meta.update(device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=_command(args), argv=list(sys.argv), matmul_gflops=peaks,
                matmul_size=mm_size, tf32=False if cuda else None,
                memory_method=("torch.cuda.max_memory_allocated growth over the inputs, one step after warm-up"
                               if cuda else "growth of the resident high-water mark over the inputs during one "
                               "step, in a fresh worker process per measurement"
                               if isolate else "resident high-water growth in this process (not isolated; "
                               "a lower bound)"),
                mem_limit_bytes=mem_limit, timing={k: job_opts[k] for k in ("repeats", "min_repeats", "max_time",
                                                                            "warmup")},
                flops_formulas={op: FLOPS_FORMULA[op] for op in sorted({c["op"] for c in cases})})
    print()
    print_table(records)
    report = target_report(records)
    if report:
        print("\nIssue #8 targets:")
        print("\n".join(report))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(records, f, indent=1)
        with open(os.path.join(args.out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        write_markdown(os.path.join(args.out, "results.md"), records, meta)
        if not args.no_plot:
            write_plot(os.path.join(args.out, "results.png"), records,
                       title=f"{meta['machine'].get('gpu') or meta['machine']['cpu']} — {meta['date']}")
        print(f"\nwrote {args.out}/results.json, meta.json, results.md" + ("" if args.no_plot else ", results.png"))
    return 0
