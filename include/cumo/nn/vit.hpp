#pragma once
// nn::ClipVision — the CLIP vision transformer as Hugging Face's CLIPVisionModel computes it:
//   patches (conv, stride = kernel = patch, no bias — done as one GEMM over unfolded patches)
//   → [class_embedding; patches] + position_embedding → pre_layrnorm  = hidden_state_0
//   → L pre-LN encoder layers (x += attn(ln1 x); x += mlp(ln2 x), quick_gelu)  = hidden_state_1 … L
// LLaVA / CuMo take hidden_state_{L+feature_layer+1} (feature_layer −2: the second-to-last) without the CLS row;
// post_layernorm is loaded and saved but only feeds CLIP's pooled output, which LLaVA never uses.
// Every encoder MLP is a VisionFFN slot: dense, or a SparseMoE of CLIP MLPs after upcycle().
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

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
    CUMO_CHECK(c.image_size % c.patch_size == 0, "VisionConfig: image_size ", c.image_size,
               " is not a multiple of patch_size ", c.patch_size);
    return c;
  }
};

template <class Backend = backend::Cpu>
using VisionFFN = FeedForward<DenseMLP<QuickGELU, Backend>,
                              SparseMoE<Router<TopKDynamic>, Expert<MLP<QuickGELU>>, Backend>>;

template <class Backend = backend::Cpu>
class ClipEncoderLayer {
 public:
  ClipEncoderLayer() = default;
  ClipEncoderLayer(const std::string& name, const VisionConfig& c)
      : layer_norm1(name + ".layer_norm1", c.hidden, c.eps),
        layer_norm2(name + ".layer_norm2", c.hidden, c.eps),
        self_attn(name + ".self_attn", AttentionConfig{c.hidden, c.heads, c.heads, 0, true, true, false, 0.0, "out_proj"}),
        mlp(name + ".mlp", DenseMLP<QuickGELU, Backend>(name + ".mlp", c.hidden, c.ffn)) {}

  LayerNorm<Backend> layer_norm1, layer_norm2;
  Attention<Backend> self_attn;
  VisionFFN<Backend> mlp;

  void collect(ParameterList& out) {
    self_attn.collect(out);
    layer_norm1.collect(out);
    mlp.collect(out);
    layer_norm2.collect(out);
  }
  // x (B*T, H) → (B*T, H)
  Tensor forward(const Tensor& x, std::int64_t B, std::int64_t T) {
    Tensor h = add<Backend>(x, self_attn.forward(layer_norm1.forward(x), B, T));
    return add<Backend>(h, mlp.forward(layer_norm2.forward(h), ForwardArgs{B, true}));
  }
  Tensor backward(const Tensor& dy, AuxLossWeights aux = {}) {
    Tensor dh = add<Backend>(dy, layer_norm2.backward(mlp.backward(dy, aux)));
    return add<Backend>(dh, layer_norm1.backward(self_attn.backward(dh)));
  }
};

template <class Backend = backend::Cpu>
class ClipVision {
 public:
  // `prefix`: "" for a CLIPVisionModel state dict (transformers 5), "model.vision_tower." inside LLaVA.
  explicit ClipVision(VisionConfig c, const std::string& prefix = "")
      : class_embedding(param(prefix + "embeddings.class_embedding", {c.hidden}, Backend::device)),
        patch_embedding(param(prefix + "embeddings.patch_embedding.weight",
                              {c.hidden, c.channels, c.patch_size, c.patch_size}, Backend::device)),
        position_embedding(
            param(prefix + "embeddings.position_embedding.weight", {c.patches() + 1, c.hidden}, Backend::device)),
        pre_layrnorm(prefix + "pre_layrnorm", c.hidden, c.eps),
        post_layernorm(prefix + "post_layernorm", c.hidden, c.eps),
        cfg_(c) {
    layers.reserve(std::size_t(c.layers));
    for (std::int64_t l = 0; l < c.layers; ++l)
      layers.emplace_back(prefix + "encoder.layers." + std::to_string(l), c);
  }

