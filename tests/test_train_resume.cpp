// The training engine end to end on a small MoE model (SparseMoE with router jitter + a Linear head, CE + bzloss,
// two micro-batches per step, clipping, AdamW with four groups one of them frozen, cosine schedule):
//  - a run interrupted by a checkpoint and resumed in fresh objects gives bitwise the same losses and weights as
//    an uninterrupted one (and the test can tell: skipping any piece of the state changes the losses);
//  - the model overfits a tiny batch to near-zero loss (a smoke test of forward, backward and optimizer together).
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cumo/moe.hpp"
#include "cumo/train.hpp"

namespace {

namespace fs = std::filesystem;
using namespace cumo;
using namespace cumo::train;

constexpr std::int64_t H = 8, F = 16, V = 5, kData = 20, kMicro = 4;
constexpr int E = 4;
using Moe = SparseMoE<Router<TopK<2>>, Expert<MLP<GELU>>, backend::Cpu>;

SparseMoEOptions moe_options(float jitter) {
  SparseMoEOptions o;
  o.jitter = jitter;
  return o;
}

// x (T, H) → z = x + MoE(x) → logits = z Wᵀ + b  (T, V)
struct TinyModel {
  Moe moe;
  Parameter head_w{"lm_head.weight", Tensor::zeros({V, H})};
  Parameter head_b{"lm_head.bias", Tensor::zeros({V})};
  Tensor z;  // (T, H) saved for the head's backward

  TinyModel(std::uint64_t seed, float jitter) : moe(H, F, E, moe_options(jitter)) {
    Rng rng(seed);
    moe.reset_parameters(rng);
    rng.fill_uniform(head_w.value, -0.35f, 0.35f);
    for (Parameter* p : moe.parameters()) p->name = "model.mlp." + p->name;
  }
  ParameterList params() {
    ParameterList p = moe.parameters();
    p.push_back(&head_w);
    p.push_back(&head_b);
    return p;
  }
  Tensor forward(const Tensor& x, Rng& rng, double& aux_value, double balance_coef, double z_coef) {
    const auto out = moe.forward(x, {}, &rng);  // (T, H)
    aux_value = balance_coef * out.aux.balance_top1.data<float>()[0] + z_coef * out.aux.z.data<float>()[0];
    z = Tensor::empty(x.shape());
    backend::Cpu::add(x, out.y, z);
    Tensor logits = Tensor::empty({x.size(0), V});
    cpu::linear(z, head_w.value, &head_b.value, logits);  // (T, V)
    return logits;
  }
  void backward(const Tensor& dlogits, AuxLossWeights aux) {
    backend::Cpu::linear_dweight(dlogits, z, head_w.grad);  // (V, H)
    for (std::int64_t t = 0; t < dlogits.size(0); ++t)
      for (std::int64_t v = 0; v < V; ++v) head_b.grad.data<float>()[v] += dlogits.at<float>(t, v);
    Tensor dz = Tensor::empty(z.shape());
    backend::Cpu::linear_dinput(dlogits, head_w.value, dz, /*accumulate=*/false);  // (T, H)
    moe.backward(dz, aux);  // the residual's input gradient is not needed
  }
};

// A fixed data set; what varies run to run (order, noise) comes from the trainer's state.
struct Dataset {
  Tensor x = Tensor::empty({kData, H});
  std::vector<std::int64_t> y;
  Dataset() {
    Rng rng(2024);
    rng.fill_normal(x);
    for (std::int64_t i = 0; i < kData; ++i) y.push_back(i % 5 == 3 ? kIgnoreIndex : std::int64_t(rng.next_u32() % V));
  }
  // The epoch's permutation is a pure function of the epoch, so (epoch, sample) is the whole data position.
  std::vector<std::int64_t> order(std::int64_t epoch) const {
    std::vector<std::int64_t> o(kData);
    for (std::int64_t i = 0; i < kData; ++i) o[std::size_t(i)] = i;
    Rng r(5000 + std::uint64_t(epoch));
    for (std::int64_t i = kData - 1; i > 0; --i) std::swap(o[std::size_t(i)], o[r.next_u32() % std::uint32_t(i + 1)]);
    return o;
  }
};

struct Batch {
  Tensor x, y;
};

class Run {
 public:
  static constexpr std::int64_t kSteps = 12;

