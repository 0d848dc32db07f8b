// A CPU emulator for the subset of CUDA C++ that csrc/cuda/*.cu uses, so that the CUDA
// kernels run (slowly, exactly as written) on a machine without a GPU and are checked
// by the same tests as the other backends.  Built only into the optional extension
// contrastive_kernels._C_cuda_emu (CONTRASTIVE_KERNELS_BUILD_CUDA_EMU=1, see setup.py);
// the .cu sources are compiled as C++ with CK_CUDA_EMU defined and this directory
// first on the include path (its cuda_runtime.h / cuda_fp16.h / cuda_bf16.h land here).
//
// Model.  A launch runs its blocks one after another; the threads of a block are
// cooperative fibers on one OS thread, switched only at __syncthreads and at warp
// collectives (shuffles, mma.sync), so every interleaving the kernel allows between
// barriers is one in which each thread runs alone (what racecheck would flag is not
// detected).  What is emulated faithfully, with the hardware's exact semantics:
//   * __syncthreads: a block-wide barrier; reaching one after a thread of the block
//     returned, or returning while others wait at one, is reported as an error;
//   * __shfl_xor_sync and mma.sync: warp collectives, every lane must take part (error
//     otherwise); mma.sync m16n8k16 (f16 / bf16) and m16n8k8 (tf32) with the fragment
//     layouts of the PTX ISA ("Matrix fragments for mma.m16n8k16 / mma.m16n8k8"),
//     tf32 operands truncated to their 19 significant bits as the tensor core reads
//     them; products summed exactly (double) then rounded, where the hardware's
//     accumulation order is unspecified;
//   * ldmatrix.m8n8 .x1 / .x2 / .x4, plain and .trans: a warp collective with the PTX
//     ISA's row addresses and register layout, reading shared memory at one instant; a row
//     address that is not 16-byte aligned is an error;
//   * cvt.rna.tf32.f32 (round to nearest, ties away), __float2half_rn and
//     __float2bfloat16_rn (round to nearest even), bit casts;
//   * cp.async 16-byte copies are deferred until the thread's cp.async.wait_group lets
//     them complete (the latest moment the hardware may complete them), so a read of a
//     staged tile before its wait, or a wait that leaves the wrong group pending, reads
//     stale data here as it might on a GPU; a source or destination address that is not
//     16-byte aligned (a fault on a GPU: rows of an input at an odd offset) is an error;
//   * wgmma.mma_async m64nNk16 (f16 / bf16, float32 accumulators, both operands from shared
//     memory through matrix descriptors, K-major or MN-major (transposed), every swizzle mode;
//     see "wgmma" below): a
//     warpgroup operation executed at the issuing thread's wgmma.wait_group (the latest
//     moment the hardware may read its operands and write its accumulators), with the
//     descriptors required equal across the warpgroup, a wgmma.fence required before the
//     first wgmma after a wait, and fence.proxy.async required between shared-memory data
//     that cp.async brought, or that a thread stored through tile_wgmma.cuh's st_operand
//     (st.shared; tracked per byte, cleared by that thread's fence), and a wgmma that reads it;
//   * launch limits: block size <= 1024, gridDim.y / z <= 65535 (cudaErrorInvalidConfiguration).
// Not emulated: timing, memory coalescing, bank conflicts, shared-memory capacity,
// data races between threads of a block, __expf's approximation (expf is used).
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Shared memory: one instance per OS thread, shared by the fibers (threads) of the block
// that runs on it.
#define __shared__ static thread_local

// ------------------------------------------------------------------ types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef void* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
typedef __half half;

