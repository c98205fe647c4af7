#pragma once
// Preference data and the hallucination metric for the built-in shapes world (data/shapes_world.hpp), for
// LLaVA-MoD's preference distillation (docs/llava_mod.md).
//
// A pair shares the image and the prompt; both answers come from the scene's ground truth:
//   chosen    the correct answer (make_question's answer, brief_caption for captions)
//   rejected  an answer that mentions an ABSENT object / colour / shape whenever the question allows one, else a
//             wrong attribute:
//     colour     a colour no object in the image has                       (else another object's colour)
//     shape      a shape absent from the image                             (else another object's shape)
//     position   "what is left of X?": an absent shape (else a wrong one);  "left or right?": the other side
//     count      the true count + 1 (claims one object more than there is)
//     yesno      "yes" about an absent object; "no" about a present one (a denial: the only wrong answer)
//     caption    the brief caption with one object's colour swapped for an absent colour, its shape swapped so
//                the colour–shape pair is absent, or an absent object added
//
// Hallucination (CHAIR-style, on the words of an answer): a colour word or shape word (singular or plural) that
// names nothing in the image, or a "colour shape" pair with no such object. With the question, two more claims of
// absent objects count: "yes" to "is there a C S?" when there is none, and a number above the true count for
// "how many … are there?". A wrong answer that names only present things ("blue" for the red circle when a blue
// square is there) is wrong but not a hallucination — the metric sits beside exact-match accuracy.
#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/error.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/data/shapes_world.hpp"
#include "cumo/io/image.hpp"

namespace cumo::data {

struct PreferencePair {
  std::string id, image;  // as the shapes world's records name them ("train_000012_colour", "images/train_000012.png")
  std::string type;       // question type, or "caption"
  std::string prompt;     // the human turn without "<image>\n"
  std::string chosen, rejected;
  std::string error;      // why rejected is wrong: absent_colour, absent_shape, absent_object, wrong_colour,
                          // wrong_shape, wrong_side, over_count, false_yes, false_no
};

// ---- hallucination ----------------------------------------------------------------------------------------------
struct HallucinationCheck {
  bool hallucinated = false;
  std::vector<std::string> absent;  // what the answer claims that the image lacks: "green", "triangle",
                                    // "red square", "yes: green triangle", "count 3 > 2"
};

namespace detail {
inline std::vector<std::string> words(std::string_view s) {
  std::vector<std::string> w;
  std::string cur;
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (std::isalnum(c)) {
      cur += char(std::tolower(c));
    } else if (!cur.empty()) {
      w.push_back(cur);
      cur.clear();
    }
  }
  if (!cur.empty()) w.push_back(cur);
  return w;
}
// colour index of a word (any of kColours, whatever the world's colour count), or -1
inline int colour_of_word(const std::string& w) {
  for (std::size_t c = 0; c < kColours.size(); ++c)
    if (w == kColours[c].name) return int(c);
  return -1;
}
// shape of a word, singular or plural, or -1
inline int shape_of_word(const std::string& w) {
  for (std::size_t k = 0; k < kShapeNames.size(); ++k)
    if (w == kShapeNames[k] || w == std::string(kShapeNames[k]) + "s") return int(k);
  return -1;
}
inline bool has_colour(const Scene& sc, int c) {
  return std::any_of(sc.objects.begin(), sc.objects.end(), [&](const ShapeObject& o) { return o.colour == c; });
}
inline bool has_shape(const Scene& sc, int k) {
  return std::any_of(sc.objects.begin(), sc.objects.end(), [&](const ShapeObject& o) { return int(o.shape) == k; });
}
inline bool has_pair(const Scene& sc, int c, int k) {
  return std::any_of(sc.objects.begin(), sc.objects.end(),
                     [&](const ShapeObject& o) { return o.colour == c && int(o.shape) == k; });
}
inline void note(HallucinationCheck& h, std::string what) {
  if (std::find(h.absent.begin(), h.absent.end(), what) == h.absent.end()) h.absent.push_back(std::move(what));
  h.hallucinated = true;
}
inline bool parse_count(const std::string& w, std::int64_t& n) {
  static const std::array<std::string_view, 11> names = {"zero", "one", "two",   "three", "four", "five",
                                                         "six",  "seven", "eight", "nine",  "ten"};
  if (!w.empty() && std::all_of(w.begin(), w.end(), [](char c) { return c >= '0' && c <= '9'; }) && w.size() < 10) {
    n = std::stoll(w);
    return true;
  }
  for (std::size_t i = 0; i < names.size(); ++i)
    if (w == names[i]) {
      n = std::int64_t(i);
      return true;
    }
  return false;
}
}  // namespace detail

