// CUDA kernels of the cross-correlation family (Barlow Twins, VICReg; contract in
// csrc/op_schemas.h, math and precision choices in csrc/cpu/xcorr.cpp).
//
// a, b: (N, D); C = a^T b.  offdiag = sum_{d != e} C_de^2, diag = C_dd.  Backward with
// g = grad_offdiag, G_de = 2 g C_de (d != e), G_dd = grad_diag_d: da = b G^T, db = a G.
//
// Hand-written here (all deterministic: every output written by one thread, partials
// summed in a fixed order, no float atomics; int64 indices):
//   * diag: C_dd in float64 (exact products of the inputs, fixed-order sums over row
//     chunks of N, then over the chunks) -> diag (float32) and diag64 (both paths);
//   * tiled forward: 64 x 64 tiles of C by tensor-core MMA over N from smem-staged
//     column panels of a and b (tile::gemm64_kernel with a k-major A: tile = X^T Y); the
//     epilogue squares the tile, masks the diagonal, and reduces it in double to one
//     partial per tile, summed in a fixed order by one block.  C is never stored.  a is b
//     (VICReg): only tiles on and above the diagonal, those above counted twice;
//   * tiled backward: for a panel of P rows of G (P = xcorr_panel_cols(D), the panel
//     P x D <= 16 MiB), the G tiles are recomputed from C tiles (epilogue: G_de =
//     2 g C_de, G_dd = grad_diag_d) and stored once in the panel workspace, then
//     da[:, panel] = b G_panel^T (a tiled GEMM over e, one thread per output entry); db
//     the same from column panels of G (db[:, panel] = a G[:, panel]).  Each C tile is
//     computed once per needed gradient.  The G panel is stored in bfloat16 for
//     bfloat16 inputs (same range as float32; G then meets b in a bf16 HMMA) and in
//     float32 otherwise (float16's range could not hold 2 g C; float16 inputs meet the
//     float32 G in a 3xTF32 product after conversion while staging);
//   * Gram path: the reductions <Ga, Gb> and sum_d C_dd^2 in float64 and the clamped
//     difference (xcorr_gram_offdiag).
// Done by the binding with cuBLAS (at::mm) on the Gram path: the float64 Gram matrices
// Ga = a a^T, Gb = b b^T (N x N, smaller than the inputs where that path is picked) and
// the Gram-path gradient da = 2 g Gb a + b (grad_diag - 2 g C_dd) in float64 column
// chunks (csrc/cuda/bindings.cpp).  float64 because <Ga, Gb> - sum C_dd^2 cancels when
// the off-diagonal mass is small next to the diagonal one (CPU file).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "launchers.h"
#include "tile_mma.cuh"

