#pragma once
// The training step both trainers run, llm.c's main in one function: for each step, the next batch(es) and the
// forward, zero grad, backward (`forward_backward`, the trainer's own), global-norm clipping, the optimizer step at
// the schedule's lr, and the log. Stops early at `stop_at` or when the stop flag is raised (SIGINT), between steps.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>

#include "cumo/dist/communicator.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo/train/schedule.hpp"

namespace cumo::app {

struct StepLoop {
  std::int64_t first = 0;                   // steps already taken (a resumed stage)
  std::int64_t stop_at = 0;                 // the step count to stop at
  double max_grad_norm = 1.0;
  const std::atomic<bool>* stop = nullptr;  // raised asynchronously: finish the step in flight and return
  dist::Communicator* comm = nullptr;       // data parallel: the ranks stop together, when any saw the flag
  // Replaces train::clip_gradients(opt, max_grad_norm, step) when set (expert parallelism: the norm over every
  // rank's expert slices, dist::ExpertDataParallel::clip_gradients). Returns the norm before clipping.
  std::function<float(std::int64_t step)> clip;
};

// Metrics: the trainer's per-step record, with at least `step`, `lr`, `grad_norm` and `seconds`.
// forward_backward(step) → Metrics: its batch(es), forward and backward (gradients accumulated after zero_grad).
// log(const Metrics&): after the update. Returns the steps taken in all.
template <class Optimizer, class ForwardBackward, class Log>
std::int64_t train_steps(Optimizer& opt, const train::CosineWithWarmup& schedule, const StepLoop& loop,
                         ForwardBackward&& forward_backward, Log&& log) {
  std::int64_t step = loop.first;
  while (step < loop.stop_at) {
    const bool stop = loop.stop && loop.stop->load();
    if (loop.comm ? dist::any(*loop.comm, stop) : stop) break;
    const auto t0 = std::chrono::steady_clock::now();
    opt.zero_grad();
    auto m = forward_backward(step);
    // a NaN/Inf gradient stops here
    m.grad_norm = loop.clip ? loop.clip(step + 1) : train::clip_gradients(opt, loop.max_grad_norm, step + 1);
    m.lr = schedule.lr(step);
    opt.step(m.lr);
    m.step = ++step;
    m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    log(m);
  }
  return step;
}

}  // namespace cumo::app
