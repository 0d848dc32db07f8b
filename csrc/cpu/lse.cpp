// C++ CPU kernels of the log-sum-exp family (the contract is in csrc/op_schemas.h).
//
// FlashAttention-2 on a CPU, without the value matrix.  S = scale Qh Kh^T + col_bias
// (Qh, Kh: the float32 inputs with the row scales applied, O((N+M) D)) lives only in
// BM x BN tiles: each tile comes from one BLAS GEMM into a per-thread buffer, then
// the bias, the masks and the online max / sum-of-exp updates run over it while it
// is in cache.  The backward recomputes each tile from the saved log-sum-exps and
// turns it into dS in place, then two more GEMMs add dS Kh_J to A_I and dS^T Qh_I
// to B_J.  The online sums leave the running max's own term (an exact 1) out (row_update),
// so a log-sum-exp is max + log1p(e).  With LSE_TARGET the forward keeps each row's target
// logit from its tile and writes the cross-entropy (max - target) + log1p(e), and the
// backward takes each log-sum-exp as (target logit) + (cross-entropy): exp((s - x) - ce), and
// expm1(-ce) at the target.
//
// Determinism without atomics or N x M partial buffers: when only per-row results
// are needed the row blocks are split among threads and each walks the column blocks
// in order.  When per-column results are needed too (column log-sum-exp, dk, dcol_bias)
// the tiles are visited in "diagonal" steps: in step t the work items are
// (I, (I + t) mod L) (or the transpose when there are more row blocks), so no two
// items of a step share a row block or a column block.  Every accumulator then has
// one owner per step and receives its terms in a fixed order, whatever the number of
// threads; a step ends at the barrier of its parallel_for.
//
// Symmetric problems (q and k the same tensor with the same row scale, no column
// bias, a symmetric mask: nt_xent, SupCon, HCL, DCL's same-view terms) compute only
// the tiles (I, J) with I <= J: an off-diagonal tile updates the row statistics of
// block I along its rows and those of block J along its columns, which halves the
// forward.  The backward needs only the sum dq + dk (autograd adds the gradients of
// a tensor passed twice): with H = A + B, an off-diagonal tile adds C X_J to H_I and
// C^T X_I to H_J where C = dS_IJ + dS_JI^T comes from the one tile, and a diagonal
// tile adds (dS_II + dS_II^T) X_I; that is 1.5 GEMM passes instead of 3.  The whole
// gradient of the tensor is then returned as dq (and dq_rscale), with dk (dk_rscale)
// zero.  Tiles are visited in the rounds of a round-robin tournament (circle method):
// the pairs of a round are disjoint, so again every accumulator has one owner.
//
// Two scales of one product (lse2, HCL's l(S1) - l(S0)): each tile's GEMM once, a copy of the
// product in a second per-thread tile for the second scale's logits; the forward's loops run
// their per-tile epilogue once per scale (each with its own running states), the backward forms
// both scales' dS per row and sums scale1 dS1 + scale0 dS0 in float32 before its GEMMs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "ck_common.h"
#include "cpu/tile_gemm.h"
#include "lse_target.h"
#include "no_autocast.h"

namespace ck::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kMaskDiag = 1, kMaskPos = 2, kMaskSameLabel = 4;

// ------------------------------------------------------------ row kernels (vectorized)
// s = scale g + bias.  A -inf logit (only an infinite input or an overflow gives one; the masks
// are applied after this) becomes NaN: exp(-inf) = 0 would drop it silently, and a non-finite
// input never gives a finite loss (SPEC).
CK_MULTIVERSION void logits_row(float* s, const float* g, int64_t n, float scale, const float* bias) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = scale * g[j] + bias[j];
      s[j] = x == kNegInf ? kNaN : x;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = scale * g[j];
      s[j] = x == kNegInf ? kNaN : x;
    }
  }
}

CK_MULTIVERSION void mask_same_label(float* s, const int64_t* kl, int64_t label, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = kl[j] == label ? kNegInf : s[j];
}

// Max over a row; NaNs may be skipped (the exp sums carry them instead).
CK_MULTIVERSION float row_max(const float* s, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

CK_MULTIVERSION float row_sum_exp(const float* s, int64_t n, float off) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += fast_exp(s[j] - off);
  return acc;
}

// The tile's terms against the reference `off` (a running max): returns the sum of
// exp(s - off) over s != off and counts the s == off (each an exact 1) in cnt.
CK_MULTIVERSION float row_rest_exp(const float* s, int64_t n, float off, float& cnt) {
  float acc = 0.0f, c = 0.0f;
#pragma omp simd reduction(+ : acc, c)
  for (int64_t j = 0; j < n; ++j) {
    const bool at = s[j] == off;
    acc += at ? 0.0f : fast_exp(s[j] - off);
    c += at ? 1.0f : 0.0f;
  }
  cnt = c;
  return acc;
}

CK_MULTIVERSION void col_max_acc(float* cm, const float* s, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) cm[j] = s[j] > cm[j] ? s[j] : cm[j];
}

// Running column maxima meet the tile's: cm receives the new max, off the reference the
// tile's exps use (0 for a column still empty, so -inf - 0 = -inf), fac the factor of the
// old terms when the max rises (exp(old - new), 0 from -inf) or -1 when it stays.
CK_MULTIVERSION void col_rescale(float* cm, float* fac, float* off, const float* tile_max, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float old = cm[j];
    const float nm = tile_max[j] > old ? tile_max[j] : old;
    fac[j] = nm > old ? (old == kNegInf ? 0.0f : fast_exp(old - nm)) : -1.0f;
    cm[j] = nm;
    off[j] = nm == kNegInf ? 0.0f : nm;
  }
}

// One tile row's terms of every column: rest += exp(s - off) where s != off, cnt += 1 where s == off.
CK_MULTIVERSION void col_rest_acc(float* rest, float* cnt, const float* s, const float* off, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool at = s[j] == off[j];
    rest[j] += at ? 0.0f : fast_exp(s[j] - off[j]);
    cnt[j] += at ? 1.0f : 0.0f;
  }
}

// A column's state after a tile (see row_update: e is the sum minus the max's own 1).
CK_MULTIVERSION void col_finish(float* e, const float* fac, const float* rest, const float* cnt, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float f = fac[j];
    e[j] = f >= 0.0f ? ((f + f * e[j]) + (cnt[j] - 1.0f)) + rest[j] : (e[j] + cnt[j]) + rest[j];
  }
}

// Backward: g holds the raw products of one tile row, s its logits (masked = -inf).
// dS_j = a exp((s_j - rx) - rl) [+ gc_j exp((s_j - cx_j) - cl_j)] is written over g; the
// return value is sum_j dS_j g_j (the row's share of dscale), in double: a kept target's (or a
// one-positive row's) exp term, ~1, is taken out again by target_ds (unit_label_ds) for its p - 1,
// ~1e-4 on a confident row, and a float32 sum would keep an ulp of the 1 (the C++ backend's d
// temperature off by 7e-5 .. 3e-4 on confident rows).  (x, l) is a log-sum-exp
// split in two: (lse, 0), or with LSE_TARGET (target logit, cross-entropy), whose
// difference s - x is exact near the target.
CK_MULTIVERSION double ds_row_r(float* g, const float* s, int64_t n, float a, float rx, float rl) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const float ds = a * fast_exp((s[j] - rx) - rl);
    acc += static_cast<double>(ds) * g[j];
    g[j] = ds;
  }
  return acc;
}

CK_MULTIVERSION double ds_row_c(float* g, const float* s, int64_t n, const float* gc, const float* cx,
                               const float* cl) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const float ds = gc[j] * fast_exp((s[j] - cx[j]) - cl[j]);
    acc += static_cast<double>(ds) * g[j];
    g[j] = ds;
  }
  return acc;
}

CK_MULTIVERSION double ds_row_rc(float* g, const float* s, int64_t n, float a, float rx, float rl, const float* gc,
                                const float* cx, const float* cl) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const float ds = a * fast_exp((s[j] - rx) - rl) + gc[j] * fast_exp((s[j] - cx[j]) - cl[j]);
    acc += static_cast<double>(ds) * g[j];
    g[j] = ds;
  }
  return acc;
}

CK_MULTIVERSION void add_row(float* acc, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += x[j];
}

// ------------------------------------------------------------------- problem setup
struct Problem {
  int64_t n = 0, m = 0, d = 0;
  const float* qh = nullptr;  // (n, d) float32, q_rscale applied
  const float* kh = nullptr;  // (m, d) float32, k_rscale applied
  float scale = 1.0f;
  const float* bias = nullptr;  // (m) or null
  int64_t mask_mode = 0, diag_offset = 0;
  const int64_t* pos = nullptr;
  const int64_t* q_labels = nullptr;
  const int64_t* k_labels = nullptr;
  const int64_t* target = nullptr;  // (n) target column of each row (LSE_TARGET), or null
};

