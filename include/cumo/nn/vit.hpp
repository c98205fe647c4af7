#pragma once
// nn::ClipVision — the CLIP vision transformer as Hugging Face's CLIPVisionModel computes it:
//   patches (conv, stride = kernel = patch, no bias — done as one GEMM over unfolded patches)
//   → [class_embedding; patches] + position_embedding → pre_layrnorm  = hidden_state_0
//   → L pre-LN encoder layers (x += attn(ln1 x); x += mlp(ln2 x), quick_gelu)  = hidden_state_1 … L
// LLaVA / CuMo take hidden_state_{L+feature_layer+1} (feature_layer −2: the second-to-last) without the CLS row;
// post_layernorm is loaded and saved but only feeds CLIP's pooled output, which LLaVA never uses.
// Every encoder MLP is a VisionFFN slot: dense, or a SparseMoE of CLIP MLPs after upcycle().
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/shape.hpp"
#include "cumo/nn/attention.hpp"
#include "cumo/nn/layernorm.hpp"
#include "cumo/nn/mlp.hpp"

namespace cumo::nn {

struct VisionConfig {
  std::int64_t hidden = 0, layers = 0, heads = 0, ffn = 0, image_size = 0, patch_size = 0, channels = 3;
  double eps = 1e-5;
  int feature_layer = -2;  // which hidden state LLaVA takes (Python-style index into hidden_states)
  // S² multi-scale features (1× + area-pooled 3× tiles, channel concat; nn/s2.hpp). Not part of HF's CLIPVisionConfig:
  // ClipVision ignores it, nn::Llava reads it (features, and so the connector's input, become 2·hidden wide).
  bool s2 = false;

  std::int64_t grid() const { return image_size / patch_size; }
  std::int64_t patches() const { return grid() * grid(); }
  // Parameters of the tower with these sizes (every MLP a top-k-of-`experts` MoE with a router when experts > 0),
  // in double: sizes are measured before anything is allocated.
  double parameter_count(int experts = 0) const {
    const double H = double(hidden), F = double(ffn), E = double(experts);
    const double mlp = H * F + F + F * H + H;
    const double layer = 4 * (H * H + H) + 4 * H + (experts > 0 ? E * mlp + H * E : mlp);
    return double(channels) * double(patch_size) * double(patch_size) * H + H + double(patches() + 1) * H + 4 * H +
           double(layers) * layer;
  }
  // Width of the image features the connector receives.
  std::int64_t feature_width() const { return s2 ? 2 * hidden : hidden; }

  // From HF's CLIPVisionConfig JSON (the vision_config of a LlavaConfig, or a CLIPVisionModel's config).
  static VisionConfig from_json(const nlohmann::json& j) {
    VisionConfig c;
    c.hidden = j.at("hidden_size").get<std::int64_t>();
    c.layers = j.at("num_hidden_layers").get<std::int64_t>();
    c.heads = j.at("num_attention_heads").get<std::int64_t>();
    c.ffn = j.at("intermediate_size").get<std::int64_t>();
    c.image_size = j.at("image_size").get<std::int64_t>();
    c.patch_size = j.at("patch_size").get<std::int64_t>();
    c.channels = j.value("num_channels", std::int64_t(3));
    c.eps = j.value("layer_norm_eps", 1e-5);
    const std::string act = j.value("hidden_act", std::string("quick_gelu"));
    CUMO_CHECK(act == "quick_gelu", "VisionConfig: hidden_act '", act, "' is not supported (CLIP uses quick_gelu)");
    c.validate("VisionConfig");
    return c;
  }

  // HF's CLIPVisionConfig JSON (what from_json reads back; s2 and feature_layer live in the enclosing config).
  nlohmann::json to_json() const {
    return {{"model_type", "clip_vision_model"}, {"hidden_size", hidden},      {"num_hidden_layers", layers},
            {"num_attention_heads", heads},     {"intermediate_size", ffn},   {"image_size", image_size},
            {"patch_size", patch_size},         {"num_channels", channels},   {"layer_norm_eps", eps},
            {"hidden_act", "quick_gelu"}};
  }

