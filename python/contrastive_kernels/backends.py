"""Backend names, what is available here, and the choice for one call.

Backends: "auto", "cuda", "triton", "cpu", "reference".
  * auto: CUDA tensors -> the faster of cuda / triton for that op family (decided by
    benchmark, see AUTO_CUDA_ORDER); CPU tensors -> cpu (the C++ extension).
    The reference backend is used only when no kernel is built, with one warning.
  * Asking for a backend that cannot run here raises BackendError (a ValueError)
    naming what is missing; there is no silent fallback.
  * triton on CPU tensors runs only under TRITON_INTERPRET=1; cuda on CPU tensors only
    under CONTRASTIVE_KERNELS_CUDA_EMULATE=1 with the CUDA emulator built (tests).
The environment variable CONTRASTIVE_KERNELS_BACKEND sets the default.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import warnings

import torch

from . import _ext, autoselect

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
KERNEL_BACKENDS = ("cuda", "triton", "cpu")
# Internal: family ops computed by the materializing family references (tests only).
FAMILY_REFERENCE = "_family_reference"
FAMILIES = ("lse", "pairwise", "xcorr", "similarity")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# For CUDA tensors under "auto": preference order per family where no measured rule
# exists (contrastive_kernels.autoselect / _auto_cuda_rules.py hold those, by dtype and size).
AUTO_CUDA_ORDER = {
    "lse": ("cuda", "triton"),
    "pairwise": ("cuda", "triton"),
    "xcorr": ("cuda", "triton"),
    "similarity": ("cuda", "triton"),
}

_NATIVE_OP = {"lse": "lse_forward", "pairwise": "pairwise_forward",
              "xcorr": "xcorr_forward", "similarity": "similarity_forward"}


class BackendError(ValueError):
    """A backend was asked for that cannot run these inputs here."""


def default_backend() -> str:
    name = os.environ.get("CONTRASTIVE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise BackendError(
            f"CONTRASTIVE_KERNELS_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def _version(text: str) -> tuple[int, ...]:
    """The leading release numbers of a version string ("3.6.0+git1" -> (3, 6, 0), "2.4.0rc1" ->
    (2, 4, 0))."""
    out = []
    for part in text.split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
    return tuple(out)


@torch.compiler.assume_constant_result
def _interpreter_error() -> str | None:
    return _interpreter_error_cached()


@functools.lru_cache(maxsize=None)
def _interpreter_error_cached() -> str | None:
    """Why Triton's interpreter cannot run our kernels with this install, or None.  Triton < 3.7
    converts a one-element array to an int for a loop bound (`range(lo, hi, BLOCK)` over a
    program's split), which NumPy >= 2.4 refuses: every kernel would fail with an
    InterpreterError "only 0-dimensional arrays can be converted to Python scalars"
    (triton-lang/triton#9171; torch 2.11 pins triton 3.6)."""
    import numpy
    import triton

    tv, nv = _version(triton.__version__), _version(numpy.__version__)
    if tv and nv and tv < (3, 7) and nv >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with NumPy {numpy.__version__} "
                f"(triton-lang/triton#9171, fixed in Triton 3.7): pip install 'numpy<2.4', or a newer triton")
    return None


# Availability is a property of the install, constant during a run: torch.compile calls
# these once at trace time instead of tracing into importlib / the dispatcher.
@torch.compiler.assume_constant_result
def _triton_family_error(family: str) -> str | None:
    return _triton_family_error_cached(family)


@functools.lru_cache(maxsize=None)
def _triton_family_error_cached(family: str) -> str | None:
    err = _triton_import_error()
    if err:
        return err
    try:
        mod = importlib.import_module(f"contrastive_kernels.kernels.{family}")
    except ModuleNotFoundError as exc:
        if exc.name == "contrastive_kernels.kernels":  # setup.py maps kernels/ in at install
            return ("the Triton kernels (contrastive_kernels.kernels) are not importable: they are installed "
                    "with the package (pip install --no-build-isolation .), not found in a source checkout "
                    "on PYTHONPATH")
        if exc.name != f"contrastive_kernels.kernels.{family}":
            return f"the Triton {family} kernels failed to import (ModuleNotFoundError: {exc})"
        return f"no Triton kernel for the {family} family yet"
    except Exception as exc:
        return f"the Triton {family} kernels failed to import ({type(exc).__name__}: {exc})"
    if not getattr(mod, "AVAILABLE", True):
        return f"the Triton {family} kernels are not complete"
    return None


@torch.compiler.assume_constant_result
def _native_error(family: str, dispatch_key: str) -> str | None:
    if _ext.load() is None:
        return f"the compiled extension contrastive_kernels._C is not loaded ({_ext.load_error()})"
    op = f"contrastive_kernels::{_NATIVE_OP[family]}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key):
        what = "C++ CPU" if dispatch_key == "CPU" else "CUDA"
        extra = "" if dispatch_key == "CPU" else " (rebuild on a machine with CUDA and nvcc, or set CONTRASTIVE_KERNELS_FORCE_CUDA=1)"
        return f"this build has no {what} kernel for the {family} family{extra}"
    return None


@torch.compiler.assume_constant_result
def _emulator_error(family: str) -> str | None:
    err = _ext.cuda_emu_error()
    if err:
        return f"backend 'cuda' on CPU tensors needs the CUDA emulator: {err}"
    op = f"contrastive_kernels::{_NATIVE_OP[family]}_cuda_emu"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"):
        return f"the CUDA emulator build has no kernel for the {family} family"
    return None


def unavailable_reason(backend: str, family: str, device: torch.device | str | None = None) -> str | None:
    """None when `backend` can run `family` on `device` here, else why not."""
    device = torch.device(device) if device is not None else None
    if backend == "reference" or backend == FAMILY_REFERENCE:
        return None
    if backend == "cpu":
        if device is not None and device.type != "cpu":
            return f"backend 'cpu' runs CPU tensors only, got tensors on {device}"
        return _native_error(family, "CPU")
    if backend == "cuda":
        if device is not None and device.type == "cpu" and _ext.cuda_emulate():
            return _emulator_error(family)
        if device is not None and device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors only, got tensors on {device}"
        if not torch.cuda.is_available():
            return "backend 'cuda' needs a CUDA GPU and torch with CUDA; none is available"
        return _native_error(family, "CUDA")
    if backend == "triton":
        err = _triton_family_error(family)
        if err:
            return err
        if device is not None and device.type == "cpu" and not triton_interpret():
            return "backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1 (set it, or use backend='cpu')"
        if triton_interpret():
            err = _interpreter_error()
            if err:
                return err
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"backend 'triton' cannot run tensors on {device}"
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            return "backend 'triton' on CUDA tensors needs a CUDA GPU and torch with CUDA; none is available"
        if device is None and not torch.cuda.is_available() and not triton_interpret():
            return "backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors)"
        return None
    raise BackendError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


def available_backends(family: str | None = None, device: torch.device | str | None = None) -> list[str]:
    """The backends that work here: for one family (default: any family) and device."""
    fams = FAMILIES if family is None else (family,)
    out = []
    for b in ("cuda", "triton", "cpu"):
        if any(unavailable_reason(b, f, device) is None for f in fams):
            out.append(b)
    out.append("reference")
    return out


@functools.lru_cache(maxsize=None)
def _warn_auto_dtype(dtype: torch.dtype) -> None:
    warnings.warn(f"contrastive_kernels: backend 'auto' with {str(dtype).replace('torch.', '')} inputs: the "
                  "kernels take float32, float16 and bfloat16, so the reference backend computes these, "
                  "materializing the full similarity matrix (pass backend='reference' to say so, or cast "
                  "the inputs)", RuntimeWarning, stacklevel=4)


def resolve(backend: str | None, family: str, device: torch.device, dtype: torch.dtype, work=None) -> str:
    """The backend that runs one call of `family` on tensors of `device`/`dtype`; `work`
    (rows x features of the first input) picks the size class of `auto`'s recorded
    cuda / triton rule (contrastive_kernels.autoselect)."""
    name = default_backend() if backend is None else backend
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    name = name.lower()
    if name == FAMILY_REFERENCE:
        return name
    if name not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "reference":
        return name
    if dtype not in FUSED_DTYPES:
        if name == "auto":  # float64 and other dtypes: the reference computes them, said once
            _warn_auto_dtype(dtype)
            return "reference"
        raise BackendError(
            f"backend {name!r} supports float32, float16 and bfloat16 inputs; got {dtype} "
            "(use backend='reference' for float64)")
    if name == "auto":
        if device.type == "cuda":
            order = autoselect.cuda_order(family, dtype, work) or AUTO_CUDA_ORDER[family]
        else:
            order = ("cpu",)
        for b in order:
            if unavailable_reason(b, family, device) is None:
                return b
        reasons = "; ".join(f"{b}: {unavailable_reason(b, family, device)}" for b in order)
        _ext.warn_missing_once(f"no kernel for the {family} family on {device.type} ({reasons})")
        return "reference"
    why = unavailable_reason(name, family, device)
    if why:
        raise BackendError(f"backend {name!r} cannot run the {family} family here: {why}")
    return name
