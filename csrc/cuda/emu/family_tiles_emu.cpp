// The CUDA source family_tiles.cu compiled for the CPU emulator (see ck_cuda_emu.h).
#include "../family_tiles.cu"
