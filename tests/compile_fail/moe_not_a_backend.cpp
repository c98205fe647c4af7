// must not compile: SparseMoE's third argument does not implement the backend contract
#include <cumo/moe.hpp>
cumo::SparseMoE<cumo::Router<cumo::TopK<2>>, cumo::Expert<cumo::MLP<cumo::GELU>>, int> m(16, 32, 4);
