"""Scale-out with torch.distributed: data-free generation and DDP distillation of an ExpertBank.

Launch with torchrun (one process per GPU, NCCL; or gloo on CPU)::

    torchrun --nproc-per-node 8 -m ppap_fast.distributed generate \\
        --denoiser adm:256x256_diffusion_uncond --checkpoint 256x256_diffusion_uncond.pt \\
        --out /data/ppap500k --num-images 500000 --shard-size 250 --batch-size 125 --respacing ddim25
    torchrun --nproc-per-node 8 -m ppap_fast.distributed distill \\
        --data /data/ppap500k --teacher resnet50 --teacher-weights resnet50.pth --n-experts 10 ...

or, without torchrun, ``python -m ppap_fast.distributed generate --nproc 2 ...`` spawns the
workers itself (gloo on CPU, a file rendezvous in a temporary directory).

Generation (:func:`generate`)
    The set is a directory of shards ``shard_00000.npz ...`` (``images`` uint8 N x H x W x C)
    plus ``manifest.json``, read lazily by :class:`ppap_fast.data.ShardSet`. With ``--teacher``
    the teacher's outputs on the dequantised clean images are cached once, in the shard: a
    classifier's ``logits`` float32 N x K, a dense guide's ``targets`` float16 N x (its output
    shape), e.g. N x 1 x H x W for depth (2*H*W bytes per image: 128 KiB at 256x256) or
    N x 21 x H x W for DeepLabV3 logits (42*H*W bytes: 2.6 MiB per 256x256 image, 1.3 TB for
    500k images: budget the disk). float16 keeps about 3 significant digits; outputs past its
    range (65504) or not finite are an error. The temperature 0.25 of ``pixel_kl`` amplifies that
    rounding: raw segmentation logits of magnitude ~30 would shift a pixel's target distribution by
    up to ~5% (total variation), so a segmentation teacher's logits are stored minus their per-pixel
    max over the classes (``MAX_SUBTRACTED``, recorded in the configuration as ``targets_encoding``;
    the softmax is unchanged and the top classes lie near 0, where float16 is fine: well under
    0.5%). Sets written before (raw float16 logits) are read as they are (pixel_kl warns of their
    rounding), but not finished (another configuration); a pixel_kl run's training state records
    the encoding it trains on (a resume on targets rounded another way is refused); distillation
    with a loss other than ``pixel_kl`` does not use max-subtracted targets (it computes the
    teacher's outputs itself). Classifier logits (N x K, small) are float32; float16 ones (sets
    made by other tools) are upcast on read. The configuration includes the teacher's state
    fingerprint (its weights, whatever the spec); distillation refuses cached outputs of
    another teacher. Sets written before that fingerprint was recorded are finished, and their
    cached outputs used, only for the same teacher spec and weights file (same file fingerprint);
    otherwise distillation warns and computes the teacher's outputs itself. Sampling (``fast``,
    default True; ``--no-fast``): the fast path, :class:`ppap_fast.fast_sampling.FastGuidedSampler`
    unguided (the fused update; on CUDA also CUDA graphs, one graph per micro-batch shape, and
    ``fast_sampling.recommended_options``: ADM's fused GroupNorm + SiLU in channels_last), or the reference
    :func:`ppap_fast.sampling.sample_loop`. Both draw the same random numbers in the same order,
    so their images agree up to float rounding (uint8 equal but for rare one-level flips,
    tested); the choice is part of the configuration (sets written before the option existed
    are reference sets: finish them with ``--no-fast``). Non-finite samples are an error, not
    pixels. Shard ``k`` is a pure function of ``(config, k)``: its x_T comes from
    ``torch.Generator().manual_seed(seed * 1_000_003 + k)`` on the CPU, the sampler noise of its
    sample ``j`` (DDPM, or eta > 0) from a generator of its own (``seeding.sample_seed(seed, k, j)``),
    so the micro-batch size (``--batch-size``) changes no image beyond float rounding and may change
    between restarts (sets written before this drew the noise from the shard's generator in
    micro-batch order: they are finished that way, with their batch size). Every
    file is written under a temporary name and renamed into place (``os.replace``), so after a
    crash or a ``kill -9`` a shard either exists completely or not at all. A restart (with any
    world size) skips complete shards, regenerates missing or damaged ones, removes stale
    temporary files, and ends with exactly ``num_images`` images: nothing lost, nothing
    duplicated, the same images an uninterrupted run writes. Only rank 0 writes the manifest,
    which records the configuration and its hash (a rerun on a finished set leaves it as it is: its
    hash identifies the set to distillation); restarting into a directory written with
    another configuration is an error naming the differing keys. All ranks must see the same
    output directory (a shared filesystem across nodes; checked before any shard, :func:`check_shared_dir`). Rank 0 scans the shards (npz headers
    only) and the missing ones are dealt round-robin to the ranks: ``k % world_size`` on a fresh
    run, balanced over what is left on a resume.

Distillation (:func:`distill`)
    :class:`torch.nn.parallel.DistributedDataParallel` over the ExpertBank; only the stacked
    per-expert tensors train (the frozen shared backbone has no gradients, so it costs no
    communication). Each rank draws its own batches, timesteps, noise and dropout masks (seeded by
    rank), DDP averages the gradients, so the parameters stay identical on all ranks (checked at the
    end: a divergence is an error). The global batch is ``batch_size * world_size``.

    Losses (:mod:`ppap_fast.distill`), chosen from the teacher's task, ``--loss`` overrides (the
    choice is part of the configuration identity): ``kl`` for classifiers (KL to the teacher's
    softmax at temperature 0.25), ``pixel_kl`` for segmentation (the same per pixel, mean over
    pixels), ``mse`` for depth / any dense regression. Reduction (``--loss-reduction``, part of the
    identity): ``expert_mean`` (default) weights each sample by world_size / n_e (n_e: its expert's
    samples on all ranks, all-reduced counts), so after DDP's average each expert's gradient is
    that of the mean loss over its own samples, as when trained separately, and
    :class:`ppap_fast.experts.ExpertAdamW` steps it with its own step count; ``batch_mean`` scales
    it by n_e / B instead, stepped by torch.optim.AdamW (one shared count). Teachers: ``tiny:<file>``, a
    registry name (its spec gives the task), or ``py:package.module:factory`` for any module,
    e.g. a depth network (task from ``--teacher-task`` or the factory's ``task`` attribute; see
    :func:`build_teacher`). Data: the set is read lazily (:class:`ppap_fast.data.ShardSet`):
    each step reads only its batch's rows (images and targets) from the shard files, so memory
    does not grow with the set (500k images at 256x256 are 98 GB, their DeepLabV3 targets
    1.3 TB); the batches are the same as when the set was read into memory (same generator
    draws, same values). Targets: the set's cached outputs when present; otherwise the
    teacher's outputs are computed ONCE before training, split over the ranks by shard, and
    kept on disk in ``<out>/teacher_targets/`` (:func:`compute_targets`; dense ones rounded to
    float16 like the cache), never inside the training loop; a restart reuses them, and they
    are removed once the experts are written. A target shape that does not match the
    student's output is an error naming both. The recorded loss of a step is the batch mean (with
    either reduction), averaged over ranks; a non-finite one stops every rank at that step, and so does a
    rank whose batch or forward raised (an error flag in the step's all-reduce of the expert counts).

    Resume (``--checkpoint-every n``): every n steps rank 0 gathers each rank's buffers (its
    local BatchNorm statistics) and RNG states (data stream, torch CPU, CUDA) and writes
    ``<out>/train_state.safetensors`` atomically (``data.shards.save_safetensors_atomic``): the
    trained per-expert tensors, the AdamW state, the step, the losses so far, the configuration
    and its hash (which includes the world size). A restart with the same arguments resumes
    from it and reproduces the uninterrupted run: every input of a step is restored, so the
    result is bit-identical with gloo on 2 ranks (tested; a + b is commutative). With more
    ranks or NCCL, the first resumed step's gradient all-reduce may sum in another order (DDP
    rebuilds its buckets), so expect float rounding differences there. A state written with
    another configuration is an error naming the differing keys; a damaged one, or an expert_mean
    state written before ExpertAdamW (one shared step count), is an error (remove it to start over). ``train_summary.json`` lists every step's loss exactly once;
    the state file is deleted once the experts are written.

    BatchNorm policy (per-expert BN, :class:`ppap_fast.experts.ExpertBatchNorm`):
      * batch statistics are LOCAL: each rank normalises each expert's samples with the
        statistics of that expert's samples on that rank (as DDP without SyncBatchNorm does).
        With N experts, per-rank batch b, each expert sees about b / N samples per rank: keep
        b / N large enough (>= 16 or so) for stable statistics;
      * running statistics are NOT broadcast during training (``forward_sync_buffers=False``:
        DDP's default would overwrite every rank's statistics with rank 0's at every forward);
        each rank accumulates its own, and at checkpoint time :func:`sync_expert_batchnorm_stats`
        merges them with an all_reduce: ``mean = avg_r mean_r``,
        ``var = avg_r (var_r + mean_r^2) - mean^2`` (the law of total variance: the pooled
        variance of equally weighted ranks), ``num_batches_tracked = max_r``; the averages are over
        the ranks that saw the expert (``num_batches_tracked_r > 0``: the others hold the teacher's). After that every
        rank holds the same statistics and rank 0 writes the checkpoint
        (:func:`ppap_fast.experts.save_experts` format).

Configuration agreement: each rank hashes its configuration (all arguments that change the
result, plus fingerprints of the weight files it reads; for distill also ``--checkpoint-every`` and
``--verify-data``, which decide its collectives) and the hashes are all-gathered before any work;
ranks that disagree raise :class:`ConfigMismatchError` naming the ranks and keys.

Test hooks (environment): ``PPAP_FAST_TEST_KILL_AFTER_SHARDS=n`` makes rank
``PPAP_FAST_TEST_KILL_RANK`` (default 0) SIGKILL itself right after writing its n-th shard,
``PPAP_FAST_TEST_KILL_AFTER_STEPS=n`` right after its n-th distillation step (after that
step's training state, if any, is written); with ``PPAP_FAST_TEST_KILL_SCOPE=group`` it
SIGKILLs its whole process group instead (the launcher and every worker: only use it on a
launcher started in its own session), with ``raise`` it raises :class:`SimulatedCrash`
(in-process tests).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .data.shards import shard_is_complete
from .experts.checkpoint import check_experts_dir, check_output_dir
from .progress import BarLoss
from .seeding import PerSampleNoise

MANIFEST = "manifest.json"
SEED_STRIDE = 1_000_003
STEP_NOISE_RULES = ("per_sample", "shard_stream")
FORMAT = "ppap_fast.datafree"
# How dense softmax targets (pixel_kl: segmentation logits) are stored: float16 logits minus their
# per-pixel max over the class dim 1 (the softmax is unchanged; values <= 0 round far less at the
# top classes). Recorded as "targets_encoding" (absent: raw float16 outputs, as in older sets).
MAX_SUBTRACTED = "float16_logits_minus_class_max"
# The encoding of pixel_kl targets read from an older set (no targets_encoding): raw float16 logits.
# Named in a pixel_kl run's training-state identity only (sets never record it).
RAW_FLOAT16 = "raw_float16_logits"


class ConfigMismatchError(RuntimeError):
    """Ranks were started with different configurations."""


class DistributedRunError(RuntimeError):
    """A rank failed a check; every rank raises this together (no rank is left waiting)."""


# ----------------------------------------------------------------------------- process group
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def _device_for(kind: str, local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def launch_env_vars() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment, checked: a bad value is one ValueError line (a rank
    outside the world waited for peers until --timeout, RANK without WORLD_SIZE ran one rank alone and crashed)."""
    def read(name: str, default: int | None) -> int | None:
        text = os.environ.get(name, "").strip()
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer; set it to one (torchrun does) "
                             "or unset it to run one process") from None

    world, rank = read("WORLD_SIZE", None), read("RANK", None)
    if world is None and rank not in (None, 0):
        raise ValueError(f"RANK={rank} but WORLD_SIZE is not set: set both (torchrun does) or unset RANK to run one process")
    world = 1 if world is None else world
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1")
    if rank is None:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} but RANK is not set: set both (torchrun does) or unset WORLD_SIZE")
        rank = 0
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world} (ranks are 0 to {world - 1}): fix RANK or WORLD_SIZE")
    local = read("LOCAL_RANK", rank)
    if local < 0:
        raise ValueError(f"LOCAL_RANK={local} must be >= 0")
    return rank, world, local


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun (or :func:`launch`) describes in the environment
    (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT); a single process without
    those variables runs alone (no process group). Backend: NCCL on CUDA, gloo on CPU."""
    rank, world, local = launch_env_vars()
    if world > 1 and not dist.is_initialized():
        unset = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if unset:
            raise ValueError(f"WORLD_SIZE={world} but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not "
                             "set: start the ranks with torchrun (or --nproc), or set MASTER_ADDR and MASTER_PORT")
    dev = _device_for(device, local)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        if dist.get_world_size() != world or dist.get_rank() != rank:
            world, rank = dist.get_world_size(), dist.get_rank()
    return DistEnv(rank, world, local, dev, backend)


def _gather(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _device_types_differ(env: DistEnv, verb: str) -> str | None:
    """Collective: on rank 0, the error message when the ranks run on different device types (``verb``: what
    they do there), else None."""
    types = _gather(env.device.type, env)
    if env.rank == 0 and len(set(types)) > 1:
        listed = ", ".join(f"rank {r}: {t}" for r, t in enumerate(types))
        return f"the ranks {verb} on different device types ({listed}); start every rank with the same --device"
    return None


def raise_if_any(error: str | None, env: DistEnv, what: str = "check") -> None:
    """Collective: every rank raises DistributedRunError if ANY rank passes an error message
    (also a barrier). Use it where one rank checks something the others wait on."""
    errs = _gather(error, env)
    bad = [(r, e) for r, e in enumerate(errs) if e]
    if bad:
        raise DistributedRunError(f"{what} failed on rank(s) {[r for r, _ in bad]}: "
                                  + "; ".join(f"rank {r}: {e}" for r, e in bad))


def collectively(fn, env: DistEnv, what: str):
    """``fn()`` on every rank; an exception on any rank is an error on all of them (the others would
    otherwise wait in the next collective until its timeout). Alone, the exception is raised as it is."""
    try:
        out, err = fn(), None
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        if not env.distributed:
            raise
        out, err = None, f"{type(e).__name__}: {e}"
    raise_if_any(err, env, what)
    return out


def check_shared_dir(path, env: DistEnv, flag: str) -> str | None:
    """Collective, once: every rank must see the folder ``path`` that rank 0 writes into (a shared filesystem).
    Rank 0 writes a file with a random name and content there, every rank reads it back; a rank that cannot
    (a node-local path on another node) fails every rank now, not after its share of the work. Returns the
    random content (this run's nonce, the same on every rank; None alone)."""
    if not env.distributed:
        return None
    path = Path(path)
    token = mine = None
    if env.rank == 0:
        nonce = os.urandom(8).hex()
        token = path / f".ppap_shared_check.{nonce}.tmp"  # a stale-temporary name: a restart removes it
        try:
            token.write_text(nonce, encoding="utf-8")
            mine = (token.name, nonce, None)
        except OSError as e:
            mine = (None, None, f"{type(e).__name__}: {e}")
    try:
        name, nonce, err = _gather(mine, env)[0]
        raise_if_any(err and f"rank 0 cannot write into {flag} {path}: {err}", env, f"shared {flag} check")
        try:
            seen = (path / name).read_text(encoding="utf-8")
        except OSError as e:
            seen = f"{type(e).__name__}: {e}"
        raise_if_any(None if seen == nonce else
                     f"{flag} {path}: this rank does not see the file {name} rank 0 just wrote there ({seen}); every "
                     f"rank must see the same {flag} folder (a filesystem shared across nodes, not a node-local path)",
                     env, f"shared {flag} check")
    finally:
        if token is not None:
            token.unlink(missing_ok=True)
    return nonce


class StopMarker:
    """A file in a shared folder by which a rank whose share of the work failed stops the others at their next
    item (they check it between items, one stat each), so that every rank soon meets in the barrier that reports
    the error: waiting there alone, the failed rank kept the others working through their whole share (or until
    --timeout). Its name carries the run's nonce (:func:`check_shared_dir`) and ends in .tmp (a restart removes it)."""

    def __init__(self, folder, nonce: str | None, env: DistEnv):
        self.path = Path(folder) / f".ppap_failed.{nonce}.tmp" if nonce else None
        self.env = env

    def seen(self) -> bool:
        return self.path is not None and self.path.exists()

    def set(self, err: str) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.write_text(err, encoding="utf-8")

    def report(self, err: str | None, what: str) -> None:
        """raise_if_any(err) on every rank; rank 0 removes the marker."""
        try:
            raise_if_any(err, self.env, what)
        finally:
            if self.env.rank == 0 and self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink(missing_ok=True)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(config: dict, env: DistEnv) -> str:
    """All-gather every rank's config hash; ConfigMismatchError (on every rank) if they differ."""
    h = config_hash(config)
    got = _gather((h, config), env)
    if any(g[0] != h for g in got):
        ref = got[0][1]
        lines = []
        for r, (hr, cr) in enumerate(got):
            if hr == got[0][0]:
                continue
            keys = sorted(k for k in set(ref) | set(cr) if ref.get(k) != cr.get(k))
            lines.append(f"rank {r} (hash {hr[:12]}) differs from rank 0 (hash {got[0][0][:12]}) in "
                         + ", ".join(f"{k}: {cr.get(k)!r} vs {ref.get(k)!r}" for k in keys))
        raise ConfigMismatchError("ranks were started with different configurations: " + "; ".join(lines))
    return h


# identity keys that are hashes: named with what to change instead of two hashes
_HASHED_KEYS = {
    "data_manifest": "another data set: --data",
    "teacher_state": "other teacher weights: --weights-dir, or --teacher / --teacher-weights",
    "teacher_fingerprint": "other teacher weights: --teacher / --teacher-weights",
    "base_state": "another base classifier: --weights-dir",
}


def _config_diff(theirs: dict, mine: dict) -> str:
    """The keys where a stored configuration differs from this one, for error messages."""
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    return ", ".join(f"{k} ({_HASHED_KEYS[k]})" if k in _HASHED_KEYS and k in mine and k in theirs
                     else f"{k}: {theirs.get(k)!r} there vs {mine.get(k)!r} now" for k in keys)


def file_fingerprint(path) -> str | None:
    """size + sha256 of the first and last MiB: cheap identity of a (possibly huge) weight file."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return f"missing:{p}"
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return f"{size}:{h.hexdigest()[:32]}"


def teacher_file_fingerprint(teacher: str | None, weights: str | None) -> str | None:
    """Fingerprint of the file a teacher's weights come from (a tiny: checkpoint, --teacher-weights);
    None without one (random init, a py: factory, registry weights that ship inside a package)."""
    if teacher and teacher.startswith("tiny:"):
        return file_fingerprint(teacher[5:])
    return file_fingerprint(weights)


def legacy_teacher_match(theirs: dict, ours: dict) -> bool:
    """A manifest written before generation recorded ``teacher_state`` (the teacher's weights) is
    taken as this teacher's only when its spec and a weights-file fingerprint match (with no file,
    nothing proves which weights computed the cached outputs)."""
    return (bool(ours.get("teacher")) and "teacher_state" not in theirs and theirs.get("teacher") == ours.get("teacher")
            and theirs.get("teacher_fingerprint") is not None
            and theirs.get("teacher_fingerprint") == ours.get("teacher_fingerprint"))


def tensors_fingerprint(tensors) -> str:
    h = hashlib.sha256()
    for k, v in tensors:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """tensors_fingerprint of a module's state dict (sorted by name): which weights it holds."""
    return tensors_fingerprint(sorted(module.state_dict().items()))


def teacher_fingerprint(model: nn.Module, transform=None) -> str:
    """module_fingerprint of a teacher; with its input normalisation where that is not ImageNet's (a timm
    config.json's beside the weights), and with normalisation and input size where the size is not 224x224 or
    the image's own (a registered spec's), or where a resize's antialias is not "auto": the same weights
    normalised or resized otherwise give other outputs."""
    from .guidance import IMAGENET_MEAN, IMAGENET_STD

    fp = module_fingerprint(model)
    mean = std = None
    if getattr(transform, "mean", None) is not None:
        mean, std = tuple(transform.mean.flatten().tolist()), tuple(transform.std.flatten().tolist())
    size = getattr(transform, "size", None)
    antialias = getattr(transform, "antialias", "auto")
    if size is not None and antialias != "auto":  # "auto" is left out: existing sets' fingerprints hold
        return hashlib.sha256(f"{fp}|mean={mean}|std={std}|size={size[0]}x{size[1]}|antialias={antialias}"
                              .encode()).hexdigest()
    if size is not None and tuple(size) != (224, 224):
        return hashlib.sha256(f"{fp}|mean={mean}|std={std}|size={size[0]}x{size[1]}".encode()).hexdigest()
    if mean is None or (mean, std) == (IMAGENET_MEAN, IMAGENET_STD):  # as before: existing sets' fingerprints hold
        return fp
    return hashlib.sha256(f"{fp}|mean={mean}|std={std}".encode()).hexdigest()


# ----------------------------------------------------------------------------- models from specs
class RandomConvDenoiser(nn.Module):
    """A tiny deterministic eps model for smoke tests and CI (no weights needed)."""

    def __init__(self, channels: int = 1, width: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(channels + 1, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return x + 0.5 * self.c2(torch.tanh(self.c1(torch.cat([x, tt], 1))))  # eps ~ x: unsaturated samples


def build_denoiser(spec: str, checkpoint=None, channels: int = 3, device_type: str = "cuda",
                   schedule: str | None = None, num_timesteps: int | None = None,
                   sampler: str | None = None) -> nn.Module:
    """``adm:<preset>`` (guided-diffusion checkpoint, strict; its fp16 torso only on CUDA),
    ``tiny`` (a ppap_fast tiny UNet safetensors file), ``diffusers:PATH`` (a UNet2DModel or a pipeline
    saved with save_pretrained; with ``schedule``, its scheduler config is checked against it and
    ``sampler``: a learned variance is refused unless "ddim"),
    ``random-conv`` (smoke tests)."""
    if spec.startswith("diffusers:"):
        from .integrations import diffusers_models

        if checkpoint is not None:
            raise ValueError(f"denoiser {spec!r} reads its weights from its folder: drop --checkpoint")
        if schedule is not None:
            diffusers_models.check_schedule(spec[10:], schedule, num_timesteps, sampler)
        return diffusers_models.load_denoiser(spec[10:])
    if spec.startswith("adm:"):
        from .models.adm import ADMUNet, check_preset_schedule

        if schedule is not None:  # as diffusers:PATH's scheduler config: sampled on another schedule silently
            check_preset_schedule(spec[4:], schedule, num_timesteps)
        if checkpoint is None:
            raise ValueError(f"denoiser {spec!r} needs --checkpoint (the guided-diffusion .pt file)")
        over = {} if device_type == "cuda" else {"use_fp16": False}
        return ADMUNet.from_checkpoint(checkpoint, spec[4:], **over)
    if spec == "tiny":
        from .models.tiny import load_model

        if checkpoint is None:
            raise ValueError("denoiser 'tiny' needs --checkpoint (a tiny UNet safetensors file)")
        return load_model(checkpoint, kind="unet")
    if spec == "random-conv":
        if checkpoint is not None:  # it was ignored silently: the run sampled with the random weights
            raise ValueError(f"denoiser 'random-conv' has no weights to load: drop --checkpoint ({checkpoint})")
        return RandomConvDenoiser(channels)
    raise ValueError(f"unknown denoiser {spec!r}: expected adm:<preset>, tiny, diffusers:PATH or random-conv")


def denoiser_var_type(spec: str, sampler: str | None) -> str | None:
    """The DDPM variance a ``diffusers:PATH`` denoiser's scheduler config names (fixed_small / fixed_large,
    C-channel UNets, sampler "ddpm"), else None: the sampler's default."""
    if not spec.startswith("diffusers:"):
        return None
    from .integrations import diffusers_models

    return diffusers_models.scheduler_var_type(spec[10:], sampler)


def denoiser_clip(spec: str, fast: bool = False) -> float | None:
    """The bound the samplers clip the predicted x0 to for ``spec``: a ``diffusers:PATH`` scheduler config's
    clip_sample_range (None: clip_sample=False), else 1.0. The fast sampler's fused update clips to 1 only."""
    if not spec.startswith("diffusers:"):
        return 1.0
    from .integrations import diffusers_models

    clip = diffusers_models.scheduler_clip_range(spec[10:])
    if fast and clip not in (None, 1.0):
        raise ValueError(f"denoiser {spec!r}: its scheduler config clips x0 to [-{clip}, {clip}] "
                         "(clip_sample_range), the fast sampler to [-1, 1] only: sample with --no-fast")
    return clip


def clip_options(clip: float | None) -> dict:
    """sample_loop's clip_denoised / denoised_fn clipping x0 to [-clip, clip] (None: no clipping)."""
    if clip is None or clip == 1.0:
        return {"clip_denoised": clip is not None}
    return {"clip_denoised": False, "denoised_fn": lambda x0: x0.clamp(-clip, clip)}


class BuiltTeacher(NamedTuple):
    model: nn.Module                 # eval mode, frozen
    transform: nn.Module | None      # [-1, 1] images -> the model's input (None: the model takes them as is)
    placement: Callable              # placement(r=, alpha=, layout=) -> Placement
    task: str | None                 # "classification" | "segmentation" | "depth" | "regression" | None (unknown)
    arch: str                        # recorded in expert checkpoints


TEACHER_TASKS = ("classification", "segmentation", "depth", "regression")


def _py_factory(spec: str):
    target = spec[3:]
    mod_name, sep, fn_name = target.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"teacher {spec!r}: expected py:package.module:factory")
    import importlib

    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"teacher {spec!r}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH on every "
                         "rank?") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"teacher {spec!r}: {mod_name} has no callable {fn_name!r}")
    return fn


