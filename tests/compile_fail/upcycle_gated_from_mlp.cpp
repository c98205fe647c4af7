// must not compile: upcycling SwiGLU experts from a plain MLP's weights
#include <cumo/moe.hpp>
using Block = cumo::SparseMoE<cumo::Router<cumo::TopK<2>>, cumo::Expert<cumo::GatedMLP<cumo::SiLU>>>;
void f(cumo::Rng& rng) { auto m = cumo::upcycle_from_dense<Block>(cumo::DenseMLPWeights{}, 4, rng); }