// LSE_TARGET: the local column (in j0 .. j0 + bn) of row gi's target, or -1 (none there).
inline int64_t target_col(const Problem& P, int64_t gi, int64_t j0, int64_t bn) {
  if (P.target == nullptr) return -1;
  const int64_t j = P.target[gi] - j0;
  return (j >= 0 && j < bn) ? j : -1;
}

struct Tiling {
  int64_t bm, bn, nrb, ncb;
  int64_t rows(int64_t i) const { return i * bm; }
  int64_t cols(int64_t j) const { return j * bn; }
};

// Block edge: 256 (a 256 x 256 float tile is 256 KiB, at home in L2), halved down to
// 32 while that leaves fewer than 8 blocks, so small problems still spread over the
// threads.  Depends on the sizes only, never on the thread count (same numbers
// whatever the machine's parallelism).
int64_t pick_block(int64_t len) {
  int64_t b = 256;
  while (b > 32 && ceil_div(len, b) < 8) b /= 2;
  return b;
}

Tiling make_tiling(int64_t n, int64_t m) {
  Tiling t{pick_block(n), pick_block(m), 0, 0};
  t.nrb = ceil_div(n, t.bm);
  t.ncb = ceil_div(m, t.bn);
  return t;
}

// Item p of diagonal step t (see the file comment).
inline std::pair<int64_t, int64_t> diagonal_item(const Tiling& t, int64_t p, int64_t step) {
  if (t.nrb <= t.ncb) return {p, (p + step) % t.ncb};
  return {(p + step) % t.nrb, p};
}

// Per-thread scratch: the tile, one logits row, five column vectors, six row vectors and, for
// two scales (lse2), a second tile (the product's copy that the second scale's logits overwrite).
struct Scratch {
  Tensor buf;
  int64_t stride = 0, bm = 0, bn = 0;
  explicit Scratch(const Tiling& t, bool two = false) : bm(t.bm), bn(t.bn) {
    stride = (two ? 2 : 1) * t.bm * t.bn + 6 * t.bn + 6 * t.bm + 16;
    buf = at::empty({std::max<int64_t>(1, at::get_num_threads()) * stride}, at::kFloat);
  }
  float* base() const {
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid < buf.numel() / stride);
    return buf.data_ptr<float>() + tid * stride;
  }
  float* tile() const { return base(); }
  float* row() const { return base() + bm * bn; }
  float* col0() const { return row() + bn; }
  float* col1() const { return col0() + bn; }
  float* col2() const { return col1() + bn; }
  float* col3() const { return col2() + bn; }
  float* col4() const { return col3() + bn; }
  float* rowstat0() const { return col4() + bn; }
  float* rowstat1() const { return rowstat0() + bm; }
  float* rowstat2() const { return rowstat1() + bm; }
  float* rowstat3() const { return rowstat2() + bm; }
  float* rowstat4() const { return rowstat3() + bm; }
  float* rowstat5() const { return rowstat4() + bm; }
  float* tile2() const { return rowstat5() + bm; }  // (two scales only)
};

// Logits of tile row r (global row gi, columns j0 .. j0+bn): s = scale g + bias, masked = -inf.
// xt (forward, LSE_TARGET): receives the row's target logit when the target is in the tile,
// before the masks (a target need not be kept).
inline void tile_row_logits(const Problem& P, float* s, const float* g, int64_t gi, int64_t j0, int64_t bn,
                            float* xt = nullptr) {
  logits_row(s, g, bn, P.scale, P.bias != nullptr ? P.bias + j0 : nullptr);
  if (xt != nullptr) {
    const int64_t tc = target_col(P, gi, j0, bn);
    if (tc >= 0) xt[gi] = s[tc];
  }
  if (P.mask_mode & kMaskDiag) {
    const int64_t j = gi + P.diag_offset - j0;
    if (j >= 0 && j < bn) s[j] = kNegInf;
  }
  if (P.mask_mode & kMaskPos) {
    const int64_t j = P.pos[gi] - j0;
    if (j >= 0 && j < bn) s[j] = kNegInf;
  }
  if (P.mask_mode & kMaskSameLabel) mask_same_label(s, P.k_labels + j0, P.q_labels[gi], bn);
}

// Online log-sum-exp of one row meeting one tile row.  The state is the running max mx and
// e = sum_j exp(s_j - mx) - 1: the max's own term (an exact 1) is left out of the float sum,
// so that a row whose other terms are tiny (a confident prediction: a cross-entropy of 1e-7)
// keeps them instead of rounding 1 + tiny to a float32 ulp of 1 (6e-8 absolute: all of such a
// loss).  The log-sum-exp is then mx + log1p(e), and a cross-entropy whose target is the max
// is log1p(e) itself.  Ties with the max add exact 1s.  While mx is -inf (nothing kept) e
// accumulates exp(s - 0): 0, or NaN from a NaN logit (which the max skips).
inline void row_update(float& mx, float& e, const float* s, int64_t n) {
  const float tm = row_max(s, n);
  const float nm = tm > mx ? tm : mx;
  if (nm == kNegInf) {
    e += row_sum_exp(s, n, 0.0f);
    return;
  }
  float cnt = 0.0f;
  const float rest = row_rest_exp(s, n, nm, cnt);
  if (nm > mx) {  // the max rises: the old terms (1 + e) scale by f; one of the tile's maxima is the new 1
    const float f = mx == kNegInf ? 0.0f : std::exp(mx - nm);
    e = ((f + f * e) + (cnt - 1.0f)) + rest;
  } else {
    e = (e + cnt) + rest;
  }
  mx = nm;
}

// LSE_LABELS: sum and count of the kept logits of row gi whose column has the row's label.
CK_MULTIVERSION void label_pos_acc(const float* s, const int64_t* kl, int64_t label, int64_t n, float& sum,
                                   float& cnt) {
  float a = 0.0f, c = 0.0f;
#pragma omp simd reduction(+ : a, c)
  for (int64_t j = 0; j < n; ++j) {
    const bool p = kl[j] == label && s[j] != kNegInf;
    a += p ? s[j] : 0.0f;
    c += p ? 1.0f : 0.0f;
  }
  sum += a;
  cnt += c;
}

inline float finish_lse(float mx, float e) {
  if (mx == kNegInf) return e == 0.0f ? kNegInf : std::numeric_limits<float>::quiet_NaN();
  return mx + std::log1p(e);
}

// The output of a row (column) from its running (max, e): the log-sum-exp, or with
// LSE_TARGET (xt = its target logit) the cross-entropy (max - xt) + log1p(e), rounded
// relative to itself (not to the size of the logits, nor to the 1 of the max's term).
inline float finish_row(float mx, float e, const float* xt, int64_t i) {
  if (xt == nullptr || mx == kNegInf) return finish_lse(mx, e);
  return (mx - xt[i]) + std::log1p(e);
}

// LSE_LABELS, row i with positives (sum ps, count pc): the output LSE - xp (xp = ps / pc, the mean
// positive logit) as (max - xp) + log1p(e), rounded relative to itself (one positive at the max:
// exactly log1p(e), however small); lab (2, n) receives xp and 1/|P_i| (0, 0 without a positive,
// whose output stays the LSE).  The backward takes the LSE as xp + output (see Grads), as
// LSE_TARGET's target logit + cross-entropy.
inline void finish_labels(float* out, float* lab, int64_t n, int64_t i, float mx, float e, float ps, float pc) {
  lab[i] = 0.0f;
  lab[n + i] = 0.0f;
  if (!(pc > 0.0f)) return;
  const float xp = ps / pc;
  out[i] = (mx - xp) + std::log1p(e);
  lab[i] = xp;
  lab[n + i] = 1.0f / pc;
}

// ------------------------------------------------------------------------ forward
// The second scale of a two-scale problem (lse2, HCL's l(S1) - l(S0)): the same kept pairs of the
// same product at P0.scale (P0 is P but for its scale; no bias, target or labels), whose row
// log-sum-exps go to row_lse.  Each tile's product is formed once; a copy of it in the scratch's
// second tile takes the second scale's logits.
struct SecondScale {
  const Problem* P = nullptr;
  float* row_lse = nullptr;
};

