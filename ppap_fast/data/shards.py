"""Atomic file writes and resumable sharded image sets.

A shard set is a directory with ``shard_00000.npz ...`` (``images`` uint8 N x H x W x C and,
optionally, a teacher's outputs: ``logits`` float32 N x K for classifiers, ``targets`` float16
N x ... for dense guides) and ``manifest.json``. Every file is written to a temporary
name in the same directory and renamed into place, so a shard either exists completely or not at
all; a restarted run recomputes only missing shards, and shard k always holds the images of the
same seed (seed + k), so nothing is lost or duplicated.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


def _atomic(path, write_fn, suffix: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_npz_atomic(path, **arrays) -> Path:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return _atomic(path, w, ".npz")


def write_json_atomic(path, obj, sort_keys: bool = False) -> Path:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
    return _atomic(path, w, ".json")


def save_safetensors_atomic(path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), ".safetensors")


def shard_is_complete(path: Path, count: int) -> bool:
    """Cheap check (zip directory + npy header, no data read: a resume over thousands of large
    shards must not re-read them): a readable npz with ``count`` uint8 images. Atomic renames
    mean a shard is never half-written by us; a truncated file has no zip directory."""
    try:
        with zipfile.ZipFile(path) as z:
            with z.open("images.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
        return len(shape) == 4 and shape[0] == count and dtype == np.uint8
    except Exception:
        return False


class ShardWriter:
    """Resumable writer: ``run(make_shard)`` calls ``make_shard(k)`` only for missing shards."""

    def __init__(self, directory, num_images: int, shard_size: int, meta: dict | None = None):
        if num_images <= 0 or shard_size <= 0:
            raise ValueError("num_images and shard_size must be positive")
        self.dir = Path(directory)
        self.num_images = int(num_images)
        self.shard_size = int(shard_size)
        self.meta = dict(meta or {})
        self.num_shards = -(-self.num_images // self.shard_size)
        self.dir.mkdir(parents=True, exist_ok=True)
        m = self.dir / MANIFEST
        if m.exists():
            old = json.loads(m.read_text())
            for key in ("num_images", "shard_size"):
                if old.get(key) != getattr(self, key):
                    raise ValueError(f"{self.dir} holds a shard set with {key}={old.get(key)}, "
                                     f"not {getattr(self, key)}; use another directory")

    def shard_path(self, k: int) -> Path:
        return self.dir / f"shard_{k:05d}.npz"

    def shard_count(self, k: int) -> int:
        return min(self.shard_size, self.num_images - k * self.shard_size)

    def is_complete(self, k: int) -> bool:
        return shard_is_complete(self.shard_path(k), self.shard_count(k))

    def missing(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.is_complete(k)]

    def write_manifest(self, complete: bool) -> None:
        write_json_atomic(self.dir / MANIFEST, {
            **self.meta, "num_images": self.num_images, "shard_size": self.shard_size,
            "num_shards": self.num_shards, "complete": complete,
            "shards": [self.shard_path(k).name for k in range(self.num_shards)],
        })

    def run(self, make_shard, progress: bool = False) -> list[int]:
        """Write every missing shard; returns the indices written in this call."""
        todo = self.missing()
        self.write_manifest(complete=not todo)
        it = todo
        if progress and todo:
            from tqdm import tqdm
            it = tqdm(todo, desc="shards", unit="shard")
        for k in it:
            arrays = make_shard(k)
            n = self.shard_count(k)
            if arrays["images"].shape[0] != n or arrays["images"].dtype != np.uint8:
                raise ValueError(f"shard {k}: expected {n} uint8 images, got {arrays['images'].shape} "
                                 f"{arrays['images'].dtype}")
            write_npz_atomic(self.shard_path(k), **arrays)
        self.write_manifest(complete=True)
        return todo


def load_shards(directory) -> dict[str, np.ndarray]:
    """Concatenate all shards of a complete set (raises if incomplete)."""
    d = Path(directory)
    m = d / MANIFEST
    if not m.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {d}: not a shard set")
    man = json.loads(m.read_text())
    if not man.get("complete"):
        raise ValueError(f"shard set {d} is incomplete: rerun `generate` to finish it")
    parts: dict[str, list] = {}
    for name in man["shards"]:
        with np.load(d / name) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if out["images"].shape[0] != man["num_images"]:
        raise ValueError(f"shard set {d} holds {out['images'].shape[0]} images, manifest says {man['num_images']}")
    return out
