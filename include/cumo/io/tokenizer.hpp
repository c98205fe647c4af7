#pragma once
// Tokenizers behind one interface: a byte-level tokenizer that is always built in, and SentencePiece
// (`tokenizer.model`, the Llama/Mistral/Vicuna format) when the program is built with it.
//
// Byte-level vocabulary (260 ids):
//   0..255  the bytes of the UTF-8 text
//   256 <pad>   257 <s> (bos)   258 </s> (eos)   259 <image> (the placeholder that image features replace)
//
// SentencePiece is optional. It is used only when the including translation unit defines
// CUMO_WITH_SENTENCEPIECE=1 (CMake: link the target `cumo::sentencepiece`, which defines it and links
// libsentencepiece) AND <sentencepiece_processor.h> is found. Without it, asking for a `.model` file throws a
// cumo::Error that says how to enable it. The two configurations put their factory functions in different inline
// namespaces, so a program that mixes translation units built with and without SentencePiece stays ODR-clean.
#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cumo/core/error.hpp"

#if defined(CUMO_WITH_SENTENCEPIECE) && CUMO_WITH_SENTENCEPIECE
#if __has_include(<sentencepiece_processor.h>)
#include <sentencepiece_processor.h>
#define CUMO_HAS_SENTENCEPIECE 1
#else
#error "CUMO_WITH_SENTENCEPIECE is set but <sentencepiece_processor.h> was not found (Debian: libsentencepiece-dev)"
#endif
#else
#define CUMO_HAS_SENTENCEPIECE 0
#endif

namespace cumo::io {

// The interface the data pipeline and the trainer use. encode() never adds bos/eos: the conversation template
// decides where they go. Special tokens are ids, not text: encode("<s>") gives the bytes '<', 's', '>', so user
// text can never forge a control token; encode_with_specials() is the opt-in that maps the literal strings.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  std::vector<std::int32_t> encode(std::string_view text) const { return encode_text(text); }

  // Maps the literal strings "<s>", "</s>", "<pad>" and "<image>" to their ids; everything between them is
  // encoded as plain text.
  std::vector<std::int32_t> encode_with_specials(std::string_view text) const {
    const std::array<std::pair<std::string_view, std::int32_t>, 4> specials = {
        std::pair<std::string_view, std::int32_t>{"<image>", image_id()}, {"<pad>", pad_id()}, {"</s>", eos_id()},
        {"<s>", bos_id()}};
    std::vector<std::int32_t> out;
    std::size_t pos = 0, seg = 0;
    while (pos < text.size()) {
      bool matched = false;
      for (const auto& [s, id] : specials)
        if (text.compare(pos, s.size(), s) == 0) {
          append(out, encode_text(text.substr(seg, pos - seg)));
          out.push_back(id);
          pos += s.size();
          seg = pos;
          matched = true;
          break;
        }
      if (!matched) ++pos;
    }
    append(out, encode_text(text.substr(seg)));
    return out;
  }

