// must not compile: a Router over something that is not a TopK policy
#include <cumo/moe.hpp>
cumo::Router<int> r(16, 4);
