// must not compile: Expert over something that is neither MLP<Act> nor GatedMLP<Act>
#include <cumo/moe.hpp>
cumo::Expert<cumo::GELU> e(4, 16, 32);
