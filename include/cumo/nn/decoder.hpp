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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/backend/ops.hpp"
#include "cumo/core/shape.hpp"
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
    c.with_defaults().validate("DecoderConfig");
    return c;
  }

  // HF's MistralConfig / Qwen2Config / MixtralConfig JSON (what from_json reads back).
  nlohmann::json to_json() const {
    nlohmann::json j = {{"model_type", model_type},
                        {"vocab_size", vocab},
                        {"hidden_size", hidden},
                        {"num_hidden_layers", layers},
                        {"num_attention_heads", heads},
                        {"num_key_value_heads", kv_heads},
                        {"head_dim", head_dim},
                        {"intermediate_size", ffn},
                        {"rms_norm_eps", rms_eps},
                        {"rope_parameters", {{"rope_theta", rope_theta}, {"rope_type", "default"}}},
                        {"attention_bias", qkv_bias},
                        {"tie_word_embeddings", tie_embeddings},
                        {"hidden_act", "silu"}};
    if (experts > 0) {
      j["num_local_experts"] = experts;
      j["num_experts_per_tok"] = top_k;
      j["router_aux_loss_coef"] = aux_coef;
    }
    return j;
  }

  // kv_heads 0 = heads and head_dim 0 = hidden / heads, filled in.
  DecoderConfig with_defaults() const {
    DecoderConfig c = *this;
    if (c.kv_heads == 0) c.kv_heads = c.heads;
    if (c.head_dim == 0 && c.heads > 0) c.head_dim = c.hidden / c.heads;
    return c;
  }

  // Parameters of the decoder with these sizes (after with_defaults()), in double: sizes are measured before
  // anything is allocated.
  double parameter_count() const {
    const DecoderConfig c = with_defaults();
    const double H = double(c.hidden), hd = double(c.head_dim), q = double(c.heads) * hd, kv = double(c.kv_heads) * hd;
    const double ffn3 = 3 * H * double(c.ffn);
    const double layer = H * q + 2 * H * kv + (c.qkv_bias ? q + 2 * kv : 0) + q * H + 2 * H +
                         (c.experts > 0 ? double(c.experts) * ffn3 + H * double(c.experts) : ffn3);
    return double(c.vocab) * H * (c.tie_embeddings ? 1 : 2) + double(c.layers) * layer + H;
  }

  // Every field in range (after with_defaults()), or an error naming it and its value (`where` names the source).
  void validate(const std::string& where) const {
    CUMO_CHECK(vocab >= 1 && hidden >= 1 && layers >= 1 && heads >= 1 && ffn >= 1, where,
               ": the decoder needs positive vocab_size, hidden_size, num_hidden_layers, num_attention_heads and "
               "intermediate_size (got ", vocab, ", ", hidden, ", ", layers, ", ", heads, ", ", ffn, ")");
    for (const auto& [name, x] : {std::pair{"vocab_size", vocab}, {"hidden_size", hidden},
                                  {"num_hidden_layers", layers}, {"num_attention_heads", heads},
                                  {"num_key_value_heads", kv_heads}, {"head_dim", head_dim},
                                  {"intermediate_size", ffn}, {"num_local_experts", std::int64_t(experts)}})
      CUMO_CHECK(x <= kMaxDim, where, ": ", name, " ", x, " is larger than any model this library sizes (> ", kMaxDim,
                 ")");
    CUMO_CHECK(kv_heads >= 1 && heads % kv_heads == 0, where, ": num_key_value_heads ", kv_heads,
               " must be positive and divide num_attention_heads ", heads);
    CUMO_CHECK(head_dim >= 2 && head_dim % 2 == 0, where, ": head_dim ", head_dim, " must be even and positive (RoPE)");
    CUMO_CHECK(std::isfinite(rope_theta) && rope_theta > 0, where, ": rope_theta must be finite and > 0, got ",
               rope_theta);
    CUMO_CHECK(std::isfinite(rms_eps) && rms_eps > 0, where, ": rms_norm_eps must be finite and > 0, got ", rms_eps);
    CUMO_CHECK(experts == 0 || (experts >= 1 && top_k >= 1 && top_k <= experts), where, ": need 1 <= top_k (",
               top_k, ") <= num_local_experts (", experts, ")");
    CUMO_CHECK(experts >= 0 && std::isfinite(aux_coef) && aux_coef >= 0, where, ": num_local_experts (", experts,
               ") and router_aux_loss_coef (", aux_coef, ") must be >= 0");
  }
};

