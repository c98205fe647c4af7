#pragma once
// io::PrefetchedBatches — a BatchIterator driven by a worker thread that prepares the next `depth` batches (image
// decoding, CLIP preprocessing, collation) while the caller computes on the current one.
//
// The batches are exactly the BatchIterator's, in the same order: the worker is the only one to touch the iterator
// after construction, and it hands each batch over together with the iterator's position *after* that batch.
// position() is the position after the last batch the caller took, not after the last one prepared, so a
// checkpoint written between steps resumes at the right batch whatever the worker has read ahead. An exception in
// the worker (a missing or corrupt image) reaches the caller at the next() that would have returned that batch;
// the worker stops there.
//
// Thread safety: LlavaDataset::pixels() is thread-safe; nothing else is shared. next() and position() are for one
// consumer thread.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include "cumo/core/error.hpp"
#include "cumo/io/llava_data.hpp"

namespace cumo::io {

class PrefetchedBatches {
 public:
  // `it` is moved in (already positioned: set_position() before handing it over); depth >= 1 batches read ahead.
  explicit PrefetchedBatches(BatchIterator it, int depth = 2) : it_(std::move(it)), depth_(depth), taken_(it_.position()) {
    CUMO_CHECK(depth >= 1, "PrefetchedBatches: depth must be >= 1, got ", depth);
    worker_ = std::thread([this] { run(); });
  }
  PrefetchedBatches(const PrefetchedBatches&) = delete;
  PrefetchedBatches& operator=(const PrefetchedBatches&) = delete;
  ~PrefetchedBatches() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    space_.notify_all();
    worker_.join();
  }

  // The next batch; blocks until the worker has it. Rethrows the worker's exception for this batch.
  Batch next() {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [this] { return !queue_.empty() || done_; });
    CUMO_CHECK(!queue_.empty(), "PrefetchedBatches::next: no more batches (an earlier batch failed to load)");
    Item item = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    space_.notify_one();
    if (item.error) std::rethrow_exception(item.error);
    taken_ = item.after;
    return std::move(item.batch);
  }

  // Where a fresh BatchIterator must stand to continue after the last batch next() returned.
  DataPosition position() const { return taken_; }

 private:
  struct Item {
    Batch batch;
    DataPosition after;
    std::exception_ptr error;
  };

  void run() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        space_.wait(lock, [this] { return stop_ || int(queue_.size()) < depth_; });
        if (stop_) break;
      }
      Item item;
      try {
        item.batch = it_.next();
        item.after = it_.position();
      } catch (...) {
        item.error = std::current_exception();
      }
      const bool failed = bool(item.error);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.push_back(std::move(item));
      }
      ready_.notify_one();
      if (failed) break;  // the consumer sees the error; nothing after it is prepared
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    ready_.notify_one();
  }

  BatchIterator it_;
  int depth_;
  DataPosition taken_;
  std::mutex mutex_;
  std::condition_variable ready_, space_;
  std::deque<Item> queue_;
  bool stop_ = false, done_ = false;
  std::thread worker_;  // last: starts after every other member is constructed
};

}  // namespace cumo::io
