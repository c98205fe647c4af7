#pragma once
// LLaVA-format data: the JSON file, the conversation template, tokenisation with image-token expansion and
// assistant-only labels, a data set of (input_ids, labels, pixels) samples, padding into batches, and a
// deterministic shuffled batch iterator whose position can be saved and restored exactly (resume).
//
// The file format (LLaVA-1.5's llava_v1_5_mix665k.json and friends; JSON Lines with one record per line also work):
//   [{"id": "000001", "image": "images/000001.png",
//     "conversations": [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
//                       {"from": "gpt",   "value": "red"}, ...]}, ...]
// "image" is optional (text-only records), "id" may be a string or a number, extra fields are kept out of the
// way except "type" (a question type, used by the evaluation to report accuracy per type).
//
// Templates (see docs/data.md). The default, "mistral", follows the Mistral-instruct format that CuMo's Mistral
// models use (LLaVA's conv_mistral_instruct, LLAMA_2 separator style):
//   <s>[INST] {human_1} [/INST] {gpt_1}</s>[INST] {human_2} [/INST] {gpt_2}</s>
// <s> and </s> are the tokenizer's bos/eos ids, never text. Labels are -100 everywhere except the tokens of each
// gpt answer and the eos that closes it, so the model learns to answer and to stop. Labels are NOT shifted (HF
// convention: the loss shifts them).
#include <algorithm>
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
#include "cumo/io/image.hpp"
#include "cumo/io/tokenizer.hpp"

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
  detail::write_file_atomic(path, text.data(), text.size(), "save_llava_json");
}

// ================================================================================================================
// Conversation template
// ================================================================================================================
struct ChatTemplate {
  std::string name = "mistral";
  std::string system;                     // after bos, before the first user turn; never labelled
  std::string user_prefix = "[INST] ";    // before each user message
  std::string user_suffix = " [/INST] ";  // after each user message; the answer follows directly
  std::string assistant_suffix;           // after each answer's eos (unlabelled)
  bool add_bos = true;
  bool image_only_user = false;           // "plain": user text dropped, only its image tokens kept

  // <s>[INST] {human} [/INST] {gpt}</s>[INST] ... (CuMo's Mistral-instruct models)
  static ChatTemplate mistral() { return ChatTemplate{}; }
  // LLaVA's stage-1 "plain" format: <s>{image tokens}{caption}</s>. Only the image of the user turn is kept.
  static ChatTemplate plain() {
    ChatTemplate t;
    t.name = "plain";
    t.user_prefix.clear();
    t.user_suffix.clear();
    t.image_only_user = true;
    return t;
  }
  // LLaVA-1.5's vicuna_v1: "{system} USER: {human} ASSISTANT: {gpt}</s>USER: ..."
  static ChatTemplate vicuna() {
    ChatTemplate t;
    t.name = "vicuna";
    t.system = "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions.";
    t.user_prefix = " USER: ";
    t.user_suffix = " ASSISTANT: ";
    return t;
  }
  // A compact "USER: {human}\nASSISTANT: {gpt}</s>\n" for short byte-level sequences.
  static ChatTemplate chat() {
    ChatTemplate t;
    t.name = "chat";
    t.user_prefix = "USER: ";
    t.user_suffix = "\nASSISTANT: ";
    t.assistant_suffix = "\n";
    return t;
  }
  static ChatTemplate from_name(std::string_view n) {
    if (n == "mistral") return mistral();
    if (n == "plain") return plain();
    if (n == "vicuna") return vicuna();
    if (n == "chat") return chat();
    fail("ChatTemplate: unknown template '", n, "' (known: mistral, plain, vicuna, chat)");
  }
};

// ================================================================================================================
// Tokenisation
// ================================================================================================================
struct TokenizedConversation {
  std::vector<std::int32_t> ids;
  std::vector<std::int32_t> labels;  // kIgnoreLabel except answer tokens and their eos
  std::int32_t image_tokens = 0;     // how many ids are the image id
  bool truncated = false;
};

