#pragma once
// CPU scaled dot-product attention, forward and backward: the reference of backend/cuda/attention.cuh, on the
// layout backend/ops.hpp's AttentionShape describes (token-major q/k/v with the head inside the row, grouped-query
// heads, causal and padding masks, a KV cache's strided sequences).
//   scores = (q·kᵀ)·scale, scale = float(1/√D); masked scores are −∞; P = softmax(scores) per row (a row with no
//   key left gives P = 0); out = P·v.
// The forward keeps the probabilities P (B·heads, Tq, S) for the backward — at the short sequences this backend
// trains on they are small, and they spare the backward the recomputation the fused GPU kernel does.
//   dP = dout·vᵀ;  dv += Pᵀ dout;  dS = P ⊙ (dP − Σ_j dP P);  dq = scale · dS k;  dk += scale · dSᵀ q
// One work item per (sequence, head) in the forward and per (sequence, kv head) in the backward (the heads of a
// group write the same dk/dv rows, so they run in order): results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/backend/ops.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// q (B·Tq, H·D), k, v (rows b·stride … b·stride + S of each sequence, G·D); key_valid (B·S,) i32 or null.
// out (B·Tq, H·D); saved, when given, receives P (B·H, Tq, S).
inline void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                              const backend::AttentionShape& s, Tensor& out, Tensor* saved) {
  const std::int64_t B = s.batch, Tq = s.q_len, S = s.S(), ks = s.stride(), past = s.past();
  const std::int64_t H = s.heads, G = s.G(), D = s.head_dim, per = H / G, ldq = H * D, ldk = G * D;
  const float scale = float(1.0 / std::sqrt(double(D)));
  Tensor probs = Tensor::empty({B * H, Tq, S});
  const float* pq = q.data<float>();
  const float* pk = k.data<float>();
  const float* pv = v.data<float>();
  const std::int32_t* valid = key_valid && key_valid->defined() ? key_valid->data<std::int32_t>() : nullptr;
  float* pc = out.data<float>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr std::int64_t kLanes = Eigen::internal::packet_traits<float>::size;
  parallel_for(B * H, [&](std::int64_t bh) {
    const std::int64_t b = bh / H, h = bh % H, g = h / per;
    float* P = probs.data<float>() + bh * Tq * S;  // (Tq, S)
    // The exponentials go to an aligned row first: Eigen peels a scalar (libm) prologue up to the first aligned
    // element of an unaligned destination, and rows of P start wherever i·S puts them.
    Eigen::ArrayXf e(S);  // (S,)
    gemm(Op::N, Op::T, Tq, S, D, scale, pq + b * Tq * ldq + h * D, ldq, pk + b * ks * ldk + g * D, ldk, 0.f, P,
         S);  // scores = q kᵀ / √D
    for (std::int64_t i = 0; i < Tq; ++i) {
      float* row = P + i * S;
      // A causal query sees keys 0 … past + i: the rest of its row is 0. The exponentiated prefix is rounded up to
      // whole SIMD packets (those keys masked to −∞) so that Eigen's vector exp covers it, not a scalar tail loop.
      const std::int64_t seen = s.causal ? std::min(S, past + i + 1) : S;
      const std::int64_t n = std::min(S, (seen + kLanes - 1) / kLanes * kLanes);
      std::fill(row + seen, row + n, kNegInf);
      std::fill(row + n, row + S, 0.f);
      if (valid)
        for (std::int64_t j = 0; j < seen; ++j)
          if (!valid[b * S + j]) row[j] = kNegInf;
      Eigen::Map<Eigen::ArrayXf> r(row, n);  // (n,)
      const float mx = n > 0 ? r.maxCoeff() : kNegInf;
      if (mx == kNegInf) {  // nothing to attend to (a padding query): output 0
        r.setZero();
        continue;
      }
      auto ex = e.head(n);
      ex = (r - mx).exp();  // Eigen's packet exp: exp(−∞) = 0 for the masked keys
      r = ex * (1.f / ex.sum());
    }
    gemm(Op::N, Op::N, Tq, D, S, 1.f, P, S, pv + b * ks * ldk + g * D, ldk, 0.f, pc + b * Tq * ldq + h * D,
         ldq);  // out = P v
  }, 4 * S * D * Tq);
  if (saved) *saved = probs;
}

// dout (B·Tq, H·D) with the forward's q, k, v and saved P → dq (B·Tq, H·D), dk, dv (like k, v), overwritten.
inline void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& saved,
                               const Tensor& dout, const backend::AttentionShape& s, Tensor& dq, Tensor& dk,
                               Tensor& dv) {
  const std::int64_t B = s.batch, Tq = s.q_len, S = s.S(), ks = s.stride();
  const std::int64_t H = s.heads, G = s.G(), D = s.head_dim, per = H / G, ldq = H * D, ldk = G * D;
  const float scale = float(1.0 / std::sqrt(double(D)));
  dk.zero_();
  dv.zero_();
  const float *pq = q.data<float>(), *pk = k.data<float>(), *pv = v.data<float>(), *pc = dout.data<float>();
  float *pdq = dq.data<float>(), *pdk = dk.data<float>(), *pdv = dv.data<float>();
  parallel_for(B * G, [&](std::int64_t bg) {
    const std::int64_t b = bg / G, g = bg % G;
    std::vector<float> dP(std::size_t(Tq * S));
    const float* kb = pk + b * ks * ldk + g * D;
    const float* vb = pv + b * ks * ldk + g * D;
    for (std::int64_t h = g * per; h < (g + 1) * per; ++h) {
      const float* P = saved.data<float>() + (b * H + h) * Tq * S;  // (Tq, S)
      const float* dc = pc + b * Tq * ldq + h * D;                  // (Tq, D) stride ldq
      gemm(Op::N, Op::T, Tq, S, D, 1.f, dc, ldq, vb, ldk, 0.f, dP.data(), S);                      // dP = dout vᵀ
      gemm(Op::T, Op::N, S, D, Tq, 1.f, P, S, dc, ldq, 1.f, pdv + b * ks * ldk + g * D, ldk);      // dv += Pᵀ dout
      for (std::int64_t i = 0; i < Tq; ++i) {  // dS = P ⊙ (dP − Σ_j dP P)
        Eigen::Map<Eigen::ArrayXf> d(dP.data() + i * S, S);  // (S,)
        const Eigen::Map<const Eigen::ArrayXf> p(P + i * S, S);
        d = p * (d - (d * p).sum());
      }
      gemm(Op::N, Op::N, Tq, D, S, scale, dP.data(), S, kb, ldk, 0.f, pdq + b * Tq * ldq + h * D, ldq);  // dq = dS k
      gemm(Op::T, Op::N, S, D, Tq, scale, dP.data(), S, pq + b * Tq * ldq + h * D, ldq, 1.f,
           pdk + b * ks * ldk + g * D, ldk);  // dk += dSᵀ q
    }
  }, 4 * per * Tq * S * D);
}

}  // namespace cumo::cpu
