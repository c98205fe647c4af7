#pragma once
// nn::Embedding<Backend> — rows of a (V, H) table by token id. The backward scatters dy rows back into the table's
// gradient; rows whose id is negative (masked positions) contribute nothing.
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <class Backend = backend::Cpu>
class Embedding {
 public:
  Embedding() = default;
  Embedding(const std::string& name, std::int64_t vocab, std::int64_t hidden)
      : weight(param(name + ".weight", {vocab, hidden}, Backend::device)), vocab_(vocab), hidden_(hidden) {}

  Parameter weight;  // (V, H)

  std::int64_t vocab() const { return vocab_; }
  std::int64_t hidden() const { return hidden_; }
  void collect(ParameterList& out) { out.push_back(&weight); }

  // ids (N, on the host) → (N, H); every id must be in [0, V).
  Tensor apply(const std::vector<std::int64_t>& ids) const {
    const std::int64_t N = std::int64_t(ids.size()), H = hidden_;
    Tensor y = matrix(N, H, Backend::device);
    if constexpr (on_cpu<Backend>) {
      const float* w = weight.value.data<float>();
      float* py = y.data<float>();
      for (std::int64_t r = 0; r < N; ++r) {
        const std::int64_t id = ids[std::size_t(r)];
        CUMO_CHECK(id >= 0 && id < vocab_, "Embedding::forward (", weight.name, "): token id ", id, " at position ", r,
                   " is outside the vocabulary [0, ", vocab_, ")");
        std::copy(w + id * H, w + (id + 1) * H, py + r * H);
      }
      return y;
    } else {
      Backend::embedding_forward(weight.value, ids, y);  // checks the ids on the host, naming a bad one
      return y;
    }
  }
  // ids (N) → (N, H)
  Tensor forward(const std::vector<std::int64_t>& ids) {
    Tensor y = apply(ids);
    ids_ = ids;
    return y;
  }
  // dy (N, H); positions listed in `skip` (e.g. replaced by image features) are left out.
  void backward(const Tensor& dy, const std::vector<bool>* skip = nullptr) {
    const Tensor g = check_input("Embedding::backward", "dy", dy, hidden_, Backend::device);
    CUMO_CHECK(g.size(0) == std::int64_t(ids_.size()), "Embedding::backward: dy has shape ", g.shape(), " but ",
               ids_.size(), " ids were embedded");
    if constexpr (on_cpu<Backend>) {
      const std::int64_t H = hidden_;
      float* dw = weight.grad.data<float>();
      const float* pg = g.data<float>();
      for (std::size_t r = 0; r < ids_.size(); ++r) {
        if (skip && (*skip)[r]) continue;
        float* row = dw + ids_[r] * H;
        for (std::int64_t j = 0; j < H; ++j) row[j] += pg[std::int64_t(r) * H + j];
      }
    } else {
      Backend::embedding_backward(g, ids_, weight.grad, skip);
      return;
    }
  }

 private:
  std::int64_t vocab_ = 0, hidden_ = 0;
  std::vector<std::int64_t> ids_;
};

}  // namespace cumo::nn