namespace ck {
namespace cuda {
namespace {

using tile::GemmParams;

constexpr int64_t kDiagMinRows = 256;   // rows of N per diag chunk, at least
constexpr int64_t kDiagMaxChunks = 64;  // diag chunks at most (workspace chunks x D doubles)
constexpr int64_t kPanelElems = int64_t(1) << 22;  // G panel: at most 4 Mi entries (16 MiB float32)
constexpr int64_t kGramPerBlock = int64_t(1) << 14;
constexpr int64_t kGramMaxParts = 1024;
constexpr int kReduceThreads = 256;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t diag_chunks(int64_t n) {
  const int64_t c = cdiv(n, kDiagMinRows);
  return c < 1 ? 1 : (c > kDiagMaxChunks ? kDiagMaxChunks : c);
}

// ------------------------------------------------------------------------- diag
// parts[chunk * d + col] = sum over the chunk's rows of a_{n,col} b_{n,col} (float64).
// Block (32, 8): 32 columns, 8 row phases summed in a fixed order.
template <typename T>
__global__ void diag_partials_kernel(const T* a, const T* b, int64_t n, int64_t d, int64_t rows_per_chunk,
                                     double* parts) {
  __shared__ double red[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t n1 = (n0 + rows_per_chunk) < n ? (n0 + rows_per_chunk) : n;
  double s = 0.0;
  if (col < d)
    for (int64_t i = n0 + threadIdx.y; i < n1; i += 8)
      s += static_cast<double>(tile::to_float(a[i * d + col])) * static_cast<double>(tile::to_float(b[i * d + col]));
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    double tot = 0.0;
#pragma unroll
    for (int y = 0; y < 8; ++y) tot += red[y][threadIdx.x];
    parts[static_cast<int64_t>(blockIdx.y) * d + col] = tot;
  }
}

__global__ void diag_finalize_kernel(const double* parts, int64_t chunks, int64_t d, double* diag64, float* diag) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= d) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += parts[c * d + col];
  diag64[col] = s;
  if (diag != nullptr) diag[col] = static_cast<float>(s);
}

// Sum over one block of kReduceThreads of one double per thread, fixed order; every
// thread gets the total.
__device__ double block_reduce_f64(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  const double total = red[0];
  __syncthreads();
  return total;
}

// offdiag = max(sum(parts) - sum(diag64^2), 0) (diag64 may be nullptr: no subtraction).
// A sum of squares is negative only by rounding; NaN passes through (NaN < 0 is false).
__global__ void offdiag_finalize_kernel(const double* parts, int64_t count, const double* diag64, int64_t d,
                                        float* offdiag) {
  __shared__ double red[kReduceThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) s += parts[i];
  const double full = block_reduce_f64(s, red);
  double q = 0.0;
  if (diag64 != nullptr)
    for (int64_t i = threadIdx.x; i < d; i += kReduceThreads) q += diag64[i] * diag64[i];
  const double dsq = block_reduce_f64(q, red);
  if (threadIdx.x == 0) {
    const double off = full - dsq;
    *offdiag = static_cast<float>(off < 0.0 ? 0.0 : off);
  }
}

// parts[blk] = sum over [blk * per_block, (blk + 1) * per_block) of x_i y_i (float64).
__global__ void dot_partials_kernel(const double* x, const double* y, int64_t count, int64_t per_block,
                                    double* parts) {
  __shared__ double red[kReduceThreads];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t hi = (lo + per_block) < count ? (lo + per_block) : count;
  double s = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kReduceThreads) s += x[i] * y[i];
  const double total = block_reduce_f64(s, red);
  if (threadIdx.x == 0) parts[blockIdx.x] = total;
}

int64_t gram_per_block(int64_t count) {
  const int64_t per = cdiv(count, kGramMaxParts);
  return per > kGramPerBlock ? per : kGramPerBlock;
}