  // skip_special: drop bos/eos/pad/image ids; otherwise they are written as "<s>", "</s>", "<pad>", "<image>".
  std::string decode(std::span<const std::int32_t> ids, bool skip_special = true) const {
    return decode_ids(ids, skip_special);
  }
  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special = true) const {
    return decode_ids(std::span<const std::int32_t>(ids), skip_special);
  }
  std::string decode(std::span<const std::int64_t> ids, bool skip_special = true) const {
    std::vector<std::int32_t> v(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      CUMO_CHECK(ids[i] >= std::numeric_limits<std::int32_t>::min() && ids[i] <= std::numeric_limits<std::int32_t>::max(), name(), " tokenizer: id ", ids[i], " out of range");
      v[i] = std::int32_t(ids[i]);
    }
    return decode_ids(v, skip_special);
  }
  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special = true) const {
    return decode(std::span<const std::int64_t>(ids), skip_special);
  }

  // Size of the id space, image id included: an embedding table needs this many rows.
  virtual std::int32_t vocab_size() const = 0;
  virtual std::int32_t bos_id() const = 0;
  virtual std::int32_t eos_id() const = 0;
  virtual std::int32_t pad_id() const = 0;
  virtual std::int32_t image_id() const = 0;
  virtual std::string name() const = 0;  // "byte" or "sentencepiece:<path>"

  bool is_special(std::int32_t id) const {
    return id == bos_id() || id == eos_id() || id == pad_id() || id == image_id();
  }

 protected:
  virtual std::vector<std::int32_t> encode_text(std::string_view text) const = 0;
  virtual std::string decode_ids(std::span<const std::int32_t> ids, bool skip_special) const = 0;

  std::string special_text(std::int32_t id) const {
    if (id == image_id()) return "<image>";
    if (id == bos_id()) return "<s>";
    if (id == eos_id()) return "</s>";
    if (id == pad_id()) return "<pad>";
    return {};
  }

 private:
  static void append(std::vector<std::int32_t>& out, const std::vector<std::int32_t>& v) {
    out.insert(out.end(), v.begin(), v.end());
  }
};

// ================================================================================================================
// Byte-level tokenizer
// ================================================================================================================
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr std::int32_t kPad = 256, kBos = 257, kEos = 258, kImage = 259, kVocab = 260;

  std::int32_t vocab_size() const override { return kVocab; }
  std::int32_t bos_id() const override { return kBos; }
  std::int32_t eos_id() const override { return kEos; }
  std::int32_t pad_id() const override { return kPad; }
  std::int32_t image_id() const override { return kImage; }
  std::string name() const override { return "byte"; }

 protected:
  std::vector<std::int32_t> encode_text(std::string_view text) const override {
    std::vector<std::int32_t> ids(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) ids[i] = std::int32_t(static_cast<unsigned char>(text[i]));
    return ids;
  }
  std::string decode_ids(std::span<const std::int32_t> ids, bool skip_special) const override {
    std::string s;
    s.reserve(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int32_t id = ids[i];
      CUMO_CHECK(id >= 0 && id < kVocab, "ByteTokenizer::decode: id ", id, " at position ", i,
                 " is outside the vocabulary [0, ", kVocab, ")");
      if (id < 256)
        s.push_back(char(static_cast<unsigned char>(id)));
      else if (!skip_special)
        s += special_text(id);
    }
    return s;
  }
};

