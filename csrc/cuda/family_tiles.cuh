// Device code and launch plans of the log-sum-exp and pairwise-sigmoid tile kernels, shared by
// the translation units that instantiate them (family_tiles_<type>_fwd.cu and
// family_tiles_<type>_bwd_<family>.cu, so that nvcc builds them in parallel, as FlashAttention
// splits its kernels by head dimension) and the host side (family_tiles.cu: the entry points, which call the typed
// launches through extern templates and instantiate no kernel themselves).
//
// CUDA kernels of the log-sum-exp and pairwise-sigmoid families (contracts in
// csrc/op_schemas.h).  One tile kernel, FlashAttention-2 style, serves both families and
// both directions:
//   * a block owns BM = 64 "rows" and streams every BN = 64 "column" tile past them;
//     S = scale * (r_i x_i).(r_j y_j) + biases lives only in registers (mma.sync
//     fragments), never in memory.  Forward: 4 warps, each 16 rows x 64 columns of S;
//     backward: G groups of 4 warps (Shape, bwd_groups), warp w 16 rows (w % 4) x 64 / G
//     columns (w / 4) of S;
//   * TRANS = false: rows are q, columns k (row_lse, dq, dq_rscale, dscale, dbias,
//     drow_offset); TRANS = true: rows are k, columns q (col_lse, dk, dk_rscale,
//     dcol_bias).  The mask and every formula are written in (i, j) = (q index,
//     k index), so both directions compute the same S_ij bit for bit;
//   * forward: online max / sum (lse) or a softplus sum (pairwise) per row; the lse forward
//     with compute_col takes one pass over S for rows and columns (launch_fused_cols: each
//     tile's column states over the block's rows, folded over the row blocks in order);
//   * where the row blocks alone cannot fill the GPU (small N), the column tiles are split
//     across blocks (plan_pass: grid.y in the forward, grid.z in the backward), each split
//     writes its rows' partial state (forward) or partial per-row sums and dX (backward)
//     to a workspace, and merge kernels add the splits in a fixed order (flash-decoding
//     style; the backward's workspace is bounded, kSplitBudget);
//   * backward: dS_ij in registers, per-row sums in registers, dS (times the column
//     rscale) staged in shared memory as the A operand of dX += dS . Y, computed for a
//     DC = 128 G slice of the feature dimension per block, 128 features per warp group
//     (grid.y slices: S is recomputed once per slice, ceil(D / DC) times, see
//     bench/NOTES.md); with two groups their per-row sums are added in a fixed order
//     through shared memory;
//   * q/k chunks of BK features are double-buffered with cp.async (16-byte copies when
//     rows are 16-byte aligned, element copies with zero fill at the edges);
//   * deterministic: per-row sums are reduced in a fixed shuffle order, whole-matrix
//     sums (dscale, dbias) are written per block and reduced by one block in a fixed
//     order (double partials); no float atomics;
//   * int64 indices everywhere a row index meets the feature dimension;
//   * WG (sm_90a, 16-bit inputs, opt-in CONTRASTIVE_KERNELS_CUDA_WGMMA=1): the same kernels
//     with both products from wgmma.mma_async (tile_wgmma.cuh), the chunks staged 64 features
//     wide in the 128-byte swizzle, the staged dS swizzled too; the accumulators are the same
//     fragments, so every epilogue is shared.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "launchers.h"
#include "tile_mma.cuh"
#include "tile_wgmma.cuh"

