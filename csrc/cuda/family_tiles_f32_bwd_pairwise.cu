// The float backward tile kernels (row and column passes) of the pairwise-sigmoid (SigLIP) family
// (family_tiles.cuh): one translation unit per element type, direction and family.
#include "family_tiles.cuh"

namespace ck {
namespace cuda {

CK_FAMILY_TILES_BWD(, float, kPairwise)

}  // namespace cuda
}  // namespace ck
