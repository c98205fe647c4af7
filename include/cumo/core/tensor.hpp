#pragma once
// Tensor: a shared storage buffer plus a strided view of it (shape, strides in elements, offset, dtype, device).
// Views share storage; `clone()` copies. Device memory is allocated through a per-device allocator table that the
// CUDA backend fills in when it is compiled in, so this header never needs CUDA and CUDA never changes its layout.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <string_view>

#include "cumo/core/dtype.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/shape.hpp"

namespace cumo {

enum class Device : std::uint8_t { cpu, cuda };

constexpr std::string_view name_of(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

// An allocation: raw bytes on one device, freed by its deleter when the last view goes away.
struct Storage {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  Device device = Device::cpu;
  std::function<void(void*)> deleter;

  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (deleter && ptr) deleter(ptr);
  }
};

namespace detail {
// Allocation and byte copies for non-CPU devices; the CUDA backend registers its functions here.
struct DeviceOps {
  void* (*alloc)(std::size_t bytes) = nullptr;
  void (*free)(void* p) = nullptr;
  void (*copy)(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) = nullptr;
  void (*memset0)(void* p, std::size_t bytes) = nullptr;
};
inline DeviceOps& cuda_ops() {
  static DeviceOps ops;
  return ops;
}

inline std::shared_ptr<Storage> allocate(std::size_t bytes, Device device) {
  auto s = std::make_shared<Storage>();
  s->bytes = bytes;
  s->device = device;
  if (device == Device::cpu) {
    // 64-byte alignment: whole cache lines, and what Eigen's vectorised kernels like.
    const std::size_t rounded = (bytes + 63) / 64 * 64;
    s->ptr = rounded ? std::aligned_alloc(64, rounded) : nullptr;
    if (rounded && !s->ptr) throw std::bad_alloc();
    s->deleter = [](void* p) { std::free(p); };
  } else {
    auto& ops = cuda_ops();
    CUMO_CHECK(ops.alloc, "Tensor: device 'cuda' requested but cumo was built without the CUDA backend in this "
                          "translation unit (include <cumo/backend/cuda.cuh> from a .cu file)");
    s->ptr = bytes ? ops.alloc(bytes) : nullptr;
    s->deleter = ops.free;
  }
  return s;
}
}  // namespace detail

class Tensor {
 public:
  Tensor() = default;

  // ---- construction -----------------------------------------------------------------------------------------
  static Tensor empty(Shape shape, DType dtype = DType::f32, Device device = Device::cpu) {
    Tensor t;
    t.storage_ = detail::allocate(std::size_t(shape.numel()) * size_of(dtype), device);
    t.shape_ = shape;
    t.stride_ = contiguous_strides(shape);
    t.dtype_ = dtype;
    return t;
  }
  static Tensor zeros(Shape shape, DType dtype = DType::f32, Device device = Device::cpu) {
    Tensor t = empty(shape, dtype, device);
    t.zero_();
    return t;
  }
  template <class T>
  static Tensor full(Shape shape, T value) {
    Tensor t = empty(shape, dtype_v<T>);
    T* p = t.data<T>();
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = value;
    return t;
  }
  // A contiguous tensor over an allocation made elsewhere (a device workspace's block), freed by its deleter.
  static Tensor from_storage(std::shared_ptr<Storage> storage, Shape shape, DType dtype) {
    CUMO_CHECK(storage && storage->bytes >= std::size_t(shape.numel()) * size_of(dtype),
               "Tensor::from_storage: the storage is smaller than a tensor of shape ", shape);
    Tensor t;
    t.storage_ = std::move(storage);
    t.shape_ = shape;
    t.stride_ = contiguous_strides(shape);
    t.dtype_ = dtype;
    return t;
  }
  // A view of memory the caller owns; `keepalive` (e.g. a memory map) lives as long as any view of it.
  static Tensor borrow(void* ptr, Shape shape, DType dtype, Device device = Device::cpu,
                       std::shared_ptr<void> keepalive = {}) {
    Tensor t;
    t.storage_ = std::make_shared<Storage>();
    t.storage_->ptr = ptr;
    t.storage_->bytes = std::size_t(shape.numel()) * size_of(dtype);
    t.storage_->device = device;
    if (keepalive) t.storage_->deleter = [k = std::move(keepalive)](void*) mutable { k.reset(); };
    t.shape_ = shape;
    t.stride_ = contiguous_strides(shape);
    t.dtype_ = dtype;
    return t;
  }

