"""Parity checks against the golden fixtures made with the official code.

Each check returns the measured error (or parameter count); tests and users
decide the tolerance. Fixtures load with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from .models.adm import ADMUNet
from .schedule import Schedule


def check_ppap_checkpoint_manifest(json_path):
    """Build a random official PPAP ResNet50 checkpoint with exactly the manifest's keys and shapes,
    import it strictly into an ExpertBank and raise on any mismatch (see ppap_fast.experts)."""
    from .experts import check_ppap_checkpoint_manifest as check

    return check(json_path)

__all__ = [
    "check_ppap_checkpoint_manifest",
    "check_adm_golden",
    "check_adm_manifest",
    "check_guided_golden",
    "load_golden_adm",
    "linear_classifier_guide",
    "state_dict_sha256",
    "max_abs_err",
]


def _load(path) -> dict:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a float; inf on shape mismatch or any non-finite value (NaN never passes)."""
    if a.shape != b.shape:
        return float("inf")
    d = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    if d.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(d).all()):
        return float("inf")
    return float(d.max())


def state_dict_sha256(state_dict: dict) -> str:
    """The fixtures' hash: sha256 over key.encode() + tensor bytes, in state_dict order."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_golden_adm(path, device="cpu", dtype=torch.float32) -> ADMUNet:
    """The small ADM UNet of adm_small_golden_1.pt, strictly loaded, eval mode."""
    g = _load(path)
    model = ADMUNet.from_config(g["config"])
    model.load_state_dict(g["state_dict"], strict=True)
    return model.to(device=device, dtype=dtype).eval()


def check_adm_golden(path, device="cpu", attention: str = "sdpa") -> float:
    """Max abs error of ADMUNet(x, t) against the official output in adm_small_golden_1.pt (fp32)."""
    g = _load(path)
    model = load_golden_adm(path, device).set_attention_backend(attention)
    n = sum(p.numel() for p in model.parameters())
    if n != g["num_params"]:
        raise ValueError(f"parameter count {n} != fixture num_params {g['num_params']}")
    with torch.no_grad():
        out = model(g["x"].to(device), g["t"].to(device))
    return max_abs_err(out, g["out"])


def check_adm_manifest(json_path) -> int:
    """Build the manifest's model on the meta device and compare state_dict keys and shapes.

    Raises ValueError listing every missing / unexpected key and shape mismatch
    (also a wrong key order or parameter count); returns the parameter count.
    """
    manifest = json.loads(Path(json_path).read_text())
    cfg = manifest["unet_kwargs"] if "unet_kwargs" in manifest else manifest["config"]
    with torch.device("meta"):
        model = ADMUNet.from_config(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v) for k, v in manifest["params"].items()}
    problems = [f"missing key {k} {theirs[k]}" for k in theirs if k not in ours]
    problems += [f"unexpected key {k} {ours[k]}" for k in ours if k not in theirs]
    problems += [f"shape mismatch {k}: ours {ours[k]} vs manifest {theirs[k]}"
                 for k in theirs if k in ours and ours[k] != theirs[k]]
    if not problems and list(ours) != list(theirs):
        problems.append("state_dict key order differs from the manifest")
    n = sum(p.numel() for p in model.parameters())
    if "num_params" in manifest and n != manifest["num_params"]:
        problems.append(f"parameter count {n} != manifest num_params {manifest['num_params']}")
    if problems:
        raise ValueError(f"ADM manifest mismatch ({len(problems)} problems):\n  " + "\n  ".join(problems))
    return n


def linear_classifier_guide(W: torch.Tensor, y: torch.Tensor, scale: float) -> Callable:
    """The fixture's cond_fn: scale * grad_x sum_b log_softmax(flatten(x) @ W.T)[b, y_b]; ignores t."""

    def guide(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logp = torch.log_softmax(x_in.flatten(1) @ W.to(x_in).T, dim=-1)
            sel = logp[torch.arange(x.shape[0], device=x.device), y.to(x.device)]
            return torch.autograd.grad(sel.sum(), x_in)[0] * scale

    return guide


def check_guided_golden(path, device="cpu") -> dict[str, float]:
    """Max abs error per recorded tensor of guided_steps_golden.pt (fp32).

    Rebuilds both schedules and the model (adm_small_golden_1.pt beside the
    fixture), runs our single steps at every recorded index and both 25-step
    DDIM loops; trajectories are compared step by step (`..._trajectory_step{k}`).
    """
    from . import sampling  # local: sampling imports nothing from here

    path = Path(path)
    g = _load(path)
    model_path = path.parent / g["model_ref"].split()[0]
    model = load_golden_adm(model_path, device)
    sha = state_dict_sha256(_load(model_path)["state_dict"])
    if sha != g["model_state_dict_sha256"]:
        raise ValueError(f"model weights hash {sha} != fixture's {g['model_state_dict_sha256']}")

    dev = lambda v: v.to(device)  # noqa: E731
    x_T, noise = dev(g["x_T"]), dev(g["noise"])
    guide = linear_classifier_guide(dev(g["W"]), dev(g["y"]), float(g["scale"]))
    scheds = {
        "ddim": Schedule.create("linear", 1000, g["ddim_respacing"]).to(device),
        "ddpm": Schedule.create("linear", 1000, g["ddpm_respacing"]).to(device),
    }
    errs: dict[str, float] = {}
    for name, s in scheds.items():
        if not torch.equal(s.timestep_map.cpu(), g[f"{name}_timestep_map"]):
            raise ValueError(f"{name} timestep_map differs from the fixture's")
        errs[f"{name}_alphas_cumprod"] = max_abs_err(s.alphas_cumprod, g[f"{name}_alphas_cumprod"])
        errs[f"{name}_betas"] = max_abs_err(s.betas, g[f"{name}_betas"])

    def cmp(key, value):
        errs[key] = max_abs_err(value, g[key])

    B = x_T.shape[0]
    with torch.no_grad():
        cmp("model_out_xT_t960", model(x_T, torch.full((B,), 960, device=device)))
        cmp("model_out_xT_t999", model(x_T, torch.full((B,), 999, device=device)))
    cmp("grad_at_xT", guide(x_T, torch.full((B,), 960, device=device)))

    s = scheds["ddim"]
    for i in (24, 12, 0):
        for kind, gd in (("guided", guide), ("unguided", None)):
            out = sampling.ddim_step(model, x_T, i, s, guide=gd, eta=float(g["eta"]),
                                     clip_denoised=bool(g["clip_denoised"]))
            cmp(f"ddim_step{i}_{kind}_sample", out.sample)
            cmp(f"ddim_step{i}_{kind}_pred_xstart", out.pred_xstart)

    s = scheds["ddpm"]
    for i in (49, 25, 0):
        for kind, gd in (("guided", guide), ("unguided", None)):
            out = sampling.ddpm_step(model, x_T, i, s, guide=gd, noise=noise,
                                     clip_denoised=bool(g["clip_denoised"]))
            cmp(f"ddpm_step{i}_{kind}_sample", out.sample)
            if gd is None:
                cmp(f"ddpm_step{i}_unguided_mean", out.mean)
                cmp(f"ddpm_step{i}_pred_xstart", out.pred_xstart)
                cmp(f"ddpm_step{i}_log_variance", out.log_variance)

    for kind, gd in (("guided", guide), ("unguided", None)):
        final, traj = sampling.sample_loop(model, x_T, scheds["ddim"], sampler="ddim", guide=gd,
                                           eta=float(g["eta"]), clip_denoised=bool(g["clip_denoised"]),
                                           return_trajectory=True)
        ref = g[f"ddim25_{kind}_trajectory"]
        if traj.shape != ref.shape:
            errs[f"ddim25_{kind}_trajectory"] = float("inf")
        else:
            for k in range(ref.shape[0]):
                errs[f"ddim25_{kind}_trajectory_step{k}"] = max_abs_err(traj[k], ref[k])
            errs[f"ddim25_{kind}_trajectory"] = max_abs_err(traj, ref)
        cmp(f"ddim25_{kind}_final", final)
    return errs
