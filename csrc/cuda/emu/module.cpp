// Python module contrastive_kernels._C_cuda_emu: importing it registers the emulated
// CUDA ops (contrastive_kernels::<op>_cuda_emu, see csrc/cuda/bindings.cpp), and it
// carries small self-test kernels of the emulator itself (tests/test_cuda_emulator.py):
// the conversions against torch's, mma.sync against a matrix product, ldmatrix against its
// PTX layout and, through the kernels' own fragment loads (tile_mma.cuh warp_mma16), as
// the operand of mma.sync from either storage order, wgmma's misuse (tile_wgmma.cuh), and the misuse
// the emulator must report (divergent barriers, collectives with missing lanes,
// deadlocks, launch limits, reads of cp.async data before the wait), and an out-of-bounds
// read that only an AddressSanitizer build reports (memcheck.sh's negative control).
#include <torch/extension.h>

#include <cstring>
#include <string>

#include "ck_cuda_emu.h"
#include "../tile_mma.cuh"
#include "../tile_wgmma.cuh"

namespace {

using at::Tensor;

std::string launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string("ok") : std::string(cudaGetErrorString(err));
}

// Bits of __float2half_rn, __float2bfloat16_rn and cvt.rna.tf32 of each float32.
std::tuple<Tensor, Tensor, Tensor> convert_bits(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
  Tensor h = at::empty(x.sizes(), x.options().dtype(at::kInt));
  Tensor b = at::empty(x.sizes(), x.options().dtype(at::kInt));
  Tensor t = at::empty(x.sizes(), x.options().dtype(at::kLong));
  const float* px = x.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    h.data_ptr<int>()[i] = __float2half_rn(px[i]).__x;
    b.data_ptr<int>()[i] = __float2bfloat16_rn(px[i]).__x;
    t.data_ptr<int64_t>()[i] = ck_emu::cvt_rna_tf32(px[i]);
  }
  return {h, b, t};
}

// Half / bfloat16 bits (int32 tensor) back to float32.
std::tuple<Tensor, Tensor> widen_bits(const Tensor& bits) {
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.is_contiguous(), "bits must be contiguous int32");
  Tensor h = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  Tensor b = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  for (int64_t i = 0; i < bits.numel(); ++i) {
    const uint16_t v = static_cast<uint16_t>(bits.data_ptr<int>()[i]);
    h.data_ptr<float>()[i] = __half2float(__half{v});
    b.data_ptr<float>()[i] = __bfloat162float(__nv_bfloat16{v});
  }
  return {h, b};
}

// One warp: C (16 x 8, float32) = A (16 x K) B (K x 8) + C through one emulated mma.sync,
// each lane loading its fragments from the PTX ISA layouts.  kind 0 f16, 1 bf16 (a, b
// given as int32 bits), 2 tf32 (a, b float32; K = 8, else K = 16).
struct MmaArgs {
  const int* a16;
  const int* b16;
  const float* a32;
  const float* b32;
  float* c;
  int kind;
};

__global__ void mma_kernel(MmaArgs p) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  float c[4];
  for (int e = 0; e < 4; ++e) c[e] = p.c[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)];
  uint32_t a[4], b[2];
  if (p.kind == 2) {
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {t, t, t + 4, t + 4};
    for (int i = 0; i < 4; ++i) a[i] = ck_emu::float_to_bits(p.a32[rows[i] * 8 + cols[i]]);
    b[0] = ck_emu::float_to_bits(p.b32[t * 8 + g]);
    b[1] = ck_emu::float_to_bits(p.b32[(t + 4) * 8 + g]);
    ck_emu::mma_sync<8>(c, a, b, 2);
  } else {
    auto pa = [&](int r, int k) {
      return static_cast<uint32_t>(p.a16[r * 16 + k] & 0xffff) | (static_cast<uint32_t>(p.a16[r * 16 + k + 1]) << 16);
    };
    auto pb = [&](int k, int n) {
      return static_cast<uint32_t>(p.b16[k * 8 + n] & 0xffff) | (static_cast<uint32_t>(p.b16[(k + 1) * 8 + n]) << 16);
    };
    a[0] = pa(g, 2 * t);
    a[1] = pa(g + 8, 2 * t);
    a[2] = pa(g, 2 * t + 8);
    a[3] = pa(g + 8, 2 * t + 8);
    b[0] = pb(2 * t, g);
    b[1] = pb(2 * t + 8, g);
    ck_emu::mma_sync<16>(c, a, b, p.kind);
  }
  for (int e = 0; e < 4; ++e) p.c[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = c[e];
}