template <backend::Backend Backend = backend::Cpu>
using DecoderMoE = SparseMoE<Router<TopKDynamic>, Expert<GatedMLP<SiLU>>, Backend>;
template <backend::Backend Backend = backend::Cpu>
using DecoderFFN = FeedForward<DenseGatedMLP<SiLU, Backend>, DecoderMoE<Backend>>;

template <backend::Backend Backend = backend::Cpu>
class DecoderLayer {
 public:
  using FFN = DecoderFFN<Backend>;
  using MoE = DecoderMoE<Backend>;

  DecoderLayer() = default;
  DecoderLayer(const std::string& name, const DecoderConfig& c, Backend backend = {})
      : input_layernorm(name + ".input_layernorm", c.hidden, c.rms_eps, backend),
        post_attention_layernorm(name + ".post_attention_layernorm", c.hidden, c.rms_eps, backend),
        self_attn(name + ".self_attn",
                  AttentionConfig{c.hidden, c.heads, c.kv_heads, c.head_dim, c.qkv_bias, false, true, c.rope_theta,
                                  "o_proj"},
                  backend),
        mlp(c.experts > 0 ? FFN(name + ".mlp", MoE(c.hidden, c.ffn, c.experts, moe_options(), TopKDynamic{c.top_k},
                                                   0, backend))
                          : FFN(name + ".mlp", DenseGatedMLP<SiLU, Backend>(name + ".mlp", c.hidden, c.ffn, backend))),
        be_(std::move(backend)) {}

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
  // x (B*T, H) → (B*T, H), keeping what backward() needs. ffn: the sparse FFN's aux-loss segments.
  // first_row > 0: only the rows t >= first_row of each sequence are computed, (B*(T − first_row), H) — their
  // attention still reads every earlier row's key and value (DecoderLM::set_logit_rows: the last layer under a
  // loss on those rows).
  Tensor forward(const Tensor& x, const TokenLayout& layout, ForwardArgs ffn = {}, std::int64_t first_row = 0) {
    first_row_ = first_row;
    B_ = layout.B;
    T_ = layout.T;
    const Tensor a = self_attn.forward(input_layernorm.forward(x), layout, first_row);  // (B*Tq, H)
    Tensor h = add(be_, first_row == 0 ? x : Attention<Backend>::rows_from(be_, x, layout.B, layout.T, first_row), a);
    return add(be_, h, mlp.forward(post_attention_layernorm.forward(h), ffn));
  }
  // dy (B*Tq, H) → dx (B*T, H). aux: coefficients of a sparse FFN's own balance / z losses; router_dlogits (N, E):
  // an extra gradient on its router logits (HF Mixtral's loss over all layers).
  Tensor backward(const Tensor& dy, AuxLossWeights aux = {}, const Tensor* router_dlogits = nullptr) {
    const Tensor dffn_in = mlp.backward(dy, aux, router_dlogits);
    Tensor dh = add(be_, dy, post_attention_layernorm.backward(dffn_in));  // (B*Tq, H)
    Tensor dx = input_layernorm.backward(self_attn.backward(dh));          // (B*T, H)
    if (first_row_ == 0) return add(be_, dh, dx);
    const std::int64_t H = dx.size(1), Tq = T_ - first_row_;
    be_.add_blocks(dh, 0, Tq * H, dx, first_row_ * H, T_ * H, Tq * H, B_);  // the residual, on the rows it had
    return dx;
  }
  // x (B*t, H) of t new tokens per sequence → (B*t, H), appending to `cache`; keeps nothing for a backward.
  Tensor infer(const Tensor& x, std::int64_t B, std::int64_t t, KVCache& cache,
               const std::vector<std::uint8_t>* key_valid = nullptr) {
    Tensor h = add(be_, x, self_attn.forward_cached(input_layernorm.apply(x), B, t, cache, key_valid));
    return add(be_, h, mlp.forward(post_attention_layernorm.apply(h), ForwardArgs{1, false}));
  }

 private:
  [[no_unique_address]] Backend be_;
  std::int64_t first_row_ = 0, B_ = 0, T_ = 0;  // of the last forward
};

template <backend::Backend Backend = backend::Cpu>
class DecoderLM {
 public:
  using backend_type = Backend;

