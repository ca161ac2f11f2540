"""Parity checks against the golden fixtures made with the official code.

Each check returns the measured error (or parameter count); tests and users
decide the tolerance. Fixtures load with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .models.adm import ADMUNet
from .schedule import Schedule


def check_ppap_checkpoint_manifest(json_path):
    """Build a random official PPAP ResNet50 checkpoint with exactly the keys and shapes of the manifest
    ``json_path``, import it strictly into an ExpertBank and raise on any mismatch (see ppap_fast.experts)."""
    from .experts import check_ppap_checkpoint_manifest as check

    return check(json_path)

__all__ = [
    "check_ppap_checkpoint_manifest",
    "check_adm_golden",
    "check_adm_manifest",
    "check_guided_golden",
    "GOLDEN_IMPLS",
    "load_golden_adm",
    "linear_classifier_guide",
    "state_dict_sha256",
    "max_abs_err",
]


def _load(path) -> dict:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a float; inf on shape mismatch or any non-finite value (NaN never passes)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)  # numpy arrays too
    if a.shape != b.shape:
        return float("inf")
    # complex: .double() dropped the imaginary part
    dt = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    d = (a.detach().cpu().to(dt) - b.detach().cpu().to(dt)).abs()
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
        v = v.detach().cpu().contiguous()
        if v.dtype == torch.bfloat16:  # numpy has none: its raw bytes, as numpy's tobytes() gives the others'
            v = v.view(torch.int16)
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def load_golden_adm(path, device="cpu", dtype=torch.float32) -> ADMUNet:
    """The small ADM UNet of adm_small_golden_1.pt, strictly loaded, eval mode."""
    g = _load(path)
    model = ADMUNet.from_config(g["config"])
    model.load_state_dict(g["state_dict"], strict=True)
    return model.to(device=device, dtype=dtype).eval()


def check_adm_golden(path, device="cpu", attention: str = "sdpa") -> float:
    """Max abs error of ADMUNet(x, t) against the official output in the golden file ``path``
    (adm_small_golden_1.pt, fp32), run on ``device`` with the ``attention`` backend."""
    g = _load(path)
    model = load_golden_adm(path, device).set_attention_backend(attention)
    n = sum(p.numel() for p in model.parameters())
    if n != g["num_params"]:
        raise ValueError(f"parameter count {n} != fixture num_params {g['num_params']}")
    with torch.no_grad():
        out = model(g["x"].to(device), g["t"].to(device))
    return max_abs_err(out, g["out"])


def check_adm_manifest(json_path) -> int:
    """Build the model of the manifest ``json_path`` on the meta device and compare state_dict keys and shapes.

    Raises ValueError listing every missing / unexpected key and shape mismatch
    (also a wrong key order or parameter count); returns the parameter count.
    """
    from .data.shards import json_field, json_shape_map, read_json_object

    what = "ADM manifest"
    manifest = read_json_object(json_path, what)
    cfg = json_field(manifest, "unet_kwargs" if "unet_kwargs" in manifest else "config", json_path, what, (dict, str))
    theirs = json_shape_map(manifest, "params", json_path, what)
    try:
        with torch.device("meta"):
            model = ADMUNet.from_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what} {json_path}: its config does not build an ADMUNet ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
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
    """The fixture's cond_fn: scale * grad_x sum_b log_softmax(flatten(x) @ W.T)[b, y_b]; ignores t.
    y [B]: one label per sample (ValueError for another length: indexing broadcast it silently)."""

    def guide(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"linear_classifier_guide: y must hold one label per sample, [{x.shape[0]}], got "
                             f"shape {tuple(y.shape)}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logp = torch.log_softmax(x_in.flatten(1) @ W.to(x_in).T, dim=-1)
            sel = logp[torch.arange(x.shape[0], device=x.device), y.to(x.device)]
            return torch.autograd.grad(sel.sum(), x_in)[0] * scale

    return guide


class _RecordedDenoiser:
    """The golden's recorded model outputs at x_T ({original t: output}) as a denoiser: any other input
    raises, so a sampler that feeds it something else than the recorded x_t cannot pass silently."""

    def __init__(self, x_T: torch.Tensor, outputs: dict[int, torch.Tensor]):
        self.x_T, self.outputs = x_T, outputs

    def __call__(self, x, t, **kwargs):
        ts = sorted({int(v) for v in t.flatten().tolist()})
        if not torch.equal(x, self.x_T) or len(ts) != 1 or ts[0] not in self.outputs:
            raise ValueError(f"recorded denoiser: only x_T at t in {sorted(self.outputs)} was recorded, "
                             f"got timesteps {ts}")
        return self.outputs[ts[0]].clone()


class _RecordedGuide:
    """grad_at_xT as a guide (it does not depend on t); any other x raises."""

    def __init__(self, x_T: torch.Tensor, grad: torch.Tensor):
        self.x_T, self.grad = x_T, grad

    def __call__(self, x, t):
        if not torch.equal(x, self.x_T):
            raise ValueError("recorded guide: only the gradient at x_T was recorded")
        return self.grad.clone()


GOLDEN_IMPLS = ("reference", "fast")


class _ReferencePath:
    """The golden's steps and loops through ppap_fast.sampling."""

    def __init__(self, g, clip_denoised):
        self.eta, self.clip = float(g["eta"]), clip_denoised

    def ddim_step(self, model, x, i, s, guide):
        out = _sampling().ddim_step(model, x, i, s, guide=guide, eta=self.eta, clip_denoised=self.clip)
        return out.sample, out.pred_xstart

    def ddpm_step(self, model, x, i, s, guide, noise):
        """sample, pred_xstart, mean, log_variance."""
        out = _sampling().ddpm_step(model, x, i, s, guide=guide, noise=noise, clip_denoised=self.clip)
        return out.sample, out.pred_xstart, out.mean, out.log_variance

    def model_and_grad(self, model, guide, x, t, s):
        with torch.no_grad():
            return model(x, t), guide(x, t)

    def ddim_loop(self, model, x, s, guide):
        return _sampling().sample_loop(model, x, s, sampler="ddim", guide=guide, eta=self.eta,
                                       clip_denoised=self.clip, return_trajectory=True)


