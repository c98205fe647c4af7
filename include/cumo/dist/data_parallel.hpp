#pragma once
// Data parallelism: each rank runs forward and backward on its share of every global (micro-)batch, weighting its
// loss by its share so that the ranks' gradients SUM to the single-process gradient of the whole batch; then
// allreduce_gradients() makes every rank hold that sum, and the replicated optimizers take the same step.
//
//   share.ce  = local targets / global targets   the CE is a mean over the batch's targets (HF, LLaVA, CuMo)
//   share.aux = local images / global images     CuMo's balance and z losses are per-image means (segments)
//
// Both losses are linear in these shares, so the data-parallel step is the single-process step on the same global
// batch up to fp32 summation order (tests/dist: every gradient rel ≤ 1e-6). A loss that is not a mean over
// samples (the HF Mixtral decoder's balance loss over all tokens of all layers: E · Σ f_e P_e) is not linear in
// them; the trainer refuses it with several ranks.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/dist/communicator.hpp"

namespace cumo::dist {

struct LossShare {
  double ce = 1, aux = 1;
};
// A rank's share of a global micro-batch; a rank with nothing (a short last batch) has share 0.
inline LossShare loss_share(std::int64_t local_targets, std::int64_t global_targets, std::int64_t local_images,
                            std::int64_t global_images) {
  CUMO_CHECK(local_targets >= 0 && local_targets <= global_targets && local_images >= 0 &&
                 local_images <= global_images,
             "loss_share: local targets ", local_targets, " / global ", global_targets, ", local images ",
             local_images, " / global ", global_images);
  return {global_targets > 0 ? double(local_targets) / double(global_targets) : 0.0,
          global_images > 0 ? double(local_images) / double(global_images) : 0.0};
}

// Σ over ranks of every trainable parameter's gradient, in place: the gradients are streamed in parameter order
// through buckets of `bucket_bytes`, each reduced by the deterministic allreduce_sum, so every rank ends with the
// same bits. The list must name the same parameters, in the same order and shapes, on every rank (the caller
// checks the weights with check_same and weights_digest first). Host (CPU) gradients go through host buckets;
// device (GPU) gradients through the engine's device buckets (allreduce_sum_device: NCCL), the same fold.
inline void allreduce_gradients(Communicator& comm, const ParameterList& params,
                                std::int64_t bucket_bytes = std::int64_t(16) << 20) {
  if (comm.size() == 1) return;
  CUMO_CHECK(bucket_bytes >= std::int64_t(sizeof(float)), "allreduce_gradients: bucket of ", bucket_bytes, " bytes");
  std::vector<Parameter*> trainable;
  for (Parameter* p : params) {
    if (!p->trainable) continue;
    const std::string name = p->name + ".grad";
    CUMO_CHECK(p->grad.defined(), "allreduce_gradients: ", name, " is undefined");
    check_dtype("allreduce_gradients", name, p->grad, DType::f32);
    CUMO_CHECK(p->grad.is_contiguous(), "allreduce_gradients: ", name, " is not contiguous");
    if (!trainable.empty())
      CUMO_CHECK(p->grad.device() == trainable.front()->grad.device(), "allreduce_gradients: ", name, " is on ",
                 name_of(p->grad.device()), " but ", trainable.front()->name, ".grad on ",
                 name_of(trainable.front()->grad.device()));
    trainable.push_back(p);
  }
  if (trainable.empty()) return;
  if (trainable.front()->grad.device() != Device::cpu) {
    std::vector<DeviceFloats> pieces;
    for (Parameter* p : trainable) pieces.push_back({p->grad.data<float>(), p->grad.numel()});
    comm.allreduce_sum_device(pieces, bucket_bytes);
    return;
  }
  const std::int64_t cap = bucket_bytes / std::int64_t(sizeof(float));
  std::vector<float> bucket;
  bucket.reserve(std::size_t(cap));
  struct Piece {
    float* grad;
    std::int64_t n;
  };
  std::vector<Piece> pieces;  // where the bucket's values go back to
  auto flush = [&] {
    if (bucket.empty()) return;
    allreduce_sum(comm, std::span<float>(bucket));
    std::int64_t off = 0;
    for (const Piece& p : pieces) {
      std::copy_n(bucket.data() + off, p.n, p.grad);
      off += p.n;
    }
    bucket.clear();
    pieces.clear();
  };
  for (Parameter* p : trainable) {
    float* g = p->grad.data<float>();
    for (std::int64_t done = 0, n = p->grad.numel(); done < n;) {
      const std::int64_t take = std::min(n - done, cap - std::int64_t(bucket.size()));
      bucket.insert(bucket.end(), g + done, g + done + take);
      pieces.push_back({g + done, take});
      done += take;
      if (std::int64_t(bucket.size()) == cap) flush();
    }
  }
  flush();
}

// A digest of every parameter's bytes (device tensors are copied to the host first): the ranks' replicas must
// start identical.
inline std::string weights_digest(const ParameterList& params) {
  std::uint64_t h = 1469598103934665603ull;
  for (const Parameter* p : params) {
    const Tensor v = p->value.device() == Device::cpu ? p->value.contiguous() : p->value.to(Device::cpu);
    h ^= fingerprint(std::string_view(static_cast<const char*>(v.raw()), v.nbytes()));
    h *= 1099511628211ull;
  }
  return std::to_string(h);
}

}  // namespace cumo::dist
