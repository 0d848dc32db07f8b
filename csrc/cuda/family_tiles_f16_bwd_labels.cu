// The __half backward tile kernels (row and column passes) of the log-sum-exp with LSE_LABELS (SupCon) family
// (family_tiles.cuh): one translation unit per element type, direction and family.
#include "family_tiles.cuh"

namespace ck {
namespace cuda {

CK_FAMILY_TILES_BWD(, __half, kLseLabels)

}  // namespace cuda
}  // namespace ck
