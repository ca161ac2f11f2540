"""Saving / loading expert banks, and strict import of official PPAP checkpoints.

Bank checkpoints are a directory holding ``experts.safetensors`` (every stacked
per-expert tensor [N, ...], named as in ``bank.per_expert_state_dict()``),
``config.json`` (architecture name, placement, N, T, bands, rank, alpha,
layout; the teacher's input transform where given) and, with ``include_base=True``,
``base.safetensors`` (the shared frozen weights). Loading is strict: missing / unexpected / misshaped keys, a config
that does not match the bank, and NaN / Inf values (stored, or from overflow when
cast to the bank's dtype, e.g. an fp32 checkpoint into an fp16 bank) raise
ValueError listing them.

Every file is written under a temporary name and renamed into place, config.json
last; it records each tensor file's size and SHA-256, checked on load, so nothing is ever
half-loaded. A save over an older checkpoint keeps its files (``.<name>.prev``) until the new
config.json is in place: killed midway, the older checkpoint still loads (with a warning). Banks
with NaN / Inf values are not saved (``allow_nonfinite=True`` to inspect one).
A checkpoint is found by path, or by Hugging Face repo id in the local HF cache
(offline: nothing is downloaded): ``load_experts("org/ppap-resnet50", model,
subfolder="ppap10")``.

Official riiid/PPAP ResNet50 checkpoints (``{i}_max{n}.ckpt``) are the full
state_dict of their wrapper: keys ``resnet.<torchvision key>``, a wrapped conv
``P`` stored as ``resnet.P.conv.weight`` + ``resnet.P.lora_A`` / ``lora_B`` in
the loralib layout, BatchNorm running stats included. The official sampler
loaded them with ``strict=False``, which silently runs the wrong model on any
key mismatch; :func:`import_ppap_checkpoint` refuses any mismatch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .bank import ExpertBank, ExpertBatchNorm, RoutedBias, RoutedConv2d, RoutedLinear, _Routed, nonfinite_after_cast
from .placement import Placement, resnet_placement

FORMAT = "ppap_fast.experts"
VERSION = 1
CHECKPOINT_FILES = ("experts.safetensors", "base.safetensors")  # what save_experts writes


def _config(bank: ExpertBank) -> dict:
    p = bank.placement
    ref = bank._ref_param()
    return {
        "format": FORMAT, "version": VERSION, "arch": bank.arch, "placement": p.to_dict(),
        "n_experts": bank.n_experts, "num_timesteps": bank.num_timesteps, "bands": [list(b) for b in bank.bands],
        "r": p.r, "alpha": p.alpha, "layout": p.layout, "dtype": str(ref.dtype) if ref is not None else None,
    }


class BaseMismatchWarning(UserWarning):
    """Experts loaded onto other frozen base weights than those they were distilled on."""


def _base_fingerprint(bank: ExpertBank) -> str:
    """sha256 of the shared frozen tensors (float32, CPU): which base model the experts belong to."""
    own = set(bank.per_expert_state_dict())
    h = hashlib.sha256()
    for k, v in sorted(bank.model.state_dict().items()):
        if k in own or not v.is_floating_point():
            continue
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _base_arch(bank: ExpertBank) -> dict:
    """Architecture of the shared frozen base: sha256 of its tensors' sorted names and shapes (not values,
    dtype or device), with their count and element total (named in the error when it differs)."""
    own = set(bank.per_expert_state_dict())
    items = sorted((k, list(v.shape)) for k, v in bank.model.state_dict().items() if k not in own)
    return {"sha256": hashlib.sha256(json.dumps(items).encode()).hexdigest(), "tensors": len(items),
            "params": sum(math.prod(s) for _, s in items)}


def input_transform_record(transform) -> dict | None:
    """JSON record of the input transform x_t goes through to the network: ``{"raw": True}`` for None (x_t in
    [-1, 1] as is), an InputTransform's mean / std (None: [0, 1] images) and size; None for any other module."""
    from ..guidance import InputTransform

    if transform is None:
        return {"raw": True}
    if not isinstance(transform, InputTransform):
        return None
    stats = [None if t is None else [float(v) for v in t.flatten().tolist()] for t in (transform.mean, transform.std)]
    rec = {"raw": False, "mean": stats[0], "std": stats[1],
           "size": list(transform.size) if transform.size is not None else None}
    if transform.size is not None:  # the resize's antialiasing (records before it was recorded: not compared)
        rec["antialias"] = transform.antialias
    return rec