inline HallucinationCheck check_hallucination(const Scene& sc, std::string_view answer, std::string_view question = {}) {
  HallucinationCheck h;
  const auto w = detail::words(answer);
  for (std::size_t i = 0; i < w.size(); ++i) {
    const int c = detail::colour_of_word(w[i]);
    const int k = detail::shape_of_word(w[i]);
    if (c >= 0) {
      if (!detail::has_colour(sc, c)) detail::note(h, w[i]);
      const int next = i + 1 < w.size() ? detail::shape_of_word(w[i + 1]) : -1;
      if (next >= 0 && detail::has_colour(sc, c) && detail::has_shape(sc, next) && !detail::has_pair(sc, c, next))
        detail::note(h, w[i] + " " + std::string(kShapeNames[std::size_t(next)]));
    }
    if (k >= 0 && !detail::has_shape(sc, k)) detail::note(h, std::string(kShapeNames[std::size_t(k)]));
  }
  if (question.empty() || w.empty()) return h;
  const auto q = detail::words(question);
  // "is there a C S?" answered yes
  if (q.size() >= 5 && q[0] == "is" && q[1] == "there" && (q[2] == "a" || q[2] == "an") && w[0] == "yes") {
    const int c = detail::colour_of_word(q[3]), k = detail::shape_of_word(q[4]);
    if (c >= 0 && k >= 0 && !detail::has_pair(sc, c, k)) detail::note(h, "yes: " + q[3] + " " + q[4]);
  }
  // "how many [C] shapes / Ss are there?" answered above the truth
  std::int64_t n = 0;
  if (q.size() >= 3 && q[0] == "how" && q[1] == "many" && detail::parse_count(w[0], n)) {
    std::int64_t truth = -1;
    const int c = detail::colour_of_word(q[2]);
    if (c >= 0 && q.size() >= 4 && q[3] == "shapes")
      truth = std::int64_t(std::count_if(sc.objects.begin(), sc.objects.end(), [&](const ShapeObject& o) { return o.colour == c; }));
    else if (q[2] == "shapes")
      truth = std::int64_t(sc.objects.size());
    else if (const int k = detail::shape_of_word(q[2]); k >= 0)
      truth = std::int64_t(std::count_if(sc.objects.begin(), sc.objects.end(), [&](const ShapeObject& o) { return int(o.shape) == k; }));
    if (truth >= 0 && n > truth) detail::note(h, "count " + std::to_string(n) + " > " + std::to_string(truth));
  }
  return h;
}

// Answers checked, hallucinated, and both per question type.
struct HallucinationStats {
  std::int64_t answers = 0, hallucinated = 0;
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> per_type;  // type → (answers, hallucinated)

  void add(const Scene& sc, std::string_view question, std::string_view answer, const std::string& type = {}) {
    const bool bad = check_hallucination(sc, answer, question).hallucinated;
    ++answers;
    hallucinated += bad;
    if (!type.empty()) {
      auto& t = per_type[type];
      ++t.first;
      t.second += bad;
    }
  }
  double rate() const { return answers ? double(hallucinated) / double(answers) : 0.0; }
  double rate(const std::string& type) const {
    const auto it = per_type.find(type);
    return it == per_type.end() || it->second.first == 0 ? 0.0 : double(it->second.second) / double(it->second.first);
  }
};

// The share of answers[i] (to questions[i] about scenes[i]) that hallucinate; question may be empty (captions).
inline double hallucination_rate(const std::vector<Scene>& scenes, const std::vector<std::string>& questions,
                                 const std::vector<std::string>& answers) {
  CUMO_CHECK(scenes.size() == answers.size() && (questions.empty() || questions.size() == answers.size()),
             "hallucination_rate: ", scenes.size(), " scenes, ", questions.size(), " questions, ", answers.size(),
             " answers");
  HallucinationStats s;
  for (std::size_t i = 0; i < answers.size(); ++i) s.add(scenes[i], questions.empty() ? "" : questions[i], answers[i]);
  return s.rate();
}

