// Weights held in bf16/f16 for inference (core/parameter.hpp's ParameterStorage): the CPU products widen them a block
// of rows at a time and accumulate in fp32, so a model built in bf16 computes what the fp32 model computes with its
// weights rounded to bf16 — up to fp32 summation order (tolerance 1e-6 per product, 1e-5 through a model). Against
// the unrounded fp32 weights one product is off by about the RMS relative rounding of a bf16 element (≈ 2^-8/√3 for
// round-to-nearest with 8 significant bits); the tests bound it by 2^-8.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <optional>
#include <vector>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/moe.hpp"
#include "cumo/nn.hpp"
#include "nn_test_util.hpp"
#include "test_tmp.hpp"

using namespace cumo;

namespace {
constexpr double kBf16Unit = 1.0 / 256;  // 2^-8: bf16's relative rounding bound (8 significant bits)

// t rounded to `d` and widened back: the fp32 values a bf16/f16 copy holds.
Tensor rounded(const Tensor& t, DType d) { return t.to(d).to(DType::f32); }
}  // namespace

TEST_CASE("half weights: cpu::linear widens bf16/f16 weights by blocks and equals the fp32 product of the rounded "
          "weights") {
  Rng rng(3);
  for (const DType d : {DType::bf16, DType::f16})
    for (const std::int64_t m : {1, 3, 40})  // decode-sized (L2 blocks) and prefill-sized (2 MiB blocks) products
      for (const std::int64_t k : {70, 2100}) {
        const std::int64_t n = 333;  // several blocks and a partial one
        const Tensor x = test::random_tensor({m, k}, rng);
        const Tensor w = test::random_tensor({n, k}, rng, 0.05f);
        const Tensor wn = w.to(d);
        const Tensor b = test::random_tensor({n}, rng);
        // A prefill-sized bf16 product runs on the CPU's bf16 dot products where it has them: x is rounded too.
        const bool dot = d == DType::bf16 && m >= cpu::kBf16DotMinRows && cpu::bf16_gemm_available();
        const Tensor xr = dot ? rounded(x, d) : x;
        Tensor got = Tensor::empty({m, n}), want = Tensor::empty({m, n}), exact = Tensor::empty({m, n});
        cpu::linear(x, wn, &b, got);
        cpu::linear(xr, rounded(w, d), &b, want);
        cpu::linear(x, w, &b, exact);
        INFO(name_of(d), " m=", m, " k=", k, dot ? " (bf16 dot products)" : " (widened)");
        CHECK(rel_error(got, want) < 1e-6);
        if (dot) {  // the dot-product path really ran: the activations' rounding shows
          Tensor fp32x = Tensor::empty({m, n});
          cpu::linear(x, rounded(w, d), &b, fp32x);
          CHECK(rel_error(got, fp32x) > 1e-5);
        }
        // f16 has 11 significant bits: its rounding is 8x finer than bf16's.
        CHECK(rel_error(got, exact) < (d == DType::bf16 ? kBf16Unit : kBf16Unit / 8));
        CHECK(rel_error(got, exact) > 0);  // the weights really were rounded
        // beta = 1 accumulates into y
        Tensor acc = want.clone();
        cpu::linear(x, wn, nullptr, acc, 1.f);
        Tensor twice = Tensor::empty({m, n});
        cpu::linear(xr, rounded(w, d), nullptr, twice);
        for (std::int64_t i = 0; i < m * n; ++i) twice.data<float>()[i] += want.data<float>()[i];
        CHECK(rel_error(acc, twice) < 1e-6);
      }
}

TEST_CASE("half weights: grouped_linear and the embedding gather take bf16 tables") {
  Rng rng(5);
  const std::int64_t E = 3, N = 50, K = 40;
  const Tensor w = test::random_tensor({E, N, K}, rng, 0.1f);
  const Tensor bias = test::random_tensor({E, N}, rng);
  const std::vector<std::int64_t> off{0, 7, 7, 20};  // expert 1 receives no rows
  const Tensor a = test::random_tensor({20, K}, rng);
  Tensor got = Tensor::empty({20, N}), want = Tensor::empty({20, N});
  cpu::grouped_linear(a, w.to(DType::bf16), &bias, off, got);
  cpu::grouped_linear(a, rounded(w, DType::bf16), &bias, off, want);
  CHECK(rel_error(got, want) < 1e-6);

  const Tensor table = test::random_tensor({9, 12}, rng);
  const std::vector<std::int64_t> ids{4, 0, 8, 4};
  Tensor e16 = Tensor::empty({4, 12}), e32 = Tensor::empty({4, 12});
  cpu::embedding_forward(table.to(DType::bf16), ids, e16);
  cpu::embedding_forward(rounded(table, DType::bf16), ids, e32);
  CHECK(bitwise_equal(e16, e32));  // widening is exact
}

