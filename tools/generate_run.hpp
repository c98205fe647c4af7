#pragma once
// cumo_generate's run on any backend (cumo_generate.cpp: main and the CPU; cumo_generate_cuda.cu: the GPU, in the
// one translation unit nvcc compiles): load a release or a cumo_train checkpoint on B in --dtype, then answer.
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <memory>
#include <string>
#include <string_view>

#include "cli.hpp"
#include "app/checkpoints.hpp"
#include "app/run_config.hpp"
#include "cumo/io/image.hpp"
#include "cumo/models/cumo_release.hpp"

namespace cumo_generate_app {
constexpr const char* kTool = "cumo_generate";
namespace fs = std::filesystem;
using namespace cumo;

struct Args {
  std::string checkpoint, image, prompt, batch, chat, tokenizer, clip_config, device = "cpu", dtype = "f32";
  long long max_new = 128, seed = 0;
  float temperature = 0.f, top_p = 1.f;
  bool quiet = false;
};

// The model (on backend B) and everything needed to prompt it.
template <class B>
struct Loaded {
  std::unique_ptr<models::CuMo<B>> model;
  std::unique_ptr<io::Tokenizer> tok;
  io::ChatTemplate chat;
  io::ClipPreprocess pre;
  int image_tokens = 0;
};

// This process's resident memory in bytes: its peak so far (VmHWM) and now (VmRSS); 0 where /proc is absent.
struct Memory {
  double peak = 0, now = 0;
};
inline Memory memory() {
  Memory m;
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) m.peak = std::atof(line.c_str() + 6) * 1024;
    if (line.rfind("VmRSS:", 0) == 0) m.now = std::atof(line.c_str() + 6) * 1024;
  }
  return m;
}

inline DType parse_dtype(const std::string& s) {
  if (s == "f32") return DType::f32;
  if (s == "bf16") return DType::bf16;
  if (s == "f16") return DType::f16;
  fail("--dtype '", s, "' is not supported (accepted: f32, bf16, f16)");
}

template <class B>
Loaded<B> load(const Args& a, const B& be) {
  Loaded<B> l;
  // Inference only: no gradients, and the matrix weights in --dtype (bf16: 2 bytes a parameter; the CPU products
  // widen them a block at a time and accumulate in fp32). The scope covers loading, which may make parts sparse.
  ParameterStorageScope storage({parse_dtype(a.dtype), /*grads=*/false});
  const bool release = fs::exists(fs::path(a.checkpoint) / "config.json") &&
                       !fs::exists(fs::path(a.checkpoint) / "trainer_state.json");
  if (release) {
    const models::ReleaseConfig rc = models::load_release_config(a.checkpoint, a.clip_config);
    for (const auto& n : rc.notes)
      if (!a.quiet) std::cerr << kTool << ": " << n << "\n";
    // --tokenizer, else the release's tokenizer.model, else the one its config names (a cumo_export of a byte run).
    const fs::path model_file = fs::path(a.checkpoint) / "tokenizer.model";
    std::string tokenizer = a.tokenizer;
    if (tokenizer.empty()) tokenizer = fs::exists(model_file) || rc.tokenizer.empty() ? model_file.string() : rc.tokenizer;
    l.tok = io::load_tokenizer(tokenizer);
    CUMO_CHECK(l.tok->image_id() == rc.model.llava.image_token_id, "the tokenizer's <image> id ", l.tok->image_id(),
               " differs from the model's ", rc.model.llava.image_token_id,
               " (config.json's image_token_index, else one past the vocabulary)");
    l.model = std::make_unique<models::CuMo<B>>(rc.model, be);
    l.model->load(a.checkpoint);
    const std::string chat = rc.chat_template.empty() ? "mistral_instruct_system" : rc.chat_template;
    l.chat = io::ChatTemplate::from_name(a.chat.empty() ? chat : a.chat);
    l.pre.size = int(rc.model.llava.vision.image_size);
    if (rc.pad_to_square) l.pre.aspect = io::AspectMode::pad;
    l.image_tokens = int(rc.model.llava.vision.patches());
  } else {
    const app::RunConfig cfg = app::run_config_of_checkpoint(a.checkpoint);
    l.tok = io::load_tokenizer(a.tokenizer.empty() ? cfg.tokenizer : a.tokenizer);
    // Built from the run's config and loaded under the weights' names, which makes the CLIP MLPs and the connector
    // sparse where the checkpoint's are (CuMo::load), directly on B and in --dtype.
    l.model = std::make_unique<models::CuMo<B>>(cfg.model_config(*l.tok), be);
    l.model->load((fs::path(a.checkpoint) / "model.safetensors").string());
    l.chat = io::ChatTemplate::from_name(a.chat.empty() ? cfg.eval_template : a.chat);
    l.pre = cfg.data_options(cfg.eval_template).preprocess;  // as the run trained (a pretrained start may pad)
    l.image_tokens = int(cfg.image_tokens());
  }
  return l;
}

struct Answer {
  std::string text;
  std::int64_t tokens = 0, prompt_tokens = 0;
  double seconds = 0;
  double prefill_seconds = 0;  // until the first new token: the image, the prompt's prefill and one sampling
  // tokens after the first, per second of decoding (one cached step each): what the weights' bandwidth bounds
  double decode_rate() const {
    const double d = seconds - prefill_seconds;
    return tokens > 1 && d > 0 ? double(tokens - 1) / d : 0.0;
  }
};

