// C++ CPU kernels of the cross-correlation family (Barlow Twins, VICReg).
//
// a, b: (N, D); C = a^T b (D x D).  Forward: offdiag = sum_{d != e} C_de^2, diag = C_dd.
// Backward, with g = grad_offdiag and G_de = 2 g C_de (d != e), G_dd = grad_diag_d:
//   da = b G^T,  db = a G.
//
// Two paths compute the same numbers:
//   * Gram (N x N): |a^T b|_F^2 = <a a^T, b b^T>, so offdiag = <Ga, Gb> - sum_d C_dd^2 in
//     O(N^2 D) work and N^2 memory, and d offdiag / da = 2 Gb a - 2 b diag(C).  The
//     subtraction cancels when the off-diagonal mass is small next to the diagonal one,
//     so the Gram matrices and the Gram products are accumulated in float64 (the products
//     of float32 values are exact in float64) and the final reductions too.  For a = b
//     with standardized columns the cancellation factor |C|^2 / offdiag is at most
//     D / (D - N), small where the auto rule picks this path; forced at N >= D (path 1)
//     float64 keeps it accurate to ~1e-16 times that factor.
//   * Tiled (D x D tiles): tiles of C in float32 (at::mm), reduced to the squared sum in
//     double as they are made; C is never held whole (one kTile x kTile buffer).  The
//     backward recomputes each tile, turns it into the tile of G in place and adds its
//     contributions to da^T and db^T (row blocks of contiguous D x N buffers).
// When a and b are the same tensor (VICReg's covariance) Ga = Gb, C and G are symmetric and
// da = db: each is computed once (upper tiles only on the tiled path).
//
// Deterministic: every reduction runs over fixed blocks (independent of the thread count)
// whose partials are summed in a fixed order.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ck_common.h"
#include "no_autocast.h"

namespace {

using at::Tensor;

constexpr int64_t kAuto = 0, kGram = 1, kTiled = 2;
constexpr int64_t kTile = 512;                 // tiled path: C tiles of at most kTile x kTile float32
constexpr int64_t kGramChunkElems = 1 << 20;   // Gram path: columns converted to float64 at a time (N x chunk)
constexpr int64_t kReduceBlock = 1 << 14;      // fixed reduction blocks

// The auto rule: fwd+bwd cost of the Gram path ~ N^2 D (float64 GEMMs), of the tiled path
// ~ N D^2 (float32 GEMMs).  Measured by `python -m contrastive_kernels bench` (paths gram and
// tiled, bench/results/cpu-2026-11-23, quiet 2-core CPU, D = 1024): Gram 7.7 / 46 / 690 ms vs
// tiled 12.5 / 37 / 130 ms at N = 128 / 512 / 2048, a crossover between N = D/8 and D/2: Gram when
// N * kGramCrossover < D.  The Gram path's N x N float64 matrices are
// smaller than the inputs there, so memory never argues the other way.
constexpr double kGramCrossover = 2.0;

int64_t resolve_path(int64_t path, int64_t n, int64_t d) {
  if (path != kAuto) return path;
  return static_cast<double>(n) * kGramCrossover < static_cast<double>(d) ? kGram : kTiled;
}

bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type();
}

void check_inputs(const char* op, const Tensor& a, const Tensor& b, int64_t path) {
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D (N, D), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, op, ": b must be 2-D (N, D), got shape ", b.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": a and b must have the same shape, got a ", a.sizes(), " and b ",
              b.sizes());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": a and b must be CPU tensors, got a on ",
              a.device(), " and b on ", b.device());
  auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": a must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(b.scalar_type() == st, op, ": a and b must have the same dtype, got a ", st, " and b ",
              b.scalar_type());
  TORCH_CHECK(path >= 0 && path <= 2, op, ": path must be 0 (auto), 1 (Gram) or 2 (tiled), got ", path);
}

