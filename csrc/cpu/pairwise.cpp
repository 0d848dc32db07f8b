// Pairwise sigmoid family on CPU (SigLIP and per-pair softplus sums), never forming
// the N x M logit matrix.
//
// x_ij = scale <q_i, k_j> + bias + row_offset_i.  Every pair gets a sign
//   sg_ij = -1 (positive pair), +1 (negative pair), 0 (dropped),
// so that its term is softplus(sg x) (0 when dropped) and
//   d term / d x = sg sigmoid(sg x)   (sigmoid(x) for negatives, sigmoid(x) - 1 for positives).
//
// The work runs over BM x BN tiles: a float32 GEMM of a row block of q against a
// column block of k into a per-thread buffer, then an elementwise epilogue (written
// so that GCC vectorizes it; cloned for AVX-512 / AVX2 / baseline x86 and picked at
// load time).  The backward recomputes each tile and turns it into dS in place:
//   dq = scale dS k (accumulated per row block), dk = scale dS^T q,
//   dscale = sum dS .* <q,k>, dbias = sum dS, drow_offset_i = sum_j dS_ij.
// dk is accumulated either by per-thread partial buffers over a fixed static
// partition of the row blocks, summed in partition order (one pass, deterministic
// for a given thread count), or, when those buffers would be large, by a separate
// pass over column blocks (fully deterministic, one more GEMM per tile).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "ck_common.h"
#include "no_autocast.h"

namespace ck {
namespace {

constexpr int64_t kBM = 256;  // rows of a tile (also the inner size of the dk GEMM)
constexpr int64_t kBN = 256;  // columns of a tile (tile buffer 256 KiB: stays in L2)

constexpr int64_t kNegativeOnly = 1, kPositivesOnly = 2, kDropDiag = 4;

// dk partial buffers beyond this many bytes switch the backward to the column pass.
constexpr int64_t kDefaultPartialBytes = int64_t(128) << 20;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CK_PW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CK_PW_CLONES
#endif
#define CK_PW_INLINE inline __attribute__((always_inline))
// The vector helpers are always inlined, so the psABI notes about passing vectors by
// value do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// ------------------------------------------------------------------ elementwise math
// The epilogues use GCC vector extensions (8 float lanes: one AVX2 register, two SSE ones
// in the baseline clone; wider vectors were slower on AVX2 and gained nothing on a
// Zen 4 AVX-512 core) rather than relying on the
// auto-vectorizer, which gives up on these loops (quiet NaN tests and selects under
// -ftrapping-math).  exp and log1p are Cephes-style float32 polynomials (about 3 ulp,
// checked against float64 in the tests through the family results).
constexpr int kW = 8;
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));
typedef double vd __attribute__((vector_size(kW * sizeof(double))));

CK_PW_INLINE vf splat(float x) { return vf{} + x; }

CK_PW_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

CK_PW_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

CK_PW_INLINE vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }

// x where mask lane is all ones, +0.0 where it is zero.
CK_PW_INLINE vf masked(vi mask, vf x) { return (vf)((vi)x & mask); }

// exp(z) for z <= 0 (z = -inf gives 0; below -87 the result is flushed to 0).
CK_PW_INLINE vf exp_nonpos(vf z) {
  const vi tiny = z < -87.0f;
  const vf zc = tiny ? splat(-87.0f) : z;  // exp(-87) is still a normal float
  // n = round(z / ln2) by the 1.5 * 2^23 shift (n lands in the low mantissa bits).
  const vf shifted = zc * 1.44269504088896341f + 12582912.0f;
  const vf n = shifted - 12582912.0f;
  const vi ni = (vi)shifted - 0x4B400000;  // 0x4B400000: the bits of 12582912.0f
  vf r = zc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vf res = p * (vf)((ni + 127) << 23);
  return tiny ? vf{} : res;
}

// log1p(e) for e in [0, 1]: log(u), u = 1 + e, times e / (u - 1) to undo the rounding of u.
CK_PW_INLINE vf log1p_unit(vf e) {
  const vf u = e + 1.0f;
  const vi big = u > 1.41421356237f;
  const vf m = big ? u * 0.5f : u;
  const vf k = big ? splat(1.0f) : vf{};
  const vf f = m - 1.0f;  // exact
  const vf z = f * f;
  vf p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  vf y = f * z * p;
  y = y + k * -2.12194440e-4f;
  y = y - z * 0.5f;
  const vf lg = f + y + k * 0.693359375f;
  const vf d = u - 1.0f;  // exact
  const vi d0 = d == 0.0f;
  const vf corrected = lg * (e / (d0 ? splat(1.0f) : d));
  return d0 ? e : corrected;
}

