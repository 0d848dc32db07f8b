// The schemas of the contrastive_kernels ops (defined once, in csrc/op_schemas.h's TORCH_LIBRARY;
// the CUDA emulator build (csrc/cuda/bindings.cpp with CK_CUDA_EMU) defines the same
// schemas under "<name>_cuda_emu").  CK_SCHEMA_<OP> is the schema after the op's name.
#pragma once

// ---- log-sum-exp family --------------------------------------------------
// S_ij = scale * (q_rscale_i q_i) . (k_rscale_j k_j) + col_bias_j over the pairs
// (i, j) that the mask keeps.  q_rscale / k_rscale (float32, optional) are the
// fused row normalizations (1 / max(|x|, 1e-12)), so normalized copies of low
// precision inputs are never rounded.  mask_mode bits: 1 drops j == i + diag_offset,
// 2 drops j == pos_index[i], 4 drops q_labels[i] == k_labels[j].
// Returns row_lse (N,) float32 and, when compute_col, col_lse (M,) float32
// (log-sum-exp over the kept i of column j).  A row or column with no kept
// pair has log-sum-exp -inf and receives no gradient.
// Bit 8 (LSE_TARGET, csrc/lse_target.h): the outputs are cross-entropies,
// row_i = row_lse_i - S_{i, t_i} with t_i = pos_index[i] (any index in [0, M); the
// target need not be kept) or, without pos_index, i + diag_offset (must be < M), and
// col_j = col_lse_j - S_{j, j} (compute_col needs N == M, diag_offset 0, no
// pos_index), each formed in the kernel as (max - S_{i, t_i}) + log1p(e) from its own
// S_{i, t_i}, where the kernels' online sums keep the max's own term (an exact 1) out of
// e = sum - 1: accurate to the cross-entropy's own rounding however small it is (an LSE
// of ~100 minus a logit of ~100 would leave a float32 ulp of 100, 8e-6, in every loss, and
// log of a float32 sum 1 + tiny an ulp of 1, 6e-8: all of a confident row's loss).
// The third output (target_state) is then the kernel's target logits S_{i, t_i} (N,)
// float32 (the Triton backend: log2(e) S, its kernels' unit; empty without bit 8 or 16),
// which the backward takes with the cross-entropies: it forms
// exp((S_ij - S_{i, t_i}) - row_i), and at a kept target p - 1 = expm1(-row_i) per side
// (times its upstream gradient; a masked target: -grad_row_i (- grad_col_{t_i})) in float32
// inside the kernel (the softmax's p - 1, where a loss that subtracted the target logit
// outside would cancel two separately rounded gradients, and exp(-ce) - 1 would keep
// nothing of a tiny cross-entropy).
// Bit 16 (LSE_LABELS, SupCon's positives; needs q_labels and k_labels, not with bits 4
// or 8, no compute_col): P_i = the kept j with k_labels[j] == q_labels[i]; row_i =
// row_lse_i - xp_i, xp_i = (1/|P_i|) sum_{j in P_i} S_ij (row_lse_i when P_i is empty), the
// positive logits summed in the kernel's tile loop and the output formed as (max - xp_i) +
// log1p(rest) (a single positive at the max: exactly the small loss); target_state is (2, N)
// float32, xp (the kernel's unit) and 1/|P_i| (0, 0 without positives).  The backward takes
// row_lse (these outputs) as LSE_TARGET's cross-entropies, each row's LSE being xp + it, and
// subtracts grad_row_i / |P_i| from dS_ij at every j in P_i in float32 inside the kernel (p -
// 1/|P| formed before any rounding: with the positives near 1/|P| each, a loss that
// subtracted their mean outside would cancel two separately rounded gradients); a row with
// one positive gets grad_row_i expm1(-row_i) there (p - 1, exact however small the loss).
// Bit 32 (LSE_NORM): q_rscale / k_rscale are q's and k's own 1 / max(|x|, 1e-12); the forward
// ignores the bit, the backward returns dq / dk in float32 (whatever the input dtype) with
// d q_rscale / d k_rscale, from which the Python autograd wrapper (_families._fold_norm) folds
// the normalization's Jacobian in before the one rounding to the input dtype.
#define CK_SCHEMA_LSE_FORWARD \
  "(Tensor q, Tensor k, Tensor scale, Tensor? q_rscale, Tensor? k_rscale, Tensor? col_bias, " \
  "Tensor? pos_index, Tensor? q_labels, Tensor? k_labels, int diag_offset, int mask_mode, " \
  "bool compute_col) -> (Tensor, Tensor, Tensor)"
