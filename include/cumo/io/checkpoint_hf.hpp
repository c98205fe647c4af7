#pragma once
// Loading and saving model weights as Hugging Face checkpoints.
//   HFCheckpoint::open(path): one .safetensors file, a sharded set (model.safetensors.index.json), or a directory
//   holding either. load_hf(params, ckpt): every parameter is looked up under each naming variant of its canonical
//   name (io/hf_names.hpp), fused experts are assembled from per-expert tensors when the file stores them so,
//   bf16 / f16 / f64 become fp32, and every missing or mis-shaped tensor is reported — all of them at once — by
//   name with both shapes. save_hf() writes canonical (transformers 5) names that PyTorch loads back as they are, or the released CuMo
// checkpoints' layout (Layout::cumo_release).
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/parameter.hpp"
#include "cumo/io/hf_names.hpp"
#include "cumo/io/safetensors.hpp"

namespace cumo::io {

class HFCheckpoint {
 public:
  static HFCheckpoint open(const std::string& path) {
    namespace fs = std::filesystem;
    HFCheckpoint ck;
    fs::path p(path);
    if (fs::is_directory(p)) {
      if (fs::exists(p / "model.safetensors.index.json"))
        p = p / "model.safetensors.index.json";
      else if (fs::exists(p / "model.safetensors"))
        p = p / "model.safetensors";
      else
        fail("HFCheckpoint: directory '", path, "' has neither model.safetensors nor model.safetensors.index.json");
    }
    if (p.extension() == ".json") {
      std::ifstream f(p);
      CUMO_CHECK(f, "HFCheckpoint: cannot open index '", p.string(), "'");
      nlohmann::json idx;
      try {
        idx = nlohmann::json::parse(f);
      } catch (const std::exception& e) {
        fail("HFCheckpoint: index '", p.string(), "' is not valid JSON: ", e.what());
      }
      CUMO_CHECK(idx.is_object() && idx.contains("weight_map") && idx["weight_map"].is_object(), "HFCheckpoint: index '",
                 p.string(), "' has no \"weight_map\" object");
      std::map<std::string, std::size_t> shard_of_file;
      for (auto& [name, file] : idx["weight_map"].items()) {
        CUMO_CHECK(file.is_string(), "HFCheckpoint: index '", p.string(), "': weight_map[\"", name, "\"] is not a file name");
        const std::string fn = file.get<std::string>();
        auto it = shard_of_file.find(fn);
        if (it == shard_of_file.end()) {
          it = shard_of_file.emplace(fn, ck.shards_.size()).first;
          ck.shards_.push_back(SafeTensors::open((p.parent_path() / fn).string()));
        }
        CUMO_CHECK(ck.shards_[it->second].contains(name), "HFCheckpoint: index '", p.string(), "' puts '", name,
                   "' in '", fn, "' but that shard has no such tensor");
        ck.where_[name] = it->second;
      }
    } else {
      ck.shards_.push_back(SafeTensors::open(p.string()));
      for (const auto& n : ck.shards_[0].names()) ck.where_[n] = 0;
    }
    return ck;
  }
  // A checkpoint over one already opened file (fixtures, memory images).
  static HFCheckpoint from(SafeTensors f) {
    HFCheckpoint ck;
    ck.shards_.push_back(std::move(f));
    for (const auto& n : ck.shards_[0].names()) ck.where_[n] = 0;
    return ck;
  }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const { return shard(name).info(name); }
  Tensor get_f32(const std::string& name) const { return shard(name).get_f32(name); }
  Tensor get(const std::string& name) const { return shard(name).get(name); }  // stored dtype, zero-copy view
  void release_pages(const std::string& name) const { shard(name).release_pages(name); }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& [k, v] : where_) n.push_back(k);
    return n;
  }
  std::size_t shards() const { return shards_.size(); }

 private:
  const SafeTensors& shard(const std::string& name) const {
    auto it = where_.find(name);
    CUMO_CHECK(it != where_.end(), "HFCheckpoint: no tensor named '", name, "'");
    return shards_[it->second];
  }
  std::vector<SafeTensors> shards_;
  std::map<std::string, std::size_t> where_;
};