// lab (LSE_LABELS): (2, n), receives the rows' mean positive logits and 1/|P_i| (0, 0 without a
// positive); row_lse the losses.
void forward_rows(const Problem& P, const Tiling& T, const Scratch& W, float* row_lse, float* xt, float* lab,
                  const SecondScale* two = nullptr) {
  at::parallel_for(0, T.nrb, 1, [&](int64_t b0, int64_t b1) {
    float* g = W.tile();
    float* mx = W.rowstat0();
    float* sm = W.rowstat1();
    float* ps = W.rowstat2();
    float* pc = W.rowstat3();
    float* mx0 = W.rowstat4();
    float* sm0 = W.rowstat5();
    for (int64_t I = b0; I < b1; ++I) {
      const int64_t i0 = T.rows(I), bm = std::min(T.bm, P.n - i0);
      std::fill(mx, mx + bm, kNegInf);
      std::fill(sm, sm + bm, 0.0f);
      std::fill(ps, ps + bm, 0.0f);
      std::fill(pc, pc + bm, 0.0f);
      std::fill(mx0, mx0 + bm, kNegInf);
      std::fill(sm0, sm0 + bm, 0.0f);
      for (int64_t J = 0; J < T.ncb; ++J) {
        const int64_t j0 = T.cols(J), bn = std::min(T.bn, P.m - j0);
        gemm_abt(bm, bn, P.d, P.qh + i0 * P.d, P.d, P.kh + j0 * P.d, P.d, g);
        if (two != nullptr) std::copy(g, g + bm * bn, W.tile2());
        for (int64_t r = 0; r < bm; ++r) {
          float* s = g + r * bn;
          tile_row_logits(P, s, s, i0 + r, j0, bn, xt);
          row_update(mx[r], sm[r], s, bn);
          if (lab != nullptr) label_pos_acc(s, P.k_labels + j0, P.q_labels[i0 + r], bn, ps[r], pc[r]);
          if (two != nullptr) {
            float* s0 = W.tile2() + r * bn;
            tile_row_logits(*two->P, s0, s0, i0 + r, j0, bn);
            row_update(mx0[r], sm0[r], s0, bn);
          }
        }
      }
      for (int64_t r = 0; r < bm; ++r) {
        if (two != nullptr) two->row_lse[i0 + r] = finish_lse(mx0[r], sm0[r]);
        row_lse[i0 + r] = finish_row(mx[r], sm[r], xt, i0 + r);
        if (lab != nullptr) finish_labels(row_lse, lab, P.n, i0 + r, mx[r], sm[r], ps[r], pc[r]);
      }
    }
  });
}

void forward_rows_and_cols(const Problem& P, const Tiling& T, const Scratch& W, float* row_lse, float* col_lse,
                           float* xt) {
  std::vector<float> rmx(P.n, kNegInf), rsm(P.n, 0.0f), cmx(P.m, kNegInf), csm(P.m, 0.0f);
  const int64_t items = std::min(T.nrb, T.ncb), steps = std::max(T.nrb, T.ncb);
  for (int64_t step = 0; step < steps; ++step) {
    at::parallel_for(0, items, 1, [&](int64_t p0, int64_t p1) {
      float* g = W.tile();
      float* tmax = W.col0();
      float* off = W.col1();
      float* fac = W.col2();
      float* rest = W.col3();
      float* cnt = W.col4();
      for (int64_t p = p0; p < p1; ++p) {
        const auto [I, J] = diagonal_item(T, p, step);
        const int64_t i0 = T.rows(I), bm = std::min(T.bm, P.n - i0);
        const int64_t j0 = T.cols(J), bn = std::min(T.bn, P.m - j0);
        gemm_abt(bm, bn, P.d, P.qh + i0 * P.d, P.d, P.kh + j0 * P.d, P.d, g);
        std::fill(tmax, tmax + bn, kNegInf);
        for (int64_t r = 0; r < bm; ++r) {
          float* s = g + r * bn;
          tile_row_logits(P, s, s, i0 + r, j0, bn, xt);
          row_update(rmx[i0 + r], rsm[i0 + r], s, bn);
          col_max_acc(tmax, s, bn);
        }
        col_rescale(cmx.data() + j0, fac, off, tmax, bn);
        std::fill(rest, rest + bn, 0.0f);
        std::fill(cnt, cnt + bn, 0.0f);
        for (int64_t r = 0; r < bm; ++r) col_rest_acc(rest, cnt, g + r * bn, off, bn);
        col_finish(csm.data() + j0, fac, rest, cnt, bn);
      }
    });
  }
  // (LSE_TARGET with a column term: square, column j's target is row j, logit xt_j)
  for (int64_t i = 0; i < P.n; ++i) row_lse[i] = finish_row(rmx[i], rsm[i], xt, i);
  for (int64_t j = 0; j < P.m; ++j) col_lse[j] = finish_row(cmx[j], csm[j], xt, j);
}

// ----------------------------------------------------------------------- backward
// A log-sum-exp is passed as x + l (ds_row_r): (lse, 0), or (target logit, cross-entropy).
struct Grads {
  const float* grow = nullptr;  // (n) row upstream grads, 0 where the row lse = -inf; null when all zero
  const float* rx = nullptr;    // (n) row lse = rx + rl (0 where -inf)
  const float* rl = nullptr;    // (n)
  const float* gcol = nullptr;  // (m) column upstream grads, 0 where col_lse = -inf; null when all zero
  const float* cx = nullptr;    // (m) column lse = cx + cl (0 where -inf)
  const float* cl = nullptr;    // (m)
  const float* lw = nullptr;    // (n) LSE_LABELS: 1/|P_i| (0 without positives), or null
  float* A = nullptr;           // (n, d): sum_j dS_ij Kh_j, or null
  float* B = nullptr;           // (m, d): sum_i dS_ij Qh_i, or null
  float* dbias = nullptr;       // (m) or null
  double* dscale = nullptr;     // per row block, or null
};

// LSE_TARGET, the target pair of a row (upstream a, cross-entropy rl) and of a column (gc, cl):
// kept, each side's p - 1 = exp(-ce) - 1 as expm1(-ce), exact however small the cross-entropy
// (its S is the forward's target logit by definition, whatever the rounding of this tile's
// product; exp(-ce) - 1 in float32 would keep nothing of a 1e-8 loss); masked, only the -grads.
// ds is rewritten, and the change of its dscale share (ds times the raw product) is returned.
inline double target_ds(float& ds, bool kept, float raw, float a, float rl, float gc, float cl) {
  const float old = ds;
  if (kept)
    ds = (a != 0.0f ? a * std::expm1(-rl) : 0.0f) + (gc != 0.0f ? gc * std::expm1(-cl) : 0.0f);
  else
    ds = -(a + gc);
  return (static_cast<double>(ds) - static_cast<double>(old)) * raw;
}

// LSE_LABELS, the positive of a row with one (1/|P| = 1; upstream a, output rl = LSE - its logit): dS =
// a (p - 1) = a expm1(-rl), as LSE_TARGET's target (exp(-rl) - 1 in float32 keeps nothing of a 1e-8
// loss; its logit is the forward's xp by definition).  ds (the exp term) is rewritten; the change of
// its dscale share (raw: its raw product) is returned.
inline double unit_label_ds(float& ds, double raw, float a, float rl) {
  const float old = ds;
  ds = a * std::expm1(-rl);
  return (static_cast<double>(ds) - static_cast<double>(old)) * raw;
}

