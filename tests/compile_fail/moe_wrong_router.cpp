// must not compile: SparseMoE's first argument is not a Router
#include <cumo/moe.hpp>
cumo::SparseMoE<cumo::TopK<2>, cumo::Expert<cumo::MLP<cumo::GELU>>> m(16, 32, 4);
