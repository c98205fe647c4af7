#pragma once
// dist::Zero1: ZeRO stage 1 for data parallelism. The AdamW moments are sharded over the ranks. Rank r owns a
// contiguous run of the trainable parameters, balanced by element count. It keeps the moments of those parameters
// only, and it updates only them. All-gathers then give every rank every updated parameter (share_parameters:
// rounds through one buffer of bounded size). The update is elementwise, so the weights are bitwise those of the
// replicated optimizer (tests/dist), with 1/N of the optimizer memory per rank.
//
// Checkpoints stay whole: gather_state() brings every moment to every rank before rank 0 writes, and release()
// drops the ones this rank does not own. A checkpoint from a ZeRO-1 run therefore resumes with or without ZeRO-1
// and on any world size. The parameters live on B's device: the all-gather and the broadcasts then run on that
// memory (the NCCL communicator takes device pointers; tests/dist checks the CPU form, the GPU form is unverified).
//
// With expert parallelism the parameters come in partitions, each sharded over the ranks that hold it: the
// replicated ones over the world, each expert slice over its replica group (the ranks holding the same slice).
#include <algorithm>
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/dist/communicator.hpp"
#include "cumo/train/optimizer.hpp"

namespace cumo::dist {

template <class B = backend::Cpu>
class Zero1 {
 public:
  // One part of the parameters and the ranks that share them: with expert parallelism the replicated parameters
  // over the world and the expert slices over their replica group (dist/expert_data_parallel.hpp).
  struct Partition {
    Communicator* comm;
    ParameterList params;
  };

  // Every rank passes its replica of the same optimizer (same parameters, same order); construct it after any
  // checkpoint is loaded, so that the moments this rank does not own are dropped. All trainable parameters over
  // `comm`.
  Zero1(Communicator& comm, train::AdamW<B>& opt) : Zero1(opt, {Partition{&comm, opt.trainable_parameters()}}) {}
  // Each partition's parameters sharded over its own communicator; together they must be the trainable ones.
  Zero1(train::AdamW<B>& opt, std::vector<Partition> partitions) : opt_(&opt) {
    std::size_t covered = 0;
    for (Partition& pt : partitions) {
      Part part{pt.comm, pt.params, {}};
      covered += pt.params.size();
      std::int64_t total = 0;
      for (const Parameter* p : part.params) total += p->value.numel();
      // contiguous runs: parameter i goes to the rank whose share of the running element count it starts in
      const int N = part.comm->size();
      part.begin.assign(std::size_t(N) + 1, std::int64_t(part.params.size()));
      part.begin[0] = 0;
      std::int64_t seen = 0;
      int r = 0;
      for (std::size_t i = 0; i < part.params.size(); ++i) {
        while (r + 1 < N && seen * N >= total * (r + 1)) part.begin[std::size_t(++r)] = std::int64_t(i);
        owner_[part.params[i]] = {parts_.size(), r};
        seen += part.params[i]->value.numel();
      }
      parts_.push_back(std::move(part));
    }
    CUMO_CHECK(covered == opt.trainable_parameters().size() && owner_.size() == covered, "dist::Zero1: the partitions "
               "hold ", covered, " parameters (", owner_.size(), " distinct) but the optimizer trains ",
               opt.trainable_parameters().size());
    opt.set_owned([this](const Parameter& p) { return owns(p); });
  }
  Zero1(const Zero1&) = delete;
  Zero1& operator=(const Zero1&) = delete;
  ~Zero1() { opt_->set_owned({}); }

  // The rank (of p's partition's communicator) that updates p (-1: not a trainable parameter of this optimizer).
  int owner(const Parameter& p) const {
    const auto it = owner_.find(&p);
    return it == owner_.end() ? -1 : it->second.rank;
  }
  bool owns(const Parameter& p) const {
    const auto it = owner_.find(&p);
    return it != owner_.end() && it->second.rank == parts_[it->second.part].comm->rank();
  }
  // How many trainable parameters / moments this rank holds.
  std::int64_t owned_parameters() const {
    std::int64_t n = 0;
    for (const Part& part : parts_) n += part.begin[std::size_t(part.comm->rank() + 1)] - part.begin[std::size_t(part.comm->rank())];
    return n;
  }

