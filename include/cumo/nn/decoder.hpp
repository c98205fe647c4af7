#pragma once
// nn::DecoderLM — a Mistral-family causal LM with explicit backward:
//   embed_tokens → L × [x += attn(rms1 x) (causal, GQA, RoPE); x += ffn(rms2 x)] → norm → lm_head
// Variants read from the HF config: Mistral (no biases), Qwen2 (q/k/v biases, tied embeddings), Mixtral (every FFN
// a SparseMoE<Router<TopKDynamic>, Expert<GatedMLP<SiLU>>>, loss += router_aux_loss_coef · HF's
// load_balancing_loss_func). Any dense FFN can also be upcycled into such a block (DecoderFFN::upcycle).
//
// Loss: HF's causal-LM loss, mean CE of logits[:, :-1] against labels[:, 1:], label −100 ignored.
// Mixtral's aux loss, as HF computes it: router logits of ALL layers concatenated, E · Σ_e f_e P_e with f_e the
// share of all k slots (over all layers' tokens) that chose e and P_e the mean probability — one loss over the
// concatenation, not a mean of per-layer losses, so its gradient couples the layers through f.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/nn/attention.hpp"
#include "cumo/nn/embedding.hpp"
#include "cumo/nn/mlp.hpp"
#include "cumo/nn/rmsnorm.hpp"

namespace cumo::nn {

struct DecoderConfig {
  std::string model_type = "mistral";  // mistral | qwen2 | mixtral (llama reads like mistral)
  std::int64_t vocab = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn = 0;
  double rms_eps = 1e-6, rope_theta = 10000.0;
  bool qkv_bias = false, tie_embeddings = false;
  int experts = 0, top_k = 2;  // experts > 0: every FFN is sparse (Mixtral)
  double aux_coef = 0.0;       // router_aux_loss_coef

  static DecoderConfig from_json(const nlohmann::json& j) {
    DecoderConfig c;
    c.model_type = j.value("model_type", std::string("mistral"));
    c.vocab = j.at("vocab_size").get<std::int64_t>();
    c.hidden = j.at("hidden_size").get<std::int64_t>();
    c.layers = j.at("num_hidden_layers").get<std::int64_t>();
    c.heads = j.at("num_attention_heads").get<std::int64_t>();
    c.kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                     ? j["num_key_value_heads"].get<std::int64_t>()
                     : c.heads;
    c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null() ? j["head_dim"].get<std::int64_t>()
                                                                    : c.hidden / c.heads;
    c.ffn = j.at("intermediate_size").get<std::int64_t>();
    c.rms_eps = j.value("rms_norm_eps", 1e-6);
    // transformers 5 nests θ in rope_parameters; 4.x has a top-level rope_theta
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object() && j["rope_parameters"].contains("rope_theta"))
      c.rope_theta = j["rope_parameters"]["rope_theta"].get<double>();
    else if (j.contains("rope_theta") && !j["rope_theta"].is_null())
      c.rope_theta = j["rope_theta"].get<double>();
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
      const std::string type = j["rope_parameters"].value("rope_type", std::string("default"));
      CUMO_CHECK(type == "default", "DecoderConfig: rope_type '", type, "' is not supported (only 'default')");
    }
    c.qkv_bias = c.model_type == "qwen2" || j.value("attention_bias", false);
    c.tie_embeddings = j.value("tie_word_embeddings", false);
    if (j.contains("num_local_experts") && !j["num_local_experts"].is_null()) {
      c.experts = j["num_local_experts"].get<int>();
      c.top_k = j.value("num_experts_per_tok", 2);
      c.aux_coef = j.value("router_aux_loss_coef", 0.0);
    }
    const std::string act = j.value("hidden_act", std::string("silu"));
    CUMO_CHECK(act == "silu", "DecoderConfig: hidden_act '", act, "' is not supported (SwiGLU uses silu)");
    return c;
  }
};

template <class Backend = backend::Cpu>
using DecoderMoE = SparseMoE<Router<TopKDynamic>, Expert<GatedMLP<SiLU>>, Backend>;
template <class Backend = backend::Cpu>
using DecoderFFN = FeedForward<DenseGatedMLP<SiLU, Backend>, DecoderMoE<Backend>>;

