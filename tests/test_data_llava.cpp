// LLaVA data: JSON parsing and its errors, the template, image-token expansion, assistant-only labels, the data
// set, padding, and the batch iterator's exact resume.
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "cumo/core/compare.hpp"
#include "cumo/io/llava_data.hpp"
#include "cumo/io/prefetch.hpp"

namespace fs = std::filesystem;
using namespace cumo::io;

namespace {
fs::path llava_tmp(const std::string& name) {
  const fs::path d = cumo::test::tmp_root() / ("data_llava_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}
void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}
std::vector<std::int32_t> bytes(const std::string& s) { return ByteTokenizer().encode(s); }
std::vector<std::int32_t> cat(std::initializer_list<std::vector<std::int32_t>> parts) {
  std::vector<std::int32_t> v;
  for (const auto& p : parts) v.insert(v.end(), p.begin(), p.end());
  return v;
}
std::vector<std::int32_t> ignore(std::size_t n) { return std::vector<std::int32_t>(n, kIgnoreLabel); }
LlavaRecord qa(std::string image, std::vector<std::pair<std::string, std::string>> turns) {
  LlavaRecord r;
  r.id = "r";
  r.image = std::move(image);
  for (auto& [q, a] : turns) {
    r.conversations.push_back({Role::user, "human", q});
    if (!a.empty()) r.conversations.push_back({Role::assistant, "gpt", a});
  }
  return r;
}
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const cumo::Error& e) {
    return e.what();
  }
  return "no error";
}

constexpr const char* kTwoRecords = R"([
  {"id": "a1", "image": "img/a.png", "type": "colour",
   "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
  {"id": 7, "extra": {"ignored": true},
   "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
])";
}  // namespace

TEST_CASE("data/llava: parses records, ids, optional image and type, and writes them back unchanged") {
  const auto recs = parse_llava_json(kTwoRecords, "mem.json");
  REQUIRE(recs.size() == 2);
  CHECK(recs[0].id == "a1");
  CHECK(recs[0].image == "img/a.png");
  CHECK(recs[0].type == "colour");
  REQUIRE(recs[0].conversations.size() == 2);
  CHECK(recs[0].conversations[0].role == Role::user);
  CHECK(recs[0].conversations[0].value == "<image>\nWhat colour?");
  CHECK(recs[0].conversations[1].role == Role::assistant);
  CHECK(recs[1].id == "7");
  CHECK(recs[1].image.empty());
  CHECK(recs[1].conversations[1].role == Role::assistant);

  const fs::path d = llava_tmp("roundtrip");
  save_llava_json((d / "out.json").string(), recs);
  const auto back = load_llava_json((d / "out.json").string());
  REQUIRE(back.size() == 2);
  CHECK(back[0].conversations[0].value == recs[0].conversations[0].value);
  CHECK(back[0].type == "colour");
  CHECK(back[1].conversations[0].from == "user");
  // JSON Lines with a blank line.
  write_text(d / "x.jsonl", R"({"id": "l1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}

{"id": "l2", "conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
)");
  const auto lines = load_llava_json((d / "x.jsonl").string());
  REQUIRE(lines.size() == 2);
  CHECK(lines[1].id == "l2");
}