  // Every field in range, or an error naming it and its value (`where` names the source).
  void validate(const std::string& where) const {
    CUMO_CHECK(hidden >= 1 && layers >= 1 && heads >= 1 && ffn >= 1, where,
               ": the vision tower needs positive hidden_size, num_hidden_layers, num_attention_heads and "
               "intermediate_size (got ", hidden, ", ", layers, ", ", heads, ", ", ffn, ")");
    for (const auto& [name, x] : {std::pair{"hidden_size", hidden}, {"num_hidden_layers", layers},
                                  {"num_attention_heads", heads}, {"intermediate_size", ffn},
                                  {"image_size", image_size}, {"patch_size", patch_size}, {"num_channels", channels}})
      CUMO_CHECK(x <= kMaxDim, where, ": ", name, " ", x, " is larger than any model this library sizes (> ", kMaxDim,
                 ")");
    CUMO_CHECK(hidden % heads == 0, where, ": hidden_size ", hidden, " is not divisible by num_attention_heads ",
               heads);
    CUMO_CHECK(patch_size >= 1 && image_size >= patch_size && image_size % patch_size == 0, where, ": image_size ",
               image_size, " must be a positive multiple of patch_size ", patch_size);
    CUMO_CHECK(channels >= 1, where, ": num_channels must be positive, got ", channels);
    CUMO_CHECK(std::isfinite(eps) && eps > 0, where, ": layer_norm_eps must be finite and > 0, got ", eps);
    CUMO_CHECK(feature_layer >= -layers - 1 && feature_layer <= layers && feature_layer != 0, where,
               ": vision_feature_layer ", feature_layer, " is outside [", -layers - 1, ", ", layers,
               "] (0, the embeddings, is not allowed)");
  }
};

// 2-D sine-cosine position table for a grid × grid patch layout plus the CLS row (MAE's get_2d_sincos_pos_embed):
// of each row's H entries, the first H/2 encode the patch's column and the last H/2 its row, each half as
// [sin(p·ω_0..ω_{H/4−1}), cos(p·ω_0..)] with ω_i = 10000^(−i/(H/4)); the CLS row is 0. A from-scratch tower that
// starts from this table tells every patch where it is from step 0; from HF's N(0, 0.02²) init the demo's trained
// tower gave every background patch the same feature vector (docs/results.md). H must be a multiple of 4. Writes
// the (grid²+1, H) f32 host tensor `pos`.
inline void fill_sincos_positions(Tensor& pos, std::int64_t grid) {
  constexpr const char* where = "fill_sincos_positions";
  check_dtype(where, "position_embedding", pos, DType::f32);
  check_device(where, "position_embedding", pos, Device::cpu);
  CUMO_CHECK(pos.dim() == 2 && pos.size(0) == grid * grid + 1 && pos.is_contiguous(), where,
             ": position_embedding must be a contiguous (", grid * grid + 1, ", H) tensor, got ", pos.shape());
  const std::int64_t H = pos.size(1), Q = H / 4;
  CUMO_CHECK(H % 4 == 0, where, ": the hidden size ", H, " must be a multiple of 4");
  float* d = pos.data<float>();
  std::fill(d, d + H, 0.f);  // CLS
  for (std::int64_t gy = 0; gy < grid; ++gy)
    for (std::int64_t gx = 0; gx < grid; ++gx) {
      float* row = d + (1 + gy * grid + gx) * H;
      for (std::int64_t i = 0; i < Q; ++i) {
        const double w = std::pow(10000.0, -double(i) / double(Q));
        row[i] = float(std::sin(double(gx) * w));
        row[Q + i] = float(std::cos(double(gx) * w));
        row[2 * Q + i] = float(std::sin(double(gy) * w));
        row[3 * Q + i] = float(std::cos(double(gy) * w));
      }
    }
}

template <backend::Backend Backend = backend::Cpu>
using VisionFFN = FeedForward<DenseMLP<QuickGELU, Backend>,
                              SparseMoE<Router<TopKDynamic>, Expert<MLP<QuickGELU>>, Backend>>;

template <backend::Backend Backend = backend::Cpu>
class ClipEncoderLayer {
 public:
  ClipEncoderLayer() = default;
  ClipEncoderLayer(const std::string& name, const VisionConfig& c, Backend backend = {})
      : layer_norm1(name + ".layer_norm1", c.hidden, c.eps, backend),
        layer_norm2(name + ".layer_norm2", c.hidden, c.eps, backend),
        self_attn(name + ".self_attn",
                  AttentionConfig{c.hidden, c.heads, c.heads, 0, true, true, false, 0.0, "out_proj"}, backend),
        mlp(name + ".mlp", DenseMLP<QuickGELU, Backend>(name + ".mlp", c.hidden, c.ffn, 0, "fc1", "fc2", backend)),
        be_(std::move(backend)) {}

