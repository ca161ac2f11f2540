"""``ppap-fast info``: what this install can run (versions, devices, which op backends exist), what
expert checkpoints hold (config, per-expert parameters, file digests verified), without a base model, and
what data-free sets hold (settings, arrays, shards readable; CRC-32 checked with --verify-data).
Paste its output into a bug report."""
from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import numpy as np
import torch


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment(device: str | None = None) -> dict:
    """Versions, devices and the op backends that can run on ``device`` (default: cuda if present)."""
    import ppap_fast
    from ppap_fast.ops import backend_report

    cuda = torch.cuda.is_available()
    report = backend_report(device)
    why_not: dict = {}  # backend -> the reasons it cannot run here (one line each)
    for op in report["ops"].values():
        for b, why in op["available"].items():
            if why != "ok" and why not in why_not.setdefault(b, []):
                why_not[b].append(why)
    return {
        "ppap_fast": ppap_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "packages": {d: _version(d) for d in ("triton", "diffusers", "peft", "timm", "torchvision", "numpy")},
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_threads": torch.get_num_threads(),
        "backend_device": str(torch.device(device or ("cuda" if cuda else "cpu"))),
        "extension": report["extension"],
        "extension_cuda": report["extension_cuda"],
        "triton": report["triton"],
        "ops_runnable": {name: [b for b, why in op["available"].items() if why == "ok"]
                         for name, op in sorted(report["ops"].items())},
        "backends_not_runnable": why_not,
    }


_STAT_BUFFERS = (".running_mean", ".running_var", ".num_batches_tracked")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


_PREV_OK = "ok (sha256 verified: the previous copy "


def _file_status(f: Path, want: dict | None) -> str:
    from ppap_fast.experts.checkpoint import _digest, _prev

    prev = _prev(f)  # kept by a save killed before its config.json: what loading falls back to
    got = _digest(f.read_bytes()) if f.is_file() and want is not None else None
    if want is not None and got != want and prev.is_file() and _digest(prev.read_bytes()) == want:
        return f"{_PREV_OK}{prev.name}: a save was interrupted before its config.json; it loads with a warning, " \
               "save again to replace it)"
    if not f.is_file():
        return "missing"
    if want is None:
        return "present (no digest recorded)"
    if got == want:
        return "ok (sha256 verified)"
    return f"DAMAGED ({got['bytes']} bytes, sha256 {got['sha256'][:12]}... vs recorded {want['bytes']} bytes, " \
           f"{want['sha256'][:12]}...)"


