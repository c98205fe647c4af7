#pragma once
// nn::Llava — LLaVA-1.5 (HF LlavaForConditionalGeneration): CLIP features of layer feature_layer (−2) without CLS
// → Connector → written, in order, into the rows whose input id is image_token_id (the prompt already holds one
// such id per patch, as HF's processor expands it) → the decoder LM and its causal-LM loss.
// The embedding table gets no gradient from the image rows (HF's masked_scatter replaces them).
// With vision.s2 the features are S² multi-scale ones (nn/s2.hpp: [1× | pooled 3× tiles], 2·Hv wide) and the
// connector maps 2·Hv → Ht, as CuMo's `mm_hidden_size * len(scales)`.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/nn/connector.hpp"
#include "cumo/nn/decoder.hpp"
#include "cumo/nn/s2.hpp"
#include "cumo/nn/vit.hpp"

namespace cumo::nn {

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
    return c;
  }
};

template <class Backend = backend::Cpu>
class Llava {
 public:
  using Decoder = DecoderLM<Backend>;

  explicit Llava(LlavaConfig c)
      : vision_tower(c.vision, "model.vision_tower."),
        projector("model.multi_modal_projector", c.vision.feature_width(), c.text.hidden),
        language_model(c.text, "model.language_model.", "lm_head"),
        cfg_(c) {
    CUMO_CHECK(on_cpu<Backend> || !c.vision.s2, "Llava: S² multi-scale features run on the CPU backend only for now");
  }

  ClipVision<Backend> vision_tower;
  Connector<Backend> projector;
  Decoder language_model;

  const LlavaConfig& config() const { return cfg_; }
  ParameterList parameters() {
    ParameterList p = vision_tower.parameters();
    projector.collect(p);
    for (Parameter* q : language_model.parameters()) p.push_back(q);
    return p;
  }

  // pixels (images, C, S, S) → image features (images·N, Hv), or (images·N, 2·Hv) with S². all_layers: see
  // ClipVision::forward (false stops at the feature layer: generation).
  Tensor encode_images(const Tensor& pixels, bool all_layers = true) {
    if constexpr (on_cpu<Backend>)
      if (cfg_.vision.s2) return s2_.forward(vision_tower, pixels, all_layers);
    return vision_tower.forward(pixels, all_layers).features;
  }
  // d features → d pixels; accumulates the vision tower's gradients (both S² passes). aux as ClipVision::backward.
  Tensor encode_images_backward(const Tensor& dfeatures, AuxLossWeights aux = {}) {
    if constexpr (on_cpu<Backend>)
      if (cfg_.vision.s2) return s2_.backward(vision_tower, dfeatures, aux);
    return vision_tower.backward(dfeatures, aux);
  }
  // Per sparse CLIP layer of the last encode: its aux losses (with S²: ½(1× + 3×), see nn/s2.hpp) and expert load.
  std::vector<AuxLosses> vision_aux_losses() const {
    if constexpr (on_cpu<Backend>)
      if (cfg_.vision.s2) return s2_.aux_losses(vision_tower);
    return vision_tower.aux_losses();
  }
  std::vector<ExpertLoad> vision_loads() const {
    if constexpr (on_cpu<Backend>)
      if (cfg_.vision.s2) return s2_.loads(vision_tower);
    return vision_tower.loads();
  }

  // ids, labels (B*T); pixels (images, C, S, S) with images · patches == the number of image tokens.
  typename Decoder::Output forward(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T, const Tensor& pixels,
                            const std::vector<std::int64_t>* labels = nullptr,
                            const std::vector<std::uint8_t>* key_valid = nullptr) {
    constexpr const char* where = "Llava::forward";
    CUMO_CHECK(std::int64_t(ids.size()) == B * T, where, ": ", ids.size(), " ids for B = ", B, ", T = ", T);
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
    Tensor emb = language_model.embed(safe);  // (B*T, Ht)
    if (pixels.defined() && pixels.numel() > 0) {
      const Tensor features = encode_images(pixels, /*all_layers=*/true);  // (images*N, Hv or 2·Hv)
      const Tensor proj = projector.forward(features, pixels.size(0));      // (images*N, Ht)
      CUMO_CHECK(proj.size(0) == n_img, where, ": the prompt has ", n_img, " image tokens (id ", cfg_.image_token_id,
                 ") but the images give ", proj.size(0), " features (", pixels.size(0), " images × ",
                 cfg_.vision.patches(), " patches)");
      const std::int64_t H = cfg_.text.hidden;
      if constexpr (on_cpu<Backend>) {
        std::int64_t k = 0;
        for (std::size_t i = 0; i < ids.size(); ++i)
          if (is_image_[i]) std::copy_n(proj.data<float>() + (k++) * H, H, emb.data<float>() + std::int64_t(i) * H);
      } else {
        for_each_image_run([&](std::int64_t pos, std::int64_t k, std::int64_t len) {  // feature rows k… → rows pos…
          Backend::copy_blocks(proj, k * H, 0, emb, pos * H, 0, len * H, 1);
        });
      }
      has_images_ = true;
    } else {
      CUMO_CHECK(n_img == 0, where, ": the prompt has ", n_img, " image tokens but no pixel_values were given");
      has_images_ = false;
    }
    return language_model.forward_embeds(emb, B, T, labels, key_valid);
  }

  // Back-propagates the last forward's loss (scaled by dloss) through all three parts.
  void backward(float dloss = 1.f, AuxLossWeights vision_aux = {}, AuxLossWeights projector_aux = {}) {
    const Tensor demb = language_model.backward(dloss);  // (B*T, Ht)
    language_model.backward_embeddings(demb, &is_image_);
    if (!has_images_) return;
    const std::int64_t H = cfg_.text.hidden;
    std::int64_t n = 0;
    for (bool b : is_image_) n += b;
    Tensor dproj = matrix(n, H, Backend::device);
    if constexpr (on_cpu<Backend>) {
      std::int64_t k = 0;
      for (std::size_t i = 0; i < is_image_.size(); ++i)
        if (is_image_[i]) std::copy_n(demb.data<float>() + std::int64_t(i) * H, H, dproj.data<float>() + (k++) * H);
    } else {
      for_each_image_run([&](std::int64_t pos, std::int64_t k, std::int64_t len) {
        Backend::copy_blocks(demb, pos * H, 0, dproj, k * H, 0, len * H, 1);
      });
    }
    const Tensor dfeat = projector.backward(dproj, projector_aux);
    last_dpixels_ = encode_images_backward(dfeat, vision_aux);
  }
  const Tensor& last_dpixels() const { return last_dpixels_; }

 private:
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

  LlavaConfig cfg_;
  S2Vision s2_;  // used when cfg_.vision.s2 (holds the 3× pass's state)
  std::vector<bool> is_image_;
  bool has_images_ = false;
  Tensor last_dpixels_;
};

}  // namespace cumo::nn
