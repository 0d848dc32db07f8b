// The __nv_bfloat16 forward (row pass, column pass, fused rows and columns) tile kernels of the lse and pairwise families
// (family_tiles.cuh): one translation unit per element type and direction.
#include "family_tiles.cuh"

namespace ck {
namespace cuda {

CK_FAMILY_TILES_FWD(, __nv_bfloat16)

}  // namespace cuda
}  // namespace ck
