// safetensors read/write: round trips, the shipped Hugging Face fixtures, every malformed-file class the reader
// promises to reject, truncation/corruption sweeps (fixed seeds), and the atomic-write guarantees of save().
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <sys/resource.h>

#include "cumo/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
using cumo::DType;
using cumo::Shape;
using cumo::Tensor;
using cumo::io::SafeTensors;
using Bytes = std::vector<std::uint8_t>;

const std::string kFixtures = CUMO_FIXTURE_DIR;
const std::string kMixtral = kFixtures + "/moe_mixtral_h16_f32_e8_k2_t10.safetensors";

// A fresh, empty directory per test case: ctest may run the cases in parallel.
fs::path scratch(const std::string& name) {
  const fs::path d = cumo::test::tmp_root() / ("safetensors_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

Bytes read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE(f);
  return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& p, const Bytes& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

// [u64 N][header][data_size bytes of `fill`]
Bytes make_file(const std::string& header, std::size_t data_size, std::uint8_t fill = 0) {
  const std::uint64_t n = header.size();
  Bytes b(8 + header.size() + data_size, fill);
  std::memcpy(b.data(), &n, 8);
  if (!header.empty()) std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

SafeTensors parse_bytes(Bytes b) {
  return SafeTensors::parse(std::make_shared<const Bytes>(std::move(b)), "test.safetensors");
}

// The bytes must be rejected with a cumo::Error whose message names the source and contains `needle`.
void expect_error(const Bytes& b, const std::string& needle) {
  CAPTURE(needle);
  try {
    (void)parse_bytes(b);
    FAIL("accepted a malformed file");
  } catch (const cumo::Error& e) {
    const std::string msg = e.what();
    CAPTURE(msg);
    CHECK(msg.find("test.safetensors") != std::string::npos);
    CHECK(msg.find(needle) != std::string::npos);
  }
}
void expect_error(const std::string& header, std::size_t data_size, const std::string& needle) {
  expect_error(make_file(header, data_size), needle);
}

Tensor from_bits(Shape shape, DType dtype, const void* bits) {
  Tensor t = Tensor::empty(shape, dtype);
  if (t.nbytes()) std::memcpy(t.raw(), bits, t.nbytes());
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  const Tensor ca = a.contiguous(), cb = b.contiguous();
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         (a.nbytes() == 0 || std::memcmp(ca.raw(), cb.raw(), a.nbytes()) == 0);
}

bool no_temporaries(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) return false;
  return true;
}

// Parse, and if the file is accepted, read every tensor both ways and round-trip it through serialize():
// what the fuzzer does, as a plain test. Returns whether the bytes were accepted; any exception other than
// cumo::Error escapes and fails the test.
bool accept_and_read(const Bytes& b) {
  try {
    SafeTensors st = parse_bytes(b);
    std::vector<std::pair<std::string, Tensor>> all;
    double sink = 0;
    for (const auto& name : st.names()) {
      Tensor t = st.get(name);
      Tensor f = st.get_f32(name);
      const float* p = f.data<float>();
      for (std::int64_t i = 0; i < f.numel(); ++i) sink += double(p[i]);
      all.emplace_back(name, t);
    }
    (void)sink;
    SafeTensors again = parse_bytes(cumo::io::serialize(all, st.metadata()));
    CHECK(again.size() == st.size());
    CHECK(again.metadata() == st.metadata());
    for (const auto& [name, t] : all) CHECK(same_bytes(again.get(name), t));
    return true;
  } catch (const cumo::Error&) {
    return false;
  }
}

const std::string kOne = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

}  // namespace

// ---- round trips ---------------------------------------------------------------------------------------------

TEST_CASE("safetensors: save then open round-trips every dtype, metadata, a scalar and a 0-element tensor") {
  const fs::path dir = scratch("roundtrip");
  const float f32v[6] = {1.5f, -2.25f, 0.f, 3e-8f, -1e30f, 7.f};
  const std::uint16_t f16v[4] = {0x3C00, 0xC000, 0x7BFF, 0x0001};
  const std::uint16_t bf16v[4] = {0x3F80, 0xC000, 0x7F80, 0x0001};
  const double f64v[3] = {1.0 / 3.0, -1e300, 5e-324};
  const std::int64_t i64v[2] = {std::numeric_limits<std::int64_t>::min(), 123456789012345LL};
  const std::int32_t i32v[5] = {-1, 0, 1, 2147483647, -2147483647 - 1};
  const float scalar = 42.f;
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"w.f32", from_bits({2, 3}, DType::f32, f32v)},
      {"w.f16", from_bits({4}, DType::f16, f16v)},
      {"w.bf16", from_bits({2, 2}, DType::bf16, bf16v)},
      {"w.f64", from_bits({3}, DType::f64, f64v)},
      {"ids.i64", from_bits({1, 2}, DType::i64, i64v)},
      {"ids.i32", from_bits({5}, DType::i32, i32v)},
      {"empty", Tensor::empty({0, 4}, DType::f32)},
      {"scalar", from_bits(Shape{}, DType::f32, &scalar)},
  };
  const std::map<std::string, std::string> meta = {{"kind", "test"}, {"utf8", "h\xC3\xA9llo \xE2\x9C\x93"},
                                                   {"json", R"({"a": [1, 2]})"}};
  const std::string path = (dir / "all.safetensors").string();
  cumo::io::save(path, tensors, meta);
  CHECK(no_temporaries(dir));

  SafeTensors st = SafeTensors::open(path);
  CHECK(st.path() == path);
  CHECK(st.metadata() == meta);
  CHECK(st.size() == tensors.size());
  for (const auto& [name, t] : tensors) {
    CAPTURE(name);
    REQUIRE(st.contains(name));
    CHECK(st.info(name).dtype == t.dtype());
    CHECK(st.info(name).shape == t.shape());
    CHECK(same_bytes(st.get(name), t));
  }
  CHECK(st.get("empty").numel() == 0);
  CHECK(st.get("empty").shape() == Shape{0, 4});
  CHECK(st.get("scalar").dim() == 0);
  CHECK(st.get_f32("scalar").data<float>()[0] == 42.f);

  // The layout promises: data section 8-byte aligned, every tensor aligned for its dtype, 8-byte types first
  // (in the caller's order), names() in data order.
  CHECK((8 + st.header_bytes()) % 8 == 0);
  for (const auto& name : st.names()) CHECK(st.info(name).begin % cumo::size_of(st.info(name).dtype) == 0);
  const auto names = st.names();
  REQUIRE(names.size() == 8);
  CHECK(names[0] == "w.f64");
  CHECK(names[1] == "ids.i64");
  for (std::size_t i = 1; i < names.size(); ++i) CHECK(st.info(names[i - 1]).end == st.info(names[i]).begin);

  // serialize() is exactly what save() wrote.
  CHECK(cumo::io::serialize(tensors, meta) == read_bytes(path));
}