namespace ck {
namespace cuda {
namespace {

using tile::Cfg;

constexpr int BM = 64;
constexpr int BN = 64;
constexpr int DCW = 128;          // dX features per warp in the backward (mma.sync; see kDCW)
// dX features per warp group: 128, or 256 for the wgmma kernels with two groups (a block's slice
// is then 512 features, the whole D of the CLIP target: S computed once per tile, bench/NOTES.md
// "The CLIP target's arithmetic"); the host's plan_pass counts the same (wide_dx).
template <bool WG, int G>
constexpr int kDCW = (WG && G == 2) ? 2 * DCW : DCW;
// Block shape.  Forward: 4 warps, each 16 rows x 64 columns of S.  Backward: G groups of 4
// warps, each warp 16 rows x 64 / G columns of S, then 16 rows x kDCW features of dX (128; 256 in
// the wgmma kernels with two groups); a block covers a DC = kDCW G slice of the features (S
// recomputed ceil(D / DC) times).  G = 2 halves the recomputation or better (D > 128) at one
// block of 8 warps per SM (register-bound); G = 1 keeps 2-3 blocks of 4 warps per SM.  Chosen
// per launch by bwd_groups().
template <bool BWD, int G>
struct Shape {
  static_assert(G == 1 || (BWD && G == 2), "the backward alone has two warp groups");
  static constexpr int kWarps = 4 * G;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kNTS = BN / 8 / G;  // S n-tiles per warp
};

// kLseLabels: the lse family with LSE_LABELS (SupCon's positives), its own instantiations so
// that the other lse kernels keep their register budget (the float32 backward spilled otherwise).
// kLseCols: the lse forward that also writes each tile's column partials (the fused forward of
// compute_col: row and column log-sum-exps from one pass over S; forward row pass, SPLIT only).
// kLse2: two scales of one product (lse2_forward / lse2_backward, HCL's l(S) - l(S0)): plain row
// log-sum-exps at scale and scale0 from each tile's product; the backward's dS = scale g p +
// scale0 g0 p0 per unit of the product (the scales folded into dS, not applied to dX).
enum Family : int { kLse = 0, kPairwise = 1, kLseLabels = 2, kLseCols = 3, kLse2 = 4 };

// exp(-c) - 1 relative to itself however small c is (a confident row's p - 1 at its target,
// c its cross-entropy): the Taylor series of e^x - 1 at x = -c below |x| = 1/2 (nine terms,
// relative error < 1e-9), e^x - 1 above (>= 0.39 in size).  Cheaper in registers than expm1f.
__device__ __forceinline__ float expm1_neg(float c) {
  const float x = -c;
  float p = 2.7557319e-6f;
  p = fmaf(p, x, 2.4801587e-5f);
  p = fmaf(p, x, 1.9841270e-4f);
  p = fmaf(p, x, 1.3888889e-3f);
  p = fmaf(p, x, 8.3333333e-3f);
  p = fmaf(p, x, 4.1666667e-2f);
  p = fmaf(p, x, 1.6666667e-1f);
  p = fmaf(p, x, 0.5f);
  p = fmaf(p, x, 1.f);
  return fabsf(x) < 0.5f ? x * p : __expf(x) - 1.f;
}

// Per-index data of one side of a pair; the fields an index does not have keep
// their neutral defaults.
struct Side {
  float rs;    // row normalization (1 when absent)
  float x;     // LSE_TARGET backward: the index's target logit (its log-sum-exp is x + lse), else 0;
               // kLse2 backward (a q index): the log-sum-exp at scale0
  float lse;   // saved log-sum-exp of this index (lse backward; LSE_TARGET: its cross-entropy)
  float tg;    // LSE_TARGET backward, a kept target pair: g (p - 1) = g expm1(-ce) (computed once here);
               // kLse2 backward (a q index): the upstream gradient of the log-sum-exp at scale0
  float g;     // incoming gradient of this index's output
  float bias;  // additive bias carried by this index (col_bias_j or row_offset_i)
  long long lab;
  long long pos;  // pos_index_i
};

template <int FAM>
__device__ __forceinline__ void load_side(const FamilyParams& p, bool is_i, int64_t idx, int64_t count, Side& s) {
  s.rs = 1.f;
  s.x = 0.f;
  s.lse = -INFINITY;
  s.tg = 0.f;
  s.g = 0.f;
  s.bias = 0.f;
  s.lab = 0;
  s.pos = -1;
  if (idx < 0 || idx >= count) return;
  if (FAM != kPairwise) {
    if (is_i) {
      if (p.q_rscale) s.rs = p.q_rscale[idx];
      if (p.row_lse) s.lse = p.row_lse[idx];
      if (p.target_state) s.x = p.target_state[idx];
      if (p.grad_row) s.g = p.grad_row[idx];
      if (p.pos_index) s.pos = p.pos_index[idx];
      if (p.q_labels) s.lab = p.q_labels[idx];
    } else {
      if (p.k_rscale) s.rs = p.k_rscale[idx];
      if (p.col_lse) s.lse = p.col_lse[idx];
      if (p.col_lse && p.target_state) s.x = p.target_state[idx];  // (square: column j's target is row j)
      if (p.grad_col) s.g = p.grad_col[idx];
      if (p.col_bias) s.bias = p.col_bias[idx];
      if (p.k_labels) s.lab = p.k_labels[idx];
    }
    if (p.target_state && s.lse != -INFINITY && (is_i || p.col_lse)) s.tg = s.g * expm1_neg(s.lse);
    if (FAM == kLse2 && is_i) {
      s.x = p.row_lse0 ? p.row_lse0[idx] : -INFINITY;
      s.tg = p.grad_row0 ? p.grad_row0[idx] : 0.f;
    }
  } else {
    if (is_i) {
      if (p.grad_row) s.g = p.grad_row[idx];
      if (p.row_offset) s.bias = p.row_offset[idx];
      if (p.q_labels) s.lab = p.q_labels[idx];
    } else {
      if (p.k_labels) s.lab = p.k_labels[idx];
    }
  }
}

// Stage BM (= BN) rows x BK features of a (count, D) row-major matrix, from feature
// c0 on, into shared memory; rows or features past the end are zero.
template <typename T, int NTHR>
__device__ __forceinline__ void load_chunk(T* sm, const T* g, int64_t r0, int64_t count, int64_t c0, int64_t D,
                                           bool vec_ok) {
  constexpr int BK = Cfg<T>::BK, LDS = Cfg<T>::LDS;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int VPR = BK / VEC;
  for (int v = threadIdx.x; v < BM * VPR; v += NTHR) {
    const int r = v / VPR, cv = (v % VPR) * VEC;
    const int64_t gr = r0 + r, gc = c0 + cv;
    T* dst = sm + r * LDS + cv;
    if (vec_ok && gr < count && gc + VEC <= D) {
      tile::cp_async16(dst, g + gr * D + gc);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        dst[e] = (gr < count && gc + e < D) ? g[gr * D + gc + e] : tile::from_float<T>(0.f);
    }
  }
}

__device__ __forceinline__ float softplus(float x) {
  // log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|).  x = -inf (an infinite input)
  // gives NaN, not the limit 0: a non-finite input never gives a finite loss (fmaxf would also
  // drop a NaN x, but log1pf(NaN) keeps it).
  return x > -INFINITY ? fmaxf(x, 0.f) + log1pf(__expf(-fabsf(x))) : NAN;
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}

// 2^e exactly, e in [-126, 127].
__device__ __forceinline__ float pow2(int e) { return __int_as_float((e + 127) << 23); }

// The forward's per-row state, summed over the row's lanes (and column splits): lse, the
// running max m with the sum relative to it as kc exact 1s plus l; LSE_TARGET the target
// logit xt; LSE_LABELS the positives' sum ps and count pc; pairwise, the softplus sum l.
constexpr int kSplitFields = 6;  // m, l, kc, xt, ps, pc

// log of a state's sum relative to its max m, log1p((kc - 1) + l): -inf with nothing kept, NaN
// from a NaN logit.
__device__ __forceinline__ float log_rest(float m, float l, float kc) {
  return m == -INFINITY ? (l == 0.f ? -INFINITY : NAN) : log1pf((kc - 1.f) + l);
}

// Row r's forward outputs from its state.
template <int FAM>
__device__ __forceinline__ void finish_row(const FamilyParams& p, bool trans, int64_t r, int64_t nrows, float m,
                                           float l, float kc, float xt, float ps, float pc) {
  float* out = trans ? p.col_out : p.row_out;
  if (FAM == kPairwise) {
    out[r] = l;
    return;
  }
  const float lg = log_rest(m, l, kc);
  if (p.mask_mode & 8) {
    // the cross-entropy (max - target) + log1p(e): rounded relative to itself
    out[r] = (m - xt) + lg;
    if (!trans && p.target_out) p.target_out[r] = xt;
  } else if (FAM == kLseLabels) {
    // LSE minus the mean positive logit xp (rows only), as (max - xp) + log1p(e): rounded relative to
    // itself (one positive at the max: exactly log1p(e)); target_out (2, n): xp (the backward's
    // Side::x, as LSE_TARGET's) and 1/|P| (0, 0 without a positive, whose output stays the LSE)
    const float xp = pc > 0.f ? ps / pc : 0.f;
    out[r] = (m - xp) + lg;
    if (p.target_out) {
      p.target_out[r] = xp;
      p.target_out[nrows + r] = pc > 0.f ? 1.f / pc : 0.f;
    }
  } else {
    out[r] = m + lg;
  }
}

// The column splits of a SPLIT kernel: their count and this block's (plan_pass: grid.y
// forward, grid.z backward).
template <bool BWD>
__device__ __forceinline__ int64_t split_count() {
  return BWD ? gridDim.z : gridDim.y;
}
template <bool BWD>
__device__ __forceinline__ int64_t split_index() {
  return BWD ? blockIdx.z : blockIdx.y;
}

// Row r's backward per-row outputs from its sums: a = sum dS, b = sum dS raw rs_j (the row
// scale's gradient over scale), l = the fused pairwise pass's softplus sum.
template <int FAM>
__device__ __forceinline__ void finish_row_sums(const FamilyParams& p, bool trans, int64_t r, float a, float b,
                                                float l) {
  if (FAM != kPairwise) {
    const float sc = FAM == kLse2 ? 1.f : *p.scale;  // (kLse2: dS is per unit of the product)
    if (!trans && p.dq_rscale) p.dq_rscale[r] = sc * b;
    if (trans && p.dk_rscale) p.dk_rscale[r] = sc * b;
    if (trans && p.dcol_bias) p.dcol_bias[r] = a;
  } else if (!trans) {
    if (p.drow_offset) p.drow_offset[r] = a;
    if (p.row_out) p.row_out[r] = l;  // the fused pass
  }
}

// SPLIT: a kernel of split columns (plan_pass), its own instantiation: the split code added
// to the others cost them registers (ptxas 13.0, sm_80: the float16 / bfloat16 forward row
// pass 124 -> 138, one block per SM fewer; 8-52 bytes of spills in four backward kernels).
// Split kernels ask for the blocks per SM plan_pass counts on, 4 forward and 2 backward (the
// float32 LSE_LABELS forward 3, as unsplit: it needs 140-160 registers); left to themselves
// ptxas 13.0 held the float32 pairwise forward at 96 registers, for 5 blocks, and a backward
// one at 168, for 3, each with 8 bytes of spills.  The others name no minimum (0: none;
// naming 1 let ptxas give the sm_90 forward kernels 4-27 more registers, one block per SM
// fewer).  The wgmma LSE_LABELS forward (WG) asks for 3 as well: at 4 (128 registers) its split
// kernel spilled 104 bytes (sm_90a, ptxas 13.0); unsplit it holds 155.
template <typename T, int FAM, bool BWD, bool SPLIT, bool WG = false>
constexpr int min_blocks() {
  static_assert(FAM != kLseCols || (SPLIT && !BWD), "the fused forward is a split forward kernel");
  return !SPLIT ? 0 : BWD ? 2 : ((FAM == kLseLabels && (sizeof(T) == 4 || WG)) || FAM == kLse2) ? 3 : 4;
}

template <typename T, int FAM, bool TRANS, bool BWD, int G, bool SPLIT, bool WG = false>
__global__ void __launch_bounds__(Shape<BWD, G>::kThreads, (min_blocks<T, FAM, BWD, SPLIT, WG>()))
    family_tile_kernel(const FamilyParams p, const bool vec_ok) {
  // WG: the products from wgmma (sm_90a; 16-bit inputs): 64-feature chunks in 128-byte-swizzled
  // tiles; S by one m64n{64 / G}k16 per 16 features for each warp group's 64 x 64 / G part of the
  // tile, whose accumulators are the warps' mma.sync fragments accS (tile_wgmma.cuh), so the
  // epilogue is the same; in the backward, dS (times the column rscale) staged swizzled as the
  // K-major A of dX += dS Y, Y's staged chunk read N-major (its rows are the sum's index), one
  // m64n64k16 per 16 columns into half of accO (the m64n64 layout again).  Elsewhere (sm_80 code
  // of these instantiations) it traps: the host never launches it.
  static_assert(!WG || sizeof(T) == 2, "wgmma: the 16-bit kernels");
#if !CK_WGMMA
  if constexpr (WG) {  // (the rest is dead code here: no registers or time spent on a stub)
    __trap();
    return;
  }
#endif
  constexpr int BK = WG ? 64 : Cfg<T>::BK, LDS = Cfg<T>::LDS;
  using SH = Shape<BWD, G>;
  constexpr int NWARP = SH::kWarps, NTHR = SH::kThreads, NTS = SH::kNTS;
  constexpr int DCWK = kDCW<WG, G>, NT_O = DCWK / 8, DC = DCWK * G;  // dX features per group, n-tiles, per block
  constexpr int DS_LD = BN + (sizeof(T) == 4 ? 4 : 8);  // padded row of the staged dS tile
  constexpr int TPS = BK / 8;                           // output n-tiles per dX step
  constexpr int NG_MAX = DCWK / BK;                     // dX steps per column tile
  // float16's exponent range cannot hold dS (grad_row = 1/N times probabilities ~1/M
  // underflows): each row's staged dS is scaled by 2^ds_e, a power of two following the
  // running max |dS| of the row, and accO is rescaled (exactly) whenever it changes.
  constexpr bool kDsScale = BWD && std::is_same<T, __half>::value;
  constexpr bool COLS = FAM == kLseCols;                  // the fused forward (column partials too)
  constexpr bool LSE = FAM == kLse || FAM == kLseCols || FAM == kLse2;  // the plain lse kernels
  constexpr bool TWO = FAM == kLse2;                                     // ... with a second scale
  static_assert(!COLS || (!TRANS && !BWD && G == 1 && SPLIT), "the fused forward is a split row pass");

  __shared__ __align__(WG ? 1024 : 16) T sx[2][WG ? BM * 64 : BM * LDS];
  __shared__ __align__(WG ? 1024 : 16) T sy[2][WG ? BN * 64 : BN * LDS];
  __shared__ __align__(WG ? 1024 : 16) T sds[BWD ? (WG ? BM * 64 : BM * DS_LD) : 8];
  __shared__ Side side[2][BN];
  __shared__ double red[NWARP];
  // backward: the second warp group's per-row sums (rsum, rrs, pairwise loss); float16's
  // per-row max |dS| of each group
  __shared__ float sred[BWD ? 3 : 1][BWD ? BM : 1];
  __shared__ float sdmax[kDsScale ? 2 : 1][kDsScale ? BM : 1];
  // fused forward: each warp's column max, sum and count of exact 1s over its 16 rows of the
  // tile, and the target logit of each column (0 where the target is not in this block)
  __shared__ float scol[COLS ? 3 : 1][COLS ? 4 * BN : 1];
  __shared__ float sxt[COLS ? BN : 1];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // rows 16 rw .. 16 rw + 15 of the block; S columns NTS * 8 cg ..; dX features (backward)
  // part * cg .. of the block's slice
  const int rw = warp & 3, cg = warp >> 2;
  const T* X = static_cast<const T*>(TRANS ? p.k : p.q);
  const T* Y = static_cast<const T*>(TRANS ? p.q : p.k);
  const int64_t nrows = TRANS ? p.m : p.n, ncols = TRANS ? p.n : p.m, D = p.d;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) + (COLS ? p.row_block0 : 0)) * BM;
  const float scale = *p.scale;
  const float scale0 = TWO ? *p.scale0 : 0.f;
  const float sbias = (FAM == kPairwise) ? *p.bias : 0.f;
  const int64_t diag = p.diag_offset;
  const int mode = (FAM != kPairwise) ? p.mask_mode : p.pair_mode;
  const bool has_labels = p.q_labels != nullptr && p.k_labels != nullptr;

