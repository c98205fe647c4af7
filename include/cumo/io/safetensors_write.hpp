#pragma once
// safetensors write (atomic): the plan (validated before any file is touched), the streamed image, and save() —
// a temporary file beside the target, fsync, rename over it, fsync the directory. Shares the format's helpers with
// the reader (io/safetensors.hpp, which includes this header).
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/io/files.hpp"
#include "cumo/io/safetensors.hpp"

namespace cumo::io {

namespace detail {
#if CUMO_IO_POSIX
inline void write_all(int fd, const void* p, std::size_t n, const std::string& tmp) {
  const char* c = static_cast<const char*>(p);
  while (n) {
    const ssize_t w = ::write(fd, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail("safetensors::save: writing ", quote_untrusted(tmp), " failed: ", std::strerror(errno));
    }
    c += w;
    n -= std::size_t(w);
  }
}
#endif

// Everything save() needs, decided before a file is created: validation errors never touch the disk.
struct SavePlan {
  std::string header;                                   // JSON, space-padded so 8 + header.size() is a multiple of 8
  std::vector<std::pair<std::string, Tensor>> ordered;  // in data order
  std::size_t data_bytes = 0;
};

inline SavePlan plan_save(const std::vector<std::pair<std::string, Tensor>>& tensors,
                          const std::map<std::string, std::string>& metadata, const std::string& where) {
  SavePlan plan;
  std::set<std::string_view> seen;
  for (const auto& [name, t] : tensors) {
    CUMO_CHECK(name != "__metadata__", where, ": '__metadata__' is reserved by the format and cannot name a tensor");
    CUMO_CHECK(seen.insert(name).second, where, ": duplicate tensor name ", quote_untrusted(name));
    CUMO_CHECK(t.defined(), where, ": tensor ", quote_untrusted(name), " is undefined");
    plan.ordered.emplace_back(name, t);
  }
  // Largest element first (F64/I64, then F32/I32, then F16/BF16), as the reference writer does: every tensor then
  // starts at a multiple of its own element size with no padding between tensors (the format allows no holes).
  // Stable, so tensors of one element size keep the caller's order.
  std::stable_sort(plan.ordered.begin(), plan.ordered.end(), [](const auto& a, const auto& b) {
    return size_of(a.second.dtype()) > size_of(b.second.dtype());
  });

  nlohmann::json h = nlohmann::json::object();
  if (!metadata.empty()) {
    nlohmann::json m = nlohmann::json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = std::move(m);
  }
  std::size_t offset = 0;
  for (const auto& [name, t] : plan.ordered) {
    nlohmann::json shape = nlohmann::json::array();
    for (auto d : t.shape()) shape.push_back(d);
    const std::size_t n = t.nbytes();
    h[name] = {{"dtype", safetensors_dtype_name(t.dtype())},
               {"shape", std::move(shape)},
               {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  plan.data_bytes = offset;
  try {
    plan.header = h.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": a tensor name or metadata string is not valid UTF-8 (", e.what(), ")");
  }
  // The data section starts 8-byte aligned in the file, so an mmap (page aligned) gives aligned views.
  while ((8 + plan.header.size()) % 8) plan.header.push_back(' ');
  return plan;
}

// Streams the planned file (length, header, data) to `sink`, one tensor at a time: never the whole file in memory.
inline void emit(const SavePlan& plan, const std::function<void(const void*, std::size_t)>& sink) {
  const std::uint64_t n = plan.header.size();
  sink(&n, 8);
  sink(plan.header.data(), plan.header.size());
  for (const auto& [name, t] : plan.ordered) {
    if (t.numel() == 0) continue;
    const Tensor c = t.device() == Device::cpu ? t.contiguous() : t.to(Device::cpu);
    sink(c.raw(), c.nbytes());
  }
}

}  // namespace detail

// The file image save() would write, in memory (tests, fuzzing round trips, sending over a network).
inline std::vector<std::uint8_t> serialize(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                           const std::map<std::string, std::string>& metadata = {}) {
  const detail::SavePlan plan = detail::plan_save(tensors, metadata, "safetensors::serialize");
  std::vector<std::uint8_t> out(8 + plan.header.size() + plan.data_bytes);
  std::size_t at = 0;
  detail::emit(plan, [&](const void* p, std::size_t n) {
    std::memcpy(out.data() + at, p, n);
    at += n;
  });
  return out;
}

// Writes atomically: a temporary file in the target's directory, fsync, rename over the target, fsync the
// directory. A crash or an error at any point leaves either the old file or the complete new one, never a torn
// file, and no temporary behind (on error). Tensors may be strided or on CUDA; they are copied out one at a time.
inline void save(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                 const std::map<std::string, std::string>& metadata = {}) {
  const std::string where = "safetensors::save(" + detail::quote_untrusted(path) + ")";
  const detail::SavePlan plan = detail::plan_save(tensors, metadata, where);
  namespace fs = std::filesystem;
  const fs::path target(path);
  CUMO_CHECK(!target.filename().empty(), where, ": path names a directory, not a file");
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
#if CUMO_IO_POSIX
  std::string tmp = (dir / ("." + target.filename().string() + ".tmp.XXXXXX")).string();
  detail::Fd fd(::mkstemp(tmp.data()));
  CUMO_CHECK(fd.fd >= 0, where, ": cannot create a temporary file in ", detail::quote_untrusted(dir.string()), ": ",
             std::strerror(errno));
  // From here on, any failure removes the temporary; the target is only ever replaced by rename().
  struct Unlink {
    const std::string* tmp;
    bool armed = true;
    ~Unlink() {
      if (armed) ::unlink(tmp->c_str());
    }
  } cleanup{&tmp};
  // mkstemp creates 0600; keep the mode of the file we replace, or what the umask allows a new one.
  struct stat old {};
  (void)::fchmod(fd.fd, ::stat(path.c_str(), &old) == 0 ? (old.st_mode & 07777) : io::new_file_mode());
  detail::emit(plan, [&](const void* p, std::size_t n) { detail::write_all(fd.fd, p, n, tmp); });
  CUMO_CHECK(::fsync(fd.fd) == 0, where, ": fsync of ", detail::quote_untrusted(tmp), " failed: ",
             std::strerror(errno));
  // close() can report deferred write errors (NFS), so it is checked too.
  CUMO_CHECK(::close(fd.release()) == 0, where, ": close of ", detail::quote_untrusted(tmp), " failed: ",
             std::strerror(errno));
  CUMO_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, where, ": cannot rename ", detail::quote_untrusted(tmp),
             " over the target: ", std::strerror(errno));
  cleanup.armed = false;
  // Make the rename itself durable. Best effort: the new file is already complete and in place, so a failure here
  // (some filesystems refuse fsync on directories) is not worth an exception.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
#else
  const fs::path tmp = dir / ("." + target.filename().string() + ".tmp");
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    CUMO_CHECK(f, where, ": cannot create a temporary file in ", detail::quote_untrusted(dir.string()));
    try {
      detail::emit(plan, [&](const void* p, std::size_t n) {
        f.write(static_cast<const char*>(p), std::streamsize(n));
        CUMO_CHECK(f, where, ": writing ", detail::quote_untrusted(tmp.string()), " failed");
      });
      f.flush();
      CUMO_CHECK(f, where, ": writing ", detail::quote_untrusted(tmp.string()), " failed");
    } catch (...) {
      f.close();
      std::error_code ec;
      fs::remove(tmp, ec);
      throw;
    }
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(where, ": cannot rename the temporary over the target");
  }
#endif
}

}  // namespace cumo::io

