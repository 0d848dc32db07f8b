// Warp-level matrix-multiply helpers on shared-memory tiles (mma.sync, sm_80+).
//
// A warp owns 16 rows of an output tile and accumulates float32 fragments in the
// m16n8 C layout of mma.sync: lane = 4 g + t holds
//   c[0], c[1]: row g,     cols 2t, 2t+1
//   c[2], c[3]: row g + 8, cols 2t, 2t+1
// bf16 / fp16 tiles use m16n8k16 (one HMMA per 16x8x16 step).  float32 tiles use
// three m16n8k8 TF32 products on a hi/lo split of each operand (x = hi + lo with hi,
// lo TF32-rounded; hi*hi + hi*lo + lo*hi), which keeps float32-level accuracy for
// sums of 32 or more products (each product is off by ~2^-22, which a long sum
// averages out); shorter sums (d < 32, or a dX over fewer than 32 columns) take six
// products of a three-way split, each product then as exact as a float32 FMA (an
// emulated MoCo row with d = 5 missed its temperature-gradient bound with three).
// Plain TF32 would miss the 1e-5 float32 tolerance.
//
// Tiles in shared memory are row-major with a padded leading dimension chosen so that
// the 32-bit fragment loads below hit 32 distinct banks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// kernel<<<grid, block, smem, stream>>>(args) is written
// CK_LAUNCH(grid, block, smem, stream, kernel)(args), so that the CPU emulator
// (csrc/cuda/emu, CK_CUDA_EMU) can run the same source.
#ifndef CK_CUDA_EMU
#define CK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace ck {
namespace cuda {
namespace tile {

template <typename T>
struct Cfg;

template <>
struct Cfg<float> {
  static constexpr int BK = 16;      // depth of one staged chunk
  static constexpr int LDS = 20;     // padded row of a staged chunk (80 bytes)
  static constexpr int KSTEP = 8;    // depth of one mma
};
template <>
struct Cfg<__half> {
  static constexpr int BK = 32;
  static constexpr int LDS = 40;  // 80 bytes
  static constexpr int KSTEP = 16;
};
template <>
struct Cfg<__nv_bfloat16> : Cfg<__half> {};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// ------------------------------------------------------------------ cp.async
#ifdef CK_CUDA_EMU  // CPU emulator (csrc/cuda/emu): the same operations, emulated
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) { ::ck_emu::cp_async16(smem, gmem); }
__device__ __forceinline__ void cp_async_commit() { ::ck_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::ck_emu::cp_async_wait(N);
}
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __half) {
  ::ck_emu::mma_sync<16>(c, a, b, 0);
}
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __nv_bfloat16) {
  ::ck_emu::mma_sync<16>(c, a, b, 1);
}
__device__ __forceinline__ void mma1688_tf32(float* c, const uint32_t* a, const uint32_t* b) {
  ::ck_emu::mma_sync<8>(c, a, b, 2);
}
__device__ __forceinline__ uint32_t tf32_rna(float x) { return ::ck_emu::cvt_rna_tf32(x); }
template <int NUM, bool TRANS>
__device__ __forceinline__ void ldsm(uint32_t (&r)[NUM], const void* row) {
  ::ck_emu::ldmatrix(r, row, NUM, TRANS);
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ------------------------------------------------------------------ raw mma
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma1688_tf32(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t tf32_rna(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// ldmatrix.sync.aligned.m8n8.x{2,4}{.trans}.shared.b16: lane 8 m + i gives the address of row
// i of 8 x 8 matrix m (16 bytes, 16-byte aligned); register m of lane 4 g + t receives (row g;
// columns 2t, 2t+1) of matrix m, or with .trans (rows 2t, 2t+1; column g).
template <int NUM, bool TRANS>
__device__ __forceinline__ void ldsm(uint32_t (&r)[NUM], const void* row) {
  static_assert(NUM == 2 || NUM == 4, "ldsm: x2 or x4");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (NUM == 4 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  else if constexpr (NUM == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  else if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}

#endif  // CK_CUDA_EMU

// x = hi + lo (+ error <= 2^-22 |x|), each TF32-rounded.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = tf32_rna(x);
  lo = tf32_rna(x - __uint_as_float(hi));
}
// x = hi + mid + lo (+ error <= 2^-33 |x|), each TF32-rounded.
__device__ __forceinline__ void split3_tf32(float x, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  hi = tf32_rna(x);
  const float r = x - __uint_as_float(hi);
  mid = tf32_rna(r);
  lo = tf32_rna(r - __uint_as_float(mid));
}

// acc += a * b from three TF32 products (small terms first): each product a_k b_k is
// off by up to ~3 * 2^-22 relative (hi*lo, lo*hi rounded, lo*lo dropped), which a
// long sum averages below float32's own rounding (simulated: depth >= 32 matches or
// beats a float32 FMA loop) but a short one does not (depth 5: 0.62 vs 0.34 ulp mean).
__device__ __forceinline__ void mma_3xtf32(float* c, const float* a, const float* b) {
  uint32_t ah[4], al[4], bh[2], bl[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) split_tf32(a[i], ah[i], al[i]);
#pragma unroll
  for (int i = 0; i < 2; ++i) split_tf32(b[i], bh[i], bl[i]);
  mma1688_tf32(c, al, bh);
  mma1688_tf32(c, ah, bl);
  mma1688_tf32(c, ah, bh);
}

// acc += a * b from six TF32 products of a three-way split (every term down to
// 2^-22 relative kept, the 2^-33 ones dropped): each product exact to ~2^-24, as a
// float32 FMA.  Used where the sum is shorter than kPreciseDepth, where it costs
// little (such a product is bound by its epilogue, not the MMAs).
__device__ __forceinline__ void mma_6xtf32(float* c, const float* a, const float* b) {
  uint32_t ah[4], am[4], al[4], bh[2], bm[2], bl[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) split3_tf32(a[i], ah[i], am[i], al[i]);
#pragma unroll
  for (int i = 0; i < 2; ++i) split3_tf32(b[i], bh[i], bm[i], bl[i]);
  mma1688_tf32(c, al, bh);
  mma1688_tf32(c, ah, bl);
  mma1688_tf32(c, am, bm);
  mma1688_tf32(c, am, bh);
  mma1688_tf32(c, ah, bm);
  mma1688_tf32(c, ah, bh);
}

// Float32 products whose summed depth is below this use mma_6xtf32 (a uniform branch).
constexpr int64_t kPreciseDepth = 32;
__device__ __forceinline__ void mma_f32(float* c, const float* a, const float* b, bool precise) {
  if (precise)
    mma_6xtf32(c, a, b);
  else
    mma_3xtf32(c, a, b);
}

// ------------------------------------------------------------- warp products
// acc[NT][4] += A[16 x K] * B^T where A = a[row * lda + k] (the warp's 16 rows) and
// B = b[n * ldb + k] (8 * NT rows): both operands are "rows of features" (S = Q K^T).
template <int NT, int K>
__device__ __forceinline__ void warp_mma_nt(float (*acc)[4], const float* a, int lda, const float* b, int ldb,
                                            bool precise) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 8) {
    float af[4] = {a[g * lda + kk + t], a[(g + 8) * lda + kk + t], a[g * lda + kk + t + 4],
                   a[(g + 8) * lda + kk + t + 4]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float* bp = b + (nt * 8 + g) * ldb + kk + t;
      float bf[2] = {bp[0], bp[4]};
      mma_f32(acc[nt], af, bf, precise);
    }
  }
}

// 16-bit operands come from shared memory through ldmatrix (every row of a tile 16-byte
// aligned: lda, ldb multiples of 8 elements, 16-byte aligned bases; the 80- and 144-byte
// padded rows of the tiles put the 8 rows of each 8 x 8 matrix in distinct banks).  An x4
// load is four 128-byte shared-memory wavefronts for four fragment registers, as four
// 32-bit loads would be, but one instruction; where a fragment's two elements are k-major
// (the B operand of dX += dS Y, the A operand of C = X^T Y) .trans packs them, where two
// 16-bit loads per register took twice the wavefronts (bench/NOTES.md).
//
// The A fragment of m16n8k16 (rows r0..r0+15, depth kk..kk+15) as four 8 x 8 matrices:
// (rows +0, k +0), (rows +8, k +0), (rows +0, k +8), (rows +8, k +8); lane 8 m + i addresses
// row i of matrix m.  Row-major A(r, k) = a[r * lda + k]: plain; k-major a[k * lda + r]: .trans.
template <typename H>
__device__ __forceinline__ const H* a_frag_row(const H* a, int lda, bool kmajor) {
  const int lane = threadIdx.x & 31, i = lane & 7, m = lane >> 3;
  const int r = 8 * (m & 1), k = 8 * (m >> 1);  // matrix m's first row and depth
  return kmajor ? a + (k + i) * lda + r : a + (r + i) * lda + k;
}
// The B fragments of two n-tiles (n0, n0 + 8) at depth kk..kk+15 as four matrices:
// (n +0, k +0), (n +0, k +8), (n +8, k +0), (n +8, k +8), so registers 0, 1 are n-tile n0's
// and 2, 3 n-tile n0 + 8's.  B(k, n) = b[n * ldb + k] (S = Q K^T): plain; b[k * ldb + n]: .trans.
template <typename H>
__device__ __forceinline__ const H* b_frag_row(const H* b, int ldb, bool kmajor) {
  const int lane = threadIdx.x & 31, i = lane & 7, m = lane >> 3;
  const int n = 8 * (m >> 1), k = 8 * (m & 1);  // matrix m's first column and depth
  return kmajor ? b + (k + i) * ldb + n : b + (n + i) * ldb + k;
}

// acc[NT][4] += A B over depth K, 16-bit, A and B addressed as in a_frag_row / b_frag_row.
template <int NT, int K, bool A_KMAJOR, bool B_KMAJOR, typename H>
__device__ __forceinline__ void warp_mma16(float (*acc)[4], const H* a, int lda, const H* b, int ldb) {
  const H* ar = a_frag_row(a, lda, A_KMAJOR);
  const H* br = b_frag_row(b, ldb, B_KMAJOR);
  // steps of 16 in depth and of two n-tiles (16 columns), in elements
  const int a_k = A_KMAJOR ? 16 * lda : 16, b_k = B_KMAJOR ? 16 * ldb : 16, b_n = B_KMAJOR ? 16 : 16 * ldb;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    ldsm<4, A_KMAJOR>(af, ar + kk * a_k);
#pragma unroll
    for (int nt = 0; nt + 1 < NT; nt += 2) {
      uint32_t bf[4];
      ldsm<4, B_KMAJOR>(bf, br + kk * b_k + (nt / 2) * b_n);
      mma16816(acc[nt], af, bf, H());
      mma16816(acc[nt + 1], af, bf + 2, H());
    }
    if (NT % 2) {  // the last n-tile alone: x2 (lanes 0-15 address its two matrices)
      uint32_t bf[2];
      ldsm<2, B_KMAJOR>(bf, br + kk * b_k + (NT / 2) * b_n);
      mma16816(acc[NT - 1], af, bf, H());
    }
  }
}

template <int NT, int K, typename H>
__device__ __forceinline__ void warp_mma_nt(float (*acc)[4], const H* a, int lda, const H* b, int ldb,
                                            bool /*precise: float32 only*/) {
  warp_mma16<NT, K, false, false>(acc, a, lda, b, ldb);
}

// B fragment of the m16n8k8 (float, 3xTF32) / m16n8k16 (16-bit) MMA for columns
// [n0, n0 + 8) at depth kk, where B = b[k * ldb + n] (k-major rows).
__device__ __forceinline__ void b_frag_kmajor(float (&bf)[2], const float* b, int ldb, int kk, int n0, int g, int t) {
  bf[0] = b[(kk + t) * ldb + n0 + g];
  bf[1] = b[(kk + t + 4) * ldb + n0 + g];
}


// acc[NT][4] += A[16 x K] * B where B = b[k * ldb + n] (K rows of 8 * NT columns):
// the gradient product dQ += dS * K.
template <int NT, int K>
__device__ __forceinline__ void warp_mma_nn(float (*acc)[4], const float* a, int lda, const float* b, int ldb,
                                            bool precise) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 8) {
    float af[4] = {a[g * lda + kk + t], a[(g + 8) * lda + kk + t], a[g * lda + kk + t + 4],
                   a[(g + 8) * lda + kk + t + 4]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float bf[2];
      b_frag_kmajor(bf, b, ldb, kk, nt * 8, g, t);
      mma_f32(acc[nt], af, bf, precise);
    }
  }
}

