// Torch glue of the CUDA kernels (built only in CUDA builds): argument checks naming
// the argument, output allocation, the current stream, and registration for the CUDA
// dispatch key.  The kernels themselves (csrc/cuda/*.cu) see plain parameter structs.
//
// Implemented here: the log-sum-exp and pairwise-sigmoid families.  The
// cross-correlation and similarity families have no CUDA kernel yet and are not
// registered for CUDA (the dispatcher reports them missing; the Triton backend
// covers them).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cuda/launchers.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
namespace kc = ck::cuda;

kc::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kc::DType::kFloat32;
    case at::kHalf: return kc::DType::kFloat16;
    case at::kBFloat16: return kc::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "contrastive_kernels (cuda): ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return kc::DType::kFloat32;
}

void check_pair(const Tensor& q, const Tensor& k, const char* qn, const char* kn) {
  TORCH_CHECK(q.is_cuda(), "contrastive_kernels (cuda): ", qn, " must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), "contrastive_kernels (cuda): ", kn, " is on ", k.device(), " but ", qn,
              " is on ", q.device());
  TORCH_CHECK(q.dim() == 2, "contrastive_kernels (cuda): ", qn, " must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, "contrastive_kernels (cuda): ", kn, " must be 2-D (M, D), got shape ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "contrastive_kernels (cuda): ", qn, " and ", kn,
              " must have the same feature dimension, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "contrastive_kernels (cuda): ", qn, " and ", kn,
              " must have the same dtype, got ", q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(q.is_contiguous(), "contrastive_kernels (cuda): ", qn, " must be contiguous");
  TORCH_CHECK(k.is_contiguous(), "contrastive_kernels (cuda): ", kn, " must be contiguous");
  dtype_of(q, qn);
}

const float* scalar_ptr(const Tensor& s, const Tensor& like, const char* name) {
  TORCH_CHECK(s.numel() == 1 && s.dim() == 0, "contrastive_kernels (cuda): ", name,
              " must be a 0-dim tensor, got shape ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat, "contrastive_kernels (cuda): ", name, " must be float32, got ",
              s.scalar_type());
  TORCH_CHECK(s.device() == like.device(), "contrastive_kernels (cuda): ", name, " is on ", s.device(),
              " but the inputs are on ", like.device());
  return s.data_ptr<float>();
}

const float* fvec_ptr(const Tensor& v, int64_t len, const Tensor& like, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len, "contrastive_kernels (cuda): ", name, " must have shape (", len,
              ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat, "contrastive_kernels (cuda): ", name, " must be float32, got ",
              v.scalar_type());
  TORCH_CHECK(v.device() == like.device(), "contrastive_kernels (cuda): ", name, " is on ", v.device(),
              " but the inputs are on ", like.device());
  TORCH_CHECK(v.is_contiguous(), "contrastive_kernels (cuda): ", name, " must be contiguous");
  return v.data_ptr<float>();
}

const float* opt_fvec_ptr(const OptT& v, int64_t len, const Tensor& like, const char* name) {
  return v.has_value() ? fvec_ptr(*v, len, like, name) : nullptr;
}

const int64_t* opt_ivec_ptr(const OptT& v, int64_t len, const Tensor& like, const char* name) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == len, "contrastive_kernels (cuda): ", name, " must have shape (", len,
              ",), got ", v->sizes());
  TORCH_CHECK(v->scalar_type() == at::kLong, "contrastive_kernels (cuda): ", name, " must be int64, got ",
              v->scalar_type());
  TORCH_CHECK(v->device() == like.device(), "contrastive_kernels (cuda): ", name, " is on ", v->device(),
              " but the inputs are on ", like.device());
  TORCH_CHECK(v->is_contiguous(), "contrastive_kernels (cuda): ", name, " must be contiguous");
  return v->data_ptr<int64_t>();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "contrastive_kernels (cuda): ", what, " failed to launch: ",
              cudaGetErrorString(err));
}

Tensor f32(const Tensor& like, at::IntArrayRef shape) { return at::empty(shape, like.options().dtype(at::kFloat)); }
Tensor empty_like_dtype(const Tensor& like) { return at::empty({0}, like.options()); }

kc::FamilyParams base_params(const Tensor& q, const Tensor& k, const Tensor& scale) {
  kc::FamilyParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.n = q.size(0);
  p.m = k.size(0);
  p.d = q.size(1);
  p.dtype = dtype_of(q, "q");
  p.scale = scalar_ptr(scale, q, "scale");
  return p;
}