Tensor mma(const Tensor& a, const Tensor& b, const Tensor& c, int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0, 1 or 2");
  Tensor out = c.contiguous().clone();
  MmaArgs p{};
  Tensor ac = a.contiguous(), bc = b.contiguous();
  if (kind == 2) {
    p.a32 = ac.data_ptr<float>();
    p.b32 = bc.data_ptr<float>();
  } else {
    p.a16 = ac.data_ptr<int>();
    p.b16 = bc.data_ptr<int>();
  }
  p.c = out.data_ptr<float>();
  p.kind = static_cast<int>(kind);
  CK_LAUNCH(1, 32, 0, nullptr, mma_kernel)(p);
  const std::string st = launch_status();
  TORCH_CHECK(st == "ok", st);
  return out;
}

// One warp: ldmatrix .x{1,2,4}{.trans} of `num` 8 x 8 matrices of 16-bit patterns (rows of
// mats, int32) from shared memory; returns each lane's registers (32 x num, int64).
__global__ void ldmatrix_kernel(const int* mats, int num, bool trans, int64_t* out) {
  __shared__ __align__(16) uint16_t sm[4 * 64];
  const int lane = threadIdx.x;
  for (int i = lane; i < num * 64; i += 32) sm[i] = static_cast<uint16_t>(mats[i]);
  __syncthreads();
  uint32_t r[4];
  ck_emu::ldmatrix(r, &sm[(lane % (8 * num)) * 8], num, trans);
  for (int m = 0; m < num; ++m) out[lane * num + m] = r[m];
}

Tensor ldmatrix(const Tensor& mats, int64_t num, bool trans) {
  TORCH_CHECK(num == 1 || num == 2 || num == 4, "num must be 1, 2 or 4");
  TORCH_CHECK(mats.scalar_type() == at::kInt && mats.numel() == num * 64, "mats must be int32 with num * 64 entries");
  Tensor m = mats.contiguous();
  Tensor out = at::empty({32, num}, m.options().dtype(at::kLong));
  CK_LAUNCH(1, 32, 0, nullptr, ldmatrix_kernel)(m.data_ptr<int>(), static_cast<int>(num), trans,
                                                out.data_ptr<int64_t>());
  const std::string st = launch_status();
  TORCH_CHECK(st == "ok", st);
  return out;
}

// One warp: C (16 x 8 NT) = A (16 x 16) B (16 x 8 NT) through tile::warp_mma16, the kernels'
// product of shared-memory tiles, with A stored row-major (a[r * 24 + k]) or k-major
// (a[k * 24 + r]) and B stored n-major (b[n * 24 + k]) or k-major (b[k * 24 + n]).
template <typename H, int NT, bool AK, bool BK>
__global__ void frag_mma_kernel(const int* a, const int* b, float* c) {
  constexpr int LD = 24;  // 48-byte rows: 16-byte aligned
  __shared__ __align__(16) H sa[16 * LD];
  __shared__ __align__(16) H sb[16 * LD];
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) {
    const int r = i / 16, k = i % 16;
    sa[AK ? k * LD + r : r * LD + k] = H{static_cast<uint16_t>(a[i])};
  }
  for (int i = lane; i < 16 * 8 * NT; i += 32) {
    const int k = i / (8 * NT), n = i % (8 * NT);
    sb[BK ? k * LD + n : n * LD + k] = H{static_cast<uint16_t>(b[i])};
  }
  __syncthreads();
  float acc[NT][4] = {};
  ck::cuda::tile::warp_mma16<NT, 16, AK, BK>(acc, sa, LD, sb, LD);
  const int g = lane >> 2, t = lane & 3;
  for (int nt = 0; nt < NT; ++nt)
    for (int e = 0; e < 4; ++e) c[(g + 8 * (e >> 1)) * 8 * NT + nt * 8 + 2 * t + (e & 1)] = acc[nt][e];
}

template <typename H, int NT>
void frag_mma_launch(const int* a, const int* b, float* c, bool ak, bool bk) {
  if (ak && bk) CK_LAUNCH(1, 32, 0, nullptr, frag_mma_kernel<H, NT, true, true>)(a, b, c);
  if (ak && !bk) CK_LAUNCH(1, 32, 0, nullptr, frag_mma_kernel<H, NT, true, false>)(a, b, c);
  if (!ak && bk) CK_LAUNCH(1, 32, 0, nullptr, frag_mma_kernel<H, NT, false, true>)(a, b, c);
  if (!ak && !bk) CK_LAUNCH(1, 32, 0, nullptr, frag_mma_kernel<H, NT, false, false>)(a, b, c);
}

