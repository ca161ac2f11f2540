"""``ppap-fast``: the digits demo pipeline (entry point ``ppap_fast.cli:main``).

  ppap-fast train-diffusion --out W/unet.safetensors
  ppap-fast train-classifier --arch resnet --out W/classifier.safetensors
  ppap-fast train-classifier --arch evalnet --out W/evaluator.safetensors
  ppap-fast generate --weights-dir W --out DATA
  ppap-fast distill --weights-dir W --data DATA --experts 5 --out W/ppap5
  ppap-fast train-classifier --arch segnet --out W/segnet.safetensors        (the segmentation demo's net)
  ppap-fast generate --task segmentation --weights-dir W --out SEGDATA
  ppap-fast distill --task segmentation --weights-dir W --data SEGDATA --experts 5 --out W/seg_ppap5
  ppap-fast train-classifier --arch semseg --out W/semseg.safetensors        (the semantic net; then --task semantic)
  ppap-fast finetune --weights-dir W --experts 1 --out W/noise_aware.safetensors
  ppap-fast finetune --weights-dir W --experts 5 --out W/multi5.safetensors
  ppap-fast sample --method ppap-10 --targets 3 --num-samples 50 --out s.npz
  ppap-fast evaluate s.npz
  ppap-fast demo --out DIR
  ppap-fast export-peft --experts-dir W/ppap5 --expert 2 --out DIR   (a peft LoRA adapter of one expert)
  ppap-fast guided-sample --denoiser adm:256x256_diffusion_uncond --checkpoint ADM.pt --guide resnet50 \
      --guide-weights R50.pth --experts PPAP10_DIR --targets 207 --out s.npz   (real models: see guided_sample.py)
  ppap-fast score s.npz --real real.npz   (target accuracy, IS; FD / precision / recall with --real)
  ppap-fast info [DIR ...]   (versions, devices, op backends; checkpoints, data-free sets, runs in progress)

Bad input (missing or corrupt weights, a target class out of range, an unknown method, an
unwritable output) prints one line ``ppap-fast: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .data.shards import fsync_dir, says_disk_full
from .demo import DEFAULT_SCALE, DEMO_METHODS, DEMO_MIN_SAMPLES, SEG_PER_TARGET, TEACHERS, WEIGHTS_DIR, DemoError


def _checked(cast, ok, what: str):
    """An argparse type: ``cast(v)`` for which ``ok`` holds; ``what`` names the accepted values."""
    def parse(v: str):
        try:
            x = cast(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return x
    return parse


_positive_int = _checked(int, lambda x: x > 0, "a positive integer")
_positive_float = _checked(float, lambda x: 0 < x < float("inf"), "a positive number")
# --scale nan / inf is refused at parse time, not after loading
finite_float = _checked(float, math.isfinite, "a finite number")
# an EMA decay: nan or -1 would average the weights into garbage
_decay = _checked(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
_widths = _checked(lambda v: [int(w) for w in v.split(",")], lambda ws: all(w > 0 for w in ws),
                   "comma-separated positive integers")


SEED_MAX = 2**63 - 1  # torch's manual_seed takes -2**63 .. 2**64 - 1: larger overflowed deep inside


def _seed_type(top: int = SEED_MAX):
    """An argparse type: a seed in 0 .. ``top``."""
    return _checked(int, lambda x: 0 <= x <= top, f"a seed in 0 .. {top}")


_seed = _seed_type()
# generate seeds shard k with seed * 1_000_003 + k, which must stay in torch's range
SHARD_SEED_MAX = SEED_MAX // 1_000_003
_shard_seed = _seed_type(SHARD_SEED_MAX)


def int_between(lo: int, hi: int):
    """An argparse type: an integer in ``lo`` .. ``hi``."""
    return _checked(int, lambda x: lo <= x <= hi, f"an integer in {lo}..{hi}")


def _int_at_least(lo: int, why: str):
    """An argparse type: an integer >= ``lo`` (``why`` says what needs it)."""
    return _checked(int, lambda x: x >= lo, f"an integer of at least {lo} ({why})")


DEMO_T = 1000  # the demo diffusion model's timesteps: experts split them into equal bands
# a number of timestep experts: equal bands of T
_expert_count = _checked(int, lambda n: n > 0 and DEMO_T % n == 0,
                         f"a positive integer dividing T = {DEMO_T} (equal timestep bands)")


def _output_dir(v: str) -> str:
    """An argparse type: a new or existing directory (a file there failed only when the results were saved)."""
    if os.path.exists(v) and not os.path.isdir(v):
        raise argparse.ArgumentTypeError(f"{v} is a file: name a new or existing directory")
    return v


def _device(v: str) -> str:
    """An argparse type: a device that exists here (cuda without a GPU was a traceback once models were loaded)."""
    try:
        _check_device(v)
    except DemoError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--device {v!r}: ")) from None
    return v


_digits = _checked(lambda v: [int(d) for d in v.split(",")], lambda ds: all(0 <= d <= 9 for d in ds),
                   "comma-separated digits in 0..9")
# public: the examples' argparse types
positive_int, positive_float, expert_count = _positive_int, _positive_float, _expert_count
output_dir, device, digit_list = _output_dir, _device, _digits


def _parser() -> argparse.ArgumentParser:
    from .distill import LOSS_REDUCTION_HELP, LOSS_REDUCTIONS
    from .finetune import LR_WARMUP_STEPS

    def lr_help(decay: str) -> str:
        return (f"peak learning rate, after a linear warmup over the first {LR_WARMUP_STEPS} steps (fixed: with --steps "
                f"under {LR_WARMUP_STEPS} it is never reached), then a {decay} decay to 0")

    p = argparse.ArgumentParser(prog="ppap-fast", description="PPAP guidance: the demo pipeline on scikit-learn digits (16x16), "
                                                           "and sampling and scoring with real models.")
    # --threads 0 / -1 became 1 silently; None: $PPAP_THREADS, checked by _env_threads in _run
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: $PPAP_THREADS, else 2)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s, device=True, weights=True, seed=_seed, draws=True):
        if device:
            s.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
        if weights:
            s.add_argument("--weights-dir", default=str(WEIGHTS_DIR),
                           help="folder of the weights this command reads (the shipped ones by default)")
        if draws:  # only commands that draw random numbers and show a progress bar
            s.add_argument("--seed", type=seed, default=0, help="random seed")
            s.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("train-diffusion", help="train the unconditional eps-prediction UNet",
                       description="Train the unconditional eps-prediction UNet. OUT.ckpt.pt (model, EMA and "
                                   "optimizer) stays after training ends: a rerun with more --steps continues from "
                                   "it, as one run of that many steps would; delete it once you want no more steps.")
    s.add_argument("--out", required=True, help="output *.safetensors (the EMA weights)")
    s.add_argument("--steps", type=_positive_int, default=2000, help="training steps")
    s.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    s.add_argument("--lr", type=_positive_float, default=2e-4, help="learning rate")
    s.add_argument("--ema-decay", type=_decay, default=0.999, help="decay of the weights' EMA, the weights written")
    s.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop after this many minutes of this run (the LR is not annealed), saving --out")
    s.add_argument("--checkpoint-every", type=_positive_int, default=500,
                   help="steps between resumable checkpoints, kept in OUT.ckpt.pt (--out, the EMA weights, is written "
                        "only when training ends); a rerun with the same arguments resumes from it")
    common(s, weights=False)

    s = sub.add_parser("train-classifier", help="train the off-the-shelf classifier or the evaluator (clean data)")
    s.add_argument("--arch", choices=["resnet", "evalnet", "segnet", "semseg"], default="resnet",
                   help="resnet: the off-the-shelf classifier; evalnet: the evaluator; segnet: the off-the-shelf "
                        "stroke segmentation net (per-pixel ink / background, labels from each clean image: "
                        "ink = value > 0); semseg: the semantic one (11 classes per pixel: background, or the "
                        "digit's class on its ink; a SegNet with an image-level context branch)")
    s.add_argument("--out", required=True, help="output *.safetensors")
    s.add_argument("--steps", type=_positive_int, default=1000, help="training steps")
    s.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    s.add_argument("--lr", type=_positive_float, default=2e-3,
                   help=lr_help("cosine"))
    s.add_argument("--widths", type=_widths, default=None,
                   help="resnet stage widths (positive integers; default: 16,32,64); --arch resnet only")
    common(s, weights=False)
    task_help = ("classification: the digit classifier (classifier.safetensors, KL); segmentation: the stroke "
                 "segmentation net (segnet.safetensors, per-pixel KL); semantic: the semantic segmentation net "
                 "(semseg.safetensors, per-pixel KL)")

    s = sub.add_parser("generate", help="data-free set: unconditional DDIM samples + cached teacher logits")
    s.add_argument("--out", required=True, help="output directory (shard_NNNNN.npz + manifest.json); a rerun with "
                                                "the same arguments finishes an interrupted set")
    s.add_argument("--num-images", type=_positive_int, default=6000, help="images in the set")
    s.add_argument("--shard-size", type=_positive_int, default=500, help="images per shard file")
    s.add_argument("--steps", type=_positive_int, default=25, help="DDIM steps per image")
    s.add_argument("--task", choices=list(TEACHERS), default="classification",
                   help="whose outputs the set caches: " + task_help)
    common(s, seed=_shard_seed)

    s = sub.add_parser("distill", help="PPAP-N: data-free expert distillation (no labels)")
    s.add_argument("--data", required=True, help="the data-free set written by generate")
    s.add_argument("--experts", type=_expert_count, default=5,
                   help="number of timestep experts, a divisor of T = 1000")
    s.add_argument("--rank", type=_positive_int, default=4, help="LoRA rank")
    s.add_argument("--alpha", type=_positive_float, default=2.0, help="LoRA alpha (scale alpha / rank)")
    s.add_argument("--steps", type=_positive_int, default=2000, help="training steps")
    s.add_argument("--batch-size", type=_positive_int, default=128, help="images per step")
    s.add_argument("--lr", type=_positive_float, default=1e-3,
                   help=lr_help("linear"))
    s.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop (LR annealed by elapsed time) after this; a resumed run counts the time trained before")
    s.add_argument("--loss-reduction", choices=LOSS_REDUCTIONS, default="expert_mean", help=LOSS_REDUCTION_HELP)
    s.add_argument("--checkpoint-every", type=_positive_int, default=200,
                   help="steps between resumable training states, kept in OUT.distill_state.safetensors beside "
                        "--out until the experts are written; a rerun with the same arguments resumes from it")
    s.add_argument("--task", choices=list(TEACHERS), default="classification",
                   help="which off-the-shelf net becomes the experts (the set must be generated with the same "
                        "--task): " + task_help)
    s.add_argument("--out", required=True, help="output directory (experts.safetensors + config.json, and "
                   "train_summary.json + train_loss.png: the loss per step, overall and per expert)")
    common(s)

    s = sub.add_parser("finetune", help="supervised noise-aware baselines (full fine-tuning with labels)")
    s.add_argument("--experts", type=_expert_count, default=1,
                   help="1: single noise-aware model; N: multi-experts-N (N divides T = 1000)")
    s.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop (LR annealed by elapsed time) after this; a resumed run counts the time "
                        "trained before")
    s.add_argument("--steps", type=_positive_int, default=2000, help="training steps")
    s.add_argument("--batch-size", type=_positive_int, default=128, help="images per step")
    s.add_argument("--lr", type=_positive_float, default=1e-3,
                   help=lr_help("cosine"))
    s.add_argument("--loss-reduction", choices=LOSS_REDUCTIONS, default="expert_mean", help=LOSS_REDUCTION_HELP)
    s.add_argument("--checkpoint-every", type=_positive_int, default=200,
                   help="steps between resumable training states, kept in OUT.finetune_state.safetensors beside "
                        "--out until the experts are written; a rerun with the same arguments resumes from it")
    s.add_argument("--out", required=True, help="output *.safetensors (the fine-tuned model or experts)")
    common(s)

    s = sub.add_parser("sample", help="sample with one guidance method; writes .npz + PNG grid + stats .json "
                                      "(NFE, seconds, images/s, peak memory)")
    s.add_argument("--method", "--guide", dest="method", required=True,
                   help="none | naive | x0hat | noise-aware | ppap-N | multi-experts-N")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (eta 0) or ancestral DDPM")
    s.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: 25 (ddim), 250 (ddpm))")
    s.add_argument("--scale", type=finite_float, default=DEFAULT_SCALE, help="guidance scale")
    s.add_argument("--targets", default=None, help="comma-separated target classes in 0..9, cycled to "
                                                   "--num-samples (default 0..9 cycled)")
    s.add_argument("--num-samples", type=_positive_int, default=None,
                   help="default: one per --targets entry, else 100 (0..9 cycled)")
    s.add_argument("--batch-size", type=_positive_int, default=250, help="samples per batch")
    s.add_argument("--out", required=True, help="output .npz (a PNG grid and the stats .json are written beside it)")
    s.add_argument("--fast", action="store_true", help="fast path: fused update, PPAP experts merged per band")
    common(s, device=False)

    s = sub.add_parser("evaluate", help="score a sample .npz with the evaluator")
    s.add_argument("samples", help="a sample .npz written by sample or demo")
    s.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    common(s, device=False, draws=False)  # scoring draws nothing and shows no bar: --seed was ignored

    s = sub.add_parser("demo", help="run the whole comparison with the shipped weights")
    s.add_argument("--out", required=True, help="output directory (samples, grids, results.json, pictures)")
    s.add_argument("--ddpm", action="store_true", help="DDPM-250 instead of DDIM-25")
    s.add_argument("--steps", type=_positive_int, default=None, help="override the step count (default: 25, or 250 with --ddpm)")
    s.add_argument("--num-samples", type=_int_at_least(DEMO_MIN_SAMPLES, "one sample per class"), default=200,
                   help=f"samples per method, at least {DEMO_MIN_SAMPLES}: the targets cycle through the classes 0..9")
    s.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated guidance methods to compare")
    s.add_argument("--scale", type=finite_float, default=DEFAULT_SCALE, help="guidance scale of every method")
    s.add_argument("--batch-size", type=_positive_int, default=250, help="samples per batch")
    s.add_argument("--seg-per-target", type=_int_at_least(0, "0 skips it"), default=SEG_PER_TARGET,
                   help="the segmentation-guidance comparison: samples per held-out target mask (10 masks; "
                        "0: skip it)")
    common(s, device=False)

    s = sub.add_parser("guided-sample", help="guided sampling with real models (ADM + ImageNet / dense guides, "
                                             "PPAP experts); writes .npz + PNG grid + stats .json")
    from .guided_sample import add_arguments
    add_arguments(s)
    common(s, device=False, weights=False)

    from .score import add_parser as add_score_parser
    add_score_parser(sub)

    from .info import add_parser as add_info_parser
    add_info_parser(sub)

    s = sub.add_parser("export-peft", help="one PPAP expert as a peft LoRA adapter for the plain classifier "
                                           "(or segmentation net)")
    s.add_argument("--experts-dir", default=None, help="PPAP expert folder (default: WEIGHTS_DIR/ppap5)")
    s.add_argument("--expert", type=int, required=True, help="which expert: 0 .. N-1 of the folder's N experts")
    s.add_argument("--out", required=True, help="output directory (adapter_config.json + adapter_model.safetensors)")
    s.add_argument("--weights-dir", default=str(WEIGHTS_DIR),
                   help="holds the base model: classifier.safetensors (segnet.safetensors / semseg.safetensors "
                        "for segmentation / semantic experts)")
    for s in sub.choices.values():
        _show_defaults(s)
    describe_subcommands(sub)
    return p


def describe_subcommands(sub) -> None:
    """``ppap-fast CMD --help`` opens with the line ``ppap-fast --help`` lists for CMD (it said nothing)."""
    for choice in sub._choices_actions:
        parser = sub.choices[choice.dest]
        parser.description = parser.description or choice.help


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """``--help`` states each option's default (argparse's ArgumentDefaultsHelpFormatter skips options without
    help text and would print the None / False of options whose help already says what happens)."""
    for a in parser._actions:
        if a.default is None or a.default is False or a.default == argparse.SUPPRESS or not a.option_strings \
                or a.required or isinstance(a, argparse._StoreFalseAction):  # --no-x: its True means "x on"
            continue
        h = a.help or ""
        if "default" in h or "%(default)" in h:
            continue
        a.help = f"{h} (default: %(default)s)" if h else "default: %(default)s"


def _parse_targets(spec, n):
    from .demo import check_targets, cyclic_targets

    if spec is None:
        return cyclic_targets(n or 100)
    try:
        vals = [int(v) for v in str(spec).split(",")]
    except ValueError:
        raise DemoError(f"--targets must be comma-separated integers, got {spec!r}") from None
    t = check_targets(vals)
    if n and n < t.numel():
        raise DemoError(f"--targets gives {t.numel()} classes but --num-samples is {n}: the last ones would never be "
                        f"sampled; give --num-samples {t.numel()} or more (targets are cycled) or fewer targets")
    n = n or t.numel()
    return t.repeat(-(-n // t.numel()))[:n].clone() if n != t.numel() else t


def _atomic_dir(out: Path, write, marker: str = "config.json"):
    """Write a directory via a temporary sibling, then move it into place. An existing ``out`` is
    replaced only when it is a directory holding ``marker`` and nothing but files this command
    writes (a previous output; its README.md is kept); a file or any other directory is refused before any work."""
    out = Path(out)
    if out.is_symlink():  # the renames replaced the link by a folder, the linked one kept the old output
        out = out.resolve()
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.is_dir():  # a replacement killed between its two renames: roll it back
        old.rename(out)
    _check_replaceable(out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a run killed mid-write (SIGKILL) left its temporary: only this code's exact .<name>.<8 chars>.tmp folders
    stale = re.compile(re.escape(f".{out.name}.") + "[a-z0-9_]{8}" + re.escape(".tmp"))
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        if stale.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        for name in _KEPT_FILES:  # the user's, beside a previous output: it was deleted with it
            if (out / name).is_file() and not (tmp / name).exists():
                shutil.copy2(out / name, tmp / name)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                if not out.exists():  # interrupted between the renames: the previous output goes back
                    old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)  # the files inside were fsynced by their atomic writers
    return out


@contextlib.contextmanager
def _no_empty_dirs_left(d):
    """Removes the folders of ``d`` that did not exist before, if a failed run left them empty (missing weights
    were reported after --out's folder was made); d None: nothing to guard."""
    if d is None:
        yield
        return
    new, p = [], Path(d).absolute()
    while not p.exists():
        new.append(p)
        p = p.parent
    try:
        yield
    except BaseException:
        for q in new:  # innermost first; a folder holding anything stays
            try:
                q.rmdir()
            except OSError:
                break
        raise


# the folder each command makes for --out before its work (sample, evaluate and demo guard their own)
_OUT_FOLDER = {"train-diffusion": "parent", "train-classifier": "parent", "finetune": "parent", "distill": "parent",
               "export-peft": "parent", "generate": "itself"}


def _out_folder(args):
    """The folder a failed or killed run of ``args`` must not leave behind empty (None: no such folder)."""
    where = _OUT_FOLDER.get(args.cmd)
    if where is None or not getattr(args, "out", None):
        return None
    return Path(args.out) if where == "itself" else Path(args.out).parent


def _check_safetensors_out(out) -> None:
    """train-diffusion / train-classifier / finetune write a safetensors file: another name (x.npz, x.pt) made a
    file that every reader takes for another format."""
    if Path(out).suffix != ".safetensors":
        raise DemoError(f"--out {out}: this command writes a safetensors file; name it *.safetensors")


def _check_device(name: str) -> None:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DemoError(f"--device {name!r}: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {name!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DemoError(f"--device {name!r}: MPS is not available on this machine")


_OUTPUT_FILES = {"config.json", "experts.safetensors", "base.safetensors", "train_summary.json", "train_loss.png",
                 "adapter_config.json", "adapter_model.safetensors", "README.md"}
# files in an output folder that a rerun keeps (not written by the commands: a model card for the Hub)
_KEPT_FILES = ("README.md",)


# what distill's train_summary.json records of its command line
DISTILL_SETTINGS = ("data", "experts", "rank", "alpha", "steps", "batch_size", "lr", "seed", "loss_reduction",
                    "max_minutes", "checkpoint_every")


def _nan_to_none(rows):
    """[[float]] with NaN as None (JSON has no NaN)."""
    return [[None if v != v else v for v in row] for row in rows]


def _check_replaceable(out: Path, marker: str) -> None:
    if out.name in ("", ".", ".."):
        raise DemoError(f"--out {str(out)!r}: name a new or previous output directory")
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if names and (marker not in names or names - _OUTPUT_FILES):
            raise DemoError(f"--out {out} is a non-empty directory that is not a previous output of this command "
                            f"(holds {sorted(names)[:5]}); refusing to replace it")


def _experts_base(weights_dir, src: Path):
    """(base net, experts bank) of the experts in ``src``: the demo net of their architecture (config.json's arch)
    whose frozen weights they were distilled on (base_state; two tasks share SegNet); the classifier if unknown."""
    import warnings

    from . import demo
    from .experts import load_experts
    from .experts.checkpoint import BaseMismatchWarning
    from .models.tiny import MODEL_KINDS

    try:
        arch = json.loads((src / "config.json").read_text(encoding="utf-8")).get("arch")
    except (OSError, ValueError, AttributeError):  # a repo id, a damaged config: load_experts reports it
        arch = None
    tasks = [t for t, (f, kind) in TEACHERS.items() if MODEL_KINDS[kind].__name__ == arch
             and (Path(weights_dir) / f).is_file()] or ["classification"]
    for task in tasks[:-1]:  # the last one loads as before, reporting what is wrong
        try:
            base = demo.load_teacher(weights_dir, task)
            with warnings.catch_warnings():
                warnings.simplefilter("error", BaseMismatchWarning)
                return base, load_experts(src, base)
        except (DemoError, BaseMismatchWarning, ValueError, OSError):
            continue
    base = demo.load_teacher(weights_dir, tasks[-1])
    return base, demo._load(load_experts, src, base)


def _task_of_set(manifest: dict, teacher, args) -> str | None:
    """The other --task whose teacher cached a set's outputs (manifest's teacher_state), else None."""
    from . import demo
    from .distributed import module_fingerprint

    cached_by = manifest.get("teacher_state") or manifest.get("config", {}).get("teacher_state")
    if cached_by is None or cached_by == module_fingerprint(teacher):
        return None
    for other in TEACHERS:
        if other == args.task or not (Path(args.weights_dir) / TEACHERS[other][0]).is_file():
            continue
        try:
            theirs = module_fingerprint(demo.load_teacher(args.weights_dir, other))
        except DemoError:  # a damaged file of a task not asked for: the teacher check reports the mismatch
            continue
        if theirs == cached_by:
            return other
    return None


def _check_set_task(shards, teacher, args) -> None:
    """A set generated with another --task: say so (its teacher check only said "another classifier")."""
    other = _task_of_set(shards.manifest, teacher, args)
    if other is not None:
        raise DemoError(f"{args.data} was generated with --task {other}: distil it with --task {other} "
                        f"(this run: --task {args.task})")


def _check_set_folder(out: Path) -> None:
    """generate writes into an empty folder or a data-free set's own (its manifest.json): a folder of other files
    (the weights, an experts folder) got shards, a manifest and a preview among them."""
    from .data.shards import MANIFEST

    if (out / MANIFEST).exists():
        return
    others = sorted(p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if others:
        shown = ", ".join(others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
        raise DemoError(f"--out {out} is not empty ({shown}) and holds no data-free set ({MANIFEST}): name a new or "
                        "empty folder")


def _check_resume_task(out: Path, teacher, args) -> None:
    """generate into a set made with another --task: say so (the manifest check only names teacher_state)."""
    from .data.shards import MANIFEST, nothing_written_yet

    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: ShardWriter reports that
        return
    if not isinstance(manifest, dict) or nothing_written_yet(out, manifest):  # stopped before its first shard
        return
    other = _task_of_set(manifest, teacher, args)
    if other is not None:
        raise DemoError(f"--out {out} holds a data-free set made with --task {other}; this run asks for --task "
                        f"{args.task}: rerun with --task {other} to finish that set, or name another --out")


def _env_threads() -> int:
    """$PPAP_THREADS (unset or empty: 2); 'abc' fell back to 2 and 0 to 1 without a word."""
    v = os.environ.get("PPAP_THREADS", "").strip()
    try:
        return _positive_int(v) if v else 2
    except argparse.ArgumentTypeError as e:
        raise DemoError(f"$PPAP_THREADS: {e} (or pass --threads N)") from None


def _sample(args, out: Path, demo, progress: bool) -> int:
    """``ppap-fast sample``: samples, grid and stats beside ``out``."""
    from .data.shards import remove_stale_tmp, write_json_atomic

    demo.check_writable_dir(out.parent)
    for side in (out, out.with_suffix(".png"), out.with_suffix(".json")):
        demo.check_output_file(side)
        remove_stale_tmp(side, side.suffix)  # a killed run's atomic-write temporary
    targets = _parse_targets(args.targets, args.num_samples)
    x, stats = demo.sample_method(args.method, args.weights_dir, targets, args.sampler, args.steps, args.scale,
                                  args.seed, args.batch_size, progress=progress, fast=args.fast)
    for side in (out.with_suffix(".json"), out.with_suffix(".png")):  # an older run's, never beside new samples
        side.unlink(missing_ok=True)
    demo.save_samples(out, x, targets.numpy())
    images, labels = demo.read_samples(out)
    demo.save_grid(out.with_suffix(".png"), images, labels)
    stats = {"out": str(out), **stats}
    write_json_atomic(out.with_suffix(".json"), stats)  # as guided-sample's
    print(json.dumps(stats))
    return 0


def _run(args) -> int:
    import torch

    from . import demo
    from .models.tiny import load_model

    torch.set_num_threads(args.threads if args.threads is not None else _env_threads())
    progress = not getattr(args, "no_progress", False)
    # guided-sample checks its own; score's default "auto" is resolved by score itself
    if getattr(args, "device", None) and args.cmd != "guided-sample" and not (args.cmd == "score"
                                                                              and args.device == "auto"):
        _check_device(args.device)
    weights_dir = getattr(args, "weights_dir", None)
    if weights_dir and Path(weights_dir).exists() and not Path(weights_dir).is_dir():
        raise DemoError(f"--weights-dir {weights_dir} is a file; name the directory that holds the weights")
    if args.cmd == "train-diffusion":
        demo.check_writable_dir(Path(args.out).parent)
        demo.check_output_file(args.out)  # a directory, a device: named as such first
        _check_safetensors_out(args.out)
        demo.train_diffusion(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             ema_decay=args.ema_decay, device=args.device, max_minutes=args.max_minutes,
                             checkpoint_every=args.checkpoint_every, progress=progress)
        print(f"wrote {args.out}")
        return 0

    if args.cmd == "train-classifier":
        from .data import DigitsSplits, SEMANTIC_CLASSES, ink_mask, semantic_mask
        from .finetune import accuracy, noisy_accuracy, train_classifier
        from .models.tiny import EvalNet, SegNet, TinyResNet, save_model

        if args.widths is not None and args.arch != "resnet":  # it was ignored silently
            raise DemoError(f"--widths sets the resnet's stage widths; --arch {args.arch} has none: drop it")
        demo.check_writable_dir(Path(args.out).parent)
        demo.check_output_file(args.out)  # a directory, a device: named as such first
        _check_safetensors_out(args.out)
        s = DigitsSplits.create(0)
        torch.manual_seed(args.seed)  # model initialisation
        labels_fn = None
        if args.arch == "resnet":
            model = TinyResNet(widths=args.widths or [16, 32, 64])
            x, y = s.classifier
        elif args.arch == "segnet":  # labels from each clean (shifted) image itself: no annotation
            model, (x, _), y, labels_fn = SegNet(), s.classifier, None, ink_mask
        elif args.arch == "semseg":  # labels: each clean (shifted) image's ink, marked with its digit's class
            model, (x, y), labels_fn = SegNet(num_classes=SEMANTIC_CLASSES, context=2), s.classifier, semantic_mask
        else:  # the evaluator: a different architecture and seed, clean diffusion+classifier splits
            model = EvalNet()
            x, y = torch.cat([s.diffusion[0], s.classifier[0]]), torch.cat([s.diffusion[1], s.classifier[1]])
        model = train_classifier(model, x, y, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, progress=progress, desc=f"train-classifier {args.arch}",
                                 device=args.device, labels_fn=labels_fn)
        if args.arch == "segnet":
            xe = s.eval[0]
            acc = accuracy(model, xe, ink_mask(xe))  # per-pixel accuracy on the held-out split
            extra = {"labelled_images": 0, "labels": "ink_mask: pixel value > 0 of each clean image",
                     "train_images": int(x.shape[0]), "steps": args.steps, "seed": args.seed,
                     "heldout_pixel_accuracy": acc}
        elif args.arch == "semseg":
            xe, ye = s.eval
            want = semantic_mask(xe, ye)
            with torch.no_grad():
                pred = model(xe).argmax(1)
            ink = want > 0
            extra = {"labelled_images": int(x.shape[0]),
                     "labels": "semantic_mask: 0 background, 1 + digit class where pixel value > 0",
                     "steps": args.steps, "seed": args.seed,
                     "heldout_pixel_accuracy": float((pred == want).float().mean()),
                     "heldout_ink_class_accuracy": float((pred[ink] == want[ink]).float().mean())}
            acc = extra["heldout_pixel_accuracy"]
        else:
            acc = accuracy(model, *s.eval)
            extra = {"labelled_images": int(x.shape[0]), "steps": args.steps, "seed": args.seed,
                     "heldout_accuracy": acc}
        if args.arch == "resnet":
            extra["heldout_noisy_accuracy"] = {str(k): v for k, v in
                                               noisy_accuracy(model, *s.eval, clean_model=True).items()}
        save_model(model, args.out, extra=extra)
        print(json.dumps({"out": args.out, **extra}))
        return 0

    if args.cmd == "generate":
        from .distill import generate_datafree

        demo.demo_schedule("ddim", args.steps)  # --steps 1001: refused after the folder was made, naming no option
        unet = demo.load_unet(args.weights_dir)  # missing or wrong weights: refused before --out is made
        teacher = demo.load_teacher(args.weights_dir, args.task)
        demo.check_writable_dir(args.out)
        _check_set_folder(Path(args.out))
        _check_resume_task(Path(args.out), teacher, args)
        written = generate_datafree(unet, teacher, args.out, args.num_images, args.shard_size, seed=args.seed,
                                    respacing=f"ddim{args.steps}", device=args.device, progress=progress)
        print(f"{args.out}: wrote shards {written if written else 'none (already complete)'}")
        from .data.preview import datafree_preview

        try:
            print(datafree_preview(args.out))
        except (OSError, ValueError, ImportError) as e:  # the set is complete: a missing preview is no failure
            print(f"ppap-fast: warning: {args.out}: no preview.png ({type(e).__name__}: "
                  f"{' '.join(str(e).split())}); the set itself is complete", file=sys.stderr)
        return 0

    if args.cmd == "distill":
        from .data.shards import write_json_atomic
        from .distill import distill_ppap, loss_for_task, plot_train_losses
        from .experts import save_experts
        from .experts.checkpoint import check_experts_dir

        teacher = demo.load_teacher(args.weights_dir, args.task)
        demo.check_writable_dir(Path(args.out).parent)
        out = Path(args.out)
        _check_replaceable(out, "config.json")  # before training, and before reading the whole set (verify)
        try:
            check_experts_dir(out, "--out")  # a config.json alone could be another model's
        except ValueError as e:
            raise DemoError(str(e)) from None
        try:
            from .data import ShardSet
            shards = ShardSet(args.data)  # headers only; distill_ppap checks every member's CRC-32
        except (FileNotFoundError, ValueError) as e:
            raise DemoError(str(e)) from None
        _check_set_task(shards, teacher, args)
        # the resumable state lives beside --out (which appears only when finished), removed after it is written
        state = out.with_name(out.name + ".distill_state.safetensors")
        bank = distill_ppap(teacher, args.data, args.experts, args.rank, args.alpha, args.steps, args.batch_size,
                            args.lr, seed=args.seed, device=args.device, progress=progress,
                            max_minutes=args.max_minutes, loss_reduction=args.loss_reduction,
                            checkpoint_path=state, checkpoint_every=args.checkpoint_every,
                            loss=loss_for_task(args.task))
        steps_done, resumed_from = bank.trained_steps, bank.resumed_from_step
        bank = bank.cpu()
        summary = {"steps_done": steps_done, "resumed_from_step": resumed_from, "task": args.task,
                   "settings": {k: getattr(args, k) for k in DISTILL_SETTINGS}, "bands": bank.bands,
                   "losses_are": "per step: the batch mean, and each expert's mean over its samples (null: none)",
                   "losses": bank.train_losses, "expert_losses": _nan_to_none(bank.train_expert_losses)}

        def write(d):
            save_experts(bank, d, input_transform=None)  # the tiny teachers take raw x_t: recorded
            write_json_atomic(d / "train_summary.json", summary)
            plot_train_losses(d / "train_loss.png", bank.train_losses, bank.train_expert_losses, bank.bands,
                              f"distill {args.task} PPAP-{args.experts}")

        _atomic_dir(out, write)
        state.unlink(missing_ok=True)  # the experts are the product: nothing left to resume
        fsync_dir(out.parent)
        print(json.dumps({"out": args.out, "steps_done": steps_done, "resumed_from_step": resumed_from,
                          **bank.parameter_report()}))
        return 0

    if args.cmd == "finetune":
        from .data import DigitsSplits
        from .finetune import finetune_noise_aware, noisy_accuracy, save_multi

        base_file = Path(args.weights_dir) / "classifier.safetensors"
        base = demo._load(load_model, base_file, "resnet")
        demo.check_writable_dir(Path(args.out).parent)
        demo.check_output_file(args.out)  # a directory, a device: named as such first
        _check_safetensors_out(args.out)
        from .score import _same_file
        if _same_file(args.out, base_file):  # it replaced the base every method loads with the fine-tuned copy
            raise DemoError(f"--out {args.out} is the base classifier it fine-tunes; name another file")
        s = DigitsSplits.create(0)
        x, y = s.classifier
        out = Path(args.out)
        # the resumable state lives beside --out (which appears only when finished), removed after it is written
        state = out.with_name(out.name + ".finetune_state.safetensors")
        me = finetune_noise_aware(base, x, y, args.experts, args.steps, args.batch_size, args.lr, seed=args.seed,
                                  progress=progress, device=args.device, max_minutes=args.max_minutes,
                                  loss_reduction=args.loss_reduction, checkpoint_path=state,
                                  checkpoint_every=args.checkpoint_every)
        extra = {"labelled_images": int(x.shape[0]), "steps": args.steps, "steps_done": me.trained_steps,
                 "seed": args.seed, "loss_reduction": args.loss_reduction,
                 "heldout_noisy_accuracy": {str(k): v for k, v in noisy_accuracy(me, *s.eval).items()}}
        save_multi(me, out, extra=extra)
        state.unlink(missing_ok=True)  # the experts are the product: nothing left to resume
        fsync_dir(out.parent)
        print(json.dumps({"out": args.out, "resumed_from_step": me.resumed_from_step, **extra}))
        return 0

    if args.cmd == "sample":
        out = Path(args.out)
        if out.suffix != ".npz":
            raise DemoError(f"--out must end in .npz, got {out.name}")
        demo.parse_method(args.method)
        with _no_empty_dirs_left(out.parent):
            return _sample(args, out, demo, progress)

    if args.cmd == "evaluate":
        if args.json:
            demo.check_output_file(args.json, "--json")
            from .score import _same_file
            if _same_file(args.json, args.samples):  # it overwrote the samples with the metrics
                raise DemoError(f"--json {args.json} is the sample file; name another output file")
            from .data.shards import remove_stale_tmp

            remove_stale_tmp(args.json, ".json")  # a killed run's atomic-write temporary (write_json_atomic's)
        with _no_empty_dirs_left(Path(args.json or ".").parent):
            if args.json:  # before scoring: a file in the folder's place was refused only after it
                demo.check_writable_dir(Path(args.json).parent)
            images, labels = demo.read_samples(args.samples)
            evaluator = demo.load_evaluator(args.weights_dir)
            res = demo.evaluate_samples(images, labels, evaluator)
            if args.json:
                from .data.shards import write_json_atomic
                write_json_atomic(args.json, res)
        print(json.dumps(res))
        return 0

    if args.cmd == "guided-sample":
        from .guided_sample import config_from_args, main_json

        print(main_json(config_from_args(args), progress=progress))
        return 0

    if args.cmd == "score":
        from .score import main_json as score_json

        print(score_json(args))
        return 0

    if args.cmd == "info":
        from .info import main_json as info_json

        text, bad = info_json(args)
        print(text)
        if bad:
            raise DemoError(f"damaged or missing checkpoint files, shards or training states: {'; '.join(bad)}")
        return 0

    if args.cmd == "export-peft":
        from .experts import export_peft

        src = Path(args.experts_dir) if args.experts_dir else Path(args.weights_dir) / "ppap5"
        base, bank = _experts_base(args.weights_dir, src)  # segmentation experts: the segnet, not the classifier
        demo.check_writable_dir(Path(args.out).parent)
        _atomic_dir(Path(args.out), lambda d: export_peft(bank, args.expert, d, base_model=base),
                    marker="adapter_config.json")
        print(json.dumps({"out": args.out, "expert": args.expert, "band": list(bank.bands[args.expert])}))
        return 0

    if args.cmd == "demo":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise DemoError(f"--methods names no method ({args.methods!r}); choose from {', '.join(DEMO_METHODS)}")
        with _no_empty_dirs_left(args.out):
            demo.run_demo(args.out, args.weights_dir, methods, args.num_samples,
                          "ddpm" if args.ddpm else "ddim", args.steps, args.scale, args.seed, args.batch_size,
                          progress, args.seg_per_target)
        return 0
    raise DemoError(f"unknown command {args.cmd!r}")  # pragma: no cover


def _disk_full_message(args, e: Exception) -> str:
    where = getattr(e, "filename", None) or getattr(args, "out", None) or getattr(args, "json", None)
    return (f"no space left on the disk{f' writing {where}' if where else ''}: free some space (or name an output on "
            "another disk) and rerun")


class _StreamOutlivingItsReader:
    """sys.stdout / sys.stderr while a command runs: once its reader is gone (``| head``), the rest goes to os.devnull
    and the command finishes its work (train-diffusion died at its next print or progress bar, before writing --out)."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text):
        if self._gone:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._to_devnull()

    def _to_devnull(self):  # as Python's docs advise (signal.SIGPIPE notes): the exit-time flush then succeeds too
        self._gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv=None) -> int:
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _StreamOutlivingItsReader(stdout), _StreamOutlivingItsReader(stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = stdout, stderr


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        with _no_empty_dirs_left(_out_folder(args)):  # folders made for --out, left empty by a failed run
            return _run(args)
    except DemoError as e:
        msg = str(e)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        msg = f"{e.strerror or type(e).__name__}: {e.filename or e}"
    except OSError as e:
        msg = _disk_full_message(args, e) if says_disk_full(e) else f"{type(e).__name__}: {e}"
    except RuntimeError as e:
        from .distributed import DistributedRunError

        if not isinstance(e, DistributedRunError):  # a bug: its traceback
            raise
        # distill / finetune write their training state through it: a full disk was a traceback
        msg = _disk_full_message(args, e) if says_disk_full(e) else str(e)
    except ValueError as e:
        msg = f"{type(e).__name__}: {e}"
    except KeyboardInterrupt:
        msg = "interrupted"
    print(f"ppap-fast: error: {' '.join(msg.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
