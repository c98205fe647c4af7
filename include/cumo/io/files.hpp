#pragma once
// Small file helpers every writer and reader of the project shares: whole-file reads, atomic replacement (a crash leaves the old file
// or the new one, never a truncated one), and the "regular files only" rule of every reader (a FIFO or a directory
// in a file's place is refused with a message instead of hanging or failing obscurely).
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "cumo/core/error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace cumo::io {

// Refuses anything but an existing regular file, naming `path` and what it is instead.
inline void require_regular_file(const std::string& path, std::string_view where) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (ec || !fs::exists(st)) fail(where, ": cannot open '", path, "': it does not exist");
  if (fs::is_directory(st)) fail(where, ": '", path, "' is a directory, not a file");
  if (!fs::is_regular_file(st)) fail(where, ": '", path, "' is not a regular file (a FIFO, socket or device)");
}

// The whole of a regular file (refused as require_regular_file refuses), naming `path` on any error.
inline std::vector<std::uint8_t> read_file_bytes(const std::string& path, std::string_view where) {
  require_regular_file(path, where);
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(where, ": cannot open '", path, "': ", std::strerror(errno));
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) fail(where, ": read error on '", path, "'");
  return bytes;
}

#if defined(__unix__) || defined(__APPLE__)
// The process's umask, read without changing it where the kernel reports it (/proc/self/status, Linux >= 4.7), else
// by the classic set-and-restore. mkstemp and mkdtemp ignore it (0600 / 0700), so what they create is given the
// mode an open() or mkdir() would have given it: 0666 / 0777 less the umask.
inline mode_t process_umask() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (f && std::getline(f, line))
    if (line.rfind("Umask:", 0) == 0) return mode_t(std::stoul(line.substr(6), nullptr, 8));
  const mode_t m = ::umask(022);
  ::umask(m);
  return m;
}
inline mode_t new_file_mode() { return mode_t(0666) & ~process_umask(); }
inline mode_t new_dir_mode() { return mode_t(0777) & ~process_umask(); }
#endif

// Replaces (or creates) `path` with the n bytes at `data`: a uniquely named temporary file beside it, made durable,
// then renamed over it, and the directory synced.
inline void write_file_atomic(const std::string& path, const void* data, std::size_t n, std::string_view where) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::string name = ".";  // appended, not "." + name: GCC 12 warns falsely (-Wrestrict) on that form
  name += target.filename().string();
  name += ".tmp.XXXXXX";
  std::string tmp = (parent / name).string();
#if defined(__unix__) || defined(__APPLE__)
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0) fail(where, ": cannot create a temporary file beside '", path, "': ", std::strerror(errno));
  // mkstemp creates 0600: keep the mode of the file replaced, or give a new one what the umask allows.
  struct stat old {};
  (void)::fchmod(fd, ::stat(path.c_str(), &old) == 0 ? (old.st_mode & 07777) : new_file_mode());
  const char* p = static_cast<const char*>(data);
  std::size_t left = n;
  while (left > 0) {
    const ssize_t w = ::write(fd, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail(where, ": write error on '", tmp, "': ", std::strerror(err));
    }
    p += w;
    left -= std::size_t(w);
  }
  (void)::fsync(fd);
  ::close(fd);
#else
  tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail(where, ": cannot create '", tmp, "'");
    f.write(static_cast<const char*>(data), std::streamsize(n));
    f.flush();
    if (!f) fail(where, ": write error on '", tmp, "'");
  }
#endif
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    std::error_code ec2;
    fs::remove(tmp, ec2);
    fail(where, ": cannot rename '", tmp, "' to '", path, "': ", ec.message());
  }
#if defined(__unix__) || defined(__APPLE__)
  const int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);  // best effort: some filesystems refuse fsync on directories
    ::close(dfd);
  }
#endif
}
inline void write_file_atomic(const std::string& path, std::string_view text, std::string_view where) {
  write_file_atomic(path, text.data(), text.size(), where);
}

}  // namespace cumo::io
