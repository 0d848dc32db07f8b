// torch.autocast must not reach the ATen products inside a kernel's implementation: they
// are float32 (or float64) by design, and an autocast region would run them in 16 bits
// (the CPU backend's similarity and row-dot products changed under
// torch.autocast("cpu") before this guard).  Autocast only casts at the functional
// boundary (contrastive_kernels.functional._amp_boundary); each op implementation opens
// with CK_NO_AUTOCAST(), which excludes the autocast dispatch keys for its extent.
#pragma once

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#define CK_NO_AUTOCAST() c10::impl::ExcludeDispatchKeyGuard ck_no_autocast_guard_(c10::autocast_dispatch_keyset)
