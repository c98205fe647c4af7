#pragma once
// dist::Communicator: the few collectives data and expert parallelism need, over an engine (MPI for CPU ranks,
// dist/mpi.hpp; NCCL for GPUs, dist/nccl.cuh), and the algorithms built on them once for every engine:
//
//   allreduce_sum      a deterministic sum: every rank gets the same bits, the left fold over ranks 0, 1, …, N−1
//                      (reduce-scatter as an all-to-all of chunks + a sum in rank order + an all-gather: the
//                      bytes of a ring all-reduce, with an order no engine's algorithm choice can change)
//   agree              every rank learns whether any rank failed, and all throw the first failure's message, so a
//                      check that fails on one rank is an error everywhere instead of a hang
//   check_same         every rank holds the same value (a config, a world-size fit), or all throw naming the ranks
//   any                one flag over the ranks (a stop request seen by some of them)
//
// The primitives move host memory; an engine for GPU ranks (NCCL) accepts device memory too
// (moves_device_memory(): every primitive, alltoallv_pieces included) and adds allreduce_sum_device, the gradient
// sum on the GPU.
//
// A collective that does not complete within the communicator's timeout throws dist::CommError (another rank died
// or hangs); after that the communicator is unusable and the caller aborts the job (abort()). SelfCommunicator is
// the world of one process: every collective is the identity, so single-process code runs the same wiring.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/dist/shard.hpp"

namespace cumo::dist {

// A collective failed or timed out. The communicator that threw it must not be used again: abort the job.
class CommError : public Error {
 public:
  using Error::Error;
};

// The same error on every rank (agree, check_same): each rank can stop cleanly, nobody has to abort the job.
class AgreedError : public Error {
 public:
  using Error::Error;
};

enum class ReduceOp { sum, min, max };

// n floats of device (GPU) memory: a piece of a gradient for allreduce_sum_device.
struct DeviceFloats {
  float* data = nullptr;
  std::int64_t n = 0;
};

// `bytes` bytes at byte `offset` of a buffer: one piece of a scattered send or receive (alltoallv_pieces).
struct Segment {
  std::int64_t offset = 0, bytes = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string_view engine() const = 0;  // "self", "mpi", "nccl"

  // ---- the engine's primitives: host memory, byte counts, every rank calls each in the same order ----------
  // Rank r sends send[soff_q, soff_q + send_bytes[q]) to every q and receives recv_bytes[q] bytes from q into
  // recv[roff_q, …) (offsets: prefix sums of the counts). Zero counts are allowed.
  virtual void alltoallv(const void* send, std::span<const std::int64_t> send_bytes, void* recv,
                         std::span<const std::int64_t> recv_bytes) = 0;
  // alltoallv over scattered buffers: what this rank sends to q is the concatenation of send_pieces[q] (pieces of
  // `send`, in order), and what it receives from q fills recv_pieces[q] (pieces of `recv`, in order); the bytes q
  // sends here must equal the bytes of recv_pieces[q]. The expert-parallel exchange receives rows straight into
  // expert-major order this way. This default stages through contiguous buffers around alltoallv; an engine that
  // can move the pieces in place overrides it (MPI: indexed datatypes, no staging copies).
  virtual void alltoallv_pieces(const void* send, std::span<const std::vector<Segment>> send_pieces, void* recv,
                                std::span<const std::vector<Segment>> recv_pieces) {
    const auto ranks = std::size_t(size());
    CUMO_CHECK(send_pieces.size() == ranks && recv_pieces.size() == ranks, "Communicator::alltoallv_pieces: ",
               send_pieces.size(), " send and ", recv_pieces.size(), " receive lists for ", ranks, " ranks");
    const std::vector<std::int64_t> send_bytes = piece_bytes(send_pieces),
                                    recv_bytes = piece_bytes(recv_pieces);
    std::int64_t sent = 0, received = 0;
    for (std::size_t q = 0; q < ranks; ++q) sent += send_bytes[q], received += recv_bytes[q];
    std::vector<char> packed(static_cast<std::size_t>(sent)), unpacked(static_cast<std::size_t>(received));
    const auto host_copy = [](char* dst, const char* src, std::int64_t bytes) {
      std::memcpy(dst, src, std::size_t(bytes));
    };
    pack_pieces(packed.data(), static_cast<const char*>(send), send_pieces, host_copy);
    alltoallv(packed.data(), send_bytes, unpacked.data(), recv_bytes);
    unpack_pieces(static_cast<char*>(recv), unpacked.data(), recv_pieces, host_copy);
  }
  // Every rank contributes `bytes`; recv holds rank q's contribution at the prefix sum of recv_bytes[0..q).
  virtual void allgatherv(const void* send, std::int64_t bytes, void* recv, std::span<const std::int64_t> recv_bytes) = 0;
  virtual void broadcast(void* data, std::int64_t bytes, int root) = 0;
  // Exact integer reductions (control data: counts, flags, hashes).
  virtual void allreduce(std::span<std::int64_t> values, ReduceOp op) = 0;
  virtual void barrier() = 0;
  // The ranks that pass the same colour form a new communicator, ordered by key then rank (expert-parallel groups
  // inside the data-parallel world). Every rank calls it.
  virtual std::unique_ptr<Communicator> split(int colour, int key) const = 0;
  // Ends every rank of the job now (a collective that cannot complete, an error on one rank). Never returns.
  [[noreturn]] virtual void abort(int code) = 0;

