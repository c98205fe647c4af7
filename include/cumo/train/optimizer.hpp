#pragma once
// AdamW with torch.optim.AdamW's exact semantics (non-amsgrad, maximize=False), on fp32 master weights on any
// backend (the arithmetic: backend/cpu/optim.hpp, and its CUDA twin).
//
// One step of PyTorch's for-loop path (_single_tensor_adam with decoupled weight decay, the path PyTorch takes for
// CPU tensors; the CUDA foreach path is the same formula), hyperparameters in double as Python floats are, tensors
// in fp32, each Python scalar rounded to float where it meets a tensor:
//
//   step += 1
//   if wd != 0:  p = p * float(1 - lr*wd)                             param.mul_(1 - lr * weight_decay)
//   m = lerp(m, g, float(1 - β1))                                      exp_avg.lerp_(grad, 1 - beta1)
//   v = v * float(β2);  v = v + (float(1 - β2) * g) * g                exp_avg_sq.mul_(beta2).addcmul_(g, g, 1-beta2)
//   bc1 = 1 - β1^step;  bc2 = 1 - β2^step                   (double)
//   step_size = lr / bc1;  bc2_sqrt = bc2 ** 0.5            (double)
//   denom = sqrt(v) / float(bc2_sqrt) + float(eps)                     (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
//   p = p + (float(-step_size) * m) / denom                            param.addcdiv_(exp_avg, denom, -step_size)
//
// eps is added AFTER sqrt(v̂) (not inside it), the weight decay comes first and is decoupled (it never enters m or
// v), and both moments are bias-corrected. The evaluation order above is ATen's scalar CPU kernels' (addcmul:
// self + value*t1*t2, addcdiv: self + value*t1/t2, lerp: self + w*(end - self) for |w| < 0.5). ATen's AVX2 lerp
// fuses that last multiply-add into an FMA, so PyTorch itself differs from its own scalar path in the last ulp;
// we follow the scalar formula and test against a double-precision reference (tests/test_train_optimizer.cpp).
//
// Parameter groups carry an lr multiplier, their own weight decay, and a frozen flag: a frozen group (CuMo stage 1
// freezes everything but the connector) is never touched and gets no state, exactly like a PyTorch parameter with
// requires_grad=False. Parameters whose `trainable` flag is false are treated the same way.
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cumo/backend/contract.hpp"
#include "cumo/backend/cpu.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/train/clip.hpp"

namespace cumo::train {

struct AdamWOptions {
  double lr = 1e-3;            // used by step() without an argument; a schedule passes its own lr to step(lr)
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // torch.optim.AdamW's default; CuMo trains with 0
};

struct ParamGroup {
  std::string name;                    // names the group in messages ("connector", "vision", ...)
  ParameterList params;
  double lr_scale = 1.0;               // this group's lr = scheduled lr × lr_scale
  std::optional<double> weight_decay;  // unset: AdamWOptions::weight_decay
  bool frozen = false;                 // no update, no state
};

namespace detail {
// The backend-independent part of AdamW<B>: the groups, the options, PyTorch's per-parameter state and its
// checkpoint format (train/checkpoint.hpp reads and writes it for any backend).
class AdamWGroups {
 public:
  // Per-parameter state, as PyTorch keeps it in optimizer.state[p]: {step, exp_avg, exp_avg_sq}.
  struct State {
    std::int64_t step = 0;
    Tensor exp_avg;     // same shape and device as the parameter, f32
    Tensor exp_avg_sq;  // same shape and device as the parameter, f32
  };

  const AdamWOptions& options() const { return options_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }

  ParamGroup& group(std::string_view name) {
    for (ParamGroup& g : groups_)
      if (g.name == name) return g;
    std::string known;
    for (const ParamGroup& g : groups_) known += (known.empty() ? "'" : ", '") + g.name + "'";
    fail("AdamW::group: no group named '", name, "' (groups: ", known, ")");
  }
  void set_frozen(std::string_view group_name, bool frozen) { group(group_name).frozen = frozen; }

  // The parameters step() updates: in a non-frozen group and trainable. clip_grad_norm takes this list (frozen
  // parameters have no gradient in PyTorch, so they never count in the norm).
  ParameterList trainable_parameters() const {
    ParameterList out;
    for (const ParamGroup& g : groups_)
      if (!g.frozen)
        for (Parameter* p : g.params)
          if (p->trainable) out.push_back(p);
    return out;
  }
  // Every parameter of every group (frozen included).
  ParameterList parameters() const {
    ParameterList out;
    for (const ParamGroup& g : groups_) out.insert(out.end(), g.params.begin(), g.params.end());
    return out;
  }