struct LoadOptions {
  std::string prefix;          // prepended to every name looked up (fixtures store weights as "param.<name>")
  bool allow_missing = false;  // leave missing parameters as they are instead of failing
  // parameters whose name ends with one of these may be absent (left as they are, listed in LoadResult::missing)
  std::vector<std::string> optional_suffixes;
  // drop each mapped tensor's pages once copied (SafeTensors::release_pages): for a loader that owns the checkpoint
  bool release_pages = false;
};

struct LoadResult {
  std::vector<std::pair<std::string, std::string>> loaded;  // (parameter, name found in the file; "experts:…" when assembled)
  std::vector<std::string> missing;                          // with allow_missing or optional_suffixes
};

namespace detail {
inline std::string join_names(const std::vector<std::string>& v, std::size_t max = 6) {
  std::string s;
  for (std::size_t i = 0; i < v.size() && i < max; ++i) s += (i ? ", '" : "'") + v[i] + "'";
  if (v.size() > max) s += ", …";
  return s;
}
}  // namespace detail

inline LoadResult load_hf(const ParameterList& params, const HFCheckpoint& ck, const LoadOptions& opt = {}) {
  LoadResult res;
  std::vector<std::string> problems;
  for (Parameter* p : params) {
    const Shape want = p->value.shape();
    const auto names = hf_name_variants(p->name);
    std::string found;
    for (const auto& n : names)
      if (ck.contains(opt.prefix + n)) {
        found = opt.prefix + n;
        break;
      }
    if (!found.empty()) {
      const Shape have = ck.info(found).shape;
      if (!(have == want)) {
        problems.push_back("'" + found + "' has shape " + have.str() + " in the file but the model's '" + p->name +
                           "' has shape " + want.str());
        continue;
      }
      copy_converted(p->value, ck.get(found));  // into the parameter's dtype (fp32, or bf16/f16 for inference)
      if (opt.release_pages) ck.release_pages(found);
      res.loaded.emplace_back(p->name, found);
      continue;
    }
    // fused experts stored one expert at a time
    ExpertParts ep;
    bool assembled = false;
    std::string expert_problem;
    if (want.rank() >= 2 && expert_parts(p->name, ep)) {
      const std::int64_t E = want[0];
      for (const auto& module : hf_name_variants(ep.module + ".experts.x")) {
        const std::string mod = module.substr(0, module.size() - 10);  // drop ".experts.x"
        for (const auto& choice : ep.choices) {
          const std::string first = opt.prefix + mod + ".experts.0." + choice[0];
          if (!ck.contains(first)) continue;
          // Assembled in place on the host (a second copy of a large expert stack would raise peak memory), or on
          // the host in the parameter's dtype and then copied to its device.
          const bool in_place = p->value.device() == Device::cpu && p->value.is_contiguous();
          Tensor full = in_place ? p->value : Tensor::empty(want, p->value.dtype());
          const std::int64_t per = want.numel() / E;
          char* base = static_cast<char*>(full.raw());
          for (int e = 0; e < E && expert_problem.empty(); ++e) {
            std::int64_t off = 0;
            for (const auto& part : choice) {
              const std::string n = opt.prefix + mod + ".experts." + std::to_string(e) + "." + part;
              if (!ck.contains(n)) {
                expert_problem = "'" + n + "' is missing (needed for '" + p->name + "')";
                break;
              }
              const Tensor t = ck.get(n);
              if (off + t.numel() > per) {
                expert_problem = "'" + n + "' has shape " + t.shape().str() + ", too large for expert " +
                                 std::to_string(e) + " of '" + p->name + "' with shape " + want.str();
                break;
              }
              Tensor into = Tensor::borrow(base + std::size_t(e * per + off) * size_of(full.dtype()), t.shape(),
                                           full.dtype());  // expert e's part, a view of `full`
              copy_converted(into, t);
              if (opt.release_pages) ck.release_pages(n);
              off += t.numel();
            }
            if (expert_problem.empty() && off != per)
              expert_problem = "the per-expert tensors of '" + p->name + "' (" + mod + ".experts." + std::to_string(e) +
                               ".*) hold " + std::to_string(off) + " values but an expert of shape " + want.str() +
                               " needs " + std::to_string(per);
          }
          if (expert_problem.empty()) {
            if (!in_place) p->value.copy_from(full);
            res.loaded.emplace_back(p->name, "experts:" + mod + ".experts.*." + choice[0]);
            assembled = true;
          }
          break;
        }
        if (assembled || !expert_problem.empty()) break;
      }
    }
    if (assembled) continue;
    if (!expert_problem.empty()) {
      problems.push_back(expert_problem);
      continue;
    }
    bool optional = opt.allow_missing;
    for (const auto& suffix : opt.optional_suffixes) optional |= p->name.ends_with(suffix);
    if (optional) {
      res.missing.push_back(p->name);
      continue;
    }
    std::vector<std::string> tried;
    for (const auto& n : names) tried.push_back(opt.prefix + n);
    problems.push_back("missing '" + p->name + "' with shape " + want.str() + " (tried " + detail::join_names(tried) + ")");
  }
  if (!problems.empty()) {
    std::string msg = "load_hf: " + std::to_string(problems.size()) + " problem(s) loading " +
                      std::to_string(params.size()) + " parameters:";
    for (const auto& s : problems) msg += "\n  " + s;
    throw Error(msg);
  }
  return res;
}