// ---- pairs --------------------------------------------------------------------------------------------------------
namespace detail {
inline constexpr std::uint64_t kPreferenceStream = 5;  // beside shapes_world's splits 1–4

// Indices in [0, n) for which keep(i), in increasing order.
template <class Keep>
inline std::vector<int> candidates(int n, Keep keep) {
  std::vector<int> v;
  for (int i = 0; i < n; ++i)
    if (keep(i)) v.push_back(i);
  return v;
}
inline int pick(Rng& rng, const std::vector<int>& v) { return v[std::size_t(uniform_int(rng, int(v.size())))]; }
}  // namespace detail

// A pair for one question about the scene (make_question's output). `colours`: the world's colour count.
inline PreferencePair preference_pair(const Scene& sc, const Question& q, Rng& rng, int colours = 6) {
  CUMO_CHECK(colours >= 2 && colours <= int(kColours.size()), "preference_pair: colours must be in [2, ",
             kColours.size(), "], got ", colours);
  CUMO_CHECK(!sc.objects.empty(), "preference_pair: the scene has no objects");
  PreferencePair p;
  p.type = q.type;
  p.prompt = q.question;
  p.chosen = q.answer;
  const int nshapes = int(kShapeNames.size());
  auto absent_colours = detail::candidates(colours, [&](int c) { return !detail::has_colour(sc, c); });
  auto absent_shapes = detail::candidates(nshapes, [&](int k) { return !detail::has_shape(sc, k); });
  auto other_colours = detail::candidates(colours, [&](int c) { return kColours[std::size_t(c)].name != q.answer; });
  auto other_shapes = detail::candidates(nshapes, [&](int k) { return kShapeNames[std::size_t(k)] != q.answer; });
  auto shape_answer = [&]() {
    if (!absent_shapes.empty()) {
      p.rejected = std::string(kShapeNames[std::size_t(detail::pick(rng, absent_shapes))]);
      p.error = "absent_shape";
    } else {
      p.rejected = std::string(kShapeNames[std::size_t(detail::pick(rng, other_shapes))]);
      p.error = "wrong_shape";
    }
  };
  if (q.type == "colour") {
    if (!absent_colours.empty()) {
      p.rejected = std::string(kColours[std::size_t(detail::pick(rng, absent_colours))].name);
      p.error = "absent_colour";
    } else {
      p.rejected = std::string(kColours[std::size_t(detail::pick(rng, other_colours))].name);
      p.error = "wrong_colour";
    }
  } else if (q.type == "shape") {
    shape_answer();
  } else if (q.type == "position") {
    if (q.answer == "left" || q.answer == "right") {
      p.rejected = q.answer == "left" ? "right" : "left";
      p.error = "wrong_side";
    } else {
      shape_answer();
    }
  } else if (q.type == "count") {
    std::int64_t n = 0;
    CUMO_CHECK(detail::parse_count(q.answer, n), "preference_pair: count answer '", q.answer, "' is not a number");
    p.rejected = std::to_string(n + 1);
    p.error = "over_count";
  } else if (q.type == "yesno") {
    p.rejected = q.answer == "yes" ? "no" : "yes";
    p.error = q.answer == "yes" ? "false_no" : "false_yes";
  } else {
    fail("preference_pair: unknown question type '", q.type, "'");
  }
  return p;
}