  Parameter class_embedding;     // (H,)
  Parameter patch_embedding;     // (H, C, P, P)
  Parameter position_embedding;  // (N+1, H)
  LayerNorm<Backend> pre_layrnorm, post_layernorm;
  std::vector<ClipEncoderLayer<Backend>> layers;

  const VisionConfig& config() const { return cfg_; }
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
  // go to the device as one (B*N, C*P*P) matrix.
  Output forward(const Tensor& pixels, bool all_layers = true) {
    constexpr const char* where = "ClipVision::forward";
    const VisionConfig& c = cfg_;
    check_dtype(where, "pixel_values", pixels, DType::f32);
    check_device(where, "pixel_values", pixels, Device::cpu);
    check_shape(where, "pixel_values", pixels, {-1, c.channels, c.image_size, c.image_size});
    const Tensor px = pixels.contiguous();
    const std::int64_t B = px.size(0), N = c.patches(), T = N + 1, H = c.hidden, P = c.patch_size;
    const std::int64_t K = c.channels * P * P;
    B_ = B;

    // unfold: patch row (b, gy, gx), columns (c, i, j) — the conv weight's (C, P, P) order
    cols_ = matrix(B * N, K);
    const float* pp = px.data<float>();
    float* pc = cols_.data<float>();
    for_each_patch_pixel(B, [&](std::int64_t col, std::int64_t pix) { pc[col] = pp[pix]; });
    Tensor patch = matrix(B * N, H, Backend::device);
    Tensor emb = matrix(B * T, H, Backend::device);  // (B*T, H) [CLS; patches] + positions
    if constexpr (on_cpu<Backend>) {
      cpu::gemm(cpu::Op::N, cpu::Op::T, B * N, H, K, 1.f, pc, K, patch_embedding.value.data<float>(), K, 0.f,
                patch.data<float>(), H);  // (B*N, H)
      const float* cls = class_embedding.value.data<float>();
      const float* pos = position_embedding.value.data<float>();
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t t = 0; t < T; ++t)
          for (std::int64_t h = 0; h < H; ++h)
            emb.data<float>()[(b * T + t) * H + h] =
                (t == 0 ? cls[h] : patch.data<float>()[(b * N + t - 1) * H + h]) + pos[t * H + h];
    } else {
      cols_ = cols_.to(Backend::device);
      Backend::dense_linear(cols_, patch_embedding.value.view({H, K}), nullptr, patch);  // (B*N, H)
      Backend::vit_embeddings(patch, class_embedding.value, position_embedding.value, B, emb);
    }

