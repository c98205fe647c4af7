// Core types: shapes and their messages, tensor views, dtype conversions, the RNG.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>

#include "cumo/core.hpp"

using namespace cumo;

TEST_CASE("shape: prints the way error messages quote it") {
  CHECK(Shape({37, 512}).str() == "(37, 512)");
  CHECK(Shape({7}).str() == "(7,)");
  CHECK(Shape({}).str() == "()");
  CHECK(Shape({2, 3, 4}).numel() == 24);
  CHECK_THROWS_AS(Shape({-1}), Error);
}

TEST_CASE("tensor: slices and selects are views that share storage") {
  Tensor t = Tensor::zeros({4, 5});
  for (int i = 0; i < 20; ++i) t.data<float>()[i] = float(i);
  Tensor rows = t.slice(0, 1, 3);  // (2, 5)
  CHECK(rows.shape() == Shape({2, 5}));
  CHECK(rows.at<float>(0, 0) == 5.f);
  Tensor col = t.select(1, 2);  // (4,)
  CHECK(col.shape() == Shape({4}));
  CHECK(!col.is_contiguous());
  CHECK(col.at<float>(3) == 17.f);
  col.at<float>(0) = -1.f;
  CHECK(t.at<float>(0, 2) == -1.f);
  Tensor c = col.contiguous();
  CHECK(c.is_contiguous());
  CHECK(c.at<float>(1) == 7.f);
  CHECK_THROWS_AS(t.slice(0, 3, 5), Error);
  CHECK_THROWS_AS(t.view({3, 7}), Error);
  CHECK_THROWS_AS(t.data<double>(), Error);
}

TEST_CASE("tensor: cuda tensors need the CUDA backend in the translation unit") {
  if (detail::cuda_ops().alloc) return;  // a CUDA build registered it
  CHECK_THROWS_WITH_AS(Tensor::empty({2}, DType::f32, Device::cuda),
                       doctest::Contains("built without the CUDA backend"), Error);
}

TEST_CASE("dtype: bf16 and f16 conversions round to nearest even and keep specials") {
  CHECK(to_bf16(1.0f).bits == 0x3f80);
  CHECK(to_float(to_bf16(3.140625f)) == 3.140625f);
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
  CHECK(to_float(to_bf16(1.f + std::ldexp(1.f, -8))) == 1.f);
  CHECK(to_float(to_bf16(1.f + 3 * std::ldexp(1.f, -8))) == 1.f + std::ldexp(1.f, -6));
  CHECK(std::isnan(to_float(to_bf16(NAN))));
  CHECK(std::isinf(to_float(to_bf16(INFINITY))));

  CHECK(to_f16(1.0f).bits == 0x3c00);
  CHECK(to_f16(-2.0f).bits == 0xc000);
  CHECK(to_f16(65504.f).bits == 0x7bff);
  CHECK(to_f16(1e6f).bits == 0x7c00);                      // overflow → inf
  CHECK(to_float(f16_t{0x0001}) == std::ldexp(1.f, -24));  // smallest subnormal
  CHECK(to_f16(std::ldexp(1.f, -24)).bits == 0x0001);
  CHECK(to_float(to_f16(0.1f)) == doctest::Approx(0.0999755859375).epsilon(1e-12));
  // every f16 pattern that is a number survives f16 → f32 → f16
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const f16_t h{std::uint16_t(b)};
    const float f = to_float(h);
    if (std::isnan(f)) continue;
    REQUIRE(to_f16(f).bits == h.bits);
  }
}

TEST_CASE("tensor: dtype conversion goes through the exact conversions") {
  Tensor t = Tensor::full<float>({3}, 1.5f);
  Tensor b = t.to(DType::bf16);
  CHECK(b.dtype() == DType::bf16);
  CHECK(to_float(b.data<bf16_t>()[2]) == 1.5f);
  CHECK(b.to(DType::f32).data<float>()[0] == 1.5f);
}

TEST_CASE("rng: a seed gives the same stream, and state restores it exactly") {
  Rng a(42), b(42), c(43);
  CHECK(a.next_u32() == b.next_u32());
  CHECK(a.next_u32() != c.next_u32());
  const auto s = a.state();
  const float u = a.uniform(), n = a.normal();
  a.set_state(s);
  CHECK(a.uniform() == u);
  CHECK(a.normal() == n);
  // moments of 20k normals
  Rng r(7);
  double m = 0, v = 0;
  const int N = 20000;
  for (int i = 0; i < N; ++i) {
    const double x = r.normal();
    m += x;
    v += x * x;
  }
  m /= N;
  v = v / N - m * m;
  CHECK(std::abs(m) < 0.03);
  CHECK(std::abs(v - 1) < 0.05);
}

TEST_CASE("checks: messages name the function, the tensor and both shapes") {
  Tensor x = Tensor::zeros({37, 512});
  CHECK_THROWS_WITH_AS(check_shape("f", "x", x, {-1, 1024}), "f: x has shape (37, 512) but expected (*, 1024)",
                       Error);
  CHECK_NOTHROW(check_shape("f", "x", x, {37, -1}));
  CHECK_THROWS_WITH_AS(check_dtype("f", "x", x, DType::bf16), "f: x has dtype f32 but expected bf16", Error);
}

TEST_CASE("compare: rel_error and bitwise_equal") {
  Tensor a = Tensor::full<float>({4}, 1.f), b = Tensor::full<float>({4}, 1.f);
  CHECK(rel_error(a, b) == 0.0);
  CHECK(bitwise_equal(a, b));
  b.data<float>()[0] = 2.f;
  CHECK(rel_error(a, b) == doctest::Approx(1.0 / std::sqrt(7.0)));
  CHECK(!bitwise_equal(a, b));
  a.data<float>()[1] = NAN;
  CHECK(std::isinf(rel_error(a, b)));
}
