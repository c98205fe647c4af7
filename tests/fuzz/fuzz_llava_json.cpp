// libFuzzer harness for the LLaVA data path: cumo::io::parse_llava_json (a JSON array, or JSON Lines) and the chat
// template that turns a record into token ids and labels. Any byte string must either parse or throw cumo::Error,
// never crash, read out of bounds, hit undefined behaviour (ASan + UBSan) or throw anything else. Accepted inputs
// are checked for two properties: the records written back (to_json) parse to the same records, and every record
// tokenizes (or is refused with cumo::Error) into ids and labels of equal length whose labels are ids or ignored.
//
// Built by tests/fuzz/CMakeLists.txt with clang++ -fsanitize=fuzzer,address,undefined. Compiled with
// CUMO_FUZZ_MAKE_SEEDS by the ordinary compiler, the same file writes the seed corpus and dictionary.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "cumo/io/chat_template.hpp"
#include "cumo/io/llava_json.hpp"
#include "cumo/io/tokenizer.hpp"

namespace {

[[noreturn]] void violated(const char* what) {
  std::fprintf(stderr, "fuzz_llava_json: property violated: %s\n", what);
  std::abort();
}

bool same(const cumo::io::LlavaRecord& a, const cumo::io::LlavaRecord& b) {
  if (a.id != b.id || a.image != b.image || a.type != b.type || a.conversations.size() != b.conversations.size())
    return false;
  for (std::size_t i = 0; i < a.conversations.size(); ++i)
    if (a.conversations[i].role != b.conversations[i].role || a.conversations[i].from != b.conversations[i].from || a.conversations[i].value != b.conversations[i].value)
      return false;
  return true;
}

void run_one(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return;
  // The first byte picks the format, the rest is the text.
  const bool jsonl = data[0] & 1;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  std::vector<cumo::io::LlavaRecord> recs;
  try {
    recs = cumo::io::parse_llava_json(text, "fuzz-input", jsonl);
  } catch (const cumo::Error&) {
    return;
  }
  // Round trip through the writer's JSON.
  std::string again = "[";
  for (std::size_t i = 0; i < recs.size(); ++i) {
    if (i) again += ",";
    again += cumo::io::to_json(recs[i]).dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  }
  again += "]";
  std::vector<cumo::io::LlavaRecord> back;
  try {
    back = cumo::io::parse_llava_json(again, "roundtrip");
  } catch (const cumo::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    violated("records written back do not parse");
  }
  if (back.size() != recs.size()) violated("round trip changed the record count");
  for (std::size_t i = 0; i < recs.size(); ++i)
    if (!same(recs[i], back[i])) violated("round trip changed a record");

  static const cumo::io::ByteTokenizer tok;
  for (const char* name : {"mistral", "plain"}) {
    const auto chat = cumo::io::ChatTemplate::from_name(name);
    for (const auto& r : recs) {
      try {
        const auto t = cumo::io::tokenize_conversation(r, tok, chat, 4, 64, "fuzz");
        if (t.ids.size() != t.labels.size()) violated("ids and labels differ in length");
        if (t.ids.size() > 64) violated("max_length not honoured");
        for (std::size_t i = 0; i < t.ids.size(); ++i)
          if (t.labels[i] != cumo::io::kIgnoreLabel && t.labels[i] != t.ids[i]) violated("a label is not its id");
      } catch (const cumo::Error&) {
      }
    }
  }
}

}  // namespace

#ifndef CUMO_FUZZ_MAKE_SEEDS

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    run_one(data, size);
  } catch (const nlohmann::json::exception& e) {
    // A writer-side JSON error (e.g. invalid UTF-8 accepted by the reader) is a finding too.
    std::fprintf(stderr, "fuzz_llava_json: nlohmann exception escaped: %s\n", e.what());
    std::abort();
  }
  return 0;
}

#else  // ---- seed corpus + dictionary writer ----------------------------------------------------------------------

#include <filesystem>
#include <fstream>

// fuzz_llava_json_seeds <seed-dir> <dict-file>
int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <seed-dir> <dict-file>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir(argv[1]);
  std::filesystem::create_directories(dir);
  const std::vector<std::string> seeds = {
      // '0' + a JSON array, '1' + JSON Lines (the harness's first byte picks the format)
      R"(0[{"id": "a", "image": "images/train_000000.png", "type": "colour", "conversations": [)"
      R"({"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}]}])",
      R"(0[{"id": "b", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},)"
      R"( {"from": "gpt", "value": "hello"}, {"from": "human", "value": "again"}, {"from": "gpt", "value": ""}]}])",
      "1{\"id\": \"c\", \"conversations\": [{\"from\": \"user\", \"value\": \"q\"}, "
      "{\"from\": \"assistant\", \"value\": \"a\"}]}\n\n{\"id\": 7, \"conversations\": []}\n",
      R"(0[{"id": "d", "image": "x.png", "conversations": [{"from": "human", "value": "<image><image>two"}]}])",
      "0[]",
  };
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    std::ofstream f(dir / ("seed_" + std::to_string(i)), std::ios::binary | std::ios::trunc);
    f << seeds[i];
    // every seed must hold the harness's properties (a broken seed would hide a broken harness)
    run_one(reinterpret_cast<const std::uint8_t*>(seeds[i].data()), seeds[i].size());
  }
  std::ofstream d(argv[2], std::ios::trunc);
  for (const char* t : {"\"id\"", "\"image\"", "\"type\"", "\"conversations\"", "\"from\"", "\"value\"", "\"human\"",
                        "\"gpt\"", "\"user\"", "\"assistant\"", "\"system\"", "\"<image>\"", "\\n", "\\u0000", "null",
                        "true", "[]", "{}"}) {
    std::string esc;
    for (const char* c = t; *c; ++c) {
      if (*c == '"' || *c == '\\') esc += '\\';
      esc += *c;
    }
    d << "\"" << esc << "\"\n";
  }
  return d ? 0 : 1;
}

#endif