TEST_CASE("safetensors: save writes strided views as contiguous data") {
  const fs::path dir = scratch("strided");
  Tensor base = Tensor::empty({3, 4}, DType::f32);
  for (int i = 0; i < 12; ++i) base.data<float>()[i] = float(i);
  const Tensor col = base.select(1, 2);       // (3,) stride 4: 2, 6, 10
  const Tensor rows = base.slice(0, 1, 3);    // (2, 4), contiguous rows 1..2
  const std::string path = (dir / "s.safetensors").string();
  cumo::io::save(path, {{"col", col}, {"rows", rows}});
  SafeTensors st = SafeTensors::open(path);
  const Tensor c = st.get("col");
  CHECK(c.shape() == Shape{3});
  CHECK(c.at<float>(0) == 2.f);
  CHECK(c.at<float>(1) == 6.f);
  CHECK(c.at<float>(2) == 10.f);
  CHECK(st.get("rows").at<float>(1, 3) == 11.f);
}

TEST_CASE("safetensors: get_f32 converts bf16, f16, f64, i64 and i32 to the known float values") {
  const std::uint16_t bf16v[6] = {0x3F80, 0xC000, 0x7F80, 0xFF80, 0x0001, 0x3EAB};
  const std::uint16_t f16v[7] = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0x3555, 0x8000};
  const double f64v[2] = {1.0 / 3.0, 1e40};
  const std::int64_t i64v[3] = {-5, 16777217, 0};
  const std::int32_t i32v[2] = {7, -8};
  const Bytes file = cumo::io::serialize({{"bf16", from_bits({6}, DType::bf16, bf16v)},
                                          {"f16", from_bits({7}, DType::f16, f16v)},
                                          {"f64", from_bits({2}, DType::f64, f64v)},
                                          {"i64", from_bits({3}, DType::i64, i64v)},
                                          {"i32", from_bits({2}, DType::i32, i32v)}});
  SafeTensors st = parse_bytes(file);

  const Tensor b = st.get_f32("bf16");
  CHECK(b.dtype() == DType::f32);
  CHECK(b.shape() == Shape{6});
  CHECK(b.at<float>(0) == 1.f);
  CHECK(b.at<float>(1) == -2.f);
  CHECK(b.at<float>(2) == std::numeric_limits<float>::infinity());
  CHECK(b.at<float>(3) == -std::numeric_limits<float>::infinity());
  CHECK(b.at<float>(4) == std::ldexp(1.f, -133));  // smallest bf16 subnormal
  CHECK(b.at<float>(5) == 0.333984375f);          // bf16 nearest to 1/3

  const Tensor h = st.get_f32("f16");
  CHECK(h.at<float>(0) == 1.f);
  CHECK(h.at<float>(1) == -2.f);
  CHECK(h.at<float>(2) == 65504.f);               // largest f16
  CHECK(h.at<float>(3) == std::ldexp(1.f, -24));  // smallest f16 subnormal
  CHECK(h.at<float>(4) == std::numeric_limits<float>::infinity());
  CHECK(h.at<float>(5) == 0.333251953125f);       // f16 nearest to 1/3
  CHECK(h.at<float>(6) == 0.f);
  CHECK(std::signbit(h.at<float>(6)));

  const Tensor d = st.get_f32("f64");
  CHECK(d.at<float>(0) == float(1.0 / 3.0));
  CHECK(std::isinf(d.at<float>(1)));
  const Tensor l = st.get_f32("i64");
  CHECK(l.at<float>(0) == -5.f);
  CHECK(l.at<float>(1) == 16777216.f);  // rounded to the nearest float
  CHECK(st.get_f32("i32").at<float>(1) == -8.f);
  // get() keeps the stored dtype.
  CHECK(st.get("bf16").dtype() == DType::bf16);
  CHECK(st.get("bf16").at<cumo::bf16_t>(0).bits == 0x3F80);
}

