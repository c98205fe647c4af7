#pragma once
// cumo::Error and the checks every public entry point uses. Messages name the function, the tensor and both
// shapes, so a caller can fix the call without reading the library:
//   "SparseMoE::forward: x has shape (37, 512) but the block was built for hidden = 1024"
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace cumo {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}
}  // namespace detail

// Throws cumo::Error with the streamed parts concatenated.
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw Error(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace cumo

// CUMO_CHECK(cond, "where: ", name, " has shape ", s) — message parts are only built when the check fails.
#define CUMO_CHECK(cond, ...)                    \
  do {                                           \
    if (!(cond)) ::cumo::fail(__VA_ARGS__);      \
  } while (0)
