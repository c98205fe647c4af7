// cumo_parity [--device cpu|cuda] FILE...
// Runs every fixture whose `kind` it supports, building each model from the fixture's metadata `config` alone,
// prints one line per checked tensor and ends with "N passed, M failed". Exit status 1 when anything failed or a
// file could not be run (unsupported kind, unreadable file); 77 for --device cuda on a machine without a CUDA device
// (ctest's "skipped", as the CUDA test binaries).
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/io/safetensors.hpp"
#if defined(__CUDACC__)
#include "cumo/backend/cuda.cuh"
#endif
#include "parity/kinds.hpp"

namespace {

int usage() {
  std::fprintf(stderr, "usage: cumo_parity [--device cpu|cuda] FILE...\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string device = "cpu";
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--device") && i + 1 < argc)
      device = argv[++i];
    else if (!std::strncmp(argv[i], "--device=", 9))
      device = argv[i] + 9;
    else if (argv[i][0] == '-')
      return usage();
    else
      files.push_back(argv[i]);
  }
  if (files.empty()) return usage();

  std::map<std::string, cumo::parity::Runner> table;
  if (device == "cpu") {
    table = cumo::parity::runners<cumo::backend::Cpu>();
  } else if (device == "cuda") {
#if defined(__CUDACC__)
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      std::fprintf(stderr, "cumo_parity: --device cuda but no CUDA device is available (SKIPPED)\n");
      return 77;
    }
    table = cumo::parity::runners<cumo::backend::Cuda>();
#else
    std::fprintf(stderr, "cumo_parity: this build has no CUDA backend (configure with CUMO_CUDA=ON)\n");
    return 1;
#endif
  } else {
    return usage();
  }

  cumo::parity::Report report;
  int unrun = 0;
  for (const std::string& path : files) {
    try {
      const auto file = cumo::io::SafeTensors::open(path);
      const auto& meta = file.metadata();
      const auto kind_it = meta.find("kind");
      const std::string kind = kind_it == meta.end() ? "" : kind_it->second;
      std::printf("%s  [kind %s, device %s]\n", path.c_str(), kind.empty() ? "?" : kind.c_str(), device.c_str());
      const auto run = table.find(kind);
      if (run == table.end()) {
        std::printf("  unsupported kind '%s'\n", kind.c_str());
        ++unrun;
        continue;
      }
      const auto config_it = meta.find("config");
      CUMO_CHECK(config_it != meta.end(), "fixture has no metadata 'config'");
      const auto config = nlohmann::json::parse(config_it->second);
      cumo::parity::check_claimed_sizes(file, kind, config);
      run->second(file, config, report);
    } catch (const std::exception& e) {
      std::printf("  error: %s\n", e.what());
      ++unrun;
    }
  }
  if (unrun) std::printf("%d file(s) could not be run\n", unrun);
  std::printf("%d passed, %d failed\n", report.passed, report.failed);
  return report.failed || unrun ? 1 : 0;
}