void lse_masks(kc::FamilyParams& p, const Tensor& q, const OptT& q_rscale, const OptT& k_rscale,
               const OptT& col_bias, const OptT& pos_index, const OptT& q_labels, const OptT& k_labels,
               int64_t diag_offset, int64_t mask_mode) {
  TORCH_CHECK(mask_mode >= 0 && mask_mode <= 7, "contrastive_kernels (cuda): mask_mode must be in [0, 7], got ",
              mask_mode);
  p.q_rscale = opt_fvec_ptr(q_rscale, p.n, q, "q_rscale");
  p.k_rscale = opt_fvec_ptr(k_rscale, p.m, q, "k_rscale");
  p.col_bias = opt_fvec_ptr(col_bias, p.m, q, "col_bias");
  p.pos_index = opt_ivec_ptr(pos_index, p.n, q, "pos_index");
  p.q_labels = opt_ivec_ptr(q_labels, p.n, q, "q_labels");
  p.k_labels = opt_ivec_ptr(k_labels, p.m, q, "k_labels");
  TORCH_CHECK(!(mask_mode & 2) || p.pos_index, "contrastive_kernels (cuda): mask_mode bit 2 needs pos_index");
  TORCH_CHECK(!(mask_mode & 4) || (p.q_labels && p.k_labels),
              "contrastive_kernels (cuda): mask_mode bit 4 needs q_labels and k_labels");
  p.diag_offset = diag_offset;
  p.mask_mode = static_cast<int>(mask_mode);
}

std::tuple<Tensor, Tensor> lse_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& scale,
                                            const OptT& q_rscale, const OptT& k_rscale, const OptT& col_bias,
                                            const OptT& pos_index, const OptT& q_labels, const OptT& k_labels,
                                            int64_t diag_offset, int64_t mask_mode, bool compute_col) {
  check_pair(q, k, "q", "k");
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = base_params(q, k, scale);
  lse_masks(p, q, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, diag_offset, mask_mode);
  Tensor row = f32(q, {p.n});
  Tensor col = compute_col ? f32(q, {p.m}) : f32(q, {0});
  p.row_out = row.data_ptr<float>();
  p.col_out = compute_col ? col.data_ptr<float>() : nullptr;
  check_launch(kc::lse_forward(p, compute_col, at::cuda::getCurrentCUDAStream()), "lse_forward");
  return {row, col};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_backward_cuda(
    const Tensor& grad_row, const Tensor& grad_col, const Tensor& q, const Tensor& k, const Tensor& scale,
    const OptT& q_rscale, const OptT& k_rscale, const OptT& col_bias, const OptT& pos_index, const OptT& q_labels,
    const OptT& k_labels, int64_t diag_offset, int64_t mask_mode, const Tensor& row_lse, const Tensor& col_lse,
    bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_q_rscale, bool need_k_rscale) {
  check_pair(q, k, "q", "k");
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = base_params(q, k, scale);
  lse_masks(p, q, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, diag_offset, mask_mode);
  p.grad_row = fvec_ptr(grad_row, p.n, q, "grad_row");
  p.row_lse = fvec_ptr(row_lse, p.n, q, "row_lse");
  // The column term exists when the forward computed col_lse (compute_col).
  const bool has_col = p.m > 0 && col_lse.numel() > 0;
  if (has_col) {
    p.col_lse = fvec_ptr(col_lse, p.m, q, "col_lse");
    p.grad_col = fvec_ptr(grad_col, p.m, q, "grad_col");
  }
  TORCH_CHECK(!need_q_rscale || p.q_rscale, "contrastive_kernels (cuda): need_q_rscale needs q_rscale");
  TORCH_CHECK(!need_k_rscale || p.k_rscale, "contrastive_kernels (cuda): need_k_rscale needs k_rscale");
  TORCH_CHECK(!need_bias || p.col_bias, "contrastive_kernels (cuda): need_bias needs col_bias");

  Tensor dq = need_q ? at::empty_like(q) : empty_like_dtype(q);
  Tensor dk = need_k ? at::empty_like(k) : empty_like_dtype(k);
  Tensor dscale = need_scale ? f32(q, {}) : f32(q, {0});
  Tensor dbias = need_bias ? f32(q, {p.m}) : f32(q, {0});
  Tensor dqr = need_q_rscale ? f32(q, {p.n}) : f32(q, {0});
  Tensor dkr = need_k_rscale ? f32(q, {p.m}) : f32(q, {0});
  p.dq = need_q ? dq.data_ptr() : nullptr;
  p.dk = need_k ? dk.data_ptr() : nullptr;
  p.dscale = need_scale ? dscale.data_ptr<float>() : nullptr;
  p.dcol_bias = need_bias ? dbias.data_ptr<float>() : nullptr;
  p.dq_rscale = need_q_rscale ? dqr.data_ptr<float>() : nullptr;
  p.dk_rscale = need_k_rscale ? dkr.data_ptr<float>() : nullptr;
  Tensor ws = f32(q, {kc::backward_workspace_floats(p)});
  p.workspace = ws.data_ptr<float>();
  check_launch(kc::lse_backward(p, at::cuda::getCurrentCUDAStream()), "lse_backward");
  return {dq, dk, dscale, dbias, dqr, dkr};
}

void pairwise_setup(kc::FamilyParams& p, const Tensor& q, const Tensor& bias, const OptT& row_offset,
                    const OptT& q_labels, const OptT& k_labels, int64_t diag_offset, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 7, "contrastive_kernels (cuda): mode must be in [0, 7], got ", mode);
  TORCH_CHECK(q_labels.has_value() == k_labels.has_value(),
              "contrastive_kernels (cuda): q_labels and k_labels must be given together");
  p.bias = scalar_ptr(bias, q, "bias");
  p.row_offset = opt_fvec_ptr(row_offset, p.n, q, "row_offset");
  p.q_labels = opt_ivec_ptr(q_labels, p.n, q, "q_labels");
  p.k_labels = opt_ivec_ptr(k_labels, p.m, q, "k_labels");
  p.diag_offset = diag_offset;
  p.pair_mode = static_cast<int>(mode);
}

