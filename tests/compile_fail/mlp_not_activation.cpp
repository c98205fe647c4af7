// must not compile: MLP<int> — int is not an Activation (no f/df/name)
#include <cumo/moe.hpp>
cumo::Expert<cumo::MLP<int>> e(4, 16, 32);
