"""Why an off-the-shelf classifier needs timestep experts to guide (shipped digits weights, nothing downloaded).

The paper's motivation, measured on the demo's networks:
1. accuracy on noisy held-out digits x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, against t: the clean
   classifier ("naive") is near chance from t = 250, its PPAP experts (distilled with no labels) hold on
   about as long as the supervised noise-aware baselines;
2. the guidance direction grad log p(y | x_t) averaged over many noisings of one held-out digit: the clean
   classifier's is an adversarial high-frequency pattern, the experts' draws the digit.
Writes why_experts.png and why_experts.json. Run: python examples/why_experts.py --out examples_out
"""
import argparse
from pathlib import Path

import torch

from ppap_fast import Schedule
from ppap_fast.cli import int_between, output_dir, positive_int  # the CLI's checks, while parsing
from ppap_fast.data import DigitsSplits, from_uint8, save_figure_atomic, to_uint8, write_json_atomic
from ppap_fast.demo import WEIGHTS_DIR, load_guide_model

ACCURACY_METHODS = ["naive", "ppap-5", "ppap-10", "noise-aware", "multi-experts-5"]
GRADIENT_METHODS = ["naive", "ppap-5", "ppap-10"]
LABELS = {"naive": "naive (clean classifier)", "ppap-5": "PPAP-5 (data-free)", "ppap-10": "PPAP-10 (data-free)",
          "noise-aware": "noise-aware (500 labels)", "multi-experts-5": "multi-experts-5 (500 labels)"}
MAX_DRAWS = 4096  # --draws is one autograd batch: far beyond this only runs out of memory


def classify(model, pass_t: bool, x_t, t):
    return model(x_t, t) if pass_t else model(x_t)


@torch.no_grad()
def noisy_accuracy(model, pass_t, x0, y, schedule, timesteps, seed=0) -> list:
    """Accuracy on x_t of every image in x0 at each t (one noise draw per image and t, seeded)."""
    g = torch.Generator().manual_seed(seed)
    accs = []
    for t in timesteps:
        tt = torch.full((len(x0),), t, dtype=torch.long)
        x_t = schedule.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        accs.append((classify(model, pass_t, x_t, tt).argmax(1) == y).float().mean().item())
    return accs