TEST_CASE("half weights: a decoder built in a bf16 ParameterStorageScope loads an fp32 checkpoint, holds ~2 bytes per "
          "matrix weight, and computes the rounded model's logits; its backward is refused") {
  Rng rng(7);
  nn::DecoderConfig c;
  c.vocab = 31;
  c.hidden = 32;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.ffn = 48;
  nn::DecoderLM<> ref(c);
  test::randomize(ref.parameters(), rng, 0.2f);
  const auto dir = test::tmp_root() / "half_weights";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "decoder.safetensors").string();
  io::save_hf(path, ref.parameters());

  nn::DecoderLM<> rounded_ref(c);  // the fp32 model with its matrix weights rounded to bf16
  io::load_hf(rounded_ref.parameters(), path);
  for (Parameter* p : rounded_ref.parameters())
    if (p->value.dim() >= 2) p->value.copy_from(rounded(p->value, DType::bf16));

  std::optional<nn::DecoderLM<>> half;
  {
    ParameterStorageScope scope({DType::bf16, /*grads=*/false});
    half.emplace(c);
  }
  CHECK(parameter_storage().weights == DType::f32);  // the scope restored the default
  CHECK(parameter_storage().grads);
  io::LoadOptions opt;
  opt.release_pages = true;
  io::load_hf(half->parameters(), io::HFCheckpoint::open(path), opt);
  for (Parameter* p : half->parameters()) {
    INFO(p->name);
    CHECK(p->value.dtype() == (p->value.dim() >= 2 ? DType::bf16 : DType::f32));
    CHECK_FALSE(p->grad.defined());
  }

  std::vector<std::int64_t> ids(2 * 6);
  for (auto& i : ids) i = std::int64_t(rng.next_u32() % 31);
  auto cache_half = half->make_cache(2, 6);
  auto cache_ref = rounded_ref.make_cache(2, 6);
  const Tensor got = half->forward_cached(ids, 2, 6, cache_half);       // (12, V)
  const Tensor want = rounded_ref.forward_cached(ids, 2, 6, cache_ref);  // (12, V)
  CHECK(rel_error(got, want) < 1e-5);

  // The released pages read back from the file: the checkpoint is intact.
  const io::HFCheckpoint ck = io::HFCheckpoint::open(path);
  const std::string name = ref.parameters()[0]->name;
  ck.release_pages(name);
  CHECK(bitwise_equal(ck.get(name), ref.parameters()[0]->value));

  // Training needs fp32 weights with gradients: the backward says so.
  const Tensor hn = test::random_tensor({3, c.hidden}, rng);
  CHECK_THROWS_WITH_AS(half->head_backward(test::random_tensor({3, c.vocab}, rng), hn),
                       doctest::Contains("held in bf16 for inference"), Error);
}

TEST_CASE("half weights: SparseMoE takes bf16 activations (computed in fp32, returned in bf16) and bf16 experts") {
  using Block = SparseMoE<Router<TopK<2>>, Expert<GatedMLP<SiLU>>>;
  Rng rng(9);
  const std::int64_t H = 24, F = 40, T = 10;
  Block ref(H, F, 4);
  ref.reset_parameters(rng);
  const Tensor x = test::random_tensor({T, H}, rng);
  const Tensor xh = x.to(DType::bf16);

  // bf16 activations into the fp32 block: y is bf16(y of the widened x); dx likewise
  const Block::Output o32 = ref.forward(xh.to(DType::f32), {1, false});
  const Tensor dy = test::random_tensor({T, H}, rng);
  const Tensor dx32 = ref.backward(dy.to(DType::bf16).to(DType::f32));
  const Block::Output o16 = ref.forward(xh, {1, false});
  CHECK(o16.y.dtype() == DType::bf16);
  CHECK(bitwise_equal(o16.y, o32.y.to(DType::bf16)));
  const Tensor dx16 = ref.backward(dy.to(DType::bf16));
  CHECK(dx16.dtype() == DType::bf16);
  CHECK(bitwise_equal(dx16, dx32.to(DType::bf16)));

  // bf16 expert weights: the block built in the scope equals the fp32 block with its expert weights rounded
  std::optional<Block> half;
  {
    ParameterStorageScope scope({DType::bf16, /*grads=*/false});
    half.emplace(H, F, 4);
  }
  Block rounded_ref(H, F, 4);
  const ParameterList src = ref.parameters(), dst = half->parameters(), rr = rounded_ref.parameters();
  for (std::size_t i = 0; i < src.size(); ++i) {
    copy_converted(dst[i]->value, src[i]->value);
    rr[i]->value.copy_from(rounded(src[i]->value, dst[i]->value.dtype()));
  }
  CHECK(half->experts().gate_up_proj.value.dtype() == DType::bf16);
  CHECK(half->router().weight.value.dtype() == DType::f32);  // routers stay fp32
  const Tensor y = half->forward(x, {1, false}).y;
  CHECK(rel_error(y, rounded_ref.forward(x, {1, false}).y) < 1e-6);
  CHECK(rel_error(y, ref.forward(x, {1, false}).y) < 2 * kBf16Unit);  // two products in series
  CHECK_THROWS_WITH_AS(half->backward(dy), doctest::Contains("for inference"), Error);
}

