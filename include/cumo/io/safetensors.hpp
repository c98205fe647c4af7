#pragma once
// safetensors read (memory-mapped, zero-copy where alignment allows); writing is io/safetensors_write.hpp, included
// at the end so that this one header gives both.
//
// File layout (https://github.com/huggingface/safetensors):
//   [u64 little-endian N][N bytes of UTF-8 JSON, may be right-padded with spaces][data section]
//   header: {"__metadata__": {"k": "v", ...},
//            "<name>": {"dtype": "F32", "shape": [8, 16], "data_offsets": [begin, end]}, ...}
//   offsets are byte offsets relative to the data section, which starts at 8 + N.
//
// Every file is treated as hostile. open()/parse() validate the whole header (types, ranges, overflow, overlap,
// coverage) before any tensor byte is touched, so get() afterwards is pointer arithmetic that is already known to
// be in bounds. Acceptance follows the reference Rust implementation: the tensors must tile the data section
// exactly, without holes, overlaps or trailing bytes (so every file cumo accepts, Hugging Face accepts too).
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/dtype.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/shape.hpp"
#include "cumo/core/tensor.hpp"

// CUMO_IO_NO_POSIX forces the portable (read-into-memory, no fsync) path, e.g. to test it on Linux.
#if (defined(__unix__) || defined(__APPLE__)) && !defined(CUMO_IO_NO_POSIX)
#define CUMO_IO_POSIX 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#else
#define CUMO_IO_POSIX 0
#include <fstream>
#include <iterator>
#endif

namespace cumo::io {

// safetensors stores little-endian data; the zero-copy views below hand those bytes to the CPU as they are.
static_assert(std::endian::native == std::endian::little,
              "cumo::io::safetensors: big-endian hosts would need a byte swap on every read and write");

struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  std::size_t begin = 0, end = 0;  // byte offsets into the data section: [begin, end)
};

namespace detail {

// The reference implementation's limit: a header this large is an attack (or a broken file), not a model.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

inline std::optional<DType> safetensors_dtype(std::string_view s) {
  if (s == "F32") return DType::f32;
  if (s == "F16") return DType::f16;
  if (s == "BF16") return DType::bf16;
  if (s == "F64") return DType::f64;
  if (s == "I64") return DType::i64;
  if (s == "I32") return DType::i32;
  return std::nullopt;
}

inline std::string_view safetensors_dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::f64: return "F64";
    case DType::i64: return "I64";
    case DType::i32: return "I32";
  }
  return "?";
}

// dtypes the format defines but cumo has no element type for: a different message than for a garbage string.
inline bool is_other_safetensors_dtype(std::string_view s) {
  static constexpr std::string_view known[] = {"BOOL", "U8",  "I8",      "I16",     "U16",     "U32",
                                               "U64",  "C64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4",
                                               "F6_E2M3", "F6_E3M2"};
  return std::find(std::begin(known), std::end(known), s) != std::end(known);
}

// Names and keys come from untrusted files: quote them with control bytes escaped and long ones cut, so an error
// message stays one readable line.
inline std::string quote_untrusted(std::string_view s) {
  constexpr std::size_t kMax = 160;
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < kMax; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += char(c);
    }
  }
  if (s.size() > kMax) out += "...";
  return out + "'";
}

// A short description of a JSON value for error messages; never dumps containers (they may be huge).
inline std::string describe(const nlohmann::json& v) {
  if (v.is_string()) return "the string " + quote_untrusted(v.get_ref<const std::string&>());
  if (v.is_number() || v.is_boolean() || v.is_null()) return v.dump();
  return std::string("a JSON ") + v.type_name();
}

// Reads a non-negative integer that fits in int64 (extents and offsets); nullopt for anything else
// (negative, fractional, too large, not a number, booleans).
inline std::optional<std::uint64_t> json_size(const nlohmann::json& v) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > std::uint64_t(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
    return u;
  }
  if (v.is_number_integer()) {
    const auto i = v.get<std::int64_t>();
    if (i < 0) return std::nullopt;
    return std::uint64_t(i);
  }
  return std::nullopt;
}

// a * b without wrapping; false when the product does not fit (portable spelling of __builtin_mul_overflow).
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