inline LoadResult load_hf(const ParameterList& params, const std::string& path, const LoadOptions& opt = {}) {
  return load_hf(params, HFCheckpoint::open(path), opt);
}

// How save_hf names what it writes.
enum class Layout {
  transformers,  // canonical transformers 5 names, experts fused (E, …): what PyTorch's LlavaForConditionalGeneration loads
  cumo_release,  // the released SHI-Labs/CuMo checkpoints' names, experts one tensor each (io::release_name)
};

inline Layout parse_layout(const std::string& s) {
  if (s == "transformers") return Layout::transformers;
  if (s == "release" || s == "cumo_release") return Layout::cumo_release;
  fail("unknown checkpoint layout '", s, "' (accepted: transformers, release)");
}

namespace detail {
// (name, tensor) pairs of `params` in `layout`, host tensors; a fused expert tensor (E, R, …) becomes E tensors per
// part, each part a block of R / parts rows.
inline std::vector<std::pair<std::string, Tensor>> named_for_layout(const ParameterList& params, Layout layout) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (Parameter* p : params) {
    Tensor host = p->value.device() == Device::cpu ? p->value : p->value.to(Device::cpu);
    std::string module;
    std::vector<std::string> parts;
    if (layout == Layout::transformers) {
      out.emplace_back(p->name, host);
    } else if (!release_expert_parts(p->name, module, parts)) {
      out.emplace_back(release_name(p->name), host);
    } else {
      const std::int64_t E = host.size(0), rows = host.size(1) / std::int64_t(parts.size());
      for (std::int64_t e = 0; e < E; ++e) {
        const Tensor slice = host.select(0, e);  // (R, …)
        for (std::size_t k = 0; k < parts.size(); ++k)
          out.emplace_back(module + ".experts." + std::to_string(e) + "." + parts[k],
                           slice.slice(0, std::int64_t(k) * rows, std::int64_t(k + 1) * rows).contiguous());
      }
    }
  }
  return out;
}
}  // namespace detail

// Writes every parameter (fp32) atomically, named as `layout` says. `metadata` goes to __metadata__ (HF writes
// {"format": "pt"}; added when absent). Either layout loads back through load_hf, bitwise.
inline void save_hf(const std::string& path, const ParameterList& params, std::map<std::string, std::string> metadata = {},
                    Layout layout = Layout::transformers) {
  metadata.emplace("format", "pt");
  save(path, detail::named_for_layout(params, layout), metadata);
}

}  // namespace cumo::io
