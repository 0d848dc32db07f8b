// Warpgroup matrix multiply (wgmma.mma_async, sm_90a) on shared-memory tiles: the helpers of
// the wgmma path (bench/NOTES.md "The wgmma path").
//
// A warpgroup (4 consecutive warps, 128 threads, the first warp's index a multiple of 4)
// computes D (64 x N, float32 in registers) += A (64 x 16) B^T, B being N x 16, both 16-bit
// operands read by the tensor cores from shared memory through 64-bit matrix descriptors: no
// per-warp register copy of the operands (the mma.sync kernels' ceiling, bench/NOTES.md
// "Shared-memory wavefronts per MMA").  Thread (warp 4 w + v, lane 4 g + t) holds D in d[0 .. N/2):
// d[i] is (row 16 v + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 t + (i & 1)), the m16n8 C
// fragment of tile_mma.cuh repeated over N / 8 (so the mma.sync kernels' epilogues carry over).
//
// Staged tiles are K-major with the 128-byte swizzle: a tile row is 64 16-bit elements (128
// bytes), rows 128 bytes apart, the 16-byte chunk c of row r stored at chunk c ^ (r % 8), each
// 8-row group 1024 bytes (the descriptor's stride-dimension offset), the tile 1024-byte aligned.
// The k16 step s of a 64-deep tile is the descriptor of the tile's start + 32 s bytes: the
// hardware applies the swizzle to the address bits (bits 4-6 XOR bits 7-9), which is why the
// tile must be aligned to the swizzle's 1024-byte repeat.  The same staging serves a B stored
// N-major (B^T row-major, as dX = dS Y reads Y): tile rows are then K, 64 N-elements each, read
// with imm-trans-b = 1; the 8-row groups (1024 bytes) are K's, a k16 step is 16 rows (2048
// bytes), and 64-element blocks of N lie the descriptor's leading offset apart.
//
// Ordering (PTX ISA): wgmma_fence() before the first wgmma of a batch (after the accumulators
// were last touched), wgmma_commit() after the batch, wgmma_wait<P>() before the accumulators
// or the operand tiles are touched again; shared-memory data written through the generic proxy
// (cp.async, st.shared) needs fence_proxy_async() by the writing threads and a barrier before a
// wgmma reads it.  The CPU emulator (csrc/cuda/emu) executes wgmma at the issuing thread's wait
// and reports a missing fence of either kind (cp.async data; st.shared data stored through
// st_operand), descriptors that differ across the warpgroup, and a tile not aligned to its
// swizzle pattern.
#pragma once

#include "tile_mma.cuh"

// CK_WGMMA: whether this compilation pass has wgmma (the sm_90a pass, or the emulator).
#if defined(CK_CUDA_EMU) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define CK_WGMMA 1
#else
#define CK_WGMMA 0
#endif

