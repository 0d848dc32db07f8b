#!/usr/bin/env bash
# compute-sanitizer memcheck, CPU edition: the CUDA kernels on the emulator (this folder)
# built with AddressSanitizer, running the cuda tests of the family files (float32 and
# float16: bfloat16 takes the same paths; the 300 x 300 sizes and flag subsets left out, the
# schedule tests (the same kernels in other orders) and the float16 column-split and fused-forward
# cases too).
# An out-of-bounds read or write of a kernel in global memory (torch tensors: ASan puts
# redzones around every allocation) or in its shared-memory arrays stops the run with
# AddressSanitizer's report naming the kernel's source line.
#   bash csrc/cuda/emu/memcheck.sh [--build-only] [PYTHON] [extra pytest args]
# CK_MEMCHECK_BUILD=DIR builds in DIR and keeps it (else a temporary folder): a later run with
# the same DIR rebuilds only what changed (CI builds with --build-only beside other work, then runs).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
build_only=0
if [ "${1:-}" = "--build-only" ]; then build_only=1; shift; fi
py="${1:-python3}"
shift || true
if [ -n "${CK_MEMCHECK_BUILD:-}" ]; then
  out="$CK_MEMCHECK_BUILD"
  mkdir -p "$out"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi
# libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it at start-up (the tests
# expect TORCH_CHECK errors); reports go to $out/asan.<pid> and are printed below.
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$out/asan"
# (built and imported by a Python with the ASan runtime preloaded, as the tests run)
LD_PRELOAD="$preload" "$py" - "$here" "$root/csrc" "$out" <<'PY'
import glob, os, sys
from torch.utils.cpp_extension import load
here, csrc, out = sys.argv[1:4]
asan = ["-fsanitize=address", "-fno-omit-frame-pointer"]
load(name="_C_cuda_emu", sources=sorted(glob.glob(os.path.join(here, "*.cpp"))), build_directory=out,
     extra_include_paths=[here, csrc], extra_cflags=["-O2", "-g", "-DCK_CUDA_EMU=1"] + asan,
     extra_ldflags=asan, verbose=False)
print("built", os.path.join(out, "_C_cuda_emu.so"))
PY
[ $build_only -eq 0 ] || exit 0
cd "$root"
export CONTRASTIVE_KERNELS_CUDA_EMULATE=1 CONTRASTIVE_KERNELS_CUDA_EMU_PATH="$out/_C_cuda_emu.so"
rm -f "$out"/asan.*  # (a kept build folder may hold an earlier run's reports)
# Negative control: a kernel reading one float past a 64-float tensor must be reported.
LD_PRELOAD="$preload" "$py" -c "
import torch
from contrastive_kernels import _ext
_ext.load_cuda_emu().misuse(7, torch.zeros(64))" >/dev/null 2>&1 || true
if ! grep -qs "heap-buffer-overflow" "$out"/asan.*; then
  echo "memcheck: the out-of-bounds control read was not reported; AddressSanitizer is not working"
  exit 1
fi
echo "memcheck: control out-of-bounds read reported, as it must be"
rm -f "$out"/asan.*
rc=0
LD_PRELOAD="$preload" "$py" -m pytest -q -p no:cacheprovider -m "not slow" \
  -k "cuda and not bfloat16 and not tiny_upstream and not deterministic and not rectangular and not cancellation and not need_subsets and not 300x300 and not schedule and not ((column_splits or fused_forward) and float16)" \
  tests/test_cuda_emulator.py tests/test_lse_family.py tests/test_pairwise_family.py tests/test_xcorr_family.py \
  tests/test_similarity_family.py "$@" || rc=$?
if ls "$out"/asan.* >/dev/null 2>&1; then
  cat "$out"/asan.*
  echo "memcheck: AddressSanitizer reported an error (above)"
  exit 1
fi
exit $rc
