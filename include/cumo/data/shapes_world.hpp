#pragma once
// The built-in "shapes" world: small images of coloured circles, squares and triangles (1–3 per image, never
// overlapping, antialiased), with
//   stage 1 (pre-training):        short captions, objects listed left to right   "a red circle and a blue square."
//   stage 2 (pre-finetuning):      detailed captions with count and relations      "there are 2 shapes: a red circle
//                                                                                   to the left of a blue square."
//   stage 3 (instruction tuning):  questions of five types, one answer word each
//       colour    "what colour is the circle?"            → "red"
//       shape     "what shape is the blue object?"        → "square"
//       count     "how many shapes are there?"            → "2"   (also per shape / per colour, 0 allowed)
//       position  "what is left of the square?"          → "circle"   (one object: "... on the left or the right?")
//       yesno     "is there a green triangle?"            → "no"  (balanced yes / no)
//   eval:                          held-out images, one question of every type each (exact-match accuracy per type)
// written as PNG files plus LLaVA JSON (stage1.json, stage2.json, stage3.json, eval.json; images in images/), so a
// run on this data goes through the same loaders as a run on real LLaVA data.
//
// Deterministic by seed: scene i of a split draws from its own Philox stream, a pure function of (seed, split, i),
// so the files are byte-identical for the same arguments and scene i does not depend on how many were asked for.
// Every question refers to its object unambiguously (shape alone if unique, else colour + shape, else a left/
// middle/right qualifier), and object centres are at least min_dx apart horizontally, so "left of" is well posed.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/error.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/io/image.hpp"
#include "cumo/io/llava_data.hpp"

namespace cumo::data {

enum class ShapeKind : std::uint8_t { circle, square, triangle };
inline constexpr std::array<std::string_view, 3> kShapeNames = {"circle", "square", "triangle"};

struct ColourDef {
  std::string_view name;
  std::uint8_t r, g, b;
};
inline constexpr std::array<ColourDef, 6> kColours = {{{"red", 220, 40, 40},
                                                       {"green", 40, 180, 60},
                                                       {"blue", 50, 100, 235},
                                                       {"yellow", 235, 215, 40},
                                                       {"purple", 160, 60, 210},
                                                       {"white", 240, 240, 240}}};
inline constexpr std::array<std::uint8_t, 3> kBackground = {48, 48, 48};

inline constexpr std::array<std::string_view, 5> kQuestionTypes = {"colour", "shape", "count", "position", "yesno"};

struct ShapesConfig {
  int image_size = 32;
  int min_objects = 1, max_objects = 3;
  float min_size = 0.10f, max_size = 0.15f;  // circle radius as a fraction of the side; other shapes: equal area
  float min_dx = 0.12f;                      // minimum horizontal distance of centres, fraction of the side
  int colours = 6;                           // use the first `colours` entries of kColours (2..6)
  int supersample = 4;                       // antialiasing: supersample² coverage samples per pixel
  std::uint64_t seed = 0;
  int train_images = 1000, eval_images = 100;
  int questions_per_image = 5;               // stage-3 questions per training image, distinct types (1..5)

  void validate() const {
    constexpr const char* w = "ShapesConfig";
    CUMO_CHECK(image_size >= 16 && image_size <= 1024, w, ": image_size must be in [16, 1024], got ", image_size);
    CUMO_CHECK(min_objects >= 1 && max_objects <= 3 && min_objects <= max_objects, w,
               ": objects per image must satisfy 1 <= min <= max <= 3, got ", min_objects, "..", max_objects);
    CUMO_CHECK(min_size > 0 && min_size <= max_size && max_size <= 0.2f, w, ": sizes must satisfy 0 < min <= max <= 0.2, got ",
               min_size, "..", max_size);
    CUMO_CHECK(colours >= 2 && colours <= int(kColours.size()), w, ": colours must be in [2, ", kColours.size(),
               "], got ", colours);
    CUMO_CHECK(supersample >= 1 && supersample <= 16, w, ": supersample must be in [1, 16], got ", supersample);
    CUMO_CHECK(train_images >= 0 && eval_images >= 0, w, ": negative image count");
    CUMO_CHECK(questions_per_image >= 1 && questions_per_image <= int(kQuestionTypes.size()), w,
               ": questions_per_image must be in [1, 5], got ", questions_per_image);
  }
};

struct ShapeObject {
  ShapeKind shape = ShapeKind::circle;
  int colour = 0;
  double cx = 0, cy = 0;  // centre (circle centre, square centre, triangle centroid), pixels
  double s = 0;           // circle radius; the square and triangle have the same area as that circle