  Side R[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) load_side<FAM>(p, !TRANS, row0 + rw * 16 + g + 8 * h, nrows, R[h]);
  if (COLS && tid < BN) sxt[tid] = 0.f;

  void* dx_out = BWD ? (TRANS ? p.dk : p.dq) : nullptr;
  const bool gemm = BWD && dx_out != nullptr;
  const int64_t dc0 = static_cast<int64_t>(blockIdx.y) * DC;
  const int nk = D > 0 ? static_cast<int>((D + BK - 1) / BK) : 1;
  // dX: this slice's width split in G parts of whole BK chunks, one per warp group
  // (features past D are zero in the staged chunks and never written)
  int ng = 0;
  int64_t part = 0;  // features of the slice per warp group (ng chunks of BK)
  if (gemm) {
    const int64_t width = (D - dc0) < DC ? (D - dc0) : DC;
    ng = width > 0 ? static_cast<int>(((width + G - 1) / G + BK - 1) / BK) : 0;
    part = static_cast<int64_t>(ng) * BK;
  }
  const int spt = nk + ng;  // pipeline steps per column tile
  const int64_t ntiles = (ncols + BN - 1) / BN;
  // this block's steps [s_begin, s_end): all column tiles, or those of its split (SPLIT)
  int64_t s_begin = 0, s_end = ntiles * spt;
  if (SPLIT) {
    const int64_t t_begin = split_index<BWD>() * p.split_tiles;
    s_begin = t_begin * spt;
    s_end = (t_begin + p.split_tiles < ntiles ? t_begin + p.split_tiles : ntiles) * spt;
  }
  const bool side_sums = !BWD || blockIdx.y == 0;
  // float32: six TF32 products per step where a sum is short (S over d, dX over the columns)
  const bool precise_s = D < tile::kPreciseDepth, precise_o = ncols < tile::kPreciseDepth;

  float accS[NTS][4];
  float accO[BWD ? NT_O : 1][4];
#pragma unroll
  for (int i = 0; i < (BWD ? NT_O : 1); ++i) accO[i][0] = accO[i][1] = accO[i][2] = accO[i][3] = 0.f;

  // forward state (lse: running max / sum; pairwise: sum) and backward sums, per row half
  // lse: run_l sums exp(S - run_m) over this thread's terms below the running max, run_k counts
  // its terms equal to it (exact 1s), so that the row's sum is 1 + e with e = (k - 1) + l formed
  // without rounding 1 + tiny (a confident row's cross-entropy, log1p(e), would lose all of a
  // 1e-7 loss to a float32 ulp of 1); pairwise: run_l is the softplus sum
  float run_m[2] = {-INFINITY, -INFINITY}, run_l[2] = {0.f, 0.f}, run_k[2] = {0.f, 0.f};
  float run_x[2] = {0.f, 0.f};  // LSE_TARGET forward: the row's target logit (in one lane of the quad)
  float run_p[2] = {0.f, 0.f}, run_c[2] = {0.f, 0.f};  // LSE_LABELS forward: positives' sum, count
  float run_m0[2] = {-INFINITY, -INFINITY}, run_l0[2] = {0.f, 0.f}, run_k0[2] = {0.f, 0.f};  // kLse2: scale0's
  float rsum[2] = {0.f, 0.f}, rrs[2] = {0.f, 0.f};
  // whole-matrix sums (dscale, dbias) in double: they cancel (MoCo's one query against its
  // queue: float32 partials missed 1e-5 on d temperature, found by the CPU emulator)
  double dscale_part = 0.0, dbias_part = 0.0;
  int ds_e[2] = {0, 0};
  float ds_max[2] = {0.f, 0.f};

  // stage `count` rows from r0 on, features k0 .. k0 + BK, of a (count, D) matrix: the 128-byte
  // swizzle wgmma reads (WG) or mma.sync's padded rows
  auto stage = [&](T* dst, const T* src, int64_t r0, int64_t count, int64_t k0) {
    if constexpr (WG)
      tile::stage_sw128<T, NTHR>(reinterpret_cast<unsigned char*>(dst), src, BM, r0, count, k0, D, vec_ok);
    else
      load_chunk<T, NTHR>(dst, src, r0, count, k0, D, vec_ok);
  };
  auto issue = [&](int64_t s) {
    const int64_t tl = s / spt;
    const int local = static_cast<int>(s % spt);
    const int st = static_cast<int>(s & 1);
    const int64_t col0 = tl * BN;
    if (local < nk) {
      stage(sx[st], X, row0, nrows, static_cast<int64_t>(local) * BK);
      stage(sy[st], Y, col0, ncols, static_cast<int64_t>(local) * BK);
      if (local == 0 && tid < BN) load_side<FAM>(p, TRANS, col0 + tid, ncols, side[tl & 1][tid]);
    } else {
      // dX step: the Y chunk of each warp group (sx is free between the S products)
      const int64_t c = dc0 + static_cast<int64_t>(local - nk) * BK;
      stage(sy[st], Y, col0, ncols, c);
      if (G == 2) stage(sx[st], Y, col0, ncols, c + part);
    }
    tile::cp_async_commit();
  };