  // ---- properties -------------------------------------------------------------------------------------------
  bool defined() const { return storage_ != nullptr; }
  // A weak reference to the allocation: a cache derived from this tensor's bytes (cpu::prepack_weight) learns from
  // it whether the allocation still exists, without keeping it alive.
  std::weak_ptr<const Storage> storage_ref() const { return storage_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return stride_; }
  std::int64_t size(int d) const { return shape_[d]; }
  int dim() const { return shape_.rank(); }
  std::int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::cpu; }
  std::size_t nbytes() const { return std::size_t(numel()) * size_of(dtype_); }
  bool is_contiguous() const { return stride_ == contiguous_strides(shape_); }

  void* raw() const { return static_cast<char*>(storage_->ptr) + offset_ * std::int64_t(size_of(dtype_)); }
  template <class T>
  T* data() const {
    CUMO_CHECK(storage_, "Tensor::data: tensor is undefined");
    CUMO_CHECK(dtype_v<T> == dtype_, "Tensor::data: tensor has dtype ", name_of(dtype_), " but ",
               name_of(dtype_v<T>), " was requested");
    return static_cast<T*>(raw());
  }
  // Element access for tests and small host-side loops (bounds are the caller's business).
  template <class T, class... Idx>
  T& at(Idx... idx) const {
    static_assert(sizeof...(Idx) >= 1, "Tensor::at: give one index per dimension");
    const std::int64_t ii[] = {std::int64_t(idx)...};
    std::int64_t off = 0;
    for (std::size_t d = 0; d < sizeof...(Idx); ++d) off += ii[d] * stride_[int(d)];
    return data<T>()[off];
  }

  // ---- views ------------------------------------------------------------------------------------------------
  Tensor view(Shape shape) const {
    CUMO_CHECK(is_contiguous(), "Tensor::view: tensor with shape ", shape_, " is not contiguous");
    CUMO_CHECK(shape.numel() == numel(), "Tensor::view: cannot view shape ", shape_, " as ", shape);
    Tensor t = *this;
    t.shape_ = shape;
    t.stride_ = contiguous_strides(shape);
    return t;
  }
  // Rows [begin, end) along dimension d.
  Tensor slice(int d, std::int64_t begin, std::int64_t end) const {
    if (d < 0) d += dim();
    CUMO_CHECK(d >= 0 && d < dim(), "Tensor::slice: dimension ", d, " out of range for shape ", shape_);
    CUMO_CHECK(0 <= begin && begin <= end && end <= shape_[d], "Tensor::slice: [", begin, ", ", end,
               ") out of range for dimension ", d, " of shape ", shape_);
    Tensor t = *this;
    t.offset_ += begin * stride_[d];
    t.shape_[d] = end - begin;
    return t;
  }
  // Index i along dimension d, dropping that dimension.
  Tensor select(int d, std::int64_t i) const {
    if (d < 0) d += dim();
    Tensor s = slice(d, i, i + 1);
    Tensor t = s;
    t.shape_ = Shape{};
    t.stride_ = Shape{};
    for (int k = 0; k < dim(); ++k)
      if (k != d) {
        t.shape_.push_back(s.shape_[k]);
        t.stride_.push_back(s.stride_[k]);
      }
    return t;
  }
  Tensor operator[](std::int64_t i) const { return select(0, i); }

  // ---- copies -----------------------------------------------------------------------------------------------
  Tensor clone() const { return to(device()); }
  Tensor to(Device device) const {
    Tensor c = contiguous_();
    Tensor t = empty(shape_, dtype_, device);
    copy_bytes(t.raw(), device, c.raw(), c.device(), nbytes());
    return t;
  }
  // CPU dtype conversion through float (or double for f64 targets).
  Tensor to(DType dtype) const;
  void copy_from(const Tensor& src) {
    CUMO_CHECK(src.shape() == shape_, "Tensor::copy_from: source has shape ", src.shape(), " but destination has ",
               shape_);
    CUMO_CHECK(src.dtype() == dtype_, "Tensor::copy_from: source dtype ", name_of(src.dtype()),
               " differs from destination dtype ", name_of(dtype_));
    CUMO_CHECK(is_contiguous(), "Tensor::copy_from: destination must be contiguous");
    Tensor c = src.contiguous_();
    copy_bytes(raw(), device(), c.raw(), c.device(), nbytes());
  }
  void zero_() {
    CUMO_CHECK(is_contiguous(), "Tensor::zero_: tensor must be contiguous");
    if (nbytes() == 0) return;  // an empty tensor has no storage (memset of a null pointer is undefined)
    if (device() == Device::cpu)
      std::memset(raw(), 0, nbytes());
    else
      detail::cuda_ops().memset0(raw(), nbytes());
  }
  Tensor contiguous() const { return contiguous_(); }