    Output out;
    out.hidden_states.push_back(pre_layrnorm.forward(emb));
    const std::int64_t depth = all_layers ? c.layers : feature_depth();
    ran_ = depth;
    for (std::int64_t l = 0; l < depth; ++l)
      out.hidden_states.push_back(layers[std::size_t(l)].forward(out.hidden_states.back(), B, T));
    out.features = drop_cls(out.hidden_states[std::size_t(feature_depth())], B, T, H);
    return out;
  }

  // dfeatures (B*N, H) (or (B, N, H)) → d pixel_values (B, C, S, S); parameter gradients accumulate. On a device
  // backend nothing upstream of the pixels needs their gradient: it is not computed (an undefined tensor).
  // aux: coefficients of each sparse layer's balance / z losses (CuMo: coef / L for every layer); layers above the
  // feature layer are only back-propagated when they are sparse and their aux losses carry weight.
  Tensor backward(const Tensor& dfeatures, AuxLossWeights aux = {}) {
    constexpr const char* where = "ClipVision::backward";
    const VisionConfig& c = cfg_;
    const std::int64_t B = B_, N = c.patches(), T = N + 1, H = c.hidden, P = c.patch_size;
    const std::int64_t K = c.channels * P * P, S = c.image_size;
    CUMO_CHECK(dfeatures.numel() == B * N * H, where, ": dfeatures has shape ", dfeatures.shape(), " but expected (",
               B * N, ", ", H, ")");
    const Tensor df = dfeatures.contiguous().view({B * N, H});
    const std::int64_t fd = feature_depth();
    const bool aux_on = aux.balance != 0.f || aux.z != 0.f;
    std::int64_t top = fd;
    for (std::int64_t l = ran_ - 1; l >= fd; --l)
      if (aux_on && layers[std::size_t(l)].mlp.is_sparse()) {
        top = l + 1;
        break;
      }
    Tensor dh = zeros(B * T, H, Backend::device);  // d hidden_state_top
    for (std::int64_t l = top; l >= 0; --l) {
      if (l == fd) {  // the features' gradient enters below the CLS rows
        if constexpr (on_cpu<Backend>) {
          for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t t = 1; t < T; ++t)
              for (std::int64_t h = 0; h < H; ++h)
                dh.data<float>()[(b * T + t) * H + h] += df.data<float>()[(b * N + t - 1) * H + h];
        } else {
          Backend::add_blocks(df, 0, N * H, dh, H, T * H, N * H, B);  // B blocks of N rows, past each CLS row
        }
      }
      if (l > 0) dh = layers[std::size_t(l - 1)].backward(dh, aux);
    }
    const Tensor demb = pre_layrnorm.backward(dh);  // (B*T, H)
    if constexpr (on_cpu<Backend>) {
      float* dcls = class_embedding.grad.data<float>();
      float* dpos = position_embedding.grad.data<float>();
      Tensor dpatch = matrix(B * N, H);
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t t = 0; t < T; ++t)
          for (std::int64_t h = 0; h < H; ++h) {
            const float g = demb.data<float>()[(b * T + t) * H + h];
            dpos[t * H + h] += g;
            if (t == 0)
              dcls[h] += g;
            else
              dpatch.data<float>()[(b * N + t - 1) * H + h] = g;
          }
      cpu::gemm(cpu::Op::T, cpu::Op::N, H, K, B * N, 1.f, dpatch.data<float>(), H, cols_.data<float>(), K, 1.f,
                patch_embedding.grad.data<float>(), K);  // (H, K)
      Tensor dcols = matrix(B * N, K);
      cpu::gemm(cpu::Op::N, cpu::Op::N, B * N, K, H, 1.f, dpatch.data<float>(), H, patch_embedding.value.data<float>(),
                K, 0.f, dcols.data<float>(), K);  // (B*N, K)
      Tensor dpx = Tensor::zeros({B, c.channels, S, S});  // fold (patches do not overlap: a plain scatter)
      float* pd = dpx.data<float>();
      const float* pdc = dcols.data<float>();
      for_each_patch_pixel(B, [&](std::int64_t col, std::int64_t pix) { pd[pix] = pdc[col]; });
      return dpx;
    } else {
      Tensor dpatch = matrix(B * N, H, Backend::device);
      Backend::vit_embeddings_backward(demb, B, dpatch, class_embedding.grad, position_embedding.grad);
      Tensor dw = patch_embedding.grad.view({H, K});
      Backend::linear_dweight(dpatch, cols_, dw);  // (H, K)
      return Tensor();
    }
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
  static Tensor drop_cls(const Tensor& h, std::int64_t B, std::int64_t T, std::int64_t H) {
    Tensor f = matrix(B * (T - 1), H, Backend::device);
    if constexpr (on_cpu<Backend>) {
      for (std::int64_t b = 0; b < B; ++b)
        std::copy_n(h.data<float>() + (b * T + 1) * H, (T - 1) * H, f.data<float>() + b * (T - 1) * H);
    } else {
      Backend::copy_blocks(h, H, T * H, f, 0, (T - 1) * H, (T - 1) * H, B);  // B blocks of T−1 rows, past each CLS
    }
    return f;
  }

  VisionConfig cfg_;
  std::int64_t B_ = 0, ran_ = 0;
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

  Tensor cols_;  // (B*N, C*P*P) unfolded patches
};

}  // namespace cumo::nn