// A pair for the stage-1 caption: chosen = brief_caption(sc); rejected = the same caption with one hallucination.
inline PreferencePair caption_preference_pair(const Scene& sc, Rng& rng, int colours = 6) {
  CUMO_CHECK(colours >= 2 && colours <= int(kColours.size()), "caption_preference_pair: colours must be in [2, ",
             kColours.size(), "], got ", colours);
  CUMO_CHECK(!sc.objects.empty(), "caption_preference_pair: the scene has no objects");
  PreferencePair p;
  p.type = "caption";
  p.prompt = std::string(kStage1Prompt);
  p.chosen = brief_caption(sc);
  const int n = int(sc.objects.size()), nshapes = int(kShapeNames.size());
  const auto absent_colours = detail::candidates(colours, [&](int c) { return !detail::has_colour(sc, c); });
  Scene bad = sc;
  const int i = detail::uniform_int(rng, n);
  auto& o = bad.objects[std::size_t(i)];
  // shapes whose pair with the object's colour is absent (none when the scene holds all three shapes in that colour)
  const auto swap_shapes = detail::candidates(nshapes, [&](int k) { return !detail::has_pair(sc, o.colour, k); });
  std::vector<int> modes;  // 0: colour → an absent colour, 1: shape → an absent pair, 2: an absent object added
  if (!absent_colours.empty()) modes.push_back(0);
  if (!swap_shapes.empty()) modes.push_back(1);
  modes.push_back(2);
  const int mode = detail::pick(rng, modes);
  if (mode == 0) {
    o.colour = detail::pick(rng, absent_colours);
    p.error = "absent_colour";
  } else if (mode == 1) {
    o.shape = ShapeKind(detail::pick(rng, swap_shapes));
    p.error = detail::has_shape(sc, int(o.shape)) ? "absent_object" : "absent_shape";
  } else {
    // an object whose colour–shape pair is absent (n <= 3 < colours · 3, so one exists), at the right end
    std::vector<std::pair<int, int>> absent;
    for (int c = 0; c < colours; ++c)
      for (int k = 0; k < nshapes; ++k)
        if (!detail::has_pair(sc, c, k)) absent.emplace_back(c, k);
    const auto& [c, k] = absent[std::size_t(detail::uniform_int(rng, int(absent.size())))];
    ShapeObject extra;
    extra.colour = c;
    extra.shape = ShapeKind(k);
    bad.objects.push_back(extra);
    p.error = "absent_object";
  }
  p.rejected = brief_caption(bad);
  return p;
}

// One pair per question type and one caption pair for every training scene of the world, drawn from a stream of
// their own (seed, split 5, scene index), so they do not disturb the other files and are the same for the same seed.
inline std::vector<PreferencePair> preference_pairs(const ShapesWorld& w, const ShapesConfig& c, bool captions = true) {
  std::vector<PreferencePair> out;
  for (std::size_t i = 0; i < w.train.size(); ++i) {
    const std::string name = detail::scene_name("train", int(i)), image = "images/" + name + ".png";
    Rng rng = detail::stream(c.seed, detail::kPreferenceStream, std::uint64_t(i));
    const Scene& sc = w.train[i];
    for (auto type : kQuestionTypes) {
      PreferencePair p = preference_pair(sc, make_question(sc, type, rng, c.colours), rng, c.colours);
      p.id = name + "_" + p.type;
      p.image = image;
      out.push_back(std::move(p));
    }
    if (captions) {
      PreferencePair p = caption_preference_pair(sc, rng, c.colours);
      p.id = name + "_caption";
      p.image = image;
      out.push_back(std::move(p));
    }
  }
  return out;
}

// LLaVA-style JSON with TRL's preference fields: [{"id", "image", "type", "conversations": [{"from": "human",
// "value": "<image>\n…"}], "chosen", "rejected", "error"}, …]
inline nlohmann::ordered_json preference_json(const std::vector<PreferencePair>& pairs) {
  nlohmann::ordered_json a = nlohmann::ordered_json::array();
  for (const auto& p : pairs) {
    nlohmann::ordered_json j;
    j["id"] = p.id;
    j["image"] = p.image;
    j["type"] = p.type;
    j["conversations"] = nlohmann::ordered_json::array({{{"from", "human"}, {"value", "<image>\n" + p.prompt}}});
    j["chosen"] = p.chosen;
    j["rejected"] = p.rejected;
    j["error"] = p.error;
    a.push_back(std::move(j));
  }
  return a;
}
inline void save_preference_json(const std::string& path, const std::vector<PreferencePair>& pairs) {
  const std::string text = preference_json(pairs).dump(1) + "\n";
  io::write_file_atomic(path, text.data(), text.size(), "save_preference_json");
}

}  // namespace cumo::data
