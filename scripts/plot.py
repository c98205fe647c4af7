#!/usr/bin/env python3
"""Plots of a cumo_train run directory (or of an ablation directory).

    python3 scripts/plot.py RUN_DIR            # RUN_DIR/metrics.csv (+ RUN_DIR/expert_load.csv from cumo_eval)
    python3 scripts/plot.py --ablation ABL_DIR # ABL_DIR/seed*/<variant>/{metrics.csv,expert_load.csv,eval_results.json}

Writes, next to the inputs:
  loss_curves.png          loss and CE per step, one panel per stage; stage 3 also shows the bzloss terms
  aux_losses.png           stage 3: balance and z-loss per CLIP layer and the connector's, per step
  expert_distribution.png  share of the eval set's tokens that each expert receives, per CLIP layer and the
                           connector (CuMo paper, figure 5)
and with --ablation: ablation_accuracy.png (accuracy per question type, mean and spread over seeds, per variant)
and ablation_load.png (expert load max/mean per layer, per variant).

matplotlib comes from PyPI; it is installed (pip --user) when missing.
"""
import argparse
import csv
import glob
import json
import math
import os
import subprocess
import sys


def need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot.py: installing matplotlib from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"]
        if subprocess.call(cmd) != 0:
            subprocess.check_call(cmd[:4] + ["--user"] + cmd[4:])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(row, key):
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