#if CUMO_IO_POSIX
// A private, copy-on-write mapping of the whole file. Writable pages so that a caller who writes into a view gets
// its own copy of the page (never the file, never a SIGSEGV on a read-only page).
struct Mapping {
  void* addr = nullptr;
  std::size_t len = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr && addr != MAP_FAILED) ::munmap(addr, len);
  }
};

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

#endif

}  // namespace detail

class SafeTensors {
 public:
  // Maps the file (POSIX mmap; a plain read elsewhere) and validates everything up front.
  // Caveat of every mmap reader: if another process truncates the file while it is mapped, touching the lost pages
  // raises SIGBUS; cumo never writes files in place (save() renames), so cumo's own writes cannot cause this.
  static SafeTensors open(const std::string& path);

  // Parses a file image held in memory (fuzzer, tests, network buffers). Views returned by get() alias `bytes`
  // and keep it alive. `name` is what error messages call the source.
  static SafeTensors parse(std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                           const std::string& name = "<memory>") {
    CUMO_CHECK(bytes, "safetensors: ", detail::quote_untrusted(name), ": no bytes given (null pointer)");
    const std::uint8_t* p = bytes->data();
    const std::size_t n = bytes->size();
    // Tensor::borrow wants a mutable keepalive; the aliasing constructor shares ownership of the vector.
    std::shared_ptr<void> keep(bytes, const_cast<std::uint8_t*>(p));
    return from_bytes(p, n, std::move(keep), name);
  }

  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }
  std::size_t size() const { return tensors_.size(); }

  const TensorInfo& info(std::string_view name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) fail(prefix(), "no tensor named ", detail::quote_untrusted(name), missing_hint(name));
    return it->second;
  }

  // Tensor names in data-offset order (the order the bytes lie in the file).
  std::vector<std::string> names() const { return order_; }

  // The tensor in its stored dtype. Zero-copy when the bytes are aligned for the dtype (always, for files that
  // cumo or the reference writer made): the view shares the mapping, which lives as long as any view of it.
  // Writes into a view stay in this process (copy-on-write map / the caller's buffer), never reach the file.
  // Misaligned data (legal in the format) is copied, so no misaligned loads ever happen.
  Tensor get(std::string_view name) const {
    const TensorInfo& ti = info(name);
    if (ti.begin == ti.end) return Tensor::empty(ti.shape, ti.dtype);  // 0 elements: nothing to map
    const std::uint8_t* p = data_ + ti.begin;
    if (reinterpret_cast<std::uintptr_t>(p) % size_of(ti.dtype) == 0)
      return Tensor::borrow(const_cast<std::uint8_t*>(p), ti.shape, ti.dtype, Device::cpu, keepalive_);
    Tensor t = Tensor::empty(ti.shape, ti.dtype);
    std::memcpy(t.raw(), p, ti.end - ti.begin);
    return t;
  }

  // The tensor converted to f32 (F16/BF16 exactly, F64 rounded, I64/I32 rounded to the nearest float).
  // F32 data comes back as the same zero-copy view get() gives.
  Tensor get_f32(std::string_view name) const {
    const TensorInfo& ti = info(name);
    if (ti.dtype == DType::f32) return get(name);
    Tensor out = Tensor::empty(ti.shape, DType::f32);
    if (ti.begin == ti.end) return out;
    float* dst = out.data<float>();
    const std::uint8_t* src = data_ + ti.begin;
    const std::int64_t n = ti.shape.numel();
    // memcpy per element: the source may be misaligned, and memcpy is the defined way to load from it.
    auto convert = [&](auto tag, auto to_f) {
      using T = decltype(tag);
      for (std::int64_t i = 0; i < n; ++i) {
        T v;
        std::memcpy(&v, src + std::size_t(i) * sizeof(T), sizeof(T));
        dst[i] = to_f(v);
      }
    };
    switch (ti.dtype) {
      case DType::f16: convert(f16_t{}, [](f16_t v) { return to_float(v); }); break;
      case DType::bf16: convert(bf16_t{}, [](bf16_t v) { return to_float(v); }); break;
      case DType::f64: convert(double{}, [](double v) { return float(v); }); break;
      case DType::i64: convert(std::int64_t{}, [](std::int64_t v) { return float(v); }); break;
      case DType::i32: convert(std::int32_t{}, [](std::int32_t v) { return float(v); }); break;
      case DType::f32: break;  // handled above
    }
    return out;
  }

  // Drops this process's copy of a mapped tensor's pages (the whole pages inside its bytes) once a loader has
  // copied it out, so loading a checkpoint larger than half the memory does not hold it twice. A later get() reads
  // the file again; writes made through a view of it are lost (loaders never write). A no-op for parsed buffers.
  void release_pages(std::string_view name) const {
#if CUMO_IO_POSIX
    if (!mapped_) return;
    const TensorInfo& ti = info(name);
    const std::uintptr_t page = std::uintptr_t(::sysconf(_SC_PAGESIZE));
    const std::uintptr_t b = (reinterpret_cast<std::uintptr_t>(data_ + ti.begin) + page - 1) / page * page;
    const std::uintptr_t e = reinterpret_cast<std::uintptr_t>(data_ + ti.end) / page * page;
    if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);  // advice: a failure costs memory only
