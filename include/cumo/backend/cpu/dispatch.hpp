#pragma once
// CPU dispatch: a counting sort of the T·K routing choices by expert (the plan), the gather of token rows into
// expert-contiguous order, and the deterministic combine (each token sums its k results in slot order; no
// atomics, so the result does not depend on threads).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/core/routing.hpp"

namespace cumo::cpu {

// Fills plan.{demand, counts, offsets, row_of_slot, slot_of_row, host_offsets} from idx (T, K).
// With a capacity, slots compete in priority order — every token's first choice before any second choice, tokens
// in order within a choice (GShard/DeepSpeed) — and the losers are dropped. Kept rows of an expert stay in
// (token, slot) order.
inline void make_plan(const Tensor& idx, DispatchPlan& plan) {
  const std::int64_t T = plan.tokens;
  const int K = plan.top_k, E = plan.experts;
  const std::int32_t* ix = idx.data<std::int32_t>();
  std::int32_t* demand = plan.demand.data<std::int32_t>();
  std::int32_t* counts = plan.counts.data<std::int32_t>();
  std::int32_t* offsets = plan.offsets.data<std::int32_t>();
  std::int32_t* row_of_slot = plan.row_of_slot.data<std::int32_t>();
  std::int32_t* slot_of_row = plan.slot_of_row.data<std::int32_t>();
  std::fill(demand, demand + E, 0);
  std::fill(counts, counts + E, 0);
  // 1. who is kept (row_of_slot = 0 marks kept for now, -1 dropped)
  for (int k = 0; k < K; ++k)
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t s = t * K + k;
      const int e = ix[s];
      const bool keep = plan.capacity < 0 || demand[e] < plan.capacity;
      ++demand[e];
      counts[e] += keep;
      row_of_slot[s] = keep ? 0 : -1;
    }
  // 2. exclusive scan
  offsets[0] = 0;
  for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  // 3. stable placement in (token, slot) order
  std::vector<std::int32_t> cursor(offsets, offsets + E);
  for (std::int64_t s = 0; s < T * K; ++s) {
    if (row_of_slot[s] < 0) continue;
    const std::int32_t r = cursor[std::size_t(ix[s])]++;
    row_of_slot[s] = r;
    slot_of_row[r] = std::int32_t(s);
  }
  plan.host_offsets.assign(offsets, offsets + E + 1);
}

// xs (rows, H) = x[token of slot_of_row[r]]
inline void gather_rows(const Tensor& x, const DispatchPlan& plan, Tensor& xs) {
  const std::int64_t H = x.size(1), rows = plan.rows();
  const std::int32_t* slot = plan.slot_of_row.data<std::int32_t>();
  const float* src = x.data<float>();
  float* dst = xs.data<float>();
  parallel_for(rows, [&](std::int64_t r) {
    std::memcpy(dst + r * H, src + (slot[r] / plan.top_k) * H, std::size_t(H) * sizeof(float));
  }, H);
}

// y (T, H) = Σ_k w[t,k] · out[row_of_slot[t,k]], dropped slots contributing 0.
inline void combine(const Tensor& out, const Tensor& w, const DispatchPlan& plan, Tensor& y) {
  const std::int64_t T = plan.tokens, H = y.size(1);
  const int K = plan.top_k;
  const std::int32_t* row = plan.row_of_slot.data<std::int32_t>();
  const float* o = out.data<float>();
  const float* wt = w.data<float>();
  float* dst = y.data<float>();
  parallel_for(T, [&](std::int64_t t) {
    float* yt = dst + t * H;
    std::fill(yt, yt + H, 0.f);
    for (int k = 0; k < K; ++k) {
      const std::int32_t r = row[t * K + k];
      if (r < 0) continue;
      const float wk = wt[t * K + k];
      const float* orow = o + std::int64_t(r) * H;
      for (std::int64_t h = 0; h < H; ++h) yt[h] += wk * orow[h];
    }
  }, 2 * H * K);
}

// Backward of combine: dout[r] = w[t,k] · dy[t];  dw[t,k] = <dy[t], out[r]> (0 for dropped slots).
inline void combine_backward(const Tensor& dy, const Tensor& out, const Tensor& w, const DispatchPlan& plan,
                             Tensor& dout, Tensor& dw) {
  const std::int64_t T = plan.tokens, H = dy.size(1);
  const int K = plan.top_k;
  const std::int32_t* row = plan.row_of_slot.data<std::int32_t>();
  const float* g = dy.data<float>();
  const float* o = out.data<float>();
  const float* wt = w.data<float>();
  float* dO = dout.data<float>();
  float* dW = dw.data<float>();
  parallel_for(T, [&](std::int64_t t) {
    const float* gt = g + t * H;
    for (int k = 0; k < K; ++k) {
      const std::int32_t r = row[t * K + k];
      if (r < 0) {
        dW[t * K + k] = 0.f;
        continue;
      }
      const float wk = wt[t * K + k];
      const float* orow = o + std::int64_t(r) * H;
      float* drow = dO + std::int64_t(r) * H;
      float dot = 0.f;
      for (std::int64_t h = 0; h < H; ++h) {
        drow[h] = wk * gt[h];
        dot += gt[h] * orow[h];
      }
      dW[t * K + k] = dot;
    }
  }, 2 * H * K);
}

// dx (T, H) += Σ_k dxs[row_of_slot[t,k]]: the gather's backward, summed per token in slot order.
inline void scatter_add_rows(const Tensor& dxs, const DispatchPlan& plan, Tensor& dx) {
  const std::int64_t T = plan.tokens, H = dx.size(1);
  const int K = plan.top_k;
  const std::int32_t* row = plan.row_of_slot.data<std::int32_t>();
  const float* src = dxs.data<float>();
  float* dst = dx.data<float>();
  parallel_for(T, [&](std::int64_t t) {
    float* dt = dst + t * H;
    for (int k = 0; k < K; ++k) {
      const std::int32_t r = row[t * K + k];
      if (r < 0) continue;
      const float* s = src + std::int64_t(r) * H;
      for (std::int64_t h = 0; h < H; ++h) dt[h] += s[h];
    }
  }, 2 * H * K);
}

}  // namespace cumo::cpu
