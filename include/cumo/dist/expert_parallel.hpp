#pragma once
// dist::ExpertExchange: the token exchange of expert parallelism. The E experts of a SparseMoE are split over an
// expert-parallel group of K ranks, rank r holding experts [r·E/K, (r+1)·E/K); every rank routes its own tokens,
// and each permuted row travels to the rank that holds its expert and back (SparseMoE::shard_experts):
//
//   xs (rows, H), expert-sorted over all E ─ counts per expert → their owners (all-to-all of E/K counts each)
//            ─ rows → their owners, received straight into expert-major order: source q's rows for local
//              expert e land after every earlier source's rows for e (Communicator::alltoallv_pieces; rank q's
//              rows are contiguous on the sender: its experts are)        → xs_local (rows_local, H)
//   local experts as in one process                                         → out_local (rows_local, O)
//   the same pieces back                                                    → out (rows, O), in xs's order
//
// The backward sends d out the same way and d xs back. Dropless; the order of every row is a function of the
// routing alone, so the exchange is deterministic. A rank that receives no row runs its experts on zero rows, which
// every kernel accepts.
//
// The rows live where the block computes: host memory over a host engine (MPI), or GPU memory over an engine that
// moves device memory (NCCL: Communicator::moves_device_memory). The per-expert counts always travel as host
// integers (read from the plan's host offsets: on the GPU backend, the forward's one host sync), because the sizes
// of the exchange and of the local expert GEMMs are host decisions. The GPU form is UNVERIFIED: compiled, never run
// on a GPU (docs/distributed.md).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/core/routing.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/dist/communicator.hpp"

namespace cumo::dist {

// Tensors on `device` can go through `group`: host memory always, device memory over an engine that moves it.
inline void check_engine_moves(const Communicator& group, const char* where, Device device) {
  CUMO_CHECK(device == Device::cpu || group.moves_device_memory(), where, ": the rows are in '", name_of(device),
             "' memory but the communicator's engine (", group.engine(), ") moves host memory only; GPU ranks "
             "exchange over NCCL (dist::NcclCommunicator)");
}

// whole (E, …) ← the group's local (E/K, …) slices in rank order: rank q's slice becomes rows [q·E/K, (q+1)·E/K)
// (shard_experts' split). Every rank of the group calls it with its own slice; tensors of one dtype on one device
// (a device needs an engine that moves device memory).
inline void allgather_rows(Communicator& group, const Tensor& local, Tensor& whole) {
  constexpr const char* where = "dist::allgather_rows";
  check_device(where, "whole", whole, local.device());
  check_engine_moves(group, where, local.device());
  check_dtype(where, "whole", whole, local.dtype());
  CUMO_CHECK(whole.is_contiguous(), where, ": whole (shape ", whole.shape(), ") is not contiguous");
  Shape want = local.shape();
  CUMO_CHECK(local.dim() >= 1, where, ": local has shape ", local.shape(), " (expected a leading expert dimension)");
  want[0] *= group.size();
  CUMO_CHECK(whole.shape() == want, where, ": whole has shape ", whole.shape(), " but ", group.size(),
             " slices of shape ", local.shape(), " make ", want);
  const Tensor mine = local.contiguous();
  const std::vector<std::int64_t> bytes(std::size_t(group.size()), std::int64_t(mine.nbytes()));
  group.allgatherv(mine.raw(), std::int64_t(mine.nbytes()), whole.raw(), bytes);
}

// The inverse of allgather_rows: this rank's rows [r·E/K, (r+1)·E/K) of a whole (E, …) tensor, a view (a slice
// along dim 0 of a contiguous tensor is contiguous).
inline Tensor rows_of_rank(const Communicator& group, const Tensor& whole) {
  CUMO_CHECK(whole.dim() >= 1 && whole.size(0) % group.size() == 0, "dist::rows_of_rank: ", whole.shape(),
             " does not split into ", group.size(), " equal slices along dim 0");
  const std::int64_t n = whole.size(0) / group.size();
  return whole.slice(0, group.rank() * n, (group.rank() + 1) * n).contiguous();
}

class ExpertExchange {
 public:
  // What one forward's exchange keeps for the backward.
  struct Saved {
    std::vector<std::int64_t> send_rows, recv_rows;  // (K) rows to / from each rank
    // (K sources × E/K local experts): rows from source q for local expert e, and where they start in the
    // expert-major local order
    std::vector<std::int64_t> block_rows, block_at;
    std::int64_t rows_local = 0;
    DispatchPlan local;  // the local experts' plan (host offsets over E/K experts)
    Tensor xs_local;     // (rows_local, H)
  };

  ExpertExchange(Communicator& group, int experts) : group_(&group), experts_(experts) {
    CUMO_CHECK(experts >= 1 && experts % group.size() == 0, "expert parallel: ", experts, " experts do not split "
               "evenly over an expert-parallel group of ", group.size(), " ranks (E must be a multiple of K)");
  }

  Communicator& group() const { return *group_; }
  int local_experts() const { return experts_ / group_->size(); }
  int first_expert() const { return group_->rank() * local_experts(); }