  LayerNorm<Backend> layer_norm1, layer_norm2;
  Attention<Backend> self_attn;
  VisionFFN<Backend> mlp;

  void collect(ParameterList& out) {
    self_attn.collect(out);
    layer_norm1.collect(out);
    mlp.collect(out);
    layer_norm2.collect(out);
  }
  // x (B*T, H) → (B*T, H); one image per sequence (the MoE's aux-loss segments)
  Tensor forward(const Tensor& x, const TokenLayout& layout) {
    Tensor h = add(be_, x, self_attn.forward(layer_norm1.forward(x), layout));
    return add(be_, h, mlp.forward(layer_norm2.forward(h), ForwardArgs{layout.B, true}));
  }
  void release_activations() {  // drops what forward() saved
    layer_norm1.release_activations();
    layer_norm2.release_activations();
    self_attn.release_activations();
    mlp.release_activations();
  }
  Tensor backward(const Tensor& dy, AuxLossWeights aux = {}) {
    Tensor dh = add(be_, dy, layer_norm2.backward(mlp.backward(dy, aux)));
    return add(be_, dh, layer_norm1.backward(self_attn.backward(dh)));
  }
  // A sparse layer whose output nobody reads (the top layer above the feature layer, in training): attention, the
  // second norm and the router run for the aux losses, the experts do not (FeedForward::forward_routing).
  // backward_routing gives d x of those aux losses: backward() of a zero dy, bit for bit.
  void forward_routing(const Tensor& x, const TokenLayout& layout) {
    const Tensor h = add(be_, x, self_attn.forward(layer_norm1.forward(x), layout));
    mlp.forward_routing(layer_norm2.forward(h), ForwardArgs{layout.B, true});
  }
  Tensor backward_routing(AuxLossWeights aux = {}) {
    const Tensor dh = layer_norm2.backward(mlp.backward_routing(aux));
    return add(be_, dh, layer_norm1.backward(self_attn.backward(dh)));
  }

 private:
  [[no_unique_address]] Backend be_;
};

template <backend::Backend Backend = backend::Cpu>
class ClipVision {
 public:
  using backend_type = Backend;

  // `prefix`: "" for a CLIPVisionModel state dict (transformers 5), "model.vision_tower." inside LLaVA.
  explicit ClipVision(VisionConfig c, const std::string& prefix = "", Backend backend = {})
      : class_embedding(param(prefix + "embeddings.class_embedding", {c.hidden}, Backend::device)),
        patch_embedding(param(prefix + "embeddings.patch_embedding.weight",
                              {c.hidden, c.channels, c.patch_size, c.patch_size}, Backend::device)),
        position_embedding(
            param(prefix + "embeddings.position_embedding.weight", {c.patches() + 1, c.hidden}, Backend::device)),
        pre_layrnorm(prefix + "pre_layrnorm", c.hidden, c.eps, backend),
        post_layernorm(prefix + "post_layernorm", c.hidden, c.eps, backend),
        cfg_(c),
        be_(backend) {
    layers.reserve(std::size_t(c.layers));
    for (std::int64_t l = 0; l < c.layers; ++l)
      layers.emplace_back(prefix + "encoder.layers." + std::to_string(l), c, backend);
  }

  Parameter class_embedding;     // (H,)
  Parameter patch_embedding;     // (H, C, P, P)
  Parameter position_embedding;  // (N+1, H)
  LayerNorm<Backend> pre_layrnorm, post_layernorm;
  std::vector<ClipEncoderLayer<Backend>> layers;

