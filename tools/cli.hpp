#pragma once
// The command-line shape the cumo tools share: `-h/--help`, switches without a value, flags that take the next
// argument, integer values checked in words, and the exit statuses 0 (help), 2 (usage error).
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <optional>
#include <string_view>

namespace cumo::cli {

// The integer value of `flag`, which must lie in [min, max]; a malformed or out-of-range one (-5 for a count,
// 99999999999999999999 that strtoll would saturate) ends the program with status 2 and a message naming tool, flag
// and value.
inline long long to_int(const char* tool, std::string_view flag, const char* v, long long min = LLONG_MIN,
                        long long max = LLONG_MAX) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v, &end, 10);
  if (!end || *end != '\0' || end == v) {
    std::cerr << tool << ": " << flag << " expects an integer, got '" << v << "'\n";
    std::exit(2);
  }
  if (errno == ERANGE || x < min || x > max) {
    std::cerr << tool << ": " << flag << " must be ";
    if (max == LLONG_MAX)
      std::cerr << ">= " << min;
    else
      std::cerr << "in [" << min << ", " << max << "]";
    std::cerr << ", got '" << v << "'\n";
    std::exit(2);
  }
  return x;
}

// The finite floating-point value of `flag`; a malformed one (or inf / nan) ends the program with status 2 and a
// message naming tool, flag and value. Ranges are the caller's to check (they are rarely integers' [min, max]).
inline double to_double(const char* tool, std::string_view flag, const char* v) {
  char* end = nullptr;
  errno = 0;
  const double x = std::strtod(v, &end);
  if (!end || *end != '\0' || end == v || errno == ERANGE || !std::isfinite(x)) {
    std::cerr << tool << ": " << flag << " expects a finite number, got '" << v << "'\n";
    std::exit(2);
  }
  return x;
}

// Walks argv. `on_switch(flag)` returns whether it took a value-less flag; every other flag takes the next
// argument and `on_value(flag, value)` returns whether it knows the flag. Returns nothing when the arguments were
// all taken, else the status main() should return (0 after --help, 2 after a usage error, both with the usage
// printed).
inline std::optional<int> parse_args(const char* tool, int argc, char** argv, void (*usage)(std::ostream&),
                                     const std::function<bool(std::string_view)>& on_switch,
                                     const std::function<bool(std::string_view, const char*)>& on_value) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view f = argv[i];
    if (f == "-h" || f == "--help") {
      usage(std::cout);
      return 0;
    }
    if (on_switch(f)) continue;
    if (i + 1 >= argc) {
      std::cerr << tool << ": " << f << " needs a value (or is unknown)\n";
      usage(std::cerr);
      return 2;
    }
    if (!on_value(f, argv[++i])) {
      std::cerr << tool << ": unknown flag " << f << "\n";
      usage(std::cerr);
      return 2;
    }
  }
  return std::nullopt;
}

}  // namespace cumo::cli
