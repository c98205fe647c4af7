#!/usr/bin/env python3
"""PyTorch baselines for the CUDA MoE layer, on the same shapes and in the same units as bench_cuda_moe.

For each SPEC shape it times, with CUDA events, in bf16:
  dense     the equal-FLOP dense pair: two GEMMs over T*K rows with the experts' FLOPs (the anchor)
  grouped   a MoE layer on torch._grouped_mm (router, stable sort by expert, gather, grouped GEMMs, weighted
            index_add combine) -- torchtitan's recipe
  hf_loop   Hugging Face Mixtral's loop: one_hot mask, for each expert with tokens: gather, MLP, scale, index_add
forward alone and forward+backward (autograd; router gradients included), and prints ms, expert TFLOP/s and the
ratio to the dense anchor measured in the same run. Run it on the GPU machine next to bench_cuda_moe:

  python3 benchmarks/torch_moe_bench.py                      # all shapes
  python3 benchmarks/torch_moe_bench.py --shape fine --iters 50 --json torch.json

Needs PyTorch >= 2.8 with CUDA on an sm_90 GPU for torch._grouped_mm (the other two run anywhere).
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = {
    # name: (T, H, F, E, K, gated)
    "mixtral": (8192, 4096, 14336, 8, 2, True),
    "fine": (8192, 2048, 768, 128, 8, True),
    "clip": (576 * 16, 1024, 4096, 4, 2, False),
}


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def fwd_flops(T, H, Fd, E, K, gated):
    rows = T * K
    f1 = 2 * Fd if gated else Fd
    return 2.0 * rows * (H * f1 + Fd * H)


class Weights:
    def __init__(self, T, H, Fd, E, K, gated, dtype, device, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        f1 = 2 * Fd if gated else Fd

        def rnd(*shape, scale):
            return ((torch.rand(*shape, generator=g, device=device) * 2 - 1) * scale).to(dtype).requires_grad_()

        self.gated = gated
        self.E, self.K, self.F = E, K, Fd
        self.wr = rnd(E, H, scale=0.05)  # router (E, H)
        self.w1 = rnd(E, f1, H, scale=0.02)  # HF fused layout: gate_up_proj (E, 2F, H) or fc1 (E, F, H)
        self.w2 = rnd(E, H, Fd, scale=0.02)  # down_proj / fc2 (E, H, F)
        self.b1 = None if gated else rnd(E, f1, scale=0.02)
        self.b2 = None if gated else rnd(E, H, scale=0.02)
        self.x = rnd(T, H, scale=1.0)
        self.dy = (torch.rand(T, H, generator=g, device=device) * 2 - 1).to(dtype)

    def params(self):
        return [p for p in (self.x, self.wr, self.w1, self.w2, self.b1, self.b2) if p is not None]

    def zero_grad(self):
        for p in self.params():
            p.grad = None


def route(w):
    logits = w.x.float() @ w.wr.float().t()  # (T, E) fp32
    probs = torch.softmax(logits, dim=-1)
    topw, topi = torch.topk(probs, w.K, dim=-1)  # (T, K)
    topw = topw / topw.sum(dim=-1, keepdim=True)
    return topw, topi


def expert_act(w, h):
    if w.gated:
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    return quick_gelu(h)


# ---- grouped_mm ---------------------------------------------------------------------------------------------------
def moe_grouped(w):
    T, H = w.x.shape
    topw, topi = route(w)
    flat = topi.reshape(-1)  # (T*K,)
    order = torch.argsort(flat, stable=True)  # slots in expert order
    counts = torch.bincount(flat, minlength=w.E)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # end offsets, what _grouped_mm takes
    tok = order // w.K
    xs = w.x[tok]  # (rows, H)
    h = torch._grouped_mm(xs, w.w1.transpose(-2, -1), offs=offs)  # (rows, F1)
    if w.b1 is not None:
        h = h + w.b1.repeat_interleave(counts, dim=0, output_size=xs.shape[0])
    a = expert_act(w, h)
    out = torch._grouped_mm(a, w.w2.transpose(-2, -1), offs=offs)  # (rows, H)
    if w.b2 is not None:
        out = out + w.b2.repeat_interleave(counts, dim=0, output_size=xs.shape[0])
    out = out * topw.reshape(-1)[order].unsqueeze(1).to(out.dtype)
    y = torch.zeros_like(w.x).index_add(0, tok, out)
    return y


# ---- Hugging Face Mixtral loop --------------------------------------------------------------------------------------
def moe_hf_loop(w):
    T, H = w.x.shape
    topw, topi = route(w)
    topw = topw.to(w.x.dtype)
    y = torch.zeros_like(w.x)
    mask = F.one_hot(topi, num_classes=w.E).permute(2, 1, 0)  # (E, K, T)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()  # host sync, as HF does
    for e in hit.flatten().tolist():
        k_idx, t_idx = torch.where(mask[e])
        cur = w.x[t_idx]
        h = cur @ w.w1[e].t()
        if w.b1 is not None:
            h = h + w.b1[e]
        a = expert_act(w, h)
        o = a @ w.w2[e].t()
        if w.b2 is not None:
            o = o + w.b2[e]
        o = o * topw[t_idx, k_idx, None]
        y = y.index_add(0, t_idx, o)
    return y


# ---- the dense anchor -----------------------------------------------------------------------------------------------
class Dense:
    def __init__(self, T, H, Fd, E, K, gated, dtype, device):
        g = torch.Generator(device=device).manual_seed(1)
        rows, f1 = T * K, (2 * Fd if gated else Fd)

        def rnd(*shape, scale):
            return ((torch.rand(*shape, generator=g, device=device) * 2 - 1) * scale).to(dtype).requires_grad_()

        self.x = rnd(rows, H, scale=1.0)
        self.w1 = rnd(f1, H, scale=0.02)
        self.a = rnd(rows, Fd, scale=1.0)
        self.w2 = rnd(H, Fd, scale=0.02)
        self.dh = torch.rand(rows, f1, generator=g, device=device).to(dtype)
        self.dy = torch.rand(rows, H, generator=g, device=device).to(dtype)

    def forward(self):
        return self.x @ self.w1.t(), self.a @ self.w2.t()

    def forward_only(self):
        with torch.no_grad():
            return self.forward()

    def fwdbwd(self):
        h, y = self.forward()
        torch.autograd.backward([h, y], [self.dh, self.dy])
        for p in (self.x, self.w1, self.a, self.w2):
            p.grad = None


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    total = 0.0
    for _ in range(iters):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        total += start.elapsed_time(stop)
    return total / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES) + ["all"], default="all")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip-loop-bwd", action="store_true", help="skip hf_loop forward+backward (slow at fine)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return 0
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16 with fp32 accumulation")
    has_grouped = hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(0) >= (9, 0)
    if not has_grouped:
        print("note: torch._grouped_mm unavailable (needs PyTorch >= 2.8 and sm_90); 'grouped' is skipped")
    results = []
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    for name in names:
        T, H, Fd, E, K, gated = SHAPES[name]
        flops = fwd_flops(T, H, Fd, E, K, gated)
        dense = Dense(T, H, Fd, E, K, gated, torch.bfloat16, dev)
        anchor = {
            "fwd": time_ms(dense.forward_only, args.warmup, args.iters),
            "fwdbwd": time_ms(dense.fwdbwd, args.warmup, args.iters),
        }
        del dense
        w = Weights(T, H, Fd, E, K, gated, torch.bfloat16, dev)
        impls = [("dense", None)]
        if has_grouped:
            impls.append(("grouped", moe_grouped))
        impls.append(("hf_loop", moe_hf_loop))
        for impl, fn in impls:
            for mode in ("fwd", "fwdbwd"):
                if impl == "dense":
                    ms = anchor[mode]
                elif impl == "hf_loop" and mode == "fwdbwd" and args.skip_loop_bwd:
                    continue
                elif mode == "fwd":
                    with torch.no_grad():
                        ms = time_ms(lambda: fn(w), args.warmup, args.iters)
                else:
                    def step():
                        y = fn(w)
                        y.backward(w.dy)
                        w.zero_grad()

                    ms = time_ms(step, args.warmup, args.iters)
                f = flops * (3 if mode == "fwdbwd" else 1)
                r = {"shape": name, "impl": impl, "mode": mode, "ms": ms, "tflops": f / ms * 1e-9,
                     "x_dense": ms / anchor[mode]}
                results.append(r)
                print(f"{name:8s} {impl:8s} {mode:7s} {ms:9.3f} ms  {r['tflops']:7.1f} TFLOP/s  "
                      f"{r['x_dense']:6.2f} x dense", flush=True)
        del w
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