namespace detail {
inline std::size_t count_placeholders(std::string_view s) {
  std::size_t n = 0;
  for (std::size_t p = s.find(kImagePlaceholder); p != std::string_view::npos;
       p = s.find(kImagePlaceholder, p + kImagePlaceholder.size()))
    ++n;
  return n;
}

// Renders the record. With `prompt_only`, stops right before the last assistant answer (generation prompt) and
// returns that answer in *answer.
inline TokenizedConversation render_conversation(const LlavaRecord& r, const Tokenizer& tok, const ChatTemplate& t,
                                                 int image_tokens, bool prompt_only, std::string* answer,
                                                 const std::string& where) {
  TokenizedConversation out;
  auto push = [&](const std::vector<std::int32_t>& ids, bool labelled) {
    out.ids.insert(out.ids.end(), ids.begin(), ids.end());
    out.labels.insert(out.labels.end(), ids.size(), 0);
    auto it = out.labels.end() - std::ptrdiff_t(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) it[std::ptrdiff_t(i)] = labelled ? ids[i] : kIgnoreLabel;
  };
  auto push_text = [&](std::string_view s, bool labelled) {
    if (!s.empty()) push(tok.encode(s), labelled);
  };

  // Skip leading non-user turns other than system (LLaVA drops a conversation's first turn if it is not human).
  std::size_t first = 0;
  while (first < r.conversations.size() && r.conversations[first].role == Role::assistant) ++first;
  CUMO_CHECK(first < r.conversations.size(), where, ": the conversation has no user turn");

  std::size_t placeholders = 0;
  for (std::size_t i = first; i < r.conversations.size(); ++i) {
    const auto n = count_placeholders(r.conversations[i].value);
    CUMO_CHECK(n == 0 || r.conversations[i].role == Role::user, where, ": turn ", i, " (", r.conversations[i].from,
               ") contains <image>; only a user turn may hold the image placeholder");
    placeholders += n;
  }
  const bool has_image = !r.image.empty();
  CUMO_CHECK(has_image || placeholders == 0, where, ": the text has ", placeholders,
             " <image> placeholder(s) but the record has no \"image\"");
  CUMO_CHECK(placeholders <= 1, where, ": ", placeholders, " <image> placeholders; one image per record is supported");
  CUMO_CHECK(!has_image || image_tokens > 0, where, ": the record has an image but image_tokens = ", image_tokens,
             " (set it to the vision tower's patch count)");

  // Index of the last assistant turn (the answer a prompt-only render stops before).
  std::size_t last_answer = r.conversations.size();
  for (std::size_t i = r.conversations.size(); i-- > first;)
    if (r.conversations[i].role == Role::assistant) {
      last_answer = i;
      break;
    }

  if (t.add_bos) push({tok.bos_id()}, false);
  push_text(t.system, false);
  bool image_done = false;
  Role prev = Role::system;
  for (std::size_t i = first; i < r.conversations.size(); ++i) {
    const Turn& turn = r.conversations[i];
    if (turn.role == Role::system) {
      CUMO_CHECK(i == first, where, ": a system turn may only come first (turn ", i, ")");
      push_text(turn.value, false);
      prev = Role::system;
      continue;
    }
    CUMO_CHECK(turn.role == Role::user ? prev != Role::user : prev == Role::user, where, ": turn ", i, " (",
               turn.from, ") ", turn.role == Role::user ? "follows another user turn" : "does not answer a user turn",
               "; a conversation must alternate user / assistant");
    prev = turn.role;
    if (turn.role == Role::user) {
      std::string value = turn.value;
      // LLaVA: a record with an image but no placeholder gets "<image>\n" in front of its first user message.
      if (has_image && !image_done && placeholders == 0) value = std::string(kImagePlaceholder) + "\n" + value;
      push_text(t.user_prefix, false);
      const std::size_t p = value.find(kImagePlaceholder);
      if (p != std::string::npos && !image_done) {
        if (!t.image_only_user) push_text(std::string_view(value).substr(0, p), false);
        push(std::vector<std::int32_t>(std::size_t(image_tokens), tok.image_id()), false);
        out.image_tokens += image_tokens;
        if (!t.image_only_user) push_text(std::string_view(value).substr(p + kImagePlaceholder.size()), false);
        image_done = true;
      } else if (!t.image_only_user) {
        push_text(value, false);
      }
      push_text(t.user_suffix, false);
    } else {
      if (prompt_only && i == last_answer) {
        if (answer) *answer = turn.value;
        return out;
      }
      push_text(turn.value, true);
      push({tok.eos_id()}, true);
      push_text(t.assistant_suffix, false);
    }
  }
  if (answer) answer->clear();
  return out;
}
}  // namespace detail

