#pragma once
// nn::Attention<Backend> — multi-head scaled dot-product attention with explicit backward.
//   bidirectional (CLIP ViT: q/k/v/out biases, "out_proj"), or
//   causal with grouped-query heads, RoPE and an optional key padding mask (Mistral / Qwen2 / Mixtral: "o_proj").
// Rows are tokens of B sequences of length T laid out (B*T, ·); head h reads kv head h / (heads / kv_heads).
// The core is the backend's attention_forward / attention_backward (backend/cpu/attention.hpp is the reference);
// what it keeps for the backward is the backend's choice. A KV cache serves generation on any backend:
// forward_cached() appends the new tokens' keys/values and attends over all of them.
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
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

// The token layout of a batch of B sequences of T tokens, on a backend: RoPE positions (t within each sequence,
// from `start`) and the key padding mask. Built once per forward and shared by every attention layer of a model.
struct TokenLayout {
  std::int64_t B = 0, T = 0;
  Tensor positions;  // (B*T,) i32
  Tensor key_valid;  // (B*T,) i32, 0 = a padding key no query may attend to; undefined = no padding

  // key_valid (B*T entries, or null).
  template <class Backend>
  static TokenLayout make(const Backend& be, std::int64_t B, std::int64_t T,
                          const std::vector<std::uint8_t>* key_valid = nullptr, std::int64_t start = 0) {
    CUMO_CHECK(!key_valid || std::int64_t(key_valid->size()) == B * T, "TokenLayout: key mask has ",
               key_valid ? key_valid->size() : 0, " entries for ", B, " sequences of ", T, " tokens");
    TokenLayout l{B, T, {}, {}};
    std::vector<std::int32_t> pos(std::size_t(B * T));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) pos[std::size_t(b * T + t)] = std::int32_t(start + t);
    l.positions = be.upload_i32(pos);
    if (key_valid) l.key_valid = be.upload_i32(std::vector<std::int32_t>(key_valid->begin(), key_valid->end()));
    return l;
  }
  const Tensor* mask() const { return key_valid.defined() ? &key_valid : nullptr; }
};

// Keys and values of the tokens seen so far, per layer: (B, capacity, kv_heads * head_dim) on the layer's backend,
// the first `len` used.
struct KVCache {
  Tensor k, v;
  std::int64_t len = 0;
};

template <backend::Backend Backend = backend::Cpu>
class Attention {
 public:
  Attention() = default;
  Attention(const std::string& name, AttentionConfig c, Backend backend = {}) : cfg_(std::move(c)), be_(std::move(backend)) {
    if (cfg_.kv_heads == 0) cfg_.kv_heads = cfg_.heads;
    if (cfg_.head_dim == 0) cfg_.head_dim = cfg_.hidden / cfg_.heads;
    CUMO_CHECK(cfg_.heads % cfg_.kv_heads == 0, "Attention (", name, "): ", cfg_.heads,
               " heads do not split into groups of ", cfg_.kv_heads, " kv heads");
    backend::require_head_dim<Backend>(cfg_.head_dim, "Attention (" + name + ")");
    const std::int64_t D = cfg_.head_dim;
    q_proj = Linear<Backend>(name + ".q_proj", cfg_.hidden, cfg_.heads * D, cfg_.qkv_bias, be_);
    k_proj = Linear<Backend>(name + ".k_proj", cfg_.hidden, cfg_.kv_heads * D, cfg_.qkv_bias, be_);
    v_proj = Linear<Backend>(name + ".v_proj", cfg_.hidden, cfg_.kv_heads * D, cfg_.qkv_bias, be_);
    o_proj = Linear<Backend>(name + "." + cfg_.out_name, cfg_.heads * D, cfg_.hidden, cfg_.out_bias, be_);
    if (cfg_.rope_theta > 0) inv_freq_ = be_.upload(RotaryEmbedding(D, cfg_.rope_theta).inv_freq_tensor());
  }

  Linear<Backend> q_proj, k_proj, v_proj, o_proj;

  const AttentionConfig& config() const { return cfg_; }
  void collect(ParameterList& out) {
    q_proj.collect(out);
    k_proj.collect(out);
    v_proj.collect(out);
    o_proj.collect(out);
  }

