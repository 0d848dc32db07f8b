// CUDA kernels of the fused normalized similarity (contract in csrc/op_schemas.h, formulas
// in csrc/cpu/similarity.cpp): out = scale * a_hat b_hat^T, a_hat = a / max(|a|, 1e-12)
// when normalize.  The output is N x M by definition; nothing else of that size is made.
//
//   * row norms: one warp per row, float32 sum of squares in a fixed shuffle order;
//     |x| and r = 1 / max(|x|, 1e-12) per row (a NaN norm stays NaN);
//   * forward: 64 x 64 tiles of a b^T by tensor-core MMA (tile::gemm64_kernel, both
//     operands row-major); the epilogue applies scale * r_a,i * r_b,j and writes the
//     tile in the output dtype, so normalized copies of the inputs are never made;
//   * backward, with G the incoming gradient (N x M, input dtype):
//       U = G b_hat (N x D), V = G^T a_hat (M x D): tile products reading G from global
//       memory (G^T as a k-major operand for V), b_hat / a_hat formed while staging
//       (x times its row's r, rounded to the input dtype for 16-bit inputs, as the
//       log-sum-exp backward stages dS), float32 results in (N + M) x D workspaces;
//       a per-row epilogue (one warp per row, fixed shuffle order):
//         p_i     = a_hat_i . U_i
//         da_i    = scale r_i (U_i - a_hat_i p_i)   (|a_i| >= 1e-12)
//                 = scale r_i U_i                   (|a_i| <  1e-12: the clamp is constant)
//                 = scale U_i                       (no normalization)
//       and dscale = sum_i p_i from per-row partials summed in a fixed order by one block
//       (float32 inputs); db from V the same way.  16-bit inputs: dscale = sum G . (a_hat
//       b_hat^T) from one more tile product of the exact inputs, r_a r_b applied in float32
//       in the epilogue, double per-tile partials (the sum cancels: U's 16-bit b_hat
//       missed 2e-2 on bf16, found by the CPU emulator; the Triton backend recomputes it in
//       float32 for the same reason).  Deterministic; no float atomics; int64 indices.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "tile_mma.cuh"

