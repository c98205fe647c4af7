#pragma once
// Images: PNG/JPEG/BMP/TGA/GIF decode through stb_image, PNG encode through stb_image_write, and the CLIP
// preprocessing of Hugging Face's CLIPImageProcessor (LLaVA's "pad" aspect mode as an option).
//
// Header-only and stb: by default this header compiles a private copy of stb_image / stb_image_write into every
// translation unit that includes it (STB_IMAGE_STATIC / STB_IMAGE_WRITE_STATIC make every stb function `static`),
// so nothing has to be defined "exactly once" and two libraries that both do this never clash at link time.
// A translation unit that ALSO includes stb_image.h for its own use (with its own STB_IMAGE_IMPLEMENTATION
// somewhere in the program) defines CUMO_STB_EXTERNAL before including this header: then only stb's declarations
// are pulled in and the program's single implementation is used.
//
// Resampling follows Pillow (PIL) bit for bit: the same filter kernels, the same support widening when
// downsampling (that is PIL's antialias), the same 22-bit fixed-point coefficients, the same horizontal-then-
// vertical passes with rounding to 8 bits in between. HF's CLIPImageProcessor resizes through PIL with BICUBIC,
// so the pixels here equal its output for PNG input (JPEG decoders differ slightly: stb vs libjpeg).
#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "cumo/io/files.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

#if !defined(CUMO_STB_EXTERNAL)
#if defined(STBI_INCLUDE_STB_IMAGE_H) || defined(INCLUDE_STB_IMAGE_WRITE_H)
#error "cumo/io/image.hpp: stb_image.h / stb_image_write.h was included before this header; include cumo's header \
first, or define CUMO_STB_EXTERNAL and provide STB_IMAGE_IMPLEMENTATION / STB_IMAGE_WRITE_IMPLEMENTATION yourself"
#endif
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#endif
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#undef STB_IMAGE_IMPLEMENTATION
#undef STB_IMAGE_WRITE_IMPLEMENTATION
#else
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#endif

namespace cumo::io {

// ================================================================================================================
// Image: 8-bit, interleaved (HWC), row-major, top row first.
// ================================================================================================================
struct Image {
  int width = 0, height = 0, channels = 0;
  std::vector<std::uint8_t> pixels;  // (height, width, channels)

  Image() = default;
  Image(int w, int h, int c, std::uint8_t fill = 0) : width(w), height(h), channels(c) {
    CUMO_CHECK(w > 0 && h > 0 && c >= 1 && c <= 4, "Image: bad size ", w, "x", h, "x", c);
    pixels.assign(std::size_t(w) * std::size_t(h) * std::size_t(c), fill);
  }
  bool empty() const { return pixels.empty(); }
  std::uint8_t& at(int y, int x, int c) { return pixels[(std::size_t(y) * width + x) * channels + c]; }
  const std::uint8_t& at(int y, int x, int c) const { return pixels[(std::size_t(y) * width + x) * channels + c]; }
  friend bool operator==(const Image&, const Image&) = default;
};

// ================================================================================================================
// Decode / encode
// ================================================================================================================
// The largest image decode_image accepts: 64 Mpx (8192 x 8192; 192 MiB as RGB), far above any vision tower's input.
inline constexpr std::int64_t kMaxImagePixels = std::int64_t(1) << 26;

// Decodes an encoded image held in memory; `channels` = 3 gives RGB whatever the file holds (grey is replicated,
// alpha dropped, palettes expanded — PIL's convert("RGB") does the same for these cases). `name` is used in errors.
inline Image decode_image(const std::uint8_t* data, std::size_t n, const std::string& name = "<memory>",
                          int channels = 3) {
  constexpr const char* where = "decode_image";
  CUMO_CHECK(channels >= 1 && channels <= 4, where, ": channels must be 1..4, got ", channels);
  CUMO_CHECK(n > 0, where, ": '", name, "' is empty (0 bytes)");
  CUMO_CHECK(n <= std::size_t(INT_MAX), where, ": '", name, "' is too large (", n, " bytes)");
  int w = 0, h = 0, file_c = 0;
  // The header's claimed size first: a few hundred bytes can claim a 65535 x 65535 image (12 GiB decoded).
  if (stbi_info_from_memory(data, int(n), &w, &h, &file_c))
    CUMO_CHECK(w > 0 && h > 0 && std::int64_t(w) * std::int64_t(h) <= kMaxImagePixels, where, ": '", name,
               "' claims ", w, " x ", h, " pixels, more than the ", kMaxImagePixels, " this decoder accepts");
  stbi_uc* p = stbi_load_from_memory(data, int(n), &w, &h, &file_c, channels);
  if (!p) {
    const char* why = stbi_failure_reason();
    fail("cannot decode image '", name, "' (", n, " bytes): stb_image: ", why ? why : "unknown error");
  }
  Image img;
  img.width = w;
  img.height = h;
  img.channels = channels;
  img.pixels.assign(p, p + std::size_t(w) * std::size_t(h) * std::size_t(channels));
  stbi_image_free(p);
  return img;
}
inline Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& name = "<memory>",
                          int channels = 3) {
  return decode_image(bytes.data(), bytes.size(), name, channels);
}

