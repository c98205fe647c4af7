#pragma once
// What a run will need in memory, estimated from its sizes before anything is allocated, and refused with the
// estimate and the fields that drive it when it cannot fit this machine: a mistyped width (hidden 1e9) or an
// unbounded sequence (a 200k-character answer with max_length 0) would otherwise end in a bare std::bad_alloc, or
// swap the machine to a halt, after minutes of loading.
//   training   each parameter as value, gradient and AdamW m and v: 16 bytes (fp32)
//   inference  the value only: 4 bytes
//   a batch    B × T tokens through every layer: ~24 activations of width H kept per token per layer for the
//              backward, plus the B × heads × T × T attention probabilities of a layer (the largest single buffer)
// The estimates are lower bounds of the real footprint (workspaces and the data are not counted), so a refusal is
// never a false alarm; a run that passes can still fail later, then with the message of main()'s bad_alloc handler.
#include <cstdint>
#include <cstdio>
#include <string>

#include "cumo/core/error.hpp"
#include "cumo/models/cumo.hpp"

#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace cumo::app {

// A training step allocates the same activation buffers every step. With glibc's defaults, blocks above the
// (dynamic) mmap threshold come from fresh mmaps and the heap top is trimmed on free, so each step page-faults its
// activations in again: ~7 % of the demo's CPU step on one thread went to the kernel. Here freed memory stays in the
// heap for the next step (blocks up to 32 MiB from the heap, the top trimmed only past 1 GiB free) and the step
// runs ~7 % (1 thread) / ~6 % (2 threads) faster (docs/benchmarks.md). A no-op off glibc.
inline void retain_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

// This machine's physical memory in bytes (0 when unknown: then nothing is refused).
inline double physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return double(pages) * double(page);
#endif
  return 0;
}

inline std::string gib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3g GiB", bytes / double(1ull << 30));
  return buf;
}

// Refuses a model whose parameters (training: with gradients and AdamW states) cannot fit in memory.
inline void check_model_fits(const models::CuMoConfig& c, bool sparse, bool training, const std::string& where,
                             double memory = physical_memory_bytes()) {
  const double params = c.parameter_count(sparse, sparse);
  const double bytes = params * (training ? 16.0 : 4.0);
  if (memory <= 0 || bytes <= memory) return;
  char n[32];
  std::snprintf(n, sizeof n, "%.3g", params);
  fail(where, ": the model has ", n, " parameters", sparse ? " (upcycled)" : "", ", which need at least ", gib(bytes),
       training ? " to train (weights, gradients and AdamW states, 16 bytes each)" : " (fp32 weights)",
       ", more than this machine's ", gib(memory), " of memory. The sizes that drive it: vision hidden ",
       c.llava.vision.hidden, " ffn ", c.llava.vision.ffn, " layers ", c.llava.vision.layers, "; text hidden ",
       c.llava.text.hidden, " ffn ", c.llava.text.ffn, " layers ", c.llava.text.layers, " vocab ", c.llava.text.vocab,
       "; experts ", c.experts);
}

// Refuses a batch of `batch` sequences of `tokens` tokens (the longest sample's) whose activations cannot fit.
inline void check_batch_fits(const models::CuMoConfig& c, std::int64_t batch, std::int64_t tokens,
                             const std::string& where, const std::string& longest,
                             double memory = physical_memory_bytes()) {
  const auto& t = c.llava.text;
  const double B = double(batch), T = double(tokens);
  const double kept = 24.0 * B * T * double(t.hidden) * double(t.layers) * 4.0;
  const double attention = B * double(t.heads) * T * T * 4.0;
  const double bytes = kept + attention;
  if (memory <= 0 || bytes <= memory) return;
  fail(where, ": ", longest, " is ", tokens, " tokens long, so a batch of ", batch, " needs at least ", gib(bytes),
       " of activations (", gib(attention), " of them one layer's attention probabilities), more than this "
       "machine's ", gib(memory), " of memory. Set the stage's max_length (tokens kept per sample) or a smaller batch");
}

}  // namespace cumo::app