  void zero_grad() {
    for (const ParamGroup& g : groups_)
      for (Parameter* p : g.params) p->grad.zero_();
  }

  // step() calls so far (each parameter's own State::step can be lower if it joined later).
  std::int64_t steps() const { return steps_; }

  // The state of `p`, or nullptr when it has none (frozen, or never stepped) — PyTorch's `p in optimizer.state`.
  const State* state(const Parameter& p) const {
    auto it = state_.find(&p);
    return it == state_.end() ? nullptr : &it->second;
  }

  // ---- checkpoints ------------------------------------------------------------------------------------------
  // Every state as named tensors, "<param>.exp_avg", "<param>.exp_avg_sq" (f32, the parameter's shape) and
  // "<param>.step" (i64, (1,)), in group order; parameters without state are absent.
  std::vector<std::pair<std::string, Tensor>> state_tensors() const {
    std::vector<std::pair<std::string, Tensor>> out;
    for (const ParamGroup& g : groups_)
      for (const Parameter* p : g.params) {
        const State* s = state(*p);
        if (!s) continue;
        Tensor st = Tensor::empty({1}, DType::i64);
        st.data<std::int64_t>()[0] = s->step;
        out.emplace_back(p->name + ".exp_avg", on_host(s->exp_avg));
        out.emplace_back(p->name + ".exp_avg_sq", on_host(s->exp_avg_sq));
        out.emplace_back(p->name + ".step", st);
      }
    return out;
  }

  // Replaces all state with the one `get(name)` provides, after validating all of it (so a bad checkpoint leaves
  // the optimizer untouched). `names` are every tensor the source holds; `get` returns one of them; `source`
  // names the file in messages. Each state must be complete (all three tensors), name a known parameter, and match
  // its shape.
  template <class Get>
  void load_state_tensors(const std::vector<std::string>& names, Get&& get, std::int64_t steps,
                          std::string_view source) {
    auto loaded = read_state(groups_, names, get, source);  // validates all of it first
    CUMO_CHECK(steps >= 0, "AdamW::load_state: ", source, ": step count ", steps, " is negative");
    for (auto& [p, st] : loaded)  // the moments live where their parameter lives
      if (p->value.device() != Device::cpu) {
        st.exp_avg = st.exp_avg.to(p->value.device());
        st.exp_avg_sq = st.exp_avg_sq.to(p->value.device());
      }
    state_ = std::move(loaded);
    steps_ = steps;
  }

  // The validation and parsing behind load_state_tensors (the tensors come back on the host).
  template <class Get>
  static std::unordered_map<const Parameter*, State> read_state(const std::vector<ParamGroup>& groups,
                                                                const std::vector<std::string>& names, Get&& get,
                                                                std::string_view source) {
    std::map<std::string, Parameter*, std::less<>> by_name;
    for (const ParamGroup& g : groups)
      for (Parameter* p : g.params) by_name.emplace(p->name, p);
    static constexpr std::string_view suffixes[] = {".exp_avg_sq", ".exp_avg", ".step"};
    std::map<std::string, int, std::less<>> parts;  // parameter name -> how many of the three tensors were seen
    for (const std::string& n : names) {
      std::string_view base;
      for (std::string_view suf : suffixes)
        if (n.size() > suf.size() && std::string_view(n).ends_with(suf)) {
          base = std::string_view(n).substr(0, n.size() - suf.size());
          break;
        }
      CUMO_CHECK(!base.empty(), "AdamW::load_state: ", source, ": tensor '", n,
                 "' is not optimizer state (expected <param>.exp_avg, .exp_avg_sq or .step)");
      CUMO_CHECK(by_name.count(base), "AdamW::load_state: ", source, ": state for '", base,
                 "', which is not a parameter of this optimizer");
      ++parts[std::string(base)];
    }
    std::unordered_map<const Parameter*, State> loaded;
    for (const auto& [name, count] : parts) {
      CUMO_CHECK(count == 3, "AdamW::load_state: ", source, ": the state of '", name,
                 "' is incomplete (needs .exp_avg, .exp_avg_sq and .step)");
      Parameter* p = by_name.find(name)->second;
      State s;
      for (const char* which : {".exp_avg", ".exp_avg_sq"}) {
        const Tensor t = get(name + which);
        CUMO_CHECK(t.shape() == p->value.shape(), "AdamW::load_state: ", source, ": '", name, which, "' has shape ",
                   t.shape(), " but parameter '", name, "' has shape ", p->value.shape());
        check_dtype("AdamW::load_state", name + which, t, DType::f32);
        Tensor copy = Tensor::empty(t.shape(), DType::f32);
        copy.copy_from(t);  // own the bytes: the source may be a memory map that goes away
        (std::string_view(which) == ".exp_avg" ? s.exp_avg : s.exp_avg_sq) = copy;
      }
      const Tensor st = get(name + ".step");
      CUMO_CHECK(st.numel() == 1 && st.dtype() == DType::i64, "AdamW::load_state: ", source, ": '", name,
                 ".step' must be one i64, got shape ", st.shape(), " dtype ", name_of(st.dtype()));
      s.step = st.contiguous().data<std::int64_t>()[0];
      CUMO_CHECK(s.step >= 1, "AdamW::load_state: ", source, ": '", name, ".step' is ", s.step, " (must be >= 1)");
      loaded.emplace(p, std::move(s));
    }
    return loaded;
  }

