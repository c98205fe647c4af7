#pragma once
// Helpers shared by the tests/test_nn_*.cpp files: random parameters and a central-difference gradient check.
//
// The gradient check: the layer runs in fp32 (as it always does); the scalar objective f = Σ y·R is accumulated in
// double from the fp32 outputs; each sampled entry θ is perturbed by ±h and (f(θ+h) − f(θ−h)) / 2h is compared with
// the analytic fp32 gradient. Error budget with h = 5e-3 and O(1) activations: truncation O(h² f''') ≈ 1e-5
// relative, fp32 rounding of f ≈ 6e-8 · Σ|y·R| / h ≈ 1e-5 · Σ|y·R| / ‖∇‖ — together well under 1e-3 on these sizes; the
// stated tolerance, 1e-2 on ‖fd − analytic‖ / ‖fd‖ over the sampled entries, leaves a 10× margin and still fails
// on any wrong term (a missing term or a wrong sign gives errors of order 1).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cumo/core.hpp"
#include "cumo/core/parameter.hpp"

namespace cumo::test {

inline void randomize(const ParameterList& params, Rng& rng, float scale = 0.3f) {
  for (Parameter* p : params) {
    const bool norm = p->value.dim() == 1 && (p->name.find("norm") != std::string::npos ||
                                              p->name.find("layrnorm") != std::string::npos);
    if (norm && p->name.ends_with("weight"))
      rng.fill_normal(p->value, 1.f, 0.1f);
    else
      rng.fill_normal(p->value, 0.f, scale);
  }
}

inline Tensor random_tensor(Shape s, Rng& rng, float scale = 1.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, 0.f, scale);
  return t;
}

inline double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += double(a.data<float>()[i]) * b.data<float>()[i];
  return s;
}

inline constexpr double kAbsFloor = 1e-3;

struct GradTarget {
  std::string name;
  Tensor value;  // perturbed in place
  Tensor grad;   // analytic gradient, already computed
};

inline std::vector<GradTarget> targets_of(const ParameterList& params) {
  std::vector<GradTarget> t;
  for (Parameter* p : params) t.push_back({p->name, p->value, p->grad});
  return t;
}

// objective(): forward only, returns the scalar in double.
inline void gradcheck(const std::vector<GradTarget>& targets, const std::function<double()>& objective,
                      int samples = 8, double h = 5e-3, double tol = 1e-2, std::uint64_t seed = 99) {
  Rng rng(seed);
  for (const auto& t : targets) {
    float* v = t.value.data<float>();
    const float* g = t.grad.data<float>();
    const std::int64_t n = t.value.numel();
    double num = 0, den = 0;
    const int m = int(std::min<std::int64_t>(samples, n));
    for (int s = 0; s < m; ++s) {
      const std::int64_t i = m == n ? s : std::int64_t(rng.next_u32() % std::uint32_t(n));
      const float keep = v[i];
      v[i] = keep + float(h);
      const double fp = objective();
      v[i] = keep - float(h);
      const double fm = objective();
      v[i] = keep;
      const double step = (double(keep + float(h)) - double(keep - float(h)));  // the step fp32 actually took
      const double fd = (fp - fm) / step;
      num += (fd - g[i]) * (fd - g[i]);
      den += fd * fd;
    }
    // A gradient that is zero in exact arithmetic (attention's key bias without RoPE: softmax ignores a shift
    // shared by all keys) leaves only rounding noise in the differences (≈ 1e-5 here), so it is checked absolutely.
    const bool zero_grad_exactly = std::sqrt(den) < kAbsFloor;
    const double err = zero_grad_exactly ? std::sqrt(num) : std::sqrt(num / den);
    INFO("gradient of ", t.name, ": ", zero_grad_exactly ? "absolute" : "relative", " error ", err, " over ", m,
         " sampled entries");
    CHECK(err <= (zero_grad_exactly ? kAbsFloor : tol));
  }
}

}  // namespace cumo::test
