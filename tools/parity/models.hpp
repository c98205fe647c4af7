#pragma once
// Parity kinds `clip_vision`, `mistral`, `qwen2`, `mixtral`, `llava`: each model is built from the fixture's
// metadata config alone (never the file name), its weights loaded through io::load_hf (the naming map included),
// run forward and backward on the fixture's inputs and objective, and every output and every parameter gradient
// is compared. A parameter with no `grad.` entry in the fixture (nothing reaches it in PyTorch: CLIP's last layer
// and post_layernorm) must come out exactly zero here too. Each runner is a template on the backend (cumo_parity
// --device cuda runs them on backend::Cuda; d pixel_values is checked on the CPU only).
#include <cmath>
#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/io/safetensors.hpp"
#include "cumo/nn.hpp"
#include "report.hpp"

namespace cumo::parity {

namespace detail {

inline constexpr double kOutputTol = 1e-4, kGradTol = 1e-3;

inline std::vector<std::int64_t> int_vector(const io::SafeTensors& f, const std::string& name) {
  const Tensor t = f.get(name).to(DType::i64);
  return std::vector<std::int64_t>(t.data<std::int64_t>(), t.data<std::int64_t>() + t.numel());
}

inline void load(const ParameterList& params, const io::SafeTensors& f) {
  io::LoadOptions opt;
  opt.prefix = "param.";
  io::load_hf(params, io::HFCheckpoint::from(f), opt);
}

inline double norm(const Tensor& t) { return rel_error(t, Tensor::zeros(t.shape(), t.dtype())); }
inline double abs_error(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to(Device::cpu).to(DType::f64), y = b.to(Device::cpu).to(DType::f64);
  double s = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) s += (x.data<double>()[i] - y.data<double>()[i]) * (x.data<double>()[i] - y.data<double>()[i]);
  return std::sqrt(s);
}

// A gradient that is zero in exact arithmetic — the key bias of attention without RoPE: a bias on every key adds the
// same q·b to a query's scores, which the softmax ignores — is rounding noise in both implementations, so a relative
// error means nothing there. Such a tensor (the fixture's norm below 1e-6) is checked in absolute terms instead.
inline constexpr double kNoiseNorm = 1e-6, kNoiseAbsTol = 1e-5;

// `want(p, whole)`: the part of the fixture's whole gradient this rank's parameter holds (its slice when its experts
// are sharded: cumo_parity --expert-parallel), by default all of it.
inline Tensor whole_gradient(const Parameter&, const Tensor& whole) { return whole; }

template <class Want = decltype(&whole_gradient)>
void check_grads(const ParameterList& params, const io::SafeTensors& f, Report& r, Want want = &whole_gradient) {
  for (Parameter* p : params) {
    const std::string name = "grad." + p->name;
    const Tensor w = f.contains(name) ? want(*p, f.get_f32(name)) : Tensor();
    if (w.defined() && norm(w) < kNoiseNorm)
      r.record(name + " (zero in exact math)", abs_error(p->grad, w), kNoiseAbsTol, "abs");
    else if (w.defined())
      r.check(name, p->grad, w, kGradTol);
    else
      r.check(name + " (none in PyTorch: must be 0)", p->grad, Tensor::zeros(p->grad.shape()), 0.0);
  }
}

// `ep` (cumo_parity --expert-parallel K, a Mixtral fixture): the sparse layers' experts sharded over the group.
// Rank 0 holds the fixture's batch and checks the outputs and the replicated gradients; the other ranks serve their
// experts through its forward and backward; every rank checks its slice of the expert gradients.
template <class Backend>
void run_decoder(const io::SafeTensors& f, const nlohmann::json& config, Report& r, dist::Communicator* ep = nullptr) {
  const nn::DecoderConfig c = nn::DecoderConfig::from_json(config);
  ParameterStorageScope storage(r.storage());
  nn::DecoderLM<Backend> m(c);
  load(m.parameters(), f);
  std::unordered_set<const Parameter*> sharded;
  if (ep)
    for (const Parameter* p : m.shard_experts(*ep)) sharded.insert(p);
  if (ep && ep->rank() != 0) {  // serve rank 0's batch; check this rank's slices
    m.serve_experts_forward();
    if (r.inference()) return r.no_gradients();
    m.serve_experts_backward();
    ParameterList mine;
    for (Parameter* p : m.parameters())
      if (sharded.count(p)) mine.push_back(p);
    check_grads(mine, f, r, [&](const Parameter&, const Tensor& whole) { return dist::rows_of_rank(*ep, whole); });
    return;
  }
  const int depth = int(4 * c.layers + 2);  // embedding, (q|k|v → o, up|gate → down) per layer, head
  const Tensor ids_t = f.get("input.input_ids");
  const std::int64_t B = ids_t.size(0), T = ids_t.size(1);
  const auto ids = int_vector(f, "input.input_ids"), labels = int_vector(f, "input.labels");
  const auto out = m.forward(ids, B, T, &labels);
  r.check("output.logits", out.logits, f.get_f32("output.logits"), r.tol(kOutputTol, depth));
  r.check("output.loss", Tensor::full<double>({1}, out.loss), f.get_f32("output.loss"), r.tol(kOutputTol, depth));
  if (f.contains("output.aux_loss"))
    r.check("output.aux_loss", Tensor::full<double>({1}, out.aux), f.get_f32("output.aux_loss"), r.tol(kOutputTol, depth));
  const auto rl = m.router_logits();
  for (std::size_t i = 0; i < rl.size(); ++i) {
    const std::string name = "output.router_logits_" + std::to_string(i);
    if (f.contains(name)) r.check(name, rl[i], f.get_f32(name), r.tol(kOutputTol, int(4 * i + 3)));
  }
  if (r.inference()) return r.no_gradients();
  m.backward_all();
  check_grads(m.parameters(), f, r, [&](const Parameter& p, const Tensor& whole) {
    return sharded.count(&p) ? dist::rows_of_rank(*ep, whole) : whole;
  });
}

}  // namespace detail