// input_ids and labels for training. `image_tokens` ids of the tokenizer's image id replace the <image>
// placeholder. With max_length > 0, a longer sequence is cut at the end (`truncated` is set); a cut that would
// split the image tokens throws, since the features could no longer be matched to the prompt.
inline TokenizedConversation tokenize_conversation(const LlavaRecord& r, const Tokenizer& tok,
                                                   const ChatTemplate& t, int image_tokens, int max_length = 0,
                                                   const std::string& where = "tokenize_conversation") {
  TokenizedConversation out = detail::render_conversation(r, tok, t, image_tokens, false, nullptr, where);
  if (max_length > 0 && std::int64_t(out.ids.size()) > max_length) {
    const auto last_img = std::find(out.ids.rbegin(), out.ids.rend(), tok.image_id());
    if (out.image_tokens > 0 && last_img != out.ids.rend()) {
      const std::int64_t pos = std::int64_t(out.ids.rend() - last_img) - 1;
      CUMO_CHECK(pos < max_length, where, ": max_length ", max_length, " cuts through the ", out.image_tokens,
                 " image tokens (the last is at position ", pos, "); raise max_length");
    }
    out.ids.resize(std::size_t(max_length));
    out.labels.resize(std::size_t(max_length));
    out.truncated = true;
  }
  return out;
}

// The generation prompt: everything before the last assistant answer (it ends with the template's user_suffix),
// and that answer as the reference.
struct TokenizedPrompt {
  std::vector<std::int32_t> ids;
  std::int32_t image_tokens = 0;
  std::string answer;
};
inline TokenizedPrompt tokenize_prompt(const LlavaRecord& r, const Tokenizer& tok, const ChatTemplate& t,
                                       int image_tokens, const std::string& where = "tokenize_prompt") {
  TokenizedPrompt p;
  auto tc = detail::render_conversation(r, tok, t, image_tokens, true, &p.answer, where);
  p.ids = std::move(tc.ids);
  p.image_tokens = tc.image_tokens;
  return p;
}

// ================================================================================================================
// Data set
// ================================================================================================================
struct DataOptions {
  int image_tokens = 0;          // ids per <image>: the number of patch features the connector emits per image
  int max_length = 0;            // 0: no limit
  ChatTemplate chat = ChatTemplate::mistral();
  ClipPreprocess preprocess{};   // size, crop, resample, pad/crop, mean/std
  std::string image_root;        // "" = the directory of the JSON file
  bool check_images = true;      // every referenced image must exist when the data set is built
  bool cache_images = true;      // keep each preprocessed image in memory after its first use
};

struct Sample {
  std::vector<std::int64_t> input_ids, labels;  // (L), (L)
  Tensor pixels;                                // (3, S, S) f32; undefined for a text-only record
  std::size_t index = 0;
};

class LlavaDataset {
 public:
  // Reads the JSON, tokenises every record (so a bad record fails now, not mid-training) and checks the images.
  static LlavaDataset load(const std::string& json_path, const Tokenizer& tok, DataOptions opt = {}) {
    if (opt.image_root.empty()) opt.image_root = std::filesystem::path(json_path).parent_path().string();
    return LlavaDataset(load_llava_json(json_path), tok, std::move(opt), json_path);
  }

  LlavaDataset(std::vector<LlavaRecord> records, const Tokenizer& tok, DataOptions opt,
               std::string source = "<memory>")
      : records_(std::move(records)), opt_(std::move(opt)), source_(std::move(source)),
        pad_id_(tok.pad_id()), image_id_(tok.image_id()), mutex_(std::make_unique<std::mutex>()) {
    tokens_.reserve(records_.size());
    for (std::size_t i = 0; i < records_.size(); ++i) {
      const std::string where = "'" + source_ + "': record " + std::to_string(i) + " (id " + records_[i].id + ")";
      tokens_.push_back(tokenize_conversation(records_[i], tok, opt_.chat, opt_.image_tokens, opt_.max_length, where));
      if (opt_.check_images && !records_[i].image.empty()) {
        std::error_code ec;
        const std::string p = image_path(i);
        CUMO_CHECK(std::filesystem::is_regular_file(p, ec), where, ": image file '", p, "' does not exist");
      }
    }
    cache_.resize(records_.size());
  }