namespace ck_emu {

struct Thread;
struct Block;

// The running fiber's thread and block (set by the scheduler before each switch).
extern thread_local Thread* g_thread;
extern thread_local Block* g_block;

struct Thread {
  uint3 idx;
  int lane = 0, warp = 0;
  uint64_t collectives = 0;  // warp collectives this thread has taken part in
};

struct Block {
  uint3 idx;
  dim3 dim, grid;
};

// Runtime (ck_cuda_emu_runtime.cpp).
void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* ctx);
void syncthreads();
// Exchange `bytes` bytes of this lane with the other 31 lanes of its warp; returns the
// 32 slots (slot stride kSlot), valid until this lane's next collective.  `kind` names
// the operation (lanes of one warp must call the same one).
constexpr size_t kSlot = 64;
const unsigned char* warp_exchange(const void* mine, size_t bytes, const char* kind);
[[noreturn]] void fail(const std::string& what);
void cp_async16(void* smem, const void* gmem);
void cp_async_commit();
void cp_async_wait(int pending);
cudaError_t take_last_error();
// wgmma (sm_90a), see "wgmma" below.
uint32_t smem_addr(const void* p);
// The shared window as a wgmma reads it: its host base, and per byte 1 + the thread whose
// st.shared store of it is not yet fenced (null: none stored this launch); fetched once per
// operation (thread-local state), read per element.
constexpr uint32_t kSmemWindow = 0x40000;  // bytes of the emulated shared window (smem_addr)
struct SmemView {
  uintptr_t base;
  const uint16_t* unfenced;
};
SmemView smem_view();
[[noreturn]] void fail_unfenced_read(uint32_t addr, uint16_t writer);
void wgmma_fence();
void wgmma_issue(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool accumulate, int kind, bool trans_b);
void wgmma_commit();
void wgmma_wait(int pending);
void fence_proxy_async();
void smem_store(const void* p, size_t bytes);  // a generic-proxy store of wgmma operand data
const char* error_string(cudaError_t err);

// ------------------------------------------------------------------ numbers
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
  // subnormal: man * 2^-24, exact in float
  const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}
inline uint16_t float_to_half_rn(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (a < 0x38800000u) {
    // subnormal half (or zero): value / 2^-24 rounded to nearest even, exact in double
    const double q = static_cast<double>(bits_to_float(a)) * 16777216.0;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(q)));
  }
  const uint32_t exp = (a >> 23) - 112, man = a & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
  return static_cast<uint16_t>(sign | h);
}
inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }
inline uint16_t float_to_bf16_rn(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// cvt.rna.tf32.f32: 10 explicit mantissa bits, round to nearest with ties away from zero.
inline uint32_t cvt_rna_tf32(float x) {
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf / nan unchanged
  return (u + 0x1000u) & 0xffffe000u;
}
// The tensor core reads a .tf32 operand register as its upper 19 bits.
inline double tf32_value(uint32_t r) { return static_cast<double>(bits_to_float(r & 0xffffe000u)); }
// half -> float from a table of half_to_float's own 65536 results (the emulated MMAs decode
// 2 K operands per lane and instruction; the table took a fifth off mma_sync<16>'s time)
inline const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = half_to_float(static_cast<uint16_t>(h));
    return t;
  }();
  return table.data();
}
// A 16-bit MMA operand's value: bfloat16 from its bits, float16 from half_table() (passed in,
// fetched once per instruction).
inline double f16_value(uint16_t h, bool bf16, const float* half_tab) {
  return static_cast<double>(bf16 ? bf16_to_float(h) : half_tab[h]);
}

// ------------------------------------------------------------------ mma.sync
// Fragment layouts (PTX ISA), lane = 4 g + t:
//   m16n8k16 .f16/.bf16: A regs r0..r3 hold (row g, cols 2t, 2t+1), (g+8, 2t..), (g, 2t+8..),
//     (g+8, 2t+8..), lower column in the low half; B regs r0, r1 hold (k = 2t, 2t+1; n = g),
//     (k = 2t+8, 2t+9; n = g); C c0..c3 = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
//   m16n8k8 .tf32: A regs (g, t), (g+8, t), (g, t+4), (g+8, t+4); B regs (k = t, n = g),
//     (k = t+4, n = g); C as above.
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
};

// How an MMA rounds its float32 sum, which the hardware does not document.  Default: the
// products and c added exactly, rounded once to nearest.  CK_EMU_MMA_ROUND=trunc: a
// pessimistic model after the measurements of earlier tensor cores (Fasi, Higham, Mikaitis,
// Pranesh, PeerJ CS 2021): every addend (c and each exact product) aligned to the largest
// one's exponent with the bits below its float32 ulp dropped (toward zero), the sum
// rounded toward zero.  Kernels whose float32 results meet their tolerances under both
// are robust to where the hardware lies between.
inline bool mma_truncates() {
  static const bool on = [] {
    const char* v = std::getenv("CK_EMU_MMA_ROUND");
    return v != nullptr && std::strcmp(v, "trunc") == 0;
  }();
  return on;
}
template <int K>
inline float mma_sum_trunc(float c, const double* prod) {
  double amax = std::fabs(static_cast<double>(c));
  for (int k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(prod[k]));
  double exact = static_cast<double>(c);
  for (int k = 0; k < K; ++k) exact += prod[k];
  if (!(amax > 0.0) || !std::isfinite(amax) || !std::isfinite(exact)) return static_cast<float>(exact);
  int ex;
  std::frexp(amax, &ex);                    // amax in [2^(ex-1), 2^ex)
  const double q = std::ldexp(1.0, ex - 24);  // the float32 ulp of the largest addend
  double s = std::trunc(static_cast<double>(c) / q) * q;
  for (int k = 0; k < K; ++k) s += std::trunc(prod[k] / q) * q;  // exact: multiples of q below 2^30 q
  float f = static_cast<float>(s);
  if (std::fabs(static_cast<double>(f)) > std::fabs(s)) f = std::nextafter(f, 0.0f);
  return f;
}