// Loads a PNG/JPEG/BMP/TGA/GIF file. A missing, unreadable, truncated or non-image file throws cumo::Error naming
// the path and stb's reason; it never crashes.
inline Image load_image(const std::string& path, int channels = 3) {
  const auto bytes = read_file_bytes(path, "load_image");
  return decode_image(bytes.data(), bytes.size(), path, channels);
}

// PNG bytes of an image (1–4 channels). Deterministic: the same pixels always give the same bytes.
inline std::vector<std::uint8_t> encode_png(const Image& img) {
  constexpr const char* where = "encode_png";
  CUMO_CHECK(img.width > 0 && img.height > 0 && img.channels >= 1 && img.channels <= 4, where, ": bad image ",
             img.width, "x", img.height, "x", img.channels);
  CUMO_CHECK(img.pixels.size() == std::size_t(img.width) * img.height * img.channels, where, ": ",
             img.pixels.size(), " bytes of pixels for ", img.width, "x", img.height, "x", img.channels);
  std::vector<std::uint8_t> out;
  auto sink = [](void* ctx, void* data, int size) {
    auto* v = static_cast<std::vector<std::uint8_t>*>(ctx);
    v->insert(v->end(), static_cast<std::uint8_t*>(data), static_cast<std::uint8_t*>(data) + size);
  };
  const int ok = stbi_write_png_to_func(sink, &out, img.width, img.height, img.channels, img.pixels.data(),
                                        img.width * img.channels);
  CUMO_CHECK(ok && !out.empty(), where, ": stb_image_write failed for a ", img.width, "x", img.height, " image");
  return out;
}

// Writes a PNG atomically (temporary file + rename).
inline void write_png(const std::string& path, const Image& img) {
  const auto bytes = encode_png(img);
  write_file_atomic(path, bytes.data(), bytes.size(), "write_png");
}

// ================================================================================================================
// Resampling, as Pillow's ImagingResample (libImaging/Resample.c) computes it for 8-bit images.
// ================================================================================================================
enum class Resample { bilinear, bicubic };