  // ---- a background thread (dist::OverlappedGradientSum) ---------------------------------------------------
  // Whether a second thread may run collectives while the thread that made the communicator computes, one thread
  // in the engine at a time (MPI: MPI_THREAD_SERIALIZED or more).
  virtual bool allows_background_thread() const { return false; }
  // Whether that thread may run its collectives while the computing thread runs collectives of its own on another
  // communicator (expert parallelism's exchanges during the backward; MPI: MPI_THREAD_MULTIPLE).
  virtual bool allows_concurrent_threads() const { return false; }
  // The communicator such a thread uses: a private duplicate (every rank calls it, as split) whose waits leave the
  // core to the computing thread instead of spinning.
  virtual std::unique_ptr<Communicator> background() const { return split(0, rank()); }
  // What makes this communicator's next collectives wait for the work the computing thread has queued so far. The
  // computing thread calls it when it hands data over (OverlappedGradientSum::ready); the thread that then issues
  // the collectives runs the returned callable first. Host engines: empty — host data is complete when the call is
  // made. A device engine whose collectives run on a stream of their own (NCCL's background()): the GPU kernels
  // that produce the data are only queued at that point, so an event on the compute stream, which its stream waits
  // for (no host wait).
  virtual std::function<void()> follow_compute() { return {}; }

  // ---- device memory (engines with GPU collectives: NCCL) ---------------------------------------------------
  // Whether the primitives above accept device (GPU) pointers as well as host ones. Host engines (MPI, self) do
  // not: a caller with device tensors (the expert exchange of GPU ranks, dist::allgather_rows) checks this first.
  virtual bool moves_device_memory() const { return false; }
  // Each piece ← its sum over the ranks, in place, bitwise the same on every rank (the fold of allreduce_sum),
  // packed into buckets of `bucket_bytes` on the device. Host engines have no device collectives.
  virtual void allreduce_sum_device(std::span<const DeviceFloats> pieces, std::int64_t bucket_bytes) {
    (void)bucket_bytes;
    CUMO_CHECK(size() == 1 || pieces.empty(), "Communicator (", engine(), "): gradients in GPU memory need a "
               "communicator with device collectives (NCCL: dist/nccl.cuh); this one moves host memory only");
  }

