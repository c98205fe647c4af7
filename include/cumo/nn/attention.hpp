#pragma once
// nn::Attention<Backend> — multi-head scaled dot-product attention with explicit backward.
//   bidirectional (CLIP ViT: q/k/v/out biases, "out_proj"), or
//   causal with grouped-query heads, RoPE and an optional key padding mask (Mistral / Qwen2 / Mixtral: "o_proj").
// Rows are tokens of B sequences of length T laid out (B*T, ·); head h reads kv head h / (heads / kv_heads).
// A KV cache serves generation: forward_cached() appends the new tokens' keys/values and attends over all of them
// (CPU only). On another backend the core is Backend::attention_forward / attention_backward (a fused kernel that keeps
// the row logsumexp instead of the probabilities) and Backend::rope.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cumo/nn/linear.hpp"
#include "cumo/nn/rope.hpp"

namespace cumo::nn {

struct AttentionConfig {
  std::int64_t hidden = 0;
  std::int64_t heads = 0;
  std::int64_t kv_heads = 0;  // 0 = heads (no GQA)
  std::int64_t head_dim = 0;  // 0 = hidden / heads
  bool qkv_bias = false;
  bool out_bias = false;
  bool causal = false;
  double rope_theta = 0.0;          // 0 = no rotary embedding (CLIP uses learned absolute positions instead)
  std::string out_name = "o_proj";  // CLIP calls it "out_proj"
};

// Keys and values of the tokens seen so far, per layer: (B, capacity, kv_heads * head_dim), the first `len` used.
struct KVCache {
  Tensor k, v;
  std::int64_t len = 0;
};

template <class Backend = backend::Cpu>
class Attention {
 public:
  Attention() = default;
  Attention(const std::string& name, AttentionConfig c) : cfg_(std::move(c)) {
    if (cfg_.kv_heads == 0) cfg_.kv_heads = cfg_.heads;
    if (cfg_.head_dim == 0) cfg_.head_dim = cfg_.hidden / cfg_.heads;
    CUMO_CHECK(cfg_.heads % cfg_.kv_heads == 0, "Attention (", name, "): ", cfg_.heads,
               " heads do not split into groups of ", cfg_.kv_heads, " kv heads");
    const std::int64_t D = cfg_.head_dim;
    q_proj = Linear<Backend>(name + ".q_proj", cfg_.hidden, cfg_.heads * D, cfg_.qkv_bias);
    k_proj = Linear<Backend>(name + ".k_proj", cfg_.hidden, cfg_.kv_heads * D, cfg_.qkv_bias);
    v_proj = Linear<Backend>(name + ".v_proj", cfg_.hidden, cfg_.kv_heads * D, cfg_.qkv_bias);
    o_proj = Linear<Backend>(name + "." + cfg_.out_name, cfg_.heads * D, cfg_.hidden, cfg_.out_bias);
    if (cfg_.rope_theta > 0) {
      rope_ = RotaryEmbedding(D, cfg_.rope_theta);
      if constexpr (!on_cpu<Backend>) inv_freq_ = rope_.inv_freq_tensor().to(Backend::device);
    }
  }

  Linear<Backend> q_proj, k_proj, v_proj, o_proj;

  const AttentionConfig& config() const { return cfg_; }
  void collect(ParameterList& out) {
    q_proj.collect(out);
    k_proj.collect(out);
    v_proj.collect(out);
    o_proj.collect(out);
  }

  // x (B*T, hidden) → (B*T, hidden). key_valid (B*T): 0 marks a padding key no query may attend to.
  // positions (B*T): RoPE positions; default t within each sequence.
  Tensor forward(const Tensor& x, std::int64_t B, std::int64_t T, const std::vector<std::uint8_t>* key_valid = nullptr,
                 const std::vector<std::int64_t>* positions = nullptr) {
    constexpr const char* where = "Attention::forward";
    const Tensor xc = check_input(where, "x", x, cfg_.hidden, Backend::device);
    CUMO_CHECK(xc.size(0) == B * T, where, ": x has shape ", xc.shape(), " but B = ", B, ", T = ", T);
    CUMO_CHECK(!key_valid || std::int64_t(key_valid->size()) == B * T, where, ": key mask has ",
               key_valid ? key_valid->size() : 0, " entries for ", B * T, " tokens");
    B_ = B;
    T_ = T;
    q_ = q_proj.forward(xc);  // (B*T, heads*D)
    k_ = k_proj.forward(xc);  // (B*T, kv*D)
    v_ = v_proj.forward(xc);  // (B*T, kv*D)
    pos_ = positions ? *positions : default_positions(B, T, 0);
    if constexpr (on_cpu<Backend>) {
      if (cfg_.rope_theta > 0) {
        rope_.rotate(q_, cfg_.heads, pos_);
        rope_.rotate(k_, cfg_.kv_heads, pos_);
      }
      probs_ = Tensor::empty({B * cfg_.heads, T, T});
      Tensor ctx = matrix(B * T, cfg_.heads * cfg_.head_dim);
      attend(q_, k_, v_, B, T, T, 0, key_valid, probs_, ctx);
      return o_proj.forward(ctx);  // (B*T, hidden)
    } else {
      return forward_device(key_valid);
    }
  }