namespace detail {
inline double pil_filter(Resample r, double x) {
  if (x < 0) x = -x;
  if (r == Resample::bilinear) return x < 1.0 ? 1.0 - x : 0.0;
  constexpr double a = -0.5;  // PIL's bicubic (Keys, a = -0.5)
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
inline double pil_support(Resample r) { return r == Resample::bilinear ? 1.0 : 2.0; }

constexpr int kPrecisionBits = 32 - 8 - 2;

// For each output position: the first input index, the count, and ksize fixed-point weights.
struct ResampleCoeffs {
  int ksize = 0;
  std::vector<int> bounds;       // (out, 2): xmin, count
  std::vector<std::int32_t> kk;  // (out, ksize)
};

// Output positions [first, first + count) of an in_size → out_size resize: row i of the result is output position
// first + i. Each position's coefficients depend on that position alone, so a window's are the same numbers the
// whole resize computes.
inline ResampleCoeffs pil_coeffs(int in_size, int out_size, Resample r, int first, int count) {
  // precompute_coeffs + normalize_coeffs_8bpc with box = [0, in_size).
  const double in0 = 0.0, in1 = double(float(in_size));
  double filterscale, scale;
  filterscale = scale = (in1 - in0) / out_size;
  if (filterscale < 1.0) filterscale = 1.0;  // upsampling: the plain kernel; downsampling: widened (antialias)
  const double support = pil_support(r) * filterscale;
  ResampleCoeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.assign(std::size_t(count) * 2, 0);
  c.kk.assign(std::size_t(count) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int i = 0; i < count; ++i) {
    const int xx = first + i;
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double w = pil_filter(r, (x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < c.ksize; ++x) {
      double v = x < xmax ? (ww != 0.0 ? k[x] / ww : k[x]) : 0.0;
      c.kk[std::size_t(i) * c.ksize + x] =
          v < 0 ? int(-0.5 + v * (1 << kPrecisionBits)) : int(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[2 * i] = xmin;
    c.bounds[2 * i + 1] = xmax;
  }
  return c;
}

inline std::uint8_t pil_clip8(std::int64_t in) {
  if (in >= (std::int64_t(1) << kPrecisionBits << 8)) return 255;
  if (in <= 0) return 0;
  return std::uint8_t(in >> kPrecisionBits);
}
}  // namespace detail

// Rows [top, top+h) and columns [left, left+w); must lie inside the image.
inline Image crop(const Image& in, int left, int top, int w, int h) {
  CUMO_CHECK(left >= 0 && top >= 0 && w > 0 && h > 0 && left + w <= in.width && top + h <= in.height,
             "crop: box (left ", left, ", top ", top, ", ", w, "x", h, ") is outside the ", in.width, "x", in.height,
             " image");
  Image out(w, h, in.channels);
  const std::size_t row = std::size_t(w) * in.channels;
  for (int y = 0; y < h; ++y)
    std::memcpy(&out.at(y, 0, 0), &in.at(top + y, left, 0), row);
  return out;
}

// LLaVA's expand2square: the image pasted onto a square canvas of side max(w, h) filled with `fill`, centred with
// PIL's integer offsets ((side - w) // 2, (side - h) // 2).
inline Image pad_to_square(const Image& in, std::array<std::uint8_t, 3> fill) {
  CUMO_CHECK(!in.empty(), "pad_to_square: input image is empty");
  if (in.width == in.height) return in;
  const int side = std::max(in.width, in.height);
  Image out(side, side, in.channels);
  for (int y = 0; y < side; ++y)
    for (int x = 0; x < side; ++x)
      for (int c = 0; c < in.channels; ++c) out.at(y, x, c) = fill[std::min(c, 2)];
  const int left = (side - in.width) / 2, top = (side - in.height) / 2;
  for (int y = 0; y < in.height; ++y)
    std::memcpy(&out.at(top + y, left, 0), &in.at(y, 0, 0), std::size_t(in.width) * in.channels);
  return out;
}

namespace detail {
// `img` pasted at (left, top) on a width × height canvas filled with `fill` (pad_to_square's canvas); with
// left = top = 0 and the image's own size, the canvas is the image.
struct Canvas {
  const Image& img;
  int width = 0, height = 0, left = 0, top = 0;
  std::array<std::uint8_t, 3> fill{};
  std::int64_t fill_at(int c) const { return fill[std::size_t(std::min(c, 2))]; }
};

// Columns [x0, x0 + w) and rows [y0, y0 + h) of resize(canvas, out_w, out_h, r): bit for bit crop(resize(canvas)),
// in time and memory for the image and the window only. Building the canvas first is what a hostile 80-byte BMP
// that claims 11267 × 2 pixels turns into a 380 MB canvas and half a minute of resizing. Pillow's sums are exact
// integer sums, so the taps that land on the constant fill fold into one weight per output position, and each
// vertical sum can be accumulated row by row as the horizontal pass produces the rows; the rounding to 8 bits
// between the passes stays where PIL has it.
inline Image resize_window(const Canvas& cv, int out_w, int out_h, int x0, int y0, int w, int h, Resample r) {
  const Image& img = cv.img;
  const int C = img.channels;
  const std::int64_t half = std::int64_t(1) << (kPrecisionBits - 1);
  const bool hpass = out_w != cv.width, vpass = out_h != cv.height;  // PIL skips a pass whose size is unchanged
  const int img_x0 = cv.left, img_x1 = cv.left + img.width;        // canvas columns holding the image
  const int img_y0 = cv.top, img_y1 = cv.top + img.height;         // canvas rows holding the image

  // Horizontal pass: per window column, its taps and the summed weight of those on fill columns.
  ResampleCoeffs hc;
  std::vector<std::int64_t> hfill(std::size_t(w), 0);
  std::vector<std::uint8_t> fill_row(std::size_t(w) * C);  // (w, C): a canvas row of fill after this pass
  if (hpass) {
    hc = pil_coeffs(cv.width, out_w, r, x0, w);
    for (int i = 0; i < w; ++i) {
      const int xmin = hc.bounds[2 * i], n = hc.bounds[2 * i + 1];
      const std::int32_t* k = &hc.kk[std::size_t(i) * hc.ksize];
      std::int64_t all = 0;
      for (int x = 0; x < n; ++x) {
        all += k[x];
        if (xmin + x < img_x0 || xmin + x >= img_x1) hfill[std::size_t(i)] += k[x];
      }
      for (int c = 0; c < C; ++c) fill_row[std::size_t(i) * C + c] = pil_clip8(half + cv.fill_at(c) * all);
    }
  } else {
    for (int i = 0; i < w; ++i)
      for (int c = 0; c < C; ++c) fill_row[std::size_t(i) * C + c] = std::uint8_t(cv.fill_at(c));
  }
  auto image_row = [&](int y, std::uint8_t* out) {  // image row y after the horizontal pass → (w, C)
    for (int i = 0; i < w; ++i) {
      std::uint8_t* o = out + std::size_t(i) * C;
      if (!hpass) {
        const int col = x0 + i;
        for (int c = 0; c < C; ++c)
          o[c] = col >= img_x0 && col < img_x1 ? img.at(y, col - img_x0, c) : std::uint8_t(cv.fill_at(c));
        continue;
      }
      const int xmin = hc.bounds[2 * i], n = hc.bounds[2 * i + 1];
      const std::int32_t* k = &hc.kk[std::size_t(i) * hc.ksize];
      const int a = std::max(xmin, img_x0), b = std::min(xmin + n, img_x1);  // taps on image columns
      for (int c = 0; c < C; ++c) {
        std::int64_t ss = half + cv.fill_at(c) * hfill[std::size_t(i)];
        for (int col = a; col < b; ++col) ss += std::int64_t(img.at(y, col - img_x0, c)) * k[col - xmin];
        o[c] = pil_clip8(ss);
      }
    }
  };

  Image out(w, h, C);
  const std::size_t row_bytes = std::size_t(w) * C;
  if (!vpass) {
    for (int j = 0; j < h; ++j) {
      const int Y = y0 + j;
      if (Y >= img_y0 && Y < img_y1)
        image_row(Y - img_y0, &out.at(j, 0, 0));
      else
        std::memcpy(&out.at(j, 0, 0), fill_row.data(), row_bytes);
    }
    return out;
  }
  // Vertical pass, accumulated: acc(j) = half + Σ_Y k_j(Y) · row(Y), the fill rows' taps folded into one weight.
  const ResampleCoeffs vc = pil_coeffs(cv.height, out_h, r, y0, h);
  std::vector<std::int64_t> acc(std::size_t(h) * row_bytes, half);  // (h, w, C)
  for (int j = 0; j < h; ++j) {
    const int ymin = vc.bounds[2 * j], n = vc.bounds[2 * j + 1];
    std::int64_t kfill = 0;
    for (int y = 0; y < n; ++y)
      if (ymin + y < img_y0 || ymin + y >= img_y1) kfill += vc.kk[std::size_t(j) * vc.ksize + y];
    for (std::size_t e = 0; e < row_bytes; ++e) acc[std::size_t(j) * row_bytes + e] += kfill * fill_row[e];
  }
  // Image rows some window row reads; both tap bounds only grow with the output row, so the window rows that read
  // canvas row Y are one range [lo, hi) that moves forward with Y.
  const int need0 = std::max(vc.bounds[0], img_y0);
  const int need1 = std::min(vc.bounds[2 * (h - 1)] + vc.bounds[2 * (h - 1) + 1], img_y1);
  std::vector<std::uint8_t> row(row_bytes);  // (w, C)
  int lo = 0, hi = 0;
  for (int Y = need0; Y < need1; ++Y) {
    while (lo < h && vc.bounds[2 * lo] + vc.bounds[2 * lo + 1] <= Y) ++lo;
    while (hi < h && vc.bounds[2 * hi] <= Y) ++hi;
    if (lo >= hi) continue;
    image_row(Y - img_y0, row.data());
    for (int j = lo; j < hi; ++j) {
      const std::int64_t k = vc.kk[std::size_t(j) * vc.ksize + (Y - vc.bounds[2 * j])];
      std::int64_t* a = &acc[std::size_t(j) * row_bytes];
      for (std::size_t e = 0; e < row_bytes; ++e) a[e] += k * row[e];
    }
  }
  for (std::size_t e = 0; e < acc.size(); ++e) out.pixels[e] = pil_clip8(acc[e]);
  return out;
}
}  // namespace detail

// Resizes to out_w × out_h exactly as PIL's Image.resize((out_w, out_h), BICUBIC | BILINEAR) does for 8-bit images
// (reducing_gap=None, the default and what Hugging Face uses). A pass whose size does not change is skipped, as in
// PIL, so a same-size resize returns the input unchanged. The whole output as one window of resize_window.
inline Image resize(const Image& in, int out_w, int out_h, Resample r = Resample::bicubic) {
  constexpr const char* where = "resize";
  CUMO_CHECK(!in.empty(), where, ": input image is empty");
  CUMO_CHECK(out_w > 0 && out_h > 0, where, ": bad output size ", out_w, "x", out_h);
  return detail::resize_window(detail::Canvas{in, in.width, in.height, 0, 0, {}}, out_w, out_h, 0, 0, out_w, out_h,
                               r);
}

// ================================================================================================================
// CLIP preprocessing (HF CLIPImageProcessor with openai/clip-vit-* defaults)
// ================================================================================================================
enum class AspectMode {
  center_crop,  // HF default: resize the shortest side to `size`, crop the centre crop × crop
  pad,          // LLaVA image_aspect_ratio="pad": expand2square with the mean colour first, then as above
};

struct ClipPreprocess {
  int size = 224;  // shortest_edge after resize
  int crop = 0;    // crop_size (0: same as size)
  Resample resample = Resample::bicubic;  // HF: PILImageResampling.BICUBIC
  AspectMode aspect = AspectMode::center_crop;
  double rescale = 1.0 / 255.0;
  std::array<float, 3> mean = {0.48145466f, 0.4578275f, 0.40821073f};
  std::array<float, 3> std = {0.26862954f, 0.26130258f, 0.27577711f};

  int crop_size() const { return crop > 0 ? crop : size; }
  // LLaVA's pad colour: tuple(int(x * 255) for x in image_mean) = (122, 116, 104) for CLIP.
  std::array<std::uint8_t, 3> pad_colour() const {
    std::array<std::uint8_t, 3> c{};
    for (int i = 0; i < 3; ++i) c[i] = std::uint8_t(std::clamp(int(double(mean[i]) * 255.0), 0, 255));
    return c;
  }
};

// HF's get_resize_output_image_size(default_to_square=False): the short side becomes `size`, the long side
// int(size * long / short) (truncated, as Python's int() does). Returns {width, height}.
// A long side that does not fit an int (a 1 × 2^26 image resized to 336) is an error, where PIL would run out of
// memory.
inline std::array<int, 2> shortest_edge_size(int width, int height, int size) {
  const bool w_short = width <= height;
  const int short_side = w_short ? width : height, long_side = w_short ? height : width;
  const double new_long = std::floor(double(std::int64_t(size) * long_side) / double(short_side));
  CUMO_CHECK(new_long <= double(INT_MAX), "clip_preprocess: resizing the ", width, "x", height,
             " image's short side to ", size, " makes its long side ", new_long, " pixels, more than the ", INT_MAX,
             " an image can have");
  return w_short ? std::array<int, 2>{size, int(new_long)} : std::array<int, 2>{int(new_long), size};
}

// The uint8 image that the processor normalises: (pad) → resize shortest side → centre crop.
inline Image clip_resize_crop(const Image& img, const ClipPreprocess& p = {}) {
  constexpr const char* where = "clip_preprocess";
  CUMO_CHECK(!img.empty(), where, ": image is empty");
  CUMO_CHECK(img.channels == 3, where, ": expected an RGB image (3 channels), got ", img.channels);
  CUMO_CHECK(p.size > 0 && p.crop_size() > 0, where, ": size ", p.size, " / crop ", p.crop_size(), " must be > 0");
  // The pad's canvas (pad_to_square) and the resized image are never built: only the crop's pixels are computed.
  detail::Canvas canvas{img, img.width, img.height, 0, 0, p.pad_colour()};
  if (p.aspect == AspectMode::pad) {
    const int side = std::max(img.width, img.height);
    canvas.width = canvas.height = side;
    canvas.left = (side - img.width) / 2;
    canvas.top = (side - img.height) / 2;
  }
  const auto [rw, rh] = shortest_edge_size(canvas.width, canvas.height, p.size);
  const int S = p.crop_size();
  CUMO_CHECK(S <= rw && S <= rh, where, ": crop ", S, " is larger than the resized ", rw, "x", rh, " image (size ",
             p.size, ")");
  // HF center_crop: top = (h - crop_h) // 2, left = (w - crop_w) // 2.
  return detail::resize_window(canvas, rw, rh, (rw - S) / 2, (rh - S) / 2, S, S, p.resample);
}

// Full preprocessing → (3, S, S) f32, CHW, with HF's arithmetic: x = float32(double(u8) * rescale), then
// (x - float32(mean)) / float32(std) in float32.
inline Tensor clip_normalize(const Image& img, const ClipPreprocess& p = {}) {
  CUMO_CHECK(img.channels == 3, "clip_normalize: expected an RGB image, got ", img.channels, " channels");
  const int H = img.height, W = img.width;
  Tensor t = Tensor::empty({3, H, W});  // (3, H, W)
  float* out = t.data<float>();
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x) {
        const float v = float(double(img.at(y, x, c)) * p.rescale);
        out[(std::size_t(c) * H + y) * W + x] = (v - p.mean[c]) / p.std[c];
      }
  return t;
}

inline Tensor clip_preprocess(const Image& img, const ClipPreprocess& p = {}) {
  return clip_normalize(clip_resize_crop(img, p), p);  // (3, S, S)
}
inline Tensor clip_preprocess_file(const std::string& path, const ClipPreprocess& p = {}) {
  return clip_preprocess(load_image(path, 3), p);
}

}  // namespace cumo::io
