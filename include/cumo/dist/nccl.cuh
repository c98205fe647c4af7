#pragma once
// dist::NcclCommunicator: the Communicator on NCCL, for ranks that are GPUs (one GPU per rank, the CUDA device that
// is current when it is made). It serves both kinds of traffic a GPU data-parallel run has:
//   - the gradient sum on device memory (allreduce_sum_device: buckets packed on the GPU, the same fold over ranks
//     as allreduce_sum, so the sum is bitwise the same on every rank, and the same as CPU ranks' sum of the same
//     numbers);
//   - the small control collectives (configs, flags, metrics, agree / check_same) on host memory, staged through a
//     device buffer: every primitive accepts host or device pointers (cudaPointerGetAttributes tells them apart).
//
// Started either from a host communicator (MPI under mpirun: rank 0 makes the ncclUniqueId and broadcasts it) or
// from a file rendezvous (rank 0 writes the id to a fresh file atomically, the others poll for it): no MPI needed.
//
// Faults: the communicator is NCCL's non-blocking kind (config.blocking = 0). Every call returns at once, and the
// wait polls ncclCommGetAsyncError and the stream until a deadline (CUMO_COMM_TIMEOUT, default 600 s); past it,
// or on an asynchronous error, ncclCommAbort and dist::CommError — a peer that died or hangs becomes an error on the
// others within the timeout, as with MpiCommunicator.
//
// Needs <nccl.h> and libnccl (the CUDA toolkit's; the build defines CUMO_WITH_NCCL=1 and links the cumo::nccl
// target when it found them). UNVERIFIED: written and compiled against NCCL 2.28 without a GPU; see
// docs/distributed.md for what has run where.
#if !defined(__CUDACC__)
#error "cumo/dist/nccl.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/dist/communicator.hpp"
#include "cumo/dist/world.hpp"

namespace cumo::dist {

namespace detail {

// out[i] = copies[0][i] + copies[1][i] + … + copies[N−1][i]: the left fold over ranks of allreduce_sum, on the GPU.
template <class T>
__global__ void fold_over_ranks(const T* __restrict__ copies, std::int64_t n, int ranks, T* __restrict__ out) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    T s = copies[i];
    for (int q = 1; q < ranks; ++q) s += copies[std::int64_t(q) * n + i];
    out[i] = s;
  }
}

inline bool is_device_pointer(const void* p) {
  if (!p) return false;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // an unregistered host pointer on old runtimes: not sticky
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

inline std::string nccl_error(ncclResult_t r, ncclComm_t comm) {
  std::string msg = ncclGetErrorString(r);
  if (comm)
    if (const char* last = ncclGetLastError(comm); last && *last) msg += std::string(" (") + last + ")";
  return msg;
}

}  // namespace detail

class NcclCommunicator final : public Communicator {
 public:
  // Every rank of `bootstrap` calls it. The job ends through bootstrap.abort() when a collective fails.
  explicit NcclCommunicator(Communicator& bootstrap, double timeout_s = comm_timeout_from_env())
      : rank_(bootstrap.rank()), size_(bootstrap.size()), timeout_s_(timeout_s), bootstrap_(&bootstrap) {
    ncclUniqueId id{};
    std::string error;
    if (rank_ == 0) {
      const ncclResult_t r = ncclGetUniqueId(&id);
      if (r != ncclSuccess) error = "ncclGetUniqueId failed: " + std::string(ncclGetErrorString(r));
    }
    agree(bootstrap, error);
    bootstrap.broadcast(&id, sizeof id, 0);
    init(id);
  }