  // stores the staged dS element (row rl, column cl): padded rows, or (WG) the 128-byte swizzle,
  // an operand of the dX wgmma (tile::st_operand)
  auto put_ds = [&](int rl, int cl, T v) {
    if constexpr (WG)
      tile::st_operand(&sds[rl * 64 + ((((cl >> 3) ^ (rl & 7))) << 3) + (cl & 7)], v);
    else
      sds[rl * DS_LD + cl] = v;
  };

  auto epilogue = [&](int64_t tl) {
    const int64_t col0 = tl * BN;
    const Side* cs = side[tl & 1];
    float tile_max[2] = {-INFINITY, -INFINITY};
    float vals[NTS][4];
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int cl = (cg * NTS + nt) * 8 + 2 * t + (e & 1);
        const int rl = rw * 16 + g + 8 * h;
        const int64_t c = col0 + cl, r = row0 + rl;
        const Side C = cs[cl];
        const Side I = TRANS ? C : R[h];
        const Side J = TRANS ? R[h] : C;
        const int64_t i = TRANS ? c : r, j = TRANS ? r : c;
        const bool valid = c < ncols && r < nrows;
        const float raw = accS[nt][e];
        // (the rscales first: the TRANS pass computes the same S bit for bit, which LSE_TARGET's
        // backward needs at the targets)
        const float dot = raw * (R[h].rs * C.rs);
        const float x = scale * dot + sbias + I.bias + J.bias;
        bool keep, positive = false;
        const bool same_lab = I.lab == J.lab;
        if (FAM != kPairwise) {
          keep = valid;
          if (mode & 1) keep = keep && (j != i + diag);
          if (mode & 2) keep = keep && (j != I.pos);
          if (mode & 4) keep = keep && !same_lab;
        } else {
          positive = has_labels ? (I.lab == J.lab) : (j == i + diag);
          if (mode & 1) positive = false;
          keep = valid && (!(mode & 2) || positive);
          if (mode & 4) keep = keep && (j != i + diag);
        }
        // LSE_TARGET: the pair (i, t_i) (column pass: (j, j), compute_col being square)
        const bool is_target = LSE && !TWO && (mode & 8) && valid && j == (p.pos_index ? I.pos : i + diag);
        if (!BWD) {
          if (FAM != kPairwise) {
            // A kept -inf logit comes from an infinite input: NaN, not exp(-inf) = 0 (SPEC).
            // Not in the labels forward: there it cost 26-41 registers on sm_80 (a block per
            // SM) and a spill on sm_90 (ptxas 13.0), so supcon's glue checks its inputs.
            if (TWO)  // the product itself (both scales' logits are formed from it below); non-finite: NaN
              vals[nt][e] = keep ? (fabsf(dot) < INFINITY ? dot : NAN) : -INFINITY;
            else if (LSE)
              vals[nt][e] = keep ? (x == -INFINITY ? NAN : x) : -INFINITY;
            else
              vals[nt][e] = keep ? x : -INFINITY;
            tile_max[h] = fmaxf(tile_max[h], vals[nt][e]);
            if (is_target) run_x[h] = x;  // before the masks: a target need not be kept
            if (COLS && is_target) sxt[cl] = x;  // (square, diag_offset 0: column j's target is row j)
            if (FAM == kLseLabels && keep && same_lab) {  // LSE_LABELS: a positive of row i
              run_p[h] += x;
              run_c[h] += 1.f;
            }
          } else if (keep) {
            run_l[h] += positive ? softplus(-x) : softplus(x);
          }
        } else {
          float ds = 0.f, ds1 = 0.f, ds0 = 0.f;  // (kLse2: dS = scale ds1 + scale0 ds0)
          // LSE_TARGET (mask bit 8), the target pair of each side whose output is a cross-entropy
          // (row i: j == pos_index_i or i + diag; column j: i == j - diag): kept, g (p - 1) =
          // g expm1(-ce) (Side::tg; its S is the forward's x by definition, however the other pass
          // rounds its product, and exp(-ce) - 1 in float32 would keep nothing of a 1e-8 loss);
          // masked, the -grad; in float32 before dS is staged.
          if (FAM == kLse && is_target) {
            ds = keep ? I.tg + J.tg : -((I.lse != -INFINITY ? I.g : 0.f) + (J.lse != -INFINITY ? J.g : 0.f));
          } else if (keep) {
            if (TWO) {
              // the row's (I: the q index) p at both scales; S0 = scale0 P as the forward formed it
              if (I.lse != -INFINITY) ds1 = I.g * __expf(x - I.lse);
              if (I.x != -INFINITY) ds0 = I.tg * __expf(scale0 * dot - I.x);
              ds = scale * ds1 + scale0 * ds0;
            } else if (FAM != kPairwise) {
              // exp((S - x) - ce) (LSE_TARGET; LSE_LABELS: x the mean positive logit, lse the output),
              // without targets x = 0: exp(S - lse).  LSE_LABELS, a (kept) same-label pair: -1/|P_i| (read
              // here, at the positives only), in float32 before dS is staged: p - 1/|P|; a row with one
              // positive (1/|P| = 1) has p - 1 = expm1(-output) there (Side::tg), as LSE_TARGET's target
              const float w = (FAM == kLseLabels && same_lab) ? p.label_weight[i] : 0.f;
              if (I.lse != -INFINITY) ds += w == 1.f ? I.tg : I.g * (__expf((x - I.x) - I.lse) - w);
              if (FAM == kLse && J.lse != -INFINITY) ds += J.g * __expf((x - J.x) - J.lse);  // (no column term with labels)
            } else {
              // d term / dx = sigmoid(x) (negative pair) or -sigmoid(-x) (positive pair),
              // each as 1 / (1 + exp(-y)): accurate to the last bits for any y (sigmoid(x) - 1
              // cancels for a large positive logit: 10% off at x ~ 13, found by the emulator).
              ds = (positive ? -I.g : I.g) / (1.f + __expf(positive ? x : -x));
            }
          }
          // Fused pairwise pass (row_out set, unit upstream): also the loss terms.
          if (FAM == kPairwise && !TRANS && side_sums && p.row_out != nullptr && keep)
            run_l[h] += positive ? softplus(-x) : softplus(x);
          if (side_sums) {
            rsum[h] += ds;
            rrs[h] += ds * raw * C.rs;
            if (!TRANS) {
              if (TWO) {  // d scale and d scale0 (in dbias's partials)
                dscale_part += static_cast<double>(ds1 * dot);
                dbias_part += static_cast<double>(ds0 * dot);
              } else {
                dscale_part += static_cast<double>(ds * dot);
                dbias_part += static_cast<double>(ds);
              }
            }
          }
          if (kDsScale)
            vals[nt][e] = ds * C.rs;
          else if (gemm)
            put_ds(rl, cl, tile::from_float<T>(ds * C.rs));
        }
      }
    }
    // One tile of a row's online log-sum-exp (row half h): the tile's max tmax (this thread's), the
    // state (rm, rl, rk) and the tile's logits logit(nt, e) (-inf where masked).
    auto online = [&](int h, float tmax, float(&rm)[2], float(&rl)[2], float(&rk)[2], auto logit) {
      const float new_m = fmaxf(rm[h], quad_max(tmax));
      // Reference point of the sum: 0 while every value seen is -inf (or NaN), so
      // no -inf - -inf appears and a NaN still reaches the sum.
      const float ref = new_m == -INFINITY ? 0.f : new_m;
      float l = rl[h], k = rk[h];
      if (new_m > rm[h]) {  // the max rises: the old terms, maxima included, scale by exp(old - new)
        l = (l + k) * __expf(rm[h] - ref);
        k = 0.f;
      }
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          const float v = logit(nt, e);
          if (v == ref)
            k += 1.f;
          else
            l += __expf(v - ref);
        }
      rl[h] = l;
      rk[h] = k;
      rm[h] = new_m;
    };
    if (!BWD && FAM != kPairwise && !TWO) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        online(h, tile_max[h], run_m, run_l, run_k, [&](int nt, int e) { return vals[nt][e]; });
    }
    if constexpr (TWO && !BWD) {
      // Both scales' states from the kept products in vals (masked: -inf): S = scale P as the other
      // lse kernels form it (scale dot, no bias), S0 = scale0 P; a kept -inf logit NaN.  The tile
      // holds P rather than S so that the product's accumulators are dead here (recomputing S0 from
      // them kept both tiles live: 189 registers, a spill in the split kernel).
      auto state = [&](float sc, float(&rm)[2], float(&rl)[2], float(&rk)[2]) {
        auto logit = [&](int nt, int e) {
          const float v = vals[nt][e];
          if (v == -INFINITY) return -INFINITY;
          const float x = sc * v;
          return x == -INFINITY ? NAN : x;
        };
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float tm = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
            for (int e = 2 * h; e < 2 * h + 2; ++e) tm = fmaxf(tm, logit(nt, e));
          online(h, tm, rm, rl, rk, logit);
        }
      };
      state(scale, run_m, run_l, run_k);
      state(scale0, run_m0, run_l0, run_k0);
    }
    if (COLS) {
      // The tile's column states over the block's 64 rows, in the row state's form: the column
      // max cm, and relative to it the count of exact 1s and the sum of the rest (their own exps:
      // exp(S - row max) would underflow where a column sits far below its rows' maxima).  Each
      // warp's 16 rows by shuffles, the four warps through shared memory in warp order; one
      // thread per column writes the partial state of (this row block, the column), which
      // fold_cols_kernel merges over the row blocks in order.
      float* smax = scol[0];
      float* ssum = scol[1];
      float* scnt = scol[2];
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          float v = fmaxf(vals[nt][e1], vals[nt][2 + e1]);
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
          if (g == 0) smax[rw * BN + nt * 8 + 2 * t + e1] = v;
        }
      __syncthreads();
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int cl = nt * 8 + 2 * t + e1;
          const float cm = fmaxf(fmaxf(smax[cl], smax[BN + cl]), fmaxf(smax[2 * BN + cl], smax[3 * BN + cl]));
          const float ref = cm == -INFINITY ? 0.f : cm;  // (as the rows: no -inf - -inf)
          float l = 0.f, k = 0.f;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float v = vals[nt][2 * h + e1];
            if (v == ref)
              k += 1.f;
            else
              l += __expf(v - ref);
          }
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) {
            l += __shfl_xor_sync(0xffffffffu, l, o);
            k += __shfl_xor_sync(0xffffffffu, k, o);
          }
          if (g == 0) {
            ssum[rw * BN + cl] = l;
            scnt[rw * BN + cl] = k;
          }
        }
      __syncthreads();
      if (tid < BN) {
        const int64_t c = col0 + tid;
        if (c < ncols) {
          const float cm = fmaxf(fmaxf(smax[tid], smax[BN + tid]), fmaxf(smax[2 * BN + tid], smax[3 * BN + tid]));
          const float l = ((ssum[tid] + ssum[BN + tid]) + ssum[2 * BN + tid]) + ssum[3 * BN + tid];
          const float k = ((scnt[tid] + scnt[BN + tid]) + scnt[2 * BN + tid]) + scnt[3 * BN + tid];
          // [4][row blocks of the launch][ncols]: m, l, kc, xt
          float* ws = p.col_part + static_cast<int64_t>(blockIdx.x) * ncols + c;
          const int64_t field = static_cast<int64_t>(gridDim.x) * ncols;
          ws[0] = cm;
          ws[field] = l;
          ws[2 * field] = k;
          ws[3 * field] = sxt[tid];
        }
        sxt[tid] = 0.f;  // (the next tile's epilogue is past the step's barrier)
      }
    }
    if (kDsScale && gemm) {
      // one scale per row for every warp group (the row's staged dS is one A operand): with two
      // groups, each group's max |dS| through shared memory (gemm is uniform over the block)
      float amax[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float a = 0.f;
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) a = fmaxf(a, fmaxf(fabsf(vals[nt][2 * h]), fabsf(vals[nt][2 * h + 1])));
        amax[h] = quad_max(a);
        if (G == 2 && t == 0) sdmax[cg][rw * 16 + g + 8 * h] = amax[h];
      }
      if (G == 2) __syncthreads();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rl = rw * 16 + g + 8 * h;
        const float a = G == 2 ? fmaxf(sdmax[0][rl], sdmax[1][rl]) : amax[h];
        if (a > ds_max[h] && a <= 3.0e38f) {  // the running max grew (finite)
          int ex;
          frexpf(a, &ex);
          const int ne = min(max(15 - ex, -126), 126);  // max |staged dS| in [2^14, 2^15)
          if (ne != ds_e[h]) {
            const float f = pow2(min(max(ne - ds_e[h], -126), 127));
#pragma unroll
            for (int nt = 0; nt < NT_O; ++nt) {
              accO[nt][2 * h] *= f;
              accO[nt][2 * h + 1] *= f;
            }
            ds_e[h] = ne;
          }
          ds_max[h] = a;
        }
        const float mul = pow2(ds_e[h]);
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
          for (int e1 = 0; e1 < 2; ++e1)
            put_ds(rl, (cg * NTS + nt) * 8 + 2 * t + e1, tile::from_float<T>(vals[nt][2 * h + e1] * mul));
      }
    }
  };

  if (s_end > s_begin) issue(s_begin);
  for (int64_t s = s_begin; s < s_end; ++s) {
    if (s + 1 < s_end)
      issue(s + 1);
    else
      tile::cp_async_commit();
    tile::cp_async_wait<1>();
#if CK_WGMMA
    if (WG) tile::fence_proxy_async();  // this thread's staged data, visible to the tensor cores
#endif
    __syncthreads();
    const int local = static_cast<int>(s % spt);
    const int st = static_cast<int>(s & 1);
    if (local < nk) {
      if (local == 0) {
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) accS[nt][0] = accS[nt][1] = accS[nt][2] = accS[nt][3] = 0.f;
      }
      if constexpr (WG) {
#if CK_WGMMA
        // (this warp group's columns: rows NTS * 8 cg .. of the staged Y tile, 128 bytes each)
        tile::wgmma_chunk<BK / 16, T>(reinterpret_cast<float(&)[4 * NTS]>(accS), sx[st],
                                      reinterpret_cast<const unsigned char*>(sy[st]) + (G == 1 ? 0 : cg * NTS * 8 * 128),
                                      local > 0);
#endif  // (elsewhere the kernel trapped at its start)
      } else {
        tile::warp_mma_nt<NTS, BK>(accS, &sx[st][rw * 16 * LDS], LDS, &sy[st][cg * NTS * 8 * LDS], LDS, precise_s);
      }
      if (local == nk - 1) epilogue(s / spt);
    } else if (BWD) {
      const int gi = local - nk;
      const T* ychunk = (G == 1 || cg == 0) ? sy[st] : sx[st];  // this warp group's staged Y chunk
#pragma unroll
      for (int q = 0; q < NG_MAX; ++q)
        if (q == gi) {
          if constexpr (WG) {
#if CK_WGMMA
            tile::wgmma_chunk<BN / 16, T, 1>(reinterpret_cast<float(&)[4 * TPS]>(accO[q * TPS]), sds, ychunk,
                                             true);
#endif
          } else {
            tile::warp_mma_nn<TPS, BN>(&accO[q * TPS], &sds[rw * 16 * DS_LD], DS_LD, ychunk, LDS, precise_o);
          }
        }
    }
    __syncthreads();
  }
  tile::cp_async_wait<0>();

  if (!BWD) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = quad_sum(run_l[h]);
      const float kc = FAM != kPairwise ? quad_sum(run_k[h]) : 0.f;                // (a count: sums exactly)
      const float xt = (FAM != kPairwise && (mode & 8)) ? quad_sum(run_x[h]) : 0.f;  // x + 0 + 0 + 0: exact
      const float ps = FAM == kLseLabels ? quad_sum(run_p[h]) : 0.f;
      const float pc = FAM == kLseLabels ? quad_sum(run_c[h]) : 0.f;
      const float l0 = TWO ? quad_sum(run_l0[h]) : 0.f, kc0 = TWO ? quad_sum(run_k0[h]) : 0.f;
      const int64_t r = row0 + rw * 16 + g + 8 * h;
      if (t == 0 && r < nrows) {
        if (SPLIT) {  // a column split: the partial state, merged by merge_splits_kernel
          float* ws = p.workspace + split_index<BWD>() * nrows + r;
          const int64_t field = split_count<BWD>() * nrows;
          ws[0] = run_m[h];
          ws[field] = l;
          ws[2 * field] = kc;
          ws[3 * field] = TWO ? run_m0[h] : xt;  // (kLse2: the fields of targets and labels hold scale0's state)
          ws[4 * field] = TWO ? l0 : ps;
          ws[5 * field] = TWO ? kc0 : pc;
        } else {
          finish_row<FAM>(p, TRANS, r, nrows, run_m[h], l, kc, xt, ps, pc);
          if (TWO) p.row_out0[r] = run_m0[h] + log_rest(run_m0[h], l0, kc0);
        }
      }
    }
    return;
  }

  if (side_sums) {
    // per-row sums; with two warp groups the second's (columns 32..63 of each tile) through
    // shared memory, added to the first's in that order
    const bool fused_loss = FAM == kPairwise && !TRANS && p.row_out != nullptr;
    float a[2], b[2], l[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      a[h] = quad_sum(rsum[h]);
      b[h] = quad_sum(rrs[h]);
      l[h] = fused_loss ? quad_sum(run_l[h]) : 0.f;
      const int rl = rw * 16 + g + 8 * h;
      if (G == 2 && cg == 1 && t == 0) {
        sred[0][rl] = a[h];
        sred[1][rl] = b[h];
        sred[2][rl] = l[h];
      }
    }
    if (G == 2) __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rl = rw * 16 + g + 8 * h;
      const int64_t r = row0 + rl;
      if (cg == 0 && t == 0 && r < nrows) {
        if (G == 2) {
          a[h] += sred[0][rl];
          b[h] += sred[1][rl];
          l[h] += sred[2][rl];
        }
        if (SPLIT) {  // a column split: partial sums, [3][splits][nrows] (merge_bwd_rows_kernel)
          const int64_t field = split_count<BWD>() * nrows;
          float* ws = p.split_part + split_index<BWD>() * nrows + r;
          ws[0] = a[h];
          ws[field] = b[h];
          ws[2 * field] = l[h];
        } else {  // (finish_row_sums, written out: as a call it cost sm_80 registers)
          if (FAM != kPairwise) {
            if (!TRANS && p.dq_rscale) p.dq_rscale[r] = (TWO ? 1.f : scale) * b[h];
            if (TRANS && p.dk_rscale) p.dk_rscale[r] = (TWO ? 1.f : scale) * b[h];
            if (TRANS && p.dcol_bias) p.dcol_bias[r] = a[h];
          } else if (!TRANS && p.drow_offset) {
            p.drow_offset[r] = a[h];
          }
          if (fused_loss) p.row_out[r] = l[h];
        }
      }
    }
    if (!TRANS) {
      const double ds_total = tile::block_sum_f64<NWARP>(dscale_part, red);
      const double db_total = tile::block_sum_f64<NWARP>(dbias_part, red);
      if (tid == 0) {
        // [2][nsplit][row blocks]: dscale's, then dbias's (reduce_partials_kernel)
        double* ws = reinterpret_cast<double*>(p.workspace);
        const int64_t sp = SPLIT ? split_index<BWD>() : 0, nsp = SPLIT ? split_count<BWD>() : 1;
        ws[sp * gridDim.x + blockIdx.x] = ds_total;
        ws[(nsp + sp) * gridDim.x + blockIdx.x] = db_total;
      }
    }
  }

  if (gemm) {
    T* out = static_cast<T*>(dx_out);
    // SPLIT: this column split's part of dX, float32 [splits][nrows][D] in the workspace
    // (merge_bwd_dx_kernel)
    float* part_out = SPLIT ? p.split_part + (3 * split_count<BWD>() + split_index<BWD>() * D) * nrows : nullptr;
    // this warp group's features: [dc0 + cg part, dc0 + (cg + 1) part), within D
    const int64_t d_end = (dc0 + (cg + 1) * part) < D ? dc0 + (cg + 1) * part : D;
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t r = row0 + rw * 16 + g + 8 * h;
        const int64_t d = dc0 + cg * part + nt * 8 + 2 * t + (e & 1);
        if (r < nrows && d < d_end) {
          float v = (TWO ? 1.f : scale) * R[h].rs * accO[nt][e];
          if (kDsScale) v *= pow2(-ds_e[h]);
          if (SPLIT)
            part_out[r * D + d] = v;
          else if (p.grad_f32)
            static_cast<float*>(dx_out)[r * D + d] = v;
          else
            out[r * D + d] = tile::from_float<T>(v);
        }
      }
    }
  }
}

