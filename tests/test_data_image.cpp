// Images: PNG round trip, bad files, Pillow-exact resampling, CLIP preprocessing against hand-computed values.
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cumo/core/rng.hpp"
#include "cumo/io/image.hpp"

namespace fs = std::filesystem;
using cumo::io::Image;

namespace {
fs::path image_tmp(const std::string& name) {
  const fs::path d = cumo::test::tmp_root() / ("data_image_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}
void write_bytes(const fs::path& p, const std::vector<std::uint8_t>& b) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}
Image random_image(int w, int h, int c, std::uint64_t seed) {
  cumo::Rng rng(seed);
  Image im(w, h, c);
  for (auto& p : im.pixels) p = std::uint8_t(rng.next_u32() & 0xff);
  return im;
}
// The 7x5 test pattern whose Pillow resizes are pinned below.
Image pattern_7x5() {
  Image a(7, 5, 3);
  for (int y = 0; y < 5; ++y)
    for (int x = 0; x < 7; ++x) {
      a.at(y, x, 0) = std::uint8_t((x * 37 + y * 91) % 256);
      a.at(y, x, 1) = std::uint8_t((x * x * 13 + y * 7) % 256);
      a.at(y, x, 2) = std::uint8_t(((255 - x * 30 - y * 11) % 256 + 256) % 256);
    }
  return a;
}
// HF's arithmetic: float32(u8 * (1/255) in double), then (x - mean) / std in float32.
float hf_normalized(int u8, int c) {
  const cumo::io::ClipPreprocess p;
  const float v = float(double(u8) * (1.0 / 255.0));
  return (v - p.mean[std::size_t(c)]) / p.std[std::size_t(c)];
}
}  // namespace

TEST_CASE("data/image: PNG write then read round-trips grey, RGB and RGBA pixels exactly") {
  const fs::path d = image_tmp("roundtrip");
  for (int c : {1, 3, 4}) {
    const Image im = random_image(13, 7, c, 100 + std::uint64_t(c));
    const std::string path = (d / ("img" + std::to_string(c) + ".png")).string();
    cumo::io::write_png(path, im);
    const Image back = cumo::io::load_image(path, c);
    CHECK(back.width == 13);
    CHECK(back.height == 7);
    CHECK(back.channels == c);
    CHECK(back.pixels == im.pixels);
  }
  // Encoding is deterministic, and RGB loading of a grey PNG replicates the channel.
  const Image g = random_image(5, 4, 1, 7);
  CHECK(cumo::io::encode_png(g) == cumo::io::encode_png(g));
  const Image rgb = cumo::io::decode_image(cumo::io::encode_png(g), "grey", 3);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 5; ++x)
      for (int ch = 0; ch < 3; ++ch) CHECK(rgb.at(y, x, ch) == g.at(y, x, 0));
  CHECK_FALSE(fs::exists(d / "img3.png.tmp"));  // atomic write leaves no temporary behind
}

TEST_CASE("data/image: missing, empty, truncated and garbage files throw cumo::Error naming the path and reason") {
  const fs::path d = image_tmp("bad");
  auto message_of = [](const std::string& path) -> std::string {
    try {
      (void)cumo::io::load_image(path);
    } catch (const cumo::Error& e) {
      return e.what();
    }
    return "no error";
  };
  const std::string missing = (d / "missing.png").string();
  std::string m = message_of(missing);
  CHECK(m.find(missing) != std::string::npos);
  CHECK(m.find("cannot open") != std::string::npos);

  const std::string empty = (d / "empty.png").string();
  write_bytes(empty, {});
  m = message_of(empty);
  CHECK(m.find(empty) != std::string::npos);
  CHECK(m.find("empty") != std::string::npos);

  const auto png = cumo::io::encode_png(random_image(32, 32, 3, 5));
  for (std::size_t keep : {std::size_t(8), std::size_t(30), png.size() / 2, png.size() - 13}) {
    const std::string trunc = (d / ("trunc" + std::to_string(keep) + ".png")).string();
    write_bytes(trunc, std::vector<std::uint8_t>(png.begin(), png.begin() + std::ptrdiff_t(keep)));
    m = message_of(trunc);
    INFO("kept ", keep, " of ", png.size(), " bytes: ", m);
    CHECK(m.find(trunc) != std::string::npos);
    CHECK(m.find("stb_image") != std::string::npos);
  }

  const std::string garbage = (d / "garbage.jpg").string();
  std::vector<std::uint8_t> junk(500);
  cumo::Rng rng(3);
  for (auto& b : junk) b = std::uint8_t(rng.next_u32());
  write_bytes(garbage, junk);
  m = message_of(garbage);
  CHECK(m.find(garbage) != std::string::npos);
  CHECK(m.find("stb_image") != std::string::npos);

  CHECK(message_of(d.string()).find("directory") != std::string::npos);
}

