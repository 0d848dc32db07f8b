// The __half backward tile kernels (row and column passes) of the two-scale log-sum-exps (kLse2,
// family_tiles.cuh): one translation unit per element type, direction and family.
#include "family_tiles.cuh"

namespace ck {
namespace cuda {

CK_FAMILY_TILES_BWD(, __half, kLse2)

}  // namespace cuda
}  // namespace ck