Tensor frag_mma(const Tensor& a, const Tensor& b, bool bf16, bool a_kmajor, bool b_kmajor) {
  TORCH_CHECK(a.scalar_type() == at::kInt && a.numel() == 256, "a must be 16 x 16 int32 bits");
  TORCH_CHECK(b.scalar_type() == at::kInt && b.dim() == 2 && b.size(0) == 16 && (b.size(1) == 8 || b.size(1) == 16),
              "b must be 16 x 8 or 16 x 16 int32 bits");
  Tensor ac = a.contiguous(), bc = b.contiguous();
  const int nt = static_cast<int>(b.size(1) / 8);
  Tensor c = at::empty({16, b.size(1)}, a.options().dtype(at::kFloat));
  const int *pa = ac.data_ptr<int>(), *pb = bc.data_ptr<int>();
  float* pc = c.data_ptr<float>();
  if (bf16)
    nt == 1 ? frag_mma_launch<__nv_bfloat16, 1>(pa, pb, pc, a_kmajor, b_kmajor)
            : frag_mma_launch<__nv_bfloat16, 2>(pa, pb, pc, a_kmajor, b_kmajor);
  else
    nt == 1 ? frag_mma_launch<__half, 1>(pa, pb, pc, a_kmajor, b_kmajor)
            : frag_mma_launch<__half, 2>(pa, pb, pc, a_kmajor, b_kmajor);
  const std::string st = launch_status();
  TORCH_CHECK(st == "ok", st);
  return c;
}

// Misuse the emulator must report (returns the launch status string).
__global__ void misuse_kernel(int which, float* out) {
  const int tid = threadIdx.x;
  switch (which) {
    case 0: {  // correct: barrier, then a shuffle sum over the warp
      __syncthreads();
      float v = static_cast<float>(tid);
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      out[tid] = v;
      return;
    }
    case 1:  // a thread returns, the others wait at __syncthreads
      if (tid == 5) return;
      __syncthreads();
      return;
    case 2:  // a lane returns before a warp shuffle
      if (tid == 3) return;
      out[tid] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      return;
    case 3:  // lane 0 waits at a barrier, the rest of its warp at a shuffle: deadlock
      if (tid == 0) {
        __syncthreads();
      } else {
        out[tid] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
        __syncthreads();
      }
      return;
    case 4: {  // reads a cp.async destination before and after its wait
      __shared__ __align__(16) float sm[4];
      __shared__ __align__(16) float src[4];
      if (tid == 0) {
        for (int i = 0; i < 4; ++i) {
          sm[i] = -1.f;
          src[i] = static_cast<float>(i + 1);
        }
        ck_emu::cp_async16(sm, src);
        ck_emu::cp_async_commit();
        out[0] = sm[0];  // before the wait: still the old value
        ck_emu::cp_async_wait(0);
        out[1] = sm[0];  // after: the copy has landed
      }
      return;
    }
    case 8: {  // a race: thread 63 writes what the others read in the same barrier interval
      __shared__ float shared_value;
      if (tid == 0) shared_value = 1.f;
      __syncthreads();
      if (tid == 63) shared_value = 2.f;
      out[tid] = shared_value;
      return;
    }
    case 9:  // a race between blocks (launched as 2): block 0 reads what block 1 writes
      if (tid == 0 && blockIdx.x == 1) out[0] = 5.f;
      if (tid == 0 && blockIdx.x == 0) out[1] = out[0];
      return;
    case 10: {  // ldmatrix from a row address that is not 16-byte aligned
      __shared__ __align__(16) uint16_t sm[8 * 8 + 8];
      uint32_t r[1];
      ck_emu::ldmatrix(r, &sm[1 + 8 * (tid % 8)], 1, false);
      out[tid] = static_cast<float>(r[0]);
      return;
    }
    case 11: {  // cp.async from a global address that is not 16-byte aligned (a row at an odd offset)
      __shared__ __align__(16) float sm[4];
      if (tid == 0) {
        ck_emu::cp_async16(sm, out + 1);
        ck_emu::cp_async_commit();
        ck_emu::cp_async_wait(0);
      }
      return;
    }
    case 7:  // reads one float past the end of `out` (64 floats): memcheck.sh's negative control
      if (tid == 0) out[0] = out[64];
      return;
    default:
      return;
  }
}

std::string misuse(int64_t which, const Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() >= 64, "out must be float32 with >= 64 entries");
  if (which == 5) {  // gridDim.y past the hardware limit
    CK_LAUNCH(dim3(1, 65536), 32, 0, nullptr, misuse_kernel)(0, out.data_ptr<float>());
  } else if (which == 6) {  // a block of more than 1024 threads
    CK_LAUNCH(1, 1056, 0, nullptr, misuse_kernel)(0, out.data_ptr<float>());
  } else if (which == 9) {
    CK_LAUNCH(2, 64, 0, nullptr, misuse_kernel)(9, out.data_ptr<float>());
  } else {
    CK_LAUNCH(1, 64, 0, nullptr, misuse_kernel)(static_cast<int>(which), out.data_ptr<float>());
  }
  return launch_status();
}

