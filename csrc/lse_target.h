// The LSE_TARGET bit (8) of the log-sum-exp ops' mask_mode, shared by the CPU ops
// (csrc/cpu/lse.cpp) and the CUDA glue (csrc/cuda/bindings.cpp); contract in
// csrc/op_schemas.h.  With it the outputs are cross-entropies, row_i = LSE_i - S_{i, t_i}
// (t_i = pos_index[i], or i + diag_offset without pos_index) and col_j = LSE_j - S_{j, j}
// (square, diag_offset 0, no pos_index), formed inside the kernels from their own target
// logits, and the kernels' backward puts the target's -grad into dS_{i, t_i} before any
// rounding: p - 1 is formed in float32 inside the kernel (as a softmax cross-entropy does)
// instead of subtracting two rounded gradients.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace ck {

constexpr int64_t kLseTarget = 8;
constexpr int64_t kLseLabels = 16;  // SupCon's positives: the kept same-label pairs (op_schemas.h)
constexpr int64_t kLseNorm = 32;    // the backward returns dq / dk in float32 (op_schemas.h)

// LSE_LABELS needs both label vectors, excludes MASK_SAME_LABEL (4) and LSE_TARGET (8), and has
// no column term.
inline void lse_labels_check(int64_t mask_mode, bool has_labels, bool col) {
  if (!(mask_mode & kLseLabels)) return;
  TORCH_CHECK(has_labels, "mask_mode bit 16 (LSE_LABELS) needs q_labels and k_labels");
  TORCH_CHECK(!(mask_mode & 4) && !(mask_mode & kLseTarget),
              "mask_mode bit 16 (LSE_LABELS) cannot be combined with bit 4 (MASK_SAME_LABEL) or bit 8 "
              "(LSE_TARGET), got mask_mode ", mask_mode);
  TORCH_CHECK(!col, "mask_mode bit 16 (LSE_LABELS) has no column term (compute_col must be False)");
}

// Every row's target column (int64, on like's device); checks that each target exists.
// `col`: the call has a column term (compute_col, or a column gradient).
inline at::Tensor lse_target_index(int64_t n, int64_t m, const std::optional<at::Tensor>& pos_index,
                                   int64_t diag_offset, bool col, const at::Tensor& like) {
  if (pos_index.has_value()) {
    TORCH_CHECK(!col,
                "mask_mode bit 8 (LSE_TARGET) with a column term (compute_col) needs pos_index None: column j's "
                "target is row j");
    TORCH_CHECK(pos_index->dim() == 1 && pos_index->size(0) == n && pos_index->scalar_type() == at::kLong,
                "pos_index must be int64 of shape (N,) = (", n, ",), got ", pos_index->scalar_type(), " ",
                pos_index->sizes());
    if (n > 0 && pos_index->device().is_cpu()) {  // (on a GPU no sync: index_select checks the range)
      const auto mn = pos_index->min().item<int64_t>(), mx = pos_index->max().item<int64_t>();
      TORCH_CHECK(mn >= 0 && mx < m, "pos_index values (LSE_TARGET targets) must lie in [0, M) = [0, ", m,
                  "), got min ", mn, " max ", mx);
    }
    return pos_index->contiguous();
  }
  if (col) {
    TORCH_CHECK(n == m && diag_offset == 0,
                "mask_mode bit 8 (LSE_TARGET) with a column term (compute_col) needs N == M and diag_offset 0 "
                "(targets on the diagonal), got N = ",
                n, ", M = ", m, ", diag_offset ", diag_offset);
  } else {
    TORCH_CHECK(n == 0 || (diag_offset >= 0 && n - 1 + diag_offset < m),
                "mask_mode bit 8 (LSE_TARGET) without pos_index: row i's target column i + diag_offset must "
                "exist for every row, got N = ",
                n, ", M = ", m, ", diag_offset ", diag_offset);
  }
  return at::arange(n, like.options().dtype(at::kLong)).add_(diag_offset);
}

}  // namespace ck
