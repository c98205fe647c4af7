// dist::NcclCommunicator (GPU ranks), in one process (ctest `nccl`: the single-rank smoke) and under mpirun with
// one GPU per rank (`nccl_np2`). Every rank runs every case in the same order. Without a GPU, or with fewer GPUs on
// the node than ranks, it prints "SKIPPED: …" and exits 77 (ctest: skipped, not passed).
//   - the primitives on host and on device memory against what each rank must receive;
//   - the device gradient sum (allreduce_sum_device, through dist::allreduce_gradients on device parameters, with
//     a bucket smaller than a parameter) bitwise against the host sum of the same numbers over the host
//     communicator (MPI, or the world of one);
//   - ZeRO-1 on device parameters (dist::Zero1<backend::Cuda>: the all-gather and the moments' broadcasts through
//     NCCL on device memory) against the replicated AdamW on the same GPU, bitwise;
//   - split, agree / check_same through NCCL, and the file rendezvous (one process).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cumo/backend/cuda.cuh"
#include "cumo/dist/data_parallel.hpp"
#include "cumo/dist/nccl.cuh"
#include "cumo/dist/world.hpp"
#include "cumo/dist/zero.hpp"
#include "cumo/train/optimizer.hpp"

using namespace cumo;

namespace {
dist::Communicator* g_host = nullptr;     // the job's host communicator (MPI under mpirun, else the world of one)
dist::NcclCommunicator* g_nccl = nullptr;  // the same ranks over NCCL

template <class T>
T* device_copy(const std::vector<T>& h) {
  T* d = nullptr;
  CUMO_CUDA_CHECK(cudaMalloc(&d, std::max<std::size_t>(h.size(), 1) * sizeof(T)));
  CUMO_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <class T>
std::vector<T> host_copy(const T* d, std::size_t n) {
  std::vector<T> h(n);
  CUMO_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Runs f(send, recv) on the host vectors themselves or on device copies of them; `got` then holds what was received.
template <class F>
void on_memory(bool on_device, const std::vector<std::uint8_t>& send, std::vector<std::uint8_t>& got, F&& f) {
  if (!on_device) return f(send.data(), got.data());
  std::uint8_t* ds = device_copy(send);
  std::uint8_t* dr = device_copy(got);
  f(ds, dr);
  got = host_copy(dr, got.size());
  cudaFree(ds);
  cudaFree(dr);
}

// What rank r sends rank q in the alltoallv case: r + q + 1 bytes, each (r * 16 + q + i) mod 251.
std::int64_t piece_bytes(int r, int q) { return r + q + 1; }
std::uint8_t piece_byte(int r, int q, std::int64_t i) { return std::uint8_t((r * 16 + q + i) % 251); }

void check_alltoallv(bool on_device) {
  dist::NcclCommunicator& c = *g_nccl;
  const int R = c.rank(), N = c.size();
  std::vector<std::int64_t> sb(static_cast<std::size_t>(N)), rb(static_cast<std::size_t>(N));
  std::vector<std::uint8_t> send, want;
  for (int q = 0; q < N; ++q) {
    sb[std::size_t(q)] = piece_bytes(R, q);
    rb[std::size_t(q)] = piece_bytes(q, R);
    for (std::int64_t i = 0; i < piece_bytes(R, q); ++i) send.push_back(piece_byte(R, q, i));
    for (std::int64_t i = 0; i < piece_bytes(q, R); ++i) want.push_back(piece_byte(q, R, i));
  }
  std::vector<std::uint8_t> got(want.size(), 0);
  on_memory(on_device, send, got, [&](const std::uint8_t* from, std::uint8_t* to) { c.alltoallv(from, sb, to, rb); });
  CHECK(got == want);
}

void check_allgatherv(bool on_device) {
  dist::NcclCommunicator& c = *g_nccl;
  const int R = c.rank(), N = c.size();
  std::vector<std::int64_t> rb(static_cast<std::size_t>(N));
  std::vector<std::uint8_t> mine, want;
  for (int q = 0; q < N; ++q) {
    rb[std::size_t(q)] = piece_bytes(q, q);
    for (std::int64_t i = 0; i < piece_bytes(q, q); ++i) want.push_back(piece_byte(q, q, i));
  }
  for (std::int64_t i = 0; i < piece_bytes(R, R); ++i) mine.push_back(piece_byte(R, R, i));
  std::vector<std::uint8_t> got(want.size(), 0);
  on_memory(on_device, mine, got, [&](const std::uint8_t* from, std::uint8_t* to) {
    c.allgatherv(from, std::int64_t(mine.size()), to, rb);
  });
  CHECK(got == want);
}

// Rank-dependent floats with a wide range of magnitudes: a sum in another order would differ in the last bits.
std::vector<float> rank_floats(std::int64_t n, int rank, std::uint64_t salt) {
  std::mt19937_64 g(0x5eed + 7919 * std::uint64_t(rank) + salt);
  std::normal_distribution<float> z;
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = z(g) * std::ldexp(1.f, int(g() % 24) - 12);
  return v;
}
}  // namespace

TEST_CASE("primitives on host memory") {
  dist::NcclCommunicator& c = *g_nccl;
  check_alltoallv(false);
  check_allgatherv(false);
  // broadcast from the last rank
  std::vector<std::int64_t> b{c.rank() == c.size() - 1 ? 42 : -1, c.rank() == c.size() - 1 ? -7 : 0};
  c.broadcast(b.data(), std::int64_t(b.size() * sizeof(std::int64_t)), c.size() - 1);
  CHECK(b == std::vector<std::int64_t>{42, -7});
  // exact integer reductions
  CHECK(dist::allreduce_one(c, c.rank() + 1, dist::ReduceOp::sum) == std::int64_t(c.size()) * (c.size() + 1) / 2);
  CHECK(dist::allreduce_one(c, c.rank() + 1, dist::ReduceOp::min) == 1);
  CHECK(dist::allreduce_one(c, c.rank() + 1, dist::ReduceOp::max) == c.size());
  c.barrier();
  // the agreed checks run through the staged primitives
  CHECK_NOTHROW(dist::check_same(c, "a value", "same everywhere"));
  if (c.size() > 1) CHECK_THROWS_AS(dist::check_same(c, "a value", std::to_string(c.rank())), dist::AgreedError);
  CHECK_THROWS_AS(dist::agree(c, c.rank() == 0 ? "rank 0 failed" : ""), Error);
  // the host algorithms (the deterministic sum of host arrays) over NCCL equal the host communicator's
  std::vector<double> x{1.0 + c.rank(), 1e-17 * (c.rank() + 1), -3.5};
  std::vector<double> y = x;
  dist::allreduce_sum(c, std::span<double>(x));
  dist::allreduce_sum(*g_host, std::span<double>(y));
  CHECK(std::memcmp(x.data(), y.data(), x.size() * sizeof(double)) == 0);
}

TEST_CASE("scattered pieces on host memory (the staged default), refused on device memory") {
  dist::NcclCommunicator& c = *g_nccl;
  const int R = c.rank(), N = c.size();
  // rank r sends q its bytes 2q + 1 and 2q, in that order; q receives them at 2r, 2r + 1
  std::vector<std::uint8_t> send(2 * std::size_t(N)), got(2 * std::size_t(N), 0), want(2 * std::size_t(N));
  for (int i = 0; i < 2 * N; ++i) send[std::size_t(i)] = std::uint8_t(R * 16 + i);
  std::vector<std::vector<dist::Segment>> sp(static_cast<std::size_t>(N)), rp(static_cast<std::size_t>(N));
  for (int q = 0; q < N; ++q) {
    sp[std::size_t(q)] = {{2 * q + 1, 1}, {2 * q, 1}};
    rp[std::size_t(q)] = {{2 * q, 2}};
    want[std::size_t(2 * q)] = std::uint8_t(q * 16 + 2 * R + 1);
    want[std::size_t(2 * q + 1)] = std::uint8_t(q * 16 + 2 * R);
  }
  c.alltoallv_pieces(send.data(), sp, got.data(), rp);
  CHECK(got == want);
  std::uint8_t* d = device_copy(send);
  CHECK_THROWS_WITH_AS(c.alltoallv_pieces(d, sp, d, rp), doctest::Contains("device memory"), Error);
  cudaFree(d);
}

TEST_CASE("primitives on device memory") {
  check_alltoallv(true);
  check_allgatherv(true);
}

TEST_CASE("the device gradient sum equals the host sum of the same numbers, bitwise") {
  dist::NcclCommunicator& c = *g_nccl;
  // three parameters; a 1000-byte bucket: the second parameter spans buckets, buckets end inside the third
  const std::vector<Shape> shapes{{7, 33}, {1001}, {3, 5, 17}};
  std::vector<std::unique_ptr<Parameter>> dev;
  ParameterList dlist;
  std::vector<std::vector<float>> want;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<float> g = rank_floats(shapes[i].numel(), c.rank(), i);
    std::vector<float> h = g;
    dist::allreduce_sum(*g_host, std::span<float>(h));  // the host fold over ranks
    want.push_back(h);
    auto p = std::make_unique<Parameter>("p" + std::to_string(i), Tensor::zeros(shapes[i], DType::f32, Device::cuda));
    CUMO_CUDA_CHECK(cudaMemcpy(p->grad.data<float>(), g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice));
    dlist.push_back(p.get());
    dev.push_back(std::move(p));
  }
  dev[1]->trainable = false;  // a frozen parameter keeps its own gradient
  const std::vector<float> frozen = host_copy(dev[1]->grad.data<float>(), std::size_t(shapes[1].numel()));
  // allreduce_gradients returns at once for one rank; the engine's sum runs whatever the size
  if (c.size() > 1) {
    dist::allreduce_gradients(c, dlist, 1000);
  } else {
    std::vector<dist::DeviceFloats> pieces{{dev[0]->grad.data<float>(), shapes[0].numel()},
                                           {dev[2]->grad.data<float>(), shapes[2].numel()}};
    c.allreduce_sum_device(pieces, 1000);
  }
  for (std::size_t i : {std::size_t(0), std::size_t(2)}) {
    const std::vector<float> got = host_copy(dev[i]->grad.data<float>(), want[i].size());
    CHECK(std::memcmp(got.data(), want[i].data(), got.size() * sizeof(float)) == 0);
  }
  CHECK(host_copy(dev[1]->grad.data<float>(), frozen.size()) == frozen);
  // a host communicator refuses device gradients with a message, not a crash
  if (g_host->size() > 1) CHECK_THROWS_WITH_AS(dist::allreduce_gradients(*g_host, dlist), doctest::Contains("NCCL"),
                                               Error);
  // the digest reads device weights
  CHECK_NOTHROW(dist::check_same(c, "the weights", dist::weights_digest(dlist)));
}

TEST_CASE("ZeRO-1 on device parameters takes bitwise the replicated AdamW's steps") {
  dist::NcclCommunicator& c = *g_nccl;
  using Cuda = backend::Cuda;
  // the same parameters on every rank, twice: one copy replicated, one sharded (more parameters than ranks)
  const std::vector<Shape> shapes{{7, 33}, {1001}, {3, 5, 17}, {64}, {2, 9}};
  std::vector<std::unique_ptr<Parameter>> store;
  ParameterList pa, pb;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<float> v = rank_floats(shapes[i].numel(), 0, 100 + i);
    for (ParameterList* list : {&pa, &pb}) {
      auto p = std::make_unique<Parameter>(std::string("p").append(std::to_string(i)),
                                           Tensor::zeros(shapes[i], DType::f32, Device::cuda));
      CUMO_CUDA_CHECK(cudaMemcpy(p->value.data<float>(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
      list->push_back(p.get());
      store.push_back(std::move(p));
    }
  }
  const train::AdamWOptions o{2e-3, 0.9, 0.999, 1e-8, 0.01};
  train::AdamW<Cuda> oa(pa, o), ob(pb, o);
  {
    dist::Zero1<Cuda> zero(c, ob);
    for (int step = 1; step <= 3; ++step) {
      for (std::size_t i = 0; i < shapes.size(); ++i) {  // the same gradient on every rank (a summed one)
        const std::vector<float> g = rank_floats(shapes[i].numel(), 0, 1000 * std::uint64_t(step) + i);
        for (Parameter* p : {pa[i], pb[i]})
          CUMO_CUDA_CHECK(cudaMemcpy(p->grad.data<float>(), g.data(), g.size() * sizeof(float),
                                     cudaMemcpyHostToDevice));
      }
      oa.step(2e-3);
      ob.step(2e-3);
      zero.share_parameters();
    }
    int differ = 0, held = 0;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const std::size_t n = std::size_t(shapes[i].numel());
      differ += host_copy(pa[i]->value.data<float>(), n) != host_copy(pb[i]->value.data<float>(), n);
      held += ob.state(*pb[i]) != nullptr;
    }
    CHECK(differ == 0);
    CHECK(held == zero.owned_parameters());
    if (c.size() > 1) CHECK(held < int(shapes.size()));
    zero.gather_state();  // every moment on every rank, as before a checkpoint
    const auto want = oa.state_tensors(), got = ob.state_tensors();
    REQUIRE(got.size() == want.size());
    int bad = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      bad += got[i].first != want[i].first || got[i].second.nbytes() != want[i].second.nbytes() ||
             std::memcmp(got[i].second.raw(), want[i].second.raw(), got[i].second.nbytes()) != 0;
    CHECK(bad == 0);
    zero.release();
  }
}

TEST_CASE("split into groups") {
  dist::NcclCommunicator& c = *g_nccl;
  const int colour = c.rank() % 2;
  std::unique_ptr<dist::Communicator> g = c.split(colour, c.rank());
  const int members = (c.size() + 1 - colour) / 2;  // ranks with this parity
  CHECK(g->size() == members);
  CHECK(g->rank() == c.rank() / 2);
  CHECK(dist::allreduce_one(*g, 1, dist::ReduceOp::sum) == members);
}

TEST_CASE("file rendezvous (one process)") {
  if (g_nccl->size() != 1) return;  // the job's ranks are busy with their own communicator
  const std::string path =
      (std::filesystem::temp_directory_path() / ("cumo_nccl_id_" + std::to_string(::getpid()))).string();
  std::filesystem::remove(path);
  {
    auto c = dist::NcclCommunicator::rendezvous_file(path, 0, 1, 60);
    CHECK(dist::allreduce_one(*c, 5, dist::ReduceOp::sum) == 5);
    // an existing file is an earlier job's id: refused, not reused
    CHECK_THROWS_WITH_AS(dist::NcclCommunicator::rendezvous_file(path, 0, 1, 60), doctest::Contains("exists already"),
                         Error);
  }
  std::filesystem::remove(path);
}

int main(int argc, char** argv) {
  dist::World world(&argc, &argv);
  g_host = &world.comm();
  // every rank has a GPU of its own (claim_gpu makes it current), or every rank skips
  const std::string skip = dist::claim_gpu(*g_host);
  if (dist::any(*g_host, !skip.empty())) {
    if (world.rank() == 0)
      std::printf("SKIPPED: %s\n", skip.empty() ? "another rank has no GPU of its own" : skip.c_str());
    std::fflush(stdout);
    return 77;
  }
  int device = 0;
  cudaGetDevice(&device);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, device);
  int version = 0;
  ncclGetVersion(&version);
  if (world.rank() == 0)
    std::printf("nccl suite: %d rank(s), NCCL %d, rank 0 on %s\n", world.size(), version, prop.name);
  auto nccl = std::make_unique<dist::NcclCommunicator>(*g_host, dist::comm_timeout_from_env(120));
  g_nccl = nccl.get();
  doctest::Context ctx(argc, argv);
  if (world.rank() != 0) ctx.setOption("minimal", true);
  const int rc = ctx.run();
  const bool failed = dist::any(*g_host, rc != 0);
  if (world.rank() == 0)
    std::cout << "nccl suite: " << world.size() << " rank(s): " << (failed ? "FAILED" : "passed") << "\n";
  nccl.reset();
  return failed ? 1 : 0;
}