 protected:
  // ---- scattered pieces (alltoallv_pieces of every engine) -------------------------------------------------
  // The bytes each rank's list of pieces holds (alltoallv_pieces' counts).
  static std::vector<std::int64_t> piece_bytes(std::span<const std::vector<Segment>> pieces) {
    std::vector<std::int64_t> bytes(pieces.size(), 0);
    for (std::size_t q = 0; q < pieces.size(); ++q)
      for (const Segment& p : pieces[q]) bytes[q] += p.bytes;
    return bytes;
  }
  // Packs the pieces of `base` (rank by rank, each list in order) into the contiguous `run`; copy(dst, src, bytes)
  // moves one piece (memcpy on the host, a device-to-device copy on a GPU stream).
  template <class Copy>
  static void pack_pieces(char* run, const char* base, std::span<const std::vector<Segment>> pieces, Copy&& copy) {
    std::int64_t at = 0;
    for (const std::vector<Segment>& list : pieces)
      for (const Segment& p : list) {
        if (p.bytes > 0) copy(run + at, base + p.offset, p.bytes);
        at += p.bytes;
      }
  }
  // The reverse: the contiguous `run` back into the pieces of `base`.
  template <class Copy>
  static void unpack_pieces(char* base, const char* run, std::span<const std::vector<Segment>> pieces, Copy&& copy) {
    std::int64_t at = 0;
    for (const std::vector<Segment>& list : pieces)
      for (const Segment& p : list) {
        if (p.bytes > 0) copy(base + p.offset, run + at, p.bytes);
        at += p.bytes;
      }
  }
};

// The world of one process.
class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string_view engine() const override { return "self"; }
  void alltoallv(const void* send, std::span<const std::int64_t> send_bytes, void* recv,
                 std::span<const std::int64_t> recv_bytes) override {
    CUMO_CHECK(send_bytes.size() == 1 && recv_bytes.size() == 1 && send_bytes[0] == recv_bytes[0],
               "SelfCommunicator::alltoallv: sends ", send_bytes.size() ? send_bytes[0] : -1, " bytes but receives ",
               recv_bytes.size() ? recv_bytes[0] : -1);
    if (send_bytes[0] > 0 && send != recv) std::memmove(recv, send, std::size_t(send_bytes[0]));
  }
  void allgatherv(const void* send, std::int64_t bytes, void* recv, std::span<const std::int64_t> recv_bytes) override {
    CUMO_CHECK(recv_bytes.size() == 1 && recv_bytes[0] == bytes, "SelfCommunicator::allgatherv: sends ", bytes,
               " bytes but receives ", recv_bytes.size() ? recv_bytes[0] : -1);
    if (bytes > 0 && send != recv) std::memmove(recv, send, std::size_t(bytes));
  }
  void broadcast(void*, std::int64_t, int root) override {
    CUMO_CHECK(root == 0, "SelfCommunicator::broadcast: root ", root, " in a world of one");
  }
  void allreduce(std::span<std::int64_t>, ReduceOp) override {}
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) const override { return std::make_unique<SelfCommunicator>(); }
  bool allows_background_thread() const override { return true; }
  bool allows_concurrent_threads() const override { return true; }
  [[noreturn]] void abort(int code) override { std::exit(code); }
};

// The byte counts of the deterministic sum's two exchanges for n elements of `elem` bytes over N ranks: rank q
// reduces chunk q (shard_of(n, q, N)); `send` is what this rank sends each rank (its chunk q) and is also what the
// all-gather brings back from each; `recv` what it receives from each (N copies of its own chunk, in rank order).
// Every engine's sum (allreduce_sum here, the device buckets of dist/nccl.cuh) uses these.
struct FoldCounts {
  Shard mine;                       // this rank's chunk
  std::vector<std::int64_t> send;  // (N,) bytes of chunk q, to rank q (and from rank q in the all-gather)
  std::vector<std::int64_t> recv;  // (N,) bytes of this rank's chunk, from every rank
};
inline FoldCounts fold_counts(std::int64_t n, int rank, int N, std::int64_t elem) {
  FoldCounts c{shard_of(n, rank, N), std::vector<std::int64_t>(std::size_t(N)), std::vector<std::int64_t>(std::size_t(N))};
  for (int q = 0; q < N; ++q) {
    c.send[std::size_t(q)] = shard_of(n, q, N).size() * elem;
    c.recv[std::size_t(q)] = c.mine.size() * elem;
  }
  return c;
}