// ---- zero copy, alignment, lifetime --------------------------------------------------------------------------

TEST_CASE("safetensors: aligned tensors are zero-copy views that keep the mapping alive and writes never reach the file") {
  const fs::path dir = scratch("views");
  const std::string path = (dir / "v.safetensors").string();
  cumo::io::save(path, {{"x", Tensor::full<float>({64}, 3.f)}});
  Tensor view;
  {
    SafeTensors st = SafeTensors::open(path);
    const Tensor a = st.get("x"), b = st.get("x");
    CHECK(a.raw() == b.raw());  // same mapped bytes, no copy
    CHECK(st.get_f32("x").raw() == a.raw());
    view = a;
  }  // the SafeTensors object is gone; the view still owns the mapping
  CHECK(view.at<float>(63) == 3.f);
  view.at<float>(0) = -1.f;  // private copy-on-write page: legal, and invisible to the file
  CHECK(view.at<float>(0) == -1.f);
  CHECK(SafeTensors::open(path).get("x").at<float>(0) == 3.f);
}

TEST_CASE("safetensors: misaligned data (legal in the format) is copied instead of read through a bad pointer") {
  // Pad the header (spaces are legal) so the data section starts at 8 + N = 2 (mod 4): the F32 tensor at offset 0
  // is then misaligned in memory. Likewise an odd data start for F16.
  auto padded = [](std::string h, std::size_t mod, std::size_t want) {
    while ((8 + h.size()) % mod != want) h += ' ';
    return h;
  };
  {
    Bytes b = make_file(padded(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})", 4, 2), 12);
    const float vals[3] = {1.25f, -7.f, 1e-20f};
    std::memcpy(b.data() + b.size() - 12, vals, 12);
    SafeTensors st = parse_bytes(b);
    const Tensor x = st.get("x");
    CHECK(reinterpret_cast<std::uintptr_t>(x.raw()) % 4 == 0);
    CHECK(x.at<float>(0) == 1.25f);
    CHECK(x.at<float>(1) == -7.f);
    CHECK(x.at<float>(2) == 1e-20f);
    CHECK(st.get_f32("x").at<float>(2) == 1e-20f);
  }
  {
    Bytes b = make_file(padded(R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", 2, 1), 4);
    const std::uint16_t vals[2] = {0x3C00, 0xC000};
    std::memcpy(b.data() + b.size() - 4, vals, 4);
    SafeTensors st = parse_bytes(b);
    CHECK(reinterpret_cast<std::uintptr_t>(st.get("h").raw()) % 2 == 0);
    CHECK(st.get("h").at<cumo::f16_t>(1).bits == 0xC000);
    CHECK(st.get_f32("h").at<float>(0) == 1.f);
    CHECK(st.get_f32("h").at<float>(1) == -2.f);
  }
}

// ---- the shipped fixtures (made by PyTorch + safetensors) ----------------------------------------------------

TEST_CASE("safetensors: reads the Hugging Face-made fixtures (metadata, dtypes, shapes, values)") {
  SafeTensors st = SafeTensors::open(kMixtral);
  REQUIRE(st.metadata().count("kind"));
  CHECK(st.metadata().at("kind") == "moe_swiglu");
  const auto& gi = st.info("param.gate.weight");
  CHECK(gi.dtype == DType::f32);
  CHECK(gi.shape == Shape{8, 16});
  const Tensor g = st.get("param.gate.weight");
  CHECK(g.shape() == Shape{8, 16});
  CHECK(g.at<float>(0, 0) == doctest::Approx(-0.017662016674876213).epsilon(1e-7));
  CHECK(g.at<float>(0, 3) == doctest::Approx(0.20102299749851227).epsilon(1e-7));
  double sum = 0;
  for (int i = 0; i < 128; ++i) sum += g.data<float>()[i];
  CHECK(sum == doctest::Approx(-0.2562963115051389).epsilon(1e-6));
  CHECK(st.info("param.experts.gate_up_proj").shape == Shape{8, 64, 16});
  CHECK(st.names().front() == "grad.experts.down_proj");
  CHECK(st.names().back() == "param.gate.weight");

  SafeTensors m = SafeTensors::open(kFixtures + "/mistral_h32_l2_v97.safetensors");
  const Tensor ids = m.get("input.input_ids");
  CHECK(ids.dtype() == DType::i64);
  CHECK(ids.shape() == Shape{2, 12});
  CHECK(ids.at<std::int64_t>(0, 0) == 88);
  CHECK(ids.at<std::int64_t>(0, 3) == 62);
  CHECK(m.get("input.labels").at<std::int64_t>(0, 0) == -100);
  CHECK(m.get_f32("input.labels").at<float>(0, 0) == -100.f);

  // Every fixture opens and every tensor reads, in data order, tiling the data section.
  int files = 0;
  for (const auto& e : fs::directory_iterator(kFixtures)) {
    if (e.path().extension() != ".safetensors") continue;
    CAPTURE(e.path().string());
    SafeTensors f = SafeTensors::open(e.path().string());
    CHECK(f.metadata().count("kind") == 1);
    std::size_t at = 0;
    for (const auto& name : f.names()) {
      const auto& ti = f.info(name);
      CHECK(ti.begin == at);
      at = ti.end;
      CHECK(f.get_f32(name).numel() == ti.shape.numel());
    }
    CHECK(at == f.data_bytes());
    ++files;
  }
  CHECK(files >= 10);
}

TEST_CASE("safetensors: info() on a missing tensor names the tensor, the file, and similar names") {
  SafeTensors st = SafeTensors::open(kMixtral);
  CHECK_FALSE(st.contains("gate.weight"));
  CHECK(st.contains("param.gate.weight"));
  try {
    (void)st.info("gate.weight");
    FAIL("no error");
  } catch (const cumo::Error& e) {
    const std::string msg = e.what();
    CAPTURE(msg);
    CHECK(msg.find("'gate.weight'") != std::string::npos);
    CHECK(msg.find("moe_mixtral_h16_f32_e8_k2_t10.safetensors") != std::string::npos);
    CHECK(msg.find("'param.gate.weight'") != std::string::npos);  // the suggestion
  }
  CHECK_THROWS_AS((void)st.get("nope"), cumo::Error);
  CHECK_THROWS_AS((void)st.get_f32("nope"), cumo::Error);
}

TEST_CASE("safetensors: open() of a missing file, a directory or a short file gives cumo::Error") {
  const fs::path dir = scratch("open_errors");
  CHECK_THROWS_WITH_AS((void)SafeTensors::open((dir / "missing.safetensors").string()),
                       doctest::Contains("cannot open"), cumo::Error);
  CHECK_THROWS_WITH_AS((void)SafeTensors::open(dir.string()), doctest::Contains("not a regular file"), cumo::Error);
  write_bytes(dir / "empty.safetensors", {});
  CHECK_THROWS_WITH_AS((void)SafeTensors::open((dir / "empty.safetensors").string()),
                       doctest::Contains("too short"), cumo::Error);
  CHECK_THROWS_AS((void)SafeTensors::parse(nullptr), cumo::Error);
}

// ---- malformed files: each class of damage gives cumo::Error with a message that says which ------------------

TEST_CASE("safetensors: framing errors (short file, header past the end, absurd header size) give cumo::Error") {
  expect_error(Bytes{}, "too short");
  expect_error(Bytes{1, 0, 0}, "too short");
  expect_error(Bytes{2, 0, 0, 0, 0, 0, 0}, "too short");
  Bytes past = make_file(kOne, 8);
  const std::uint64_t too_long = past.size();  // header claims more than the whole file
  std::memcpy(past.data(), &too_long, 8);
  expect_error(past, "runs past the end of the file");
  Bytes huge = make_file(kOne, 8);
  const std::uint64_t absurd = 100'000'001;
  std::memcpy(huge.data(), &absurd, 8);
  expect_error(huge, "exceeds the format's limit");
  const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
  std::memcpy(huge.data(), &max, 8);
  expect_error(huge, "exceeds the format's limit");
  expect_error(make_file("", 0), "does not start with '{'");
  expect_error(make_file(" " + kOne, 8), "does not start with '{'");
}

TEST_CASE("safetensors: non-JSON, non-object, over-nested, invalid UTF-8 and duplicate-key headers give cumo::Error") {
  expect_error("{not json", 0, "not valid JSON");
  expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} trailing)", 8, "not valid JSON");
  expect_error(std::string("{\"a\xff\":1}"), 0, "not valid JSON");
  expect_error(R"({"a":{"dtype":"F32)" + std::string(1, '\0') + R"(","shape":[],"data_offsets":[0,4]}})", 4,
               "not valid JSON");
  expect_error(R"({"a":[1]})", 0, "tensor 'a': entry must be a JSON object");
  expect_error(R"({"a":{"x":[[[[[[1]]]]]]}})", 0, "nests deeper");
  expect_error(R"({"a":{"x":{"y":{}}}})", 0, "nests deeper");
  expect_error(R"({"a":{"shape":)" + std::string(100000, '['), 0, "nests deeper");
  // arrays longer than any shape are cut off while parsing, before they cost memory
  std::string long_shape = R"({"a":{"dtype":"F32","shape":[0)";
  for (int i = 0; i < 100000; ++i) long_shape += ",0";
  expect_error(long_shape + R"(],"data_offsets":[0,0]}})", 0, "more than 8 dimensions");
  expect_error(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0,0,0,0,0,0,0,0,0]}})", 0, "'data_offsets' holds an array longer");
  expect_error(R"({"a":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8, "nests deeper");
  // top-level values that are not objects never get past the first byte check
  expect_error("[1,2]", 0, "does not start with '{'");
  expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
               16, "duplicate tensor name 'a'");
  expect_error(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8, "duplicate key 'dtype'");
  expect_error(R"({"__metadata__":{"k":"1","k":"2"}})", 0, "duplicate key 'k'");
}

