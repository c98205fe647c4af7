#pragma once
// nn::RotaryEmbedding — RoPE in Hugging Face's rotate_half convention (Mistral, Qwen2, Mixtral, Llama):
//   out = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half([x1 | x2]) = [−x2 | x1],
//   cos/sin = cat(θ_i p, θ_i p), θ_i = base^(−2i/D) for i < D/2.
// The pairs are (i, i + D/2), not interleaved (GPT-J) pairs. HF computes θ_i and the angles in fp32, so we do too.
// The backward is the inverse rotation (the transpose of an orthogonal map). This class holds θ; the rotation is
// the backends' `rope` operation (backend/cpu/rope.hpp), which nn::Attention calls on its own backend.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cumo/backend/cpu/rope.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::nn {

class RotaryEmbedding {
 public:
  RotaryEmbedding() = default;
  RotaryEmbedding(std::int64_t head_dim, double theta) : head_dim_(head_dim), theta_(theta) {
    CUMO_CHECK(head_dim > 0 && head_dim % 2 == 0, "RotaryEmbedding: head_dim must be positive and even, got ",
               head_dim);
    CUMO_CHECK(theta > 0 && std::isfinite(theta), "RotaryEmbedding: rope_theta must be finite and > 0, got ", theta);
    inv_freq_ = Tensor::empty({head_dim / 2});
    for (std::int64_t i = 0; i < head_dim / 2; ++i)
      inv_freq_.data<float>()[i] = float(1.0 / std::pow(theta, double(float(2 * i) / float(head_dim))));
  }
  std::int64_t head_dim() const { return head_dim_; }
  double theta() const { return theta_; }
  // θ_i (D/2,) f32 on the host.
  const Tensor& inv_freq_tensor() const { return inv_freq_; }

  // Host convenience: x (N, heads·D) on the CPU, row r at position pos[r], rotated in place; inverse = backward.
  void rotate(Tensor& x, std::int64_t heads, const std::vector<std::int64_t>& pos, bool inverse = false) const {
    CUMO_CHECK(x.dim() == 2 && x.size(1) == heads * head_dim_, "RotaryEmbedding: x has shape ", x.shape(),
               " but expected (*, ", heads * head_dim_, ")");
    CUMO_CHECK(std::int64_t(pos.size()) == x.size(0), "RotaryEmbedding: ", pos.size(), " positions for ", x.size(0),
               " rows");
    Tensor p = Tensor::empty({x.size(0)}, DType::i32);
    std::transform(pos.begin(), pos.end(), p.data<std::int32_t>(), [](std::int64_t v) { return std::int32_t(v); });
    cpu::rope(x, p, inv_freq_, heads, inverse, x);
  }

 private:
  std::int64_t head_dim_ = 0;
  double theta_ = 10000.0;
  Tensor inv_freq_;  // (D/2,) f32, host
};

}  // namespace cumo::nn