TEST_CASE("data/llava: malformed JSON and missing or mistyped fields throw cumo::Error naming file and record") {
  const fs::path d = llava_tmp("bad");
  struct Case {
    const char* text;
    std::vector<const char*> expect;
  };
  const std::vector<Case> cases = {
      {R"([{"id": "x", "conversations": [)", {"bad1.json", "invalid JSON"}},
      {R"({"id": "x"})", {"bad2.json", "array of records"}},
      {R"([{"id": "ok", "conversations": [{"from": "human", "value": "q"}]}, {"id": "x"}])",
       {"bad3.json", "record 1", "\"conversations\""}},
      {R"([{"id": "x", "conversations": [{"from": "human"}]}])", {"bad4.json", "record 0", "turn 0", "\"value\""}},
      {R"([{"id": "x", "conversations": [{"from": "robot", "value": "q"}]}])", {"bad5.json", "record 0", "robot"}},
      {R"([{"id": "x", "image": 5, "conversations": [{"from": "human", "value": "q"}]}])", {"bad6.json", "\"image\""}},
      {R"([{"id": "x", "conversations": []}])", {"bad7.json", "empty"}},
      {R"([{"id": "x", "conversations": [{"from": "human", "value": 3}]}])", {"bad8.json", "must be a string"}},
      {R"([3])", {"bad9.json", "record 0", "object"}},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const fs::path p = d / ("bad" + std::to_string(i + 1) + ".json");
    write_text(p, cases[i].text);
    const std::string m = error_of([&] { (void)load_llava_json(p.string()); });
    INFO(m);
    for (const char* e : cases[i].expect) CHECK(m.find(e) != std::string::npos);
  }
  CHECK(error_of([&] { (void)load_llava_json((d / "nope.json").string()); }).find("cannot open") != std::string::npos);
  write_text(d / "bad.jsonl", "{\"id\": \"a\", \"conversations\": [{\"from\": \"human\", \"value\": \"q\"}]}\n{oops\n");
  const std::string m = error_of([&] { (void)load_llava_json((d / "bad.jsonl").string()); });
  CHECK(m.find("line 2") != std::string::npos);
  CHECK(m.find("bad.jsonl") != std::string::npos);
}

TEST_CASE("data/llava: mistral template expands <image> to N image ids and labels only the answer and its eos") {
  const ByteTokenizer tok;
  const auto r = qa("a.png", {{"<image>\nWhat?", "red"}});
  const auto t = tokenize_conversation(r, tok, ChatTemplate::mistral(), 4);
  const auto want_ids = cat({{257}, bytes("[INST] "), {259, 259, 259, 259}, bytes("\nWhat?"), bytes(" [/INST] "),
                             bytes("red"), {258}});
  CHECK(t.ids == want_ids);
  const std::size_t prompt = want_ids.size() - 4;
  CHECK(t.labels == cat({ignore(prompt), bytes("red"), {258}}));
  CHECK(t.image_tokens == 4);
  CHECK_FALSE(t.truncated);

  // The generation prompt stops right before the answer.
  const auto p = tokenize_prompt(r, tok, ChatTemplate::mistral(), 4);
  CHECK(p.ids == std::vector<std::int32_t>(want_ids.begin(), want_ids.begin() + std::ptrdiff_t(prompt)));
  CHECK(p.answer == "red");
  CHECK(p.image_tokens == 4);
}

TEST_CASE("data/llava: multi-turn conversations label every answer (with eos) and nothing else") {
  const ByteTokenizer tok;
  const auto r = qa("a.png", {{"<image>\nq1", "answer one"}, {"q2", "two"}});
  const auto t = tokenize_conversation(r, tok, ChatTemplate::mistral(), 3);
  REQUIRE(t.ids.size() == t.labels.size());
  std::vector<std::int32_t> labelled;
  for (std::size_t i = 0; i < t.ids.size(); ++i)
    if (t.labels[i] != kIgnoreLabel) {
      CHECK(t.labels[i] == t.ids[i]);  // unshifted: label = the token itself
      labelled.push_back(t.ids[i]);
    }
  CHECK(tok.decode(labelled, false) == "answer one</s>two</s>");
  CHECK(tok.decode(t.ids, false) == "<s>[INST] <image><image><image>\nq1 [/INST] answer one</s>[INST] q2 [/INST] two</s>");
  // The prompt for the last answer includes the first exchange.
  const auto p = tokenize_prompt(r, tok, ChatTemplate::mistral(), 3);
  CHECK(tok.decode(p.ids, false) == "<s>[INST] <image><image><image>\nq1 [/INST] answer one</s>[INST] q2 [/INST] ");
  CHECK(p.answer == "two");
}