def smooth(ys, k):
    if k <= 1 or len(ys) < k:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_losses(plt, run_dir, rows):
    stages = sorted({int(r["stage"]) for r in rows})
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.8), squeeze=False)
    titles = {1: "stage 1: pre-training (connector)", 2: "stage 2: pre-finetuning (all, dense)",
              3: "stage 3: instruction tuning"}
    for ax, s in zip(axes[0], stages):
        rs = [r for r in rows if int(r["stage"]) == s]
        steps = [int(r["step"]) for r in rs]
        k = max(1, len(rs) // 50)
        loss = [num(r, "loss") for r in rs]
        ce = [num(r, "ce") for r in rs]
        ax.plot(steps, loss, color="C0", alpha=0.25, lw=0.8)
        ax.plot(steps, smooth(loss, k), color="C0", label="loss (total)")
        if any(abs(a - b) > 1e-12 for a, b in zip(loss, ce)):
            ax.plot(steps, smooth(ce, k), color="C1", label="CE")
            aux = [a - b for a, b in zip(loss, ce)]
            ax2 = ax.twinx()
            ax2.plot(steps, smooth(aux, k), color="C2", lw=0.9, label="bzloss terms (right)")
            ax2.set_ylabel("0.1·balance + 0.01·z", color="C2")
            ax2.legend(loc="upper center", fontsize=8)
        ax.set_title(titles.get(s, f"stage {s}"))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, "loss_curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_aux(plt, run_dir, rows):
    rs = [r for r in rows if int(r["stage"]) == 3]
    layers = sorted({k for k in (rs[0].keys() if rs else []) if k.startswith("vision_balance_l")},
                    key=lambda k: int(k.rsplit("l", 1)[1]))
    if not rs or all(math.isnan(num(rs[-1], k)) for k in layers):
        return None
    steps = [int(r["step"]) for r in rs]
    k = max(1, len(rs) // 50)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
    for key in layers:
        li = key.rsplit("l", 1)[1]
        a1.plot(steps, smooth([num(r, key) for r in rs], k), label=f"CLIP layer {li}")
        a2.plot(steps, smooth([num(r, f"vision_z_l{li}") for r in rs], k), label=f"CLIP layer {li}")
        a3.plot(steps, smooth([num(r, f"vision_load_max_mean_l{li}") for r in rs], k), label=f"CLIP layer {li}")
    a1.plot(steps, smooth([num(r, "projector_balance") for r in rs], k), "k--", label="connector")
    a2.plot(steps, smooth([num(r, "projector_z") for r in rs], k), "k--", label="connector")
    a3.plot(steps, smooth([num(r, "projector_load_max_mean") for r in rs], k), "k--", label="connector")
    a1.set_title("balance loss (1 = balanced)")
    a2.set_title("z-loss")
    a3.set_title("expert load max/mean per step")
    for a in (a1, a2, a3):
        a.set_xlabel("stage-3 step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(run_dir, "aux_losses.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_expert_load(path):
    layers = {}
    for r in read_csv(path):
        layers.setdefault((int(r["index"]), r["layer"]), {})[int(r["expert"])] = float(r["share"])
    return [(name, [d[e] for e in sorted(d)]) for (_, name), d in sorted(layers.items())]


def plot_experts(plt, path_csv, title, out_png):
    layers = read_expert_load(path_csv)
    if not layers:
        return None
    E = max(len(s) for _, s in layers)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(layers), 3.8))
    x = list(range(len(layers)))
    bottom = [0.0] * len(layers)
    cmap = plt.get_cmap("tab10")
    for e in range(E):
        h = [s[e] if e < len(s) else 0.0 for _, s in layers]
        ax.bar(x, h, bottom=bottom, color=cmap(e), label=f"expert {e}", width=0.7)
        for xi, (b, hi) in enumerate(zip(bottom, h)):
            if hi > 0.06:
                ax.text(xi, b + hi / 2, f"{100 * hi:.0f}", ha="center", va="center", fontsize=7, color="white")
        bottom = [b + hi for b, hi in zip(bottom, h)]
    ax.set_xticks(x)
    ax.set_xticklabels([n.replace("clip.", "CLIP ") for n, _ in layers], rotation=30, ha="right")
    ax.set_ylabel("share of routed tokens")
    ax.set_ylim(0, 1)
    ax.axhline(0.25 if E == 4 else 1.0 / E, color="k", lw=0.5, ls=":")
    ax.set_title(title)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_run(plt, run_dir):
    made = []
    mpath = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(mpath):
        rows = read_csv(mpath)
        made += [plot_losses(plt, run_dir, rows), plot_aux(plt, run_dir, rows)]
    else:
        print(f"plot.py: no {mpath}", file=sys.stderr)
    epath = os.path.join(run_dir, "expert_load.csv")
    if os.path.exists(epath) and os.path.getsize(epath) > 40:
        made.append(plot_experts(plt, epath, "expert distribution on the eval set",
                                 os.path.join(run_dir, "expert_distribution.png")))
    return [m for m in made if m]


def mean_spread(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def plot_ablation(plt, abl_dir):
    results = {}
    for p in sorted(glob.glob(os.path.join(abl_dir, "seed*", "*", "eval_results.json"))):
        variant = os.path.basename(os.path.dirname(p))
        with open(p) as f:
            results.setdefault(variant, []).append(json.load(f))
    if not results:
        print(f"plot.py: no {abl_dir}/seed*/<variant>/eval_results.json", file=sys.stderr)
        return []
    order = [v for v in ["dense", "moe", "moe_nobz", "moe_scratch"] if v in results] + \
            sorted(v for v in results if v not in ("dense", "moe", "moe_nobz", "moe_scratch"))
    types = sorted({t for rs in results.values() for r in rs for t in r.get("per_type", {})}) + ["overall"]
    fig, ax = plt.subplots(figsize=(2 + 1.4 * len(types), 4))
    w = 0.8 / len(order)
    for i, v in enumerate(order):
        ms, ss = [], []
        for t in types:
            xs = [r["accuracy"] if t == "overall" else r["per_type"].get(t, {}).get("accuracy") for r in results[v]]
            m, s = mean_spread(xs)
            ms.append(m)
            ss.append(s)
        xs = [j + (i - (len(order) - 1) / 2) * w for j in range(len(types))]
        ax.bar(xs, ms, width=w, yerr=ss, capsize=2, label=f"{v} (n={len(results[v])})")
    base = []
    any_r = next(iter(results.values()))[0]
    for t in types:
        base.append(any_r["per_type"][t]["majority_baseline"] if t in any_r.get("per_type", {}) else math.nan)
    ax.scatter(range(len(types)), base, marker="_", s=400, color="k", zorder=5, label="majority answer")
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("ablations: eval accuracy (mean ± std over seeds)")
    fig.tight_layout()
    p1 = os.path.join(abl_dir, "ablation_accuracy.png")
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    made = [p1]
    moe = [v for v in order if v != "dense"]
    if moe:
        layer_names = []
        for v in moe:
            for r in results[v]:
                for n in r.get("expert_load", {}):
                    if n not in layer_names:
                        layer_names.append(n)
        if layer_names:
            fig, ax = plt.subplots(figsize=(2 + 1.0 * len(layer_names), 4))
            w = 0.8 / len(moe)
            for i, v in enumerate(moe):
                ms, ss = zip(*[mean_spread([r["expert_load"].get(n, {}).get("max_over_mean") for r in results[v]])
                               for n in layer_names])
                xs = [j + (i - (len(moe) - 1) / 2) * w for j in range(len(layer_names))]
                ax.bar(xs, ms, width=w, yerr=ss, capsize=2, label=v)
            ax.axhline(1.0, color="k", lw=0.6, ls=":")
            ax.set_xticks(range(len(layer_names)))
            ax.set_xticklabels([n.replace("clip.", "CLIP ") for n in layer_names], rotation=30, ha="right")
            ax.set_ylabel("expert load max/mean (1 = balanced)")
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.set_title("expert load on the eval set")
            fig.tight_layout()
            p2 = os.path.join(abl_dir, "ablation_load.png")
            fig.savefig(p2, dpi=120)
            plt.close(fig)
            made.append(p2)
    return made


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="a cumo_train output directory (or, with --ablation, an ablations directory)")
    ap.add_argument("--ablation", action="store_true", help="plot an ablations directory (scripts/ablations.sh)")
    a = ap.parse_args()
    plt = need_matplotlib()
    made = plot_ablation(plt, a.dir) if a.ablation else plot_run(plt, a.dir)
    for m in made:
        print("wrote", m)
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
