"""Pictures of benchmark runs: ``python benchmarks/plot.py BENCH.json [MORE.json ...] --out FIG.png``.

Reads the JSON that ``benchmarks/run.py --json`` (or gpu_check.sh's bench.json) writes and draws one
panel per suite present, the card in the title:
  * guided step (bench_step): reference vs fast, guided and unguided, with the card's FLOP floor;
  * LoRA layers (bench_lora): forward + backward per layer and N for each backend, the per-expert
    loop and the frozen base layer; the CUDA-graph rows (GPU time alone) where measured;
  * fused update (bench_update): fraction of measured HBM bandwidth per configuration;
  * distillation (bench_distill): images/s, one pass over all experts (eager and, where measured,
    captured in a CUDA graph) vs expert by expert.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from summarize import is_valid_figure

PANELS = ("bench_step", "bench_lora", "bench_update", "bench_distill")


def load(paths) -> tuple[str, dict]:
    """(device, suite -> rows); a suite's rows come from the last file that has it (a rerun replaces
    an earlier run's rows instead of doubling them); rows without a suite are skipped."""
    devices, by_suite = [], {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        devices.append(str(data.get("device", "?")))
        mine: dict = {}
        for row in data.get("rows", []):
            if row.get("suite"):
                mine.setdefault(row["suite"], []).append(row)
        by_suite.update(mine)
    return " + ".join(dict.fromkeys(devices)), by_suite


def _figure(v):
    """v as a float where it is a time, rate or fraction to draw (finite, above 0), else None: a zero or
    NaN time in the JSON is no measurement."""
    return float(v) if is_valid_figure(v) else None


def _bar(v) -> float:
    """A bar's height: NaN (no bar) where v is missing or no valid figure, not 0 (reads as measured)."""
    f = _figure(v)
    return math.nan if f is None else f


def _step(ax, rows):
    r = rows[0]
    names = ["reference\nguided", "reference\nunguided", "fast\nguided", "fast\nunguided"]
    vals = [r.get("reference_ms"), r.get("reference_unguided_ms"), r.get("fast_ms"), r.get("fast_unguided_ms")]
    colors = ["#bbbbbb", "#dddddd", "#3b75af", "#8fb4d9"]
    for key, label in (("fast_overlap", "fast\noverlap\nguide"), ("fast_compiled_guide", "fast\ncompiled\nguide"),
                       ("fast_fused_norm_act", "fast\nfused n+a"), ("fast_unfused", "fast\nunfused"),
                       ("fast_nchw", "fast\nNCHW"), ("fast_compiled", "fast\ncompiled")):
        variant = r.get(key) or {}
        names.append(label)  # a variant whose options fell back is not the variant named: no bar
        vals.append(None if variant.get("fallbacks") or variant.get("error") else variant.get("ms"))
        colors.append("#2a5580")
    keep = [(n, v, c) for n, v, c in zip(names, map(_figure, vals), colors) if v is not None]
    bars = ax.bar([n for n, _, _ in keep], [v for _, v, _ in keep], color=[c for _, _, c in keep])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    if _figure(r.get("floor_ms")):
        ax.axhline(r["floor_ms"], color="#c44e52", ls="--", lw=1)
        ax.text(len(keep) - 0.5, r["floor_ms"], f" FLOP floor {r['floor_ms']:.0f} ms", color="#c44e52", fontsize=7,
                ha="right", va="bottom")
    ax.set_ylabel("ms per step")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"guided step: {r.get('config', '')}, batch {r.get('shape', ['?'])[0]}"
                 + (" (dark: variants, each timed in its own phase)" if len(keep) > 4 else ""), fontsize=9)


def _lora(ax, rows):
    keys = list(dict.fromkeys((r["layer"], r["N"]) for r in rows))
    wanted = [v for v in ("base", "ours[cuda_full]", "ours[cpp]", "ours[auto]", "loop", "base[cudagraph]",
                          "ours[auto,cudagraph]", "ours[cpp,cudagraph]", "ours[triton,cudagraph]",
                          "base[channels_last,cudagraph]", "ours[triton,a_stage=implicit,channels_last,cudagraph]")
              if any(r["variant"] == v and _figure(r.get("fwdbwd_ms")) for r in rows)]
    width = 0.8 / max(len(wanted), 1)
    top = 0.0
    for j, v in enumerate(wanted):
        ys = []
        for k in keys:
            hit = [r for r in rows if (r["layer"], r["N"]) == k and r["variant"] == v]
            ys.append(_bar(hit[0].get("fwdbwd_ms") if hit else None))
        ax.bar([i + (j - (len(wanted) - 1) / 2) * width for i in range(len(keys))], ys, width,
               label=v.replace("a_stage=implicit,", "implicit,").replace("channels_last", "NHWC"))
        top = max([top, *(y for y in ys if y == y)])
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{layer.split(' ')[0].replace('resnet50.', '')}\n{layer.split(' ', 1)[-1]}\nN={n}"
                        for layer, n in keys], fontsize=6)
    ax.set_ylabel("ms, forward + backward (log)")
    ax.set_title("multi-expert LoRA layer (eager; [cudagraph]: GPU time alone)", fontsize=9)
    ax.set_yscale("log")  # the per-expert loop is ~100x the graphed rows: both stay readable
    ax.set_ylim(top=top * 6 if top else None)
    ax.legend(fontsize=5.5, ncol=3, loc="upper center")