  // After opt.step(lr): every rank's updated parameters to every rank of its partition. Each rank's run of
  // parameters is one stream of floats; rounds of all-gathers move `bucket_bytes` at most (each rank's next
  // bucket_bytes / N of its stream) through one buffer kept from step to step, so a step allocates nothing after
  // the first and ZeRO-1 never holds a second copy of the model (a 7B-parameter model's weights are 28 GB).
  void share_parameters(std::int64_t bucket_bytes = std::int64_t(64) << 20) {
    constexpr auto kFloat = std::int64_t(sizeof(float));
    CUMO_CHECK(bucket_bytes >= kFloat, "Zero1::share_parameters: rounds of ", bucket_bytes, " bytes");
    for (const Part& part : parts_) {
      Communicator& c = *part.comm;
      const int N = c.size(), me = c.rank();
      if (N == 1) continue;
      std::vector<std::int64_t> run(std::size_t(N), 0);  // floats in each rank's run
      for (int q = 0; q < N; ++q)
        for (std::int64_t i = part.begin[std::size_t(q)]; i < part.begin[std::size_t(q + 1)]; ++i)
          run[std::size_t(q)] += part.params[std::size_t(i)]->value.numel();
      const std::int64_t longest = *std::max_element(run.begin(), run.end());
      const std::int64_t per = std::min(std::max<std::int64_t>(1, bucket_bytes / (N * kFloat)), longest);
      if (per == 0) continue;
      if (!buffer_.defined() || buffer_.numel() < per * (N + 1))
        buffer_ = Tensor::empty({per * (N + 1)}, DType::f32, B::device);
      Tensor mine = buffer_.slice(0, 0, per);              // (per,) this rank's part of the round
      Tensor all = buffer_.slice(0, per, per * (N + 1));   // (N · per,) every rank's, packed in rank order
      for (std::int64_t at = 0; at < longest; at += per) {
        std::vector<std::int64_t> bytes(static_cast<std::size_t>(N), 0);
        for (int q = 0; q < N; ++q)
          bytes[std::size_t(q)] = std::clamp<std::int64_t>(run[std::size_t(q)] - at, 0, per) * kFloat;
        copy_run(part, me, at, mine, /*out_of_parameters=*/true);
        c.allgatherv(mine.raw(), bytes[std::size_t(me)], all.raw(), bytes);
        std::int64_t off = 0;
        for (int q = 0; q < N; ++q) {
          const std::int64_t n = bytes[std::size_t(q)] / kFloat;
          if (q != me && n > 0) copy_run(part, q, at, all.slice(0, off, off + n), /*out_of_parameters=*/false);
          off += n;
        }
      }
    }
  }

  // Every parameter's moments on every rank of its partition (before rank 0 writes a checkpoint); release() undoes
  // it.
  void gather_state() {
    for (const Part& part : parts_) {
      Communicator& c = *part.comm;
      if (c.size() == 1) continue;
      for (Parameter* p : part.params) {
        const int from = owner(*p);
        const auto* s = opt_->state(*p);
        std::int64_t step = c.rank() == from && s ? s->step : 0;
        c.broadcast(&step, sizeof step, from);
        if (step == 0) continue;  // never stepped: no state anywhere
        typename train::AdamW<B>::State got;
        got.step = step;
        got.exp_avg = c.rank() == from ? s->exp_avg : Tensor::empty(p->value.shape(), DType::f32, B::device);
        got.exp_avg_sq = c.rank() == from ? s->exp_avg_sq : Tensor::empty(p->value.shape(), DType::f32, B::device);
        c.broadcast(got.exp_avg.raw(), std::int64_t(got.exp_avg.nbytes()), from);
        c.broadcast(got.exp_avg_sq.raw(), std::int64_t(got.exp_avg_sq.nbytes()), from);
        if (c.rank() != from) opt_->set_state(*p, std::move(got));
      }
    }
  }
  void release() {
    for (const Part& part : parts_)
      for (Parameter* p : part.params)
        if (!owns(*p)) opt_->drop_state(*p);
  }

 private:
  struct Part {
    Communicator* comm;
    ParameterList params;
    std::vector<std::int64_t> begin;  // (N + 1) rank r owns params[begin[r], begin[r+1])
  };
  struct Owner {
    std::size_t part;
    int rank;
  };

  // Floats [at, at + buf.numel()) of rank q's run of parameters (clipped to its end) ↔ buf: out of the parameters
  // into buf, or back into them.
  static void copy_run(const Part& part, int q, std::int64_t at, const Tensor& buf, bool out_of_parameters) {
    const std::int64_t end = at + buf.numel();
    std::int64_t start = 0;  // where parameter i starts in the run
    for (std::int64_t i = part.begin[std::size_t(q)]; i < part.begin[std::size_t(q + 1)] && start < end; ++i) {
      Tensor& v = part.params[std::size_t(i)]->value;
      const std::int64_t lo = std::max(start, at), hi = std::min(start + v.numel(), end);
      if (lo < hi) {
        Tensor flat = v.view({v.numel()}).slice(0, lo - start, hi - start);  // (hi − lo,)
        Tensor b = buf.slice(0, lo - at, hi - at);                           // (hi − lo,)
        if (out_of_parameters)
          b.copy_from(flat);
        else
          flat.copy_from(b);
      }
      start += v.numel();
    }
  }

  train::AdamW<B>* opt_;
  std::vector<Part> parts_;
  std::unordered_map<const Parameter*, Owner> owner_;
  Tensor buffer_;  // share_parameters' rounds: this rank's part, then every rank's (on B's device)
};

}  // namespace cumo::dist
