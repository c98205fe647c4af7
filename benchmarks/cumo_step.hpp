// The batch and FLOP count of bench_cpu_cumo_step, mirrored by benchmarks/torch_cpu_cumo_step.py (same
// shapes, label layout and formula; its own random ids), so that both sides time the same work. (cuda/bench_cuda_cumo_step keeps
// torch_cumo_step.py's count, which includes the vision layer after the feature layer that HF runs.)
#pragma once

#include <cstdint>
#include <vector>

#include "cumo/models/cumo.hpp"

namespace cumo::bench {

// B sequences of T = 1 + patches + text_len tokens: a BOS-like token, the image tokens at 1 … patches, then text;
// the labels are the last `labelled` text tokens (all of them when labelled < 0). Ids and pixels from a fixed seed.
struct StepBatch {
  std::int64_t B = 0, T = 0, n_img = 0;
  std::vector<std::int64_t> ids, labels;
  Tensor pixels;  // (B, 3, S, S) on the host
};

inline StepBatch make_step_batch(const models::CuMoConfig& cfg, std::int64_t B, std::int64_t text_len,
                                 std::int64_t labelled = -1) {
  CUMO_CHECK(B >= 1 && text_len >= 1 && labelled <= text_len, "make_step_batch: need B >= 1, text_len >= 1 and "
             "labelled <= text_len (got ", B, ", ", text_len, ", ", labelled, ")");
  StepBatch b;
  b.B = B;
  b.n_img = cfg.llava.vision.patches();
  b.T = 1 + b.n_img + text_len;
  const std::int64_t V = cfg.llava.text.vocab, S = cfg.llava.vision.image_size;
  const std::int64_t first_label = labelled < 0 ? 1 + b.n_img : b.T - labelled;
  b.ids.resize(std::size_t(B * b.T));
  b.labels.assign(std::size_t(B * b.T), -100);
  Rng data(1);
  for (std::int64_t s = 0; s < B; ++s)
    for (std::int64_t t = 0; t < b.T; ++t) {
      const std::size_t i = std::size_t(s * b.T + t);
      const bool image = t >= 1 && t <= b.n_img;
      b.ids[i] = image ? cfg.llava.image_token_id : std::int64_t(data.next_u32() % std::uint32_t(V - 2));
      if (t >= first_label) b.labels[i] = b.ids[i];
    }
  b.pixels = Tensor::empty({B, 3, S, S});
  data.fill_normal(b.pixels, 0.f, 1.f);
  return b;
}

// Model FLOPs of one step (forward + backward = 3 × forward): 6 · activated parameters · tokens over the vision
// layers the features depend on, the top-k connector and the LLM with its head, plus attention's 12 · L · T² · H.
inline double model_flops(const models::CuMoConfig& c, std::int64_t B, std::int64_t T, std::int64_t n_img, int k) {
  const nn::VisionConfig& v = c.llava.vision;
  const nn::DecoderConfig& t = c.llava.text;
  const double vl = double(v.feature_layer < 0 ? v.layers + 1 + v.feature_layer : v.feature_layer);
  const double vp = vl * (4.0 * v.hidden * v.hidden + k * 2.0 * v.hidden * v.ffn);
  const double v_tokens = double(B) * double(v.patches() + 1);
  const double pp = k * (double(v.feature_width()) * t.hidden + double(t.hidden) * t.hidden);
  const double head_dim = double(t.head_dim > 0 ? t.head_dim : t.hidden / t.heads);
  const double q = double(t.heads) * head_dim, kv = double(t.kv_heads > 0 ? t.kv_heads : t.heads) * head_dim;
  double tp = double(t.layers) * (2.0 * t.hidden * q + 2.0 * t.hidden * kv + 3.0 * t.hidden * t.ffn);
  tp += double(t.hidden) * t.vocab;
  const double mat = 6 * (vp * v_tokens + pp * double(B) * n_img + tp * double(B) * T);
  const double vt = v_tokens / double(B);
  const double attn = 12 * (vl * B * vt * vt * v.hidden + double(t.layers) * B * double(T) * T * q);
  return mat + attn;
}

}  // namespace cumo::bench
