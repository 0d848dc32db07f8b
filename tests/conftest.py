import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="session")
def _nan_filled_empty_under_emulation():
    # Under the CUDA emulator, every uninitialized torch.empty (the kernels' outputs and
    # workspaces included) is filled with NaN / the largest integer, so a kernel that reads
    # memory it never wrote, or leaves part of an output unwritten, fails its test instead
    # of reading zeros or stale values (compute-sanitizer's initcheck, in spirit).
    if os.environ.get("CONTRASTIVE_KERNELS_CUDA_EMULATE") != "1":
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _seed_and_tf32():
    # SPEC.md: float32 tolerances are stated with TF32 off.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(1234)
    yield


def pytest_collection_modifyitems(config, items):
    # The emulator's own checks need its build and CONTRASTIVE_KERNELS_CUDA_EMULATE=1 (CI's
    # emulator step); elsewhere they are deselected, not skipped.
    if os.environ.get("CONTRASTIVE_KERNELS_CUDA_EMULATE") == "1":
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("cuda_emu") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _interpreter_patches_once():
    # Under TRITON_INTERPRET=1, Triton's interpreter patches triton.language for the interpreted
    # kernel when a launch starts (and restores it when the launch ends), then patches it again
    # on every call of a @triton.jit helper inside the kernel (`InterpretedFunction.__call__`):
    # the same patches, found by walking the language's modules with inspect.getmembers each time
    # (about half of an lse kernel's interpreted time, whose helpers are called per tile).  Here a
    # helper call inside a launch that patched every language module the helper sees skips the
    # repeat (the first helper to see a module the launch did not patch, triton.language.core for
    # tl.zeros / tl.sum, patches it as Triton does); the patches, the kernels and their numbers are
    # Triton's own.  A Triton without these internals is left as it is.
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_ck_once", False):
        return
    try:  # the shape of the internals relied on: a launch patches, then restores its scope
        import inspect
        launch = inspect.getsource(interpreter.GridExecutor.__call__)
        helper = inspect.getsource(interpreter.InterpretedFunction.__call__)
    except (AttributeError, OSError, TypeError):
        return
    if "_patch_lang(" not in launch or ".restore()" not in launch or "_patch_lang(" not in helper:
        return
    active = []  # the language modules patched by the launch in progress (launches do not nest)

    @functools.lru_cache(maxsize=None)  # (a function's modules do not change; helpers are called per tile)
    def langs(fn):
        return frozenset(id(v) for v in fn.__globals__.values() if isinstance(v, type(tl)) and v in (tl, tl.core))

    class _Launch:
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            active.clear()
            self.scope.restore()

    class _Nothing:
        def restore(self):
            pass

    def patch_lang(fn):
        seen = langs(fn)
        if active and seen <= active[0]:
            return _Nothing()  # a helper inside the launch: already patched
        scope = original(fn)
        if active:  # a helper seeing another module (triton.language's own helpers see
            active[0] = active[0] | seen  # triton.language.core): patched as Triton does, and kept so
            return scope  # until the launch ends (Triton never restores a helper's patches)
        active.append(seen)
        return _Launch(scope)

    patch_lang._ck_once = True
    patch_lang._ck_original = original
    interpreter._patch_lang = patch_lang


_interpreter_patches_once()
