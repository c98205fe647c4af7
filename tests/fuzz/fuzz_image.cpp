// libFuzzer harness for the image path: cumo::io::decode_image (stb_image: PNG, JPEG, BMP, TGA, GIF, ...) and the
// CLIP preprocessing a decoded image goes through. Any byte string must either decode or throw cumo::Error, never
// crash, read out of bounds, hit undefined behaviour (ASan + UBSan) or allocate without bound (the header's claimed
// size is checked first). Decoded images are checked for a property: their pixel buffer is width x height x
// channels, and preprocessing gives a (3, crop, crop) tensor of finite values.
//
// Built by tests/fuzz/CMakeLists.txt with clang++ -fsanitize=fuzzer,address,undefined. Compiled with
// CUMO_FUZZ_MAKE_SEEDS by the ordinary compiler, the same file writes the seed corpus.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cumo/io/image.hpp"

namespace {

[[noreturn]] void violated(const char* what) {
  std::fprintf(stderr, "fuzz_image: property violated: %s\n", what);
  std::abort();
}

void run_one(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return;
  const int channels = 1 + data[0] % 4;  // the first byte picks the channel count asked for, the rest is the file
  cumo::io::Image img;
  try {
    img = cumo::io::decode_image(data + 1, size - 1, "fuzz-input", channels);
  } catch (const cumo::Error&) {
    return;
  }
  if (img.width <= 0 || img.height <= 0 || img.channels != channels ||
      img.pixels.size() != std::size_t(img.width) * std::size_t(img.height) * std::size_t(channels))
    violated("decoded size and pixel buffer disagree");
  if (channels != 3 || std::int64_t(img.width) * img.height > (1 << 16)) return;  // keep executions fast
  cumo::io::ClipPreprocess p;
  p.size = 8;
  for (auto aspect : {cumo::io::AspectMode::center_crop, cumo::io::AspectMode::pad}) {
    p.aspect = aspect;
    const cumo::Tensor t = cumo::io::clip_preprocess(img, p);
    if (t.dim() != 3 || t.size(0) != 3 || t.size(1) != 8 || t.size(2) != 8) violated("preprocessed shape");
    for (std::int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(t.data<float>()[i])) violated("non-finite preprocessed value");
  }
}

}  // namespace

#ifndef CUMO_FUZZ_MAKE_SEEDS

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  run_one(data, size);
  return 0;
}

#else  // ---- seed corpus writer -----------------------------------------------------------------------------------

#include <filesystem>
#include <fstream>
#include <string>

namespace {
// Writes one seed and runs it through the harness: every seed must decode and hold the properties.
void write(const std::filesystem::path& p, std::uint8_t first, const std::vector<std::uint8_t>& b) {
  std::vector<std::uint8_t> seed{first};
  seed.insert(seed.end(), b.begin(), b.end());
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(seed.data()), std::streamsize(seed.size()));
  if (!f) throw cumo::Error("fuzz_image_seeds: cannot write " + p.string());
  (void)cumo::io::decode_image(b, p.string(), 1 + first % 4);  // throws if the seed is not an image
  run_one(seed.data(), seed.size());
}
// A w x h 24-bit BMP (bottom-up rows padded to 4 bytes).
std::vector<std::uint8_t> bmp(int w, int h) {
  const int row = (3 * w + 3) / 4 * 4, data = row * h;
  std::vector<std::uint8_t> b(54 + std::size_t(data), 0);
  auto put32 = [&](std::size_t at, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) b[at + std::size_t(i)] = std::uint8_t(v >> (8 * i));
  };
  b[0] = 'B';
  b[1] = 'M';
  put32(2, std::uint32_t(b.size()));
  put32(10, 54);
  put32(14, 40);
  put32(18, std::uint32_t(w));
  put32(22, std::uint32_t(h));
  b[26] = 1;
  b[28] = 24;
  put32(34, std::uint32_t(data));
  for (int i = 0; i < data; ++i) b[54 + std::size_t(i)] = std::uint8_t(i * 37);
  return b;
}
}  // namespace

// fuzz_image_seeds <seed-dir>
int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <seed-dir>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir(argv[1]);
  std::filesystem::create_directories(dir);
  int k = 0;
  for (const auto& [w, h, c] : std::vector<std::array<int, 3>>{{1, 1, 3}, {5, 3, 1}, {4, 7, 4}, {16, 16, 3}, {3, 2, 2}}) {
    cumo::io::Image img(w, h, c);
    for (std::size_t i = 0; i < img.pixels.size(); ++i) img.pixels[i] = std::uint8_t(i * 29 + 3);
    write(dir / ("png_" + std::to_string(k)), std::uint8_t(k), cumo::io::encode_png(img));
    ++k;
  }
  write(dir / "bmp_0", 2, bmp(3, 2));
  write(dir / "bmp_1", 2, bmp(1, 5));
  return 0;
}

#endif
