"""Saved diffusers denoisers as ``denoiser(x, t) -> eps`` for the CLI (``--denoiser diffusers:PATH``).

PATH is a folder written by ``save_pretrained``: a ``UNet2DModel`` (its config.json and weights) or a
whole pipeline (model_index.json, ``unet/``, ``scheduler/``), read offline. Only unconditional pixel
``UNet2DModel`` denoisers (a latent pipeline, with a ``vae`` / ``vqvae``, is refused): the CLI has no
class labels or text states to give (``PPAPGuidedPipeline`` takes both). The pipeline's scheduler
config, where there is one, must describe the schedule the CLI samples with (``--schedule``,
``--num-timesteps``) and an eps prediction: a mismatch raises naming the flags, instead of sampling
on another noise schedule than the model was trained on. A 2C-channel UNet whose scheduler has
``variance_type='learned'`` (or a fixed one: an inconsistent config) is refused for DDPM (its variance
channels are read as learned_range); a C-channel UNet's ``fixed_small`` / ``fixed_large`` is the DDPM
sampler's variance (``scheduler_var_type``). Its ``clip_sample`` / ``clip_sample_range`` is the samplers'
clip of the predicted x0 (``scheduler_clip_range``); ``thresholding=True`` is refused (not implemented).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class DiffusersDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` as ``denoiser(x, t) -> model output`` (its ``.sample``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample

    def fuse_norm_act(self, enabled: bool = True) -> "DiffusersDenoiser":
        """The UNet's ResnetBlock2D norms + SiLU as fused ops (integrations.diffusers.fuse_norm_act), in
        place: the fast sampler's CUDA default, as for ADMUNet."""
        from .diffusers import fuse_norm_act

        if fuse_norm_act(self.unet, enabled) == 0 and enabled:  # the fast sampler's option did nothing silently
            import warnings

            from ..fast_sampling import FastSamplingWarning

            warnings.warn(f"fuse_norm_act: no block of this {type(self.unet).__name__} can run fused (a ResnetBlock2D "
                          "with GroupNorms, SiLU, plain convs and a time embedding): it runs unchanged",
                          FastSamplingWarning, stacklevel=2)
        return self


def unet_dir(path) -> Path:
    """The UNet folder of ``path``: the folder itself (config.json) or a pipeline's ``unet/``."""
    p = Path(path)
    if (p / "unet" / "config.json").is_file():
        return p / "unet"
    if (p / "config.json").is_file():
        return p
    raise ValueError(f"denoiser 'diffusers:{path}': no config.json there or in its unet/ folder (expected a "
                     "UNet2DModel or a pipeline saved with save_pretrained)")


def _json_object(f: Path, path) -> dict:
    """The JSON object in ``f`` (a file of the saved folder ``path``); a ValueError naming it when it is none."""
    from ..data.shards import read_json_object

    return read_json_object(f, f"denoiser 'diffusers:{path}':", advice="save the model again (save_pretrained)")


def scheduler_config(path) -> dict | None:
    """The pipeline's scheduler config (``scheduler/scheduler_config.json``, or one beside the UNet's
    config; for a pipeline's ``unet/`` folder, the pipeline's), None where the folder holds the UNet alone."""
    p = Path(path)
    up = unet_dir(p).parent
    in_pipeline = (up / "model_index.json").is_file()  # not a sibling folder's scheduler
    for cand in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json",
                 up / "scheduler" / "scheduler_config.json" if in_pipeline else None):
        if cand is not None and cand.is_file():
            return _json_object(cand, path)
    return None


def _weight_files(d: Path) -> tuple[list, str | None]:
    """(the UNet's weight files, their variant): the plain names, else the one variant saved
    (``save_pretrained(variant="fp16")`` writes only diffusion_pytorch_model.fp16.safetensors)."""
    plain = [d / name for name in WEIGHT_FILES if (d / name).is_file()]
    if plain:
        return plain, None
    found = {}
    for f in d.glob("diffusion_pytorch_model.*"):
        parts = f.name.split(".")
        if len(parts) == 3 and f.suffix in (".safetensors", ".bin") and f.is_file():
            found.setdefault(parts[1], []).append(f)
    if len(found) > 1:
        raise ValueError(f"denoiser 'diffusers:{d}': weights of several variants {sorted(found)} and none without "
                         "one: keep one variant")
    return next(((sorted(v), k) for k, v in found.items()), ([], None))