  // x (B*T, hidden) → (B*T, hidden), keeping what the backward needs. first_query > 0: only the queries at
  // t >= first_query of each sequence are computed (they still attend to every key t' <= t), and the result is
  // (B*(T − first_query), hidden): a model's last layer under a loss on the rows from first_query on needs no
  // other row (DecoderLM::set_logit_rows).
  Tensor forward(const Tensor& x, const TokenLayout& layout, std::int64_t first_query = 0) {
    constexpr const char* where = "Attention::forward";
    const Tensor xc = check_input(where, "x", x, cfg_.hidden, Backend::device);
    CUMO_CHECK(xc.size(0) == layout.B * layout.T, where, ": x has shape ", xc.shape(), " but B = ", layout.B,
               ", T = ", layout.T);
    CUMO_CHECK(first_query >= 0 && first_query < std::max<std::int64_t>(layout.T, 1), where, ": first_query ",
               first_query, " is outside the sequence of ", layout.T, " tokens");
    layout_ = layout;
    first_query_ = first_query;
    const std::int64_t Tq = layout.T - first_query;
    q_positions_ = first_query == 0 ? layout.positions : TokenLayout::make(be_, layout.B, Tq, nullptr, first_query).positions;
    q_ = q_proj.forward(first_query == 0 ? xc : rows_from(be_, xc, layout.B, layout.T, first_query));  // (B*Tq, heads*D)
    k_ = k_proj.forward(xc);  // (B*T, kv*D)
    v_ = v_proj.forward(xc);  // (B*T, kv*D)
    rotate(q_, q_positions_, cfg_.heads, /*inverse=*/false);
    rotate(k_, layout.positions, cfg_.kv_heads, /*inverse=*/false);
    ctx_ = be_.empty({layout.B * Tq, cfg_.heads * cfg_.head_dim});  // (B*Tq, heads*D)
    be_.attention_forward(q_, k_, v_, layout.mask(), shape(layout.B, Tq, layout.T, layout.T), ctx_, &saved_);
    return o_proj.forward(ctx_);  // (B*Tq, hidden)
  }
  void release_activations() {  // drops what forward() saved
    q_ = k_ = v_ = ctx_ = saved_ = Tensor();
    for (Linear<Backend>* l : {&q_proj, &k_proj, &v_proj, &o_proj}) l->release_activations();
  }
  // key_valid (B*T): 0 marks a padding key no query may attend to. Positions are t within each sequence.
  Tensor forward(const Tensor& x, std::int64_t B, std::int64_t T, const std::vector<std::uint8_t>* key_valid = nullptr) {
    return forward(x, TokenLayout::make(be_, B, T, key_valid));
  }