TEST_CASE("data/image: a JPEG decodes, and a truncated one never crashes (error or partial image)") {
  const Image im = random_image(24, 16, 3, 11);
  std::vector<std::uint8_t> jpg;
  auto sink = [](void* ctx, void* data, int size) {
    auto* v = static_cast<std::vector<std::uint8_t>*>(ctx);
    v->insert(v->end(), static_cast<std::uint8_t*>(data), static_cast<std::uint8_t*>(data) + size);
  };
  REQUIRE(stbi_write_jpg_to_func(sink, &jpg, im.width, im.height, 3, im.pixels.data(), 90));
  const Image back = cumo::io::decode_image(jpg, "ok.jpg");
  CHECK(back.width == 24);
  CHECK(back.height == 16);
  for (std::size_t keep : {std::size_t(2), std::size_t(100), jpg.size() / 2}) {
    try {
      const Image part = cumo::io::decode_image(jpg.data(), keep, "part.jpg");
      CHECK(part.width == 24);
    } catch (const cumo::Error& e) {
      CHECK(std::string(e.what()).find("part.jpg") != std::string::npos);
    }
  }
}

TEST_CASE("data/image: resize equals Pillow's BICUBIC and BILINEAR bit for bit (pinned Pillow 12 outputs)") {
  const Image a = pattern_7x5();
  struct Case {
    int w, h;
    cumo::io::Resample r;
    std::vector<int> expected;
  };
  const std::vector<Case> cases = {
      {3, 2, cumo::io::Resample::bicubic, {95, 16, 224, 130, 124, 156, 133, 160, 88, 110, 32, 198, 116, 140, 130, 126, 176, 62}},
      {11, 4, cumo::io::Resample::bicubic,
       {12,  1,   254, 25,  4,   242, 53,  16,  220, 87,  40,  201, 113, 74,  182, 137, 118, 163, 165, 192, 144, 170,
        180, 125, 150, 73,  106, 170, 146, 84,  189, 223, 71,  136, 8,   242, 158, 13,  229, 172, 25,  207, 115, 49,
        188, 106, 83,  169, 136, 127, 150, 171, 201, 131, 145, 189, 112, 51,  82,  93,  60,  155, 71,  85,  232, 58,
        80,  17,  228, 102, 21,  215, 117, 33,  193, 59,  57,  174, 50,  91,  155, 80,  135, 136, 109, 209, 117, 139,
        197, 98,  174, 90,  79,  202, 163, 57,  217, 240, 44,  79,  26,  215, 95,  30,  202, 123, 42,  180, 157, 66,
        161, 192, 100, 142, 207, 144, 123, 92,  218, 104, 38,  206, 85,  69,  99,  66,  97,  172, 44,  113, 249, 31}},
      {3, 2, cumo::io::Resample::bilinear, {99, 24, 218, 129, 121, 154, 129, 157, 90, 106, 38, 196, 118, 135, 132, 128, 171, 68}},
  };
  for (const auto& c : cases) {
    const Image r = cumo::io::resize(a, c.w, c.h, c.r);
    REQUIRE(r.pixels.size() == c.expected.size());
    for (std::size_t i = 0; i < c.expected.size(); ++i) {
      INFO(c.w, "x", c.h, " element ", i);
      CHECK(int(r.pixels[i]) == c.expected[i]);
    }
  }
  // Same size: unchanged (PIL returns a copy).
  CHECK(cumo::io::resize(a, 7, 5).pixels == a.pixels);
}

TEST_CASE("data/image: CLIP preprocessing of a constant image is (c/255 - mean)/std everywhere") {
  Image im(40, 30, 3);
  for (int y = 0; y < 30; ++y)
    for (int x = 0; x < 40; ++x) {
      im.at(y, x, 0) = 200;
      im.at(y, x, 1) = 100;
      im.at(y, x, 2) = 50;
    }
  cumo::io::ClipPreprocess p;
  p.size = 16;
  const cumo::Tensor t = cumo::io::clip_preprocess(im, p);  // (3, 16, 16): resized 21x16, cropped
  REQUIRE(t.shape() == cumo::Shape{3, 16, 16});
  const int vals[3] = {200, 100, 50};
  for (int c = 0; c < 3; ++c) {
    const double exact = (vals[c] / 255.0 - double(p.mean[std::size_t(c)])) / double(p.std[std::size_t(c)]);
    for (int y = 0; y < 16; ++y)
      for (int x = 0; x < 16; ++x) {
        CHECK(t.at<float>(c, y, x) == hf_normalized(vals[c], c));
        CHECK(std::abs(t.at<float>(c, y, x) - exact) < 1e-6);
      }
  }
}