// One tile row's dS (over its raw products gr; s: scratch for its logits); returns its dscale share.
double backward_row(const Problem& P, const Grads& G, float* gr, float* s, int64_t gi, int64_t j0, int64_t bn) {
  double dsc = 0.0;
  tile_row_logits(P, s, gr, gi, j0, bn);
  const int64_t tc = target_col(P, gi, j0, bn);
  const float raw_t = tc >= 0 ? gr[tc] : 0.0f;
  // A row without kept pairs (lse -inf) gets no gradient (grow 0); its dS is 0 by the mask.
  const bool row_term = G.grow != nullptr && G.grow[gi] != 0.0f;
  // LSE_LABELS: -grow_i / |P_i| at the kept same-label pairs (their raw products' dscale share first).
  // A row with one positive (1/|P_i| = 1) has p - 1 there, as expm1(-output) (see unit_label_ds).
  const float lab_w = (G.lw != nullptr && row_term) ? G.grow[gi] * G.lw[gi] : 0.0f;
  const bool unit = lab_w != 0.0f && G.lw[gi] == 1.0f;
  const int64_t label = lab_w != 0.0f ? P.q_labels[gi] : 0;
  double raw_pos = 0.0;
  if (lab_w != 0.0f) {
    for (int64_t j = 0; j < bn; ++j)
      if (P.k_labels[j0 + j] == label && s[j] != kNegInf) raw_pos += gr[j];
    if (!unit) dsc -= static_cast<double>(lab_w) * raw_pos;
  }
  if (row_term && G.gcol != nullptr) {
    dsc += ds_row_rc(gr, s, bn, G.grow[gi], G.rx[gi], G.rl[gi], G.gcol + j0, G.cx + j0, G.cl + j0);
  } else if (row_term) {
    dsc += ds_row_r(gr, s, bn, G.grow[gi], G.rx[gi], G.rl[gi]);
  } else if (G.gcol != nullptr) {
    dsc += ds_row_c(gr, s, bn, G.gcol + j0, G.cx + j0, G.cl + j0);
  } else {
    std::fill(gr, gr + bn, 0.0f);
  }
  if (tc >= 0)  // LSE_TARGET: the row's p - 1 (and the column's: its target is this row)
    dsc += target_ds(gr[tc], s[tc] != kNegInf, raw_t, row_term ? G.grow[gi] : 0.0f, G.rl[gi],
                     G.gcol != nullptr ? G.gcol[j0 + tc] : 0.0f, G.gcol != nullptr ? G.cl[j0 + tc] : 0.0f);
  if (unit) {  // (one positive in the row: raw_pos is its raw product when it is in this tile)
    for (int64_t j = 0; j < bn; ++j)
      if (P.k_labels[j0 + j] == label && s[j] != kNegInf) dsc += unit_label_ds(gr[j], raw_pos, G.grow[gi], G.rl[gi]);
  } else if (lab_w != 0.0f) {
    for (int64_t j = 0; j < bn; ++j)
      if (P.k_labels[j0 + j] == label && s[j] != kNegInf) gr[j] -= lab_w;
  }
  return dsc;
}

// Two scales (lse2): dS = scale1 dS1 + scale0 dS0 per unit of the product, summed in float32
// before the GEMMs (A and B are then in the product's units: the caller applies no scale).
CK_MULTIVERSION void combine_scales(float* ds1, const float* ds0, int64_t n, float scale1, float scale0) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) ds1[j] = scale1 * ds1[j] + scale0 * ds0[j];
}

// The second scale's backward (lse2): its problem (P0), upstream gradients and log-sum-exps (G0:
// grow, rx, rl and dscale only).
struct SecondGrads {
  const Problem* P = nullptr;
  Grads G;
};

void backward_item(const Problem& P, const Tiling& T, const Scratch& W, const Grads& G, int64_t I, int64_t J,
                   const SecondGrads* two = nullptr) {
  const int64_t i0 = T.rows(I), bm = std::min(T.bm, P.n - i0);
  const int64_t j0 = T.cols(J), bn = std::min(T.bn, P.m - j0);
  float* g = W.tile();
  float* s = W.row();
  gemm_abt(bm, bn, P.d, P.qh + i0 * P.d, P.d, P.kh + j0 * P.d, P.d, g);
  if (two != nullptr) std::copy(g, g + bm * bn, W.tile2());
  double dsc = 0.0, dsc0 = 0.0;
  for (int64_t r = 0; r < bm; ++r) {
    float* gr = g + r * bn;
    dsc += backward_row(P, G, gr, s, i0 + r, j0, bn);
    if (two != nullptr) {
      float* gr0 = W.tile2() + r * bn;
      dsc0 += backward_row(*two->P, two->G, gr0, s, i0 + r, j0, bn);
      combine_scales(gr, gr0, bn, P.scale, two->P->scale);
    }
    if (G.dbias != nullptr) add_row(G.dbias + j0, gr, bn);
  }
  if (G.dscale != nullptr) G.dscale[I] += dsc;
  if (two != nullptr && two->G.dscale != nullptr) two->G.dscale[I] += dsc0;
  if (G.A != nullptr) gemm_acc_ab(bm, P.d, bn, g, P.kh + j0 * P.d, G.A + i0 * P.d);
  if (G.B != nullptr) gemm_acc_atb(bn, P.d, bm, g, P.qh + i0 * P.d, G.B + j0 * P.d);
}

void backward_tiles(const Problem& P, const Tiling& T, const Scratch& W, const Grads& G,
                    const SecondGrads* two = nullptr) {
  const bool per_column = G.B != nullptr || G.dbias != nullptr;
  if (!per_column) {
    at::parallel_for(0, T.nrb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t I = b0; I < b1; ++I)
        for (int64_t J = 0; J < T.ncb; ++J) backward_item(P, T, W, G, I, J, two);
    });
    return;
  }
  const int64_t items = std::min(T.nrb, T.ncb), steps = std::max(T.nrb, T.ncb);
  for (int64_t step = 0; step < steps; ++step) {
    at::parallel_for(0, items, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const auto [I, J] = diagonal_item(T, p, step);
        backward_item(P, T, W, G, I, J, two);
      }
    });
  }
}

// ----------------------------------------------------------- symmetric problems
// Rounds of the circle method over L blocks: every unordered pair {I, J} (I < J) once,
// and every diagonal tile (I, I) once; the items of a round share no block.
std::vector<std::vector<std::pair<int64_t, int64_t>>> tournament_rounds(int64_t L) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  if (L == 1) return {{{0, 0}}};
  const int64_t Lp = L + (L & 1), ring = Lp - 1;
  auto add = [&](std::vector<std::pair<int64_t, int64_t>>& items, int64_t a, int64_t b) {
    if (a >= L) a = b;  // the bye of an odd count: that block does its diagonal tile
    if (b >= L) b = a;
    items.emplace_back(std::min(a, b), std::max(a, b));
  };
  for (int64_t r = 0; r < ring; ++r) {
    std::vector<std::pair<int64_t, int64_t>> items;
    add(items, ring, r);
    for (int64_t k = 1; k < Lp / 2; ++k) add(items, (r + k) % ring, (r - k + ring) % ring);
    rounds.push_back(std::move(items));
  }
  if ((L & 1) == 0) {
    std::vector<std::pair<int64_t, int64_t>> diag;
    for (int64_t i = 0; i < L; ++i) diag.emplace_back(i, i);
    rounds.push_back(std::move(diag));
  }
  return rounds;
}

template <typename F>
void for_each_round(const std::vector<std::vector<std::pair<int64_t, int64_t>>>& rounds, const F& fn) {
  for (const auto& items : rounds) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) fn(items[p].first, items[p].second);
    });
  }
}

// One tile (I, J), I <= J, of a symmetric forward: its rows update the running (max, e) of block
// I's rows, and (a pair tile) its columns those of block J's rows.  g: the tile's raw products
// (overwritten by the logits); ps / pc: LSE_LABELS' positive sums and counts, or empty.
void symmetric_tile_forward(const Problem& P, const Tiling& T, const Scratch& W, float* g, int64_t I, int64_t J,
                            float* mx, float* sm, float* xt, float* lab, float* ps, float* pc) {
  float* tmax = W.col0();
  float* off = W.col1();
  float* fac = W.col2();
  float* rest = W.col3();
  float* cnt = W.col4();
  const int64_t i0 = T.rows(I), bm = std::min(T.bm, P.n - i0);
  const int64_t j0 = T.rows(J), bn = std::min(T.bm, P.n - j0);
  const bool pair = I != J;
  if (pair) std::fill(tmax, tmax + bn, kNegInf);
  if (pair && xt != nullptr) {  // rows of block J whose target is in block I: S_{j, t} = S_{t, j}
    for (int64_t c = 0; c < bn; ++c) {
      const int64_t t = P.target[j0 + c] - i0;
      if (t >= 0 && t < bm) xt[j0 + c] = P.scale * g[t * bn + c];  // (no bias here: logits_row's product)
    }
  }
  for (int64_t r = 0; r < bm; ++r) {
    float* s = g + r * bn;
    tile_row_logits(P, s, s, i0 + r, j0, bn, xt);
    row_update(mx[i0 + r], sm[i0 + r], s, bn);
    if (pair) col_max_acc(tmax, s, bn);
    if (lab != nullptr) {  // LSE_LABELS: row i0 + r's positives here, and (pair) those of the columns
      const int64_t label = P.q_labels[i0 + r];
      label_pos_acc(s, P.k_labels + j0, label, bn, ps[i0 + r], pc[i0 + r]);
      if (pair) {
        for (int64_t c = 0; c < bn; ++c) {
          if (P.k_labels[j0 + c] == label && s[c] != kNegInf) {
            ps[j0 + c] += s[c];
            pc[j0 + c] += 1.0f;
          }
        }
      }
    }
  }
  if (pair) {  // the tile's columns are rows of block J
    col_rescale(mx + j0, fac, off, tmax, bn);
    std::fill(rest, rest + bn, 0.0f);
    std::fill(cnt, cnt + bn, 0.0f);
    for (int64_t r = 0; r < bm; ++r) col_rest_acc(rest, cnt, g + r * bn, off, bn);
    col_finish(sm + j0, fac, rest, cnt, bn);
  }
}

