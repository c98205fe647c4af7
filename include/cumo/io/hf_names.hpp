#pragma once
// Naming variants of the same weights in checkpoints met in the wild. cumo's parameters carry the canonical
// (transformers 5 save) name; hf_name_variants() lists every name the same tensor may have elsewhere, canonical
// first, expert_parts() says how a fused expert tensor is assembled from per-expert tensors, and release_name() /
// release_expert_parts() give the one name a tensor has in the released SHI-Labs/CuMo checkpoints (for saving).
//
//   vision tower  model.vision_tower.X     vision_tower.vision_model.X (llava-hf)   vision_model.X (openai CLIP)
//                 X (CLIPVisionModel, transformers 5)   vision_tower.X   model.vision_tower.vision_model.X (CuMo)
//   language      model.language_model.X   language_model.model.X (llava-hf 4.x)    model.X (Mistral / Qwen2 / CuMo)
//   lm head       lm_head.weight           language_model.lm_head.weight
//   projector     model.multi_modal_projector.linear_{1,2}   multi_modal_projector.linear_{1,2}
//                 model.mm_projector.{0,2} (original LLaVA / CuMo)
//   MoE FFN       ….mlp.gate.weight        ….block_sparse_moe.gate.weight (Mixtral on the hub)
//                 CuMo's CLIP layers: ….layers.N.gate.weight (no ".mlp.")   CuMo's projector: model.mm_projector.gate.weight
//   experts       ….experts.gate_up_proj (E, 2F, H) = per expert [w1; w3] or [gate_proj; up_proj]
//                 ….experts.down_proj (E, H, F)     = per expert w2 or down_proj
//                 ….experts.fc1.weight (E, F, H)    = per expert fc1 (CuMo CLIP: ….layers.N.experts.E.fc1), linear_1,
//                                                     or 0 (CuMo projector: model.mm_projector.experts.E.0)
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace cumo::io {

namespace detail {

using Rename = std::pair<std::string_view, std::string_view>;

// Renames inside a module, whatever the prefix: Mixtral's block_sparse_moe for the decoder's sparse FFN.
inline constexpr Rename kMixtralRenames[] = {
    {".mlp.gate.weight", ".block_sparse_moe.gate.weight"},
    {".mlp.experts.", ".block_sparse_moe.experts."},
};
// CuMo's CLIP-MoE puts the router and the experts directly under the encoder layer.
inline constexpr Rename kCuMoVisionRenames[] = {
    {".mlp.gate.weight", ".gate.weight"},
    {".mlp.experts.", ".experts."},
};
// Original LLaVA / CuMo name the projector model.mm_projector: a Sequential (0 = Linear, 2 = Linear) or CuMo's
// MLPMoE (gate, experts.E.{0,2}). These replace the whole prefix, so they start with '@'.
inline constexpr Rename kMmProjectorRenames[] = {
    {"linear_1.", "@mm_projector.0."},
    {"linear_2.", "@mm_projector.2."},
    {"gate.", "@mm_projector.gate."},
    {"experts.", "@mm_projector.experts."},
};

struct PrefixGroup {
  std::vector<std::string> prefixes;     // equivalent prefixes, canonical first
  std::vector<std::string> first_words;  // what may follow the prefix ("" = anything)
  std::vector<Rename> renames;           // what else the rest of the name may be called under this group
  std::string release_prefix;            // the released CuMo checkpoints' prefix (with `renames` applied)
};

inline const std::vector<PrefixGroup>& prefix_groups() {
  static const std::vector<PrefixGroup> groups = {
      {{"model.vision_tower.", "vision_tower.vision_model.", "vision_model.", "vision_tower.",
        "model.vision_tower.vision_model.", ""},
       {"embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."},
       {std::begin(kCuMoVisionRenames), std::end(kCuMoVisionRenames)},
       "model.vision_tower.vision_model."},
      {{"model.language_model.", "language_model.model.", "model."},
       {"embed_tokens.", "layers.", "norm."},
       {std::begin(kMixtralRenames), std::end(kMixtralRenames)},
       "model."},
      {{"lm_head.", "language_model.lm_head."}, {""}, {}, "lm_head."},
      {{"model.multi_modal_projector.", "multi_modal_projector."},
       {""},
       {std::begin(kMmProjectorRenames), std::end(kMmProjectorRenames)},
       "model.multi_modal_projector."},  // every projector name has a '@' rename to model.mm_projector
  };
  return groups;
}

inline void push_unique(std::vector<std::string>& v, std::string s) {
  for (const auto& x : v)
    if (x == s) return;
  v.push_back(std::move(s));
}

// `rest` and each of its renames: an infix rename replaces its first occurrence, a '@' rename a leading match.
template <class Renames>
std::vector<std::string> renamed(const std::string& rest, const Renames& renames) {
  std::vector<std::string> out{rest};
  for (const auto& [from, to] : renames) {
    if (to.starts_with("@")) {
      if (rest.starts_with(from)) push_unique(out, std::string(to) + rest.substr(from.size()));
    } else if (auto p = rest.find(from); p != std::string::npos) {
      push_unique(out, rest.substr(0, p) + std::string(to) + rest.substr(p + from.size()));
    }
  }
  return out;
}

// The group whose prefix `name` starts with (any of its prefixes, followed by one of its first words), and the
// rest of the name after that prefix; nullptr when none.
inline const PrefixGroup* group_of(const std::string& name, std::string& rest) {
  for (const auto& g : prefix_groups())
    for (const auto& pre : g.prefixes) {
      if (!name.starts_with(pre)) continue;
      rest = name.substr(pre.size());
      for (const auto& w : g.first_words)
        if (w.empty() || rest.starts_with(w)) return &g;
    }
  return nullptr;
}

}  // namespace detail

// Every name under which the canonical parameter `name` may be stored, canonical first.
inline std::vector<std::string> hf_name_variants(const std::string& name) {
  std::vector<std::string> out{name};
  std::string rest;
  if (const detail::PrefixGroup* g = detail::group_of(name, rest)) {
    for (const auto& r : detail::renamed(rest, g->renames)) {
      if (r.starts_with("@")) {  // a whole-name replacement (original LLaVA's projector)
        detail::push_unique(out, "model." + r.substr(1));
        continue;
      }
      for (const auto& other : g->prefixes) detail::push_unique(out, other + r);
    }
    return out;
  }
  for (const auto& r : detail::renamed(name, detail::kMixtralRenames)) detail::push_unique(out, r);
  return out;
}

// A fused expert tensor `<module>.experts.<what>` stored per expert: each alternative lists the per-expert
// suffixes whose (rows, cols) blocks are stacked along rows to make expert e's slice.
struct ExpertParts {
  std::string module;                             // "<module>" (everything before ".experts.")
  std::vector<std::vector<std::string>> choices;  // e.g. {{"w1.weight", "w3.weight"}, {"gate_proj.weight", "up_proj.weight"}}
};

// Whether `name` is a fused expert tensor, and how its per-expert pieces are named.
inline bool expert_parts(const std::string& name, ExpertParts& out) {
  const auto p = name.rfind(".experts.");
  if (p == std::string::npos) return false;
  out.module = name.substr(0, p);
  const std::string what = name.substr(p + 9);
  if (what == "gate_up_proj") out.choices = {{"w1.weight", "w3.weight"}, {"gate_proj.weight", "up_proj.weight"}};
  else if (what == "down_proj") out.choices = {{"w2.weight"}, {"down_proj.weight"}};
  else if (what == "fc1.weight") out.choices = {{"fc1.weight"}, {"linear_1.weight"}, {"0.weight"}};
  else if (what == "fc1.bias") out.choices = {{"fc1.bias"}, {"linear_1.bias"}, {"0.bias"}};
  else if (what == "fc2.weight") out.choices = {{"fc2.weight"}, {"linear_2.weight"}, {"2.weight"}};
  else if (what == "fc2.bias") out.choices = {{"fc2.bias"}, {"linear_2.bias"}, {"2.bias"}};
  else return false;
  return true;
}

// The name of canonical parameter `name` in the released SHI-Labs/CuMo checkpoints (LlavaMistralForCausalLM /
// LlavaMixtralForCausalLM). A fused expert tensor has no single name there: release_expert_parts() says how to
// split it. Every release name is one of hf_name_variants(name), so what save_hf(…, Layout::cumo_release) writes
// loads back.
inline std::string release_name(const std::string& name) {
  std::string rest;
  const detail::PrefixGroup* g = detail::group_of(name, rest);
  if (g == nullptr) return name;
  const std::string r = detail::renamed(rest, g->renames).back();  // the rename that applies, if any
  return r.starts_with("@") ? "model." + r.substr(1) : g->release_prefix + r;
}

// For a fused expert tensor: its release module in `owner` ("….experts" dropped) and the per-expert suffixes
// stacked along rows (gate_up_proj → w1, w3; the projector's fc1 → 0). False for any other tensor. (Not named
// `module`: a line starting with that word reads to nvcc as a C++20 module declaration, warning #3189.)
inline bool release_expert_parts(const std::string& name, std::string& owner, std::vector<std::string>& parts) {
  ExpertParts ep;
  if (!expert_parts(name, ep)) return false;
  const std::string m = release_name(ep.module + ".experts.x");
  owner = m.substr(0, m.size() - 10);  // drop ".experts.x"
  const bool projector = owner == "model.mm_projector";
  const std::string what = name.substr(name.rfind(".experts.") + 9);
  if (what == "gate_up_proj") parts = {"w1.weight", "w3.weight"};
  else if (what == "down_proj") parts = {"w2.weight"};
  else parts = {projector ? std::string(what[2] == '1' ? "0" : "2") + what.substr(3) : what};
  return true;
}

}  // namespace cumo::io
