#pragma once
// Upcycling (Komatsuzaki et al. 2023; CuMo stage 3): a dense MLP becomes a sparse block whose every expert is an
// exact copy of it, with a fresh router (PyTorch Linear default init, seeded). Because the renormalised top-k
// weights sum to 1, the block then computes the dense MLP for any router — the invariant the tests check.
#include <utility>

#include "cumo/moe/sparse_moe.hpp"

namespace cumo {

template <class MoE>
MoE upcycle_from_dense(const DenseMLPWeights& dense, int experts, Rng& rng, SparseMoEOptions options = {},
                       typename MoE::topk_type topk = {}, typename MoE::backend_type backend = {}) {
  static_assert(!MoE::expert_type::gated, "upcycle_from_dense(DenseMLPWeights): the block's experts must be MLP<Act>");
  CUMO_CHECK(dense.fc1_weight.dim() == 2, "upcycle_from_dense: fc1.weight has shape ", dense.fc1_weight.shape(),
             " but expected (ffn, hidden)");
  MoE moe(dense.fc1_weight.size(1), dense.fc1_weight.size(0), experts, options, topk, dense.fc2_weight.size(0),
          std::move(backend));
  moe.experts().copy_from_dense(dense);
  moe.router().reset_parameters(rng);
  return moe;
}

template <class MoE>
MoE upcycle_from_dense(const DenseGatedWeights& dense, int experts, Rng& rng, SparseMoEOptions options = {},
                       typename MoE::topk_type topk = {}, typename MoE::backend_type backend = {}) {
  static_assert(MoE::expert_type::gated,
                "upcycle_from_dense(DenseGatedWeights): the block's experts must be GatedMLP<Act>");
  CUMO_CHECK(dense.gate_proj.dim() == 2, "upcycle_from_dense: gate_proj has shape ", dense.gate_proj.shape(),
             " but expected (ffn, hidden)");
  MoE moe(dense.gate_proj.size(1), dense.gate_proj.size(0), experts, options, topk, dense.down_proj.size(0),
          std::move(backend));
  moe.experts().copy_from_dense(dense);
  moe.router().reset_parameters(rng);
  return moe;
}

}  // namespace cumo