class _FastPath:
    """The golden's steps and loops through ppap_fast.fast_sampling (FastGuidedSampler.step with the
    fused guided_update; fast_sample_loop for the loops). The fused op returns (x_prev, pred_xstart)
    only: the DDPM mean is its sample with zero noise; log_variance is not exposed (it enters the
    checked guided / noised samples)."""

    def __init__(self, g, clip_denoised, backend, options):
        self.eta, self.clip = float(g["eta"]), clip_denoised
        self.kw = dict(clip_denoised=clip_denoised, backend=backend, **options)

    def _sampler(self, model, s, sampler, guide):
        from .fast_sampling import FastGuidedSampler

        return FastGuidedSampler(model, s, sampler=sampler, guide=guide, eta=self.eta if sampler == "ddim" else 0.0,
                                 **self.kw)

    def ddim_step(self, model, x, i, s, guide):
        return self._sampler(model, s, "ddim", guide).step(x, i)

    def ddpm_step(self, model, x, i, s, guide, noise):
        fs = self._sampler(model, s, "ddpm", guide)
        sample, pred = fs.step(x, i, noise=noise)
        mean = fs.step(x, i, noise=torch.zeros_like(noise))[0] if guide is None else None
        return sample, pred, mean, None

    def model_and_grad(self, model, guide, x, t, s):
        """The sampler's own denoiser and guide runners (with its options applied)."""
        fs = self._sampler(model, s, "ddim", guide)
        with torch.no_grad():
            return fs._denoise(x, t), fs.fast_guide(x, t, t_host=int(t[0]))

    def ddim_loop(self, model, x, s, guide):
        from .fast_sampling import fast_sample_loop

        return fast_sample_loop(model, x, s, sampler="ddim", guide=guide, eta=self.eta, return_trajectory=True,
                                **self.kw)


def _sampling():
    from . import sampling  # local: sampling imports nothing from here

    return sampling