TEST_CASE("safetensors: missing or ill-typed dtype, shape and data_offsets give cumo::Error naming the tensor") {
  expect_error(R"({"t":[1,2]})", 0, "tensor 't': entry must be a JSON object");
  expect_error(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8, "tensor 't': missing field 'dtype'");
  expect_error(R"({"t":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8, "'dtype' must be a string");
  expect_error(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", 8, "tensor 't': missing field 'shape'");
  expect_error(R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8, "'shape' must be an array");
  expect_error(R"({"t":{"dtype":"F32","shape":[2]}})", 8, "tensor 't': missing field 'data_offsets'");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":{"a":0}}})", 8, "'data_offsets' must be an array");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, "'data_offsets' must be an array");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,16]}})", 16, "'data_offsets' must be an array");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", 8, "non-negative integers");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}})", 8, "non-negative integers");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8, "non-negative integers");
  expect_error(R"({"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 2, "tensor 't' has dtype 'U8', which cumo does not support");
  expect_error(R"({"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8, "'F33', which is not a safetensors dtype");
  expect_error(R"({"t":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", 8, "not a safetensors dtype");
}

TEST_CASE("safetensors: negative, fractional, oversized and overflowing shapes give cumo::Error") {
  expect_error(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "shape entry 0 must be a non-negative integer");
  expect_error(R"({"t":{"dtype":"F32","shape":[2,1.5],"data_offsets":[0,8]}})", 8, "shape entry 1 must be a non-negative integer");
  expect_error(R"({"t":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}})", 4, "shape entry 0");
  expect_error(R"({"t":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8, "shape entry 0");
  expect_error(R"({"t":{"dtype":"F32","shape":[null],"data_offsets":[0,8]}})", 8, "shape entry 0");
  expect_error(R"({"t":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]}})", 8, "shape entry 0");
  expect_error(R"({"t":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}})", 4, "at most 8");
  // 2^32 * 2^32 = 2^64 overflows; with a zero extent the tensor would be empty, but strides would still overflow.
  expect_error(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0, "overflows");
  expect_error(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", 0, "overflows");
  // numel fits but numel * 8 bytes does not
  expect_error(R"({"t":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0, "needs");
}

TEST_CASE("safetensors: bad offsets (begin > end, past the end, wrong size, overlap, hole, trailing bytes) give cumo::Error") {
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, "begin > end");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4, "run past the end of the data section");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}})", 8, "non-negative integers");
  expect_error(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, "needs 3 x 4 bytes");
  expect_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}})", 12, "needs 2 x 4 bytes");
  expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
               12, "overlaps tensor 'a'");
  expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
               8, "overlaps");
  expect_error(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
               16, "overlaps");
  expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
               20, "belong to no tensor");
  expect_error(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12, "belong to no tensor");
  expect_error(kOne, 9, "1 trailing bytes");
  // ...while zero-sized tensors at a boundary, an empty header and padding spaces are all fine
  CHECK(parse_bytes(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"BF16","shape":[0,3],"data_offsets":[8,8]}})", 8)).size() == 2);
  CHECK(parse_bytes(make_file("{}", 0)).size() == 0);
  CHECK(parse_bytes(make_file(kOne + "      ", 8)).size() == 1);
}

