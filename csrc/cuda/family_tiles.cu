// Host side of the log-sum-exp and pairwise-sigmoid tile kernels (contracts in csrc/op_schemas.h):
// the entry points of launchers.h, the backward's passes and sums, the workspace sizes.  The
// kernels, their design and their launch plans are in family_tiles.cuh; each element type and
// direction (and, backward, family) is compiled in a translation unit of its own
// (family_tiles_<type>_fwd.cu, family_tiles_<type>_bwd_<family>.cu).
#include "family_tiles.cuh"

namespace ck {
namespace cuda {

CK_FAMILY_TILES_FWD(extern, float)
CK_FAMILY_TILES_BWD(extern, float, kLse)
CK_FAMILY_TILES_BWD(extern, float, kLseLabels)
CK_FAMILY_TILES_BWD(extern, float, kPairwise)
CK_FAMILY_TILES_BWD(extern, float, kLse2)
CK_FAMILY_TILES_FWD(extern, __half)
CK_FAMILY_TILES_BWD(extern, __half, kLse)
CK_FAMILY_TILES_BWD(extern, __half, kLseLabels)
CK_FAMILY_TILES_BWD(extern, __half, kPairwise)
CK_FAMILY_TILES_BWD(extern, __half, kLse2)
CK_FAMILY_TILES_FWD(extern, __nv_bfloat16)
CK_FAMILY_TILES_BWD(extern, __nv_bfloat16, kLse)
CK_FAMILY_TILES_BWD(extern, __nv_bfloat16, kLseLabels)
CK_FAMILY_TILES_BWD(extern, __nv_bfloat16, kPairwise)
CK_FAMILY_TILES_BWD(extern, __nv_bfloat16, kLse2)

namespace {

template <int FAM, bool TRANS, bool BWD>
cudaError_t launch_dtype(const FamilyParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_typed<float, FAM, TRANS, BWD>(p, stream);
    case DType::kFloat16: return launch_typed<__half, FAM, TRANS, BWD>(p, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16, FAM, TRANS, BWD>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// Row-direction backward (dq, dq_rscale / drow_offset, dscale and dbias partials),
// then the column direction (dk, dk_rscale, dcol_bias), then the fixed-order sums.
// Workspace (backward_workspace_floats): the row pass's double partials, then the split
// partials of whichever pass runs.
template <int FAM>
cudaError_t backward(const FamilyParams& p_in, bool need_row_pass, bool need_col_pass, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  const Plan row_plan = plan_pass(p_in, false, true);
  const int64_t dbl = double_part_floats(p_in, row_plan);
  if (need_row_pass) {
    FamilyParams p = p_in;
    p.dk = nullptr;
    p.split_part = p.workspace + dbl;
    err = launch_dtype<FAM, false, true>(p, stream);
    if (err != cudaSuccess) return err;
    const int64_t nb = row_blocks(p.n) * row_plan.splits;  // partials per sum
    const double* parts = reinterpret_cast<const double*>(p.workspace);
    if (p.dscale && nb > 0) {
      CK_LAUNCH(1, 256, 0, stream, reduce_partials_kernel)(parts, nb, p.dscale);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    // the second whole-matrix sum: pairwise's dbias, kLse2's dscale0
    float* second = FAM == kPairwise ? p.dbias : FAM == kLse2 ? p.dscale0 : nullptr;
    if (second && nb > 0) {
      CK_LAUNCH(1, 256, 0, stream, reduce_partials_kernel)(parts + nb, nb, second);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (nb == 0) {
      if (p.dscale) cudaMemsetAsync(p.dscale, 0, sizeof(float), stream);
      if (second) cudaMemsetAsync(second, 0, sizeof(float), stream);
    }
  }
  if (need_col_pass) {
    FamilyParams p = p_in;
    p.dq = nullptr;
    p.split_part = p.workspace + dbl;
    err = launch_dtype<FAM, true, true>(p, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t backward_workspace_floats(const FamilyParams& p) {
  FamilyParams row = p, col = p;
  row.dk = nullptr;
  col.dq = nullptr;
  const int64_t a = split_part_floats(row, false), b = split_part_floats(col, true);
  return double_part_floats(p, plan_pass(p, false, true)) + (a > b ? a : b);
}

// the column splits' partial states of the larger pass (the passes run one after the other)
int64_t forward_workspace_floats(const FamilyParams& p, bool compute_col) {
  auto need = [&](bool trans) {
    const int64_t splits = plan_pass(p, trans, false).splits;
    return splits > 1 ? kSplitFields * splits * (trans ? p.m : p.n) : 0;
  };
  if (fused_cols(p, compute_col)) return cols_workspace_floats(p, plan_cols(p));
  const int64_t row = need(false), col = compute_col ? need(true) : 0;
  return row > col ? row : col;
}

cudaError_t lse_forward(const FamilyParams& p, bool compute_col, cudaStream_t stream) {
  if (p.mask_mode & 16) return launch_dtype<kLseLabels, false, false>(p, stream);  // (no column term)
  if (fused_cols(p, compute_col)) {
    switch (p.dtype) {
      case DType::kFloat32: return launch_fused_cols<float>(p, stream);
      case DType::kFloat16: return launch_fused_cols<__half>(p, stream);
      case DType::kBFloat16: return launch_fused_cols<__nv_bfloat16>(p, stream);
    }
    return cudaErrorInvalidValue;
  }
  cudaError_t err = launch_dtype<kLse, false, false>(p, stream);
  if (err != cudaSuccess || !compute_col) return err;
  return launch_dtype<kLse, true, false>(p, stream);
}

cudaError_t lse_backward(const FamilyParams& p, cudaStream_t stream) {
  const bool row = p.dq || p.dq_rscale || p.dscale;
  const bool col = p.dk || p.dk_rscale || p.dcol_bias;
  return (p.mask_mode & 16) ? backward<kLseLabels>(p, row, col, stream) : backward<kLse>(p, row, col, stream);
}

cudaError_t lse2_forward(const FamilyParams& p, cudaStream_t stream) {
  return launch_dtype<kLse2, false, false>(p, stream);
}

cudaError_t lse2_backward(const FamilyParams& p, cudaStream_t stream) {
  const bool row = p.dq || p.dq_rscale || p.dscale || p.dscale0;
  const bool col = p.dk || p.dk_rscale;
  return backward<kLse2>(p, row, col, stream);
}

cudaError_t pairwise_forward(const FamilyParams& p, cudaStream_t stream) {
  return launch_dtype<kPairwise, false, false>(p, stream);
}

cudaError_t pairwise_backward(const FamilyParams& p, cudaStream_t stream) {
  const bool row = p.dq || p.dscale || p.dbias || p.drow_offset || p.row_out;
  const bool col = p.dk != nullptr;
  return backward<kPairwise>(p, row, col, stream);
}

}  // namespace cuda
}  // namespace ck
