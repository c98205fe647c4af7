// must not compile: TopK<0>
#include <cumo/moe.hpp>
cumo::Router<cumo::TopK<0>> r(16, 4);