TEST_CASE("safetensors: __metadata__ that is not an object of strings gives cumo::Error") {
  expect_error(R"({"__metadata__":{"k":1}})", 0, "__metadata__ value for key 'k' must be a string");
  expect_error(R"({"__metadata__":{"k":null}})", 0, "must be a string");
  expect_error(R"({"__metadata__":{"k":["a"]}})", 0, "must be a string");
  expect_error(R"({"__metadata__":"x"})", 0, "__metadata__ must be an object");
  expect_error(R"({"__metadata__":["x"]})", 0, "__metadata__ must be an object");
  CHECK(parse_bytes(make_file(R"({"__metadata__":{"format":"pt"}})", 0)).metadata().at("format") == "pt");
}

// ---- sweeps over a real file (fixed seeds: reproducible, a few thousand cases, well under a second) ----------

TEST_CASE("safetensors: every truncation of a real fixture throws cumo::Error, never crashes") {
  const Bytes full = read_bytes(kMixtral);
  REQUIRE(accept_and_read(full));
  std::uint64_t n = 0;
  std::memcpy(&n, full.data(), 8);
  // every length through the header and the first data bytes, then a stride through the data, then the tail
  std::vector<std::size_t> lengths;
  for (std::size_t len = 0; len < 8 + n + 256; ++len) lengths.push_back(len);
  for (std::size_t len = 8 + n + 256; len < full.size(); len += 97) lengths.push_back(len);
  for (std::size_t len = full.size() - 64; len < full.size(); ++len) lengths.push_back(len);
  int rejected = 0;
  for (const std::size_t len : lengths) {
    CAPTURE(len);
    // The reader requires the tensors to cover the data section exactly, so any shorter file must be rejected.
    CHECK_FALSE(accept_and_read(Bytes(full.begin(), full.begin() + std::ptrdiff_t(len))));
    ++rejected;
  }
  CHECK(rejected > 2000);

  // The same through open() and the mmap path.
  const fs::path dir = scratch("truncate");
  for (const std::size_t len : {std::size_t(0), std::size_t(7), std::size_t(8), std::size_t(9), std::size_t(8 + n - 1),
                                std::size_t(8 + n), std::size_t(8 + n + 3), full.size() / 2, full.size() - 1}) {
    CAPTURE(len);
    const fs::path p = dir / (std::to_string(len) + ".safetensors");
    write_bytes(p, Bytes(full.begin(), full.begin() + std::ptrdiff_t(len)));
    CHECK_THROWS_AS((void)SafeTensors::open(p.string()), cumo::Error);
  }
}

