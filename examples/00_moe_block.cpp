// 00_moe_block: a top-2 sparse MoE block of CLIP-style MLP experts, forward and backward on random data,
// with the expert load and the auxiliary losses printed. Verifies itself: the upcycled block must equal its
// dense MLP, and the gradient of x must match a finite difference.
#include <cmath>
#include <cstdio>

#include <cumo/moe.hpp>

using namespace cumo;
using Block = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cpu>;

int main() {
  const std::int64_t tokens = 512, hidden = 256, ffn = 1024;
  const int experts = 8;
  Rng rng(2024);

  Block moe(hidden, ffn, experts);
  moe.reset_parameters(rng);
  Tensor x = Tensor::empty({tokens, hidden});  // (T, H)
  rng.fill_normal(x);

  // forward: y (T, H) plus the balance and z losses, reduced per image (here 4 images of 128 tokens)
  auto out = moe.forward(x, {.segments = 4});
  const float balance = backend::Cpu::item(out.aux.balance_top1), z = backend::Cpu::item(out.aux.z);

  // backward of  sum(y) + 0.1 balance + 0.01 z  (CuMo's coefficients)
  Tensor dy = Tensor::full<float>({tokens, hidden}, 1.f);
  Tensor dx = moe.backward(dy, {.balance = 0.1f, .z = 0.01f});  // (T, H); parameter grads accumulated

  const ExpertLoad load = moe.load();
  std::printf("tokens per expert:");
  for (auto n : load.tokens) std::printf(" %lld", static_cast<long long>(n));
  std::printf("   (max/mean %.2f)\n", load.max_over_mean());
  std::printf("balance loss %.4f (1 = balanced), z-loss %.4f\n", balance, z);

  // self-check 1: a finite difference of sum(y) along x[0, 0] agrees with dx[0, 0]
  const float h = 1e-2f, x00 = x.at<float>(0, 0);
  auto objective = [&] {
    auto o = moe.forward(x, {.segments = 4});
    double s = 0;
    for (std::int64_t i = 0; i < o.y.numel(); ++i) s += o.y.data<float>()[i];
    return s + 0.1 * backend::Cpu::item(o.aux.balance_top1) + 0.01 * backend::Cpu::item(o.aux.z);
  };
  x.at<float>(0, 0) = x00 + h;
  const double jp = objective();
  x.at<float>(0, 0) = x00 - h;
  const double jm = objective();
  x.at<float>(0, 0) = x00;
  const double numeric = (jp - jm) / (2 * h), analytic = dx.at<float>(0, 0);
  std::printf("d/dx[0,0]: analytic %.5f, finite difference %.5f\n", analytic, numeric);

  // self-check 2: upcycling — every expert a copy of one dense MLP — reproduces that MLP
  DenseMLPWeights dense{Tensor::empty({ffn, hidden}), Tensor::empty({ffn}), Tensor::empty({hidden, ffn}),
                        Tensor::empty({hidden})};
  for (Tensor* t : {&dense.fc1_weight, &dense.fc1_bias, &dense.fc2_weight, &dense.fc2_bias}) rng.fill_normal(*t, 0, 0.05f);
  auto up = upcycle_from_dense<Block>(dense, experts, rng);
  Tensor h1 = Tensor::empty({tokens, ffn}), dense_y = Tensor::empty({tokens, hidden});
  cpu::linear(x, dense.fc1_weight, &dense.fc1_bias, h1);
  cpu::activation_forward<QuickGELU>(h1, tokens, h1);
  cpu::linear(h1, dense.fc2_weight, &dense.fc2_bias, dense_y);
  const double upcycle_err = rel_error(up.forward(x).y, dense_y);
  std::printf("upcycled block vs dense MLP: relative error %.2e\n", upcycle_err);

  const bool ok = std::abs(numeric - analytic) < 1e-2 * std::abs(analytic) + 1e-3 && upcycle_err < 1e-6;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