  // `model_prefix`: "model." (Mistral/Qwen2/Mixtral), "model.language_model." inside LLaVA (transformers 5).
  explicit DecoderLM(DecoderConfig c, const std::string& model_prefix = "model.",
                     const std::string& lm_head_name = "lm_head", Backend backend = {})
      : embed_tokens(model_prefix + "embed_tokens", validated(c).vocab, c.hidden, backend),  // checked before
        norm(model_prefix + "norm", c.hidden, c.rms_eps, backend),                           // any allocation
        cfg_(c.with_defaults()),
        be_(backend) {
    if (!c.tie_embeddings) lm_head = Linear<Backend>(lm_head_name, c.hidden, c.vocab, false, backend);
    layers.reserve(std::size_t(c.layers));
    for (std::int64_t l = 0; l < c.layers; ++l)
      layers.emplace_back(model_prefix + "layers." + std::to_string(l), cfg_, backend);
  }

  Embedding<Backend> embed_tokens;
  std::vector<DecoderLayer<Backend>> layers;
  RMSNorm<Backend> norm;
  Linear<Backend> lm_head;  // unused (no parameters) when the embeddings are tied

  const DecoderConfig& config() const { return cfg_; }
  const Backend& backend() const { return be_; }

  ParameterList parameters() {
    ParameterList p;
    embed_tokens.collect(p);
    for (auto& l : layers) l.collect(p);
    norm.collect(p);
    if (!cfg_.tie_embeddings) lm_head.collect(p);
    return p;
  }

  // ---- expert parallelism: every sparse layer's experts over `group` (SparseMoE::shard_experts) -------------
  // Returns the sharded parameters (the local slices). Every rank of the group calls it, on the same weights.
  ParameterList shard_experts(dist::Communicator& group) { return shard_layer_experts(layers, group); }
  void unshard_experts() { unshard_layer_experts(layers); }
  bool experts_sharded() const { return layer_experts_sharded(layers); }
  // A rank with no rows: every sharded layer's block on zero tokens, in the order a forward (layers 0 … L−1) and
  // a backward (L−1 … 0) run them on a rank with rows, so that the group's exchanges pair up.
  void serve_experts_forward() {
    for (auto& l : layers) l.mlp.serve_experts_forward();
  }
  void serve_experts_backward() {
    for (auto l = layers.rbegin(); l != layers.rend(); ++l) l->mlp.serve_experts_backward();
  }

  struct Output {
    Tensor logits;       // (B*(T − logits_from), V): rows t >= logits_from of each sequence
    std::int64_t logits_from = 0;  // 0 unless set_logit_rows(LogitRows::loss) skipped rows without a target
    double loss = 0;     // ce + aux_coef · aux (what backward() differentiates)
    double ce = 0;       // mean CE over the counted targets
    double aux = 0;      // HF load_balancing_loss_func over all sparse layers (0 when dense)
    std::int64_t targets = 0;
  };

  // Which rows a forward with labels computes logits for. all (the default): every row, as HF does. loss: training
  // needs only the rows from the first one with a target on: the last layer computes its queries, FFN, the final
  // norm and the head only for rows t >= t0 of each sequence, t0 the earliest row with a target in the batch (the
  // loss and every gradient are the same function; the GEMMs run on fewer rows). A supervised answer after the
  // image and the prompt is a few rows of each sequence (8 of 116 in the demo's stage 3). Kept at `all` when the
  // last FFN is sparse: its router's aux loss counts every token.
  enum class LogitRows { all, loss };
  void set_logit_rows(LogitRows r) { logit_rows_ = r; }
  LogitRows logit_rows() const { return logit_rows_; }

  // ids (B*T) → embeddings (B*T, H); the ids are kept for backward_embeddings().
  Tensor embed(const std::vector<std::int64_t>& ids) { return embed_tokens.forward(ids); }

