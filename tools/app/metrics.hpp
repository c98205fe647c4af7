#pragma once
// What the trainers report while they run: a per-step CSV log that survives restarts, and a progress line.
//   CsvLog       one file per run; a resumed run keeps the rows it continues from (the caller says which), the
//                file rewritten atomically (temp file + rename) before new rows are appended. A file whose header
//                is not this run's is refused, never silently emptied. Line endings are normalised (CRLF read as LF).
//   ProgressBar  a single \r-rewritten line on stderr (only on a terminal).
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/io/files.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace cumo::app {

class CsvLog {
 public:
  CsvLog() = default;
  // Opens `path` for `header`. Existing rows are kept where keep(row) says so and dropped otherwise (a resumed
  // stage drops the rows past its checkpoint); `kept` / `dropped` say how many. A file with another header is an
  // error naming it, unless `fresh` (the run was told to overwrite), which starts the file anew.
  CsvLog(std::string path, std::string header, const std::function<bool(const std::string&)>& keep, bool fresh = false)
      : path_(std::move(path)), header_(std::move(header)) {
    namespace fs = std::filesystem;
    std::vector<std::string> rows;
    std::error_code ec;
    if (!fresh && fs::exists(path_, ec)) {
      CUMO_CHECK(fs::is_regular_file(path_, ec), "metrics log '", path_, "' is not a regular file");
      std::ifstream in(path_);
      CUMO_CHECK(in, "metrics log '", path_, "' cannot be read");
      std::string line;
      if (std::getline(in, line)) {
        strip_cr(line);
        CUMO_CHECK(line == header_, "metrics log '", path_, "' has other columns than this run writes (its header is '",
                   line.substr(0, 80), line.size() > 80 ? "…" : "", "'); nothing was changed. Move it away to start a new "
                   "log (or train from stage 1 with --overwrite)");
        while (std::getline(in, line)) {
          strip_cr(line);
          if (line.empty()) continue;
          if (keep(line))
            rows.push_back(line);
          else
            ++dropped_;
        }
      }
    }
    kept_ = rows.size();
    if (fs::path(path_).has_parent_path()) fs::create_directories(fs::path(path_).parent_path());
    std::string text = header_ + "\n";
    for (const auto& r : rows) text += r + "\n";
    io::write_file_atomic(path_, text, "metrics log");
    out_.open(path_, std::ios::app);
    CUMO_CHECK(out_, "metrics log '", path_, "' cannot be written");
  }

  std::size_t kept() const { return kept_; }
  std::size_t dropped() const { return dropped_; }
  const std::string& path() const { return path_; }

  // One row (without the newline), flushed at once: a kill loses at most the row being written.
  void append(const std::string& row) {
    if (!out_.is_open()) return;
    out_ << row << "\n";
    out_.flush();
  }

 private:
  static void strip_cr(std::string& s) {
    if (!s.empty() && s.back() == '\r') s.pop_back();
  }
  std::string path_, header_;
  std::size_t kept_ = 0, dropped_ = 0;
  std::ofstream out_;
};

inline bool stderr_is_tty() {
#if defined(__unix__) || defined(__APPLE__)
  return ::isatty(STDERR_FILENO) == 1;
#else
  return false;
#endif
}

inline std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const long t = long(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

// A single \r-rewritten line on stderr: stage, bar, step, loss, tokens/s, elapsed and ETA. Off when stderr is not
// a terminal (logs stay clean) or when disabled.
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled && stderr_is_tty()) {}
  void update(const std::string& stage, std::int64_t step, std::int64_t total, double loss, double ce, double tok_s,
              double elapsed, double eta) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (step != total && drawn_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    constexpr int W = 24;
    const int fill = total > 0 ? int(double(W) * double(step) / double(total)) : 0;
    std::string bar(std::size_t(fill), '#');
    bar.resize(W, '.');
    char buf[256];
    std::snprintf(buf, sizeof buf, "\r%s [%s] %lld/%lld  loss %.4f  ce %.4f  %.0f tok/s  %s < %s ", stage.c_str(),
                  bar.c_str(), (long long)step, (long long)total, loss, ce, tok_s, format_duration(elapsed).c_str(),
                  format_duration(eta).c_str());
    std::fputs(buf, stderr);
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_ && drawn_) {
      std::fputs("\n", stderr);
      std::fflush(stderr);
    }
    drawn_ = false;
  }

 private:
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace cumo::app