def _valid_transform_record(rec) -> bool:
    """An :func:`input_transform_record` as saved: raw True, or mean / std (equal-length number lists, or
    None) and size (two positive ints, or None)."""
    def numbers_or_none(v):
        return v is None or (isinstance(v, list) and bool(v) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))

    if not isinstance(rec, dict) or not isinstance(rec.get("raw"), bool):
        return False
    if rec["raw"]:
        return True
    mean, std, size = rec.get("mean"), rec.get("std"), rec.get("size")
    if "antialias" in rec and not (isinstance(rec["antialias"], bool) or rec["antialias"] == "auto"):
        return False
    return numbers_or_none(mean) and numbers_or_none(std) and (mean is None) == (std is None) \
        and (mean is None or len(mean) == len(std)) and (size is None or (
            isinstance(size, list) and len(size) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)))


def same_input_transform(a: dict, b: dict) -> bool:
    """Whether two :func:`input_transform_record` records map x_t alike (statistics to float32 precision)."""
    def close(u, v):
        return (u is None) == (v is None) and (u is None or (
            len(u) == len(v) and all(math.isclose(p, q, rel_tol=1e-6) for p, q in zip(u, v))))

    if bool(a.get("raw")) or bool(b.get("raw")):
        return bool(a.get("raw")) == bool(b.get("raw"))
    antialias_alike = "antialias" not in a or "antialias" not in b or a["antialias"] == b["antialias"]
    return a.get("size") == b.get("size") and close(a.get("mean"), b.get("mean")) and close(a.get("std"), b.get("std")) \
        and antialias_alike


def describe_input_transform(rec: dict) -> str:
    if rec.get("raw"):
        return "raw x_t in [-1, 1]"
    fmt = lambda v: "[" + ", ".join(f"{x:g}" for x in v) + "]"  # noqa: E731
    norm = "[0, 1] images" if rec.get("mean") is None else f"mean {fmt(rec['mean'])} / std {fmt(rec['std'])}"
    aa = f" (antialias={rec['antialias']!r})" if rec.get("size") and rec.get("antialias", "auto") != "auto" else ""
    return norm + (f" at {rec['size'][0]}x{rec['size'][1]}{aa}" if rec.get("size") else "")


def input_transform_mismatch(experts, transform) -> tuple[dict, dict] | None:
    """(recorded, given) records where ``experts`` (a loaded bank: ``input_transform_record``) were distilled
    through another input transform than ``transform``; None when alike, unrecorded, or not describable."""
    want = getattr(experts, "input_transform_record", None)
    got = input_transform_record(transform)
    if not isinstance(want, dict) or got is None or same_input_transform(want, got):
        return None
    return want, got


def check_input_transform(experts, transform, subject: str = "these experts",
                          sees: str = "input_transform= gives", reason=None, hint=None) -> None:
    """ValueError (one line) when ``experts`` were distilled through another input transform than ``transform``
    (:func:`input_transform_mismatch`). ``reason()``: why the caller's transform is that one (in parentheses);
    ``hint(recorded record)``: what to do (default: which ``input_transform=`` to pass)."""
    bad = input_transform_mismatch(experts, transform)
    if bad is None:
        return
    want, got = bad
    if hint is not None:
        fix = hint(want)
    elif want.get("raw"):
        fix = "pass input_transform=None"
    elif same_input_transform({**want, "antialias": None}, {**got, "antialias": None}):
        fix = f"pass an input transform with antialias={want['antialias']!r}"
    else:
        fix = "pass the input transform of the model they were distilled from (its GuideModel.transform)"
    why = f" ({reason()})" if reason is not None else ""
    raise ValueError(f"{subject} were distilled through {describe_input_transform(want)}, but {sees} "
                     f"{describe_input_transform(got)}{why}: {fix}")


