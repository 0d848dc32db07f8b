// CUDA emulator stand-in for <cuda_bf16.h> (see ck_cuda_emu.h).
#pragma once
#include "ck_cuda_emu.h"