template <class Backend = backend::Cpu>
class DecoderLayer {
 public:
  DecoderLayer() = default;
  DecoderLayer(const std::string& name, const DecoderConfig& c)
      : input_layernorm(name + ".input_layernorm", c.hidden, c.rms_eps),
        post_attention_layernorm(name + ".post_attention_layernorm", c.hidden, c.rms_eps),
        self_attn(name + ".self_attn",
                  AttentionConfig{c.hidden, c.heads, c.kv_heads, c.head_dim, c.qkv_bias, false, true, c.rope_theta, "o_proj"}),
        mlp(c.experts > 0 ? FFN(name + ".mlp", MoE(c.hidden, c.ffn, c.experts, moe_options(), TopKDynamic{c.top_k}))
                          : FFN(name + ".mlp", DenseGatedMLP<SiLU, Backend>(name + ".mlp", c.hidden, c.ffn))) {}

  using FFN = DecoderFFN<Backend>;
  using MoE = DecoderMoE<Backend>;

  RMSNorm<Backend> input_layernorm, post_attention_layernorm;
  Attention<Backend> self_attn;
  FFN mlp;

  static SparseMoEOptions moe_options() {
    SparseMoEOptions o;
    o.balance = BalanceCounts::all_k;  // HF Mixtral counts every slot
    return o;
  }
  void collect(ParameterList& out) {
    input_layernorm.collect(out);
    self_attn.collect(out);
    post_attention_layernorm.collect(out);
    mlp.collect(out);
  }
  Tensor forward(const Tensor& x, std::int64_t B, std::int64_t T, const std::vector<std::uint8_t>* key_valid) {
    Tensor h = add<Backend>(x, self_attn.forward(input_layernorm.forward(x), B, T, key_valid));
    return add<Backend>(h, mlp.forward(post_attention_layernorm.forward(h), ForwardArgs{1, true}));
  }
  // router_dlogits (N, E): an extra gradient on this layer's router logits (the cross-layer aux loss).
  Tensor backward(const Tensor& dy, const Tensor* router_dlogits = nullptr) {
    Tensor dffn_in = mlp.backward(dy, AuxLossWeights{});
    if (router_dlogits) {
      auto& router = mlp.sparse().router();
      const RouterOutput& ro = mlp.sparse().router_output();
      Backend::linear_dweight(*router_dlogits, ro.x, router.weight.grad);                     // (E, H)
      Backend::linear_dinput(*router_dlogits, router.weight.value, dffn_in, /*accumulate=*/true);  // (N, H)
    }
    Tensor dh = add<Backend>(dy, post_attention_layernorm.backward(dffn_in));
    return add<Backend>(dh, input_layernorm.backward(self_attn.backward(dh)));
  }
};

template <class Backend = backend::Cpu>
class DecoderLM {
 public:
  // `model_prefix`: "model." (Mistral/Qwen2/Mixtral), "model.language_model." inside LLaVA (transformers 5).
  explicit DecoderLM(DecoderConfig c, const std::string& model_prefix = "model.",
                     const std::string& lm_head_name = "lm_head")
      : embed_tokens(model_prefix + "embed_tokens", c.vocab, c.hidden),
        norm(model_prefix + "norm", c.hidden, c.rms_eps),
        cfg_(c) {
    if (!c.tie_embeddings) lm_head = Linear<Backend>(lm_head_name, c.hidden, c.vocab, false);
    layers.reserve(std::size_t(c.layers));
    for (std::int64_t l = 0; l < c.layers; ++l) layers.emplace_back(model_prefix + "layers." + std::to_string(l), c);
  }

  Embedding<Backend> embed_tokens;
  std::vector<DecoderLayer<Backend>> layers;
  RMSNorm<Backend> norm;
  Linear<Backend> lm_head;  // unused (no parameters) when the embeddings are tied

  const DecoderConfig& config() const { return cfg_; }

  ParameterList parameters() {
    ParameterList p;
    embed_tokens.collect(p);
    for (auto& l : layers) l.collect(p);
    norm.collect(p);
    if (!cfg_.tie_embeddings) lm_head.collect(p);
    return p;
  }