template <int NT, int K, typename H>
__device__ __forceinline__ void warp_mma_nn(float (*acc)[4], const H* a, int lda, const H* b, int ldb,
                                            bool /*precise: float32 only*/) {
  warp_mma16<NT, K, false, true>(acc, a, lda, b, ldb);
}

// acc[NT][4] += A[16 x K] * B where A is stored k-major, A(row, k) = a[k * lda + row]
// (a panel of an (N, D) matrix whose columns are the output rows, as in C = X^T Y), and
// B = b[k * ldb + n] as in warp_mma_nn.  With lda = ldb = 64 + 8 (float: 8t + g; 16-bit:
// 8t + g / 2 words) the fragment loads hit distinct banks.
template <int NT, int K>
__device__ __forceinline__ void warp_mma_tn(float (*acc)[4], const float* a, int lda, const float* b, int ldb,
                                            bool precise) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 8) {
    const float* ap = a + (kk + t) * lda + g;
    float af[4] = {ap[0], ap[8], ap[4 * lda], ap[4 * lda + 8]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float bf[2];
      b_frag_kmajor(bf, b, ldb, kk, nt * 8, g, t);
      mma_f32(acc[nt], af, bf, precise);
    }
  }
}

template <int NT, int K, typename H>
__device__ __forceinline__ void warp_mma_tn(float (*acc)[4], const H* a, int lda, const H* b, int ldb,
                                            bool /*precise: float32 only*/) {
  warp_mma16<NT, K, true, true>(acc, a, lda, b, ldb);
}

}  // namespace tile
}  // namespace cuda
}  // namespace ck

