#pragma once
// Naming variants of the same weights in checkpoints met in the wild. cumo's parameters carry the canonical
// (transformers 5 save) name; hf_name_variants() lists every name the same tensor may have elsewhere, canonical
// first, and expert_parts() says how a fused expert tensor is assembled from per-expert tensors.
//
//   vision tower  model.vision_tower.X     vision_tower.vision_model.X (llava-hf)   vision_model.X (openai CLIP)
//                 X (CLIPVisionModel, transformers 5)                   vision_tower.X
//   language      model.language_model.X   language_model.model.X (llava-hf 4.x)    model.X (Mistral / Qwen2)
//   lm head       lm_head.weight           language_model.lm_head.weight
//   projector     model.multi_modal_projector.linear_{1,2}   multi_modal_projector.linear_{1,2}
//                 model.mm_projector.{0,2} (original LLaVA / CuMo)
//   MoE FFN       ….mlp.gate.weight        ….block_sparse_moe.gate.weight (Mixtral on the hub)
//   experts       ….experts.gate_up_proj (E, 2F, H) = per expert [w1; w3] or [gate_proj; up_proj]
//                 ….experts.down_proj (E, H, F)     = per expert w2 or down_proj
//                 ….experts.fc1.weight (E, F, H)    = per expert fc1 (CuMo CLIP) or linear_1 (CuMo projector) …
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace cumo::io {

namespace detail {

struct PrefixGroup {
  std::vector<std::string> prefixes;   // equivalent prefixes, canonical first
  std::vector<std::string> first_words;  // what may follow the prefix ("" = anything)
};

inline const std::vector<PrefixGroup>& prefix_groups() {
  static const std::vector<PrefixGroup> groups = {
      {{"model.vision_tower.", "vision_tower.vision_model.", "vision_model.", "vision_tower.",
        "model.vision_tower.vision_model.", ""},
       {"embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."}},
      {{"model.language_model.", "language_model.model.", "model."}, {"embed_tokens.", "layers.", "norm."}},
      {{"lm_head.", "language_model.lm_head."}, {""}},
      {{"model.multi_modal_projector.", "multi_modal_projector."}, {""}},
  };
  return groups;
}

inline void push_unique(std::vector<std::string>& v, std::string s) {
  for (const auto& x : v)
    if (x == s) return;
  v.push_back(std::move(s));
}

// Within-module renames that apply whatever the prefix.
inline std::vector<std::string> suffix_variants(const std::string& rest) {
  std::vector<std::string> out{rest};
  static const std::pair<std::string_view, std::string_view> renames[] = {
      {".mlp.gate.weight", ".block_sparse_moe.gate.weight"},
      {".mlp.experts.", ".block_sparse_moe.experts."},
  };
  for (const auto& [from, to] : renames)
    if (auto p = rest.find(from); p != std::string::npos)
      push_unique(out, rest.substr(0, p) + std::string(to) + rest.substr(p + from.size()));
  // the projector's two linears in original LLaVA: mm_projector.0 / mm_projector.2
  static const std::pair<std::string_view, std::string_view> proj[] = {{"linear_1.", "0."}, {"linear_2.", "2."}};
  for (const auto& [from, to] : proj)
    if (rest.starts_with(from)) push_unique(out, "@mm_projector." + std::string(to) + rest.substr(from.size()));
  return out;
}

}  // namespace detail

// Every name under which the canonical parameter `name` may be stored, canonical first.
inline std::vector<std::string> hf_name_variants(const std::string& name) {
  std::vector<std::string> out{name};
  for (const auto& g : detail::prefix_groups()) {
    for (const auto& pre : g.prefixes) {
      if (!name.starts_with(pre)) continue;
      const std::string rest = name.substr(pre.size());
      bool ok = false;
      for (const auto& w : g.first_words) ok |= w.empty() || rest.starts_with(w);
      if (!ok) continue;
      for (const auto& r : detail::suffix_variants(rest)) {
        if (r.starts_with("@")) {  // a whole-name replacement (original LLaVA's projector)
          detail::push_unique(out, "model." + r.substr(1));
          continue;
        }
        for (const auto& other : g.prefixes) detail::push_unique(out, other + r);
      }
      return out;
    }
  }
  for (const auto& r : detail::suffix_variants(name))
    if (!r.starts_with("@")) detail::push_unique(out, r);
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
  else if (what == "fc1.weight") out.choices = {{"fc1.weight"}, {"linear_1.weight"}};
  else if (what == "fc1.bias") out.choices = {{"fc1.bias"}, {"linear_1.bias"}};
  else if (what == "fc2.weight") out.choices = {{"fc2.weight"}, {"linear_2.weight"}};
  else if (what == "fc2.bias") out.choices = {{"fc2.bias"}, {"linear_2.bias"}};
  else return false;
  return true;
}

}  // namespace cumo::io
