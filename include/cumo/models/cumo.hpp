#pragma once
// models::CuMo — the CuMo multimodal model (Li et al. 2024, "CuMo: Scaling Multimodal LLM with Co-Upcycled
// Mixture-of-Experts"): nn::Llava (CLIP ViT → 2-layer GELU connector → Mistral-style decoder) whose every CLIP MLP
// and whose connector become top-k-of-E sparse MoE blocks at stage 3 (upcycle()), trained with
//
//   total = LM loss + balance_coef · (L_b,clip + L_b,mlp) + z_coef · (L_z,clip + L_z,mlp)      (0.1 / 0.01)
//
//   L_b = E Σ_e f_e P_e per image (f from TOP-1 choices, P = mean router prob), then the batch mean
//   L_z = mean over tokens of logsumexp(router logits)²  (per image, then batch mean = mean over all tokens)
//   L_*,clip = the mean over ALL CLIP layers — the last layer's output never reaches the features (layer −2), but it
//   runs, its losses count, and their gradients reach its router and, through the router's input, every layer below.
//   With S² (config.llava.vision.s2, nn/s2.hpp) the tower runs on each image (1×) and on its 9 tiles of the 3×
//   upsampled image; each layer's loss is ½(1× + 3×), every image and every tile one segment (CuMo's code).
//
// Composition rather than duplication: the three parts are nn::Llava's (ClipVision, Connector, DecoderLM), whose
// MLP slots are FeedForward<Dense, Sparse> variants; this header adds the stage-3 transformation, the CuMo loss and
// its backward, the loss/load report, KV-cached generation (greedy or sampled) over an image prompt, and checkpoint I/O that
// detects a sparse checkpoint and upcycles the shapes before loading.
//
// Parameter names are HF's (transformers 5): model.vision_tower.…, model.multi_modal_projector.…,
// model.language_model.…, lm_head.weight; sparse blocks add `<mlp>.gate.weight` (router) and fused
// `<mlp>.experts.{fc1,fc2}.{weight,bias}` (E, …) — io::load_hf also reads per-expert tensors
// (`…experts.{e}.fc1.weight`, the projector's `…experts.{e}.linear_1.weight`).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/nn/llava.hpp"
#include "cumo/nn/sampling.hpp"

namespace cumo::models {

// Choices of CuMo::reset_parameters beyond HF's init. sincos_vision_positions: the vision tower's position table
// starts from the fixed 2-D sine-cosine table (nn::fill_sincos_positions) instead of N(0, 0.02²), for towers
// trained from scratch; every other parameter gets the same draws either way (the table is overwritten after the
// position embedding's own draw).
struct CuMoInit {
  bool sincos_vision_positions = false;
};

struct CuMoConfig {
  nn::LlavaConfig llava;  // vision + text + image_token_id
  int experts = 4, top_k = 2;
  int connector_experts = 0;  // the connector's E when it differs from the CLIP MLPs' (0: `experts`)
  float balance_coef = 0.1f, z_coef = 0.01f;  // CuMo's bzloss

  // Accepts {"llava": {HF LlavaConfig}, "s2", "experts", "connector_experts", "top_k", "aux": {"balance_coef",
  // "z_coef"}} (the parity fixture's config, and what to_json() writes) or a plain HF LlavaConfig (then
  // s2/experts/top_k/coefficients keep their defaults unless given at the top level). "s2": true turns on S² multi-scale vision features (nn/s2.hpp).
  static CuMoConfig from_json(const nlohmann::json& j) {
    CuMoConfig c;
    CUMO_CHECK(j.is_object(), "CuMoConfig::from_json: expected a JSON object");
    const bool nested = j.contains("llava");
    CUMO_CHECK(nested || j.contains("vision_config"),
               "CuMoConfig::from_json: neither a \"llava\" object nor a LlavaConfig (\"vision_config\") in the JSON");
    c.llava = nn::LlavaConfig::from_json(nested ? j.at("llava") : j);
    c.llava.vision.s2 = j.value("s2", false);  // not an HF LlavaConfig key: top level in either form
    c.experts = j.value("experts", c.experts);
    c.connector_experts = j.value("connector_experts", c.connector_experts);
    c.top_k = j.value("top_k", c.top_k);
    if (j.contains("aux") && j["aux"].is_object()) {
      c.balance_coef = j["aux"].value("balance_coef", c.balance_coef);
      c.z_coef = j["aux"].value("z_coef", c.z_coef);
    }
    c.validate("CuMoConfig");
    return c;
  }

