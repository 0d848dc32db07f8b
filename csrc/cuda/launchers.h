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

  // forward outputs (row_out also in the pairwise backward: the fused forward-and-gradient
  // pass, grad_row = 1, writes the per-row sums there too)
  float* row_out = nullptr;  // (n,): row_lse or per-row pairwise sums (LSE_TARGET: cross-entropies)
  float* col_out = nullptr;  // (m,): col_lse (lse, compute_col)
  float* target_out = nullptr;  // (n,): LSE_TARGET, the row pass's target logits S_{i, t_i};
                                // (2, n): LSE_LABELS, the mean positive logits and 1/|P_i|

  // backward inputs
  const float* grad_row = nullptr;  // (n,)
  const float* grad_col = nullptr;  // (m,) or nullptr (no column term)
  const float* row_lse = nullptr;   // (n,)  (LSE_TARGET: the cross-entropies)
  const float* col_lse = nullptr;   // (m,) or nullptr
  const float* target_state = nullptr;  // (n,) LSE_TARGET: the forward's target_out (LSE_LABELS: its row 0,
                                        // the mean positive logits), else nullptr
  const float* label_weight = nullptr;  // (n,) LSE_LABELS: 1/|P_i| (target_out's row 1)

  // backward outputs (nullptr when not needed)
  void* dq = nullptr;            // (n, d), dtype (float32 when grad_f32)
  void* dk = nullptr;            // (m, d), dtype (float32 when grad_f32)
  bool grad_f32 = false;         // dq / dk written as float32 whatever the input dtype
  float* dscale = nullptr;       // ()
  float* dbias = nullptr;        // () pairwise
  float* dcol_bias = nullptr;    // (m,) lse
  float* dq_rscale = nullptr;    // (n,) lse
  float* dk_rscale = nullptr;    // (m,) lse
  float* drow_offset = nullptr;  // (n,) pairwise

  // backward workspace: backward_workspace_floats(p) floats (per-block double partial
  // sums, reduced in a fixed order: no float atomics; 8-byte aligned); forward:
  // forward_workspace_floats(p, compute_col) floats (the column splits' partial states)
  float* workspace = nullptr;
  float* split_part = nullptr;  // (set by the backward launcher: its column splits' partials, in workspace)
  int64_t split_tiles = 0;      // (set by the launchers: column tiles per split)
  // (set by the fused forward's launcher, lse with compute_col: the column partials of one
  // launch, [4][row blocks][m], and the launch's first row block)
  float* col_part = nullptr;
  int64_t row_block0 = 0;
  int num_sms = 0;  // multiprocessors of the device (the forward's column splits)
  // the 16-bit kernels' products from wgmma, forward and backward (set by the binding: a compute
  // capability 9.0 device, an sm_90a build and CONTRASTIVE_KERNELS_CUDA_WGMMA=1; the emulator: the
  // variable)
  bool wgmma = false;

  // two scales of one product (lse2_forward / lse2_backward, HCL): S0 = scale0 P beside S = scale P,
  // plain row log-sum-exps (masks and rscales only)
  const float* scale0 = nullptr;     // device scalar
  float* row_out0 = nullptr;         // (n,) forward: row_lse at scale0
  const float* row_lse0 = nullptr;   // (n,) backward inputs: the forward's row_out0 and its upstream
  const float* grad_row0 = nullptr;  // gradient
  float* dscale0 = nullptr;          // () backward output
};

// Number of float32 workspace elements the backward launchers need.
int64_t backward_workspace_floats(const FamilyParams& p);
// ... and the forward launchers (0 where no pass splits its columns).
int64_t forward_workspace_floats(const FamilyParams& p, bool compute_col);

cudaError_t lse_forward(const FamilyParams& p, bool compute_col, cudaStream_t stream);
cudaError_t lse_backward(const FamilyParams& p, cudaStream_t stream);
// Two scales in one pass (csrc/op_schemas.h, lse2_forward / lse2_backward): the forward writes row_out
// and row_out0; the backward's dS = scale g p + scale0 g0 p0 per unit of the product (dq / dk in
// float32: grad_f32), dscale and dscale0.
cudaError_t lse2_forward(const FamilyParams& p, cudaStream_t stream);
cudaError_t lse2_backward(const FamilyParams& p, cudaStream_t stream);
cudaError_t pairwise_forward(const FamilyParams& p, cudaStream_t stream);
cudaError_t pairwise_backward(const FamilyParams& p, cudaStream_t stream);

// ------------------------------------------------------ cross-correlation family
// a, b: (n, d) contiguous, same dtype; C = a^T b.  csrc/cuda/xcorr.cu.
struct XcorrParams {
  const void* a = nullptr;
  const void* b = nullptr;
  int64_t n = 0, d = 0;
  DType dtype = DType::kFloat32;
  bool same = false;  // a and b are the same tensor (C symmetric)

  // forward outputs
  float* offdiag = nullptr;  // () sum_{d != e} C_de^2
  float* diag = nullptr;     // (d,) C_dd, or nullptr
  double* diag64 = nullptr;  // (d,) C_dd in float64 (xcorr_diag's output, the Gram path's input)