TEST_CASE("safetensors: random byte corruptions of a real fixture either parse or throw cumo::Error") {
  const Bytes full = read_bytes(kMixtral);
  std::uint64_t n = 0;
  std::memcpy(&n, full.data(), 8);
  std::mt19937_64 rng(20240601);
  int accepted = 0, rejected = 0;
  for (int c = 0; c < 3000; ++c) {
    Bytes b = full;
    const int flips = 1 + int(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      // Mostly in the length prefix and the header, where the parser's decisions are; sometimes anywhere.
      const std::size_t pos = rng() % 4 ? rng() % (8 + n) : rng() % b.size();
      b[pos] = rng() % 2 ? std::uint8_t(rng()) : std::uint8_t(b[pos] ^ (1u << (rng() % 8)));
    }
    (accept_and_read(b) ? accepted : rejected)++;
  }
  CHECK(accepted + rejected == 3000);
  CHECK(rejected > 0);
  CHECK(accepted > 0);  // flips inside string values / the data section leave valid files
}

TEST_CASE("safetensors: replacing header numbers with hostile values either parses or throws cumo::Error") {
  // Byte flips mostly break the JSON syntax; this sweep keeps the JSON valid and attacks the semantic checks:
  // every number in the header (shapes, offsets) replaced by a hostile token, the length prefix fixed up.
  const Bytes full = read_bytes(kMixtral);
  std::uint64_t n = 0;
  std::memcpy(&n, full.data(), 8);
  const std::string header(full.begin() + 8, full.begin() + 8 + std::ptrdiff_t(n));
  const Bytes data(full.begin() + 8 + std::ptrdiff_t(n), full.end());
  // [pos, len) of every digit run inside "shape":[...] and "data_offsets":[...] (metadata strings hold digits too)
  std::vector<std::pair<std::size_t, std::size_t>> numbers;
  for (const std::string key : {"\"shape\":", "\"data_offsets\":"}) {
    for (std::size_t at = header.find(key); at != std::string::npos; at = header.find(key, at + 1)) {
      const std::size_t close = header.find(']', at);
      for (std::size_t i = at + key.size(); i < close;) {
        if (std::isdigit(static_cast<unsigned char>(header[i]))) {
          std::size_t j = i;
          while (j < close && std::isdigit(static_cast<unsigned char>(header[j]))) ++j;
          numbers.emplace_back(i, j - i);
          i = j;
        } else {
          ++i;
        }
      }
    }
  }
  REQUIRE(numbers.size() > 20);
  const std::vector<std::string> hostile = {"-1", "0", "1", "3", "4294967296", "9223372036854775807",
                                            "9223372036854775808", "18446744073709551615", "18446744073709551616",
                                            "1e300", "2.5", "-0", "\"7\"", "null", "[]", "{}", "true", "[1,2]"};
  std::mt19937_64 rng(7);
  int accepted = 0, rejected = 0;
  for (int c = 0; c < 2000; ++c) {
    std::string h = header;
    // one or two distinct numbers, edited back to front so the earlier position stays valid
    std::size_t i0 = rng() % numbers.size(), i1 = rng() % numbers.size();
    if (i0 < i1) std::swap(i0, i1);
    // (splice by concatenation: GCC 12 warns falsely about std::string::replace here)
    auto splice = [&](std::size_t k) {
      h = h.substr(0, numbers[k].first) + hostile[rng() % hostile.size()] + h.substr(numbers[k].first + numbers[k].second);
    };
    splice(i0);
    if (i1 != i0 && rng() % 2) splice(i1);
    Bytes b = make_file(h, 0);
    b.insert(b.end(), data.begin(), data.end());
    (accept_and_read(b) ? accepted : rejected)++;
  }
  CHECK(accepted + rejected == 2000);
  CHECK(rejected > 1000);
}