void forward_symmetric(const Problem& P, const Tiling& T, const Scratch& W, float* row_lse, float* xt, float* lab,
                       const SecondScale* two = nullptr) {
  std::vector<float> mx(P.n, kNegInf), sm(P.n, 0.0f);
  std::vector<float> ps(lab != nullptr ? P.n : 0, 0.0f), pc(lab != nullptr ? P.n : 0, 0.0f);
  std::vector<float> mx0(two != nullptr ? P.n : 0, kNegInf), sm0(two != nullptr ? P.n : 0, 0.0f);
  const float* X = P.qh;
  for_each_round(tournament_rounds(T.nrb), [&](int64_t I, int64_t J) {
    float* g = W.tile();
    const int64_t i0 = T.rows(I), bm = std::min(T.bm, P.n - i0);
    const int64_t j0 = T.rows(J), bn = std::min(T.bm, P.n - j0);
    gemm_abt(bm, bn, P.d, X + i0 * P.d, P.d, X + j0 * P.d, P.d, g);
    if (two != nullptr) {  // the second scale first, from a copy of the product
      std::copy(g, g + bm * bn, W.tile2());
      symmetric_tile_forward(*two->P, T, W, W.tile2(), I, J, mx0.data(), sm0.data(), nullptr, nullptr, nullptr,
                             nullptr);
    }
    symmetric_tile_forward(P, T, W, g, I, J, mx.data(), sm.data(), xt, lab, ps.data(), pc.data());
  });
  for (int64_t i = 0; i < P.n; ++i) {
    if (two != nullptr) two->row_lse[i] = finish_lse(mx0[i], sm0[i]);
    row_lse[i] = finish_row(mx[i], sm[i], xt, i);
    if (lab != nullptr) finish_labels(row_lse, lab, P.n, i, mx[i], sm[i], ps[i], pc[i]);
  }
}

// c <- c + c^T for a square tile.
void symmetrize(float* c, int64_t b) {
  for (int64_t i = 0; i < b; ++i) {
    c[i * b + i] *= 2.0f;
    for (int64_t j = i + 1; j < b; ++j) {
      const float v = c[i * b + j] + c[j * b + i];
      c[i * b + j] = v;
      c[j * b + i] = v;
    }
  }
}

// The gradient weights of a symmetric backward: w, the combined upstream gradient per row (0 where
// the row has no kept pair), rx + rl its row lse (0 where -inf; see Grads), lw LSE_LABELS' 1/|P_i| or
// null.
struct SymGrads {
  const float* w = nullptr;
  const float* rx = nullptr;
  const float* rl = nullptr;
  const float* lw = nullptr;
  double* dscale = nullptr;  // per row block, or null
};

// Row gi of tile (I, J) of a symmetric backward: its raw products gr become C = dS_IJ + dS_JI^T (a pair
// tile) or dS_II (a diagonal tile, symmetrized later); s and raw are scratch.  Returns its dscale share.
double symmetric_backward_row(const Problem& P, const SymGrads& G, float* gr, float* s, float* raw, int64_t gi,
                              int64_t j0, int64_t bn, bool pair) {
  const float* w = G.w;
  const float* rx = G.rx;
  const float* rl = G.rl;
  const float* lw = G.lw;
  double dsc = 0.0;
  tile_row_logits(P, s, gr, gi, j0, bn);
  const int64_t tc = target_col(P, gi, j0, bn);
  const float raw_t = tc >= 0 ? gr[tc] : 0.0f;
  const bool row_term = w[gi] != 0.0f;
  // LSE_LABELS (labels symmetric): -w_i/|P_i| at row gi's positives, and in a pair tile
  // -w_j/|P_j| of the column's row j, whose positive gi is (their raw products' dscale share first).
  // A positive pair where either side's row has only it (1/|P| = 1) is formed whole instead (its raw
  // product kept in raw), that side's term w expm1(-output) (see unit_label_ds).
  const int64_t label = lw != nullptr ? P.q_labels[gi] : 0;
  const float row_lab = lw != nullptr ? w[gi] * lw[gi] : 0.0f;
  const bool row_unit = lw != nullptr && lw[gi] == 1.0f;
  auto whole = [&](int64_t j) { return row_unit || (pair && lw[j0 + j] == 1.0f); };
  if (lw != nullptr) {
    double raw_pos = 0.0;
    for (int64_t j = 0; j < bn; ++j)
      if (P.k_labels[j0 + j] == label && s[j] != kNegInf) {
        if (whole(j))
          raw[j] = gr[j];
        else
          raw_pos += static_cast<double>(row_lab + (pair ? w[j0 + j] * lw[j0 + j] : 0.0f)) * gr[j];
      }
    dsc -= raw_pos;
  }
  if (pair && row_term) {
    dsc += ds_row_rc(gr, s, bn, w[gi], rx[gi], rl[gi], w + j0, rx + j0, rl + j0);
  } else if (pair) {
    dsc += ds_row_c(gr, s, bn, w + j0, rx + j0, rl + j0);
  } else if (row_term) {
    dsc += ds_row_r(gr, s, bn, w[gi], rx[gi], rl[gi]);
  } else {
    std::fill(gr, gr + bn, 0.0f);
  }
  if (tc >= 0)  // LSE_TARGET (targets an involution): row gi's p - 1, and in a pair tile the
                // transposed term of row j0 + tc, whose target is gi
    dsc += target_ds(gr[tc], s[tc] != kNegInf, raw_t, w[gi], rl[gi], pair ? w[j0 + tc] : 0.0f,
                     pair ? rl[j0 + tc] : 0.0f);
  if (lw != nullptr) {
    // one side's term at a positive: w (p - 1/|P|), or w expm1(-output) for a row with one positive
    auto term = [&](int64_t r, float sj) {
      if (w[r] == 0.0f) return 0.0f;
      return lw[r] == 1.0f ? w[r] * std::expm1(-rl[r]) : w[r] * fast_exp((sj - rx[r]) - rl[r]) - w[r] * lw[r];
    };
    for (int64_t j = 0; j < bn; ++j) {
      if (P.k_labels[j0 + j] != label || s[j] == kNegInf) continue;
      if (whole(j)) {
        const float v = term(gi, s[j]) + (pair ? term(j0 + j, s[j]) : 0.0f);
        dsc += (static_cast<double>(v) - static_cast<double>(gr[j])) * raw[j];
        gr[j] = v;
      } else {
        gr[j] -= row_lab + (pair ? w[j0 + j] * lw[j0 + j] : 0.0f);
      }
    }
  }
  return dsc;
}

// H (n, d) += the whole gradient direction A + B, or null.  two (lse2): the second scale's problem
// and weights; C is then scale1 C1 + scale0 C0, in the product's units.
void backward_symmetric(const Problem& P, const Tiling& T, const Scratch& W, const SymGrads& G, float* H,
                        const Problem* P0 = nullptr, const SymGrads* G0 = nullptr) {
  const float* X = P.qh;
  for_each_round(tournament_rounds(T.nrb), [&](int64_t I, int64_t J) {
    float* g = W.tile();
    float* s = W.row();
    const int64_t i0 = T.rows(I), bm = std::min(T.bm, P.n - i0);
    const int64_t j0 = T.rows(J), bn = std::min(T.bm, P.n - j0);
    const bool pair = I != J;
    gemm_abt(bm, bn, P.d, X + i0 * P.d, P.d, X + j0 * P.d, P.d, g);
    if (P0 != nullptr) std::copy(g, g + bm * bn, W.tile2());
    double dsc = 0.0, dsc0 = 0.0;
    for (int64_t r = 0; r < bm; ++r) {
      float* gr = g + r * bn;
      dsc += symmetric_backward_row(P, G, gr, s, W.col0(), i0 + r, j0, bn, pair);
      if (P0 != nullptr) {
        float* gr0 = W.tile2() + r * bn;
        dsc0 += symmetric_backward_row(*P0, *G0, gr0, s, W.col0(), i0 + r, j0, bn, pair);
        combine_scales(gr, gr0, bn, P.scale, P0->scale);
      }
    }
    if (G.dscale != nullptr) G.dscale[I] += dsc;
    if (G0 != nullptr && G0->dscale != nullptr) G0->dscale[I] += dsc0;
    if (H == nullptr) return;
    if (pair) {
      gemm_acc_ab(bm, P.d, bn, g, X + j0 * P.d, H + i0 * P.d);
      gemm_acc_atb(bn, P.d, bm, g, X + i0 * P.d, H + j0 * P.d);
    } else {
      symmetrize(g, bm);
      gemm_acc_ab(bm, P.d, bm, g, X + i0 * P.d, H + i0 * P.d);
    }
  });
}

