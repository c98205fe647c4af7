#pragma once
// LLaVA-format training data: a data set of (input_ids, labels, pixels) samples from records (io/llava_json.hpp)
// tokenised with a template (io/chat_template.hpp), padding into batches, and a deterministic shuffled batch
// iterator whose position can be saved and restored exactly (resume).
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
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/error.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/dist/shard.hpp"
#include "cumo/io/image.hpp"
#include "cumo/io/chat_template.hpp"
#include "cumo/io/llava_json.hpp"
#include "cumo/io/tokenizer.hpp"

namespace cumo::io {

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
        CUMO_CHECK(std::filesystem::exists(p, ec), where, ": image file '", p, "' does not exist");
        CUMO_CHECK(!std::filesystem::is_directory(p, ec), where, ": image path '", p, "' is a directory, not a file");
        CUMO_CHECK(std::filesystem::is_regular_file(p, ec), where, ": image path '", p,
                   "' is not a regular file (a FIFO, socket or device)");
      }
    }
    // One cache slot per distinct image file: the instruction data asks several questions about each image, and
    // caching per record would hold each image's pixels once per question.
    std::unordered_map<std::string, std::size_t> slot_of;
    image_slot_.resize(records_.size());
    for (std::size_t i = 0; i < records_.size(); ++i)
      image_slot_[i] = slot_of.try_emplace(records_[i].image.empty() ? std::string() : image_path(i), slot_of.size())
                           .first->second;
    cache_.resize(slot_of.size());
  }

  std::size_t size() const { return records_.size(); }
  const LlavaRecord& record(std::size_t i) const { return records_.at(i); }
  const TokenizedConversation& tokens(std::size_t i) const { return tokens_.at(i); }
  bool has_image(std::size_t i) const { return !records_.at(i).image.empty(); }
  // Answer tokens (labels that are not ignored) over every record: 0 means there is nothing to train on.
  std::int64_t supervised_tokens() const {
    std::int64_t n = 0;
    for (const auto& t : tokens_)
      for (std::int32_t l : t.labels) n += l != kIgnoreLabel;
    return n;
  }
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
      if (cache_[image_slot_[i]].defined()) return cache_[image_slot_[i]];
    }
    Tensor t;
    try {
      t = clip_preprocess_file(image_path(i), opt_.preprocess);  // (3, S, S)
    } catch (const Error& e) {
      fail("'", source_, "': record ", i, " (id ", records_[i].id, "): ", e.what());
    }
    if (opt_.cache_images) {
      std::lock_guard<std::mutex> lock(*mutex_);
      cache_[image_slot_[i]] = t;
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
  std::vector<std::size_t> image_slot_;  // record → its image's cache slot
  mutable std::vector<Tensor> cache_;    // per distinct image path
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
  // The whole global batch this one is a data-parallel rank's share of (= this batch's own when not sharded):
  // its rows, its targets after the causal shift, its images. A rank's loss share is local / global.
  std::int64_t global_rows = 0, global_targets = 0, global_images = 0;

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
  // Targets after the causal shift (the label at position 0 of a row is never one): what the CE counts.
  std::int64_t targets() const {
    std::int64_t n = 0;
    for (std::int64_t r = 0; r < B; ++r)
      for (std::int64_t t = 1; t < T; ++t) n += labels[std::size_t(r * T + t)] != kIgnoreLabel;
    return n;
  }
};

// A sample's targets after the causal shift.
inline std::int64_t shifted_targets(const TokenizedConversation& tc) {
  std::int64_t n = 0;
  for (std::size_t t = 1; t < tc.labels.size(); ++t) n += tc.labels[t] != kIgnoreLabel;
  return n;
}

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
  b.global_rows = b.B;
  b.global_images = n_img;
  for (std::size_t i : indices) b.global_targets += shifted_targets(data.tokens(i));
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
  // The next batch: the whole of it, or this rank's share after set_shard() (its global_* name the whole).
  Batch next() {
    const std::vector<std::size_t> all = next_indices();
    if (world_ == 1) return collate(*data_, all, pad_multiple_);
    const dist::Shard mine = dist::shard_of(std::int64_t(all.size()), rank_, world_);
    Batch b;
    if (mine.size() > 0)
      b = collate(*data_, std::span<const std::size_t>(all).subspan(std::size_t(mine.begin), std::size_t(mine.size())),
                  pad_multiple_);
    b.global_rows = std::int64_t(all.size());
    b.global_images = b.global_targets = 0;
    for (std::size_t i : all) {
      b.global_images += data_->has_image(i) ? 1 : 0;
      b.global_targets += shifted_targets(data_->tokens(i));
    }
    return b;
  }
  // Data parallelism: next() returns rank `rank`'s contiguous share of each global batch of `world` ranks (the
  // first size % world ranks one row more; a short last batch may leave a rank none: B = 0). The position and the
  // order are the global batch's, so every rank walks the same sequence and a checkpoint resumes on any world size.
  void set_shard(int rank, int world) {
    CUMO_CHECK(world >= 1 && rank >= 0 && rank < world, "BatchIterator::set_shard: rank ", rank, " of ", world);
    rank_ = rank;
    world_ = world;
  }

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
  int rank_ = 0, world_ = 1;
};

}  // namespace cumo::io