  const VisionConfig& config() const { return cfg_; }
  const Backend& backend() const { return be_; }
  // The number of encoder layers whose output the features depend on (L − 1 for feature_layer −2).
  std::int64_t feature_depth() const {
    return cfg_.feature_layer < 0 ? cfg_.layers + 1 + cfg_.feature_layer : cfg_.feature_layer;
  }

  ParameterList parameters() {
    ParameterList p{&class_embedding, &patch_embedding, &position_embedding};
    pre_layrnorm.collect(p);
    for (auto& l : layers) l.collect(p);
    post_layernorm.collect(p);
    return p;
  }

  struct Output {
    std::vector<Tensor> hidden_states;  // L+1 of (B*(N+1), H); [0] after pre_layrnorm
    Tensor features;                    // (B*N, H) hidden_states[feature_depth()] without the CLS rows
  };

  // pixels (B, C, S, S) → hidden states and features. `all_layers` = false stops at the feature layer (LLaVA never
  // reads the last layer's output); true runs every layer as HF does (aux losses of the last layer count in CuMo).
  // The pixels are on the host for every backend (the data loader's batch): the patches are unfolded there and
  // go to the backend as one (B*N, C*P*P) matrix. keep_activations = false (inference): each layer drops what it
  // saved for the backward as soon as it has run, so the tower holds one layer's activations at a time, not all.
  // top_read = false (training, with all_layers): nobody reads the top layer's output when it is above the feature
  // layer, so a dense top layer does not run and a sparse one runs its routing only (ClipEncoderLayer::
  // forward_routing: the aux losses and their gradients are the same, the experts' products are skipped);
  // hidden_states then ends below it.
  Output forward(const Tensor& pixels, bool all_layers = true, bool keep_activations = true, bool top_read = true) {
    constexpr const char* where = "ClipVision::forward";
    const VisionConfig& c = cfg_;
    check_dtype(where, "pixel_values", pixels, DType::f32);
    check_device(where, "pixel_values", pixels, Device::cpu);
    check_shape(where, "pixel_values", pixels, {-1, c.channels, c.image_size, c.image_size});
    const Tensor px = pixels.contiguous();
    const std::int64_t B = px.size(0), N = c.patches(), T = N + 1, H = c.hidden;
    const std::int64_t K = c.channels * c.patch_size * c.patch_size;
    B_ = B;

    // unfold: patch row (b, gy, gx), columns (c, i, j) — the conv weight's (C, P, P) order
    Tensor cols = Tensor::empty({B * N, K});
    const float* pp = px.data<float>();
    float* pc = cols.data<float>();
    for_each_patch_pixel(B, [&](std::int64_t col, std::int64_t pix) { pc[col] = pp[pix]; });
    cols_ = be_.upload(cols);                                                     // (B*N, C*P*P)
    Tensor patch = be_.empty({B * N, H});
    be_.linear(cols_, patch_embedding.value.view({H, K}), nullptr, patch);        // (B*N, H)
    Tensor emb = be_.empty({B * T, H});
    be_.vit_embeddings(patch, class_embedding.value, position_embedding.value, B, emb);  // [CLS; patches] + pos

    const TokenLayout layout = TokenLayout::make(be_, B, T);
    Output out;
    out.hidden_states.push_back(pre_layrnorm.forward(emb));
    if (!keep_activations) {
      pre_layrnorm.release_activations();
      cols_ = Tensor();
    }
    const std::int64_t depth = all_layers ? c.layers : feature_depth();
    ran_ = depth;
    const std::int64_t read = read_depth(depth, top_read);
    routing_top_ = read < depth && layers[std::size_t(depth - 1)].mlp.is_sparse();
    for (std::int64_t l = 0; l < read; ++l) {
      out.hidden_states.push_back(layers[std::size_t(l)].forward(out.hidden_states.back(), layout));
      if (!keep_activations) layers[std::size_t(l)].release_activations();
    }
    if (routing_top_) {  // the unread top layer: its aux losses only
      layers[std::size_t(depth - 1)].forward_routing(out.hidden_states.back(), layout);
      if (!keep_activations) layers[std::size_t(depth - 1)].release_activations();
    }
    out.features = be_.empty({B * N, H});  // B blocks of N rows, past each CLS row
    be_.copy_blocks(out.hidden_states[std::size_t(feature_depth())], H, T * H, out.features, 0, N * H, N * H, B);
    dpatch_ = Tensor();
    return out;
  }

