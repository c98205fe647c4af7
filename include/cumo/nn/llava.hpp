#pragma once
// nn::Llava — LLaVA-1.5 (HF LlavaForConditionalGeneration): CLIP features of layer feature_layer (−2) without CLS
// → Connector → written, in order, into the rows whose input id is image_token_id (the prompt already holds one
// such id per patch, as HF's processor expands it) → the decoder LM and its causal-LM loss.
// The embedding table gets no gradient from the image rows (HF's masked_scatter replaces them).
// With vision.s2 the features are S² multi-scale ones (nn/s2.hpp: [1× | pooled 3× tiles], 2·Hv wide) and the
// connector maps 2·Hv → Ht, as CuMo's `mm_hidden_size * len(scales)`.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/nn/connector.hpp"
#include "cumo/nn/decoder.hpp"
#include "cumo/nn/s2.hpp"
#include "cumo/nn/vit.hpp"

namespace cumo::nn {

// What Llava::backward reports as it finishes a part (below): that part's parameters.
using GradientsDone = std::function<void(const ParameterList&)>;

// Llava::report_gradients_done's guard: the hook is cleared when it goes, on every path out of the step. Move-only.
class GradientsDoneHook {
 public:
  GradientsDoneHook() = default;
  explicit GradientsDoneHook(GradientsDone* slot) : slot_(slot) {}
  GradientsDoneHook(GradientsDoneHook&& o) noexcept : slot_(std::exchange(o.slot_, nullptr)) {}
  GradientsDoneHook& operator=(GradientsDoneHook&&) = delete;
  ~GradientsDoneHook() {
    if (slot_) *slot_ = nullptr;
  }

 private:
  GradientsDone* slot_ = nullptr;
};

struct LlavaConfig {
  VisionConfig vision;
  DecoderConfig text;
  std::int64_t image_token_id = -1;

  static LlavaConfig from_json(const nlohmann::json& j) {
    LlavaConfig c;
    c.vision = VisionConfig::from_json(j.at("vision_config"));
    c.text = DecoderConfig::from_json(j.at("text_config"));
    c.image_token_id = j.contains("image_token_id") ? j["image_token_id"].get<std::int64_t>()
                                                    : j.at("image_token_index").get<std::int64_t>();
    c.vision.feature_layer = j.value("vision_feature_layer", -2);
    const std::string strategy = j.value("vision_feature_select_strategy", std::string("default"));
    CUMO_CHECK(strategy == "default", "LlavaConfig: vision_feature_select_strategy '", strategy,
               "' is not supported (only 'default': drop CLS)");
    const std::string act = j.value("projector_hidden_act", std::string("gelu"));
    CUMO_CHECK(act == "gelu", "LlavaConfig: projector_hidden_act '", act, "' is not supported (only erf 'gelu')");
    c.validate("LlavaConfig");
    return c;
  }

  // HF's LlavaConfig JSON (what from_json reads back; vision.s2 is not an HF key: the enclosing config keeps it).
  nlohmann::json to_json() const {
    return {{"model_type", "llava"},
            {"vision_config", vision.to_json()},
            {"text_config", text.to_json()},
            {"image_token_id", image_token_id},
            {"vision_feature_layer", vision.feature_layer},
            {"vision_feature_select_strategy", "default"},
            {"projector_hidden_act", "gelu"}};
  }

  void validate(const std::string& where) const {
    vision.validate(where + ": vision");
    text.validate(where + ": text");
    CUMO_CHECK(image_token_id >= 0, where, ": image_token_id must be >= 0, got ", image_token_id);
  }
};

template <backend::Backend Backend = backend::Cpu>
class Llava {
 public:
  using Decoder = DecoderLM<Backend>;
  using backend_type = Backend;

  explicit Llava(LlavaConfig c, Backend backend = {})
      : vision_tower(c.vision, "model.vision_tower.", backend),
        projector("model.multi_modal_projector", c.vision.feature_width(), c.text.hidden, backend),
        language_model(c.text, "model.language_model.", "lm_head", backend),
        cfg_(c),
        be_(std::move(backend)) {}

  ClipVision<Backend> vision_tower;
  Connector<Backend> projector;
  Decoder language_model;

  const LlavaConfig& config() const { return cfg_; }
  const Backend& backend() const { return be_; }
  ParameterList parameters() {
    ParameterList p = vision_tower.parameters();
    projector.collect(p);
    for (Parameter* q : language_model.parameters()) p.push_back(q);
    return p;
  }