  // x (B*T, H) → logits and, with labels (B*T), the loss. key_valid (B*T): 0 = padding key.
  Output forward_embeds(const Tensor& x, std::int64_t B, std::int64_t T, const std::vector<std::int64_t>* labels = nullptr,
                        const std::vector<std::uint8_t>* key_valid = nullptr) {
    constexpr const char* where = "DecoderLM::forward";
    const Tensor h = check_input(where, "inputs_embeds", x, cfg_.hidden, Backend::device);
    CUMO_CHECK(h.size(0) == B * T, where, ": inputs_embeds has shape ", h.shape(), " but B = ", B, ", T = ", T);
    CUMO_CHECK(!labels || std::int64_t(labels->size()) == B * T, where, ": ", labels ? labels->size() : 0,
               " labels for ", B * T, " tokens");
    Tensor targets;  // (B*T,) host
    Output out;
    if (labels) {
      targets = shifted_labels(*labels, B, T);
      if (logit_rows_ == LogitRows::loss && !layers.empty() && !layers.back().mlp.is_sparse())
        out.logits_from = first_target_row(targets, B, T);
    }
    const std::int64_t t0 = out.logits_from, Tq = T - t0;
    hn_ = norm.forward(forward_layers(h, TokenLayout::make(be_, B, T, key_valid), 1, t0));  // (B*Tq, H)
    out.logits = head(hn_);  // (B*Tq, V)
    dlogits_ = Tensor();
    if (labels) {
      if (t0 > 0) {  // the targets of the rows computed
        Tensor kept = Tensor::empty({B * Tq}, DType::i64);
        for (std::int64_t b = 0; b < B; ++b)
          std::copy_n(targets.data<std::int64_t>() + b * T + t0, Tq, kept.data<std::int64_t>() + b * Tq);
        targets = kept;
      }
      dlogits_ = be_.empty(out.logits.shape());
      target_runs_ = runs_of_targets(targets);
      const auto r = be_.cross_entropy(out.logits, be_.upload(targets), &dlogits_);
      out.ce = r.loss;
      out.targets = r.targets;
    }
    mixtral_aux(out);
    out.loss = out.ce + cfg_.aux_coef * out.aux;
    return out;
  }
  Output forward(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                 const std::vector<std::int64_t>* labels = nullptr, const std::vector<std::uint8_t>* key_valid = nullptr) {
    return forward_embeds(embed(ids), B, T, labels, key_valid);
  }

  // d loss / d everything, scaled by `dloss`; returns d inputs_embeds (B*T, H). Call backward_embeddings() with it
  // (or let backward_all() do so) to reach the embedding table. One backward per forward.
  Tensor backward(float dloss = 1.f) {
    CUMO_CHECK(dlogits_.defined(), "DecoderLM::backward: the last forward had no labels (or was differentiated "
                                   "already): nothing to differentiate");
    Tensor dl = std::move(dlogits_);
    dlogits_ = Tensor();
    if (dloss != 1.f) be_.scale(dl, dloss);
    std::vector<Tensor> router_dlogits;  // the cross-layer aux loss's gradient on each sparse layer's router logits
    if (cfg_.aux_coef != 0.0) {
      router_dlogits = std::move(aux_dlogits_);
      for (Tensor& t : router_dlogits)
        if (t.defined()) be_.scale(t, float(cfg_.aux_coef) * dloss);
    }
    return backward_layers(norm.backward(head_backward_targets(dl)), AuxLossWeights{}, &router_dlogits);
  }
  void backward_embeddings(const Tensor& dx, const std::vector<bool>* skip = nullptr) { embed_tokens.backward(dx, skip); }
  void backward_all(float dloss = 1.f) { backward_embeddings(backward(dloss)); }

  // ---- the layer walk, once for every caller ------------------------------------------------------------------
  // Training: h (B*T, H) → the last layer's output, each layer keeping what its backward needs. segments: the
  // sparse FFNs' aux-loss segments. last_first_row > 0: the last layer computes the rows t >= last_first_row of
  // each sequence only, (B*(T − last_first_row), H).
  Tensor forward_layers(Tensor h, const TokenLayout& layout, std::int64_t segments = 1,
                        std::int64_t last_first_row = 0) {
    for (std::size_t l = 0; l < layers.size(); ++l)
      h = layers[l].forward(h, layout, ForwardArgs{segments, true}, l + 1 == layers.size() ? last_first_row : 0);
    return h;
  }
  // The backward of forward_layers: d last output → d h, from the top layer down. aux: each sparse FFN's own
  // aux-loss coefficients; router_dlogits (per layer, may be empty or hold undefined entries): extra router-logit
  // gradients.
  Tensor backward_layers(Tensor dh, AuxLossWeights aux = {}, const std::vector<Tensor>* router_dlogits = nullptr) {
    for (std::size_t l = layers.size(); l-- > 0;) {
      const Tensor* extra = router_dlogits && l < router_dlogits->size() && (*router_dlogits)[l].defined()
                                ? &(*router_dlogits)[l]
                                : nullptr;
      dh = layers[l].backward(dh, aux, extra);
    }
    return dh;
  }
  // Inference: h (B*t, H) of t new tokens per sequence → the last layer's output, keeping nothing for a backward.
  // With `cache` the keys and values are appended to it (generation); without, each layer attends within this
  // call through a cache of its own (a prefill: the eval-mode forward).
  Tensor infer_layers(Tensor h, std::int64_t B, std::int64_t t, std::vector<KVCache>* cache = nullptr,
                      const std::vector<std::uint8_t>* key_valid = nullptr) {
    CUMO_CHECK(!cache || cache->size() == layers.size(), "DecoderLM: ", cache ? cache->size() : 0, " caches for ",
               layers.size(), " layers");
    for (std::size_t l = 0; l < layers.size(); ++l) {
      KVCache own;
      if (!cache) own = layers[l].self_attn.make_cache(B, t);
      h = layers[l].infer(h, B, t, cache ? (*cache)[l] : own, key_valid);
    }
    return h;
  }

