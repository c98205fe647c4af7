#pragma once
// Training checkpoints: everything a resumed run needs to continue bitwise as if it had never stopped.
//
//   <dir>/model.safetensors      the weights under their Hugging Face names, fp32, metadata {"format": "pt"}, so
//                                PyTorch / transformers load it as a state_dict (safetensors.torch.load_file)
//   <dir>/optimizer.safetensors  AdamW state: "<param>.exp_avg", "<param>.exp_avg_sq" (f32), "<param>.step" (i64)
//                                for every parameter that has state (frozen ones have none)
//   <dir>/trainer_state.json     format + version, optimizer steps taken (= the schedule's position), data position
//                                (epoch, sample), every named RNG's Philox state {seed, counter}, the optimizer's
//                                hyperparameters and groups (informational), and the caller's own metadata
//
// Writing is atomic at the directory level: everything goes into a fresh hidden sibling directory
// (".<name>.tmp.XXXXXX"), each file fsync'ed, and only then is that directory renamed to <dir>. Replacing an
// existing <dir> uses renameat2(RENAME_EXCHANGE), an atomic swap, where the kernel and filesystem have it, else
// two renames (old aside, new in): a crash then leaves either the old or the new checkpoint under <dir>, never a
// mix, at worst with the other one still in a hidden sibling. A reader never sees a half-written checkpoint.
//
// Loading validates everything — JSON fields, every tensor's presence, shape and dtype, the optimizer state —
// before it changes anything, so a bad checkpoint (truncated, corrupted, from another model) throws a cumo::Error
// that names the file, the tensor and both shapes, and leaves the model and optimizer as they were.
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/io/files.hpp"
#include "cumo/io/safetensors.hpp"
#include "cumo/train/optimizer.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#endif

namespace cumo::train {

inline constexpr const char* kCheckpointFormat = "cumo.checkpoint";
inline constexpr int kCheckpointVersion = 1;

// What the training loop itself must carry across a restart, besides weights and optimizer state.
struct TrainerState {
  std::int64_t step = 0;    // optimizer steps taken; the schedule's position (lr of the next update = lr(step))
  std::int64_t epoch = 0;   // data position: the epoch in progress …
  std::int64_t sample = 0;  // … and the next sample within it
  std::map<std::string, Rng::State> rngs;         // every generator the loop draws from, by name
  std::map<std::string, std::string> metadata;    // the caller's own (stage, config hash, …), round-tripped
};

namespace detail {
namespace fs = std::filesystem;

inline void fsync_path(const fs::path& p, bool directory) {
#if defined(__unix__) || defined(__APPLE__)
  const int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);  // best effort: some filesystems refuse fsync on directories
    ::close(fd);
  }
#else
  (void)p;
  (void)directory;
#endif
}

// Writes a small text file and makes it durable before the directory holding it is renamed into place.
inline void write_text_file(const fs::path& path, const std::string& text, const char* where) {
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    CUMO_CHECK(f, where, ": cannot create '", path.string(), "'");
    f.write(text.data(), std::streamsize(text.size()));
    f.flush();
    CUMO_CHECK(f, where, ": writing '", path.string(), "' failed");
  }
  fsync_path(path, false);
}

inline std::string read_text_file(const fs::path& path, const char* where) {
  io::require_regular_file(path.string(), where);
  std::ifstream f(path, std::ios::binary);
  CUMO_CHECK(f, where, ": cannot open '", path.string(), "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  CUMO_CHECK(!f.bad(), where, ": reading '", path.string(), "' failed");
  return ss.str();
}

// A fresh, uniquely named hidden directory beside `target` (same filesystem, so rename() is atomic).
inline fs::path make_sibling_dir(const fs::path& target, const char* tag, const char* where) {
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::string tmpl = (parent / ("." + target.filename().string() + tag + "XXXXXX")).string();
#if defined(__unix__) || defined(__APPLE__)
  CUMO_CHECK(::mkdtemp(tmpl.data()), where, ": cannot create a temporary directory beside '", target.string(),
             "': ", std::strerror(errno));
  (void)::chmod(tmpl.c_str(), io::new_dir_mode());  // mkdtemp makes 0700; a checkpoint gets what mkdir would give
  return fs::path(tmpl);
#else
  for (int i = 0;; ++i) {
    fs::path p = parent / ("." + target.filename().string() + tag + std::to_string(i));
    std::error_code ec;
    if (fs::create_directory(p, ec)) return p;
    CUMO_CHECK(i < 1000, where, ": cannot create a temporary directory beside '", target.string(), "'");
  }
#endif
}

// Atomically swaps two paths when the OS can (Linux ≥ 3.15, on most local filesystems).
inline bool exchange_paths(const fs::path& a, const fs::path& b) {
#if defined(__linux__) && defined(SYS_renameat2)
  constexpr unsigned kRenameExchange = 1u << 1;  // RENAME_EXCHANGE from <linux/fs.h>
  return ::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), kRenameExchange) == 0;