  // File rendezvous, for jobs started without MPI: `rank` of `size` processes, each on its own GPU, name the same
  // path on a file system they share. Rank 0 writes the id there (atomically: a temporary file and a rename) and
  // refuses a path that exists already — a stale id from an earlier job would send the others to the wrong
  // communicator; use a fresh path per job. The others poll for the file until the timeout. abort() ends only this
  // process; the others end at their next collective's timeout.
  static std::unique_ptr<NcclCommunicator> rendezvous_file(const std::string& path, int rank, int size,
                                                           double timeout_s = comm_timeout_from_env()) {
    CUMO_CHECK(size >= 1 && rank >= 0 && rank < size, "NcclCommunicator::rendezvous_file: rank ", rank, " of ", size);
    namespace fs = std::filesystem;
    ncclUniqueId id{};
    if (rank == 0) {
      CUMO_CHECK(!fs::exists(path), "NcclCommunicator::rendezvous_file: '", path, "' exists already (an earlier "
                 "job's?); delete it or name a fresh path for this job");
      const ncclResult_t r = ncclGetUniqueId(&id);
      CUMO_CHECK(r == ncclSuccess, "ncclGetUniqueId failed: ", ncclGetErrorString(r));
      const std::string tmp = path + ".tmp." + std::to_string(::getpid());
      {
        std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
        f.write(reinterpret_cast<const char*>(&id), sizeof id);
        CUMO_CHECK(f.good(), "NcclCommunicator::rendezvous_file: cannot write '", tmp, "'");
      }
      fs::rename(tmp, path);
    } else {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
      for (;;) {
        std::error_code ec;
        if (fs::exists(path, ec) && fs::file_size(path, ec) == sizeof id) {
          std::ifstream f(path, std::ios::binary);
          f.read(reinterpret_cast<char*>(&id), sizeof id);
          if (f.gcount() == std::streamsize(sizeof id)) break;
        }
        if (std::chrono::steady_clock::now() > deadline)
          throw CommError(cumo::detail::concat("NcclCommunicator::rendezvous_file: rank ", rank, ": no id at '", path,
                                               "' after ", timeout_s, " s (did rank 0 start?)"));
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(id, rank, size, timeout_s, nullptr));
  }

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  ~NcclCommunicator() override {
    // A non-blocking communicator finalizes asynchronously: poll it (bounded) before freeing it. After a failure the
    // handle was aborted already.
    if (comm_ && !broken_ && ncclCommFinalize(comm_) == ncclInProgress) {
      const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s_);
      ncclResult_t st = ncclInProgress;
      while (st == ncclInProgress && clock::now() < deadline) {
        std::this_thread::yield();
        if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess) break;
      }
    }
    if (comm_ && !broken_) ncclCommDestroy(comm_);
    for (void* p : {scratch_[0], scratch_[1], scratch_[2]})
      if (p) cudaFree(p);
    if (own_stream_) cudaStreamDestroy(own_stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view engine() const override { return "nccl"; }
  bool moves_device_memory() const override { return true; }
  double timeout_s() const { return timeout_s_; }
  ncclComm_t handle() const { return comm_; }
  // The collectives run on the backend's stream: they follow the kernels that produced their inputs. A background
  // duplicate (background()) has a stream of its own instead, ordered after the compute stream by follow_compute.
  cudaStream_t stream() const { return own_stream_ ? own_stream_ : gpu::context().stream(); }

  // ---- a background thread (dist::OverlappedGradientSum) ---------------------------------------------------
  // A second thread may issue this communicator's collectives while the computing thread queues kernels, as long as
  // no other thread issues NCCL calls meanwhile: NCCL forbids issuing operations to two communicators of one GPU
  // from two threads at once (its thread-safety notes; their kernels may wait for each other in different orders
  // on different ranks and deadlock). Hence allows_concurrent_threads() is false: no overlap with the expert
  // exchanges of the backward.
  bool allows_background_thread() const override { return true; }
  bool allows_concurrent_threads() const override { return false; }
  // A duplicate (every rank calls it) whose collectives run on a CUDA stream of its own (non-blocking: no implicit
  // order with the legacy default stream; the device's highest priority, so its copies and folds are scheduled
  // ahead of the backward's kernels), so the gradient sum proceeds beside the backward's kernels. Its device
  // memory inputs are ordered after the compute stream only through follow_compute (allreduce_sum_device, as
  // OverlappedGradientSum uses it); its other primitives are not ordered with the compute stream.
  std::unique_ptr<Communicator> background() const override {
    std::unique_ptr<NcclCommunicator> dup = split_nccl(0, rank_);
    bind_device();
    int least = 0, greatest = 0;
    CUMO_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CUMO_CUDA_CHECK(cudaStreamCreateWithPriority(&dup->own_stream_, cudaStreamNonBlocking, greatest));
    return dup;
  }
  // Called on the computing thread: an event after the kernels queued on the compute stream so far, which the
  // returned callable (run on the thread that issues this communicator's next collectives) makes its own stream
  // wait for. No host wait. A communicator on the compute stream itself needs none.
  std::function<void()> follow_compute() override {
    if (!own_stream_) return {};
    int current = -1;
    CUMO_CUDA_CHECK(cudaGetDevice(&current));
    CUMO_CHECK(current == device_, "NcclCommunicator::follow_compute: called on a thread whose current GPU is ",
               current, ", but the communicator and the compute stream are on GPU ", device_);
    cudaEvent_t raw = nullptr;
    CUMO_CUDA_CHECK(cudaEventCreateWithFlags(&raw, cudaEventDisableTiming));
    // destroyed when the last copy of the callable goes (CUDA releases a pending event once it completes)
    std::shared_ptr<std::remove_pointer_t<cudaEvent_t>> event(raw, [](cudaEvent_t e) { cudaEventDestroy(e); });
    CUMO_CUDA_CHECK(cudaEventRecord(raw, gpu::context().stream()));
    return [this, event] {
      bind_device();  // the calling thread's current device is its own (CUDA's is per thread)
      CUMO_CUDA_CHECK(cudaStreamWaitEvent(own_stream_, event.get(), 0));
    };
  }

  // ---- primitives: host or device memory ----------------------------------------------------------------------
  void alltoallv(const void* send, std::span<const std::int64_t> send_bytes, void* recv,
                 std::span<const std::int64_t> recv_bytes) override {
    check_counts("alltoallv", send_bytes);
    check_counts("alltoallv", recv_bytes);
    const std::int64_t sent = total(send_bytes), received = total(recv_bytes);
    const void* dsend = to_device(send, sent, 0);
    void* drecv = device_target(recv, received, 1);
    device_alltoallv(static_cast<const char*>(dsend), send_bytes, static_cast<char*>(drecv), recv_bytes);
    from_device(recv, drecv, received);
  }
  // Scattered pieces. Host memory: the base class stages them. Device memory (the expert exchange of GPU ranks): the
  // two sides' pieces need not line up, which NCCL's pairwise send/recv cannot express, so they are packed into one
  // contiguous run per rank on the GPU (device-to-device copies on the stream), exchanged by one alltoallv, and
  // unpacked into place: two extra passes over the bytes at HBM speed, against an exchange at link speed.
  void alltoallv_pieces(const void* send, std::span<const std::vector<Segment>> send_pieces, void* recv,
                        std::span<const std::vector<Segment>> recv_pieces) override {
    const auto ranks = std::size_t(size_);
    CUMO_CHECK(send_pieces.size() == ranks && recv_pieces.size() == ranks, "NcclCommunicator::alltoallv_pieces: ",
               send_pieces.size(), " send and ", recv_pieces.size(), " receive lists for ", ranks, " ranks");
    const std::vector<std::int64_t> send_bytes = piece_bytes(send_pieces),
                                    recv_bytes = piece_bytes(recv_pieces);
    const std::int64_t sent = total(send_bytes), received = total(recv_bytes);
    // Only a side that moves bytes says where its buffer is: an empty one (a rank with no rows to send, or none to
    // receive) may be a null pointer, which is no device pointer. Every path below ends in the same single
    // device_alltoallv, so ranks that take different paths still make matching NCCL calls.
    const bool dsend = sent > 0 && detail::is_device_pointer(send);
    const bool drecv = received > 0 && detail::is_device_pointer(recv);
    if (!dsend && !drecv) return Communicator::alltoallv_pieces(send, send_pieces, recv, recv_pieces);
    CUMO_CHECK((sent == 0 || dsend) && (received == 0 || drecv), "NcclCommunicator::alltoallv_pieces: the send "
               "buffer is in ", dsend ? "device" : "host", " memory but the receive buffer in ",
               drecv ? "device" : "host", " memory (both must be on the same side)");
    char* packed = static_cast<char*>(scratch(0, sent));
    char* unpacked = static_cast<char*>(scratch(1, received));
    const auto device_copy = [this](char* dst, const char* src, std::int64_t bytes) {
      copy(dst, src, bytes, cudaMemcpyDeviceToDevice);
    };
    pack_pieces(packed, static_cast<const char*>(send), send_pieces, device_copy);
    device_alltoallv(packed, send_bytes, unpacked, recv_bytes);
    unpack_pieces(static_cast<char*>(recv), unpacked, recv_pieces, device_copy);
    // (no wait: the unpacking copies are ordered on the stream before any later use of the scratch buffers or of
    // `recv`; device_alltoallv already waited for the exchange, so a dead peer was caught there)
  }
  void allgatherv(const void* send, std::int64_t bytes, void* recv, std::span<const std::int64_t> recv_bytes) override {
    check_counts("allgatherv", recv_bytes);
    CUMO_CHECK(recv_bytes[std::size_t(rank_)] == bytes, "NcclCommunicator::allgatherv: rank ", rank_, " sends ",
               bytes, " bytes but its own slot holds ", recv_bytes[std::size_t(rank_)]);
    const std::int64_t received = total(recv_bytes);
    const void* dsend = to_device(send, bytes, 0);
    void* drecv = device_target(recv, received, 1);
    device_allgatherv(static_cast<const char*>(dsend), bytes, static_cast<char*>(drecv), recv_bytes);
    from_device(recv, drecv, received);
  }
  void broadcast(void* data, std::int64_t bytes, int root) override {
    CUMO_CHECK(root >= 0 && root < size_, "NcclCommunicator::broadcast: root ", root, " of ", size_, " ranks");
    if (bytes <= 0) return;
    void* d = device_target(data, bytes, 0);
    if (d != data && rank_ == root) copy(d, data, bytes, cudaMemcpyHostToDevice);
    issue("ncclBroadcast", ncclBroadcast(d, d, std::size_t(bytes), ncclUint8, root, comm_, stream()));
    wait("broadcast");
    from_device(data, d, bytes);
  }
  void allreduce(std::span<std::int64_t> values, ReduceOp op) override {
    if (values.empty()) return;
    const auto bytes = std::int64_t(values.size_bytes());
    void* d = to_device(values.data(), bytes, 0);
    const ncclRedOp_t nop = op == ReduceOp::sum ? ncclSum : op == ReduceOp::min ? ncclMin : ncclMax;
    issue("ncclAllReduce", ncclAllReduce(d, d, values.size(), ncclInt64, nop, comm_, stream()));
    wait("allreduce");
    from_device(values.data(), d, bytes);
  }
  void barrier() override {
    std::int64_t one = 0;
    allreduce(std::span<std::int64_t>(&one, 1), ReduceOp::sum);
  }
  std::unique_ptr<Communicator> split(int colour, int key) const override { return split_nccl(colour, key); }
  [[noreturn]] void abort(int code) override {
    if (comm_ && !broken_) {
      broken_ = true;
      ncclCommAbort(comm_);
    }
    if (bootstrap_) bootstrap_->abort(code);
    std::fflush(nullptr);
    std::_Exit(code);
  }

  // ---- device memory ------------------------------------------------------------------------------------------
  // In place over pieces of device memory (gradients): each piece ← Σ over ranks, bitwise the same on every rank.
  // The pieces are packed in order into buckets of `bucket_bytes` on the GPU; each bucket is summed as
  // allreduce_sum sums a host array (chunk q of every rank → rank q, the left fold over ranks, an all-gather).
  void allreduce_sum_device(std::span<const DeviceFloats> pieces, std::int64_t bucket_bytes) override {
    CUMO_CHECK(bucket_bytes >= std::int64_t(sizeof(float)), "NcclCommunicator::allreduce_sum_device: bucket of ",
               bucket_bytes, " bytes");
    bind_device();
    const std::int64_t cap = bucket_bytes / std::int64_t(sizeof(float));
    float* bucket = static_cast<float*>(scratch(2, cap * std::int64_t(sizeof(float))));
    std::int64_t filled = 0;
    std::vector<DeviceFloats> back;  // where the bucket's values go
    auto flush = [&] {
      if (filled == 0) return;
      sum_in_place(bucket, filled);
      std::int64_t off = 0;
      for (const DeviceFloats& p : back) {
        copy(p.data, bucket + off, p.n * std::int64_t(sizeof(float)), cudaMemcpyDeviceToDevice);
        off += p.n;
      }
      filled = 0;
      back.clear();
    };
    for (const DeviceFloats& p : pieces) {
      CUMO_CHECK(p.n == 0 || detail::is_device_pointer(p.data), "NcclCommunicator::allreduce_sum_device: a piece of ",
                 p.n, " floats is not in device memory");
      for (std::int64_t done = 0; done < p.n;) {
        const std::int64_t take = std::min(p.n - done, cap - filled);
        copy(bucket + filled, p.data + done, take * std::int64_t(sizeof(float)), cudaMemcpyDeviceToDevice);
        back.push_back({p.data + done, take});
        filled += take;
        done += take;
        if (filled == cap) flush();
      }
    }
    flush();
    sync("allreduce_sum_device");
  }

 private:
  NcclCommunicator(ncclUniqueId id, int rank, int size, double timeout_s, Communicator* bootstrap)
      : rank_(rank), size_(size), timeout_s_(timeout_s), bootstrap_(bootstrap) {
    init(id);
  }
  NcclCommunicator(ncclComm_t comm, int rank, int size, double timeout_s, Communicator* bootstrap)
      : comm_(comm), rank_(rank), size_(size), timeout_s_(timeout_s), bootstrap_(bootstrap) {
    CUMO_CUDA_CHECK(cudaGetDevice(&device_));
  }

  std::unique_ptr<NcclCommunicator> split_nccl(int colour, int key) const {
    CUMO_CHECK(colour >= 0, "NcclCommunicator::split: colour ", colour, " (every rank must join a group)");
    bind_device();
    ncclConfig_t c = config();
    ncclComm_t sub = nullptr;
    issue("ncclCommSplit", ncclCommSplit(comm_, colour, key, &sub, &c));
    settle("ncclCommSplit", sub);
    int r = 0, n = 0;
    ncclCommUserRank(sub, &r);
    ncclCommCount(sub, &n);
    return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(sub, r, n, timeout_s_, bootstrap_));
  }
  // The GPU this communicator was made on becomes the calling thread's current device (a background thread starts
  // on device 0).
  void bind_device() const {
    int current = -1;
    CUMO_CUDA_CHECK(cudaGetDevice(&current));
    if (current != device_) CUMO_CUDA_CHECK(cudaSetDevice(device_));
  }