// ------------------------------------------------------------------------------------
// A generic 64 x 64 output tile product for the cross-correlation and similarity
// kernels (csrc/cuda/xcorr.cu, csrc/cuda/similarity.cu):
//   acc(r, c) = sum_k A(r, k) B(k, c)   (float32 accumulation in mma.sync fragments)
// with A either row-major, A(r, k) = a[r * lda + k], or k-major, A(r, k) = a[k * lda + r]
// (columns of an (N, D) matrix as rows: C = X^T Y), and B either k-major,
// B(k, c) = b[k * ldb + c], optionally times a per-k scale applied while staging, or
// row-major, B(k, c) = b[c * ldb + k].  Indices r, c, k are relative to the pointers
// (the host offsets them).  A and B may be stored in different types: both are staged
// into shared memory in the math type MT (float: 3xTF32, 16-bit: HMMA), converted
// element by element where the types differ, with 16-byte cp.async copies where they
// agree and rows are 16-byte aligned.  A block has 4 warps, each owning 16 rows x 64
// columns; chunks of Cfg<MT>::BK depth are double-buffered.
//
// Epilogues (each output entry written by exactly one thread; no atomics):
//   kEpiStore:   out[r * ldo_r + c * ldo_c] = OT(alpha * r_scale[r] * c_scale[c] * acc)
//                (alpha, r_scale, c_scale optional, 1 when absent);
//   kEpiSumSq:   per block, sum over the tile's entries with r - c != diag_shift of acc^2
//                (double) -> partials[column tile * gridDim.x + blockIdx.x]; with
//                `symmetric` blocks below the diagonal write 0 and those above count twice;
//   kEpiDotG:    per block, sum over the tile's entries of G(r, c) r_scale[r] c_scale[c] acc
//                (double) -> partials as kEpiSumSq, with G = ((const OT*) out)[r * ldo_r + c * ldo_c]
//                (the similarity's dscale = sum G . (a_hat b_hat^T) from exact operands);
//   kEpiXcorrG:  G = grad_diag[r] on r - c == diag_shift, 2 * grad_offdiag * acc elsewhere,
//                stored as OT at out[r * ldo_r + c * ldo_c].
namespace ck {
namespace cuda {
namespace tile {
namespace {  // internal linkage: each .cu has its own instantiations

constexpr int kGemmTile = 64;
constexpr int kGemmThreads = 128;
constexpr int kKLd = kGemmTile + 8;  // padded row of a k-major staged chunk

enum GemmEpi : int { kEpiStore = 0, kEpiSumSq = 1, kEpiXcorrG = 2, kEpiDotG = 3 };

struct GemmParams {
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  const float* b_kscale = nullptr;  // k-major B only
  int64_t rows = 0, cols = 0, depth = 0;
  // kEpiStore / kEpiXcorrG
  void* out = nullptr;
  int64_t ldo_r = 0, ldo_c = 1;
  const float* alpha = nullptr;  // device scalar
  const float* r_scale = nullptr;
  const float* c_scale = nullptr;
  // kEpiSumSq / kEpiDotG / kEpiXcorrG
  int64_t diag_shift = 0;
  double* partials = nullptr;
  bool symmetric = false;
  const float* grad_offdiag = nullptr;  // device scalar
  const float* grad_diag = nullptr;     // indexed by the (relative) row
  int64_t tile_y0 = 0;  // first column tile of this launch (launch_gemm64 splits gridDim.y <= 65535)
};

// Stage ROWS x COLS entries of a row-major (ld) matrix, from (r0, c0) on, into sm (row
// stride LD) as Dst; entries past (nrows, ncols) are zero; rows times rscale[row] if given.
template <typename Src, typename Dst, int ROWS, int COLS, int LD>
__device__ __forceinline__ void stage_tile(Dst* sm, const Src* g, int64_t ld, int64_t r0, int64_t nrows, int64_t c0,
                                           int64_t ncols, const float* rscale, bool vec_ok) {
  constexpr int VEC = 16 / sizeof(Dst);
  constexpr int VPR = COLS / VEC;
  static_assert(COLS % VEC == 0, "a staged row is a whole number of 16-byte vectors");
  constexpr bool kSame = std::is_same<Src, Dst>::value;
  for (int v = threadIdx.x; v < ROWS * VPR; v += kGemmThreads) {
    const int r = v / VPR, cv = (v % VPR) * VEC;
    const int64_t gr = r0 + r, gc = c0 + cv;
    Dst* dst = sm + r * LD + cv;
    if (kSame && vec_ok && rscale == nullptr && gr < nrows && gc + VEC <= ncols) {
      cp_async16(dst, g + gr * ld + gc);
    } else {
      const bool row_ok = gr < nrows;
      const float s = (rscale != nullptr && row_ok) ? rscale[gr] : 1.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        dst[e] = (row_ok && gc + e < ncols) ? from_float<Dst>(s * to_float(g[gr * ld + gc + e])) : from_float<Dst>(0.f);
    }
  }
}

// Sum of one double per thread over a block of kWarps warps, in a fixed order (red: kWarps
// doubles of shared memory).
template <int kWarps = kGemmThreads / 32>
__device__ __forceinline__ double block_sum_f64(double v, double* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[w];
  return s;
}

// Blocks per SM a 16-bit product asks for on sm_90: 8 (64 registers), which every one of them
// held before the ldmatrix loads (session 11) and keeps with them without spills; left alone
// ptxas 13.0 gave the k-major ones (xcorr's X^T Y) 67 registers, 7 blocks.  On sm_80 the same
// bound spilled 64 bytes in the X^T Y kernels with the sum-of-squares epilogue (kEpiSumSq), so
// none there: those two hold 71 registers, 7 blocks (64, 8 before).
template <typename MT>
constexpr int gemm_min_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return sizeof(MT) == 2 ? 8 : 0;
#else
  return 0;
#endif
}

template <typename TA, typename TB, typename MT, bool A_KMAJOR, bool B_KMAJOR, int EPI, typename OT>
__global__ void __launch_bounds__(kGemmThreads, (gemm_min_blocks<MT>())) gemm64_kernel(const GemmParams p, const bool vec_a, const bool vec_b) {
  static_assert(!A_KMAJOR || B_KMAJOR, "a k-major A goes with a k-major B");
  constexpr int BK = Cfg<MT>::BK, LDS = Cfg<MT>::LDS;
  constexpr int A_ELEMS = A_KMAJOR ? BK * kKLd : kGemmTile * LDS;
  constexpr int B_ELEMS = B_KMAJOR ? BK * kKLd : kGemmTile * LDS;
  constexpr int NT = kGemmTile / 8;
  __shared__ __align__(16) MT sa[2][A_ELEMS];
  __shared__ __align__(16) MT sb[2][B_ELEMS];
  __shared__ double red[kGemmThreads / 32];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t ty = p.tile_y0 + blockIdx.y;  // column tile
  if (EPI == kEpiSumSq && p.symmetric && ty < blockIdx.x) {
    if (tid == 0) p.partials[ty * gridDim.x + blockIdx.x] = 0.0;
    return;  // the mirror tile above the diagonal counts this one
  }
  const TA* A = static_cast<const TA*>(p.a);
  const TB* B = static_cast<const TB*>(p.b);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGemmTile;
  const int64_t c0 = ty * kGemmTile;
  const int64_t nsteps = (p.depth + BK - 1) / BK;

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  const bool precise = p.depth < kPreciseDepth;

  auto issue = [&](int64_t s) {
    const int st = static_cast<int>(s & 1);
    const int64_t k0 = s * BK;
    if (A_KMAJOR)
      stage_tile<TA, MT, BK, kGemmTile, kKLd>(sa[st], A, p.lda, k0, p.depth, r0, p.rows, nullptr, vec_a);
    else
      stage_tile<TA, MT, kGemmTile, BK, LDS>(sa[st], A, p.lda, r0, p.rows, k0, p.depth, nullptr, vec_a);
    if (B_KMAJOR)
      stage_tile<TB, MT, BK, kGemmTile, kKLd>(sb[st], B, p.ldb, k0, p.depth, c0, p.cols, p.b_kscale, vec_b);
    else
      stage_tile<TB, MT, kGemmTile, BK, LDS>(sb[st], B, p.ldb, c0, p.cols, k0, p.depth, nullptr, vec_b);
    cp_async_commit();
  };

  if (nsteps > 0) issue(0);
  for (int64_t s = 0; s < nsteps; ++s) {
    if (s + 1 < nsteps)
      issue(s + 1);
    else
      cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int st = static_cast<int>(s & 1);
    if (A_KMAJOR)
      warp_mma_tn<NT, BK>(acc, &sa[st][warp * 16], kKLd, sb[st], kKLd, precise);
    else if (B_KMAJOR)
      warp_mma_nn<NT, BK>(acc, &sa[st][warp * 16 * LDS], LDS, sb[st], kKLd, precise);
    else
      warp_mma_nt<NT, BK>(acc, &sa[st][warp * 16 * LDS], LDS, sb[st], LDS, precise);
    __syncthreads();
  }
  cp_async_wait<0>();

  if (EPI == kEpiSumSq) {
    // float32 squares per fragment (4 entries), accumulated in double from there on
    // (tile-local indices: rl, cl in [0, 64); the diagonal is rl - cl == shift)
    const int64_t rows_left = p.rows - r0, cols_left = p.cols - c0;
    const int64_t shift = p.diag_shift - (r0 - c0);
    double s = 0.0;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float q = 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rl = warp * 16 + g + 8 * (e >> 1), cl = nt * 8 + 2 * t + (e & 1);
        if (rl < rows_left && cl < cols_left && rl - cl != shift) q += acc[nt][e] * acc[nt][e];
      }
      s += static_cast<double>(q);
    }
    const double total = block_sum_f64(s, red);
    if (tid == 0) {
      const bool twice = p.symmetric && ty != blockIdx.x;
      p.partials[ty * gridDim.x + blockIdx.x] = twice ? 2.0 * total : total;
    }
    return;
  }