def build_teacher(spec: str, weights=None, task: str | None = None) -> BuiltTeacher:
    """Build the frozen teacher (eval mode) named by ``spec``:

    * ``tiny:<path>``: a ppap_fast tiny classifier ("resnet" placement) or stroke segmentation net
      ("generic", task segmentation) file, taking [-1, 1] directly (``weights`` must be None: the file holds them);
    * a name of :mod:`ppap_fast.models.registry` (``resnet50``, ``deit_s``, ``deeplabv3_resnet50``,
      ...) with ``weights`` (None: random init); its spec gives the task and the input transform;
    * ``py:package.module:factory``: any module, e.g. a depth network: ``factory()`` (or
      ``factory(weights=path)`` when ``weights`` is given) must return an nn.Module mapping images
      in [-1, 1] ([B, C, H, W]) to its output (put any normalisation / resizing inside it); the
      "generic" placement rule (LoRA on every conv / linear, per-expert biases and norms); the task
      is ``task``, else the factory's or the module's ``task`` attribute.

    ``task`` overrides the task; random initialisations are seeded (0) inside a forked RNG, so
    generation and distillation build the same teacher and the caller's RNG is untouched.
    """
    from .experts.placement import make_placement

    if task is not None and task not in TEACHER_TASKS:
        raise ValueError(f"unknown teacher task {task!r}; expected one of {list(TEACHER_TASKS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.startswith("tiny:"):
            if weights is not None:  # the file's own weights were used, the ones given ignored silently
                raise ValueError(f"teacher {spec!r} holds its own weights (the file after 'tiny:'); the weights "
                                 f"given ({weights}) would be ignored: drop them, or name that file in tiny:<file>")
            from .distill import TINY_TEACHERS, tiny_teacher_kind
            from .models.tiny import load_model

            model = load_model(spec[5:]).eval()
            rule, tiny_task = TINY_TEACHERS[tiny_teacher_kind(model, f"teacher {spec!r}")]
            return BuiltTeacher(model, None, lambda **kw: make_placement(rule, model, **kw), task or tiny_task,
                                "tiny")
        if spec.startswith("py:"):
            fn = _py_factory(spec)
            model = fn() if weights is None else fn(weights=weights)
            if not isinstance(model, nn.Module):
                raise TypeError(f"teacher {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
            task = task or getattr(fn, "task", None) or getattr(model, "task", None)
            if task is not None and task not in TEACHER_TASKS:
                raise ValueError(f"teacher {spec!r} declares task {task!r}; expected one of {list(TEACHER_TASKS)}")
            model.eval().requires_grad_(False)
            return BuiltTeacher(model, None, lambda **kw: make_placement("generic", model, **kw), task, spec)
        from .models.registry import build_guide_model

        gm = build_guide_model(spec, weights=weights)
    return BuiltTeacher(gm.model, gm.transform, gm.placement, task or gm.spec.task, spec.split(":")[0])


def teacher_output(model: nn.Module, transform, x: torch.Tensor, t=None) -> torch.Tensor:
    """The model's main output on ``x`` (read as the guides read it: ``['out']`` / ``.logits`` /
    ``.predicted_depth`` of dict or ModelOutput outputs), float32.
    With ``t`` the model is an ExpertBank called as ``model(x, t)``."""
    from .guidance import _primary

    h = transform(x) if transform is not None else x
    return _primary(model(h) if t is None else model(h, t), ("out", "logits", "predicted_depth"), "teacher").float()


@torch.no_grad()
def teacher_targets(model: nn.Module, transform, images_u8: np.ndarray, batch_size: int, device,
                    softmax_targets: bool = False) -> torch.Tensor:
    """Teacher outputs on the dequantised clean images, in the dtype shards store them: [N, K]
    logits float32 (classifiers), anything with spatial dims float16 (see the module docstring);
    ``softmax_targets`` (dense logits for a softmax loss: pixel_kl): minus their max over dim 1
    first (``MAX_SUBTRACTED``). Non-finite outputs (including float16 overflow past 65504) are a ValueError."""
    from .data import from_uint8

    out = []
    for i in range(0, images_u8.shape[0], batch_size):
        y = teacher_output(model, transform, from_uint8(images_u8[i:i + batch_size]).to(device))
        if y.dim() > 2 and softmax_targets:
            y = y - y.amax(dim=1, keepdim=True)
        out.append(y.cpu() if y.dim() == 2 else y.cpu().half())
    y = torch.cat(out)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"teacher outputs {tuple(y.shape)} ({y.dtype}) are not all finite"
                         + (" (float16 overflows past 65504)" if y.dtype == torch.float16 else ""))
    return y


# ----------------------------------------------------------------------------- generation
@dataclass
class GenerateConfig:
    out_dir: str
    num_images: int
    shard_size: int = 250
    batch_size: int = 0                 # micro-batch inside a shard (0: the whole shard)
    seed: int = 0
    image_size: int = 256
    channels: int = 3
    denoiser: str = "adm:256x256_diffusion_uncond"
    checkpoint: str | None = None
    schedule: str = "linear"
    num_timesteps: int = 1000
    respacing: str = "ddim25"
    sampler: str = "ddim"
    eta: float = 0.0
    teacher: str | None = None
    teacher_weights: str | None = None
    device: str = "auto"
    fast: bool = True                   # FastGuidedSampler (fused update; on CUDA + CUDA graphs, fast_sampling.recommended_options)
    step_noise: str = "per_sample"      # sampler noise (ddpm, eta > 0): "per_sample" | "shard_stream" (sets written before it)

    def __post_init__(self):
        if self.step_noise not in STEP_NOISE_RULES:
            raise ValueError(f"step_noise must be one of {sorted(STEP_NOISE_RULES)}, got {self.step_noise!r}")

    @property
    def needs_noise(self) -> bool:
        return self.sampler == "ddpm" or self.eta > 0

    def identity(self) -> dict:
        """What determines the images (hashed and compared across ranks and restarts). ``fast``
        is part of it (the two paths round differently); absent when False, so sets written
        before the field existed (reference path) keep their hash. The micro-batch size is not
        (nor the device: rounding only; the manifest records it beside the identity), except for "shard_stream" sets, whose one noise stream
        per shard was consumed micro-batch after micro-batch; their identity is the one they were
        written with."""
        d = dataclasses.asdict(self)
        d.pop("device")
        d.pop("out_dir")  # where the set lives does not change its images (a moved set still resumes)
        if not self.fast:
            d.pop("fast")
        if d.pop("step_noise") == "per_sample":
            d.pop("batch_size")
            if self.needs_noise:
                d["step_noise"] = "per_sample"
        d["checkpoint_fingerprint"] = file_fingerprint(self.checkpoint)
        if self.denoiser.startswith("diffusers:"):  # the weights live in the spec's folder (absent for others: old hashes hold)
            from .integrations.diffusers_models import weights_fingerprint

            d["denoiser_fingerprint"] = weights_fingerprint(self.denoiser[10:])
            if denoiser_var_type(self.denoiser, self.sampler) == "fixed_small":  # not the default: other images
                d["var_type"] = "fixed_small"
            if denoiser_clip(self.denoiser) != 1.0:  # clip_sample=False or another clip_sample_range
                d["clip_x0"] = denoiser_clip(self.denoiser)
        d["teacher_fingerprint"] = teacher_file_fingerprint(self.teacher, self.teacher_weights)
        d["format"] = FORMAT
        return d


def shard_seed(seed: int, k: int) -> int:
    return seed * SEED_STRIDE + k


def _set_step_noise(cfg: GenerateConfig) -> GenerateConfig:
    """The noise rule of the set in ``cfg.out_dir``: one written before per-sample noise (its
    manifest's configuration holds the micro-batch size) is finished with the shard stream it
    was started with; a new or per-sample set keeps ``cfg``'s."""
    try:
        old = json.loads((Path(cfg.out_dir) / MANIFEST).read_text(encoding="utf-8"))
        theirs = old.get("config", {})
    except (OSError, ValueError, AttributeError):
        return cfg  # none (or unreadable: _prepare_dir says so)
    if _nothing_written(Path(cfg.out_dir), old):
        return cfg
    if isinstance(theirs, dict) and "batch_size" in theirs and cfg.step_noise == "per_sample":
        return dataclasses.replace(cfg, step_noise="shard_stream")
    return cfg


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.npz"


def _manifest(cfg: GenerateConfig, ident: dict, h: str, world: int, complete: bool,
              device_type: str | None = None) -> dict:
    """``device_type``: what the shards were sampled on, beside the identity (not in its hash); None: unknown
    (a set begun before the record), left out."""
    n_shards = -(-cfg.num_images // cfg.shard_size)
    return {"kind": "datafree", "format": FORMAT, "num_images": cfg.num_images, "shard_size": cfg.shard_size,
            "num_shards": n_shards, "complete": complete, "shards": [_shard_name(k) for k in range(n_shards)],
            "config": ident, "config_hash": h, "world_size": world,
            **({} if device_type is None else {"device_type": device_type}),
            "shard_rule": "shard k: x_T ~ torch.Generator().manual_seed(seed * 1000003 + k)" + (
                ", sampler noise from the same generator, micro-batch after micro-batch"
                if cfg.step_noise == "shard_stream" else
                "; sampler noise of its sample j ~ torch.Generator().manual_seed(ppap_fast.seeding.sample_seed(seed, k, j))"),
            "seed": cfg.seed, "respacing": cfg.respacing}


def _nothing_written(out: Path, manifest: dict) -> bool:
    """An unfinished set without a single shard: a run that failed before its first shard (a typo in
    its arguments, a missing checkpoint). Nothing to keep, so another configuration may start afresh."""
    return manifest.get("complete") is False and not any(out.glob("shard_*.npz"))


def _prepare_dir(cfg: GenerateConfig, ident: dict, h: str, world: int, count_of,
                 device_type: str = "cpu") -> tuple[list, list, bool, str | None]:
    """Rank 0: check an existing manifest, remove stale temporary files, scan the shards, mark the set incomplete.
    Returns (stale names removed, shards to write, whether a finished set's manifest was kept as it is, the device
    type to record). A set with shards missing resumes only on the device type it records (devices round
    differently); a finished set is only read, and one from before the record resumes anywhere."""
    from .data.shards import write_json_atomic
    from .distill import _recorded_device_type

    out = check_output_dir(cfg.out_dir, "--out")  # mkdir said only "[Errno 17] File exists"
    if out.is_dir():  # as the CLI's generate: shards and a manifest were written among other files
        from .cli import _check_set_folder
        from .demo import DemoError

        try:
            _check_set_folder(out)
        except DemoError as e:
            raise ValueError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    m = out / MANIFEST
    old = None
    if m.exists():
        from .data.shards import read_existing_manifest

        old = read_existing_manifest(m)  # on rank 0: a bad one is one line (the others wait for its error)
        if old.get("format") != FORMAT:
            raise ValueError(f"{out} holds a shard set not written by ppap_fast.distributed "
                             f"(format={old.get('format')!r}); use another directory")
        theirs = old.get("config", {})
        if not isinstance(theirs, dict):
            raise ValueError(f"{m} is damaged (its 'config' is a JSON {type(theirs).__name__}, not an object); "
                             "remove it or use another directory")
        if "out_dir" in theirs:  # written when the path was part of the identity
            theirs = {k: v for k, v in theirs.items() if k != "out_dir"}
        legacy = {k: v for k, v in ident.items() if k != "teacher_state"}
        if config_hash(theirs) != h and not (theirs == legacy and legacy_teacher_match(theirs, ident)) \
                and not _nothing_written(out, old):
            hint = ("; it was sampled on the reference path: finish it with --no-fast (fast=False)"
                    if theirs.get("fast") != ident.get("fast") and not theirs.get("fast") else "")
            if theirs.get("targets_encoding") != ident.get("targets_encoding"):
                hint += ("; its cached teacher targets are stored another way (targets_encoding "
                         f"{theirs.get('targets_encoding', 'raw float16, an older version')!r}), and a set holds one "
                         "encoding only: distil from it as it is, or generate the rest into another directory")
            if theirs.get("denoiser_fp16") != ident.get("denoiser_fp16"):
                cuda = "denoiser_fp16" not in theirs
                hint += (f"; it was sampled on {'CUDA (the ADM float16 torso)' if cuda else 'the CPU (float32 torso)'}"
                         f": finish it with --device {'cuda' if cuda else 'cpu'}, or generate into another directory")
            if "batch_size" in theirs and theirs["batch_size"] != ident.get("batch_size"):
                hint += ("; it was written before per-sample sampler noise" + (
                    ", so its images depend on the micro-batch size" if cfg.needs_noise else
                    " and records its micro-batch size") + ": finish it with its --batch-size")
            raise ValueError(f"{out} holds a shard set made with another configuration (differs in "
                             f"{_config_diff(theirs, ident)}); use another directory or the same arguments"
                             + hint)
    stale = [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    n_shards = -(-cfg.num_images // cfg.shard_size)
    todo = [k for k in range(n_shards) if not shard_is_complete(out / _shard_name(k), count_of(k))]
    recorded = _recorded_device_type(out)
    if recorded not in (None, device_type) and todo:
        raise ValueError(f"{out} holds shards sampled on {recorded!r}, not {device_type!r}: a mix would match no "
                         f"uninterrupted run; finish it with --device {recorded}, or use another directory")
    unknown = recorded is None and old is not None and not _nothing_written(out, old)  # shards from before the record
    to_record = None if unknown else recorded or device_type
    # a finished set with nothing to write keeps its manifest byte for byte: its hash is the set's identity
    # (distill's data_manifest), and a rerun with another world size changed it (a distill resume was refused)
    keep = old is not None and not todo and old.get("complete") is True and old.get("config_hash") == h
    if not keep:
        write_json_atomic(m, _manifest(cfg, ident, h, world, complete=False, device_type=to_record))
    return [p.name for p in stale], todo, keep, to_record


class SimulatedCrash(BaseException):
    """Raised by the test kill hooks with ``PPAP_FAST_TEST_KILL_SCOPE=raise`` (in-process tests)."""


def _kill_hook(rank: int, done: int, var: str = "PPAP_FAST_TEST_KILL_AFTER_SHARDS") -> None:
    n = os.environ.get(var)
    if not n or done != int(n) or rank != int(os.environ.get("PPAP_FAST_TEST_KILL_RANK", "0")):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    scope = os.environ.get("PPAP_FAST_TEST_KILL_SCOPE", "self")
    if scope == "raise":
        raise SimulatedCrash(f"{var}={n} on rank {rank}")
    if scope == "group":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _generation_teacher(cfg: GenerateConfig) -> tuple:
    """(model, transform, task) of the teacher whose outputs generation caches, or three Nones."""
    if not cfg.teacher:
        return None, None, None
    b = build_teacher(cfg.teacher, cfg.teacher_weights)
    return b.model, b.transform, b.task


def _adm_fp32_torso(denoiser: str, device_type: str) -> bool:
    """An adm: preset with an fp16 torso that build_denoiser builds in fp32 (off CUDA)."""
    from .models.adm import ADM_PRESETS

    return device_type != "cuda" and denoiser.startswith("adm:") and bool(ADM_PRESETS.get(denoiser[4:], {}).get("use_fp16"))


def generate(cfg: GenerateConfig, env: DistEnv | None = None, progress: bool = False) -> dict:
    """Write (or complete) the data-free set ``cfg.out_dir`` with all ranks of ``env``.

    Returns this rank's summary: shards written now, shards it found complete, the config hash.
    """
    from .data import to_uint8
    from .data.shards import write_json_atomic, write_npz_atomic
    from .sampling import check_sampler_options, sample_loop
    from .schedule import Schedule

    env = env or init_distributed(cfg.device)
    if cfg.num_images <= 0 or cfg.shard_size <= 0 or cfg.batch_size < 0:
        raise ValueError("num_images and shard_size must be positive, batch_size >= 0")
    check_sampler_options(cfg.sampler, cfg.eta, None)  # before the manifest records them
    Schedule.create(cfg.schedule, cfg.num_timesteps, respacing=cfg.respacing)  # a bad --respacing fails here
    clip = denoiser_clip(cfg.denoiser, cfg.fast)  # a diffusers scheduler's clip_sample / clip_sample_range
    cfg = _set_step_noise(cfg)  # read by every rank before anyone rewrites the manifest (check_same_config)
    ident = cfg.identity()
    if _adm_fp32_torso(cfg.denoiser, env.device.type):  # its images differ from CUDA's (absent there: hashes hold)
        ident["denoiser_fp16"] = False
    # every rank takes part, teacher or not: ranks whose configurations differ still meet in check_same_config
    teacher, transform, task = collectively(lambda: _generation_teacher(cfg), env, "building the teacher")
    softmax_targets = task == "segmentation"
    if cfg.teacher:
        # the teacher's weights, whatever the spec (a py: factory, a random init): restarts and
        # distillation compare it before trusting cached outputs
        ident["teacher_state"] = teacher_fingerprint(teacher, transform)
    if softmax_targets:  # how the cached targets are stored: a set holds one encoding only
        ident["targets_encoding"] = MAX_SUBTRACTED
    h = check_same_config(ident, env)
    out = Path(cfg.out_dir)
    n_shards = -(-cfg.num_images // cfg.shard_size)

    def count_of(k):
        return min(cfg.shard_size, cfg.num_images - k * cfg.shard_size)

    device_type = env.device.type
    stale, todo, keep, recorded_type = [], None, False, None
    err = _device_types_differ(env, "sample")  # one set, two roundings
    if env.rank == 0 and err is None:
        try:
            stale, todo, keep, recorded_type = _prepare_dir(cfg, ident, h, env.world_size, count_of, device_type)
        except (ValueError, OSError) as e:
            err = str(e)
    raise_if_any(err, env, "output directory check")
    todo = _gather(todo, env)[0]  # rank 0's scan of the missing / damaged shards
    stop = StopMarker(out, check_shared_dir(out, env, "--out"), env)  # a node-local --out failed at the final check

    device = env.device

    def models_on_device():
        torch.manual_seed(cfg.seed)
        unet = build_denoiser(cfg.denoiser, cfg.checkpoint, cfg.channels, device.type, cfg.schedule,
                              cfg.num_timesteps, cfg.sampler).to(device).eval()
        if env.rank == 0:
            from .distill import warn_if_not_declared

            warn_if_not_declared(unet, cfg.channels, cfg.image_size)
        t = teacher.to(device).eval() if teacher is not None else None
        tr = transform.to(device) if transform is not None else None
        sched = Schedule.create(cfg.schedule, cfg.num_timesteps, respacing=cfg.respacing).to(device)
        fast = None
        if cfg.fast:  # one sampler for all shards (CUDA graphs are captured once per batch shape)
            from .fast_sampling import FastGuidedSampler, recommended_options

            fast = FastGuidedSampler(unet, sched, sampler=cfg.sampler, eta=cfg.eta, var_type=var_type,
                                     clip_denoised=clip is not None, cuda_graph=device.type == "cuda",
                                     **recommended_options(unet, device))
        return unet, t, tr, sched, fast

    var_type = denoiser_var_type(cfg.denoiser, cfg.sampler)  # a diffusers scheduler's fixed_small / fixed_large
    # a rank failing here (out of memory, a damaged file) left the others generating, then waiting for it
    unet, teacher, transform, sched, fast = collectively(models_on_device, env, "building the denoiser")

    def sample(x_T, noise_fn):
        if cfg.fast:  # same random numbers as the reference: x_T given, then noise_fn(i, x) per step
            return fast.sample(x_T, noise_fn=noise_fn)
        return sample_loop(unet, x_T, sched, sampler=cfg.sampler, eta=cfg.eta, var_type=var_type, noise_fn=noise_fn,
                           **clip_options(clip))

    # the missing shards are dealt round-robin (balanced on a resume, k % world_size on a fresh
    # run); a shard's content depends on k only, so who writes it does not matter
    mine = todo[env.rank::env.world_size]
    written = []
    skipped = sorted(set(range(n_shards)) - set(todo))
    it = mine
    if progress:
        from tqdm import tqdm
        it = tqdm(mine, desc=f"rank {env.rank} shards", unit="shard")

    def write_shard(k):
        count = count_of(k)
        g = torch.Generator().manual_seed(shard_seed(cfg.seed, k))
        x_T = torch.randn((count, cfg.channels, cfg.image_size, cfg.image_size), generator=g)
        bs = cfg.batch_size or count
        shard_noise = (lambda i, x: torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device))
        imgs = []
        for i in range(0, count, bs):
            noise_fn = shard_noise if cfg.step_noise == "shard_stream" else \
                PerSampleNoise((cfg.seed, k), range(i, min(i + bs, count))).noise_fn
            x0 = sample(x_T[i:i + bs].to(device), noise_fn)
            if not bool(torch.isfinite(x0).all()):  # to_uint8 would turn NaN into a plausible pixel
                raise ValueError(f"shard {k}: the sampler returned non-finite images (denoiser {cfg.denoiser!r})")
            imgs.append(to_uint8(x0))
        arrays = {"images": np.concatenate(imgs)}
        if teacher is not None:  # cached once: the teacher sees the clean x0, which does not depend on t
            y = teacher_targets(teacher, transform, arrays["images"], bs, device, softmax_targets)
            arrays["logits" if y.dim() == 2 else "targets"] = y.numpy()
        write_npz_atomic(out / _shard_name(k), **arrays)

    err = None
    try:
        for k in it:
            if stop.seen():  # another rank failed: meet it in the barrier below now
                break
            write_shard(k)
            written.append(k)
            _kill_hook(env.rank, len(written))
    except Exception as e:  # every rank learns of it at the barrier below (nobody waits for a timeout)
        if not env.distributed:
            raise
        err = f"shard generation failed: {type(e).__name__}: {e}"
        stop.set(err)
    stop.report(err, "generation")  # barrier: every rank finished its shards (or stopped)
    err = None
    if env.rank == 0:
        missing = [k for k in range(n_shards) if not shard_is_complete(out / _shard_name(k), count_of(k))]
        if missing:
            err = f"shards {missing[:10]} are still missing or damaged after generation"
        elif not keep:
            write_json_atomic(out / MANIFEST, _manifest(cfg, ident, h, env.world_size, complete=True,
                                                        device_type=recorded_type))
    raise_if_any(err, env, "final shard check")
    res = {"rank": env.rank, "world_size": env.world_size, "written": written, "skipped": skipped,
           "removed_stale_tmp": stale, "num_shards": n_shards, "config_hash": h,
           "sampling": "fast" if cfg.fast else "reference"}
    if var_type is not None:
        res["var_type"] = var_type
    if env.rank == 0 and teacher is not None:
        res["preview"] = _preview(out)
    return res


def _preview(out: Path) -> str | None:
    """Draw the finished set's preview.png; a failure to draw it is warned, never fails the set."""
    from .data.preview import datafree_preview

    try:
        return datafree_preview(out)
    except (OSError, ValueError, ImportError) as e:
        warnings.warn(f"{out}: no preview.png ({type(e).__name__}: {e}); the set itself is complete", RuntimeWarning)
        return None


# ----------------------------------------------------------------------------- distillation
TRAIN_STATE = "train_state.safetensors"
TRAIN_STATE_FORMAT = "ppap_fast.ddp_train_state"


@dataclass
class DistillConfig:
    data_dir: str
    out_dir: str
    teacher: str
    teacher_weights: str | None = None
    n_experts: int = 5
    num_timesteps: int = 1000
    r: int | None = None
    alpha: float | None = None
    layout: str | None = None
    steps: int = 1000
    batch_size: int = 64                # per rank
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: int = 50
    temperature: float = 0.25
    seed: int = 0
    device: str = "auto"
    dump_rank_states: str | None = None  # debugging / tests: every rank writes its expert tensors here
    teacher_task: str | None = None     # None: the registry spec's / the py: factory's task
    loss: str | None = None             # "kl" | "pixel_kl" | "mse"; None: from the teacher's task
    checkpoint_every: int = 0           # steps between resumable training states (0: none)
    cuda_graph: bool | None = None      # the whole training step in a CUDA graph; None: where it can (one CUDA process)
    prefetch: bool = True               # make the next batch on a background thread during the step
    verify_data: bool = False           # check every shard's CRC-32 before training (split over ranks)
    lora_kernels: str = "default"       # "implicit": the implicit-GEMM conv LoRA kernels (see LORA_KERNELS)
    loss_reduction: str = "expert_mean"  # or "batch_mean" (distill.expert_mean_loss); part of the identity
    amp: str = "none"                   # "bf16": the experts' forward under bf16 autocast (AMP_MODES)

    def identity(self) -> dict:
        """What determines the experts (``checkpoint_every`` does not: a resume is exact).
        :func:`distill` adds the resolved task and loss and the teacher's state fingerprint."""
        d = dataclasses.asdict(self)
        for k in ("device", "dump_rank_states", "checkpoint_every", "cuda_graph", "prefetch", "verify_data",
                  "lora_kernels"):  # how it runs, not what it computes (the routes agree to rounding)
            d.pop(k)
        d.pop("data_dir")  # the set is identified by its manifest hash below, not by where it is mounted
        d.pop("out_dir")
        if self.amp == "none":  # absent: states written before the field existed keep their hash
            d.pop("amp")
        d["teacher_fingerprint"] = teacher_file_fingerprint(self.teacher, self.teacher_weights)
        d["data_manifest"] = data_manifest_hash(self.data_dir)
        return d


# DistillConfig.amp: the official PPAP code trains with AMP fp16; bf16 has float32's range, so it needs no
# loss scaling (a GradScaler's inf checks would sync the host every step and break CUDA graph capture)
AMP_MODES = {"none": None, "bf16": torch.bfloat16}
AMP_HELP = ("bf16: run the experts' forward under bfloat16 autocast (the official code trains with AMP fp16; "
            "bf16 needs no loss scaling); the loss, gradients, optimizer state and saved experts stay float32")


def amp_autocast(amp: str, device: torch.device):
    """The autocast context of DistillConfig.amp on ``device`` (a no-op context for "none")."""
    from .fast_sampling import _autocast  # no weight-cast cache: fit for a captured step

    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {list(AMP_MODES)}, got {amp!r}")
    return _autocast(device, AMP_MODES[amp])


def generating_schedule(manifest: dict, num_timesteps: int, where="the manifest") -> tuple[str, int]:
    """(schedule, T) of the diffusion model that made a data-free set, from its manifest's config (generate's;
    generate_datafree's is the manifest itself); a set that records none: ("linear", ``num_timesteps``).
    ``where``: the manifest's path, for the error."""
    gen_cfg = manifest.get("config") if isinstance(manifest.get("config"), dict) else manifest
    T = gen_cfg.get("num_timesteps", num_timesteps)
    if isinstance(T, bool) or not isinstance(T, int) or T <= 0:  # "1000" / true / 0 read as another T
        raise ValueError(f"{where}: config.num_timesteps must be a positive int, got {T!r}")
    from .schedule import SCHEDULE_NAMES

    name = gen_cfg.get("schedule", "linear")
    if not isinstance(name, str) or name not in SCHEDULE_NAMES:  # else refused by Schedule.create, after the targets
        raise ValueError(f"{where}: config.schedule must be one of {list(SCHEDULE_NAMES)}, got {name!r}")
    return name, T


def data_manifest_hash(data_dir) -> str | None:
    """Identity of a data set: a hash of its manifest (None without one). Its shards' contents are not in it: a
    resume compares them by :func:`changed_data_shards`."""
    m = Path(data_dir) / MANIFEST
    return hashlib.sha256(m.read_bytes()).hexdigest()[:32] if m.is_file() else None


DATA_SHARD_CRCS = "data_shard_crcs"  # training-state metadata: the zip CRC-32s of the set's shards it trained on


def data_shard_crcs(data) -> dict[str, str]:
    """{shard file name: its members' CRC-32s} of the ShardSet ``data``, from the zip directories only (cheap)."""
    from .data.shards import zip_member_crcs

    return {name: zip_member_crcs(data.dir / name) for name in data.manifest["shards"]}


def changed_data_shards(state_path, crcs: dict, data_dir) -> str | None:
    """Why the training state ``state_path`` may not resume on a set whose shards' CRC-32s are ``crcs``: the
    manifest alone identifies the set, so shards replaced after it was finished went unnoticed. None where they
    are the ones it recorded, or it recorded none (a state written before the record)."""
    recorded = read_train_state_meta(state_path).get(DATA_SHARD_CRCS)
    if recorded is None:
        return None
    try:
        recorded = json.loads(recorded)
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        return f"{state_path}: its {DATA_SHARD_CRCS} record is damaged; remove it to start over"
    changed = sorted(n for n in set(recorded) | set(crcs) if recorded.get(n) != crcs.get(n))
    if not changed:
        return None
    return (f"{data_dir}: shard(s) {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''} differ from those "
            f"{state_path} was trained on (their CRC-32s changed; same manifest): restore them, or remove "
            f"{state_path} to start over")


def resolve_loss(cfg: DistillConfig, task: str | None) -> str:
    """``cfg.loss`` if given (checked), else the loss of the teacher's task."""
    from .distill import DISTILL_LOSSES, loss_for_task

    if cfg.loss is not None:
        if cfg.loss not in DISTILL_LOSSES:
            raise ValueError(f"unknown distillation loss {cfg.loss!r}; expected one of {list(DISTILL_LOSSES)}")
        return cfg.loss
    if task is None:
        raise ValueError(f"the task of teacher {cfg.teacher!r} is unknown: pass --teacher-task "
                         f"{{{','.join(TEACHER_TASKS)}}} or --loss")
    return loss_for_task(task)


def _trained_params(bank) -> dict:
    return {n: p for n, p in bank.named_parameters() if p.requires_grad}


def _rank_state(bank, gen: torch.Generator, device: torch.device) -> dict:
    """What differs between ranks: the buffers (local BatchNorm statistics) and the RNG states."""
    st = {f"buffer/{k}": v.detach().cpu().clone() for k, v in bank.named_buffers()}
    st["rng/data"] = gen.get_state()
    st["rng/torch"] = torch.get_rng_state()
    if device.type == "cuda":
        st["rng/cuda"] = torch.cuda.get_rng_state(device)
    return st


def save_train_state(path, bank, opt, gen, step: int, losses: list, ident: dict, h: str, env: DistEnv,
                     extra_meta: dict | None = None, extra_tensors: dict | None = None) -> None:
    """Collective: rank 0 gathers every rank's buffers and RNG states and writes one safetensors
    file atomically (``param/`` the trained per-expert tensors, identical on all ranks;
    ``optim/<param>/<key>`` the AdamW state; ``rank<r>/...`` per-rank state; ``losses`` float64;
    ``extra_tensors``; metadata: step, config and hash, and ``extra_meta`` (str values)). A failure to
    write raises on every rank. One process without a process group: ``env=DistEnv(device=...)``."""
    from .data.shards import save_safetensors_atomic

    mine = _rank_state(bank, gen, env.device)
    if env.distributed:
        got = [None] * env.world_size if env.rank == 0 else None
        dist.gather_object(mine, got, dst=0)
    else:
        got = [mine]
    err = None
    if env.rank == 0:
        t = {f"param/{k}": v for k, v in _trained_params(bank).items()}
        names = {id(p): k for k, p in _trained_params(bank).items()}
        for p, st in opt.state.items():
            for k, v in st.items():
                t[f"optim/{names[id(p)]}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        for r, st in enumerate(got):
            t.update({f"rank{r}/{k}": v for k, v in st.items()})
        t["losses"] = torch.tensor(losses, dtype=torch.float64)
        t.update(extra_tensors or {})
        meta = {"format": TRAIN_STATE_FORMAT, "step": str(step), "world_size": str(env.world_size),
                "config_hash": h, "config": json.dumps(ident, sort_keys=True, default=str),
                **{k: str(v) for k, v in (extra_meta or {}).items()}}
        try:
            save_safetensors_atomic(path, t, metadata=meta)
        except Exception as e:  # safetensors reports I/O errors (disk full) as SafetensorError, not OSError
            err = f"writing {path}: {type(e).__name__}: {e}"
    raise_if_any(err, env, "writing the training state")


def read_train_state_meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path} is not a ppap_fast training state (format {meta.get('format')!r})")
    return meta


def check_train_state(path, ident: dict, hint: str) -> tuple[bool, str | None]:
    """(whether ``path`` holds a training state, why it may not be resumed: None if it was written
    with the configuration ``ident``; else a one-line message naming the differing keys + ``hint``)."""
    path = Path(path)
    if not path.exists():
        return False, None
    try:
        meta = read_train_state_meta(path)
    except Exception as e:  # written atomically, so a damaged file is not ours to overwrite silently
        return False, f"{path} is not a readable training state ({type(e).__name__}: {e}); remove it to start over"
    if meta.get("config_hash") != config_hash(ident):
        return True, (f"{path} was written with another configuration (differs in "
                      f"{_config_diff(json.loads(meta.get('config', '{}')), ident)}); {hint}")
    return True, None


@torch.no_grad()
def load_train_state(path, bank, opt, gen, env: DistEnv) -> tuple[int, list]:
    """Restore this rank's part of a training state (in place); returns (next step, losses so far)."""
    from safetensors.torch import load_file

    meta = read_train_state_meta(path)
    t = load_file(str(path))
    params = _trained_params(bank)
    for k, p in params.items():
        p.copy_(t[f"param/{k}"])
    for k, b in bank.named_buffers():
        b.copy_(t[f"rank{env.rank}/buffer/{k}"])
    names = {id(p): k for k, p in params.items()}
    optim = {}
    for key, v in t.items():
        if key.startswith("optim/"):
            name, field = key[len("optim/"):].rsplit("/", 1)
            optim.setdefault(name, {})[field] = v
    sd = opt.state_dict()  # state by the index of each parameter in the optimizer's list
    sd["state"] = {i: optim[names[id(p)]] for i, p in enumerate(opt.param_groups[0]["params"])
                   if names[id(p)] in optim}
    try:
        opt.load_state_dict(sd)
    except ValueError as e:  # e.g. a torch.optim.AdamW state (one shared step count) for ExpertAdamW
        raise ValueError(f"{path}: {e}; remove it to start over") from None
    gen.set_state(t[f"rank{env.rank}/rng/data"])
    torch.set_rng_state(t[f"rank{env.rank}/rng/torch"])
    if env.device.type == "cuda" and f"rank{env.rank}/rng/cuda" in t:
        torch.cuda.set_rng_state(t[f"rank{env.rank}/rng/cuda"], env.device)
    return int(meta["step"]), [float(v) for v in t["losses"].tolist()]


EXPERT_LOSSES = "expert_losses"  # a one-process state's per-expert losses [steps, N] (absent in older states)


class LocalTrainState:
    """The resumable training state of a one-process trainer (distill_ppap, finetune_noise_aware): the
    distributed path's state file at ``path`` (None: none written, losses still collected), checked
    against ``ident`` on opening (a ValueError names what differs), elapsed time kept for max_minutes,
    each step's loss kept on the device until a save (no host sync per step); with :meth:`record`, also each
    expert's mean loss over its samples of the step (``expert_losses``, NaN where it had none). ``data``: the
    ShardSet trained on, whose shards' CRC-32s the state records and a resume compares (:func:`changed_data_shards`)."""

    def __init__(self, path, ident: dict, data=None):
        self.path, self.ident, self.found = (None if path is None else Path(path)), ident, False
        self.data_crcs = None if data is None or self.path is None else data_shard_crcs(data)
        self.losses: list = []
        self.step_losses: list = []
        self.expert_losses: list = []  # [step][expert]; rows of steps before a resume from an older state: NaN
        self.step_expert_losses: list = []
        if self.path is not None:
            from .data.shards import remove_stale_tmp

            remove_stale_tmp(self.path, ".safetensors")  # a state write that was killed: its exact names only
            self.found, err = check_train_state(self.path, ident, f"use the same settings or remove {self.path} "
                                                                  "to start over")
            if err is None and self.found and self.data_crcs is not None:
                err = changed_data_shards(self.path, self.data_crcs, data.dir)
            if err is not None:
                raise ValueError(err)

    def resume(self, model, opt, gen, device) -> int:
        """Restore model / opt / gen from the state if one was found and start the clock (counting the
        time trained before a kill); the step to start from (0 without a state)."""
        import time

        self._parts, self._env = (model, opt, gen), DistEnv(device=torch.device(device))
        start, elapsed = 0, 0.0
        if self.found:
            start, self.losses = load_train_state(self.path, model, opt, gen, self._env)
            elapsed = float(read_train_state_meta(self.path).get("elapsed_s", 0.0))
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                if EXPERT_LOSSES in f.keys():
                    self.expert_losses = f.get_tensor(EXPERT_LOSSES).tolist()
        self.t0 = time.time() - elapsed
        return start

    def elapsed_s(self) -> float:
        import time

        return time.time() - self.t0

    def record(self, per_sample: torch.Tensor, expert_idx: torch.Tensor, counts: torch.Tensor) -> None:
        """Keep a step's batch-mean loss and each expert's mean over its samples (on the device)."""
        per_sample = per_sample.detach()
        self.step_losses.append(per_sample.mean())
        sums = torch.zeros(counts.shape, dtype=per_sample.dtype, device=per_sample.device)
        self.step_expert_losses.append(sums.index_add_(0, expert_idx, per_sample) / counts)  # 0 / 0: NaN

    def save(self, done: int) -> None:
        """Read the losses of the steps since the last save; write the state (if a path was given)."""
        self.losses.extend(torch.stack(self.step_losses).double().cpu().tolist() if self.step_losses else [])
        self.step_losses.clear()
        if self.step_expert_losses:
            rows = torch.stack(self.step_expert_losses).double().cpu().tolist()
            self.step_expert_losses.clear()
            missing = len(self.losses) - len(rows) - len(self.expert_losses)  # resumed from a state without them
            self.expert_losses.extend([[math.nan] * len(rows[0])] * max(missing, 0) + rows)
        if self.path is not None:
            model, opt, gen = self._parts
            extra = ({EXPERT_LOSSES: torch.tensor(self.expert_losses, dtype=torch.float64)}
                     if self.expert_losses else None)
            meta = {"elapsed_s": repr(self.elapsed_s())}
            if self.data_crcs is not None:
                meta[DATA_SHARD_CRCS] = json.dumps(self.data_crcs)
            save_train_state(self.path, model, opt, gen, done, self.losses, self.ident, config_hash(self.ident),
                             self._env, extra_meta=meta, extra_tensors=extra)


@torch.no_grad()
def sync_expert_batchnorm_stats(bank, env: DistEnv) -> int:
    """Merge every ExpertBatchNorm's per-expert running statistics across ranks (see the module
    docstring: mean of means, pooled variance by the law of total variance, max of counts; over the ranks
    that saw each expert).
    Collective; returns the number of BatchNorm modules merged."""
    from .experts import ExpertBatchNorm

    n = 0
    for _, m in bank.named_modules():
        if not isinstance(m, ExpertBatchNorm):
            continue
        n += 1
        if not env.distributed:
            continue
        # a rank without a sample of an expert kept the teacher's statistics for it: left out of its merge
        seen = (m.num_batches_tracked > 0).double()[:, None]
        mean = m.running_mean.double()
        sums = torch.cat([mean * seen, (m.running_var.double() + mean * mean) * seen, seen], dim=1)
        dist.all_reduce(sums)
        C = mean.shape[1]
        ranks = sums[:, -1:]
        mean, second = sums[:, :C] / ranks.clamp_min(1), sums[:, C:2 * C] / ranks.clamp_min(1)
        m.running_mean.copy_(torch.where(ranks > 0, mean, m.running_mean.double()))
        m.running_var.copy_(torch.where(ranks > 0, (second - mean * mean).clamp_min(0), m.running_var.double()))
        dist.all_reduce(m.num_batches_tracked, op=dist.ReduceOp.MAX)
    return n


def check_replicas_identical(bank, env: DistEnv) -> str:
    """Collective: every per-expert tensor (parameters and BN statistics) equal on all ranks."""
    fp = tensors_fingerprint(sorted(bank.per_expert_state_dict().items()))
    got = _gather(fp, env)
    bad = [r for r, g in enumerate(got) if g != got[0]]
    if bad:
        raise DistributedRunError(f"expert parameters diverged across ranks: ranks {bad} differ from rank 0")
    return fp


def _cached_target_key(cfg: DistillConfig, data, teacher_state: str, loss: str | None = None) -> str | None:
    """The set's cached teacher outputs ("logits" float32 or "targets" float16), None if it has
    none or they do not suit ``loss`` (max-subtracted logits are pixel_kl targets only: warned);
    a ValueError if another teacher (other weights) computed them or their encoding is unknown."""
    key = "logits" if "logits" in data else "targets" if "targets" in data else None
    if key is None:
        return None
    man = data.manifest
    gen_cfg = man.get("config", {})
    encoding = gen_cfg.get("targets_encoding") or man.get("targets_encoding")
    if encoding not in (None, MAX_SUBTRACTED):
        raise ValueError(f"the teacher outputs cached in {cfg.data_dir} are stored as {encoding!r}, which this "
                         f"version does not read (it knows raw outputs and {MAX_SUBTRACTED!r})")
    if encoding == MAX_SUBTRACTED and loss != "pixel_kl":
        warnings.warn(f"{cfg.data_dir} caches segmentation logits minus their per-pixel max (targets for "
                      f"pixel_kl only); with loss {loss!r} they are not used: this teacher's outputs are "
                      "computed instead", stacklevel=2)
        return None
    raw_softmax_targets = encoding is None and key == "targets" and loss == "pixel_kl"
    if raw_softmax_targets and _cached_outputs_trusted(cfg, man, teacher_state):
        warnings.warn(f"{cfg.data_dir} caches raw float16 segmentation logits (written by an older version): "
                      "its pixel_kl targets carry up to ~5% total-variation rounding; regenerate the set, or "
                      "distil from a set without cached outputs (the targets are then computed max-subtracted)",
                      stacklevel=2)
    # recorded by generate() with a teacher; top level: a `ppap-fast generate` (ShardWriter) set
    theirs = gen_cfg.get("teacher_state") or man.get("teacher_state")
    if theirs is None and not gen_cfg.get("teacher"):  # a set made by hand: its outputs are the user's
        return key
    if theirs is None:  # an older generate() set: trusted only when spec and weights file match
        ours = {"teacher": cfg.teacher, "teacher_fingerprint": teacher_file_fingerprint(cfg.teacher, cfg.teacher_weights)}
        if legacy_teacher_match(gen_cfg, ours):
            return key
        warnings.warn(f"{cfg.data_dir} caches teacher outputs without the teacher's weight fingerprint (written "
                      f"by an older version; teacher {gen_cfg.get('teacher')!r}); they are not used: this "
                      "teacher's outputs are computed instead", stacklevel=2)
        return None
    if theirs != teacher_state:
        raise ValueError(f"the teacher outputs cached in {cfg.data_dir} were computed by another teacher "
                         f"({man.get('config', {}).get('teacher')!r}, state {theirs[:12]}) than this one "
                         f"({cfg.teacher!r}, state {teacher_state[:12]}); distil on a set generated with "
                         "this teacher or without --teacher")
    return key


def _cached_outputs_trusted(cfg: DistillConfig, man: dict, teacher_state: str) -> bool:
    """Whether _cached_target_key uses a set's cached outputs (made by hand or by this teacher)."""
    gen_cfg = man.get("config", {})
    theirs = gen_cfg.get("teacher_state") or man.get("teacher_state")
    if theirs is None:
        return not gen_cfg.get("teacher") or legacy_teacher_match(gen_cfg, {
            "teacher": cfg.teacher, "teacher_fingerprint": teacher_file_fingerprint(cfg.teacher, cfg.teacher_weights)})
    return theirs == teacher_state


def _cached_targets_encoding(data) -> str:
    """How a set's cached dense targets are stored: its recorded targets_encoding, else RAW_FLOAT16."""
    gen_cfg = data.manifest.get("config", {})
    return gen_cfg.get("targets_encoding") or data.manifest.get("targets_encoding") or RAW_FLOAT16


def _check_distill_state(path: Path, ck_ident: dict, targets_manifest: Path, computed: bool) -> tuple:
    """check_train_state for distillation. A pixel_kl state written before its identity held
    targets_encoding resumes only if the targets it trained on were encoded as this run's are:
    cached ones are the same set's (data_manifest is checked); computed ones are known from the
    teacher_targets manifest the killed run left in --out (raw float16 before MAX_SUBTRACTED existed)."""
    hint = "use another --out or the same arguments"
    found, err = check_train_state(path, ck_ident, hint)
    if err is None or "targets_encoding" not in ck_ident:
        return found, err
    try:
        theirs = json.loads(read_train_state_meta(path).get("config", "{}"))
    except Exception:  # noqa: BLE001 - unreadable: err already says so
        return found, err
    legacy = {k: v for k, v in ck_ident.items() if k != "targets_encoding"}
    if "targets_encoding" in theirs or check_train_state(path, legacy, hint)[1] is not None:
        return found, err
    was = None
    if not computed:
        was = ck_ident["targets_encoding"]
    else:
        try:
            was = json.loads(targets_manifest.read_text(encoding="utf-8")).get("targets_encoding") or RAW_FLOAT16
        except (OSError, ValueError, AttributeError):  # ValueError: bad JSON, or binary bytes (UnicodeDecodeError)
            pass
    if was == ck_ident["targets_encoding"]:
        return found, None
    was = repr(was) if was else f"unknown (no readable {targets_manifest})"
    return found, (f"{path} was trained on pixel_kl targets encoded as {was}, this run's are "
                   f"{ck_ident['targets_encoding']!r} (targets_encoding: rounded another way); "
                   f"use another --out or remove {path} to start over")


TARGETS_DIR = "teacher_targets"
TARGETS_FORMAT = "ppap_fast.teacher_targets"


def _targets_complete(path: Path, count: int) -> bool:
    from .data.shards import npz_members

    try:
        m = npz_members(path)
    except ValueError:
        return False
    return len(m) == 1 and next(iter(m)) in ("logits", "targets") and next(iter(m.values())).shape[0] == count


def _targets_damaged(path: Path) -> bool:
    """``path``'s CRC-32 fails (read whole); warns that it is recomputed."""
    from .data.shards import crc_problem

    problem = crc_problem(path)
    if problem is not None:
        warnings.warn(f"{path}: {problem}; recomputed", UserWarning, stacklevel=3)
    return problem is not None


def _targets_identity(tid: dict) -> dict:
    """What decides the computed teacher outputs: a teacher_targets manifest less the set's path and the micro-batch
    (older manifests record it)."""
    return {k: v for k, v in tid.items() if k not in ("data_dir", "micro_batch")}


def compute_targets(cfg: DistillConfig, data, ident: dict, teacher, transform, env: DistEnv,
                    verified: set | None = None) -> str:
    """Collective: the teacher's outputs on a set without cached ones, computed ONCE over all
    ranks and kept on disk, never in memory: shard k's outputs go to
    ``<out>/teacher_targets/targets_<k>.npz`` (the shard files' format, written atomically), the
    missing files are dealt round-robin to the ranks (each computes only its share, in
    micro-batches of ``cfg.batch_size``, dense outputs rounded to float16 like the cache, pixel_kl
    targets max-subtracted like the cache), then
    every rank attaches all of them to ``data`` (read lazily like cached targets). A restart
    reuses complete files written for the same teacher state and data set (with --verify-data: whose
    CRC-32 passes: added to ``verified``, a set given, on every rank), whatever the micro-batch and wherever the
    set is mounted; files for anything else are removed first. Returns the name of the attached array ("logits" or
    "targets")."""
    from .data.shards import write_json_atomic, write_npz_atomic

    tdir = Path(cfg.out_dir) / TARGETS_DIR
    micro = max(cfg.batch_size, 1)
    counts = [int(c) for c in data.counts]
    paths = [tdir / f"targets_{k:05d}.npz" for k in range(len(counts))]
    tid = {"format": TARGETS_FORMAT, "teacher": cfg.teacher, "teacher_state": ident["teacher_state"],
           "data_dir": str(Path(cfg.data_dir).resolve()), "data_manifest": ident["data_manifest"], "counts": counts}
    softmax_targets = ident.get("loss") == "pixel_kl"
    if softmax_targets:  # absent otherwise: files written before the encoding existed still match
        tid["targets_encoding"] = MAX_SUBTRACTED
    err, todo = None, None
    if env.rank == 0:
        try:
            tdir.mkdir(parents=True, exist_ok=True)
            m = tdir / MANIFEST
            try:  # the set is its manifest wherever it is mounted; the micro-batch changes rounding only
                same = _targets_identity(json.loads(m.read_text(encoding="utf-8"))) == _targets_identity(tid)
            except (OSError, ValueError, AttributeError):  # ValueError: bad JSON, or binary bytes
                same = False
            for f in tdir.iterdir():  # temporaries of a killed run; every file when the inputs changed
                if (f.name.startswith(".") and f.name.endswith(".tmp")) or (not same and f.name.startswith("targets_")):
                    f.unlink(missing_ok=True)
            write_json_atomic(m, tid)
            todo = [k for k, (p, n) in enumerate(zip(paths, counts)) if not _targets_complete(p, n)]
        except OSError as e:
            err = f"{tdir}: {e}"
    raise_if_any(err, env, "preparing the teacher outputs")
    todo = _gather(todo, env)[0]
    # a node-local --out failed only after every rank computed its share
    stop = StopMarker(tdir, check_shared_dir(tdir, env, "--out"), env)
    if cfg.verify_data:  # the kept files' CRC-32, each rank a share: their headers alone kept a damaged one, and
        # the check of the set failed on it again (without --verify-data nothing is read whole, shards neither)
        kept = sorted(set(range(len(paths))) - set(todo))
        damaged = [k for k in kept[env.rank::env.world_size] if _targets_damaged(paths[k])]
        todo = sorted({*todo, *(k for got in _gather(damaged, env) for k in got)})
        if verified is not None:
            verified.update(paths[k] for k in set(kept) - set(todo))
    err = None
    try:
        for k in todo[env.rank::env.world_size]:
            if stop.seen():  # another rank failed: meet it in the barrier below now
                break
            rows = np.arange(data.starts[k], data.starts[k + 1])
            y = teacher_targets(teacher, transform, data.gather("images", rows), micro, env.device, softmax_targets)
            write_npz_atomic(paths[k], **{"logits" if y.dim() == 2 else "targets": y.numpy()})
    except (OSError, ValueError) as e:
        err = str(e)
        stop.set(err)
    except Exception as e:  # every rank learns of it below (nobody waits for a timeout)
        if not env.distributed:
            raise
        err = f"{type(e).__name__}: {e}"
        stop.set(err)
    stop.report(err, "computing the teacher outputs")
    err = key = None
    try:
        from .data.shards import npz_members

        key = next(iter(npz_members(paths[0])))
        data.attach(key, paths)
    except ValueError as e:
        err = str(e)
    raise_if_any(err, env, "reading the computed teacher outputs")
    return key


class BatchStream:
    """The training batches in order, each made by ``make()`` (rows read from the shards,
    dequantised, noised: host work) one step ahead on a background thread while the device trains
    on the current one. ``make`` draws every random number from ``gen``; only the worker calls it, one
    batch at a time, so the batches are those made without prefetching. ``generator_before_next()``
    is what a checkpoint must save: the generator as it was before the next batch handed out."""

    def __init__(self, make, gen: torch.Generator, count: int, prefetch: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self._make, self._gen, self._left = make, gen, int(count)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ppap-batches") if prefetch else None
        self._state = gen.get_state()
        self._future = None
        self._submit()

    def _submit(self):
        if self._pool is not None and self._left > 0:
            self._left -= 1
            self._future = self._pool.submit(self._make)

    def take(self):
        if self._pool is None:
            if self._left <= 0:
                raise RuntimeError("BatchStream: no batch left")
            self._left -= 1
            batch = self._make()
        else:
            if self._future is None:
                raise RuntimeError("BatchStream: no batch left")
            batch, self._future = self._future.result(), None
        self._state = self._gen.get_state()  # the worker is idle: before the next batch
        self._submit()
        return batch

    def generator_before_next(self):
        return _GeneratorAt(self._state)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class _GeneratorAt:
    """What save_train_state reads of a generator (get_state), at a chosen point of its stream."""

    def __init__(self, state: torch.Tensor):
        self._state = state

    def get_state(self) -> torch.Tensor:
        return self._state


LORA_KERNELS = {  # DistillConfig.lora_kernels -> the environment the LoRA ops read while training
    "default": {},
    # convs of either layout through the implicit A stage: base conv + each sample's own expert
    # (factorised layout; loralib convs as the equal rank r*k*k factorised LoRA), not N dense convs
    "implicit": {"PPAP_FAST_LORA_A_STAGE": "implicit", "PPAP_FAST_LORALIB_CONV": "factorised"},
    # factorised-layout convs: the fastest A stage per layer shape, timed on the first step (ops/lora/autotune.py)
    "auto": {"PPAP_FAST_LORA_A_STAGE": "auto"},
    # loralib convs: the base conv once + the LoRA's low-rank factors where that saves FLOPs (the CPU default)
    "lowrank": {"PPAP_FAST_LORALIB_CONV": "lowrank"},
    # loralib convs: N dense per-expert deltas (the GPU default)
    "delta": {"PPAP_FAST_LORALIB_CONV": "delta"},
}


@contextlib.contextmanager
def _lora_kernel_env(choice: str):
    if choice not in LORA_KERNELS:
        raise ValueError(f"lora_kernels must be one of {sorted(LORA_KERNELS)}, got {choice!r}")
    from .ops import lora as L
    from .ops._registry import environ_set

    with environ_set(LORA_KERNELS[choice]):
        for k in [k for k in L.last_backend if k.startswith(("lora_conv2d", "lora_linear"))]:
            del L.last_backend[k]  # the summary's lora_ops: what this run used, nothing from before
        yield


def _lora_ops_that_ran() -> dict:
    from .ops import lora as L

    return {k: v for k, v in L.last_backend.items() if k.startswith(("lora_conv2d", "lora_linear"))}


def distill(cfg: DistillConfig, env: DistEnv | None = None, progress: bool = False):
    """PPAP data-free distillation with DDP over the ExpertBank; returns the bank (eval mode).
    Rank 0 writes ``cfg.out_dir`` (save_experts format) and ``train_summary.json`` there; with
    ``cfg.checkpoint_every`` it also keeps a resumable training state (module docstring).
    ``cfg.lora_kernels`` picks the LoRA kernels for the run (LORA_KERNELS; the summary's
    ``lora_ops`` says which backend and A stage ran)."""
    with _lora_kernel_env(cfg.lora_kernels):
        return _distill(cfg, env, progress)


def _ddp_with_local_buffers(bank: nn.Module, device: torch.device) -> nn.Module:
    """DDP over ``bank`` that never syncs its buffers at a forward: each rank keeps its own BatchNorm running
    statistics, merged by :func:`sync_expert_batchnorm_stats`. ``forward_sync_buffers=False`` (torch 2.13+;
    ``broadcast_buffers=False`` is deprecated, a FutureWarning every run) still broadcasts rank 0's buffers once
    here, a no-op: every rank built the same bank, and a resume loads its own statistics after this."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    local = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
             else "broadcast_buffers")
    return DDP(bank, device_ids=[device.index] if device.type == "cuda" else None, **{local: False})


def _check_loss_fits(loss: str, shape: tuple, teacher: str) -> None:
    """A ValueError when ``loss`` cannot train on the teacher's outputs of per-image ``shape``: kl takes K >= 2
    class logits, pixel_kl C >= 2 class logits per pixel (a softmax over one logit is 1: the loss was 0, nothing
    trained; pixel_kl of [B, K] logits failed with an IndexError at the first step)."""
    if loss == "kl":
        bad, want = len(shape) != 1 or shape[0] < 2, "[K] class logits per image, K >= 2"
    elif loss == "pixel_kl":
        bad, want = len(shape) < 2 or shape[0] < 2, "[C, H, W] class logits per image, C >= 2"
    else:
        return
    if bad:
        why = " (a softmax over one logit is 1 everywhere: nothing would train)" if shape and shape[0] == 1 else ""
        raise ValueError(f"loss {loss!r} takes {want}; teacher {teacher!r} outputs {list(shape)} per image{why}: "
                         "pass --loss (mse for one channel or a regression) or --teacher-task")


# what distill writes into --out atomically (besides teacher_targets/, cleaned by compute_targets)
_DISTILL_OUTPUTS = (TRAIN_STATE, "experts.safetensors", "config.json", "train_summary.json", "train_loss.png")


def _distill(cfg: DistillConfig, env: DistEnv | None, progress: bool):
    from .data import ShardSet, from_uint8
    from .data.shards import write_json_atomic
    from .distill import (check_loss_reduction, distill_loss_per_sample, expert_counts, expert_mean_loss,
                          make_expert_optimizer)
    from .experts import ExpertBank, save_experts
    from .schedule import Schedule

    env = env or init_distributed(cfg.device)
    device = env.device
    # DDP over two device types fails or hangs in its first collective; the teacher outputs would differ
    raise_if_any(_device_types_differ(env, "train"), env, "device check")
    if cfg.checkpoint_every < 0 or cfg.steps <= 0 or cfg.batch_size <= 0 or cfg.n_experts <= 0:
        raise ValueError("steps, batch_size and n_experts must be positive, checkpoint_every >= 0")
    out = check_experts_dir(cfg.out_dir, "--out")  # before training: these failed only at the save
    if out.exists() and out.resolve() == Path(cfg.data_dir).resolve():
        raise ValueError(f"--out {out} is the data set (--data); name another directory")
    check_loss_reduction(cfg.loss_reduction)
    amp_autocast(cfg.amp, device)  # an unknown mode fails before any work
    if cfg.num_timesteps % cfg.n_experts:  # ExpertBank said so only after the teacher outputs were computed
        raise ValueError(f"n_experts={cfg.n_experts} does not divide num_timesteps={cfg.num_timesteps}: "
                         "the timestep bands would not be equal")
    teacher, transform, placement, task, arch = collectively(
        lambda: build_teacher(cfg.teacher, cfg.teacher_weights, cfg.teacher_task), env, "building the teacher")
    # bad --lora-r / --lora-alpha / --layout fail here, not after the teacher outputs and --verify-data
    placement = placement(r=cfg.r, alpha=cfg.alpha, layout=cfg.layout)
    loss_kind = resolve_loss(cfg, task)
    ident = cfg.identity()
    ident["teacher_task"], ident["loss"] = task, loss_kind
    ident["teacher_state"] = teacher_fingerprint(teacher, transform)
    # also settings that decide the collectives (not the experts): ranks that disagree waited on each other until
    # the timeout (a training-state save on one rank against a training step on another)
    check_same_config({**ident, "checkpoint_every": cfg.checkpoint_every, "verify_data": cfg.verify_data}, env)
    h = config_hash(ident)
    # a rank failing to place a model (out of memory) left the others waiting in their next collective
    teacher, transform = collectively(lambda: (teacher.to(device).eval(),
                                               None if transform is None else transform.to(device)),
                                      env, "placing the teacher")

    err = data = key = None
    try:
        data = ShardSet(cfg.data_dir)  # lazy: each step reads its batch's rows only
        key = _cached_target_key(cfg, data, ident["teacher_state"], ident["loss"])
    except (OSError, ValueError) as e:
        err = str(e)
    raise_if_any(err, env, "reading the data set")
    # the forward process q(x_t | x_0) of the diffusion model that made the set (its manifest), not a fixed one
    try:
        schedule_name, set_T = generating_schedule(data.manifest, cfg.num_timesteps, Path(cfg.data_dir) / MANIFEST)
        err = None if set_T == cfg.num_timesteps else (
            f"{cfg.data_dir} was generated by a {set_T}-step diffusion model; distil with --num-timesteps "
            f"{set_T} (got {cfg.num_timesteps})")
    except ValueError as e:
        err = str(e)
    raise_if_any(err, env, "reading the data set")

    def teacher_out_shape():  # one image through the teacher
        with torch.no_grad():
            x = from_uint8(data.gather("images", [0])).to(device)
            return tuple(teacher_output(teacher, transform, x).shape[1:])

    out_shape = tuple(data.row_shape(key)) if key is not None else collectively(teacher_out_shape, env,
                                                                                 "running the teacher")
    _check_loss_fits(loss_kind, out_shape, cfg.teacher)
    # a training state in --out: rank 0 checks its configuration now, before anything in --out (the
    # computed teacher outputs of the run it belongs to) is replaced; it is restored after the bank is built
    state_path = Path(cfg.out_dir) / TRAIN_STATE
    ck_ident = {**ident, "world_size": env.world_size}
    if loss_kind == "pixel_kl":  # how its targets are rounded (other runs: unchanged identity, old states resume)
        ck_ident["targets_encoding"] = (MAX_SUBTRACTED if key is None else _cached_targets_encoding(data))
    ck_hash = config_hash(ck_ident)
    err, found, shard_crcs = None, False, None
    if env.rank == 0:
        try:
            shard_crcs = data_shard_crcs(data)
            found, err = _check_distill_state(state_path, ck_ident, Path(cfg.out_dir) / TARGETS_DIR / MANIFEST,
                                              computed=key is None)
            if found and err is None:
                err = changed_data_shards(state_path, shard_crcs, cfg.data_dir)
        except ValueError as e:
            err = str(e)
        if err is None:  # a killed write's temporaries (a training state each): only _atomic's exact names
            from .data.shards import remove_stale_tmp

            for name in _DISTILL_OUTPUTS:
                with contextlib.suppress(OSError):
                    remove_stale_tmp(Path(cfg.out_dir) / name, Path(name).suffix)
    raise_if_any(err, env, "resuming")
    target_source = "cached"
    verified = set()  # kept teacher_targets files compute_targets already read whole (with --verify-data)
    if key is None:
        key, target_source = compute_targets(cfg, data, ident, teacher, transform, env, verified=verified), "computed"
    if cfg.verify_data:  # row reads skip the zip CRC: read every file whole once, each rank its share
        # a rank that fails stops the others' share by a marker in --out, which every rank must see (checked
        # here): in the set's folder, a read-only one took none and the others read their whole share
        if env.distributed and env.rank == 0:
            with contextlib.suppress(OSError):  # an error: check_shared_dir says rank 0 cannot write there
                out.mkdir(parents=True, exist_ok=True)
        stop = StopMarker(out, check_shared_dir(out, env, "--out"), env)
        err = None
        try:
            mine = [f for f in data.files() if f not in verified][env.rank::env.world_size]
            bad = data.verify(mine, progress=progress and env.rank == 0, stop=stop.seen)
            if bad:
                err = f"{len(bad)} damaged file(s): " + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
                computed = {f"{f}: " for f in mine if Path(f).parent == Path(cfg.out_dir) / TARGETS_DIR}
                if any(not b.startswith(tuple(computed)) for b in bad):  # a shard (or its cached outputs)
                    err += ("; remove the damaged shard file(s) and rerun generate with the set's arguments: it "
                            "rewrites missing shards")
                if computed and any(b.startswith(tuple(computed)) for b in bad):
                    err += f"; remove the damaged {TARGETS_DIR} file(s) and rerun distill: it recomputes them"
        except Exception as e:  # noqa: BLE001 - every rank learns of it below
            err = f"{type(e).__name__}: {e}"
            stop.set(err)
        stop.report(err, "verifying the data set")

    torch.manual_seed(cfg.seed)  # identical LoRA init everywhere (DDP also broadcasts rank 0's)
    bank = collectively(lambda: ExpertBank(teacher, placement, cfg.n_experts, cfg.num_timesteps, arch=arch)
                        .to(device).train(), env, "placing the bank")
    model = bank
    if env.distributed:
        model = _ddp_with_local_buffers(bank, device)
    graphed = False
    if cfg.cuda_graph is not False:  # None: captured where possible (H100: 3.6-4.4x the eager step)
        from .train_graph import why_no_graph

        why = why_no_graph(device, env.distributed)
        if why is not None and cfg.cuda_graph:
            warnings.warn(f"cuda_graph: {why}; training eagerly", stacklevel=2)
        graphed = why is None
    # capturable AdamW with its learning rate on the device, set in place every step
    opt = make_expert_optimizer(bank.parameters_to_train(), cfg.n_experts, cfg.loss_reduction,
                                torch.tensor(cfg.lr, device=device) if graphed else cfg.lr, cfg.weight_decay,
                                capturable=graphed)
    if graphed:
        bank.check_inputs = False  # t comes from randint(0, num_timesteps): no host check in the graph
    sched = Schedule.create(schedule_name, cfg.num_timesteps)
    gen = torch.Generator().manual_seed(shard_seed(cfg.seed, 7919 * (env.rank + 1)))  # per-rank data stream
    if env.rank:  # the global RNG's draws in training (dropout) per rank too; rank 0 (one process) keeps cfg.seed's
        from .seeding import sample_seed

        torch.manual_seed(sample_seed(cfg.seed, 7919, env.rank))

    # resume: every rank restores its part of the state (checked above) in place
    start, losses = 0, []
    if _gather(found, env)[0]:
        # every rank reads its part of rank 0's file: one with a node-local --out read none, or a stale one
        check_shared_dir(out, env, "--out")
        err = None
        try:
            start, losses = load_train_state(state_path, bank, opt, gen, env)
        except Exception as e:
            err = f"loading {state_path}: {type(e).__name__}: {e}"
        raise_if_any(err, env, "resuming")
    resumed_from = start

    it = range(start, cfg.steps)
    if progress and env.rank == 0:
        from tqdm import tqdm
        it = tqdm(it, desc=f"ddp distill x{env.world_size}", initial=start, total=cfg.steps, mininterval=2)
    bar_loss = BarLoss(it)

    def forward_losses(xt, t, target):
        """(expert index [B], per-sample loss [B]) of a batch."""
        e = bank.expert_index(t)
        with amp_autocast(cfg.amp, device):
            student = teacher_output(model, transform, xt, t)  # float32 out
        return e, distill_loss_per_sample(loss_kind, student, target, cfg.temperature)

    def backward(e, per_sample, counts):
        """Backward of the expert-mean loss (``counts``: global under DDP); returns the batch mean (what is logged)
        and the counts [N]."""
        opt.zero_grad(set_to_none=True)
        expert_mean_loss(per_sample, e, cfg.n_experts, cfg.loss_reduction, counts, env.world_size).backward()
        return per_sample.detach().mean(), counts

    def loss_and_grads(xt, t, target):  # one process
        e, per_sample = forward_losses(xt, t, target)
        return backward(e, per_sample, expert_counts(e, cfg.n_experts))

    def ddp_loss_and_grads(step):
        """loss_and_grads under DDP. The all-reduce of the expert counts (every rank's samples of an expert: DDP's
        gradient average is their mean) also carries an error flag: a rank whose batch or forward failed stops
        every rank here, before the gradient all-reduce it would never join (NCCL: the others waited until
        the timeout)."""
        err, counts = None, torch.zeros(cfg.n_experts, device=device)
        try:
            xt, t, target = batches.take()
            xt, t, target = xt.to(device), t.to(device), target.to(device).float()
            e, per_sample = forward_losses(xt, t, target)
            counts = expert_counts(e, cfg.n_experts)
        except Exception as ex:  # noqa: BLE001 - reported to every rank below
            err = f"{type(ex).__name__}: {ex}"
        flagged = torch.cat([counts, torch.tensor([float(err is not None)], device=device)])
        dist.all_reduce(flagged)
        if flagged[-1].item() > 0:
            raise_if_any(err, env, f"training step {step}")
        return backward(e, per_sample, flagged[:-1])

    graph_step = None
    if graphed:
        from .train_graph import GraphedTrainStep

        def whole_step(xt, t, target):
            loss, counts = loss_and_grads(xt, t, target)
            bank.step_sampled_experts(opt, counts > 0)
            return loss

        graph_step = GraphedTrainStep(whole_step)
    def make_batch():  # host side of a step; every random number from gen, in this order
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x0 = from_uint8(data.gather("images", idx.numpy()))
        target = torch.from_numpy(data.gather(key, idx.numpy()))
        t = torch.randint(0, cfg.num_timesteps, (cfg.batch_size,), generator=gen)
        xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=gen)).float()
        return xt, t, target

    batches = BatchStream(make_batch, gen, cfg.steps - start, prefetch=cfg.prefetch)
    try:
        for step in it:
            lr_now = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * (1 - step / cfg.steps)
            for g in opt.param_groups:
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(lr_now)
                else:
                    g["lr"] = lr_now
            if env.distributed:
                loss, counts = ddp_loss_and_grads(step)
            else:
                xt, t, target = batches.take()
                xt, t, target = xt.to(device), t.to(device), target.to(device).float()
                if graph_step is not None:  # the optimizer step is inside: a non-finite loss stops after it
                    loss = graph_step(xt, t, target)
                else:
                    loss, counts = loss_and_grads(xt, t, target)
            mean_loss = loss.detach().clone()  # the global batch's loss; NaN on any rank stops every rank here
            if env.distributed:
                dist.all_reduce(mean_loss)
                mean_loss /= env.world_size
            losses.append(float(mean_loss))
            bar_loss.add(losses[-1])
            if not math.isfinite(losses[-1]):
                raise DistributedRunError(f"distillation loss is {losses[-1]} at step {step} (loss {loss_kind!r})")
            if graph_step is None:  # experts without a sample on any rank stay as they were (global counts)
                bank.step_sampled_experts(opt, counts > 0)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                # the data generator as it was before the next batch (prefetching has drawn it already)
                save_train_state(state_path, bank, opt, batches.generator_before_next(), done, losses, ck_ident,
                                 ck_hash, env, extra_meta={DATA_SHARD_CRCS: json.dumps(shard_crcs)})
            _kill_hook(env.rank, done, "PPAP_FAST_TEST_KILL_AFTER_STEPS")
    finally:
        batches.close()
    bank.check_inputs = True  # off only for the capture: the returned bank checks t again

    if cfg.dump_rank_states:
        from .data.shards import save_safetensors_atomic

        save_safetensors_atomic(Path(cfg.dump_rank_states) / f"rank{env.rank}.presync.safetensors",
                                {k: v.detach().clone() for k, v in bank.per_expert_state_dict().items()})
    n_bn = sync_expert_batchnorm_stats(bank, env)
    fp = check_replicas_identical(bank, env)
    if cfg.dump_rank_states:
        from .data.shards import save_safetensors_atomic

        save_safetensors_atomic(Path(cfg.dump_rank_states) / f"rank{env.rank}.safetensors",
                                {k: v.detach().clone() for k, v in bank.per_expert_state_dict().items()})
    err = None
    if env.rank == 0:
        try:
            save_experts(bank, cfg.out_dir, input_transform=transform)  # guided-sample refuses another one
            write_json_atomic(Path(cfg.out_dir) / "train_summary.json", {
                "config": ident, "config_hash": h, "world_size": env.world_size, "backend": env.backend,
                "global_batch": cfg.batch_size * env.world_size, "loss": loss_kind, "targets": target_source,
                "losses": losses, "losses_are": "per step, mean over ranks of each rank's batch loss",
                "loss_reduction": cfg.loss_reduction,
                "resumed_from_step": resumed_from, "expert_fingerprint": fp,
                "cuda_graph": graph_step is not None and graph_step.captured,  # not when it failed or steps <= warmup
                "lora_kernels": cfg.lora_kernels, "lora_ops": _lora_ops_that_ran(), "amp": cfg.amp,
                "batchnorm_policy": "local batch stats per rank; running stats merged at checkpoint (pooled)",
                "batchnorm_modules_merged": n_bn})
            if losses:
                from .distill import plot_train_losses

                plot_train_losses(Path(cfg.out_dir) / "train_loss.png", losses, None, bank.bands,
                                  f"distill PPAP-{cfg.n_experts}, {env.world_size} process(es)")
            state_path.unlink(missing_ok=True)  # finished: the experts are the product, nothing to resume
            if target_source == "computed":
                shutil.rmtree(Path(cfg.out_dir) / TARGETS_DIR, ignore_errors=True)
        except Exception as e:  # incl. SafetensorError (safetensors' I/O errors): the other ranks wait below
            err = f"{type(e).__name__}: {e}"
    raise_if_any(err, env, "writing the checkpoint")
    return bank.eval()


# ----------------------------------------------------------------------------- launcher
_TASKS = {"generate": generate, "distill": distill}


def _worker(rank: int, world: int, init_method: str, backend: str, task: str, cfgs, threads, timeout_s,
            progress: bool = False, error_dir: str | None = None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(int(threads))
    cfg = cfgs[rank] if isinstance(cfgs, (list, tuple)) else cfgs
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        env = init_distributed(cfg.device)
        _TASKS[task](cfg, env, progress=progress)
    except BaseException:
        if error_dir is not None:  # before the peers' collectives fail on this rank's closed connections
            _record_rank_error(error_dir, rank)
        raise
    finally:
        dist.destroy_process_group()
    # success: every output is written atomically; skip interpreter teardown, where gloo's threads
    # intermittently abort (std::terminate), as main() does under torchrun
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(task: str, cfgs, nproc: int, backend: str = "gloo", threads: int | None = None,
           timeout_s: float = 1800.0, progress: bool = False) -> None:
    """Run ``task`` ("generate" | "distill") on ``nproc`` spawned processes (one config for all,
    or a list with one per rank); a failed rank's exception is raised here as torch.multiprocessing's
    ProcessRaisedException (the cause, not a peer's collective error about it: see _join_ranks).
    ``progress``: the task's progress bars, as ``--progress`` without ``--nproc``."""
    import torch.multiprocessing as mp

    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}")
    if isinstance(cfgs, (list, tuple)) and len(cfgs) != nproc:
        raise ValueError(f"{len(cfgs)} configs for {nproc} processes")
    with tempfile.TemporaryDirectory(prefix="ppap_rdzv_") as d:
        init = Path(d, "rendezvous").as_uri()
        ctx = mp.start_processes(_worker, args=(nproc, init, backend, task, cfgs, threads, timeout_s, progress, d),
                                 nprocs=nproc, start_method="spawn", join=False)
        _join_ranks(ctx, d)


# a failed rank's error as its peers see it: their collectives fail on its closed connections (or time out)
_PEER_ERROR_MARKS = ("Connection closed by peer", "Connection reset by peer", "gloo/", "NCCL", "DistBackendError",
                     "DistNetworkError", "DistStoreError")
PEER_ERROR_GRACE_S = 10.0  # how long the launcher waits for a real cause after only peer errors


def _record_rank_error(error_dir: str, rank: int) -> None:
    """Write this rank's traceback (being handled) with the time, for launch to pick the real cause."""
    import traceback

    try:
        tmp = Path(error_dir, f".rank{rank}.error.tmp")
        tmp.write_text(f"{time.time_ns()}\n{traceback.format_exc()}", encoding="utf-8")
        os.replace(tmp, Path(error_dir, f"rank{rank}.error"))
    except Exception:  # noqa: BLE001 - torch's own error file still reports it
        pass


def _rank_error(ctx, error_dir: str, rank: int, exited: bool) -> tuple[int, str] | None:
    """(time_ns, traceback or exit line) of a failed rank: its recorded error, else (exited) torch's error file or
    its exit code / signal; None while it has recorded nothing."""
    try:
        stamp, _, trace = Path(error_dir, f"rank{rank}.error").read_text(encoding="utf-8").partition("\n")
        return int(stamp), trace
    except (OSError, ValueError):
        pass
    if not exited:
        return None
    import pickle

    try:
        with open(ctx.error_files[rank], "rb") as fh:
            return time.time_ns(), pickle.load(fh)
    except Exception:  # noqa: BLE001 - no traceback: it died (signal) or exited without one
        code = ctx.processes[rank].exitcode
        try:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        except ValueError:
            how = f"signal {-code}"
        return time.time_ns(), f"process {rank} terminated with {how}"


_ALSO_FAILED = "-- also failed: "  # the line of _join_ranks' error naming the other failed ranks


def _last_line(text: str) -> str:
    return ([ln.strip() for ln in text.splitlines() if ln.strip()] or [""])[-1]


def _is_peer_error(text: str) -> bool:
    return any(m in _last_line(text) for m in _PEER_ERROR_MARKS)


def _join_ranks(ctx, error_dir: str, grace_s: float | None = None) -> None:
    """Wait for the ranks of ``mp.start_processes(join=False)``; when any fails, stop the others and raise the real
    cause: the first error (by time) that is not a peer's collective error about it, else the first; waits up to
    ``grace_s`` for one while only peer errors are known. The others are named in a line above it."""
    from multiprocessing.connection import wait

    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    grace_s = PEER_ERROR_GRACE_S if grace_s is None else grace_s
    procs = ctx.processes
    alive = {p.sentinel: r for r, p in enumerate(procs)}
    failed: list[int] = []
    deadline = None
    while alive:
        ready = wait(list(alive), None if deadline is None else max(0.0, deadline - time.monotonic()))
        for s in ready:
            r = alive.pop(s)
            procs[r].join()
            if procs[r].exitcode != 0:
                failed.append(r)
        if not failed:
            continue
        errors = {r: e for r in range(len(procs)) if (e := _rank_error(ctx, error_dir, r, r in failed)) is not None}
        if not ready or any(not _is_peer_error(t) for _, t in errors.values()):
            break
        if deadline is None:
            deadline = time.monotonic() + grace_s
    if not failed:
        return
    still = list(alive.values())
    for r in still:
        procs[r].terminate()
    for r in still:
        procs[r].join(30)
        if procs[r].is_alive():
            procs[r].kill()
            procs[r].join()
    errors = {r: e for r in range(len(procs)) if (e := _rank_error(ctx, error_dir, r, r in failed)) is not None}
    cause = min(errors, key=lambda r: (_is_peer_error(errors[r][1]), errors[r][0]))
    others = [f"process {r}: " + (_last_line(errors[r][1])[:160] if r in errors else "terminated")
              for r in sorted(set(failed) | set(still) | set(errors)) if r != cause]
    note = f"{_ALSO_FAILED}{'; '.join(others)}\n" if others else ""
    trace = errors[cause][1]
    if trace.startswith(f"process {cause} terminated with "):
        code = procs[cause].exitcode
        raise ProcessExitedException(note + trace, cause, procs[cause].pid, code,
                                     trace.rsplit(" ", 1)[-1] if code < 0 else None)
    raise ProcessRaisedException(f"\n\n{note}-- Process {cause} terminated with the following error:\n{trace}",
                                 cause, procs[cause].pid)


TEACHER_WEIGHTS_HELP = ("the teacher's weight file (a py: factory gets it as weights=PATH); a registry name without it "
                        "is randomly initialised (tests), with no warning")


def _parser() -> argparse.ArgumentParser:
    from .cli import _checked, _positive_float, _positive_int, _shard_seed, finite_float
    non_negative_int = _checked(int, lambda x: x >= 0, "an integer >= 0")
    non_negative_float = _checked(float, lambda x: 0 <= x < float("inf"), "a finite number >= 0")
    from .distill import LOSS_REDUCTION_HELP, LOSS_REDUCTIONS

    ap = argparse.ArgumentParser(prog="python -m ppap_fast.distributed", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="task", required=True)

    def common(p):
        p.add_argument("--nproc", type=int, default=1,
                       help="spawn this many gloo workers (without torchrun); under torchrun leave 1")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per process")
        p.add_argument("--timeout", type=_positive_float, default=1800.0, help="collective timeout, seconds")
        # seeds shard k with seed * stride + k
        p.add_argument("--seed", type=_shard_seed, default=0, help="random seed")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="progress bars (as ppap-fast's commands; --no-progress: none)")

    g = sub.add_parser("generate", help="data-free set: per-rank resumable shards + manifest")
    common(g)
    g.add_argument("--out", required=True, help="output directory (shard_NNNNN.npz + manifest.json)")
    g.add_argument("--num-images", type=_positive_int, required=True, help="images in the set")
    g.add_argument("--shard-size", type=_positive_int, default=250, help="images per shard file")
    g.add_argument("--batch-size", type=non_negative_int, default=0,
                   help="micro-batch inside a shard (0: the whole shard); a memory knob: the images do not depend on it "
                        "beyond float rounding")
    g.add_argument("--image-size", type=_positive_int, default=256, help="the denoiser's image side, pixels")
    g.add_argument("--channels", type=_positive_int, default=3, help="the denoiser's image channels")
    g.add_argument("--denoiser", default="adm:256x256_diffusion_uncond",
                   help="adm:<preset> | tiny | diffusers:PATH (a saved UNet2DModel or pipeline) | random-conv")
    g.add_argument("--checkpoint", default=None, help="the denoiser's weights (guided-diffusion .pt for adm:)")
    g.add_argument("--schedule", default="linear", help="the denoiser's noise schedule: linear | cosine")
    g.add_argument("--num-timesteps", type=_positive_int, default=1000, help="the denoiser's training T")
    g.add_argument("--respacing", default="ddim25", help="sampling steps: ddimN, N or comma-separated section counts")
    g.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM or ancestral DDPM")
    g.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM eta (0: deterministic)")
    g.add_argument("--teacher", default=None,
                   help="cache this teacher's outputs on the clean images: tiny:<file>, a registry name, "
                        "or py:package.module:factory (classifier logits float32, dense maps float16)")
    g.add_argument("--teacher-weights", default=None, help=TEACHER_WEIGHTS_HELP)
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="sample with FastGuidedSampler (fused update; on CUDA CUDA graphs, fused GroupNorm + SiLU); "
                        "--no-fast: the reference sample_loop (also what sets written before this option used). "
                        "Same random numbers; images may differ by float rounding, so it is part of the set's "
                        "configuration")

    d = sub.add_parser("distill", help="DDP distillation of PPAP experts on a data-free set")
    common(d)
    d.add_argument("--data", required=True, help="the data-free set written by generate")
    d.add_argument("--out", required=True, help="output directory (experts.safetensors + config.json)")
    d.add_argument("--teacher", required=True,
                   help="tiny:<file>, a registry name (resnet50, deit_s, deeplabv3_resnet50, ...) or "
                        "py:package.module:factory (any module, e.g. a depth network; see build_teacher)")
    d.add_argument("--teacher-weights", default=None, help=TEACHER_WEIGHTS_HELP)
    d.add_argument("--teacher-task", default=None, choices=list(TEACHER_TASKS),
                   help="override the teacher's task (chooses the default loss)")
    d.add_argument("--loss", default=None, choices=["kl", "pixel_kl", "mse"],
                   help="distillation loss (default: kl for classification, pixel_kl for segmentation, "
                        "mse for depth / regression)")
    d.add_argument("--loss-reduction", choices=LOSS_REDUCTIONS, default="expert_mean", help=LOSS_REDUCTION_HELP)
    d.add_argument("--amp", choices=list(AMP_MODES), default="none", help=AMP_HELP)
    d.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="write a resumable training state every N steps (0: never); a restart with the "
                        "same arguments resumes from it")
    d.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the whole training step in a CUDA graph (default: wherever it can, i.e. one "
                        "CUDA process; the eager step is launch-bound: an H100 ResNet50 bank step ran 3.6-4.4x "
                        "faster captured); --cuda-graph warns where it cannot, --no-cuda-graph trains eagerly")
    d.add_argument("--lora-kernels", choices=sorted(LORA_KERNELS), default="default",
                   help="implicit: train the experts' convs with the implicit-GEMM LoRA kernels (base conv once + "
                        "each sample's own expert; loralib convs as the equal rank r*k*k factorised LoRA) instead "
                        "of the default stacked / dense-delta convs; auto: each factorised conv layer takes the "
                        "fastest of its A stages, timed on the first step (CUDA; elsewhere the reference ops run); "
                        "lowrank / delta: loralib convs through their low-rank factors (the CPU default) / as N "
                        "dense per-expert deltas (the GPU default)")
    d.add_argument("--verify-data", action="store_true",
                   help="before training, read every shard whole once and check its zip CRC-32 (row reads skip it)")
    d.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="make each batch in the training loop instead of one step ahead on a thread")
    d.add_argument("--n-experts", type=_positive_int, default=5, help="number of timestep experts, a divisor of --num-timesteps")
    d.add_argument("--num-timesteps", type=_positive_int, default=1000, help="T of the diffusion the experts split")
    d.add_argument("--lora-r", dest="r", type=_positive_int, default=None, help="LoRA rank (default: the placement rule's)")
    d.add_argument("--lora-alpha", dest="alpha", type=finite_float, default=None,
                   help="LoRA alpha (default: the placement rule's)")
    d.add_argument("--layout", default=None, help="LoRA layout: factorised | loralib (default: the placement rule's)")
    d.add_argument("--steps", type=_positive_int, default=1000, help="training steps")
    d.add_argument("--batch-size", type=_positive_int, default=64, help="per rank")
    d.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW peak learning rate (linear decay to 0)")
    d.add_argument("--weight-decay", type=non_negative_float, default=0.05, help="AdamW weight decay")
    d.add_argument("--warmup", type=non_negative_int, default=50, help="steps of linear learning-rate warm-up")
    d.add_argument("--temperature", type=_positive_float, default=0.25,
                   help="temperature of the teacher's softmax in the kl / pixel_kl losses")
    d.add_argument("--dump-rank-states", default=None,
                   help="debugging: every rank writes its expert tensors into this directory")
    from .cli import _show_defaults

    from .cli import describe_subcommands

    for s in (g, d):
        _show_defaults(s)
    describe_subcommands(sub)
    return ap


def config_from_args(a) -> GenerateConfig | DistillConfig:
    if a.task == "generate":
        return GenerateConfig(a.out, a.num_images, a.shard_size, a.batch_size, a.seed, a.image_size, a.channels,
                              a.denoiser, a.checkpoint, a.schedule, a.num_timesteps, a.respacing, a.sampler, a.eta,
                              a.teacher, a.teacher_weights, a.device, fast=a.fast)
    return DistillConfig(a.data, a.out, a.teacher, a.teacher_weights, n_experts=a.n_experts,
                         num_timesteps=a.num_timesteps, r=a.r, alpha=a.alpha, layout=a.layout, steps=a.steps,
                         batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup=a.warmup,
                         temperature=a.temperature, seed=a.seed, device=a.device,
                         dump_rank_states=a.dump_rank_states, teacher_task=a.teacher_task, loss=a.loss,
                         checkpoint_every=a.checkpoint_every, cuda_graph=a.cuda_graph,
                         prefetch=a.prefetch, verify_data=a.verify_data, lora_kernels=a.lora_kernels,
                         loss_reduction=a.loss_reduction, amp=a.amp)


# what main() reports as one line (bad arguments, files, a failed rank); a spawned rank's by class name
_BAD_INPUT = (ValueError, OSError, DistributedRunError, ConfigMismatchError)
_BAD_INPUT_ERRORS = {c.__name__ for c in (*_BAD_INPUT, FileNotFoundError, FileExistsError, IsADirectoryError,
                                          NotADirectoryError, PermissionError)}


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    cfg = config_from_args(a)
    try:
        world = launch_env_vars()[1]
    except ValueError as e:
        print(f"python -m ppap_fast.distributed: error: {e}", file=sys.stderr)
        return 2
    under_torchrun = world > 1
    if a.nproc < 1:  # it ran one process without a word
        print(f"python -m ppap_fast.distributed: error: --nproc must be >= 1, got {a.nproc}", file=sys.stderr)
        return 2
    if under_torchrun and a.nproc not in (1, world):  # it ran WORLD_SIZE ranks without a word
        print(f"python -m ppap_fast.distributed: error: --nproc {a.nproc} under torchrun (WORLD_SIZE={world}): "
              "torchrun starts the ranks; leave --nproc out", file=sys.stderr)
        return 2
    if a.nproc > 1 and not under_torchrun:
        try:
            launch(a.task, cfg, a.nproc, threads=a.threads, timeout_s=a.timeout, progress=a.progress)
        except Exception as e:  # a rank's exception, re-raised with its traceback in the message
            last = _last_line(str(e))
            name, _, msg = last.partition(": ")
            if _is_peer_error(last):  # no rank raised: one hung (or was slow) and its peers timed out waiting
                also = next((ln[len(_ALSO_FAILED):] for ln in str(e).splitlines() if ln.startswith(_ALSO_FAILED)), "")
                print(f"python -m ppap_fast.distributed: error: a rank stopped answering within --timeout {a.timeout:g} s "
                      f"({' '.join(last.split())}{'; ' + also if also else ''}); raise --timeout if it was only slow",
                      file=sys.stderr)
                return 2
            if name.rsplit(".", 1)[-1] not in _BAD_INPUT_ERRORS:
                raise  # a bug: keep the traceback
            print(f"python -m ppap_fast.distributed: error: {' '.join(msg.split())}", file=sys.stderr)
            return 2
        print(f"{a.task}: done on {a.nproc} processes")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        env = init_distributed(a.device, timeout_s=a.timeout)
    except (RuntimeError, ValueError) as e:
        print(f"python -m ppap_fast.distributed: error: {e}", file=sys.stderr)
        return 2
    try:
        res = _TASKS[a.task](cfg, env, progress=a.progress)
    except _BAD_INPUT as e:
        # under torchrun too (every rank printed its traceback): a collective error, the same on every rank, once
        if not env.distributed or env.rank == 0 or not isinstance(e, (DistributedRunError, ConfigMismatchError)):
            where = f" (rank {env.rank})" if env.distributed else ""
            print(f"python -m ppap_fast.distributed: error{where}: {' '.join(str(e).split())}", file=sys.stderr)
        if not env.distributed:
            return 2
        dist.destroy_process_group()
        sys.stderr.flush()
        os._exit(2)  # as on success: no interpreter teardown (gloo's threads)
    except RuntimeError as e:
        if not env.distributed or not _is_peer_error(str(e)):
            raise
        print(f"python -m ppap_fast.distributed: error (rank {env.rank}): lost the other ranks: one hung past --timeout "
              f"{a.timeout:g} s or died (see its own error) ({_last_line(str(e))}); raise --timeout if it was only slow",
              file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # no destroy_process_group: its peers are gone
    else:
        if a.task == "generate":
            print(json.dumps(res))
    finally:
        if env.distributed:
            dist.destroy_process_group()
    if env.distributed:
        # every output is already written atomically; skipping interpreter teardown avoids an
        # intermittent std::terminate from gloo's threads seen in CI (SIGABRT at exit of one rank)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