#else
    (void)name;
#endif
  }

  // __metadata__: string keys to string values, as the format defines it.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  std::size_t header_bytes() const { return header_bytes_; }  // N, the JSON header's length (padding included)
  std::size_t data_bytes() const { return data_size_; }

 private:
  std::string prefix() const { return "safetensors: " + detail::quote_untrusted(path_) + ": "; }

  // Suggest names that differ only by a prefix (the usual "model." vs "language_model.model." mismatch).
  std::string missing_hint(std::string_view name) const {
    std::vector<std::string_view> close;
    for (const auto& n : order_) {
      const std::string_view s = n;
      if ((s.size() > name.size() && s.ends_with(name)) || (name.size() > s.size() && name.ends_with(s)))
        close.push_back(s);
      if (close.size() == 5) break;
    }
    std::string hint = " (the file has " + std::to_string(order_.size()) + " tensors";
    if (!close.empty()) {
      hint += "; similar: ";
      for (std::size_t i = 0; i < close.size(); ++i) hint += (i ? ", " : "") + detail::quote_untrusted(close[i]);
    } else if (!order_.empty()) {
      hint += ", e.g. ";
      for (std::size_t i = 0; i < order_.size() && i < 3; ++i)
        hint += (i ? ", " : "") + detail::quote_untrusted(order_[i]);
    }
    return hint + ")";
  }

  static SafeTensors from_bytes(const std::uint8_t* p, std::size_t size, std::shared_ptr<void> keepalive,
                                std::string path);
  // Validates one top-level header entry (a tensor or __metadata__) and records it.
  void add_entry(const std::string& name, const nlohmann::json& entry, bool& seen_metadata);

  std::string path_;
  std::shared_ptr<void> keepalive_;  // the mapping or the caller's vector
  bool mapped_ = false;               // keepalive_ is a private file mapping (open())
  const std::uint8_t* data_ = nullptr;  // start of the data section
  std::size_t data_size_ = 0, header_bytes_ = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

