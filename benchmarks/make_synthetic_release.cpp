// make_synthetic_release: writes a CuMo release directory of random weights at a released model's sizes, for
// measuring what loading and generating cost (peak memory, decode tokens/s) without downloading a checkpoint; and,
// with --bandwidth, measures this machine's memory bandwidth with a copy loop and with a read loop (the bound a
// decode step, which only reads its weights, runs against).
//
//   make_synthetic_release --preset 7b|1b|tiny --out DIR [--dtype bf16|f16|f32] [--seed S]
//   make_synthetic_release --bandwidth [--bytes N]
//
// Presets (the text vocabulary is the byte tokenizer's 259, so `cumo_generate --tokenizer byte` drives it; a real
// Mistral's 32000 adds 2 · 31741 · 4096 ≈ 0.26 B parameters to 7b):
//   7b    CuMo-Mistral-7B: Mistral-7B (4096 wide, 32 layers, 32/8 heads, FFN 14336), CLIP-L/336 with every MLP a
//         top-2-of-4 MoE, a top-2-of-4 MLP-MoE connector; S² off
//   1b    a 1.1 B model of the same form (2048 wide, 16 layers, FFN 5632; CLIP-B/16 at 224)
//   tiny  a few MB, for tests
// DIR gets config.json (LlavaMistralConfig), clip_config.json, model.safetensors in the release layout, image.png (a
// 400x300 gradient to ask about) and synthetic.json: {"parameters", "weight_bytes", "decode_bytes_per_token"} — the bytes one decode step reads (the
// decoder's matrices and head, not the embedding table, of which it reads one row).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/io/image.hpp"
#include "cumo/models/cumo_release.hpp"

#if defined(_OPENMP)
#include <omp.h>
#else
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_get_max_threads() { return 1; }
#endif

namespace {
using namespace cumo;
namespace fs = std::filesystem;

struct Preset {
  nlohmann::json text, clip;
};

Preset preset(const std::string& name) {
  auto text = [](int hidden, int layers, int heads, int kv, int ffn) {
    return nlohmann::json{{"model_type", "llava_mistral"},   {"vocab_size", 259},
                          {"hidden_size", hidden},           {"num_hidden_layers", layers},
                          {"num_attention_heads", heads},    {"num_key_value_heads", kv},
                          {"intermediate_size", ffn},        {"rms_norm_eps", 1e-5},
                          {"rope_theta", 1e6},               {"max_position_embeddings", 4096},
                          {"tie_word_embeddings", false},    {"hidden_act", "silu"}};
  };
  auto clip = [](int hidden, int layers, int heads, int ffn, int image, int patch) {
    return nlohmann::json{{"hidden_size", hidden},       {"num_hidden_layers", layers}, {"num_attention_heads", heads},
                          {"intermediate_size", ffn},    {"image_size", image},         {"patch_size", patch},
                          {"layer_norm_eps", 1e-5},      {"hidden_act", "quick_gelu"},  {"num_channels", 3}};
  };
  if (name == "7b") return {text(4096, 32, 32, 8, 14336), clip(1024, 24, 16, 4096, 336, 14)};
  if (name == "1b") return {text(2048, 16, 16, 4, 5632), clip(768, 12, 12, 3072, 224, 16)};
  if (name == "tiny") return {text(64, 2, 4, 2, 96), clip(32, 2, 4, 64, 32, 8)};
  fail("--preset '", name, "' is unknown (accepted: 7b, 1b, tiny)");
}

DType parse_dtype(const std::string& s) {
  if (s == "bf16") return DType::bf16;
  if (s == "f16") return DType::f16;
  if (s == "f32") return DType::f32;
  fail("--dtype '", s, "' is not supported (accepted: bf16, f16, f32)");
}

// The best of five copies of `bytes` with every thread copying its share (STREAM's convention: a copy moves
// 2 · bytes, read and written); then the best of five reads of the same buffer (every thread folds its share's
// 64-bit words with XOR in four streams, which the compiler vectorises into plain loads). A decode step only reads its
// weights, and on this machine reading alone is much slower than the copy figure suggests (a large memcpy writes
// with non-temporal stores, which do not occupy the load path): the read figure is the bound a decode can reach.
void bandwidth(std::size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 2);
  using clock = std::chrono::steady_clock;
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = clock::now();
#pragma omp parallel
    {
      const std::size_t n = std::size_t(omp_get_num_threads()), i = std::size_t(omp_get_thread_num());
      const std::size_t lo = bytes * i / n, hi = bytes * (i + 1) / n;
      std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
    }
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count());
  }
  std::printf("copy bandwidth: %.2f GB/s (best of 5 copies of %.2f GB on %d threads, read + write counted)\n",
              2.0 * double(bytes) / best / 1e9, double(bytes) / 1e9, omp_get_max_threads());
  if (a[bytes / 2] != b[bytes / 2]) std::printf("?\n");  // keeps the copies observable
  const std::size_t words = bytes / sizeof(std::uint64_t);
  const auto* w = reinterpret_cast<const std::uint64_t*>(b.data());
  std::uint64_t fold = 0;
  double best_read = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = clock::now();
    std::uint64_t x = 0;
