// Warp-level matrix-multiply helpers on shared-memory tiles (mma.sync, sm_80+).
//
// A warp owns 16 rows of an output tile and accumulates float32 fragments in the
// m16n8 C layout of mma.sync: lane = 4 g + t holds
//   c[0], c[1]: row g,     cols 2t, 2t+1
//   c[2], c[3]: row g + 8, cols 2t, 2t+1
// bf16 / fp16 tiles use m16n8k16 (one HMMA per 16x8x16 step).  float32 tiles use
// three m16n8k8 TF32 products on a hi/lo split of each operand (x = hi + lo with hi,
// lo TF32-rounded; hi*hi + hi*lo + lo*hi), which keeps float32-level accuracy
// (dropped lo*lo term ~2^-22 relative per product) with tensor cores; plain TF32
// would miss the 1e-5 float32 tolerance.
//
// Tiles in shared memory are row-major with a padded leading dimension chosen so that
// the 32-bit fragment loads below hit 32 distinct banks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

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

__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  uint32_t h, l;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(h) : "f"(x));
  const float r = x - __uint_as_float(h);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(l) : "f"(r));
  hi = h;
  lo = l;
}

// acc += a * b with float32 accuracy from three TF32 products (small terms first).
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

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t pack16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}
template <typename T>
__device__ __forceinline__ uint16_t bits16(const T& x) {
  return *reinterpret_cast<const uint16_t*>(&x);
}

// ------------------------------------------------------------- warp products
// acc[NT][4] += A[16 x K] * B^T where A = a[row * lda + k] (the warp's 16 rows) and
// B = b[n * ldb + k] (8 * NT rows): both operands are "rows of features" (S = Q K^T).
template <int NT, int K>
__device__ __forceinline__ void warp_mma_nt(float (*acc)[4], const float* a, int lda, const float* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 8) {
    float af[4] = {a[g * lda + kk + t], a[(g + 8) * lda + kk + t], a[g * lda + kk + t + 4],
                   a[(g + 8) * lda + kk + t + 4]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float* bp = b + (nt * 8 + g) * ldb + kk + t;
      float bf[2] = {bp[0], bp[4]};
      mma_3xtf32(acc[nt], af, bf);
    }
  }
}

template <int NT, int K, typename H>
__device__ __forceinline__ void warp_mma_nt(float (*acc)[4], const H* a, int lda, const H* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    uint32_t af[4] = {ld32(a + g * lda + kk + 2 * t), ld32(a + (g + 8) * lda + kk + 2 * t),
                      ld32(a + g * lda + kk + 2 * t + 8), ld32(a + (g + 8) * lda + kk + 2 * t + 8)};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const H* bp = b + (nt * 8 + g) * ldb + kk + 2 * t;
      uint32_t bf[2] = {ld32(bp), ld32(bp + 8)};
      mma16816(acc[nt], af, bf, H());
    }
  }
}

// acc[NT][4] += A[16 x K] * B where B = b[k * ldb + n] (K rows of 8 * NT columns):
// the gradient product dQ += dS * K.
template <int NT, int K>
__device__ __forceinline__ void warp_mma_nn(float (*acc)[4], const float* a, int lda, const float* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 8) {
    float af[4] = {a[g * lda + kk + t], a[(g + 8) * lda + kk + t], a[g * lda + kk + t + 4],
                   a[(g + 8) * lda + kk + t + 4]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float bf[2] = {b[(kk + t) * ldb + nt * 8 + g], b[(kk + t + 4) * ldb + nt * 8 + g]};
      mma_3xtf32(acc[nt], af, bf);
    }
  }
}

template <int NT, int K, typename H>
__device__ __forceinline__ void warp_mma_nn(float (*acc)[4], const H* a, int lda, const H* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    uint32_t af[4] = {ld32(a + g * lda + kk + 2 * t), ld32(a + (g + 8) * lda + kk + 2 * t),
                      ld32(a + g * lda + kk + 2 * t + 8), ld32(a + (g + 8) * lda + kk + 2 * t + 8)};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const H* bp = b + (kk + 2 * t) * ldb + nt * 8 + g;
      uint32_t bf[2] = {pack16(bits16(bp[0]), bits16(bp[ldb])),
                        pack16(bits16(bp[8 * ldb]), bits16(bp[9 * ldb]))};
      mma16816(acc[nt], af, bf, H());
    }
  }
}

}  // namespace tile
}  // namespace cuda
}  // namespace ck
