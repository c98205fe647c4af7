#pragma once
// nn::Connector — the LLaVA-1.5 projector from vision features to the LLM's embedding space:
//   linear_1 (Hv → Ht) → GELU (erf) → linear_2 (Ht → Ht), biases on both (llava-hf: multi_modal_projector.linear_{1,2};
//   original LLaVA / CuMo checkpoints: model.mm_projector.{0,2} — io/hf_names.hpp maps the two).
// CuMo's MLP-MoE connector is the same slot after upcycle(): a SparseMoE of such MLPs, each expert mapping Hv → Ht
// (SparseMoE's out_features).
#include <cstdint>
#include <string>
#include <utility>

#include "cumo/nn/mlp.hpp"

namespace cumo::nn {

template <backend::Backend Backend = backend::Cpu>
using ConnectorFFN = FeedForward<DenseMLP<GELU, Backend>, SparseMoE<Router<TopKDynamic>, Expert<MLP<GELU>>, Backend>>;

template <backend::Backend Backend = backend::Cpu>
class Connector {
 public:
  Connector() = default;
  // name: "model.multi_modal_projector" (transformers 5)
  Connector(const std::string& name, std::int64_t vision_hidden, std::int64_t text_hidden, Backend backend = {})
      : mlp(name, DenseMLP<GELU, Backend>(name, vision_hidden, text_hidden, text_hidden, "linear_1", "linear_2",
                                          std::move(backend))) {}

  ConnectorFFN<Backend> mlp;

  void collect(ParameterList& out) { mlp.collect(out); }
  ParameterList parameters() {
    ParameterList p;
    collect(p);
    return p;
  }
  // features (B*N, Hv) → (B*N, Ht); segments = images (per-image aux losses when sparse); training = false keeps
  // nothing for a backward where it can (FeedForward::forward).
  Tensor forward(const Tensor& features, std::int64_t segments = 1, bool training = true) {
    return mlp.forward(features, ForwardArgs{segments, training});
  }
  Tensor backward(const Tensor& dy, AuxLossWeights aux = {}) { return mlp.backward(dy, aux); }
};

}  // namespace cumo::nn
