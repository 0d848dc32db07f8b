#!/usr/bin/env bash
# Compile the torch glue of the CUDA kernels (csrc/cuda/bindings.cpp) on a machine without
# a CUDA build of torch: g++ -c -O1 (object discarded; the optimizer's warnings, e.g.
# -Winfinite-recursion, need more than -fsyntax-only) against the installed (CPU)
# torch's headers and the CUDA toolkit's, with one-line stubs for the CUDA library headers
# the CPU wheel does not ship (handle and status typedefs only: the glue never calls them).
#   bash csrc/cuda/check_bindings.sh [PYTHON]     (default: python3 on PATH)
# CK_TORCH_INCLUDE=DIR checks against another torch's headers instead of the installed one's: DIR
# is that torch's torch/include (e.g. unzipped from its wheel; CI does so for the GPU machines'
# torch 2.11 + CUDA 13, whose headers are the ones the GPU build compiles against).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
py="${1:-python3}"
cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
[ -f "$cuda_inc/cuda_runtime.h" ] || { echo "check_bindings: no CUDA headers in $cuda_inc"; exit 1; }
stubs="$(mktemp -d)"
trap 'rm -rf "$stubs"' EXIT
mkdir -p "$stubs/c10/cuda/impl"
printf '#pragma once\n#include <cuda_runtime.h>\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' >"$stubs/cublas_v2.h"
printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' >"$stubs/cublasLt.h"
printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n' >"$stubs/cusparse.h"
printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n' >"$stubs/cusolverDn.h"
printf '#pragma once\ntypedef int cusolverStatus_t;\n' >"$stubs/cusolver_common.h"
printf '#pragma once\ntypedef struct cudssContext* cudssHandle_t;\n' >"$stubs/cudss.h"
printf '#pragma once\n' >"$stubs/c10/cuda/impl/cuda_cmake_macros.h"
incs=()
if [ -n "${CK_TORCH_INCLUDE:-}" ]; then
  [ -f "$CK_TORCH_INCLUDE/torch/extension.h" ] || { echo "check_bindings: no torch/extension.h in $CK_TORCH_INCLUDE"; exit 1; }
  incs=(-isystem "$CK_TORCH_INCLUDE" -isystem "$CK_TORCH_INCLUDE/torch/csrc/api/include")
  label="the headers in $CK_TORCH_INCLUDE"
  while IFS= read -r d; do incs+=("-isystem" "$d"); done < <("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
else
  while IFS= read -r d; do incs+=("-isystem" "$d"); done < <("$py" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)
print(sysconfig.get_paths()['include'])")
  label="torch $("$py" -c 'import torch; print(torch.__version__)') headers"
fi
g++ -std=c++17 -c -O1 -o /dev/null -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
  "${incs[@]}" -isystem "$stubs" -isystem "$cuda_inc" -I"$here/.." "$here/bindings.cpp"
echo "ok   csrc/cuda/bindings.cpp (g++ -c -O1 -Werror against $label)"