  // xs (rows, H) in the order of `plan` (expert-sorted over all E experts) → s.xs_local and s.local.
  void dispatch(const Tensor& xs, const DispatchPlan& plan, Saved& s) const {
    constexpr const char* where = "ExpertExchange::dispatch";
    check_engine_moves(*group_, where, xs.device());
    check_dtype(where, "xs", xs, DType::f32);
    CUMO_CHECK(plan.experts == experts_, where, ": the plan is over ", plan.experts, " experts but the exchange over ",
               experts_);
    CUMO_CHECK(std::int64_t(plan.host_offsets.size()) == experts_ + 1, where, ": the plan has no row counts on the "
               "host (the GPU backend's gpu::Options::plan_host_offsets is off): expert parallelism needs them to size "
               "the exchange");
    CUMO_CHECK(xs.dim() == 2 && xs.size(0) == plan.rows(), where, ": xs has shape ", xs.shape(), " but the plan has ",
               plan.rows(), " rows");
    const int K = group_->size(), El = local_experts();
    const auto ranks = std::size_t(K);
    // rows per expert, as sent: my counts for rank q's experts go to q
    std::vector<std::int32_t> mine(static_cast<std::size_t>(experts_)), theirs(static_cast<std::size_t>(K * El));
    for (int e = 0; e < experts_; ++e)
      mine[std::size_t(e)] = std::int32_t(plan.host_offsets[std::size_t(e + 1)] - plan.host_offsets[std::size_t(e)]);
    const std::vector<std::int64_t> count_bytes(ranks, std::int64_t(El) * std::int64_t(sizeof(std::int32_t)));
    group_->alltoallv(mine.data(), count_bytes, theirs.data(), count_bytes);  // theirs (K sources, E/K experts)

    s.send_rows.assign(ranks, 0);
    s.recv_rows.assign(ranks, 0);
    s.block_rows.assign(theirs.begin(), theirs.end());
    for (int q = 0; q < K; ++q)
      for (int e = 0; e < El; ++e) {
        s.send_rows[std::size_t(q)] += mine[std::size_t(q * El + e)];
        s.recv_rows[std::size_t(q)] += theirs[std::size_t(q * El + e)];
      }
    // expert-major order: local expert e's rows are source 0's, then source 1's, …; the local plan over them
    s.block_at.assign(std::size_t(K * El), 0);
    s.local = {};
    s.local.experts = El;
    s.local.host_offsets.assign(std::size_t(El + 1), 0);
    std::int64_t at = 0;
    for (int e = 0; e < El; ++e) {
      for (int q = 0; q < K; ++q) {
        s.block_at[std::size_t(q * El + e)] = at;
        at += theirs[std::size_t(q * El + e)];
      }
      s.local.host_offsets[std::size_t(e + 1)] = at;
    }
    s.rows_local = at;
    s.local.tokens = at;
    s.local.top_k = 1;  // rows() = host_offsets.back(); the local plan's rows are the received ones
    // the offsets as a tensor too, on the rows' device (the GPU's device-offsets GEMM reads them there)
    Tensor offsets = Tensor::empty({El + 1}, DType::i32);  // (E/K + 1)
    for (int e = 0; e <= El; ++e) offsets.data<std::int32_t>()[e] = std::int32_t(s.local.host_offsets[std::size_t(e)]);
    s.local.offsets = xs.device() == Device::cpu ? offsets : offsets.to(xs.device());
    s.xs_local = to_local(xs, s);
  }

  // Rows in the sending order (rows, W) → the owners' expert-major order (rows_local, W): xs, and d out.
  Tensor to_local(const Tensor& rows, const Saved& s) const {
    const std::int64_t W = rows.size(1);
    const Tensor sent = rows.contiguous();
    Tensor local = Tensor::empty({s.rows_local, W}, DType::f32, rows.device());  // (rows_local, W) expert-major
    const auto [contiguous, blocks] = pieces(s, W);
    group_->alltoallv_pieces(sent.data<float>(), contiguous, local.data<float>(), blocks);
    return local;
  }

  // The owners' rows (rows_local, W) → back to the senders, in the sending order (rows, W): out, and d xs.
  Tensor to_senders(const Tensor& local, const Saved& s) const {
    const std::int64_t W = local.size(1);
    CUMO_CHECK(local.dim() == 2 && local.size(0) == s.rows_local, "ExpertExchange::to_senders: local rows have "
               "shape ", local.shape(), " but ", s.rows_local, " rows were received");
    std::int64_t rows = 0;
    for (std::int64_t r : s.send_rows) rows += r;
    const Tensor held = local.contiguous();
    Tensor back = Tensor::empty({rows, W}, DType::f32, local.device());  // (rows, W)
    const auto [contiguous, blocks] = pieces(s, W);
    group_->alltoallv_pieces(held.data<float>(), blocks, back.data<float>(), contiguous);
    return back;
  }

 private:
  // The two sides of an exchange of W-wide fp32 rows, per rank q: the contiguous run of the sending order that
  // goes to (or comes from) q, and q's blocks in the expert-major local order (one per local expert).
  std::pair<std::vector<std::vector<Segment>>, std::vector<std::vector<Segment>>> pieces(const Saved& s,
                                                                                         std::int64_t W) const {
    const int K = group_->size(), El = local_experts();
    const std::int64_t row = W * std::int64_t(sizeof(float));
    std::vector<std::vector<Segment>> contiguous(static_cast<std::size_t>(K)), blocks(static_cast<std::size_t>(K));
    std::int64_t at = 0;
    for (int q = 0; q < K; ++q) {
      contiguous[std::size_t(q)].push_back({at * row, s.send_rows[std::size_t(q)] * row});
      at += s.send_rows[std::size_t(q)];
      for (int e = 0; e < El; ++e) {
        const auto i = std::size_t(q * El + e);
        blocks[std::size_t(q)].push_back({s.block_at[i] * row, s.block_rows[i] * row});
      }
    }
    return {std::move(contiguous), std::move(blocks)};
  }

  Communicator* group_;
  int experts_;
};

}  // namespace cumo::dist