// Sum of f(i) over i in [0, n) in double: fixed blocks, partials summed in order.
template <typename F>
double deterministic_sum(int64_t n, const F& f) {
  const int64_t nblocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> partial(std::max<int64_t>(nblocks, 1), 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      double s = 0.0;
      const int64_t end = std::min(n, (blk + 1) * kReduceBlock);
      for (int64_t i = blk * kReduceBlock; i < end; ++i) s += f(i);
      partial[blk] = s;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

// C_dd = sum_n a_nd b_nd, accumulated in float64 (O(N D)); each d sums over n in order.
Tensor diag_f64(const Tensor& a, const Tensor& b) {
  const int64_t n = a.size(0), d = a.size(1);
  Tensor out = at::zeros({d}, a.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "xcorr_diag", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    at::parallel_for(0, d, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* ra = pa + i * d;
        const scalar_t* rb = pb + i * d;
        for (int64_t j = lo; j < hi; ++j) o[j] += static_cast<double>(ra[j]) * static_cast<double>(rb[j]);
      }
    });
  });
  return out;
}

int64_t gram_chunk(int64_t n, int64_t d) {
  return std::max<int64_t>(1, std::min<int64_t>(d, std::max<int64_t>(64, kGramChunkElems / std::max<int64_t>(n, 1))));
}

// x x^T (N x N float64), accumulated over column chunks converted to float64.
Tensor gram_f64(const Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  Tensor g = at::zeros({n, n}, x.options().dtype(at::kDouble));
  const int64_t chunk = gram_chunk(n, d);
  for (int64_t d0 = 0; d0 < d; d0 += chunk) {
    Tensor xc = x.narrow(1, d0, std::min(chunk, d - d0)).to(at::kDouble).contiguous();
    g.addmm_(xc, xc.t());
  }
  return g;
}

// out = alpha * (gram @ x) + y * w[None, :]  (out in y's dtype): the Gram-path gradient with
// x = the other input's partner, y the partner, w_d = grad_diag_d - 2 g C_dd.
Tensor gram_grad(const Tensor& gram, const Tensor& x, const Tensor& y, const Tensor& w, double alpha) {
  const int64_t n = x.size(0), d = x.size(1);
  Tensor out = at::empty_like(y, at::MemoryFormat::Contiguous);
  const int64_t chunk = gram_chunk(n, d);
  const double* pw = w.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "xcorr_gram_grad", [&] {
    const scalar_t* py = y.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t d0 = 0; d0 < d; d0 += chunk) {
      const int64_t dc = std::min(chunk, d - d0);
      Tensor xc = x.narrow(1, d0, dc).to(at::kDouble).contiguous();
      Tensor p = at::mm(gram, xc);  // (N, dc) float64
      const double* pp = p.data_ptr<double>();
      at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          for (int64_t j = 0; j < dc; ++j) {
            const double v = alpha * pp[i * dc + j] + static_cast<double>(py[i * d + d0 + j]) * pw[d0 + j];
            po[i * d + d0 + j] = static_cast<scalar_t>(static_cast<float>(v));
          }
        }
      });
    }
  });
  return out;
}

// sum over a float32 tile of C (rows r, cols c) of C^2, skipping the entries with
// row == col when the tile sits on the diagonal.
double tile_offdiag_sumsq(const Tensor& tile, bool on_diagonal) {
  const int64_t r = tile.size(0), c = tile.size(1);
  const float* p = tile.data_ptr<float>();
  std::vector<double> rows(r, 0.0);
  at::parallel_for(0, r, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      double s = 0.0;
      const float* row = p + i * c;
      for (int64_t j = 0; j < c; ++j) {
        if (on_diagonal && j == i) continue;
        s += static_cast<double>(row[j]) * static_cast<double>(row[j]);
      }
      rows[i] = s;
    }
  });
  double total = 0.0;
  for (double s : rows) total += s;
  return total;
}

Tensor tile_view(Tensor& buf, int64_t r, int64_t c) { return buf.narrow(0, 0, r * c).view({r, c}); }