// With dS_ij = grad_row_i exp(S_ij - row_lse_i) + grad_col_j exp(S_ij - col_lse_j) on kept
// pairs (LSE_TARGET: exp((S_ij - x_i) - row_i) and exp((S_ij - x_j) - col_j), x the
// forward's target logits, minus the upstream gradients at the targets),
// A_i = sum_j dS_ij k_rscale_j k_j and B_j = sum_i dS_ij q_rscale_i q_i:
//   dq_i = scale q_rscale_i A_i          (q.dtype)      d q_rscale_i = scale q_i . A_i
//   dk_j = scale k_rscale_j B_j          (k.dtype)      d k_rscale_j = scale k_j . B_j
//   dscale = sum_i q_rscale_i q_i . A_i  (() float32)   dcol_bias_j = sum_i dS_ij
// (absent rscale = 1).  Returns (dq, dk, dscale, dcol_bias, dq_rscale, dk_rscale),
// each empty when its need_* flag is false.  When q and k are the same tensor (and
// q_rscale the same tensor as k_rscale, need_q == need_k), a backend may return the
// whole gradient of that tensor in dq / dq_rscale and zeros in dk / dk_rscale: autograd
// sums the two, so the input's gradient is the same (the CPU symmetric fast path does).
#define CK_SCHEMA_LSE_BACKWARD \
  "(Tensor grad_row, Tensor grad_col, Tensor q, Tensor k, Tensor scale, Tensor? q_rscale, " \
  "Tensor? k_rscale, Tensor? col_bias, Tensor? pos_index, Tensor? q_labels, Tensor? k_labels, " \
  "int diag_offset, int mask_mode, Tensor row_lse, Tensor col_lse, Tensor target_state, bool need_q, " \
  "bool need_k, bool need_scale, bool need_bias, bool need_q_rscale, bool need_k_rscale) " \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

// Two scales of one product (HCL's reweighting l(S1) - l(S0)): the row log-sum-exps of
// S1 = scale1 P and S0 = scale0 P over the same kept pairs, P_ij = (q_rscale_i q_i).(k_rscale_j k_j),
// from one product per tile.  mask_mode: bits 1, 2 and 32 only (no bias, target, labels or column
// term).  Returns (row_lse1, row_lse0), (N,) float32 each.  Every backend has them: the C++ CPU
// kernels, the CUDA kernels (and the "_cuda_emu" ops of the emulator build), Triton ("_triton",
// Python).
#define CK_SCHEMA_LSE2_FORWARD \
  "(Tensor q, Tensor k, Tensor scale1, Tensor scale0, Tensor? q_rscale, Tensor? k_rscale, " \
  "Tensor? pos_index, int diag_offset, int mask_mode) -> (Tensor, Tensor)"
// The gradients of sum_i grad1_i row_lse1_i + grad0_i row_lse0_i, with
// dS_ij = scale1 grad1_i p1_ij + scale0 grad0_i p0_ij per unit of P_ij on kept pairs (in float32,
// before the one rounding of the product: HCL's two terms nearly cancel).  Returns (dq, dk, dscale1,
// dscale0, dq_rscale, dk_rscale): dq / dk float32 whatever the input dtype (the caller folds the
// normalization in, as LSE_NORM), the rest float32; each empty when its need_* flag is false.  As
// lse_backward, when q and k are the same tensor (q_rscale the same as k_rscale, need_q == need_k) a
// backend may return the tensor's whole gradient in dq / dq_rscale and zeros in dk / dk_rscale.
#define CK_SCHEMA_LSE2_BACKWARD \
  "(Tensor grad1, Tensor grad0, Tensor q, Tensor k, Tensor scale1, Tensor scale0, Tensor? q_rscale, " \
  "Tensor? k_rscale, Tensor? pos_index, int diag_offset, int mask_mode, Tensor row1, Tensor row0, " \
  "bool need_q, bool need_k, bool need_scale1, bool need_scale0, bool need_q_rscale, bool need_k_rscale) " \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