// One partial state (max ms, sum ls below it, ks exact 1s at it) added to a merged sum relative
// to m, the maximum over every partial merged (ref: m, or 0 where m = -inf): terms below m
// scale down, exact 1s at it add (the tile loop's rule, so a confident row stays exact).
__device__ __forceinline__ void merge_state(float m, float ref, float ms, float ls, float ks, float& l, float& kc) {
  if (ms == m && m != -INFINITY) {
    l += ls;
    kc += ks;
  } else {
    l += (ls + ks) * __expf(ms - ref);
  }
}

// The forward's column splits of each row, combined in split order (thread per row): the
// running maxima as the tile loop combines them (merge_state), the other fields summed; then
// the row's outputs.
template <int FAM>
__global__ void merge_splits_kernel(const FamilyParams p, bool trans, int64_t nrows, int splits) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= nrows) return;
  const float* ws = p.workspace + r;
  const int64_t field = static_cast<int64_t>(splits) * nrows;
  float m = -INFINITY;
  for (int sp = 0; sp < splits; ++sp) m = fmaxf(m, ws[sp * nrows]);
  const float ref = m == -INFINITY ? 0.f : m;
  float l = 0.f, kc = 0.f, xt = 0.f, ps = 0.f, pc = 0.f;
  for (int sp = 0; sp < splits; ++sp) {
    const int64_t o = sp * nrows;
    const float ms = ws[o], ls = ws[field + o], ks = ws[2 * field + o];
    if (FAM == kPairwise)
      l += ls;
    else
      merge_state(m, ref, ms, ls, ks, l, kc);
    xt += ws[3 * field + o];  // (one split holds the target: exact)
    ps += ws[4 * field + o];
    pc += ws[5 * field + o];
  }
  finish_row<FAM>(p, trans, r, nrows, m, l, kc, xt, ps, pc);
  if (FAM == kLse2) {  // fields 3..5: the second scale's state, merged alike
    float m0 = -INFINITY;
    for (int sp = 0; sp < splits; ++sp) m0 = fmaxf(m0, ws[3 * field + sp * nrows]);
    const float ref0 = m0 == -INFINITY ? 0.f : m0;
    float l0 = 0.f, kc0 = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const int64_t o = sp * nrows;
      merge_state(m0, ref0, ws[3 * field + o], ws[4 * field + o], ws[5 * field + o], l0, kc0);
    }
    p.row_out0[r] = m0 + log_rest(m0, l0, kc0);
  }
}

