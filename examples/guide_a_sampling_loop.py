"""Guide a diffusion sampling loop with PPAP experts (shipped digits weights, nothing downloaded).

Loads the demo's unconditional 16x16 digits UNet and the PPAP-5 experts, samples each target digit
with ppap_fast.sample_loop (reference) and FastGuidedSampler (merged experts, fused update), saves a
grid and prints the evaluator's accuracy on the targets against unguided sampling from the same noise.
Run: python examples/guide_a_sampling_loop.py --out examples_out [--per-class 2 --steps 25]
"""
import argparse
import time

import torch

from ppap_fast import ClassGuide, FastGuidedSampler, sample_loop
from ppap_fast.cli import device, digit_list, finite_float, output_dir, positive_int  # the CLI's checks, while parsing
from ppap_fast.data import to_uint8
from ppap_fast.demo import DemoError, demo_schedule, load_evaluator, load_ppap_bank, load_unet, save_grid


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=output_dir, default="examples_out", help="output directory (created if missing)")
    ap.add_argument("--device", type=device, default="cpu", help="torch device")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="CPU threads (tiny models: more threads only spin)")
    ap.add_argument("--digits", type=digit_list, default="0,1,2,3,4,5,6,7,8,9", help="target digits")
    ap.add_argument("--per-class", type=positive_int, default=2, help="guided samples per target digit")
    ap.add_argument("--steps", type=positive_int, default=25, help="DDIM steps")
    ap.add_argument("--scale", type=finite_float, default=10.0, help="guidance scale")
    args = ap.parse_args()
    # the UNet was trained on guided-diffusion's linear schedule, T=1000; DDIM over `steps` of it, checked as the
    # CLI does before loading anything (--steps 1001 was a traceback from the schedule code)
    try:
        schedule = demo_schedule("ddim", args.steps)[0]
    except DemoError as e:
        ap.exit(2, f"{ap.prog}: error: argument --steps: {e}\n")
    torch.set_num_threads(args.threads)

    unet = load_unet().to(args.device)
    guide_net = load_ppap_bank(5).to(args.device)  # ExpertBank: the classifier + 5 timestep experts
    evaluator = load_evaluator().to(args.device)  # scores only, never guides
    targets = torch.tensor(args.digits).repeat_interleave(args.per_class).to(args.device)
    schedule = schedule.to(args.device)
    guide = ClassGuide(guide_net, targets, scale=args.scale)  # guide(x_t, t) -> scale * grad log p(y | x_t)
    x_T = torch.randn((len(targets), 1, 16, 16), generator=torch.Generator().manual_seed(0)).to(args.device)

    runs = {
        "unguided": lambda: sample_loop(unet, x_T, schedule, sampler="ddim"),
        "sample_loop": lambda: sample_loop(unet, x_T, schedule, sampler="ddim", guide=guide),
        "FastGuidedSampler": lambda: FastGuidedSampler(unet, schedule, sampler="ddim", guide=guide).sample(x_T),
    }
    images = {}
    for name, run in runs.items():
        t0 = time.time()
        images[name] = run()
        with torch.no_grad():
            acc = (evaluator(images[name]).argmax(1) == targets).float().mean().item()
        print(f"{name}: target accuracy {acc:.3f} ({time.time() - t0:.1f}s)")
    diff = (images["sample_loop"] - images["FastGuidedSampler"]).abs().max().item()
    print(f"fast vs reference: max |diff| {diff:.2e}")
    # one row per target digit, columns = samples (a digit listed twice in --digits: twice --per-class)
    path = save_grid(f"{args.out}/guided_grid.png", to_uint8(images["FastGuidedSampler"].cpu()),
                     targets.cpu().numpy(), per_class=int(torch.bincount(targets.cpu()).max()))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
