#pragma once
// cumo_distill's evaluation: exact match per question type on the shapes world's eval split, and the hallucination
// rate (an answer naming an object the scene does not have; data/preference.hpp's check).
#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "app/eval.hpp"
#include "cumo/data/preference.hpp"
#include "cumo/data/shapes_world.hpp"
#include "cumo/io/llava_data.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/models/cumo.hpp"

namespace cumo::app {

struct DistillEval {
  double accuracy = 0, hallucination = 0;
  std::int64_t records = 0;
  std::map<std::string, std::pair<double, double>> per_type;  // type → (accuracy, hallucination rate)
  nlohmann::json to_json() const {
    nlohmann::json j = {{"accuracy", accuracy}, {"hallucination_rate", hallucination}, {"records", records}};
    for (const auto& [t, v] : per_type) j["per_type"][t] = {{"accuracy", v.first}, {"hallucination_rate", v.second}};
    return j;
  }
};

// eval records are the shapes world's ("eval_<index>_<type>"); scenes: the world's eval scenes, for the
// hallucination check. Writes one JSON line per record to `predictions` when given.
inline DistillEval evaluate_student(models::CuMo<>& m, const io::Tokenizer& tok, const io::LlavaDataset& data,
                                    const std::vector<data::Scene>& scenes, const io::ChatTemplate& chat,
                                    int image_tokens, std::int64_t max_new, std::int64_t limit,
                                    std::ostream* predictions = nullptr) {
  std::size_t n = data.size();
  if (limit > 0) n = std::min<std::size_t>(n, std::size_t(limit));
  CUMO_CHECK(n > 0, "evaluate_student: no eval records");
  std::map<std::string, std::array<std::int64_t, 3>> by_type;  // correct, hallucinated, total
  DistillEval ev;
  std::int64_t correct = 0, halluc = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const io::LlavaRecord& r = data.record(i);
    const auto [got, want] = greedy_answer(m, tok, data, i, chat, image_tokens, max_new, "eval record " + std::to_string(i));
    // "eval_000012_colour" → scene 12
    std::size_t scene = 0;
    bool has_scene = false;
    if (r.id.starts_with("eval_")) {
      try {
        scene = std::stoul(r.id.substr(5, r.id.find('_', 5) - 5));
        has_scene = scene < scenes.size();
      } catch (const std::exception&) {
      }
    }
    CUMO_CHECK(has_scene, "evaluate_student: record '", r.id, "' names no scene of the shapes world's eval split");
    std::string question;
    for (const auto& t : r.conversations)
      if (t.role == io::Role::user) question = t.value;
    if (auto pos = question.find("<image>"); pos != std::string::npos) question.erase(pos, 7);
    const auto hc = data::check_hallucination(scenes[scene], got, trim_answer(question));
    const bool ok = got == want;
    auto& s = by_type[r.type];
    s[0] += ok;
    s[1] += hc.hallucinated;
    s[2] += 1;
    correct += ok;
    halluc += hc.hallucinated;
    if (predictions)
      *predictions << nlohmann::json{{"id", r.id}, {"type", r.type}, {"answer", want}, {"prediction", got},
                                     {"correct", ok}, {"hallucinated", hc.hallucinated}}
                          .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                   << "\n";
  }
  ev.records = std::int64_t(n);
  ev.accuracy = double(correct) / double(n);
  ev.hallucination = double(halluc) / double(n);
  for (const auto& [t, s] : by_type) ev.per_type[t] = {double(s[0]) / double(s[2]), double(s[1]) / double(s[2])};
  return ev;
}

}  // namespace cumo::app