TEST_CASE("data/image: CLIP preprocessing centre-crops the middle columns of a wide gradient") {
  // 20x8, shortest side 8 = S: no resize; HF's centre crop takes columns (20 - 8) / 2 = 6 .. 13.
  Image im(20, 8, 3);
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 20; ++x) {
      im.at(y, x, 0) = std::uint8_t(x * 10);
      im.at(y, x, 1) = std::uint8_t(y * 20);
      im.at(y, x, 2) = 7;
    }
  cumo::io::ClipPreprocess p;
  p.size = 8;
  const cumo::Tensor t = cumo::io::clip_preprocess(im, p);  // (3, 8, 8)
  REQUIRE(t.shape() == cumo::Shape{3, 8, 8});
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 8; ++x) {
      CHECK(t.at<float>(0, y, x) == hf_normalized((6 + x) * 10, 0));
      CHECK(t.at<float>(1, y, x) == hf_normalized(y * 20, 1));
      CHECK(t.at<float>(2, y, x) == hf_normalized(7, 2));
    }
  // A tall 6x12 image resized to shortest side 3: (3, int(3 * 12 / 6) = 6), crop rows (6 - 3) / 2 = 1 .. 3.
  const auto sz = cumo::io::shortest_edge_size(6, 12, 3);
  CHECK(sz[0] == 3);
  CHECK(sz[1] == 6);
  CHECK(cumo::io::shortest_edge_size(300, 200, 224)[0] == 336);  // int(224 * 300 / 200)
  CHECK(cumo::io::shortest_edge_size(37, 53, 32)[1] == 45);      // int(32 * 53 / 37) = int(45.83)
}

TEST_CASE("data/image: pad aspect mode centres the image on LLaVA's mean colour (122, 116, 104)") {
  Image im(8, 4, 3);  // wide: padded to 8x8 with rows 2..5 holding the image
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 8; ++x) {
      im.at(y, x, 0) = 255;
      im.at(y, x, 1) = 0;
      im.at(y, x, 2) = 0;
    }
  cumo::io::ClipPreprocess p;
  p.size = 8;
  p.aspect = cumo::io::AspectMode::pad;
  const auto fill = p.pad_colour();
  CHECK(int(fill[0]) == 122);
  CHECK(int(fill[1]) == 116);
  CHECK(int(fill[2]) == 104);
  const cumo::Tensor t = cumo::io::clip_preprocess(im, p);  // (3, 8, 8)
  for (int y = 0; y < 8; ++y) {
    const bool inside = y >= 2 && y < 6;
    for (int x = 0; x < 8; ++x) {
      CHECK(t.at<float>(0, y, x) == hf_normalized(inside ? 255 : 122, 0));
      CHECK(t.at<float>(1, y, x) == hf_normalized(inside ? 0 : 116, 1));
      CHECK(t.at<float>(2, y, x) == hf_normalized(inside ? 0 : 104, 2));
    }
  }
  // Centre crop of the same image would have kept the middle 4x4 region after resizing to shortest side 8.
  p.aspect = cumo::io::AspectMode::center_crop;
  CHECK(cumo::io::clip_preprocess(im, p).shape() == cumo::Shape{3, 8, 8});
}

TEST_CASE("data/image: preprocessing rejects non-RGB input and impossible crops with a message") {
  CHECK_THROWS_AS(cumo::io::clip_preprocess(Image(4, 4, 1)), cumo::Error);
  cumo::io::ClipPreprocess p;
  p.size = 8;
  p.crop = 12;
  CHECK_THROWS_WITH_AS(cumo::io::clip_preprocess(Image(16, 8, 3), p), doctest::Contains("crop 12"), cumo::Error);
}