  // The nested form, readable by from_json() and by HF for the "llava" part.
  nlohmann::json to_json() const {
    nlohmann::json j = {{"llava", llava.to_json()},
                        {"s2", llava.vision.s2},
                        {"experts", experts},
                        {"top_k", top_k},
                        {"aux", {{"balance_coef", balance_coef}, {"z_coef", z_coef}}}};
    if (connector_experts > 0) j["connector_experts"] = connector_experts;
    return j;
  }
  int connector_E() const { return connector_experts > 0 ? connector_experts : experts; }

  // The parameters of the model with these sizes: dense, or with every CLIP MLP (`sparse_vision`) and the
  // connector (`sparse_connector`) upcycled to `experts` (connector_E()) experts plus a router. From the sizes alone,
  // in double, so that absurd sizes are measured (and refused by the caller) instead of overflowing or being allocated.
  double parameter_count(bool sparse_vision = false, bool sparse_connector = false) const {
    const double Fin = double(llava.vision.feature_width()), Ht = double(llava.text.hidden), E = double(connector_E());
    const double connector_mlp = Fin * Ht + Ht + Ht * Ht + Ht;
    return llava.vision.parameter_count(sparse_vision ? experts : 0) +
           (sparse_connector ? E * connector_mlp + Fin * E : connector_mlp) + llava.text.parameter_count();
  }

  // Every field in range, or an error naming it and its value (`where` names the source).
  void validate(const std::string& where) const {
    llava.validate(where);
    CUMO_CHECK(experts >= 1 && top_k >= 1 && top_k <= experts, where, ": need 1 <= top_k (", top_k,
               ") <= experts (", experts, ")");
    CUMO_CHECK(connector_experts == 0 || connector_experts >= top_k, where, ": connector_experts (",
               connector_experts, ") must be 0 (= experts) or >= top_k (", top_k, ")");
    CUMO_CHECK(std::isfinite(balance_coef) && balance_coef >= 0 && std::isfinite(z_coef) && z_coef >= 0, where,
               ": balance_coef (", balance_coef, ") and z_coef (", z_coef, ") must be finite and >= 0");
  }
};

template <backend::Backend Backend = backend::Cpu>
class CuMo {
 public:
  using backend_type = Backend;

  // `backend` runs every layer (a copy of a stateful backend — backend::Cuda's precision and workspace — shares
  // its state, so one instance configures the whole model).
  explicit CuMo(CuMoConfig c, Backend backend = {})
      : cfg_(validated(std::move(c))), m_(cfg_.llava, backend), be_(std::move(backend)) {}

  const CuMoConfig& config() const { return cfg_; }
  const Backend& backend() const { return be_; }
  // The composition itself, for callers that want a layer (e.g. to read one router's output).
  nn::Llava<Backend>& llava() { return m_; }
  const nn::Llava<Backend>& llava() const { return m_; }