// ----------------------------------------------------------- argument checks, glue
void check_vector(const OptTensor& t, const char* name, int64_t len, at::ScalarType dtype, const char* len_name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, name, " must have shape (", len_name, ",) = (", len,
              ",), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, name, " must be ", dtype, ", got ", t->scalar_type());
}

struct Operands {
  Tensor qh, kh, bias, pos, ql, kl, target;
  Problem P;
  bool same = false;  // q is k and q_rscale is k_rscale (or both absent)
};

// Same operand, no column bias, and a mask that keeps (i, j) exactly when it keeps (j, i).
bool is_symmetric(const Operands& o) {
  const Problem& P = o.P;
  if (!o.same || P.bias != nullptr || P.n != P.m) return false;
  if ((P.mask_mode & kMaskDiag) && P.diag_offset != 0) return false;
  if (P.mask_mode & kMaskPos) {  // j == pos[i] must mean i == pos[j]: pos is an involution
    for (int64_t i = 0; i < P.n; ++i)
      if (P.pos[P.pos[i]] != i) return false;
  }
  if (P.target != nullptr) {  // so must the targets be
    for (int64_t i = 0; i < P.n; ++i)
      if (P.target[P.target[i]] != i) return false;
  }
  if ((P.mask_mode & (kMaskSameLabel | kLseLabels)) && !(o.ql.is_same(o.kl) || at::equal(o.ql, o.kl))) return false;
  return true;
}

Tensor row_scaled_f32(const Tensor& x, const OptTensor& rscale) {
  if (!rscale.has_value()) return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  const Tensor r = rscale->contiguous().unsqueeze(1);
  if (x.scalar_type() == at::kFloat) return at::mul(x, r).contiguous();
  return x.to(at::kFloat).mul_(r).contiguous();
}

Operands prepare(const Tensor& q, const Tensor& k, const Tensor& scale, const OptTensor& q_rscale,
                 const OptTensor& k_rscale, const OptTensor& col_bias, const OptTensor& pos_index,
                 const OptTensor& q_labels, const OptTensor& k_labels, int64_t diag_offset, int64_t mask_mode,
                 bool col_term) {
  TORCH_CHECK(q.dim() == 2, "q must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, "k must be 2-D (M, D), got shape ", k.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "q and k must be CPU tensors, got ", q.device(), " and ",
              k.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, "k must have q's dtype ", dt, ", got ", k.scalar_type());
  TORCH_CHECK(q.size(1) == k.size(1), "q and k must have the same feature dimension, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device().is_cpu(),
              "scale must be a one-element float32 CPU tensor, got ", scale.sizes(), " ", scale.scalar_type(), " on ",
              scale.device());
  TORCH_CHECK(mask_mode >= 0 && mask_mode <= 63, "mask_mode must be a combination of the bits 1, 2, 4, 8, 16, 32, got ",
              mask_mode);
  const int64_t n = q.size(0), m = k.size(0);
  check_vector(q_rscale, "q_rscale", n, at::kFloat, "N");
  check_vector(k_rscale, "k_rscale", m, at::kFloat, "M");
  check_vector(col_bias, "col_bias", m, at::kFloat, "M");
  check_vector(pos_index, "pos_index", n, at::kLong, "N");
  check_vector(q_labels, "q_labels", n, at::kLong, "N");
  check_vector(k_labels, "k_labels", m, at::kLong, "M");

  Operands o;
  Problem& P = o.P;
  P.n = n;
  P.m = m;
  P.d = q.size(1);
  P.scale = scale.item<float>();
  P.mask_mode = mask_mode;
  P.diag_offset = diag_offset;
  if (mask_mode & kMaskPos) {
    TORCH_CHECK(pos_index.has_value(), "mask_mode has bit 2 (MASK_POS) but pos_index is None");
    o.pos = pos_index->contiguous();
    if (n > 0) {
      const auto mn = o.pos.min().item<int64_t>(), mx = o.pos.max().item<int64_t>();
      TORCH_CHECK(mn >= 0 && mx < m, "pos_index values must lie in [0, M) = [0, ", m, "), got min ", mn, " max ",
                  mx);
    }
    P.pos = o.pos.data_ptr<int64_t>();
  }
  lse_labels_check(mask_mode, q_labels.has_value() && k_labels.has_value(), col_term);
  if (mask_mode & (kMaskSameLabel | kLseLabels)) {
    TORCH_CHECK(q_labels.has_value() && k_labels.has_value(),
                "mask_mode has bit 4 (MASK_SAME_LABEL) but q_labels or k_labels is None");
    o.ql = q_labels->contiguous();
    o.kl = k_labels->contiguous();
    P.q_labels = o.ql.data_ptr<int64_t>();
    P.k_labels = o.kl.data_ptr<int64_t>();
  }
  if (col_bias.has_value()) {
    o.bias = col_bias->contiguous();
    P.bias = o.bias.data_ptr<float>();
  }
  if (mask_mode & kLseTarget) {
    o.target = lse_target_index(n, m, pos_index, diag_offset, col_term, q);
    P.target = o.target.data_ptr<int64_t>();
  }
  o.qh = row_scaled_f32(q, q_rscale);
  // nt_xent-style calls score a matrix against itself: share the scaled copy.
  const bool same_rscale = (!q_rscale.has_value() && !k_rscale.has_value()) ||
                           (q_rscale.has_value() && k_rscale.has_value() && q_rscale->is_same(*k_rscale));
  o.same = q.is_same(k) && same_rscale;
  o.kh = o.same ? o.qh : row_scaled_f32(k, k_rscale);
  P.qh = o.qh.data_ptr<float>();
  P.kh = o.kh.data_ptr<float>();
  return o;
}

std::tuple<Tensor, Tensor, Tensor> lse_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& scale,
                                           const OptTensor& q_rscale, const OptTensor& k_rscale,
                                           const OptTensor& col_bias, const OptTensor& pos_index,
                                           const OptTensor& q_labels, const OptTensor& k_labels, int64_t diag_offset,
                                           int64_t mask_mode, bool compute_col) {
  CK_NO_AUTOCAST();
  const Operands o = prepare(q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels,
                             diag_offset, mask_mode, compute_col);
  const Problem& P = o.P;
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor row = at::empty({P.n}, f32);
  Tensor col = at::empty({compute_col ? P.m : 0}, f32);
  // target_state: LSE_TARGET, the target logits as the tiles compute them (every row has a
  // target: M > 0); LSE_LABELS, (2, N) the rows' mean positive logits and 1/|P_i|
  const bool labels = mask_mode & kLseLabels;
  Tensor xt = labels ? at::empty({2, P.n}, f32) : at::empty({P.target != nullptr ? P.n : 0}, f32);
  if (P.n == 0 || P.m == 0) {  // nothing kept anywhere
    row.fill_(kNegInf);
    col.fill_(kNegInf);
    if (labels) {
      xt[0].fill_(kNegInf);
      xt[1].zero_();
    }
    return {row, col, xt};
  }
  const Tiling T = make_tiling(P.n, P.m);
  const Scratch W(T);
  float* x = P.target != nullptr ? xt.data_ptr<float>() : nullptr;
  float* lab = labels ? xt.data_ptr<float>() : nullptr;
  if (is_symmetric(o)) {
    forward_symmetric(P, T, W, row.data_ptr<float>(), x, lab);
    if (compute_col) col.copy_(row);
  } else if (compute_col) {
    forward_rows_and_cols(P, T, W, row.data_ptr<float>(), col.data_ptr<float>(), x);
  } else {
    forward_rows(P, T, W, row.data_ptr<float>(), x, lab);
  }
  return {row, col, xt};
}

// Row dots x_i . y_i (float32) without an N x D temporary.
Tensor row_dots(const Tensor& x, const Tensor& y) {
  return at::bmm(x.to(at::kFloat).unsqueeze(1), y.unsqueeze(2)).view({x.size(0)});
}

// A 0-dim float32 total of per-row-block float64 partials, summed in block order.
Tensor partials_total(const std::vector<double>& part, const at::TensorOptions& f32) {
  double total = 0.0;
  for (double v : part) total += v;
  return at::full({}, static_cast<float>(total), f32);
}

