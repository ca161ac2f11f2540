"""Score samples of real models with an independent classifier: ``ppap-fast score``.

    ppap-fast score samples/goldfish.npz --classifier mobilenet_v2 --classifier-weights imagenet \\
        --real imagenet_val_256.npz --json scores.json

Did the guidance work? A classifier that did not guide (MobileNetV2's ImageNet weights ship offline:
``--classifier-weights imagenet``; any registry name with a local weight file, ``tiny:<file>`` or
``py:module:factory`` as for ``guided-sample --guide``) scores the samples of ``guided-sample`` (or any
.npz with ``images`` uint8 N x H x W x C and ``targets`` / ``labels`` int [N]; several files: the parts of a
split run, e.g. ``guided-sample --first-sample``, scored as one set):

* ``target_accuracy`` / ``target_top5_accuracy`` / ``mean_target_probability`` (with targets);
* ``is``: the Inception Score formula on this classifier's softmax (not Inception-v3's: compare runs
  scored with the same classifier only);
* with ``--real`` (an .npz of real images, ``images`` uint8 N x H x W x C): ``fd`` (Frechet distance
  of the classifier's penultimate features, the input of its last linear layer) and ``precision`` /
  ``recall`` (k-NN manifolds, k=3), against those images.

Nothing is downloaded. Images go through the classifier's own input transform (resize and ImageNet
normalisation for registry models).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .metrics import frechet_distance, inception_score, precision_recall


class ScoreError(ValueError):
    """Bad input of ``ppap-fast score`` (a file, a classifier that cannot score these samples)."""


@dataclass
class ScoreConfig:
    samples: str | list          # one .npz, or the parts of a split run (concatenated in order)
    classifier: str = "mobilenet_v2"
    classifier_weights: str | None = "auto"
    real: str | None = None
    batch_size: int = 64
    device: str = "auto"
    k: int = 3
    progress: bool = False


def read_images(path, what: str = "samples") -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 N x H x W x C, targets int64 [N] or None) of an .npz (``targets`` or ``labels``)."""
    import zipfile

    path = Path(path)
    if path.is_dir():
        raise ScoreError(f"{what} file {path} is a directory: name the .npz inside it")
    if not path.is_file():
        raise ScoreError(f"{what} file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ScoreError(f"{path} is not an .npz archive (images uint8 N x H x W x C, targets int [N])")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ScoreError(f"{path} has no 'images' array (it has {sorted(z.files)})")
            images = z["images"]
            key = next((k for k in ("targets", "labels") if k in z.files), None)
            targets = z[key] if key is not None else None
    except ScoreError:
        raise
    except Exception as e:
        raise ScoreError(f"corrupt or unreadable {what} file {path}: {type(e).__name__}: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ScoreError(f"{path}: images must be uint8 N x H x W x C with N > 0, got {images.dtype} {images.shape}")
    if images.shape[1] in (1, 3, 4) and images.shape[3] > 4:  # read as H = C: a conv error naming "1 x 16 x 16"
        raise ScoreError(f"{path}: images must be N x H x W x C (channels last), got {images.shape}, channels first: "
                         "np.transpose(images, (0, 2, 3, 1))")
    if targets is not None:
        if targets.dtype.kind not in "iu" or targets.shape != (images.shape[0],):
            raise ScoreError(f"{path}: targets must be integers [N={images.shape[0]}], got {targets.dtype} "
                             f"{targets.shape}")
        targets = targets.astype(np.int64)
    return images, targets


def read_parts(paths) -> tuple[np.ndarray, np.ndarray | None]:
    """read_images of one path, or of several (the parts of a split ``guided-sample`` run, e.g. one per
    ``--first-sample``) concatenated in order: the same image size, and targets in all of them or none."""
    if isinstance(paths, (str, Path)):
        return read_images(paths)
    parts = [read_images(p) for p in paths]
    if not parts:
        raise ScoreError("no samples file given")
    shapes = {im.shape[1:] for im, _ in parts}
    if len(shapes) > 1:
        raise ScoreError("the sample files hold images of different sizes: "
                         + ", ".join(f"{p}: {im.shape[1:]}" for p, (im, _) in zip(paths, parts)))
    with_targets = [t is not None for _, t in parts]
    if any(with_targets) and not all(with_targets):
        raise ScoreError("targets in some sample files but not in others: "
                         + ", ".join(str(p) for p, w in zip(paths, with_targets) if not w) + " have none")
    targets = np.concatenate([t for _, t in parts]) if all(with_targets) else None
    return np.concatenate([im for im, _ in parts]), targets


SCORED_OUTPUT_KEYS = ("logits", "out")  # a dict output's logits: the head is found by the same keys


def _head_linear(model: nn.Module) -> nn.Linear | None:
    """The Linear that produces the output (see placement.head_linear: torch.fx, else the last registered
    Linear), None for another head."""
    from .experts.placement import head_linear

    name = head_linear(model, SCORED_OUTPUT_KEYS)[1]
    return model.get_submodule(name) if name is not None else None


@torch.no_grad()
def classifier_outputs(model: nn.Module, transform, images_u8: np.ndarray, batch_size: int,
                       device: torch.device, progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features: the input of the nn.Linear that produces the logits, or the logits without one;
    softmax probabilities), float64 on the CPU, of uint8 N x H x W x C images; ``progress``: a bar's title."""
    from .data import from_uint8
    from .guidance import _primary

    head = _head_linear(model)
    seen: list = []
    hook = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].flatten(1))) if head is not None else None
    feats, probs = [], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=images_u8.shape[0], desc=progress, unit="img", mininterval=1)
    try:
        for i in range(0, images_u8.shape[0], batch_size):
            x = from_uint8(images_u8[i:i + batch_size]).to(device)
            h = transform(x) if transform is not None else x
            seen.clear()
            logits = _primary(model(h), SCORED_OUTPUT_KEYS, "classifier").float()
            if logits.dim() != 2:
                raise ScoreError(f"the classifier must output logits [B, K], got {tuple(logits.shape)}")
            f = seen[-1] if seen else logits
            feats.append(f.double().cpu().numpy())
            probs.append(torch.softmax(logits.double(), 1).cpu().numpy())
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
        if hook is not None:
            hook.remove()
    return np.concatenate(feats), np.concatenate(probs)