namespace ck {
namespace cuda {
namespace {

using tile::GemmParams;

constexpr float kNormEps = 1e-12f;
constexpr int kRowWarps = 4;  // rows per block of the per-row kernels (one warp each)
constexpr int kReduceThreads = 256;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 1 / max(n, eps); NaN stays NaN (NaN < eps is false).
__device__ __forceinline__ float inv_clamped(float n) { return 1.f / (n < kNormEps ? kNormEps : n); }

template <typename T>
__global__ void row_norm_kernel(const T* x, int64_t rows, int64_t d, float* norm, float* rnorm) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * d;
  float ss = 0.f;
  for (int64_t k = lane; k < d; k += 32) {
    const float v = tile::to_float(xr[k]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) {
    const float n = sqrtf(ss);
    norm[row] = n;
    rnorm[row] = inv_clamped(n);
  }
}

// dx (optional) and parts (optional) of the rows of x from W = U (or V); see the header.
template <typename T>
__global__ void row_epilogue_kernel(const T* x, const float* w, const float* norm, const float* rnorm, int64_t rows,
                                    int64_t d, const float* scale, T* dx, float* parts) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * d;
  const float* wr = w + row * d;
  const float r = rnorm != nullptr ? rnorm[row] : 1.f;
  float p = 0.f;
  for (int64_t k = lane; k < d; k += 32) p += (r * tile::to_float(xr[k])) * wr[k];
  p = warp_sum(p);
  if (parts != nullptr && lane == 0) parts[row] = p;
  if (dx == nullptr) return;
  // The projection applies when normalizing rows with |x| >= eps (NaN norms included).
  const float pp = (norm != nullptr && !(norm[row] < kNormEps)) ? p : 0.f;
  const float sr = *scale * r;
  T* dr = dx + row * d;
  for (int64_t k = lane; k < d; k += 32) dr[k] = tile::from_float<T>(sr * (wr[k] - (r * tile::to_float(xr[k])) * pp));
}

// *out = sum of parts[0..count) in a fixed order (double accumulation), one block.
template <typename P>
__global__ void sum_parts_kernel(const P* parts, int64_t count, float* out) {
  __shared__ double red[kReduceThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) s += parts[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<float>(red[0]);
}

template <typename T>
cudaError_t norms_typed(const SimilarityParams& p, cudaStream_t stream) {
  if (!p.normalize) return cudaSuccess;
  if (p.n > 0) {
    CK_LAUNCH(static_cast<unsigned>(cdiv(p.n, kRowWarps)), kRowWarps * 32, 0, stream, row_norm_kernel<T>)(
        static_cast<const T*>(p.a), p.n, p.d, p.a_norm, p.a_rnorm);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.m > 0) {
    CK_LAUNCH(static_cast<unsigned>(cdiv(p.m, kRowWarps)), kRowWarps * 32, 0, stream, row_norm_kernel<T>)(
        static_cast<const T*>(p.b), p.m, p.d, p.b_norm, p.b_rnorm);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

// A rows x cols product over `depth` with leading dimensions lda, ldb (layouts: the
// launch's template flags) into a row-major out (ldo_r, unit column stride).
GemmParams product(const void* a, int64_t lda, const void* b, int64_t ldb, int64_t rows, int64_t cols,
                   int64_t depth, void* out, int64_t ldo_r) {
  GemmParams g;
  g.a = a;
  g.lda = lda;
  g.b = b;
  g.ldb = ldb;
  g.rows = rows;
  g.cols = cols;
  g.depth = depth;
  g.out = out;
  g.ldo_r = ldo_r;
  g.ldo_c = 1;
  return g;
}

// The product a b^T (A(i, k) = a[i * D + k], B(k, j) = b[j * D + k]: both row-major,
// operands exact) with the epilogue's r_a, r_b scales; `out` (N x M, row-major) is
// written (forward) or read (the G-dot epilogue).
GemmParams ab_product(const SimilarityParams& p, void* out) {
  GemmParams g = product(p.a, p.d, p.b, p.d, p.n, p.m, p.d, out, p.m);
  g.r_scale = p.normalize ? p.a_rnorm : nullptr;
  g.c_scale = p.normalize ? p.b_rnorm : nullptr;
  return g;
}

template <typename T>
struct Forward {
  static cudaError_t run(const SimilarityParams& p, cudaStream_t stream) {
    cudaError_t err = norms_typed<T>(p, stream);
    if (err != cudaSuccess) return err;
    GemmParams g = ab_product(p, p.out);
    g.alpha = p.scale;
    return tile::launch_gemm64<T, T, T, false, false, tile::kEpiStore, T>(g, stream);
  }
};

template <typename T>
struct Backward {
  static cudaError_t run(const SimilarityParams& p, cudaStream_t stream) {
    cudaError_t err = norms_typed<T>(p, stream);
    if (err != cudaSuccess) return err;
    const float* ra = p.normalize ? p.a_rnorm : nullptr;
    const float* rb = p.normalize ? p.b_rnorm : nullptr;
    const float* na = p.normalize ? p.a_norm : nullptr;
    const float* nb = p.normalize ? p.b_norm : nullptr;
    const unsigned threads = kRowWarps * 32;
    // row_parts without u: D = 0 (an empty u has no data pointer); the epilogue then
    // writes zero partials (no product is launched for zero columns).
    if (p.u != nullptr || p.row_parts != nullptr) {
      // U(i, d) = sum_j G(i, j) rb_j b(j, d): G row-major, b k-major
      GemmParams g = product(p.grad, p.m, p.b, p.d, p.n, p.d, p.m, p.u, p.d);
      g.b_kscale = rb;
      err = tile::launch_gemm64<T, T, T, false, true, tile::kEpiStore, float>(g, stream);
      if (err != cudaSuccess) return err;
      if (p.n > 0 && (p.da != nullptr || p.row_parts != nullptr)) {
        CK_LAUNCH(static_cast<unsigned>(cdiv(p.n, kRowWarps)), threads, 0, stream, row_epilogue_kernel<T>)(
            static_cast<const T*>(p.a), p.u, na, ra, p.n, p.d, p.scale, static_cast<T*>(p.da), p.row_parts);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
    }
    if (p.dscale != nullptr && p.dot_parts != nullptr) {
      GemmParams g = ab_product(p, const_cast<void*>(p.grad));  // per-tile sums of G . a_hat b_hat^T
      g.partials = p.dot_parts;
      err = tile::launch_gemm64<T, T, T, false, false, tile::kEpiDotG, T>(g, stream);
      if (err != cudaSuccess) return err;
      CK_LAUNCH(1, kReduceThreads, 0, stream, sum_parts_kernel<double>)(p.dot_parts, similarity_dot_parts(p.n, p.m),
                                                                         p.dscale);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    } else if (p.dscale != nullptr) {
      CK_LAUNCH(1, kReduceThreads, 0, stream, sum_parts_kernel<float>)(p.row_parts, p.n, p.dscale);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (p.v != nullptr) {
      // V(j, d) = sum_i G(i, j) ra_i a(i, d): G^T is a k-major A, a k-major
      GemmParams g = product(p.grad, p.m, p.a, p.d, p.m, p.d, p.n, p.v, p.d);
      g.b_kscale = ra;
      err = tile::launch_gemm64<T, T, T, true, true, tile::kEpiStore, float>(g, stream);
      if (err != cudaSuccess) return err;
      if (p.m > 0 && p.db != nullptr) {
        CK_LAUNCH(static_cast<unsigned>(cdiv(p.m, kRowWarps)), threads, 0, stream, row_epilogue_kernel<T>)(
            static_cast<const T*>(p.b), p.v, nb, rb, p.m, p.d, p.scale, static_cast<T*>(p.db), nullptr);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
    }
    return cudaSuccess;
  }
};

template <template <typename> class F>
cudaError_t by_dtype(const SimilarityParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return F<float>::run(p, stream);
    case DType::kFloat16: return F<__half>::run(p, stream);
    case DType::kBFloat16: return F<__nv_bfloat16>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t similarity_dot_parts(int64_t n, int64_t m) {
  return cdiv(n, tile::kGemmTile) * cdiv(m, tile::kGemmTile);
}

cudaError_t similarity_forward(const SimilarityParams& p, cudaStream_t stream) {
  return by_dtype<Forward>(p, stream);
}

cudaError_t similarity_backward(const SimilarityParams& p, cudaStream_t stream) {
  return by_dtype<Backward>(p, stream);
}

}  // namespace cuda
}  // namespace ck
