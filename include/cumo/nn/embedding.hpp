#pragma once
// nn::Embedding<Backend> — rows of a (V, H) table by token id. The backward adds dy rows back into the table's
// gradient; rows listed in `skip` (positions whose embedding was replaced, e.g. by image features) contribute nothing.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <backend::Backend Backend = backend::Cpu>
class Embedding {
 public:
  Embedding() = default;
  Embedding(const std::string& name, std::int64_t vocab, std::int64_t hidden, Backend backend = {})
      : weight(param(name + ".weight", {vocab, hidden}, Backend::device, 0.f, weight_dtype<Backend>("nn::Embedding"))),
        vocab_(vocab),
        hidden_(hidden),
        be_(std::move(backend)) {}

  Parameter weight;  // (V, H)

  std::int64_t vocab() const { return vocab_; }
  std::int64_t hidden() const { return hidden_; }
  void collect(ParameterList& out) { out.push_back(&weight); }

  // ids (N, on the host) → (N, H); every id must be in [0, V).
  Tensor apply(const std::vector<std::int64_t>& ids) const {
    for (std::size_t r = 0; r < ids.size(); ++r)
      CUMO_CHECK(ids[r] >= 0 && ids[r] < vocab_, "Embedding::forward (", weight.name, "): token id ", ids[r],
                 " at position ", r, " is outside the vocabulary [0, ", vocab_, ")");
    Tensor y = be_.empty({std::int64_t(ids.size()), hidden_});
    be_.embedding_forward(weight.value, ids, y);  // (N, H)
    return y;
  }
  // ids (N) → (N, H)
  Tensor forward(const std::vector<std::int64_t>& ids) {
    Tensor y = apply(ids);
    ids_ = ids;
    return y;
  }
  // dy (N, H); positions listed in `skip` (e.g. replaced by image features) are left out.
  void backward(const Tensor& dy, const std::vector<bool>* skip = nullptr) {
    require_trainable("Embedding::backward", weight);
    const Tensor g = check_input("Embedding::backward", "dy", dy, hidden_, Backend::device);
    CUMO_CHECK(g.size(0) == std::int64_t(ids_.size()), "Embedding::backward: dy has shape ", g.shape(), " but ",
               ids_.size(), " ids were embedded");
    CUMO_CHECK(!skip || skip->size() == ids_.size(), "Embedding::backward: skip has ", skip ? skip->size() : 0,
               " entries for ", ids_.size(), " ids");
    be_.embedding_backward(g, ids_, weight.grad, skip);  // (V, H) +=
  }

 private:
  std::int64_t vocab_ = 0, hidden_ = 0;
  [[no_unique_address]] Backend be_;
  std::vector<std::int64_t> ids_;
};

}  // namespace cumo::nn