#else
  (void)a;
  (void)b;
  return false;
#endif
}

// Moves the complete directory `fresh` to `target`, replacing what is there.
inline void publish_dir(const fs::path& fresh, const fs::path& target, const char* where) {
  std::error_code ec;
  if (!fs::exists(target, ec)) {
    fs::rename(fresh, target, ec);
    CUMO_CHECK(!ec, where, ": cannot rename '", fresh.string(), "' to '", target.string(), "': ", ec.message());
    return;
  }
  CUMO_CHECK(fs::is_directory(target, ec), where, ": '", target.string(),
             "' exists and is not a directory; refusing to replace it");
  if (exchange_paths(fresh, target)) {
    fs::remove_all(fresh, ec);  // `fresh` now holds the old checkpoint
    return;
  }
  // No atomic swap: park the old checkpoint in an empty sibling (rename onto an empty directory replaces it),
  // move the new one in, then delete the old.
  const fs::path old = make_sibling_dir(target, ".old.", where);
  fs::rename(target, old, ec);
  if (ec) {
    fs::remove(old);
    fail(where, ": cannot move the old checkpoint '", target.string(), "' aside: ", ec.message());
  }
  fs::rename(fresh, target, ec);
  if (ec) {
    std::error_code ec2;
    fs::rename(old, target, ec2);  // put the old one back
    fail(where, ": cannot rename '", fresh.string(), "' to '", target.string(), "': ", ec.message());
  }
  fs::remove_all(old, ec);
}

inline std::vector<std::pair<std::string, Tensor>> weight_tensors(const ParameterList& model) {
  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(model.size());
  for (const Parameter* p : model)  // a device parameter is written from a host copy
    out.emplace_back(p->name, p->value.device() == Device::cpu ? p->value : p->value.to(Device::cpu));
  return out;
}

// Checks that `file` can fill every parameter of `model` (present, same shape, a float dtype) and, when strict,
// that it holds nothing else. Throws before anything changes.
inline void check_weights(const io::SafeTensors& file, const ParameterList& model, bool strict, const char* where) {
  const std::string src = "'" + file.path() + "'";
  std::vector<std::string> missing;
  for (const Parameter* p : model) {
    if (!file.contains(p->name)) {
      missing.push_back(p->name);
      continue;
    }
    const io::TensorInfo& ti = file.info(p->name);
    CUMO_CHECK(ti.shape == p->value.shape(), where, ": ", src, ": tensor '", p->name, "' has shape ", ti.shape,
               " in the file but the model's parameter has shape ", p->value.shape());
    CUMO_CHECK(is_floating(ti.dtype), where, ": ", src, ": tensor '", p->name, "' has dtype ", name_of(ti.dtype),
               ", which is not a floating-point type");
  }
  if (!missing.empty()) {
    std::string list;
    for (std::size_t i = 0; i < missing.size() && i < 5; ++i) list += (i ? ", '" : "'") + missing[i] + "'";
    if (missing.size() > 5) list += ", …";
    fail(where, ": ", src, " lacks ", missing.size(), " of the model's ", model.size(), " tensors: ", list,
         " (the file has ", file.size(), " tensors)");
  }
  if (strict && file.size() != model.size()) {
    std::set<std::string_view> known;
    for (const Parameter* p : model) known.insert(p->name);
    std::string list;
    std::size_t extra = 0;
    for (const std::string& n : file.names())
      if (!known.count(n)) {
        if (extra < 5) list += (extra ? ", '" : "'") + n + "'";
        ++extra;
      }
    fail(where, ": ", src, " holds ", extra, " tensors the model does not have: ", list, extra > 5 ? ", …" : "");
  }
}

inline void copy_weights(const io::SafeTensors& file, const ParameterList& model) {
  for (Parameter* p : model) {
    copy_converted(p->value, file.get(p->name));  // into the parameter's dtype (bf16/f16 for inference)
  }
}

template <class T>
T json_field(const nlohmann::json& j, const char* key, const std::string& src, const char* where) {
  auto it = j.find(key);
  CUMO_CHECK(it != j.end(), where, ": ", src, ": missing field '", key, "'");
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    fail(where, ": ", src, ": field '", key, "' has the wrong type (", it->type_name(), ")");
  }
}

inline std::uint64_t json_u64(const nlohmann::json& j, const char* key, const std::string& src, const char* where) {
  auto it = j.find(key);
  CUMO_CHECK(it != j.end(), where, ": ", src, ": missing field '", key, "'");
  CUMO_CHECK(it->is_number_unsigned(), where, ": ", src, ": field '", key,
             "' must be a non-negative integer, got ", it->dump());
  return it->get<std::uint64_t>();
}

