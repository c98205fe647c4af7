#pragma once
// CPU embeddings: the token table (gather rows by id; the backward adds dy rows back into the table's gradient in
// row order) and CLIP's vision embeddings ([CLS; patches] + positions, and their column sums). The references of
// backend/cuda/embedding.cuh and backend/cuda/model.cuh's vit_embeddings.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// table (V, H), fp32 or bf16/f16 (widened row by row); ids (N), each in [0, V) (the layer checks them); y (N, H).
inline void embedding_forward(const Tensor& table, const std::vector<std::int64_t>& ids, Tensor& y) {
  const std::int64_t H = table.size(1);
  const char* w = static_cast<const char*>(table.raw());
  const std::size_t row = std::size_t(H) * size_of(table.dtype());
  float* py = y.data<float>();
  for (std::size_t r = 0; r < ids.size(); ++r)
    cumo::detail::convert_n(w + std::size_t(ids[r]) * row, table.dtype(), py + std::int64_t(r) * H, DType::f32, H);
}

// dtable (V, H) += dy rows at their ids; rows listed in `skip` (replaced embeddings) are left out.
inline void embedding_backward(const Tensor& dy, const std::vector<std::int64_t>& ids, Tensor& dtable,
                               const std::vector<bool>* skip) {
  const std::int64_t H = dtable.size(1);
  float* dw = dtable.data<float>();
  const float* pg = dy.data<float>();
  for (std::size_t r = 0; r < ids.size(); ++r) {
    if (skip && (*skip)[r]) continue;
    float* row = dw + ids[r] * H;
    for (std::int64_t j = 0; j < H; ++j) row[j] += pg[std::int64_t(r) * H + j];
  }
}

// patch (B·(T−1), H), cls (H,), pos (T, H) → emb (B·T, H): row (b, 0) = cls + pos 0, row (b, t) = patch + pos t.
inline void vit_embeddings(const Tensor& patch, const Tensor& cls, const Tensor& pos, std::int64_t B, Tensor& emb) {
  const std::int64_t T = pos.size(0), H = pos.size(1), N = T - 1;
  const float* pc = cls.data<float>();
  const float* pp = pos.data<float>();
  const float* pa = patch.data<float>();
  float* pe = emb.data<float>();
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < H; ++h)
        pe[(b * T + t) * H + h] = (t == 0 ? pc[h] : pa[(b * N + t - 1) * H + h]) + pp[t * H + h];
}

// demb (B·T, H) → dpatch (B·(T−1), H) =, dcls (H,) +=, dpos (T, H) += (batch order)
inline void vit_embeddings_backward(const Tensor& demb, std::int64_t B, Tensor& dpatch, Tensor& dcls, Tensor& dpos) {
  const std::int64_t T = dpos.size(0), H = dpos.size(1), N = T - 1;
  const float* pg = demb.data<float>();
  float* dc = dcls.data<float>();
  float* dp = dpos.data<float>();
  float* da = dpatch.data<float>();
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        const float g = pg[(b * T + t) * H + h];
        dp[t * H + h] += g;
        if (t == 0)
          dc[h] += g;
        else
          da[(b * N + t - 1) * H + h] = g;
      }
}

}  // namespace cumo::cpu
