// The built-in shapes world: determinism, answers that agree with the scene, a disjoint eval split, and files that
// load through the real LLaVA loaders.
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "cumo/data/shapes_world.hpp"
#include "cumo/io/llava_data.hpp"

namespace fs = std::filesystem;
using namespace cumo::data;

namespace {
std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
ShapesConfig small_world(std::uint64_t seed) {
  ShapesConfig c;
  c.seed = seed;
  c.train_images = 60;
  c.eval_images = 20;
  return c;
}
std::size_t count(const Scene& sc, const std::function<bool(const ShapeObject&)>& f) {
  return std::size_t(std::count_if(sc.objects.begin(), sc.objects.end(), f));
}
int colour_index(const std::string& name) {
  for (std::size_t i = 0; i < kColours.size(); ++i)
    if (kColours[i].name == name) return int(i);
  return -1;
}
int shape_index(const std::string& name) {
  for (std::size_t i = 0; i < kShapeNames.size(); ++i)
    if (kShapeNames[i] == name) return int(i);
  return -1;
}
bool starts(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

// Re-derives the answer of a question from the scene, independently of make_question's code path.
void check_answer(const Scene& sc, const std::string& type, const std::string& q, const std::string& a) {
  INFO(type, ": ", q, " -> ", a);
  const std::size_t n = sc.objects.size();
  if (type == "count") {
    const int got = std::stoi(a);
    if (q == "how many shapes are there?") {
      CHECK(got == int(n));
    } else {
      const std::string what = q.substr(9, q.find(" are there?") - 9);  // "circles" or "red shapes"
      if (what.size() > 7 && what.substr(what.size() - 7) == " shapes") {
        const int c = colour_index(what.substr(0, what.size() - 7));
        REQUIRE(c >= 0);
        CHECK(got == int(count(sc, [&](const ShapeObject& o) { return o.colour == c; })));
      } else {
        const int k = shape_index(what.substr(0, what.size() - 1));
        REQUIRE(k >= 0);
        CHECK(got == int(count(sc, [&](const ShapeObject& o) { return int(o.shape) == k; })));
      }
    }
  } else if (type == "yesno") {
    REQUIRE(starts(q, "is there a "));
    const std::string rest = q.substr(11, q.size() - 12);
    const auto sp = rest.find(' ');
    const int c = colour_index(rest.substr(0, sp)), k = shape_index(rest.substr(sp + 1));
    REQUIRE((c >= 0 && k >= 0));
    const bool present = count(sc, [&](const ShapeObject& o) { return o.colour == c && int(o.shape) == k; }) > 0;
    CHECK(a == (present ? "yes" : "no"));
  } else if (type == "colour") {
    REQUIRE(starts(q, "what colour is the "));
    const std::string ref = q.substr(19, q.size() - 20);  // "circle" or "left circle"
    const int k = shape_index(ref.substr(ref.rfind(' ') == std::string::npos ? 0 : ref.rfind(' ') + 1));
    REQUIRE(k >= 0);
    std::vector<const ShapeObject*> group;
    for (const auto& o : sc.objects)
      if (int(o.shape) == k) group.push_back(&o);
    REQUIRE(!group.empty());
    const ShapeObject* target = group[0];
    if (starts(ref, "right ")) target = group.back();
    else if (starts(ref, "middle ")) target = group[1];
    else if (!starts(ref, "left ")) CHECK(group.size() == 1);  // unqualified only when unique
    CHECK(a == target->colour_name());
  } else if (type == "shape") {
    REQUIRE(starts(q, "what shape is the "));
    std::string ref = q.substr(18, q.size() - 19 - std::string(" object").size());  // "red" or "left red"
    const auto sp = ref.rfind(' ');
    const int c = colour_index(sp == std::string::npos ? ref : ref.substr(sp + 1));
    REQUIRE(c >= 0);
    std::vector<const ShapeObject*> group;
    for (const auto& o : sc.objects)
      if (o.colour == c) group.push_back(&o);
    REQUIRE(!group.empty());
    const ShapeObject* target = group[0];
    if (starts(ref, "right ")) target = group.back();
    else if (starts(ref, "middle ")) target = group[1];
    else if (!starts(ref, "left ")) CHECK(group.size() == 1);
    CHECK(a == target->shape_name());
  } else if (type == "position") {
    if (n == 1) {
      CHECK(a == (sc.objects[0].cx < sc.size / 2.0 ? "left" : "right"));
    } else if (starts(q, "what is left of the ")) {
      CHECK(a == sc.objects[0].shape_name());  // the referent is the second object from the left
      CHECK(q.find(std::string(sc.objects[1].shape_name())) != std::string::npos);
    } else {
      REQUIRE(starts(q, "what is right of the "));
      CHECK(a == sc.objects[n - 1].shape_name());
      CHECK(q.find(std::string(sc.objects[n - 2].shape_name())) != std::string::npos);
    }
  } else {
    FAIL("unknown type ", type);
  }
}
}  // namespace

TEST_CASE("data/shapes: the same seed writes byte-identical files and another seed writes different ones") {
  const fs::path root = cumo::test::tmp_root() / "data_shapes_determinism";
  fs::remove_all(root);
  const ShapesConfig c = small_world(5);
  const auto s1 = write_shapes_world((root / "a").string(), c);
  const auto s2 = write_shapes_world((root / "b").string(), c);
  CHECK(s1.stage1 == 60);
  CHECK(s1.stage2 == 60);
  CHECK(s1.stage3 == 60 * 5);
  CHECK(s1.eval == 20 * 5);
  CHECK(s2.stage3 == s1.stage3);
  std::size_t files = 0;
  for (const auto& e : fs::recursive_directory_iterator(root / "a")) {
    if (!e.is_regular_file()) continue;
    const fs::path rel = fs::relative(e.path(), root / "a");
    INFO(rel.string());
    CHECK(slurp(e.path()) == slurp(root / "b" / rel));
    ++files;
  }
  CHECK(files == 60 + 20 + 5);  // images, four JSON files and shapes_world.json
  ShapesConfig other = c;
  other.seed = 6;
  write_shapes_world((root / "c").string(), other);
  CHECK(slurp(root / "a" / "stage3.json") != slurp(root / "c" / "stage3.json"));
  // Scene i does not depend on how many scenes were asked for.
  ShapesConfig fewer = c;
  fewer.train_images = 10;
  const auto w_all = generate_shapes_world(c), w_few = generate_shapes_world(fewer);
  for (int i = 0; i < 10; ++i) CHECK(w_few.train_images[std::size_t(i)] == w_all.train_images[std::size_t(i)]);
}

TEST_CASE("data/shapes: scenes are valid and every caption and answer agrees with the scene") {
  const ShapesConfig c = small_world(11);
  const ShapesWorld w = generate_shapes_world(c);
  const ShapesRecords r = shapes_records(w, c);
  std::map<std::string, const Scene*> by_image;
  for (std::size_t i = 0; i < w.train.size(); ++i)
    by_image["images/train_" + std::string(6 - std::to_string(i).size(), '0') + std::to_string(i) + ".png"] = &w.train[i];
  for (std::size_t i = 0; i < w.eval.size(); ++i)
    by_image["images/eval_" + std::string(6 - std::to_string(i).size(), '0') + std::to_string(i) + ".png"] = &w.eval[i];

  std::map<std::size_t, int> object_counts;
  for (const auto& [name, scp] : by_image) {
    const Scene& sc = *scp;
    const auto n = sc.objects.size();
    ++object_counts[n];
    CHECK((n >= 1 && n <= 3));
    for (std::size_t i = 0; i < n; ++i) {
      const auto& o = sc.objects[i];
      CHECK(o.cx - o.bound() >= 0);
      CHECK(o.cx + o.bound() <= sc.size);
      CHECK(o.cy - o.bound() >= 0);
      CHECK(o.cy + o.bound() <= sc.size);
      if (i > 0) CHECK(o.cx - sc.objects[i - 1].cx >= c.min_dx * sc.size);  // sorted, well separated
      for (std::size_t j = 0; j < i; ++j) {
        const double dx = o.cx - sc.objects[j].cx, dy = o.cy - sc.objects[j].cy;
        CHECK(std::sqrt(dx * dx + dy * dy) >= o.bound() + sc.objects[j].bound());  // no overlap
      }
    }
  }
  CHECK(object_counts.size() == 3);  // 1, 2 and 3 objects all occur

  // The rendered pixel under each object's centre has exactly the object's colour (antialiasing only at edges).
  for (std::size_t i = 0; i < w.train.size(); ++i)
    for (const auto& o : w.train[i].objects) {
      const auto& img = w.train_images[i];
      const auto& col = kColours[std::size_t(o.colour)];
      CHECK(img.at(int(o.cy), int(o.cx), 0) == col.r);
      CHECK(img.at(int(o.cy), int(o.cx), 1) == col.g);
      CHECK(img.at(int(o.cy), int(o.cx), 2) == col.b);
    }

  // Captions: stage 1 lists the objects left to right, stage 2 states the count.
  for (std::size_t i = 0; i < r.stage1.size(); ++i) {
    const Scene& sc = *by_image.at(r.stage1[i].image);
    const std::string& cap = r.stage1[i].conversations[1].value;
    std::size_t pos = 0;
    for (const auto& o : sc.objects) {
      const auto p = cap.find(std::string(o.colour_name()) + " " + std::string(o.shape_name()), pos);
      CHECK(p != std::string::npos);
      pos = p + 1;
    }
    const std::string& det = r.stage2[i].conversations[1].value;
    if (sc.objects.size() == 1) CHECK(starts(det, "there is one shape: "));
    else CHECK(starts(det, "there are " + std::to_string(sc.objects.size()) + " shapes: "));
  }

  // Every stage-3 and eval answer, re-derived from the scene.
  std::map<std::string, std::map<std::string, int>> answers;
  for (const auto* list : {&r.stage3, &r.eval})
    for (const auto& rec : *list) {
      REQUIRE(rec.conversations.size() == 2);
      const std::string q = rec.conversations[0].value.substr(std::string("<image>\n").size());
      check_answer(*by_image.at(rec.image), rec.type, q, rec.conversations[1].value);
      ++answers[rec.type][rec.conversations[1].value];
    }
  CHECK(answers.size() == 5);
  CHECK(answers["yesno"]["yes"] > 0);
  CHECK(answers["yesno"]["no"] > 0);
}

TEST_CASE("data/shapes: the eval split is held out (own images, no pixel-identical scene) and balanced by type") {
  const ShapesConfig c = small_world(3);
  const ShapesWorld w = generate_shapes_world(c);
  const ShapesRecords r = shapes_records(w, c);
  std::set<std::string> train_imgs, eval_imgs;
  for (const auto* list : {&r.stage1, &r.stage2, &r.stage3})
    for (const auto& rec : *list) train_imgs.insert(rec.image);
  for (const auto& rec : r.eval) eval_imgs.insert(rec.image);
  CHECK(train_imgs.size() == 60);
  CHECK(eval_imgs.size() == 20);
  for (const auto& e : eval_imgs) CHECK(train_imgs.count(e) == 0);
  std::set<std::string> train_pixels;  // pixel bytes as strings (GCC 12 misreads set<vector<uint8_t>> at -O3)
  auto key = [](const cumo::io::Image& im) { return std::string(im.pixels.begin(), im.pixels.end()); };
  for (const auto& im : w.train_images) train_pixels.insert(key(im));
  for (const auto& im : w.eval_images) CHECK(train_pixels.count(key(im)) == 0);
  std::map<std::string, int> per_type;
  for (const auto& rec : r.eval) ++per_type[rec.type];
  REQUIRE(per_type.size() == 5);
  for (const auto& [t, n] : per_type) CHECK(n == 20);
}

TEST_CASE("data/shapes: the written world loads through the LLaVA data set with the byte tokenizer") {
  const fs::path d = cumo::test::tmp_root() / "data_shapes_load";
  fs::remove_all(d);
  ShapesConfig c = small_world(9);
  c.questions_per_image = 2;
  write_shapes_world(d.string(), c);
  const cumo::io::ByteTokenizer tok;
  cumo::io::DataOptions opt;
  opt.image_tokens = 16;  // 32x32 images, 8x8 patches
  opt.preprocess.size = 32;
  for (const char* f : {"stage1.json", "stage2.json", "stage3.json", "eval.json"}) {
    const auto ds = cumo::io::LlavaDataset::load((d / f).string(), tok, opt);
    CHECK(ds.size() > 0);
    const auto b = cumo::io::collate(ds, std::vector<std::size_t>{0, ds.size() - 1});
    CHECK(b.pixels.shape() == cumo::Shape{2, 3, 32, 32});
    CHECK(std::count(b.input_ids.begin(), b.input_ids.end(), tok.image_id()) == 2 * 16);
  }
  const auto st3 = cumo::io::LlavaDataset::load((d / "stage3.json").string(), tok, opt);
  CHECK(st3.size() == 60 * 2);
  const auto ev = cumo::io::LlavaDataset::load((d / "eval.json").string(), tok, opt);
  CHECK(ev.types() == std::vector<std::string>{"colour", "count", "position", "shape", "yesno"});
  const auto meta = nlohmann::json::parse(slurp(d / "shapes_world.json"));
  CHECK(meta.at("seed").get<int>() == 9);
  CHECK(meta.at("image_size").get<int>() == 32);
}

TEST_CASE("data/shapes: bad settings and unknown question types are errors with a reason") {
  ShapesConfig c;
  c.max_objects = 4;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("objects per image"), cumo::Error);
  c = ShapesConfig{};
  c.colours = 1;
  CHECK_THROWS_AS(c.validate(), cumo::Error);
  c = ShapesConfig{};
  c.questions_per_image = 6;
  CHECK_THROWS_AS(c.validate(), cumo::Error);
  cumo::Rng rng(1);
  const Scene sc = sample_scene(rng, ShapesConfig{});
  CHECK_THROWS_WITH_AS(make_question(sc, "size", rng), doctest::Contains("unknown question type"), cumo::Error);
}
