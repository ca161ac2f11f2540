"""Distil your own PPAP experts with the Python API, data-free (shipped digits weights, nothing downloaded).

Generates images with the shipped unconditional UNet, caches the shipped classifier's logits on them
(no labels anywhere), distils PPAP-N experts, saves them with save_experts, loads them back and guides
a few samples. The default run is short (about 30 s on a CPU, with a high learning rate); the
shipped PPAP-5 took 2,000 steps at batch 128 on 4,000 images, lr 2e-3 (docs/demo.md).
Run: python examples/distill_your_own_experts.py --out examples_out [--steps 400 --experts 5]
"""
import argparse

import torch

from ppap_fast import ClassGuide, FastGuidedSampler, Schedule
from ppap_fast.cli import device, expert_count, output_dir, positive_float, positive_int  # the CLI's checks
from ppap_fast.demo import load_classifier, load_evaluator, load_unet
from ppap_fast.distill import distill_ppap, generate_datafree
from ppap_fast.experts import load_experts, save_experts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=output_dir, default="examples_out", help="output directory (created if missing)")
    ap.add_argument("--device", type=device, default="cpu", help="torch device")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="CPU threads (tiny models: more threads only spin)")
    ap.add_argument("--experts", type=expert_count, default=5, help="N of PPAP-N (must divide 1000)")
    ap.add_argument("--num-images", type=positive_int, default=256, help="size of the data-free set")
    ap.add_argument("--steps", type=positive_int, default=400, help="distillation steps")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="distillation batch size")
    ap.add_argument("--lr", type=positive_float, default=1e-2,
                    help="AdamW peak lr (the shipped experts: 2e-3 over 2,000 steps)")
    ap.add_argument("--samples", type=positive_int, default=20, help="guided samples at the end")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    unet, classifier = load_unet(), load_classifier()
    # 1. data-free set: DDIM-10 samples of the UNet + the classifier's logits on them (resumable shards)
    data = f"{args.out}/datafree"
    try:
        generate_datafree(unet, classifier, data, num_images=args.num_images, shard_size=64, respacing="ddim10",
                          device=args.device, progress=False)
    except ValueError as e:  # e.g. --out holds a set of another --num-images: one line, as ppap-fast generate
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    # 2. distil: frozen classifier + per-expert LoRA / biases / BatchNorm, KL to the cached logits at x_t
    try:  # it checks every shard's CRC-32 first
        bank = distill_ppap(classifier, data, n_experts=args.experts, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, device=args.device, progress=False)
    except ValueError as e:  # e.g. a damaged shard: one line naming it
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    losses = bank.train_losses
    k = max(1, len(losses) // 5)
    print(f"distilled PPAP-{args.experts}: {bank.trained_steps} steps, KD loss {sum(losses[:k]) / k:.3f} "
          f"(first {k}) -> {sum(losses[-k:]) / k:.3f} (last {k})")
    # 3. save, load back onto a fresh copy of the classifier
    save_experts(bank, f"{args.out}/ppap{args.experts}", input_transform=None)  # the classifier takes raw x_t
    loaded = load_experts(f"{args.out}/ppap{args.experts}", load_classifier()).to(args.device).eval()
    x, t = torch.randn(4, 1, 16, 16, device=args.device), torch.tensor([0, 300, 600, 999], device=args.device)
    with torch.no_grad():
        print(f"saved to {args.out}/ppap{args.experts}; reloaded experts' logits max |diff| "
              f"{(loaded(x, t) - bank(x, t)).abs().max().item():.1e}")
    # 4. guide with them (and, for comparison, with the plain classifier: the naive baseline)
    evaluator, targets = load_evaluator().to(args.device), (torch.arange(args.samples) % 10).to(args.device)
    schedule = Schedule.create("linear", 1000, respacing="ddim20")
    x_T = torch.randn((args.samples, 1, 16, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
    for name, net in (("naive classifier", classifier.to(args.device)), (f"your PPAP-{args.experts}", loaded)):
        images = FastGuidedSampler(unet.to(args.device), schedule, guide=ClassGuide(net, targets, scale=10.0),
                                   device=args.device).sample(x_T)
        with torch.no_grad():
            acc = (evaluator(images).argmax(1) == targets).float().mean().item()
        print(f"guided by {name}: target accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
