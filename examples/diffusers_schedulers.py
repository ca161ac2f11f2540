"""PPAP guidance as a drop-in for diffusers schedulers (shipped digits weights, nothing downloaded).

The demo's UNet is a diffusers UNet2DModel trained on the linear schedule (betas 1e-4..0.02, T=1000):
the diffusers schedulers are configured to match it. Shows PPAPGuidance.correct in a hand-written
DPM-Solver++ loop and PPAPGuidedPipeline with DDIM, and prints the evaluator's target accuracy.
Run: python examples/diffusers_schedulers.py --out examples_out [--num 20 --steps 20]
"""
import argparse

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ppap_fast import ClassGuide, Schedule
from ppap_fast.cli import device, finite_float, output_dir, positive_int  # the CLI's checks, while parsing
from ppap_fast.data import to_uint8
from ppap_fast.demo import load_evaluator, load_ppap_bank, load_unet, save_grid
from ppap_fast.integrations.diffusers import PPAPGuidance, PPAPGuidedPipeline

# the schedule the shipped UNet was trained with (ppap_fast.demo.train_diffusion: Schedule "linear", 1000)
TRAINED_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@torch.no_grad()
def dpm_solver_loop(unet, scheduler, x, steps, guided=None):
    scheduler.set_timesteps(steps)  # host timesteps: the guide uses each band's merged expert
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t).sample
        if guided is not None:
            eps = guided.correct(eps, x, t, scheduler)  # eps - sqrt(1 - abar_t) * scale * grad log p(y | x_t)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=output_dir, default="examples_out", help="output directory (created if missing)")
    ap.add_argument("--device", type=device, default="cpu", help="torch device")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="CPU threads (tiny models: more threads only spin)")
    ap.add_argument("--num", type=positive_int, default=20, help="samples (targets cycle through 0..9)")
    ap.add_argument("--steps", type=positive_int, default=20, 
                    help="inference steps of each scheduler (fewer than T = 1000)")
    ap.add_argument("--scale", type=finite_float, default=10.0, help="guidance scale")
    args = ap.parse_args()
    T = TRAINED_SCHEDULE["num_train_timesteps"]
    if args.steps >= T:  # DPM-Solver++ repeats a timestep from T steps on (NaN, a traceback); DDIM refuses > T
        ap.exit(2, f"{ap.prog}: error: argument --steps: at most {T - 1} steps over the UNet's {T} training "
                   f"timesteps, got {args.steps}\n")
    torch.set_num_threads(args.threads)

    unet = load_unet().unet.to(args.device)  # the diffusers UNet2DModel inside the demo's EpsModel
    evaluator = load_evaluator().to(args.device)
    targets = (torch.arange(args.num) % 10).to(args.device)
    guide = ClassGuide(load_ppap_bank(5).to(args.device), targets, scale=args.scale)
    x_T = torch.randn((args.num, 1, 16, 16), generator=torch.Generator().manual_seed(0)).to(args.device)

    dpm = DPMSolverMultistepScheduler(**TRAINED_SCHEDULE)
    ddim = DDIMScheduler(**TRAINED_SCHEDULE)  # clip_sample=True: the pipeline clips x0 before guiding
    ours = Schedule.create("linear", 1000).alphas_cumprod.float()
    gap = max((s.alphas_cumprod - ours).abs().max().item() for s in (dpm, ddim))
    assert gap < 1e-5, f"scheduler's alphas_cumprod is not the UNet's training schedule (max diff {gap:.2e})"
    print(f"scheduler alphas_cumprod vs the UNet's training schedule: max |diff| {gap:.1e}")

    def accuracy(x):
        with torch.no_grad():
            return (evaluator(x.clamp(-1, 1)).argmax(1) == targets).float().mean().item()

    results = {
        "DPM-Solver++ unguided": dpm_solver_loop(unet, dpm, x_T, args.steps),
        "DPM-Solver++ PPAP-5": dpm_solver_loop(unet, dpm, x_T, args.steps, PPAPGuidance(guide)),
    }
    pipe = PPAPGuidedPipeline(unet, ddim, guide)  # any denoiser(x, t) also works, with image_shape=(C, H, W)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=args.num, num_inference_steps=args.steps, latents=x_T, output_type="pt").images
    results["DDIM pipeline PPAP-5"] = out * 2 - 1  # "pt" images are in [0, 1]
    for name, x in results.items():
        print(f"{name}: target accuracy {accuracy(x):.3f}")
    path = save_grid(f"{args.out}/diffusers_dpm_guided.png", to_uint8(results["DPM-Solver++ PPAP-5"].cpu()),
                     targets.cpu().numpy(), per_class=int(torch.bincount(targets.cpu()).max()))  # every sample
    print(f"saved {path}")


if __name__ == "__main__":
    main()
