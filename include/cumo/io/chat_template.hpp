#pragma once
// The conversation template and tokenisation of LLaVA records with image-token expansion and assistant-only labels.
// The default template, "mistral", follows the Mistral-instruct format that CuMo's Mistral models use (LLaVA's
// conv_mistral_instruct, LLAMA_2 separator style):
//   <s>[INST] {human_1} [/INST] {gpt_1}</s>[INST] {human_2} [/INST] {gpt_2}</s>
// <s> and </s> are the tokenizer's bos/eos ids, never text. Labels are -100 everywhere except the tokens of each
// gpt answer and the eos that closes it, so the model learns to answer and to stop. Labels are NOT shifted (HF
// convention: the loss shifts them). docs/data.md lists every template.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/io/llava_json.hpp"
#include "cumo/io/tokenizer.hpp"

namespace cumo::io {

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
  bool system_in_first_user = false;      // LLaMA-2 style: the system text goes after the first user_prefix

  // <s>[INST] {human} [/INST] {gpt}</s>[INST] ... (CuMo's Mistral-instruct models)
  static ChatTemplate mistral() { return ChatTemplate{}; }
  // CuMo's evaluation and serving template (LLaVA's conv_mistral_instruct_system, LLAMA_2 style): the system
  // message inside the first [INST] —
  //   <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{human} [/INST] {gpt}</s>
  static ChatTemplate mistral_instruct_system() {
    ChatTemplate t;
    t.name = "mistral_instruct_system";
    t.system = "<<SYS>>\nA chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.\n<</SYS>>\n\n";
    t.system_in_first_user = true;
    return t;
  }
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
    if (n == "mistral" || n == "mistral_instruct") return mistral();
    if (n == "mistral_instruct_system") return mistral_instruct_system();
    if (n == "plain") return plain();
    if (n == "vicuna") return vicuna();
    if (n == "chat") return chat();
    fail("ChatTemplate: unknown template '", n, "' (known: mistral (= mistral_instruct), mistral_instruct_system, plain, vicuna, chat)");
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
  if (!t.system_in_first_user) push_text(t.system, false);
  bool image_done = false, system_done = !t.system_in_first_user;
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
      if (!system_done) push_text(t.system, false);
      system_done = true;
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


}  // namespace cumo::io