// Upstream gradient vector, or an undefined tensor when it is all zero (no work).
Tensor nonzero_or_undefined(const Tensor& g) {
  if (g.numel() == 0 || !g.ne(0).any().item<bool>()) return Tensor();
  return g;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_backward_cpu(
    const Tensor& grad_row, const Tensor& grad_col, const Tensor& q, const Tensor& k, const Tensor& scale,
    const OptTensor& q_rscale, const OptTensor& k_rscale, const OptTensor& col_bias, const OptTensor& pos_index,
    const OptTensor& q_labels, const OptTensor& k_labels, int64_t diag_offset, int64_t mask_mode,
    const Tensor& row_lse, const Tensor& col_lse, const Tensor& target_state, bool need_q, bool need_k,
    bool need_scale, bool need_bias,
    bool need_q_rscale, bool need_k_rscale) {
  CK_NO_AUTOCAST();
  const Operands o = prepare(q, k, scale, q_rscale, k_rscale, col_bias, pos_index, q_labels, k_labels,
                             diag_offset, mask_mode, col_lse.numel() > 0);
  const Problem& P = o.P;
  const auto f32 = q.options().dtype(at::kFloat);
  TORCH_CHECK(grad_row.scalar_type() == at::kFloat && grad_row.dim() == 1 && grad_row.size(0) == P.n,
              "grad_row must be float32 of shape (N,) = (", P.n, ",), got ", grad_row.scalar_type(), " ",
              grad_row.sizes());
  TORCH_CHECK(row_lse.scalar_type() == at::kFloat && row_lse.dim() == 1 && row_lse.size(0) == P.n,
              "row_lse must be float32 of shape (N,) = (", P.n, ",), got ", row_lse.scalar_type(), " ",
              row_lse.sizes());
  TORCH_CHECK(grad_col.scalar_type() == at::kFloat && grad_col.dim() == 1 &&
                  (grad_col.size(0) == 0 || grad_col.size(0) == P.m),
              "grad_col must be float32 of shape (M,) = (", P.m, ",) or empty, got ", grad_col.scalar_type(), " ",
              grad_col.sizes());
  const Tensor gcol_in = nonzero_or_undefined(grad_col.contiguous());
  if (gcol_in.defined()) {
    TORCH_CHECK(col_lse.scalar_type() == at::kFloat && col_lse.dim() == 1 && col_lse.size(0) == P.m,
                "col_lse must be float32 of shape (M,) = (", P.m, ",) when grad_col is given, got ",
                col_lse.scalar_type(), " ", col_lse.sizes());
  }
  // Symmetric problem, both halves of the tensor's gradient wanted: one combined pass.
  const bool combined = is_symmetric(o) && need_q == need_k && need_q_rscale == need_k_rscale && !need_bias;
  const bool needA = need_q || need_q_rscale, needB = !combined && (need_k || need_k_rscale);
  const Tiling T = make_tiling(std::max<int64_t>(P.n, 1), std::max<int64_t>(P.m, 1));

  Tensor A = needA ? at::zeros({P.n, P.d}, f32) : Tensor();
  Tensor B = needB ? at::zeros({P.m, P.d}, f32) : Tensor();
  Tensor dbias = need_bias ? at::zeros({P.m}, f32) : at::empty({0}, f32);
  std::vector<double> dscale_part(T.nrb, 0.0);

  // Each log-sum-exp as x + l (see Grads): (lse, 0), or with LSE_TARGET (the forward's target
  // logit, the cross-entropy output); rows / columns without kept pairs (-inf) get no
  // gradient: zero upstream gradient, x = l = 0.
  if (P.target != nullptr) {
    TORCH_CHECK(target_state.scalar_type() == at::kFloat && target_state.dim() == 1 && target_state.size(0) == P.n,
                "target_state must be float32 of shape (N,) = (", P.n, ",) with mask_mode bit 8 (LSE_TARGET), got ",
                target_state.scalar_type(), " ", target_state.sizes());
  }
  auto split = [&](const Tensor& out, Tensor& x, Tensor& l, Tensor& g, const Tensor& xs) {
    const Tensor empty = out.eq(kNegInf);
    if (P.target != nullptr || xs.defined()) {
      x = (xs.defined() ? xs : target_state).masked_fill(empty, 0.0f).contiguous();
      l = out.masked_fill(empty, 0.0f).contiguous();
    } else {
      x = out.masked_fill(empty, 0.0f).contiguous();
      l = at::zeros_like(x);
    }
    if (g.defined()) g = g.masked_fill(empty, 0.0f).contiguous();
  };
  const bool labels = mask_mode & kLseLabels;
  if (labels) {
    TORCH_CHECK(target_state.scalar_type() == at::kFloat && target_state.dim() == 2 && target_state.size(0) == 2 &&
                    target_state.size(1) == P.n,
                "target_state must be float32 of shape (2, N) = (2, ", P.n, ") with mask_mode bit 16 (LSE_LABELS), "
                "got ", target_state.scalar_type(), " ", target_state.sizes());
  }
  Tensor grow = nonzero_or_undefined(grad_row.contiguous());
  Tensor gcol = gcol_in, rx, rl, cx, cl;
  // LSE_LABELS: the outputs are LSE - xp, xp the mean positive logit (target_state[0]): each row's
  // LSE is xp + output, as LSE_TARGET's target logit + cross-entropy
  split(row_lse.contiguous(), rx, rl, grow, labels ? target_state[0] : Tensor());
  const Tensor lw = labels ? target_state[1].contiguous() : Tensor();
  if (gcol.defined()) split(col_lse.contiguous(), cx, cl, gcol, Tensor());
  const bool any_work = (needA || needB || need_bias || need_scale) && (grow.defined() || gcol.defined());
  if (any_work && P.n > 0 && P.m > 0 && combined) {
    // Row i's weight in dS + dS^T: its row and column upstream gradients (col_lse = row_lse).
    Tensor w = grow.defined() ? grow.clone() : at::zeros({P.n}, f32);
    if (gcol.defined()) w.add_(gcol);
    const Scratch W(T);
    SymGrads SG;
    SG.w = w.data_ptr<float>();
    SG.rx = rx.data_ptr<float>();
    SG.rl = rl.data_ptr<float>();
    SG.lw = labels ? lw.data_ptr<float>() : nullptr;
    SG.dscale = need_scale ? dscale_part.data() : nullptr;
    backward_symmetric(P, T, W, SG, needA ? A.data_ptr<float>() : nullptr);
  } else if (any_work && P.n > 0 && P.m > 0) {
    Grads G;
    G.grow = grow.defined() ? grow.data_ptr<float>() : nullptr;
    G.rx = rx.data_ptr<float>();
    G.rl = rl.data_ptr<float>();
    G.gcol = gcol.defined() ? gcol.data_ptr<float>() : nullptr;
    G.cx = gcol.defined() ? cx.data_ptr<float>() : nullptr;
    G.cl = gcol.defined() ? cl.data_ptr<float>() : nullptr;
    G.lw = labels ? lw.data_ptr<float>() : nullptr;
    G.A = needA ? A.data_ptr<float>() : nullptr;
    G.B = needB ? B.data_ptr<float>() : nullptr;
    G.dbias = need_bias ? dbias.data_ptr<float>() : nullptr;
    G.dscale = need_scale ? dscale_part.data() : nullptr;
    const Scratch W(T);
    backward_tiles(P, T, W, G);
  }

  const float s = P.scale;
  Tensor dq = at::empty({0}, q.options()), dk = at::empty({0}, k.options());
  Tensor dscale = at::empty({0}, f32), dqr = at::empty({0}, f32), dkr = at::empty({0}, f32);
  // d q_rscale from A first; then A is scaled in place into dq.
  if (need_q_rscale) dqr = row_dots(q, A).mul_(s);
  if (need_q) {
    const Tensor f = q_rscale.has_value() ? q_rscale->unsqueeze(1) * s : at::full({1, 1}, s, f32);
    dq = (mask_mode & kLseNorm) ? A.mul_(f) : A.mul_(f).to(q.scalar_type());  // (LSE_NORM: float32)
  }
  if (combined) {  // dq (dq_rscale) carries the whole gradient of the shared tensor
    if (need_k) dk = (mask_mode & kLseNorm) ? at::zeros(k.sizes(), f32) : at::zeros_like(k);
    if (need_k_rscale) dkr = at::zeros({P.m}, f32);
  } else {
    if (need_k_rscale) dkr = row_dots(k, B).mul_(s);
    if (need_k) {
      const Tensor f = k_rscale.has_value() ? k_rscale->unsqueeze(1) * s : at::full({1, 1}, s, f32);
      dk = (mask_mode & kLseNorm) ? B.mul_(f) : B.mul_(f).to(k.scalar_type());
    }
  }
  if (need_scale) dscale = partials_total(dscale_part, f32);
  return {dq, dk, dscale, dbias, dqr, dkr};
}

// ------------------------------------------------ two scales of one product (lse2, HCL)
// csrc/op_schemas.h: the row log-sum-exps of S1 = scale1 P and S0 = scale0 P over the same kept
// pairs, each tile's product formed once (forward), and the backward's dS of both scales summed
// in float32 before its GEMMs: half the GEMM work of the lse ops twice.
Operands prepare_two(const Tensor& q, const Tensor& k, const Tensor& scale1, const Tensor& scale0,
                     const OptTensor& q_rscale, const OptTensor& k_rscale, const OptTensor& pos_index,
                     int64_t diag_offset, int64_t mask_mode, Problem& P0) {
  TORCH_CHECK((mask_mode & ~(kMaskDiag | kMaskPos | kLseNorm)) == 0,
              "lse2: mask_mode takes the bits 1, 2 and 32 only (no labels, target or column term), got ", mask_mode);
  TORCH_CHECK(scale0.numel() == 1 && scale0.scalar_type() == at::kFloat && scale0.device().is_cpu(),
              "scale0 must be a one-element float32 CPU tensor, got ", scale0.sizes(), " ", scale0.scalar_type(),
              " on ", scale0.device());
  Operands o = prepare(q, k, scale1, q_rscale, k_rscale, std::nullopt, pos_index, std::nullopt, std::nullopt,
                       diag_offset, mask_mode, false);
  P0 = o.P;
  P0.scale = scale0.item<float>();
  return o;
}

std::tuple<Tensor, Tensor> lse2_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& scale1,
                                            const Tensor& scale0, const OptTensor& q_rscale,
                                            const OptTensor& k_rscale, const OptTensor& pos_index,
                                            int64_t diag_offset, int64_t mask_mode) {
  CK_NO_AUTOCAST();
  Problem P0;
  const Operands o = prepare_two(q, k, scale1, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode, P0);
  const Problem& P = o.P;
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor row1 = at::empty({P.n}, f32), row0 = at::empty({P.n}, f32);
  if (P.n == 0 || P.m == 0) return {row1.fill_(kNegInf), row0.fill_(kNegInf)};
  const Tiling T = make_tiling(P.n, P.m);
  const Scratch W(T, /*two=*/true);
  const SecondScale two{&P0, row0.data_ptr<float>()};
  if (is_symmetric(o))
    forward_symmetric(P, T, W, row1.data_ptr<float>(), nullptr, nullptr, &two);
  else
    forward_rows(P, T, W, row1.data_ptr<float>(), nullptr, nullptr, &two);
  return {row1, row0};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse2_backward_cpu(
    const Tensor& grad1, const Tensor& grad0, const Tensor& q, const Tensor& k, const Tensor& scale1,
    const Tensor& scale0, const OptTensor& q_rscale, const OptTensor& k_rscale, const OptTensor& pos_index,
    int64_t diag_offset, int64_t mask_mode, const Tensor& row1, const Tensor& row0, bool need_q, bool need_k,
    bool need_scale1, bool need_scale0, bool need_q_rscale, bool need_k_rscale) {
  CK_NO_AUTOCAST();
  Problem P0;
  const Operands o = prepare_two(q, k, scale1, scale0, q_rscale, k_rscale, pos_index, diag_offset, mask_mode, P0);
  const Problem& P = o.P;
  const auto f32 = q.options().dtype(at::kFloat);
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{grad1, "grad1"}, {grad0, "grad0"},
                                {row1, "row1"}, {row0, "row0"}}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == P.n, name,
                " must be float32 of shape (N,) = (", P.n, ",), got ", t.scalar_type(), " ", t.sizes());
  }
  TORCH_CHECK(!need_q_rscale || q_rscale.has_value(), "need_q_rscale needs q_rscale");
  TORCH_CHECK(!need_k_rscale || k_rscale.has_value(), "need_k_rscale needs k_rscale");
  // Symmetric problem, both halves of the tensor's gradient wanted: one combined pass (dq carries it).
  const bool combined = is_symmetric(o) && need_q == need_k && need_q_rscale == need_k_rscale;
  const bool needA = need_q || need_q_rscale, needB = !combined && (need_k || need_k_rscale);
  const Tiling T = make_tiling(std::max<int64_t>(P.n, 1), std::max<int64_t>(P.m, 1));
  Tensor A = needA ? at::zeros({P.n, P.d}, f32) : Tensor();
  Tensor B = needB ? at::zeros({P.m, P.d}, f32) : Tensor();
  std::vector<double> ds1_part(T.nrb, 0.0), ds0_part(T.nrb, 0.0);

  // Each scale's rows as (upstream gradient, lse): 0 where the lse is -inf (no kept pair: no gradient).
  struct Side {
    Tensor g, x, l;
  };
  auto side = [&](const Tensor& grad, const Tensor& out) {
    const Tensor empty = out.eq(kNegInf);
    return Side{nonzero_or_undefined(grad.contiguous()).defined() ? grad.masked_fill(empty, 0.0f).contiguous()
                                                                   : Tensor(),
                out.masked_fill(empty, 0.0f).contiguous(), at::zeros({P.n}, f32)};
  };
  const Side s1 = side(grad1, row1), s0 = side(grad0, row0);
  const bool any_work = (needA || needB || need_scale1 || need_scale0) && (s1.g.defined() || s0.g.defined());
  if (any_work && P.n > 0 && P.m > 0) {
    const Scratch W(T, /*two=*/true);
    if (combined) {
      const Tensor w1 = s1.g.defined() ? s1.g : at::zeros({P.n}, f32);
      const Tensor w0 = s0.g.defined() ? s0.g : at::zeros({P.n}, f32);
      SymGrads G1, G0;
      G1.w = w1.data_ptr<float>();
      G1.rx = s1.x.data_ptr<float>();
      G1.rl = s1.l.data_ptr<float>();
      G1.dscale = need_scale1 ? ds1_part.data() : nullptr;
      G0.w = w0.data_ptr<float>();
      G0.rx = s0.x.data_ptr<float>();
      G0.rl = s0.l.data_ptr<float>();
      G0.dscale = need_scale0 ? ds0_part.data() : nullptr;
      backward_symmetric(P, T, W, G1, needA ? A.data_ptr<float>() : nullptr, &P0, &G0);
    } else {
      Grads G;
      G.grow = s1.g.defined() ? s1.g.data_ptr<float>() : nullptr;
      G.rx = s1.x.data_ptr<float>();
      G.rl = s1.l.data_ptr<float>();
      G.A = needA ? A.data_ptr<float>() : nullptr;
      G.B = needB ? B.data_ptr<float>() : nullptr;
      G.dscale = need_scale1 ? ds1_part.data() : nullptr;
      SecondGrads two;
      two.P = &P0;
      two.G.grow = s0.g.defined() ? s0.g.data_ptr<float>() : nullptr;
      two.G.rx = s0.x.data_ptr<float>();
      two.G.rl = s0.l.data_ptr<float>();
      two.G.dscale = need_scale0 ? ds0_part.data() : nullptr;
      backward_tiles(P, T, W, G, &two);
    }
  }

  // A and B are in the product's units (both scales applied to dS): dq = q_rscale A, d q_rscale = q . A.
  const Tensor none = at::empty({0}, f32);
  const Tensor dqr = need_q_rscale ? row_dots(q, A) : none;
  const Tensor dq = !need_q ? none : q_rscale.has_value() ? A.mul_(q_rscale->unsqueeze(1)) : A;
  Tensor dk = none, dkr = none;
  if (combined) {  // dq (dq_rscale) carries the whole gradient of the shared tensor
    if (need_k) dk = at::zeros(k.sizes(), f32);
    if (need_k_rscale) dkr = at::zeros({P.m}, f32);
  } else {
    if (need_k_rscale) dkr = row_dots(k, B);
    if (need_k) dk = k_rscale.has_value() ? B.mul_(k_rscale->unsqueeze(1)) : B;
  }
  return {dq, dk, need_scale1 ? partials_total(ds1_part, f32) : none,
          need_scale0 ? partials_total(ds0_part, f32) : none, dqr, dkr};
}

const CpuOpRecord record_forward("lse_forward");
const CpuOpRecord record_backward("lse_backward");
const CpuOpRecord record_forward2("lse2_forward");
const CpuOpRecord record_backward2("lse2_backward");

}  // namespace
}  // namespace ck::cpu

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("lse_forward", &ck::cpu::lse_forward_cpu);
  m.impl("lse_backward", &ck::cpu::lse_backward_cpu);
  m.impl("lse2_forward", &ck::cpu::lse2_forward_cpu);
  m.impl("lse2_backward", &ck::cpu::lse2_backward_cpu);
}
