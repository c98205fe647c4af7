#pragma once
// dist::Zero1: ZeRO stage 1 for data parallelism. The AdamW moments are sharded over the ranks. Rank r owns a
// contiguous run of the trainable parameters, balanced by element count. It keeps the moments of those parameters
// only, and it updates only them. An all-gather then gives every rank every updated parameter. The update is
// elementwise, so the weights are bitwise those of the replicated optimizer (tests/dist), with 1/N of the
// optimizer memory per rank.
//
// Checkpoints stay whole: gather_state() brings every moment to every rank before rank 0 writes, and release()
// drops the ones this rank does not own. A checkpoint from a ZeRO-1 run therefore resumes with or without ZeRO-1
// and on any world size. Host (CPU) parameters.
#include <cstdint>
#include <cstring>
#include <span>
#include <unordered_map>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/dist/communicator.hpp"
#include "cumo/train/optimizer.hpp"

namespace cumo::dist {

template <class B = backend::Cpu>
class Zero1 {
  static_assert(B::device == Device::cpu, "dist::Zero1: host parameters (the GPU path needs NCCL, not written yet)");

 public:
  // Every rank passes its replica of the same optimizer (same parameters, same order); construct it after any
  // checkpoint is loaded, so that the moments this rank does not own are dropped.
  Zero1(Communicator& comm, train::AdamW<B>& opt) : comm_(&comm), opt_(&opt), params_(opt.trainable_parameters()) {
    std::int64_t total = 0;
    for (const Parameter* p : params_) total += p->value.numel();
    // contiguous runs: parameter i goes to the rank whose share of the running element count it starts in
    const int N = comm.size();
    begin_.assign(std::size_t(N) + 1, std::int64_t(params_.size()));
    begin_[0] = 0;
    std::int64_t seen = 0;
    int r = 0;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      while (r + 1 < N && seen * N >= total * (r + 1)) begin_[std::size_t(++r)] = std::int64_t(i);
      owner_[params_[i]] = r;
      seen += params_[i]->value.numel();
    }
    opt.set_owned([this](const Parameter& p) { return owner(p) == comm_->rank(); });
  }
  Zero1(const Zero1&) = delete;
  Zero1& operator=(const Zero1&) = delete;
  ~Zero1() { opt_->set_owned({}); }

  // The rank that updates p (-1: not a trainable parameter of this optimizer).
  int owner(const Parameter& p) const {
    const auto it = owner_.find(&p);
    return it == owner_.end() ? -1 : it->second;
  }
  // How many trainable parameters / moments this rank holds.
  std::int64_t owned_parameters() const { return begin_[std::size_t(comm_->rank() + 1)] - begin_[std::size_t(comm_->rank())]; }

  // After opt.step(lr): every rank's updated parameters to every rank (one all-gather, in parameter order).
  void share_parameters() {
    if (comm_->size() == 1) return;
    std::vector<std::int64_t> bytes(std::size_t(comm_->size()), 0);
    for (int q = 0; q < comm_->size(); ++q)
      for (std::int64_t i = begin_[std::size_t(q)]; i < begin_[std::size_t(q + 1)]; ++i)
        bytes[std::size_t(q)] += params_[std::size_t(i)]->value.numel() * std::int64_t(sizeof(float));
    std::vector<float> mine, all;
    for (std::int64_t i = begin_[std::size_t(comm_->rank())]; i < begin_[std::size_t(comm_->rank() + 1)]; ++i) {
      const Tensor& v = params_[std::size_t(i)]->value;
      mine.insert(mine.end(), v.data<float>(), v.data<float>() + v.numel());
    }
    std::int64_t n = 0;
    for (std::int64_t b : bytes) n += b / std::int64_t(sizeof(float));
    all.resize(std::size_t(n));
    comm_->allgatherv(mine.data(), std::int64_t(mine.size() * sizeof(float)), all.data(), bytes);
    std::int64_t off = 0;
    for (Parameter* p : params_) {
      std::memcpy(p->value.data<float>(), all.data() + off, std::size_t(p->value.numel()) * sizeof(float));
      off += p->value.numel();
    }
  }

  // Every parameter's moments on every rank (before rank 0 writes a checkpoint); release() undoes it.
  void gather_state() {
    if (comm_->size() == 1) return;
    for (Parameter* p : params_) {
      const int from = owner(*p);
      const auto* s = opt_->state(*p);
      std::int64_t step = comm_->rank() == from && s ? s->step : 0;
      comm_->broadcast(&step, sizeof step, from);
      if (step == 0) continue;  // never stepped: no state anywhere
      typename train::AdamW<B>::State got;
      got.step = step;
      got.exp_avg = comm_->rank() == from ? s->exp_avg : Tensor::empty(p->value.shape());
      got.exp_avg_sq = comm_->rank() == from ? s->exp_avg_sq : Tensor::empty(p->value.shape());
      comm_->broadcast(got.exp_avg.raw(), std::int64_t(got.exp_avg.nbytes()), from);
      comm_->broadcast(got.exp_avg_sq.raw(), std::int64_t(got.exp_avg_sq.nbytes()), from);
      if (comm_->rank() != from) opt_->set_state(*p, std::move(got));
    }
  }
  void release() {
    for (Parameter* p : params_)
      if (owner(*p) != comm_->rank()) opt_->drop_state(*p);
  }

 private:
  Communicator* comm_;
  train::AdamW<B>* opt_;
  ParameterList params_;
  std::vector<std::int64_t> begin_;  // (N + 1) rank r owns params_[begin_[r], begin_[r+1])
  std::unordered_map<const Parameter*, int> owner_;
};

}  // namespace cumo::dist