  static ncclConfig_t config() {
    ncclConfig_t c = NCCL_CONFIG_INITIALIZER;
    c.blocking = 0;  // every call returns at once; wait()/settle() bound the time
    return c;
  }
  void init(const ncclUniqueId& id) {
    CUMO_CHECK(timeout_s_ > 0, "NcclCommunicator: timeout must be > 0 s, got ", timeout_s_);
    (void)gpu::context();  // the stream and device of this process, before NCCL binds to the current device
    CUMO_CUDA_CHECK(cudaGetDevice(&device_));
    ncclConfig_t c = config();
    issue("ncclCommInitRankConfig", ncclCommInitRankConfig(&comm_, size_, id, rank_, &c));
    settle("ncclCommInitRankConfig", comm_);
  }

  // A non-blocking call returned: ncclInProgress means "still running", polled to completion before the deadline.
  void issue(const char* what, ncclResult_t r) const {
    if (r == ncclSuccess || r == ncclInProgress) return;
    fail(cumo::detail::concat("NcclCommunicator: ", what, " failed on rank ", rank_, ": ",
                              detail::nccl_error(r, comm_)));
  }
  void settle(const char* what, ncclComm_t c) const {
    const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s_);
    for (;;) {
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(c, &st);
      if (st == ncclSuccess) return;
      if (st != ncclInProgress)
        fail(cumo::detail::concat("NcclCommunicator: ", what, " failed on rank ", rank_, ": ",
                                  detail::nccl_error(st, c)));
      if (clock::now() > deadline)
        fail(cumo::detail::concat("NcclCommunicator: ", what, " did not complete within ", timeout_s_,
                                  " s on rank ", rank_, " (another rank died or hangs)"));
      std::this_thread::yield();
    }
  }
  // The stream reaches the end of the collectives issued so far, or the deadline / an asynchronous NCCL error ends
  // the communicator.
  void wait(const char* what) {
    settle(what, comm_);
    sync(what);
  }
  void sync(const char* what) {
    const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s_);
    for (;;) {
      const cudaError_t e = cudaStreamQuery(stream());
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady)
        fail(cumo::detail::concat("NcclCommunicator: ", what, " on rank ", rank_, ": ", cudaGetErrorString(e)));
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &st);
      if (st != ncclSuccess && st != ncclInProgress)
        fail(cumo::detail::concat("NcclCommunicator: ", what, " failed on rank ", rank_, ": ",
                                  detail::nccl_error(st, comm_)));
      if (clock::now() > deadline)
        fail(cumo::detail::concat("NcclCommunicator: ", what, " did not complete within ", timeout_s_,
                                  " s on rank ", rank_, " (another rank died or hangs)"));
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  [[noreturn]] void fail(const std::string& msg) const {
    if (comm_ && !broken_) {
      broken_ = true;
      ncclCommAbort(comm_);  // frees the kernels that wait for a peer that will never come
    }
    throw CommError(msg);
  }

  // Group of sends and receives: rank r's piece for q goes to q; its own piece is a device copy.
  void device_alltoallv(const char* send, std::span<const std::int64_t> send_bytes, char* recv,
                        std::span<const std::int64_t> recv_bytes) {
    const auto me = std::size_t(rank_);
    CUMO_CHECK(send_bytes[me] == recv_bytes[me], "NcclCommunicator::alltoallv: rank ", rank_, " sends itself ",
               send_bytes[me], " bytes but receives ", recv_bytes[me]);
    std::int64_t so = 0, ro = 0;
    issue("ncclGroupStart", ncclGroupStart());
    for (int q = 0; q < size_; ++q) {
      const std::int64_t s = send_bytes[std::size_t(q)], r = recv_bytes[std::size_t(q)];
      if (q == rank_) {
        if (s > 0) copy(recv + ro, send + so, s, cudaMemcpyDeviceToDevice);
      } else {
        if (s > 0) issue("ncclSend", ncclSend(send + so, std::size_t(s), ncclUint8, q, comm_, stream()));
        if (r > 0) issue("ncclRecv", ncclRecv(recv + ro, std::size_t(r), ncclUint8, q, comm_, stream()));
      }
      so += s;
      ro += r;
    }
    issue("ncclGroupEnd", ncclGroupEnd());
    wait("alltoallv");
  }
  void device_allgatherv(const char* send, std::int64_t bytes, char* recv, std::span<const std::int64_t> recv_bytes) {
    std::int64_t ro = 0;
    issue("ncclGroupStart", ncclGroupStart());
    for (int q = 0; q < size_; ++q) {
      const std::int64_t r = recv_bytes[std::size_t(q)];
      if (q == rank_) {
        if (bytes > 0) copy(recv + ro, send, bytes, cudaMemcpyDeviceToDevice);
      } else {
        if (bytes > 0) issue("ncclSend", ncclSend(send, std::size_t(bytes), ncclUint8, q, comm_, stream()));
        if (r > 0) issue("ncclRecv", ncclRecv(recv + ro, std::size_t(r), ncclUint8, q, comm_, stream()));
      }
      ro += r;
    }
    issue("ncclGroupEnd", ncclGroupEnd());
    wait("allgatherv");
  }
  // x (n floats, device) ← Σ over ranks: chunk q of every rank to rank q, the fold in rank order, an all-gather.
  void sum_in_place(float* x, std::int64_t n) {
    const FoldCounts c = fold_counts(n, rank_, size_, std::int64_t(sizeof(float)));
    const std::int64_t m = c.mine.size();
    auto* copies = static_cast<float*>(scratch(0, m * size_ * std::int64_t(sizeof(float))));  // (N, chunk)
    auto* sum = static_cast<float*>(scratch(1, m * std::int64_t(sizeof(float))));            // (chunk,)
    device_alltoallv(reinterpret_cast<const char*>(x), c.send, reinterpret_cast<char*>(copies), c.recv);
    if (m > 0) {
      const int threads = 256;
      const auto blocks = unsigned(std::min<std::int64_t>((m + threads - 1) / threads, 4096));
      detail::fold_over_ranks<float><<<blocks, threads, 0, stream()>>>(copies, m, size_, sum);
      CUMO_CUDA_CHECK(cudaGetLastError());
    }
    device_allgatherv(reinterpret_cast<const char*>(sum), m * std::int64_t(sizeof(float)), reinterpret_cast<char*>(x),
                      c.send);
  }

  // ---- staging: host pointers go through device scratch buffers -------------------------------------------
  void* scratch(int slot, std::int64_t bytes) {
    auto& cap = scratch_bytes_[slot];
    if (bytes > cap) {
      sync("scratch");  // nothing in flight still reads the old buffer
      if (scratch_[slot]) CUMO_CUDA_CHECK(cudaFree(scratch_[slot]));
      scratch_[slot] = nullptr;
      cap = std::max<std::int64_t>(bytes, std::int64_t(1) << 16);
      CUMO_CUDA_CHECK(cudaMalloc(&scratch_[slot], std::size_t(cap)));
    }
    return scratch_[slot];
  }
  const void* to_device(const void* p, std::int64_t bytes, int slot) {
    if (bytes <= 0 || detail::is_device_pointer(p)) return p;
    void* d = scratch(slot, bytes);
    copy(d, p, bytes, cudaMemcpyHostToDevice);
    return d;
  }
  void* to_device(void* p, std::int64_t bytes, int slot) {
    return const_cast<void*>(to_device(static_cast<const void*>(p), bytes, slot));
  }
  void* device_target(void* p, std::int64_t bytes, int slot) {
    return bytes <= 0 || detail::is_device_pointer(p) ? p : scratch(slot, bytes);
  }
  void from_device(void* host, const void* d, std::int64_t bytes) {
    if (bytes <= 0 || host == d) return;
    copy(host, d, bytes, cudaMemcpyDeviceToHost);
    sync("copy to the host");
  }
  void copy(void* dst, const void* src, std::int64_t bytes, cudaMemcpyKind kind) {
    CUMO_CUDA_CHECK(cudaMemcpyAsync(dst, src, std::size_t(bytes), kind, stream()));
  }

  void check_counts(const char* what, std::span<const std::int64_t> counts) const {
    CUMO_CHECK(counts.size() == std::size_t(size_), "NcclCommunicator::", what, ": ", counts.size(),
               " counts for ", size_, " ranks");
  }
  static std::int64_t total(std::span<const std::int64_t> counts) {
    std::int64_t t = 0;
    for (const std::int64_t c : counts) {
      CUMO_CHECK(c >= 0, "NcclCommunicator: negative byte count ", c);
      t += c;
    }
    return t;
  }

  using clock = std::chrono::steady_clock;
  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1;
  double timeout_s_ = 600;
  Communicator* bootstrap_ = nullptr;  // the job's host communicator (abort ends every rank through it), or null
  mutable bool broken_ = false;  // aborted after a failure (also from const paths: split)
  int device_ = 0;               // the GPU it was made on
  cudaStream_t own_stream_ = nullptr;  // a background duplicate's stream (else the backend's)
  void* scratch_[3] = {nullptr, nullptr, nullptr};  // send / receive staging (and the fold's copies, sum), bucket
  std::int64_t scratch_bytes_[3] = {0, 0, 0};
};

