#pragma once
// The tiny CuMo the model tests share: CLIP 2 layers (width 8, 8×8 images in 4×4 patches: 4 patches + CLS per
// image), connector 8 → 12, a Mistral-style LLM of 1 layer of width 12 (GQA 3/1, head_dim 4), vocabulary 13 with
// image id 12, 4 experts top-2 at upcycling.
#include "cumo/models/cumo.hpp"

namespace cumo::test {

inline models::CuMoConfig tiny_cumo_config() {
  models::CuMoConfig c;
  nn::LlavaConfig& l = c.llava;
  l.vision.hidden = 8;
  l.vision.layers = 2;
  l.vision.heads = 2;
  l.vision.ffn = 16;
  l.vision.image_size = 8;
  l.vision.patch_size = 4;
  l.text.vocab = 13;
  l.text.hidden = 12;
  l.text.layers = 1;
  l.text.heads = 3;
  l.text.kv_heads = 1;
  l.text.head_dim = 4;
  l.text.ffn = 16;
  l.image_token_id = 12;
  c.experts = 4;
  c.top_k = 2;
  return c;
}

}  // namespace cumo::test
