"""Why PPAP-5 loses the dense comparisons at s = 10: better noisy segmenters, weaker gradients (shipped weights).

On the held-out digits, for each timestep t (x_t from one seeded noise draw per image), the off-the-shelf
segmentation net on x_t ("naive") against its PPAP-5 experts:
1. ink-pixel accuracy: the share of the target's ink pixels given their class (for --task semantic: the
   digit's class, so the net must recognise the digit), and the share of ink pixels called background;
2. the guidance strength: the mean per-sample L2 norm of grad_x of the mean per-pixel log-likelihood of the
   target mask, i.e. SegmentationGuide's gradient at scale 1.
Writes dense_guide_strength.png and .json. Run: python examples/dense_guide_strength.py --out examples_out
"""
import argparse
from pathlib import Path

import torch

from ppap_fast import Schedule, SegmentationGuide
from ppap_fast.cli import int_between, output_dir, positive_int  # the CLI's checks, while parsing
from ppap_fast.data import (DigitsSplits, from_uint8, ink_mask, save_figure_atomic, semantic_mask, to_uint8,
                            write_json_atomic)
from ppap_fast.demo import WEIGHTS_DIR
from ppap_fast.seg_demo import TASK_CLASSES, load_seg_guide

METHODS = ["naive", "ppap-5"]
TITLES = {"semantic": "semantic segmentation", "segmentation": "ink-stroke segmentation"}
LABELS = {"naive": "naive (clean net on x_t)", "ppap-5": "PPAP-5 (data-free)"}


def target_masks(task: str, x0, y) -> torch.Tensor:
    return semantic_mask(x0, y) if task == "semantic" else ink_mask(x0)


def measure(model, pass_t, num_classes, x0, masks, schedule, timesteps, batch=128, seed=0) -> dict:
    """Per t: ink-pixel accuracy, share of ink called background, mean per-sample gradient norm."""
    g = torch.Generator().manual_seed(seed)
    ink = masks > 0
    res = {"ink_accuracy": [], "ink_called_background": [], "grad_norm": []}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=g)
        correct = background = 0
        norms = []
        for s in range(0, len(x0), batch):
            tt = torch.full((len(x0[s:s + batch]),), t, dtype=torch.long)
            x_t = schedule.q_sample(x0[s:s + batch], tt, noise[s:s + batch])
            with torch.no_grad():
                pred = (model(x_t, tt) if pass_t else model(x_t)).argmax(1)
            m, k = masks[s:s + batch], ink[s:s + batch]
            correct += int(((pred == m) & k).sum())
            background += int(((pred == 0) & k).sum())
            guide = SegmentationGuide(model, m, 1.0, pass_t=pass_t, num_classes=num_classes)
            norms.append(guide(x_t, tt).flatten(1).norm(dim=1))
        n_ink = int(ink.sum())
        res["ink_accuracy"].append(round(correct / n_ink, 4))
        res["ink_called_background"].append(round(background / n_ink, 4))
        res["grad_norm"].append(round(float(torch.cat(norms).mean()), 4))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=output_dir, default="examples_out", help="output directory (created if missing)")
    ap.add_argument("--device", default="cpu", help="cpu only: these are tiny networks")
    ap.add_argument("--threads", type=positive_int, default=1, help="CPU threads (tiny models: more threads only spin)")
    ap.add_argument("--task", default="semantic", choices=["semantic", "segmentation"],
                    help="semantic: 11 classes (background, ink of digit 0..9); segmentation: ink strokes")
    ap.add_argument("--t-step", type=int_between(1, 999), default=50, help="spacing of the curves' timesteps")
    args = ap.parse_args()
    if args.device != "cpu":
        ap.error("--device: only cpu (the digits networks are tiny)")
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x0, y = DigitsSplits.create(0).eval  # held out: never seen by either network in training
    x0 = from_uint8(to_uint8(x0))
    masks = target_masks(args.task, x0, y)
    schedule = Schedule.create("linear", 1000)
    timesteps = list(range(0, 1000, args.t_step)) + ([999] if 999 % args.t_step else [])
    curves = {}
    for m in METHODS:
        model, pass_t, _ = load_seg_guide(WEIGHTS_DIR, m, args.task)
        curves[m] = measure(model, pass_t, TASK_CLASSES[args.task], x0, masks, schedule, timesteps)
    for m, c in curves.items():
        at = {t: i for i, t in enumerate(timesteps)}
        show = [t for t in (150, 500, 900) if t in at]
        print(f"{m}: at t = {show}: ink accuracy {[c['ink_accuracy'][at[t]] for t in show]}, "
              f"gradient norm {[c['grad_norm'][at[t]] for t in show]}")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for m, colour in zip(METHODS, ("C3", "C0")):
        axes[0].plot(timesteps, curves[m]["ink_accuracy"], marker=".", color=colour, label=f"{LABELS[m]}: ink class")
        axes[0].plot(timesteps, curves[m]["ink_called_background"], ls=":", color=colour,
                     label=f"{LABELS[m]}: ink called background")
        axes[1].plot(timesteps, curves[m]["grad_norm"], marker=".", color=colour, label=LABELS[m])
    axes[0].set(xlabel="diffusion timestep t", ylabel="share of target ink pixels", ylim=(-0.02, 1.02),
                title=f"{TITLES[args.task]} of {len(x0)} held-out noisy digits")
    axes[1].set(xlabel="diffusion timestep t", ylabel="mean per-sample L2 norm", yscale="log",
                title="guidance gradient at scale 1")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, out / "dense_guide_strength.png", dpi=90)  # a killed rerun keeps the last complete files
    write_json_atomic(out / "dense_guide_strength.json",
        {"task": args.task, "timesteps": timesteps, "num_images": len(x0), **{m: curves[m] for m in METHODS}})
    print(f"saved {out / 'dense_guide_strength.png'} and {out / 'dense_guide_strength.json'}")


if __name__ == "__main__":
    main()