def _update(ax, rows):
    labels, cuda, triton = [], [], []
    for r in rows:
        if "cuda_hbm_fraction" not in r and "triton_hbm_fraction" not in r:
            continue
        kind = r.get("sampler", "") + {"learned_range": " learned", "fixed_large": " fixed"}.get(r.get("var_type"), "")
        dt = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(r.get("dtype")), "?")
        labels.append(f"{kind} {dt} b{r.get('shape', ['?'])[0]}")
        cuda.append(_bar(r.get("cuda_hbm_fraction")))
        triton.append(_bar(r.get("triton_hbm_fraction")))
    if not labels:  # a CPU run: no kernel bandwidth measured
        ax.axis("off")
        ax.set_title("fused guided update: no HBM fraction measured (CUDA runs only)", fontsize=9)
        return
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], cuda, 0.4, label="CUDA kernel", color="#3b75af")
    ax.bar([x + 0.2 for x in xs], triton, 0.4, label="Triton kernel", color="#dd8452")
    ax.axhline(0.8, color="#c44e52", ls="--", lw=1)
    ax.set_ylim(0, max([1.0, *(f * 1.1 for f in cuda + triton if f == f)]))
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=6, rotation=35, ha="right")
    ax.set_ylabel("fraction of measured HBM bandwidth")
    ax.set_title("fused guided update (goal 0.8, dashed)", fontsize=9)
    ax.legend(fontsize=7)


def _distill(ax, rows):
    rows = [r for r in rows if r.get("op", "distill_step") == "distill_step"]  # not the optimizer_step rows
    labels = [f"N={r['n_experts']}" for r in rows]
    series = [("sequential_img_per_s", "expert by expert", "#bbbbbb"),
              ("onepass_img_per_s", "all experts, one pass", "#3b75af"),
              ("onepass_graph_img_per_s", "one pass, CUDA graph", "#2a5580")]
    series = [sr for sr in series if any(_figure(r.get(sr[0])) for r in rows)]  # a cut run lacks some: no bar
    if not series:
        ax.set_title("distillation step: no images/s measured", fontsize=9)
        return
    width = 0.8 / len(series)
    for j, (key, label, color) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(rows))]
        ys = [_bar(r.get(key)) for r in rows]
        bars = ax.bar(xs, ys, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{y:.0f}" if y == y else "n/a" for y in ys], fontsize=7)
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels(labels)
    ax.set_ylabel("images / s")
    r = rows[0]
    ax.set_title(f"distillation step, batch {r.get('batch')} at {'x'.join(map(str, r.get('shape', [])))}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylim(0, max(_figure(r.get(key)) or 0.0 for r in rows for key, _, _ in series) * 1.2)


DRAW = {"bench_step": _step, "bench_lora": _lora, "bench_update": _update, "bench_distill": _distill}


def plot(paths, out, title: str | None = None) -> list[str]:
    """Draw the panels of the suites present in `paths` into `out`; returns the suites drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device, by_suite = load(paths)
    suites = [s for s in PANELS if by_suite.get(s)]
    if not suites:
        raise ValueError(f"no rows of {PANELS} in {[str(p) for p in paths]}")
    cols = min(2, len(suites))
    rows = (len(suites) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, s in zip(axes.flat, suites):
        DRAW[s](ax, by_suite[s])
    for ax in list(axes.flat)[len(suites):]:
        ax.axis("off")
    fig.suptitle(title or device, fontsize=11)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)  # atomic: a reader never sees half a picture
    return suites


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="bench JSON files (benchmarks/run.py --json)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: the device in the JSON)")
    a = p.parse_args(argv)
    print(f"{a.out}: {', '.join(plot(a.json, a.out, a.title))}")


if __name__ == "__main__":
    main()
