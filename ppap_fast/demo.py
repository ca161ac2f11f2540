"""The bundled digits demo: training recipes for its models and the end-to-end comparison.

Stages (each also a ``ppap-fast`` subcommand, see cli.py):
  train_diffusion  unconditional eps-prediction UNet on the diffusion-train split
  (classifiers, distillation and fine-tuning live in finetune.py / distill.py)
  run_demo         sample every method with the shipped weights, score with the evaluator; then the
                   segmentation-guidance comparison (seg_demo.py)
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import SEMANTIC_CLASSES, DigitsSplits, random_shift
from .data.shards import _atomic, remove_stale_tmp
from .models.tiny import EpsModel, count_params, load_model, save_model
from .progress import BarLoss
from .schedule import Schedule

# The demo UNet: ~0.95M parameters, attention only at 4x4 (fast enough for a CPU demo).
DEMO_UNET = dict(block_out_channels=[32, 48, 64],
                 down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"])


def _log(msg: str, log=None):
    print(msg, flush=True)
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def train_diffusion(out, steps: int = 2000, batch_size: int = 64, lr: float = 2e-4, seed: int = 0,
                    data_seed: int = 0, ema_decay: float = 0.999, device: str = "cpu",
                    max_minutes: float | None = None, checkpoint_every: int = 500, unet_config: dict | None = None,
                    log=None, progress: bool = True) -> Path:
    """Train the unconditional demo UNet (linear schedule, T=1000, eps prediction, MSE).

    Saves the EMA weights to ``out`` (safetensors) when training ends (``steps`` or ``max_minutes``), never
    before: a killed run leaves no ``out``. A checkpoint ``out + '.ckpt.pt'`` is written every
    ``checkpoint_every`` steps and resumed from if present; it is kept after training ends, so a rerun with
    more ``steps`` continues training (bitwise as one run of that many steps).
    """
    if not 0 <= ema_decay <= 1:  # nan: every EMA weight NaN, saved without a word
        raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = DigitsSplits.create(data_seed).diffusion[0]
    sched = Schedule.create("linear", 1000).to(device)
    model = EpsModel(**(unet_config or DEMO_UNET)).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ckpt = Path(str(out) + ".ckpt.pt")
    start = 0
    run_cfg = {"batch_size": batch_size, "lr": lr, "seed": seed, "data_seed": data_seed, "ema_decay": ema_decay,
               "unet_config": unet_config or DEMO_UNET}
    remove_stale_tmp(ckpt, ".pt")  # a checkpoint write that was killed (only _atomic's exact names)
    if ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu")  # the generator state must stay a CPU tensor
        except Exception as e:  # written atomically: damage is external, never resume from it silently
            raise DemoError(f"{ckpt} is not a readable checkpoint ({type(e).__name__}); remove it to start over") from None
        old_cfg = state.get("config")
        if old_cfg is not None and old_cfg != run_cfg:
            diff = ", ".join(f"{k}: {old_cfg.get(k)!r} there vs {v!r} now" for k, v in run_cfg.items() if old_cfg.get(k) != v)
            raise DemoError(f"{ckpt} was written with other settings ({diff}); use the same settings or remove it")
        if state["step"] > steps:  # its weights were written as the result, trained longer than asked
            raise DemoError(f"{ckpt} is at step {state['step']}, past --steps {steps}: pass --steps {state['step']} "
                            "or more, or remove it to start over")
        model.load_state_dict(state["model"]); ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]); start = state["step"]; gen.set_state(state["gen"])
        _log(f"resumed from {ckpt} at step {start}", log)
    _log(f"train-diffusion: {count_params(model)} params, {x_all.shape[0]} images, steps {start}->{steps}, "
         f"batch {batch_size}, device {device}", log)
    t0 = time.time()
    it = range(start, steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="train-diffusion", initial=start, total=steps, mininterval=5)
    bar_loss = BarLoss(it, every_s=5.0)
    running = None
    step = start
    for step in it:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
        x0 = random_shift(x_all[idx], 1, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        loss = F.mse_loss(model(sched.q_sample(x0, t, noise), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar_loss.add(running)
        done = step + 1
        timed_out = max_minutes is not None and (time.time() - t0) > 60 * max_minutes
        if done % checkpoint_every == 0 or done == steps or timed_out:
            _log(f"step {done} loss {running:.4f} elapsed {time.time() - t0:.0f}s", log)
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "step": done, "gen": gen.get_state(), "config": run_cfg}
            _atomic(ckpt, lambda tmp: torch.save(state, tmp), ".pt")
        if done == steps or timed_out:  # only then: a killed run left a partly trained ``out`` like a finished one
            save_model(ema.cpu(), out, extra={"steps": done, "batch_size": batch_size, "lr": lr, "seed": seed,
                                             "data_seed": data_seed, "ema_decay": ema_decay})
            ema.to(device)
        if timed_out:
            _log(f"stopping at step {done}: max_minutes={max_minutes} reached", log)
            break
    if start >= steps:  # no step ran: write what the checkpoint holds (a kill may have left an older ``out``)
        save_model(ema.cpu(), out, extra={"steps": start, "batch_size": batch_size, "lr": lr, "seed": seed,
                                         "data_seed": data_seed, "ema_decay": ema_decay})
    return out


# ============================================================================= comparison
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEMO_METHODS = ["none", "naive", "x0hat", "ppap-5", "ppap-10", "noise-aware", "multi-experts-5"]
DEMO_MIN_SAMPLES = 10  # the targets cycle through the 10 classes: at least one sample of each
DEFAULT_SCALE = 10.0  # one scale for every guided method, fixed a priori (see docs/demo.md)
NUM_CLASSES = 10
SEG_PER_TARGET = 2  # the demo's segmentation comparison: samples per held-out target mask (10 masks)
DDPM_NOISE_KEY = 7919  # sample_seed(seed, DDPM_NOISE_KEY, j): sample j's DDPM step noise


class DemoError(Exception):
    """A user-facing error (bad input): the CLI prints it on one line and exits non-zero."""


def parse_method(method: str) -> tuple[str, int]:
    """'ppap-10' -> ('ppap', 10); 'multi-experts-5' -> ('multi-experts', 5); others -> (name, 0|1)."""
    m = str(method).strip().lower()
    if m in ("none", "naive", "x0hat"):
        return m, 0
    if m in ("noise-aware", "single", "noise-aware-1"):
        return "noise-aware", 1
    for fam in ("ppap", "multi-experts"):
        if m.startswith(fam + "-"):
            n = m[len(fam) + 1:]
            if n.isdigit() and int(n) > 0 and 1000 % int(n) == 0:
                return fam, int(n)
    raise DemoError(f"unknown method {method!r}: expected none, naive, x0hat, noise-aware, ppap-N or "
                    f"multi-experts-N (N dividing 1000)")


def weight_path(weights_dir, method: str) -> Path:
    fam, n = parse_method(method)
    d = Path(weights_dir)
    return {"none": d / "classifier.safetensors", "naive": d / "classifier.safetensors",
            "x0hat": d / "classifier.safetensors", "ppap": d / f"ppap{n}",
            "noise-aware": d / "noise_aware.safetensors",
            "multi-experts": d / f"multi{n}.safetensors"}[fam]


def _load(fn, *args):
    try:
        return fn(*args)
    except DemoError:
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise DemoError(str(e).splitlines()[0] if str(e) else repr(e)) from None


def load_unet(weights_dir=WEIGHTS_DIR) -> torch.nn.Module:
    """The demo's unconditional UNet (``EpsModel``: ``unet(x, t) -> eps``, linear schedule, T=1000; the
    diffusers ``UNet2DModel`` itself is its ``.unet``), in eval mode."""
    return _load(load_model, Path(weights_dir) / "unet.safetensors", "unet")


def load_evaluator(weights_dir=WEIGHTS_DIR) -> torch.nn.Module:
    """The demo's evaluator (scores samples only; it guides nothing), in eval mode."""
    return _load(load_model, Path(weights_dir) / "evaluator.safetensors", "evalnet")