// ------------------------------------------------------------------------- forward
std::tuple<Tensor, Tensor> xcorr_forward_cpu(const Tensor& a_in, const Tensor& b_in, int64_t path) {
  CK_NO_AUTOCAST();
  check_inputs("xcorr_forward", a_in, b_in, path);
  const bool same = same_tensor(a_in, b_in);
  const Tensor a = a_in.contiguous();
  const Tensor b = same ? a : b_in.contiguous();
  const int64_t n = a.size(0), d = a.size(1);
  const auto f32 = a.options().dtype(at::kFloat);

  Tensor c64 = diag_f64(a, b);
  const double* pc = c64.data_ptr<double>();
  const double diag_sq = deterministic_sum(d, [&](int64_t j) { return pc[j] * pc[j]; });
  double offdiag = 0.0;

  if (n > 0 && d > 0 && resolve_path(path, n, d) == kGram) {
    Tensor ga = gram_f64(a);
    Tensor gb = same ? ga : gram_f64(b);
    const double* pa = ga.data_ptr<double>();
    const double* pb = gb.data_ptr<double>();
    const double full = deterministic_sum(n * n, [&](int64_t i) { return pa[i] * pb[i]; });
    // A sum of squares: negative only by rounding; NaN passes through std::max(NaN, 0).
    offdiag = std::max(full - diag_sq, 0.0);
  } else if (n > 0 && d > 0) {
    const Tensor a32 = a.to(at::kFloat);
    const Tensor b32 = same ? a32 : b.to(at::kFloat);
    Tensor buf = at::empty({std::min(kTile, d) * std::min(kTile, d)}, f32);
    for (int64_t d0 = 0; d0 < d; d0 += kTile) {
      const int64_t rd = std::min(kTile, d - d0);
      for (int64_t e0 = same ? d0 : 0; e0 < d; e0 += kTile) {
        const int64_t re = std::min(kTile, d - e0);
        Tensor tile = tile_view(buf, rd, re);
        at::mm_out(tile, a32.narrow(1, d0, rd).t(), b32.narrow(1, e0, re));
        const double s = tile_offdiag_sumsq(tile, d0 == e0);
        offdiag += (same && e0 != d0) ? 2.0 * s : s;  // symmetric C: the lower tile mirrors this one
      }
    }
  }
  return std::make_tuple(at::full({}, static_cast<float>(offdiag), f32), c64.to(at::kFloat));
}