// Weight products in series from the pixels to a LLaVA's logits: the vision layers up to the feature layer, the
// connector's two, the decoder's embedding, four per layer and the head (for tol()).
inline int llava_depth(const nn::LlavaConfig& c) {
  return int(4 * (c.vision.layers - 1) + 2 + 4 * c.text.layers + 2);
}

template <class Backend = backend::Cpu>
void run_clip_vision(const io::SafeTensors& f, const nlohmann::json& config, Report& r) {
  nn::VisionConfig c = nn::VisionConfig::from_json(config);
  c.feature_layer = -2;  // the fixture's features: hidden_states[-2][:, 1:]
  ParameterStorageScope storage(r.storage());
  nn::ClipVision<Backend> m(c);
  detail::load(m.parameters(), f);
  const Tensor px = r.rounded(f.get_f32("input.pixel_values"));
  const auto out = m.forward(px, /*all_layers=*/true);
  for (std::size_t i = 0; i < out.hidden_states.size(); ++i) {  // hidden state i: after i layers of 4 products
    const std::string name = "output.hidden_state_" + std::to_string(i);
    r.check(name, out.hidden_states[i], f.get_f32(name), r.tol(detail::kOutputTol, int(4 * i)));
  }
  r.check("output.features", out.features, f.get_f32("output.features"),
          r.tol(detail::kOutputTol, int(4 * (c.layers - 1))));
  if (r.inference()) return r.no_gradients();
  const Tensor df = f.get_f32("input.dfeatures");
  m.backward(m.backend().upload(df));
  r.check("grad.input.pixel_values", m.input_grad(), f.get_f32("grad.input.pixel_values"), detail::kGradTol);
  detail::check_grads(m.parameters(), f, r);
}

template <class Backend = backend::Cpu>
void run_mistral(const io::SafeTensors& f, const nlohmann::json& config, Report& r) {
  detail::run_decoder<Backend>(f, config, r);
}
template <class Backend = backend::Cpu>
void run_qwen2(const io::SafeTensors& f, const nlohmann::json& config, Report& r) {
  detail::run_decoder<Backend>(f, config, r);
}
template <class Backend = backend::Cpu>
void run_mixtral(const io::SafeTensors& f, const nlohmann::json& config, Report& r, dist::Communicator* ep = nullptr) {
  detail::run_decoder<Backend>(f, config, r, ep);
}

template <class Backend = backend::Cpu>
void run_llava(const io::SafeTensors& f, const nlohmann::json& config, Report& r) {
  const nn::LlavaConfig c = nn::LlavaConfig::from_json(config);
  ParameterStorageScope storage(r.storage());
  nn::Llava<Backend> m(c);
  detail::load(m.parameters(), f);
  const Tensor ids_t = f.get("input.input_ids");
  const std::int64_t B = ids_t.size(0), T = ids_t.size(1);
  const auto ids = detail::int_vector(f, "input.input_ids"), labels = detail::int_vector(f, "input.labels");
  const auto out = m.forward(ids, B, T, r.rounded(f.get_f32("input.pixel_values")), &labels);
  const int depth = llava_depth(c);
  r.check("output.logits", out.logits, f.get_f32("output.logits"), r.tol(detail::kOutputTol, depth));
  r.check("output.loss", Tensor::full<double>({1}, out.loss), f.get_f32("output.loss"), r.tol(detail::kOutputTol, depth));
  if (r.inference()) return r.no_gradients();
  m.backward();
  detail::check_grads(m.parameters(), f, r);
}

}  // namespace cumo::parity