inline std::int64_t json_count(const nlohmann::json& j, const char* key, const std::string& src, const char* where) {
  const std::uint64_t v = json_u64(j, key, src, where);
  CUMO_CHECK(v <= std::uint64_t(INT64_MAX), where, ": ", src, ": field '", key, "' is too large (", v, ")");
  return std::int64_t(v);
}

inline nlohmann::json optimizer_json(const AdamWGroups& opt) {  // AdamW or CudaAdamW
  const AdamWOptions& o = opt.options();
  nlohmann::json groups = nlohmann::json::array();
  for (const ParamGroup& g : opt.groups()) {
    nlohmann::json names = nlohmann::json::array();
    for (const Parameter* p : g.params) names.push_back(p->name);
    groups.push_back({{"name", g.name},
                      {"lr_scale", g.lr_scale},
                      {"weight_decay", g.weight_decay ? *g.weight_decay : o.weight_decay},
                      {"frozen", g.frozen},
                      {"params", std::move(names)}});
  }
  return {{"type", "AdamW"}, {"steps", opt.steps()},     {"lr", o.lr},
          {"beta1", o.beta1}, {"beta2", o.beta2},        {"eps", o.eps},
          {"weight_decay", o.weight_decay}, {"groups", std::move(groups)}};
}
}  // namespace detail

// HF's checkpoint directory name for a step ("checkpoint-500").
inline std::string checkpoint_dir(const std::string& root, std::int64_t step) {
  return (std::filesystem::path(root) / ("checkpoint-" + std::to_string(step))).string();
}

// The checkpoint-<N> directory under `root` with the largest N that holds a trainer_state.json, if any
// (hidden temporaries are ignored, so a crash mid-save never becomes "the latest").
inline std::optional<std::string> latest_checkpoint(const std::string& root) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return std::nullopt;
  std::optional<std::string> best;
  std::int64_t best_step = -1;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    if (!name.starts_with("checkpoint-") || !e.is_directory()) continue;
    const std::string digits = name.substr(11);
    if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
        digits.size() > 18)
      continue;
    const std::int64_t s = std::stoll(digits);
    if (s > best_step && fs::exists(e.path() / "trainer_state.json", ec)) {
      best_step = s;
      best = e.path().string();
    }
  }
  return best;
}

// Weights only, HF names, one safetensors file written atomically (what the next CuMo stage starts from).
inline void save_weights(const std::string& path, const ParameterList& model,
                         std::map<std::string, std::string> metadata = {}) {
  metadata.emplace("format", "pt");  // transformers refuses safetensors files whose format is not "pt"/"tf"/…
  io::save(path, detail::weight_tensors(model), metadata);
}

// Fills every parameter from a safetensors file by name (fp16/bf16/f64 converted to the parameter's dtype).
// strict: the file must hold no tensor the model lacks. Nothing changes unless every tensor checks out.
inline void load_weights(const std::string& path, const ParameterList& model, bool strict = true) {
  const io::SafeTensors file = io::SafeTensors::open(path);
  detail::check_weights(file, model, strict, "load_weights");
  detail::copy_weights(file, model);
}

// Writes <dir> atomically (see the top of this file). `optimizer` (AdamW, or CudaAdamW whose state is copied to the
// host) may be null: weights and state only.
inline void save_checkpoint(const std::string& dir, const ParameterList& model,
                            const detail::AdamWGroups* optimizer, const TrainerState& state) {
  namespace fs = std::filesystem;
  constexpr const char* where = "save_checkpoint";
  CUMO_CHECK(!dir.empty(), where, ": empty directory name");
  fs::path target = fs::path(dir);
  if (!target.has_filename()) target = target.parent_path();  // "ckpt/" → "ckpt"
  CUMO_CHECK(state.step >= 0 && state.epoch >= 0 && state.sample >= 0, where, ": negative step (", state.step,
             "), epoch (", state.epoch, ") or sample (", state.sample, ")");
  std::error_code ec;
  if (target.has_parent_path()) fs::create_directories(target.parent_path(), ec);

  nlohmann::json j;
  j["format"] = kCheckpointFormat;
  j["version"] = kCheckpointVersion;
  j["step"] = std::uint64_t(state.step);
  j["epoch"] = std::uint64_t(state.epoch);
  j["sample"] = std::uint64_t(state.sample);
  nlohmann::json rngs = nlohmann::json::object();
  for (const auto& [name, s] : state.rngs) rngs[name] = {{"seed", s.seed}, {"counter", s.counter}};
  j["rngs"] = std::move(rngs);
  nlohmann::json meta = nlohmann::json::object();
  for (const auto& [k, v] : state.metadata) meta[k] = v;
  j["metadata"] = std::move(meta);
  j["files"] = {{"model", "model.safetensors"}};
  if (optimizer) {
    j["files"]["optimizer"] = "optimizer.safetensors";
    j["optimizer"] = detail::optimizer_json(*optimizer);
  }
  std::string text;
  try {
    text = j.dump(2, ' ', false, nlohmann::json::error_handler_t::strict) + "\n";
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": a name or metadata string is not valid UTF-8 (", e.what(), ")");
  }

  const fs::path tmp = detail::make_sibling_dir(target, ".tmp.", where);
  try {
    save_weights((tmp / "model.safetensors").string(), model);
    if (optimizer)
      io::save((tmp / "optimizer.safetensors").string(), optimizer->state_tensors(),
               {{"format", kCheckpointFormat}, {"steps", std::to_string(optimizer->steps())}});
    // Written last: its presence marks a complete checkpoint (latest_checkpoint looks for it).
    detail::write_text_file(tmp / "trainer_state.json", text, where);
    detail::fsync_path(tmp, true);
    detail::publish_dir(tmp, target, where);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  detail::fsync_path(target.has_parent_path() ? target.parent_path() : fs::path("."), true);
}

