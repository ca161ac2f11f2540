"""Sample-quality metrics scored with the evaluator classifier (never with a guide).

* target accuracy: evaluator argmax == requested class;
* Fréchet distance between Gaussian fits of evaluator penultimate features (FID's formula);
* precision / recall of Kynkäänniemi et al. (2019): k-NN manifolds (k=3) in feature space;
* Inception-style score exp(E_x KL(p(y|x) || p(y))) from the evaluator's softmax (max = #classes).
"""
from __future__ import annotations

import numpy as np
import torch


def _f64(a, what: str = "features") -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = (a.double() if a.is_floating_point() else a).numpy()  # numpy has no bfloat16
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} hold {int((~np.isfinite(a)).sum())} non-finite values (NaN/Inf)")
    return a


def frechet_distance(feats_a, feats_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), via a symmetric eigen-decomposition."""
    a, b = _f64(feats_a), _f64(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature arrays must be N x D with equal D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    with np.errstate(over="ignore", invalid="ignore"):
        s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # D = 1: 0-d
    if not (np.isfinite(s_a).all() and np.isfinite(s_b).all() and np.isfinite(mu_a - mu_b).all()):
        raise ValueError("features too large: their mean or covariance overflows float64")
    # Tr((S_a S_b)^{1/2}) = Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}), the inner matrix is symmetric PSD.
    w, v = np.linalg.eigh(s_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = sqrt_a @ s_b @ sqrt_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)
    return max(fd, 0.0)


def _pairwise(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    # |a|^2 + |b|^2 - 2 a.b, in place: two len(a) x len(b) temporaries at most; b_sq: (b * b).sum(1), given
    # once per matrix by row-chunked callers (not an N x D temporary per chunk)
    d = a @ b.T
    d *= -2
    d += (a * a).sum(1)[:, None] + ((b * b).sum(1) if b_sq is None else b_sq)[None, :]
    return np.sqrt(np.clip(d, 0, None, out=d), out=d)


def _radii(x: np.ndarray, k: int, chunk: int, x_sq: np.ndarray | None = None) -> np.ndarray:
    # k-th nearest neighbour excluding the point itself (index 0 of a sorted row is the self-distance 0);
    # per row chunk, so the largest temporary is chunk x N
    kth = min(k, x.shape[0] - 1)
    out = np.empty(x.shape[0])  # a copy: a column view would keep its chunk x N matrix alive
    x_sq = (x * x).sum(1) if x_sq is None else x_sq
    for i in range(0, x.shape[0], chunk):
        d = _pairwise(x[i:i + chunk], x, x_sq)
        d.partition(kth, axis=1)
        out[i:i + chunk] = d[:, kth]
        del d  # freed before the next chunk's
    return out


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold).

    ``chunk``: rows of distances computed at a time (temporaries of chunk x N float64, not N x N:
    50k samples would need ~20 GB per matrix); the result does not depend on it."""
    r, f = _f64(real_feats), _f64(fake_feats)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"feature arrays must be N x D with equal D, got {r.shape} and {f.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int of at least 1, got {k!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if r.shape[0] <= k or f.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    # distances come from |a|^2 + |b|^2 - 2 a.b: centred, so a large common mean does not cancel them
    # away; the tie tolerance follows the features' scale (the result is translation and scale invariant)
    centre = r.mean(0)
    r, f = r - centre, f - centre
    f_own = f - f.mean(0)
    r_sq, f_sq = (r * r).sum(1), (f_own * f_own).sum(1)  # once per matrix: spreads, radii, fake x real
    tol = 1e-9 * max(np.sqrt(r_sq.mean()), np.sqrt(f_sq.mean()))  # spreads
    chunk = int(chunk)
    r_rad, f_rad = _radii(r, k, chunk, r_sq), _radii(f_own, k, chunk, f_sq)
    in_real = np.zeros(f.shape[0], dtype=bool)  # precision: fake row within some real radius
    in_fake = np.zeros(r.shape[0], dtype=bool)  # recall: real row within some fake radius
    for i in range(0, f.shape[0], chunk):
        d = _pairwise(f[i:i + chunk], r, r_sq)  # fake x real
        in_real[i:i + chunk] = (d <= r_rad[None, :] + tol).any(1)
        in_fake |= (d <= f_rad[i:i + chunk, None] + tol).any(0)
        del d
    return float(in_real.mean()), float(in_fake.mean())


