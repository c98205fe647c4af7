// dist::NcclCommunicator (GPU ranks), in one process (ctest `nccl`: the single-rank smoke) and under mpirun with
// one GPU per rank (`nccl_np2`). Every rank runs every case in the same order. Without a GPU, or with fewer GPUs on
// the node than ranks, it prints "SKIPPED: …" and exits 77 (ctest: skipped, not passed).
//   - the primitives on host and on device memory against what each rank must receive;
//   - the device gradient sum (allreduce_sum_device, through dist::allreduce_gradients on device parameters, with
//     a bucket smaller than a parameter) bitwise against the host sum of the same numbers over the host
//     communicator (MPI, or the world of one);
//   - the overlapped gradient sum (dist::OverlappedGradientSum on NcclCommunicator::background()): on a stream of
//     its own, after the compute stream's queued kernels that produce a part, not after the later ones, bitwise the
//     host sum;
//   - ZeRO-1 on device parameters (dist::Zero1<backend::Cuda>: the all-gather and the moments' broadcasts through
//     NCCL on device memory) against the replicated AdamW on the same GPU, bitwise;
//   - expert parallelism on device rows (SparseMoE<…, backend::Cuda>::shard_experts over NCCL: the rows' exchange
//     through alltoallv_pieces on device memory) against the whole block on each rank's own tokens, with ranks that
//     receive no row and ranks that have no token, and the unshard round trip;
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
#include "cumo/core/compare.hpp"
#include "cumo/dist/data_parallel.hpp"
#include "cumo/dist/nccl.cuh"
#include "cumo/dist/overlap.hpp"
#include "cumo/dist/world.hpp"
#include "cumo/dist/zero.hpp"
#include "cumo/moe.hpp"
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

