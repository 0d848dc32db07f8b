// The __nv_bfloat16 backward tile kernels (row and column passes) of the log-sum-exp family
// (family_tiles.cuh): one translation unit per element type, direction and family.
#include "family_tiles.cuh"

namespace ck {
namespace cuda {

CK_FAMILY_TILES_BWD(, __nv_bfloat16, kLse)

}  // namespace cuda
}  // namespace ck