def checkpoint_summary(path) -> dict:
    """An expert checkpoint directory's config, per-expert trainable values and statistics buffers (from the
    tensor shapes: no base model needed) and each file's state against the digests config.json records."""
    from safetensors import safe_open

    from ppap_fast.experts.checkpoint import read_config

    path = Path(path)
    cfg = read_config(path)
    placement = cfg.get("placement", {})
    recorded = cfg.get("files")
    # read_config checks the keys loading needs; these are read here only (a hand edit raised KeyError)
    bad = [f"files.{k}" for k, v in (recorded or {}).items()
           if not (isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str))]
    bad += [f"placement.{k}" for k in ("lora", "bias", "norm") if not isinstance(placement.get(k, []), list)]
    bad += ["n_experts"] if cfg["n_experts"] < 1 else []
    if bad:
        raise ValueError(f"{path / 'config.json'} is damaged: missing or malformed entries {bad}; "
                         "restore it from the saved checkpoint or save the experts again")
    names = sorted(set(recorded or {}) | {"experts.safetensors"})
    files = {n: _file_status(path / n, (recorded or {}).get(n)) for n in names}
    n = int(cfg["n_experts"])
    counts = None  # per expert: trained values, statistics buffers (BN running stats); values shared by all
    if files.get("experts.safetensors", "").startswith(("ok", "present")):
        counts = {"trainable_per_expert": 0, "buffers_per_expert": 0, "not_per_expert": 0}
        src = path / "experts.safetensors"
        if files["experts.safetensors"].startswith(_PREV_OK):
            from ppap_fast.experts.checkpoint import _prev

            src = _prev(src)
        try:
            with safe_open(str(src), "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    shape, numel = sl.get_shape(), 1
                    for d in shape:
                        numel *= d
                    if not shape or shape[0] != n:
                        counts["not_per_expert"] += numel
                    elif k.endswith(_STAT_BUFFERS) or sl.get_dtype() not in _FLOAT_DTYPES:
                        counts["buffers_per_expert"] += numel // n
                    else:
                        counts["trainable_per_expert"] += numel // n
        except Exception as e:  # SafetensorError (truncated / not safetensors: no digest caught it) is no ValueError
            files["experts.safetensors"] = f"DAMAGED (not a readable safetensors file: {type(e).__name__}: {e})"
            counts = None
    return {
        "path": str(path),
        "arch": cfg.get("arch"),
        "n_experts": n,
        "bands": cfg.get("bands"),
        "num_timesteps": cfg.get("num_timesteps"),
        "layout": cfg.get("layout"),
        "r": cfg.get("r"),
        "alpha": cfg.get("alpha"),
        "dtype": cfg.get("dtype"),
        "placement": {k: len(placement.get(k, [])) for k in ("lora", "bias", "norm")} | {"rule": placement.get("rule")},
        "values": counts,
        "include_base": cfg.get("include_base"),
        "base_state": (cfg.get("base_state") or "")[:16] or None,
        "files": files,
        "verified": recorded is not None and all(s.startswith("ok") for s in files.values()),
    }


SET_MANIFEST = "manifest.json"
# a set's recorded settings shown by info (either manifest format); digests are cut to 16 hex digits
_SET_SETTINGS = ("kind", "seed", "respacing", "sampler", "eta", "schedule", "num_timesteps", "image_shape", "image_size",
                 "channels", "denoiser", "checkpoint", "teacher", "teacher_weights", "fast", "step_noise",
                 "targets_encoding", "teacher_temperature", "unet_state", "teacher_state", "device_type")


def data_set_summary(path, verify: bool = False, progress: bool = False) -> dict:
    """A data-free set's manifest settings, shards (complete or not, read from their zip directories and npy headers
    only) and arrays; ``verify``: every shard read whole and its CRC-32 checked. ``problems``: one line per missing,
    damaged or inconsistent shard; ``progress``: a bar over the verified shards."""
    from ppap_fast.data.shards import ShardSet, npz_members

    path = Path(path)
    try:
        man = json.loads((path / SET_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / SET_MANIFEST} is not readable JSON ({e})") from None
    shards = man.get("shards") if isinstance(man, dict) else None
    if not isinstance(shards, list) or not all(isinstance(n, str) for n in shards) \
            or not isinstance(man.get("num_images"), int) or isinstance(man["num_images"], bool):
        raise ValueError(f"{path / SET_MANIFEST} is not a ppap_fast data-free set manifest (no shards list / num_images)")
    config = man.get("config") if isinstance(man.get("config"), dict) else man  # distributed: nested
    settings = {k: config[k] for k in _SET_SETTINGS if k in config}
    if "device_type" in man:  # distributed: beside its config (not part of the identity)
        settings["device_type"] = man["device_type"]
    for k in ("unet_state", "teacher_state"):
        if isinstance(settings.get(k), str):
            settings[k] = settings[k][:16]
    problems, arrays, complete = [], None, 0
    for name in shards:
        try:
            members = npz_members(path / name)
        except (OSError, ValueError) as e:
            problems.append(f"{name}: {'missing' if not (path / name).exists() else f'DAMAGED ({e})'}")
            continue
        im = members.get("images")
        if im is None or len(im.shape) != 4 or im.dtype != np.uint8:
            problems.append(f"{name}: DAMAGED (no uint8 N x H x W x C images)")
            continue
        complete += 1
        if arrays is None:
            arrays = {k: {"row_shape": list(m.shape[1:]), "dtype": str(m.dtype)} for k, m in members.items()}
    summary = {"path": str(path), "format": man.get("format") or man.get("kind"), "complete": bool(man.get("complete")),
               "num_images": man["num_images"], "num_shards": len(shards), "shards_readable": complete,
               "arrays": arrays, "settings": settings, "verified": None, "problems": problems,
               "preview": str(path / "preview.png") if (path / "preview.png").is_file() else None}
    if not summary["complete"]:  # generation is under way or was stopped: a rerun writes what is missing
        summary["note"] = (f"incomplete ({len(problems)} of {len(shards)} shards missing or unfinished): rerun the "
                           "same generate command to finish it")
        summary["problems"] = []
    elif not problems:
        try:  # row counts and every array's shape against the other shards (what reading it checks)
            data = ShardSet(path)
        except (OSError, ValueError) as e:
            problems.append(f"{SET_MANIFEST}: inconsistent with its shards ({e})")
        else:
            if verify:
                problems += [line.removeprefix(f"{path}/") for line in data.verify(progress=progress)]
                summary["verified"] = not problems
    return summary


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("info", help="versions, devices and op backends of this install; what expert checkpoints "
                                    "(digests verified), data-free sets and runs in progress hold: paste into a bug "
                                    "report")
    s.add_argument("experts", nargs="*", metavar="DIR",
                   help="expert checkpoint directories to summarise and verify, data-free sets (generate's --out: "
                        "a manifest.json and its shards), or a distill / finetune run's --out (or its state file) "
                        "while it trains: the step, the time and the loss so far")
    s.add_argument("--device", default=None, help="device whose op backends are listed (default: cuda if present)")
    s.add_argument("--verify-data", action="store_true",
                   help="also read every shard of a data-free set whole and check its CRC-32 (slow for large sets)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar while --verify-data reads the shards")
    return s


def _is_data_set(path: Path) -> bool:
    return (path / SET_MANIFEST).is_file() and not (path / "config.json").exists()


# where a run in progress keeps its resumable state: distributed distill inside --out, the CLI beside it
_STATE_NAMES = ("train_state.safetensors",)
_STATE_SUFFIXES = (".distill_state.safetensors", ".finetune_state.safetensors")


def _training_states(path: Path) -> list[Path]:
    """The training states ``path`` names: the file itself, or a run's --out (inside it or beside it). A run
    rerun over its previous output keeps its state beside that output (finetune's --out is a file)."""
    named = path if path.name not in ("", "..") else path.resolve()  # "." has no name to put a suffix on
    beside = [s for s in (named.with_name(named.name + x) for x in _STATE_SUFFIXES) if s.is_file()]
    if path.is_file():
        return beside or ([path] if path.suffix == ".safetensors" else [])
    return [path / n for n in _STATE_NAMES if (path / n).is_file()] + beside


def _mean(values) -> float | None:
    v = [x for x in values if isinstance(x, float) and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def training_state_summary(path, recent: int = 50) -> dict:
    """A resumable training state (a distill / finetune run in progress or killed): the step it resumes from, of
    how many, its settings, the time trained, and the mean loss over the first and the last ``recent`` steps
    (overall and per expert where recorded). Read from its metadata and loss tensors only."""
    from safetensors import safe_open

    from ppap_fast.distributed import EXPERT_LOSSES, read_train_state_meta

    path = Path(path)
    try:  # SafetensorError (a truncated or foreign file) is no ValueError: it ended in a traceback
        meta = read_train_state_meta(path)
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            losses = f.get_tensor("losses").tolist() if "losses" in keys else []
            expert = f.get_tensor(EXPERT_LOSSES).tolist() if EXPERT_LOSSES in keys else None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}): truncated, or no "
                         "training state") from None
    try:  # hand-edited metadata: a JSONDecodeError naming no file, an AttributeError traceback
        config = json.loads(meta.get("config", "{}"))
        if not isinstance(config, dict):
            raise ValueError(f"its config is a JSON {type(config).__name__}, not an object")
        step, steps = int(meta.get("step", 0)), config.get("steps")
        world_size = int(meta.get("world_size", 1))
        elapsed = round(float(meta["elapsed_s"]), 1) if "elapsed_s" in meta else None
    except ValueError as e:
        raise ValueError(f"{path} is a training state with damaged metadata ({e}); remove it to start the run "
                         "over") from None
    out = {"path": str(path), "step": step, "steps": steps,
           "done": round(step / steps, 4) if isinstance(steps, int) and steps > 0 else None,
           "world_size": world_size, "elapsed_s": elapsed,
           "loss_first": _mean(losses[:recent]), "loss_last": _mean(losses[-recent:]),
           "loss_over_steps": min(recent, len(losses)),  # 6 steps recorded: means over 6, not 50
           "config": config}
    if expert:
        out["expert_loss_last"] = [_mean(col) for col in zip(*expert[-recent:])]
    return out


