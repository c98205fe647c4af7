#pragma once
// Greedy answers to LLaVA-format records, as exact match compares them: the evaluation of cumo_eval and of the
// distillation student.
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/io/llava_data.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/models/cumo.hpp"

namespace cumo::app {

// A generated or reference answer without surrounding white space (what exact match compares).
inline std::string trim_answer(std::string s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return {};
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// Record i of `data` asked of `m`: its prompt (the turns up to the last answer, in `chat`'s template) and image,
// answered greedily (at most max_new tokens, stopping at EOS) — the prediction and the reference answer, both
// trimmed, as exact match compares them. `where` names the record in tokenizer errors.
struct GreedyAnswer {
  std::string prediction, answer;
};
template <class Backend>
GreedyAnswer greedy_answer(models::CuMo<Backend>& m, const io::Tokenizer& tok, const io::LlavaDataset& data,
                           std::size_t i, const io::ChatTemplate& chat, int image_tokens, std::int64_t max_new,
                           const std::string& where) {
  const auto p = io::tokenize_prompt(data.record(i), tok, chat, image_tokens, where);
  // Without a reference, exact match compares two empty strings and the accuracy (and its baselines) read 1.0.
  CUMO_CHECK(!trim_answer(p.answer).empty(), where, " (id ", data.record(i).id, ") has no reference answer (no "
             "assistant turn, or an empty one): there is nothing to evaluate it against");
  Tensor pixels;
  if (data.has_image(i)) {
    const Tensor px = data.pixels(i);  // (3, S, S)
    pixels = px.contiguous().view({1, px.size(0), px.size(1), px.size(2)});
  }
  const std::vector<std::int64_t> ids(p.ids.begin(), p.ids.end());
  return {trim_answer(tok.decode(m.generate(ids, pixels, max_new, tok.eos_id()), /*skip_special=*/true)),
          trim_answer(p.answer)};
}

}  // namespace cumo::app