  explicit Run(std::uint64_t init_seed)
      : model_(init_seed, /*jitter=*/0.05f),
        opt_(groups(), adamw_options()),
        sched_(CosineWithWarmup::with_warmup_ratio(5e-3, kSteps, 0.1)),
        data_rng_(31),
        jitter_rng_(47) {}

  double step() {
    opt_.zero_grad();
    std::vector<Batch> micro = {next_batch(), next_batch()};
    std::vector<std::int64_t> counts;
    for (const Batch& b : micro) counts.push_back(count_targets(b.y, /*causal=*/false));
    const Accumulation acc(LossAveraging::per_token, counts);
    std::vector<CrossEntropyResult> results;
    double aux = 0;
    for (int i = 0; i < acc.micro_batches(); ++i) {
      double aux_i = 0;
      const Tensor logits = model_.forward(micro[std::size_t(i)].x, jitter_rng_, aux_i, 0.01, 0.001);  // (T, V)
      Tensor dlogits;
      results.push_back(cross_entropy(logits, micro[std::size_t(i)].y, &dlogits, acc.ce_options(i)));
      model_.backward(dlogits, AuxLossWeights{float(0.01 * acc.aux_scale()), float(0.001 * acc.aux_scale())});
      aux += acc.aux_scale() * aux_i;
    }
    const double loss = acc.step_loss(results) + aux;
    check_finite_loss(loss, state_.step);
    clip_grad_norm(opt_.trainable_parameters(), 1.0, state_.step);
    opt_.step(sched_.lr(state_.step));
    ++state_.step;
    return loss;
  }

  void save(const std::string& dir) {
    state_.rngs["data"] = data_rng_.state();
    state_.rngs["jitter"] = jitter_rng_.state();
    state_.metadata["stage"] = "test";
    save_checkpoint(dir, model_.params(), &opt_, state_);
  }
  void load(const std::string& dir, bool restore_rngs = true) {
    state_ = load_checkpoint(dir, model_.params(), &opt_);
    if (restore_rngs) {
      data_rng_.set_state(state_.rngs.at("data"));
      jitter_rng_.set_state(state_.rngs.at("jitter"));
    }
  }
  TinyModel& model() { return model_; }
  AdamW<>& optimizer() { return opt_; }

 private:
  static AdamWOptions adamw_options() {
    AdamWOptions o;
    o.weight_decay = 0.01;
    return o;
  }
  std::vector<ParamGroup> groups() {
    std::vector<ParamGroup> g(4);
    g[0].name = "experts";
    g[0].params = model_.moe.experts().parameters();
    g[1].name = "router";
    g[1].params = model_.moe.router().parameters();
    g[1].lr_scale = 0.5;
    g[1].weight_decay = 0.0;
    g[2].name = "head";
    g[2].params = {&model_.head_w};
    g[3].name = "frozen";
    g[3].params = {&model_.head_b};
    g[3].frozen = true;
    return g;
  }
  Batch next_batch() {
    Batch b{Tensor::empty({kMicro, H}), Tensor::empty({kMicro}, DType::i64)};
    for (std::int64_t k = 0; k < kMicro; ++k) {
      const std::int64_t idx = data_.order(state_.epoch)[std::size_t(state_.sample)];
      for (std::int64_t h = 0; h < H; ++h) b.x.at<float>(k, h) = data_.x.at<float>(idx, h) + 0.05f * data_rng_.normal();
      b.y.data<std::int64_t>()[k] = data_.y[std::size_t(idx)];
      if (++state_.sample == kData) {
        ++state_.epoch;
        state_.sample = 0;
      }
    }
    return b;
  }