  // pixels (images, C, S, S) on the host → image features (images·N, Hv), or (images·N, 2·Hv) with S². all_layers:
  // see ClipVision::forward (false stops at the feature layer: generation).
  // keep_activations = false (inference): the tower drops each layer's saved activations as it goes. top_read =
  // false: the top layer above the feature layer runs for its aux losses only (ClipVision::forward; training).
  Tensor encode_images(const Tensor& pixels, bool all_layers = true, bool keep_activations = true,
                       bool top_read = true) {
    return cfg_.vision.s2 ? s2_.forward(vision_tower, pixels, all_layers, keep_activations, top_read)
                          : vision_tower.forward(pixels, all_layers, keep_activations, top_read).features;
  }
  // d features → the vision tower's gradients (both S² passes). aux as ClipVision::backward.
  void encode_images_backward(const Tensor& dfeatures, AuxLossWeights aux = {}) {
    if (cfg_.vision.s2)
      s2_.backward(vision_tower, dfeatures, aux);
    else
      vision_tower.backward(dfeatures, aux);
  }
  // Per sparse CLIP layer of the last encode: its aux losses (with S²: ½(1× + 3×), see nn/s2.hpp) and expert load.
  std::vector<AuxLosses> vision_aux_losses() const {
    return cfg_.vision.s2 ? s2_.aux_losses(vision_tower) : vision_tower.aux_losses();
  }
  std::vector<ExpertLoad> vision_loads() const {
    return cfg_.vision.s2 ? s2_.loads(vision_tower) : vision_tower.loads();
  }

