// bench_cuda_cumo_step — one CuMo training step on backend::Cuda, the cumo side of benchmarks/torch_cumo_step.py
// (same model, batch and loss; run both on the same GPU in the same session and compare the lines they print).
//
//   bench_cuda_cumo_step [--tiny] [--batch 8] [--text-len 64] [--experts 4] [--top-k 2]
//                        [--precision fp32|tf32|bf16] [--steps 20] [--warmup 5] [--peak-tflops 989]
//
// The model: a CLIP-B/16-like vision tower at 224 px (12 × 768, 196 patches) whose every MLP is a top-k-of-E MoE
// (upcycled), the MLP-MoE connector, and a ~300M-parameter Mistral-style LLM (20 × 1024, GQA 16/8, vocabulary 32000);
// each sequence is T = 196 + text-len tokens, the image tokens at 1 … 196 (as the script), labels on the rest.
// A step is zero_grad, forward (CE + CuMo's bzloss), backward, global-norm clipping to 1.0 and the fused AdamW
// update — what the PyTorch script times.
// Precision: activations and master weights fp32; the dense GEMMs fp32, TF32 or bf16 copies of the operands
// (gpu::Options::dense_bf16 of the model's backend::Cuda; PyTorch's side runs under bf16 autocast). The MoE expert GEMMs follow allow_tf32.
// Printed: the median step time over --steps (CUDA events), tokens/s, model TFLOP/s and MFU with the PyTorch
// script's FLOP count, and — measured in the same run — an equal-FLOP dense bf16 GEMM's time, the step's floor.
// Without a GPU it prints a message and exits 0.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cumo/backend/cuda.cuh"
#include "cumo/models/cumo.hpp"
#include "cumo/train/optimizer.hpp"

using namespace cumo;
using Model = models::CuMo<backend::Cuda>;

namespace {

struct Args {
  bool tiny = false;
  std::int64_t batch = 8, text_len = 64;
  int experts = 4, top_k = 2, steps = 20, warmup = 5;
  std::string precision = "bf16";
  double peak_tflops = 989.0;  // H100 SXM dense bf16, as the PyTorch script
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) fail("bench_cuda_cumo_step: ", k, " needs a value");
      return argv[++i];
    };
    if (k == "--tiny") a.tiny = true;
    else if (k == "--batch") a.batch = std::stoll(next());
    else if (k == "--text-len") a.text_len = std::stoll(next());
    else if (k == "--experts") a.experts = std::stoi(next());
    else if (k == "--top-k") a.top_k = std::stoi(next());
    else if (k == "--precision") a.precision = next();
    else if (k == "--steps") a.steps = std::stoi(next());
    else if (k == "--warmup") a.warmup = std::stoi(next());
    else if (k == "--peak-tflops") a.peak_tflops = std::stod(next());
    else fail("bench_cuda_cumo_step: unknown argument '", k, "' (see the header of bench_cuda_cumo_step.cu)");
  }
  CUMO_CHECK(a.precision == "fp32" || a.precision == "tf32" || a.precision == "bf16",
             "bench_cuda_cumo_step: --precision must be fp32, tf32 or bf16, got '", a.precision, "'");
  return a;
}

// torch_cumo_step.py's build_config.
models::CuMoConfig make_config(const Args& a) {
  models::CuMoConfig c;
  nn::VisionConfig& v = c.llava.vision;
  nn::DecoderConfig& t = c.llava.text;
  if (a.tiny) {
    v.hidden = 64, v.ffn = 256, v.layers = 2, v.heads = 4, v.image_size = 32, v.patch_size = 8;
    t.vocab = 512, t.hidden = 128, t.ffn = 384, t.layers = 2, t.heads = 4, t.kv_heads = 2;
  } else {
    v.hidden = 768, v.ffn = 3072, v.layers = 12, v.heads = 12, v.image_size = 224, v.patch_size = 16;
    t.vocab = 32000, t.hidden = 1024, t.ffn = 2816, t.layers = 20, t.heads = 16, t.kv_heads = 8;
  }
  t.head_dim = t.hidden / t.heads;
  c.llava.image_token_id = t.vocab - 1;
  c.experts = a.experts;
  c.top_k = a.top_k;
  return c;
}

