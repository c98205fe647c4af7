#pragma once
// A named trainable tensor and its gradient. Names follow the Hugging Face state_dict so checkpoints round-trip
// with PyTorch; optimizers and checkpoints see a model as a flat list of these.
//
// How layers store what they create is ParameterStorage: `weights`, the dtype of the matrix weights (Linear,
// Embedding and the expert stacks: nearly all of a model's bytes; biases, norms, routers and CLIP's embeddings stay
// fp32), and `grads`, whether a gradient is allocated. The default, fp32 with gradients, is what training needs. To
// run a large checkpoint in its own dtype, build the model inside a scope:
//   ParameterStorageScope scope({DType::bf16, /*grads=*/false});
//   models::CuMo<> model(config);  // matrix weights held in bf16, no gradients: ~2 bytes per parameter
// The CPU GEMMs widen bf16/f16 weights to fp32 a block of rows at a time and accumulate in fp32; a layer's backward
// refuses such weights (training keeps fp32 master weights).
#include <string>
#include <string_view>
#include <vector>

#include "cumo/core/tensor.hpp"

namespace cumo {

struct ParameterStorage {
  DType weights = DType::f32;  // f32, bf16 or f16
  bool grads = true;
};

namespace detail {
inline ParameterStorage& current_parameter_storage() {
  thread_local ParameterStorage s;
  return s;
}
}  // namespace detail

// The storage layers of this thread create their parameters with.
inline const ParameterStorage& parameter_storage() { return detail::current_parameter_storage(); }

// Sets this thread's ParameterStorage for its lifetime (nested scopes restore the outer one).
class ParameterStorageScope {
 public:
  explicit ParameterStorageScope(ParameterStorage s) : saved_(detail::current_parameter_storage()) {
    CUMO_CHECK(s.weights == DType::f32 || s.weights == DType::bf16 || s.weights == DType::f16,
               "ParameterStorageScope: weights must be f32, bf16 or f16, got ", name_of(s.weights));
    detail::current_parameter_storage() = s;
  }
  ~ParameterStorageScope() { detail::current_parameter_storage() = saved_; }
  ParameterStorageScope(const ParameterStorageScope&) = delete;
  ParameterStorageScope& operator=(const ParameterStorageScope&) = delete;

 private:
  ParameterStorage saved_;
};

struct Parameter {
  std::string name;
  Tensor value;
  Tensor grad;  // same shape, dtype and device as value; accumulated by backward(); undefined without grads
  bool trainable = true;

  Parameter() = default;
  Parameter(std::string n, Tensor v) : name(std::move(n)), value(std::move(v)) {
    if (parameter_storage().grads) grad = Tensor::zeros(value.shape(), value.dtype(), value.device());
  }
};

using ParameterList = std::vector<Parameter*>;

// A backward needs fp32 weights with gradients: a model built for inference (bf16/f16 weights, or no gradients)
// says so instead of failing inside a GEMM.
inline void require_trainable(std::string_view where, const Parameter& p) {
  CUMO_CHECK(p.value.dtype() == DType::f32, where, ": '", p.name, "' is held in ", name_of(p.value.dtype()),
             " for inference; training keeps fp32 weights (build the model outside a ParameterStorageScope)");
  CUMO_CHECK(p.grad.defined(), where, ": '", p.name, "' has no gradient: the model was built for inference "
             "(ParameterStorage::grads = false)");
}

inline void zero_grad(const ParameterList& params) {
  for (Parameter* p : params)
    if (p->grad.defined()) p->grad.zero_();
}

}  // namespace cumo
