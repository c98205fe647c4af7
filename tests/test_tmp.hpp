#pragma once
// Scratch space for tests: one directory per test process, so ctest -j runs of different test cases (separate
// processes of the same binary) never write into each other's files.
#include <filesystem>
#include <string>

#include <unistd.h>

namespace cumo::test {
inline std::filesystem::path tmp_root() {
  const auto root = std::filesystem::path(CUMO_TEST_TMPDIR) / ("pid-" + std::to_string(::getpid()));
  std::filesystem::create_directories(root);
  return root;
}
}  // namespace cumo::test
