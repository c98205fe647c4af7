#pragma once
// Shape: a small fixed-capacity list of extents, printed the way error messages want it: "(37, 512)".
#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "cumo/core/error.hpp"

namespace cumo {

// The largest model size (a width, a count of layers, heads or experts, a vocabulary) a config may ask for: 4 Mi,
// ten times the largest vocabulary of a released model. Larger is a corrupt or mistyped config; refusing it at
// validation keeps every size product far from int64 overflow and from a multi-terabyte allocation.
inline constexpr std::int64_t kMaxDim = std::int64_t(1) << 22;

class Shape {
 public:
  static constexpr int kMaxDims = 8;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) {
    CUMO_CHECK(dims.size() <= kMaxDims, "Shape: at most ", kMaxDims, " dimensions, got ", dims.size());
    for (auto d : dims) push_back(d);
  }
  template <class It>
  Shape(It first, It last) {
    for (; first != last; ++first) push_back(static_cast<std::int64_t>(*first));
  }

  void push_back(std::int64_t d) {
    CUMO_CHECK(rank_ < kMaxDims, "Shape: at most ", kMaxDims, " dimensions");
    CUMO_CHECK(d >= 0, "Shape: negative extent ", d);
    dims_[rank_++] = d;
  }

  int rank() const { return rank_; }
  std::int64_t operator[](int i) const { return dims_[i < 0 ? i + rank_ : i]; }
  std::int64_t& operator[](int i) { return dims_[i < 0 ? i + rank_ : i]; }
  const std::int64_t* begin() const { return dims_.data(); }
  const std::int64_t* end() const { return dims_.data() + rank_; }

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[i];
    return n;
  }

  friend bool operator==(const Shape& a, const Shape& b) {
    return a.rank_ == b.rank_ && std::equal(a.begin(), a.end(), b.begin());
  }

  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
    if (rank_ == 1) s += ",";
    return s + ")";
  }

 private:
  std::array<std::int64_t, kMaxDims> dims_{};
  int rank_ = 0;
};

inline std::ostream& operator<<(std::ostream& os, const Shape& s) { return os << s.str(); }

}  // namespace cumo