// ================================================================================================================
// SentencePiece (optional)
// ================================================================================================================
#if CUMO_HAS_SENTENCEPIECE
// bos/eos come from the model (Llama/Mistral: 1 and 2). pad: the model's pad piece if it has one, else its unk
// id (LLaVA sets tokenizer.pad_token = unk_token; labels mask the pads anyway). The image placeholder gets the
// first id past the SentencePiece vocabulary unless one is given (HF LLaVA adds "<image>" as id 32000 after
// Llama's 32000 pieces), and vocab_size() counts it, so the embedding table has a row for it.
class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& model_path, std::optional<std::int32_t> image_id = {})
      : path_(model_path), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
    constexpr const char* where = "SentencePieceTokenizer";
    std::error_code ec;
    CUMO_CHECK(std::filesystem::is_regular_file(model_path, ec), where, ": '", model_path, "' does not exist");
    const auto st = sp_->Load(model_path);
    CUMO_CHECK(st.ok(), where, ": cannot load '", model_path, "': ", st.ToString());
    pieces_ = sp_->GetPieceSize();
    bos_ = sp_->bos_id();
    eos_ = sp_->eos_id();
    CUMO_CHECK(bos_ >= 0 && eos_ >= 0, where, ": '", model_path, "' defines no bos/eos piece (bos ", bos_, ", eos ",
               eos_, "); a chat template needs both");
    pad_ = sp_->pad_id() >= 0 ? sp_->pad_id() : std::max(sp_->unk_id(), 0);
    image_ = image_id.value_or(pieces_);
    CUMO_CHECK(image_ >= pieces_ || image_ < 0 || sp_->IsUnused(image_) || sp_->IsControl(image_), where,
               ": image id ", image_, " collides with the ordinary piece '", sp_->IdToPiece(image_), "'");
    CUMO_CHECK(image_ >= 0, where, ": image id must be >= 0, got ", image_);
  }

  std::int32_t vocab_size() const override { return std::max(pieces_, image_ + 1); }
  std::int32_t bos_id() const override { return bos_; }
  std::int32_t eos_id() const override { return eos_; }
  std::int32_t pad_id() const override { return pad_; }
  std::int32_t image_id() const override { return image_; }
  std::string name() const override { return "sentencepiece:" + path_; }
  const sentencepiece::SentencePieceProcessor& processor() const { return *sp_; }

 protected:
  std::vector<std::int32_t> encode_text(std::string_view text) const override {
    std::vector<int> ids;
    if (text.empty()) return {};
    const auto st = sp_->Encode(text, &ids);
    CUMO_CHECK(st.ok(), "SentencePieceTokenizer::encode: ", st.ToString());
    return std::vector<std::int32_t>(ids.begin(), ids.end());
  }
  std::string decode_ids(std::span<const std::int32_t> ids, bool skip_special) const override {
    // Runs of ordinary pieces are decoded together (so "▁" word boundaries render as SentencePiece intends);
    // special ids split the runs and are dropped or written as text.
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      std::string s;
      const auto st = sp_->Decode(run, &s);
      CUMO_CHECK(st.ok(), "SentencePieceTokenizer::decode: ", st.ToString());
      out += s;
      run.clear();
    };
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int32_t id = ids[i];
      CUMO_CHECK(id >= 0 && id < vocab_size(), "SentencePieceTokenizer::decode: id ", id, " at position ", i,
                 " is outside the vocabulary [0, ", vocab_size(), ")");
      if (is_special(id)) {
        flush();
        if (!skip_special) out += special_text(id);
      } else if (id >= pieces_) {
        flush();  // an id past the model's pieces that is not the image id: nothing to render
      } else {
        run.push_back(id);
      }
    }
    flush();
    return out;
  }

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::int32_t pieces_ = 0, bos_ = -1, eos_ = -1, pad_ = 0, image_ = 0;
};
#endif

// ================================================================================================================
// Factory
// ================================================================================================================
#if CUMO_HAS_SENTENCEPIECE
inline namespace tokenizer_with_sentencepiece {
#else
inline namespace tokenizer_byte_only {
#endif

// True when this translation unit can load SentencePiece models.
inline constexpr bool has_sentencepiece() { return CUMO_HAS_SENTENCEPIECE != 0; }

// Whether a tokenizer spec names the built-in byte tokenizer ("byte" or ""), and else the SentencePiece model file it
// names: the path itself, or a directory's tokenizer.model.
inline bool is_byte_tokenizer(const std::string& spec) { return spec.empty() || spec == "byte"; }
inline std::string tokenizer_model_file(const std::string& spec) {
  std::error_code ec;
  return std::filesystem::is_directory(spec, ec) ? (std::filesystem::path(spec) / "tokenizer.model").string() : spec;
}

// "byte" (or "" ) → ByteTokenizer; anything else is a path to a SentencePiece `tokenizer.model` (a directory is
// searched for tokenizer.model).
inline std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (is_byte_tokenizer(spec)) return std::make_unique<ByteTokenizer>();
  const std::string path = tokenizer_model_file(spec);
#if CUMO_HAS_SENTENCEPIECE
  return std::make_unique<SentencePieceTokenizer>(path);
#else
  fail("load_tokenizer: '", path, "' needs SentencePiece, but this program was built without it: define ",
       "CUMO_WITH_SENTENCEPIECE=1 and link libsentencepiece (CMake: target_link_libraries(... cumo::sentencepiece)), ",
       "or use the built-in byte tokenizer (\"byte\")");
#endif
}

}  // inline namespace

}  // namespace cumo::io