// Restores weights (strict: same names and shapes), the optimizer's state (when `optimizer` is non-null; on the
// device of its parameters) and returns the trainer state. Validates everything first; on error nothing has changed.
inline TrainerState load_checkpoint(const std::string& dir, const ParameterList& model,
                                    detail::AdamWGroups* optimizer) {
  namespace fs = std::filesystem;
  constexpr const char* where = "load_checkpoint";
  std::error_code ec;
  CUMO_CHECK(fs::is_directory(dir, ec), where, ": '", dir, "' is not a directory");
  const fs::path state_path = fs::path(dir) / "trainer_state.json";
  CUMO_CHECK(fs::exists(state_path, ec), where, ": '", dir,
             "' has no trainer_state.json (not a checkpoint, or an incomplete one)");
  const std::string src = "'" + state_path.string() + "'";

  nlohmann::json j;
  try {
    j = nlohmann::json::parse(detail::read_text_file(state_path, where));
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": ", src, " is not valid JSON: ", e.what());
  }
  CUMO_CHECK(j.is_object(), where, ": ", src, " must hold a JSON object");
  CUMO_CHECK(detail::json_field<std::string>(j, "format", src, where) == kCheckpointFormat, where, ": ", src,
             " has format '", j["format"].get<std::string>(), "', expected '", kCheckpointFormat, "'");
  const int version = detail::json_field<int>(j, "version", src, where);
  CUMO_CHECK(version == kCheckpointVersion, where, ": ", src, " has version ", version, "; this cumo reads version ",
             kCheckpointVersion);
  TrainerState state;
  state.step = detail::json_count(j, "step", src, where);
  state.epoch = detail::json_count(j, "epoch", src, where);
  state.sample = detail::json_count(j, "sample", src, where);
  const auto rngs = j.find("rngs");
  CUMO_CHECK(rngs != j.end() && rngs->is_object(), where, ": ", src, ": 'rngs' must be an object");
  for (const auto& [name, r] : rngs->items()) {
    CUMO_CHECK(r.is_object(), where, ": ", src, ": rng '", name, "' must be an object {seed, counter}");
    const std::string rsrc = src + " rng '" + name + "'";
    state.rngs[name] = Rng::State{detail::json_u64(r, "seed", rsrc, where), detail::json_u64(r, "counter", rsrc, where)};
  }
  const auto meta = j.find("metadata");
  CUMO_CHECK(meta != j.end() && meta->is_object(), where, ": ", src, ": 'metadata' must be an object");
  for (const auto& [k, v] : meta->items()) {
    CUMO_CHECK(v.is_string(), where, ": ", src, ": metadata '", k, "' must be a string");
    state.metadata[k] = v.get<std::string>();
  }

  // Weights: open (the reader validates the file's structure: a truncated file fails here) and check.
  const io::SafeTensors weights = io::SafeTensors::open((fs::path(dir) / "model.safetensors").string());
  detail::check_weights(weights, model, /*strict=*/true, where);

  if (optimizer) {
    CUMO_CHECK(j.contains("optimizer") && j["optimizer"].is_object(), where, ": '", dir,
               "' was saved without optimizer state; pass a null optimizer to load the weights only");
    const std::int64_t steps = detail::json_count(j["optimizer"], "steps", src + " optimizer", where);
    const io::SafeTensors opt = io::SafeTensors::open((fs::path(dir) / "optimizer.safetensors").string());
    // Validates all of it, then replaces the optimizer's state; throws with the optimizer untouched.
    optimizer->load_state_tensors(opt.names(), [&](const std::string& n) { return opt.get(n); }, steps,
                                  "'" + opt.path() + "'");
  }
  detail::copy_weights(weights, model);  // cannot fail: every tensor was checked above
  return state;
}

}  // namespace cumo::train