def in_top_k(probs: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's target is among its ``k`` most probable classes, ties going to the lower class index
    (the first ``k`` of a stable descending sort), without sorting: the classes ranked above the target counted."""
    p = probs[np.arange(len(targets)), targets][:, None]
    earlier = np.arange(probs.shape[1]) < targets[:, None]
    return ((probs > p) | ((probs == p) & earlier)).sum(1) < k


def _resolve_weights(classifier: str, weights):
    """"auto": a registry model's offline ImageNet weights (else an error: random weights score nothing),
    nothing for tiny: / py: specs (their file or factory holds the weights); "none": random (tests)."""
    if weights in (None, "none"):
        return None
    if weights != "auto":
        return weights
    if classifier.startswith(("tiny:", "py:")):
        return None
    from .models.registry import GUIDES

    spec = GUIDES.get(classifier)
    if spec is not None and spec.offline_weights is None:
        raise ScoreError(f"classifier {classifier!r} has no offline weights: pass --classifier-weights PATH "
                         "(a local checkpoint), or use mobilenet_v2 (its ImageNet weights ship offline)")
    return "imagenet" if spec is not None else None


TINY_CLASSIFIERS = ("evalnet", "resnet")  # tiny model kinds that score: the digits evaluator, classifier


def score(cfg: ScoreConfig) -> dict:
    """All the scores of ``cfg.samples`` (see the module docstring) as a JSON-able dict."""
    from .distributed import _device_for, build_teacher

    if cfg.batch_size <= 0 or cfg.k <= 0:
        raise ScoreError("batch_size and k must be positive")
    if cfg.classifier.startswith("tiny:") and _resolve_weights(cfg.classifier, cfg.classifier_weights) is not None:
        # ignored silently (yet recorded as the weights scored with); build_teacher refuses it for teachers / guides
        raise ScoreError(f"classifier {cfg.classifier!r} holds its own weights (the file after 'tiny:'); "
                         f"--classifier-weights {cfg.classifier_weights} would be ignored: drop it")
    images, targets = read_parts(cfg.samples)
    real = read_images(cfg.real, "real images")[0] if cfg.real is not None else None
    if real is not None and (real.shape[0] <= cfg.k or images.shape[0] <= cfg.k):
        raise ScoreError(f"precision / recall need more than k={cfg.k} images in each set")
    if cfg.classifier.startswith("tiny:"):  # any tiny classifier (build_teacher refused the evaluator: no teacher)
        from .models.tiny import load_model

        model, transform = load_model(cfg.classifier[5:]), None
        if model.kind not in TINY_CLASSIFIERS:
            raise ScoreError(f"classifier {cfg.classifier!r} holds a tiny {model.kind!r} model: scoring needs a "
                             f"classifier ({' or '.join(TINY_CLASSIFIERS)})")
    else:
        built = build_teacher(cfg.classifier, _resolve_weights(cfg.classifier, cfg.classifier_weights))
        if built.task not in (None, "classification"):
            raise ScoreError(f"classifier {cfg.classifier!r} is a {built.task} model: scoring needs a classifier")
        model, transform = built.model, built.transform
    wants = transform.mean.shape[1] if transform is not None and transform.mean is not None else None
    for what, imgs in (("samples", images), ("real images", real)):
        if wants is not None and imgs is not None and imgs.shape[-1] != wants:  # was a bare ValueError mid-scoring
            raise ScoreError(f"classifier {cfg.classifier!r} takes {wants}-channel images, the {what} have "
                             f"{imgs.shape[-1]} ({' x '.join(map(str, imgs.shape[1:]))}): score them with a "
                             f"classifier of their channel count (--classifier tiny:FILE or py:module:factory)")
    device = _device_for(cfg.device, 0)
    model = model.to(device).eval()
    transform = transform.to(device) if transform is not None else None

    def outputs(what, imgs):
        try:
            return classifier_outputs(model, transform, imgs, cfg.batch_size, device,
                                      f"score {what}" if cfg.progress else None)
        except RuntimeError as e:  # a shape / channel mismatch deep in a conv: one line naming the images
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise ScoreError(f"classifier {cfg.classifier!r} cannot take the {what} (images "
                             f"{' x '.join(map(str, imgs.shape[1:]))}): {str(e).splitlines()[0]}") from None

    feats, probs = outputs("samples", images)
    if not (np.isfinite(feats).all() and np.isfinite(probs).all()):
        raise ScoreError("the classifier returned non-finite outputs on these samples")
    names = [str(p) for p in cfg.samples] if isinstance(cfg.samples, (list, tuple)) else [str(cfg.samples)]
    res = {"samples": names[0] if len(names) == 1 else names, "num_samples": int(images.shape[0]), "classifier": cfg.classifier,
           "classifier_weights": cfg.classifier_weights, "num_classes": int(probs.shape[1]),
           "feature_dim": int(feats.shape[1]), "is": inception_score(probs)}
    if targets is not None:
        if targets.min() < 0 or targets.max() >= probs.shape[1]:
            raise ScoreError(f"targets must lie in 0..{probs.shape[1] - 1} (the classifier's classes), got "
                             f"{int(targets.min())}..{int(targets.max())}")
        rows = np.arange(len(targets))
        res.update(target_accuracy=float((probs.argmax(1) == targets).mean()),
                   target_top5_accuracy=float(in_top_k(probs, targets, 5).mean()),
                   mean_target_probability=float(probs[rows, targets].mean()))
    if real is not None:
        rfeats, _ = outputs("real images", real)
        if not np.isfinite(rfeats).all():  # was metrics' "features hold N non-finite values", naming no file
            raise ScoreError(f"the classifier returned non-finite features on the real images {cfg.real}")
        prec, rec = precision_recall(rfeats, feats, cfg.k)
        res.update(real=str(cfg.real), num_real=int(real.shape[0]), fd=frechet_distance(feats, rfeats),
                   precision=prec, recall=rec)
    return res


def add_parser(sub) -> None:
    from .cli import _positive_int

    s = sub.add_parser("score", help="score samples of real models with an independent classifier (target "
                                     "accuracy, IS; FD / precision / recall against --real images)")
    s.add_argument("samples", nargs="+", help=".npz with images uint8 N x H x W x C and targets (guided-sample's "
                                              "output); several: the parts of a split run, scored as one set")
    s.add_argument("--classifier", default="mobilenet_v2",
                   help="registry name (see ppap_fast.models.registry), tiny:<file> or py:module:factory")
    s.add_argument("--classifier-weights", default="auto",
                   help="local weight file, 'imagenet' (offline: MobileNetV2 only), 'auto' (a registry model's "
                        "offline weights; tiny: / py: specs hold their own) or 'none' (random: tests)")
    s.add_argument("--real", default=None, help=".npz of real images (images uint8 N x H x W x C) for FD, "
                                                "precision and recall")
    s.add_argument("--batch-size", type=_positive_int, default=64, help="images per classifier batch")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--json", default=None, help="also write the scores to this .json file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


def main_json(args) -> str:
    cfg = ScoreConfig(args.samples, args.classifier, args.classifier_weights, args.real, args.batch_size, args.device,
                      progress=not args.no_progress)
    if args.json is not None and Path(args.json).is_dir():
        raise ScoreError(f"--json {args.json} is a directory; name an output file")
    inputs = list(args.samples) if isinstance(args.samples, (list, tuple)) else [args.samples]
    if args.json is not None and any(_same_file(args.json, p) for p in inputs + [args.real] if p is not None):
        raise ScoreError(f"--json {args.json} is one of the input files; name another output file")  # was overwritten
    res = score(cfg)
    if args.json is not None:
        from .data.shards import write_json_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, res)
    return json.dumps(res)