def check_guided_golden(path, device="cpu", impl: str = "reference", backend: str | None = None,
                        fast_options: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Max abs error per recorded tensor of guided_steps_golden.pt (fp32).

    Rebuilds both schedules and the model (adm_small_golden_1.pt beside the
    fixture), runs our single steps at every recorded index and both 25-step
    DDIM loops; trajectories are compared step by step (`..._trajectory_step{k}`).
    Keys ending in ``_from_recorded_inputs`` run the steps at t=960 (DDIM index 24) and
    t=999 (DDPM index 49) with the golden's own model outputs and gradient at x_T in place
    of the model and guide: the update alone, free of the model's float32 error.

    path: the golden file; device: where it runs.
    impl: "reference" (ppap_fast.sampling) or "fast" (ppap_fast.fast_sampling: FastGuidedSampler
    steps with the fused guided_update, fast_sample_loop; ``backend`` picks the guided_update backend,
    ``fast_options`` go to FastGuidedSampler, e.g. channels_last or cuda_graph). The fast path has no
    ``ddpm_step*_log_variance`` keys (the fused op does not return it). With ``cuda_graph`` the
    recorded-input steps run eagerly (their stand-in denoiser reads x on the host: a warning).
    """
    if impl not in GOLDEN_IMPLS:
        raise ValueError(f"impl must be one of {GOLDEN_IMPLS}, got {impl!r}")
    if impl == "reference" and (backend is not None or fast_options):
        raise ValueError("backend and fast_options apply to impl='fast' only")
    fixed = sorted(set(fast_options or {}) & {"sampler", "guide", "eta", "clip_denoised", "backend", "var_type"})
    if fixed:
        raise ValueError(f"fast_options may not set {fixed}: the golden fixes them (backend: the argument)")
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
    clip = bool(g["clip_denoised"])
    run = _ReferencePath(g, clip) if impl == "reference" else _FastPath(g, clip, backend, dict(fast_options or {}))
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

    def cmp(key, value, suffix=""):
        errs[key + suffix] = max_abs_err(value, g[key])

    B = x_T.shape[0]
    t960, t999 = (torch.full((B,), t, device=device) for t in (960, 999))
    out960, grad = run.model_and_grad(model, guide, x_T, t960, scheds["ddim"])
    out999, _ = run.model_and_grad(model, guide, x_T, t999, scheds["ddim"])
    cmp("model_out_xT_t960", out960)
    cmp("model_out_xT_t999", out999)
    cmp("grad_at_xT", grad)

    def ddim_steps(mdl, gd, indices, suffix=""):
        for i in indices:
            for kind, gdi in (("guided", gd), ("unguided", None)):
                sample, pred = run.ddim_step(mdl, x_T, i, scheds["ddim"], gdi)
                cmp(f"ddim_step{i}_{kind}_sample", sample, suffix)
                cmp(f"ddim_step{i}_{kind}_pred_xstart", pred, suffix)

    def ddpm_steps(mdl, gd, indices, suffix=""):
        for i in indices:
            for kind, gdi in (("guided", gd), ("unguided", None)):
                sample, pred, mean, log_var = run.ddpm_step(mdl, x_T, i, scheds["ddpm"], gdi, noise)
                cmp(f"ddpm_step{i}_{kind}_sample", sample, suffix)
                if gdi is None:
                    cmp(f"ddpm_step{i}_unguided_mean", mean, suffix)
                    cmp(f"ddpm_step{i}_pred_xstart", pred, suffix)
                    if log_var is not None:
                        cmp(f"ddpm_step{i}_log_variance", log_var, suffix)

    ddim_steps(model, guide, (24, 12, 0))
    ddpm_steps(model, guide, (49, 25, 0))
    recorded = _RecordedDenoiser(x_T, {960: dev(g["model_out_xT_t960"]), 999: dev(g["model_out_xT_t999"])})
    recorded_guide = _RecordedGuide(x_T, dev(g["grad_at_xT"]))
    ddim_steps(recorded, recorded_guide, (24,), "_from_recorded_inputs")
    ddpm_steps(recorded, recorded_guide, (49,), "_from_recorded_inputs")

    for kind, gd in (("guided", guide), ("unguided", None)):
        final, traj = run.ddim_loop(model, x_T, scheds["ddim"], gd)
        ref = g[f"ddim25_{kind}_trajectory"]
        if traj.shape != ref.shape:
            errs[f"ddim25_{kind}_trajectory"] = float("inf")
        else:
            for k in range(ref.shape[0]):
                errs[f"ddim25_{kind}_trajectory_step{k}"] = max_abs_err(traj[k], ref[k])
            errs[f"ddim25_{kind}_trajectory"] = max_abs_err(traj, ref)
        cmp(f"ddim25_{kind}_final", final)
    return errs