  void reset_state() {
    state_.clear();
    steps_ = 0;
  }

  // ---- ZeRO-1 (dist/zero.hpp) ---------------------------------------------------------------------------------
  // step() updates only the parameters `owned` says yes to, and the others keep no state here (another rank owns
  // them). An empty function: every parameter (the default).
  void set_owned(std::function<bool(const Parameter&)> owned) {
    owned_ = std::move(owned);
    if (!owned_) return;
    for (auto it = state_.begin(); it != state_.end();)
      it = owned_(*it->first) ? std::next(it) : state_.erase(it);
  }
  bool owns(const Parameter& p) const { return !owned_ || owned_(p); }
  // One parameter's state from elsewhere (its owner's), or none: what a ZeRO-1 checkpoint gathers.
  void set_state(const Parameter& p, State s) { state_[&p] = std::move(s); }
  void drop_state(const Parameter& p) { state_.erase(&p); }

 protected:
  // Checks the options and the groups; every parameter f32, contiguous, on `device`.
  AdamWGroups(std::vector<ParamGroup> groups, AdamWOptions options, const char* where, Device device)
      : groups_(std::move(groups)), options_(options) {
    CUMO_CHECK(options_.lr >= 0, where, ": lr must be >= 0, got ", options_.lr);
    CUMO_CHECK(options_.eps >= 0, where, ": eps must be >= 0, got ", options_.eps);
    CUMO_CHECK(options_.beta1 >= 0 && options_.beta1 < 1, where, ": beta1 must be in [0, 1), got ", options_.beta1);
    CUMO_CHECK(options_.beta2 >= 0 && options_.beta2 < 1, where, ": beta2 must be in [0, 1), got ", options_.beta2);
    CUMO_CHECK(options_.weight_decay >= 0, where, ": weight_decay must be >= 0, got ", options_.weight_decay);
    std::set<const Parameter*> seen;
    std::set<std::string_view> names;
    for (const ParamGroup& g : groups_) {
      CUMO_CHECK(g.lr_scale >= 0, where, ": group '", g.name, "' has lr_scale ", g.lr_scale, " (must be >= 0)");
      CUMO_CHECK(!g.weight_decay || *g.weight_decay >= 0, where, ": group '", g.name, "' has weight_decay ",
                 *g.weight_decay, " (must be >= 0)");
      for (const Parameter* p : g.params) {
        CUMO_CHECK(p, where, ": group '", g.name, "' holds a null parameter");
        // PyTorch raises the same: a parameter in two groups would be stepped twice.
        CUMO_CHECK(seen.insert(p).second, where, ": parameter '", p->name, "' appears in more than one group");
        // State is keyed by name in checkpoints, so names must be unique.
        CUMO_CHECK(names.insert(p->name).second, where, ": two parameters are both named '", p->name, "'");
        check_dtype(where, p->name, p->value, DType::f32);
        check_device(where, p->name, p->value, device);
        CUMO_CHECK(p->value.is_contiguous(), where, ": parameter '", p->name, "' is not contiguous");
      }
    }
  }

  static std::vector<ParamGroup> one_group(ParameterList params) {
    ParamGroup g;
    g.name = "default";
    g.params = std::move(params);
    return {std::move(g)};
  }
  static Tensor on_host(const Tensor& t) { return t.device() == Device::cpu ? t : t.to(Device::cpu); }

  std::vector<ParamGroup> groups_;
  AdamWOptions options_;
  std::unordered_map<const Parameter*, State> state_;
  std::int64_t steps_ = 0;
  std::function<bool(const Parameter&)> owned_;  // ZeRO-1: which parameters this rank updates (empty: all)
};
}  // namespace detail

// AdamW for parameters on backend B (the CPU by default): the groups, options, state and checkpoint format of
// detail::AdamWGroups, and the update itself as the backend's adamw_step — backend/cpu/optim.hpp, or the fused
// CUDA kernel that reproduces it bit for bit. The moments live where the parameters live.
template <backend::Backend B = backend::Cpu>
class AdamW : public detail::AdamWGroups {
 public:
  using backend_type = B;