// The fused forward's column partials of one launch (`nb` row blocks, fold order) folded
// into the columns' running state [4][ncols] (m, l, kc, xt; thread per column) by
// merge_state: the running state first, then the row blocks in order.  The last launch's
// fold finishes the columns (col_out).
__global__ void fold_cols_kernel(const FamilyParams p, float* state, int64_t nb, bool first, bool last) {
  const int64_t ncols = p.m;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= ncols) return;
  const float* part = p.col_part + c;
  const int64_t field = nb * ncols;
  float m = first ? -INFINITY : state[c];
  for (int64_t b = 0; b < nb; ++b) m = fmaxf(m, part[b * ncols]);
  const float ref = m == -INFINITY ? 0.f : m;
  float l = 0.f, kc = 0.f, xt = first ? 0.f : state[3 * ncols + c];
  if (!first) merge_state(m, ref, state[c], state[ncols + c], state[2 * ncols + c], l, kc);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t o = b * ncols;
    merge_state(m, ref, part[o], part[field + o], part[2 * field + o], l, kc);
    xt += part[3 * field + o];  // (one row block holds the column's target: exact)
  }
  if (last) {
    finish_row<kLse>(p, true, c, ncols, m, l, kc, xt, 0.f, 0.f);
  } else {
    state[c] = m;
    state[ncols + c] = l;
    state[2 * ncols + c] = kc;
    state[3 * ncols + c] = xt;
  }
}