  std::size_t size() const { return records_.size(); }
  const LlavaRecord& record(std::size_t i) const { return records_.at(i); }
  const TokenizedConversation& tokens(std::size_t i) const { return tokens_.at(i); }
  bool has_image(std::size_t i) const { return !records_.at(i).image.empty(); }
  const DataOptions& options() const { return opt_; }
  const std::string& source() const { return source_; }
  std::int32_t pad_id() const { return pad_id_; }
  std::int32_t image_id() const { return image_id_; }
  int image_size() const { return opt_.preprocess.crop_size(); }

  std::string image_path(std::size_t i) const {
    const std::filesystem::path p(records_.at(i).image);
    return p.is_absolute() || opt_.image_root.empty() ? p.string() : (std::filesystem::path(opt_.image_root) / p).string();
  }

  // The preprocessed image of record i, (3, S, S) f32. Thread-safe. The returned tensor may share memory with the
  // cache: treat it as read-only (collate() copies it).
  Tensor pixels(std::size_t i) const {
    CUMO_CHECK(i < size(), "LlavaDataset::pixels: index ", i, " out of range (size ", size(), ")");
    CUMO_CHECK(has_image(i), "LlavaDataset::pixels: record ", i, " (id ", records_[i].id, ") has no image");
    if (opt_.cache_images) {
      std::lock_guard<std::mutex> lock(*mutex_);
      if (cache_[i].defined()) return cache_[i];
    }
    Tensor t;
    try {
      t = clip_preprocess_file(image_path(i), opt_.preprocess);  // (3, S, S)
    } catch (const Error& e) {
      fail("'", source_, "': record ", i, " (id ", records_[i].id, "): ", e.what());
    }
    if (opt_.cache_images) {
      std::lock_guard<std::mutex> lock(*mutex_);
      cache_[i] = t;
    }
    return t;
  }

  Sample get(std::size_t i) const {
    CUMO_CHECK(i < size(), "LlavaDataset::get: index ", i, " out of range (size ", size(), ")");
    Sample s;
    s.index = i;
    const auto& tc = tokens_[i];
    s.input_ids.assign(tc.ids.begin(), tc.ids.end());
    s.labels.assign(tc.labels.begin(), tc.labels.end());
    if (has_image(i)) s.pixels = pixels(i).clone();
    return s;
  }

  // Indices of the records whose "type" equals `type` (all records for an empty type).
  std::vector<std::size_t> indices_of_type(std::string_view type) const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < size(); ++i)
      if (type.empty() || records_[i].type == type) out.push_back(i);
    return out;
  }
  // The distinct non-empty types, sorted.
  std::vector<std::string> types() const {
    std::vector<std::string> t;
    for (const auto& r : records_)
      if (!r.type.empty()) t.push_back(r.type);
    std::sort(t.begin(), t.end());
    t.erase(std::unique(t.begin(), t.end()), t.end());
    return t;
  }

 private:
  std::vector<LlavaRecord> records_;
  std::vector<TokenizedConversation> tokens_;
  DataOptions opt_;
  std::string source_;
  std::int32_t pad_id_ = 0, image_id_ = 0;
  std::unique_ptr<std::mutex> mutex_;
  mutable std::vector<Tensor> cache_;
};

// ================================================================================================================
// Batches
// ================================================================================================================
struct Batch {
  std::int64_t B = 0, T = 0;
  std::vector<std::int64_t> input_ids;  // (B*T) row-major, right-padded with the pad id
  std::vector<std::int64_t> labels;     // (B*T) kIgnoreLabel on prompt, image and padding positions
  std::vector<std::uint8_t> key_valid;  // (B*T) 1 = real token, 0 = padding (the attention key mask)
  std::vector<std::int64_t> lengths;    // (B) real tokens per row
  Tensor pixels;                        // (images, 3, S, S) f32 for the rows that have an image, in row order
  std::vector<std::uint8_t> has_image;  // (B)
  std::vector<std::size_t> indices;     // (B) data-set indices of the rows

  std::int64_t images() const { return pixels.defined() ? pixels.size(0) : 0; }
  std::int64_t tokens() const {
    std::int64_t n = 0;
    for (auto l : lengths) n += l;
    return n;
  }
  // Labelled positions (before the causal shift).
  std::int64_t label_count() const {
    return std::count_if(labels.begin(), labels.end(), [](std::int64_t y) { return y != kIgnoreLabel; });
  }
};

