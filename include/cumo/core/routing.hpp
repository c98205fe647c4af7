#pragma once
// Plain data the MoE parts and the backends pass each other (routing output, dispatch plan, aux losses, loads). It
// lives in core/ because both moe/ and backend/ need it and neither may include the other's headers for it.
// Every tensor lives on the backend's device.
#include <cstdint>
#include <vector>

#include "cumo/core/tensor.hpp"

namespace cumo {

// Which routing choices count in the balance loss's f_e.
enum class BalanceCounts {
  top1,  // f_e = share of tokens whose first choice is e (CuMo, Switch, DeepSpeed); balanced = 1
  all_k  // f_e = share of all k slots that chose e, divided by tokens (HF Mixtral); balanced = k
};

struct RouterOutput {
  Tensor x;         // (T, H)  router input as used (jittered when training with jitter)
  Tensor noise;     // (T, H)  the jitter multipliers, undefined without jitter
  Tensor logits;    // (T, E)  f32
  Tensor probs;     // (T, E)  f32 softmax over all experts
  Tensor topk_idx;  // (T, K)  i32, best first
  Tensor topk_w;    // (T, K)  f32, renormalised to sum 1 unless the router says otherwise
};

// Where each (token, slot) goes: a counting sort of the T·K routing choices by expert, so expert e owns the
// contiguous rows [offsets[e], offsets[e+1]) of the permuted activations. Buffers are sized T·K; with a capacity,
// rows at and past offsets[E] are unused.
struct DispatchPlan {
  std::int64_t tokens = 0;
  int experts = 0;
  int top_k = 0;
  std::int64_t capacity = -1;        // per expert; -1 = dropless
  Tensor demand;                     // (E,)    i32 slots that chose e, before any drop
  Tensor counts;                     // (E,)    i32 rows kept for e
  Tensor offsets;                    // (E+1,)  i32 exclusive scan of counts
  Tensor row_of_slot;                // (T*K,)  i32 permuted row of slot t*K+k, or -1 when dropped
  Tensor slot_of_row;                // (T*K,)  i32 slot held by permuted row r
  std::vector<std::int64_t> host_offsets;  // (E+1,) copy on the host (the CPU backend always fills it)
  std::int64_t rows() const { return host_offsets.empty() ? tokens * top_k : host_offsets.back(); }
};

// The auxiliary losses of one forward. Segments (images) are reduced one by one and then averaged, as CuMo does.
struct AuxLosses {
  Tensor balance_top1;  // (1,) E Σ_e f_e P_e, f from first choices
  Tensor balance_allk;  // (1,) same with all k slots counted
  Tensor z;             // (1,) mean_t logsumexp(z_t)^2
};

// d objective / d (each aux loss) — the coefficients the trainer puts in front of them.
struct AuxLossWeights {
  float balance = 0.f;
  float z = 0.f;
};

// Tokens routed to each expert in the last forward (after drops), and the imbalance max/mean.
struct ExpertLoad {
  std::vector<std::int64_t> tokens;  // (E,)
  std::int64_t dropped = 0;
  double max_over_mean() const {
    if (tokens.empty()) return 0.0;
    std::int64_t mx = 0, sum = 0;
    for (auto t : tokens) {
      mx = t > mx ? t : mx;
      sum += t;
    }
    return sum ? double(mx) * double(tokens.size()) / double(sum) : 0.0;
  }
};

}  // namespace cumo