def _digest(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _prev(f: Path) -> Path:
    """Where a save keeps the checkpoint's committed copy of ``f`` until its new config.json is in place."""
    return f.with_name(f".{f.name}.prev")


def _committed_files(path: Path) -> dict:
    """The file digests the config.json in ``path`` records ({} for none). A checkpoint's config.json that predates
    them gets them first (atomically), so that a save over it keeps its files until the new config.json is in place
    (killed midway, it still loads)."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    if cfg.get("format") == FORMAT and "files" not in cfg:
        found = [name for name in CHECKPOINT_FILES if (path / name).is_file()]
        if "experts.safetensors" in found:
            from ..data.shards import write_json_atomic

            cfg = {**cfg, "files": {n: _digest((path / n).read_bytes()) for n in found}}
            write_json_atomic(path / "config.json", cfg)
    return cfg["files"] if isinstance(cfg.get("files"), dict) else {}


def check_output_dir(path, what: str) -> Path:
    """``path`` as a Path, or a ValueError when it, or a folder above it, is an existing file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" (in {path})"
                raise ValueError(f"{what}: {p} is a file, not a directory{where}; name an output directory")
            break
    return path


def check_experts_dir(path, what: str) -> Path:
    """:func:`check_output_dir`, and a ValueError when ``path`` holds a config.json that is not an experts
    checkpoint's (another model's folder): saving experts there would replace it."""
    path = check_output_dir(path, what)
    cfg_file = path / "config.json"
    if cfg_file.exists():
        try:
            fmt = json.loads(cfg_file.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            raise ValueError(f"{what}: {path} holds a config.json that is not a ppap_fast experts checkpoint's "
                             f"(format {fmt!r}); saving experts there would replace it: name another directory")
    return path


_UNRECORDED = object()


def save_experts(bank: ExpertBank, path, include_base: bool = False, allow_nonfinite: bool = False,
                 input_transform=_UNRECORDED) -> Path:
    """Write ``bank``'s experts to the directory ``path`` (created); returns the path.
    ``input_transform``: the teacher's (None: raw x_t), recorded so that a guide through another one is refused;
    not given: the bank's ``input_transform_record`` (what it was loaded with), if any.
    Atomic per file, config.json (with the files' digests) last. Over an existing checkpoint, its files
    are kept as ``.<name>.prev`` until the new config.json is in place: a save killed midway leaves the
    old checkpoint loadable (:func:`load_experts_into` falls back to them), nothing lost. NaN / Inf
    values (a diverged run) are refused before anything is written, unless ``allow_nonfinite``.
    ``include_base``: also write the frozen base model's weights (loaded back by default)."""
    from ..data.shards import fsync_dir, save_safetensors_atomic, write_json_atomic

    path = check_experts_dir(path, "save_experts")
    tensors = {k: v.detach().contiguous().clone() for k, v in bank.per_expert_state_dict().items()}
    files = {"experts.safetensors": tensors}
    if include_base:
        own = set(tensors)
        files["base.safetensors"] = {k: v.detach().contiguous().clone() for k, v in bank.model.state_dict().items()
                                     if k not in own}
    if not allow_nonfinite:
        bad = [f"{k} ({int((~torch.isfinite(v)).sum())} non-finite)" for t in files.values() for k, v in t.items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"not saving experts with NaN / Inf values (a diverged run?) to {path}: {bad[:10]}; "
                             "nothing was written (allow_nonfinite=True saves them anyway, e.g. to inspect)")
    path.mkdir(parents=True, exist_ok=True)
    cfg = _config(bank)
    cfg["include_base"] = include_base
    cfg["base_state"] = _base_fingerprint(bank)
    cfg["base_arch"] = _base_arch(bank)
    rec = getattr(bank, "input_transform_record", None) if input_transform is _UNRECORDED \
        else input_transform_record(input_transform)  # not given: a loaded bank's record is kept (a re-save)
    if rec is not None:
        cfg["input_transform"] = rec
    cfg["files"] = {}
    committed = _committed_files(path)
    for name in files:  # keep the committed copy (the file, or its .prev from a save killed before)
        f = path / name
        if name in committed and f.exists() and _digest(f.read_bytes()) == committed[name]:
            os.replace(f, _prev(f))
    for name, t in files.items():
        save_safetensors_atomic(path / name, t)
        cfg["files"][name] = _digest((path / name).read_bytes())
    write_json_atomic(path / "config.json", cfg)
    for name in CHECKPOINT_FILES:  # also a kept copy of a file this save leaves out (include_base=False)
        _prev(path / name).unlink(missing_ok=True)
    fsync_dir(path)
    return path


def _check_file(path: Path, data: bytes, cfg: dict) -> None:
    """``data`` (the bytes read from ``path``) against the digest config.json records for it."""
    if "files" not in cfg:  # written before digests were recorded
        return
    want = (cfg.get("files") or {}).get(path.name)
    if want is None:  # left over from an older save (e.g. one with include_base over which this one was written)
        raise ValueError(f"{path} is not part of the checkpoint its config.json describes (it records "
                         f"{sorted(cfg['files'])}): a leftover of an older save; save with include_base=True "
                         "to load base weights")
    got = _digest(data)
    if got != want:
        raise ValueError(f"{path} does not match its config.json ({got['bytes']} bytes, sha256 {got['sha256'][:12]}... "
                         f"vs recorded {want['bytes']} bytes, {want['sha256'][:12]}...): the checkpoint is damaged or "
                         "was overwritten by an interrupted save; save it again")


def _read_committed(f: Path, cfg: dict) -> bytes:
    """The bytes of ``f``, or of the copy a save killed before its config.json kept (``.<name>.prev``,
    matching config.json while ``f`` does not: the previous checkpoint, loaded with a warning)."""
    want = (cfg.get("files") or {}).get(f.name)
    data = f.read_bytes() if f.exists() else None
    prev = _prev(f)
    kept = prev.read_bytes() if want is not None and (data is None or _digest(data) != want) and prev.exists() \
        else None
    if kept is None or _digest(kept) != want:
        if data is None:
            raise FileNotFoundError(f"checkpoint {f.parent} has no {f.name} (cut mid-copy or mid-save?): copy it "
                                    "whole again, or save the experts again")
        return data  # damaged: refused by _check_file
    warnings.warn(f"{f} is from a save into {f.parent} interrupted before its config.json: loaded the previous "
                  f"checkpoint's copy {prev.name} (save again to replace it)", stacklevel=3)
    return kept


def resolve_checkpoint(path_or_repo, subfolder: str | None = None, revision: str | None = None,
                       cache_dir=None) -> Path:
    """A checkpoint directory from a local path, or from a Hugging Face repo id ("org/name") already in
    the local HF cache (``HF_HOME`` / ``cache_dir``). Never downloads."""
    p = Path(path_or_repo)
    if p.exists():
        p = p / subfolder if subfolder else p
        if not p.is_dir():
            raise NotADirectoryError(f"{p} is {'a file' if p.exists() else 'missing'}, not a checkpoint directory: "
                                     "pass the folder save_experts wrote (the one holding config.json)")
        return p
    name = str(path_or_repo)
    if name.count("/") != 1 or name.startswith((".", "/")) or name.endswith("/"):
        raise FileNotFoundError(f"no checkpoint directory {name!r} (and it is not a Hugging Face repo id org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with diffusers
        raise FileNotFoundError(f"no checkpoint directory {name!r}, and huggingface_hub is not installed to look "
                                "it up in the local Hugging Face cache") from e
    try:
        snap = Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{name!r} is neither a directory nor in the local Hugging Face cache "
                                f"({cache_dir or 'default HF cache'}, revision {revision or 'main'}); download it "
                                "first (huggingface-cli download), ppap_fast never downloads") from e
    p = snap / subfolder if subfolder else snap
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{name!r} (revision {revision or 'main'}) in the HF cache has no "
                                f"{(subfolder + '/') if subfolder else ''}config.json")
    return p


def read_config(path, **where) -> dict:
    """config.json of a checkpoint (``where``: subfolder, revision, cache_dir for a HF repo id)."""
    path = resolve_checkpoint(path, **where)
    from ..data.shards import read_json_object

    f = path / "config.json"
    cfg = read_json_object(f, "experts checkpoint config",
                           advice="pass a folder written by save_experts, or save the experts again")
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{f} is not a {FORMAT} checkpoint (format={cfg.get('format')!r})")
    if type(cfg.get("version")) is not int or cfg["version"] != VERSION:  # true == 1
        v = cfg.get("version")
        newer = isinstance(v, int) and not isinstance(v, bool) and v > VERSION
        raise ValueError(f"{f}: unsupported checkpoint version {v!r} (this ppap_fast reads version {VERSION}): "
                         + ("written by a newer ppap_fast; upgrade ppap_fast to load it" if newer else
                            "save the experts again with this ppap_fast"))
    bad = [k for k, kind in (("placement", dict), ("n_experts", int), ("num_timesteps", int))
           if not isinstance(cfg.get(k), kind) or isinstance(cfg.get(k), bool)  # true is an int
           or (kind is int and cfg[k] <= 0)]  # 0 / -2: refused by ExpertBank, not naming this file
    bad += [k for k in ("files",) if k in cfg and not isinstance(cfg[k], dict)]
    bad += [f"files.{name}" for name, rec in (cfg["files"].items() if isinstance(cfg.get("files"), dict) else ())
            if not (isinstance(rec, dict) and type(rec.get("bytes")) is int and isinstance(rec.get("sha256"), str))]
    bad += [k for k in ("input_transform",) if k in cfg and not _valid_transform_record(cfg[k])]
    bad += [f"placement.{k}" for k in ("lora", "bias", "norm")
            if isinstance(cfg.get("placement"), dict) and not isinstance(cfg["placement"].get(k, []), list)]
    if bad:
        raise ValueError(f"{f} is damaged: missing or malformed entries {bad}")
    try:
        Placement.from_dict(cfg["placement"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f} is damaged: its placement cannot be read ({e}); save the experts again") from None
    return cfg


def _check_keys(dst: dict, src: dict, what: str) -> None:
    missing = sorted(set(dst) - set(src))
    unexpected = sorted(set(src) - set(dst))
    bad = sorted(f"{k}: expected {tuple(dst[k].shape)}, got {tuple(src[k].shape)}"
                 for k in set(dst) & set(src) if tuple(dst[k].shape) != tuple(src[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"{what}: missing keys {missing}; unexpected keys {unexpected}; shape mismatches {bad}")


def _placement_diffs(saved: dict, mine: dict) -> list:
    """What differs between two ``Placement.to_dict()``: changed fields, and the modules only one lists."""
    diffs = []
    for k in mine:  # read_config refused unknown fields
        a, b = saved.get(k), mine.get(k)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            only_a, only_b = [x for x in a if x not in b], [x for x in b if x not in a]
            diffs.append(f"placement.{k}: {len(only_a)} module(s) only in the checkpoint {only_a[:3]}"
                         f"{' ...' if len(only_a) > 3 else ''}, {len(only_b)} only in the bank {only_b[:3]}"
                         f"{' ...' if len(only_b) > 3 else ''}" if only_a or only_b else
                         f"placement.{k}: the same modules in another order")
        else:
            diffs.append(f"placement.{k}: checkpoint {a!r} vs bank {b!r}")
    return diffs


def load_experts_into(bank: ExpertBank, path, load_base: bool | None = None, **where) -> ExpertBank:
    """Strictly load the checkpoint ``path`` (a directory, or a HF repo id in the local cache: ``where`` =
    subfolder, revision, cache_dir) into an existing ``bank`` (config must match). Sets
    ``bank.input_transform_record`` to the teacher's input transform the checkpoint records (None: none).
    ``load_base``: also copy the checkpoint's base weights into the bank (default: when it holds them)."""
    from safetensors.torch import load

    path = resolve_checkpoint(path, **where)
    cfg = read_config(path)
    mine = _config(bank)
    diffs = _placement_diffs(cfg["placement"], mine["placement"])
    diffs += [f"{k}: checkpoint {cfg.get(k)!r} vs bank {mine[k]!r}"
              for k in ("n_experts", "num_timesteps", "r", "alpha", "layout")
              if cfg.get(k) != mine[k] and not any(d.startswith(f"placement.{k}:") for d in diffs)]
    if diffs:
        raise ValueError(f"checkpoint {path} does not match the bank: " + "; ".join(diffs))
    want_arch = cfg.get("base_arch")  # absent in checkpoints saved before it was recorded
    if isinstance(want_arch, dict) and want_arch.get("sha256") != (got := _base_arch(bank))["sha256"]:
        raise ValueError(f"the experts in {path} were trained on another architecture than this model: a "
                         f"{cfg.get('arch')} with {want_arch.get('params')} base parameters in "
                         f"{want_arch.get('tensors')} tensors, this {mine['arch']} has {got['params']} in "
                         f"{got['tensors']}; load them onto the model they were distilled from")
    own = bank.per_expert_state_dict()
    if load_base is None:
        load_base = bool(cfg.get("include_base"))
    parts = [(own, path / "experts.safetensors", f"experts in {path}")]
    if load_base:
        f = path / "base.safetensors"
        if not cfg.get("include_base") and not f.exists() and not _prev(f).exists():
            raise FileNotFoundError(f"{f} not found: the experts were saved without include_base; pass "
                                    "load_base=False, or save them again with include_base=True")
        parts.append(({k: v for k, v in bank.model.state_dict().items() if k not in own}, f, f"base weights in {path}"))
    # every file is read once and verified (keys, shapes, then digest) before anything is copied:
    # never half-loaded
    raw = [_read_committed(f, cfg) for _, f, _ in parts]
    loaded = []
    for (_, f, _), data in zip(parts, raw):
        try:
            loaded.append(load(data))
        except Exception as e:  # SafetensorError (truncated / not safetensors) is not a ValueError
            raise ValueError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    for (dst, _, what), src in zip(parts, loaded):
        _check_keys(dst, src, what)
    for (_, f, _), data in zip(parts, raw):
        _check_file(f, data, cfg)
    unusable = [u for (dst, _, _), src in zip(parts, loaded) for u in nonfinite_after_cast(dst, src)]
    if unusable:
        raise ValueError(f"checkpoint {path} cannot be loaded into this bank ({mine['dtype']}): {unusable[:10]}")
    want = cfg.get("base_state")
    if want is not None and not load_base and want != _base_fingerprint(bank):
        # a warning, not an error: a half-precision copy of the right classifier differs too
        warnings.warn(f"the experts in {path} were distilled on other frozen base weights than this model's "
                      "(another classifier, or a lower-precision copy): they are only meaningful on the "
                      "classifier they were distilled from", BaseMismatchWarning, stacklevel=2)
    with torch.no_grad():
        for (dst, _, _), src in zip(parts, loaded):
            for k, v in src.items():
                dst[k].copy_(v)
    rec = cfg.get("input_transform")  # absent in checkpoints saved without it: None, nothing compared
    bank.input_transform_record = rec if isinstance(rec, dict) else None
    return bank


def load_experts(path, base_model: nn.Module, load_base: bool | None = None, **where) -> ExpertBank:
    """Build an ExpertBank around ``base_model`` from a checkpoint's config and load it strictly.
    ``path``: a directory, or a HF repo id in the local cache (``where``: subfolder, revision, cache_dir).
    ``load_base``: as :func:`load_experts_into`."""
    if not isinstance(base_model, nn.Module):
        raise TypeError("load_experts needs the base model (the checkpoint stores only the experts "
                        "unless saved with include_base=True, and never the architecture code)")
    path = resolve_checkpoint(path, **where)
    cfg = read_config(path)
    try:
        bank = ExpertBank(base_model, Placement.from_dict(cfg["placement"]), cfg["n_experts"], cfg["num_timesteps"],
                          arch=cfg.get("arch"))
    except ValueError as e:  # "placement names modules not in X" alone did not say the experts are another net's
        arch = cfg.get("arch")
        if arch and arch != type(base_model).__name__:
            raise ValueError(f"the experts in {path} adapt a {arch}, not this {type(base_model).__name__} ({e})") from None
        raise
    return load_experts_into(bank, path, load_base)


# ----------------------------------------------------------------------------- official PPAP checkpoints
def ppap_key_map(bank: ExpertBank, prefix: str = "resnet.") -> dict:
    """Official key -> (tensor, per_expert) for every entry of an official wrapper state_dict.

    ``tensor`` is the bank tensor the value goes to: a stacked [N, ...] tensor when
    ``per_expert`` (the value goes to one expert's slice), else a shared base tensor.
    """
    out = {}
    for mname, m in bank.model.named_modules():
        pre = prefix + (mname + "." if mname else "")
        if isinstance(m, (RoutedConv2d, RoutedLinear)):
            if isinstance(m, RoutedConv2d) and m.layout != "loralib":
                raise ValueError(f"{mname}: official PPAP checkpoints use the loralib conv layout; this bank "
                                 f"uses {m.layout!r}")
            base = pre + ("conv." if isinstance(m, RoutedConv2d) else "")  # loralib wraps the conv as .conv
            out[pre + "lora_A"] = (m.lora_A, True)
            out[pre + "lora_B"] = (m.lora_B, True)
            out[base + "weight"] = (m.weight, False)
            if m.expert_bias is not None:
                out[base + "bias"] = (m.expert_bias, True)
            elif m.bias is not None:
                out[base + "bias"] = (m.bias, False)
        elif isinstance(m, RoutedBias):
            out[pre + "weight"] = (m.weight, False)
            out[pre + "bias"] = (m.expert_bias, True)
        elif isinstance(m, ExpertBatchNorm):
            out[pre + "weight"] = (m.expert_weight, True) if m.expert_weight is not None else (m.weight, False)
            out[pre + "bias"] = (m.expert_bias, True)
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                out[pre + b] = (getattr(m, b), True)
        elif isinstance(m, _Routed):
            raise ValueError(f"{mname}: {type(m).__name__} has no official PPAP key layout")
        else:
            for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if v is not None:
                    out[pre + k] = (v, False)
    return out


def _shape_of(t, per_expert):
    return tuple(t.shape[1:]) if per_expert else tuple(t.shape)


def import_ppap_checkpoint(bank: ExpertBank, expert: int, state_dict: dict, *, prefix: str = "resnet.",
                           base: str = "check") -> None:
    """Strictly load one official PPAP checkpoint into expert ``expert`` of ``bank``.

    Every key must map to the bank and every bank tensor must be present, with equal shapes;
    otherwise ValueError listing the missing / unexpected / misshaped keys (nothing is written).
    The checkpoint's frozen base weights: ``base="check"`` (default) requires them to equal the
    bank's shared weights exactly, ``"load"`` copies them into the shared weights (all experts
    then use them), ``"ignore"`` skips them. The alpha of the bank's placement is used (the
    checkpoint does not store it; the official scripts use r=16, alpha=8). The official experts take raw
    x_t: ``bank.input_transform_record`` is set to raw (a guide through a normalisation is refused); a bank
    recording a normalised transform (loaded experts) is refused.
    ``state_dict``: the checkpoint's tensors; ``prefix``: what its keys start with (the official ``resnet.``).
    """
    expert = bank._check_n(expert)
    if base not in ("check", "load", "ignore"):
        raise ValueError(f"base must be 'check', 'load' or 'ignore', got {base!r}")
    if not isinstance(state_dict, dict):
        raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    keymap = ppap_key_map(bank, prefix)
    missing = sorted(set(keymap) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keymap))
    bad = sorted(f"{k}: expected {_shape_of(*keymap[k])}, got {tuple(state_dict[k].shape)}"
                 for k in set(keymap) & set(state_dict)
                 if tuple(state_dict[k].shape) != _shape_of(*keymap[k]))
    if missing or unexpected or bad:
        raise ValueError(f"PPAP checkpoint does not match the bank ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(bad)} misshaped): missing keys {missing}; unexpected keys "
                         f"{unexpected}; shape mismatches {bad}")
    rec = getattr(bank, "input_transform_record", None)
    if isinstance(rec, dict) and not rec.get("raw"):  # overwritten with raw: a bank of both inputs, one record
        raise ValueError(f"this bank's experts were distilled through {describe_input_transform(rec)}; the official "
                         "PPAP experts take raw x_t: import them into a bank of raw-x_t experts (a fresh one)")
    written = {k: t for k, (t, pe) in keymap.items() if pe or base == "load"}
    nonfinite = nonfinite_after_cast(written, state_dict)
    if nonfinite:
        raise ValueError(f"PPAP checkpoint has values this bank cannot hold: {nonfinite}")
    if base == "check":
        differ = sorted(k for k, (t, pe) in keymap.items()
                        if not pe and not torch.equal(state_dict[k].to(t.device, t.dtype), t.detach()))
        if differ:
            raise ValueError(f"the checkpoint's frozen base weights differ from the bank's in {len(differ)} "
                             f"tensors (e.g. {differ[:5]}): build the bank from the same pretrained model, or "
                             "pass base='load'")
    with torch.no_grad():
        for k, (t, pe) in keymap.items():
            v = state_dict[k]
            if pe:
                t[expert].copy_(v)
            elif base == "load":
                t.copy_(v)
    bank.input_transform_record = input_transform_record(None)  # trained on raw x_t in [-1, 1]


def export_ppap_checkpoint(bank: ExpertBank, expert: int, prefix: str = "resnet.") -> dict:
    """Expert ``expert`` as an official-layout state_dict (inverse of import_ppap_checkpoint)."""
    expert = bank._check_n(expert)
    return {k: (t[expert] if pe else t).detach().clone() for k, (t, pe) in ppap_key_map(bank, prefix).items()}


def check_ppap_checkpoint_manifest(json_path, n_experts: int = 5, expert: int = 1) -> dict:
    """Check that the official PPAP ResNet50 checkpoint layout in the manifest imports strictly.

    Builds torchvision resnet50 (weights=None) in a bank with the "resnet" placement and the
    manifest's r / alpha in the loralib layout, then checks: the LoRA layers equal the manifest's;
    the bank's per-expert parameters, in official naming, are exactly the manifest's trainable
    set and count; a random state_dict with exactly the manifest's keys / shapes / dtypes imports
    into one expert and exports back bit-identical, other experts untouched; and a tampered
    state_dict (a missing key, an extra key, a wrong shape) is refused. Raises ValueError on any
    mismatch; returns a summary dict.
    """
    import torchvision

    from ..data.shards import json_field, json_shape_map, read_json_object

    what = "PPAP manifest"
    man = read_json_object(json_path, what)
    r, alpha = json_field(man, "lora.r", json_path, what, int), json_field(man, "lora.lora_alpha", json_path, what,
                                                                           (int, float))
    lora_man = sorted(json_field(man, "lora_layers", json_path, what, (dict, list)))
    trainable_man = sorted(json_field(man, "trainable", json_path, what, list))
    n_tr_man = json_field(man, "num_trainable_params", json_path, what, int)
    man_shapes = json_shape_map(man, "state_dict", json_path, what)
    model = torchvision.models.resnet50(weights=None)
    bank = ExpertBank(model, resnet_placement(model, r=r, alpha=alpha, layout="loralib"), n_experts,
                      arch="torchvision.resnet50")
    prefix = "resnet."
    problems = []
    lora_bank = sorted(prefix + n for n in bank.placement.lora)
    if lora_bank != lora_man:
        problems.append(f"LoRA layers differ: only in bank {sorted(set(lora_bank) - set(lora_man))}, "
                        f"only in manifest {sorted(set(lora_man) - set(lora_bank))}")
    keymap = ppap_key_map(bank, prefix)
    trainable_bank = sorted(k for k, (t, pe) in keymap.items() if pe and isinstance(t, nn.Parameter))
    if trainable_bank != trainable_man:
        problems.append(f"per-expert parameters differ from the official trainable set: only in bank "
                        f"{sorted(set(trainable_bank) - set(trainable_man))}, only in manifest "
                        f"{sorted(set(trainable_man) - set(trainable_bank))}")
    n_tr = bank.num_trainable_parameters(0)
    if n_tr != n_tr_man:
        problems.append(f"trainable parameters per expert: bank {n_tr}, manifest {n_tr_man}")
    if problems:
        raise ValueError("PPAP manifest check failed: " + "; ".join(problems))

    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in man_shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.randint(1, 10_000, tuple(shape), generator=g, dtype=torch.long)
        else:
            sd[k] = torch.randn(tuple(shape), generator=g)
    before = {n: bank.expert_state_dict(n) for n in range(n_experts) if n != expert}
    import_ppap_checkpoint(bank, expert, sd, prefix=prefix, base="load")
    back = export_ppap_checkpoint(bank, expert, prefix)
    if set(back) != set(sd):
        raise ValueError("export after import has different keys")
    wrong = sorted(k for k in sd if not torch.equal(back[k], sd[k]))
    if wrong:
        raise ValueError(f"values did not land where they belong: {wrong[:10]}")
    for n, esd in before.items():
        now = bank.expert_state_dict(n)
        if any(not torch.equal(now[k], v) for k, v in esd.items()):
            raise ValueError(f"importing into expert {expert} changed expert {n}")

    lora_key = next(k for k in sd if k.endswith("lora_A"))
    tampered = {
        "missing key": {k: v for k, v in sd.items() if k != lora_key},
        "extra key": {**sd, prefix + "fc.lora_A": torch.zeros(r, 2048)},
        "wrong shape": {**sd, lora_key: torch.zeros(sd[lora_key].shape[0] + 1, sd[lora_key].shape[1])},
    }
    for what, bad_sd in tampered.items():
        try:
            import_ppap_checkpoint(bank, expert, bad_sd, prefix=prefix, base="load")
        except ValueError:
            continue
        raise ValueError(f"a tampered PPAP state_dict ({what}) was accepted: the import is not strict")
    return {"entries": len(sd), "lora_layers": len(lora_bank), "trainable_per_expert": n_tr,
            "trainable_tensors": len(trainable_bank), "expert": expert, "n_experts": n_experts}


__all__ = ["save_experts", "load_experts", "load_experts_into", "read_config", "import_ppap_checkpoint",
           "input_transform_mismatch", "check_input_transform", "export_ppap_checkpoint", "ppap_key_map", "check_ppap_checkpoint_manifest"]
