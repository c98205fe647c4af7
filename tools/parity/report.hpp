#pragma once
// One line per checked tensor — name, relative error, tolerance, ok/FAIL — and the running totals.
#include <cstdio>
#include <string>

#include "cumo/core/compare.hpp"

namespace cumo::parity {

// Shapes, not element counts, must agree: a reference stored transposed has the right count and the wrong layout.
// The one freedom is how the leading dimensions split: our (B·T, V) logits are PyTorch's (B, T, V) — the same row-
// major bytes, the last dimension equal.
inline bool same_layout(const Shape& a, const Shape& b) {
  if (a == b) return true;
  return a.rank() > 0 && b.rank() > 0 && a.numel() == b.numel() && a[-1] == b[-1];
}

struct Report {
  int passed = 0;
  int failed = 0;
  int skipped = 0;     // fixtures a mode does not run (said on their own line; never counted as passed)
  std::string prefix;  // names the rank under mpirun ("[rank 1] ")

  void record(const std::string& name, double err, double tol, const char* how) {
    const bool ok = err <= tol;
    std::printf("  %s%-44s %s %.3e  tol %.0e  %s\n", prefix.c_str(), name.c_str(), how, err, tol, ok ? "ok" : "FAIL");
    (ok ? passed : failed) += 1;
  }
  // Relative error ‖got − want‖ / ‖want‖ against a tolerance.
  void check(const std::string& name, const Tensor& got, const Tensor& want, double tol) {
    if (!same_layout(got.shape(), want.shape())) {
      std::printf("  %-44s shape %s vs %s  FAIL\n", name.c_str(), got.shape().str().c_str(),
                  want.shape().str().c_str());
      ++failed;
      return;
    }
    record(name, rel_error(got, want), tol, "rel");
  }
  // Exact agreement (indices): the error is the number of mismatching elements.
  void check_exact(const std::string& name, const Tensor& got, const Tensor& want) {
    const Tensor a = got.to(Device::cpu).to(DType::f64), b = want.to(Device::cpu).to(DType::f64);
    double bad = same_layout(a.shape(), b.shape()) ? 0 : 1;
    for (std::int64_t i = 0; bad == 0 && i < a.numel(); ++i) bad += a.data<double>()[i] != b.data<double>()[i];
    record(name, bad, 0, "mismatches");
  }
};

}  // namespace cumo::parity
