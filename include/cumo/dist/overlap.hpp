#pragma once
// dist::OverlappedGradientSum: the data-parallel gradient sum (allreduce_gradients) on a background thread, part by
// part as the backward finishes them, so that the language model's gradients are summed while the connector's and
// the vision tower's backward still compute.
//
//   early:  the parameter lists the backward finishes first, in the order it finishes them (nn::Llava reports the
//           language model's, then the connector's, to a Llava::report_gradients_done hook);
//   ready(list) says the backward is done with one of them; finish() adds every trainable parameter no early list
//   holds as a last part, lets every part go, and waits.
//
// Every rank sums the same parts in the same order and through the same buckets whatever its own backward did (a
// rank whose share of the last micro-batch is empty runs no backward and reports nothing: its finish() lets every
// part go), so the ranks' collectives pair up. Each element is still folded over the ranks in rank order by
// allreduce_sum, whatever bucket it lands in, so the gradients are bitwise those of one allreduce_gradients call
// after the backward (tests/dist).
//
// The thread uses communicators of its own (Communicator::background(): duplicates that sleep between polls) on an
// engine that allows it. Plain data parallelism: allows_background_thread() (MPI at MPI_THREAD_SERIALIZED), since
// the backward makes no collective call. Expert parallelism: the sum of ExpertDataParallel::reduce_gradients (the
// replicated parameters over the world's duplicate, the expert slices over the replica group's) while the backward
// exchanges rows on the expert group, which needs allows_concurrent_threads() (MPI_THREAD_MULTIPLE).
//
// GPU ranks (NCCL; unverified, no GPU has run it): the background duplicate runs its collectives on a CUDA stream of
// its own, so the sum proceeds beside the backward's kernels on the compute stream. When the backward reports a
// part its kernels are only queued, so ready() takes Communicator::follow_compute() of each communicator the sum
// uses (an event on the compute stream) and the thread makes that communicator's stream wait for it before the
// part's collectives. NCCL forbids two threads issuing to communicators of one GPU at once, so allows_concurrent_
// threads() is false there and the overlap runs without expert parallelism only.
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/dist/communicator.hpp"
#include "cumo/dist/data_parallel.hpp"

namespace cumo::dist {

class OverlappedGradientSum {
 public:
  // What the thread does with one part: sums its gradients over the ranks through the thread's own communicators.
  using Sum = std::function<void(const ParameterList&)>;

  // Data parallel: `comm` is the background communicator (outlives this); `trainable` what the synchronous sum
  // (allreduce_gradients) would sum.
  OverlappedGradientSum(Communicator& comm, const ParameterList& trainable, std::vector<ParameterList> early,
                        std::int64_t bucket_bytes = std::int64_t(16) << 20)
      : OverlappedGradientSum(trainable, std::move(early), sum_over(comm, bucket_bytes), {&comm}) {}

  // Any sum that folds each element the same way whatever part it lands in (ExpertDataParallel::reduce_gradients
  // through background communicators); `sum` must only use communicators no other thread uses meanwhile, and
  // `engines` names them all (each part's collectives follow the work queued when it was reported: follow_compute;
  // on GPU ranks a communicator left out would sum gradients the backward has not written yet).
  OverlappedGradientSum(const ParameterList& trainable, std::vector<ParameterList> early, Sum sum,
                        std::vector<Communicator*> engines)
      : sum_(std::move(sum)), engines_(std::move(engines)), early_(std::move(early)) {
    std::unordered_set<const Parameter*> wanted(trainable.begin(), trainable.end()), taken;
    for (const ParameterList& list : early_) {
      ParameterList part;
      for (Parameter* p : list)
        if (wanted.count(p) && taken.insert(p).second) part.push_back(p);
      parts_.push_back(std::move(part));
    }
    ParameterList rest;
    for (Parameter* p : trainable)
      if (!taken.count(p)) rest.push_back(p);
    parts_.push_back(std::move(rest));
    released_.assign(parts_.size(), false);
    fences_.resize(parts_.size());
    worker_ = std::thread([this] { run(); });
  }
  OverlappedGradientSum(const OverlappedGradientSum&) = delete;
  OverlappedGradientSum& operator=(const OverlappedGradientSum&) = delete;
  // Unfinished (an exception unwinds the step): the parts not started are dropped; one under way completes or
  // times out with the communicator's timeout. The job is being aborted then.
  ~OverlappedGradientSum() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
    }
    cv_.notify_all();
    if (worker_.joinable()) worker_.join();
  }

  // The backward is done with `list` (one of the early lists, the same object's contents): its part may be summed.
  void ready(const ParameterList& list) {
    std::size_t k = 0;
    while (k < early_.size() && early_[k] != list) ++k;
    CUMO_CHECK(k < early_.size(), "OverlappedGradientSum::ready: a parameter list (", list.size(),
               " parameters) that is not one of the ", early_.size(), " early parts");
    release(k);
    cv_.notify_all();
  }

  // Every part summed (the ones never reported too, then the rest); rethrows the thread's error.
  void finish() {
    for (std::size_t k = 0; k < parts_.size(); ++k) release(k);
    cv_.notify_all();
    if (worker_.joinable()) worker_.join();
    if (error_) std::rethrow_exception(error_);
  }

  // The parts in the order they are summed (the early ones, then the rest): for tests and logs.
  const std::vector<ParameterList>& parts() const { return parts_; }

 private:
  static Sum sum_over(Communicator& comm, std::int64_t bucket_bytes) {
    CUMO_CHECK(comm.allows_background_thread(), "OverlappedGradientSum: the ", comm.engine(),
               " communicator does not allow collectives on a background thread");
    return [&comm, bucket_bytes](const ParameterList& part) { allreduce_gradients(comm, part, bucket_bytes); };
  }
  // Part k may go, once the work queued for it so far has run (taken on the computing thread, at most once).
  void release(std::size_t k) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (released_[k]) return;
    }
    std::vector<std::function<void()>> fence;
    for (Communicator* c : engines_)
      if (std::function<void()> f = c->follow_compute()) fence.push_back(std::move(f));
    std::lock_guard<std::mutex> lock(mu_);
    fences_[k] = std::move(fence);
    released_[k] = true;
  }
  void run() {
    try {
      for (std::size_t k = 0; k < parts_.size(); ++k) {
        std::vector<std::function<void()>> fence;
        {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return cancelled_ || released_[k]; });
          if (cancelled_) return;
          fence = std::move(fences_[k]);
        }
        for (const auto& wait_for_compute : fence) wait_for_compute();
        sum_(parts_[k]);
      }
    } catch (...) {
      error_ = std::current_exception();
    }
  }

  Sum sum_;
  std::vector<Communicator*> engines_;  // what sum_ issues its collectives through
  std::vector<ParameterList> early_;  // as given: ready() names one of these
  std::vector<ParameterList> parts_;  // their trainable members (each parameter once), then the rest
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<bool> released_;
  std::vector<std::vector<std::function<void()>>> fences_;  // per part: what its collectives wait for first
  bool cancelled_ = false;
  std::exception_ptr error_;
  std::thread worker_;  // last: started once everything above is set
};

}  // namespace cumo::dist