  // dy (B*Tq, hidden) → dx (B*T, hidden); every projection's gradient accumulates. Tq = T − first_query of the
  // forward: the rows before it get the keys' and values' gradient only.
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(saved_.defined(), "Attention::backward: no saved forward");
    const std::int64_t B = layout_.B, T = layout_.T, Tq = T - first_query_;
    const std::int64_t ldq = cfg_.heads * cfg_.head_dim, ldk = cfg_.kv_heads * cfg_.head_dim;
    const Tensor dctx = o_proj.backward(dy);  // (B*Tq, heads*D)
    Tensor dq = be_.empty({B * Tq, ldq}), dk = be_.empty({B * T, ldk}), dv = be_.empty({B * T, ldk});
    be_.attention_backward(q_, k_, v_, layout_.mask(), ctx_, saved_, dctx, shape(B, Tq, T, T), dq, dk, dv);
    rotate(dq, q_positions_, cfg_.heads, /*inverse=*/true);
    rotate(dk, layout_.positions, cfg_.kv_heads, /*inverse=*/true);
    Tensor dx;  // (B*T, hidden): the queries' part first, then the keys' and values', as in the full layer
    if (first_query_ == 0) {
      dx = q_proj.backward(dq);
    } else {
      dx = be_.zeros({B * T, cfg_.hidden});
      const std::int64_t H = cfg_.hidden;
      be_.copy_blocks(q_proj.backward(dq), 0, Tq * H, dx, first_query_ * H, T * H, Tq * H, B);
    }
    add_(be_, dx, k_proj.backward(dk));
    add_(be_, dx, v_proj.backward(dv));
    saved_ = Tensor();
    return dx;
  }

  // Rows t >= first of each of the B sequences of T rows of x (B*T, W) → (B*(T − first), W).
  static Tensor rows_from(const Backend& be, const Tensor& x, std::int64_t B, std::int64_t T, std::int64_t first) {
    const std::int64_t W = x.size(1), Tq = T - first;
    Tensor out = be.empty({B * Tq, W});  // (B*Tq, W)
    be.copy_blocks(x, first * W, T * W, out, 0, Tq * W, Tq * W, B);
    return out;
  }

  // ---- generation ---------------------------------------------------------------------------------------------
  KVCache make_cache(std::int64_t B, std::int64_t capacity) const {
    const std::int64_t W = cfg_.kv_heads * cfg_.head_dim;
    return {be_.zeros({B, capacity, W}), be_.zeros({B, capacity, W}), 0};
  }
  // x (B*t, hidden): t new tokens per sequence at positions cache.len … cache.len + t − 1 (causal among them).
  // key_valid (B * (cache.len + t)) optionally marks padding keys over everything cached so far. Keeps nothing.
  Tensor forward_cached(const Tensor& x, std::int64_t B, std::int64_t t, KVCache& cache,
                        const std::vector<std::uint8_t>* key_valid = nullptr) const {
    constexpr const char* where = "Attention::forward_cached";
    const Tensor xc = check_input(where, "x", x, cfg_.hidden, Backend::device);
    const std::int64_t past = cache.len, S = past + t, W = cfg_.kv_heads * cfg_.head_dim;
    CUMO_CHECK(xc.size(0) == B * t, where, ": x has shape ", xc.shape(), " but B = ", B, ", t = ", t);
    CUMO_CHECK(cache.k.defined() && cache.k.dim() == 3 && cache.k.size(0) == B && cache.k.size(2) == W, where,
               ": the cache has shape ", cache.k.shape(), " but expected (", B, ", *, ", W, ")");
    CUMO_CHECK(S <= cache.k.size(1), where, ": the cache holds ", cache.k.size(1), " tokens, ", S, " needed");
    CUMO_CHECK(!key_valid || std::int64_t(key_valid->size()) == B * S, where, ": key mask has ",
               key_valid ? key_valid->size() : 0, " entries, expected B * (cached + new) = ", B * S);
    const std::int64_t C = cache.k.size(1);
    Tensor q = q_proj.apply(xc), k = k_proj.apply(xc), v = v_proj.apply(xc);  // (B*t, ·)
    const Tensor positions = TokenLayout::make(be_, B, t, nullptr, past).positions;
    rotate(q, positions, cfg_.heads, /*inverse=*/false);
    rotate(k, positions, cfg_.kv_heads, /*inverse=*/false);
    Tensor ck = cache.k.view({B * C, W}), cv = cache.v.view({B * C, W});
    be_.copy_blocks(k, 0, t * W, ck, past * W, C * W, t * W, B);  // rows past … S − 1 of each sequence
    be_.copy_blocks(v, 0, t * W, cv, past * W, C * W, t * W, B);
    cache.len = S;
    Tensor mask;
    if (key_valid) mask = be_.upload_i32(std::vector<std::int32_t>(key_valid->begin(), key_valid->end()));
    Tensor ctx = be_.empty({B * t, cfg_.heads * cfg_.head_dim});
    be_.attention_forward(q, ck, cv, key_valid ? &mask : nullptr, shape(B, t, S, C), ctx, nullptr);
    return o_proj.apply(ctx);  // (B*t, hidden)
  }

 private:
  backend::AttentionShape shape(std::int64_t B, std::int64_t Tq, std::int64_t S, std::int64_t stride) const {
    return {B, Tq, S, stride, cfg_.heads, cfg_.kv_heads, cfg_.head_dim, cfg_.causal};
  }
  // RoPE on q or k (in place) at `positions`, or its inverse on their gradients; nothing without a rotary
  // embedding.
  void rotate(Tensor& x, const Tensor& positions, std::int64_t heads, bool inverse) const {
    if (inv_freq_.defined()) be_.rope(x, positions, inv_freq_, heads, inverse, x);
  }

  AttentionConfig cfg_;
  [[no_unique_address]] Backend be_;
  Tensor inv_freq_;           // (D/2,) θ_i on the backend; undefined without RoPE
  TokenLayout layout_;        // of the last forward
  std::int64_t first_query_ = 0;
  Tensor q_positions_;        // (B*Tq,) i32: the queries' RoPE positions
  Tensor q_, k_, v_, ctx_;    // (B*Tq, H*D) after RoPE, (B*T, G*D) ×2, (B*Tq, H*D)
  Tensor saved_;              // the backend's attention state for the backward
};

}  // namespace cumo::nn
