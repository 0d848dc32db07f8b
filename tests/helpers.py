"""Shared test utilities: tolerances from SPEC.md, backends to test, error measures,
and an honest peak-memory probe (a fresh subprocess per measurement)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import contrastive_kernels as ck
from contrastive_kernels import backends

# SPEC.md: relative error (norm of difference / norm of reference) against the float64
# reference of the same (rounded) inputs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_SIZES = (1, 7, 129)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    if denom <= 1e-12:  # the reference is zero up to float64 rounding: absolute error
        return diff
    return diff / denom


def assert_close_rel(x, ref, dtype, what=""):
    tol = TOL[dtype]
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} (dtype {dtype})"


def kernel_backends(family: str, device: str = "cpu") -> list[str]:
    """Fused backends that can run `family` on `device` here (cpu; triton under TRITON_INTERPRET=1;
    cuda under CONTRASTIVE_KERNELS_CUDA_EMULATE=1 with the emulator built)."""
    return [b for b in ("cpu", "triton", "cuda") if backends.unavailable_reason(b, family, device) is None]


def _suffix(backend: str, device: str = "cpu") -> str:
    """Name suffix of a backend's raw family ops for tensors on `device` (`<op>` + suffix)."""
    if backend == "triton":
        return "_triton"
    return "_cuda_emu" if backend == "cuda" and device == "cpu" else ""


def backend_params(family: str, device: str = "cpu") -> list:
    """`kernel_backends` as pytest params; Triton ones carry the `triton` marker, so CI can
    run them alone under TRITON_INTERPRET=1 (`pytest -m triton`)."""
    import pytest
    return [pytest.param(b, marks=[pytest.mark.triton] if b == "triton" else [], id=b)
            for b in kernel_backends(family, device)]


def interpreter_bf16_broken(backend: str) -> bool:
    """The Triton interpreter computes bfloat16 wrongly (triton-lang/triton#4972, seen with
    triton 3.9: a bf16 tl.dot + exp tile off by 1.0): bf16 Triton is checked on a GPU only."""
    return backend == "triton" and backends.triton_interpret() and not torch.cuda.is_available()


def skip_interpreter_bf16(backend: str, dtype) -> None:
    import pytest
    if dtype == torch.bfloat16 and interpreter_bf16_broken(backend):
        pytest.skip("bfloat16 Triton needs a GPU (the interpreter computes bfloat16 wrongly)")


def peak_rss_growth(setup: str, body: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run `setup` then `body` in a fresh Python process; return the growth of the peak
    resident set size (bytes) caused by `body`, measured with getrusage (ru_maxrss).

    The setup's allocations (inputs, warm-up) are excluded by reading ru_maxrss after it;
    the body runs once. ru_maxrss is the process's high-water mark, so anything the body
    allocates transiently (an N x M matrix in a backward, say) shows up."""
    code = textwrap.dedent("""
        import json, resource, gc, torch
        torch.set_num_threads(torch.get_num_threads())
        {setup}
        gc.collect()
        _before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        {body}
        _after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("PEAK_JSON " + json.dumps({{"before": _before, "after": _after, "growth": _after - _before}}))
    """).format(setup=textwrap.dedent(setup), body=textwrap.dedent(body))
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                         timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"memory probe failed:\n{out.stdout}\n{out.stderr}")
    line = [l for l in out.stdout.splitlines() if l.startswith("PEAK_JSON ")][-1]
    return json.loads(line[len("PEAK_JSON "):])
