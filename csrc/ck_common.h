// Shared helpers of the C++ kernels (no CUDA headers: nvcc compiles csrc/cuda/*.cu
// without torch; the torch glue lives in .cpp files).
#pragma once

#include <string>
#include <vector>

#ifndef CK_WITH_CUDA
#define CK_WITH_CUDA 0
#endif
#define CK_VERSION_STRING "0.1.0"
#define CK_STR2(x) #x
#define CK_STR(x) CK_STR2(x)
#define TORCH_VERSION_STRING_CK \
  CK_STR(TORCH_VERSION_MAJOR) "." CK_STR(TORCH_VERSION_MINOR) "." CK_STR(TORCH_VERSION_PATCH)
#ifndef CK_CUDA_ARCHS
#define CK_CUDA_ARCHS "unknown"
#endif

namespace ck {

// Each CPU kernel file records the ops it implements (static registrar below), so
// `python -m contrastive_kernels info` can say what this build contains.
std::vector<std::string>& registered_cpu_ops();

struct CpuOpRecord {
  explicit CpuOpRecord(const char* name) { registered_cpu_ops().emplace_back(name); }
};

}  // namespace ck
