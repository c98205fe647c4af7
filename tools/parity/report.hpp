#pragma once
// One line per checked tensor — name, relative error, tolerance, ok/FAIL — and the running totals.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "cumo/core/compare.hpp"
#include "cumo/core/parameter.hpp"

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

  // cumo_parity --dtype bf16|f16: every model is built with its matrix weights in that dtype and no gradients
  // (inference), its inputs are rounded to it, and its outputs are compared with tolerances derived from the
  // rounding (tol() below); gradients are not compared (training keeps fp32 weights).
  DType weights = DType::f32;
  bool inference() const { return weights != DType::f32; }
  ParameterStorage storage() const { return {weights, !inference()}; }
  // x rounded to the weights' dtype (returned widened, for layers whose input is fp32), x itself in fp32 mode.
  Tensor rounded(const Tensor& x) const { return inference() ? x.to(weights).to(DType::f32) : x; }
  // The tolerance of an output that `products` weight products in series separate from the (rounded) input. Rounding
  // a weight to p significant bits perturbs it by at most u = 2^-p relatively (bf16: p = 8, f16: p = 11); over many
  // independent elements a product's output moves by about u/√3 relatively, and d products plus the rounded input
  // add up to ≈ √(d + 1)·u/√3 when the errors are independent. The tolerance is 2·√(d + 1)·u, a margin of 2√3 ≈ 3.5
  // over that estimate, and never below the fp32 tolerance.
  double tol(double fp32_tol, int products) const {
    if (!inference()) return fp32_tol;
    const double u = weights == DType::bf16 ? 1.0 / 256 : 1.0 / 2048;
    return std::max(fp32_tol, 2 * std::sqrt(double(products + 1)) * u);
  }
  // Said once per fixture where an inference run stops short of the backward.
  void no_gradients() const {
    std::printf("  %s(%s weights: inference, so gradients and optimizer steps are not compared)\n", prefix.c_str(),
                std::string(name_of(weights)).c_str());
  }

  void record(const std::string& name, double err, double tol, const char* how) {
    const bool ok = err <= tol;
    std::printf("  %s%-44s %s %.3e  tol %.1e  %s\n", prefix.c_str(), name.c_str(), how, err, tol, ok ? "ok" : "FAIL");
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