TEST_CASE("data/llava: image placeholder rules (LLaVA's implicit <image>, errors for none / two / text-only)") {
  const ByteTokenizer tok;
  // An image but no placeholder: "<image>\n" goes in front of the first user message.
  const auto t = tokenize_conversation(qa("a.png", {{"q", "a"}}), tok, ChatTemplate::mistral(), 2);
  CHECK(tok.decode(t.ids, false) == "<s>[INST] <image><image>\nq [/INST] a</s>");
  CHECK_THROWS_WITH_AS(tokenize_conversation(qa("", {{"<image>\nq", "a"}}), tok, ChatTemplate::mistral(), 2),
                       doctest::Contains("no \"image\""), cumo::Error);
  CHECK_THROWS_WITH_AS(tokenize_conversation(qa("a.png", {{"<image><image>", "a"}}), tok, ChatTemplate::mistral(), 2),
                       doctest::Contains("2 <image> placeholders"), cumo::Error);
  CHECK_THROWS_WITH_AS(tokenize_conversation(qa("a.png", {{"q", "a"}}), tok, ChatTemplate::mistral(), 0),
                       doctest::Contains("image_tokens"), cumo::Error);
  // Text-only records have no image ids.
  const auto text = tokenize_conversation(qa("", {{"q", "a"}}), tok, ChatTemplate::mistral(), 5);
  CHECK(text.image_tokens == 0);
  CHECK(std::count(text.ids.begin(), text.ids.end(), tok.image_id()) == 0);
  // Turns must alternate.
  LlavaRecord bad = qa("", {{"q", ""}, {"q2", "a"}});
  CHECK_THROWS_WITH_AS(tokenize_conversation(bad, tok, ChatTemplate::mistral(), 1), doctest::Contains("alternate"),
                       cumo::Error);
}

TEST_CASE("data/llava: plain, chat, vicuna and mistral_instruct_system templates render as documented") {
  const ByteTokenizer tok;
  const auto r = qa("a.png", {{"<image>\nDescribe.", "a red circle."}});
  const auto plain = tokenize_conversation(r, tok, ChatTemplate::plain(), 2);
  CHECK(tok.decode(plain.ids, false) == "<s><image><image>a red circle.</s>");
  CHECK(plain.labels == cat({ignore(3), bytes("a red circle."), {258}}));
  const auto chat = tokenize_conversation(r, tok, ChatTemplate::from_name("chat"), 1);
  CHECK(tok.decode(chat.ids, false) == "<s>USER: <image>\nDescribe.\nASSISTANT: a red circle.</s>\n");
  const auto vic = tokenize_conversation(r, tok, ChatTemplate::vicuna(), 1);
  CHECK(tok.decode(vic.ids, false).find(" USER: <image>\nDescribe. ASSISTANT: a red circle.</s>") != std::string::npos);
  CHECK_THROWS_AS(ChatTemplate::from_name("nope"), cumo::Error);
  // CuMo's eval/serve template: the system message inside the first [INST] only
  const auto two = qa("a.png", {{"<image>\nDescribe.", "a red circle."}, {"And?", "done."}});
  const auto sys = tokenize_conversation(two, tok, ChatTemplate::from_name("mistral_instruct_system"), 1);
  CHECK(tok.decode(sys.ids, false) ==
        "<s>[INST] <<SYS>>\nA chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.\n<</SYS>>\n\n<image>\nDescribe. [/INST] a red "
        "circle.</s>[INST] And? [/INST] done.</s>");
  CHECK(ChatTemplate::from_name("mistral_instruct").name == "mistral");
}

TEST_CASE("data/llava: max_length truncates the tail but refuses to cut through the image tokens") {
  const ByteTokenizer tok;
  const auto r = qa("a.png", {{"<image>\nq", "a long answer"}});
  const auto full = tokenize_conversation(r, tok, ChatTemplate::mistral(), 4);
  const auto t = tokenize_conversation(r, tok, ChatTemplate::mistral(), 4, int(full.ids.size()) - 5);
  CHECK(t.truncated);
  CHECK(t.ids.size() == full.ids.size() - 5);
  CHECK(std::equal(t.ids.begin(), t.ids.end(), full.ids.begin()));
  CHECK_THROWS_WITH_AS(tokenize_conversation(r, tok, ChatTemplate::mistral(), 4, 6), doctest::Contains("max_length 6"),
                       cumo::Error);
}