// Spins for about `cycles` GPU clock cycles, then writes `values` into x: a gradient the compute stream produces
// long after the host queued its kernel (and reported its part).
__global__ void write_late(float* x, const float* values, std::int64_t n, long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = values[i];
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

TEST_CASE("scattered pieces on host and on device memory") {
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
  for (const bool on_device : {false, true}) {
    CAPTURE(on_device);
    std::fill(got.begin(), got.end(), std::uint8_t(0));
    on_memory(on_device, send, got, [&](const void* ds, void* dr) { c.alltoallv_pieces(ds, sp, dr, rp); });
    CHECK(got == want);
  }
  // one side on the host and the other on the device: refused, naming both
  std::uint8_t* d = device_copy(send);
  CHECK_THROWS_WITH_AS(c.alltoallv_pieces(d, sp, got.data(), rp), doctest::Contains("same side"), Error);
  cudaFree(d);
}

TEST_CASE("scattered pieces on device memory with an empty side (a null buffer: no rows to send, or none to receive)") {
  dist::NcclCommunicator& c = *g_nccl;
  const int R = c.rank(), N = c.size();
  if (N == 1) {  // one rank sends itself what it receives: no side can be empty while the other is not
    MESSAGE("one rank: the empty-side exchange needs two (nccl_np2)");
    return;
  }
  // rank 0 sends 3 bytes to every other rank and receives nothing (recv = null); the others send nothing
  // (send = null) and receive rank 0's 3 bytes in two pieces, reversed
  std::vector<std::vector<dist::Segment>> sp(static_cast<std::size_t>(N)), rp(static_cast<std::size_t>(N));
  std::vector<std::uint8_t> send, want;
  if (R == 0) {
    for (int q = 1; q < N; ++q) {
      sp[std::size_t(q)] = {{3 * (q - 1), 3}};
      for (int i = 0; i < 3; ++i) send.push_back(std::uint8_t(10 * q + i));
    }
  } else {
    rp[0] = {{1, 2}, {0, 1}};
    want = {std::uint8_t(10 * R + 2), std::uint8_t(10 * R), std::uint8_t(10 * R + 1)};
  }
  std::uint8_t* ds = send.empty() ? nullptr : device_copy(send);
  std::uint8_t* dr = want.empty() ? nullptr : device_copy(std::vector<std::uint8_t>(want.size(), 0));
  CHECK_NOTHROW(c.alltoallv_pieces(ds, sp, dr, rp));
  if (dr) CHECK(host_copy(dr, want.size()) == want);
  cudaFree(ds);
  cudaFree(dr);
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

TEST_CASE("the overlapped gradient sum: its own stream, after the kernels that produce a part, bitwise the host sum") {
  dist::NcclCommunicator& c = *g_nccl;
  std::unique_ptr<dist::Communicator> bg = c.background();
  const cudaStream_t side = static_cast<dist::NcclCommunicator&>(*bg).stream();
  CHECK(side != gpu::stream());
  CHECK(bg->allows_background_thread());
  CHECK_FALSE(bg->allows_concurrent_threads());  // NCCL: one thread issuing at a time
  CHECK_FALSE(c.follow_compute());               // on the compute stream itself: nothing to wait for
  // two parameters, each gradient written by a kernel that first spins (GPU clocks ≈ 2 GHz): ~100 ms for the first,
  // ~500 ms for the second, far longer than a sum of a few KB
  const long long spin[2] = {200'000'000, 1'000'000'000};
  const std::vector<Shape> shapes{{513}, {3, 77}};
  const std::int64_t bucket = 1000;
  std::vector<std::unique_ptr<Parameter>> params;
  std::vector<std::vector<float>> want;
  std::vector<float*> values;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<float> g = rank_floats(shapes[i].numel(), c.rank(), 40 + i);
    std::vector<float> h = g;
    dist::allreduce_sum(*g_host, std::span<float>(h));
    want.push_back(h);
    values.push_back(device_copy(g));
    params.push_back(std::make_unique<Parameter>("p" + std::to_string(i),
                                                 Tensor::zeros(shapes[i], DType::f32, Device::cuda)));
  }
  const ParameterList early{params[0].get()}, all{params[0].get(), params[1].get()};
  auto pieces_of = [](const ParameterList& part) {
    std::vector<dist::DeviceFloats> pieces;
    for (Parameter* p : part) pieces.push_back({p->grad.data<float>(), p->grad.numel()});
    return pieces;
  };
  // warm-up: NCCL's connections and the scratch buffers exist before the timed part (a first cudaMalloc or
  // connection set-up on the thread would eat into the spin's margin, or sync the device and hide a missing fence)
  bg->allreduce_sum_device(pieces_of(all), bucket);
  auto queue_gradients = [&](dist::OverlappedGradientSum& sum) {
    for (auto& p : params) CUMO_CUDA_CHECK(cudaMemset(p->grad.data<float>(), 0, std::size_t(p->grad.nbytes())));
    for (std::size_t i = 0; i < 2; ++i) {
      write_late<<<4, 128, 0, gpu::stream()>>>(params[i]->grad.data<float>(), values[i], shapes[i].numel(), spin[i]);
      CUMO_CUDA_CHECK(cudaGetLastError());
      if (i == 0) sum.ready(early);  // its kernel is queued, not run: the sum must wait for it
    }
    sum.finish();
  };
  auto bitwise = [](const std::vector<float>& got, const std::vector<float>& w) {
    return got.size() == w.size() && std::memcmp(got.data(), w.data(), got.size() * sizeof(float)) == 0;
  };
  SUBCASE("the engine's sum, read on the sum's stream as each part completes") {
    // What each part's gradients and the other part's hold right after the part's sum, read on the sum's stream.
    auto read_on_side = [&](const Parameter* p) {
      std::vector<float> h(std::size_t(p->grad.numel()));
      CUMO_CUDA_CHECK(cudaMemcpyAsync(h.data(), p->grad.data<float>(), h.size() * sizeof(float),
                                      cudaMemcpyDeviceToHost, side));
      CUMO_CUDA_CHECK(cudaStreamSynchronize(side));
      return h;
    };
    std::vector<std::vector<float>> summed, other;
    {
      // allreduce_sum_device directly: allreduce_gradients returns at once for one rank
      dist::OverlappedGradientSum sum(
          all, {early},
          [&](const ParameterList& part) {
            bg->allreduce_sum_device(pieces_of(part), bucket);
            const Parameter* mine = part.front();
            summed.push_back(read_on_side(mine));
            other.push_back(read_on_side(mine == params[0].get() ? params[1].get() : params[0].get()));
          },
          {bg.get()});
      queue_gradients(sum);
    }
    REQUIRE(summed.size() == 2);
    // each sum saw the late values: it waited for the kernel that wrote them
    for (std::size_t i = 0; i < 2; ++i) CHECK(bitwise(summed[i], want[i]));
    // the first part's sum did not wait for the second part's kernel (still spinning then): the sum overlaps the
    // compute stream's later work instead of queueing behind it
    CHECK(other[0] == std::vector<float>(want[1].size(), 0.f));
  }
  SUBCASE("the data-parallel form cumo_train uses: done when finish() returns") {
    if (c.size() == 1) return;  // allreduce_gradients sums nothing for one rank
    {
      dist::OverlappedGradientSum sum(*bg, all, {early}, bucket);
      queue_gradients(sum);
    }
    // read at once on the compute stream, which does not wait for the sum's (non-blocking) stream by itself
    for (std::size_t i = 0; i < 2; ++i)
      CHECK(bitwise(host_copy(params[i]->grad.data<float>(), want[i].size()), want[i]));
  }
  for (float* v : values) CUMO_CUDA_CHECK(cudaFree(v));
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
      zero.share_parameters(step % 2 ? 256 : std::int64_t(64) << 20);  // odd steps: rounds of 256 bytes
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

namespace {
// Expert parallelism on GPU ranks: the block of tests/dist's CPU case, on the device.
using HostBlock = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>>;
using GpuBlock = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cuda>;
constexpr std::int64_t kH = 16, kF = 24;
constexpr int kE = 4;
// fp32 on both sides (TF32 off): the sharded block's local expert GEMMs run on other row counts than the whole
// block's, so cuBLAS may pick other kernels — the summation order of fp32 dot products differs, nothing else.
constexpr double kF32 = 1e-5;

enum class Tokens { spread, skewed, only_rank0 };

// The same weights on every rank: drawn on the host from one seed, copied to the GPU. skewed: every token chooses
// experts 0 and 1, so the ranks holding 2 and 3 receive no row.
GpuBlock make_gpu_block(bool skewed) {
  HostBlock h(kH, kF, kE);
  Rng rng(7);
  h.reset_parameters(rng);
  Tensor& w = h.router().weight.value;  // (E, H)
  if (skewed) {
    for (int e = 0; e < kE; ++e)
      for (std::int64_t j = 0; j < kH; ++j) w.data<float>()[e * kH + j] = e < 2 ? 1.f + 0.1f * float(e) : -1.f;
  } else {
    rng.fill_normal(w, 0.f, 0.8f);  // sharp enough that the aux losses carry gradient
  }
  GpuBlock g(kH, kF, kE);
  const ParameterList from = h.parameters(), to = g.parameters();
  for (std::size_t i = 0; i < from.size(); ++i) to[i]->value.copy_from(from[i]->value);
  return g;
}
Tensor host_of(const Tensor& t) { return t.to(Device::cpu); }

void check_expert_parallel_on_device(Tokens mode) {
  dist::NcclCommunicator& c = *g_nccl;
  const int r = c.rank();
  const bool skewed = mode == Tokens::skewed;
  const std::int64_t T = mode == Tokens::only_rank0 ? (r == 0 ? 12 : 0) : 2 * (9 + r);  // per-rank token counts
  const std::int64_t segments = T > 0 && mode != Tokens::only_rank0 ? 2 : 1;
  Rng rng(100 + std::uint64_t(r));
  Tensor x = Tensor::empty({T, kH}), dy = Tensor::empty({T, kH});
  if (skewed)
    rng.fill_uniform(x, 0.5f, 1.f);
  else
    rng.fill_normal(x, 0.f, 1.f);
  rng.fill_normal(dy, 0.f, 1.f);
  const Tensor xd = x.to(Device::cuda), dyd = dy.to(Device::cuda);
  const AuxLossWeights aux{0.1f, 0.01f};

  // the whole block on this rank's tokens; its gradients summed over the ranks (what the sharded experts hold)
  GpuBlock whole = make_gpu_block(skewed);
  ParameterList wp = whole.parameters();
  Tensor y_ref, dx_ref;
  if (T > 0) {
    y_ref = host_of(whole.forward(xd, ForwardArgs{segments, true}).y);
    dx_ref = host_of(whole.backward(dyd, aux));
  } else {
    for (Parameter* p : wp) p->grad.zero_();
  }
  if (c.size() > 1) dist::allreduce_gradients(c, wp);

  GpuBlock ep = make_gpu_block(skewed);
  ep.shard_experts(c);
  REQUIRE(ep.experts().experts() == kE / c.size());
  const auto out = ep.forward(xd, ForwardArgs{segments, true});
  const Tensor dx = ep.backward(dyd, aux);
  CHECK(out.y.size(0) == T);
  if (T > 0) {
    CHECK(rel_error(host_of(out.y), y_ref) <= kF32);
    CHECK(rel_error(host_of(dx), dx_ref) <= kF32);
  }
  ParameterList epp = ep.parameters();
  Parameter& router = *epp.back();  // whole on every rank: this rank's tokens' gradient, summed here to compare
  if (c.size() > 1) dist::allreduce_gradients(c, ParameterList{&router});
  CHECK(rel_error(host_of(router.grad), host_of(wp.back()->grad)) <= kF32);
  const int first = ep.expert_exchange()->first_expert(), n = ep.expert_exchange()->local_experts();
  for (std::size_t i = 0; i + 1 < epp.size(); ++i) {
    CAPTURE(epp[i]->name);
    CHECK(rel_error(host_of(epp[i]->grad), host_of(wp[i]->grad).slice(0, first, first + n).contiguous()) <= kF32);
  }
  // unshard: every rank holds every expert's weights again, bitwise the whole block's
  ep.unshard_experts();
  GpuBlock again = make_gpu_block(skewed);
  const ParameterList back = ep.parameters(), fresh = again.parameters();
  int differ = 0;
  for (std::size_t i = 0; i < back.size(); ++i)
    differ += !bitwise_equal(host_of(back[i]->value), host_of(fresh[i]->value));
  CHECK(differ == 0);
}
}  // namespace

TEST_CASE("expert parallel on device rows: the sharded block's forward and backward equal the whole block's") {
  if (kE % g_nccl->size() != 0) {
    MESSAGE("E = 4 experts do not split over ", g_nccl->size(), " ranks: nothing to check");
    return;
  }
  SUBCASE("tokens spread over every expert") { check_expert_parallel_on_device(Tokens::spread); }
  SUBCASE("ranks that receive no row") { check_expert_parallel_on_device(Tokens::skewed); }
  if (g_nccl->size() > 1)
    SUBCASE("ranks without tokens serve their experts") { check_expert_parallel_on_device(Tokens::only_rank0); }
}

TEST_CASE("a host communicator refuses device rows with a message") {
  GpuBlock b = make_gpu_block(false);
  CHECK_THROWS_WITH_AS(b.shard_experts(*g_host), doctest::Contains("moves host memory only"), Error);
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