Tensor pairwise_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& scale, const Tensor& bias,
                             const OptT& row_offset, const OptT& q_labels, const OptT& k_labels, int64_t diag_offset,
                             int64_t mode) {
  check_pair(q, k, "q", "k");
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = base_params(q, k, scale);
  pairwise_setup(p, q, bias, row_offset, q_labels, k_labels, diag_offset, mode);
  Tensor row = f32(q, {p.n});
  p.row_out = row.data_ptr<float>();
  check_launch(kc::pairwise_forward(p, at::cuda::getCurrentCUDAStream()), "pairwise_forward");
  return row;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pairwise_backward_cuda(
    const Tensor& grad_row, const Tensor& q, const Tensor& k, const Tensor& scale, const Tensor& bias,
    const OptT& row_offset, const OptT& q_labels, const OptT& k_labels, int64_t diag_offset, int64_t mode,
    bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_offset) {
  check_pair(q, k, "q", "k");
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = base_params(q, k, scale);
  pairwise_setup(p, q, bias, row_offset, q_labels, k_labels, diag_offset, mode);
  p.grad_row = fvec_ptr(grad_row, p.n, q, "grad_row");
  TORCH_CHECK(!need_offset || p.row_offset, "contrastive_kernels (cuda): need_offset needs row_offset");
  Tensor dq = need_q ? at::empty_like(q) : empty_like_dtype(q);
  Tensor dk = need_k ? at::empty_like(k) : empty_like_dtype(k);
  Tensor dscale = need_scale ? f32(q, {}) : f32(q, {0});
  Tensor dbias = need_bias ? f32(q, {}) : f32(q, {0});
  Tensor doff = need_offset ? f32(q, {p.n}) : f32(q, {0});
  p.dq = need_q ? dq.data_ptr() : nullptr;
  p.dk = need_k ? dk.data_ptr() : nullptr;
  p.dscale = need_scale ? dscale.data_ptr<float>() : nullptr;
  p.dbias = need_bias ? dbias.data_ptr<float>() : nullptr;
  p.drow_offset = need_offset ? doff.data_ptr<float>() : nullptr;
  Tensor ws = f32(q, {kc::backward_workspace_floats(p)});
  p.workspace = ws.data_ptr<float>();
  check_launch(kc::pairwise_backward(p, at::cuda::getCurrentCUDAStream()), "pairwise_backward");
  return {dq, dk, dscale, dbias, doff};
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m) {
  m.impl("lse_forward", &lse_forward_cuda);
  m.impl("lse_backward", &lse_backward_cuda);
  m.impl("pairwise_forward", &pairwise_forward_cuda);
  m.impl("pairwise_backward", &pairwise_backward_cuda);
}