template <int K>
inline void mma_sync(float* c, const uint32_t* a, const uint32_t* b, int kind /*0 f16, 1 bf16, 2 tf32*/) {
  MmaIn mine;
  for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
  for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
  static const char* const kNames[3] = {"mma.sync.m16n8k16.f16", "mma.sync.m16n8k16.bf16", "mma.sync.m16n8k8.tf32"};
  const unsigned char* slots = warp_exchange(&mine, sizeof(mine), kNames[kind]);
  auto in = [&](int lane) -> const MmaIn& { return *reinterpret_cast<const MmaIn*>(slots + lane * kSlot); };
  const float* h2f = kind == 0 ? half_table() : nullptr;
  auto dec16 = [&](uint32_t r, int hi) -> double {  // the low or high half of register r
    return f16_value(static_cast<uint16_t>(hi ? (r >> 16) : (r & 0xffffu)), kind == 1, h2f);
  };
  auto A = [&](int r, int k) -> double {
    const int g = r & 7, hr = r >> 3;
    if (kind == 2) return tf32_value(in(4 * g + (k & 3)).a[hr + 2 * (k >> 2)]);
    return dec16(in(4 * g + ((k & 7) >> 1)).a[hr + 2 * (k >> 3)], k & 1);
  };
  auto B = [&](int k, int n) -> double {
    if (kind == 2) return tf32_value(in(4 * n + (k & 3)).b[k >> 2]);
    return dec16(in(4 * n + ((k & 7) >> 1)).b[k >> 3], k & 1);
  };
  const int lane = g_thread->lane, g = lane >> 2, t = lane & 3;
  // this lane's two rows of A and two columns of B, decoded once (each is used twice)
  double ar[2][K], bc[2][K];
  for (int k = 0; k < K; ++k) {
    ar[0][k] = A(g, k);
    ar[1][k] = A(g + 8, k);
    bc[0][k] = B(k, 2 * t);
    bc[1][k] = B(k, 2 * t + 1);
  }
  const bool trunc = mma_truncates();
  for (int e = 0; e < 4; ++e) {
    const double* ra = ar[e >> 1];
    const double* cb = bc[e & 1];
    if (trunc) {
      double prod[K];
      for (int k = 0; k < K; ++k) prod[k] = ra[k] * cb[k];
      c[e] = mma_sum_trunc<K>(c[e], prod);
      continue;
    }
    double s = 0.0;
    for (int k = 0; k < K; ++k) s += ra[k] * cb[k];
    c[e] = static_cast<float>(static_cast<double>(c[e]) + s);
  }
}

