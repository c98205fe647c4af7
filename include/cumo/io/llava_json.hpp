#pragma once
// LLaVA-format records and their JSON file (LLaVA-1.5's llava_v1_5_mix665k.json and friends; JSON Lines with one
// record per line also work):
//   [{"id": "000001", "image": "images/000001.png",
//     "conversations": [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
//                       {"from": "gpt",   "value": "red"}, ...]}, ...]
// "image" is optional (text-only records), "id" may be a string or a number, extra fields are kept out of the
// way except "type" (a question type, used by the evaluation to report accuracy per type).
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/error.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/io/files.hpp"

namespace cumo::io {

inline constexpr std::int32_t kIgnoreLabel = -100;  // PyTorch's / HF's ignore_index
inline constexpr std::string_view kImagePlaceholder = "<image>";

// ================================================================================================================
// Records
// ================================================================================================================
enum class Role { user, assistant, system };

struct Turn {
  Role role = Role::user;
  std::string from;   // as written in the file ("human", "gpt", ...)
  std::string value;
};

struct LlavaRecord {
  std::string id;
  std::string image;  // path relative to the image root; empty for a text-only record
  std::vector<Turn> conversations;
  std::string type;   // optional question type ("colour", "count", ...); empty if absent
};

namespace detail {
inline Role parse_role(const std::string& from, const std::string& where) {
  if (from == "human" || from == "user") return Role::user;
  if (from == "gpt" || from == "assistant") return Role::assistant;
  if (from == "system") return Role::system;
  fail(where, ": unknown speaker \"from\": \"", from, "\" (expected human/user, gpt/assistant or system)");
}

inline LlavaRecord parse_record(const nlohmann::json& j, const std::string& source, std::size_t index) {
  const std::string where = "'" + source + "': record " + std::to_string(index);
  CUMO_CHECK(j.is_object(), where, ": expected a JSON object, got ", j.type_name());
  LlavaRecord r;
  if (auto it = j.find("id"); it != j.end()) {
    if (it->is_string())
      r.id = it->get<std::string>();
    else if (it->is_number_integer())
      r.id = std::to_string(it->get<std::int64_t>());
    else
      fail(where, ": \"id\" must be a string or an integer, got ", it->type_name());
  } else {
    r.id = std::to_string(index);
  }
  if (auto it = j.find("image"); it != j.end() && !it->is_null()) {
    CUMO_CHECK(it->is_string(), where, " (id ", r.id, "): \"image\" must be a string (one image per record), got ",
               it->type_name());
    r.image = it->get<std::string>();
    CUMO_CHECK(!r.image.empty(), where, " (id ", r.id, "): \"image\" is an empty string");
  }
  if (auto it = j.find("type"); it != j.end() && it->is_string()) r.type = it->get<std::string>();
  auto conv = j.find("conversations");
  CUMO_CHECK(conv != j.end(), where, " (id ", r.id, "): missing field \"conversations\"");
  CUMO_CHECK(conv->is_array(), where, " (id ", r.id, "): \"conversations\" must be an array, got ", conv->type_name());
  CUMO_CHECK(!conv->empty(), where, " (id ", r.id, "): \"conversations\" is empty");
  for (std::size_t t = 0; t < conv->size(); ++t) {
    const auto& tj = (*conv)[t];
    const std::string tw = where + " (id " + r.id + "), turn " + std::to_string(t);
    CUMO_CHECK(tj.is_object(), tw, ": expected an object, got ", tj.type_name());
    auto f = tj.find("from");
    auto v = tj.find("value");
    CUMO_CHECK(f != tj.end(), tw, ": missing field \"from\"");
    CUMO_CHECK(v != tj.end(), tw, ": missing field \"value\"");
    CUMO_CHECK(f->is_string(), tw, ": \"from\" must be a string, got ", f->type_name());
    CUMO_CHECK(v->is_string(), tw, ": \"value\" must be a string, got ", v->type_name());
    Turn turn;
    turn.from = f->get<std::string>();
    turn.role = parse_role(turn.from, tw);
    turn.value = v->get<std::string>();
    r.conversations.push_back(std::move(turn));
  }
  return r;
}
}  // namespace detail

// Parses the text of a LLaVA JSON file (an array of records), or JSON Lines when `json_lines` is set. Bad JSON,
// a wrong type or a missing field throws cumo::Error naming `source` and the record index (and line for JSONL).
inline std::vector<LlavaRecord> parse_llava_json(std::string_view text, const std::string& source = "<memory>",
                                                 bool json_lines = false) {
  std::vector<LlavaRecord> out;
  if (json_lines) {
    std::size_t line_no = 0, pos = 0;
    while (pos <= text.size()) {
      const std::size_t nl = std::min(text.find('\n', pos), text.size());
      std::string_view line = text.substr(pos, nl - pos);
      ++line_no;
      pos = nl + 1;
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) {
        if (nl >= text.size()) break;
        continue;
      }
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail("'", source, "': line ", line_no, " (record ", out.size(), "): invalid JSON: ", e.what());
      }
      out.push_back(detail::parse_record(j, source, out.size()));
      if (nl >= text.size()) break;
    }
    return out;
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail("'", source, "': invalid JSON: ", e.what());
  }
  CUMO_CHECK(j.is_array(), "'", source, "': expected a JSON array of records at the top level, got ", j.type_name());
  out.reserve(j.size());
  for (std::size_t i = 0; i < j.size(); ++i) out.push_back(detail::parse_record(j[i], source, i));
  return out;
}

// Reads a .json file (array) or a .jsonl file (one record per line).
inline std::vector<LlavaRecord> load_llava_json(const std::string& path) {
  require_regular_file(path, "load_llava_json");
  std::ifstream f(path, std::ios::binary);
  CUMO_CHECK(f, "load_llava_json: cannot open '", path, "': ", std::strerror(errno));
  std::stringstream ss;
  ss << f.rdbuf();
  const bool jsonl = std::filesystem::path(path).extension() == ".jsonl";
  return parse_llava_json(ss.str(), path, jsonl);
}

inline nlohmann::ordered_json to_json(const LlavaRecord& r) {
  nlohmann::ordered_json j;
  j["id"] = r.id;
  if (!r.image.empty()) j["image"] = r.image;
  auto conv = nlohmann::ordered_json::array();
  for (const Turn& t : r.conversations) {
    std::string from = t.from;
    if (from.empty()) from = t.role == Role::user ? "human" : t.role == Role::assistant ? "gpt" : "system";
    conv.push_back({{"from", from}, {"value", t.value}});
  }
  j["conversations"] = std::move(conv);
  if (!r.type.empty()) j["type"] = r.type;
  return j;
}

// Writes records as a LLaVA JSON array (keys in the order id, image, conversations, type; the same records always
// give the same bytes), atomically.
inline void save_llava_json(const std::string& path, const std::vector<LlavaRecord>& records) {
  auto arr = nlohmann::ordered_json::array();
  for (const auto& r : records) arr.push_back(to_json(r));
  const std::string text = arr.dump(1) + "\n";
  write_file_atomic(path, text.data(), text.size(), "save_llava_json");
}


}  // namespace cumo::io