  OT* out = static_cast<OT*>(p.out);  // kEpiDotG: G, read
  float alpha = 1.f;
  if (EPI == kEpiStore && p.alpha != nullptr) alpha = *p.alpha;
  if (EPI == kEpiXcorrG) alpha = 2.f * *p.grad_offdiag;
  double dot = 0.0;  // kEpiDotG
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = r0 + warp * 16 + g + 8 * h;
    if (r >= p.rows) continue;
    const float rs = (EPI != kEpiXcorrG && p.r_scale != nullptr) ? p.r_scale[r] : 1.f;
    const float gd = EPI == kEpiXcorrG ? p.grad_diag[r] : 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const int64_t c = c0 + nt * 8 + 2 * t + e1;
        if (c >= p.cols) continue;
        const float v = acc[nt][2 * h + e1];
        if (EPI == kEpiDotG) {
          const float cs = p.c_scale != nullptr ? p.c_scale[c] : 1.f;
          dot += static_cast<double>(to_float(out[r * p.ldo_r + c * p.ldo_c])) * static_cast<double>(rs * cs * v);
          continue;
        }
        float o;
        if (EPI == kEpiXcorrG) {
          o = (r - c == p.diag_shift) ? gd : alpha * v;
        } else {
          const float cs = p.c_scale != nullptr ? p.c_scale[c] : 1.f;
          o = alpha * rs * cs * v;
        }
        out[r * p.ldo_r + c * p.ldo_c] = from_float<OT>(o);
      }
    }
  }
  if (EPI == kEpiDotG) {
    const double total = block_sum_f64(dot, red);
    if (tid == 0) p.partials[ty * gridDim.x + blockIdx.x] = total;
  }
}

