#pragma once
// dist::ExpertExchange: the token exchange of expert parallelism. The E experts of a SparseMoE are split over an
// expert-parallel group of K ranks, rank r holding experts [r·E/K, (r+1)·E/K); every rank routes its own tokens,
// and each permuted row travels to the rank that holds its expert and back (SparseMoE::shard_experts):
//
//   xs (rows, H), expert-sorted over all E ─ counts per expert → their owners (all-to-all of E/K counts each)
//            ─ rows → their owners (all-to-all-v; rank q's rows are contiguous: its experts are)   source-major
//            ─ permute to expert-major                                      → xs_local (rows_local, H)
//   local experts as in one process                                         → out_local (rows_local, O)
//   the reverse permutation and all-to-all-v                                → out (rows, O), in xs's order
//
// The backward sends d out the same way and d xs back. Dropless, host (CPU) memory; the order of every row is a
// function of the routing alone, so the exchange is deterministic. A rank that receives no row runs its experts on
// zero rows, which every kernel accepts.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/core/routing.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/dist/communicator.hpp"

namespace cumo::dist {

// whole (E, …) ← the group's local (E/K, …) slices in rank order: rank q's slice becomes rows [q·E/K, (q+1)·E/K)
// (shard_experts' split). Every rank of the group calls it with its own slice; host tensors of one dtype.
inline void allgather_rows(Communicator& group, const Tensor& local, Tensor& whole) {
  constexpr const char* where = "dist::allgather_rows";
  check_device(where, "local", local, Device::cpu);
  check_device(where, "whole", whole, Device::cpu);
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

class ExpertExchange {
 public:
  // What one forward's exchange keeps for the backward.
  struct Saved {
    std::vector<std::int64_t> send_rows, recv_rows;  // (K) rows to / from each rank
    std::vector<std::int64_t> order;                 // expert-major position i ← source-major row order[i]
    DispatchPlan local;                              // the local experts' plan (host offsets over E/K experts)
    Tensor xs_local;                                 // (rows_local, H)
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
    check_device(where, "xs", xs, Device::cpu);
    check_dtype(where, "xs", xs, DType::f32);
    CUMO_CHECK(plan.experts == experts_ && std::int64_t(plan.host_offsets.size()) == experts_ + 1, where,
               ": the plan is over ", plan.experts, " experts but the exchange over ", experts_);
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
    for (int q = 0; q < K; ++q)
      for (int e = 0; e < El; ++e) {
        s.send_rows[std::size_t(q)] += mine[std::size_t(q * El + e)];
        s.recv_rows[std::size_t(q)] += theirs[std::size_t(q * El + e)];
      }
    // expert-major order of the received (source-major) rows, and the local plan
    std::vector<std::int64_t> src_start(ranks + 1, 0);
    for (int q = 0; q < K; ++q) src_start[std::size_t(q + 1)] = src_start[std::size_t(q)] + s.recv_rows[std::size_t(q)];
    std::vector<std::int64_t> block(std::size_t(K * El));  // where (source q, expert e)'s rows start, source-major
    for (int q = 0; q < K; ++q) {
      std::int64_t at = src_start[std::size_t(q)];
      for (int e = 0; e < El; ++e) {
        block[std::size_t(q * El + e)] = at;
        at += theirs[std::size_t(q * El + e)];
      }
    }
    s.order.clear();
    s.order.reserve(std::size_t(src_start[ranks]));
    s.local = {};
    s.local.experts = El;
    s.local.host_offsets.assign(std::size_t(El + 1), 0);
    for (int e = 0; e < El; ++e) {
      for (int q = 0; q < K; ++q)
        for (std::int64_t j = 0; j < theirs[std::size_t(q * El + e)]; ++j)
          s.order.push_back(block[std::size_t(q * El + e)] + j);
      s.local.host_offsets[std::size_t(e + 1)] = std::int64_t(s.order.size());
    }
    s.local.tokens = std::int64_t(s.order.size());
    s.local.top_k = 1;  // rows() = host_offsets.back(); the local plan's rows are the received ones
    s.xs_local = to_local(xs, s);
  }

  // Rows in the sending order (rows, W) → the owners' expert-major order (rows_local, W): xs, and d out.
  Tensor to_local(const Tensor& rows, const Saved& s) const {
    const std::int64_t W = rows.size(1);
    Tensor& received = workspace(std::int64_t(s.order.size()), W);  // (rows_local, W) source-major
    group_->alltoallv(rows.contiguous().data<float>(), bytes(s.send_rows, W), received.data<float>(),
                      bytes(s.recv_rows, W));
    Tensor local = Tensor::empty({std::int64_t(s.order.size()), W});  // (rows_local, W) expert-major
    permute(received, s.order, local, false);
    return local;
  }

  // The owners' rows (rows_local, W) → back to the senders, in the sending order (rows, W): out, and d xs.
  Tensor to_senders(const Tensor& local, const Saved& s) const {
    const std::int64_t W = local.size(1);
    CUMO_CHECK(local.dim() == 2 && local.size(0) == std::int64_t(s.order.size()), "ExpertExchange::to_senders: ",
               "local rows have shape ", local.shape(), " but ", s.order.size(), " rows were received");
    Tensor& source_major = workspace(std::int64_t(s.order.size()), W);  // (rows_local, W)
    permute(local.contiguous(), s.order, source_major, true);
    std::int64_t rows = 0;
    for (std::int64_t r : s.send_rows) rows += r;
    Tensor back = Tensor::empty({rows, W});  // (rows, W)
    group_->alltoallv(source_major.data<float>(), bytes(s.recv_rows, W), back.data<float>(), bytes(s.send_rows, W));
    return back;
  }

 private:
  static std::vector<std::int64_t> bytes(const std::vector<std::int64_t>& rows, std::int64_t width) {
    std::vector<std::int64_t> b;
    for (std::int64_t r : rows) b.push_back(r * width * std::int64_t(sizeof(float)));
    return b;
  }
  // inverse = false: dst[i] = src[order[i]]; true: dst[order[i]] = src[i].
  static void permute(const Tensor& src, const std::vector<std::int64_t>& order, Tensor& dst, bool inverse) {
    const std::int64_t W = src.size(1);
    const float* a = src.data<float>();
    float* b = dst.data<float>();
    for (std::size_t i = 0; i < order.size(); ++i) {
      const std::int64_t from = inverse ? std::int64_t(i) : order[i], to = inverse ? order[i] : std::int64_t(i);
      std::memcpy(b + to * W, a + from * W, std::size_t(W) * sizeof(float));
    }
  }

  // The exchange's scratch rows, kept across calls: a fresh buffer of this size each call costs more in page
  // faults than the copy into it (measured: bench_ep_dispatch).
  Tensor& workspace(std::int64_t rows, std::int64_t width) const {
    if (!scratch_.defined() || scratch_.numel() < std::max<std::int64_t>(rows * width, 1))
      scratch_ = Tensor::empty({std::max<std::int64_t>(rows * width, 1)});
    view_ = scratch_.slice(0, 0, rows * width).view({rows, width});
    return view_;
  }

  Communicator* group_;
  int experts_;
  mutable Tensor scratch_, view_;  // (capacity,) and its (rows, width) view of the current call
};

}  // namespace cumo::dist
