// libFuzzer harness for cumo::io::SafeTensors: any byte string must either parse or throw cumo::Error, never crash,
// read out of bounds, hit undefined behaviour (built with ASan + UBSan) or throw anything else. Accepted inputs
// are also checked for a property: reading every tensor and writing them back with serialize() gives a file that
// parses to the same tensors and metadata.
//
// Built by tests/fuzz/CMakeLists.txt with clang++ -fsanitize=fuzzer,address,undefined. The same file, compiled
// with CUMO_FUZZ_MAKE_SEEDS by the ordinary compiler, is the program that writes the seed corpus and dictionary.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cumo/io/safetensors.hpp"

namespace {

using cumo::Tensor;
using cumo::io::SafeTensors;
using Bytes = std::vector<std::uint8_t>;

// A property violation: abort so libFuzzer records the input as a crash.
[[noreturn]] void violated(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: property violated: %s\n", what);
  std::abort();
}

void run_one(const std::uint8_t* data, std::size_t size) {
  auto bytes = std::make_shared<const Bytes>(data, data + size);
  SafeTensors st;
  try {
    st = SafeTensors::parse(bytes, "fuzz-input");
  } catch (const cumo::Error&) {
    return;  // rejected: the expected outcome for most inputs
  }
  std::vector<std::pair<std::string, Tensor>> all;
  unsigned acc = 0;
  std::size_t covered = 0;
  for (const auto& name : st.names()) {
    const auto& ti = st.info(name);
    if (ti.begin != covered || ti.end < ti.begin) violated("names() not in contiguous data order");
    covered = ti.end;
    const Tensor t = st.get(name);
    const Tensor f = st.get_f32(name);
    if (!(t.shape() == ti.shape) || t.dtype() != ti.dtype || !(f.shape() == ti.shape))
      violated("get/get_f32 shape or dtype differs from info()");
    if (t.nbytes() != ti.end - ti.begin) violated("tensor byte size differs from data_offsets");
    // Touch every byte so ASan sees any read past the mapping.
    const auto* p = static_cast<const unsigned char*>(t.nbytes() ? t.raw() : nullptr);
    for (std::size_t i = 0; i < t.nbytes(); ++i) acc += p[i];
    const float* q = f.numel() ? f.data<float>() : nullptr;
    for (std::int64_t i = 0; i < f.numel(); ++i) {
      std::uint32_t u;
      std::memcpy(&u, q + i, 4);
      acc += u;
    }
    all.emplace_back(name, t);
  }
  if (covered != st.data_bytes()) violated("tensors do not cover the data section");
  (void)acc;

  // Round trip: what we read, written back, reads the same (values bitwise, metadata exactly).
  SafeTensors again;
  try {
    again = SafeTensors::parse(std::make_shared<const Bytes>(cumo::io::serialize(all, st.metadata())), "roundtrip");
  } catch (const cumo::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    violated("serialize() of an accepted file was rejected");
  }
  if (again.size() != st.size() || again.metadata() != st.metadata()) violated("round trip changed names/metadata");
  for (const auto& [name, t] : all) {
    if (!again.contains(name)) violated("round trip lost a tensor");
    const Tensor u = again.get(name);
    if (!(u.shape() == t.shape()) || u.dtype() != t.dtype()) violated("round trip changed a shape or dtype");
    if (t.nbytes() && std::memcmp(u.raw(), t.raw(), t.nbytes()) != 0) violated("round trip changed tensor bytes");
  }
}

}  // namespace

#ifndef CUMO_FUZZ_MAKE_SEEDS

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  run_one(data, size);
  return 0;
}

#else  // ---- seed corpus + dictionary writer ----------------------------------------------------------------------

#include <filesystem>
#include <fstream>

namespace {

void write(const std::filesystem::path& p, const Bytes& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  if (!f) throw cumo::Error("fuzz_safetensors_seeds: cannot write " + p.string());
}

Bytes raw_file(const std::string& header, std::size_t data_size) {
  Bytes b(8 + header.size() + data_size, 0);
  const std::uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

template <class T>
Tensor ramp(cumo::Shape s, T first) {
  Tensor t = Tensor::empty(s, cumo::dtype_v<T>);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<T>()[i] = T(first + T(i));
  return t;
}

}  // namespace

// fuzz_safetensors_seeds <seed-dir> <dict-file>
int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <seed-dir> <dict-file>\n", argv[0]);
    return 2;
  }
  namespace fs = std::filesystem;
  const fs::path dir = argv[1];
  fs::create_directories(dir);
  using cumo::DType;
  Tensor h = Tensor::empty({3}, DType::f16), b = Tensor::empty({2, 2}, DType::bf16);
  for (int i = 0; i < 3; ++i) h.data<cumo::f16_t>()[i] = cumo::to_f16(0.5f * float(i) - 1.f);
  for (int i = 0; i < 4; ++i) b.data<cumo::bf16_t>()[i] = cumo::to_bf16(float(i) * 3.f);

  write(dir / "all_dtypes.safetensors",
        cumo::io::serialize({{"f32", ramp<float>({2, 3}, 1.5f)},
                             {"f16", h},
                             {"bf16", b},
                             {"f64", ramp<double>({2}, -1.0)},
                             {"i64", ramp<std::int64_t>({2}, -100)},
                             {"i32", ramp<std::int32_t>({1, 3}, 7)}},
                            {{"kind", "seed"}, {"format", "pt"}}));
  write(dir / "empty_and_scalar.safetensors",
        cumo::io::serialize({{"empty", Tensor::empty({0, 5})}, {"scalar", ramp<float>(cumo::Shape{}, 2.f)}}));
  write(dir / "metadata_only.safetensors", cumo::io::serialize({}, {{"note", "no tensors"}}));
  write(dir / "empty_header.safetensors", raw_file("{}", 0));
  // Data section at 8 + N = 2 (mod 4): exercises the copy path for misaligned data.
  std::string mis = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  while ((8 + mis.size()) % 4 != 2) mis += ' ';
  write(dir / "misaligned.safetensors", raw_file(mis, 8));

  // Every seed must pass the harness's own checks (here under the ordinary compiler, without sanitizers).
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream f(e.path(), std::ios::binary);
    const Bytes seed((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    run_one(seed.data(), seed.size());
  }

  std::ofstream dict(argv[2], std::ios::trunc);
  for (const char* tok : {"\"__metadata__\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"", "\"F32\"", "\"F16\"",
                          "\"BF16\"", "\"F64\"", "\"I64\"", "\"I32\"", "\"U8\"", "\"BOOL\"", "{", "}", "[", "]",
                          ":", ",", "[0,0]", "[]", "0", "-1", "4294967296", "18446744073709551615",
                          "9223372036854775807", "1e300", "0.5", "null", "true", "\\u0000", "     "}) {
    dict << '"';
    for (const char* c = tok; *c; ++c) {
      if (*c == '"' || *c == '\\') dict << '\\';
      dict << *c;
    }
    dict << "\"\n";
  }
  return dict ? 0 : 1;
}

#endif