inline void SafeTensors::add_entry(const std::string& name, const nlohmann::json& entry, bool& seen_metadata) {
  const std::string pre = prefix();
  if (name == "__metadata__") {
    // While streaming, the parser callback has already moved every pair into metadata_ and left this object
    // empty; the loop still checks what a direct caller passes.
    seen_metadata = true;
    CUMO_CHECK(entry.is_object(), pre, "__metadata__ must be an object of strings, got ", detail::describe(entry));
    for (const auto& [k, v] : entry.items()) {
      CUMO_CHECK(v.is_string(), pre, "__metadata__ value for key ", detail::quote_untrusted(k),
                 " must be a string, got ", detail::describe(v));
      metadata_.emplace(k, v.get<std::string>());
    }
    return;
  }
  const std::string tn = "tensor " + detail::quote_untrusted(name);
  CUMO_CHECK(entry.is_object(), pre, tn, ": entry must be a JSON object, got ", detail::describe(entry));
  TensorInfo ti;
  ti.name = name;

  // dtype
  auto dt = entry.find("dtype");
  CUMO_CHECK(dt != entry.end(), pre, tn, ": missing field 'dtype'");
  CUMO_CHECK(dt->is_string(), pre, tn, ": 'dtype' must be a string, got ", detail::describe(*dt));
  const std::string& ds = dt->get_ref<const std::string&>();
  const auto dtype = detail::safetensors_dtype(ds);
  if (!dtype) {
    if (detail::is_other_safetensors_dtype(ds))
      fail(pre, tn, " has dtype ", detail::quote_untrusted(ds),
           ", which cumo does not support (supported: F32, F16, BF16, F64, I64, I32)");
    fail(pre, tn, " has dtype ", detail::quote_untrusted(ds), ", which is not a safetensors dtype");
  }
  ti.dtype = *dtype;

  // shape: up to Shape::kMaxDims non-negative integers whose product (of the non-zero ones) fits in int64, so
  // that numel and contiguous strides can never overflow, even for zero-element tensors.
  auto sh = entry.find("shape");
  CUMO_CHECK(sh != entry.end(), pre, tn, ": missing field 'shape'");
  CUMO_CHECK(sh->is_array(), pre, tn, ": 'shape' must be an array, got ", detail::describe(*sh));
  CUMO_CHECK(sh->size() <= std::size_t(Shape::kMaxDims), pre, tn, ": shape has ", sh->size(),
             " dimensions; cumo supports at most ", Shape::kMaxDims);
  std::uint64_t numel = 1, nonzero = 1;
  for (std::size_t i = 0; i < sh->size(); ++i) {
    const auto d = detail::json_size((*sh)[i]);
    CUMO_CHECK(d, pre, tn, ": shape entry ", i, " must be a non-negative integer, got ",
               detail::describe((*sh)[i]));
    if (*d != 0) {
      CUMO_CHECK(detail::checked_mul(nonzero, *d, &nonzero) &&
                     nonzero <= std::uint64_t(std::numeric_limits<std::int64_t>::max()),
                 pre, tn, ": shape ", sh->dump(), " has an element count that overflows 64 bits");
    }
    numel *= *d;  // cannot overflow: |numel| <= nonzero
    ti.shape.push_back(std::int64_t(*d));
  }

  // data_offsets: [begin, end] within the data section
  auto off = entry.find("data_offsets");
  CUMO_CHECK(off != entry.end(), pre, tn, ": missing field 'data_offsets'");
  CUMO_CHECK(off->is_array() && off->size() == 2, pre, tn,
             ": 'data_offsets' must be an array of two integers [begin, end], got ",
             off->is_array() ? "an array of " + std::to_string(off->size()) : detail::describe(*off));
  const auto b = detail::json_size((*off)[0]), e = detail::json_size((*off)[1]);
  CUMO_CHECK(b && e, pre, tn, ": data_offsets must be non-negative integers, got [",
             detail::describe((*off)[0]), ", ", detail::describe((*off)[1]), "]");
  CUMO_CHECK(*b <= *e, pre, tn, ": data_offsets [", *b, ", ", *e, "] have begin > end");
  CUMO_CHECK(*e <= data_size_, pre, tn, ": data_offsets [", *b, ", ", *e,
             "] run past the end of the data section (", data_size_, " bytes; truncated?)");
  std::uint64_t nbytes = 0;
  CUMO_CHECK(detail::checked_mul(numel, std::uint64_t(size_of(ti.dtype)), &nbytes) && nbytes == *e - *b, pre,
             tn, ": ", ds, " shape ", ti.shape, " needs ", numel, " x ", size_of(ti.dtype),
             " bytes but data_offsets [", *b, ", ", *e, "] span ", *e - *b);
  ti.begin = std::size_t(*b);
  ti.end = std::size_t(*e);
  tensors_.emplace(name, std::move(ti));
}