  struct Output {
    Tensor logits;       // (B*T, V)
    double loss = 0;     // ce + aux_coef · aux (what backward() differentiates)
    double ce = 0;       // mean CE over the counted targets
    double aux = 0;      // HF load_balancing_loss_func over all sparse layers (0 when dense)
    std::int64_t targets = 0;
  };

  // ids (B*T) → embeddings (B*T, H); the ids are kept for backward_embeddings().
  Tensor embed(const std::vector<std::int64_t>& ids) { return embed_tokens.forward(ids); }

  // x (B*T, H) → logits and, with labels (B*T), the loss. key_valid (B*T): 0 = padding key.
  Output forward_embeds(const Tensor& x, std::int64_t B, std::int64_t T, const std::vector<std::int64_t>* labels = nullptr,
                        const std::vector<std::uint8_t>* key_valid = nullptr) {
    constexpr const char* where = "DecoderLM::forward";
    const Tensor xc = check_input(where, "inputs_embeds", x, cfg_.hidden, Backend::device);
    CUMO_CHECK(xc.size(0) == B * T, where, ": inputs_embeds has shape ", xc.shape(), " but B = ", B, ", T = ", T);
    B_ = B;
    T_ = T;
    Tensor h = xc;
    for (auto& l : layers) h = l.forward(h, B, T, key_valid);
    hn_ = norm.forward(h);  // (B*T, H)
    Output out;
    out.logits = head(hn_);  // (B*T, V)
    logits_ = out.logits;
    dlogits_ = Tensor();
    if (labels) {
      CUMO_CHECK(std::int64_t(labels->size()) == B * T, where, ": ", labels->size(), " labels for ", B * T, " tokens");
      if constexpr (on_cpu<Backend>) {
        causal_lm_loss(*labels, out);
      } else {
        dlogits_ = matrix(B * T, cfg_.vocab, Backend::device);
        const auto r = Backend::causal_lm_loss(logits_, *labels, B, T, dlogits_);  // one host sync: the loss
        out.ce = r.loss;
        out.targets = r.targets;
      }
    }
    aux_dlogits_.assign(layers.size(), Tensor());
    mixtral_aux(out);
    out.loss = out.ce + cfg_.aux_coef * out.aux;
    return out;
  }
  Output forward(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                 const std::vector<std::int64_t>* labels = nullptr, const std::vector<std::uint8_t>* key_valid = nullptr) {
    return forward_embeds(embed(ids), B, T, labels, key_valid);
  }

  // d loss / d everything, scaled by `dloss`; returns d inputs_embeds (B*T, H). Call backward_embeddings() with it
  // (or let backward_all() do so) to reach the embedding table.
  Tensor backward(float dloss = 1.f) {
    CUMO_CHECK(dlogits_.defined(), "DecoderLM::backward: the last forward had no labels (nothing to differentiate)");
    Tensor dl = dlogits_.clone();
    scale_<Backend>(dl, dloss);
    Tensor dh = norm.backward(head_backward(dl, hn_));
    for (std::size_t l = layers.size(); l-- > 0;) {
      Tensor scaled;  // the cross-layer aux loss's gradient on this layer's router logits
      if (aux_dlogits_.size() == layers.size() && aux_dlogits_[l].defined() && cfg_.aux_coef != 0.0) {
        scaled = aux_dlogits_[l].clone();
        scale_<Backend>(scaled, float(cfg_.aux_coef) * dloss);
      }
      dh = layers[l].backward(dh, scaled.defined() ? &scaled : nullptr);
    }
    return dh;
  }
  void backward_embeddings(const Tensor& dx, const std::vector<bool>* skip = nullptr) { embed_tokens.backward(dx, skip); }
  void backward_all(float dloss = 1.f) { backward_embeddings(backward(dloss)); }