// -------------------------------------------------------------- typed launchers
// The G panel's storage (and the math type of the panel product): see the header.
template <typename T>
struct PanelType {
  using type = float;
};
template <>
struct PanelType<__nv_bfloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
cudaError_t diag_typed(const XcorrParams& p, cudaStream_t stream) {
  const int64_t chunks = diag_chunks(p.n);
  const int64_t rows_per_chunk = p.n > 0 ? cdiv(p.n, chunks) : 1;
  const dim3 grid(static_cast<unsigned>(cdiv(p.d, 32)), static_cast<unsigned>(chunks));
  CK_LAUNCH(grid, dim3(32, 8), 0, stream, diag_partials_kernel<T>)(static_cast<const T*>(p.a), static_cast<const T*>(p.b),
                                                           p.n, p.d, rows_per_chunk, p.workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  CK_LAUNCH(static_cast<unsigned>(cdiv(p.d, 256)), 256, 0, stream, diag_finalize_kernel)(p.workspace, chunks, p.d, p.diag64,
                                                                                   p.diag);
  return cudaGetLastError();
}

template <typename T>
cudaError_t tiled_forward_typed(const XcorrParams& p, cudaStream_t stream) {
  GemmParams g;
  g.a = p.a;  // A(r = d, k = n) = a[n * D + d]: k-major
  g.lda = p.d;
  g.b = p.b;  // B(k = n, c = e) = b[n * D + e]
  g.ldb = p.d;
  g.rows = p.d;
  g.cols = p.d;
  g.depth = p.n;
  g.diag_shift = 0;
  g.partials = p.workspace;
  g.symmetric = p.same;
  cudaError_t err = tile::launch_gemm64<T, T, T, true, true, tile::kEpiSumSq, float>(g, stream);
  if (err != cudaSuccess) return err;
  const int64_t tiles = cdiv(p.d, tile::kGemmTile) * cdiv(p.d, tile::kGemmTile);
  CK_LAUNCH(1, kReduceThreads, 0, stream, offdiag_finalize_kernel)(p.workspace, tiles, nullptr, 0, p.offdiag);
  return cudaGetLastError();
}

// One gradient through panels of G.  Row panels (for da = b G^T): G rows d in
// [lo, lo + w) stored transposed, W[e * P + (d - lo)], then da[:, lo:lo+w] = b W.
// Column panels (for db = a G): G columns e in [lo, lo + w) stored as W[d * P + (e - lo)],
// then db[:, lo:lo+w] = a W.  Either way the panel product is "X (N x D) times a
// k-major panel (D x w)", X = b for da, a for db.
template <typename T>
cudaError_t tiled_grad_typed(const XcorrParams& p, bool for_da, void* out_v, cudaStream_t stream) {
  using W = typename PanelType<T>::type;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* out = static_cast<T*>(out_v);
  W* panel = static_cast<W*>(p.gpanel);
  const int64_t D = p.d, P = xcorr_panel_cols(D);
  cudaError_t err = cudaSuccess;
  for (int64_t lo = 0; lo < D; lo += P) {
    const int64_t w = (D - lo) < P ? (D - lo) : P;
    GemmParams g;  // the G panel from recomputed C tiles
    g.lda = D;
    g.ldb = D;
    g.depth = p.n;
    g.out = panel;
    g.grad_offdiag = p.grad_offdiag;
    if (for_da) {  // rows d in [lo, lo + w), all columns e
      g.a = a + lo;
      g.b = b;
      g.rows = w;
      g.cols = D;
      g.ldo_r = 1;
      g.ldo_c = P;
      g.diag_shift = -lo;  // d = r + lo == e = c
      g.grad_diag = p.grad_diag + lo;
    } else {  // all rows d, columns e in [lo, lo + w)
      g.a = a;
      g.b = b + lo;
      g.rows = D;
      g.cols = w;
      g.ldo_r = P;
      g.ldo_c = 1;
      g.diag_shift = lo;  // d = r == e = c + lo
      g.grad_diag = p.grad_diag;
    }
    err = tile::launch_gemm64<T, T, T, true, true, tile::kEpiXcorrG, W>(g, stream);
    if (err != cudaSuccess) return err;

    GemmParams x;  // out[:, lo:lo+w] = X (N x D) panel (D x w, k-major, row stride P)
    x.a = for_da ? b : a;
    x.lda = D;
    x.b = panel;
    x.ldb = P;
    x.rows = p.n;
    x.cols = w;
    x.depth = D;
    x.out = out + lo;
    x.ldo_r = D;
    x.ldo_c = 1;
    err = tile::launch_gemm64<T, W, W, false, true, tile::kEpiStore, T>(x, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t tiled_backward_typed(const XcorrParams& p, cudaStream_t stream) {
  if (p.same) {
    // C and G symmetric: da = a G^T = a G = db; computed once into whichever is wanted
    // (the binding copies it when both are).
    void* out = p.da != nullptr ? p.da : p.db;
    return out != nullptr ? tiled_grad_typed<T>(p, true, out, stream) : cudaSuccess;
  }
  cudaError_t err = cudaSuccess;
  if (p.da != nullptr && (err = tiled_grad_typed<T>(p, true, p.da, stream)) != cudaSuccess) return err;
  if (p.db != nullptr && (err = tiled_grad_typed<T>(p, false, p.db, stream)) != cudaSuccess) return err;
  return cudaSuccess;
}

template <template <typename> class F>
struct ByDtype {
  template <typename... Args>
  static cudaError_t run(DType dt, Args&&... args) {
    switch (dt) {
      case DType::kFloat32: return F<float>::run(args...);
      case DType::kFloat16: return F<__half>::run(args...);
      case DType::kBFloat16: return F<__nv_bfloat16>::run(args...);
    }
    return cudaErrorInvalidValue;
  }
};

template <typename T>
struct DiagOp {
  static cudaError_t run(const XcorrParams& p, cudaStream_t s) { return diag_typed<T>(p, s); }
};
template <typename T>
struct TiledForwardOp {
  static cudaError_t run(const XcorrParams& p, cudaStream_t s) { return tiled_forward_typed<T>(p, s); }
};
template <typename T>
struct TiledBackwardOp {
  static cudaError_t run(const XcorrParams& p, cudaStream_t s) { return tiled_backward_typed<T>(p, s); }
};

}  // namespace

int64_t xcorr_diag_workspace_doubles(int64_t n, int64_t d) { return diag_chunks(n) * (d > 0 ? d : 1); }

cudaError_t xcorr_diag(const XcorrParams& p, cudaStream_t stream) {
  if (p.d == 0) return cudaSuccess;
  return ByDtype<DiagOp>::run(p.dtype, p, stream);
}

int64_t xcorr_tiled_workspace_doubles(int64_t d) {
  const int64_t t = cdiv(d, tile::kGemmTile);
  return t > 0 ? t * t : 1;
}

cudaError_t xcorr_tiled_forward(const XcorrParams& p, cudaStream_t stream) {
  if (p.d == 0) {
    CK_LAUNCH(1, kReduceThreads, 0, stream, offdiag_finalize_kernel)(p.workspace, 0, nullptr, 0, p.offdiag);
    return cudaGetLastError();
  }
  return ByDtype<TiledForwardOp>::run(p.dtype, p, stream);
}

int64_t xcorr_gram_workspace_doubles(int64_t count) {
  const int64_t parts = cdiv(count, gram_per_block(count));
  return parts > 0 ? parts : 1;
}

cudaError_t xcorr_gram_offdiag(const double* ga, const double* gb, int64_t count, const double* diag64, int64_t d,
                               double* workspace, float* offdiag, cudaStream_t stream) {
  const int64_t per = gram_per_block(count);
  const int64_t parts = cdiv(count, per);
  if (parts > 0) {
    CK_LAUNCH(static_cast<unsigned>(parts), kReduceThreads, 0, stream, dot_partials_kernel)(ga, gb, count, per, workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  CK_LAUNCH(1, kReduceThreads, 0, stream, offdiag_finalize_kernel)(workspace, parts, diag64, d, offdiag);
  return cudaGetLastError();
}

// The G panel's entries at most: kPanelElems, or CONTRASTIVE_KERNELS_XCORR_PANEL_ELEMS=n (tests: several
// panels at a small D; measurements).
int64_t panel_elems() {
  const char* env = std::getenv("CONTRASTIVE_KERNELS_XCORR_PANEL_ELEMS");
  if (env == nullptr || env[0] == '\0') return kPanelElems;
  const long long n = std::atoll(env);
  return n > 0 ? static_cast<int64_t>(n) : kPanelElems;
}

int64_t xcorr_panel_cols(int64_t d) {
  const int64_t t = tile::kGemmTile;
  const int64_t full = cdiv(d > 0 ? d : 1, t) * t;  // every row of G in one panel
  int64_t fit = (panel_elems() / (d > 0 ? d : 1)) / t * t;
  if (fit < t) fit = t;
  return fit < full ? fit : full;
}

int64_t xcorr_panel_bytes(int64_t d, DType dtype) {
  const int64_t elem = dtype == DType::kBFloat16 ? 2 : 4;
  return xcorr_panel_cols(d) * (d > 0 ? d : 1) * elem;
}

cudaError_t xcorr_tiled_backward(const XcorrParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.d == 0) return cudaSuccess;
  return ByDtype<TiledBackwardOp>::run(p.dtype, p, stream);
}

}  // namespace cuda
}  // namespace ck
