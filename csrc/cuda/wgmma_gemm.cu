// c = a b^T (float32) from wgmma.mma_async tiles: the first kernel of the wgmma path
// (bench/NOTES.md "The wgmma path", tile_wgmma.cuh).  One warpgroup per 64 x 128 block of c,
// m64n128k16 products (64 float32 accumulators per thread), 64-deep chunks of a and b staged by
// cp.async into 128-byte-swizzled K-major tiles, two stages (48 KB of static shared memory):
// the next chunk's copies fly while the tensor cores work on this one.  Edges (rows past m or
// n, depth past k, or k not a multiple of 8 / a base not 16-byte aligned) are element copies
// with zero fill, so every shape is exact.  With b given as (k, n) (b_kn), its chunk is staged
// as 64 k-rows of two 64-column blocks (8 KB apart, the descriptor's leading offset) and read
// N-major (imm-trans-b = 1): the layout of the backward's dX = dS Y.
#include "launchers.h"
#include "tile_wgmma.cuh"

namespace ck {
namespace cuda {
namespace {

constexpr int kBM = 64, kBN = 128, kBK = 64;  // kBK 16-bit elements: one 128-byte swizzled row
static_assert(kBK * 2 == 128 && kBM % 8 == 0 && kBN % 8 == 0, "tiles of whole 8-row, 128-byte swizzle atoms");

// Chunk c of b: K-major, kBN rows of b from n0 (features c kBK ..); N-major (TB), kBK rows of b
// from c kBK, each 64-column block of n0 .. n0 + kBN at its 8 KB.
template <typename T, int TB, int NTHR>
__device__ __forceinline__ void stage_b(unsigned char* tile, const T* B, const WgmmaGemmParams& p, int64_t n0,
                                        int64_t c, bool vec_ok) {
  if (!TB) {
    tile::stage_sw128<T, NTHR>(tile, B, kBN, n0, p.n, c * kBK, p.k, vec_ok);
  } else {
#pragma unroll
    for (int blk = 0; blk < kBN / 64; ++blk)
      tile::stage_sw128<T, NTHR>(tile + blk * kBK * 128, B, kBK, c * kBK, p.k, n0 + 64 * blk, p.n, vec_ok);
  }
}

template <typename T, int TB>
__global__ void __launch_bounds__(128) wgmma_gemm_kernel(const WgmmaGemmParams p, const bool vec_ok) {
#if CK_WGMMA
  __shared__ __align__(1024) unsigned char sa[2][kBM * 128];
  __shared__ __align__(1024) unsigned char sb[2][kBN * 128];
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t chunks = (p.k + kBK - 1) / kBK;
  float d[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) d[i] = 0.f;
  tile::stage_sw128<T, 128>(sa[0], A, kBM, m0, p.m, 0, p.k, vec_ok);
  stage_b<T, TB, 128>(sb[0], B, p, n0, 0, vec_ok);
  tile::cp_async_commit();
  for (int64_t c = 0; c < chunks; ++c) {
    const int st = static_cast<int>(c & 1);
    if (c + 1 < chunks) {
      tile::stage_sw128<T, 128>(sa[st ^ 1], A, kBM, m0, p.m, (c + 1) * kBK, p.k, vec_ok);
      stage_b<T, TB, 128>(sb[st ^ 1], B, p, n0, c + 1, vec_ok);
    }
    tile::cp_async_commit();
    tile::cp_async_wait<1>();  // this chunk's copies have landed
    tile::fence_proxy_async();  // ... and this thread's writes are visible to the tensor cores
    __syncthreads();
    tile::wgmma_chunk<kBK / 16, T, TB>(d, sa[st], sb[st], true, TB ? kBK * 128 : 16);
    __syncthreads();  // every warp's wgmma is done with this stage before it is refilled
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) {
    const int64_t row = m0 + 16 * warp + g + 8 * ((i >> 1) & 1), col = n0 + 8 * (i >> 2) + 2 * t + (i & 1);
    if (row < p.m && col < p.n) p.c[row * p.n + col] = d[i];
  }
#else
  __trap();  // not an sm_90a build: the binding never launches it here
#endif
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T>
cudaError_t launch(const WgmmaGemmParams& p, cudaStream_t stream) {
  // (16-byte copies need both matrices' rows to be whole 16-byte chunks)
  const bool vec_ok = p.k % 8 == 0 && (!p.b_kn || p.n % 8 == 0) && aligned16(p.a) && aligned16(p.b);
  const dim3 grid(static_cast<unsigned>((p.n + kBN - 1) / kBN), static_cast<unsigned>((p.m + kBM - 1) / kBM));
  if (p.b_kn)
    CK_LAUNCH(grid, 128, 0, stream, wgmma_gemm_kernel<T, 1>)(p, vec_ok);
  else
    CK_LAUNCH(grid, 128, 0, stream, wgmma_gemm_kernel<T, 0>)(p, vec_ok);
  return cudaGetLastError();
}

}  // namespace

cudaError_t wgmma_gemm(const WgmmaGemmParams& p, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.m > kWgmmaGemmMaxRows || (p.n + kBN - 1) / kBN > 0x7fffffff)
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ck