  // The LM head (the tied embedding table or lm_head): hn (N, H) final-norm output → logits (N, V), at the layers'
  // GEMM precision. head_backward: dlogits (N, V) → d hn (N, H), the head weight's gradient accumulating. Public for
  // callers that put their own loss on the logits (models/llava_mod.hpp's StudentPass).
  Tensor head(const Tensor& hn) const {
    const Tensor x = check_input("DecoderLM::head", "hn", hn, cfg_.hidden, Backend::device);
    Tensor logits = matrix(x.size(0), cfg_.vocab, Backend::device);
    const Tensor& W = head_weight().value;
    if constexpr (on_cpu<Backend>)
      Backend::linear(x, W, logits);  // (N, V)
    else
      Backend::dense_linear(x, W, nullptr, logits);  // (N, V)
    return logits;
  }
  Tensor head_backward(const Tensor& dlogits, const Tensor& hn_in) {
    constexpr const char* where = "DecoderLM::head_backward";
    const Tensor hn = check_input(where, "hn", hn_in, cfg_.hidden, Backend::device);
    const Tensor dl = check_input(where, "dlogits", dlogits, cfg_.vocab, Backend::device);
    const std::int64_t N = hn.size(0), H = cfg_.hidden, V = cfg_.vocab;
    CUMO_CHECK(dl.size(0) == N, where, ": dlogits has shape ", dl.shape(), " but hn has ", hn.shape());
    Parameter& W = head_weight();
    Tensor dh = matrix(N, H, Backend::device);
    if constexpr (on_cpu<Backend>) {
      cpu::gemm(cpu::Op::T, cpu::Op::N, V, H, N, 1.f, dl.data<float>(), V, hn.data<float>(), H, 1.f,
                W.grad.data<float>(), H);  // dW (V, H) +=
      cpu::gemm(cpu::Op::N, cpu::Op::N, N, H, V, 1.f, dl.data<float>(), V, W.value.data<float>(), H, 0.f,
                dh.data<float>(), H);  // (N, H)
    } else {
      Backend::dense_linear_backward(dl, hn, W.value, W.grad, nullptr, dh);  // dW (V, H) +=, dh (N, H)
    }
    return dh;
  }

  // Router logits (N, E) of every sparse layer in the last forward.
  std::vector<Tensor> router_logits() const {
    std::vector<Tensor> r;
    for (const auto& l : layers)
      if (l.mlp.is_sparse()) r.push_back(l.mlp.sparse().router_output().logits);
    return r;
  }

