// Torch glue of the CUDA kernels (built only in CUDA builds): argument checks naming
// the argument, output allocation, the current stream, and registration for the CUDA
// dispatch key.  The kernels themselves (csrc/cuda/*.cu) see plain parameter structs.
//
// Implemented here: all four families.  log-sum-exp and pairwise sigmoid
// (csrc/cuda/family_tiles*.cu, .cuh), cross-correlation (csrc/cuda/xcorr.cu) and the fused
// normalized similarity (csrc/cuda/similarity.cu).  The cross-correlation Gram path
// (N x N, picked when 2N < D) is glue here: float64 Gram matrices and the Gram-path
// gradient through cuBLAS (at::mm on float64 column chunks, as the CPU file does),
// with the diagonal and the cancelling final reductions in hand-written kernels.
//
// Built a second time, with CK_CUDA_EMU, into the optional extension
// contrastive_kernels._C_cuda_emu: the same glue and kernels on CPU tensors through the
// CPU emulator of csrc/cuda/emu, registered as the `<op>_cuda_emu` ops (see the end).
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef CK_CUDA_EMU
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/launchers.h"
#include "lse_target.h"
#include "no_autocast.h"
#include "op_schemas.h"

namespace {

#ifdef CK_CUDA_EMU
// The emulator runs kernels on host memory: "device" tensors are CPU tensors, and
// launches are synchronous on the null stream.
bool on_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
int num_sms() { return 132; }  // an H100 SXM's, so that the emulator takes its decisions
// The emulator runs the wgmma kernels everywhere.
std::string wgmma_missing() { return ""; }
#else
bool on_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// Why the wgmma kernels cannot run on the current device ("" when they can): they need a compute
// capability 9.0 device and an sm_90a build.
std::string wgmma_missing() {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0)
    return "a compute capability 9.0 device (wgmma, sm_90a), this one is " + std::to_string(prop->major) + "." +
           std::to_string(prop->minor);
#ifdef CK_CUDA_ARCHS
  if (std::string(CK_CUDA_ARCHS).find("9.0a") == std::string::npos)
    return std::string("a build for sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a), this one is for ") + CK_CUDA_ARCHS;
#endif
  return "";
}
#endif

// CONTRASTIVE_KERNELS_CUDA_WGMMA=1 (opt-in until a GPU round has checked them): the 16-bit tile
// kernels' products (forward S; backward S and dX) from wgmma where they can run; elsewhere the
// mma.sync kernels (the same results), with a warning saying why.
bool wgmma_on() {
  const char* v = std::getenv("CONTRASTIVE_KERNELS_CUDA_WGMMA");
  if (v == nullptr || std::string(v) != "1") return false;
  const std::string missing = wgmma_missing();
  if (missing.empty()) return true;
  TORCH_WARN_ONCE("contrastive_kernels: CONTRASTIVE_KERNELS_CUDA_WGMMA=1 ignored: wgmma needs ", missing,
                  "; running the mma.sync kernels");
  return false;
}

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

// q (N, D) and k (M, D), or with k_features_first k (D, M) (the wgmma test op's N-major b)
void check_pair(const Tensor& q, const Tensor& k, const char* qn, const char* kn, bool k_features_first = false) {
  TORCH_CHECK(on_device(q), "contrastive_kernels (cuda): ", qn, " must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), "contrastive_kernels (cuda): ", kn, " is on ", k.device(), " but ", qn,
              " is on ", q.device());
  TORCH_CHECK(q.dim() == 2, "contrastive_kernels (cuda): ", qn, " must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, "contrastive_kernels (cuda): ", kn, " must be 2-D ",
              k_features_first ? "(D, M), features first" : "(M, D)", ", got shape ", k.sizes());
  const int64_t kd = k.size(k_features_first ? 0 : 1);
  TORCH_CHECK(q.size(1) == kd, "contrastive_kernels (cuda): ", qn, " and ", kn, " must have the same feature dimension (",
              qn, ".size(1) = ", q.size(1), ", ", kn, ".size(", k_features_first ? 0 : 1, ") = ", kd, ")");
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
  p.num_sms = num_sms();
  p.wgmma = wgmma_on();
  return p;
}