namespace {
// What clip_resize_crop computed before it stopped building the canvas and the whole resized image: the plain
// pipeline pad → resize → crop, each step as HF/LLaVA spell it.
Image reference_resize_crop(const Image& img, const cumo::io::ClipPreprocess& p) {
  const Image src = p.aspect == cumo::io::AspectMode::pad ? cumo::io::pad_to_square(img, p.pad_colour()) : img;
  const auto [rw, rh] = cumo::io::shortest_edge_size(src.width, src.height, p.size);
  const Image r = cumo::io::resize(src, rw, rh, p.resample);
  const int S = p.crop_size();
  return cumo::io::crop(r, (r.width - S) / 2, (r.height - S) / 2, S, S);
}
}  // namespace

TEST_CASE("data/image: the windowed CLIP resize equals pad, full resize and crop bit for bit, every shape and mode") {
  struct Case {
    int w, h, size, crop;
  };
  // Wide, tall, square, one-pixel lines, up- and downsampling, a pass skipped (a side already at `size`), a crop
  // smaller than the short side, and thin images whose padded canvas is mostly fill.
  const std::vector<Case> cases = {
      {7, 5, 4, 0},    {5, 7, 4, 0},   {9, 9, 4, 0},   {1, 13, 6, 0},  {13, 1, 6, 0},  {40, 30, 16, 0},
      {30, 40, 16, 12}, {16, 9, 16, 0}, {9, 16, 16, 0}, {16, 16, 16, 0}, {6, 3, 11, 0},  {3, 6, 11, 7},
      {2, 300, 8, 0},  {300, 2, 8, 0}, {301, 3, 24, 20}, {3, 3000, 8, 0}, {3000, 2, 8, 0}, {37, 53, 32, 0},
  };
  std::uint64_t seed = 1;
  for (const auto& c : cases)
    for (auto aspect : {cumo::io::AspectMode::center_crop, cumo::io::AspectMode::pad})
      for (auto rs : {cumo::io::Resample::bicubic, cumo::io::Resample::bilinear}) {
        const Image im = random_image(c.w, c.h, 3, seed++);
        cumo::io::ClipPreprocess p;
        p.size = c.size;
        p.crop = c.crop;
        p.aspect = aspect;
        p.resample = rs;
        INFO(c.w, "x", c.h, " size ", c.size, " crop ", c.crop, aspect == cumo::io::AspectMode::pad ? " pad" : " crop",
             rs == cumo::io::Resample::bicubic ? " bicubic" : " bilinear");
        const Image got = cumo::io::clip_resize_crop(im, p);
        const Image want = reference_resize_crop(im, p);
        REQUIRE(got.width == want.width);
        REQUIRE(got.height == want.height);
        std::size_t differ = 0;
        for (std::size_t i = 0; i < got.pixels.size(); ++i) differ += got.pixels[i] != want.pixels[i];
        CHECK(differ == 0);
      }
}

TEST_CASE("data/image: a 60000 x 1 image pads and preprocesses without building its 60000^2 canvas") {
  // The padded canvas would be 10.8 GB; the windowed resize reads the one image row and folds the fill.
  Image line = random_image(60000, 1, 3, 77);
  cumo::io::ClipPreprocess p;
  p.size = 8;
  p.aspect = cumo::io::AspectMode::pad;
  const Image out = cumo::io::clip_resize_crop(line, p);  // (8, 8, 3)
  REQUIRE(out.width == 8);
  REQUIRE(out.height == 8);
  // Rows far from the image line are the pad colour: a constant canvas resizes to itself.
  const auto fill = p.pad_colour();
  for (int x = 0; x < 8; ++x)
    for (int c = 0; c < 3; ++c) {
      CHECK(int(out.at(0, x, c)) == int(fill[std::size_t(c)]));
      CHECK(int(out.at(7, x, c)) == int(fill[std::size_t(c)]));
    }
  // And the same for a tall one, through the other pass.
  const Image tall = random_image(1, 60000, 3, 78);
  const Image out_t = cumo::io::clip_resize_crop(tall, p);
  for (int y = 0; y < 8; ++y)
    for (int c = 0; c < 3; ++c) CHECK(int(out_t.at(y, 0, c)) == int(fill[std::size_t(c)]));
}

TEST_CASE("data/image: a long side that cannot be an image's is refused with the sizes, not overflowed") {
  // 1 x 2^23 resized to short side 336: the long side would be 336 * 2^23 ~ 2.8e9 pixels.
  const Image im(1, 1 << 23, 3);
  cumo::io::ClipPreprocess p;
  p.size = 336;
  CHECK_THROWS_WITH_AS(cumo::io::clip_resize_crop(im, p), doctest::Contains("1x8388608"), cumo::Error);
}