  // The LM head (the tied embedding table or lm_head): hn (N, H) final-norm output → logits (N, V). head_backward:
  // dlogits (N, V) → d hn (N, H), the head weight's gradient accumulating. Public for callers that put their own
  // loss on the logits (models/llava_mod.hpp's StudentPass).
  Tensor head(const Tensor& hn) const {
    const Tensor x = check_input("DecoderLM::head", "hn", hn, cfg_.hidden, Backend::device);
    Tensor logits = be_.empty({x.size(0), cfg_.vocab});
    be_.linear(x, head_weight().value, nullptr, logits);  // (N, V)
    return logits;
  }
  Tensor head_backward(const Tensor& dlogits, const Tensor& hn_in) {
    constexpr const char* where = "DecoderLM::head_backward";
    const Tensor hn = check_input(where, "hn", hn_in, cfg_.hidden, Backend::device);
    const Tensor dl = check_input(where, "dlogits", dlogits, cfg_.vocab, Backend::device);
    CUMO_CHECK(dl.size(0) == hn.size(0), where, ": dlogits has shape ", dl.shape(), " but hn has ", hn.shape());
    Parameter& W = head_weight();
    require_trainable(where, W);
    Tensor dh = be_.empty({hn.size(0), cfg_.hidden});
    be_.linear_backward(dl, hn, W.value, W.grad, nullptr, dh);  // dW (V, H) +=, dh (N, H)
    return dh;
  }