// The backward's column splits: per-row sums added in split order (thread per row).
template <int FAM>
__global__ void merge_bwd_rows_kernel(const FamilyParams p, bool trans, int64_t nrows, int splits) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= nrows) return;
  const float* ws = p.split_part + r;
  const int64_t field = static_cast<int64_t>(splits) * nrows;
  float a = 0.f, b = 0.f, l = 0.f;
  for (int sp = 0; sp < splits; ++sp) {
    a += ws[sp * nrows];
    b += ws[field + sp * nrows];
    l += ws[2 * field + sp * nrows];
  }
  finish_row_sums<FAM>(p, trans, r, a, b, l);
}

// ... and dX (nrows x D) added in split order, rounded once to the output's type.
template <typename T>
__global__ void merge_bwd_dx_kernel(const float* part, void* out, bool out_f32, int64_t count, int splits) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += part[sp * count + e];
    if (out_f32)
      static_cast<float*>(out)[e] = v;
    else
      static_cast<T*>(out)[e] = tile::from_float<T>(v);
  }
}

// Sum of `count` partials in a fixed order (one block).
__global__ void reduce_partials_kernel(const double* parts, int64_t count, float* out) {
  __shared__ double red[256];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += parts[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<float>(red[0]);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T>
bool vec_ok_for(const FamilyParams& p) {
  constexpr int VEC = 16 / sizeof(T);
  return p.d % VEC == 0 && aligned16(p.q) && aligned16(p.k);
}

int64_t row_blocks(int64_t rows) { return (rows + BM - 1) / BM; }

// Warp groups of the backward (Shape): two where D > 128 (each block then computes dX for 256
// features, halving the S recomputation), one otherwise (one slice covers D either way).
// CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS=1 or 2 forces one shape, for measuring both on a GPU.
int bwd_groups(int64_t d) {
  const char* env = std::getenv("CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS");
  if (env != nullptr && env[0] != '\0') return env[0] == '2' ? 2 : 1;
  return d > DCW ? 2 : 1;
}

// How one pass is launched: the backward's warp groups (Shape) and feature slices (grid.y),
// and the column splits (grid.y forward, grid.z backward; 1 = none).  The row blocks alone
// fill the GPU at large N (N = 32768: 512 blocks); at N = 1024 they are 16 blocks on 132
// SMs.  Where the unsplit blocks are less than one wave at the kernel's occupancy (forward 4
// blocks per SM, register-bound; backward 2 with one warp group, 1 with two), the columns
// are split, into as many splits as still fit in one wave of the split kernel (one warp
// group: 4 blocks per SM forward, 2 backward with 128-feature slices), each split at least
// 2 column tiles, the backward's partial dX within kSplitBudget.  A split costs its partials
// written and read once more and one or two merge launches.
// CONTRASTIVE_KERNELS_CUDA_COL_SPLITS=n forces n splits in every pass (at most one per
// column tile; 1: none), for tests and measurements.
struct Plan {
  int groups = 1;
  int64_t slices = 1, splits = 1;
  int64_t split_tiles = 0;  // column tiles per split (the last may have fewer)
  bool gemm = false;
};
constexpr int64_t kSplitBudget = int64_t{32} << 20;  // bytes of backward split partials

// CONTRASTIVE_KERNELS_CUDA_COL_SPLITS=n: n (a negative n as 0: one split); unset or empty: -1.
int64_t forced_splits() {
  const char* env = std::getenv("CONTRASTIVE_KERNELS_CUDA_COL_SPLITS");
  if (env == nullptr || env[0] == '\0') return -1;
  const int64_t n = std::atoll(env);
  return n < 0 ? 0 : n;
}

// `want` splits of ntiles column tiles, clamped to [1, ntiles] and the grid's 65535, as whole
// tiles per split with no empty split; returns the count.
int64_t set_splits(Plan& pl, int64_t ntiles, int64_t want) {
  want = want < 1 ? 1 : (want > ntiles ? ntiles : want);
  if (want > 65535) want = 65535;
  pl.split_tiles = (ntiles + want - 1) / want;
  pl.splits = (ntiles + pl.split_tiles - 1) / pl.split_tiles;
  return pl.splits;
}

// Whether the backward's kernel for `groups` has 256 dX features per group (kDCW): the wgmma
// kernels (16-bit inputs, FamilyParams::wgmma) with two groups.
bool wide_dx(const FamilyParams& p, int groups) { return groups == 2 && p.wgmma && p.dtype != DType::kFloat32; }

Plan plan_pass(const FamilyParams& p, bool trans, bool bwd) {
  Plan pl;
  const int64_t rows = trans ? p.m : p.n, cols = trans ? p.n : p.m;
  pl.gemm = bwd && (trans ? p.dk : p.dq) != nullptr;
  auto shape = [&](int groups) {
    pl.groups = groups;
    const int64_t dc = static_cast<int64_t>(wide_dx(p, groups) ? 2 * DCW : DCW) * groups;
    pl.slices = pl.gemm && p.d > 0 ? (p.d + dc - 1) / dc : 1;
  };
  shape(pl.gemm ? bwd_groups(p.d) : 1);
  const int64_t ntiles = (cols + BN - 1) / BN;
  if (rows == 0 || ntiles <= 1) return pl;
  int64_t want = forced_splits();
  if (want < 0) {
    const int64_t sms = p.num_sms > 0 ? p.num_sms : 1;
    if (row_blocks(rows) * pl.slices >= (!bwd ? 4 : (pl.groups == 2 ? 1 : 2)) * sms) return pl;  // a wave unsplit
    // split kernels have one warp group (in the backward: 128-feature slices, 2 blocks per SM)
    const int64_t wave = (!bwd ? 4 : 2) * sms, slices1 = pl.gemm && p.d > 0 ? (p.d + DCW - 1) / DCW : 1;
    want = wave / (row_blocks(rows) * slices1);  // the most splits that still fit in one wave
    if (want > ntiles / 2) want = ntiles / 2;
    if (bwd) {
      const int64_t bytes = 4 * rows * ((pl.gemm ? p.d : 0) + 3);  // per split
      if (want > kSplitBudget / bytes) want = kSplitBudget / bytes;
    }
  }
  if (set_splits(pl, ntiles, want) == 1) {
    pl.split_tiles = 0;
    return pl;
  }
  shape(1);
  return pl;
}

// The fused forward (lse with compute_col): one pass over S writes the rows' split states
// and, per (row block, column), the column's partial state over the block's 64 rows; the
// columns are folded over the row blocks in order (fold_cols_kernel), then the rows' splits
// merged (merge_splits_kernel).  Half the product FLOPs of a row pass plus a column pass, for a
// second exp per entry and two block barriers per tile (bench/NOTES.md, "One forward pass").
// The column partials, 16 bytes per (row block, column), are bounded by kColsBudget: past it
// the row blocks run in chunks, one launch and one fold each, the column splits chosen so that
// a launch still fills a wave.  CONTRASTIVE_KERNELS_CUDA_FUSED_COLS=0 keeps the two passes,
// CONTRASTIVE_KERNELS_CUDA_COLS_CHUNK=n forces n row blocks per launch (tests, measurements).
struct ColsPlan {
  int64_t chunk = 0;  // row blocks per launch
  Plan split;         // the column splits (Plan::splits, Plan::split_tiles)
};
constexpr int64_t kColsBudget = int64_t{32} << 20;  // bytes of column partials per launch

bool fused_cols(const FamilyParams& p, bool compute_col) {
  if (!compute_col || (p.mask_mode & 16) || p.n == 0 || p.m == 0) return false;
  const char* env = std::getenv("CONTRASTIVE_KERNELS_CUDA_FUSED_COLS");
  return env == nullptr || env[0] != '0';
}

ColsPlan plan_cols(const FamilyParams& p) {
  ColsPlan cp;
  const int64_t rb = row_blocks(p.n), ntiles = (p.m + BN - 1) / BN;
  cp.chunk = kColsBudget / (16 * p.m);
  const char* env = std::getenv("CONTRASTIVE_KERNELS_CUDA_COLS_CHUNK");
  if (env != nullptr && env[0] != '\0') cp.chunk = std::atoll(env);
  cp.chunk = cp.chunk < 1 ? 1 : (cp.chunk > rb ? rb : cp.chunk);
  int64_t want = forced_splits();
  if (want < 0) {  // as plan_pass: as many splits as fit in one wave of a launch, 2 column tiles or more each
    const int64_t wave = 4 * (p.num_sms > 0 ? p.num_sms : 1);
    want = cp.chunk >= wave ? 1 : wave / cp.chunk;
    if (want > ntiles / 2) want = ntiles / 2;
  }
  set_splits(cp.split, ntiles, want);
  return cp;
}

// floats of the fused forward's workspace: the rows' split states, one launch's column
// partials, the columns' running state
int64_t cols_workspace_floats(const FamilyParams& p, const ColsPlan& cp) {
  return kSplitFields * cp.split.splits * p.n + 4 * cp.chunk * p.m + 4 * p.m;
}

// floats of a backward pass's split partials: [3][splits][rows] per-row sums, [splits][rows][D] dX
int64_t split_part_floats(const FamilyParams& p, bool trans) {
  const Plan pl = plan_pass(p, trans, true);
  const int64_t rows = trans ? p.m : p.n;
  return pl.splits > 1 ? pl.splits * rows * ((pl.gemm ? p.d : 0) + 3) : 0;
}
// floats of the double partials (dscale, dbias) of the row pass, [2][splits][row blocks]
int64_t double_part_floats(const FamilyParams& p, const Plan& row_plan) { return 4 * row_blocks(p.n) * row_plan.splits + 2; }

template <typename T, int FAM, bool TRANS, bool BWD, int G, bool SPLIT, bool WG>
cudaError_t launch_shape(const FamilyParams& p_in, const Plan& pl, cudaStream_t stream) {
  const int64_t rows = TRANS ? p_in.m : p_in.n;
  FamilyParams p = p_in;
  p.split_tiles = pl.split_tiles;
  using SH = Shape<BWD, G>;  // (a name without commas: CK_LAUNCH is a macro)
  const dim3 grid(static_cast<unsigned>(row_blocks(rows)), static_cast<unsigned>(BWD ? pl.slices : pl.splits),
                  static_cast<unsigned>(BWD ? pl.splits : 1));
  CK_LAUNCH(grid, SH::kThreads, 0, stream, family_tile_kernel<T, FAM, TRANS, BWD, G, SPLIT, WG>)(p, vec_ok_for<T>(p));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !SPLIT) return err;
  const int sp = static_cast<int>(pl.splits);
  const unsigned row_grid = static_cast<unsigned>((rows + 255) / 256);
  if (!BWD) {
    CK_LAUNCH(row_grid, 256, 0, stream, merge_splits_kernel<FAM>)(p, TRANS, rows, sp);
    return cudaGetLastError();
  }
  CK_LAUNCH(row_grid, 256, 0, stream, merge_bwd_rows_kernel<FAM>)(p, TRANS, rows, sp);
  if ((err = cudaGetLastError()) != cudaSuccess || !pl.gemm) return err;
  const int64_t count = rows * p.d;
  const int64_t blocks = (count + 255) / 256 < 65536 ? (count + 255) / 256 : 65536;
  CK_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, merge_bwd_dx_kernel<T>)(
      p.split_part + 3 * pl.splits * rows, TRANS ? p.dk : p.dq, p.grad_f32, count, sp);
  return cudaGetLastError();
}