  AdamW(std::vector<ParamGroup> groups, AdamWOptions options = {}, B backend = {})
      : AdamWGroups(std::move(groups), options, "AdamW", B::device), be_(std::move(backend)) {}
  // One group holding every parameter.
  explicit AdamW(ParameterList params, AdamWOptions options = {}, B backend = {})
      : AdamW(one_group(std::move(params)), options, std::move(backend)) {}
  // AdamW({&w, &b}) — without this, a braced list of pointers would also match vector<ParamGroup>'s
  // iterator-pair constructor and the call would be ambiguous.
  AdamW(std::initializer_list<Parameter*> params, AdamWOptions options = {})
      : AdamW(ParameterList(params), options) {}

  const B& backend() const { return be_; }

  // One update at options().lr.
  void step() { step(options_.lr); }
  // One update at `lr` (a schedule's value for this step); each group uses lr × its lr_scale and its weight decay.
  // Every gradient is checked before any state changes, so a bad one leaves the step counts as they were.
  void step(double lr) {
    CUMO_CHECK(std::isfinite(lr) && lr >= 0, "AdamW::step: lr must be finite and >= 0, got ", lr);
    for (const Parameter* p : trainable_parameters()) {
      CUMO_CHECK(p->grad.defined() && p->grad.shape() == p->value.shape(), "AdamW::step: parameter '", p->name,
                 "' has shape ", p->value.shape(), " but its gradient has shape ", p->grad.shape());
      check_dtype("AdamW::step", p->name + ".grad", p->grad, DType::f32);
      check_device("AdamW::step", p->name + ".grad", p->grad, B::device);
      CUMO_CHECK(p->grad.is_contiguous(), "AdamW::step: the gradient of '", p->name, "' is not contiguous");
    }
    std::vector<backend::AdamWSlot> slots;
    for (const ParamGroup& g : groups_) {
      if (g.frozen) continue;
      const double wd = g.weight_decay ? *g.weight_decay : options_.weight_decay;
      for (Parameter* p : g.params) {
        if (!p->trainable || !owns(*p)) continue;
        State& s = state_[p];
        if (!s.exp_avg.defined()) {  // lazy, as PyTorch: state appears at a parameter's first step
          s.exp_avg = be_.zeros(p->value.shape());
          s.exp_avg_sq = be_.zeros(p->value.shape());
        }
        ++s.step;
        backend::AdamWSlot sl;
        sl.param = p->value;
        sl.grad = p->grad;
        sl.exp_avg = s.exp_avg;
        sl.exp_avg_sq = s.exp_avg_sq;
        sl.step = s.step;
        sl.lr = lr * g.lr_scale;
        sl.weight_decay = wd;
        slots.push_back(std::move(sl));
      }
    }
    be_.adamw_step(slots, {options_.beta1, options_.beta2, options_.eps});
    ++steps_;
  }

  // Scales the trainable gradients to a global norm ≤ max_norm; returns {norm, coefficient} (2,) f32 on the
  // backend (no host sync). A non-finite norm leaves the gradients alone.
  Tensor clip_grad_norm(double max_norm) {
    CUMO_CHECK(max_norm > 0 && std::isfinite(max_norm), "AdamW::clip_grad_norm: max_norm must be finite and > 0, got ",
               max_norm);
    std::vector<Tensor> grads;
    for (Parameter* p : trainable_parameters()) grads.push_back(p->grad);
    return be_.clip_grad_norm(grads, max_norm);
  }

 private:
  [[no_unique_address]] B be_;
};
AdamW(std::vector<ParamGroup>, AdamWOptions) -> AdamW<backend::Cpu>;
AdamW(ParameterList, AdamWOptions) -> AdamW<backend::Cpu>;

// The optimizer for parameters on backend B (run_stage picks it from the model's backend).
template <class B>
struct OptimizerFor {
  using type = AdamW<B>;
};

// Global-norm clipping of the optimizer's trainable gradients (torch.nn.utils.clip_grad_norm_); returns the norm
// before clipping — one host read per step, the logged norm. A NaN/Inf gradient stops training naming the first
// parameter that holds one, the element and the step.
template <class B>
float clip_gradients(AdamW<B>& opt, double max_norm, std::int64_t step) {
  const Tensor r = opt.backend().to_host(opt.clip_grad_norm(max_norm));  // {norm, coefficient}
  const float norm = r.data<float>()[0];
  if (std::isfinite(norm)) return norm;
  detail::fail_nonfinite(opt.trainable_parameters(), norm, step,
                         [&](const Tensor& g) { return opt.backend().to_host(g); });
}

}  // namespace cumo::train