CK_PW_INLINE double hsum(vd v) {
  double s = 0.0;
  for (int l = 0; l < kW; ++l) s += v[l];
  return s;
}

// ------------------------------------------------------------------ tile epilogues
// One row of a tile: t = <q_i, k_j> over n columns, sg = signs, c = bias + row_offset_i.
// Sums are kept in double: the scalar gradients add O(N M) terms that can cancel.
// A partial last vector is padded with dropped pairs (sign 0).

// The term of a kept pair whose sg x is NaN or -inf: NaN.  softplus(-inf) is 0 in the limit, but
// sg x = -inf comes from an infinite input (or an overflowing logit), and a non-finite input
// never gives a finite loss (SPEC).  y - y: NaN for both.
CK_PW_INLINE vf nonfinite_term(vf y) { return y - y; }

// sum_j softplus(sg_j x_j) over the kept pairs (NaN / inf propagate from kept pairs).
CK_PW_CLONES double row_softplus_sum(const float* t, const float* sg, int64_t n, float scale, float c) {
  vd acc{};
  for (int64_t j = 0; j < n; j += kW) {
    vf tv, sv;
    if (j + kW <= n) {
      tv = load(t + j);
      sv = load(sg + j);
    } else {
      float tb[kW] = {}, sb[kW] = {};
      std::memcpy(tb, t + j, (n - j) * sizeof(float));
      std::memcpy(sb, sg + j, (n - j) * sizeof(float));
      tv = load(tb);
      sv = load(sb);
    }
    const vf y = sv * (tv * scale + c);
    const vi bad = ~(y > -INFINITY);  // NaN or -inf: the term is NaN (see nonfinite_term)
    const vf a = bad ? vf{} : vabs(y);
    const vf sp = (y > 0.0f ? y : vf{}) + log1p_unit(exp_nonpos(-a));
    const vf term = masked(sv != 0.0f, bad ? nonfinite_term(y) : sp);
    acc += __builtin_convertvector(term, vd);
  }
  return hsum(acc);
}

// Overwrites t with dS_j = g sg_j sigmoid(sg_j x_j); returns sum dS and sum dS <q,k>, and
// with kLoss also sum_j softplus(sg_j x_j) (the fused forward-and-gradient pass: one exp
// serves the term and its derivative).
template <bool kLoss>
CK_PW_INLINE void row_grad_impl(float* t, const float* sg, int64_t n, float scale, float c, float g, double* sum_ds,
                                double* sum_ds_dot, double* sum_loss) {
  vd a1{}, a2{}, a3{};
  for (int64_t j = 0; j < n; j += kW) {
    const bool full = j + kW <= n;
    float tb[kW] = {}, sb[kW] = {};
    vf tv, sv;
    if (full) {
      tv = load(t + j);
      sv = load(sg + j);
    } else {
      std::memcpy(tb, t + j, (n - j) * sizeof(float));
      std::memcpy(sb, sg + j, (n - j) * sizeof(float));
      tv = load(tb);
      sv = load(sb);
    }
    const vf y = sv * (tv * scale + c);
    const vi nan = y != y;
    const vi bad = ~(y > -INFINITY);
    const vi kept = sv != 0.0f;
    const vf e = exp_nonpos(-(nan ? vf{} : vabs(y)));
    const vf inv = 1.0f / (e + 1.0f);
    const vf sig = nan ? y : (y >= 0.0f ? inv : e * inv);
    const vf ds = masked(kept, sig * sv * g);
    a1 += __builtin_convertvector(ds, vd);
    a2 += __builtin_convertvector(ds * tv, vd);
    if (kLoss) {
      const vf sp = (y > 0.0f ? y : vf{}) + log1p_unit(e);
      a3 += __builtin_convertvector(masked(kept, bad ? nonfinite_term(y) : sp), vd);
    }
    if (full) {
      store(t + j, ds);
    } else {
      store(tb, ds);
      std::memcpy(t + j, tb, (n - j) * sizeof(float));
    }
  }
  *sum_ds = hsum(a1);
  *sum_ds_dot = hsum(a2);
  if (kLoss) *sum_loss = hsum(a3);
}

