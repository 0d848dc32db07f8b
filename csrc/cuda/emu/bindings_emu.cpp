// The CUDA torch glue compiled for the CPU emulator: ops "<name>_cuda_emu" on CPU tensors.
#include "../bindings.cpp"