def weights_fingerprint(path) -> list:
    """File fingerprints of the UNet's config and weights (a data-free set's identity: other weights in
    the same folder are another denoiser)."""
    from ..distributed import file_fingerprint

    d = unet_dir(path)
    return [file_fingerprint(f) for f in [d / "config.json", *_weight_files(d)[0]] if f.is_file()]


def _latent_component(path) -> str | None:
    """The autoencoder a pipeline's model_index.json names (its UNet denoises latents), else None."""
    d = unet_dir(path)
    for idx in (Path(path) / "model_index.json", d.parent / "model_index.json" if d.name == "unet" else None):
        if idx is not None and idx.is_file():
            comps = _json_object(idx, path)
            for name in ("vae", "vqvae"):
                if isinstance(comps.get(name), list) and any(comps[name]):  # [null, null]: an absent component
                    return f"{name} ({comps[name][-1]})"
            return None
    return None


def load_denoiser(path) -> DiffusersDenoiser:
    """``DiffusersDenoiser`` of the UNet2DModel saved at ``path`` (offline); conditional and latent models raise."""
    d = unet_dir(path)
    latent = _latent_component(path)
    if latent:  # its UNet was sampled as a pixel model: latents written as images
        raise ValueError(f"denoiser 'diffusers:{path}' is a latent diffusion pipeline (its {latent} decodes the "
                         "UNet's latents): the CLI samples pixel-space UNet2DModel denoisers only")
    cfg = _json_object(d / "config.json", path)
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"denoiser 'diffusers:{path}' is a {cls}: the CLI samples unconditional UNet2DModel "
                         "denoisers only (text or other conditioning: PPAPGuidedPipeline with prompt_embeds)")
    if cfg.get("num_class_embeds") or cfg.get("class_embed_type"):
        raise ValueError(f"denoiser 'diffusers:{path}' is class-conditional (num_class_embeds / class_embed_type): "
                         "the CLI has no labels to give it (PPAPGuidedPipeline takes class_labels)")
    if cfg.get("time_embedding_type") == "fourier":  # it takes sigmas and divides its output by them: NaN at t = 0
        raise ValueError(f"denoiser 'diffusers:{path}' has time_embedding_type='fourier': a score-SDE (VE) network "
                         "conditioned on sigma, not an eps model of the DDPM timesteps the CLI samples with")
    files, variant = _weight_files(d)
    if not files:  # a variant (fp16) is read too: it was refused as "no weights"
        raise ValueError(f"denoiser 'diffusers:{path}': no {' or '.join(WEIGHT_FILES)} (or a variant of them) in {d}")
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ValueError("denoiser 'diffusers:...' needs diffusers (pip install diffusers)") from e
    return DiffusersDenoiser(UNet2DModel.from_pretrained(d, local_files_only=True, variant=variant))


def _close(a, b) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)


def scheduler_var_type(path, sampler: str | None) -> str | None:
    """The DDPM variance ("fixed_small" / "fixed_large") the saved scheduler config names for a C-channel
    UNet sampled by ``sampler`` "ddpm" (DDPMScheduler's default is fixed_small; the samplers' default for C
    channels, fixed_large), else None (the sampler's default). "fixed_small_log" is fixed_small; not
    "fixed_large_log": DDPMScheduler's step takes the square root of log(beta_t) there (NaN)."""
    cfg = scheduler_config(path) if sampler == "ddpm" else None
    vt = None if cfg is None else cfg.get("variance_type")
    if vt == "fixed_small_log":  # DDPMScheduler's step: the same std, computed in log space
        vt = "fixed_small"
    if vt not in ("fixed_small", "fixed_large"):
        return None
    unet = _json_object(unet_dir(path) / "config.json", path)
    return vt if unet.get("out_channels", 3) == unet.get("in_channels", 3) else None


def scheduler_clip_range(path) -> float | None:
    """The bound DDPM / DDIM schedulers clip the predicted x0 to: the saved config's ``clip_sample_range``
    (diffusers' default 1.0, the samplers' own clip), None with ``clip_sample=False`` (no clipping)."""
    cfg = scheduler_config(path) or {}
    if not cfg.get("clip_sample", True):
        return None
    clip = cfg.get("clip_sample_range", 1.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"denoiser 'diffusers:{path}' (its scheduler config) has clip_sample_range={clip!r}: give "
                         "a finite bound > 0, or clip_sample=false")
    return float(clip)


