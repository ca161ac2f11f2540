"""PPAP experts as openai/guided-diffusion's ``cond_fn(x, t, y)`` (shipped digits weights, nothing downloaded).

With guided-diffusion installed: ``diffusion.ddim_sample_loop(model, shape, cond_fn=as_cond_fn(guide,
num_timesteps=diffusion.original_num_steps), model_kwargs={"y": y})`` (num_timesteps checks the experts' T
and takes rescale_timesteps=True's float t). It is not a dependency, so this script calls cond_fn exactly as its DDIM
step does (condition_score) inside a loop over ppap_fast's reference step, and checks the result
equals ppap_fast.sample_loop with the guide. Run: python examples/guided_diffusion_cond_fn.py --out examples_out
"""
import argparse

import torch

from ppap_fast import ClassGuide, as_cond_fn, ddim_step, sample_loop
from ppap_fast.cli import device, finite_float, output_dir, positive_int  # the CLI's checks, while parsing
from ppap_fast.data import to_uint8
from ppap_fast.demo import DemoError, demo_schedule, load_evaluator, load_ppap_bank, load_unet, save_grid


@torch.no_grad()
def ddim_loop_with_cond_fn(model, x, schedule, cond_fn, y):
    for i in reversed(range(schedule.num_timesteps)):
        # SpacedDiffusion hands cond_fn the ORIGINAL timestep (rescale_timesteps=False) and model_kwargs
        t = schedule.timestep_map[i].expand(x.shape[0])
        grad = cond_fn(x, t, y=y)  # scale * grad_x log p(y | x_t), from the expert of t's band
        # condition_score: eps' = eps - sqrt(1 - abar_t) * grad on the clipped x0's eps, then the DDIM update
        x = ddim_step(model, x, i, schedule, grad=grad).sample
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=output_dir, default="examples_out", help="output directory (created if missing)")
    ap.add_argument("--device", type=device, default="cpu", help="torch device")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="CPU threads (tiny models: more threads only spin)")
    ap.add_argument("--num", type=positive_int, default=20, help="samples (labels cycle through 0..9)")
    ap.add_argument("--steps", type=positive_int, default=25, help="DDIM steps")
    ap.add_argument("--scale", type=finite_float, default=10.0, help="guidance scale")
    args = ap.parse_args()
    try:  # the CLI's check, before loading anything (--steps 1001 was a traceback from the schedule code)
        schedule = demo_schedule("ddim", args.steps)[0]
    except DemoError as e:
        ap.exit(2, f"{ap.prog}: error: argument --steps: {e}\n")
    torch.set_num_threads(args.threads)

    unet, evaluator, bank = load_unet().to(args.device), load_evaluator().to(args.device), load_ppap_bank(5)
    schedule = schedule.to(args.device)
    y = (torch.arange(args.num) % 10).to(args.device)  # guided-diffusion's model_kwargs["y"]
    # the target given here is a placeholder: cond_fn's y replaces it on every call
    cond_fn = as_cond_fn(ClassGuide(bank.to(args.device), target=0, scale=args.scale, num_classes=10),
                         num_timesteps=schedule.original_num_timesteps)
    x_T = torch.randn((args.num, 1, 16, 16), generator=torch.Generator().manual_seed(0)).to(args.device)

    x = ddim_loop_with_cond_fn(unet, x_T, schedule, cond_fn, y)
    same = sample_loop(unet, x_T, schedule, sampler="ddim", guide=ClassGuide(bank, y, scale=args.scale))
    plain = sample_loop(unet, x_T, schedule, sampler="ddim")
    with torch.no_grad():
        for name, imgs in (("unguided", plain), ("cond_fn", x)):
            print(f"{name}: target accuracy {(evaluator(imgs).argmax(1) == y).float().mean().item():.3f}")
    print(f"cond_fn loop vs sample_loop(guide=...): max |diff| {(x - same).abs().max().item():.2e}")
    # a row per class, wide enough for its most frequent one (--num 15: two columns, not one)
    path = save_grid(f"{args.out}/cond_fn_grid.png", to_uint8(x.cpu()), y.cpu().numpy(),
                     per_class=int(torch.bincount(y.cpu()).max()))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