  // ---- initialisation -------------------------------------------------------------------------------------
  // Fresh weights for training from scratch: every matrix and embedding (patch, class, position, token) ~ N(0, 0.02²)
  // (HF's initializer_range), biases 0, LayerNorm / RMSNorm weight 1 and bias 0; a router that already exists gets
  // PyTorch's Linear default U(±1/√fan_in), as at upcycling. Deterministic in `rng`, in parameters() order; the
  // values are drawn on the host for every backend, so a device model starts from the CPU model's bits.
  // init.sincos_vision_positions: see CuMoInit.
  void reset_parameters(Rng& rng, CuMoInit init = {}) {
    for (Parameter* p : parameters()) {
      const std::string& n = p->name;
      const bool is_norm = p->value.dim() == 1 && (n.find("norm") != std::string::npos ||
                                                   n.find("layrnorm") != std::string::npos);
      Tensor v = p->value.device() == Device::cpu ? p->value : Tensor::empty(p->value.shape());
      if (is_router(n)) {
        const float bound = 1.f / std::sqrt(float(v.size(v.dim() - 1)));
        rng.fill_uniform(v, -bound, bound);
      } else if (is_norm) {
        if (n.ends_with("weight"))
          fill(v, 1.f);
        else
          fill(v, 0.f);
      } else if (n.ends_with("bias")) {
        fill(v, 0.f);
      } else {
        rng.fill_normal(v, 0.f, 0.02f);
        // Drawn first all the same, so that every later parameter gets the same draws either way.
        if (init.sincos_vision_positions && p == &m_.vision_tower.position_embedding)
          nn::fill_sincos_positions(v, cfg_.llava.vision.grid());  // (N+1, Hv)
      }
      if (v.raw() != p->value.raw()) p->value.copy_from(v);
    }
  }

  // ---- stage 3: co-upcycling ------------------------------------------------------------------------------
  // Every CLIP MLP (vision) and the connector (connector) become a top-k-of-E SparseMoE (the connector's E:
  // connector_E()) whose experts are exact
  // copies of the dense MLP — the block then computes exactly the dense function for any router — and whose
  // router is fresh (PyTorch Linear init, from `rng`: CLIP layers 0…L−1, then the connector). from_scratch: the
  // experts get fresh PyTorch Linear init instead (the paper's failing ablation). Parts already sparse are skipped.
  void upcycle(Rng& rng, bool vision = true, bool connector = true, bool from_scratch = false) {
    if (vision)
      for (auto& layer : m_.vision_tower.layers) {
        if (layer.mlp.is_sparse()) continue;
        layer.mlp.upcycle(cfg_.experts, cfg_.top_k, rng);
        if (from_scratch) layer.mlp.sparse().experts().reset_parameters(rng);
      }
    if (connector && !m_.projector.mlp.is_sparse()) {
      m_.projector.mlp.upcycle(cfg_.connector_E(), cfg_.top_k, rng);
      if (from_scratch) m_.projector.mlp.sparse().experts().reset_parameters(rng);
    }
  }
  bool vision_is_sparse() const {
    for (const auto& layer : m_.vision_tower.layers)
      if (!layer.mlp.is_sparse()) return false;
    return !m_.vision_tower.layers.empty();
  }
  bool connector_is_sparse() const { return m_.projector.mlp.is_sparse(); }

  // ---- forward / backward ---------------------------------------------------------------------------------
  // Training's logits: LogitRows::loss computes the language model's last layer and head only from the batch's first
  // row with a target on (nn::DecoderLM::set_logit_rows; the same loss and gradients, fewer rows). The trainers set
  // it; the default (all) gives every row's logits, as transformers does.
  using LogitRows = typename nn::DecoderLM<Backend>::LogitRows;
  void set_logit_rows(LogitRows r) { m_.language_model.set_logit_rows(r); }
  LogitRows logit_rows() const { return m_.language_model.logit_rows(); }

  struct Output {
    Tensor logits;  // (B*(T − logits_from), V): rows t >= logits_from of each sequence
    std::int64_t logits_from = 0;  // > 0 only under set_logit_rows(LogitRows::loss)
    double ce = 0;      // the language model's mean CE over the counted targets
    double lm_aux = 0;  // a Mixtral decoder's HF load-balancing loss (0 for Mistral / Qwen2), unweighted
    double total = 0;   // ce + router_aux_loss_coef·lm_aux
                        //    + balance_coef·(vision_balance + projector_balance) + z_coef·(vision_z + projector_z)
    double vision_balance = 0, vision_z = 0, projector_balance = 0, projector_z = 0;  // 0 while dense
    std::vector<double> vision_balance_per_layer, vision_z_per_layer;                // per CLIP layer
    std::vector<ExpertLoad> vision_load;  // per CLIP layer (empty while dense)
    ExpertLoad projector_load;            // empty while dense
    std::int64_t targets = 0;             // label positions counted in ce
  };

