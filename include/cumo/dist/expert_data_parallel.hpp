#pragma once
// dist::ExpertDataParallel: expert parallelism inside data parallelism, for a whole model's training step.
//
// The world of N ranks is split into N/K expert-parallel groups of K consecutive ranks ({0 … K−1}, {K … 2K−1}, …).
// Inside a group, rank r keeps the r-th slice of every sharded block's experts (the model's shard_experts, e.g.
// models::CuMo) and the routed rows travel to their experts' ranks (dist/expert_parallel.hpp). The ranks at the same
// place in their groups hold the same slice: they form that slice's replica group (N/K ranks), data parallel for
// those experts. Every rank still trains on its own share of each global batch (data parallel).
//
//   gradients  a replicated parameter (attention, norms, routers, dense MLPs, the language model) holds this rank's
//              rows: summed over the world. A sharded expert slice holds its group's rows (the exchange brought
//              them): summed over its replica group. Both with the deterministic allreduce_sum.
//   clipping   ‖g‖² = Σ replicated g² + Σ over the group of each slice's Σ g²: every expert counted once, and the
//              same norm (bit for bit) on every rank.
//   optimizer  each rank updates what it holds; a sharded parameter's AdamW moments are its slice's. shard_state()
//              slices whole moments (after a checkpoint was loaded), gather_state() makes them whole again (before
//              one is written), so checkpoints are the single-process format and resume on any world size and K.
//
// The step is the data-parallel step, which is the single-process step up to fp32 summation order (tests/dist).
// Host (CPU) parameters over MPI, or GPU parameters over NCCL (unverified: compiled, never run on a GPU).
//
// Lifetime: a model sharded over experts() keeps a pointer to that group communicator (its blocks exchange rows
// through it, and unshard_experts() gathers through it), so this object must outlive the sharding: unshard before
// it goes away.
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <unordered_set>
#include <vector>

#include "cumo/backend/cpu/optim.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/dist/communicator.hpp"
#include "cumo/dist/data_parallel.hpp"
#include "cumo/dist/expert_parallel.hpp"
#include "cumo/train/clip.hpp"
#include "cumo/train/optimizer.hpp"

namespace cumo::dist {

class ExpertDataParallel {
 public:
  // Every rank of `world` calls it with the same K (the expert-parallel group size).
  ExpertDataParallel(Communicator& world, int K) : world_(&world), K_(K) {
    CUMO_CHECK(K >= 1 && world.size() % K == 0, "expert parallel: groups of ", K, " ranks do not divide the ",
               world.size(), " ranks (the number of ranks must be a multiple of --expert-parallel K)");
    experts_ = world.split(world.rank() / K, world.rank());
    replicas_ = world.split(world.rank() % K, world.rank());
  }

  Communicator& world() const { return *world_; }
  Communicator& experts() const { return *experts_; }   // this rank's expert-parallel group (K ranks)
  Communicator& replicas() const { return *replicas_; } // the ranks holding this rank's slices (N/K ranks)
  int group_size() const { return K_; }

  // The parameters the model sharded (what its shard_experts returned): local slices along dim 0.
  void set_sharded(const ParameterList& sharded) { sharded_ = {sharded.begin(), sharded.end()}; }
  bool is_sharded(const Parameter& p) const { return sharded_.count(&p) > 0; }

  // `params` in order, split into {replicated, sharded}.
  struct Split {
    ParameterList replicated, sharded;
  };
  Split split(const ParameterList& params) const {
    Split s;
    for (Parameter* p : params) (is_sharded(*p) ? s.sharded : s.replicated).push_back(p);
    return s;
  }

  // After every micro-batch's backward: the replicated gradients summed over the world, the sharded ones over
  // their replica group; every rank holding a parameter ends with the same bits.
  void reduce_gradients(const ParameterList& trainable, std::int64_t bucket_bytes = std::int64_t(16) << 20) const {
    reduce_gradients(trainable, *world_, *replicas_, bucket_bytes);
  }
  // The same sum through other communicators of the same ranks: `world` of world()'s, `replicas` of replicas()'s
  // (a background thread's duplicates, Communicator::background(); dist::OverlappedGradientSum runs it part by part
  // while the backward exchanges rows on experts()). Each element is folded over the ranks in rank order whatever
  // list it is summed in, so any split of the trainable parameters gives the same bits.
  void reduce_gradients(const ParameterList& params, Communicator& world, Communicator& replicas,
                        std::int64_t bucket_bytes = std::int64_t(16) << 20) const {
    CUMO_CHECK(world.size() == world_->size() && world.rank() == world_->rank() &&
                   replicas.size() == replicas_->size() && replicas.rank() == replicas_->rank(),
               "ExpertDataParallel::reduce_gradients: the communicators given are not the world's (", world_->size(),
               " ranks) and the replica group's (", replicas_->size(), ")");
    const Split s = split(params);
    allreduce_gradients(world, s.replicated, bucket_bytes);
    allreduce_gradients(replicas, s.sharded, bucket_bytes);
  }