  // dy (B*T, hidden) → dx (B*T, hidden); every projection's gradient accumulates.
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(probs_.defined() || lse_.defined(), "Attention::backward: no saved forward");
    const std::int64_t B = B_, T = T_, H = cfg_.heads, G = cfg_.kv_heads, D = cfg_.head_dim, per = H / G;
    const std::int64_t ldq = H * D, ldk = G * D;
    const float scale = float(1.0 / std::sqrt(double(D)));
    const Tensor dctx = o_proj.backward(dy);  // (B*T, H*D)
    if constexpr (on_cpu<Backend>) {
      Tensor dq = zeros(B * T, ldq), dk = zeros(B * T, ldk), dv = zeros(B * T, ldk);
      const float *pq = q_.data<float>(), *pk = k_.data<float>(), *pv = v_.data<float>(), *pc = dctx.data<float>();
      float *pdq = dq.data<float>(), *pdk = dk.data<float>(), *pdv = dv.data<float>();
      // One work item per (sequence, kv head): the heads of a group write the same dk/dv rows, so they run in order.
      cpu::parallel_for(B * G, [&](std::int64_t bg) {
        const std::int64_t b = bg / G, g = bg % G;
        std::vector<float> dP(std::size_t(T * T));
        const float* kb = pk + b * T * ldk + g * D;
        const float* vb = pv + b * T * ldk + g * D;
        for (std::int64_t h = g * per; h < (g + 1) * per; ++h) {
          const float* P = probs_.data<float>() + (b * H + h) * T * T;  // (T, T)
          const float* dc = pc + b * T * ldq + h * D;                    // (T, D) stride ldq
          cpu::gemm(cpu::Op::N, cpu::Op::T, T, T, D, 1.f, dc, ldq, vb, ldk, 0.f, dP.data(), T);  // dP = dctx v^T
          cpu::gemm(cpu::Op::T, cpu::Op::N, T, D, T, 1.f, P, T, dc, ldq, 1.f, pdv + b * T * ldk + g * D, ldk);  // dv
          for (std::int64_t i = 0; i < T; ++i) {  // dS = P ⊙ (dP − Σ_j dP P)
            double s = 0;
            for (std::int64_t j = 0; j < T; ++j) s += double(dP[std::size_t(i * T + j)]) * P[i * T + j];
            for (std::int64_t j = 0; j < T; ++j)
              dP[std::size_t(i * T + j)] = P[i * T + j] * (dP[std::size_t(i * T + j)] - float(s));
          }
          cpu::gemm(cpu::Op::N, cpu::Op::N, T, D, T, scale, dP.data(), T, kb, ldk, 0.f, pdq + b * T * ldq + h * D,
                    ldq);  // dq = dS k
          cpu::gemm(cpu::Op::T, cpu::Op::N, T, D, T, scale, dP.data(), T, pq + b * T * ldq + h * D, ldq, 1.f,
                    pdk + b * T * ldk + g * D, ldk);  // dk += dS^T q
        }
      }, 4 * per * T * T * D);
      if (cfg_.rope_theta > 0) {
        rope_.rotate(dq, H, pos_, /*inverse=*/true);
        rope_.rotate(dk, G, pos_, /*inverse=*/true);
      }
      Tensor dx = q_proj.backward(dq);
      add_(dx, k_proj.backward(dk));
      add_(dx, v_proj.backward(dv));
      return dx;
    } else {
      return backward_device(dctx);
    }
  }