// ------------------------------------------------------------------------ backward
std::tuple<Tensor, Tensor> xcorr_backward_cpu(const Tensor& grad_offdiag, const Tensor& grad_diag,
                                              const Tensor& a_in, const Tensor& b_in, int64_t path, bool need_a,
                                              bool need_b) {
  CK_NO_AUTOCAST();
  check_inputs("xcorr_backward", a_in, b_in, path);
  const int64_t n = a_in.size(0), d = a_in.size(1);
  TORCH_CHECK(grad_offdiag.numel() == 1 && grad_offdiag.scalar_type() == at::kFloat,
              "xcorr_backward: grad_offdiag must be a float32 scalar, got shape ", grad_offdiag.sizes(), " and dtype ",
              grad_offdiag.scalar_type());
  TORCH_CHECK(grad_diag.dim() == 1 && grad_diag.size(0) == d && grad_diag.scalar_type() == at::kFloat,
              "xcorr_backward: grad_diag must be float32 of shape (D,) = (", d, "), got shape ", grad_diag.sizes(),
              " and dtype ", grad_diag.scalar_type());
  TORCH_CHECK(grad_offdiag.device().is_cpu() && grad_diag.device().is_cpu(),
              "xcorr_backward: grad_offdiag and grad_diag must be CPU tensors");
  const bool same = same_tensor(a_in, b_in);
  const Tensor a = a_in.contiguous();
  const Tensor b = same ? a : b_in.contiguous();
  Tensor da = a.new_empty({0}), db = b.new_empty({0});
  if (!need_a && !need_b) return std::make_tuple(da, db);
  if (n == 0 || d == 0) {
    return std::make_tuple(need_a ? at::zeros_like(a) : da, need_b ? at::zeros_like(b) : db);
  }
  const double g = grad_offdiag.item<double>();

  if (resolve_path(path, n, d) == kGram) {
    // da = 2g Gb a + b (grad_diag - 2g C_dd),  db = 2g Ga b + a (grad_diag - 2g C_dd).
    const Tensor w = grad_diag.to(at::kDouble) - 2.0 * g * diag_f64(a, b);
    if (same) {
      Tensor grad = gram_grad(gram_f64(a), a, a, w, 2.0 * g);
      if (need_a) da = grad;
      if (need_b) db = need_a ? grad.clone() : grad;
    } else {
      if (need_a) da = gram_grad(gram_f64(b), a, b, w, 2.0 * g);
      if (need_b) db = gram_grad(gram_f64(a), b, a, w, 2.0 * g);
    }
    return std::make_tuple(da, db);
  }

  // Tiled: G tiles from recomputed C tiles; da^T[d] += G_de b_e^T, db^T[e] += G_de^T a_d^T.
  const auto f32 = a.options().dtype(at::kFloat);
  const Tensor a32 = a.to(at::kFloat);
  const Tensor b32 = same ? a32 : b.to(at::kFloat);
  const Tensor gd32 = grad_diag.contiguous();
  const float* pgd = gd32.data_ptr<float>();
  const float two_g = static_cast<float>(2.0 * g);
  const bool want_da = need_a || same, want_db = need_b && !same;
  Tensor daT = want_da ? at::zeros({d, n}, f32) : Tensor();
  Tensor dbT = want_db ? at::zeros({d, n}, f32) : Tensor();
  Tensor buf = at::empty({std::min(kTile, d) * std::min(kTile, d)}, f32);
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    const int64_t rd = std::min(kTile, d - d0);
    for (int64_t e0 = same ? d0 : 0; e0 < d; e0 += kTile) {
      const int64_t re = std::min(kTile, d - e0);
      Tensor tile = tile_view(buf, rd, re);
      at::mm_out(tile, a32.narrow(1, d0, rd).t(), b32.narrow(1, e0, re));
      float* pt = tile.data_ptr<float>();
      const bool on_diag = d0 == e0;
      at::parallel_for(0, rd, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          float* row = pt + i * re;
          for (int64_t j = 0; j < re; ++j) row[j] *= two_g;
          if (on_diag) row[i] = pgd[d0 + i];
        }
      });
      if (same) {
        // G symmetric: the (d, e) tile serves both (d, e) and its mirror (e, d).
        daT.narrow(0, d0, rd).addmm_(tile, a32.narrow(1, e0, re).t());
        if (!on_diag) daT.narrow(0, e0, re).addmm_(tile.t(), a32.narrow(1, d0, rd).t());
      } else {
        if (want_da) daT.narrow(0, d0, rd).addmm_(tile, b32.narrow(1, e0, re).t());
        if (want_db) dbT.narrow(0, e0, re).addmm_(tile.t(), a32.narrow(1, d0, rd).t());
      }
    }
  }
  if (want_da) {
    Tensor out = at::empty_like(a, at::MemoryFormat::Contiguous);
    out.copy_(daT.t());
    if (need_a) da = out;
    if (same && need_b) db = need_a ? out.clone() : out;
  }
  if (want_db) {
    db = at::empty_like(b, at::MemoryFormat::Contiguous);
    db.copy_(dbT.t());
  }
  return std::make_tuple(da, db);
}

static ck::CpuOpRecord record_forward("xcorr_forward");
static ck::CpuOpRecord record_backward("xcorr_backward");

}  // namespace

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("xcorr_forward", &xcorr_forward_cpu);
  m.impl("xcorr_backward", &xcorr_backward_cpu);
}
