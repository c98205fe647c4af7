#pragma once
// Umbrella for the core types: errors, dtypes, shapes, tensors, RNG.
#include "cumo/core/compare.hpp"
#include "cumo/core/dtype.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/macros.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/shape.hpp"
#include "cumo/core/tensor.hpp"