def _states_beside(path: Path, skip: Path | None = None) -> list[dict]:
    """The training states of a rerun into the output ``path``: a damaged one as {"path", "problem"} (the
    output beside it is still summarised; a ValueError here lost the whole report)."""
    out = []
    for state in _training_states(path):
        if state == skip:
            continue
        try:
            out.append(training_state_summary(state))
        except ValueError as e:
            out.append({"path": str(state), "problem": str(e)})
    return out


def model_file_summary(path) -> dict | None:
    """A model file this package saves (save_model / finetune's save_multi): its kind and recorded settings;
    None for a training state or a file without that metadata."""
    from safetensors import safe_open

    from ppap_fast.distributed import TRAIN_STATE_FORMAT

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file: the callers' messages say what is expected
        return None
    if meta.get("format") == TRAIN_STATE_FORMAT or "kind" not in meta:
        return None
    out = {"path": str(path), "kind": meta["kind"]}
    try:
        if meta["kind"] == "multiexperts":
            out.update(what="multi-experts checkpoint (finetune output)", n_experts=int(meta["n_experts"]),
                       base_kind=meta.get("base_kind"), base_config=json.loads(meta.get("base_config", "{}")))
        else:
            out.update(what="model checkpoint", config=json.loads(meta.get("config", "{}")))
        out["extra"] = json.loads(meta.get("extra", "{}"))
    except (ValueError, KeyError) as e:
        out["problem"] = f"unreadable metadata: {type(e).__name__}: {e}"
    return out