#pragma omp parallel reduction(^ : x)
    {
      // four streams per thread (one alone leaves the load path idle: ~0.75 of this figure)
      const std::size_t n = std::size_t(omp_get_num_threads()), t = std::size_t(omp_get_thread_num());
      const std::size_t lo = words * t / n, hi = words * (t + 1) / n, q = (hi - lo) / 4;
      const std::uint64_t *p0 = w + lo, *p1 = p0 + q, *p2 = p1 + q, *p3 = p2 + q;
      std::uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (std::size_t i = 0; i < q; ++i) a0 ^= p0[i], a1 ^= p1[i], a2 ^= p2[i], a3 ^= p3[i];
      for (std::size_t i = lo + 4 * q; i < hi; ++i) a0 ^= w[i];
      x ^= a0 ^ a1 ^ a2 ^ a3;
    }
    best_read = std::min(best_read, std::chrono::duration<double>(clock::now() - t0).count());
    fold ^= x;
  }
  std::printf("read bandwidth: %.2f GB/s (best of 5 reads of %.2f GB on %d threads)\n",
              double(words * sizeof(std::uint64_t)) / best_read / 1e9, double(bytes) / 1e9, omp_get_max_threads());
  if (fold == 0x5eed) std::printf("?\n");  // keeps the reads observable
}

int make(const std::string& preset_name, const std::string& out, DType dtype, std::uint64_t seed) {
  const Preset p = preset(preset_name);
  CUMO_CHECK(!fs::exists(out), "--out '", out, "' exists; make_synthetic_release never writes over a directory");
  nlohmann::json config = p.text;
  config.update(nlohmann::json{{"mm_projector_type", "smoe_mlp"},      {"clip_smoe", true},
                               {"num_experts", 4},                     {"num_selected", 2},
                               {"scales", {1}},                        {"mm_hidden_size", p.clip["hidden_size"]},
                               {"mm_vision_select_layer", -2},         {"mm_vision_select_feature", "patch"},
                               {"image_aspect_ratio", "pad"},          {"mm_use_im_start_end", false},
                               {"balance_loss_coef", 0.1},             {"router_z_loss_coef", 0.01},
                               {"mm_vision_tower", "openai/clip-vit-synthetic"},
                               {"architectures", {"LlavaMistralForCausalLM"}}});
  const models::ReleaseConfig rc = models::release_config(config, &p.clip, nullptr);

  ParameterStorageScope storage({dtype, /*grads=*/false});
  models::CuMo<> model(rc.model);
  Rng rng(seed);
  model.upcycle(rng, /*vision=*/true, /*connector=*/true);
  double params = 0, weight_bytes = 0, decode_bytes = 0;
  for (Parameter* q : model.parameters()) {
    const Tensor& v = q->value;
    if (v.dim() >= 2) {
      const std::int64_t fan_in = v.dim() == 4 ? v.numel() / v.size(0) : v.size(v.dim() - 1);
      const float bound = 1.f / std::sqrt(float(fan_in));
      rng.fill_uniform(q->value, -bound, bound);
    } else {
      const bool norm_weight = q->name.find("norm") != std::string::npos && q->name.ends_with("weight");
      Tensor t = Tensor::full<float>(v.shape(), norm_weight ? 1.f : 0.f);
      copy_converted(q->value, t);
    }
    params += double(v.numel());
    weight_bytes += double(v.nbytes());
  }
  for (Parameter* q : model.language_parameters())
    if (q->name.find("embed_tokens") == std::string::npos) decode_bytes += double(q->value.nbytes());

  fs::create_directories(out);
  model.save((fs::path(out) / "model.safetensors").string(), io::Layout::cumo_release);
  std::ofstream(fs::path(out) / "config.json") << config.dump(2) << "\n";
  std::ofstream(fs::path(out) / "clip_config.json") << p.clip.dump(2) << "\n";
  io::Image img(400, 300, 3);  // not square: the release pads it to a square first
  for (int y = 0; y < img.height; ++y)
    for (int x = 0; x < img.width; ++x)
      for (int c = 0; c < 3; ++c) img.pixels[std::size_t((y * img.width + x) * 3 + c)] = std::uint8_t((x * (c + 1) + y) % 256);
  io::write_png((fs::path(out) / "image.png").string(), img);
  std::ofstream(fs::path(out) / "synthetic.json")
      << nlohmann::json{{"preset", preset_name},         {"dtype", std::string(name_of(dtype))},
                        {"parameters", params},           {"weight_bytes", weight_bytes},
                        {"decode_bytes_per_token", decode_bytes}}
             .dump(2)
      << "\n";
  std::printf("wrote %s: %.3f B parameters, %.2f GB of weights (%s), %.2f GB read per decoded token\n", out.c_str(),
              params / 1e9, weight_bytes / 1e9, std::string(name_of(dtype)).c_str(), decode_bytes / 1e9);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset_name, out, dtype = "bf16";
  std::uint64_t seed = 0;
  std::size_t bytes = std::size_t(1) << 30;
  bool bw = false;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string f = argv[i];
      auto value = [&]() -> std::string {
        CUMO_CHECK(i + 1 < argc, f, " needs a value");
        return argv[++i];
      };
      if (f == "--preset") preset_name = value();
      else if (f == "--out") out = value();
      else if (f == "--dtype") dtype = value();
      else if (f == "--seed") seed = std::stoull(value());
      else if (f == "--bytes") bytes = std::stoull(value());
      else if (f == "--bandwidth") bw = true;
      else fail("unknown option '", f, "' (usage: --preset 7b|1b|tiny --out DIR [--dtype bf16] | --bandwidth)");
    }
    if (bw) {
      bandwidth(bytes);
      return 0;
    }
    CUMO_CHECK(!preset_name.empty() && !out.empty(), "--preset and --out are required (or --bandwidth)");
    return make(preset_name, out, parse_dtype(dtype), seed);
  } catch (const std::exception& e) {
    std::cerr << "make_synthetic_release: " << e.what() << "\n";
    return 1;
  }
}