def check_schedule(path, schedule: str, num_timesteps: int | None, sampler: str | None = None) -> None:
    """Raise if the saved scheduler config describes another schedule than ``schedule`` over
    ``num_timesteps`` (guided-diffusion's "linear" = diffusers' "linear" from 1e-4 to 0.02 scaled by
    1000 / T; "cosine" = "squaredcos_cap_v2"), or a prediction other than eps. Unless ``sampler`` is
    "ddim" (which ignores variance channels), a 2C-channel UNet with ``variance_type='learned'`` or a fixed
    one ("fixed_small", ...) raises: the DDPM samplers read those channels as learned_range."""
    cfg = scheduler_config(path)
    if cfg is None:
        return
    where = f"denoiser 'diffusers:{path}' (its scheduler config)"
    pred = cfg.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"{where} predicts {pred!r}: the samplers take eps-prediction models")
    if cfg.get("variance_type") == "learned" and sampler != "ddim":
        unet = _json_object(unet_dir(path) / "config.json", path)
        if unet.get("out_channels", 3) == 2 * unet.get("in_channels", 3):
            raise ValueError(f"{where} has variance_type='learned' (the UNet's second half of channels is its "
                             "variance itself): the DDPM sampler would read it as learned_range (an interpolation "
                             "between log beta_t and the posterior log-variance); sample it with --sampler ddim")
    vt = cfg.get("variance_type")
    if isinstance(vt, str) and vt.startswith("fixed_") and sampler != "ddim":  # diffusers' own step fails on it
        unet = _json_object(unet_dir(path) / "config.json", path)
        if unet.get("out_channels", 3) == 2 * unet.get("in_channels", 3):
            raise ValueError(f"{where} has variance_type={vt!r} but the UNet outputs 2C channels (eps and a "
                             "variance): an inconsistent config, which the DDPM sampler would read as learned_range; "
                             "fix the config's variance_type, or sample it with --sampler ddim")
    if cfg.get("thresholding"):  # a per-sample percentile of |x0|: the samplers clip to a fixed bound only
        raise ValueError(f"{where} has thresholding=True (dynamic thresholding of x0), which the samplers do not "
                         "implement: set thresholding to false in its scheduler_config.json to sample with clip_sample")
    scheduler_clip_range(path)  # a bad clip_sample_range raises
    if cfg.get("trained_betas") is not None:
        raise ValueError(f"{where} has trained_betas: no named schedule reproduces them")
    if cfg.get("rescale_betas_zero_snr"):  # its alphas_cumprod end at 0: the model was trained on other abar
        raise ValueError(f"{where} has rescale_betas_zero_snr=True (zero terminal SNR): no named schedule "
                         "reproduces its rescaled betas")
    if "beta_schedule" not in cfg and ("sigma_min" in cfg or "sigma_max" in cfg):  # VE (ScoreSdeVe, KarrasVe)
        raise ValueError(f"{where} ({cfg.get('_class_name')}) has no beta_schedule: not a DDPM (beta) schedule")
    T = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    scale = 1000 / T
    if kind == "linear" and _close(cfg.get("beta_start", 1e-4), 1e-4 * scale) \
            and _close(cfg.get("beta_end", 0.02), 0.02 * scale):
        theirs = "linear"
    elif kind == "squaredcos_cap_v2":
        theirs = "cosine"
    else:
        raise ValueError(f"{where}: beta_schedule {kind!r} (beta_start {cfg.get('beta_start')}, beta_end "
                         f"{cfg.get('beta_end')}, T={T}) is none of the named schedules (linear: 1e-4 .. 0.02 "
                         "at T=1000; cosine: squaredcos_cap_v2)")
    n = 1000 if num_timesteps is None else int(num_timesteps)  # None: a command without --num-timesteps
    if (theirs, T) != (schedule, n):
        if T != n and num_timesteps is None:
            raise ValueError(f"{where} was trained over {T} steps; this command samples over 1000 only")
        raise ValueError(f"{where} was trained on the {theirs} schedule over {T} steps; this run samples "
                         f"{schedule!r} over {n}: pass --schedule {theirs}"
                         + (f" --num-timesteps {T}" if T != n else ""))