CK_PW_CLONES void row_grad(float* t, const float* sg, int64_t n, float scale, float c, float g, double* sum_ds,
                           double* sum_ds_dot) {
  row_grad_impl<false>(t, sg, n, scale, c, g, sum_ds, sum_ds_dot, nullptr);
}

CK_PW_CLONES void row_loss_grad(float* t, const float* sg, int64_t n, float scale, float c, double* sum_ds,
                                double* sum_ds_dot, double* sum_loss) {
  row_grad_impl<true>(t, sg, n, scale, c, 1.0f, sum_ds, sum_ds_dot, sum_loss);
}

// ------------------------------------------------------------------ the problem
struct Problem {
  at::Tensor q, k;  // float32, contiguous
  int64_t n, m, d;
  float scale, bias;
  const float* row_offset;  // (n,) or null
  const int64_t* q_labels;  // (n,) or null
  const int64_t* k_labels;  // (m,) or null
  int64_t diag_offset;
  int64_t mode;
  float base_sign;  // sign of an off-diagonal pair without labels
  float diag_sign;  // sign of the pair j == i + diag_offset without labels

  bool nothing_kept() const { return (mode & kNegativeOnly) && (mode & kPositivesOnly); }

  // Whether tile [i0, i0+bm) x [j0, j0+bn) can hold a kept pair (only "positives only"
  // without labels keeps so few pairs that whole tiles can be skipped).
  bool tile_has_pairs(int64_t i0, int64_t bm, int64_t j0, int64_t bn) const {
    if (q_labels != nullptr || base_sign != 0.0f) return true;
    if (diag_sign == 0.0f) return false;
    const int64_t lo = i0 + diag_offset, hi = i0 + bm - 1 + diag_offset;  // diagonal columns of the rows
    return hi >= j0 && lo < j0 + bn;
  }

  float row_const(int64_t i) const { return bias + (row_offset ? row_offset[i] : 0.0f); }

  // <q_i, k_j> for the tile, row-major with leading dimension bn.
  void tile_dot(int64_t i0, int64_t bm, int64_t j0, int64_t bn, float* buf) const {
    at::Tensor out = at::from_blob(buf, {bm, bn}, at::TensorOptions().dtype(at::kFloat));
    if (d == 0) {
      out.zero_();
      return;
    }
    at::mm_out(out, q.narrow(0, i0, bm), k.narrow(0, j0, bn).t());
  }
};

// Per-thread sign buffer of one tile row.  Without labels it holds base_sign and the
// diagonal entry is patched for the row and restored after it.
class RowSigns {
 public:
  explicit RowSigns(const Problem& p) : p_(p), sg_(kBN, p.base_sign) {}

  const float* set(int64_t i, int64_t j0, int64_t bn) {
    if (p_.q_labels != nullptr) {
      const int64_t li = p_.q_labels[i];
      const int64_t* kl = p_.k_labels + j0;
      const bool neg_only = p_.mode & kNegativeOnly, pos_only = p_.mode & kPositivesOnly;
      const bool drop_diag = p_.mode & kDropDiag;
      for (int64_t j = 0; j < bn; ++j) {
        const bool pos = !neg_only && kl[j] == li;
        const bool keep = (!pos_only || pos) && !(drop_diag && j0 + j == i + p_.diag_offset);
        sg_[j] = keep ? (pos ? -1.0f : 1.0f) : 0.0f;
      }
      return sg_.data();
    }
    patched_ = i + p_.diag_offset - j0;
    if (patched_ >= 0 && patched_ < bn) {
      sg_[patched_] = p_.diag_sign;
    } else {
      patched_ = -1;
    }
    return sg_.data();
  }

  void restore() {
    if (patched_ >= 0) sg_[patched_] = p_.base_sign;
    patched_ = -1;
  }

 private:
  const Problem& p_;
  std::vector<float> sg_;
  int64_t patched_ = -1;
};

