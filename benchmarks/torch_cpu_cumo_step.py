#!/usr/bin/env python3
"""PyTorch eager side of bench_cpu_cumo_step: one CuMo stage-3 training step on the CPU, the same model, batch,
loss and optimizer (benchmarks/cpu_step_vs_torch.sh runs both, alternating, at 1 and 2 threads).

Plain PyTorch (Debian's python3-torch 1.13 has no transformers beside it), written as HF's CLIP / LLaVA / Mistral
modules and CuMo's MoE blocks are:
  vision   Conv2d patches (no bias) + CLS + positions, pre-LayerNorm, L-1 pre-LN encoder layers (features from
           hidden state -2, so the last layer is not run here; cumo runs its attention and router, whose aux
           losses CuMo counts, but not its experts: this side does a little less work), every MLP
           (fc1, quick_gelu, fc2) a top-k-of-E MoE; CLS dropped
  connector  MLP-MoE: E experts of Linear, GELU, Linear, top-k
  LLM      Mistral: embeddings with the image features at the image tokens, RMSNorm, RoPE, GQA causal attention,
           SiLU-gated MLP, final norm, untied head
  MoE      router softmax in fp32, top-k, renormalised, the expert loop of CuMo's released code
  loss     shifted CE over the labelled tokens + balance_coef * (mean over CLIP layers + connector) of the
           top-1-count balance loss + z_coef * the z-losses
  step     zero_grad, forward, backward, clip_grad_norm_(max_grad_norm), AdamW (foreach)

  python3 benchmarks/torch_cpu_cumo_step.py [--config configs/demo.json] [--threads 1] [--steps 20] [--warmup 3]
                                           [--loss-rows]
--loss-rows computes the last LLM layer's queries, FFN and the head only on the rows from the first labelled one on,
as cumo's trainer does (the same loss and gradients); without it every row's logits, as transformers computes them.
"""
import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoE(nn.Module):
    def __init__(self, make_expert, d_in, experts, k):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d_in, experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(experts))

    def forward(self, x, groups):  # x (N, d); groups: rows per image for the balance loss
        logits = self.gate(x).float()
        p = logits.softmax(-1)
        w, idx = p.topk(self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        y = None
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if rows.numel() == 0:
                continue
            out = expert(x[rows]) * w[rows, slot, None]
            y = torch.zeros(x.shape[0], out.shape[1], dtype=x.dtype) if y is None else y
            y = y.index_add(0, rows, out)
        E = p.shape[-1]
        pg, ig = p.view(-1, groups, E), idx[:, 0].view(-1, groups)
        f = F.one_hot(ig, E).float().mean(1)  # (images, E) share of first choices
        balance = (E * (f * pg.mean(1)).sum(-1)).mean()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        return y, balance, z


class ClipMLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))


class ClipLayer(nn.Module):
    def __init__(self, h, heads, f, E, k):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.mlp = MoE(lambda: ClipMLP(h, f), h, E, k)

    def forward(self, x):
        B, T, H = x.shape
        a = self.ln1(x)
        split = lambda t: t.view(B, T, self.heads, -1).transpose(1, 2)
        q, k, v = split(self.q(a)) * (H // self.heads) ** -0.5, split(self.k(a)), split(self.v(a))
        att = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(B, T, H))
        y, bal, z = self.mlp(self.ln2(x).reshape(B * T, H), T)
        return x + y.view(B, T, H), bal, z


class RMSNorm(nn.Module):
    def __init__(self, h, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(h)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x, cos, sin):
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat((-b, a), -1) * sin


class MistralLayer(nn.Module):
    def __init__(self, h, heads, kv, f):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, h // heads
        self.n1, self.n2 = RMSNorm(h), RMSNorm(h)
        self.q, self.o = nn.Linear(h, heads * self.hd, bias=False), nn.Linear(heads * self.hd, h, bias=False)
        self.k, self.v = (nn.Linear(h, kv * self.hd, bias=False) for _ in range(2))
        self.gate, self.up = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x, cos, sin, mask, first=0):  # first > 0: the rows t >= first only (queries, FFN, output)
        B, T, H = x.shape
        Tq = T - first
        a = self.n1(x)
        q = rope(self.q(a[:, first:]).view(B, Tq, self.heads, self.hd).transpose(1, 2), cos[first:], sin[first:])
        k = rope(self.k(a).view(B, T, self.kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v(a).view(B, T, self.kv, self.hd).transpose(1, 2)
        rep = self.heads // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * self.hd ** -0.5 + mask[first:]
        x = x[:, first:] + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, -1))
        a = self.n2(x)
        return x + self.down(F.silu(self.gate(a)) * self.up(a))