  double square_half() const { return s * 0.886226925452758; }   // sqrt(pi) / 2
  double triangle_r() const { return s * 1.555290788739793; }     // circumradius: sqrt(4 pi / (3 sqrt 3))
  double bound() const {                                           // radius of a disc that contains the shape
    switch (shape) {
      case ShapeKind::circle: return s;
      case ShapeKind::square: return square_half() * 1.4142135623730951;
      case ShapeKind::triangle: return triangle_r();
    }
    return s;
  }
  // Whether point (x, y) is inside the shape (an upward-pointing equilateral triangle).
  bool contains(double x, double y) const {
    const double dx = x - cx, dy = y - cy;
    switch (shape) {
      case ShapeKind::circle: return dx * dx + dy * dy <= s * s;
      case ShapeKind::square: return std::abs(dx) <= square_half() && std::abs(dy) <= square_half();
      case ShapeKind::triangle: {
        const double R = triangle_r();
        const double t = dy + R;  // distance below the apex
        return dy <= R / 2 && t >= 0 && std::abs(dx) <= t * 0.5773502691896258;  // tan 30°
      }
    }
    return false;
  }
  std::string_view shape_name() const { return kShapeNames[std::size_t(shape)]; }
  std::string_view colour_name() const { return kColours[std::size_t(colour)].name; }
};

struct Scene {
  int size = 32;
  std::vector<ShapeObject> objects;  // sorted left to right by centre
};

struct Question {
  std::string type, question, answer;
};

// ---- streams ---------------------------------------------------------------------------------------------------
namespace detail {
inline std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// Split ids: which part of the world a stream belongs to.
enum : std::uint64_t { kTrainScenes = 1, kEvalScenes = 2, kTrainQuestions = 3, kEvalQuestions = 4 };
inline Rng stream(std::uint64_t seed, std::uint64_t split, std::uint64_t index, std::uint64_t attempt = 0) {
  return Rng(splitmix64(splitmix64(splitmix64(seed) ^ split) ^ index) ^ (attempt * 0xD1B54A32D192ED03ull));
}
inline int uniform_int(Rng& r, int n) { return int((std::uint64_t(r.next_u32()) * std::uint64_t(n)) >> 32); }
inline double uniform(Rng& r, double lo, double hi) { return lo + (hi - lo) * double(r.uniform()); }
}  // namespace detail

// ---- scenes ----------------------------------------------------------------------------------------------------
// Rejection sampling: each object is placed inside the canvas, clear of the others (1 px gap between containing
// discs) and min_dx away horizontally from every other centre; a scene that cannot be completed is redrawn.
inline Scene sample_scene(Rng& rng, const ShapesConfig& c) {
  c.validate();
  const double S = c.image_size, min_dx = c.min_dx * S;
  for (int restart = 0; restart < 1000; ++restart) {
    Scene sc;
    sc.size = c.image_size;
    const int n = c.min_objects + detail::uniform_int(rng, c.max_objects - c.min_objects + 1);
    bool ok = true;
    for (int k = 0; k < n && ok; ++k) {
      ShapeObject o;
      o.shape = ShapeKind(detail::uniform_int(rng, 3));
      o.colour = detail::uniform_int(rng, c.colours);
      o.s = detail::uniform(rng, c.min_size * S, c.max_size * S);
      const double b = o.bound();
      bool placed = false;
      for (int tries = 0; tries < 200 && !placed; ++tries) {
        o.cx = detail::uniform(rng, b + 0.5, S - b - 0.5);
        o.cy = detail::uniform(rng, b + 0.5, S - b - 0.5);
        placed = true;
        for (const auto& p : sc.objects) {
          const double dx = o.cx - p.cx, dy = o.cy - p.cy;
          if (std::abs(dx) < min_dx || std::sqrt(dx * dx + dy * dy) < b + p.bound() + 1.0) {
            placed = false;
            break;
          }
        }
        // A lone object must be clearly on one side, so "left or right?" has an answer.
        if (placed && n == 1 && std::abs(o.cx - S / 2) < min_dx / 2) placed = false;
      }
      if (!placed) ok = false;
      else sc.objects.push_back(o);
    }
    if (!ok) continue;
    std::sort(sc.objects.begin(), sc.objects.end(), [](const ShapeObject& a, const ShapeObject& b) { return a.cx < b.cx; });
    return sc;
  }
  fail("sample_scene: could not place ", c.max_objects, " objects of size up to ", c.max_size, " on a ", c.image_size,
       "-pixel canvas; use a larger image or smaller shapes");
}

// Antialiased rendering: each pixel blends the background and every shape by its coverage of a supersample² grid.
inline io::Image render_scene(const Scene& sc, int supersample = 4) {
  CUMO_CHECK(supersample >= 1, "render_scene: supersample must be >= 1");
  io::Image img(sc.size, sc.size, 3);
  const int ss = supersample;
  const double inv = 1.0 / (ss * ss);
  std::vector<double> cov(sc.objects.size());
  for (int y = 0; y < sc.size; ++y)
    for (int x = 0; x < sc.size; ++x) {
      std::fill(cov.begin(), cov.end(), 0.0);
      double total = 0;
      for (std::size_t k = 0; k < sc.objects.size(); ++k) {
        const auto& o = sc.objects[k];
        const double b = o.bound() + 1.0;
        if (std::abs(x + 0.5 - o.cx) > b || std::abs(y + 0.5 - o.cy) > b) continue;
        int hits = 0;
        for (int j = 0; j < ss; ++j)
          for (int i = 0; i < ss; ++i) hits += o.contains(x + (i + 0.5) / ss, y + (j + 0.5) / ss);
        cov[k] = hits * inv;
        total += cov[k];
      }
      for (int ch = 0; ch < 3; ++ch) {
        double v = kBackground[std::size_t(ch)] * std::max(0.0, 1.0 - total);
        for (std::size_t k = 0; k < sc.objects.size(); ++k) {
          const auto& col = kColours[std::size_t(sc.objects[k].colour)];
          v += cov[k] * (ch == 0 ? col.r : ch == 1 ? col.g : col.b);
        }
        img.at(y, x, ch) = std::uint8_t(std::clamp(int(v + 0.5), 0, 255));
      }
    }
  return img;
}

// ---- language ----------------------------------------------------------------------------------------------------
namespace detail {
inline std::string a_obj(const ShapeObject& o) {
  return "a " + std::string(o.colour_name()) + " " + std::string(o.shape_name());
}
inline std::string count_word(std::size_t n) { return std::to_string(n); }
// "left"/"right" (2 of a kind) or "left"/"middle"/"right" (3) for object i among those that satisfy `same`.
template <class Same>
inline std::string qualifier(const Scene& sc, std::size_t i, Same same) {
  std::vector<std::size_t> group;
  for (std::size_t k = 0; k < sc.objects.size(); ++k)
    if (same(sc.objects[k])) group.push_back(k);
  if (group.size() <= 1) return {};
  const auto pos = std::size_t(std::find(group.begin(), group.end(), i) - group.begin());
  if (pos == 0) return "left ";
  if (pos + 1 == group.size()) return "right ";
  return "middle ";
}
template <class Same>
inline std::size_t count_if_obj(const Scene& sc, Same same) {
  return std::size_t(std::count_if(sc.objects.begin(), sc.objects.end(), same));
}
// Without naming the colour: "circle", or "left circle" when there are several circles.
inline std::string by_shape(const Scene& sc, std::size_t i) {
  const auto& o = sc.objects[i];
  return qualifier(sc, i, [&](const ShapeObject& p) { return p.shape == o.shape; }) + std::string(o.shape_name());
}
// Without naming the shape: "red object", or "left red object".
inline std::string by_colour(const Scene& sc, std::size_t i) {
  const auto& o = sc.objects[i];
  return qualifier(sc, i, [&](const ShapeObject& p) { return p.colour == o.colour; }) + std::string(o.colour_name()) +
         " object";
}
// Shortest unambiguous name: "square", "blue square", or "left blue square".
inline std::string by_full(const Scene& sc, std::size_t i) {
  const auto& o = sc.objects[i];
  if (count_if_obj(sc, [&](const ShapeObject& p) { return p.shape == o.shape; }) == 1) return std::string(o.shape_name());
  auto same = [&](const ShapeObject& p) { return p.shape == o.shape && p.colour == o.colour; };
  return qualifier(sc, i, same) + std::string(o.colour_name()) + " " + std::string(o.shape_name());
}
}  // namespace detail

// Stage 1: the objects from left to right. "a red circle, a blue square and a green triangle."
inline std::string brief_caption(const Scene& sc) {
  std::string s;
  const auto n = sc.objects.size();
  for (std::size_t i = 0; i < n; ++i) {
    if (i > 0) s += (i + 1 == n) ? " and " : ", ";
    s += detail::a_obj(sc.objects[i]);
  }
  return s + ".";
}

// Stage 2: count, attributes and left-to-right relations.
inline std::string detailed_caption(const Scene& sc) {
  const auto n = sc.objects.size();
  const auto& o = sc.objects;
  if (n == 1) return "there is one shape: " + detail::a_obj(o[0]) + " on the " + (o[0].cx < sc.size / 2.0 ? "left." : "right.");
  std::string s = "there are " + detail::count_word(n) + " shapes: " + detail::a_obj(o[0]) + " to the left of " +
                  detail::a_obj(o[1]);
  if (n == 3) s += ", which is to the left of " + detail::a_obj(o[2]);
  return s + ".";
}

// One question of the given type about the scene.
inline Question make_question(const Scene& sc, std::string_view type, Rng& rng, int colours = 6) {
  const auto& o = sc.objects;
  const std::size_t n = o.size();
  Question q;
  q.type = std::string(type);
  if (type == "colour") {
    const auto i = std::size_t(detail::uniform_int(rng, int(n)));
    q.question = "what colour is the " + detail::by_shape(sc, i) + "?";
    q.answer = std::string(o[i].colour_name());
  } else if (type == "shape") {
    const auto i = std::size_t(detail::uniform_int(rng, int(n)));
    q.question = "what shape is the " + detail::by_colour(sc, i) + "?";
    q.answer = std::string(o[i].shape_name());
  } else if (type == "count") {
    const int kind = detail::uniform_int(rng, 4);  // 0, 1: all shapes; 2: one shape; 3: one colour
    if (kind < 2) {
      q.question = "how many shapes are there?";
      q.answer = detail::count_word(n);
    } else if (kind == 2) {
      const auto k = ShapeKind(detail::uniform_int(rng, 3));
      q.question = "how many " + std::string(kShapeNames[std::size_t(k)]) + "s are there?";
      q.answer = detail::count_word(detail::count_if_obj(sc, [&](const ShapeObject& p) { return p.shape == k; }));
    } else {
      const int c = detail::uniform_int(rng, colours);
      q.question = "how many " + std::string(kColours[std::size_t(c)].name) + " shapes are there?";
      q.answer = detail::count_word(detail::count_if_obj(sc, [&](const ShapeObject& p) { return p.colour == c; }));
    }
  } else if (type == "position") {
    if (n == 1) {
      q.question = "is the " + std::string(o[0].shape_name()) + " on the left or the right?";
      q.answer = o[0].cx < sc.size / 2.0 ? "left" : "right";
    } else if (detail::uniform_int(rng, 2) == 0) {
      // Exactly one object is left of o[1].
      q.question = "what is left of the " + detail::by_full(sc, 1) + "?";
      q.answer = std::string(o[0].shape_name());
    } else {
      q.question = "what is right of the " + detail::by_full(sc, n - 2) + "?";
      q.answer = std::string(o[n - 1].shape_name());
    }
  } else if (type == "yesno") {
    auto present = [&](int c, ShapeKind k) {
      return detail::count_if_obj(sc, [&](const ShapeObject& p) { return p.colour == c && p.shape == k; }) > 0;
    };
    int c;
    ShapeKind k;
    if (detail::uniform_int(rng, 2) == 0) {  // yes
      const auto& p = o[std::size_t(detail::uniform_int(rng, int(n)))];
      c = p.colour;
      k = p.shape;
    } else {  // no: a combination that is absent (n <= 3 < colours * 3, so one exists)
      do {
        c = detail::uniform_int(rng, colours);
        k = ShapeKind(detail::uniform_int(rng, 3));
      } while (present(c, k));
    }
    q.question = "is there a " + std::string(kColours[std::size_t(c)].name) + " " +
                 std::string(kShapeNames[std::size_t(k)]) + "?";
    q.answer = present(c, k) ? "yes" : "no";
  } else {
    fail("make_question: unknown question type '", type, "' (known: colour, shape, count, position, yesno)");
  }
  return q;
}

// ---- the whole world -------------------------------------------------------------------------------------------
inline constexpr std::string_view kStage1Prompt = "Describe the image briefly.";
inline constexpr std::string_view kStage2Prompt = "Describe the image in detail.";

struct ShapesWorldSummary {
  int train_images = 0, eval_images = 0;
  std::size_t stage1 = 0, stage2 = 0, stage3 = 0, eval = 0;  // records per file
};

namespace detail {
inline io::LlavaRecord qa_record(std::string id, std::string image, std::string_view human, std::string gpt,
                                 std::string type = {}) {
  io::LlavaRecord r;
  r.id = std::move(id);
  r.image = std::move(image);
  r.conversations.push_back({io::Role::user, "human", "<image>\n" + std::string(human)});
  r.conversations.push_back({io::Role::assistant, "gpt", std::move(gpt)});
  r.type = std::move(type);
  return r;
}
inline std::uint64_t fnv1a(const std::vector<std::uint8_t>& v) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (auto b : v) h = (h ^ b) * 0x100000001b3ull;
  return h;
}
inline std::string scene_name(std::string_view split, int i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%s_%06d", std::string(split).c_str(), i);
  return buf;
}
}  // namespace detail

