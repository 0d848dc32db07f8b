// Op schemas of contrastive_kernels and the Python module _C.
//
// Every kernel family is declared here once (TORCH_LIBRARY); backends implement it
// for a dispatch key in their own files: csrc/cpu/*.cpp register CPU kernels,
// csrc/cuda/*.cpp (CUDA builds only) register CUDA kernels.  Fake (meta)
// implementations and autograd are registered from Python
// (contrastive_kernels/_families.py), so the same op works under torch.compile.
//
// Conventions shared by every family (see _families.py for the full contract):
//   * q: (N, D), k: (M, D), same floating dtype (float32/float16/bfloat16),
//     contiguous, on the same device; products accumulated in float32.
//   * scale / bias: 0-dim float32 tensors on the device of q (a tensor so that a
//     learnable logit scale needs no host sync).
//   * Optional label vectors are int64; index vectors are int64.
//   * Outputs that are not needed are returned as empty (0-element) tensors.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "ck_common.h"
#include "op_schemas.h"

TORCH_LIBRARY(contrastive_kernels, m) {
  // The contracts of the ops are documented beside their schemas, in csrc/op_schemas.h.
#define CK_DEF(name, schema) m.def(name schema);
  CK_FOR_EACH_OP_SCHEMA(CK_DEF)
#undef CK_DEF
}

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = std::string(CK_VERSION_STRING);
  info["with_cuda"] = bool(CK_WITH_CUDA);
#if CK_WITH_CUDA
  info["cuda_archs"] = std::string(CK_CUDA_ARCHS);
#else
  info["cuda_archs"] = std::string("");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::string(TORCH_VERSION_STRING_CK);
  info["cpu_ops"] = py::cast(ck::registered_cpu_ops());
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "contrastive_kernels compiled kernels (C++ CPU, CUDA when built)";
  m.def("build_info", &build_info, "What this build contains");
}