namespace ck {
namespace cuda {
namespace tile {

// Byte offset of 16-byte chunk c (0-7) of row r in a 128-byte-swizzled K-major tile.
__device__ __forceinline__ int sw128_offset(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Descriptor of a 128-byte-swizzled operand starting at shared address `addr`: 8-row groups
// (rows of 128 bytes) 1024 bytes apart, swizzle mode 1.  K-major, the rows are the M / N index and
// the leading-dimension offset is unused (16 bytes by convention).  MN-major (the operand
// transposed, imm-trans 1: rows are the K index, 64 M / N elements each), the 8-row groups are
// K's, and `lbo` is the byte distance between 64-element column blocks of M / N (where N > 64).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo = 16) {
  return static_cast<uint64_t>((addr & 0x3ffffu) >> 4) | (static_cast<uint64_t>((lbo & 0x3ffffu) >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// A generic-proxy store (st.shared) of data a wgmma will read: the writing thread's
// fence_proxy_async() and a barrier must come between it and the wgmma.  The CPU emulator holds
// the stored bytes unreadable by wgmma until that thread's fence (a missing fence is an error
// there; on the GPU, stale operands).  Every st.shared of operand data goes through here.
template <typename T>
__device__ __forceinline__ void st_operand(T* p, T v) {
  *p = v;
#ifdef CK_CUDA_EMU
  ::ck_emu::smem_store(p, sizeof(T));
#endif
}

// Stage `rows` rows x 64 features of a (count, k) row-major 16-bit matrix, from row r0 and
// feature k0 on, into a 128-byte-swizzled tile (NTHR threads); rows or features past the end are
// zero.  16-byte cp.async copies where vec_ok (k a multiple of 8, 16-byte aligned base), else
// element copies: either way the writes are the generic proxy's (fence_proxy_async before a
// wgmma reads them).
template <typename T, int NTHR>
__device__ __forceinline__ void stage_sw128(unsigned char* tile, const T* g, int rows, int64_t r0, int64_t count,
                                            int64_t k0, int64_t k, bool vec_ok) {
  static_assert(sizeof(T) == 2, "128-byte rows of 64 16-bit elements");
  for (int v = threadIdx.x; v < rows * 8; v += NTHR) {
    const int r = v >> 3, c = v & 7;
    const int64_t gr = r0 + r, gc = k0 + 8 * c;
    T* dst = reinterpret_cast<T*>(tile + sw128_offset(r, c));
    if (vec_ok && gr < count && gc + 8 <= k) {
      cp_async16(dst, g + gr * k + gc);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) st_operand(dst + e, (gr < count && gc + e < k) ? g[gr * k + gc + e] : from_float<T>(0.f));
    }
  }
}

#ifdef CK_CUDA_EMU
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return ::ck_emu::smem_addr(p); }
__device__ __forceinline__ void wgmma_fence() { ::ck_emu::wgmma_fence(); }
__device__ __forceinline__ void wgmma_commit() { ::ck_emu::wgmma_commit(); }
template <int P>
__device__ __forceinline__ void wgmma_wait() {
  ::ck_emu::wgmma_wait(P);
}
__device__ __forceinline__ void fence_proxy_async() { ::ck_emu::fence_proxy_async(); }
template <int R>
__device__ __forceinline__ void fence_operands(float (&)[R]) {}
template <int TB = 0, int R, typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[R], uint64_t da, uint64_t db, int acc, T) {
  ::ck_emu::wgmma_issue(d, 2 * R, da, db, acc != 0, std::is_same<T, __nv_bfloat16>::value ? 1 : 0, TB != 0);
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#if CK_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int P>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(P) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma
// (its registers are written at the wait, which the compiler does not see).
template <int R>
__device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// wgmma_ss<TB>(d, desc_a, desc_b, acc, T{}): d (64 x 2R) = A B^T + (acc ? d : 0), m64n{2R}k16,
// both operands in shared memory, A K-major, B K-major (TB = 0) or N-major (TB = 1: B^T stored,
// 16 x 2R with N contiguous), no negation.  The declaration takes TB first so that the macros
// below define its specializations.
template <int TB = 0, int R, typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[R], uint64_t da, uint64_t db, int acc, T);
#define CK_WGMMA_SS_N32(TY, CT, TB)                                                                                \
  template <>                                                                                                      \
  __device__ __forceinline__ void wgmma_ss<TB>(float (&d)[16], uint64_t da, uint64_t db, int acc, CT) {            \
    asm volatile(                                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                               \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {"                                               \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"                                     \
        "}, %16, %17, p, 1, 1, 0, " #TB ";\n}\n"                                                                   \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])     \
        : "l"(da), "l"(db), "r"(acc));                                                                             \
  }

#define CK_WGMMA_SS_N64(TY, CT, TB)                                                                                    \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_ss<TB>(float (&d)[32], uint64_t da, uint64_t db, int acc, CT) {                \
    asm volatile(                                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                               \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                                               \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                    \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                           \
        "}, %32, %33, p, 1, 1, 0, " #TB ";\n}\n"                                                                         \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),    \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])   \
        : "l"(da), "l"(db), "r"(acc));                                                                             \
  }

#define CK_WGMMA_SS_N128(TY, CT, TB)                                                                                   \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_ss<TB>(float (&d)[64], uint64_t da, uint64_t db, int acc, CT) {                \
    asm volatile(                                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                                              \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                    \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                          \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                          \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                           \
        "}, %64, %65, p, 1, 1, 0, " #TB ";\n}\n"                                                                         \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),    \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])   \
        : "l"(da), "l"(db), "r"(acc));                                                                             \
  }

#define CK_WGMMA_SS_N256(TY, CT, TB)                                                                                           \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_ss<TB>(float (&d)[128], uint64_t da, uint64_t db, int acc, CT) {                       \
    asm volatile(                                                                                                          \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                                      \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"                                                      \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                            \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                                  \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                                  \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"                                  \
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"                                  \
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"                                  \
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"                      \
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"                   \
        "}, %128, %129, p, 1, 1, 0, " #TB ";\n}\n"                                                                               \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                  \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),            \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),          \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),          \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),          \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),          \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),          \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),          \
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),          \
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),          \
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),          \
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),          \
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),      \
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),  \
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),  \
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])   \
        : "l"(da), "l"(db), "r"(acc));                                                                                     \
  }