# the demo's off-the-shelf teachers by task: (weight file, model kind)
TEACHERS = {"classification": ("classifier.safetensors", "resnet"),
            "segmentation": ("segnet.safetensors", "segnet"),
            "semantic": ("semseg.safetensors", "segnet")}
# the segmentation teachers share a kind: their class counts and train-classifier --arch tell them apart
TEACHER_CLASSES = {"segmentation": 2, "semantic": SEMANTIC_CLASSES}
TEACHER_ARCH = {"classification": "resnet", "segmentation": "segnet", "semantic": "semseg"}


def load_teacher(weights_dir=WEIGHTS_DIR, task: str = "classification") -> torch.nn.Module:
    """The off-the-shelf net of ``task``: the digit classifier, the stroke segmentation net, or the semantic
    one (background / ink of digit 0..9)."""
    if task not in TEACHERS:
        raise DemoError(f"unknown task {task!r}: expected one of {', '.join(TEACHERS)}")
    name, kind = TEACHERS[task]
    net = _load(load_model, Path(weights_dir) / name, kind)
    want = TEACHER_CLASSES.get(task)
    got = net.config.get("num_classes")
    if want is not None and got != want:  # the other segmentation net (both are segnets) ran silently
        raise DemoError(f"weight file {Path(weights_dir) / name} holds a {got}-class segnet; --task {task} needs the "
                        f"{want}-class one (train-classifier --arch {TEACHER_ARCH[task]})")
    return net


