// The CUDA source similarity.cu compiled for the CPU emulator (see ck_cuda_emu.h).
#include "../similarity.cu"