// The wgmma kernel where the binding asks for it (FamilyParams::wgmma: a 9.0 device, an sm_90a
// build, CONTRASTIVE_KERNELS_CUDA_WGMMA=1) and one exists (16-bit inputs), else mma.sync.
template <typename T, int FAM, bool TRANS, bool BWD, int G, bool SPLIT>
cudaError_t launch_pick(const FamilyParams& p, const Plan& pl, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2)
    if (p.wgmma) return launch_shape<T, FAM, TRANS, BWD, G, SPLIT, true>(p, pl, stream);
  return launch_shape<T, FAM, TRANS, BWD, G, SPLIT, false>(p, pl, stream);
}

}  // namespace

// One pass of one family for element type T: the kernel shape plan_pass picks, with its merges.
// External templates, each combination instantiated once (CK_FAMILY_TILES_FWD / _BWD below).
template <typename T, int FAM, bool TRANS, bool BWD>
cudaError_t launch_typed(const FamilyParams& p, cudaStream_t stream) {
  const int64_t rows = TRANS ? p.m : p.n;
  if (rows == 0) return cudaSuccess;
  const Plan pl = plan_pass(p, TRANS, BWD);
  if (pl.splits > 1) return launch_pick<T, FAM, TRANS, BWD, 1, true>(p, pl, stream);
  if (BWD && pl.groups == 2) return launch_pick<T, FAM, TRANS, BWD, BWD ? 2 : 1, false>(p, pl, stream);
  return launch_pick<T, FAM, TRANS, BWD, 1, false>(p, pl, stream);
}

// The fused forward of compute_col (kLseCols launches of rows, each folded into the columns'
// running state; plan_cols).
template <typename T>
cudaError_t launch_fused_cols(const FamilyParams& p_in, cudaStream_t stream) {
  const ColsPlan cp = plan_cols(p_in);
  FamilyParams p = p_in;
  p.split_tiles = cp.split.split_tiles;
  p.col_part = p.workspace + kSplitFields * cp.split.splits * p.n;
  float* state = p.col_part + 4 * cp.chunk * p.m;
  const int64_t rb = row_blocks(p.n);
  const bool vec_ok = vec_ok_for<T>(p);
  cudaError_t err = cudaSuccess;
  for (int64_t b0 = 0; b0 < rb; b0 += cp.chunk) {
    const int64_t nb = rb - b0 < cp.chunk ? rb - b0 : cp.chunk;
    p.row_block0 = b0;
    const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(cp.split.splits), 1);
    using SH = Shape<false, 1>;  // (a name without commas: CK_LAUNCH is a macro)
    bool launched = false;
    if constexpr (sizeof(T) == 2) {  // the wgmma kernel where asked for (launch_pick)
      if (p.wgmma) {
        CK_LAUNCH(grid, SH::kThreads, 0, stream, family_tile_kernel<T, kLseCols, false, false, 1, true, true>)(p, vec_ok);
        launched = true;
      }
    }
    if (!launched)
      CK_LAUNCH(grid, SH::kThreads, 0, stream, family_tile_kernel<T, kLseCols, false, false, 1, true, false>)(p, vec_ok);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    CK_LAUNCH(static_cast<unsigned>((p.m + 255) / 256), 256, 0, stream, fold_cols_kernel)(p, state, nb, b0 == 0,
                                                                                      b0 + nb == rb);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  CK_LAUNCH(static_cast<unsigned>((p.n + 255) / 256), 256, 0, stream, merge_splits_kernel<kLse>)(
      p, false, p.n, static_cast<int>(cp.split.splits));
  return cudaGetLastError();
}

// The combinations the entry points use: PREFIX `extern` declares them (family_tiles.cu), empty
// defines them: the forward of a type in family_tiles_<type>_fwd.cu, the backward of a type and
// family in family_tiles_<type>_bwd_<family>.cu (the float32 backward alone took 125 s of nvcc).
#define CK_FAMILY_TILES_FWD(PREFIX, T)                                                          \
  PREFIX template cudaError_t launch_typed<T, kLse, false, false>(const FamilyParams&, cudaStream_t);       \
  PREFIX template cudaError_t launch_typed<T, kLse, true, false>(const FamilyParams&, cudaStream_t);        \
  PREFIX template cudaError_t launch_typed<T, kLseLabels, false, false>(const FamilyParams&, cudaStream_t); \
  PREFIX template cudaError_t launch_typed<T, kPairwise, false, false>(const FamilyParams&, cudaStream_t);  \
  PREFIX template cudaError_t launch_typed<T, kLse2, false, false>(const FamilyParams&, cudaStream_t);      \
  PREFIX template cudaError_t launch_fused_cols<T>(const FamilyParams&, cudaStream_t);
#define CK_FAMILY_TILES_BWD(PREFIX, T, FAM)                                                        \
  PREFIX template cudaError_t launch_typed<T, FAM, false, true>(const FamilyParams&, cudaStream_t);          \
  PREFIX template cudaError_t launch_typed<T, FAM, true, true>(const FamilyParams&, cudaStream_t);

}  // namespace cuda
}  // namespace ck