  // head_backward over the rows that have a target (target_runs_) only. Every other row of dlogits is 0: its
  // products would add exact zeros to dW and give zero rows of d hn. A supervised answer after a prompt and the
  // image tokens is a few rows of each sequence (8 of 116 in the demo's stage 3), so this skips most of the head's
  // backward. The same dW and d hn up to the order of the dW sums.
  Tensor head_backward_targets(const Tensor& dl) {
    const std::int64_t N = dl.size(0), H = cfg_.hidden, V = cfg_.vocab;
    std::int64_t n = 0;
    for (const auto& [r0, len] : target_runs_) n += len;
    if (2 * n > N) return head_backward(dl, hn_);
    Tensor dh = be_.zeros({N, H});  // (N, H)
    if (n == 0) return dh;
    Tensor dlc = be_.empty({n, V}), hnc = be_.empty({n, H});  // (n, V), (n, H)
    std::int64_t o = 0;
    for (const auto& [r0, len] : target_runs_) {
      be_.copy_blocks(dl, r0 * V, 0, dlc, o * V, 0, len * V, 1);
      be_.copy_blocks(hn_, r0 * H, 0, hnc, o * H, 0, len * H, 1);
      o += len;
    }
    const Tensor dhc = head_backward(dlc, hnc);  // (n, H)
    o = 0;
    for (const auto& [r0, len] : target_runs_) {
      be_.copy_blocks(dhc, o * H, 0, dh, r0 * H, 0, len * H, 1);
      o += len;
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
    std::vector<KVCache> c;
    for (const auto& l : layers) c.push_back(l.self_attn.make_cache(B, capacity));
    return c;
  }
  // x (B*t, H) embeddings of t new tokens per sequence → logits (B*t, V), appending to the caches.
  Tensor forward_cached_embeds(const Tensor& x, std::int64_t B, std::int64_t t, std::vector<KVCache>& cache) {
    return head(norm.apply(infer_layers(x, B, t, &cache)));
  }
  // ids (B*t) of t new tokens per sequence → logits (B*t, V), appending to the caches.
  Tensor forward_cached(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t t,
                        std::vector<KVCache>& cache) {
    return forward_cached_embeds(embed_tokens.apply(ids), B, t, cache);
  }

 private:
  static DecoderConfig validated(const DecoderConfig& c) {
    DecoderConfig d = c.with_defaults();
    d.validate("DecoderLM");
    return d;
  }
  Parameter& head_weight() { return cfg_.tie_embeddings ? embed_tokens.weight : lm_head.weight; }
  const Parameter& head_weight() const { return cfg_.tie_embeddings ? embed_tokens.weight : lm_head.weight; }

  // HF's causal shift: row (b, t) predicts label (b, t + 1); the last row of each sequence predicts nothing.
  // The runs {first row, rows} of consecutive rows whose target is not ignored.
  static std::vector<std::pair<std::int64_t, std::int64_t>> runs_of_targets(const Tensor& targets) {
    std::vector<std::pair<std::int64_t, std::int64_t>> runs;
    const std::int64_t* p = targets.data<std::int64_t>();
    for (std::int64_t r = 0; r < targets.numel(); ++r) {
      if (p[r] == backend::kIgnoreIndex) continue;
      if (!runs.empty() && runs.back().first + runs.back().second == r)
        ++runs.back().second;
      else
        runs.push_back({r, 1});
    }
    return runs;
  }
  // The earliest t over the B sequences whose row has a target (shifted targets (B*T,)); 0 when none has one.
  static std::int64_t first_target_row(const Tensor& targets, std::int64_t B, std::int64_t T) {
    const std::int64_t* p = targets.data<std::int64_t>();
    std::int64_t first = T;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < first; ++t)
        if (p[b * T + t] != backend::kIgnoreIndex) {
          first = t;
          break;
        }
    return first == T ? 0 : first;
  }
  static Tensor shifted_labels(const std::vector<std::int64_t>& labels, std::int64_t B, std::int64_t T) {
    Tensor y = Tensor::empty({B * T}, DType::i64);
    std::int64_t* p = y.data<std::int64_t>();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) p[b * T + t] = t + 1 < T ? labels[std::size_t(b * T + t + 1)] : backend::kIgnoreIndex;
    return y;
  }

  // HF load_balancing_loss_func over the concatenation of every sparse layer's router (no attention mask):
  // aux = E Σ_e c_e/(M) · P_e, c_e = all-k count over M = layers·N rows, P_e = mean prob; ∂aux/∂p_re = E c_e / M².
  // The routers' probabilities and choices (N × E and N × K per layer: small) are read on the host and the
  // per-layer logit gradients go back — on a device a host sync per sparse layer, in exchange for one loss code.
  void mixtral_aux(Output& out) {
    aux_dlogits_.assign(layers.size(), Tensor());
    std::vector<Tensor> probs, choice;  // per sparse layer, on the host: (N, E) f32, (N, K) i32
    for (const auto& l : layers)
      if (l.mlp.is_sparse()) {
        const RouterOutput& r = l.mlp.sparse().router_output();
        probs.push_back(be_.to_host(r.probs));
        choice.push_back(be_.to_host(r.topk_idx));
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
      Tensor dz = Tensor::zeros({N, E});
      for (std::int64_t t = 0; t < N; ++t) {
        const float* p = pr.data<float>() + t * E;
        double s = 0;
        for (std::int64_t e = 0; e < E; ++e) s += p[e] * (double(E) * count[std::size_t(e)] / (M * M));
        for (std::int64_t e = 0; e < E; ++e)
          dz.data<float>()[t * E + e] = float(p[e] * (double(E) * count[std::size_t(e)] / (M * M) - s));
      }
      aux_dlogits_[li++] = be_.upload(dz);
    }
  }

  DecoderConfig cfg_;
  [[no_unique_address]] Backend be_;
  Tensor hn_, dlogits_;               // (N, H), (N, V)
  std::vector<std::pair<std::int64_t, std::int64_t>> target_runs_;  // rows with a target: {first, count}
  std::vector<Tensor> aux_dlogits_;   // per layer (N, E), unscaled; undefined for dense layers
  LogitRows logit_rows_ = LogitRows::all;
};

}  // namespace cumo::nn