// wgmma misuse (one warpgroup, or 64 threads for case 5): the emulator must report each.  A
// (64 x 16) and B (64 x 16) are staged by cp.async into 128-byte-swizzled tiles (tile_wgmma.cuh)
// and multiplied by one m64n64k16 wgmma.  out[tid] gets d[0] before the wait, out[128 + tid]
// after it (cases 0 and 9).
__global__ void wgmma_misuse_kernel(int which, const uint16_t* src, float* out) {
  namespace tl = ck::cuda::tile;
  __shared__ __align__(1024) unsigned char sa[2 * 64 * 128];
  __shared__ __align__(1024) unsigned char sb[64 * 128];
  const int tid = threadIdx.x;
  for (int v = tid; v < 64 * 2; v += blockDim.x) {  // rows x two 16-byte chunks of 16 elements
    const int r = v >> 1, c = v & 1;
    tl::cp_async16(sa + tl::sw128_offset(r, c), src + r * 16 + 8 * c);
    tl::cp_async16(sb + tl::sw128_offset(r, c), src + 64 * 16 + r * 16 + 8 * c);
  }
  tl::cp_async_commit();
  tl::cp_async_wait<0>();
  if (which != 2) tl::fence_proxy_async();
  __syncthreads();
  if (which == 8 || which == 9) {  // A's row 0 zeroed by st.shared (threads 0-15, one element each)
    if (tid < 16) tl::st_operand(reinterpret_cast<uint16_t*>(sa + tl::sw128_offset(0, tid >> 3)) + (tid & 7), uint16_t{0});
    if (which == 9) tl::fence_proxy_async();  // (8: none: the wgmma would read stale data)
    __syncthreads();
  }
  float d[32] = {};
  if (which != 1) tl::wgmma_fence();
  uint32_t a0 = tl::smem_u32(sa), b0 = tl::smem_u32(sb);
  if (which == 3) a0 += 128;                   // inside the 1024-byte swizzle repeat
  if (which == 4 && tid >= 64) b0 += 1024;     // warps 2, 3 read other rows of B
  if (which == 7)  // B read N-major (transposed) with a 64-byte swizzle: not emulated
    tl::wgmma_ss<1>(d, tl::desc_sw128(a0), (tl::desc_sw128(b0) & ~(uint64_t{3} << 62)) | (uint64_t{2} << 62), 0,
                    __nv_bfloat16{});
  else
    tl::wgmma_ss(d, tl::desc_sw128(a0), tl::desc_sw128(b0), 0, __nv_bfloat16{});
  tl::wgmma_commit();
  out[tid] = d[0];
  if (which == 6) return;  // returns with the wgmma pending
  tl::wgmma_wait<0>();
  out[128 + tid] = d[0];
}

std::string wgmma_misuse(int64_t which, const Tensor& src, const Tensor& out) {
  TORCH_CHECK(src.scalar_type() == at::kShort && src.numel() == 2 * 64 * 16 && src.is_contiguous(),
              "src must be contiguous int16 with 2048 entries (A then B, 64 x 16 each)");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() >= 256, "out must be float32 with >= 256 entries");
  const auto* ps = reinterpret_cast<const uint16_t*>(src.data_ptr<int16_t>());
  CK_LAUNCH(1, which == 5 ? 64 : 128, 0, nullptr, wgmma_misuse_kernel)(static_cast<int>(which), ps,
                                                                      out.data_ptr<float>());
  return launch_status();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "contrastive_kernels CUDA kernels on the CPU emulator (csrc/cuda/emu), for tests";
  m.attr("emulated") = true;
  m.def("convert_bits", &convert_bits, "emulated __float2half_rn / __float2bfloat16_rn / cvt.rna.tf32 bits");
  m.def("widen_bits", &widen_bits, "emulated __half2float / __bfloat162float of 16-bit patterns");
  m.def("mma", &mma, "one emulated mma.sync (kind 0 f16, 1 bf16, 2 tf32) from PTX-layout fragments");
  m.def("ldmatrix", &ldmatrix, "one emulated ldmatrix.m8n8 (num 1, 2, 4; .trans) of 16-bit patterns: lane registers");
  m.def("frag_mma", &frag_mma, "C = A B through tile::warp_mma16 (ldmatrix fragment loads) from either storage order");
  m.def("wgmma_misuse", &wgmma_misuse, "run a wgmma misuse case (0 correct); returns the launch status");
  m.def("misuse", &misuse, "run a misuse case of the emulator's self-test kernel; returns the launch status");
}
