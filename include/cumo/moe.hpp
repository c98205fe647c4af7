#pragma once
// Everything needed to build, run and train sparse MoE blocks on the CPU:
//   SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cpu>
// The CUDA backend lives in <cumo/backend/cuda.cuh> (nvcc only).
#include "cumo/backend/cpu.hpp"
#include "cumo/core.hpp"
#include "cumo/core/activation.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/routing.hpp"
#include "cumo/moe/expert.hpp"
#include "cumo/moe/router.hpp"
#include "cumo/moe/sparse_moe.hpp"
#include "cumo/moe/topk.hpp"
#include "cumo/moe/upcycle.hpp"