// One image and one prompt; with `stream`, the answer's text is written to stdout as its tokens arrive.
template <class B>
Answer answer(Loaded<B>& l, const Args& a, const std::string& image, const std::string& prompt, bool stream) {
  io::LlavaRecord r;
  r.id = "prompt";
  r.image = image;
  r.conversations = {{io::Role::user, "human", "<image>\n" + prompt}, {io::Role::assistant, "gpt", ""}};
  const auto p = io::tokenize_prompt(r, *l.tok, l.chat, l.image_tokens, "--prompt");
  const Tensor px = io::clip_preprocess_file(image, l.pre);  // (3, S, S); an undecodable file names itself
  const Tensor pixels = px.contiguous().view({1, px.size(0), px.size(1), px.size(2)});
  typename models::CuMo<B>::GenerateOptions o;
  o.max_new = a.max_new;
  o.eos_id = l.tok->eos_id();
  o.sampling = nn::SamplingOptions{a.temperature, a.top_p, std::uint64_t(a.seed)};
  std::vector<std::int64_t> so_far;
  std::string shown;
  const auto t0 = std::chrono::steady_clock::now();
  double first = -1;
  o.on_token = [&](std::int64_t t) {
    if (first < 0) first = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    so_far.push_back(t);
    if (stream) {  // decode the whole answer each time: a multi-byte character may span tokens
      const std::string text = l.tok->decode(so_far, /*skip_special=*/true);
      if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
        std::cout << text.substr(shown.size()) << std::flush;
        shown = text;
      }
    }
  };
  const std::vector<std::int64_t> ids(p.ids.begin(), p.ids.end());
  const auto out = l.model->generate(ids, pixels, o);
  Answer ans;
  ans.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ans.prefill_seconds = first < 0 ? ans.seconds : first;
  ans.prompt_tokens = std::int64_t(ids.size());
  ans.tokens = std::int64_t(out.size());
  ans.text = l.tok->decode(out, /*skip_special=*/true);
  if (stream) std::cout << ans.text.substr(std::min(shown.size(), ans.text.size())) << "\n" << std::flush;
  return ans;
}

// Loads the checkpoint on B and answers (--image + --prompt, streamed) or answers every record of --batch.
template <class B>
int run(const Args& a, const B& be) {
#if defined(__GLIBC__)
  // Every tensor of 1 MiB or more gets its own mapping, returned when freed. glibc's default threshold rises to the
  // size of the largest block freed (up to 32 MiB), after which loading's freed temporaries stay in the heap and
  // count against peak memory (measured: +18 % of a 1 B model's bf16 weights).
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
  Loaded<B> l = load(a, be);
  const Memory loaded = memory();
  double weight_bytes = 0;
  for (const Parameter* p : l.model->parameters()) weight_bytes += double(p->value.nbytes());
  if (!a.quiet)
    std::fprintf(stderr, "%s: weights %.3f GB (%s, on %s); resident after loading %.3f GB, peak %.3f GB\n", kTool,
                 weight_bytes / 1e9, a.dtype.c_str(), B::name, loaded.now / 1e9, loaded.peak / 1e9);
  if (a.batch.empty()) {
    const Answer ans = answer(l, a, a.image, a.prompt, /*stream=*/true);
    std::fprintf(stderr, "%s: %lld tokens in %.3f s (%.2f tokens/s, prompt prefill included); prefill %.3f s "
                 "(%lld prompt tokens), decode %.2f tokens/s; weights %s\n", kTool,
                 static_cast<long long>(ans.tokens), ans.seconds, ans.seconds > 0 ? double(ans.tokens) / ans.seconds : 0.0,
                 ans.prefill_seconds, static_cast<long long>(ans.prompt_tokens), ans.decode_rate(), a.dtype.c_str());
    if constexpr (B::device == Device::cpu)
      std::fprintf(stderr, "%s: peak resident memory %.3f GB = %.3f x the weights\n", kTool, memory().peak / 1e9,
                   weight_bytes > 0 ? memory().peak / weight_bytes : 0.0);
    else
      std::fprintf(stderr, "%s: peak resident (host) memory %.3f GB; the weights are on the GPU\n", kTool,
                   memory().peak / 1e9);
    return 0;
  }
  std::ifstream in(a.batch);
  CUMO_CHECK(in, "cannot open --batch '", a.batch, "'");
  std::string line;
  std::int64_t n = 0, tokens = 0;
  double seconds = 0;
  for (std::int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      fail("--batch '", a.batch, "' line ", lineno, " is not JSON: ", e.what());
    }
    CUMO_CHECK(j.is_object() && j.contains("image") && j["image"].is_string() && j.contains("prompt") &&
                   j["prompt"].is_string(),
               "--batch '", a.batch, "' line ", lineno, ": need {\"image\": FILE, \"prompt\": TEXT}");
    fs::path image = j["image"].get<std::string>();
    if (image.is_relative()) image = fs::path(a.batch).parent_path() / image;
    const Answer ans = answer(l, a, image.string(), j["prompt"].get<std::string>(), /*stream=*/false);
    std::cout << nlohmann::json{{"image", j["image"]}, {"prompt", j["prompt"]}, {"answer", ans.text},
                                {"tokens", ans.tokens}, {"seconds", ans.seconds}}
                     .dump()
              << "\n"
              << std::flush;
    ++n;
    tokens += ans.tokens;
    seconds += ans.seconds;
  }
  CUMO_CHECK(n > 0, "--batch '", a.batch, "' has no records");
  std::fprintf(stderr, "%s: %lld prompts, %lld tokens in %.3f s (%.2f tokens/s, prompt prefill included)\n", kTool,
               static_cast<long long>(n), static_cast<long long>(tokens), seconds, seconds > 0 ? double(tokens) / seconds : 0.0);
  return 0;
}


#if defined(CUMO_GENERATE_CUDA)
// cumo_generate_cuda.cu: run<backend::Cuda>, or an error naming why there is no usable GPU.
int run_on_gpu(const Args& a);
#endif

}  // namespace cumo_generate_app