// ------------------------------------------------------------------ argument checks
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
                  const c10::optional<at::Tensor>& row_offset, const c10::optional<at::Tensor>& q_labels,
                  const c10::optional<at::Tensor>& k_labels, int64_t mode) {
  TORCH_CHECK(q.dim() == 2, "pairwise: q must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, "pairwise: k must be 2-D (M, D), got shape ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "pairwise: q and k must have the same D, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "pairwise (cpu): q and k must be CPU tensors, got ",
              q.device(), " and ", k.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "pairwise: q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "pairwise: q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(scale.numel() == 1 && scale.is_floating_point() && scale.device().is_cpu(),
              "pairwise: scale must be a one-element floating CPU tensor, got shape ", scale.sizes(), " dtype ",
              scale.scalar_type(), " on ", scale.device());
  TORCH_CHECK(bias.numel() == 1 && bias.is_floating_point() && bias.device().is_cpu(),
              "pairwise: bias must be a one-element floating CPU tensor, got shape ", bias.sizes(), " dtype ",
              bias.scalar_type(), " on ", bias.device());
  if (row_offset.has_value()) {
    const auto& r = *row_offset;
    TORCH_CHECK(r.dim() == 1 && r.size(0) == q.size(0) && r.is_floating_point() && r.device().is_cpu(),
                "pairwise: row_offset must be a floating CPU tensor of shape (N,) = (", q.size(0), ",), got shape ",
                r.sizes(), " dtype ", r.scalar_type());
  }
  TORCH_CHECK(q_labels.has_value() == k_labels.has_value(),
              "pairwise: q_labels and k_labels must be given together");
  if (q_labels.has_value()) {
    const auto& a = *q_labels;
    const auto& b = *k_labels;
    TORCH_CHECK(a.dim() == 1 && a.size(0) == q.size(0) && a.scalar_type() == at::kLong && a.device().is_cpu(),
                "pairwise: q_labels must be an int64 CPU tensor of shape (N,) = (", q.size(0), ",), got shape ",
                a.sizes(), " dtype ", a.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == k.size(0) && b.scalar_type() == at::kLong && b.device().is_cpu(),
                "pairwise: k_labels must be an int64 CPU tensor of shape (M,) = (", k.size(0), ",), got shape ",
                b.sizes(), " dtype ", b.scalar_type());
  }
  TORCH_CHECK(mode >= 0 && mode <= 7, "pairwise: mode must be in [0, 7] (bits 1, 2, 4), got ", mode);
}

// Holds the float32 / contiguous copies the Problem points into.
struct ProblemStorage {
  at::Tensor row_offset, q_labels, k_labels;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
                     const c10::optional<at::Tensor>& row_offset, const c10::optional<at::Tensor>& q_labels,
                     const c10::optional<at::Tensor>& k_labels, int64_t diag_offset, int64_t mode,
                     ProblemStorage& st) {
  Problem p;
  p.q = q.detach().to(at::kFloat).contiguous();  // no copy for contiguous float32
  p.k = k.detach().to(at::kFloat).contiguous();
  p.n = q.size(0);
  p.m = k.size(0);
  p.d = q.size(1);
  p.scale = static_cast<float>(scale.item<double>());
  p.bias = static_cast<float>(bias.item<double>());
  p.row_offset = nullptr;
  if (row_offset.has_value()) {
    st.row_offset = row_offset->to(at::kFloat).contiguous();
    p.row_offset = st.row_offset.data_ptr<float>();
  }
  p.q_labels = p.k_labels = nullptr;
  if (q_labels.has_value()) {
    st.q_labels = q_labels->contiguous();
    st.k_labels = k_labels->contiguous();
    p.q_labels = st.q_labels.data_ptr<int64_t>();
    p.k_labels = st.k_labels.data_ptr<int64_t>();
  }
  p.diag_offset = diag_offset;
  p.mode = mode;
  const bool neg_only = mode & kNegativeOnly, pos_only = mode & kPositivesOnly, drop_diag = mode & kDropDiag;
  p.base_sign = pos_only ? 0.0f : 1.0f;
  const bool diag_pos = !neg_only;
  const bool diag_keep = (!pos_only || diag_pos) && !drop_diag;
  p.diag_sign = diag_keep ? (diag_pos ? -1.0f : 1.0f) : 0.0f;
  return p;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t partial_budget_bytes() {
  const char* env = std::getenv("CONTRASTIVE_KERNELS_PAIRWISE_PARTIAL_BYTES");
  if (env != nullptr && *env != '\0') return std::atoll(env);
  return kDefaultPartialBytes;
}

// ------------------------------------------------------------------ forward
at::Tensor pairwise_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                                const at::Tensor& bias, const c10::optional<at::Tensor>& row_offset,
                                const c10::optional<at::Tensor>& q_labels, const c10::optional<at::Tensor>& k_labels,
                                int64_t diag_offset, int64_t mode) {
  CK_NO_AUTOCAST();
  check_inputs(q, k, scale, bias, row_offset, q_labels, k_labels, mode);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the tile GEMMs are not part of any graph
  ProblemStorage st;
  const Problem p = make_problem(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode, st);
  at::Tensor out = at::zeros({p.n}, q.options().dtype(at::kFloat));
  if (p.n == 0 || p.m == 0 || p.nothing_kept()) return out;
  float* o = out.data_ptr<float>();
  const int64_t nrb = cdiv(p.n, kBM), ncb = cdiv(p.m, kBN);

  at::parallel_for(0, nrb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tile(kBM * kBN);
    std::vector<double> acc(kBM);
    RowSigns signs(p);
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t i0 = rb * kBM, bm = std::min(kBM, p.n - i0);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t j0 = cb * kBN, bn = std::min(kBN, p.m - j0);
        if (!p.tile_has_pairs(i0, bm, j0, bn)) continue;
        p.tile_dot(i0, bm, j0, bn, tile.data());
        for (int64_t r = 0; r < bm; ++r) {
          const float* sg = signs.set(i0 + r, j0, bn);
          acc[r] += row_softplus_sum(tile.data() + r * bn, sg, bn, p.scale, p.row_const(i0 + r));
          signs.restore();
        }
      }
      for (int64_t r = 0; r < bm; ++r) o[i0 + r] = static_cast<float>(acc[r]);
    }
  });
  return out;
}