// ---- atomic save ---------------------------------------------------------------------------------------------

TEST_CASE("safetensors: save into a nonexistent directory throws cumo::Error and creates nothing") {
  const fs::path dir = scratch("nodir");
  const fs::path target = dir / "no" / "such" / "dir" / "x.safetensors";
  CHECK_THROWS_WITH_AS(cumo::io::save(target.string(), {{"x", Tensor::zeros({2})}}),
                       doctest::Contains("cannot create a temporary file"), cumo::Error);
  CHECK_FALSE(fs::exists(dir / "no"));
  CHECK(fs::is_empty(dir));
  CHECK_THROWS_AS(cumo::io::save((dir / "").string(), {{"x", Tensor::zeros({2})}}), cumo::Error);
}

TEST_CASE("safetensors: save replaces an existing file and leaves no temporary behind") {
  const fs::path dir = scratch("replace");
  const std::string path = (dir / "ckpt.safetensors").string();
  cumo::io::save(path, {{"x", Tensor::full<float>({4}, 1.f)}}, {{"step", "1"}});
  cumo::io::save(path, {{"x", Tensor::full<float>({8}, 2.f)}, {"y", Tensor::zeros({2}, DType::bf16)}},
                 {{"step", "2"}});
  SafeTensors st = SafeTensors::open(path);
  CHECK(st.metadata().at("step") == "2");
  CHECK(st.get("x").shape() == Shape{8});
  CHECK(st.get("x").at<float>(7) == 2.f);
  CHECK(no_temporaries(dir));
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);
  // A file saved in the current directory (no directory part) works too.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir);
  cumo::io::save("here.safetensors", {{"x", Tensor::zeros({1})}});
  fs::current_path(cwd);
  CHECK(SafeTensors::open((dir / "here.safetensors").string()).contains("x"));
  CHECK(no_temporaries(dir));
}

