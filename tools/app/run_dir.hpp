#pragma once
// The rules that keep a run directory (a config's "out") safe, for cumo_train (docs/training_app.md, "What a run
// may write"):
//   - One writer: a run holds an exclusive lock on <out>/.cumo_train.lock for its lifetime; a second run into the
//     same directory is refused at once instead of interleaving checkpoints.
//   - Stale temporaries go: a save killed half-way leaves a hidden sibling (.stage<s>[-partial].tmp.XXXXXX, or
//     .old.XXXXXX during a swap, .metrics.csv.tmp.XXXXXX for a file). Under the lock nobody else can be writing
//     them, so they are removed at start, each named on stderr. Only these exact names are touched.
//   - Nothing existing is replaced unless told: a checkpoint a run would write (stage<s>, stage<s>-partial) that
//     already exists is an error naming it and the two ways on (--resume to continue, --overwrite to replace).
//     --overwrite removes exactly those known directories, nothing else in <out>.
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <regex>
#include <string>
#include <vector>

#include "cumo/core/error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#endif

namespace cumo::app {

class RunDir {
 public:
  // Creates `out` if needed and takes its lock; `tool` names the writer in messages.
  RunDir(std::string out, std::string tool) : out_(std::move(out)), tool_(std::move(tool)) {
    namespace fs = std::filesystem;
    std::error_code ec;
    CUMO_CHECK(!fs::exists(out_, ec) || fs::is_directory(out_, ec), "output directory '", out_,
               "' exists and is not a directory");
    fs::create_directories(out_, ec);
    CUMO_CHECK(!ec, "cannot create the output directory '", out_, "': ", ec.message());
#if defined(__unix__) || defined(__APPLE__)
    const std::string lock = (fs::path(out_) / ".cumo_train.lock").string();
    fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    CUMO_CHECK(fd_ >= 0, "cannot open the lock file '", lock, "': ", std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      CUMO_CHECK(err != EWOULDBLOCK, "another ", tool_, " is writing into '", out_, "' (it holds ", lock,
                 "); wait for it to finish, or use another --out");
      fail("cannot lock '", lock, "': ", std::strerror(err));
    }
#endif
  }
  RunDir(const RunDir&) = delete;
  RunDir& operator=(const RunDir&) = delete;
  ~RunDir() {
#if defined(__unix__) || defined(__APPLE__)
    if (fd_ >= 0) ::close(fd_);  // closing releases the lock; the empty lock file stays (harmless, hidden)
#endif
  }

  const std::string& path() const { return out_; }
  std::string stage_dir(int s) const { return stage_dir(out_, s); }
  std::string partial_dir(int s) const { return partial_dir(out_, s); }
  // The same paths without the lock (the data-parallel ranks other than rank 0, which never write).
  static std::string stage_dir(const std::string& out, int s) {
    return (std::filesystem::path(out) / ("stage" + std::to_string(s))).string();
  }
  static std::string partial_dir(const std::string& out, int s) { return stage_dir(out, s) + "-partial"; }

  // Removes the temporaries a killed save left behind (see the header comment); returns their names.
  std::vector<std::string> clean_stale(std::ostream& log = std::cerr) const {
    namespace fs = std::filesystem;
    static const std::regex stale(
        R"(\.(stage[0-9]+(-partial)?|metrics\.csv|train_summary\.json|config\.json)\.(tmp|old)\.[A-Za-z0-9]{6})");
    std::vector<std::string> removed;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(out_, ec)) {
      const std::string name = e.path().filename().string();
      if (!std::regex_match(name, stale)) continue;
      std::error_code rec;
      const auto n = fs::remove_all(e.path(), rec);
      if (rec) {
        log << tool_ << ": note: could not remove the stale temporary '" << e.path().string() << "': " << rec.message()
            << "\n";
        continue;
      }
      log << tool_ << ": removed '" << e.path().string() << "', left by an interrupted save (" << n << " entries)\n";
      removed.push_back(name);
    }
    return removed;
  }

  // The checkpoints a run writes — for each stage in [first, last], stage<s> and stage<s>-partial, except
  // `continuing` (the checkpoint a --resume reads, which the run itself supersedes) — must not exist, unless
  // `overwrite`, which removes them. `how_to_resume` is the --resume suggestion for the message.
  void claim_stages(int first, int last, bool overwrite, const std::string& continuing = {},
                    std::ostream& log = std::cerr) const {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path keep = continuing.empty() ? fs::path() : fs::weakly_canonical(continuing, ec);
    for (int s = first; s <= last; ++s)
      for (const std::string& d : {stage_dir(s), partial_dir(s)}) {
        if (!fs::exists(d, ec)) continue;
        if (!keep.empty() && fs::weakly_canonical(d, ec) == keep) continue;
        if (overwrite) {
          fs::remove_all(d, ec);
          CUMO_CHECK(!ec, "--overwrite: cannot remove '", d, "': ", ec.message());
          log << tool_ << ": --overwrite: removed '" << d << "'\n";
          continue;
        }
        const bool partial = d.ends_with("-partial");
        fail("'", d, "' already exists (", partial ? "a stopped" : "a finished", " stage ", s,
             " of an earlier run); refusing to replace it. Continue that run with --resume ", d,
             partial || s == 3 ? "" : " (it goes on with the next stage)", ", or pass --overwrite to train stage ", s,
             " anew in '", out_, "' (removes only its stage", s, " and stage", s, "-partial checkpoints)");
      }
  }

 private:
  std::string out_, tool_;
  int fd_ = -1;
};

}  // namespace cumo::app