// ------------------------------------------------------------------ gradient passes
struct Grads {
  at::Tensor dq, dk, drow;  // float32, undefined when not needed
  double dscale = 0.0, dbias = 0.0;
  double total = 0.0;  // fused pass: sum of the per-row sums
};

// Computes the tile [i0, i0+bm) x [j0, j0+bn) into `tile` and turns it into dS in place,
// for the per-row upstream g (nullptr: 1 on every row).  When rows_ds is given, adds each
// row's sum of dS to rows_ds[r] and the tile's sums of dS and dS <q,k> to *s_ds / *s_dsd;
// with rows_loss (the fused pass) also each row's sum of the terms.
void tile_ds(const Problem& p, RowSigns& signs, float* tile, int64_t i0, int64_t bm, int64_t j0, int64_t bn,
             const float* g, double* rows_ds, double* s_ds, double* s_dsd, double* rows_loss) {
  p.tile_dot(i0, bm, j0, bn, tile);
  for (int64_t r = 0; r < bm; ++r) {
    const int64_t i = i0 + r;
    const float* sg = signs.set(i, j0, bn);
    double a1, a2, a3;
    if (rows_loss != nullptr) {
      row_loss_grad(tile + r * bn, sg, bn, p.scale, p.row_const(i), &a1, &a2, &a3);
      rows_loss[r] += a3;
    } else {
      row_grad(tile + r * bn, sg, bn, p.scale, p.row_const(i), g ? g[i] : 1.0f, &a1, &a2);
    }
    signs.restore();
    if (rows_ds != nullptr) {
      rows_ds[r] += a1;
      *s_ds += a1;
      *s_dsd += a2;
    }
  }
}

