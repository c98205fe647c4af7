#pragma once
// A named trainable tensor and its gradient. Names follow the Hugging Face state_dict so checkpoints round-trip
// with PyTorch; optimizers and checkpoints see a model as a flat list of these.
#include <string>
#include <vector>

#include "cumo/core/tensor.hpp"

namespace cumo {

struct Parameter {
  std::string name;
  Tensor value;
  Tensor grad;  // same shape, dtype and device as value; accumulated by backward()
  bool trainable = true;

  Parameter() = default;
  Parameter(std::string n, Tensor v) : name(std::move(n)), value(std::move(v)) {
    grad = Tensor::zeros(value.shape(), value.dtype(), value.device());
  }
};

using ParameterList = std::vector<Parameter*>;

inline void zero_grad(const ParameterList& params) {
  for (Parameter* p : params) p->grad.zero_();
}

}  // namespace cumo