void lse_masks(kc::FamilyParams& p, const Tensor& q, const OptT& q_rscale, const OptT& k_rscale,
               const OptT& col_bias, const OptT& pos_index, const OptT& q_labels, const OptT& k_labels,
               int64_t diag_offset, int64_t mask_mode) {
  TORCH_CHECK(mask_mode >= 0 && mask_mode <= 63, "contrastive_kernels (cuda): mask_mode must be in [0, 63], got ",
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

std::tuple<Tensor, Tensor, Tensor> lse_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& scale,
                                            const OptT& q_rscale, const OptT& k_rscale, const OptT& col_bias,
                                            const OptT& pos_index, const OptT& q_labels, const OptT& k_labels,
                                            int64_t diag_offset, int64_t mask_mode, bool compute_col) {
  CK_NO_AUTOCAST();
  check_pair(q, k, "q", "k");
  const DeviceGuard guard(q.device());
  auto p = base_params(q, k, scale);
  lse_masks(p, q, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels, diag_offset, mask_mode);
  // LSE_TARGET: the kernels form the cross-entropies from their own target logits (checked
  // to exist here), and the row pass writes those logits for the backward.
  const bool target = mask_mode & ck::kLseTarget;
  if (target) ck::lse_target_index(p.n, p.m, pos_index, diag_offset, compute_col, q);
  // LSE_LABELS: the kernels sum each row's positive logits; target_state = (LSEs, 1/|P_i|)
  const bool labels = mask_mode & ck::kLseLabels;
  ck::lse_labels_check(mask_mode, q_labels.has_value() && k_labels.has_value(), compute_col);
  Tensor row = f32(q, {p.n});
  Tensor col = compute_col ? f32(q, {p.m}) : f32(q, {0});
  Tensor xt = labels ? f32(q, {2, p.n}) : f32(q, {target ? p.n : 0});
  p.row_out = row.data_ptr<float>();
  p.col_out = compute_col ? col.data_ptr<float>() : nullptr;
  p.target_out = (target || labels) ? xt.data_ptr<float>() : nullptr;
  Tensor ws = f32(q, {kc::forward_workspace_floats(p, compute_col)});
  p.workspace = ws.data_ptr<float>();
  check_launch(kc::lse_forward(p, compute_col, current_stream()), "lse_forward");
  return {row, col, xt};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_backward_cuda(
    const Tensor& grad_row, const Tensor& grad_col, const Tensor& q, const Tensor& k, const Tensor& scale,
    const OptT& q_rscale, const OptT& k_rscale, const OptT& col_bias, const OptT& pos_index, const OptT& q_labels,
    const OptT& k_labels, int64_t diag_offset, int64_t mask_mode, const Tensor& row_lse, const Tensor& col_lse,
    const Tensor& target_state, bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_q_rscale,
    bool need_k_rscale) {
  CK_NO_AUTOCAST();
  check_pair(q, k, "q", "k");
  const DeviceGuard guard(q.device());
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
  // LSE_TARGET: row_lse / col_lse are cross-entropies, each log-sum-exp target_state + it.
  if (mask_mode & ck::kLseTarget) {
    ck::lse_target_index(p.n, p.m, pos_index, diag_offset, col_lse.numel() > 0, q);
    p.target_state = fvec_ptr(target_state, p.n, q, "target_state");
  }
  // LSE_LABELS: target_state = (xp, 1/|P_i|), xp the mean positive logit; the outputs were LSE - xp, so
  // each row's LSE is xp + output (Side::x + lse), as LSE_TARGET's target logit + cross-entropy.
  Tensor lab_state;
  if (mask_mode & ck::kLseLabels) {
    ck::lse_labels_check(mask_mode, q_labels.has_value() && k_labels.has_value(), has_col);
    TORCH_CHECK(target_state.dim() == 2 && target_state.size(0) == 2 && target_state.size(1) == p.n,
                "contrastive_kernels (cuda): target_state must have shape (2, N) = (2, ", p.n,
                ") with mask_mode bit 16 (LSE_LABELS), got ", target_state.sizes());
    lab_state = target_state.contiguous();
    p.target_state = fvec_ptr(lab_state[0], p.n, q, "target_state[0]");
    p.label_weight = fvec_ptr(lab_state[1], p.n, q, "target_state[1]");
  }
  TORCH_CHECK(!need_q_rscale || p.q_rscale, "contrastive_kernels (cuda): need_q_rscale needs q_rscale");
  TORCH_CHECK(!need_k_rscale || p.k_rscale, "contrastive_kernels (cuda): need_k_rscale needs k_rscale");
  TORCH_CHECK(!need_bias || p.col_bias, "contrastive_kernels (cuda): need_bias needs col_bias");

  // q and k the same tensor (with the same row scale): autograd adds dq and dk, so each
  // would be rounded to the input dtype before a sum whose terms may cancel (nt_xent's
  // row and column contributions).  Both are kept in float32 instead and summed here,
  // rounded once; dk is returned as zeros (allowed by the op's contract).
  const bool same_rscale = (!q_rscale.has_value() && !k_rscale.has_value()) ||
                           (q_rscale.has_value() && k_rscale.has_value() && q_rscale->is_same(*k_rscale));
  const bool combine = need_q && need_k && q.is_same(k) && same_rscale && q.scalar_type() != at::kFloat;
  // LSE_NORM (mask bit 32): dq / dk in float32 (the caller folds the normalization's Jacobian in)
  const bool norm = mask_mode & ck::kLseNorm;
  p.grad_f32 = combine || norm;
  Tensor dq = need_q ? (p.grad_f32 ? f32(q, q.sizes()) : at::empty_like(q)) : empty_like_dtype(q);
  Tensor dk = need_k ? (p.grad_f32 ? f32(k, k.sizes()) : at::empty_like(k)) : empty_like_dtype(k);
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
  check_launch(kc::lse_backward(p, current_stream()), "lse_backward");
  if (combine && norm) return {dq.add_(dk), at::zeros(k.sizes(), dk.options()), dscale, dbias, dqr, dkr};
  if (combine) return {dq.add_(dk).to(q.scalar_type()), at::zeros_like(k), dscale, dbias, dqr, dkr};
  return {dq, dk, dscale, dbias, dqr, dkr};
}

// Two scales of one product (csrc/op_schemas.h, lse2_forward / lse2_backward): masks and rscales
// only.
void lse2_setup(kc::FamilyParams& p, const Tensor& q, const Tensor& scale0, const OptT& q_rscale,
                const OptT& k_rscale, const OptT& pos_index, int64_t diag_offset, int64_t mask_mode) {
  TORCH_CHECK((mask_mode & ~(1 | 2 | ck::kLseNorm)) == 0,
              "contrastive_kernels (cuda): lse2: mask_mode takes the bits 1, 2 and 32 only, got ", mask_mode);
  lse_masks(p, q, q_rscale, k_rscale, std::nullopt, pos_index, std::nullopt, std::nullopt, diag_offset, mask_mode);
  p.scale0 = scalar_ptr(scale0, q, "scale0");
}

std::tuple<Tensor, Tensor> lse2_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& scale1,
                                             const Tensor& scale0, const OptT& q_rscale, const OptT& k_rscale,
                                             const OptT& pos_index, int64_t diag_offset, int64_t mask_mode) {
  CK_NO_AUTOCAST();
  check_pair(q, k, "q", "k");
  const DeviceGuard guard(q.device());
  auto p = base_params(q, k, scale1);
  lse2_setup(p, q, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode);
  Tensor row1 = f32(q, {p.n}), row0 = f32(q, {p.n});
  p.row_out = row1.data_ptr<float>();
  p.row_out0 = row0.data_ptr<float>();
  Tensor ws = f32(q, {kc::forward_workspace_floats(p, false)});
  p.workspace = ws.data_ptr<float>();
  check_launch(kc::lse2_forward(p, current_stream()), "lse2_forward");
  return {row1, row0};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse2_backward_cuda(
    const Tensor& grad1, const Tensor& grad0, const Tensor& q, const Tensor& k, const Tensor& scale1,
    const Tensor& scale0, const OptT& q_rscale, const OptT& k_rscale, const OptT& pos_index, int64_t diag_offset,
    int64_t mask_mode, const Tensor& row1, const Tensor& row0, bool need_q, bool need_k, bool need_scale1,
    bool need_scale0, bool need_q_rscale, bool need_k_rscale) {
  CK_NO_AUTOCAST();
  check_pair(q, k, "q", "k");
  const DeviceGuard guard(q.device());
  auto p = base_params(q, k, scale1);
  lse2_setup(p, q, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode);
  p.grad_row = fvec_ptr(grad1, p.n, q, "grad1");
  p.grad_row0 = fvec_ptr(grad0, p.n, q, "grad0");
  p.row_lse = fvec_ptr(row1, p.n, q, "row1");
  p.row_lse0 = fvec_ptr(row0, p.n, q, "row0");
  TORCH_CHECK(!need_q_rscale || p.q_rscale, "contrastive_kernels (cuda): need_q_rscale needs q_rscale");
  TORCH_CHECK(!need_k_rscale || p.k_rscale, "contrastive_kernels (cuda): need_k_rscale needs k_rscale");
  p.grad_f32 = true;
  Tensor dq = need_q ? f32(q, q.sizes()) : f32(q, {0});
  Tensor dk = need_k ? f32(k, k.sizes()) : f32(q, {0});
  Tensor ds1 = need_scale1 ? f32(q, {}) : f32(q, {0});
  Tensor ds0 = need_scale0 ? f32(q, {}) : f32(q, {0});
  Tensor dqr = need_q_rscale ? f32(q, {p.n}) : f32(q, {0});
  Tensor dkr = need_k_rscale ? f32(q, {p.m}) : f32(q, {0});
  p.dq = need_q ? dq.data_ptr() : nullptr;
  p.dk = need_k ? dk.data_ptr() : nullptr;
  p.dscale = need_scale1 ? ds1.data_ptr<float>() : nullptr;
  p.dscale0 = need_scale0 ? ds0.data_ptr<float>() : nullptr;
  p.dq_rscale = need_q_rscale ? dqr.data_ptr<float>() : nullptr;
  p.dk_rscale = need_k_rscale ? dkr.data_ptr<float>() : nullptr;
  Tensor ws = f32(q, {kc::backward_workspace_floats(p)});
  p.workspace = ws.data_ptr<float>();
  check_launch(kc::lse2_backward(p, current_stream()), "lse2_backward");
  return {dq, dk, ds1, ds0, dqr, dkr};
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
  CK_NO_AUTOCAST();
  check_pair(q, k, "q", "k");
  const DeviceGuard guard(q.device());
  auto p = base_params(q, k, scale);
  pairwise_setup(p, q, bias, row_offset, q_labels, k_labels, diag_offset, mode);
  Tensor row = f32(q, {p.n});
  p.row_out = row.data_ptr<float>();
  Tensor ws = f32(q, {kc::forward_workspace_floats(p, false)});
  p.workspace = ws.data_ptr<float>();
  check_launch(kc::pairwise_forward(p, current_stream()), "pairwise_forward");
  return row;
}

// The pairwise backward kernels, shared by the backward and the fused op.  grad_row
// given: its per-row upstream gradient, dq / dk in the input dtype.  grad_row null: the
// fused pass (csrc/op_schemas.h, pairwise_fused), upstream 1 on every row, the row pass also
// writing the per-row sums into `rows`, dq / dk in float32.
struct PairwiseGrads {
  Tensor rows, dq, dk, dscale, dbias, doff;
};

PairwiseGrads pairwise_grads(const Tensor* grad_row, const Tensor& q, const Tensor& k, const Tensor& scale,
                             const Tensor& bias, const OptT& row_offset, const OptT& q_labels, const OptT& k_labels,
                             int64_t diag_offset, int64_t mode, bool need_q, bool need_k, bool need_scale,
                             bool need_bias, bool need_offset, const char* what) {
  check_pair(q, k, "q", "k");
  const DeviceGuard guard(q.device());
  auto p = base_params(q, k, scale);
  pairwise_setup(p, q, bias, row_offset, q_labels, k_labels, diag_offset, mode);
  TORCH_CHECK(!need_offset || p.row_offset, "contrastive_kernels (cuda): need_offset needs row_offset");
  const bool fused = grad_row == nullptr;
  PairwiseGrads r;
  Tensor ones;
  if (fused) {
    ones = at::ones({p.n}, q.options().dtype(at::kFloat));
    r.rows = f32(q, {p.n});
    p.grad_row = ones.data_ptr<float>();
    p.row_out = r.rows.data_ptr<float>();
    p.grad_f32 = true;
    r.dq = need_q ? f32(q, {p.n, p.d}) : f32(q, {0});
    r.dk = need_k ? f32(k, {p.m, p.d}) : f32(q, {0});
  } else {
    p.grad_row = fvec_ptr(*grad_row, p.n, q, "grad_row");
    r.dq = need_q ? at::empty_like(q) : empty_like_dtype(q);
    r.dk = need_k ? at::empty_like(k) : empty_like_dtype(k);
  }
  r.dscale = need_scale ? f32(q, {}) : f32(q, {0});
  r.dbias = need_bias ? f32(q, {}) : f32(q, {0});
  r.doff = need_offset ? f32(q, {p.n}) : f32(q, {0});
  p.dq = need_q ? r.dq.data_ptr() : nullptr;
  p.dk = need_k ? r.dk.data_ptr() : nullptr;
  p.dscale = need_scale ? r.dscale.data_ptr<float>() : nullptr;
  p.dbias = need_bias ? r.dbias.data_ptr<float>() : nullptr;
  p.drow_offset = need_offset ? r.doff.data_ptr<float>() : nullptr;
  Tensor ws = f32(q, {kc::backward_workspace_floats(p)});
  p.workspace = ws.data_ptr<float>();
  check_launch(kc::pairwise_backward(p, current_stream()), what);
  return r;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pairwise_backward_cuda(
    const Tensor& grad_row, const Tensor& q, const Tensor& k, const Tensor& scale, const Tensor& bias,
    const OptT& row_offset, const OptT& q_labels, const OptT& k_labels, int64_t diag_offset, int64_t mode,
    bool need_q, bool need_k, bool need_scale, bool need_bias, bool need_offset) {
  CK_NO_AUTOCAST();
  PairwiseGrads r = pairwise_grads(&grad_row, q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode,
                                   need_q, need_k, need_scale, need_bias, need_offset, "pairwise_backward");
  return {r.dq, r.dk, r.dscale, r.dbias, r.doff};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> pairwise_fused_cuda(
    const Tensor& q, const Tensor& k, const Tensor& scale, const Tensor& bias, const OptT& row_offset,
    const OptT& q_labels, const OptT& k_labels, int64_t diag_offset, int64_t mode, bool need_q, bool need_k,
    bool need_scale, bool need_bias, bool need_offset) {
  CK_NO_AUTOCAST();
  PairwiseGrads r = pairwise_grads(nullptr, q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode,
                                   need_q, need_k, need_scale, need_bias, need_offset, "pairwise_fused");
  Tensor total = r.rows.to(at::kDouble).sum().to(at::kFloat);
  return {total, r.dq, r.dk, r.dscale, r.dbias, r.doff};
}

// ---------------------------------------------------------- cross-correlation family
constexpr int64_t kXcorrAuto = 0, kXcorrGram = 1;
constexpr int64_t kGramChunkElems = int64_t(1) << 20;  // Gram path: N x chunk float64 columns at a time

void check_xcorr(const Tensor& a, const Tensor& b, int64_t path) {
  TORCH_CHECK(on_device(a), "contrastive_kernels (cuda): a must be a CUDA tensor, got ", a.device());
  TORCH_CHECK(b.device() == a.device(), "contrastive_kernels (cuda): b is on ", b.device(), " but a is on ",
              a.device());
  TORCH_CHECK(a.dim() == 2, "contrastive_kernels (cuda): a must be 2-D (N, D), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "contrastive_kernels (cuda): b must be 2-D (N, D), got shape ", b.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), "contrastive_kernels (cuda): a and b must have the same shape, got a ",
              a.sizes(), " and b ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "contrastive_kernels (cuda): a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.is_contiguous(), "contrastive_kernels (cuda): a must be contiguous");
  TORCH_CHECK(b.is_contiguous(), "contrastive_kernels (cuda): b must be contiguous");
  dtype_of(a, "a");
  TORCH_CHECK(path >= 0 && path <= 2, "contrastive_kernels (cuda): path must be 0 (auto), 1 (Gram) or 2 (tiled), got ",
              path);
}

// Gram when 2N < D: the CPU rule (csrc/cpu/xcorr.cpp, kGramCrossover), to be re-measured on a GPU.
bool use_gram(int64_t path, int64_t n, int64_t d) {
  if (path != kXcorrAuto) return path == kXcorrGram;
  return static_cast<double>(n) * 2.0 < static_cast<double>(d);
}

bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type();
}

int64_t gram_chunk(int64_t n, int64_t d) {
  const int64_t per = kGramChunkElems / std::max<int64_t>(n, 1);
  return std::max<int64_t>(1, std::min<int64_t>(d, std::max<int64_t>(64, per)));
}

// x x^T (N x N float64) through cuBLAS, over float64 copies of column chunks.
Tensor gram_f64(const Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  Tensor g = at::zeros({n, n}, x.options().dtype(at::kDouble));
  const int64_t chunk = gram_chunk(n, d);
  for (int64_t d0 = 0; d0 < d; d0 += chunk) {
    const Tensor xc = x.narrow(1, d0, std::min(chunk, d - d0)).to(at::kDouble).contiguous();
    g.addmm_(xc, xc.t());
  }
  return g;
}

// alpha (gram @ x) + y * w[None, :] in y's dtype (through float32, as the CPU file), by column chunks.
Tensor gram_grad(const Tensor& gram, const Tensor& x, const Tensor& y, const Tensor& w, const Tensor& alpha) {
  const int64_t n = x.size(0), d = x.size(1);
  Tensor out = at::empty_like(y);
  const int64_t chunk = gram_chunk(n, d);
  for (int64_t d0 = 0; d0 < d; d0 += chunk) {
    const int64_t dc = std::min(chunk, d - d0);
    const Tensor xc = x.narrow(1, d0, dc).to(at::kDouble);
    Tensor v = at::mm(gram, xc).mul_(alpha);
    v.add_(y.narrow(1, d0, dc).to(at::kDouble) * w.narrow(0, d0, dc));
    out.narrow(1, d0, dc).copy_(v.to(at::kFloat));
  }
  return out;
}

kc::XcorrParams xcorr_params(const Tensor& a, const Tensor& b) {
  kc::XcorrParams p;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.n = a.size(0);
  p.d = a.size(1);
  p.dtype = dtype_of(a, "a");
  p.same = same_tensor(a, b);
  return p;
}

Tensor f64(const Tensor& like, at::IntArrayRef shape) { return at::empty(shape, like.options().dtype(at::kDouble)); }

// C_dd in float64 (d,), and in float32 into diag when given.
Tensor xcorr_diag64(kc::XcorrParams p, const Tensor& a, float* diag, cudaStream_t stream) {
  Tensor diag64 = f64(a, {p.d});
  Tensor ws = f64(a, {kc::xcorr_diag_workspace_doubles(p.n, p.d)});
  p.diag = diag;
  p.diag64 = diag64.data_ptr<double>();
  p.workspace = ws.data_ptr<double>();
  check_launch(kc::xcorr_diag(p, stream), "xcorr_forward (diagonal)");
  return diag64;
}

std::tuple<Tensor, Tensor> xcorr_forward_cuda(const Tensor& a, const Tensor& b, int64_t path) {
  CK_NO_AUTOCAST();
  check_xcorr(a, b, path);
  const DeviceGuard guard(a.device());
  const auto stream = current_stream();
  auto p = xcorr_params(a, b);
  Tensor offdiag = f32(a, {});
  Tensor diag = f32(a, {p.d});
  p.offdiag = offdiag.data_ptr<float>();
  const Tensor diag64 = xcorr_diag64(p, a, diag.data_ptr<float>(), stream);
  if (p.n > 0 && p.d > 0 && use_gram(path, p.n, p.d)) {
    const Tensor ga = gram_f64(a);
    const Tensor gb = p.same ? ga : gram_f64(b);
    const int64_t count = p.n * p.n;
    Tensor ws = f64(a, {kc::xcorr_gram_workspace_doubles(count)});
    check_launch(kc::xcorr_gram_offdiag(ga.data_ptr<double>(), gb.data_ptr<double>(), count,
                                        diag64.data_ptr<double>(), p.d, ws.data_ptr<double>(), p.offdiag, stream),
                 "xcorr_forward (Gram)");
  } else {
    Tensor ws = f64(a, {kc::xcorr_tiled_workspace_doubles(p.d)});
    p.workspace = ws.data_ptr<double>();
    check_launch(kc::xcorr_tiled_forward(p, stream), "xcorr_forward (tiled)");
  }
  return {offdiag, diag};
}

std::tuple<Tensor, Tensor> xcorr_backward_cuda(const Tensor& grad_offdiag, const Tensor& grad_diag, const Tensor& a,
                                               const Tensor& b, int64_t path, bool need_a, bool need_b) {
  CK_NO_AUTOCAST();
  check_xcorr(a, b, path);
  const DeviceGuard guard(a.device());
  const auto stream = current_stream();
  auto p = xcorr_params(a, b);
  p.grad_offdiag = scalar_ptr(grad_offdiag, a, "grad_offdiag");
  p.grad_diag = fvec_ptr(grad_diag, p.d, a, "grad_diag");
  Tensor da = empty_like_dtype(a), db = empty_like_dtype(b);
  if (!need_a && !need_b) return {da, db};
  if (p.n == 0 || p.d == 0) return {need_a ? at::zeros_like(a) : da, need_b ? at::zeros_like(b) : db};

  if (use_gram(path, p.n, p.d)) {
    // da = 2g Gb a + b (grad_diag - 2g C_dd),  db = 2g Ga b + a (grad_diag - 2g C_dd)  (float64)
    const Tensor two_g = grad_offdiag.to(at::kDouble) * 2.0;
    const Tensor w = grad_diag.to(at::kDouble) - two_g * xcorr_diag64(p, a, nullptr, stream);
    if (p.same) {
      Tensor grad = gram_grad(gram_f64(a), a, a, w, two_g);
      if (need_a) da = grad;
      if (need_b) db = need_a ? grad.clone() : grad;
    } else {
      if (need_a) da = gram_grad(gram_f64(b), a, b, w, two_g);
      if (need_b) db = gram_grad(gram_f64(a), b, a, w, two_g);
    }
    return {da, db};
  }

  Tensor panel = at::empty({kc::xcorr_panel_bytes(p.d, p.dtype)}, a.options().dtype(at::kByte));
  p.gpanel = panel.data_ptr();
  if (p.same) {
    // a is b: G is symmetric and da = db; the kernels write it once.
    Tensor grad = at::empty_like(a);
    p.da = grad.data_ptr();
    check_launch(kc::xcorr_tiled_backward(p, stream), "xcorr_backward (tiled)");
    if (need_a) da = grad;
    if (need_b) db = need_a ? grad.clone() : grad;
    return {da, db};
  }
  if (need_a) {
    da = at::empty_like(a);
    p.da = da.data_ptr();
  }
  if (need_b) {
    db = at::empty_like(b);
    p.db = db.data_ptr();
  }
  check_launch(kc::xcorr_tiled_backward(p, stream), "xcorr_backward (tiled)");
  return {da, db};
}

// ------------------------------------------------------------- normalized similarity
kc::SimilarityParams similarity_params(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize,
                                       Tensor& norms) {
  kc::SimilarityParams p;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.n = a.size(0);
  p.m = b.size(0);
  p.d = a.size(1);
  p.dtype = dtype_of(a, "a");
  p.normalize = normalize;
  p.scale = scalar_ptr(scale, a, "scale");
  if (normalize) {
    norms = f32(a, {2 * (p.n + p.m)});
    float* base = norms.data_ptr<float>();
    p.a_norm = base;
    p.a_rnorm = base + p.n;
    p.b_norm = base + 2 * p.n;
    p.b_rnorm = base + 2 * p.n + p.m;
  }
  return p;
}

Tensor similarity_forward_cuda(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize) {
  CK_NO_AUTOCAST();
  check_pair(a, b, "a", "b");
  const DeviceGuard guard(a.device());
  Tensor norms;
  auto p = similarity_params(a, b, scale, normalize, norms);
  Tensor out = at::empty({p.n, p.m}, a.options());
  p.out = out.data_ptr();
  check_launch(kc::similarity_forward(p, current_stream()), "similarity_forward");
  return out;
}

std::tuple<Tensor, Tensor, Tensor> similarity_backward_cuda(const Tensor& grad, const Tensor& a, const Tensor& b,
                                                            const Tensor& scale, bool normalize, bool need_a,
                                                            bool need_b, bool need_scale) {
  CK_NO_AUTOCAST();
  check_pair(a, b, "a", "b");
  const DeviceGuard guard(a.device());
  Tensor norms;
  auto p = similarity_params(a, b, scale, normalize, norms);
  TORCH_CHECK(grad.device() == a.device(), "contrastive_kernels (cuda): grad is on ", grad.device(),
              " but the inputs are on ", a.device());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == p.n && grad.size(1) == p.m,
              "contrastive_kernels (cuda): grad must have shape (N, M) = (", p.n, ", ", p.m, "), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == a.scalar_type(), "contrastive_kernels (cuda): grad must have the inputs' dtype ",
              a.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), "contrastive_kernels (cuda): grad must be contiguous");
  Tensor da = need_a ? at::empty_like(a) : empty_like_dtype(a);
  Tensor db = need_b ? at::empty_like(b) : empty_like_dtype(b);
  Tensor dscale = need_scale ? f32(a, {}) : f32(a, {0});
  if (!need_a && !need_b && !need_scale) return {da, db, dscale};
  Tensor u, v, parts;
  p.grad = grad.data_ptr();
  // dscale: from U's rows for float32 inputs, from its own exact tile product for 16-bit ones
  const bool exact_dscale = need_scale && a.scalar_type() != at::kFloat;
  if (need_a || (need_scale && !exact_dscale)) {
    u = f32(a, {p.n, p.d});
    p.u = u.data_ptr<float>();
  }
  if (need_b) {
    v = f32(a, {p.m, p.d});
    p.v = v.data_ptr<float>();
  }
  if (exact_dscale) {
    parts = f64(a, {kc::similarity_dot_parts(p.n, p.m)});
    p.dot_parts = parts.data_ptr<double>();
    p.dscale = dscale.data_ptr<float>();
  } else if (need_scale) {
    parts = f32(a, {p.n});
    p.row_parts = parts.data_ptr<float>();
    p.dscale = dscale.data_ptr<float>();
  }
  p.da = need_a ? da.data_ptr() : nullptr;
  p.db = need_b ? db.data_ptr() : nullptr;
  check_launch(kc::similarity_backward(p, current_stream()), "similarity_backward");
  return {da, db, dscale};
}

// c = a b^T in float32 through the wgmma kernel (csrc/cuda/wgmma_gemm.cu); with b_kn, b is (k, n)
// and c = a b (b read N-major, wgmma's transposed form): the wgmma path's check against torch and
// the `peak` stage's rate of wgmma tiles.  Not a loss op.
Tensor wgmma_gemm_cuda(const Tensor& a, const Tensor& b, bool b_kn) {
  CK_NO_AUTOCAST();
  check_pair(a, b, "a", "b", b_kn);  // b (n, k), or with b_kn (k, n)
  TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
              "contrastive_kernels (cuda): wgmma_gemm: a and b must be float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK(a.size(0) <= kc::kWgmmaGemmMaxRows, "contrastive_kernels (cuda): wgmma_gemm: a has ", a.size(0),
              " rows, more than ", kc::kWgmmaGemmMaxRows);
  const DeviceGuard guard(a.device());
  const std::string missing = wgmma_missing();
  TORCH_CHECK(missing.empty(), "contrastive_kernels (cuda): wgmma_gemm needs ", missing);
  const int64_t n = b_kn ? b.size(1) : b.size(0);
  Tensor c = f32(a, {a.size(0), n});
  if (c.numel() == 0) return c;
  if (a.size(1) == 0) return c.zero_();
  kc::WgmmaGemmParams p;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.c = c.data_ptr<float>();
  p.m = a.size(0);
  p.n = n;
  p.k = a.size(1);
  p.dtype = dtype_of(a, "a");
  p.b_kn = b_kn;
  check_launch(kc::wgmma_gemm(p, current_stream()), "wgmma_gemm");
  return c;
}

}  // namespace