  // ids / labels / key_valid: B*T (labels unshifted, −100 ignored; key_valid 0 = padding key, may be null);
  // pixels (images, 3, S, S) with images · patches == the number of image_token_id entries in ids.
  // Every CLIP layer runs; the top one, above the feature layer, for its aux losses only (its attention and router:
  // nobody reads its output, ClipVision::forward's top_read). `training` is accepted for symmetry: CuMo's blocks have
  // no jitter and no dropout, so the computation is the same; the activations for backward() are always kept.
  Output forward(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T, const Tensor& pixels,
                 const std::vector<std::int64_t>* labels, const std::vector<std::uint8_t>* key_valid = nullptr,
                 bool training = true) {
    (void)training;
    const auto lm = m_.forward(ids, B, T, pixels, labels, key_valid);
    Output out;
    out.logits = lm.logits;
    out.logits_from = lm.logits_from;
    out.ce = lm.ce;
    out.lm_aux = lm.aux;
    out.targets = lm.targets;
    const bool images = pixels.defined() && pixels.numel() > 0;
    if (images) {
      // per sparse CLIP layer; with S² each is ½(1× + 3× pass), the loads both passes' tokens (nn/s2.hpp)
      for (const AuxLosses& a : m_.vision_aux_losses()) {
        out.vision_balance_per_layer.push_back(scalar(a.balance_top1));
        out.vision_z_per_layer.push_back(scalar(a.z));
      }
      out.vision_load = m_.vision_loads();
      if (!out.vision_balance_per_layer.empty()) {
        for (std::size_t l = 0; l < out.vision_balance_per_layer.size(); ++l) {
          out.vision_balance += out.vision_balance_per_layer[l];
          out.vision_z += out.vision_z_per_layer[l];
        }
        out.vision_balance /= double(out.vision_balance_per_layer.size());
        out.vision_z /= double(out.vision_z_per_layer.size());
      }
      if (m_.projector.mlp.is_sparse()) {
        const AuxLosses& a = m_.projector.mlp.last_aux();
        out.projector_balance = scalar(a.balance_top1);
        out.projector_z = scalar(a.z);
        out.projector_load = m_.projector.mlp.sparse().load();
      }
    }
    vision_sparse_layers_ = std::int64_t(out.vision_balance_per_layer.size());
    out.total = lm.loss + cfg_.balance_coef * (out.vision_balance + out.projector_balance) +
                cfg_.z_coef * (out.vision_z + out.projector_z);
    has_forward_ = true;
    return out;
  }

  // d total / d every parameter, scaled by `dtotal`, accumulated into the gradients. Needs the last forward to have
  // had labels (the LM loss is part of total). One backward per forward.
  void backward(double dtotal = 1.0) { backward(LossScales{dtotal, dtotal}); }
  // The language model's loss and the CLIP/connector aux losses scaled apart: a data-parallel rank weights its CE
  // by its share of the global batch's targets and the per-image aux losses by its share of the images
  // (dist/data_parallel.hpp).
  struct LossScales {
    double lm = 1, aux = 1;
  };
  void backward(LossScales s) {
    CUMO_CHECK(has_forward_, "CuMo::backward: no forward to differentiate (call forward with labels first)");
    has_forward_ = false;
    const double L = double(std::max<std::int64_t>(vision_sparse_layers_, 1));
    const AuxLossWeights vision{float(s.aux * cfg_.balance_coef / L), float(s.aux * cfg_.z_coef / L)};
    const AuxLossWeights projector{float(s.aux * cfg_.balance_coef), float(s.aux * cfg_.z_coef)};
    m_.backward(float(s.lm), vision, projector);
  }

