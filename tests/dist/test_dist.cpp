// The distributed suite, run under mpirun (-np 2, -np 4 --oversubscribe; ctest label `distributed`): every rank
// runs every case in the same order. The communicator's algorithms (the deterministic sum, agree, check_same), and
// the data-parallel CuMo step against the single-process step on the same global batch — one step's loss and every
// gradient, and five AdamW steps — including a rank whose share of a micro-batch is empty.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cumo/core/compare.hpp"
#include "cumo/dist/data_parallel.hpp"
#include "cumo/dist/expert_data_parallel.hpp"
#include "cumo/dist/expert_parallel.hpp"
#include "cumo/dist/overlap.hpp"
#include "cumo/moe/sparse_moe.hpp"
#include "cumo/dist/world.hpp"
#include "cumo/dist/zero.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo_test_config.hpp"
#include "nn_test_util.hpp"

using namespace cumo;
using cumo::backend::Cpu;
using cumo::dist::Communicator;

namespace {
dist::Communicator* g_comm = nullptr;
dist::Communicator& comm() { return *g_comm; }

// A sample: ids and unshifted labels of one row, and its image when it has one (4 image tokens at 1..4).
struct Sample {
  std::vector<std::int64_t> ids, labels;
  Tensor pixels;  // (3, 8, 8) or undefined
};
std::vector<Sample> make_samples(int n, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<Sample> out;
  for (int i = 0; i < n; ++i) {
    Sample s;
    const bool image = i % 3 != 2;  // some rows are text only
    const int text = 4 + int(rng.next_u32() % 5);
    s.ids.push_back(1);
    s.labels.push_back(-100);
    if (image) {
      for (int p = 0; p < 4; ++p) {
        s.ids.push_back(12);
        s.labels.push_back(-100);
      }
      s.pixels = test::random_tensor({3, 8, 8}, rng);
    }
    for (int t = 0; t < text; ++t) {
      const std::int64_t id = 2 + std::int64_t(rng.next_u32() % 10);
      s.ids.push_back(id);
      s.labels.push_back(t < 2 ? -100 : id);  // the first two text tokens are the "prompt"
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Rows [begin, end) right-padded to their longest, as io::collate does.
struct Rows {
  std::int64_t B = 0, T = 0, images = 0, targets = 0;
  std::vector<std::int64_t> ids, labels;
  std::vector<std::uint8_t> key_valid;
  Tensor pixels;
};
Rows collate(const std::vector<Sample>& s, std::int64_t begin, std::int64_t end) {
  Rows r;
  r.B = end - begin;
  for (std::int64_t i = begin; i < end; ++i) {
    r.T = std::max<std::int64_t>(r.T, std::int64_t(s[std::size_t(i)].ids.size()));
    r.images += s[std::size_t(i)].pixels.defined();
  }
  r.ids.assign(std::size_t(r.B * r.T), 0);
  r.labels.assign(std::size_t(r.B * r.T), -100);
  r.key_valid.assign(std::size_t(r.B * r.T), 0);
  if (r.images) r.pixels = Tensor::empty({r.images, 3, 8, 8});
  std::int64_t img = 0;
  for (std::int64_t i = begin; i < end; ++i) {
    const Sample& x = s[std::size_t(i)];
    for (std::size_t t = 0; t < x.ids.size(); ++t) {
      const std::size_t at = std::size_t((i - begin) * r.T) + t;
      r.ids[at] = x.ids[t];
      r.labels[at] = x.labels[t];
      r.key_valid[at] = 1;
      r.targets += t >= 1 && x.labels[t] != -100;
    }
    if (x.pixels.defined()) r.pixels[img++].copy_from(x.pixels);
  }
  return r;
}

// text_experts > 0: a Mixtral language model (top-2, no HF aux loss: data parallelism refuses that one).
// s2: S² multi-scale vision features (two tower passes per batch, nn/s2.hpp).
models::CuMo<> make_model(std::uint64_t seed, int text_experts = 0, bool s2 = false) {
  models::CuMoConfig c = test::tiny_cumo_config();
  c.llava.vision.s2 = s2;
  if (text_experts > 0) {
    c.llava.text.experts = text_experts;
    c.llava.text.top_k = 2;
    c.llava.text.aux_coef = 0.0;
  }
  models::CuMo<> m(c);
  Rng rng(seed);
  test::randomize(m.parameters(), rng, 0.4f);
  Rng up(seed + 1);
  m.upcycle(up);
  for (Parameter* p : m.parameters())
    if (p->name.ends_with(".gate.weight")) rng.fill_normal(p->value, 0.f, 0.8f);  // routers with real aux gradient
  return m;
}

// A key projection's bias adds q·b_k to every score of a query, which the softmax ignores: its gradient is 0 in
// exact arithmetic and fp32 rounding noise (~1e-9 here) in practice, different noise for a different summation
// order. A relative error of noise is meaningless, and AdamW turns noise into steps of ±lr in its sign, so these
// are checked for being negligible instead (PyTorch's k_proj.bias behaves the same way).
bool zero_by_math(const std::string& name) { return name.ends_with("k_proj.bias"); }

// How many of b's parameters differ from a's (bitwise), and how many b's optimizer holds moments for (ZeRO-1).
std::pair<int, std::int64_t> differ_and_held(const ParameterList& pa, const ParameterList& pb,
                                             const train::AdamW<>& ob) {
  int differ = 0;
  std::int64_t held = 0;
  for (std::size_t k = 0; k < pa.size(); ++k) {
    differ += !bitwise_equal(pa[k]->value, pb[k]->value);
    held += ob.state(*pb[k]) != nullptr;
  }
  return {differ, held};
}

// The micro-batches of one step: [0, 4) and [4, 7) of the samples (a world of 4 leaves rank 3 nothing in the second).
using Micro = std::vector<std::pair<std::int64_t, std::int64_t>>;
const Micro kMicro{{0, 4}, {4, 7}};

// The single-process step: every micro-batch whole, each its own mean, the step's loss their mean.
double reference_step(models::CuMo<>& m, const std::vector<Sample>& s, const Micro& micro = kMicro) {
  zero_grad(m.parameters());
  double loss = 0;
  const double M = double(micro.size());
  for (auto [b, e] : micro) {
    const Rows r = collate(s, b, e);
    loss += m.forward(r.ids, r.B, r.T, r.pixels, &r.labels, &r.key_valid).total / M;
    m.backward(1.0 / M);
  }
  return loss;
}

// The data-parallel step: this rank's rows of every micro-batch, weighted by its share, then the gradient sum.
// With `ep` the model's experts are sharded (expert parallel inside data parallel, as cumo_train runs it). With
// `overlap` (a background communicator) the sum runs on a second thread as the last micro-batch's backward finishes
// the language model and the connector (dist/overlap.hpp), as cumo_train --overlap-grad-sum runs it; `reported`
// counts the parts the backward handed over.
double data_parallel_step(models::CuMo<>& m, const std::vector<Sample>& s, dist::Communicator& c,
                          const Micro& micro = kMicro, const dist::ExpertDataParallel* ep = nullptr,
                          dist::Communicator* overlap = nullptr, int* reported = nullptr) {
  zero_grad(m.parameters());
  double loss = 0;
  const double M = double(micro.size());
  std::optional<dist::OverlappedGradientSum> overlapped;
  std::unique_ptr<dist::Communicator> overlap_replicas;  // with ep: the background sum's replica group
  const std::vector<ParameterList> early{m.language_parameters(), m.connector_parameters()};
  if (overlap && ep) {  // the expert-parallel sum, part by part, while the backward exchanges rows
    overlap_replicas = ep->replicas().background();
    overlapped.emplace(
        m.parameters(), early,
        [&](const ParameterList& part) { ep->reduce_gradients(part, *overlap, *overlap_replicas, 256); },
        std::vector<dist::Communicator*>{overlap, overlap_replicas.get()});
  } else if (overlap) {  // small buckets: many of them, parameters split across two
    overlapped.emplace(*overlap, m.parameters(), early, 256);
  }
  for (auto [b, e] : micro) {
    const Rows whole = collate(s, b, e);
    const dist::Shard mine = dist::shard_of(e - b, c.rank(), c.size());
    if (mine.size() == 0) {  // nothing to add; the reduction below still counts this rank
      if (ep) m.serve_experts();  // but the group's other ranks send rows to its experts
      continue;
    }
    const Rows r = collate(s, b + mine.begin, b + mine.end);
    const auto out = m.forward(r.ids, r.B, r.T, r.pixels, &r.labels, &r.key_valid);
    const dist::LossShare share = dist::loss_share(out.targets, whole.targets, r.images, whole.images);
    const nn::GradientsDoneHook hook = overlapped && b == micro.back().first
                                           ? m.llava().report_gradients_done([&](const ParameterList& l) {
                                               if (reported) ++*reported;
                                               overlapped->ready(l);
                                             })
                                           : nn::GradientsDoneHook{};
    m.backward(models::CuMo<>::LossScales{share.ce / M, share.aux / M});
    loss += (out.ce * share.ce + (out.total - out.ce) * share.aux) / M;
  }
  // small buckets: many of them, parameters split across two
  if (overlapped)
    overlapped->finish();
  else if (ep)
    ep->reduce_gradients(m.parameters(), 256);
  else
    dist::allreduce_gradients(c, m.parameters(), 256);
  dist::allreduce_sum(c, std::span<double>(&loss, 1));
  return loss;
}
}  // namespace

TEST_CASE("dist: allreduce_sum is the left fold over ranks in rank order, bitwise the same on every rank") {
  const int N = comm().size();
  for (std::int64_t n : {1, 3, 1001}) {  // fewer values than ranks, and chunks of unequal size
    std::vector<std::vector<float>> all(static_cast<std::size_t>(N));
    for (int q = 0; q < N; ++q) {
      Rng rng(100 + std::uint64_t(q));
      all[std::size_t(q)].resize(std::size_t(n));
      for (float& v : all[std::size_t(q)]) v = rng.uniform(-1.f, 1.f) * float(q + 1) * 1e3f;
    }
    std::vector<float> x = all[std::size_t(comm().rank())];
    dist::allreduce_sum(comm(), std::span<float>(x));
    int mismatches = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      float want = all[0][std::size_t(i)];
      for (int q = 1; q < N; ++q) want += all[std::size_t(q)][std::size_t(i)];
      mismatches += std::memcmp(&want, &x[std::size_t(i)], sizeof want) != 0;
    }
    CAPTURE(n);
    CHECK(mismatches == 0);
  }
  std::vector<std::int64_t> ints{comm().rank() + 1, -1};
  dist::allreduce_sum(comm(), std::span<std::int64_t>(ints));
  CHECK(ints[0] == std::int64_t(N) * (N + 1) / 2);
  CHECK(ints[1] == -N);
}

TEST_CASE("dist: alltoallv_pieces moves scattered pieces in order, the engine's and the staged default alike") {
  // rank r sends to q the values r·1000 + q·100 + i, i < 3 + r + q, as pieces of 1, 2, 1, … values scattered over
  // its send buffer (in reverse order of q) and receives them into pieces scattered over its receive buffer
  const int N = comm().size(), r = comm().rank();
  auto count = [](int from, int to) { return 3 + from + to; };
  auto split = [](int n) {  // piece lengths 1, 2, 1, 2, … (and an empty piece first: engines must accept it)
    std::vector<int> len{0};
    for (int left = n, k = 0; left > 0; ++k) {
      len.push_back(std::min(left, 1 + k % 2));
      left -= len.back();
    }
    return len;
  };
  std::vector<std::vector<dist::Segment>> send_pieces(static_cast<std::size_t>(N)), recv_pieces(static_cast<std::size_t>(N));
  std::vector<float> send, recv;
  std::int64_t gap = 0;
  for (int q = N - 1; q >= 0; --q) {  // the send buffer holds q's values last-to-first ranks, with gaps
    int i = 0;
    for (int len : split(count(r, q))) {
      send.push_back(-1.f);  // a gap nobody sends
      send_pieces[std::size_t(q)].push_back({std::int64_t(send.size()) * 4, std::int64_t(len) * 4});
      for (int j = 0; j < len; ++j) send.push_back(float(r * 1000 + q * 100 + i++));
    }
  }
  for (int q = 0; q < N; ++q)
    for (int len : split(count(q, r))) {
      recv_pieces[std::size_t(q)].push_back({(std::int64_t(recv.size()) + 1) * 4, std::int64_t(len) * 4});
      recv.insert(recv.end(), std::size_t(len) + 1, -2.f);
      gap += 1;
    }
  for (const bool staged : {false, true}) {
    CAPTURE(staged);
    std::vector<float> got(recv.size(), -2.f);
    if (staged)
      comm().Communicator::alltoallv_pieces(send.data(), send_pieces, got.data(), recv_pieces);
    else
      comm().alltoallv_pieces(send.data(), send_pieces, got.data(), recv_pieces);
    std::int64_t untouched = 0, wrong = 0;
    std::size_t at = 0;
    for (int q = 0; q < N; ++q) {
      int i = 0;
      for (int len : split(count(q, r))) {
        untouched += got[at++] == -2.f;  // the gap before each piece stays as it was
        for (int j = 0; j < len; ++j) wrong += got[at++] != float(q * 1000 + r * 100 + i++);
      }
    }
    CHECK(wrong == 0);
    CHECK(untouched == gap);
  }
}

TEST_CASE("dist: agree turns one rank's failure into the same error on every rank, check_same names the ranks") {
  const int last = comm().size() - 1;
  CHECK_NOTHROW(dist::agree(comm(), ""));
  std::string what;
  try {
    dist::agree_on(comm(), [&] {
      if (comm().rank() == last) throw Error("cannot write /nowhere");
    });
  } catch (const Error& e) {
    what = e.what();
  }
  CHECK(what.find("cannot write /nowhere") != std::string::npos);
  if (comm().rank() != last) CHECK(what.find("rank " + std::to_string(last)) != std::string::npos);

  CHECK_NOTHROW(dist::check_same(comm(), "the configuration", "same everywhere"));
  const std::string mine = comm().rank() == last ? "experts 5" : "experts 4";
  if (comm().size() > 1)  // a world of one has nobody to disagree with
    CHECK_THROWS_WITH(dist::check_same(comm(), "the configuration", mine),
                    doctest::Contains(("the ranks disagree on the configuration: rank(s) " + std::to_string(last)).c_str()));
  CHECK(dist::any(comm(), comm().rank() == last));
  CHECK_FALSE(dist::any(comm(), false));
}

TEST_CASE("dist: a data-parallel CuMo step equals the single-process step — loss and every gradient rel <= 1e-6") {
  const auto samples = make_samples(7, 11);
  models::CuMo<> m = make_model(3);
  const ParameterList params = m.parameters();
  const double ref_loss = reference_step(m, samples);
  std::vector<Tensor> ref;
  for (Parameter* p : params) ref.push_back(p->grad.clone());
  const double dp_loss = data_parallel_step(m, samples, comm());
  CHECK(std::abs(dp_loss - ref_loss) <= 1e-6 * std::abs(ref_loss));
  double worst = 0, total = 0;
  std::string worst_name;
  for (std::size_t k = 0; k < params.size(); ++k) {
    total += test::dot(ref[k], ref[k]);
    if (zero_by_math(params[k]->name)) continue;
    const double r = rel_error(params[k]->grad, ref[k]);
    if (r > worst) worst = r, worst_name = params[k]->name;
  }
  CAPTURE(worst_name);
  CHECK(worst <= 1e-6);
  // the key biases' gradients are rounding noise in both runs, far below everything else
  for (std::size_t k = 0; k < params.size(); ++k)
    if (zero_by_math(params[k]->name)) {
      CAPTURE(params[k]->name);
      CHECK(std::sqrt(test::dot(params[k]->grad, params[k]->grad)) <= 1e-6 * std::sqrt(total));
      CHECK(std::sqrt(test::dot(ref[k], ref[k])) <= 1e-6 * std::sqrt(total));
    }
  // a gradient that is zero by construction stays exactly zero (the last CLIP layer's unused experts)
  for (std::size_t k = 0; k < params.size(); ++k)
    if (params[k]->name.find("layers.1.mlp.experts") != std::string::npos) CHECK(test::dot(params[k]->grad, params[k]->grad) == 0.0);
}

TEST_CASE("dist: the gradient sum overlapped with the backward (a second thread, part by part) gives the sum's bits") {
  REQUIRE(comm().allows_background_thread());
  const std::unique_ptr<Communicator> bg = comm().background();
  const auto samples = make_samples(7, 13);
  models::CuMo<> a = make_model(5), b = make_model(5);
  const double loss_a = data_parallel_step(a, samples, comm());
  int reported = 0;
  const double loss_b = data_parallel_step(b, samples, comm(), kMicro, nullptr, bg.get(), &reported);
  CHECK(loss_a == loss_b);
  const ParameterList pa = a.parameters(), pb = b.parameters();
  int differ = 0;
  for (std::size_t k = 0; k < pa.size(); ++k) differ += !bitwise_equal(pa[k]->grad, pb[k]->grad);
  CHECK(differ == 0);
  // the backward handed over the language model and the connector; the language model alone where this rank's
  // rows of the last micro-batch hold no image, nothing where it has no rows (4 ranks: rank 3) — finish() let the
  // rest go, in the same order on every rank
  const auto [first, end] = kMicro.back();
  const dist::Shard last = dist::shard_of(end - first, comm().rank(), comm().size());
  const int expected = last.size() == 0 ? 0 : collate(samples, first + last.begin, first + last.end).images > 0 ? 2 : 1;
  CHECK(reported == expected);
  // the parts: the language model, the connector, the vision tower (every parameter trainable here)
  dist::OverlappedGradientSum sum(*bg, pb, {b.language_parameters(), b.connector_parameters()});
  REQUIRE(sum.parts().size() == 3);
  CHECK(sum.parts()[0] == b.language_parameters());
  CHECK(sum.parts()[1] == b.connector_parameters());
  CHECK(sum.parts()[2] == b.vision_parameters());
  CHECK_THROWS_WITH(sum.ready(b.vision_parameters()), doctest::Contains("not one of the 2 early parts"));
  // one hook at a time, cleared when its guard goes
  {
    const nn::GradientsDoneHook h = b.llava().report_gradients_done([](const ParameterList&) {});
    CHECK_THROWS_WITH((void)b.llava().report_gradients_done([](const ParameterList&) {}),
                      doctest::Contains("a hook is set already"));
  }
  {
    const nn::GradientsDoneHook again = b.llava().report_gradients_done([](const ParameterList&) {});
  }
  // left unfinished (an exception unwinding a step): the destructor drops the parts not started, no collective
}

TEST_CASE("dist: five data-parallel AdamW steps with clipping equal five single-process steps (rel <= 1e-6)") {
  const auto samples = make_samples(7, 12);
  models::CuMo<> a = make_model(4), b = make_model(4);
  const train::AdamWOptions o{2e-3, 0.9, 0.999, 1e-8, 0.01};
  train::AdamW<> oa(a.parameters(), o), ob(b.parameters(), o);
  for (int step = 1; step <= 5; ++step) {
    reference_step(a, samples);
    train::clip_gradients(oa, 1.0, step);
    oa.step(2e-3);
    data_parallel_step(b, samples, comm());
    train::clip_gradients(ob, 1.0, step);
    ob.step(2e-3);
  }
  const ParameterList pa = a.parameters(), pb = b.parameters();
  double worst = 0;
  for (std::size_t k = 0; k < pa.size(); ++k)
    if (!zero_by_math(pa[k]->name)) worst = std::max(worst, rel_error(pb[k]->value, pa[k]->value));
  CHECK(worst <= 1e-6);
  // and every rank holds the same bits: the replicated optimizers took the same step
  std::vector<std::int64_t> h{std::int64_t(dist::fingerprint(std::string_view(
      reinterpret_cast<const char*>(pb[0]->value.data<float>()), std::size_t(pb[0]->value.numel()) * 4)) >> 1)};
  std::vector<std::int64_t> lo = h, hi = h;
  comm().allreduce(lo, dist::ReduceOp::min);
  comm().allreduce(hi, dist::ReduceOp::max);
  CHECK(lo[0] == hi[0]);
}

TEST_CASE("dist: ZeRO-1 (AdamW moments sharded over the ranks) takes bitwise the replicated optimizer's steps") {
  const auto samples = make_samples(7, 13);
  models::CuMo<> a = make_model(6), b = make_model(6);
  const train::AdamWOptions o{2e-3, 0.9, 0.999, 1e-8, 0.01};
  train::AdamW<> oa(a.parameters(), o), ob(b.parameters(), o);
  dist::Zero1<> zero(comm(), ob);
  for (int step = 1; step <= 5; ++step) {
    data_parallel_step(a, samples, comm());
    train::clip_gradients(oa, 1.0, step);
    oa.step(2e-3);
    data_parallel_step(b, samples, comm());
    train::clip_gradients(ob, 1.0, step);
    ob.step(2e-3);
    // odd steps: rounds of 1 KiB (parameters spanning rounds, ranks whose runs end early); even: one round
    zero.share_parameters(step % 2 ? 1024 : std::int64_t(64) << 20);
  }
  const ParameterList pa = a.parameters(), pb = b.parameters();
  auto [differ, held] = differ_and_held(pa, pb, ob);
  CHECK(differ == 0);
  CHECK(held == zero.owned_parameters());  // this rank keeps only its own parameters' moments
  if (comm().size() > 1) CHECK(held < std::int64_t(pa.size()));
  // gathered for a checkpoint: every moment, bitwise the replicated optimizer's
  zero.gather_state();
  const auto want = oa.state_tensors(), got = ob.state_tensors();
  REQUIRE(got.size() == want.size());
  int bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    bad += got[i].first != want[i].first || !bitwise_equal(got[i].second, want[i].second);
  CHECK(bad == 0);
  zero.release();
  held = 0;
  for (Parameter* p : pb) held += ob.state(*p) != nullptr;
  CHECK(held == zero.owned_parameters());
}

namespace {
using Block = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>>;
constexpr std::int64_t kH = 16, kF = 24;
constexpr int kE = 4;

Block make_block(bool skewed) {
  Block b(kH, kF, kE);
  Rng rng(7);
  b.reset_parameters(rng);
  Tensor& w = b.router().weight.value;  // (E, H)
  if (skewed) {
    // every token chooses experts 0 and 1: the ranks holding 2 and 3 receive no row
    for (int e = 0; e < kE; ++e)
      for (std::int64_t h = 0; h < kH; ++h) w.data<float>()[e * kH + h] = e < 2 ? 1.f + 0.1f * float(e) : -1.f;
  } else {
    rng.fill_normal(w, 0.f, 0.8f);  // sharp enough that the aux losses carry gradient
  }
  return b;
}

// One EP group: the block with its experts sharded over `group` against the whole block on each rank's own tokens
// (different counts per rank, 2 images each); the expert and router gradients of the reference summed over the group.
void check_expert_parallel(Communicator& group, bool skewed) {
  const int r = comm().rank();
  const std::int64_t T = 2 * (9 + r);  // a different token count on every rank
  Rng rng(100 + std::uint64_t(r));
  Tensor x = skewed ? Tensor::empty({T, kH}) : test::random_tensor({T, kH}, rng);
  if (skewed) rng.fill_uniform(x, 0.5f, 1.f);
  const Tensor dy = test::random_tensor({T, kH}, rng);
  const AuxLossWeights aux{0.1f, 0.01f};

  Block whole = make_block(skewed);
  const auto ref = whole.forward(x, ForwardArgs{2, true});
  const Tensor dx_ref = whole.backward(dy, aux);
  ParameterList wp = whole.parameters();
  for (Parameter* p : wp) dist::allreduce_sum(group, std::span<float>(p->grad.data<float>(), std::size_t(p->grad.numel())));

  Block ep = make_block(skewed);
  ep.shard_experts(group);
  REQUIRE(ep.experts().experts() == kE / group.size());
  const auto out = ep.forward(x, ForwardArgs{2, true});
  const Tensor dx = ep.backward(dy, aux);
  CHECK(rel_error(out.y, ref.y) <= 1e-6);
  CHECK(rel_error(dx, dx_ref) <= 1e-6);
  CHECK(Cpu::item(out.aux.balance_top1) == Cpu::item(ref.aux.balance_top1));  // the same local routing
  if (skewed) CHECK(whole.load().tokens[2] + whole.load().tokens[3] == 0);
  // router: whole on every rank, its gradient summed over the group; experts: this rank's slice of the sum
  ParameterList epp = ep.parameters();
  Parameter& router = *epp.back();
  dist::allreduce_sum(group, std::span<float>(router.grad.data<float>(), std::size_t(router.grad.numel())));
  CHECK(rel_error(router.grad, wp.back()->grad) <= 1e-6);
  const int first = ep.expert_exchange()->first_expert(), n = ep.expert_exchange()->local_experts();
  for (std::size_t i = 0; i + 1 < epp.size(); ++i) {
    CAPTURE(epp[i]->name);
    CHECK(rel_error(epp[i]->grad, wp[i]->grad.slice(0, first, first + n).contiguous()) <= 1e-6);
  }
}
}  // namespace

TEST_CASE("dist: expert-parallel SparseMoE forward and backward equal the whole block (outputs, dx, every grad)") {
  if (kE % comm().size() != 0) return;  // E = 4 over 3 ranks: the error case below
  check_expert_parallel(comm(), false);
}

TEST_CASE("dist: expert parallel with ranks that receive no row (every token routed to experts 0 and 1)") {
  if (kE % comm().size() != 0) return;
  check_expert_parallel(comm(), true);
}

TEST_CASE("dist: expert parallel where only rank 0 has tokens — the others serve their experts with none") {
  if (kE % comm().size() != 0 || comm().size() == 1) return;
  Rng rng(5);
  const bool holder = comm().rank() == 0;
  const std::int64_t T = holder ? 12 : 0;
  const Tensor x = test::random_tensor({T, kH}, rng), dy = test::random_tensor({T, kH}, rng);
  const AuxLossWeights aux{0.1f, 0.01f};
  Block whole = make_block(false);
  ParameterList wp = whole.parameters();
  Tensor y_ref, dx_ref;
  if (holder) {
    y_ref = whole.forward(x).y;
    dx_ref = whole.backward(dy, aux);
  }
  for (Parameter* p : wp) dist::allreduce_sum(comm(), std::span<float>(p->grad.data<float>(), std::size_t(p->grad.numel())));
  Block ep = make_block(false);
  ep.shard_experts(comm());
  const auto out = ep.forward(x);
  const Tensor dx = ep.backward(dy, aux);
  CHECK(out.y.size(0) == T);
  if (holder) {
    CHECK(rel_error(out.y, y_ref) <= 1e-6);
    CHECK(rel_error(dx, dx_ref) <= 1e-6);
  }
  ParameterList epp = ep.parameters();
  const int first = ep.expert_exchange()->first_expert(), n = ep.expert_exchange()->local_experts();
  for (std::size_t i = 0; i + 1 < epp.size(); ++i) {
    CAPTURE(epp[i]->name);
    CHECK(rel_error(epp[i]->grad, wp[i]->grad.slice(0, first, first + n).contiguous()) <= 1e-6);
  }
  if (!holder) CHECK(test::dot(epp.back()->grad, epp.back()->grad) == 0.0);  // no tokens, no router gradient
}

TEST_CASE("dist: expert parallel inside data parallel — groups of 2 ranks split from the world") {
  if (comm().size() < 4 || comm().size() % 2 != 0) return;
  const auto group = comm().split(comm().rank() / 2, comm().rank());
  REQUIRE(group->size() == 2);
  check_expert_parallel(*group, false);
}

TEST_CASE("dist: experts that do not split over the group are the same clear error on every rank") {
  Block b(kH, kF, 3);
  if (comm().size() == 1 || 3 % comm().size() == 0) return;
  CHECK_THROWS_WITH(b.shard_experts(comm()), doctest::Contains("3 experts do not split evenly over an "
                                                               "expert-parallel group of"));
}

namespace {
// Expert parallelism inside the model: micro-batches where a rank has image rows, text-only rows or none at all
// ([1, 3) is one image row and one text-only row; with 4 ranks two ranks get nothing).
const Micro kMicroEp{{0, 4}, {4, 7}, {1, 3}};

// The whole-model gradient (or moment) `whole` restricted to what this rank holds of parameter p.
Tensor held_part(const dist::ExpertDataParallel& ep, const Parameter& p, const Tensor& whole) {
  return ep.is_sharded(p) ? dist::rows_of_rank(ep.experts(), whole) : whole;
}

// After unshard_experts: the same names and the same bits as a model that was never sharded.
void check_same_weights(const ParameterList& got, const ParameterList& want) {
  REQUIRE(got.size() == want.size());
  for (std::size_t k = 0; k < want.size(); ++k) {
    CAPTURE(want[k]->name);
    CHECK(got[k]->name == want[k]->name);
    CHECK(bitwise_equal(got[k]->value, want[k]->value));
  }
}

// The largest relative error of the gradients against the single-process ones (the key biases' noise aside), over
// whole tensors as the data-parallel test measures it: a sharded gradient's slices are gathered first. (One expert's
// slice alone can differ by more: with 4 ranks a connector expert's is 1.5e-6 off in plain data parallelism too,
// its whole tensor 4.6e-7 — summation order on a small slice.)
double worst_grad_error(const dist::ExpertDataParallel& ep, const ParameterList& got, const std::vector<Tensor>& ref,
                        std::string& worst_name) {
  double worst = 0;
  for (std::size_t k = 0; k < got.size(); ++k) {
    Tensor whole = ref[k].clone();
    if (ep.is_sharded(*got[k])) dist::allgather_rows(ep.experts(), got[k]->grad, whole);
    if (zero_by_math(got[k]->name)) continue;
    const double r = rel_error(ep.is_sharded(*got[k]) ? whole : got[k]->grad, ref[k]);
    if (r > worst) worst = r, worst_name = got[k]->name;
  }
  return worst;
}

// Every rank's copy of every parameter is the same bits (after unshard_experts: the whole model everywhere).
bool same_on_every_rank(const ParameterList& params) {
  const auto h = std::int64_t(dist::fingerprint(dist::weights_digest(params)) >> 1);
  std::vector<std::int64_t> lo{h}, hi{h};
  comm().allreduce(lo, dist::ReduceOp::min);
  comm().allreduce(hi, dist::ReduceOp::max);
  return lo[0] == hi[0];
}

// The group sizes K the world can run: every K > 1 that divides both the world and the tiny model's 4 experts.
std::vector<int> expert_group_sizes() {
  std::vector<int> ks;
  for (int K = 2; K <= comm().size(); ++K)
    if (comm().size() % K == 0 && 4 % K == 0) ks.push_back(K);
  return ks;
}

// A step's loss and a copy of every gradient (the step every expert-parallel step is held to).
struct StepResult {
  double loss = 0;
  std::vector<Tensor> grads;
};
StepResult result_of(double loss, models::CuMo<>& m) {
  StepResult r{loss, {}};
  for (Parameter* p : m.parameters()) r.grads.push_back(p->grad.clone());
  return r;
}

// Shards m's experts over ep's groups, takes the expert-parallel step inside data parallelism on kMicroEp, and checks
// its loss and every gradient (a sharded one gathered whole) against `want` within rel 1e-6. Returns the sharded
// parameters; m stays sharded (and keeps pointing at ep's group communicator: ep must outlive it being sharded).
ParameterList check_expert_parallel_step(models::CuMo<>& m, dist::ExpertDataParallel& ep,
                                         const std::vector<Sample>& samples, const StepResult& want) {
  const ParameterList sharded = m.shard_experts(ep.experts());
  ep.set_sharded(sharded);
  const double loss = data_parallel_step(m, samples, comm(), kMicroEp, &ep);
  CHECK(std::abs(loss - want.loss) <= 1e-6 * std::abs(want.loss));
  std::string worst_name;
  const double worst = worst_grad_error(ep, m.parameters(), want.grads, worst_name);
  CAPTURE(worst_name);
  CHECK(worst <= 1e-6);
  return sharded;
}
}  // namespace

TEST_CASE("dist: CuMo shard_experts / unshard_experts is a bitwise round trip that keeps names and addresses") {
  for (int K : expert_group_sizes()) {
    CAPTURE(K);
    models::CuMo<> a = make_model(8), b = make_model(8);
    const ParameterList before = b.parameters();
    dist::ExpertDataParallel ep(comm(), K);
    const ParameterList sharded = b.shard_experts(ep.experts());
    CHECK(sharded.size() == 4 * 3);  // fc1/fc2 weight and bias of 2 CLIP layers and the connector
    CHECK(b.experts_sharded());
    CHECK(b.parameters() == before);  // the same Parameter objects: optimizers keep pointing at them
    for (const Parameter* p : sharded) {
      CAPTURE(p->name);
      CHECK(p->name.find(".experts.") != std::string::npos);
      CHECK(p->value.size(0) == 4 / K);
    }
    b.unshard_experts();
    CHECK_FALSE(b.experts_sharded());
    check_same_weights(b.parameters(), a.parameters());
  }
}

TEST_CASE("dist: an expert-parallel CuMo step inside data parallelism equals the single-process step (rel <= 1e-6)") {
  const auto samples = make_samples(7, 13);
  for (int K : expert_group_sizes()) {
    CAPTURE(K);
    models::CuMo<> ref = make_model(5), m = make_model(5);
    const StepResult want = result_of(reference_step(ref, samples, kMicroEp), ref);
    dist::ExpertDataParallel ep(comm(), K);
    check_expert_parallel_step(m, ep, samples, want);
  }
}

// With S² the tower runs twice per batch (1× and the 3× tiles, a copy of the tower sharing its sharded experts); a
// rank without images serves both passes in that order. As with a Mixtral LM, the plain data-parallel step is itself
// 1.01e-6 from the one-process step here (4 ranks, the connector experts' fc1 weight: fp32 summation order over the
// 2·Hv-wide features; 8.3e-7 with 2 ranks), so the sharded step is held to the data-parallel step it must reproduce
// (measured 7.8e-8 – 7.6e-7).
TEST_CASE("dist: an expert-parallel CuMo step with S² equals the data-parallel step (rel <= 1e-6)") {
  const auto samples = make_samples(7, 13);
  for (int K : expert_group_sizes()) {
    CAPTURE(K);
    models::CuMo<> dp = make_model(5, 0, true), m = make_model(5, 0, true);
    const StepResult want = result_of(data_parallel_step(dp, samples, comm(), kMicroEp), dp);
    dist::ExpertDataParallel ep(comm(), K);
    check_expert_parallel_step(m, ep, samples, want);
    m.unshard_experts();
    CHECK_FALSE(m.experts_sharded());
  }
}

// With a Mixtral language model (its experts sharded too) the plain data-parallel step is itself 2.3e-6 from the
// one-process step on these batches (fp32 summation order through more paths; measured, 2 ranks), so the sharded
// step is held to the data-parallel step it must reproduce: the same ranks, the same rows, the experts elsewhere.
TEST_CASE("dist: with a Mixtral LM, the expert-parallel step equals the data-parallel step (rel <= 1e-6)") {
  const auto samples = make_samples(7, 13);
  for (int K : expert_group_sizes()) {
    CAPTURE(K);
    models::CuMo<> dp = make_model(5, 4), m = make_model(5, 4);
    const StepResult want = result_of(data_parallel_step(dp, samples, comm(), kMicroEp), dp);
    dist::ExpertDataParallel ep(comm(), K);
    const ParameterList sharded = check_expert_parallel_step(m, ep, samples, want);
    std::int64_t lm_sharded = 0;
    for (const Parameter* p : sharded) lm_sharded += p->name.find("language_model") != std::string::npos;
    CHECK(lm_sharded == 2);  // gate_up_proj and down_proj of the one LM layer
    m.unshard_experts();
    CHECK_FALSE(m.experts_sharded());
  }
}

// The backward's row exchanges (expert group) and the background sum (duplicates of the world and the replica group)
// run at the same time: two threads in MPI (MPI_THREAD_MULTIPLE). Every gradient, expert slices included, must be
// the synchronous expert-parallel sum's bits.
TEST_CASE("dist: the gradient sum overlapped with an expert-parallel backward gives the synchronous sum's bits") {
  REQUIRE(comm().allows_concurrent_threads());
  const auto samples = make_samples(7, 13);
  for (int K : expert_group_sizes()) {
    for (int text_experts : {0, 4}) {  // the CLIP and connector experts; and a Mixtral LM's, in the first part
      CAPTURE(K);
      CAPTURE(text_experts);
      models::CuMo<> a = make_model(5, text_experts), b = make_model(5, text_experts);
      dist::ExpertDataParallel ea(comm(), K), eb(comm(), K);
      ea.set_sharded(a.shard_experts(ea.experts()));
      eb.set_sharded(b.shard_experts(eb.experts()));
      const std::unique_ptr<Communicator> bg = comm().background();
      const double loss_a = data_parallel_step(a, samples, comm(), kMicroEp, &ea);
      int reported = 0;
      const double loss_b = data_parallel_step(b, samples, comm(), kMicroEp, &eb, bg.get(), &reported);
      CHECK(loss_a == loss_b);
      const ParameterList pa = a.parameters(), pb = b.parameters();
      int differ = 0, sharded = 0;
      for (std::size_t k = 0; k < pa.size(); ++k) {
        differ += !bitwise_equal(pa[k]->grad, pb[k]->grad);
        sharded += eb.is_sharded(*pb[k]);
      }
      CHECK(sharded > 0);
      CHECK(differ == 0);
      CHECK(reported <= 2);
    }
  }
}

TEST_CASE("dist: five expert-parallel AdamW steps with clipping equal five single-process steps (rel <= 1e-6)") {
  const auto samples = make_samples(7, 14);
  for (int K : expert_group_sizes()) {
    CAPTURE(K);
    models::CuMo<> a = make_model(6), b = make_model(6);
    const train::AdamWOptions o{2e-3, 0.9, 0.999, 1e-8, 0.01};
    train::AdamW<> oa(a.parameters(), o), ob(b.parameters(), o);
    dist::ExpertDataParallel ep(comm(), K);
    ep.set_sharded(b.shard_experts(ep.experts()));
    for (int step = 1; step <= 5; ++step) {
      reference_step(a, samples, kMicroEp);
      const float na = train::clip_gradients(oa, 0.5, step);
      oa.step(2e-3);
      data_parallel_step(b, samples, comm(), kMicroEp, &ep);
      const float nb = ep.clip_gradients(ob, 0.5, step);
      CHECK(std::abs(double(nb) - double(na)) <= 1e-6 * double(na));  // clipping active: the norms are > 0.5
      CHECK(na > 0.5f);
      ob.step(2e-3);
    }
    // the whole model again on every rank, with the moments whole: what a checkpoint holds
    b.unshard_experts();
    ep.gather_state(ob);
    const ParameterList pa = a.parameters(), pb = b.parameters();
    double worst = 0, worst_moment = 0;
    for (std::size_t k = 0; k < pa.size(); ++k) {
      if (zero_by_math(pa[k]->name)) continue;
      worst = std::max(worst, rel_error(pb[k]->value, pa[k]->value));
      const auto *sa = oa.state(*pa[k]), *sb = ob.state(*pb[k]);
      REQUIRE((sa != nullptr) == (sb != nullptr));
      if (!sa) continue;
      CHECK(sb->step == sa->step);
      REQUIRE(sb->exp_avg.shape() == sa->exp_avg.shape());
      worst_moment = std::max(worst_moment, rel_error(sb->exp_avg, sa->exp_avg));
    }
    CHECK(worst <= 1e-6);
    CHECK(worst_moment <= 1e-6);
    CHECK(same_on_every_rank(pb));
    // and slicing the gathered moments again gives this rank's slices back, bit for bit
    std::vector<Tensor> gathered;
    const ParameterList sharded = b.shard_experts(ep.experts());
    ep.set_sharded(sharded);
    for (Parameter* p : sharded) gathered.push_back(ob.state(*p)->exp_avg_sq.clone());
    ep.shard_state(ob);
    for (std::size_t i = 0; i < sharded.size(); ++i) {
      CAPTURE(sharded[i]->name);
      CHECK(bitwise_equal(ob.state(*sharded[i])->exp_avg_sq, held_part(ep, *sharded[i], gathered[i])));
    }
    b.unshard_experts();
  }
}

TEST_CASE("dist: a Mixtral decoder with sharded experts: rank 0's forward and backward as one process's, a round trip") {
  if (4 % comm().size() != 0 || comm().size() == 1) return;
  nn::DecoderConfig dc = test::tiny_cumo_config().llava.text;
  dc.layers = 2;
  dc.experts = 4;
  dc.top_k = 2;
  dc.aux_coef = 0.02;
  Rng rng(21);
  nn::DecoderLM<> whole(dc), ep(dc);
  test::randomize(whole.parameters(), rng, 0.3f);
  for (std::size_t i = 0; i < whole.parameters().size(); ++i)
    ep.parameters()[i]->value.copy_from(whole.parameters()[i]->value);
  const std::int64_t B = 2, T = 7;
  std::vector<std::int64_t> ids(std::size_t(B * T)), labels(std::size_t(B * T));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = labels[i] = std::int64_t(1 + rng.next_u32() % 11);
  const auto ref = whole.forward(ids, B, T, &labels);
  whole.backward_all();
  const ParameterList sharded = ep.shard_experts(comm());
  CHECK(sharded.size() == 2 * 2);  // gate_up_proj and down_proj of both layers
  CHECK(ep.experts_sharded());
  if (comm().rank() == 0) {  // the batch's holder; the others serve their experts
    const auto out = ep.forward(ids, B, T, &labels);
    ep.backward_all();
    CHECK(rel_error(out.logits, ref.logits) <= 1e-6);
    CHECK(std::abs(out.aux - ref.aux) <= 1e-6 * std::abs(ref.aux));
  } else {
    ep.serve_experts_forward();
    ep.serve_experts_backward();
  }
  const ParameterList pw = whole.parameters(), pe = ep.parameters();
  for (std::size_t i = 0; i < pw.size(); ++i) {
    CAPTURE(pw[i]->name);
    const bool mine = std::find(sharded.begin(), sharded.end(), pe[i]) != sharded.end();
    if (mine)
      CHECK(rel_error(pe[i]->grad, dist::rows_of_rank(comm(), pw[i]->grad)) <= 1e-6);
    else if (comm().rank() == 0)
      CHECK(rel_error(pe[i]->grad, pw[i]->grad) <= 1e-6);
  }
  ep.unshard_experts();
  CHECK_FALSE(ep.experts_sharded());
  check_same_weights(pe, pw);
}

TEST_CASE("dist: ZeRO-1 with expert parallelism (moments sharded per partition) takes bitwise the replicated steps") {
  const auto samples = make_samples(7, 15);
  for (int K : expert_group_sizes()) {
    CAPTURE(K);
    models::CuMo<> a = make_model(9), b = make_model(9);
    const train::AdamWOptions o{2e-3, 0.9, 0.999, 1e-8, 0.01};
    train::AdamW<> oa(a.parameters(), o), ob(b.parameters(), o);
    dist::ExpertDataParallel ea(comm(), K), eb(comm(), K);
    ea.set_sharded(a.shard_experts(ea.experts()));
    eb.set_sharded(b.shard_experts(eb.experts()));
    const auto parts = eb.split(ob.trainable_parameters());
    dist::Zero1<> zero(ob, {{&comm(), parts.replicated}, {&eb.replicas(), parts.sharded}});
    for (int step = 1; step <= 3; ++step) {
      data_parallel_step(a, samples, comm(), kMicroEp, &ea);
      ea.clip_gradients(oa, 1.0, step);
      oa.step(2e-3);
      data_parallel_step(b, samples, comm(), kMicroEp, &eb);
      eb.clip_gradients(ob, 1.0, step);
      ob.step(2e-3);
      zero.share_parameters();
    }
    const ParameterList pa = a.parameters(), pb = b.parameters();
    const auto [differ, held] = differ_and_held(pa, pb, ob);
    CHECK(differ == 0);
    CHECK(held == zero.owned_parameters());
    CHECK(held < std::int64_t(pa.size()));  // the world of >= 2 ranks shares the replicated moments at least
    // gathered over each partition, the moments are the replicated optimizer's, bit for bit
    zero.gather_state();
    int bad = 0;
    for (std::size_t k = 0; k < pa.size(); ++k) {
      const auto *sa = oa.state(*pa[k]), *sb = ob.state(*pb[k]);
      REQUIRE((sa != nullptr) == (sb != nullptr));
      if (sa) bad += !bitwise_equal(sa->exp_avg, sb->exp_avg) || !bitwise_equal(sa->exp_avg_sq, sb->exp_avg_sq);
    }
    CHECK(bad == 0);
    zero.release();
    a.unshard_experts();
    b.unshard_experts();
  }
}

TEST_CASE("dist: expert parallel groups that do not divide the world are one clear error on every rank") {
  if (comm().size() < 2) return;
  const int K = comm().size() + 1;
  CHECK_THROWS_WITH(dist::ExpertDataParallel(comm(), K), doctest::Contains("do not divide the"));
}

int main(int argc, char** argv) {
  dist::World world(&argc, &argv);
  g_comm = &world.comm();
  doctest::Context ctx(argc, argv);
  if (world.rank() != 0) ctx.setOption("minimal", true);  // one full report (rank 0's); failures print everywhere
  const int rc = ctx.run();
  // every rank's verdict: the job fails when any rank failed
  const bool failed = dist::any(world.comm(), rc != 0);
  if (world.rank() == 0)
    std::cout << "distributed suite: " << world.size() << " rank(s) over " << world.comm().engine() << ": "
              << (failed ? "FAILED" : "passed") << "\n";
  return failed ? 1 : 0;
}