// The gradient passes shared by the backward and the fused forward-and-gradient op.
// g: per-row upstream gradient, or nullptr for the fused pass (upstream 1 on every
// row), which then also sums the loss terms into `total`.
Grads grad_passes(const Problem& p, const float* g, bool need_q, bool need_k, bool need_scale, bool need_bias,
                  bool need_offset) {
  const auto f32 = p.q.options().dtype(at::kFloat);
  Grads out;
  if (need_q) out.dq = at::zeros({p.n, p.d}, f32);
  if (need_k) out.dk = at::zeros({p.m, p.d}, f32);
  if (need_offset) out.drow = at::zeros({p.n}, f32);
  const bool fused = g == nullptr;
  const bool need_rows = need_q || need_scale || need_bias || need_offset || fused;
  const int64_t nrb = cdiv(p.n, kBM), ncb = cdiv(p.m, kBN);
  if (p.n == 0 || p.m == 0 || p.nothing_kept() || !(need_rows || need_k)) return out;

  // Row pass (loss, dq, scalars, row offsets, and dk through partials when cheap enough),
  // then a column pass for dk when it was not fused into the row pass.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nrb));
  const int64_t partial_bytes = (threads - 1) * p.m * p.d * int64_t(sizeof(float));
  const bool fuse_dk = need_k && need_rows && partial_bytes <= partial_budget_bytes();
  const bool col_pass = need_k && !fuse_dk;
  at::Tensor& dq = out.dq;
  at::Tensor& dk = out.dk;

  if (need_rows) {
    // Fused: a static partition of the row blocks into `threads` parts, part t adding
    // its dk into buffer t (part 0: dk itself); otherwise one part per row block.
    const int64_t parts = fuse_dk ? threads : nrb;
    at::Tensor partials = fuse_dk && parts > 1 ? at::zeros({parts - 1, p.m, p.d}, f32) : at::Tensor();
    std::vector<double> rb_ds(nrb, 0.0), rb_dsd(nrb, 0.0), rb_loss(nrb, 0.0);
    float* drow_p = need_offset ? out.drow.data_ptr<float>() : nullptr;

    at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> tile(kBM * kBN);
      std::vector<double> racc(kBM), lacc(kBM);
      RowSigns signs(p);
      for (int64_t part = t0; part < t1; ++part) {
        at::Tensor dk_part;
        if (fuse_dk) dk_part = part == 0 ? dk : partials.select(0, part - 1);
        const int64_t rb_lo = fuse_dk ? part * nrb / parts : part;
        const int64_t rb_hi = fuse_dk ? (part + 1) * nrb / parts : part + 1;
        for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
          const int64_t i0 = rb * kBM, bm = std::min(kBM, p.n - i0);
          std::fill(racc.begin(), racc.end(), 0.0);
          std::fill(lacc.begin(), lacc.end(), 0.0);
          double s_ds = 0.0, s_dsd = 0.0;
          for (int64_t cb = 0; cb < ncb; ++cb) {
            const int64_t j0 = cb * kBN, bn = std::min(kBN, p.m - j0);
            if (!p.tile_has_pairs(i0, bm, j0, bn)) continue;
            tile_ds(p, signs, tile.data(), i0, bm, j0, bn, g, racc.data(), &s_ds, &s_dsd,
                    fused ? lacc.data() : nullptr);
            if (p.d == 0 || !(need_q || fuse_dk)) continue;
            const at::Tensor ds = at::from_blob(tile.data(), {bm, bn}, f32);
            if (need_q) {
              at::Tensor dq_blk = dq.narrow(0, i0, bm);
              dq_blk.addmm_(ds, p.k.narrow(0, j0, bn), 1.0, p.scale);
            }
            if (fuse_dk) {
              at::Tensor dk_blk = dk_part.narrow(0, j0, bn);
              dk_blk.addmm_(ds.t(), p.q.narrow(0, i0, bm), 1.0, p.scale);
            }
          }
          rb_ds[rb] = s_ds;
          rb_dsd[rb] = s_dsd;
          if (drow_p) {
            for (int64_t r = 0; r < bm; ++r) drow_p[i0 + r] = static_cast<float>(racc[r]);
          }
          if (fused) {
            double s_loss = 0.0;
            for (int64_t r = 0; r < bm; ++r) s_loss += lacc[r];
            rb_loss[rb] = s_loss;
          }
        }
      }
    });
    for (int64_t rb = 0; rb < nrb; ++rb) {
      out.dbias += rb_ds[rb];
      out.dscale += rb_dsd[rb];
      out.total += rb_loss[rb];
    }
    if (partials.defined()) {
      for (int64_t t = 0; t < partials.size(0); ++t) dk.add_(partials.select(0, t));
    }
  }

  if (col_pass) {
    at::parallel_for(0, ncb, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> tile(kBM * kBN);
      RowSigns signs(p);
      for (int64_t cb = c0; cb < c1; ++cb) {
        const int64_t j0 = cb * kBN, bn = std::min(kBN, p.m - j0);
        at::Tensor dk_blk = dk.narrow(0, j0, bn);
        for (int64_t rb = 0; rb < nrb; ++rb) {
          const int64_t i0 = rb * kBM, bm = std::min(kBM, p.n - i0);
          if (!p.tile_has_pairs(i0, bm, j0, bn)) continue;
          tile_ds(p, signs, tile.data(), i0, bm, j0, bn, g, nullptr, nullptr, nullptr, nullptr);
          if (p.d == 0) continue;
          const at::Tensor ds = at::from_blob(tile.data(), {bm, bn}, f32);
          dk_blk.addmm_(ds.t(), p.q.narrow(0, i0, bm), 1.0, p.scale);
        }
      }
    });
  }
  return out;
}