  // ---- expert parallelism (docs/distributed.md) -----------------------------------------------------------
  // The experts of every sparse block — CLIP layers, connector, a Mixtral language model's layers — split over
  // `group` (rank r of K keeps experts [r·E/K, (r+1)·E/K) of each block); returns the sharded parameters, now the
  // local slices. Every rank of the group calls it, on the same weights. unshard_experts() gathers them back: the
  // whole model on every rank.
  ParameterList shard_experts(dist::Communicator& group) { return m_.shard_experts(group); }
  void unshard_experts() { m_.unshard_experts(); }
  bool experts_sharded() const { return m_.experts_sharded(); }
  // A data-parallel rank with no rows in a micro-batch: the forward and backward of its sharded blocks on zero
  // tokens, which the ranks with rows exchange with (no loss, no gradient of its own). The halves apart: where the
  // ranks with rows run a forward alone (inference), or check something between forward and backward.
  void serve_experts() {
    serve_experts_forward();
    serve_experts_backward();
  }
  void serve_experts_forward() { m_.serve_experts_forward(true); }
  void serve_experts_backward() { m_.serve_experts_backward(); }

  // ---- parameters -----------------------------------------------------------------------------------------
  ParameterList parameters() { return m_.parameters(); }
  ParameterList vision_parameters() { return m_.vision_tower.parameters(); }
  ParameterList connector_parameters() { return m_.projector.parameters(); }
  ParameterList language_parameters() { return m_.language_model.parameters(); }

  // ---- generation -----------------------------------------------------------------------------------------
  struct GenerateOptions {
    std::int64_t max_new = 32;
    std::int64_t eos_id = -1;        // stop after this token (included); -1: never
    nn::SamplingOptions sampling;    // greedy by default
    std::function<void(std::int64_t)> on_token;  // called with each new token as soon as it is chosen (streaming)
  };
  // Decoding for one image and one prompt with the decoder's KV cache: greedy, or sampled with temperature and
  // top-p (nn/sampling.hpp). The prompt holds either one image_token_id per patch (as forward() wants) or a single
  // image_token_id, which is expanded to patches() of them. Returns the new token ids, stopping after eos_id
  // (included) or max_new tokens. Overwrites the saved forward state (no backward() for a forward before it).
  std::vector<std::int64_t> generate(const std::vector<std::int64_t>& prompt_ids, const Tensor& pixels,
                                     const GenerateOptions& o) {
    constexpr const char* where = "CuMo::generate";
    has_forward_ = false;
    const std::int64_t image_id = cfg_.llava.image_token_id, N = cfg_.llava.vision.patches();
    CUMO_CHECK(!prompt_ids.empty(), where, ": empty prompt");
    CUMO_CHECK(o.max_new >= 0, where, ": max_new must be >= 0, got ", o.max_new);
    std::int64_t n_img = 0;
    for (auto id : prompt_ids) n_img += id == image_id;
    std::vector<std::int64_t> ids;
    for (auto id : prompt_ids) {
      if (id == image_id && n_img == 1 && N > 1)
        ids.insert(ids.end(), std::size_t(N), image_id);
      else
        ids.push_back(id);
    }
    const bool has_image = pixels.defined() && pixels.numel() > 0;
    CUMO_CHECK(!has_image || pixels.size(0) == 1, where, ": one image at a time, got pixel_values of shape ",
               pixels.shape());
    auto& lm = m_.language_model;
    nn::TokenSampler sampler(o.sampling);
    const std::int64_t P = std::int64_t(ids.size());
    const Tensor emb = m_.embed_multimodal(ids, pixels, /*training=*/false);  // (P, H), image rows written
    auto cache = lm.make_cache(1, P + std::max<std::int64_t>(o.max_new, 1));
    std::vector<std::int64_t> out;
    Tensor logits = lm.forward_cached_embeds(emb, 1, P, cache);  // (P, V)
    for (std::int64_t s = 0; s < o.max_new; ++s) {
      const Tensor row = last_row_on_host(logits);  // (V,)
      const std::int64_t next = sampler.next(row.data<float>(), row.numel());
      out.push_back(next);
      if (o.on_token) o.on_token(next);
      if (next == o.eos_id || s + 1 == o.max_new) break;
      logits = lm.forward_cached({next}, 1, 1, cache);  // (1, V)
    }
    return out;
  }
  // Greedy decoding (the evaluation's).
  std::vector<std::int64_t> generate(const std::vector<std::int64_t>& prompt_ids, const Tensor& pixels,
                                     std::int64_t max_new, std::int64_t eos_id) {
    GenerateOptions o;
    o.max_new = max_new;
    o.eos_id = eos_id;
    return generate(prompt_ids, pixels, o);
  }