// Not a loss op (no CPU or Triton twin, not in op_schemas.h): its own schema, here.
#ifndef CK_CUDA_EMU
TORCH_LIBRARY_FRAGMENT(contrastive_kernels, m) { m.def("_wgmma_gemm(Tensor a, Tensor b, bool b_kn=False) -> Tensor"); }
TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m) { m.impl("_wgmma_gemm", &wgmma_gemm_cuda); }
#else
TORCH_LIBRARY_FRAGMENT(contrastive_kernels, m) { m.def("_wgmma_gemm_cuda_emu(Tensor a, Tensor b, bool b_kn=False) -> Tensor"); }
TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) { m.impl("_wgmma_gemm_cuda_emu", &wgmma_gemm_cuda); }
#endif

#ifndef CK_CUDA_EMU
#define CK_OP(name) name
TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m) {
#else
// The emulated kernels: ops of their own (same schemas, "_cuda_emu" names) for CPU tensors.
#define CK_OP(name) name "_cuda_emu"
#define CK_DEF(name, schema) m.def(CK_OP(name) schema);
TORCH_LIBRARY_FRAGMENT(contrastive_kernels, m) { CK_FOR_EACH_OP_SCHEMA(CK_DEF) }
#undef CK_DEF
TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
#endif
  m.impl(CK_OP("lse_forward"), &lse_forward_cuda);
  m.impl(CK_OP("lse_backward"), &lse_backward_cuda);
  m.impl(CK_OP("lse2_forward"), &lse2_forward_cuda);
  m.impl(CK_OP("lse2_backward"), &lse2_backward_cuda);
  m.impl(CK_OP("pairwise_forward"), &pairwise_forward_cuda);
  m.impl(CK_OP("pairwise_backward"), &pairwise_backward_cuda);
  m.impl(CK_OP("pairwise_fused"), &pairwise_fused_cuda);
  m.impl(CK_OP("xcorr_forward"), &xcorr_forward_cuda);
  m.impl(CK_OP("xcorr_backward"), &xcorr_backward_cuda);
  m.impl(CK_OP("similarity_forward"), &similarity_forward_cuda);
  m.impl(CK_OP("similarity_backward"), &similarity_backward_cuda);
}
