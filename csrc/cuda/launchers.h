// Host launchers of the CUDA kernels: plain parameter structs, no torch headers, so
// the .cu files compile with nvcc alone (CI compile-checks them without a GPU) and
// csrc/cuda/bindings.cpp (the torch glue) is the only file that sees both worlds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ck {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One struct for the two families that share the tile kernel (log-sum-exp and
// pairwise sigmoid).  Pointers that an op does not use, or whose optional tensor is
// absent, are nullptr.  Every vector is contiguous; float vectors are float32.
struct FamilyParams {
  const void* q = nullptr;  // (n, d), dtype
  const void* k = nullptr;  // (m, d), dtype
  int64_t n = 0, m = 0, d = 0;
  DType dtype = DType::kFloat32;
  const float* scale = nullptr;  // device scalar

  // log-sum-exp family
  const float* q_rscale = nullptr;  // (n,)
  const float* k_rscale = nullptr;  // (m,)
  const float* col_bias = nullptr;  // (m,)
  const int64_t* pos_index = nullptr;  // (n,)
  const int64_t* q_labels = nullptr;   // (n,)  (both families)
  const int64_t* k_labels = nullptr;   // (m,)  (both families)
  int64_t diag_offset = 0;
  int mask_mode = 0;

  // pairwise family
  const float* bias = nullptr;        // device scalar
  const float* row_offset = nullptr;  // (n,)
  int pair_mode = 0;

  // forward outputs
  float* row_out = nullptr;  // (n,): row_lse or per-row pairwise sums
  float* col_out = nullptr;  // (m,): col_lse (lse, compute_col)

  // backward inputs
  const float* grad_row = nullptr;  // (n,)
  const float* grad_col = nullptr;  // (m,) or nullptr (no column term)
  const float* row_lse = nullptr;   // (n,)
  const float* col_lse = nullptr;   // (m,) or nullptr

  // backward outputs (nullptr when not needed)
  void* dq = nullptr;            // (n, d), dtype
  void* dk = nullptr;            // (m, d), dtype
  float* dscale = nullptr;       // ()
  float* dbias = nullptr;        // () pairwise
  float* dcol_bias = nullptr;    // (m,) lse
  float* dq_rscale = nullptr;    // (n,) lse
  float* dk_rscale = nullptr;    // (m,) lse
  float* drow_offset = nullptr;  // (n,) pairwise

  // backward workspace: backward_workspace_floats(p) floats (per-block partial sums,
  // reduced in a fixed order: no float atomics)
  float* workspace = nullptr;
};

// Number of float32 workspace elements the backward launchers need.
int64_t backward_workspace_floats(const FamilyParams& p);

cudaError_t lse_forward(const FamilyParams& p, bool compute_col, cudaStream_t stream);
cudaError_t lse_backward(const FamilyParams& p, cudaStream_t stream);
cudaError_t pairwise_forward(const FamilyParams& p, cudaStream_t stream);
cudaError_t pairwise_backward(const FamilyParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace ck
