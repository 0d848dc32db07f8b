// The wgmma kernel (csrc/cuda/wgmma_gemm.cu) compiled for the CPU emulator.
#include "../wgmma_gemm.cu"