  static Shape contiguous_strides(const Shape& s) {
    Shape st = s;
    std::int64_t acc = 1;
    for (int i = s.rank() - 1; i >= 0; --i) {
      st[i] = acc;
      acc *= s[i];
    }
    return st;
  }

 private:
  static void copy_bytes(void* dst, Device dd, const void* src, Device sd, std::size_t n) {
    if (!n) return;
    if (dd == Device::cpu && sd == Device::cpu) {
      std::memcpy(dst, src, n);
      return;
    }
    auto& ops = detail::cuda_ops();
    CUMO_CHECK(ops.copy, "Tensor: copy to/from 'cuda' needs the CUDA backend");
    ops.copy(dst, dd, src, sd, n);
  }
  // Contiguous copy of a strided CPU view (or *this when already contiguous).
  Tensor contiguous_() const {
    if (is_contiguous()) return *this;
    CUMO_CHECK(device() == Device::cpu, "Tensor::contiguous: strided copies are CPU-only");
    Tensor t = empty(shape_, dtype_);
    const std::size_t es = size_of(dtype_);
    const char* src = static_cast<const char*>(raw());
    char* dst = static_cast<char*>(t.raw());
    std::int64_t idx[Shape::kMaxDims] = {};
    for (std::int64_t n = 0; n < numel(); ++n) {
      std::int64_t off = 0;
      for (int d = 0; d < dim(); ++d) off += idx[d] * stride_[d];
      std::memcpy(dst + n * es, src + off * std::int64_t(es), es);
      for (int d = dim() - 1; d >= 0; --d) {
        if (++idx[d] < shape_[d]) break;
        idx[d] = 0;
      }
    }
    return t;
  }

  std::shared_ptr<Storage> storage_;
  std::int64_t offset_ = 0;
  Shape shape_, stride_;
  DType dtype_ = DType::f32;
};

namespace detail {
inline double load_as_double(const void* p, DType t, std::int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f64: return static_cast<const double*>(p)[i];
    case DType::bf16: return to_float(static_cast<const bf16_t*>(p)[i]);
    case DType::f16: return to_float(static_cast<const f16_t*>(p)[i]);
    case DType::i64: return double(static_cast<const std::int64_t*>(p)[i]);
    case DType::i32: return double(static_cast<const std::int32_t*>(p)[i]);
  }
  return 0;
}
inline void store_from_double(void* p, DType t, std::int64_t i, double v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = float(v); break;
    case DType::f64: static_cast<double*>(p)[i] = v; break;
    case DType::bf16: static_cast<bf16_t*>(p)[i] = to_bf16(float(v)); break;
    case DType::f16: static_cast<f16_t*>(p)[i] = to_f16(float(v)); break;
    case DType::i64: static_cast<std::int64_t*>(p)[i] = std::int64_t(v); break;
    case DType::i32: static_cast<std::int32_t*>(p)[i] = std::int32_t(v); break;
  }
}
}  // namespace detail

