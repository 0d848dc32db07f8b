// Tile building blocks of the C++ CPU kernels: float32 GEMMs on raw row-major
// tiles (through ATen, so the machine's BLAS does the work) and the vectorizable
// elementwise pieces of the log-sum-exp kernels.
//
// The GEMM helpers are meant to be called from inside at::parallel_for: each
// thread multiplies its own tiles, and the BLAS runs single-threaded inside a
// parallel region (no oversubscription).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Function multi-versioning: GCC compiles the hot elementwise loops once per ISA
// (AVX-512, AVX2+FMA, baseline) and picks one at load time, so the extension
// needs no -march flag and still runs on any x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CK_MULTIVERSION
#endif
#define CK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace ck::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline at::Tensor wrap(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// C (m x n, ld n) = A (m x k, ld lda) * B^T, B is (n x k, ld ldb).
inline void gemm_abt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c) {
  at::Tensor ct = wrap(c, m, n, n);
  if (k == 0) {
    ct.zero_();
    return;
  }
  at::mm_out(ct, wrap(a, m, k, lda), wrap(b, n, k, ldb).t());
}

// C (m x n, ld n) += A (m x k, ld k) * B, B is (k x n, ld n).
inline void gemm_acc_ab(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c) {
  if (m == 0 || n == 0 || k == 0) return;
  at::Tensor ct = wrap(c, m, n, n);
  at::addmm_out(ct, ct, wrap(a, m, k, k), wrap(b, k, n, n));
}

// C (m x n, ld n) += A^T * B, A is (k x m, ld m), B is (k x n, ld n).
inline void gemm_acc_atb(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c) {
  if (m == 0 || n == 0 || k == 0) return;
  at::Tensor ct = wrap(c, m, n, n);
  at::addmm_out(ct, ct, wrap(a, k, m, m).t(), wrap(b, k, n, n));
}

// exp(x) in float32, branch-free so that loops over it vectorize: Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r (Cephes
// coefficients, about 1 ulp), and 2^n through the exponent bits.  x < -86 gives 0
// (e^-86 ~ 4e-38: below anything that matters next to the e^0 = 1 term every
// log-sum-exp contains), -inf gives 0, +inf and x > ln(FLT_MAX) give +inf, NaN
// gives NaN.
CK_ALWAYS_INLINE float fast_exp(float x) {
  constexpr float lo = -86.0f, hi = 88.72283935546875f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  fn = fn == fn ? fn : 0.0f;  // NaN: keep the integer conversion defined; r carries the NaN
  float r = xc - fn * 0.693359375f;  // NaN x: r is NaN
  r = r + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^(n-1) * 2 keeps the exponent field in range for n = 128 (x near ln(FLT_MAX)).
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fn) + 126) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  float res = p * pow2 * 2.0f;
  res = x < lo ? 0.0f : res;
  res = x > hi ? kPosInf : res;
  return res;
}

}  // namespace ck::cpu
