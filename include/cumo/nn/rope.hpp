#pragma once
// nn::RotaryEmbedding — RoPE in Hugging Face's rotate_half convention (Mistral, Qwen2, Mixtral, Llama):
//   out = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half([x1 | x2]) = [−x2 | x1],
//   cos/sin = cat(θ_i p, θ_i p), θ_i = base^(−2i/D) for i < D/2.
// The pairs are (i, i + D/2), not interleaved (GPT-J) pairs. HF computes θ_i and the angles in fp32, so we do too.
// The backward is the inverse rotation (the transpose of an orthogonal map).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

class RotaryEmbedding {
 public:
  RotaryEmbedding() = default;
  RotaryEmbedding(std::int64_t head_dim, double theta) : head_dim_(head_dim), theta_(theta) {
    CUMO_CHECK(head_dim % 2 == 0, "RotaryEmbedding: head_dim must be even, got ", head_dim);
    for (std::int64_t i = 0; i < head_dim / 2; ++i)
      inv_freq_.push_back(float(1.0 / std::pow(theta, double(float(2 * i) / float(head_dim)))));
  }
  std::int64_t head_dim() const { return head_dim_; }
  double theta() const { return theta_; }
  // θ_i (D/2,) f32 on the CPU, for a device kernel to rotate with the same angles.
  Tensor inv_freq_tensor() const {
    Tensor t = Tensor::empty({std::int64_t(inv_freq_.size())});
    std::copy(inv_freq_.begin(), inv_freq_.end(), t.data<float>());
    return t;
  }

  // x: rows of `heads` vectors of head_dim, row r at position pos[r]; rotated in place. inverse = the backward.
  void rotate(Tensor& x, std::int64_t heads, const std::vector<std::int64_t>& pos, bool inverse = false) const {
    const std::int64_t N = x.size(0), D = head_dim_, half = D / 2;
    CUMO_CHECK(x.size(1) == heads * D, "RotaryEmbedding: x has shape ", x.shape(), " but expected (*, ", heads * D,
               ")");
    CUMO_CHECK(std::int64_t(pos.size()) == N, "RotaryEmbedding: ", pos.size(), " positions for ", N, " rows");
    float* p = x.data<float>();
    const float s = inverse ? -1.f : 1.f;
    cpu::parallel_for(N, [&](std::int64_t r) {
      for (std::int64_t i = 0; i < half; ++i) {
        const float ang = inv_freq_[std::size_t(i)] * float(pos[std::size_t(r)]);
        const float c = std::cos(ang), sn = s * std::sin(ang);
        for (std::int64_t h = 0; h < heads; ++h) {
          float* v = p + r * heads * D + h * D;
          const float a = v[i], b = v[i + half];
          v[i] = a * c - b * sn;
          v[i + half] = b * c + a * sn;
        }
      }
    }, 8 * half);
  }

 private:
  std::int64_t head_dim_ = 0;
  double theta_ = 10000.0;
  std::vector<float> inv_freq_;
};

}  // namespace cumo::nn