namespace detail {
// n elements of dtype `s` at src → dtype `d` at dst (contiguous host buffers). The pairs weights take (f32 with
// bf16/f16) are tight loops the compiler vectorises; the rest go through double.
inline void convert_n(const void* src, DType s, void* dst, DType d, std::int64_t n) {
  if (n <= 0) return;
  if (s == d) {
    std::memcpy(dst, src, std::size_t(n) * size_of(s));
  } else if (s == DType::bf16 && d == DType::f32) {
    const auto* in = static_cast<const std::uint16_t*>(src);
    auto* out = static_cast<float*>(dst);  // bf16 is the top half of an f32: widening is a shift
    for (std::int64_t i = 0; i < n; ++i) out[i] = bits_float(std::uint32_t(in[i]) << 16);
  } else if (s == DType::f32 && d == DType::bf16) {
    const auto* in = static_cast<const float*>(src);
    auto* out = static_cast<bf16_t*>(dst);
    for (std::int64_t i = 0; i < n; ++i) out[i] = to_bf16(in[i]);
  } else if (s == DType::f16 && d == DType::f32) {
    const auto* in = static_cast<const f16_t*>(src);
    auto* out = static_cast<float*>(dst);
    for (std::int64_t i = 0; i < n; ++i) out[i] = to_float(in[i]);
  } else if (s == DType::f32 && d == DType::f16) {
    const auto* in = static_cast<const float*>(src);
    auto* out = static_cast<f16_t*>(dst);
    for (std::int64_t i = 0; i < n; ++i) out[i] = to_f16(in[i]);
  } else {
    for (std::int64_t i = 0; i < n; ++i) store_from_double(dst, d, i, load_as_double(src, s, i));
  }
}
}  // namespace detail

inline Tensor Tensor::to(DType dtype) const {
  CUMO_CHECK(device() == Device::cpu, "Tensor::to(dtype): conversion runs on the CPU; move the tensor first");
  Tensor c = contiguous_();
  if (dtype == dtype_) return c.clone();
  Tensor t = empty(shape_, dtype);
  detail::convert_n(c.raw(), dtype_, t.raw(), dtype, numel());
  return t;
}

// dst ← src converted to dst's dtype (same shape; dst contiguous; either may be on a device: conversions run on the
// host). Into a host tensor it converts in place, without a temporary of src's size.
inline void copy_converted(Tensor& dst, const Tensor& src) {
  if (src.dtype() == dst.dtype()) {
    dst.copy_from(src);
    return;
  }
  CUMO_CHECK(src.shape() == dst.shape(), "copy_converted: source has shape ", src.shape(), " but destination has ",
             dst.shape());
  CUMO_CHECK(dst.is_contiguous(), "copy_converted: destination must be contiguous");
  const Tensor host = src.device() == Device::cpu ? src.contiguous() : src.to(Device::cpu);
  if (dst.device() == Device::cpu) {
    detail::convert_n(host.raw(), host.dtype(), dst.raw(), dst.dtype(), dst.numel());
    return;
  }
  dst.copy_from(host.to(dst.dtype()).to(dst.device()));
}

// ---- checks used at public entry points ---------------------------------------------------------------------
// check_shape("SparseMoE::forward", "x", x, {-1, hidden}) — an extent of -1 accepts anything.
inline void check_shape(std::string_view where, std::string_view name, const Tensor& t,
                        std::initializer_list<std::int64_t> expected) {
  CUMO_CHECK(t.defined(), where, ": ", name, " is undefined");
  bool ok = t.dim() == int(expected.size());
  int d = 0;
  for (auto e : expected) {
    if (ok && e >= 0 && t.size(d) != e) ok = false;
    ++d;
  }
  if (!ok) {
    std::string want = "(";
    d = 0;
    for (auto e : expected) want += (d++ ? ", " : "") + (e < 0 ? std::string("*") : std::to_string(e));
    if (expected.size() == 1) want += ",";
    want += ")";
    fail(where, ": ", name, " has shape ", t.shape(), " but expected ", want);
  }
}
inline void check_dtype(std::string_view where, std::string_view name, const Tensor& t, DType want) {
  CUMO_CHECK(t.dtype() == want, where, ": ", name, " has dtype ", name_of(t.dtype()), " but expected ",
             name_of(want));
}
inline void check_device(std::string_view where, std::string_view name, const Tensor& t, Device want) {
  CUMO_CHECK(t.device() == want, where, ": ", name, " is on ", name_of(t.device()), " but expected ",
             name_of(want));
}
inline void check_same_shape(std::string_view where, std::string_view a_name, const Tensor& a,
                             std::string_view b_name, const Tensor& b) {
  CUMO_CHECK(a.shape() == b.shape(), where, ": ", a_name, " has shape ", a.shape(), " but ", b_name, " has shape ",
             b.shape());
}

}  // namespace cumo
