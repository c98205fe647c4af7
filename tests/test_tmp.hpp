#pragma once
// Scratch space for tests: one directory per test process, so ctest -j runs of different test cases (separate
// processes of the same binary) never write into each other's files.
#include <filesystem>
#include <string>

#include <unistd.h>

namespace cumo::test {
// Emptied on its first use in a process: process ids are reused, and a directory left by an earlier process with
// this id (files a test only creates when absent, a CLIP config beside a release) would change what a test sees.
inline std::filesystem::path tmp_root() {
  const auto root = std::filesystem::path(CUMO_TEST_TMPDIR) / ("pid-" + std::to_string(::getpid()));
  static const bool emptied = [&] {
    std::filesystem::remove_all(root);
    return true;
  }();
  (void)emptied;
  std::filesystem::create_directories(root);
  return root;
}
}  // namespace cumo::test