def main_json(args) -> tuple[str, list]:
    """(the JSON text, the damaged or missing checkpoint files and shards ("DIR/NAME: state"), training states
    found beside an output (their error line) and model files with unreadable metadata)."""
    if getattr(args, "verify_data", False) and not any(_is_data_set(Path(p)) for p in args.experts):
        # it verified nothing without a word: the report read as if the data had been checked
        raise ValueError("--verify-data checks data-free sets (a generate --out: manifest.json and its shards); "
                         "none of the paths given is one")
    out = {"environment": environment(args.device)}
    experts, sets, states, models = [], [], [], []
    for p in map(Path, args.experts):
        if (p / "config.json").exists():
            experts.append(checkpoint_summary(p))
            states += _states_beside(p)  # a rerun into it, under way
        elif _is_data_set(p):
            sets.append(data_set_summary(p, verify=getattr(args, "verify_data", False),
                                         progress=not getattr(args, "no_progress", True)))
        elif p.is_file() and (m := model_file_summary(p)) is not None:  # a finished output, not a state
            models.append(m)
            states += _states_beside(p, skip=p)
        elif _training_states(p):  # a run under way (or killed): its resumable state
            states += [training_state_summary(s) for s in _training_states(p)]
        elif p.is_dir() or not p.exists():
            raise FileNotFoundError(f"{p} holds no expert checkpoint (config.json), data-free set ({SET_MANIFEST}) "
                                    "or training state (train_state.safetensors inside, or "
                                    f"{p.name}.distill_state.safetensors beside it)")
        else:
            raise ValueError(f"{p} is a file but no training state (*.safetensors): give a directory")
    for key, found in (("experts", experts), ("data_sets", sets), ("training_states", states), ("models", models)):
        if found:
            out[key] = found
    bad = [f"{c['path']}/{n}: {state}" for c in experts for n, state in c["files"].items()
           if state.startswith(("DAMAGED", "missing"))]
    bad += [f"{d['path']}/{line}" for d in sets for line in d["problems"]]
    bad += [s["problem"] for s in states if "problem" in s]  # each names its file
    bad += [f"{m['path']}: {m['problem']}" for m in models if "problem" in m]  # it cannot be loaded either
    return json.dumps(out, indent=2), bad
