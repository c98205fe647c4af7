#pragma once
// backend::Emulated (tests only): the device backend's contract, on the host. It is backend::Cpu for everything the
// MoE block calls, plus every model-layer function that backend::Cuda provides (backend/cuda.cuh, "model layers"),
// written here from each function's documented contract in plain double-accumulating loops — not from the layers'
// inline CPU code. Because nn::on_cpu<Emulated> is false, a model built on it runs the layers' device branches
// (what they save, the order they call things in, the offsets of the row-block copies, the shifted labels of the
// LM loss) on a machine without a GPU; tests/test_nn_backend_paths.cpp compares it with the CPU reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cumo/backend/cpu.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::backend {

struct Emulated : Cpu {
  static constexpr const char* name = "emulated";

  struct LossResult {
    double loss = 0;
    std::int64_t targets = 0;
  };

  // ---- Linear ---------------------------------------------------------------------------------------------------
  static void dense_linear(const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y) {
    const std::int64_t N = x.size(0), in = x.size(1), out = w.size(0);
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t j = 0; j < out; ++j) {
        double s = b ? b->data<float>()[j] : 0.0;
        for (std::int64_t k = 0; k < in; ++k) s += double(x.data<float>()[r * in + k]) * w.data<float>()[j * in + k];
        y.data<float>()[r * out + j] = float(s);
      }
  }
  static void dense_linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dw, Tensor* db,
                                    Tensor& dx) {
    const std::int64_t N = dy.size(0), out = dy.size(1), in = x.size(1);
    const float *g = dy.data<float>(), *px = x.data<float>(), *pw = w.data<float>();
    for (std::int64_t j = 0; j < out; ++j) {
      for (std::int64_t k = 0; k < in; ++k) {
        double s = 0;
        for (std::int64_t r = 0; r < N; ++r) s += double(g[r * out + j]) * px[r * in + k];
        dw.data<float>()[j * in + k] += float(s);
      }
      if (db) {
        double s = 0;
        for (std::int64_t r = 0; r < N; ++r) s += g[r * out + j];
        db->data<float>()[j] += float(s);
      }
    }
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t k = 0; k < in; ++k) {
        double s = 0;
        for (std::int64_t j = 0; j < out; ++j) s += double(g[r * out + j]) * pw[j * in + k];
        dx.data<float>()[r * in + k] = float(s);
      }
  }

  // ---- norms ----------------------------------------------------------------------------------------------------
  static void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y,
                                Tensor& mean, Tensor& rstd) {
    const std::int64_t N = x.size(0), H = x.size(1);
    for (std::int64_t r = 0; r < N; ++r) {
      const float* xr = x.data<float>() + r * H;
      double m = 0, v = 0;
      for (std::int64_t j = 0; j < H; ++j) m += xr[j];
      m /= double(H);
      for (std::int64_t j = 0; j < H; ++j) v += (xr[j] - m) * (xr[j] - m);
      const double rs = 1.0 / std::sqrt(v / double(H) + eps);
      mean.data<float>()[r] = float(m);
      rstd.data<float>()[r] = float(rs);
      for (std::int64_t j = 0; j < H; ++j)
        y.data<float>()[r * H + j] = float((xr[j] - m) * rs * w.data<float>()[j] + b.data<float>()[j]);
    }
  }
  static void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                                 const Tensor& rstd, Tensor& dx, Tensor& dw, Tensor& db) {
    const std::int64_t N = x.size(0), H = x.size(1);
    for (std::int64_t r = 0; r < N; ++r) {
      const double m = mean.data<float>()[r], rs = rstd.data<float>()[r];
      double m1 = 0, m2 = 0;
      for (std::int64_t j = 0; j < H; ++j) {
        const double xh = (x.data<float>()[r * H + j] - m) * rs, g = double(dy.data<float>()[r * H + j]);
        dw.data<float>()[j] += float(g * xh);
        db.data<float>()[j] += float(g);
        m1 += g * w.data<float>()[j];
        m2 += g * w.data<float>()[j] * xh;
      }
      m1 /= double(H);
      m2 /= double(H);
      for (std::int64_t j = 0; j < H; ++j) {
        const double xh = (x.data<float>()[r * H + j] - m) * rs;
        dx.data<float>()[r * H + j] = float(rs * (double(dy.data<float>()[r * H + j]) * w.data<float>()[j] - m1 - xh * m2));
      }
    }
  }
  static void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rrms) {
    const std::int64_t N = x.size(0), H = x.size(1);
    for (std::int64_t r = 0; r < N; ++r) {
      double ss = 0;
      for (std::int64_t j = 0; j < H; ++j) ss += double(x.data<float>()[r * H + j]) * x.data<float>()[r * H + j];
      const double rr = 1.0 / std::sqrt(ss / double(H) + eps);
      rrms.data<float>()[r] = float(rr);
      for (std::int64_t j = 0; j < H; ++j) y.data<float>()[r * H + j] = float(w.data<float>()[j] * x.data<float>()[r * H + j] * rr);
    }
  }
  static void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rrms, Tensor& dx,
                               Tensor& dw) {
    const std::int64_t N = x.size(0), H = x.size(1);
    for (std::int64_t r = 0; r < N; ++r) {
      const double rr = rrms.data<float>()[r];
      double m = 0;
      for (std::int64_t j = 0; j < H; ++j) {
        const double g = dy.data<float>()[r * H + j], xv = x.data<float>()[r * H + j];
        dw.data<float>()[j] += float(g * xv * rr);
        m += g * w.data<float>()[j] * xv;
      }
      m /= double(H);
      for (std::int64_t j = 0; j < H; ++j) {
        const double g = dy.data<float>()[r * H + j], xv = x.data<float>()[r * H + j];
        dx.data<float>()[r * H + j] = float(rr * g * w.data<float>()[j] - xv * rr * rr * rr * m);
      }
    }
  }

  // ---- embedding, RoPE, gated activation ---------------------------------------------------------------------------
  static void embedding_forward(const Tensor& table, const std::vector<std::int64_t>& ids, Tensor& y) {
    const std::int64_t V = table.size(0), H = table.size(1);
    for (std::size_t r = 0; r < ids.size(); ++r) {
      CUMO_CHECK(ids[r] >= 0 && ids[r] < V, "Emulated::embedding_forward: token id ", ids[r], " at position ", r,
                 " is outside the vocabulary [0, ", V, ")");
      for (std::int64_t j = 0; j < H; ++j) y.data<float>()[std::int64_t(r) * H + j] = table.data<float>()[ids[r] * H + j];
    }
  }
  static void embedding_backward(const Tensor& dy, const std::vector<std::int64_t>& ids, Tensor& dtable,
                                 const std::vector<bool>* skip) {
    const std::int64_t H = dtable.size(1);
    for (std::size_t r = 0; r < ids.size(); ++r)
      if (!skip || !(*skip)[r])
        for (std::int64_t j = 0; j < H; ++j) dtable.data<float>()[ids[r] * H + j] += dy.data<float>()[std::int64_t(r) * H + j];
  }
  static void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, std::int64_t heads, bool inverse,
                   Tensor& out) {
    const std::int64_t N = x.size(0), half = inv_freq.numel(), D = 2 * half;
    const float sign = inverse ? -1.f : 1.f;
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < half; ++i) {
          const std::int64_t p = positions.dtype() == DType::i64 ? positions.data<std::int64_t>()[r]
                                                                 : positions.data<std::int32_t>()[r];  // i64 or i32
          const float ang = inv_freq.data<float>()[i] * float(p);
          const double c = std::cos(ang), s = sign * std::sin(ang);
          const std::int64_t o = r * heads * D + h * D;
          const double a = x.data<float>()[o + i], b = x.data<float>()[o + i + half];
          out.data<float>()[o + i] = float(a * c - b * s);
          out.data<float>()[o + i + half] = float(b * c + a * s);
        }
  }
  template <class Act>
  static void gated_forward(const Tensor& gate, const Tensor& up, Tensor& a) {
    for (std::int64_t i = 0; i < a.numel(); ++i) a.data<float>()[i] = Act::f(gate.data<float>()[i]) * up.data<float>()[i];
  }
  template <class Act>
  static void gated_backward(const Tensor& gate, const Tensor& up, const Tensor& da, Tensor& dgate, Tensor& dup) {
    for (std::int64_t i = 0; i < da.numel(); ++i) {
      const float g = gate.data<float>()[i];
      dgate.data<float>()[i] = da.data<float>()[i] * up.data<float>()[i] * Act::df(g);
      dup.data<float>()[i] = da.data<float>()[i] * Act::f(g);
    }
  }

  // ---- attention (the fused kernels' contract: out and the row logsumexp; the backward recomputes P) ---------------
  struct AttnIndex {
    std::int64_t B, T, H, G, D;
    std::int64_t q(std::int64_t b, std::int64_t i, std::int64_t h) const { return (b * T + i) * H * D + h * D; }
    std::int64_t kv(std::int64_t b, std::int64_t j, std::int64_t h) const { return (b * T + j) * G * D + (h / (H / G)) * D; }
  };
  static bool masked(const Tensor* key_valid, bool causal, std::int64_t b, std::int64_t T, std::int64_t i, std::int64_t j) {
    return (causal && j > i) || (key_valid && key_valid->defined() && key_valid->data<std::int32_t>()[b * T + j] == 0);
  }
  static double score(const Tensor& q, const Tensor& k, const AttnIndex& ix, std::int64_t b, std::int64_t i,
                      std::int64_t j, std::int64_t h) {
    double s = 0;
    for (std::int64_t d = 0; d < ix.D; ++d) s += double(q.data<float>()[ix.q(b, i, h) + d]) * k.data<float>()[ix.kv(b, j, h) + d];
    return s * double(float(1.0 / std::sqrt(double(ix.D))));
  }
  static void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                                std::int64_t B, std::int64_t T, std::int64_t heads, std::int64_t kv_heads,
                                std::int64_t head_dim, bool causal, Tensor& out, Tensor& lse) {
    const AttnIndex ix{B, T, heads, kv_heads, head_dim};
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < T; ++i) {
          std::vector<double> s(std::size_t(T), -std::numeric_limits<double>::infinity());
          double m = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j < T; ++j)
            if (!masked(key_valid, causal, b, T, i, j)) m = std::max(m, s[std::size_t(j)] = score(q, k, ix, b, i, j, h));
          float* o = out.data<float>() + ix.q(b, i, h);
          if (m == -std::numeric_limits<double>::infinity()) {  // no key: output 0, lse −∞
            for (std::int64_t d = 0; d < head_dim; ++d) o[d] = 0.f;
            lse.data<float>()[(b * heads + h) * T + i] = -std::numeric_limits<float>::infinity();
            continue;
          }
          double l = 0;
          for (std::int64_t j = 0; j < T; ++j) l += std::exp(s[std::size_t(j)] - m);
          for (std::int64_t d = 0; d < head_dim; ++d) {
            double acc = 0;
            for (std::int64_t j = 0; j < T; ++j) acc += std::exp(s[std::size_t(j)] - m) / l * v.data<float>()[ix.kv(b, j, h) + d];
            o[d] = float(acc);
          }
          lse.data<float>()[(b * heads + h) * T + i] = float(m + std::log(l));
        }
  }
  static void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                                 const Tensor& out, const Tensor& lse, const Tensor& dout, std::int64_t B,
                                 std::int64_t T, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                                 bool causal, Tensor& dq, Tensor& dk, Tensor& dv) {
    const AttnIndex ix{B, T, heads, kv_heads, head_dim};
    const double scale = double(float(1.0 / std::sqrt(double(head_dim))));
    dq.zero_();
    dk.zero_();
    dv.zero_();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < T; ++i) {
          const double L = lse.data<float>()[(b * heads + h) * T + i];
          if (L == -std::numeric_limits<double>::infinity()) continue;
          const float* dO = dout.data<float>() + ix.q(b, i, h);
          double delta = 0;
          for (std::int64_t d = 0; d < head_dim; ++d) delta += double(dO[d]) * out.data<float>()[ix.q(b, i, h) + d];
          for (std::int64_t j = 0; j < T; ++j) {
            if (masked(key_valid, causal, b, T, i, j)) continue;
            const double P = std::exp(score(q, k, ix, b, i, j, h) - L);
            double dP = 0;
            for (std::int64_t d = 0; d < head_dim; ++d) dP += double(dO[d]) * v.data<float>()[ix.kv(b, j, h) + d];
            const double dS = P * (dP - delta);
            for (std::int64_t d = 0; d < head_dim; ++d) {
              dq.data<float>()[ix.q(b, i, h) + d] += float(scale * dS * k.data<float>()[ix.kv(b, j, h) + d]);
              dk.data<float>()[ix.kv(b, j, h) + d] += float(scale * dS * q.data<float>()[ix.q(b, i, h) + d]);
              dv.data<float>()[ix.kv(b, j, h) + d] += float(P * dO[d]);
            }
          }
        }
  }

  // ---- ViT embeddings, row blocks, scale, the LM loss -------------------------------------------------------------
  static void vit_embeddings(const Tensor& patch, const Tensor& cls, const Tensor& pos, std::int64_t B, Tensor& emb) {
    const std::int64_t T = pos.size(0), H = pos.size(1);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t h = 0; h < H; ++h)
          emb.data<float>()[(b * T + t) * H + h] =
              (t == 0 ? cls.data<float>()[h] : patch.data<float>()[(b * (T - 1) + t - 1) * H + h]) + pos.data<float>()[t * H + h];
  }
  static void vit_embeddings_backward(const Tensor& demb, std::int64_t B, Tensor& dpatch, Tensor& dcls, Tensor& dpos) {
    const std::int64_t T = dpos.size(0), H = dpos.size(1);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t h = 0; h < H; ++h) {
          const float g = demb.data<float>()[(b * T + t) * H + h];
          dpos.data<float>()[t * H + h] += g;
          if (t == 0)
            dcls.data<float>()[h] += g;
          else
            dpatch.data<float>()[(b * (T - 1) + t - 1) * H + h] = g;
        }
  }
  static void copy_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                          std::int64_t dpitch, std::int64_t width, std::int64_t height) {
    blocks(src, src0, spitch, dst, dst0, dpitch, width, height, /*add=*/false);
  }
  static void add_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                         std::int64_t dpitch, std::int64_t width, std::int64_t height) {
    blocks(src, src0, spitch, dst, dst0, dpitch, width, height, /*add=*/true);
  }
  static void blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                     std::int64_t dpitch, std::int64_t width, std::int64_t height, bool add) {
    for (std::int64_t r = 0; r < height; ++r)
      for (std::int64_t c = 0; c < width; ++c) {
        const std::int64_t s = src0 + r * spitch + c, d = dst0 + r * dpitch + c;
        CUMO_CHECK(s < src.numel() && d < dst.numel(), "Emulated: a row block runs past its tensor");
        dst.data<float>()[d] = (add ? dst.data<float>()[d] : 0.f) + src.data<float>()[s];
      }
  }
  static Tensor upload_i32(const std::vector<std::int32_t>& v) {
    Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::i32);
    std::copy(v.begin(), v.end(), t.data<std::int32_t>());
    return t;
  }
  static void scale(Tensor& t, float alpha) {
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] *= alpha;
  }
  static LossResult causal_lm_loss(const Tensor& logits, const std::vector<std::int64_t>& labels, std::int64_t B,
                                   std::int64_t T, Tensor& dlogits) {
    const std::int64_t V = logits.size(1);
    dlogits.zero_();
    LossResult r;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t + 1 < T; ++t) {
        const std::int64_t y = labels[std::size_t(b * T + t + 1)];
        if (y == -100) continue;
        CUMO_CHECK(y >= 0 && y < V, "Emulated::causal_lm_loss: label ", y, " outside [0, ", V, ")");
        ++r.targets;
      }
    if (r.targets == 0) return r;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t + 1 < T; ++t) {
        const std::int64_t y = labels[std::size_t(b * T + t + 1)];
        if (y == -100) continue;
        const float* z = logits.data<float>() + (b * T + t) * V;
        double m = z[0], s = 0;
        for (std::int64_t v = 1; v < V; ++v) m = std::max(m, double(z[v]));
        for (std::int64_t v = 0; v < V; ++v) s += std::exp(z[v] - m);
        const double lse = m + std::log(s);
        r.loss += (lse - z[y]) / double(r.targets);
        for (std::int64_t v = 0; v < V; ++v)
          dlogits.data<float>()[(b * T + t) * V + v] = float((std::exp(z[v] - lse) - (v == y ? 1.0 : 0.0)) / double(r.targets));
      }
    return r;
  }
};

}  // namespace cumo::backend