// The scenes of both splits, as write_shapes_world() draws them. An eval scene whose pixels equal a training
// image's is redrawn (next attempt of its stream), so the splits share no image.
struct ShapesWorld {
  std::vector<Scene> train, eval;
  std::vector<io::Image> train_images, eval_images;
};
inline ShapesWorld generate_shapes_world(const ShapesConfig& c) {
  c.validate();
  ShapesWorld w;
  std::set<std::uint64_t> seen;
  for (int i = 0; i < c.train_images; ++i) {
    Rng rng = detail::stream(c.seed, detail::kTrainScenes, std::uint64_t(i));
    w.train.push_back(sample_scene(rng, c));
    w.train_images.push_back(render_scene(w.train.back(), c.supersample));
    seen.insert(detail::fnv1a(w.train_images.back().pixels));
  }
  for (int i = 0; i < c.eval_images; ++i) {
    for (std::uint64_t attempt = 0;; ++attempt) {
      Rng rng = detail::stream(c.seed, detail::kEvalScenes, std::uint64_t(i), attempt);
      Scene sc = sample_scene(rng, c);
      io::Image img = render_scene(sc, c.supersample);
      if (seen.count(detail::fnv1a(img.pixels))) continue;
      w.eval.push_back(std::move(sc));
      w.eval_images.push_back(std::move(img));
      break;
    }
  }
  return w;
}