// ------------------------------------------------------------------ ldmatrix
// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lane 8 m + i gives the address of row i of matrix m (16 bytes,
// 16-byte aligned; lanes past the matrices give none), and lane 4 g + t receives in its
// register m the elements (row g; columns 2t, 2t + 1) of matrix m, or with .trans (rows 2t,
// 2t + 1; column g), the lower one in the low half.  Each lane reads its row before the
// exchange, so the warp sees the shared memory of one instant, as the collective load does.
inline void ldmatrix(uint32_t* r, const void* row, int num, bool trans) {
  struct Row {
    uint16_t e[8];
  } mine{};
  const int lane = g_thread->lane;
  if (lane < 8 * num) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: a row address that is not 16-byte aligned");
    std::memcpy(&mine, row, sizeof(mine));
  }
  static const char* const kNames[2][5] = {{"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
                                           {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  const unsigned char* slots = warp_exchange(&mine, sizeof(mine), kNames[trans][num]);
  const int g = lane >> 2, t = lane & 3;
  for (int m = 0; m < num; ++m) {
    uint32_t v = 0;
    for (int h = 0; h < 2; ++h) {
      const int i = trans ? 2 * t + h : g, c = trans ? g : 2 * t + h;  // (row, column) in matrix m
      uint16_t e;
      std::memcpy(&e, slots + (8 * m + i) * kSlot + 2 * c, 2);
      v |= static_cast<uint32_t>(e) << (16 * h);
    }
    r[m] = v;
  }
}

// ------------------------------------------------------------------ wgmma
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} with both operands in shared memory
// (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"): D (64 x N, float32)
// = A (64 x 16) B (16 x N) + (scale-d ? D : 0), issued by the 128 threads of a warpgroup
// (warps 4 w .. 4 w + 3).  Thread (warp 4 w + v, lane 4 g + t) holds D in d[0 .. N/2): d[i] is
// (row 16 v + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 t + (i & 1)), the m16n8 C fragment
// repeated over N / 8.  Matrix descriptor (64 bits): start address >> 4 in bits 0-13,
// leading-dimension byte offset >> 4 in 16-29, stride-dimension byte offset >> 4 in 32-45,
// base offset in 49-51, swizzle mode in 62-63 (0 none, 1 128-byte, 2 64-byte, 3 32-byte).
// K-major canonical layouts (row r of the 64 rows of A or the N rows of B, element k of the
// 16, 16-byte chunk kc = k / 8): with no swizzle, start + (r / 8) SBO + (r % 8) 16 + kc LBO + 2 (k
// % 8); with a 2^s x 16-byte swizzle (s = 3, 2, 1 for 128, 64, 32 bytes), start + (r / 8) SBO + (r %
// 8) 16 2^s + 16 kc + 2 (k % 8), then address bits 4 .. 3 + s XORed with bits 7 .. 6 + s.
// MN-major (imm-trans = 1: the operand stored with M or N contiguous), the 128-byte swizzle only
// (CuTe's canonical ((T, 8, m), (8, k)) : ((1, T, LBO), (8 T, SBO)), T = 8 16-bit elements):
// element (r, k) at start + 2 (r % 8) + 16 ((r / 8) % 8) + (r / 64) LBO + (k % 8) 128 + (k / 8) SBO,
// then the same XOR.  Not emulated (an error): a nonzero base offset, a transposed operand in
// another swizzle mode, a transposed A (this project's kernels use none of them).
struct WgmmaOp {
  float* d;
  int n;
  uint64_t desc_a, desc_b;
  bool accumulate;
  int kind;  // 0 f16, 1 bf16
  bool trans_b;
};
inline uint32_t wgmma_operand_offset(uint64_t desc, int r, int k, bool mn_major) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fffu) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fffu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fffu) << 4;
  const int mode = static_cast<int>(desc >> 62);
  const uint32_t kk = static_cast<uint32_t>(k), rr = static_cast<uint32_t>(r);
  if (mn_major) {  // (mode 1, wgmma_issue checked)
    const uint32_t addr = start + 2 * (rr & 7) + 16 * ((rr >> 3) & 7) + (rr >> 6) * lbo + (kk & 7) * 128 + (kk >> 3) * sbo;
    return addr ^ (((addr >> 7) & 7u) << 4);
  }
  const uint32_t kc = kk >> 3, e = kk & 7;
  if (mode == 0) return start + (rr >> 3) * sbo + (rr & 7) * 16 + kc * lbo + 2 * e;
  const int s = 4 - mode;  // 1 -> 3 (128 B), 2 -> 2 (64 B), 3 -> 1 (32 B)
  const uint32_t addr = start + (rr >> 3) * sbo + (rr & 7) * (16u << s) + 16 * kc + 2 * e;
  return addr ^ (((addr >> 7) & ((1u << s) - 1)) << 4);
}
inline void wgmma_check_desc(uint64_t desc, const char* which) {
  if (((desc >> 49) & 7u) != 0) fail(std::string("wgmma: descriptor ") + which + " has a base offset (not emulated)");
  const int mode = static_cast<int>(desc >> 62);
  if (mode != 0) {
    const uint32_t start = static_cast<uint32_t>(desc & 0x3fffu) << 4;
    const uint32_t repeat_rows = (1u << (4 - mode)) - 1;  // address bits 7 .. 6 + s of the start
    if (((start >> 7) & repeat_rows) != 0)
      fail(std::string("wgmma: descriptor ") + which +
           " starts inside its swizzle pattern's repeat with base offset 0 (align the tile)");
  }
}
// Executes one operation for the calling thread's accumulators (at its wait_group).
inline void wgmma_execute(const WgmmaOp& op, int warp_in_group, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const bool bf16 = op.kind == 1;
  const float* h2f = half_table();
  const SmemView v = smem_view();
  auto elem = [&](uint64_t desc, int r, int k, bool mn_major) -> double {
    const uint32_t off = wgmma_operand_offset(desc, r, k, mn_major);
    if (off + 2 > kSmemWindow) fail("wgmma: an operand beyond the emulated 256 KB shared window");
    if (v.unfenced != nullptr && (v.unfenced[off] | v.unfenced[off + 1]) != 0)
      fail_unfenced_read(off, v.unfenced[off] != 0 ? v.unfenced[off] : v.unfenced[off + 1]);
    uint16_t h;
    std::memcpy(&h, reinterpret_cast<const void*>(v.base + off), 2);
    return f16_value(h, bf16, h2f);
  };
  for (int i = 0; i < op.n / 2; ++i) {
    const int row = 16 * warp_in_group + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
    double prod[16];
    for (int k = 0; k < 16; ++k) prod[k] = elem(op.desc_a, row, k, false) * elem(op.desc_b, col, k, op.trans_b);
    const float c = op.accumulate ? op.d[i] : 0.f;
    if (mma_truncates()) {
      op.d[i] = mma_sum_trunc<16>(c, prod);
      continue;
    }
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += prod[k];
    op.d[i] = static_cast<float>(static_cast<double>(c) + s);
  }
}