inline SafeTensors SafeTensors::from_bytes(const std::uint8_t* p, std::size_t size, std::shared_ptr<void> keepalive,
                                           std::string path) {
  SafeTensors st;
  st.path_ = std::move(path);
  st.keepalive_ = std::move(keepalive);
  const std::string pre = st.prefix();

  // ---- [u64 N][N bytes header][data] -------------------------------------------------------------------------
  CUMO_CHECK(size >= 8, pre, "file is ", size, " bytes, too short for the 8-byte header length (truncated?)");
  std::uint64_t n = 0;
  std::memcpy(&n, p, 8);
  CUMO_CHECK(n <= detail::kMaxHeaderBytes, pre, "header length ", n, " bytes exceeds the format's limit of ",
             detail::kMaxHeaderBytes, " (corrupt or not a safetensors file)");
  CUMO_CHECK(n <= size - 8, pre, "header length ", n, " runs past the end of the file (", size,
             " bytes; truncated?)");
  st.header_bytes_ = std::size_t(n);
  st.data_ = p + 8 + n;
  st.data_size_ = size - 8 - std::size_t(n);
  CUMO_CHECK(n > 0 && p[8] == '{', pre, "header does not start with '{' (not a safetensors file?)");

  // ---- JSON, validated while it streams ----------------------------------------------------------------------
  // The parser callback checks each top-level entry as soon as its closing brace is read and then discards it, so a
  // bad header fails at its first bad entry and a good one never exists as a whole DOM (memory stays a small
  // multiple of the header). While parsing it also rejects nesting deeper than the format uses and arrays longer
  // than a shape can be (so "[[[[..." or a billion-element shape cost nothing), and duplicate keys, which a DOM
  // would merge silently.
  {
    using E = nlohmann::json::parse_event_t;
    bool seen_metadata = false;
    std::string entry_name;            // the top-level key being parsed
    std::set<std::string> entry_keys;  // keys seen inside it
    std::string field;                 // the key inside the entry whose array is open
    std::size_t array_len = 0;
    auto cb = [&](int depth, E ev, nlohmann::json& v) -> bool {
      switch (ev) {
        case E::object_start:
        case E::array_start:
          CUMO_CHECK(depth <= 2, pre, "header nests deeper than the format allows (in entry ",
                     detail::quote_untrusted(entry_name), ")");
          CUMO_CHECK(depth != 2 || entry_name != "__metadata__", pre, "__metadata__ value for key ",
                     detail::quote_untrusted(field), " must be a string, got ",
                     ev == E::object_start ? "an object" : "an array");
          if (depth == 1) {
            CUMO_CHECK(ev == E::object_start, pre,
                       entry_name == "__metadata__" ? std::string("__metadata__ must be an object of strings")
                                                    : "tensor " + detail::quote_untrusted(entry_name) +
                                                          ": entry must be a JSON object",
                       ", got an array");
            entry_keys.clear();
          }
          if (depth == 2 && ev == E::array_start) array_len = 0;
          return true;
        case E::key: {
          const std::string& k = v.get_ref<const std::string&>();
          if (depth == 1) {
            const bool dup = k == "__metadata__" ? seen_metadata : st.tensors_.count(k) > 0;
            CUMO_CHECK(!dup, pre, "duplicate tensor name ", detail::quote_untrusted(k), " in the header");
            entry_name = k;
          } else if (depth == 2) {
            field = k;
            // Metadata pairs go straight into metadata_ (value event below), never into a DOM or a key set:
            // a header of millions of tiny pairs then costs one map node each.
            if (entry_name == "__metadata__") return false;
            CUMO_CHECK(entry_keys.insert(k).second, pre, "duplicate key ", detail::quote_untrusted(k),
                       " in the header entry ", detail::quote_untrusted(entry_name));
          }
          return true;
        }
        case E::value:
          if (depth == 1) {  // a scalar where an entry object belongs: add_entry reports it
            st.add_entry(entry_name, v, seen_metadata);
            return false;
          }
          if (depth == 2 && entry_name == "__metadata__") {
            CUMO_CHECK(v.is_string(), pre, "__metadata__ value for key ", detail::quote_untrusted(field),
                       " must be a string, got ", detail::describe(v));
            CUMO_CHECK(st.metadata_.emplace(field, std::move(v.get_ref<std::string&>())).second, pre,
                       "duplicate key ", detail::quote_untrusted(field), " in the header entry '__metadata__'");
            return false;
          }
          if (depth == 3 && ++array_len > std::size_t(Shape::kMaxDims)) {
            if (field == "shape")
              fail(pre, "tensor ", detail::quote_untrusted(entry_name), ": shape has more than ", Shape::kMaxDims,
                   " dimensions; cumo supports at most ", Shape::kMaxDims);
            fail(pre, "tensor ", detail::quote_untrusted(entry_name), ": ", detail::quote_untrusted(field),
                 " holds an array longer than the format allows");
          }
          return true;
        case E::object_end:
          if (depth == 1) {  // an entry is complete: validate it now, then drop its JSON
            st.add_entry(entry_name, v, seen_metadata);
            return false;
          }
          return true;
        default:
          return true;
      }
    };
    try {
      const nlohmann::json rest = nlohmann::json::parse(p + 8, p + 8 + n, cb);  // only the emptied top object
      (void)rest;
    } catch (const nlohmann::json::exception& e) {
      fail(pre, "header is not valid JSON: ", e.what());
    }
  }

  // ---- layout: the tensors must tile [0, data_size) exactly ---------------------------------------------------
  std::vector<const TensorInfo*> sorted;
  sorted.reserve(st.tensors_.size());
  for (const auto& [name, ti] : st.tensors_) sorted.push_back(&ti);
  std::sort(sorted.begin(), sorted.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  std::size_t covered = 0;
  const TensorInfo* last = nullptr;  // the tensor that ends at `covered`
  for (const TensorInfo* ti : sorted) {
    if (ti->begin < covered)
      fail(pre, "tensor ", detail::quote_untrusted(ti->name), " (bytes [", ti->begin, ", ", ti->end,
           ")) overlaps tensor ", detail::quote_untrusted(last->name), " (bytes [", last->begin, ", ", last->end, "))");
    if (ti->begin > covered)
      fail(pre, "bytes [", covered, ", ", ti->begin, ") of the data section belong to no tensor (a hole before ",
           detail::quote_untrusted(ti->name),
           "); safetensors requires the tensors to cover the data section contiguously");
    if (ti->end > covered || !last) last = ti;
    covered = ti->end;
    st.order_.push_back(ti->name);
  }
  CUMO_CHECK(covered == st.data_size_, pre, "the data section has ", st.data_size_,
             " bytes but the tensors cover only ", covered, " (", st.data_size_ - covered,
             " trailing bytes; corrupt file?)");
  return st;
}

inline SafeTensors SafeTensors::open(const std::string& path) {
  const std::string pre = "safetensors: " + detail::quote_untrusted(path) + ": ";
#if CUMO_IO_POSIX
  // O_NONBLOCK: opening a FIFO someone named by mistake must not hang; it is rejected below as not a regular file.
  detail::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  CUMO_CHECK(fd.fd >= 0, pre, "cannot open: ", std::strerror(errno));
  struct stat st {};
  CUMO_CHECK(::fstat(fd.fd, &st) == 0, pre, "cannot stat: ", std::strerror(errno));
  CUMO_CHECK(S_ISREG(st.st_mode), pre, "not a regular file");
  CUMO_CHECK(st.st_size >= 8, pre, "file is ", st.st_size,
             " bytes, too short for the 8-byte header length (truncated?)");
  CUMO_CHECK(std::uint64_t(st.st_size) <= std::numeric_limits<std::size_t>::max(), pre,
             "file is too large to map in this address space");
  auto map = std::make_shared<detail::Mapping>();
  map->len = std::size_t(st.st_size);
  map->addr = ::mmap(nullptr, map->len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.fd, 0);
  if (map->addr == MAP_FAILED) {
    const int err = errno;
    map->addr = nullptr;
    fail(pre, "cannot mmap ", map->len, " bytes: ", std::strerror(err));
  }
  const auto* p = static_cast<const std::uint8_t*>(map->addr);
  SafeTensors t = from_bytes(p, map->len, std::shared_ptr<void>(map, map->addr), path);
  t.mapped_ = true;
  return t;
#else
  std::ifstream f(path, std::ios::binary);
  CUMO_CHECK(f, pre, "cannot open");
  auto bytes = std::make_shared<std::vector<std::uint8_t>>(std::istreambuf_iterator<char>(f),
                                                           std::istreambuf_iterator<char>());
  CUMO_CHECK(!f.bad(), pre, "read error");
  return parse(std::move(bytes), path);
#endif
}

}  // namespace cumo::io

#include "cumo/io/safetensors_write.hpp"
