// C++ CPU kernels of the fused normalized similarity (contract in csrc/op_schemas.h):
// out = scale * a_hat b_hat^T, a_hat = a / max(|a|, 1e-12) when normalize.
//
// The output is N x M by definition, so the products go to the machine's BLAS
// (at::mm); the normalization is done once on float32 copies (O((N + M) D)), so
// low-precision inputs are never rounded after normalizing.  Half-precision
// outputs and upstream gradients go through float32 in row chunks of bounded size
// instead of a full float32 N x M temporary.
//
// Backward, with U = G b_hat (N x D) and V = G^T a_hat (M x D):
//   dscale  = sum_i a_hat_i . U_i
//   da_i    = scale r_i (U_i - a_hat_i (a_hat_i . U_i))   (|a_i| >= 1e-12; the normalization Jacobian)
//           = scale r_i U_i                                (|a_i| < 1e-12: the clamp is constant)
// and the same for b with V (r = 1 and no projection when not normalizing).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ck_common.h"
#include "no_autocast.h"

namespace ck::cpu {
namespace {

using at::Tensor;

constexpr double kNormEps = 1e-12;
constexpr int64_t kChunkBytes = 16 << 20;  // float32 staging of half-precision N x M rows

void check_inputs(const Tensor& a, const Tensor& b, const Tensor& scale) {
  TORCH_CHECK(a.dim() == 2, "a must be 2-D (N, D), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "b must be 2-D (M, D), got shape ", b.sizes());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "a and b must be CPU tensors, got ", a.device(), " and ",
              b.device());
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "a must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(b.scalar_type() == dt, "b must have a's dtype ", dt, ", got ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "a and b must have the same feature dimension, got a ", a.sizes(), " and b ",
              b.sizes());
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device().is_cpu(),
              "scale must be a one-element float32 CPU tensor, got ", scale.sizes(), " ", scale.scalar_type(), " on ",
              scale.device());
}

struct Normalized {
  Tensor x;      // float32 input (contiguous)
  Tensor xhat;   // float32 normalized rows (or x)
  Tensor rnorm;  // (rows,) 1 / max(|x|, eps), undefined when not normalizing
  Tensor small;  // (rows,) bool |x| < eps
};

Normalized normalize_rows(const Tensor& x, bool normalize) {
  Normalized r;
  r.x = x.to(at::kFloat).contiguous();
  if (!normalize) {
    r.xhat = r.x;
    return r;
  }
  const Tensor norm = r.x.norm(2, {1});
  r.small = norm.lt(kNormEps);
  r.rnorm = norm.clamp_min(kNormEps).reciprocal();
  r.xhat = r.x * r.rnorm.unsqueeze(1);
  return r;
}

int64_t chunk_rows(int64_t cols) { return std::max<int64_t>(1, kChunkBytes / (4 * std::max<int64_t>(cols, 1))); }

Tensor similarity_forward_cpu(const Tensor& a, const Tensor& b, const Tensor& scale, bool normalize) {
  CK_NO_AUTOCAST();
  check_inputs(a, b, scale);
  const float s = scale.item<float>();
  const Normalized na = normalize_rows(a, normalize);
  const Normalized nb = a.is_same(b) ? na : normalize_rows(b, normalize);
  const int64_t n = a.size(0), m = b.size(0);
  if (a.scalar_type() == at::kFloat) return at::mm(na.xhat, nb.xhat.t()).mul_(s);
  Tensor out = at::empty({n, m}, a.options());
  const Tensor bt = nb.xhat.t();
  const int64_t step = chunk_rows(m);
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t r1 = std::min(n, r0 + step);
    out.slice(0, r0, r1).copy_(at::mm(na.xhat.slice(0, r0, r1), bt).mul_(s));
  }
  return out;
}

// d x from d x_hat through x_hat = x / max(|x|, eps).
Tensor through_normalize(const Normalized& nx, const Tensor& dxhat, bool normalize) {
  if (!normalize) return dxhat;
  const Tensor proj = (nx.xhat * dxhat).sum(1, /*keepdim=*/true);
  const Tensor projected = dxhat - nx.xhat * proj.masked_fill(nx.small.unsqueeze(1), 0.0);
  return projected * nx.rnorm.unsqueeze(1);
}

std::tuple<Tensor, Tensor, Tensor> similarity_backward_cpu(const Tensor& grad, const Tensor& a, const Tensor& b,
                                                           const Tensor& scale, bool normalize, bool need_a,
                                                           bool need_b, bool need_scale) {
  CK_NO_AUTOCAST();
  check_inputs(a, b, scale);
  const int64_t n = a.size(0), m = b.size(0), d = a.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == m, "grad must have shape (N, M) = (", n, ", ",
              m, "), got ", grad.sizes());
  TORCH_CHECK(grad.device().is_cpu(), "grad must be a CPU tensor, got ", grad.device());
  const float s = scale.item<float>();
  const auto f32 = a.options().dtype(at::kFloat);
  const Normalized na = normalize_rows(a, normalize);
  const Normalized nb = a.is_same(b) ? na : normalize_rows(b, normalize);
  const bool needU = need_a || need_scale, needV = need_b;

  Tensor U, V;
  if (grad.scalar_type() == at::kFloat) {
    const Tensor g = grad.contiguous();
    if (needU) U = at::mm(g, nb.xhat);
    if (needV) V = at::mm(g.t(), na.xhat);
  } else {
    if (needU) U = at::empty({n, d}, f32);
    if (needV) V = at::zeros({m, d}, f32);
    const int64_t step = chunk_rows(m);
    for (int64_t r0 = 0; r0 < n && (needU || needV); r0 += step) {
      const int64_t r1 = std::min(n, r0 + step);
      const Tensor g = grad.slice(0, r0, r1).to(at::kFloat);
      if (needU) {
        Tensor u = U.slice(0, r0, r1);
        at::mm_out(u, g, nb.xhat);
      }
      if (needV) V.addmm_(g.t(), na.xhat.slice(0, r0, r1));
    }
  }

  Tensor da = at::empty({0}, a.options()), db = at::empty({0}, b.options()), dscale = at::empty({0}, f32);
  if (need_scale) dscale = (U * na.xhat).sum().reshape({});
  if (need_a) da = through_normalize(na, U * s, normalize).to(a.scalar_type());
  if (need_b) db = through_normalize(nb, V * s, normalize).to(b.scalar_type());
  return {da, db, dscale};
}

const CpuOpRecord record_forward("similarity_forward");
const CpuOpRecord record_backward("similarity_backward");

}  // namespace
}  // namespace ck::cpu

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("similarity_forward", &ck::cpu::similarity_forward_cpu);
  m.impl("similarity_backward", &ck::cpu::similarity_backward_cpu);
}