template <typename T>
inline T shfl_xor(T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= kSlot, "shuffle of a large type");
  const unsigned char* slots = warp_exchange(&v, sizeof(T), "__shfl_xor_sync");
  const int lane = g_thread->lane;
  int src = lane ^ lane_mask;
  if (width < 32 && (src / width) != (lane / width)) src = lane;  // outside the segment: own value
  T out;
  std::memcpy(&out, slots + src * kSlot, sizeof(T));
  return out;
}

// ------------------------------------------------------------------ launch
template <typename Kernel>
struct Launch {
  dim3 grid, block;
  Kernel kernel;
  template <typename... Args>
  void operator()(Args... args) const {
    auto call = std::make_tuple(kernel, args...);
    using Call = decltype(call);
    run_grid(grid, block, [](void* ctx) { std::apply([](auto k, auto... a) { k(a...); }, *static_cast<Call*>(ctx)); },
             &call);
  }
};
template <typename Kernel>
inline Launch<Kernel> launch(dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/, Kernel kernel) {
  return Launch<Kernel>{grid, block, kernel};
}

}  // namespace ck_emu

// ------------------------------------------------------------------ built-in variables
#define threadIdx (::ck_emu::g_thread->idx)
#define blockIdx (::ck_emu::g_block->idx)
#define blockDim (::ck_emu::g_block->dim)
#define gridDim (::ck_emu::g_block->grid)
constexpr int warpSize = 32;

// ------------------------------------------------------------------ device functions
inline void __syncthreads() { ::ck_emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu) ::ck_emu::fail("__shfl_xor_sync with a partial mask is not emulated");
  return ::ck_emu::shfl_xor(v, lane_mask, width);
}
inline float __expf(float x) { return std::exp(x); }
inline float __int_as_float(int i) { return ::ck_emu::bits_to_float(static_cast<uint32_t>(i)); }
inline float __uint_as_float(unsigned u) { return ::ck_emu::bits_to_float(u); }
inline float __half2float(__half h) { return ::ck_emu::half_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{::ck_emu::float_to_half_rn(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::ck_emu::bf16_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::ck_emu::float_to_bf16_rn(f)}; }
// CUDA's integer / floating min and max overloads for device code.
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ------------------------------------------------------------------ runtime API
inline cudaError_t cudaGetLastError() { return ::ck_emu::take_last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return ::ck_emu::error_string(err); }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t = nullptr) {
  if (bytes) std::memset(p, v, bytes);
  return cudaSuccess;
}

// kernel<<<grid, block, smem, stream>>>(args) is written CK_LAUNCH(grid, block, smem, stream, kernel)(args)
// in the sources; here it runs the grid on the emulator.
#define CK_LAUNCH(grid, block, smem, stream, ...) ::ck_emu::launch(grid, block, smem, stream, __VA_ARGS__)