  // ids (B*T) → their embeddings (B*T, Ht) with the image features of `pixels` (images, C, S, S; may be undefined)
  // written, in order, into the image-token rows. training: every part keeps what its backward needs (and the ids
  // go to the embedding's backward); false: the generation path (the vision tower stops at its feature layer).
  Tensor embed_multimodal(const std::vector<std::int64_t>& ids, const Tensor& pixels, bool training = true) {
    constexpr const char* where = "Llava::forward";
    is_image_.assign(ids.size(), false);
    std::int64_t n_img = 0;
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] == cfg_.image_token_id) {
        is_image_[i] = true;
        ++n_img;
      }
    // The table has no row for a placeholder id outside the vocabulary; embed a valid id there instead.
    std::vector<std::int64_t> safe = ids;
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (is_image_[i] && (safe[i] < 0 || safe[i] >= cfg_.text.vocab)) safe[i] = 0;
    auto& embed = language_model.embed_tokens;
    Tensor emb = training ? embed.forward(safe) : embed.apply(safe);  // (B*T, Ht)
    has_images_ = pixels.defined() && pixels.numel() > 0;
    if (!has_images_) {
      CUMO_CHECK(n_img == 0, where, ": the prompt has ", n_img, " image tokens but no pixel_values were given");
      serve_image_experts_forward(training);  // sharded experts: the group's other ranks may have images
      return emb;
    }
    // training: every CLIP layer's aux losses count, but only the features are read (top_read false)
    const Tensor features = encode_images(pixels, /*all_layers=*/training, /*keep_activations=*/training,
                                          /*top_read=*/!training);  // (images*N, Hv or 2·Hv)
    const Tensor proj = projector.forward(features, pixels.size(0), training);  // (images*N, Ht)
    CUMO_CHECK(proj.size(0) == n_img, where, ": the prompt has ", n_img, " image tokens (id ", cfg_.image_token_id,
               ") but the images give ", proj.size(0), " features (", pixels.size(0), " images × ",
               cfg_.vision.patches(), " patches)");
    const std::int64_t H = cfg_.text.hidden;
    for_each_image_run([&](std::int64_t pos, std::int64_t k, std::int64_t len) {  // feature rows k… → rows pos…
      be_.copy_blocks(proj, k * H, 0, emb, pos * H, 0, len * H, 1);
    });
    return emb;
  }

  // ids, labels (B*T); pixels (images, C, S, S) with images · patches == the number of image tokens.
  typename Decoder::Output forward(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                                   const Tensor& pixels, const std::vector<std::int64_t>* labels = nullptr,
                                   const std::vector<std::uint8_t>* key_valid = nullptr) {
    CUMO_CHECK(std::int64_t(ids.size()) == B * T, "Llava::forward: ", ids.size(), " ids for B = ", B, ", T = ", T);
    const Tensor emb = embed_multimodal(ids, pixels, /*training=*/true);
    return language_model.forward_embeds(emb, B, T, labels, key_valid);
  }

  // While the returned guard lives, backward() calls `done` as it finishes each of its first two parts, with that
  // part's parameters — language_model.parameters(), then projector.parameters() — whose gradients it no longer
  // touches: a data-parallel trainer starts summing them over the ranks while the rest computes
  // (dist::OverlappedGradientSum). One hook at a time.
  [[nodiscard]] GradientsDoneHook report_gradients_done(GradientsDone done) {
    CUMO_CHECK(!gradients_done_, "Llava::report_gradients_done: a hook is set already (its guard still lives)");
    CUMO_CHECK(bool(done), "Llava::report_gradients_done: the hook is empty");
    gradients_done_ = std::move(done);
    return GradientsDoneHook(&gradients_done_);
  }

  // Back-propagates the last forward's loss (scaled by dloss) through all three parts, reporting the first two as
  // they are done where a hook is set (report_gradients_done).
  void backward(float dloss = 1.f, AuxLossWeights vision_aux = {}, AuxLossWeights projector_aux = {}) {
    const Tensor demb = language_model.backward(dloss);  // (B*T, Ht)
    language_model.backward_embeddings(demb, &is_image_);
    if (gradients_done_) gradients_done_(language_model.parameters());
    if (!has_images_) return serve_image_experts_backward(vision_aux, projector_aux);
    const std::int64_t H = cfg_.text.hidden;
    std::int64_t n = 0;
    for (bool b : is_image_) n += b;
    Tensor dproj = be_.empty({n, H});
    for_each_image_run([&](std::int64_t pos, std::int64_t k, std::int64_t len) {
      be_.copy_blocks(demb, pos * H, 0, dproj, k * H, 0, len * H, 1);
    });
    const Tensor dfeatures = projector.backward(dproj, projector_aux);
    if (gradients_done_) gradients_done_(projector.parameters());
    encode_images_backward(dfeatures, vision_aux);
  }
  // ---- expert parallelism: the MoE blocks' experts (CLIP, connector, a Mixtral LM) over an expert-parallel group
  // Every sparse block keeps its share of the experts (SparseMoE::shard_experts); returns their parameters (the
  // local slices). Every rank of `group` calls it, on the same weights.
  ParameterList shard_experts(dist::Communicator& group) {
    CUMO_CHECK(!experts_sharded(), "Llava::shard_experts: the experts are sharded already");
    ParameterList sharded = vision_tower.shard_experts(group);
    projector.mlp.shard_experts(group, sharded);
    for (Parameter* p : language_model.shard_experts(group)) sharded.push_back(p);
    return sharded;
  }
  // Every rank of the group gets every expert back (SparseMoE::unshard_experts): the whole model on every rank.
  void unshard_experts() {
    vision_tower.unshard_experts();
    projector.mlp.unshard_experts();
    language_model.unshard_experts();
  }
  bool experts_sharded() const {
    return vision_tower.experts_sharded() || projector.mlp.experts_sharded() || language_model.experts_sharded();
  }
  // A rank with no rows: its sharded blocks run on zero tokens, where a rank with rows runs them (the image part,
  // then the language model; backward the other way), so that the group's exchanges pair up. No-ops when nothing
  // is sharded.
  void serve_experts_forward(bool training = true) {
    serve_image_experts_forward(training);
    language_model.serve_experts_forward();
  }
  void serve_experts_backward(AuxLossWeights vision_aux = {}, AuxLossWeights projector_aux = {}) {
    language_model.serve_experts_backward();
    serve_image_experts_backward(vision_aux, projector_aux);
  }

  // d pixel_values (images, C, S, S) on the host for the last backward (computed on demand; see
  // ClipVision::input_grad).
  Tensor last_dpixels() const {
    return cfg_.vision.s2 ? s2_.input_grad(vision_tower) : vision_tower.input_grad();
  }

 private:
  GradientsDone gradients_done_;  // set only while a report_gradients_done guard lives
  // f(position, feature index, length) for each maximal run of consecutive image positions: one copy per image
  // (the processor writes each image's tokens together) instead of one per row.
  template <class F>
  void for_each_image_run(F&& f) const {
    std::int64_t k = 0;
    for (std::size_t i = 0; i < is_image_.size();) {
      if (!is_image_[i]) {
        ++i;
        continue;
      }
      std::size_t j = i;
      while (j < is_image_.size() && is_image_[j]) ++j;
      f(std::int64_t(i), k, std::int64_t(j - i));
      k += std::int64_t(j - i);
      i = j;
    }
  }

  // Rows without an image (or no rows): the vision tower's and the connector's sharded blocks on zero tokens.
  // With S² the tower serves both of its passes (S2Vision::serve_experts_*).
  void serve_image_experts_forward(bool training) {
    if (cfg_.vision.s2)
      s2_.serve_experts_forward(vision_tower, /*all_layers=*/training, /*top_read=*/!training);
    else
      vision_tower.serve_experts_forward(/*all_layers=*/training, /*top_read=*/!training);
    projector.mlp.serve_experts_forward(training);
  }
  void serve_image_experts_backward(AuxLossWeights vision_aux, AuxLossWeights projector_aux) {
    projector.mlp.serve_experts_backward(projector_aux);
    if (cfg_.vision.s2)
      s2_.serve_experts_backward(vision_tower, vision_aux);
    else
      vision_tower.serve_experts_backward(vision_aux);
  }

  LlavaConfig cfg_;
  [[no_unique_address]] Backend be_;
  S2Vision<Backend> s2_;  // used when cfg_.vision.s2 (holds the 3× pass's state)
  std::vector<bool> is_image_;
  bool has_images_ = false;
};

}  // namespace cumo::nn