// The four record lists (stage1, stage2, stage3, eval) for a generated world; image paths are "images/<name>.png".
struct ShapesRecords {
  std::vector<io::LlavaRecord> stage1, stage2, stage3, eval;
};
inline ShapesRecords shapes_records(const ShapesWorld& w, const ShapesConfig& c) {
  ShapesRecords out;
  for (int i = 0; i < int(w.train.size()); ++i) {
    const std::string name = detail::scene_name("train", i), image = "images/" + name + ".png";
    const Scene& sc = w.train[std::size_t(i)];
    out.stage1.push_back(detail::qa_record(name, image, kStage1Prompt, brief_caption(sc)));
    out.stage2.push_back(detail::qa_record(name, image, kStage2Prompt, detailed_caption(sc)));
    Rng rng = detail::stream(c.seed, detail::kTrainQuestions, std::uint64_t(i));
    // A random subset of distinct types, in a random order.
    std::array<std::size_t, kQuestionTypes.size()> types{};
    for (std::size_t t = 0; t < types.size(); ++t) types[t] = t;
    for (std::size_t t = types.size(); t > 1; --t) std::swap(types[t - 1], types[std::size_t(detail::uniform_int(rng, int(t)))]);
    for (int k = 0; k < c.questions_per_image; ++k) {
      const Question q = make_question(sc, kQuestionTypes[types[std::size_t(k)]], rng, c.colours);
      out.stage3.push_back(detail::qa_record(name + "_" + q.type, image, q.question, q.answer, q.type));
    }
  }
  for (int i = 0; i < int(w.eval.size()); ++i) {
    const std::string name = detail::scene_name("eval", i), image = "images/" + name + ".png";
    Rng rng = detail::stream(c.seed, detail::kEvalQuestions, std::uint64_t(i));
    for (auto type : kQuestionTypes) {
      const Question q = make_question(w.eval[std::size_t(i)], type, rng, c.colours);
      out.eval.push_back(detail::qa_record(name + "_" + q.type, image, q.question, q.answer, q.type));
    }
  }
  return out;
}

