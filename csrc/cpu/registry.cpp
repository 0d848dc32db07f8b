#include "ck_common.h"

namespace ck {
std::vector<std::string>& registered_cpu_ops() {
  static std::vector<std::string> ops;
  return ops;
}
}  // namespace ck