  // ---- generation ---------------------------------------------------------------------------------------------
  KVCache make_cache(std::int64_t B, std::int64_t capacity) const {
    static_assert(on_cpu<Backend>, "Attention::make_cache: generation with a KV cache runs on the CPU backend");
    return {Tensor::zeros({B, capacity, cfg_.kv_heads * cfg_.head_dim}),
            Tensor::zeros({B, capacity, cfg_.kv_heads * cfg_.head_dim}), 0};
  }
  // x (B*t, hidden): t new tokens per sequence at positions cache.len … cache.len + t − 1 (causal among them).
  // key_valid (B * (cache.len + t)) optionally marks padding keys over everything cached so far. No backward.
  Tensor forward_cached(const Tensor& x, std::int64_t B, std::int64_t t, KVCache& cache,
                        const std::vector<std::uint8_t>* key_valid = nullptr) const {
    static_assert(on_cpu<Backend>, "Attention::forward_cached: generation with a KV cache runs on the CPU backend");
    constexpr const char* where = "Attention::forward_cached";
    const Tensor xc = check_input(where, "x", x, cfg_.hidden);
    const std::int64_t past = cache.len, S = past + t, W = cfg_.kv_heads * cfg_.head_dim;
    CUMO_CHECK(xc.size(0) == B * t, where, ": x has shape ", xc.shape(), " but B = ", B, ", t = ", t);
    CUMO_CHECK(cache.k.defined() && cache.k.size(0) == B && cache.k.size(2) == W, where,
               ": the cache has shape ", cache.k.shape(), " but expected (", B, ", *, ", W, ")");
    CUMO_CHECK(S <= cache.k.size(1), where, ": the cache holds ", cache.k.size(1), " tokens, ", S, " needed");
    CUMO_CHECK(!key_valid || std::int64_t(key_valid->size()) == B * S, where, ": key mask has ",
               key_valid ? key_valid->size() : 0, " entries, expected B * (cached + new) = ", B * S);
    Tensor q = q_proj.apply(xc), k = k_proj.apply(xc), v = v_proj.apply(xc);
    const auto pos = default_positions(B, t, past);
    if (cfg_.rope_theta > 0) {
      rope_.rotate(q, cfg_.heads, pos);
      rope_.rotate(k, cfg_.kv_heads, pos);
    }
    const std::int64_t C = cache.k.size(1);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < t; ++i) {
        std::copy_n(k.data<float>() + (b * t + i) * W, W, cache.k.data<float>() + (b * C + past + i) * W);
        std::copy_n(v.data<float>() + (b * t + i) * W, W, cache.v.data<float>() + (b * C + past + i) * W);
      }
    cache.len = S;
    // Attend over the cache rows [0, S) of each sequence: a (B*C, W) view with the sequence stride C.
    Tensor probs = Tensor::empty({B * cfg_.heads, t, S});
    Tensor ctx = matrix(B * t, cfg_.heads * cfg_.head_dim);
    attend(q, cache.k.view({B * C, W}), cache.v.view({B * C, W}), B, t, S, past, key_valid, probs, ctx, C);
    return o_proj.apply(ctx);
  }

 private:
  // The fused device kernel: q, k, v rotated in place, ctx and the row logsumexp kept for the backward.
  Tensor forward_device(const std::vector<std::uint8_t>* key_valid) {
    const std::int64_t B = B_, T = T_;
    if (cfg_.rope_theta > 0) {
      pos_dev_ = Backend::upload_i32(std::vector<std::int32_t>(pos_.begin(), pos_.end()));  // (B*T,)
      Backend::rope(q_, pos_dev_, inv_freq_, cfg_.heads, /*inverse=*/false, q_);
      Backend::rope(k_, pos_dev_, inv_freq_, cfg_.kv_heads, /*inverse=*/false, k_);
    }
    key_valid_dev_ = Tensor();
    if (key_valid) key_valid_dev_ = Backend::upload_i32(std::vector<std::int32_t>(key_valid->begin(), key_valid->end()));
    ctx_ = matrix(B * T, cfg_.heads * cfg_.head_dim, Backend::device);
    lse_ = Tensor::empty({B, cfg_.heads, T}, DType::f32, Backend::device);
    Backend::attention_forward(q_, k_, v_, key_valid_dev_.defined() ? &key_valid_dev_ : nullptr, B, T, cfg_.heads,
                               cfg_.kv_heads, cfg_.head_dim, cfg_.causal, ctx_, lse_);
    return o_proj.forward(ctx_);  // (B*T, hidden)
  }
  Tensor backward_device(const Tensor& dctx) {
    const std::int64_t N = B_ * T_, ldq = cfg_.heads * cfg_.head_dim, ldk = cfg_.kv_heads * cfg_.head_dim;
    Tensor dq = matrix(N, ldq, Backend::device), dk = matrix(N, ldk, Backend::device);
    Tensor dv = matrix(N, ldk, Backend::device);
    Backend::attention_backward(q_, k_, v_, key_valid_dev_.defined() ? &key_valid_dev_ : nullptr, ctx_, lse_, dctx,
                                B_, T_, cfg_.heads, cfg_.kv_heads, cfg_.head_dim, cfg_.causal, dq, dk, dv);
    if (cfg_.rope_theta > 0) {
      Backend::rope(dq, pos_dev_, inv_freq_, cfg_.heads, /*inverse=*/true, dq);
      Backend::rope(dk, pos_dev_, inv_freq_, cfg_.kv_heads, /*inverse=*/true, dk);
    }
    Tensor dx = q_proj.backward(dq);
    add_<Backend>(dx, k_proj.backward(dk));
    add_<Backend>(dx, v_proj.backward(dv));
    return dx;
  }
  static std::vector<std::int64_t> default_positions(std::int64_t B, std::int64_t T, std::int64_t start) {
    std::vector<std::int64_t> p(std::size_t(B * T));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) p[std::size_t(b * T + t)] = start + t;
    return p;
  }

  // Queries (B*Tq) against keys/values (rows b*kstride … b*kstride + S): probs (B*heads, Tq, S), ctx (B*Tq, heads*D).
  // Query i sits at absolute position past + i; causal masks keys j > past + i.
  void attend(const Tensor& q, const Tensor& k, const Tensor& v, std::int64_t B, std::int64_t Tq, std::int64_t S,
              std::int64_t past, const std::vector<std::uint8_t>* key_valid, Tensor& probs, Tensor& ctx,
              std::int64_t kstride = -1) const {
    if (kstride < 0) kstride = S;
    const std::int64_t H = cfg_.heads, G = cfg_.kv_heads, D = cfg_.head_dim, per = H / G;
    const std::int64_t ldq = H * D, ldk = G * D;
    const float scale = float(1.0 / std::sqrt(double(D)));
    const float* pq = q.data<float>();
    const float* pk = k.data<float>();
    const float* pv = v.data<float>();
    float* pc = ctx.data<float>();
    cpu::parallel_for(B * H, [&](std::int64_t bh) {
      const std::int64_t b = bh / H, h = bh % H, g = h / per;
      float* P = probs.data<float>() + bh * Tq * S;  // (Tq, S)
      cpu::gemm(cpu::Op::N, cpu::Op::T, Tq, S, D, scale, pq + b * Tq * ldq + h * D, ldq, pk + b * kstride * ldk + g * D,
                ldk, 0.f, P, S);  // scores = q k^T / √D
      for (std::int64_t i = 0; i < Tq; ++i) {
        float* row = P + i * S;
        float mx = -std::numeric_limits<float>::infinity();
        for (std::int64_t j = 0; j < S; ++j) {
          const bool masked = (cfg_.causal && j > past + i) || (key_valid && !(*key_valid)[std::size_t(b * S + j)]);
          if (masked) row[j] = -std::numeric_limits<float>::infinity();
          mx = row[j] > mx ? row[j] : mx;
        }
        if (mx == -std::numeric_limits<float>::infinity()) {  // nothing to attend to (a padding query): output 0
          std::fill(row, row + S, 0.f);
          continue;
        }
        double sum = 0;
        for (std::int64_t j = 0; j < S; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const float inv = float(1.0 / sum);
        for (std::int64_t j = 0; j < S; ++j) row[j] *= inv;
      }
      cpu::gemm(cpu::Op::N, cpu::Op::N, Tq, D, S, 1.f, P, S, pv + b * kstride * ldk + g * D, ldk, 0.f,
                pc + b * Tq * ldq + h * D, ldq);  // ctx = P v
    }, 4 * S * D * Tq);
  }

  AttentionConfig cfg_;
  RotaryEmbedding rope_;
  std::int64_t B_ = 0, T_ = 0;
  Tensor q_, k_, v_, probs_;  // (B*T, H*D) after RoPE, (B*T, G*D) ×2, (B*H, T, T) (CPU)
  std::vector<std::int64_t> pos_;
  Tensor inv_freq_, pos_dev_, key_valid_dev_, ctx_, lse_;  // other backends: (D/2,), (B*T,) ×2, (B*T, H*D), (B, H, T)
};

}  // namespace cumo::nn