// In place: x ← Σ_ranks x, bitwise the same on every rank and in a fixed order (the left fold over ranks),
// whatever the engine. float, double or int64.
template <class T>
void allreduce_sum(Communicator& comm, std::span<T> x) {
  static_assert(std::is_arithmetic_v<T>, "allreduce_sum: T must be an arithmetic type");
  const int N = comm.size();
  if (N == 1 || x.empty()) return;
  // chunk q (rank q's to reduce) of every rank → rank q: N copies of one chunk, in rank order
  const FoldCounts c = fold_counts(std::int64_t(x.size()), comm.rank(), N, std::int64_t(sizeof(T)));
  const std::int64_t m = c.mine.size();
  std::vector<T> copies(std::size_t(m * N));  // (N, chunk)
  comm.alltoallv(x.data(), c.send, copies.data(), c.recv);
  std::vector<T> sum(copies.begin(), copies.begin() + m);  // rank 0's, then + rank 1's, …
  for (int q = 1; q < N; ++q)
    for (std::int64_t i = 0; i < m; ++i) sum[std::size_t(i)] += copies[std::size_t(q * m + i)];
  comm.allgatherv(sum.data(), m * std::int64_t(sizeof(T)), x.data(), c.send);
}

inline std::int64_t allreduce_one(Communicator& comm, std::int64_t v, ReduceOp op) {
  comm.allreduce(std::span<std::int64_t>(&v, 1), op);
  return v;
}

// True on every rank when `flag` is true on any.
inline bool any(Communicator& comm, bool flag) {
  return comm.size() > 1 ? allreduce_one(comm, flag ? 1 : 0, ReduceOp::max) != 0 : flag;
}

// Every rank calls it after a step that can fail on some ranks only (one rank writes a directory, reads a file):
// `error` empty = this rank succeeded. When any rank failed, every rank throws the lowest failing rank's message.
inline void agree(Communicator& comm, const std::string& error) {
  if (comm.size() == 1) {
    if (!error.empty()) throw Error(error);
    return;
  }
  const std::int64_t first = allreduce_one(comm, error.empty() ? comm.size() : comm.rank(), ReduceOp::min);
  if (first == comm.size()) return;
  std::int64_t len = comm.rank() == first ? std::int64_t(error.size()) : 0;
  comm.broadcast(&len, sizeof len, int(first));
  std::string msg(std::size_t(len), '\0');
  if (comm.rank() == first) msg = error;
  comm.broadcast(msg.data(), len, int(first));
  throw AgreedError(first == comm.rank() ? msg : detail::concat("rank ", first, ": ", msg));
}

// Runs f() on every rank and agrees on its outcome (an exception on one rank becomes the same error on all).
template <class F>
void agree_on(Communicator& comm, F&& f) {
  std::string error;
  try {
    f();
  } catch (const CommError&) {
    throw;
  } catch (const AgreedError&) {
    throw;  // agreed already, by a collective inside f
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  }
  agree(comm, error);
}

// FNV-1a over the bytes of a value the ranks must share.
inline std::uint64_t fingerprint(std::string_view s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Every rank must hold the same `value` (`what` names it: "the run configuration"); otherwise every rank throws
// the same error, naming the ranks that differ from rank 0.
inline void check_same(Communicator& comm, std::string_view what, std::string_view value) {
  if (comm.size() == 1) return;
  const auto h = std::int64_t(fingerprint(value) & 0x7fffffffffffffffull);
  std::vector<std::int64_t> all(std::size_t(comm.size()));
  const std::vector<std::int64_t> eight(std::size_t(comm.size()), std::int64_t(sizeof h));
  comm.allgatherv(&h, sizeof h, all.data(), eight);
  std::string differ;
  for (int q = 1; q < comm.size(); ++q)
    if (all[std::size_t(q)] != all[0]) differ += (differ.empty() ? "" : ", ") + std::to_string(q);
  if (!differ.empty())
    throw AgreedError(detail::concat("the ranks disagree on ", what, ": rank(s) ", differ, " differ from rank 0 (every "
                                     "rank must be started with the same arguments, configuration and files)"));
}

}  // namespace cumo::dist
