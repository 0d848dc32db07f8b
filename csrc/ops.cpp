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

TORCH_LIBRARY(contrastive_kernels, m) {
  // ---- log-sum-exp family --------------------------------------------------
  // S_ij = scale * (q_rscale_i q_i) . (k_rscale_j k_j) + col_bias_j over the pairs
  // (i, j) that the mask keeps.  q_rscale / k_rscale (float32, optional) are the
  // fused row normalizations (1 / max(|x|, 1e-12)), so normalized copies of low
  // precision inputs are never rounded.  mask_mode bits: 1 drops j == i + diag_offset,
  // 2 drops j == pos_index[i], 4 drops q_labels[i] == k_labels[j].
  // Returns row_lse (N,) float32 and, when compute_col, col_lse (M,) float32
  // (log-sum-exp over the kept i of column j).  A row or column with no kept
  // pair has log-sum-exp -inf and receives no gradient.
  m.def("lse_forward(Tensor q, Tensor k, Tensor scale, Tensor? q_rscale, Tensor? k_rscale, Tensor? col_bias, "
        "Tensor? pos_index, Tensor? q_labels, Tensor? k_labels, int diag_offset, int mask_mode, "
        "bool compute_col) -> (Tensor, Tensor)");
  // With dS_ij = grad_row_i exp(S_ij - row_lse_i) + grad_col_j exp(S_ij - col_lse_j) on kept
  // pairs, A_i = sum_j dS_ij k_rscale_j k_j and B_j = sum_i dS_ij q_rscale_i q_i:
  //   dq_i = scale q_rscale_i A_i          (q.dtype)      d q_rscale_i = scale q_i . A_i
  //   dk_j = scale k_rscale_j B_j          (k.dtype)      d k_rscale_j = scale k_j . B_j
  //   dscale = sum_i q_rscale_i q_i . A_i  (() float32)   dcol_bias_j = sum_i dS_ij
  // (absent rscale = 1).  Returns (dq, dk, dscale, dcol_bias, dq_rscale, dk_rscale),
  // each empty when its need_* flag is false.  When q and k are the same tensor (and
  // q_rscale the same tensor as k_rscale, need_q == need_k), a backend may return the
  // whole gradient of that tensor in dq / dq_rscale and zeros in dk / dk_rscale: autograd
  // sums the two, so the input's gradient is the same (the CPU symmetric fast path does).
  m.def("lse_backward(Tensor grad_row, Tensor grad_col, Tensor q, Tensor k, Tensor scale, Tensor? q_rscale, "
        "Tensor? k_rscale, Tensor? col_bias, Tensor? pos_index, Tensor? q_labels, Tensor? k_labels, "
        "int diag_offset, int mask_mode, Tensor row_lse, Tensor col_lse, bool need_q, bool need_k, "
        "bool need_scale, bool need_bias, bool need_q_rscale, bool need_k_rscale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- pairwise sigmoid family (SigLIP and per-pair softplus sums) ----------
  // x_ij = scale * <q_i, k_j> + bias + row_offset_i.  Pair (i, j) is positive when
  // q_labels[i] == k_labels[j] (labels given) or j == i + diag_offset (no labels).
  // mode bits: 1 every pair negative (negative_only), 2 only positive pairs count,
  // 4 drop j == i + diag_offset.  Term: softplus(-x) for a positive pair,
  // softplus(x) for a negative one.  Returns the per-row sums (N,) float32.
  m.def("pairwise_forward(Tensor q, Tensor k, Tensor scale, Tensor bias, Tensor? row_offset, "
        "Tensor? q_labels, Tensor? k_labels, int diag_offset, int mode) -> Tensor");
  // Returns dq, dk, dscale (), dbias (), drow_offset (N,); each empty when not needed.
  m.def("pairwise_backward(Tensor grad_row, Tensor q, Tensor k, Tensor scale, Tensor bias, "
        "Tensor? row_offset, Tensor? q_labels, Tensor? k_labels, int diag_offset, int mode, "
        "bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_offset) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fused forward and gradient of the total T = sum of the per-row sums, for losses whose
  // upstream gradient is one scalar (the gradient of c T is c times T's): returns
  // (T () float32, dT/dq, dT/dk (float32, whatever the input dtype), dT/dscale (),
  // dT/dbias (), dT/drow_offset (N,)), each gradient empty when its need_* flag is false.
  m.def("pairwise_fused(Tensor q, Tensor k, Tensor scale, Tensor bias, Tensor? row_offset, "
        "Tensor? q_labels, Tensor? k_labels, int diag_offset, int mode, "
        "bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_offset) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- cross-correlation family (Barlow Twins, VICReg) ----------------------
  // a, b: (N, D).  C = a^T b (D x D, never formed on the Gram path).
  // Returns offdiag = sum_{d != e} C_de^2 (0-dim float32, accumulated in at least
  // float32 with the diagonal cancellation guarded) and diag = C_dd (D,) float32.
  // path: 0 auto (by cost), 1 Gram (N x N), 2 tiled (D x D tiles).
  m.def("xcorr_forward(Tensor a, Tensor b, int path) -> (Tensor, Tensor)");
  // Returns da, db (input dtypes); each empty when not needed.
  m.def("xcorr_backward(Tensor grad_offdiag, Tensor grad_diag, Tensor a, Tensor b, int path, "
        "bool need_a, bool need_b) -> (Tensor, Tensor)");

  // ---- fused normalized similarity -----------------------------------------
  // out = scale * a_hat b_hat^T with a_hat = a / max(|a|, 1e-12) when normalize.
  m.def("similarity_forward(Tensor a, Tensor b, Tensor scale, bool normalize) -> Tensor");
  // Returns da, db, dscale (); each empty when not needed.
  m.def("similarity_backward(Tensor grad, Tensor a, Tensor b, Tensor scale, bool normalize, "
        "bool need_a, bool need_b, bool need_scale) -> (Tensor, Tensor, Tensor)");
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