// The PyTorch script's model_flops_per_step: 6 · activated parameters · tokens + attention's 12 · L · T² · H.
double model_flops(const models::CuMoConfig& c, std::int64_t B, std::int64_t T, std::int64_t n_img, int k) {
  const nn::VisionConfig& v = c.llava.vision;
  const nn::DecoderConfig& t = c.llava.text;
  const double vp = double(v.layers) * (4.0 * v.hidden * v.hidden + k * 2.0 * v.hidden * v.ffn);
  const double v_tokens = double(B) * double(v.patches() + 1);
  const double pp = k * (double(v.hidden) * t.hidden + double(t.hidden) * t.hidden);
  const double kv = double(t.kv_heads) * double(t.hidden / t.heads);
  double tp = double(t.layers) * (2.0 * t.hidden * t.hidden + 2.0 * t.hidden * kv + 3.0 * t.hidden * t.ffn);
  tp += double(t.hidden) * t.vocab;
  const double mat = 6 * (vp * v_tokens + pp * double(B) * n_img + tp * double(B) * T);
  const double vt = v_tokens / double(B);
  const double attn =
      12 * (double(v.layers) * B * vt * vt * v.hidden + double(t.layers) * B * double(T) * T * t.hidden);
  return mat + attn;
}

template <class F>
double median_ms(int warmup, int steps, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  CUMO_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CUMO_CUDA_CHECK(cudaEventCreate(&a));
  CUMO_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < steps; ++i) {
    CUMO_CUDA_CHECK(cudaEventRecord(a, gpu::stream()));
    f();
    CUMO_CUDA_CHECK(cudaEventRecord(b, gpu::stream()));
    CUMO_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    CUMO_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// An equal-FLOP dense bf16 GEMM chain (square 8192³ GEMMs, fp32 accumulation): the floor the step is measured
// against in the same run.
double dense_floor_ms(double flops, int warmup, int steps) {
  const std::int64_t n = 8192;
  const double per = 2.0 * double(n) * n * n;
  const int reps = std::max(1, int(flops / per + 0.5));
  Tensor a = Tensor::zeros({n, n}, DType::bf16, Device::cuda), c = Tensor::empty({n, n}, DType::bf16, Device::cuda);
  const double ms = median_ms(warmup, steps, [&] {
    for (int r = 0; r < reps; ++r)
      gpu::gemm({gpu::Op::N, gpu::Op::N, n, n, n, 1.f, a.raw(), n, a.raw(), n, 0.f, c.raw(), n}, DType::bf16,
                DType::bf16);
  });
  return ms * flops / (reps * per);
}

}  // namespace

int main(int argc, char** argv) try {
  const Args args = parse(argc, argv);
  std::string why;
  if (!gpu::device_available(&why)) {
    std::printf("bench_cuda_cumo_step: no CUDA device (%s); nothing measured\n", why.c_str());
    return 0;
  }
  gpu::Options o;
  o.allow_tf32 = args.precision != "fp32";
  o.dense_bf16 = args.precision == "bf16";
  const backend::Cuda be(o);

  const models::CuMoConfig cfg = make_config(args);
  Model model(cfg, be);
  Rng rng(0);
  model.reset_parameters(rng);
  model.upcycle(rng);
  ParameterList params = model.parameters();
  std::int64_t n_params = 0;
  for (const Parameter* p : params) n_params += p->value.numel();

  const std::int64_t B = args.batch, n_img = cfg.llava.vision.patches(), T = n_img + args.text_len;  // as the script
  const std::int64_t V = cfg.llava.text.vocab, S = cfg.llava.vision.image_size;
  std::vector<std::int64_t> ids(std::size_t(B * T)), labels(std::size_t(B * T), -100);
  Rng data(1);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      const std::size_t i = std::size_t(b * T + t);
      ids[i] = (t >= 1 && t <= n_img) ? cfg.llava.image_token_id : std::int64_t(data.next_u32() % std::uint32_t(V - 2));
      if (t > n_img) labels[i] = ids[i];
    }
  Tensor pixels = Tensor::empty({B, 3, S, S});
  data.fill_normal(pixels, 0.f, 1.f);

  train::AdamWOptions ao;
  ao.lr = 1e-5;
  ao.weight_decay = 0.0;
  train::AdamW<backend::Cuda> opt(params, ao, be);
  double loss = 0;
  auto step = [&] {
    opt.zero_grad();
    loss = model.forward(ids, B, T, pixels, &labels).total;
    model.backward();
    opt.clip_grad_norm(1.0);
    opt.step();
  };
  const double ms = median_ms(args.warmup, args.steps, step);
  const double flops = model_flops(cfg, B, T, n_img, args.top_k);
  const double floor = dense_floor_ms(flops, 2, 5);
  const double tflops = flops / (ms * 1e-3) / 1e12;
  std::printf("cumo     precision=%s params %.0fM  B %lld T %lld  step %8.2f ms  %10.0f tok/s  %6.1f TFLOP/s  "
              "MFU %.1f %%  loss %.3f  | equal-FLOP dense bf16 GEMM %.2f ms (step / dense %.2f)\n",
              args.precision.c_str(), double(n_params) / 1e6, (long long)B, (long long)T, ms,
              double(B * T) / (ms * 1e-3), tflops, 100 * tflops / args.peak_tflops, loss, floor, ms / floor);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_cuda_cumo_step: %s\n", e.what());
  return 1;
}