  TinyModel model_;
  AdamW<> opt_;
  CosineWithWarmup sched_;
  Dataset data_;
  TrainerState state_;
  Rng data_rng_, jitter_rng_;
};

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

}  // namespace

TEST_CASE("train/resume: N steps == N/2 steps + checkpoint + fresh objects + N/2 steps, bitwise") {
  const fs::path root = cumo::test::tmp_root() / "train_resume";
  fs::remove_all(root);
  fs::create_directories(root);
  constexpr std::int64_t N = Run::kSteps, half = N / 2;

  std::vector<double> straight;
  auto a = std::make_unique<Run>(1);
  for (std::int64_t s = 0; s < N; ++s) straight.push_back(a->step());

  std::vector<double> resumed;
  const std::string dir = checkpoint_dir(root.string(), half);
  {
    auto b = std::make_unique<Run>(1);
    for (std::int64_t s = 0; s < half; ++s) resumed.push_back(b->step());
    b->save(dir);
  }  // everything of the first half is gone
  auto c = std::make_unique<Run>(999);  // other initial weights: all must come from the checkpoint
  c->load(dir);
  for (std::int64_t s = half; s < N; ++s) resumed.push_back(c->step());

  CHECK(same_bits(straight, resumed));
  const ParameterList pa = a->model().params(), pc = c->model().params();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i]->name);
    CHECK(bitwise_equal(pa[i]->value, pc[i]->value));
  }
  // The frozen head bias never moved and never got state; the losses did go down.
  CHECK(c->optimizer().state(c->model().head_b) == nullptr);
  CHECK(straight.back() < straight.front());

  // The comparison has teeth: leaving out the RNG state, or the optimizer state, changes the second half.
  std::vector<double> tail(straight.begin() + half, straight.end());
  {
    Run d(1);
    d.load(dir, /*restore_rngs=*/false);
    std::vector<double> got;
    for (std::int64_t s = half; s < N; ++s) got.push_back(d.step());
    CHECK_FALSE(same_bits(tail, got));
  }
  {
    Run e(1);
    e.load(dir);
    e.optimizer().reset_state();
    std::vector<double> got;
    for (std::int64_t s = half; s < N; ++s) got.push_back(e.step());
    CHECK_FALSE(same_bits(tail, got));
  }
}

TEST_CASE("train/overfit: a SparseMoE + linear head reaches near-zero cross-entropy on a tiny batch") {
  TinyModel m(5, /*jitter=*/0.f);
  Tensor x = Tensor::empty({8, H});
  Rng rng(6);
  rng.fill_normal(x);
  Tensor y = Tensor::empty({8}, DType::i64);
  for (std::int64_t i = 0; i < 8; ++i) y.data<std::int64_t>()[i] = i % V;
  AdamWOptions o;
  o.lr = 2e-2;
  o.weight_decay = 0;
  AdamW opt(m.params(), o);
  const auto sched = CosineWithWarmup::with_warmup_ratio(o.lr, 300, 0.03);
  double first = 0, last = 0;
  for (std::int64_t s = 0; s < 300; ++s) {
    opt.zero_grad();
    double aux = 0;
    const Tensor logits = m.forward(x, rng, aux, 0.01, 0.001);
    Tensor d;
    const auto r = cross_entropy(logits, y, &d);
    m.backward(d, AuxLossWeights{0.01f, 0.001f});
    clip_grad_norm(opt.trainable_parameters(), 1.0, s);
    opt.step(sched.lr(s));
    if (s == 0) first = r.loss;
    last = r.loss;
  }
  INFO("first loss ", first, ", last loss ", last);
  CHECK(first > 1.0);
  CHECK(last < 1e-3);  // reaches ~1.6e-5 here
}