namespace {
// Three image records and one text-only record, with small PNGs of different colours.
fs::path make_dataset_dir() {
  const fs::path d = llava_tmp("dataset");
  fs::create_directories(d / "img");
  for (int i = 0; i < 3; ++i) {
    Image im(12, 10, 3);
    for (std::size_t k = 0; k < im.pixels.size(); ++k) im.pixels[k] = std::uint8_t(40 * i + int(k % 3) * 50);
    write_png((d / "img" / ("p" + std::to_string(i) + ".png")).string(), im);
  }
  write_text(d / "data.json", R"([
 {"id": "0", "image": "img/p0.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "zero"}]},
 {"id": "1", "image": "img/p1.png", "conversations": [{"from": "human", "value": "<image>\nlonger question"}, {"from": "gpt", "value": "one"}]},
 {"id": "2", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "two"}]},
 {"id": "3", "image": "img/p2.png", "type": "t", "conversations": [{"from": "human", "value": "<image>\nq3"}, {"from": "gpt", "value": "three"}]}
])");
  return d;
}
DataOptions small_options() {
  DataOptions o;
  o.image_tokens = 4;
  o.preprocess.size = 8;
  return o;
}
}  // namespace

TEST_CASE("data/llava: the data set loads images relative to the JSON and collate pads rows and stacks pixels") {
  const fs::path d = make_dataset_dir();
  const ByteTokenizer tok;
  const auto ds = LlavaDataset::load((d / "data.json").string(), tok, small_options());
  REQUIRE(ds.size() == 4);
  CHECK(ds.types() == std::vector<std::string>{"t"});
  CHECK(ds.indices_of_type("t") == std::vector<std::size_t>{3});
  const Sample s = ds.get(1);
  CHECK(s.pixels.shape() == cumo::Shape{3, 8, 8});
  CHECK(std::count(s.input_ids.begin(), s.input_ids.end(), 259) == 4);

  const std::vector<std::size_t> idx = {1, 2, 3};
  const Batch b = collate(ds, idx);
  CHECK(b.B == 3);
  const std::int64_t T = b.T;
  CHECK(T == std::int64_t(ds.tokens(1).ids.size()));  // the longest row
  CHECK(b.input_ids.size() == std::size_t(3 * T));
  CHECK(b.lengths == std::vector<std::int64_t>{std::int64_t(ds.tokens(1).ids.size()),
                                               std::int64_t(ds.tokens(2).ids.size()),
                                               std::int64_t(ds.tokens(3).ids.size())});
  CHECK(b.has_image == std::vector<std::uint8_t>{1, 0, 1});
  REQUIRE(b.images() == 2);
  CHECK(b.pixels.shape() == cumo::Shape{2, 3, 8, 8});
  for (std::int64_t r = 0; r < 3; ++r)
    for (std::int64_t t = 0; t < T; ++t) {
      const auto k = std::size_t(r * T + t);
      const bool real = t < b.lengths[std::size_t(r)];
      CHECK(b.key_valid[k] == (real ? 1 : 0));
      if (!real) {
        CHECK(b.input_ids[k] == tok.pad_id());
        CHECK(b.labels[k] == kIgnoreLabel);
      }
    }
  CHECK(b.label_count() == std::int64_t(3 + 1 + 3 + 1 + 5 + 1));  // "one", "two", "three" + eos each
  // The stacked pixels are the records' preprocessed images, in row order (rows 0 and 2).
  const cumo::Tensor p1 = clip_preprocess_file((d / "img" / "p1.png").string(), small_options().preprocess);
  const cumo::Tensor p2 = clip_preprocess_file((d / "img" / "p2.png").string(), small_options().preprocess);
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < 8; ++y)
      for (int x = 0; x < 8; ++x) {
        CHECK(b.pixels.at<float>(0, c, y, x) == p1.at<float>(c, y, x));
        CHECK(b.pixels.at<float>(1, c, y, x) == p2.at<float>(c, y, x));
      }
  // pad_multiple rounds T up.
  CHECK(collate(ds, idx, 16).T % 16 == 0);
}