// Writes DIR/images/*.png, DIR/stage1.json, stage2.json, stage3.json, eval.json and DIR/shapes_world.json (the
// configuration, so a directory says how it was made). Same config → byte-identical files.
inline ShapesWorldSummary write_shapes_world(const std::string& dir, const ShapesConfig& c) {
  c.validate();
  namespace fs = std::filesystem;
  std::error_code ec;
  // Never into somebody else's files: the directory must be new, empty, or made by this function (its marker).
  if (fs::exists(dir, ec)) {
    CUMO_CHECK(fs::is_directory(dir, ec), "write_shapes_world: '", dir, "' exists and is not a directory");
    const bool empty = fs::directory_iterator(dir, ec) == fs::directory_iterator();
    CUMO_CHECK(empty || fs::is_regular_file(fs::path(dir) / "shapes_world.json", ec), "write_shapes_world: '", dir,
               "' holds other files and has no shapes_world.json (it was not made by this generator): refusing to "
               "write into it; choose a new or empty directory");
  }
  fs::create_directories(fs::path(dir) / "images", ec);
  CUMO_CHECK(!ec, "write_shapes_world: cannot create '", (fs::path(dir) / "images").string(), "': ", ec.message());
  const ShapesWorld w = generate_shapes_world(c);
  for (std::size_t i = 0; i < w.train.size(); ++i)
    io::write_png((fs::path(dir) / "images" / (detail::scene_name("train", int(i)) + ".png")).string(), w.train_images[i]);
  for (std::size_t i = 0; i < w.eval.size(); ++i)
    io::write_png((fs::path(dir) / "images" / (detail::scene_name("eval", int(i)) + ".png")).string(), w.eval_images[i]);
  const ShapesRecords r = shapes_records(w, c);
  io::save_llava_json((fs::path(dir) / "stage1.json").string(), r.stage1);
  io::save_llava_json((fs::path(dir) / "stage2.json").string(), r.stage2);
  io::save_llava_json((fs::path(dir) / "stage3.json").string(), r.stage3);
  io::save_llava_json((fs::path(dir) / "eval.json").string(), r.eval);

  nlohmann::ordered_json meta;
  meta["generator"] = "cumo shapes world";
  meta["version"] = 1;
  meta["seed"] = c.seed;
  meta["image_size"] = c.image_size;
  meta["min_objects"] = c.min_objects;
  meta["max_objects"] = c.max_objects;
  meta["min_size"] = c.min_size;  // float: printed with its exact binary value
  meta["max_size"] = c.max_size;
  meta["min_dx"] = c.min_dx;
  meta["colours"] = c.colours;
  meta["supersample"] = c.supersample;
  meta["train_images"] = c.train_images;
  meta["eval_images"] = c.eval_images;
  meta["questions_per_image"] = c.questions_per_image;
  meta["question_types"] = std::vector<std::string>(kQuestionTypes.begin(), kQuestionTypes.end());
  meta["files"] = {{"stage1", "stage1.json"}, {"stage2", "stage2.json"}, {"stage3", "stage3.json"}, {"eval", "eval.json"}};
  const std::string text = meta.dump(2) + "\n";
  io::write_file_atomic((fs::path(dir) / "shapes_world.json").string(), text.data(), text.size(),
                                "write_shapes_world");

  ShapesWorldSummary s;
  s.train_images = int(w.train.size());
  s.eval_images = int(w.eval.size());
  s.stage1 = r.stage1.size();
  s.stage2 = r.stage2.size();
  s.stage3 = r.stage3.size();
  s.eval = r.eval.size();
  return s;
}

}  // namespace cumo::data