def inception_score(probs, split_size: int = 5000) -> float:
    """exp(E KL(p(y|x) || p(y))) per consecutive split of ``split_size`` rows (the last one may be
    shorter), averaged over the splits: guided-diffusion's evaluator (5000, so 10 splits of 50k
    samples, as the papers report); one split up to 5000 rows. Rows must sum to 1 +- 0.01 (a half
    precision softmax) and are renormalised."""
    p = _f64(probs, "probabilities")
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be N x K with N >= 1, got {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-2):
        raise ValueError("probabilities must be non-negative rows summing to 1 (softmax outputs, not logits)")
    if isinstance(split_size, bool) or not isinstance(split_size, (int, np.integer)) or split_size < 1:
        raise ValueError(f"split_size must be a positive int, got {split_size!r}")
    p = p / p.sum(1, keepdims=True)  # fp16 softmax rows sum to 1 +- 1e-3: scaled the KL by that sum
    n, short = p.shape[0], p.shape[0] % split_size
    if n > split_size and 0 < short < split_size / 2:  # averaged in as a full split, as the evaluator does
        import warnings

        warnings.warn(f"inception_score: the last split holds {short} of {n} rows (splits of {split_size}); its "
                      "score (1 for a single row) counts as much as a full split's, so the score is biased low: "
                      f"score {n - short} or {n - short + split_size} samples (a multiple of {split_size}) for an "
                      "exact one", UserWarning, stacklevel=2)
    scores = []
    for i in range(0, p.shape[0], split_size):
        part = p[i:i + split_size]
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


@torch.no_grad()
def evaluator_outputs(evaluator, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, softmax probabilities) of images in [-1, 1], N x C x H x W. Each batch
    goes to the evaluator's device and dtype (those of its first floating parameter), the results
    come back to the CPU in float64.

    ``images``: a floating tensor in [-1, 1] (what the samplers return). Images in [0, 1] cannot be
    told from [-1, 1] ones and are scored as they are (wrong features and metrics, no error): pass
    ``2 * x - 1``. uint8 pixels, and floats in 0..255 (none negative, maximum above 2), are refused
    (ValueError): pass ``x / 127.5 - 1``."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        # uint8 pixels (0..255) were scored as values of [-1, 1] images: wrong features, no error
        raise ValueError(f"images must be a floating tensor in [-1, 1], got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.shape[0] == 0:
        raise ValueError("no images to score (an empty sample set)")
    bad = int((~torch.isfinite(images)).sum())
    if bad:  # NaN skipped the range check below; an evaluator that maps it to a finite value scored it silently
        raise ValueError(f"images hold {bad} non-finite values (NaN/Inf): a sampler that diverged? they cannot be "
                         "scored")
    lo, hi = float(images.min()), float(images.max())
    if lo >= 0 and hi > 2:  # 0..255 pixels as floats were scored as [-1, 1] images, without an error
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:g}, {hi:g}] (0..255 pixels? pass "
                         "x / 127.5 - 1)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    was_training = evaluator.training  # restored: a training loop scoring itself went on in eval mode
    evaluator.eval()
    p = next((p for p in evaluator.parameters() if p.is_floating_point()), None)
    device, dtype = (p.device, p.dtype) if p is not None else (images.device, torch.float32)
    feats, probs = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device=device, dtype=dtype)
            h = evaluator.features(x)
            logits = evaluator.head(h) if hasattr(evaluator, "head") else evaluator.fc(h)
            feats.append(h.cpu().double().numpy())
            probs.append(torch.softmax(logits.cpu().double(), 1).numpy())
    finally:
        evaluator.train(was_training)
    return np.concatenate(feats), np.concatenate(probs)


def score_samples(evaluator, images: torch.Tensor, labels, real_images: torch.Tensor, k: int = 3,
                  real_outputs=None) -> dict:
    """All metrics for one sample set against the held-out real images.

    ``images`` and ``real_images``: floating N x C x H x W in [-1, 1], as in ``evaluator_outputs`` (images
    in [0, 1] are not detected and give wrong metrics; 0..255 pixels are refused). ``labels``: the
    requested class of each image. ``real_outputs``: ``evaluator_outputs(evaluator, real_images)``
    computed once, to reuse (``real_images`` is then not scored)."""
    feats, probs = evaluator_outputs(evaluator, images)
    rfeats = real_outputs[0] if real_outputs is not None else evaluator_outputs(evaluator, real_images)[0]
    raw = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if raw.dtype.kind not in "iu" and not (raw.dtype.kind == "f" and np.isfinite(raw).all()
                                           and (raw == np.round(raw)).all()):
        # 2.7 was truncated to class 2 (NaN to some int) by the int64 cast, without an error
        raise ValueError(f"labels must be integer class indices, got {raw.dtype} values")
    labels = raw.astype(np.int64)
    if labels.shape != (images.shape[0],):  # (N, 1) or (1,) would broadcast into a wrong accuracy
        raise ValueError(f"labels must have shape ({images.shape[0]},) like the images, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):  # never on target: accuracy fell silently
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]}) (the evaluator's classes), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    prec, rec = precision_recall(rfeats, feats, k)
    return {
        "target_accuracy": float((probs.argmax(1) == labels).mean()),
        "fd": frechet_distance(feats, rfeats),
        "is": inception_score(probs),
        "precision": prec,
        "recall": rec,
        "num_samples": int(images.shape[0]),
    }