TEST_CASE("half weights: Cpu::convert (the layers' door for 16-bit activations) rounds as Tensor::to, contiguous") {
  Rng rng(12);
  const Tensor x = test::random_tensor({6, 10}, rng);
  const Tensor view = x.slice(1, 2, 9);  // (6, 7), strided
  for (const DType d : {DType::bf16, DType::f16}) {
    const Tensor c = backend::Cpu::convert(view, d);
    CHECK(c.dtype() == d);
    CHECK(c.is_contiguous());
    CHECK(bitwise_equal(c, view.contiguous().to(d)));
    CHECK(bitwise_equal(backend::Cpu::convert(c, DType::f32), c.to(DType::f32)));  // widening is exact
  }
  const Tensor same = backend::Cpu::convert(view, DType::f32);
  CHECK(same.is_contiguous());
  CHECK(bitwise_equal(same, view.contiguous()));
  CHECK(backend::Cpu::convert(x, DType::f32).raw() == x.raw());  // already f32 and contiguous: no copy
  // the block's door refuses other dtypes, naming the tensor and the dtypes it takes
  SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>> block(10, 8, 4);
  CHECK_THROWS_WITH_AS(block.forward(x.to(DType::f64)),
                       doctest::Contains("x has dtype f64 but expected f32, bf16 or f16"), Error);
}

TEST_CASE("half weights: a Linear built in an f16 scope takes f16 activations and refuses its backward") {
  Rng rng(13);
  nn::Linear<> ref("l", 20, 30, /*bias=*/true);
  ParameterList rp;
  ref.collect(rp);
  test::randomize(rp, rng);
  std::optional<nn::Linear<>> half;
  {
    ParameterStorageScope scope({DType::f16, /*grads=*/true});
    half.emplace("l", 20, 30, true);
  }
  CHECK(half->weight.value.dtype() == DType::f16);
  CHECK(half->bias.value.dtype() == DType::f32);
  copy_converted(half->weight.value, ref.weight.value);
  half->bias.value.copy_from(ref.bias.value);
  const Tensor x = test::random_tensor({5, 20}, rng).to(DType::f16);
  const Tensor y = half->apply(x);
  CHECK(y.dtype() == DType::f16);
  nn::Linear<> rounded_ref("l", 20, 30, true);
  rounded_ref.weight.value.copy_from(rounded(ref.weight.value, DType::f16));
  rounded_ref.bias.value.copy_from(ref.bias.value);
  CHECK(bitwise_equal(y, rounded_ref.apply(x.to(DType::f32)).to(DType::f16)));
  half->forward(x);
  CHECK_THROWS_WITH_AS(half->backward(y), doctest::Contains("held in f16 for inference"), Error);
  CHECK_THROWS_WITH_AS(ParameterStorageScope({DType::i32, true}), doctest::Contains("must be f32, bf16 or f16"), Error);
}

TEST_CASE("inference: the vision tower without kept activations (dense and sparse MLPs) gives the same features and "
          "refuses a backward") {
  Rng rng(17);
  nn::VisionConfig c;
  c.hidden = 8;
  c.layers = 3;
  c.heads = 2;
  c.ffn = 16;
  c.image_size = 8;
  c.patch_size = 4;
  nn::ClipVision<> m(c);
  test::randomize(m.parameters(), rng);
  m.layers[1].mlp.upcycle(4, 2, rng);  // one sparse layer among dense ones
  const Tensor px = test::random_tensor({2, 3, 8, 8}, rng);
  const Tensor kept = m.forward(px, true, /*keep_activations=*/true).features.clone();
  const Tensor dropped = m.forward(px, true, /*keep_activations=*/false).features;
  CHECK(bitwise_equal(kept, dropped));
  CHECK_THROWS_AS(m.backward(test::random_tensor(dropped.shape(), rng)), Error);  // nothing saved to differentiate
}