// Pads the samples to the longest one (rounded up to a multiple of `pad_multiple`).
inline Batch collate(const LlavaDataset& data, std::span<const std::size_t> indices, std::int64_t pad_multiple = 1) {
  constexpr const char* where = "collate";
  CUMO_CHECK(!indices.empty(), where, ": no indices");
  CUMO_CHECK(pad_multiple >= 1, where, ": pad_multiple must be >= 1, got ", pad_multiple);
  Batch b;
  b.B = std::int64_t(indices.size());
  std::int64_t T = 0, n_img = 0;
  for (std::size_t i : indices) {
    CUMO_CHECK(i < data.size(), where, ": index ", i, " out of range (data set size ", data.size(), ")");
    T = std::max<std::int64_t>(T, std::int64_t(data.tokens(i).ids.size()));
    n_img += data.has_image(i) ? 1 : 0;
  }
  T = (T + pad_multiple - 1) / pad_multiple * pad_multiple;
  b.T = T;
  b.input_ids.assign(std::size_t(b.B * T), data.pad_id());
  b.labels.assign(std::size_t(b.B * T), kIgnoreLabel);
  b.key_valid.assign(std::size_t(b.B * T), 0);
  b.lengths.resize(std::size_t(b.B));
  b.has_image.resize(std::size_t(b.B));
  b.indices.assign(indices.begin(), indices.end());
  const int S = data.image_size();
  if (n_img) b.pixels = Tensor::empty({n_img, 3, S, S});  // (images, 3, S, S)
  std::int64_t img = 0;
  for (std::int64_t r = 0; r < b.B; ++r) {
    const std::size_t i = indices[std::size_t(r)];
    const auto& tc = data.tokens(i);
    const std::size_t off = std::size_t(r * T);
    std::copy(tc.ids.begin(), tc.ids.end(), b.input_ids.begin() + std::ptrdiff_t(off));
    std::copy(tc.labels.begin(), tc.labels.end(), b.labels.begin() + std::ptrdiff_t(off));
    std::fill_n(b.key_valid.begin() + std::ptrdiff_t(off), tc.ids.size(), std::uint8_t(1));
    b.lengths[std::size_t(r)] = std::int64_t(tc.ids.size());
    b.has_image[std::size_t(r)] = data.has_image(i);
    if (data.has_image(i)) {
      const Tensor p = data.pixels(i);  // (3, S, S)
      CUMO_CHECK(p.numel() == 3 * std::int64_t(S) * S, where, ": image of record ", i, " has shape ", p.shape(),
                 ", expected (3, ", S, ", ", S, ")");
      b.pixels[img].copy_from(p.view({3, S, S}));
      ++img;
    }
  }
  return b;
}
inline Batch collate(const LlavaDataset& data, const std::vector<std::size_t>& indices, std::int64_t pad_multiple = 1) {
  return collate(data, std::span<const std::size_t>(indices), pad_multiple);
}

// Where a BatchIterator stands: the epoch and how many samples of that epoch's order have been consumed. With the
// seed and the data set size (checked on restore) this determines every later batch exactly.
struct DataPosition {
  std::uint64_t seed = 0;
  std::uint64_t epoch = 0;
  std::uint64_t offset = 0;
  std::uint64_t dataset_size = 0;

  nlohmann::json to_json() const {
    return {{"seed", seed}, {"epoch", epoch}, {"offset", offset}, {"dataset_size", dataset_size}};
  }
  static DataPosition from_json(const nlohmann::json& j) {
    DataPosition p;
    try {
      p.seed = j.at("seed").get<std::uint64_t>();
      p.epoch = j.at("epoch").get<std::uint64_t>();
      p.offset = j.at("offset").get<std::uint64_t>();
      p.dataset_size = j.at("dataset_size").get<std::uint64_t>();
    } catch (const nlohmann::json::exception& e) {
      fail("DataPosition::from_json: ", e.what(), " in ", j.dump());
    }
    return p;
  }
  friend bool operator==(const DataPosition&, const DataPosition&) = default;
};