bool gemm_aligned16(const void* ptr, int64_t ld, int elem_bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0 && (ld * elem_bytes) % 16 == 0;
}

// Launch one tile product over a grid of ceil(rows / 64) x ceil(cols / 64) blocks (in
// launches of at most 65535 column tiles: gridDim.y's limit).
template <typename TA, typename TB, typename MT, bool A_KMAJOR, bool B_KMAJOR, int EPI, typename OT>
cudaError_t launch_gemm64(const GemmParams& p, cudaStream_t stream) {
  const int64_t gx = (p.rows + kGemmTile - 1) / kGemmTile, gy = (p.cols + kGemmTile - 1) / kGemmTile;
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const bool vec_a = gemm_aligned16(p.a, p.lda, sizeof(TA));
  const bool vec_b = gemm_aligned16(p.b, p.ldb, sizeof(TB));
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t y0 = 0; y0 < gy; y0 += kMaxGridY) {
    GemmParams q = p;
    q.tile_y0 = y0;
    const int64_t ny = (gy - y0) < kMaxGridY ? (gy - y0) : kMaxGridY;
    CK_LAUNCH(dim3(static_cast<unsigned>(gx), static_cast<unsigned>(ny)), kGemmThreads, 0, stream,
              gemm64_kernel<TA, TB, MT, A_KMAJOR, B_KMAJOR, EPI, OT>)(q, vec_a, vec_b);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace tile
}  // namespace cuda
}  // namespace ck