def load_classifier(weights_dir=WEIGHTS_DIR) -> torch.nn.Module:
    """The demo's off-the-shelf classifier (``TinyResNet``, trained on clean images only), in eval mode:
    the base network of the PPAP experts and, on its own, the naive guide."""
    return load_teacher(weights_dir, "classification")


def load_ppap_bank(n_experts: int = 5, weights_dir=WEIGHTS_DIR, classifier=None):
    """The shipped PPAP-``n_experts`` experts (5 or 10) as an ``ExpertBank`` over ``classifier`` (default:
    :func:`load_classifier`), in eval mode: ``ClassGuide(bank, target, scale)`` guides with it."""
    path = weight_path(weights_dir, f"ppap-{n_experts}")
    bank = _read_bank(path, load_classifier(weights_dir) if classifier is None else classifier)
    if bank.n_experts != n_experts:
        raise DemoError(f"{path} holds {bank.n_experts} experts, PPAP-{n_experts} needs {n_experts}")
    return bank.eval()


def _read_bank(path: Path, classifier):
    from .experts import load_experts

    if not (path / "experts.safetensors").is_file():
        raise DemoError(f"weight file not found: {path / 'experts.safetensors'}")
    try:
        return load_experts(path, classifier)
    except Exception as e:
        raise DemoError(f"corrupt or mismatched PPAP experts in {path}: {str(e).splitlines()[0]}") from None


def _load_ppap(path: Path, classifier):
    from .finetune import from_modules

    bank = _read_bank(path, classifier)
    report = bank.parameter_report()
    router = from_modules([bank.merged(n) for n in range(bank.n_experts)], bank.num_timesteps)
    return router, report["total_trainable"]


def load_guide_model(weights_dir, method: str):
    """(guide model or None, pass_t, info dict with trainable parameters / labelled data)."""
    from .finetune import load_multi

    fam, n = parse_method(method)
    if fam == "none":
        return None, False, {"trainable_parameters": 0, "labelled_data": 0}
    clf = _load(load_model, Path(weights_dir) / "classifier.safetensors", "resnet")
    if fam in ("naive", "x0hat"):
        return clf, False, {"trainable_parameters": 0, "labelled_data": 0}
    path = weight_path(weights_dir, method)
    if fam == "ppap":
        model, trainable = _load_ppap(path, clf)
        if model.n_experts != n:
            raise DemoError(f"{path} holds {model.n_experts} experts, method {method} needs {n}")
        return model, True, {"trainable_parameters": int(trainable), "labelled_data": 0}
    me = _load(load_multi, path)
    if me.n_experts != n:
        raise DemoError(f"{path} holds {me.n_experts} experts, method {method} needs {n}")
    return me, True, {"trainable_parameters": count_params(me),
                      "labelled_data": int(me.extra.get("labelled_images", 0))}


