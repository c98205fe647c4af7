#pragma once
// The CPU training engine: AdamW (PyTorch semantics) with parameter groups, the cosine-with-warmup schedule,
// global-norm gradient clipping, cross-entropy as HF's causal-LM loss, gradient accumulation, and atomic
// checkpoints that resume bitwise. See docs/training.md.
#include "cumo/train/accumulate.hpp"
#include "cumo/train/checkpoint.hpp"
#include "cumo/train/clip.hpp"
#include "cumo/train/loss.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo/train/schedule.hpp"
