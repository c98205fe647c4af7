#pragma once
// What the backend comparisons share (tests/test_nn_backend_paths.cpp: Emulated vs Cpu; tests/cuda/
// test_cuda_model.cu: Cuda vs Cpu): relative / absolute comparisons of tensors on any device, parameter copies,
// host-drawn random values and the tiny CuMo's batch.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "cumo/core/compare.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/rng.hpp"

namespace cumo::backend_test {

inline Tensor on_cpu(const Tensor& t) { return t.device() == Device::cpu ? t : t.to(Device::cpu); }

inline void expect_close(const std::string& what, const Tensor& got, const Tensor& want, double tol) {
  REQUIRE(got.shape() == want.shape());
  const double e = rel_error(got, want);  // NaN anywhere → ∞
  CAPTURE(what);
  CAPTURE(e);
  CHECK(e <= tol);
}
inline void expect_near(const std::string& what, double got, double want, double tol) {
  CAPTURE(what);
  CAPTURE(got);
  CAPTURE(want);
  CHECK(std::abs(got - want) <= tol * std::max(1.0, std::abs(want)));
}

// Same-named parameter lists in the same order (the two models are built from one config).
inline void copy_parameters(const ParameterList& from, const ParameterList& to) {
  REQUIRE(from.size() == to.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    REQUIRE(from[i]->name == to[i]->name);
    to[i]->value.copy_from(from[i]->value);
  }
}
// ‖a − b‖₂ (f32 tensors on any device)
inline double abs_error(const Tensor& a, const Tensor& b) {
  const Tensor x = on_cpu(a).contiguous(), y = on_cpu(b).contiguous();
  double s = 0;
  for (std::int64_t j = 0; j < y.numel(); ++j) {
    const double d = double(x.data<float>()[j]) - double(y.data<float>()[j]);
    s += d * d;
  }
  return std::sqrt(s);
}

// A gradient that is zero in exact arithmetic — the key bias of attention without RoPE (a bias on every key adds the
// same q·b to all of a query's scores, which the softmax ignores) — is rounding noise on both sides, so a relative
// error means nothing there: such a gradient (CPU norm below kNoiseNorm) is checked in absolute terms
// (tools/parity/models.hpp does the same against PyTorch). Returns the names of those parameters.
inline constexpr double kNoiseNorm = 1e-6, kNoiseAbsTol = 1e-5;
inline std::set<std::string> expect_grads_close(const ParameterList& cpu, const ParameterList& other, double tol) {
  REQUIRE(cpu.size() == other.size());
  std::set<std::string> noise;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const Tensor zero = Tensor::zeros(cpu[i]->grad.shape());
    if (rel_error(cpu[i]->grad, zero) < kNoiseNorm) {
      noise.insert(cpu[i]->name);
      const double abs_err = abs_error(other[i]->grad, cpu[i]->grad);
      CAPTURE(cpu[i]->name);
      CAPTURE(abs_err);
      CHECK(abs_err <= kNoiseAbsTol);
    } else {
      expect_close("grad " + cpu[i]->name, other[i]->grad, cpu[i]->grad, tol);
    }
  }
  return noise;
}

inline Tensor random_tensor(Shape s, Rng& rng, float scale = 1.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, 0.f, scale);
  return t;
}
// Fresh N(0, scale²) values, drawn on the host (so every backend gets the same bits).
inline void randomize(const ParameterList& ps, Rng& rng, float scale) {
  for (Parameter* p : ps) {
    Tensor v = random_tensor(p->value.shape(), rng, scale);
    p->value.copy_from(p->value.device() == Device::cpu ? v : v.to(p->value.device()));
  }
}

// Two sequences of 9 tokens, one image each (4 image tokens), labels on the text after it (tests/test_models_cumo),
// one padding key.
struct Batch {
  std::vector<std::int64_t> ids{1, 12, 12, 12, 12, 4, 5, 6, 7, 2, 12, 12, 12, 12, 8, 3, 9, 1};
  std::vector<std::int64_t> labels{-100, -100, -100, -100, -100, 4, 5, 6, 7, -100, -100, -100, -100, -100, 8, 3, 9, 1};
  std::vector<std::uint8_t> key_valid{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0};  // one padding key
  std::int64_t B = 2, T = 9;
  Tensor px;
  explicit Batch(Rng& rng) : px(random_tensor({2, 3, 8, 8}, rng)) {}
};

}  // namespace cumo::backend_test
