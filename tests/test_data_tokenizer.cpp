// Tokenizers: the built-in byte-level one (round trips, special ids, errors) and, when the build has it,
// SentencePiece (trained here on a tiny corpus, so no model file has to be shipped).
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cumo/io/tokenizer.hpp"

#if CUMO_HAS_SENTENCEPIECE && __has_include(<sentencepiece_trainer.h>)
#include <sentencepiece_trainer.h>
#define CUMO_TEST_SENTENCEPIECE 1
#endif

namespace fs = std::filesystem;
using cumo::io::ByteTokenizer;

TEST_CASE("data/tokenizer: byte tokenizer round-trips UTF-8 text with ids 0..255 and no added specials") {
  const ByteTokenizer tok;
  const std::string text = "what colour is the circle? — «rouge» 🟥\n\t\x01\xff";
  const auto ids = tok.encode(text);
  REQUIRE(ids.size() == text.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    CHECK(ids[i] == int(static_cast<unsigned char>(text[i])));
    CHECK(ids[i] < 256);
  }
  CHECK(tok.decode(ids) == text);
  CHECK(tok.encode("").empty());
  CHECK(tok.vocab_size() == 260);
  CHECK(tok.pad_id() == 256);
  CHECK(tok.bos_id() == 257);
  CHECK(tok.eos_id() == 258);
  CHECK(tok.image_id() == 259);
  CHECK(tok.name() == "byte");
}

TEST_CASE("data/tokenizer: special tokens are ids, parsed from text only on request, and round-trip") {
  const ByteTokenizer tok;
  // Plain encode never forges a control token from user text.
  CHECK(tok.encode("<s>") == std::vector<std::int32_t>{'<', 's', '>'});
  const std::string text = "<s>hi<image><image></s><pad>x<im";
  const auto ids = tok.encode_with_specials(text);
  const std::vector<std::int32_t> want = {257, 'h', 'i', 259, 259, 258, 256, 'x', '<', 'i', 'm'};
  CHECK(ids == want);
  CHECK(tok.decode(ids, /*skip_special=*/false) == text);
  CHECK(tok.decode(ids) == "hix<im");
  CHECK(tok.encode_with_specials(tok.decode(ids, false)) == ids);
  // int64 ids (what the model consumes) decode the same way.
  const std::vector<std::int64_t> ids64(ids.begin(), ids.end());
  CHECK(tok.decode(ids64, false) == text);
  for (std::int32_t id : {256, 257, 258, 259}) CHECK(tok.is_special(id));
  CHECK_FALSE(tok.is_special('a'));
}

TEST_CASE("data/tokenizer: decoding an id outside the vocabulary throws cumo::Error with the id and position") {
  const ByteTokenizer tok;
  CHECK_THROWS_WITH_AS(tok.decode(std::vector<std::int32_t>{'a', 260}), doctest::Contains("id 260 at position 1"),
                       cumo::Error);
  CHECK_THROWS_AS(tok.decode(std::vector<std::int32_t>{-1}), cumo::Error);
  CHECK_THROWS_AS(tok.decode(std::vector<std::int64_t>{std::int64_t(1) << 40}), cumo::Error);
}

TEST_CASE("data/tokenizer: load_tokenizer gives the byte tokenizer for \"byte\" and explains a missing SentencePiece") {
  auto t = cumo::io::load_tokenizer("byte");
  CHECK(t->name() == "byte");
  CHECK(cumo::io::load_tokenizer("")->vocab_size() == 260);
  if (!cumo::io::has_sentencepiece()) {
    CHECK_THROWS_WITH_AS(cumo::io::load_tokenizer("some/tokenizer.model"), doctest::Contains("SentencePiece"),
                         cumo::Error);
  } else {
    CHECK_THROWS_WITH_AS(cumo::io::load_tokenizer("/nonexistent/tokenizer.model"), doctest::Contains("does not exist"),
                         cumo::Error);
  }
}

#if defined(CUMO_TEST_SENTENCEPIECE)
TEST_CASE("data/tokenizer: SentencePiece model trained on a tiny corpus round-trips text, with bos/eos/pad/image ids") {
  const fs::path d = cumo::test::tmp_root() / "data_tokenizer_sp";
  fs::remove_all(d);
  fs::create_directories(d);
  {
    std::ofstream f(d / "corpus.txt");
    const char* lines[] = {"what colour is the circle", "how many shapes are there", "is there a green triangle",
                           "a red circle to the left of a blue square", "what is left of the square",
                           "there are three shapes", "yes no red green blue yellow purple white"};
    for (int r = 0; r < 20; ++r)
      for (const char* l : lines) f << l << "\n";
  }
  const std::string prefix = (d / "tokenizer").string();
  const auto st = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + (d / "corpus.txt").string() + " --model_prefix=" + prefix +
      " --vocab_size=60 --model_type=bpe --character_coverage=1.0 --minloglevel=2"
      " --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1");
  REQUIRE_MESSAGE(st.ok(), st.ToString());

  auto tok = cumo::io::load_tokenizer(d.string());  // a directory: its tokenizer.model
  CHECK(tok->name().find("sentencepiece:") == 0);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK(tok->pad_id() == 0);        // no pad piece: unk, as LLaVA does
  CHECK(tok->image_id() == 60);     // first id past the 60 pieces
  CHECK(tok->vocab_size() == 61);   // the embedding table needs a row for it
  const std::string text = "is there a red circle to the left of the square";
  const auto ids = tok->encode(text);
  CHECK(ids.size() < text.size());  // merges happened
  for (auto id : ids) CHECK((id >= 0 && id < 60 && !tok->is_special(id)));
  CHECK(tok->decode(ids) == text);
  std::vector<std::int32_t> framed = {tok->bos_id(), tok->image_id(), tok->image_id()};
  framed.insert(framed.end(), ids.begin(), ids.end());
  framed.push_back(tok->eos_id());
  CHECK(tok->decode(framed) == text);
  CHECK(tok->decode(framed, false) == "<s><image><image>" + text + "</s>");
  CHECK(tok->encode_with_specials("<s><image>" + text + "</s>").size() == ids.size() + 3);
  CHECK_THROWS_AS(tok->decode(std::vector<std::int32_t>{61}), cumo::Error);
  // A corrupt model file is an error, not a crash.
  {
    std::ofstream f(d / "bad.model");
    f << "not a model";
  }
  CHECK_THROWS_WITH_AS(cumo::io::load_tokenizer((d / "bad.model").string()), doctest::Contains("bad.model"),
                       cumo::Error);
}
#endif
