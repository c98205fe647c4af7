#!/usr/bin/env python3
"""PyTorch baseline for issue 6: one CuMo stage-3 training step (forward, backward, AdamW) on the GPU.

The model is Hugging Face's LlavaForConditionalGeneration (CLIP vision tower -> 2-layer GELU projector -> Mistral
LLM) with CuMo's stage-3 structure: every CLIP MLP and the projector replaced by a top-k-of-E sparse MoE whose
experts are copies of the dense MLP (co-upcycling), router softmax in fp32 -> top-k -> renormalise, and CuMo's
bzloss (0.1 * balance with top-1 counts, per image, + 0.01 * z-loss; mean over CLIP layers) added to the LM loss.
The MoE blocks run the HF-style expert loop (what CuMo's released code does); `--moe grouped` runs them through
torch._grouped_mm instead (sorted tokens, one grouped GEMM per projection).

It prints step time, tokens/s and model FLOP utilisation for eager and torch.compile, bf16 autocast with fp32
master weights and fp32 AdamW (fused). This is the side that cumo's own GPU training step will be compared with
(docs/benchmarks.md); cumo's model-level GPU path does not exist yet.

  python3 benchmarks/torch_cumo_step.py                       # mid-size config, eager + compile
  python3 benchmarks/torch_cumo_step.py --tiny --steps 3      # a seconds-long smoke run (CPU works too)
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def build_config(args):
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

    if args.tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8, hidden_act="quick_gelu")
        text = MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    else:
        # CLIP-B/16-like vision tower at 224 px (196 patches), a ~300M-parameter Mistral-style LLM
        vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu")
        text = MistralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
    text._attn_implementation = args.attn
    vision._attn_implementation = args.attn
    cfg = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    # transformers 4.x reads image_token_index, 5.x image_token_id
    cfg.image_token_index = cfg.image_token_id = text.vocab_size - 1
    cfg._attn_implementation = args.attn
    return cfg


class SparseMoE(nn.Module):
    """Top-k of E copies of `dense` (a module mapping (N, Hin) -> (N, Hout)), CuMo's router and aux losses."""

    def __init__(self, dense, hidden_in, experts, top_k, grouped):
        super().__init__()
        self.experts = nn.ModuleList([_copy(dense) for _ in range(experts)])
        self.gate = nn.Linear(hidden_in, experts, bias=False)
        self.E, self.k, self.grouped = experts, top_k, grouped
        self.aux = None

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, H); images are the leading dimension of x
        logits = self.gate(x2).float()  # (N, E)
        probs = logits.softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        # bzloss terms per image (leading dim), then the batch mean
        B = shape[0] if x.dim() == 3 else 1
        p_img = probs.view(B, -1, self.E)
        f = F.one_hot(idx[:, 0], self.E).float().view(B, -1, self.E).mean(1)  # top-1 counts
        balance = (self.E * (f * p_img.mean(1)).sum(-1)).mean()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        self.aux = (balance, z)
        out = None
        if self.grouped:
            out = self._grouped(x2, w, idx)
        else:
            for e, expert in enumerate(self.experts):
                rows, slot = torch.where(idx == e)
                if rows.numel() == 0:
                    continue
                y = expert(x2[rows]) * w[rows, slot, None]
                out = torch.zeros(x2.shape[0], y.shape[-1], dtype=y.dtype, device=y.device) if out is None else out
                out.index_add_(0, rows, y)
        return out.view(*shape[:-1], -1)

    def _grouped(self, x2, w, idx):
        # sort the N*k (token, slot) pairs by expert, one grouped GEMM per expert projection
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // self.k
        counts = torch.bincount(flat, minlength=self.E)
        offs = counts.cumsum(0).to(torch.int32)
        xs = x2[tokens]
        h = xs
        for li, layer in enumerate(self.experts[0].layers):
            if isinstance(layer, nn.Linear):
                W = torch.stack([e.layers[li].weight for e in self.experts]).transpose(1, 2)  # (E, in, out)
                b = torch.stack([e.layers[li].bias for e in self.experts])
                h = torch._grouped_mm(h.to(torch.bfloat16), W.to(torch.bfloat16), offs=offs)
                h = h + torch.repeat_interleave(b.to(h.dtype), counts, dim=0)
            else:
                h = layer(h)
        y = h * w.reshape(-1)[order, None].to(h.dtype)
        out = torch.zeros(x2.shape[0], y.shape[-1], dtype=y.dtype, device=y.device)
        out.index_add_(0, tokens, y)
        return out