TEST_CASE("data/llava: records that share an image file share one cached copy of its pixels") {
  const fs::path d = make_dataset_dir();
  write_text(d / "shared.json", R"([
 {"id": "a", "image": "img/p0.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "x"}]},
 {"id": "b", "image": "img/p1.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "y"}]},
 {"id": "c", "image": "img/p0.png", "conversations": [{"from": "human", "value": "<image>\nr"}, {"from": "gpt", "value": "z"}]}
])");
  const ByteTokenizer tok;
  const auto ds = LlavaDataset::load((d / "shared.json").string(), tok, small_options());
  const cumo::Tensor a = ds.pixels(0), b = ds.pixels(1), c = ds.pixels(2);
  CHECK(a.raw() == c.raw());  // one slot for p0.png
  CHECK(a.raw() != b.raw());
  const cumo::Tensor p0 = clip_preprocess_file((d / "img" / "p0.png").string(), small_options().preprocess);
  CHECK(cumo::bitwise_equal(c, p0));
  // Without the cache every call decodes again (nothing shared).
  DataOptions nc = small_options();
  nc.cache_images = false;
  const auto ds2 = LlavaDataset::load((d / "shared.json").string(), tok, nc);
  CHECK(ds2.pixels(0).raw() != ds2.pixels(2).raw());
  CHECK(cumo::bitwise_equal(ds2.pixels(2), p0));
}

TEST_CASE("data/llava: a missing or corrupt image file is reported with the record and the path") {
  const fs::path d = make_dataset_dir();
  const ByteTokenizer tok;
  fs::remove(d / "img" / "p1.png");
  const std::string m = error_of([&] { (void)LlavaDataset::load((d / "data.json").string(), tok, small_options()); });
  CHECK(m.find("record 1") != std::string::npos);
  CHECK(m.find("p1.png") != std::string::npos);
  // Corrupt (not missing): found when the pixels are first needed.
  write_text(d / "img" / "p1.png", "garbage");
  const auto ds = LlavaDataset::load((d / "data.json").string(), tok, small_options());
  const std::string m2 = error_of([&] { (void)ds.pixels(1); });
  CHECK(m2.find("record 1") != std::string::npos);
  CHECK(m2.find("stb_image") != std::string::npos);
}

TEST_CASE("data/llava: batch iterator covers each epoch once, and a restored position gives identical batches") {
  const fs::path d = make_dataset_dir();
  const ByteTokenizer tok;
  // 23 samples (the 4 records repeated) so epochs end mid-batch.
  auto recs = load_llava_json((d / "data.json").string());
  std::vector<LlavaRecord> many;
  for (int i = 0; i < 23; ++i) many.push_back(recs[std::size_t(i % 4)]);
  DataOptions opt = small_options();
  opt.image_root = d.string();
  const LlavaDataset ds(many, tok, opt, "many");

  BatchIterator it(ds, 5, 1234);
  CHECK(it.batches_per_epoch() == 5);
  std::multiset<std::size_t> epoch0;
  for (int k = 0; k < 5; ++k)
    for (auto i : it.next_indices()) epoch0.insert(i);
  CHECK(epoch0.size() == 23);
  CHECK(std::set<std::size_t>(epoch0.begin(), epoch0.end()).size() == 23);  // a permutation
  const auto order0 = BatchIterator::epoch_order(23, 1234, 0, true);
  const auto order1 = BatchIterator::epoch_order(23, 1234, 1, true);
  CHECK(order0 != order1);                                           // reshuffled every epoch
  CHECK(order0 != BatchIterator::epoch_order(23, 99, 0, true));      // seed matters
  CHECK(BatchIterator::epoch_order(23, 1, 0, false)[22] == 22);       // no shuffle: identity

  // Run 7 batches (into epoch 1), save, draw 9 more; a fresh iterator restored from the saved position (also
  // through JSON) must draw the same 9 batches, ids and pixels included.
  BatchIterator a(ds, 5, 77);
  for (int k = 0; k < 7; ++k) (void)a.next_indices();
  const DataPosition pos = a.position();
  CHECK(pos.epoch == 1);
  std::vector<Batch> expect;
  for (int k = 0; k < 9; ++k) expect.push_back(a.next());
  BatchIterator b(ds, 5, 77);
  b.set_position(DataPosition::from_json(nlohmann::json::parse(pos.to_json().dump())));
  for (int k = 0; k < 9; ++k) {
    const Batch got = b.next();
    CHECK(got.indices == expect[std::size_t(k)].indices);
    CHECK(got.input_ids == expect[std::size_t(k)].input_ids);
    CHECK(got.labels == expect[std::size_t(k)].labels);
    REQUIRE(got.images() == expect[std::size_t(k)].images());
    for (std::int64_t e = 0; e < got.pixels.numel(); ++e)
      CHECK(got.pixels.data<float>()[e] == expect[std::size_t(k)].pixels.data<float>()[e]);
  }
  CHECK(b.position() == a.position());

  // A position from another seed or data set is refused.
  BatchIterator c(ds, 5, 78);
  CHECK_THROWS_WITH_AS(c.set_position(pos), doctest::Contains("seed"), cumo::Error);
  DataPosition other = pos;
  other.dataset_size = 99;
  CHECK_THROWS_WITH_AS(a.set_position(other), doctest::Contains("99"), cumo::Error);
  CHECK_THROWS_AS(DataPosition::from_json(nlohmann::json{{"seed", 1}}), cumo::Error);

  // drop_last keeps every batch full.
  BatchIterator full(ds, 5, 1, true, /*drop_last=*/true);
  for (int k = 0; k < 12; ++k) CHECK(full.next_indices().size() == 5);
}

TEST_CASE("data/llava: prefetched batches are the iterator's, in order, and their position resumes exactly") {
  const fs::path d = make_dataset_dir();
  const ByteTokenizer tok;
  const auto ds = LlavaDataset::load((d / "data.json").string(), tok, small_options());
  BatchIterator plain(ds, 3, 11);
  std::vector<Batch> want;
  std::vector<DataPosition> after;
  for (int i = 0; i < 7; ++i) {  // crosses epochs (4 samples, batches of 3 and 1)
    want.push_back(plain.next());
    after.push_back(plain.position());
  }
  auto same = [](const Batch& a, const Batch& b) {
    bool px = a.images() == b.images();
    if (px && a.images() > 0)
      px = std::equal(a.pixels.data<float>(), a.pixels.data<float>() + a.pixels.numel(), b.pixels.data<float>());
    return a.B == b.B && a.T == b.T && a.input_ids == b.input_ids && a.labels == b.labels &&
           a.key_valid == b.key_valid && a.indices == b.indices && px;
  };
  for (int depth : {1, 3}) {
    CAPTURE(depth);
    PrefetchedBatches pre(BatchIterator(ds, 3, 11), depth);
    CHECK(pre.position() == DataPosition{11, 0, 0, 4});
    for (int i = 0; i < 7; ++i) {
      CAPTURE(i);
      CHECK(same(pre.next(), want[std::size_t(i)]));
      CHECK(pre.position() == after[std::size_t(i)]);  // what was taken, not what was read ahead
    }
  }
  // resume: a fresh iterator at the position after batch 3 continues with batch 4
  DataPosition pos;
  {
    PrefetchedBatches pre(BatchIterator(ds, 3, 11), 2);
    for (int i = 0; i < 3; ++i) (void)pre.next();
    pos = pre.position();
  }
  BatchIterator resumed(ds, 3, 11);
  resumed.set_position(pos);
  PrefetchedBatches pre(std::move(resumed), 2);
  CHECK(same(pre.next(), want[3]));
  CHECK(same(pre.next(), want[4]));
}

TEST_CASE("data/llava: a batch that fails to load in the prefetch worker throws at its next(), then stops") {
  const fs::path d = make_dataset_dir();
  const ByteTokenizer tok;
  const auto ds = LlavaDataset::load((d / "data.json").string(), tok, small_options());
  fs::remove(d / "img" / "p1.png");  // after the data set checked it: the worker meets the missing file
  PrefetchedBatches pre(BatchIterator(ds, 1, 0, /*shuffle=*/false), 2);
  (void)pre.next();  // record 0
  const std::string m = error_of([&] { (void)pre.next(); });  // record 1
  CHECK(m.find("record 1") != std::string::npos);
  CHECK(m.find("p1.png") != std::string::npos);
  CHECK(pre.position() == DataPosition{0, 0, 1, 4});  // still after record 0
  CHECK(error_of([&] { (void)pre.next(); }).find("no more batches") != std::string::npos);
}