  // backward (tiled path)
  const float* grad_offdiag = nullptr;  // device scalar
  const float* grad_diag = nullptr;     // (d,)
  void* da = nullptr;                   // (n, d) dtype, or nullptr when not needed
  void* db = nullptr;                   // (n, d) dtype, or nullptr
  void* gpanel = nullptr;               // xcorr_panel_bytes(d, dtype) bytes

  // workspace: the *_workspace_doubles(...) of the launcher called
  double* workspace = nullptr;
};

// C_dd in float64 (exact products, fixed-order sums) -> diag64 and (if set) diag.
int64_t xcorr_diag_workspace_doubles(int64_t n, int64_t d);
cudaError_t xcorr_diag(const XcorrParams& p, cudaStream_t stream);
// Tiled path forward: offdiag from 64 x 64 tiles of C (never stored), per-tile partials.
int64_t xcorr_tiled_workspace_doubles(int64_t d);
cudaError_t xcorr_tiled_forward(const XcorrParams& p, cudaStream_t stream);
// Gram path forward: offdiag = max(<ga, gb> - sum_d diag64_d^2, 0) from the float64 Gram
// matrices ga, gb (count = n * n entries each), all sums in float64 in a fixed order.
int64_t xcorr_gram_workspace_doubles(int64_t count);
cudaError_t xcorr_gram_offdiag(const double* ga, const double* gb, int64_t count, const double* diag64, int64_t d,
                               double* workspace, float* offdiag, cudaStream_t stream);
// Tiled path backward: da = b G^T, db = a G through G panels of xcorr_panel_cols(d) rows.
int64_t xcorr_panel_cols(int64_t d);
int64_t xcorr_panel_bytes(int64_t d, DType dtype);
cudaError_t xcorr_tiled_backward(const XcorrParams& p, cudaStream_t stream);

// ----------------------------------------------------------- normalized similarity
// out = scale * a_hat b_hat^T; a (n, d), b (m, d) contiguous, same dtype.  csrc/cuda/similarity.cu.
struct SimilarityParams {
  const void* a = nullptr;
  const void* b = nullptr;
  int64_t n = 0, m = 0, d = 0;
  DType dtype = DType::kFloat32;
  bool normalize = true;
  const float* scale = nullptr;  // device scalar

  // row norms (workspace when normalize, else nullptr): |x| and 1 / max(|x|, 1e-12)
  float* a_norm = nullptr;   // (n,)
  float* a_rnorm = nullptr;  // (n,)
  float* b_norm = nullptr;   // (m,)
  float* b_rnorm = nullptr;  // (m,)

  void* out = nullptr;  // forward: (n, m) dtype

  // backward
  const void* grad = nullptr;  // (n, m) dtype
  void* da = nullptr;          // (n, d) dtype or nullptr
  void* db = nullptr;          // (m, d) dtype or nullptr
  float* dscale = nullptr;     // () or nullptr
  float* u = nullptr;          // (n, d) float32 workspace when da or dscale: U = G b_hat
  float* v = nullptr;          // (m, d) float32 workspace when db: V = G^T a_hat
  float* row_parts = nullptr;  // (n,) float32 workspace when dscale (float32 inputs)
  // 16-bit inputs: dscale = sum G . (a_hat b_hat^T) from a tile product of the exact inputs
  // (b_hat rounded to 16 bits in U would spoil this cancelling sum): per-tile partials
  double* dot_parts = nullptr;  // similarity_dot_parts(n, m) doubles when dscale (16-bit inputs)
};

int64_t similarity_dot_parts(int64_t n, int64_t m);

cudaError_t similarity_forward(const SimilarityParams& p, cudaStream_t stream);
cudaError_t similarity_backward(const SimilarityParams& p, cudaStream_t stream);

// ------------------------------------------------------------- wgmma product (sm_90a)
// c = a b^T in float32; a (m, k), b (n, k) contiguous, the same 16-bit dtype; with b_kn, b is
// (k, n) and c = a b (B read N-major by wgmma's transposed form, as the backward reads Y).  The first
// kernel of the wgmma path (csrc/cuda/wgmma_gemm.cu): it checks the path's staging,
// descriptors and fragment layout against torch on a GPU, and its rate is the `peak` stage's
// measure of what cp.async-staged wgmma tiles reach.  Needs an sm_90a build on a compute
// capability 9.0 device (the binding checks; elsewhere the kernel traps).
struct WgmmaGemmParams {
  const void* a = nullptr;
  const void* b = nullptr;
  float* c = nullptr;  // (m, n)
  int64_t m = 0, n = 0, k = 0;
  DType dtype = DType::kBFloat16;
  bool b_kn = false;
};
// Largest m the launch's grid covers ((m + 63) / 64 row blocks in gridDim.y).
constexpr int64_t kWgmmaGemmMaxRows = 64 * 65535;
cudaError_t wgmma_gemm(const WgmmaGemmParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace ck