at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// ------------------------------------------------------------------ backward
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& bias, const c10::optional<at::Tensor>& row_offset, const c10::optional<at::Tensor>& q_labels,
    const c10::optional<at::Tensor>& k_labels, int64_t diag_offset, int64_t mode, bool need_q, bool need_k,
    bool need_scale, bool need_bias, bool need_offset) {
  CK_NO_AUTOCAST();
  check_inputs(q, k, scale, bias, row_offset, q_labels, k_labels, mode);
  TORCH_CHECK(grad_row.dim() == 1 && grad_row.size(0) == q.size(0) && grad_row.device().is_cpu() &&
                  grad_row.is_floating_point(),
              "pairwise_backward: grad_row must be a floating CPU tensor of shape (N,) = (", q.size(0),
              ",), got shape ", grad_row.sizes(), " dtype ", grad_row.scalar_type());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  ProblemStorage st;
  const Problem p = make_problem(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode, st);
  const at::Tensor g_t = grad_row.to(at::kFloat).contiguous();
  Grads r = grad_passes(p, g_t.data_ptr<float>(), need_q, need_k, need_scale, need_bias, need_offset);

  const auto f32 = q.options().dtype(at::kFloat);
  const auto empty_f32 = [&] { return at::empty({0}, f32); };  // a fresh one each: outputs never alias
  return {need_q ? to_dtype(r.dq, q.scalar_type()) : at::empty({0}, q.options()),
          need_k ? to_dtype(r.dk, k.scalar_type()) : at::empty({0}, k.options()),
          need_scale ? at::full({}, static_cast<float>(r.dscale), f32) : empty_f32(),
          need_bias ? at::full({}, static_cast<float>(r.dbias), f32) : empty_f32(),
          need_offset ? r.drow : empty_f32()};
}

// ------------------------------------------------------------------ fused
// The sum of the per-row sums and its gradients for an upstream gradient of 1, in one
// pass over the tiles (3 GEMMs per tile: the products, dq, dk) instead of a forward
// and a backward (4).  Gradients are float32 whatever the input dtype: the caller
// scales them by the upstream scalar and rounds once.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_fused_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
    const c10::optional<at::Tensor>& row_offset, const c10::optional<at::Tensor>& q_labels,
    const c10::optional<at::Tensor>& k_labels, int64_t diag_offset, int64_t mode, bool need_q, bool need_k,
    bool need_scale, bool need_bias, bool need_offset) {
  CK_NO_AUTOCAST();
  check_inputs(q, k, scale, bias, row_offset, q_labels, k_labels, mode);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  ProblemStorage st;
  const Problem p = make_problem(q, k, scale, bias, row_offset, q_labels, k_labels, diag_offset, mode, st);
  Grads r = grad_passes(p, nullptr, need_q, need_k, need_scale, need_bias, need_offset);
  const auto f32 = q.options().dtype(at::kFloat);
  const auto empty_f32 = [&] { return at::empty({0}, f32); };  // a fresh one each: outputs never alias
  return {at::full({}, static_cast<float>(r.total), f32),
          need_q ? r.dq : empty_f32(),
          need_k ? r.dk : empty_f32(),
          need_scale ? at::full({}, static_cast<float>(r.dscale), f32) : empty_f32(),
          need_bias ? at::full({}, static_cast<float>(r.dbias), f32) : empty_f32(),
          need_offset ? r.drow : empty_f32()};
}

const CpuOpRecord record_forward("pairwise_forward");
const CpuOpRecord record_backward("pairwise_backward");
const CpuOpRecord record_fused("pairwise_fused");

}  // namespace
}  // namespace ck

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("pairwise_forward", &ck::pairwise_forward_cpu);
  m.impl("pairwise_backward", &ck::pairwise_backward_cpu);
  m.impl("pairwise_fused", &ck::pairwise_fused_cpu);
}