def mean_gradient(model, pass_t, x0, target, schedule, t, draws, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x log p(target | x_t) averaged over ``draws`` noisings of the one image x0 [1, C, H, W] at t,
    the first of those x_t)."""
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((draws,), t, dtype=torch.long)
    x_t = schedule.q_sample(x0.expand(draws, -1, -1, -1), tt, torch.randn((draws, *x0.shape[1:]), generator=g))
    x_t.requires_grad_(True)
    logp = classify(model, pass_t, x_t, tt).log_softmax(1)[:, target].sum()
    return torch.autograd.grad(logp, x_t)[0].mean(0), x_t[0].detach()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=output_dir, default="examples_out", help="output directory (created if missing)")
    ap.add_argument("--device", default="cpu", help="cpu only: these are tiny networks")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="CPU threads (tiny models: more threads only spin)")
    ap.add_argument("--digit", type=int_between(0, 9), default=3,
                    help="the held-out digit whose guidance direction is drawn")
    ap.add_argument("--draws", type=int_between(1, MAX_DRAWS), default=256,
                    help="noisings averaged per gradient map (one autograd batch)")
    ap.add_argument("--t-step", type=int_between(1, 999), default=50, help="spacing of the accuracy curve's timesteps")
    args = ap.parse_args()
    if args.device != "cpu":
        ap.error("--device: only cpu (the digits networks are tiny)")
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x0, y = DigitsSplits.create(0).eval  # held out: never seen by any of the networks in training
    x0 = from_uint8(to_uint8(x0))
    schedule = Schedule.create("linear", 1000)  # the UNet's and the experts' training schedule
    timesteps = list(range(0, 1000, args.t_step)) + ([999] if 999 % args.t_step else [])
    models = {m: load_guide_model(WEIGHTS_DIR, m)[:2] for m in ACCURACY_METHODS}
    curves = {m: noisy_accuracy(*models[m], x0, y, schedule, timesteps) for m in ACCURACY_METHODS}
    for m, accs in curves.items():
        print(f"{m}: accuracy on x_t at t = 0 / 200 / 400: "
              + " / ".join(f"{accs[timesteps.index(t)]:.2f}" if t in timesteps else "-" for t in (0, 200, 400)))

    grad_ts = [50, 150, 300, 450, 600]
    i = int(torch.nonzero(y == args.digit)[0, 0])
    maps, shown = {}, []
    for t in grad_ts:
        for m in GRADIENT_METHODS:
            gm, x_t = mean_gradient(*models[m], x0[i:i + 1], args.digit, schedule, t, args.draws)
            maps[(m, t)] = gm[0]
        shown.append(x_t[0])

    fig = plt.figure(figsize=(13, 4.6))
    grid = fig.add_gridspec(len(GRADIENT_METHODS) + 1, 2 + len(grad_ts), width_ratios=[3.2, 0.15] + [1] * len(grad_ts))
    ax = fig.add_subplot(grid[:, 0])
    for m in ACCURACY_METHODS:
        ax.plot(timesteps, curves[m], marker=".", label=LABELS[m], lw=2.2 if m.startswith("ppap") else 1.4,
                ls="--" if m in ("noise-aware", "multi-experts-5") else "-")
    ax.axhline(0.1, color="gray", lw=0.8, ls=":", label="chance")
    ax.set(xlabel="diffusion timestep t", ylabel="accuracy on noisy x_t",
           title=f"classifying {len(x0)} held-out noisy digits", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    for j, t in enumerate(grad_ts):
        a = fig.add_subplot(grid[0, 2 + j])
        a.imshow(shown[j], cmap="gray", vmin=-1.5, vmax=1.5)
        a.set_title(f"t = {t}", fontsize=9)
        a.set_xticks([]), a.set_yticks([])
        if j == 0:
            a.set_ylabel("one x_t", fontsize=8)
        for r, m in enumerate(GRADIENT_METHODS):
            a = fig.add_subplot(grid[r + 1, 2 + j])
            v = float(maps[(m, t)].abs().max())
            a.imshow(maps[(m, t)], cmap="RdBu_r", vmin=-v, vmax=v)
            a.set_xticks([]), a.set_yticks([])
            if j == 0:
                a.set_ylabel(m, fontsize=8)
    fig.text(0.62, 0.005, f"mean of grad log p({args.digit} | x_t) over {args.draws} noisings of one held-out "
             f"{args.digit} (red: brighten, blue: darken)", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, out / "why_experts.png", dpi=90)  # a killed rerun keeps the last complete files
    # how much of each mean gradient map is the highest spatial frequencies (the checkerboard)
    hf = {m: [round(high_frequency_share(maps[(m, t)]), 3) for t in grad_ts] for m in GRADIENT_METHODS}
    for m in GRADIENT_METHODS:
        print(f"{m}: high-frequency share of the mean gradient at t = {grad_ts}: {hf[m]}")
    write_json_atomic(out / "why_experts.json",
        {"timesteps": timesteps, "accuracy": curves, "gradient_timesteps": grad_ts, "digit": args.digit,
         "draws": args.draws, "high_frequency_share": hf})
    print(f"saved {out / 'why_experts.png'} and {out / 'why_experts.json'}")


def high_frequency_share(m: torch.Tensor) -> float:
    """Share of the map's energy (zero mean) at spatial frequencies above half the Nyquist frequency in
    either direction: ~0.7 for white noise, small for a smooth stroke pattern."""
    f = torch.fft.fftshift(torch.fft.fft2(m - m.mean())).abs() ** 2
    H, W = m.shape
    fy = (torch.arange(H) - H // 2).abs()[:, None] / (H / 2)
    fx = (torch.arange(W) - W // 2).abs()[None, :] / (W / 2)
    high = (fy > 0.5) | (fx > 0.5)
    return float(f[high].sum() / f.sum().clamp_min(1e-30))


if __name__ == "__main__":
    main()
