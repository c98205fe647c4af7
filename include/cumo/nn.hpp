#pragma once
// Everything for the model layers (CPU fp32, explicit forward/backward): linear, norms, embeddings, RoPE,
// attention, MLPs, the CLIP vision tower, the decoder LMs, the LLaVA connector and composition.
#include "cumo/nn/attention.hpp"
#include "cumo/nn/connector.hpp"
#include "cumo/nn/decoder.hpp"
#include "cumo/nn/embedding.hpp"
#include "cumo/nn/layernorm.hpp"
#include "cumo/nn/linear.hpp"
#include "cumo/nn/llava.hpp"
#include "cumo/nn/mlp.hpp"
#include "cumo/nn/rmsnorm.hpp"
#include "cumo/nn/rope.hpp"
#include "cumo/nn/sampling.hpp"
#include "cumo/nn/vit.hpp"