// The rank's GPU on a node: the launcher's local rank (OpenMPI, MPICH/Hydra, Slurm, torchrun-style LOCAL_RANK),
// else the global rank, modulo the visible devices (a scheduler that gives each rank its own CUDA_VISIBLE_DEVICES
// leaves one: device 0).
inline int local_device_for(int rank, int devices) {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"})
    if (const char* s = std::getenv(v)) return std::atoi(s) % std::max(devices, 1);
  return rank % std::max(devices, 1);
}

// Makes this process's GPU (local_device_for(rank, visible devices)) current and returns its index (and, when asked,
// how many are visible); an error names it.
inline int use_local_gpu(int rank, int* visible = nullptr) {
  int devices = 0;
  CUMO_CUDA_CHECK(cudaGetDeviceCount(&devices));
  if (visible) *visible = devices;
  const int device = local_device_for(rank, devices);
  CUMO_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

// Every rank of `world` calls it: picks this rank's GPU (local_device_for) and makes it current, then checks over
// the ranks that no two of them picked the same physical GPU (by UUID; NCCL cannot run two ranks on one GPU).
// Returns "" when this rank has a GPU of its own, else why not (no device, or the ranks it would share one with);
// the caller agrees on the outcome.
inline std::string claim_gpu(Communicator& world) {
  std::string why;
  int devices = 0;
  std::array<unsigned char, 16> uuid{};  // zero: no GPU
  if (!gpu::device_available(&why)) {
    why = "no CUDA device is available (" + why + ")";
  } else {
    try {
      const int device = use_local_gpu(world.rank(), &devices);
      cudaDeviceProp prop{};
      CUMO_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
      std::memcpy(uuid.data(), &prop.uuid, uuid.size());
    } catch (const std::exception& e) {
      why = e.what();
    }
  }
  const auto N = std::size_t(world.size());
  std::vector<unsigned char> all(16 * N);
  world.allgatherv(uuid.data(), 16, all.data(), std::vector<std::int64_t>(N, 16));
  if (!why.empty()) return why;
  std::string shared;
  for (std::size_t q = 0; q < N; ++q)
    if (int(q) != world.rank() && std::memcmp(all.data() + 16 * q, uuid.data(), 16) == 0)
      shared += (shared.empty() ? "" : ", ") + std::to_string(q);
  if (!shared.empty())
    why = "rank " + std::to_string(world.rank()) + " shares its GPU with rank(s) " + shared + " (" +
          std::to_string(devices) + " visible on its node): one GPU per rank — launch fewer ranks per node or give "
          "each its own CUDA_VISIBLE_DEVICES";
  return why;
}

}  // namespace cumo::dist
