#!/usr/bin/env python3
"""How fast can the demo's vision tower learn shape? (docs/results.md, section 1)

Trains the demo's CLIP-like tower in PyTorch (pre-LN ViT: patch conv without bias, CLS, learned positions,
pre-LayerNorm; H 64, 4 heads, FFN 256) on one object per image (circle / square / triangle of random colour, radius
15-20 % of the side, as the shapes world draws them) and reports held-out accuracy four times during training. The
readout is what differs:
  mean     a linear head on the mean of the patch tokens (direct supervision)
  cls      a linear head on the CLS token (direct supervision)
  decoder  the patch tokens through an MLP connector into a 2-layer causal decoder (H 128, FFN 384) with 4
           learned query tokens after them, the head on the last one: the path the LLM gives the tower in CuMo

  /usr/bin/python3 scripts/shape_probe.py --size 64 --patch 8 --readout decoder --steps 800

Needs torch (Debian's python3-torch); CPU, about a minute per 800 steps on 2 threads.
"""
import argparse
import math

import torch


def render(n, S, gen):
    """n images (n, 3, S, S) normalised around 0, and their shape labels (0 circle, 1 square, 2 triangle)."""
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    imgs = torch.full((n, 3, S, S), 0.2)
    labels = torch.randint(0, 3, (n,), generator=gen)
    for i in range(n):
        r = (0.15 + 0.05 * torch.rand(1, generator=gen).item()) * S
        k = labels[i].item()
        half = r * math.sqrt(math.pi) / 2  # a square of the circle's area
        bound = {0: r, 1: half * math.sqrt(2), 2: r * 1.3}[k]
        cx = bound + 0.5 + torch.rand(1, generator=gen).item() * (S - 2 * bound - 1)
        cy = bound + 0.5 + torch.rand(1, generator=gen).item() * (S - 2 * bound - 1)
        dx, dy = xx - cx, yy - cy
        if k == 0:
            m = dx * dx + dy * dy <= r * r
        elif k == 1:
            m = (dx.abs() <= half) & (dy.abs() <= half)
        else:  # upward triangle
            a = r * 2.7
            m = (dy <= a / (2 * math.sqrt(3))) & (dy >= -a / math.sqrt(3) + math.sqrt(3) * dx.abs())
        imgs[i][:, m] = torch.rand(3, generator=gen)[:, None]
    return (imgs - 0.5) / 0.25, labels


class Probe(torch.nn.Module):
    def __init__(self, S, P, layers, readout, H=64):
        super().__init__()
        self.readout, self.H = readout, H
        n = (S // P) ** 2
        self.patch = torch.nn.Conv2d(3, H, P, P, bias=False)
        self.pos = torch.nn.Parameter(torch.randn(n + 1, H) * 0.02)
        self.cls = torch.nn.Parameter(torch.randn(H) * 0.02)
        self.pre_ln = torch.nn.LayerNorm(H)
        layer = torch.nn.TransformerEncoderLayer(H, 4, 4 * H, 0.0, activation="gelu", batch_first=True, norm_first=True)
        self.tower = torch.nn.TransformerEncoder(layer, layers)
        if readout == "decoder":
            D = 128
            self.connector = torch.nn.Sequential(torch.nn.Linear(H, D), torch.nn.GELU(), torch.nn.Linear(D, D))
            self.queries = torch.nn.Parameter(torch.randn(4, D) * 0.02)
            dec = torch.nn.TransformerEncoderLayer(D, 4, 384, 0.0, activation="gelu", batch_first=True, norm_first=True)
            self.decoder = torch.nn.TransformerEncoder(dec, 2)
            self.head = torch.nn.Linear(D, 3)
        else:
            self.head = torch.nn.Linear(H, 3)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, H)
        B = p.shape[0]
        t = self.tower(self.pre_ln(torch.cat([self.cls.expand(B, 1, self.H), p], 1) + self.pos))
        if self.readout == "mean":
            return self.head(t[:, 1:].mean(1))
        if self.readout == "cls":
            return self.head(t[:, 0])
        seq = torch.cat([self.connector(t[:, 1:]), self.queries.expand(B, -1, -1)], 1)
        T = seq.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf")), 1)
        return self.head(self.decoder(seq, mask=causal)[:, -1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2, help="tower layers (the demo's features use 2 of its 3)")
    ap.add_argument("--readout", choices=["mean", "cls", "decoder"], default="mean")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    model = Probe(a.size, a.patch, a.layers, a.readout)
    opt = torch.optim.AdamW(model.parameters(), a.lr, weight_decay=0.0)
    xe, ye = render(300, a.size, gen)
    print(f"size {a.size} patch {a.patch} readout {a.readout}: step, train loss, held-out accuracy (300 images)")
    for step in range(1, a.steps + 1):
        x, y = render(a.batch, a.size, gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, a.steps // 4) == 0:
            with torch.no_grad():
                acc = (model(xe).argmax(1) == ye).float().mean().item()
            print(f"{step:6d}  {loss.item():.3f}  {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