CK_WGMMA_SS_N32("f16", __half, 0)
CK_WGMMA_SS_N32("bf16", __nv_bfloat16, 0)
CK_WGMMA_SS_N32("f16", __half, 1)
CK_WGMMA_SS_N32("bf16", __nv_bfloat16, 1)
CK_WGMMA_SS_N64("f16", __half, 0)
CK_WGMMA_SS_N64("bf16", __nv_bfloat16, 0)
CK_WGMMA_SS_N64("f16", __half, 1)
CK_WGMMA_SS_N64("bf16", __nv_bfloat16, 1)
CK_WGMMA_SS_N128("f16", __half, 0)
CK_WGMMA_SS_N128("bf16", __nv_bfloat16, 0)
CK_WGMMA_SS_N128("f16", __half, 1)
CK_WGMMA_SS_N128("bf16", __nv_bfloat16, 1)
CK_WGMMA_SS_N256("f16", __half, 0)
CK_WGMMA_SS_N256("bf16", __nv_bfloat16, 0)
#undef CK_WGMMA_SS_N32
#undef CK_WGMMA_SS_N64
#undef CK_WGMMA_SS_N128
#undef CK_WGMMA_SS_N256
#endif  // CK_WGMMA
#endif  // CK_CUDA_EMU

#if CK_WGMMA
// d (64 x 2R) (+)= A B^T over one staged chunk: A (64 rows) a 128-byte-swizzled K-major tile of
// KSTEPS x 16 features at sa; B at sb, K-major (TB = 0: 2R rows of the same features, the k16
// step s at sb + 32 s) or N-major (TB = 1: KSTEPS x 16 rows of 64 N-elements, the k16 step s at
// sb + 2048 s, N-blocks of 64 `b_lbo` bytes apart); d is overwritten by the first product unless
// `accumulate`.  The threads that wrote the tiles must have fenced their writes
// (fence_proxy_async) before the barrier that precedes this; it returns with the products
// complete (wait_group 0).
template <int KSTEPS, typename T, int TB = 0, int R>
__device__ __forceinline__ void wgmma_chunk(float (&d)[R], const void* sa, const void* sb, bool accumulate,
                                            uint32_t b_lbo = 16) {
  fence_operands(d);
  wgmma_fence();
  const uint32_t a0 = smem_u32(sa), b0 = smem_u32(sb);
#pragma unroll
  for (int k16 = 0; k16 < KSTEPS; ++k16)
    wgmma_ss<TB>(d, desc_sw128(a0 + 32 * k16), desc_sw128(b0 + (TB ? 2048 : 32) * k16, b_lbo),
                 (accumulate || k16 > 0) ? 1 : 0, T{});
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(d);
}
#endif

}  // namespace tile
}  // namespace cuda
}  // namespace ck