def check_targets(targets) -> torch.Tensor:
    t = torch.as_tensor(targets, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise DemoError("no target classes given")
    bad = t[(t < 0) | (t >= NUM_CLASSES)]
    if bad.numel():
        raise DemoError(f"target class {int(bad[0])} out of range [0, {NUM_CLASSES})")
    return t


def cyclic_targets(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


class PeakMemory:
    """Peak resident memory above the starting point while the block runs (MB).

    ru_maxrss is a process-lifetime maximum, useless for the second method of a run; a
    thread samples the current RSS (/proc/self/statm) every few ms instead. Host memory only: on
    CUDA, guided_sample reports the allocator's own peak beside it (``peak_memory_kind``).
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb, self.start_mb = interval, 0.0, 0.0

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):  # not Linux: lifetime maximum
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = self.current_mb()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, self.current_mb())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


ONE_DDIM_STEP = "DDIM needs --steps 2 or more (its stride over T = 1000 gives no single step from x_T)"
ONE_DDPM_STEP = "DDPM needs --steps 2 or more (its one respaced step is t = 0: the samples would be the initial noise)"


def check_step_count(sampler: str, steps: int) -> None:
    """ValueError for a step count the CLI samplers cannot take: 1 (DDIM's schedule hint named respacing '1',
    which no CLI option takes; DDPM sampled silently, returning the noise)."""
    if steps == 1:
        raise ValueError(ONE_DDIM_STEP if sampler == "ddim" else ONE_DDPM_STEP)


def demo_schedule(sampler: str, steps: int | None) -> tuple[Schedule, int]:
    """(the respaced schedule, its step count) of ``sampler`` ("ddim": 25 steps by default, "ddpm": 250)."""
    if sampler not in ("ddim", "ddpm"):
        raise DemoError(f"unknown sampler {sampler!r}: expected ddim or ddpm")
    steps = steps or (25 if sampler == "ddim" else 250)
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    try:
        check_step_count(sampler, steps)
        return Schedule.create("linear", 1000, respacing=respacing), steps
    except ValueError as e:
        raise DemoError(f"bad step count {steps} for {sampler}: {e}") from None


def run_sampler(unet, n: int, sched: Schedule, sampler: str, make_guide, seed: int = 0, batch_size: int = 250,
                fast: bool = False, progress: bool = True, desc: str = "sample") -> tuple[torch.Tensor, dict]:
    """The demos' sampling loop: ``n`` images 1 x 16 x 16 from x_T ~ N(0, I) drawn with ``seed`` (the same x_T
    for every method: common random numbers), in chunks of ``batch_size``; ``make_guide(rows, denoiser)`` gives
    the guide (or None) of the chunk's rows (a slice), ``denoiser`` being the UNet with its calls counted.
    Returns (images in [-1, 1], {"seconds", "memory" (PeakMemory), "unet_calls", "chunks"})."""
    from .sampling import sample_loop
    from .seeding import PerSampleNoise

    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, 1, 16, 16), generator=gen)
    counter = {"unet": 0}

    def counted(x, t):
        counter["unet"] += 1
        return unet(x, t)

    outs = []
    chunks = list(range(0, n, batch_size))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chunks) * sched.num_timesteps, desc=desc, mininterval=1)
    with PeakMemory() as mem:
        t0 = time.time()
        for c in chunks:
            guide = make_guide(slice(c, c + batch_size), counted)
            # DDPM's step noise: one stream per sample, so --batch-size changes no image
            noise_fn = PerSampleNoise((seed, DDPM_NOISE_KEY), range(c, min(c + batch_size, n))).noise_fn
            if fast:
                from .fast_sampling import FastGuidedSampler

                fs = FastGuidedSampler(counted, sched, sampler=sampler, guide=guide, eta=0.0)
                outs.append(fs.sample(x_T[c:c + batch_size], noise_fn=noise_fn,
                                      callback=(lambda i, x, x0: bar.update(1)) if bar else None))
            else:
                outs.append(sample_loop(counted, x_T[c:c + batch_size], sched, sampler=sampler, guide=guide,
                                        eta=0.0, noise_fn=noise_fn,
                                        callback=(lambda i, o: bar.update(1)) if bar else None))
        seconds = time.time() - t0
    if bar is not None:
        bar.close()
    return torch.cat(outs), {"seconds": seconds, "memory": mem, "unet_calls": counter["unet"], "chunks": len(chunks)}


def sample_method(method: str, weights_dir, targets, sampler: str = "ddim", steps: int | None = None,
                  scale: float = DEFAULT_SCALE, seed: int = 0, batch_size: int = 250, unet=None,
                  progress: bool = True, fast: bool = False) -> tuple[torch.Tensor, dict]:
    """Sample len(targets) images with ``method``; returns (images in [-1, 1], stats).

    ``fast``: the fast path (:class:`ppap_fast.fast_sampling.FastGuidedSampler`: fused update, PPAP experts
    merged per band) instead of the reference loop; same random numbers, same images up to float rounding."""
    from .guidance import ClassGuide, X0HatGuide

    fam, _ = parse_method(method)
    targets = check_targets(targets)
    sched, steps = demo_schedule(sampler, steps)
    unet = unet if unet is not None else load_unet(weights_dir)
    gmodel, pass_t, info = load_guide_model(weights_dir, method)
    base_acp = Schedule.create("linear", 1000).alphas_cumprod
    n = targets.numel()

    def make_guide(rows, denoiser):
        tgt = targets[rows]
        if fam == "x0hat":
            return X0HatGuide(gmodel, denoiser, base_acp, tgt, scale)
        if gmodel is not None:
            return ClassGuide(gmodel, tgt, scale, pass_t=pass_t, num_classes=NUM_CLASSES)
        return None

    x, run = run_sampler(unet, n, sched, sampler, make_guide, seed, batch_size, fast, progress, f"sample {method}")
    seconds, mem = run["seconds"], run["memory"]
    stats = {**info, "method": method, "sampler": sampler, "steps": steps, "path": "fast" if fast else "reference", "scale": scale if fam != "none" else 0.0,
             "num_samples": n, "nfe_per_sample": run["unet_calls"] / run["chunks"],
             "guide_calls_per_sample": 0 if fam == "none" else sched.num_timesteps,
             "seconds": round(seconds, 2), "images_per_s": round(n / max(seconds, 1e-9), 2),
             "peak_memory_mb": round(mem.peak_mb, 1), "peak_memory_kind": "process_rss",  # as guided-sample's
             "peak_rss_mb": round(mem.peak_mb, 1), "peak_rss_delta_mb": round(mem.delta_mb, 1)}
    return x, stats


# ----------------------------------------------------------------------------- files
def save_samples(path, images: torch.Tensor, labels) -> Path:
    from .data import to_uint8, write_npz_atomic

    labels = np.asarray(labels, dtype=np.int64)
    return write_npz_atomic(path, images=to_uint8(images), labels=labels)


def read_samples(path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if path.is_dir():
        raise DemoError(f"sample file {path} is a directory: name the .npz inside it")
    if not path.is_file():
        raise DemoError(f"sample file not found: {path}")
    import zipfile

    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and suggest allow_pickle=True
        raise DemoError(f"{path} is not an .npz archive: evaluate reads the .npz that `ppap-fast sample` or "
                        "`ppap-fast demo` writes (images uint8 N x H x W x C, labels int64 [N])")
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("labels", "targets") if k in z.files), None)  # targets: guided-sample's
            if "images" not in z.files or key is None:
                raise DemoError(f"{path} has no 'images' and 'labels' (or 'targets') arrays (it has "
                                f"{sorted(z.files)})")
            images, labels = z["images"], z[key]
    except DemoError:
        raise
    except Exception as e:
        raise DemoError(f"corrupt or unreadable sample file {path}: {type(e).__name__}: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DemoError(f"{path}: images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise DemoError(f"{path}: labels must be int64 [N], got {labels.dtype} {labels.shape}")
    return images, labels


def save_grid(path, images_u8: np.ndarray, labels=None, per_class: int = 10, scale: int = 3) -> Path:
    """PNG grid: one row per class present, in class order (first ``per_class`` samples of each), when labels
    are given."""
    from PIL import Image

    imgs = np.asarray(images_u8)[..., 0]
    h, w = imgs.shape[1:3]
    if labels is not None:
        rows = []
        for c in np.unique(np.asarray(labels)):  # every class 0..9 in the demo; a subset draws no empty rows
            sel = imgs[np.asarray(labels) == c][:per_class]
            row = np.zeros((per_class, h, w), np.uint8)
            row[:len(sel)] = sel
            rows.append(row)
        grid = np.stack(rows)
    else:
        k = min(per_class, imgs.shape[0])
        nrow = -(-imgs.shape[0] // k)
        pad = np.zeros((nrow * k - imgs.shape[0], h, w), np.uint8)
        grid = np.concatenate([imgs, pad]).reshape(nrow, k, h, w)
    R, C = grid.shape[:2]
    canvas = np.full((R * (h + 1) + 1, C * (w + 1) + 1), 64, np.uint8)
    for i in range(R):
        for j in range(C):
            canvas[1 + i * (h + 1):1 + i * (h + 1) + h, 1 + j * (w + 1):1 + j * (w + 1) + w] = grid[i, j]
    im = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    return _atomic(path, lambda tmp: im.save(tmp, format="PNG"), ".png")


COMPARISON_CELL, COMPARISON_GAP, COMPARISON_LEFT, COMPARISON_TOP = 64, 4, 230, 28


def comparison_cell(row: int, col: int) -> tuple[int, int]:
    """Top-left (x, y) pixel of sample ``col`` of method ``row`` in :func:`save_comparison`'s picture."""
    step = COMPARISON_CELL + COMPARISON_GAP
    return COMPARISON_LEFT + col * step, COMPARISON_TOP + row * step


def save_comparison(path, samples: dict, labels, captions: dict | None = None) -> Path:
    """One picture of every method: a row per method (``samples``: name -> uint8 N x H x W x 1, or x 3 for a
    colour row, which makes the picture RGB; all drawn from the same initial noise per index), a column per
    class with that class's first sample, the method's name and ``captions[name]`` on the left."""
    from PIL import Image, ImageDraw, ImageFont

    labels = np.asarray(labels)
    cols = [int(np.flatnonzero(labels == c)[0]) for c in range(NUM_CLASSES) if (labels == c).any()]
    names = list(samples)
    x_end, y_end = comparison_cell(len(names), len(cols))
    rgb = any(np.asarray(v).shape[-1] == 3 for v in samples.values())  # a colour row (semantic masks)
    canvas = Image.new("RGB" if rgb else "L", (x_end, y_end), (255, 255, 255) if rgb else 255)
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    for j, k in enumerate(cols):
        x, _ = comparison_cell(0, j)
        draw.text((x + COMPARISON_CELL // 2, COMPARISON_TOP // 2), f"target {int(labels[k])}", fill=0,
                  font=font, anchor="mm")
    for i, name in enumerate(names):
        imgs = np.asarray(samples[name])
        imgs = imgs[..., 0] if imgs.shape[-1] == 1 else imgs
        _, y = comparison_cell(i, 0)
        text = name if not captions or name not in captions else f"{name}\n{captions[name]}"
        draw.multiline_text((8, y + COMPARISON_CELL // 2), text, fill=0, font=font, anchor="lm")
        for j, k in enumerate(cols):
            cell = Image.fromarray(imgs[k]).convert(canvas.mode).resize((COMPARISON_CELL, COMPARISON_CELL),
                                                                           Image.NEAREST)
            canvas.paste(cell, comparison_cell(i, j))
    return _atomic(path, lambda tmp: canvas.save(tmp, format="PNG"), ".png")


_REAL_CACHE: dict = {}


def evaluate_samples(images_u8: np.ndarray, labels: np.ndarray, evaluator, data_seed: int = 0) -> dict:
    from .data import DigitsSplits, from_uint8
    from .data.digits import to_uint8
    from .metrics import evaluator_outputs, score_samples

    from .distributed import module_fingerprint

    # keyed by the weights, not id(): a freed evaluator's id is reused by the next one, and weights
    # loaded in place keep the id; either way the cache served another network's real features
    p = next((p for p in evaluator.parameters() if p.is_floating_point()), None)
    key = (module_fingerprint(evaluator), str(p.device) if p is not None else None, data_seed)
    if key not in _REAL_CACHE:
        real = from_uint8(to_uint8(DigitsSplits.create(data_seed).eval[0]))  # same uint8 quantisation as samples
        _REAL_CACHE[key] = (real, evaluator_outputs(evaluator, real))
    real, real_out = _REAL_CACHE[key]
    if images_u8.shape[1:] != (16, 16, 1):
        raise DemoError(f"samples must be 16 x 16 x 1 images, got {images_u8.shape[1:]}")
    if images_u8.shape[0] < 4:  # precision / recall need more than k=3 samples (FD at least 2)
        raise DemoError(f"scoring needs at least 4 samples, got {images_u8.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DemoError(f"labels out of range [0, {NUM_CLASSES})")
    return score_samples(evaluator, from_uint8(images_u8), labels, real, real_outputs=real_out)


def check_output_file(path, what: str = "--out") -> Path:
    """Refuse, before any work, an output file path that names an existing directory (the atomic
    write would otherwise fail at the end, naming its temporary file)."""
    path = Path(path)
    if path.is_dir():
        raise DemoError(f"{what} {path} is a directory; name an output file")
    return path


def check_writable_dir(d) -> Path:
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise DemoError(f"output directory {d} is an existing file, not a directory: name a new or existing directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
        import tempfile
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-", delete=True):
            pass
    except OSError as e:
        raise DemoError(f"output directory {d} is not writable: {e.strerror or e}") from None
    return d


# ----------------------------------------------------------------------------- the demo
COLUMNS = [("target_accuracy", "acc", "{:.3f}"), ("fd", "FD", "{:.2f}"), ("is", "IS", "{:.2f}"),
           ("precision", "prec", "{:.3f}"), ("recall", "rec", "{:.3f}"),
           ("trainable_parameters", "trainable", "{:d}"), ("labelled_data", "labelled", "{:d}"),
           ("nfe_per_sample", "NFE", "{:.0f}"), ("seconds", "sec", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def markdown_table(rows: list) -> str:
    """Rows of strings (the first: the header) as a Markdown table with padded columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    rows = [["method"] + [c[1] for c in COLUMNS]]
    for m, r in results.items():
        rows.append([m] + [fmt.format(r[k]) for k, _, fmt in COLUMNS])
    return markdown_table(rows)


def save_bar_chart(path, results: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, [("target_accuracy", "target accuracy (evaluator) ↑"),
                                      ("fd", "Fréchet distance (evaluator features) ↓"),
                                      ("is", "Inception-style score (evaluator) ↑")]):
        ax.bar(range(len(methods)), [results[m][key] for m in methods], color="tab:blue")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), ".png")
    plt.close(fig)
    return Path(path)


DEMO_RECORD = "demo_outputs.json"  # the files demo runs wrote in --out: the only ones removed as stale
DEMO_RECORD_MARK = "ppap_fast demo"  # its "written_by": a demo_outputs.json without it is not the demo's


def _read_demo_record(out: Path) -> dict:
    """{name: its _file_entry} of the files earlier demo runs wrote in ``out`` (empty if there is no record). Raises
    DemoError for a demo_outputs.json the demo did not write (the run would overwrite it)."""
    import json

    path = out / DEMO_RECORD
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        rec = None
    if not isinstance(rec, dict) or rec.get("written_by") != DEMO_RECORD_MARK:
        raise DemoError(f"{path} was not written by ppap-fast demo (no \"written_by\": \"{DEMO_RECORD_MARK}\") and the "
                        f"demo would overwrite it: move it away or name another --out")
    files = rec.get("files")
    if not isinstance(files, dict):
        return {}
    return {n: e for n, e in files.items() if n not in ("", ".", "..", DEMO_RECORD) and Path(n).name == n}


def _file_entry(path: Path) -> dict:
    """Size and SHA-256 of a file the demo wrote: a file put in its place since does not match."""
    import hashlib

    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _unchanged(path: Path, entry) -> bool:
    """``path`` is still the file the demo recorded as ``entry``."""
    try:
        return (isinstance(entry, dict) and path.is_file() and path.stat().st_size == entry.get("size")
                and _file_entry(path) == entry)
    except OSError:
        return False


def _write_demo_record(out: Path, files: dict) -> None:
    from .data.shards import write_json_atomic

    write_json_atomic(out / DEMO_RECORD, {"written_by": DEMO_RECORD_MARK, "files": dict(sorted(files.items()))})


def run_demo(out, weights_dir=WEIGHTS_DIR, methods=None, num_samples: int = 200, sampler: str = "ddim",
             steps: int | None = None, scale: float = DEFAULT_SCALE, seed: int = 0, batch_size: int = 250,
             progress: bool = True, seg_per_target: int = SEG_PER_TARGET) -> dict:
    """The class-guidance comparison, then (``seg_per_target`` > 0) the segmentation one
    (:mod:`ppap_fast.seg_demo`: ``seg_per_target`` samples for each of the 10 held-out target masks)."""
    from .data.shards import write_json_atomic

    if num_samples < DEMO_MIN_SAMPLES:  # before the output directory is made
        raise DemoError(f"num_samples (--num-samples) must be at least {DEMO_MIN_SAMPLES} (one sample per class), "
                        f"got {num_samples}")
    if seg_per_target < 0:
        raise DemoError(f"seg_per_target (--seg-per-target) must be 0 (no segmentation comparison) or more, "
                        f"got {seg_per_target}")
    demo_schedule(sampler, steps)  # a step count it cannot take: refused before an earlier run's summary is removed
    methods = list(DEMO_METHODS if methods is None else methods)
    if not methods:
        raise DemoError("no methods to run (an empty --methods list)")
    seen = {}
    for i, m in enumerate(methods):  # none,none sampled it twice and reported it once
        first = seen.setdefault(parse_method(m), i)
        if first != i:
            raise DemoError(f"--methods names one method twice ({methods[first]!r} and {m!r}): name each once")
    out = check_writable_dir(out)
    recorded = _read_demo_record(out)  # before any work: refuses a demo_outputs.json of the user's
    # load (and so validate) every weight file before any work
    unet = load_unet(weights_dir)
    evaluator = load_evaluator(weights_dir)
    for m in methods:
        load_guide_model(weights_dir, m)
    if seg_per_target:
        from .seg_demo import SEG_METHODS, load_seg_guide
        for m in SEG_METHODS:
            load_seg_guide(weights_dir, m)
    from .data.shards import remove_stale_tmp

    summary_files = ["results.json", "results.png", "comparison.png"]
    seg_files = []
    if seg_per_target:
        seg_files = [f"seg_samples_{m}.npz" for m in SEG_METHODS] + ["segmentation.png"]
    this_run = set(summary_files + seg_files)
    this_run |= {f"{kind}_{m.replace('/', '_')}{ext}" for m in methods for kind, ext in (("samples", ".npz"),
                                                                                         ("grid", ".png"))}
    for name in this_run | set(recorded) | {DEMO_RECORD}:
        remove_stale_tmp(out / name, Path(name).suffix)  # a killed run's atomic-write temporaries
    # only files an earlier demo run recorded and that are unchanged since are removed: a file the user made or put
    # in place of one is kept (this run overwrites it only if it writes that name)
    ours = {n for n, e in recorded.items() if _unchanged(out / n, e)}
    # all of an earlier demo run's outputs go, not only its summary: a run stopped early (or with other settings)
    # left the earlier run's samples and grids of the methods it had not reached beside its own
    for name in ours:
        (out / name).unlink(missing_ok=True)
    written = {}

    def record(*names):
        try:
            entries = {n: _file_entry(out / n) for n in names}
            _write_demo_record(out, {**written, **entries})
        except BaseException:  # unrecorded (a full disk), a later run would keep them as the user's: they go
            for n in names:
                (out / n).unlink(missing_ok=True)
            raise
        written.update(entries)

    record()
    targets = cyclic_targets(num_samples)
    results, pictured = {}, {}
    t_start = time.time()
    for m in methods:
        x, stats = sample_method(m, weights_dir, targets, sampler, steps, scale, seed, batch_size, unet=unet,
                                 progress=progress)
        tag = m.replace("/", "_")
        path = save_samples(out / f"samples_{tag}.npz", x, targets.numpy())
        images, labels = read_samples(path)
        record(path.name)
        save_grid(out / f"grid_{tag}.png", images, labels)
        record(f"grid_{tag}.png")
        pictured[m] = images
        results[m] = {**evaluate_samples(images, labels, evaluator), **stats}
        if progress:
            r = results[m]
            print(f"{m}: acc {r['target_accuracy']:.3f} FD {r['fd']:.2f} IS {r['is']:.2f} "
                  f"({r['seconds']:.1f}s)", flush=True)
    seg = None
    if seg_per_target:
        from .seg_demo import run_segmentation

        seg = run_segmentation(out, weights_dir, seg_per_target, sampler, steps, scale, seed, batch_size, progress,
                               unet=unet, evaluator=evaluator, on_written=record)  # each file as it is written
    summary = {"methods": results, "sampler": sampler, "steps": steps or (25 if sampler == "ddim" else 250),
               "scale": scale, "seed": seed, "num_samples": num_samples, "total_seconds": round(time.time() - t_start, 1),
               "torch_threads": torch.get_num_threads()}
    if seg is not None:
        summary["segmentation"] = seg
    write_json_atomic(out / "results.json", summary)
    record("results.json")  # each as it is written: a failure at the next leaves none unrecorded
    save_bar_chart(out / "results.png", results)
    record("results.png")
    save_comparison(out / "comparison.png", pictured, targets.numpy(),
                    {m: f"acc {r['target_accuracy']:.2f}, FD {r['fd']:.0f}" for m, r in results.items()})
    record("comparison.png")
    print(format_table(results))
    if seg is not None:
        from .seg_demo import format_seg_table

        print(f"\nsegmentation guidance ({seg['per_target']} samples x {seg['num_targets']} held-out ink masks, "
              f"IoU of each sample's ink mask with its target; FD over {seg['per_target'] * seg['num_targets']} "
              f"samples: compare only at equal N):")
        print(format_seg_table(seg["methods"]))
    return summary


def make_tiny_weights(weights_dir, seed: int = 0) -> Path:
    """Untrained tiny versions of every demo weight file (unet, classifier, evaluator, PPAP-5/10,
    noise-aware, multi-experts-5, segnet and semseg and their PPAP-5): for tests and smoke runs, built in a second,
    nothing downloaded."""
    from .distill import make_bank
    from .experts import ExpertBank, save_experts
    from .finetune import MultiExperts, save_multi
    from .models.tiny import EvalNet, SegNet, TinyResNet

    d = Path(weights_dir)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_model(EpsModel(block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "UpBlock2D"]), d / "unet.safetensors")
    clf = TinyResNet(widths=[4, 8, 8]).eval()
    save_model(clf, d / "classifier.safetensors", extra={"labelled_images": 500})
    save_model(EvalNet(width=4, feat_dim=8).eval(), d / "evaluator.safetensors")
    for n in (5, 10):  # experts of teachers taking raw x_t: recorded (input_transform=None)
        save_experts(ExpertBank(clf, "resnet", n, 1000, r=2, alpha=1.0), d / f"ppap{n}", input_transform=None)
    save_multi(MultiExperts(clf, 1), d / "noise_aware.safetensors", extra={"labelled_images": 500})
    save_multi(MultiExperts(clf, 5), d / "multi5.safetensors", extra={"labelled_images": 500})
    seg = SegNet(width=4, depth=2).eval()
    save_model(seg, d / "segnet.safetensors")
    save_experts(make_bank(seg, 5, r=2, alpha=1.0), d / "seg_ppap5", input_transform=None)
    sem = SegNet(width=4, depth=2, num_classes=11, context=1).eval()
    save_model(sem, d / "semseg.safetensors", extra={"labelled_images": 500})
    save_experts(make_bank(sem, 5, r=2, alpha=1.0), d / "semseg_ppap5", input_transform=None)
    return d