  // ---- checkpoints ----------------------------------------------------------------------------------------
  // Loads HF-named weights. A checkpoint whose CLIP MLPs / connector are sparse (it has `…mlp.gate.weight` /
  // `multi_modal_projector.gate.weight` under any accepted prefix) turns the corresponding dense parts of this model
  // sparse first — E from the router's rows, k from the config — so a stage-3 checkpoint loads into a freshly built
  // model. Loading a dense checkpoint into an already sparse part fails (load_hf names the missing tensors).
  // release_pages: drop each tensor's mapped pages once copied (io::LoadOptions), for a caller done with `ck`.
  void load(const io::HFCheckpoint& ck, const std::string& prefix = "", bool release_pages = false) {
    auto gate_rows = [&](const std::string& name) -> std::int64_t {
      for (const auto& n : io::hf_name_variants(name))
        if (ck.contains(prefix + n)) return ck.info(prefix + n).shape[0];
      return 0;
    };
    if (!m_.vision_tower.layers.empty()) {
      const std::int64_t E = gate_rows(m_.vision_tower.layers[0].mlp.name() + ".gate.weight");
      if (E > 0 && !vision_is_sparse()) {
        cfg_.experts = int(E);
        Rng dummy(0);  // the shapes matter here; load_hf overwrites every value
        upcycle(dummy, true, false);
      }
    }
    {
      const std::int64_t E = gate_rows(m_.projector.mlp.name() + ".gate.weight");
      if (E > 0 && !connector_is_sparse()) {
        cfg_.connector_experts = int(E) == cfg_.experts ? 0 : int(E);
        Rng dummy(0);
        upcycle(dummy, false, true);
      }
    }
    io::LoadOptions opt;
    opt.prefix = prefix;
    opt.optional_suffixes = optional_tensors();
    opt.release_pages = release_pages;
    io::load_hf(parameters(), ck, opt);
  }
  // The tensors a checkpoint may lack: CLIP's post_layernorm only feeds the pooled output, which LLaVA never reads,
  // and the released CuMo CLIP-MoE towers may not store it. Absent, it keeps its value (ones and zeros when fresh).
  static std::vector<std::string> optional_tensors() {
    return {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"};
  }
  // From a file or directory, holding each tensor once: its mapped pages are dropped as soon as it is copied.
  void load(const std::string& path) { load(io::HFCheckpoint::open(path), "", /*release_pages=*/true); }
  // Writes every parameter with the config in the metadata ("cumo_config"): under its HF name with fused experts
  // (Layout::transformers), or in the released CuMo checkpoints' layout, one tensor per expert (Layout::cumo_release).
  void save(const std::string& path, io::Layout layout = io::Layout::transformers) {
    io::save_hf(path, parameters(), {{"cumo_config", cfg_.to_json().dump()}}, layout);
  }

 private:
  static bool is_router(const std::string& n) { return n.ends_with(".gate.weight"); }
  static void fill(Tensor& t, float v) {
    float* p = t.data<float>();
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = v;
  }
  double scalar(const Tensor& t) const { return double(be_.item(t)); }
  // The logits row after the last position, on the host: (V,).
  Tensor last_row_on_host(const Tensor& logits) const {
    const std::int64_t V = logits.size(1);
    Tensor row = be_.empty({1, V});
    be_.copy_blocks(logits, (logits.size(0) - 1) * V, 0, row, 0, 0, V, 1);
    return be_.to_host(row).view({V});
  }
  static CuMoConfig validated(CuMoConfig c) {
    c.validate("CuMo");
    return c;
  }
  CuMoConfig cfg_;
  nn::Llava<Backend> m_;
  [[no_unique_address]] Backend be_;
  std::int64_t vision_sparse_layers_ = 0;
  bool has_forward_ = false;
};

}  // namespace cumo::models
