// must not compile: a model layer on a type that does not implement the backend contract
#include <cumo/nn/linear.hpp>
struct NotABackend {};
cumo::nn::Linear<NotABackend> l("l", 4, 4, true);
