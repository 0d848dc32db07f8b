"""Lazy loading of the compiled extension ``contrastive_kernels._C``.

The package imports and works (reference backend, Triton where it can run) when
the extension is missing; the reason is kept and reported once, on first use.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings

_load_error: str | None = None


@functools.lru_cache(maxsize=None)
def load():
    """The ``_C`` module, or None if it cannot be loaded (reason in `load_error()`)."""
    global _load_error
    try:
        import torch  # noqa: F401  (the ops library needs libtorch loaded first)
        mod = importlib.import_module("contrastive_kernels._C")
    except Exception as exc:  # ImportError, OSError (ABI mismatch), ...
        _load_error = f"{type(exc).__name__}: {exc}"
        return None
    return mod


def load_error() -> str | None:
    load()
    return _load_error


def cuda_emulate() -> bool:
    """CONTRASTIVE_KERNELS_CUDA_EMULATE=1: backend "cuda" runs CPU tensors on the CPU
    emulator of the CUDA kernels (contrastive_kernels._C_cuda_emu, csrc/cuda/emu) -- for
    testing the CUDA sources on machines without a GPU, as TRITON_INTERPRET=1 does for
    the Triton kernels.  Slow; never chosen by "auto"."""
    return os.environ.get("CONTRASTIVE_KERNELS_CUDA_EMULATE", "0") == "1"


_emu_error: str | None = None


@functools.lru_cache(maxsize=None)
def load_cuda_emu():
    """The ``_C_cuda_emu`` module when emulation is on and it is built, else None (reason
    in `cuda_emu_error()`)."""
    global _emu_error
    if not cuda_emulate():
        _emu_error = "CONTRASTIVE_KERNELS_CUDA_EMULATE is not 1"
        return None
    if load() is None:
        _emu_error = f"the compiled extension contrastive_kernels._C is not loaded ({_load_error})"
        return None
    try:
        path = os.environ.get("CONTRASTIVE_KERNELS_CUDA_EMU_PATH")
        if path:  # another build of the module (csrc/cuda/emu/memcheck.sh: AddressSanitizer)
            spec = importlib.util.spec_from_file_location("contrastive_kernels._C_cuda_emu", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules["contrastive_kernels._C_cuda_emu"] = mod  # later imports get this one
            return mod
        return importlib.import_module("contrastive_kernels._C_cuda_emu")
    except Exception as exc:
        _emu_error = (f"contrastive_kernels._C_cuda_emu is not built ({type(exc).__name__}: {exc}); "
                      "reinstall with CONTRASTIVE_KERNELS_BUILD_CUDA_EMU=1")
        return None


def cuda_emu_error() -> str | None:
    load_cuda_emu()
    return None if load_cuda_emu() is not None else _emu_error


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    mod = load()
    if mod is None:
        return {"built": False, "error": _load_error, "cpu_ops": [], "with_cuda": False, "cuda_archs": ""}
    info = dict(mod.build_info())
    info["built"] = True
    info["cpu_ops"] = sorted(set(info.get("cpu_ops", [])))
    return info


@functools.lru_cache(maxsize=None)
def warn_missing_once(what: str) -> None:
    warnings.warn(
        f"contrastive_kernels: {what}; the compiled extension could not be used "
        f"({load_error() or 'it was built without this kernel'}). Falling back to the pure-PyTorch "
        "reference backend, which materializes the full similarity matrix. Reinstall with "
        "`pip install --no-build-isolation .` to build the kernels.",
        RuntimeWarning, stacklevel=3)