class Seq(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for l in self.layers:
            x = l(x)
        return x


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def _copy(m):
    import copy
    return copy.deepcopy(m)


def upcycle(model, cfg, experts, top_k, grouped):
    """CuMo stage 3: every CLIP MLP and the projector become MoE blocks of copies."""
    tower = model.model.vision_tower
    vt = getattr(tower, "vision_model", tower).encoder.layers  # transformers 4.x nests a vision_model, 5.x does not
    blocks = []
    for layer in vt:
        dense = Seq(layer.mlp.fc1, QuickGELU(), layer.mlp.fc2)
        layer.mlp = SparseMoE(dense, cfg.vision_config.hidden_size, experts, top_k, grouped)
        blocks.append(layer.mlp)
    proj = model.model.multi_modal_projector
    dense = Seq(proj.linear_1, nn.GELU(), proj.linear_2)
    moe = SparseMoE(dense, cfg.vision_config.hidden_size, experts, top_k, grouped)

    class Projector(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, feats):
            return self.m(feats)

    model.model.multi_modal_projector = Projector(moe)
    return blocks, moe


def model_flops_per_step(cfg, B, T, n_img_tok, k):
    """6 * (activated parameters) * tokens for the matrices, plus attention's 12 * L * T^2 * H (fwd+bwd)."""
    v, t = cfg.vision_config, cfg.text_config
    vp = v.num_hidden_layers * (4 * v.hidden_size ** 2 + k * 2 * v.hidden_size * v.intermediate_size)
    v_tokens = B * ((v.image_size // v.patch_size) ** 2 + 1)
    pp = k * (v.hidden_size * t.hidden_size + t.hidden_size ** 2)
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    tp = t.num_hidden_layers * (2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    tp += t.hidden_size * t.vocab_size  # lm head
    mat = 6 * (vp * v_tokens + pp * B * n_img_tok + tp * B * T)
    attn = 12 * (v.num_hidden_layers * B * (v_tokens // B) ** 2 * v.hidden_size + t.num_hidden_layers * B * T * T * t.hidden_size)
    return mat + attn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=64, help="text tokens after the image tokens")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe", choices=["loop", "grouped"], default="loop")
    ap.add_argument("--attn", default="sdpa", help="HF attention implementation (sdpa, eager)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from transformers import LlavaForConditionalGeneration

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = build_config(args)
    B = args.batch
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    T = n_img + args.text_len
    flops = model_flops_per_step(cfg, B, T, n_img, args.top_k)
    results = []
    for mode in [m for m in args.modes.split(",") if m]:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg)
        blocks, proj = upcycle(model, cfg, args.experts, args.top_k, args.moe == "grouped")
        model.to(dev).train()
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=(dev == "cuda"))
        ids = torch.randint(0, cfg.text_config.vocab_size - 2, (B, T), device=dev)
        ids[:, 1:1 + n_img] = cfg.image_token_index
        labels = ids.clone()
        labels[:, :1 + n_img] = -100
        pixels = torch.randn(B, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=dev)

        def loss_fn():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda")):
                out = model(input_ids=ids, pixel_values=pixels, labels=labels)
                bal = torch.stack([b.aux[0] for b in blocks]).mean() + proj.aux[0]
                z = torch.stack([b.aux[1] for b in blocks]).mean() + proj.aux[1]
                return out.loss + 0.1 * bal + 0.01 * z

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss

        fn = step
        if mode == "compile":
            loss_fn = torch.compile(loss_fn)  # the model's forward + losses; backward via AOTAutograd
        try:
            for _ in range(args.warmup):
                fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            times = []
            for _ in range(args.steps):
                if dev == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    loss = fn()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b) / 1e3)
                else:
                    t0 = time.perf_counter()
                    loss = fn()
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 — report and go on with the next mode
            print(f"{mode}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        times.sort()
        med = times[len(times) // 2]
        r = {"mode": mode, "moe": args.moe, "batch": B, "seq": T, "params": n_params, "step_s": med,
             "tokens_per_s": B * T / med, "tflops": flops / med / 1e12,
             "mfu": flops / med / 1e12 / args.peak_tflops, "loss": float(loss)}
        results.append(r)
        print(f"{mode:8s} moe={args.moe:7s} params {n_params / 1e6:.0f}M  B {B} T {T}  step {med * 1e3:8.2f} ms  "
              f"{r['tokens_per_s']:10.0f} tok/s  {r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu']:.1f} %  "
              f"loss {r['loss']:.3f}", flush=True)
        del model, opt
        if dev == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                       "torch": torch.__version__, "flops_per_step": flops, "results": results}, f, indent=1)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