TEST_CASE("safetensors: save rejects duplicate names, the reserved __metadata__ name and undefined tensors without touching the disk") {
  const fs::path dir = scratch("reject");
  const std::string path = (dir / "x.safetensors").string();
  CHECK_THROWS_WITH_AS(cumo::io::save(path, {{"a", Tensor::zeros({1})}, {"a", Tensor::zeros({1})}}),
                       doctest::Contains("duplicate tensor name 'a'"), cumo::Error);
  CHECK_THROWS_WITH_AS(cumo::io::save(path, {{"__metadata__", Tensor::zeros({1})}}), doctest::Contains("reserved"),
                       cumo::Error);
  CHECK_THROWS_WITH_AS(cumo::io::save(path, {{"u", Tensor{}}}), doctest::Contains("tensor 'u' is undefined"),
                       cumo::Error);
  CHECK_THROWS_WITH_AS(cumo::io::save(path, {{"bad\xff", Tensor::zeros({1})}}), doctest::Contains("UTF-8"),
                       cumo::Error);
  CHECK(fs::is_empty(dir));
}

TEST_CASE("safetensors: a save that fails mid-write keeps the old file intact and removes its temporary") {
  const fs::path dir = scratch("midwrite");
  const std::string path = (dir / "ckpt.safetensors").string();
  cumo::io::save(path, {{"x", Tensor::full<float>({4}, 1.f)}});
  const Bytes before = read_bytes(path);

  SUBCASE("a tensor that cannot be copied to the host (CUDA tensor, CPU-only build)") {
    if (cumo::detail::cuda_ops().copy) {
      MESSAGE("CUDA backend registered in this binary; skipping");
      return;
    }
    float host[16] = {};
    const Tensor fake_cuda = Tensor::borrow(host, {16}, DType::f32, cumo::Device::cuda);
    // "a" is written first (same element size, caller's order), then the CUDA tensor throws.
    CHECK_THROWS_AS(cumo::io::save(path, {{"a", Tensor::full<float>({1024}, 5.f)}, {"b", fake_cuda}}), cumo::Error);
  }
  SUBCASE("the disk refuses the bytes (file size limit: write() fails with EFBIG)") {
    rlimit old{};
    REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
    rlimit lim = old;
    lim.rlim_cur = 4096;
    auto old_handler = std::signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of being killed
    REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    bool threw = false;
    std::string msg;
    try {
      cumo::io::save(path, {{"big", Tensor::zeros({1 << 16})}});
    } catch (const cumo::Error& e) {
      threw = true;
      msg = e.what();
    }
    setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
    CAPTURE(msg);
    CHECK(threw);
    CHECK(msg.find("failed") != std::string::npos);
  }
  CHECK(read_bytes(path) == before);
  CHECK(no_temporaries(dir));
  CHECK(SafeTensors::open(path).get("x").at<float>(3) == 1.f);
}