  // Global-norm clipping of the optimizer's trainable gradients over the whole model (train::clip_gradients for a
  // sharded model): returns the norm before clipping, the same on every rank. A NaN/Inf stops training on every
  // rank (the norm carries it to all), naming the first parameter that holds one where a rank holds it.
  template <class B>
  float clip_gradients(train::AdamW<B>& opt, double max_norm, std::int64_t step) const {
    CUMO_CHECK(max_norm > 0 && std::isfinite(max_norm), "clip_gradients: max_norm must be finite and > 0, got ",
               max_norm);
    constexpr const char* where = "ExpertDataParallel::clip_gradients";
    const ParameterList params = opt.trainable_parameters();
    const Split s = split(params);
    if constexpr (B::device == Device::cpu) {
      double slices = cpu::sum_of_squares(train::detail::host_grads(s.sharded, where));
      allreduce_sum(*experts_, std::span<double>(&slices, 1));
      const float total =
          float(std::sqrt(cpu::sum_of_squares(train::detail::host_grads(s.replicated, where)) + slices));
      if (!std::isfinite(total)) train::detail::fail_nonfinite(params, total, step, [](const Tensor& g) { return g; });
      cpu::scale_gradients(train::detail::host_grads(params, where), cpu::clip_coefficient(total, max_norm));
      return total;
    } else {
      // On the device: each part's norm by the backend (its squares summed in double there, the result fp32),
      // squared back in double on the host. Not the CPU form's bits (that keeps each part's sum of squares in
      // double), but the same norm on every rank, which is what the replicas' identical steps need.
      const B& be = opt.backend();
      auto grads = [](const ParameterList& ps) {
        std::vector<Tensor> g;
        for (const Parameter* p : ps)
          if (p->trainable && p->grad.defined()) g.push_back(p->grad);
        return g;
      };
      const double ns = be.item(be.grad_norm(grads(s.sharded))), nr = be.item(be.grad_norm(grads(s.replicated)));
      double slices = ns * ns;
      allreduce_sum(*experts_, std::span<double>(&slices, 1));
      const float total = float(std::sqrt(nr * nr + slices));
      if (!std::isfinite(total))
        train::detail::fail_nonfinite(params, total, step, [&](const Tensor& g) { return be.to_host(g); });
      const float coef = cpu::clip_coefficient(total, max_norm);
      for (Tensor g : grads(params)) be.scale(g, coef);
      return total;
    }
  }

  // Whole moments (a checkpoint loaded before the model was sharded) → this rank's slices.
  template <class B>
  void shard_state(train::AdamW<B>& opt) const {
    for (Parameter* p : opt.trainable_parameters()) {
      const auto* s = is_sharded(*p) ? opt.state(*p) : nullptr;
      if (!s) continue;
      CUMO_CHECK(s->exp_avg.size(0) == p->value.size(0) * K_, "ExpertDataParallel::shard_state: the moments of '",
                 p->name, "' have shape ", s->exp_avg.shape(), " but the parameter's slice has shape ",
                 p->value.shape(), " (", K_, " slices)");
      typename train::AdamW<B>::State mine;
      mine.step = s->step;
      mine.exp_avg = rows_of_rank(*experts_, s->exp_avg).clone();
      mine.exp_avg_sq = rows_of_rank(*experts_, s->exp_avg_sq).clone();
      opt.set_state(*p, std::move(mine));
    }
  }

  // This rank's slices of the moments → whole (every slice's in group order), for a checkpoint. Call it after the
  // model was unsharded (the parameters whole again); every rank of the world calls it.
  template <class B>
  void gather_state(train::AdamW<B>& opt) const {
    for (Parameter* p : opt.trainable_parameters()) {
      if (!is_sharded(*p)) continue;
      const auto* s = opt.state(*p);
      // every rank of a group has stepped the same parameters the same number of times; check rather than hang
      std::int64_t has[2] = {s ? 1 : 0, s ? -1 : 0};
      experts_->allreduce(std::span<std::int64_t>(has, 2), ReduceOp::min);
      CUMO_CHECK(has[0] == -has[1], "ExpertDataParallel::gather_state: some ranks of the group hold moments of '",
                 p->name, "' and some do not");
      if (!s) continue;
      typename train::AdamW<B>::State whole;
      whole.step = s->step;
      whole.exp_avg = Tensor::empty(p->value.shape(), DType::f32, p->value.device());
      whole.exp_avg_sq = Tensor::empty(p->value.shape(), DType::f32, p->value.device());
      allgather_rows(*experts_, s->exp_avg, whole.exp_avg);
      allgather_rows(*experts_, s->exp_avg_sq, whole.exp_avg_sq);
      opt.set_state(*p, std::move(whole));
    }
  }

 private:
  Communicator* world_;
  int K_;
  std::unique_ptr<Communicator> experts_, replicas_;
  std::unordered_set<const Parameter*> sharded_;
};

}  // namespace cumo::dist