class CuMo(nn.Module):
    def __init__(self, m, vocab, image_token):
        super().__init__()
        v, t, E, k = m["vision"], m["text"], m["experts"], m["top_k"]
        self.patch, self.image_token = m["patch_size"], image_token
        n = (m["image_size"] // self.patch) ** 2
        hv, ht = v["hidden"], t["hidden"]
        self.patch_embedding = nn.Conv2d(3, hv, self.patch, self.patch, bias=False)
        self.cls, self.pos = nn.Parameter(torch.randn(hv) * 0.02), nn.Parameter(torch.randn(n + 1, hv) * 0.02)
        self.pre = nn.LayerNorm(hv)
        run = v["layers"] + 1 + v.get("feature_layer", -2)
        self.vision = nn.ModuleList(ClipLayer(hv, v["heads"], v["ffn"], E, k) for _ in range(run))
        mlp = lambda: nn.Sequential(nn.Linear(hv, ht), nn.GELU(), nn.Linear(ht, ht))
        self.connector = MoE(mlp, hv, E, k)
        self.embed = nn.Embedding(vocab, ht)
        self.layers = nn.ModuleList(MistralLayer(ht, t["heads"], t.get("kv_heads", t["heads"]), t["ffn"])
                                    for _ in range(t["layers"]))
        self.norm, self.head = RMSNorm(ht), nn.Linear(ht, vocab, bias=False)
        self.theta, self.hd = t.get("rope_theta", 10000.0), ht // t["heads"]

    def forward(self, ids, labels, pixels, balance_coef, z_coef, first=0):
        B, T = ids.shape
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls.expand(B, 1, -1), x), 1) + self.pos
        x = self.pre(x)
        bal, z = [], []
        for layer in self.vision:
            x, b_, z_ = layer(x)
            bal.append(b_)
            z.append(z_)
        feats = x[:, 1:].reshape(-1, x.shape[-1])
        img, pb, pz = self.connector(feats, x.shape[1] - 1)
        h = self.embed(ids)
        h = h.masked_scatter((ids == self.image_token)[..., None], img)  # image features at the image tokens
        inv = 1.0 / self.theta ** (torch.arange(0, self.hd, 2).float() / self.hd)
        ang = torch.arange(T).float()[:, None] * inv[None]
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        mask = torch.full((T, T), float("-inf")).triu(1)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, first if i + 1 == len(self.layers) else 0)
        logits = self.head(self.norm(h))  # (B, T - first, V): row t predicts label t + 1
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, first + 1:].reshape(-1),
                             ignore_index=-100)
        return ce + balance_coef * (torch.stack(bal).mean() + pb) + z_coef * (torch.stack(z).mean() + pz)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=51)
    ap.add_argument("--labelled", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loss-rows", action="store_true",
                    help="the last LLM layer and the head on the rows from the first labelled one on only, as cumo "
                         "trains (DecoderLM::set_logit_rows); default: every row, as transformers computes them")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = json.load(open(a.config))
    m, st = cfg["model"], dict(cfg["stages"].get("defaults", {}), **cfg["stages"].get("3", {}))
    vocab = 260  # cumo's byte tokenizer, whose last id is the image token
    model = CuMo(m, vocab, vocab - 1)
    n_img = (m["image_size"] // m["patch_size"]) ** 2
    B, T = st.get("batch", 8), 1 + n_img + a.text_len
    ids = torch.randint(0, vocab - 2, (B, T))
    ids[:, 1:1 + n_img] = vocab - 1
    labels = torch.full((B, T), -100)
    labels[:, T - a.labelled:] = ids[:, T - a.labelled:]
    pixels = torch.randn(B, 3, m["image_size"], m["image_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=st.get("lr", 1e-3), weight_decay=st.get("weight_decay", 0.0),
                            foreach=True)
    clip = st.get("max_grad_norm", 1.0)
    first = T - a.labelled - 1 if a.loss_rows else 0  # the first row whose next token is labelled
    bc, zc = m.get("balance_coef", 0.1), m.get("z_coef", 0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels, pixels, bc, zc, first)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    ms = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        ms.append(1e3 * (time.perf_counter() - t0))
    params = sum(p.numel() for p in model.parameters())
    print(f"torch eager {torch.__version__}{' (loss rows)' if a.loss_rows else ''} threads {a.threads}  params {params / 1e6:.2f}M  B {B} T {T}  "
          f"step median {statistics.median(ms):.2f} ms (min {min(ms):.2f})  loss {loss:.3f}")


if __name__ == "__main__":
    main()
