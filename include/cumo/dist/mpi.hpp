#pragma once
// dist::MpiCommunicator: the Communicator on MPI (OpenMPI from Debian here), for ranks on CPUs. Every collective is
// MPI's non-blocking form followed by a wait that polls until a deadline, so a rank that died or hangs turns into
// a dist::CommError on the others within the timeout instead of a job that never ends (MPI's blocking calls
// cannot time out). Errors come back as codes (MPI_ERRORS_RETURN), never as MPI's own abort.
//
// Needs <mpi.h> and the MPI library: the build defines CUMO_WITH_MPI=1 and links MPI::MPI_CXX (the cumo::mpi
// target of the installed package, when its build found MPI).
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "cumo/dist/communicator.hpp"

namespace cumo::dist {

// MPI_Init_thread on construction unless MPI is up already; MPI_Finalize on destruction if it was ours.
class MpiSession {
 public:
  MpiSession(int* argc = nullptr, char*** argv = nullptr) {
    int up = 0;
    MPI_Initialized(&up);
    if (up) return;
    int provided = 0;
    // MULTIPLE: the background gradient sum (dist/overlap.hpp) runs its collectives while the main thread's
    // backward runs expert parallelism's exchanges, each on its own communicator; the data prefetch thread and
    // OpenMP workers never call MPI. An MPI that provides only SERIALIZED makes allows_concurrent_threads() false
    // (the overlap then runs without expert parallelism only), less than that allows_background_thread() too.
    CUMO_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided) == MPI_SUCCESS,
               "MPI_Init_thread failed");
    owned_ = true;
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    int done = 0;
    MPI_Finalized(&done);
    if (owned_ && !done) MPI_Finalize();
  }

  // True when this process was started by an MPI launcher (mpirun, srun): the environment names its rank.
  static bool launched() {
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "SLURM_PROCID"})
      if (std::getenv(v)) return true;
    return false;
  }

 private:
  bool owned_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  // A private duplicate of `comm` (MPI_COMM_WORLD by default); `timeout_s` bounds every collective.
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD, double timeout_s = 600) : timeout_s_(timeout_s) {
    CUMO_CHECK(timeout_s > 0, "MpiCommunicator: timeout must be > 0 s, got ", timeout_s);
    CUMO_CHECK(MPI_Comm_dup(comm, &comm_) == MPI_SUCCESS, "MpiCommunicator: MPI_Comm_dup failed");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() override {
    int done = 0;
    MPI_Finalized(&done);
    if (!done && comm_ != MPI_COMM_NULL && !broken_) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view engine() const override { return "mpi"; }
  double timeout_s() const { return timeout_s_; }
  MPI_Comm handle() const { return comm_; }

  void alltoallv(const void* send, std::span<const std::int64_t> send_bytes, void* recv,
                 std::span<const std::int64_t> recv_bytes) override {
    const auto sc = counts("alltoallv", send_bytes), rc = counts("alltoallv", recv_bytes);
    const auto sd = displacements("alltoallv", sc), rd = displacements("alltoallv", rc);
    MPI_Request r;
    call("alltoallv", MPI_Ialltoallv(send, sc.data(), sd.data(), MPI_BYTE, recv, rc.data(), rd.data(), MPI_BYTE,
                                     comm_, &r));
    wait(r, "alltoallv");
  }
  // The pieces move in place: one hindexed datatype per peer and side, one MPI_Ialltoallw (MPI copies this rank's
  // own pieces directly, piece to piece).
  void alltoallv_pieces(const void* send, std::span<const std::vector<Segment>> send_pieces, void* recv,
                        std::span<const std::vector<Segment>> recv_pieces) override {
    constexpr const char* what = "alltoallv_pieces";
    CUMO_CHECK(std::int64_t(send_pieces.size()) == size_ && std::int64_t(recv_pieces.size()) == size_,
               "MpiCommunicator::", what, ": ", send_pieces.size(), " send and ", recv_pieces.size(),
               " receive lists for ", size_, " ranks");
    check_usable(what);
    const auto n = std::size_t(size_);
    std::vector<MPI_Datatype> types;  // freed on every path
    auto release = [&] {
      for (MPI_Datatype& t : types) MPI_Type_free(&t);
      types.clear();
    };
    auto make_type = [&](const std::vector<Segment>& pieces, int& count) {
      std::vector<int> lengths;
      std::vector<MPI_Aint> offsets;
      std::int64_t total = 0;
      for (const Segment& p : pieces)
        if (p.bytes > 0) {
          lengths.push_back(to_int(what, p.bytes));
          offsets.push_back(MPI_Aint(p.offset));
          total += p.bytes;
        }
      to_int(what, total);
      count = lengths.empty() ? 0 : 1;
      MPI_Datatype t = MPI_BYTE;
      if (lengths.empty()) return t;
      if (MPI_Type_create_hindexed(int(lengths.size()), lengths.data(), offsets.data(), MPI_BYTE, &t) != MPI_SUCCESS ||
          MPI_Type_commit(&t) != MPI_SUCCESS) {
        release();
        fail("MpiCommunicator::", what, ": could not build an indexed datatype of ", lengths.size(), " pieces");
      }
      types.push_back(t);
      return t;
    };
    std::vector<int> sc(n), rc(n), zero(n, 0);
    std::vector<MPI_Datatype> st(n), rt(n);
    try {
      for (std::size_t q = 0; q < n; ++q) {
        st[q] = make_type(send_pieces[q], sc[q]);
        rt[q] = make_type(recv_pieces[q], rc[q]);
      }
      MPI_Request r;
      call(what, MPI_Ialltoallw(send, sc.data(), zero.data(), st.data(), recv, rc.data(), zero.data(), rt.data(),
                                comm_, &r));
      wait(r, what);
    } catch (...) {
      release();
      throw;
    }
    release();
  }
  void allgatherv(const void* send, std::int64_t bytes, void* recv, std::span<const std::int64_t> recv_bytes) override {
    const auto rc = counts("allgatherv", recv_bytes);
    const auto rd = displacements("allgatherv", rc);
    MPI_Request r;
    call("allgatherv", MPI_Iallgatherv(send, to_int("allgatherv", bytes), MPI_BYTE, recv, rc.data(), rd.data(),
                                       MPI_BYTE, comm_, &r));
    wait(r, "allgatherv");
  }
  void broadcast(void* data, std::int64_t bytes, int root) override {
    CUMO_CHECK(root >= 0 && root < size_, "MpiCommunicator::broadcast: root ", root, " of ", size_, " ranks");
    MPI_Request r;
    call("broadcast", MPI_Ibcast(data, to_int("broadcast", bytes), MPI_BYTE, root, comm_, &r));
    wait(r, "broadcast");
  }
  void allreduce(std::span<std::int64_t> values, ReduceOp op) override {
    const MPI_Op o = op == ReduceOp::sum ? MPI_SUM : op == ReduceOp::min ? MPI_MIN : MPI_MAX;
    MPI_Request r;
    call("allreduce", MPI_Iallreduce(MPI_IN_PLACE, values.data(), to_int("allreduce", std::int64_t(values.size())),
                                     MPI_INT64_T, o, comm_, &r));
    wait(r, "allreduce");
  }
  void barrier() override {
    MPI_Request r;
    call("barrier", MPI_Ibarrier(comm_, &r));
    wait(r, "barrier");
  }
  [[noreturn]] void abort(int code) override {
    std::cerr.flush();
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; this is for an MPI that does
  }

  bool allows_background_thread() const override { return thread_level() >= MPI_THREAD_SERIALIZED; }
  bool allows_concurrent_threads() const override { return thread_level() >= MPI_THREAD_MULTIPLE; }
  std::unique_ptr<Communicator> background() const override {
    auto out = std::make_unique<MpiCommunicator>(comm_, timeout_s_);
    out->background_ = true;
    return out;
  }

  std::unique_ptr<Communicator> split(int colour, int key) const override {
    MPI_Comm c;
    CUMO_CHECK(MPI_Comm_split(comm_, colour, key, &c) == MPI_SUCCESS, "MpiCommunicator::split failed");
    auto out = std::make_unique<MpiCommunicator>(c, timeout_s_);
    MPI_Comm_free(&c);
    return out;
  }

 private:
  static int thread_level() {
    int level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&level);
    return level;
  }
  void check_usable(const char* what) const {
    if (broken_)
      throw CommError(detail::concat("MpiCommunicator::", what, ": an earlier collective failed; the communicator "
                                     "is unusable (abort the job)"));
  }
  void call(const char* what, int rc) {
    check_usable(what);
    if (rc == MPI_SUCCESS) return;
    broken_ = true;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw CommError(detail::concat("the MPI ", what, " failed: ", std::string(msg, std::size_t(len))));
  }
  // Polls the request until it completes or the deadline passes. OpenMPI moves a non-blocking collective's data
  // only inside MPI calls, so the first second spins on MPI_Test as a blocking call would (sleeping between tests
  // made a 5 ms all-to-all-v take 30 ms); after that a rank that waits for a slow or stuck one sleeps 1 ms between
  // tests and leaves the core to it. A background communicator (background()) sleeps 50 µs between tests from the
  // start: its thread shares the core with the backward it overlaps.
  void wait(MPI_Request& r, const char* what) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    bool patient = false;
    for (long polls = 0;; ++polls) {
      int done = 0;
      const int rc = MPI_Test(&r, &done, MPI_STATUS_IGNORE);
      if (rc != MPI_SUCCESS) call(what, rc);
      if (done) return;
      if (patient || background_)
        std::this_thread::sleep_for(patient ? std::chrono::microseconds(1000) : std::chrono::microseconds(50));
      if ((polls & 255) != 0 && !patient) continue;
      const double waited = std::chrono::duration<double>(clock::now() - t0).count();
      patient = waited > 1.0;
      if (waited > timeout_s_) {
        broken_ = true;
        throw CommError(detail::concat("the MPI ", what, " over ", size_, " ranks did not complete within ",
                                       timeout_s_, " s: another rank died, hangs, or took another path (raise "
                                       "the timeout with CUMO_COMM_TIMEOUT=seconds if a step is really that slow)"));
      }
    }
  }
  static int to_int(const char* what, std::int64_t n) {
    CUMO_CHECK(n >= 0 && n <= INT_MAX, "MpiCommunicator::", what, ": ", n, " bytes do not fit MPI's int count; "
               "split the transfer");
    return int(n);
  }
  std::vector<int> counts(const char* what, std::span<const std::int64_t> bytes) const {
    CUMO_CHECK(std::int64_t(bytes.size()) == size_, "MpiCommunicator::", what, ": ", bytes.size(), " counts for ",
               size_, " ranks");
    std::vector<int> c;
    for (std::int64_t b : bytes) c.push_back(to_int(what, b));
    return c;
  }
  static std::vector<int> displacements(const char* what, const std::vector<int>& c) {
    std::vector<int> d(c.size());
    std::int64_t off = 0;
    for (std::size_t i = 0; i < c.size(); ++i) {
      d[i] = to_int(what, off);
      off += c[i];
    }
    to_int(what, off);
    return d;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  double timeout_s_ = 600;
  bool broken_ = false;
  bool background_ = false;  // a background thread's communicator: sleep between polls
};

}  // namespace cumo::dist
