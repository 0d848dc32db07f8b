// The CUDA source xcorr.cu compiled for the CPU emulator (see ck_cuda_emu.h).
#include "../xcorr.cu"