// ---- pairwise sigmoid family (SigLIP and per-pair softplus sums) ----------
// x_ij = scale * <q_i, k_j> + bias + row_offset_i.  Pair (i, j) is positive when
// q_labels[i] == k_labels[j] (labels given) or j == i + diag_offset (no labels).
// mode bits: 1 every pair negative (negative_only), 2 only positive pairs count,
// 4 drop j == i + diag_offset.  Term: softplus(-x) for a positive pair,
// softplus(x) for a negative one.  Returns the per-row sums (N,) float32.
#define CK_SCHEMA_PAIRWISE_FORWARD \
  "(Tensor q, Tensor k, Tensor scale, Tensor bias, Tensor? row_offset, " \
  "Tensor? q_labels, Tensor? k_labels, int diag_offset, int mode) -> Tensor"
// Returns dq, dk, dscale (), dbias (), drow_offset (N,); each empty when not needed.
#define CK_SCHEMA_PAIRWISE_BACKWARD \
  "(Tensor grad_row, Tensor q, Tensor k, Tensor scale, Tensor bias, " \
  "Tensor? row_offset, Tensor? q_labels, Tensor? k_labels, int diag_offset, int mode, " \
  "bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_offset) " \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
// Fused forward and gradient of the total T = sum of the per-row sums, for losses whose
// upstream gradient is one scalar (the gradient of c T is c times T's): returns
// (T () float32, dT/dq, dT/dk (float32, whatever the input dtype), dT/dscale (),
// dT/dbias (), dT/drow_offset (N,)), each gradient empty when its need_* flag is false.
#define CK_SCHEMA_PAIRWISE_FUSED \
  "(Tensor q, Tensor k, Tensor scale, Tensor bias, Tensor? row_offset, " \
  "Tensor? q_labels, Tensor? k_labels, int diag_offset, int mode, " \
  "bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_offset) " \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

// ---- cross-correlation family (Barlow Twins, VICReg) ----------------------
// a, b: (N, D).  C = a^T b (D x D, never formed on the Gram path).
// Returns offdiag = sum_{d != e} C_de^2 (0-dim float32, accumulated in at least
// float32 with the diagonal cancellation guarded) and diag = C_dd (D,) float32.
// path: 0 auto (by cost), 1 Gram (N x N), 2 tiled (D x D tiles).
#define CK_SCHEMA_XCORR_FORWARD \
  "(Tensor a, Tensor b, int path) -> (Tensor, Tensor)"
// Returns da, db (input dtypes); each empty when not needed.
#define CK_SCHEMA_XCORR_BACKWARD \
  "(Tensor grad_offdiag, Tensor grad_diag, Tensor a, Tensor b, int path, " \
  "bool need_a, bool need_b) -> (Tensor, Tensor)"

// ---- fused normalized similarity -----------------------------------------
// out = scale * a_hat b_hat^T with a_hat = a / max(|a|, 1e-12) when normalize.
#define CK_SCHEMA_SIMILARITY_FORWARD \
  "(Tensor a, Tensor b, Tensor scale, bool normalize) -> Tensor"
// Returns da, db, dscale (); each empty when not needed.
#define CK_SCHEMA_SIMILARITY_BACKWARD \
  "(Tensor grad, Tensor a, Tensor b, Tensor scale, bool normalize, " \
  "bool need_a, bool need_b, bool need_scale) -> (Tensor, Tensor, Tensor)"

// X(name, schema) for every op.
#define CK_FOR_EACH_OP_SCHEMA(X) \
  X("lse_forward", CK_SCHEMA_LSE_FORWARD) \
  X("lse_backward", CK_SCHEMA_LSE_BACKWARD) \
  X("lse2_forward", CK_SCHEMA_LSE2_FORWARD) \
  X("lse2_backward", CK_SCHEMA_LSE2_BACKWARD) \
  X("pairwise_forward", CK_SCHEMA_PAIRWISE_FORWARD) \
  X("pairwise_backward", CK_SCHEMA_PAIRWISE_BACKWARD) \
  X("pairwise_fused", CK_SCHEMA_PAIRWISE_FUSED) \
  X("xcorr_forward", CK_SCHEMA_XCORR_FORWARD) \
  X("xcorr_backward", CK_SCHEMA_XCORR_BACKWARD) \
  X("similarity_forward", CK_SCHEMA_SIMILARITY_FORWARD) \
  X("similarity_backward", CK_SCHEMA_SIMILARITY_BACKWARD)
