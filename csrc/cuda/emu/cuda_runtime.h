// CUDA emulator stand-in for <cuda_runtime.h> (see ck_cuda_emu.h).
#pragma once
#include "ck_cuda_emu.h"