  // dfeatures (B*N, H) (or (B, N, H)) → every parameter gradient accumulates; input_grad() then gives d pixel_values.
  // aux: coefficients of each sparse layer's balance / z losses (CuMo: coef / L for every layer); layers above the
  // feature layer are only back-propagated when they are sparse and their aux losses carry weight.
  void backward(const Tensor& dfeatures, AuxLossWeights aux = {}) {
    constexpr const char* where = "ClipVision::backward";
    const VisionConfig& c = cfg_;
    const std::int64_t B = B_, N = c.patches(), T = N + 1, H = c.hidden;
    const std::int64_t K = c.channels * c.patch_size * c.patch_size;
    CUMO_CHECK(cols_.defined(), where, ": no forward to differentiate");
    CUMO_CHECK(dfeatures.numel() == B * N * H, where, ": dfeatures has shape ", dfeatures.shape(), " but expected (",
               B * N, ", ", H, ")");
    check_device(where, "dfeatures", dfeatures, Backend::device);
    const Tensor df = dfeatures.contiguous().view({B * N, H});
    const std::int64_t fd = feature_depth(), top = backward_top(aux);
    Tensor dh = be_.zeros({B * T, H});  // d hidden_state_top
    for (std::int64_t l = top; l >= 0; --l) {
      if (l == fd) be_.add_blocks(df, 0, N * H, dh, H, T * H, N * H, B);  // the features' gradient, past each CLS row
      if (l > 0 && routing_top_ && l == ran_)  // the unread top layer: its aux losses' gradient only
        dh = layers[std::size_t(l - 1)].backward_routing(aux);
      else if (l > 0)
        dh = layers[std::size_t(l - 1)].backward(dh, aux);
    }
    const Tensor demb = pre_layrnorm.backward(dh);  // (B*T, H)
    dpatch_ = be_.empty({B * N, H});
    be_.vit_embeddings_backward(demb, B, dpatch_, class_embedding.grad, position_embedding.grad);
    Tensor dw = patch_embedding.grad.view({H, K});
    be_.linear_dweight(dpatch_, cols_, dw);  // (H, C*P*P)
  }

  // d pixel_values (B, C, S, S) on the host for the last backward: the patch embedding's input gradient, folded
  // back onto the pixels (patches do not overlap: a plain scatter). Computed on demand — training never needs it.
  Tensor input_grad() const {
    CUMO_CHECK(dpatch_.defined(), "ClipVision::input_grad: no backward since the last forward");
    const VisionConfig& c = cfg_;
    const std::int64_t B = B_, N = c.patches(), H = c.hidden, S = c.image_size;
    const std::int64_t K = c.channels * c.patch_size * c.patch_size;
    Tensor dcols = be_.empty({B * N, K});
    be_.linear_dinput(dpatch_, patch_embedding.value.view({H, K}), dcols, /*accumulate=*/false);  // (B*N, K)
    const Tensor host = be_.to_host(dcols);
    Tensor dpx = Tensor::zeros({B, c.channels, S, S});
    float* pd = dpx.data<float>();
    const float* pdc = host.data<float>();
    for_each_patch_pixel(B, [&](std::int64_t col, std::int64_t pix) { pd[pix] = pdc[col]; });
    return dpx;
  }