// Endless shuffled batches: every epoch is a fresh permutation (Fisher–Yates driven by a Philox stream that is a
// pure function of (seed, epoch)), so the order never depends on how many batches were drawn before and a saved
// DataPosition restores it exactly. drop_last = false: an epoch's last batch may be smaller.
class BatchIterator {
 public:
  BatchIterator(const LlavaDataset& data, std::int64_t batch_size, std::uint64_t seed, bool shuffle = true,
                bool drop_last = false, std::int64_t pad_multiple = 1)
      : data_(&data), batch_(batch_size), seed_(seed), shuffle_(shuffle), drop_last_(drop_last),
        pad_multiple_(pad_multiple) {
    CUMO_CHECK(batch_size >= 1, "BatchIterator: batch_size must be >= 1, got ", batch_size);
    CUMO_CHECK(data.size() > 0, "BatchIterator: the data set '", data.source(), "' is empty");
    CUMO_CHECK(!drop_last || std::int64_t(data.size()) >= batch_size, "BatchIterator: drop_last with batch_size ",
               batch_size, " but only ", data.size(), " samples: every batch would be dropped");
    build_order();
  }

  // The data-set indices of the next batch (advances the position).
  std::vector<std::size_t> next_indices() {
    const std::size_t n = data_->size();
    if (offset_ >= n || (drop_last_ && offset_ + std::size_t(batch_) > n)) {
      ++epoch_;
      offset_ = 0;
      build_order();
    }
    const std::size_t end = std::min(n, offset_ + std::size_t(batch_));
    std::vector<std::size_t> idx(order_.begin() + std::ptrdiff_t(offset_), order_.begin() + std::ptrdiff_t(end));
    offset_ = end;
    return idx;
  }
  Batch next() { return collate(*data_, next_indices(), pad_multiple_); }

  DataPosition position() const { return {seed_, epoch_, offset_, data_->size()}; }
  void set_position(const DataPosition& p) {
    CUMO_CHECK(p.seed == seed_, "BatchIterator::set_position: the position was saved with seed ", p.seed,
               " but this iterator uses seed ", seed_);
    CUMO_CHECK(p.dataset_size == data_->size(), "BatchIterator::set_position: the position was saved for ",
               p.dataset_size, " samples but the data set '", data_->source(), "' has ", data_->size());
    CUMO_CHECK(p.offset <= data_->size(), "BatchIterator::set_position: offset ", p.offset, " > data set size ",
               data_->size());
    epoch_ = p.epoch;
    offset_ = std::size_t(p.offset);
    build_order();
  }

  std::int64_t batches_per_epoch() const {
    const auto n = std::int64_t(data_->size());
    return drop_last_ ? n / batch_ : (n + batch_ - 1) / batch_;
  }
  std::uint64_t epoch() const { return epoch_; }
  std::int64_t batch_size() const { return batch_; }
  const std::vector<std::size_t>& order() const { return order_; }  // this epoch's permutation

  // The permutation of epoch `epoch` for a data set of n samples (identity without shuffling).
  static std::vector<std::size_t> epoch_order(std::size_t n, std::uint64_t seed, std::uint64_t epoch, bool shuffle) {
    std::vector<std::size_t> o(n);
    for (std::size_t i = 0; i < n; ++i) o[i] = i;
    if (!shuffle) return o;
    Rng rng(mix(seed, epoch));
    for (std::size_t i = n; i > 1; --i) {
      // Lemire's multiply-shift maps 32 random bits to [0, i) (bias < i / 2^32, irrelevant here).
      const std::size_t j = std::size_t((std::uint64_t(rng.next_u32()) * std::uint64_t(i)) >> 32);
      std::swap(o[i - 1], o[j]);
    }
    return o;
  }

 private:
  static std::uint64_t mix(std::uint64_t seed, std::uint64_t epoch) {
    // splitmix64 of (seed, epoch): a distinct, well-spread Philox key per epoch.
    std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (epoch + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  void build_order() { order_ = epoch_order(data_->size(), seed_, epoch_, shuffle_); }

  const LlavaDataset* data_;
  std::int64_t batch_;
  std::uint64_t seed_;
  bool shuffle_, drop_last_;
  std::int64_t pad_multiple_;
  std::uint64_t epoch_ = 0;
  std::size_t offset_ = 0;
  std::vector<std::size_t> order_;
};

}  // namespace cumo::io
