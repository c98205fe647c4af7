#pragma once
// CPU row-block copies and small elementwise operations on fp32 buffers: the pieces the layers use to move rows
// between tensors (CLS rows, image rows into a prompt, a KV cache, the S² channel concatenation) and to add
// residuals. The references of backend/cuda/model.cuh and elementwise.cuh.
//   copy_blocks / add_blocks: `height` blocks of `width` elements; block r starts at src0 + r·spitch in src and
//   dst0 + r·dpitch in dst (elements; the pitches are ignored when height is 1). copy overwrites, add adds.
#include <algorithm>
#include <cstdint>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/backend/ops.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

inline void copy_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                        std::int64_t dpitch, std::int64_t width, std::int64_t height) {
  backend::check_blocks("cpu::copy_blocks", src, src0, spitch, dst, dst0, dpitch, width, height);
  const float* s = src.data<float>() + src0;
  float* d = dst.data<float>() + dst0;
  for (std::int64_t r = 0; r < height; ++r) std::copy_n(s + r * spitch, width, d + r * dpitch);
}

inline void add_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                       std::int64_t dpitch, std::int64_t width, std::int64_t height) {
  backend::check_blocks("cpu::add_blocks", src, src0, spitch, dst, dst0, dpitch, width, height);
  const float* s = src.data<float>() + src0;
  float* d = dst.data<float>() + dst0;
  for (std::int64_t r = 0; r < height; ++r)
    for (std::int64_t c = 0; c < width; ++c) d[r * dpitch + c] += s[r * spitch + c];
}

// out = a + b, out = a ⊙ b (same numel, contiguous; out may be a or b)
inline void add(const Tensor& a, const Tensor& b, Tensor& out) {
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  float* po = out.data<float>();
  parallel_for(a.numel(), [&](std::int64_t i) { po[i] = pa[i] + pb[i]; });
}
inline void multiply(const Tensor& a, const Tensor& b, Tensor& out) {
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  float* po = out.data<float>();
  parallel_for(a.numel(), [&](std::int64_t i) { po[i] = pa[i] * pb[i]; });
}
// t *= alpha
inline void scale(Tensor& t, float alpha) {
  float* p = t.data<float>();
  parallel_for(t.numel(), [&](std::int64_t i) { p[i] *= alpha; });
}

}  // namespace cumo::cpu