  // ---- expert parallelism (SparseMoE::shard_experts over `group`, every sparse layer) --------------------------
  // Returns the sharded parameters (the local slices). Every rank of the group calls it.
  ParameterList shard_experts(dist::Communicator& group) { return shard_layer_experts(layers, group); }
  void unshard_experts() { unshard_layer_experts(layers); }
  bool experts_sharded() const { return layer_experts_sharded(layers); }
  // A rank without images in a batch: every sharded layer's block runs on zero tokens, in the order forward(…,
  // all_layers) and then backward(…, aux) call them on a rank with images, so that the group's exchanges pair up.
  // An unread top layer (top_read false) runs no expert on any rank: nothing to serve there.
  void serve_experts_forward(bool all_layers = true, bool top_read = true) {
    ran_ = all_layers ? cfg_.layers : feature_depth();
    const std::int64_t served = read_depth(ran_, top_read);
    routing_top_ = served < ran_ && layers[std::size_t(ran_ - 1)].mlp.is_sparse();
    for (std::int64_t l = 0; l < served; ++l) layers[std::size_t(l)].mlp.serve_experts_forward();
  }
  void serve_experts_backward(AuxLossWeights aux = {}) {
    for (std::int64_t l = backward_top(aux); l > 0; --l)
      if (!(routing_top_ && l == ran_)) layers[std::size_t(l - 1)].mlp.serve_experts_backward(aux);
  }

  // Aux losses of every sparse encoder layer in the last forward (empty when all are dense).
  std::vector<AuxLosses> aux_losses() const {
    std::vector<AuxLosses> a;
    for (std::int64_t l = 0; l < ran_; ++l)
      if (layers[std::size_t(l)].mlp.is_sparse()) a.push_back(layers[std::size_t(l)].mlp.last_aux());
    return a;
  }
  // Tokens per expert of every sparse encoder layer in the last forward (empty when all are dense).
  std::vector<ExpertLoad> loads() const {
    std::vector<ExpertLoad> a;
    for (std::int64_t l = 0; l < ran_; ++l)
      if (layers[std::size_t(l)].mlp.is_sparse()) a.push_back(layers[std::size_t(l)].mlp.sparse().load());
    return a;
  }

 private:
  // f(col, pix) for every pixel of B images: col indexes the unfolded (B*N, C*P*P) patch matrix — row (b, gy, gx),
  // column (c, i, j), the conv weight's (C, P, P) order — and pix the (B, C, S, S) pixels. Unfold and fold both.
  template <class F>
  void for_each_patch_pixel(std::int64_t B, F&& f) const {
    const VisionConfig& c = cfg_;
    const std::int64_t N = c.patches(), P = c.patch_size, G = c.grid(), K = c.channels * P * P, S = c.image_size;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t gy = 0; gy < G; ++gy)
        for (std::int64_t gx = 0; gx < G; ++gx)
          for (std::int64_t ch = 0; ch < c.channels; ++ch)
            for (std::int64_t i = 0; i < P; ++i)
              for (std::int64_t j = 0; j < P; ++j)
                f((b * N + gy * G + gx) * K + (ch * P + i) * P + j, ((b * c.channels + ch) * S + gy * P + i) * S + gx * P + j);
  }

  // The backward runs layers [0, top): up to the feature layer, and on through the last sparse layer that ran when
  // its aux losses carry weight. With sharded experts always through it: whether a rank's aux weights are zero
  // depends on its images (a rank without any weights them 0), and every rank of the group must call the same blocks.
  std::int64_t backward_top(AuxLossWeights aux) const {
    const std::int64_t fd = feature_depth();
    const bool aux_on = aux.balance != 0.f || aux.z != 0.f || experts_sharded();
    for (std::int64_t l = ran_ - 1; l >= fd; --l)
      if (aux_on && layers[std::size_t(l)].mlp.is_sparse()) return l + 1;
    return fd;
  }

  // Of `depth` layers, how many give an output someone reads: all but the top one when top_read is false and it sits
  // above the feature layer.
  std::int64_t read_depth(std::int64_t depth, bool top_read) const {
    return !top_read && depth > feature_depth() ? depth - 1 : depth;
  }

  VisionConfig cfg_;
  [[no_unique_address]] Backend be_;
  std::int64_t B_ = 0, ran_ = 0;
  bool routing_top_ = false;  // the last forward ran its top layer's routing only
  Tensor cols_;    // (B*N, C*P*P) unfolded patches, on the backend
  Tensor dpatch_;  // (B*N, H) d patch embeddings of the last backward
};

}  // namespace cumo::nn