  // ---- generation ---------------------------------------------------------------------------------------------
  std::vector<KVCache> make_cache(std::int64_t B, std::int64_t capacity) const {
    static_assert(on_cpu<Backend>, "DecoderLM::make_cache: generation runs on the CPU backend");
    std::vector<KVCache> c;
    for (const auto& l : layers) c.push_back(l.self_attn.make_cache(B, capacity));
    return c;
  }
  // ids (B*t) of t new tokens per sequence → logits (B*t, V), appending to the caches. Dense FFNs only for now
  // (a sparse FFN runs its training forward, which is correct but keeps saved state).
  Tensor forward_cached(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t t,
                        std::vector<KVCache>& cache) {
    static_assert(on_cpu<Backend>, "DecoderLM::forward_cached: generation runs on the CPU backend");
    CUMO_CHECK(cache.size() == layers.size(), "DecoderLM::forward_cached: ", cache.size(), " caches for ",
               layers.size(), " layers");
    Tensor h = embed_tokens.apply(ids);
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto& L = layers[l];
      h = add<Backend>(h, L.self_attn.forward_cached(L.input_layernorm.apply(h), B, t, cache[l]));
      h = add<Backend>(h, L.mlp.forward(L.post_attention_layernorm.apply(h), ForwardArgs{1, false}));
    }
    return head(norm.apply(h));  // (B*t, V)
  }

 private:
  Parameter& head_weight() { return cfg_.tie_embeddings ? embed_tokens.weight : lm_head.weight; }
  const Parameter& head_weight() const { return cfg_.tie_embeddings ? embed_tokens.weight : lm_head.weight; }

  // mean over counted targets of logsumexp(z) − z_label, shifted by one; dlogits_ = (softmax − onehot) / n
  void causal_lm_loss(const std::vector<std::int64_t>& labels, Output& out) {
    const std::int64_t B = B_, T = T_, V = cfg_.vocab;
    dlogits_ = zeros(B * T, V);
    std::int64_t n = 0;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t + 1 < T; ++t) {
        const std::int64_t y = labels[std::size_t(b * T + t + 1)];
        if (y == -100) continue;
        CUMO_CHECK(y >= 0 && y < V, "DecoderLM: label ", y, " at (", b, ", ", t + 1, ") is outside [0, ", V, ")");
        ++n;
      }
    out.targets = n;
    if (n == 0) return;  // HF gives NaN here; we give 0 loss and no gradient
    double total = 0;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t + 1 < T; ++t) {
        const std::int64_t y = labels[std::size_t(b * T + t + 1)];
        if (y == -100) continue;
        const float* z = logits_.data<float>() + (b * T + t) * V;
        float* dz = dlogits_.data<float>() + (b * T + t) * V;
        float mx = z[0];
        for (std::int64_t v = 1; v < V; ++v) mx = z[v] > mx ? z[v] : mx;
        double s = 0;
        for (std::int64_t v = 0; v < V; ++v) s += std::exp(double(z[v] - mx));
        const double lse = mx + std::log(s);
        total += lse - z[y];
        for (std::int64_t v = 0; v < V; ++v) dz[v] = float(std::exp(double(z[v]) - lse) / double(n));
        dz[y] -= float(1.0 / double(n));
      }
    out.ce = total / double(n);
  }

  // HF load_balancing_loss_func over the concatenation of every sparse layer's router (no attention mask):
  // aux = E Σ_e c_e/(M) · P_e, c_e = all-k count over M = layers·N rows, P_e = mean prob; ∂aux/∂p_re = E c_e / M².
  // On a device backend the routers' probabilities and choices (N × E and N × K per layer: small) come to the host,
  // and the per-layer logit gradients go back — a host sync per sparse layer, in exchange for one loss code.
  void mixtral_aux(Output& out) {
    std::vector<Tensor> probs, choice;  // per sparse layer, on the host: (N, E) f32, (N, K) i32
    for (const auto& l : layers)
      if (l.mlp.is_sparse()) {
        const RouterOutput& r = l.mlp.sparse().router_output();
        probs.push_back(on_cpu<Backend> ? r.probs : r.probs.to(Device::cpu));
        choice.push_back(on_cpu<Backend> ? r.topk_idx : r.topk_idx.to(Device::cpu));
      }
    if (probs.empty()) return;
    const std::int64_t N = probs[0].size(0), E = probs[0].size(1), K = choice[0].size(1);
    const double M = double(N) * double(probs.size());
    std::vector<double> count(std::size_t(E), 0.0), P(std::size_t(E), 0.0);
    for (std::size_t i = 0; i < probs.size(); ++i)
      for (std::int64_t t = 0; t < N; ++t) {
        for (std::int64_t k = 0; k < K; ++k) count[std::size_t(choice[i].data<std::int32_t>()[t * K + k])] += 1;
        for (std::int64_t e = 0; e < E; ++e) P[std::size_t(e)] += probs[i].data<float>()[t * E + e];
      }
    double aux = 0;
    for (std::int64_t e = 0; e < E; ++e) aux += double(E) * (count[std::size_t(e)] / M) * (P[std::size_t(e)] / M);
    out.aux = aux;
    std::size_t li = 0;
    for (const Tensor& pr : probs) {  // d aux / d logits through the softmax: p ⊙ (g − Σ p g)
      while (!layers[li].mlp.is_sparse()) ++li;
      Tensor dz = zeros(N, E);
      for (std::int64_t t = 0; t < N; ++t) {
        const float* p = pr.data<float>() + t * E;
        double s = 0;
        for (std::int64_t e = 0; e < E; ++e) s += p[e] * (double(E) * count[std::size_t(e)] / (M * M));
        for (std::int64_t e = 0; e < E; ++e)
          dz.data<float>()[t * E + e] = float(p[e] * (double(E) * count[std::size_t(e)] / (M * M) - s));
      }
      aux_dlogits_[li++] = on_cpu<Backend> ? dz : dz.to(Backend::device);
    }
  }

  DecoderConfig cfg_;
  std::int64_t B_ = 0, T_ = 0;
  Tensor hn_, logits_, dlogits_;      // (N, H), (N, V), (N, V)
  std::vector<Tensor> aux_dlogits_;   // per layer (N, E), unscaled; undefined for dense layers
};

}  // namespace cumo::nn
