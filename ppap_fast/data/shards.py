"""Atomic file writes and resumable sharded image sets.

A shard set is a directory with ``shard_00000.npz ...`` (``images`` uint8 N x H x W x C and,
optionally, a teacher's outputs: ``logits`` float32 N x K for classifiers, ``targets`` float16
N x ... for dense guides) and ``manifest.json``. Every file is written to a temporary
name in the same directory and renamed into place, so a shard either exists completely or not at
all; a restarted run recomputes only missing shards, and shard k always holds the images of the
same seed (seed + k), so nothing is lost or duplicated.

Reading: :class:`ShardSet` is a lazy view of a complete set for training on sets far larger
than memory. It reads only the zip directory and the ``.npy`` headers of each shard, up front,
and records where each array's rows lie in the file; :meth:`ShardSet.gather` then reads exactly
the requested rows with positional reads (no memory map: a mapped page counts in the process's
RSS once touched, and every map holds a file descriptor). np.savez stores members uncompressed,
so this is the format the writers here produce; a compressed or Fortran-order member (written by
something else) is read whole, one shard at a time, with a warning. :func:`load_shards`
concatenates everything in memory (small sets and tests only).
"""
from __future__ import annotations

import errno
import glob
import json
import numbers
import os
import re
import struct
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

MANIFEST = "manifest.json"


def fsync_dir(directory) -> None:
    """Make a rename in ``directory`` durable; best effort (some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path, write_fn, suffix: str):
    """Write ``path`` via ``write_fn(tmp)`` on a temporary name ``.<name>.*<suffix>.tmp`` beside it,
    fsynced, then renamed into place (and the directory fsynced): after a crash or a power loss the
    file is the old one or the complete new one, never empty or partial."""
    path = Path(path)
    if path.is_symlink():  # os.replace replaced the link by a file, the linked one kept the old contents
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        full = isinstance(e, Exception) and _disk_full(path.parent, e)  # before the temporary frees its space
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if full:  # torch.save / safetensors say "unexpected pos" / SafetensorError, np.savez names no file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    return path


DISK_FULL_BYTES = 1 << 20  # a failed write that left less free space than this ran out of it


def says_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or quota) is full: an OSError by its errno, else by the text torch /
    safetensors (or a wrapping error) carry."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(error) or "os error 28" in str(error)


def _disk_full(folder: Path, error: Exception) -> bool:
    """Whether ``error``, raised while writing into ``folder``, came from a full disk."""
    if says_disk_full(error):
        return True
    if isinstance(error, OSError):
        return False
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return st.f_bavail * st.f_frsize < DISK_FULL_BYTES


def remove_stale_tmp(path, suffix: str) -> None:
    """Remove the temporaries :func:`_atomic` left for ``path`` when killed (SIGKILL: no cleanup ran);
    only its exact ``.<name>.<8 mkstemp characters><suffix>.tmp`` names."""
    path = Path(path)
    name = re.compile(re.escape(f".{path.name}.") + "[a-z0-9_]{8}" + re.escape(suffix + ".tmp"))
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if name.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def write_npz_atomic(path, **arrays) -> Path:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return _atomic(path, w, ".npz")


def write_json_atomic(path, obj, sort_keys: bool = False) -> Path:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
    return _atomic(path, w, ".json")


_JSON_KIND_NAMES = {dict: "a JSON object", list: "a JSON list", int: "an integer", str: "a string",
                    float: "a number"}


def read_json_object(path, what: str, advice: str = "regenerate or fix the file") -> dict:
    """The JSON object in the UTF-8 file ``path``; a one-line error naming ``what`` and the file when it is
    missing, or not valid JSON or not a JSON object (those two end in ``advice``: what to do)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # their messages named no file
        raise ValueError(f"{what} {path} is not valid JSON ({e}): {advice}") from None
    if not isinstance(obj, dict):  # a list: .get was an AttributeError
        raise ValueError(f"{what} {path} must hold a JSON object, got {_json_kind_name(type(obj))}: {advice}")
    return obj


def read_existing_manifest(m: Path) -> dict:
    """The JSON object in the manifest ``m`` a writer is about to resume; a one-line ValueError (remove it or use
    another directory) when it is not valid JSON or not an object (``.get`` on it was an AttributeError)."""
    try:
        old = json.loads(m.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{m} is not valid JSON ({e}); remove it or use another directory") from None
    if not isinstance(old, dict):
        raise ValueError(f"{m} is not a shard set manifest (a JSON {type(old).__name__}); remove it or use "
                         "another directory")
    return old


def json_field(obj: dict, dotted: str, path, what: str, kind: type | tuple | None = None):
    """``obj[a][b]...`` for ``dotted`` = "a.b..."; a one-line ValueError naming ``what``, the file and the
    entry when it is missing or (with ``kind``) not of that type."""
    value = obj
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"{what} {path} has no {dotted!r} entry: regenerate or fix the file")
        value = value[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):  # JSON true is no int
        want = " or ".join(_json_kind_name(k) for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{what} {path}: entry {dotted!r} must be {want}, got {value!r:.80}")
    return value


def json_shape_map(obj: dict, dotted: str, path, what: str) -> dict[str, tuple[int, ...]]:
    """The {name: shape list} entry ``dotted`` as {name: tuple}, refusing any shape that is not a list of ints."""
    shapes = json_field(obj, dotted, path, what, dict)
    bad = [k for k, v in shapes.items()
           if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in v)]
    if bad:
        raise ValueError(f"{what} {path}: entry {dotted!r} must map names to shape lists of ints; {len(bad)} do "
                         f"not (e.g. {bad[0]!r}: {shapes[bad[0]]!r:.80})")
    return {k: tuple(v) for k, v in shapes.items()}


def _json_kind_name(t: type) -> str:
    return _JSON_KIND_NAMES.get(t, f"a {t.__name__}")


def save_figure_atomic(fig, path, **savefig_kwargs) -> Path:
    """``fig.savefig`` as a PNG written atomically (a killed run left a truncated PNG in place of the last one)."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs), ".png")


def save_safetensors_atomic(path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), ".safetensors")


class NpzMember(NamedTuple):
    """Where one array of an npz file lies: ``offset`` of its first data byte in the file (None:
    stored compressed or in Fortran order, so it can only be read whole), its shape and dtype."""
    path: Path
    name: str
    offset: int | None
    shape: tuple
    dtype: np.dtype


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header (30 bytes)


def npz_members(path) -> dict[str, NpzMember]:
    """The arrays of an npz file from its zip directory and ``.npy`` headers only (no data is
    read). Raises ValueError for a file that is not a readable npz (truncated: no zip directory)
    or whose headers do not add up."""
    path = Path(path)
    out = {}
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with z.open(info) as m:  # the npy header, through zipfile (any compression)
                    major, _ = np.lib.format.read_magic(m)
                    if major not in (1, 2):
                        raise ValueError(f"member {info.filename}: npy format version {major} is not supported")
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read(m)
                    header_len = m.tell()
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                offset = None
                if info.compress_type == zipfile.ZIP_STORED and not (fortran and len(shape) > 1) \
                        and not dtype.hasobject:
                    f.seek(info.header_offset)
                    sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                    if sig != b"PK\x03\x04":
                        raise ValueError(f"member {info.filename}: bad local header")
                    if header_len + nbytes != info.file_size:
                        raise ValueError(f"member {info.filename}: {info.file_size} bytes stored, its header "
                                         f"describes {header_len + nbytes}")
                    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + header_len
                out[name] = NpzMember(path, name, offset, tuple(shape), dtype)
    except (OSError, zipfile.BadZipFile, EOFError, struct.error, ValueError, zlib.error,
            NotImplementedError, RuntimeError) as e:  # damaged directory: unknown method, "encrypted" flag
        raise ValueError(f"{path} is not a readable npz shard ({type(e).__name__}: {e})") from None
    return out


def zip_member_crcs(path) -> str:
    """Every member's name and CRC-32 as the zip directory of ``path`` records them ("name:crc,..."), no data read:
    a file replaced by another with the same arrays' shapes changes it. ValueError for no readable zip."""
    try:
        with zipfile.ZipFile(path) as z:
            return ",".join(f"{i.filename}:{i.CRC:08x}" for i in z.infolist())
    except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable npz shard ({type(e).__name__}: {e})") from None


def crc_problem(path) -> str | None:
    """Read the zip file ``path`` whole and check every member's CRC-32: None if all pass, else what failed."""
    try:
        with zipfile.ZipFile(path) as z:
            first = z.testzip()
        if first is not None:
            return f"member {first} fails its CRC-32 check"
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def shard_is_complete(path: Path, count: int) -> bool:
    """Cheap check (zip directory + npy headers, no data read: a resume over thousands of large
    shards must not re-read them): a readable npz with ``count`` uint8 images. Atomic renames
    mean a shard is never half-written by us; a truncated file has no zip directory."""
    try:
        im = npz_members(path).get("images")
    except ValueError:
        return False
    return im is not None and len(im.shape) == 4 and im.shape[0] == count and im.dtype == np.uint8


def nothing_written_yet(directory, manifest: dict) -> bool:
    """An unfinished set without a single shard: its recorded settings made nothing that another run could mix with."""
    return manifest.get("complete") is False and not any(Path(directory).glob("shard_*.npz"))


_LAYOUT_KEYS = ("num_images", "shard_size", "num_shards", "complete", "shards")  # what write_manifest sets


def _in_user_terms(fn, there, now) -> str:
    said = (fn(there), fn(now)) if fn is not None else (None, None)
    return f" ({said[0]} there vs {said[1]} now)" if None not in said else ""


class ShardWriter:
    """Resumable writer: ``run(make_shard)`` calls ``make_shard(k)`` only for missing shards."""

    def __init__(self, directory, num_images: int, shard_size: int, meta: dict | None = None,
                 user_terms: dict | None = None):
        """``user_terms``: {meta key: fn(value) -> how the caller's user sets it (e.g. ``--steps 25``) or None},
        named beside the key when a rerun's settings differ."""
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 for v in (num_images, shard_size)):
            # 3.5 images became 3 silently
            raise ValueError(f"num_images and shard_size must be positive ints, got {num_images!r}, {shard_size!r}")
        self.dir = Path(directory)
        self.num_images = int(num_images)
        self.shard_size = int(shard_size)
        self.meta = dict(meta or {})
        self.num_shards = -(-self.num_images // self.shard_size)
        self._complete_on_disk = False  # the manifest there says complete: not rewritten while nothing changes
        self._kept = {}  # keys of the manifest there that this writer does not know (another version's): kept
        self.dir.mkdir(parents=True, exist_ok=True)
        m = self.dir / MANIFEST
        if m.exists():
            old = read_existing_manifest(m)
            if old.get("format") != self.meta.get("format"):  # another writer's set: never adopt it (and rewrite
                # its manifest as ours, dropping its configuration)
                raise ValueError(f"{self.dir} holds a shard set written by another tool (format="
                                 f"{old.get('format')!r}, not {self.meta.get('format')!r}); use another directory")
            # a run that failed or was stopped before its first shard (a NaN teacher, a wrong image_shape) left
            # only its manifest: nothing to keep, so the corrected arguments start afresh (they were refused)
            nothing_written = nothing_written_yet(self.dir, old)
            if not nothing_written and not all(isinstance(old.get(k), int) for k in ("num_images", "shard_size")):
                # {"complete": true} was "holds a shard set with num_images=None": the reader's words instead
                raise ValueError(f"{m} is not a shard set manifest (no num_images / shard_size); "
                                 "remove it or use another directory")
            for key in ("num_images", "shard_size"):  # a bool: true == 1
                if (isinstance(old.get(key), bool) or old.get(key) != getattr(self, key)) and not nothing_written:
                    raise ValueError(f"{self.dir} holds a shard set with {key}={old.get(key)}, "
                                     f"not {getattr(self, key)}; use another directory")
            # everything else that determines the shards (seed, sampler, model fingerprints): keys an
            # older manifest lacks are not compared, so sets written before they were recorded still finish
            diff = [f"{k}: {old[k]!r} there vs {v!r} now{_in_user_terms((user_terms or {}).get(k), old[k], v)}"
                    for k, v in self.meta.items() if k in old and old[k] != v and not nothing_written]
            if diff:
                raise ValueError(f"{self.dir} holds a shard set made with other settings ({'; '.join(diff)}); "
                                 "use the same arguments or another directory")
            if not nothing_written:  # its shards were not made with this run's values of the keys it lacks: a
                # rewrite recorded them as the whole set's (and changed a finished set's bytes, distill's identity)
                self._kept = {k: v for k, v in old.items() if k not in self.meta and k not in _LAYOUT_KEYS}
                self.meta = {k: v for k, v in self.meta.items() if k in old}
                self._complete_on_disk = old.get("complete") is True
        elif any(self.dir.glob("shard_*.npz")):  # the manifest is written before any shard: these are of unknown
            # seed / models, and were adopted as this run's (recorded with its settings) when their size matched
            raise ValueError(f"{self.dir} holds shards but no {MANIFEST}: which settings made them is unknown; "
                             "remove them or use another directory")
        for p in self.dir.iterdir():  # temporaries of a killed write (see _atomic): shards' and manifest's
            if p.name.startswith((".shard_", f".{MANIFEST}.")) and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)

    def shard_path(self, k: int) -> Path:
        return self.dir / f"shard_{k:05d}.npz"

    def shard_count(self, k: int) -> int:
        return min(self.shard_size, self.num_images - k * self.shard_size)

    def is_complete(self, k: int) -> bool:
        return shard_is_complete(self.shard_path(k), self.shard_count(k))

    def missing(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.is_complete(k)]

    def write_manifest(self, complete: bool) -> None:
        """A finished set keeps its manifest byte for byte (its hash is what distill's state records)."""
        if complete and self._complete_on_disk:
            return
        self._complete_on_disk = complete
        write_json_atomic(self.dir / MANIFEST, {
            **self._kept, **self.meta, "num_images": self.num_images, "shard_size": self.shard_size,
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
            im = arrays.get("images")
            # what shard_is_complete / ShardSet accept: N x H x W images were written and the set marked complete,
            # yet every rerun counted them missing and reading refused them
            if im is None or im.ndim != 4 or im.shape[0] != n or im.dtype != np.uint8:
                raise ValueError(f"shard {k}: expected {n} uint8 images N x H x W x C, got "
                                 + ("no 'images'" if im is None else f"{im.shape} {im.dtype}"))
            short = {name: np.shape(a) for name, a in arrays.items() if np.ndim(a) and np.shape(a)[0] != n}
            if short:  # rows that do not line up with the images would pair images with others' outputs
                raise ValueError(f"shard {k}: every array needs {n} rows like the images, got {short}")
            write_npz_atomic(self.shard_path(k), **arrays)
        self.write_manifest(complete=True)
        return todo


def _read_manifest(d: Path) -> dict:
    m = d / MANIFEST
    if not m.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {d}: not a shard set")
    man = read_json_object(m, "shard set manifest", advice="not a readable shard set; write it again with `generate`")
    # a manifest without these (KeyError) failed with a traceback
    if not isinstance(man.get("shards"), list) \
            or not all(isinstance(n, str) for n in man["shards"]) or not isinstance(man.get("num_images"), int) \
            or isinstance(man["num_images"], bool):  # true passed as 1 image
        raise ValueError(f"{m} is not a shard set manifest (no shards list / num_images)")
    if not isinstance(man.get("config", {}), dict):  # its readers' .get("config", {}).get(...) was an AttributeError
        raise ValueError(f"{m} is damaged (its 'config' is a JSON {type(man['config']).__name__}, not an object)")
    names = [os.path.normpath(n) for n in man["shards"]]
    if not names or man["num_images"] <= 0:  # no writer makes one; ShardSet's shards[0] was an IndexError
        raise ValueError(f"{m} is damaged: it lists {len(names)} shards and {man['num_images']} images")
    if len(set(names)) != len(names):  # a hand-edited list: that shard's rows were counted twice
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{m} is damaged: it lists shard(s) {dup} more than once")
    if not man.get("complete"):
        raise ValueError(f"shard set {d} is incomplete: rerun `generate` to finish it")
    return man


def _shard_members(path: Path) -> dict[str, NpzMember]:
    """npz_members of a set's shard; unreadable (a flipped byte in a shard under 4 KiB fails its CRC-32 here): what
    rewrites it, as the CRC-32 check says."""
    try:
        return npz_members(path)
    except ValueError as e:
        fix = "remove it and rerun" if path.exists() else "rerun"
        raise ValueError(f"{e}; {fix} generate with the set's arguments: it rewrites missing shards") from None


class ShardSet:
    """A complete shard set read lazily: ``len(s)`` images, ``s.gather(name, rows)`` reads just
    those rows of array ``name`` (``images``, ``logits``, ``targets``, ...) from the shards.

    Opening scans each shard's zip directory and npy headers (see the module docstring); the set
    holds only that index, never the arrays. ``attach(name, paths)`` adds an array kept in other
    files with the same shard layout (e.g. teacher outputs computed later). ``bytes_read``
    counts the data bytes read so far (tests use it to check that only the needed rows are read).
    """

    def __init__(self, directory):
        self.dir = Path(directory)
        man = _read_manifest(self.dir)
        self.manifest = man
        paths = [self.dir / name for name in man["shards"]]
        shards = [_shard_members(p) for p in paths]
        counts = []
        for p, members in zip(paths, shards):
            im = members.get("images")
            if im is None or len(im.shape) != 4 or im.dtype != np.uint8:
                raise ValueError(f"{p} holds no uint8 N x H x W x C images")
            counts.append(im.shape[0])
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        if self.starts[-1] != man["num_images"]:
            raise ValueError(f"shard set {self.dir} holds {self.starts[-1]} images, manifest says {man['num_images']}")
        self._members: dict[str, list[NpzMember]] = {}
        for name in shards[0]:
            self._add(name, [m.get(name) for m in shards], paths)
        for p, members in zip(paths[1:], shards[1:]):  # an array shard 0 lacks was dropped without a word
            extra = sorted(set(members) - set(shards[0]))
            if extra:
                raise ValueError(f"{p} has array(s) {extra} that shard {paths[0].name} lacks")
        self.bytes_read = 0
        self._whole: tuple | None = None  # (member, array): the last member read whole (fallback)
        self._warned = False

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def names(self) -> list[str]:
        return list(self._members)

    def __contains__(self, name) -> bool:
        return name in self._members

    def row_shape(self, name) -> tuple:
        return self._members[name][0].shape[1:]

    def dtype(self, name) -> np.dtype:
        return self._members[name][0].dtype

    def _add(self, name, members, paths):
        first = members[0]
        for p, m, n in zip(paths, members, self.counts):
            if m is None:
                raise ValueError(f"{p} has no array {name!r} (shard {paths[0].name} has one)")
            if not m.shape or m.shape[0] != n or m.shape[1:] != first.shape[1:] or m.dtype != first.dtype:
                raise ValueError(f"{p}: {name!r} is {m.shape} {m.dtype}, expected {(int(n), *first.shape[1:])} "
                                 f"{first.dtype} like the other shards")
        self._members[name] = members

    def attach(self, name: str, paths) -> None:
        """Add array ``name`` from npz files ``paths``, one per shard, with the shards' row counts."""
        paths = [Path(p) for p in paths]
        if len(paths) != len(self.counts):
            raise ValueError(f"{len(paths)} files for {len(self.counts)} shards")
        self._add(name, [npz_members(p).get(name) for p in paths], paths)

    def gather(self, name: str, rows) -> np.ndarray:
        """Rows ``rows`` (ints in [0, len)) of array ``name``, in that order (repeats allowed)."""
        if name not in self._members:
            raise KeyError(f"shard set {self.dir} has no array {name!r} (it has {self.names})")
        rows = np.asarray(rows)
        if rows.size and not np.issubdtype(rows.dtype, np.integer):  # no silent 1.7 -> 1, no mask -> rows 0/1
            raise TypeError(f"rows must be integer indices, got {rows.dtype}")
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range [0, {len(self)})")
        members = self._members[name]
        out = np.empty((rows.size, *self.row_shape(name)), self.dtype(name))
        if out.size == 0:
            return out
        flat = out.reshape(rows.size, -1).view(np.uint8)  # one writable byte row per requested row
        row_bytes = flat.shape[1]
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(rows, kind="stable")  # by shard, then position in the file
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for group in np.split(order, bounds):
            k = int(shard[group[0]])
            local = rows[group] - self.starts[k]
            m = members[k]
            if m.offset is None:
                out[group] = self._read_whole(m)[local]
                continue
            with open(m.path, "rb", buffering=0) as f:
                for pos, r in zip(group, local):
                    f.seek(m.offset + int(r) * row_bytes)
                    buf = flat[pos]
                    got = 0
                    while got < row_bytes:  # regular files return everything; loop on short reads anyway
                        n = f.readinto(buf[got:])
                        if not n:
                            raise ValueError(f"{m.path}: {name!r} ends early (file changed or damaged)")
                        got += n
            self.bytes_read += row_bytes * len(group)
        return out

    def files(self) -> list[Path]:
        """Every file the set reads (its shards and attached files), in shard order, once each."""
        seen: dict[Path, None] = {}
        for members in self._members.values():
            for m in members:
                seen.setdefault(Path(m.path), None)
        return list(seen)

    def verify(self, files=None, progress: bool = False, stop=None) -> list[str]:
        """Read ``files`` (default: all of :meth:`files`) whole once and check every member's zip
        CRC-32, in constant memory: row reads skip it (they read only their rows), so a damaged
        shard would otherwise feed training wrong bytes silently. Returns one line per damaged file.
        ``stop()``, if given, is asked before each file: True ends the check there (another rank failed)."""
        files = self.files() if files is None else [Path(f) for f in files]
        it = files
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(files, desc="verifying shards", unit="file")
        bad = []
        for f in it:
            if stop is not None and stop():
                break
            problem = crc_problem(f)
            if problem is not None:
                bad.append(f"{f}: {problem}")
        return bad

    def _read_whole(self, m: NpzMember) -> np.ndarray:
        if self._whole is None or self._whole[0] != m:
            if not self._warned:
                warnings.warn(f"{m.path}: {m.name!r} is compressed or Fortran-ordered; reading it whole "
                              "(write shards with np.savez to read single rows)", stacklevel=3)
                self._warned = True
            with np.load(m.path) as z:
                self._whole = (m, z[m.name])
            self.bytes_read += self._whole[1].nbytes
        return self._whole[1]


def load_shards(directory) -> dict[str, np.ndarray]:
    """Concatenate all shards of a complete set (raises if incomplete). Everything is read into
    memory: for small sets and tests; training reads through :class:`ShardSet`."""
    d = Path(directory)
    man = _read_manifest(d)
    parts: dict[str, list] = {}
    for name in man["shards"]:
        with np.load(d / name) as z:
            arrays = {k: z[k] for k in z.files}
        n = arrays["images"].shape[0] if "images" in arrays and arrays["images"].ndim else None
        for k, v in arrays.items():
            first = parts[k][0] if k in parts else v
            # checked per shard as ShardSet does: rows short in one shard and long in another added up
            # (every row in between paired with a neighbour's), and float16 / float32 shards were upcast silently
            if not v.ndim or (n is not None and v.shape[0] != n) or v.shape[1:] != first.shape[1:] \
                    or v.dtype != first.dtype:
                want = (n if n is not None else v.shape[0] if v.ndim else "N", *first.shape[1:])
                raise ValueError(f"{d / name}: {k!r} is {v.shape} {v.dtype}, expected {want} {first.dtype} "
                                 "(the shard's image count, the other shards' rows)")
            parts.setdefault(k, []).append(v)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if "images" not in out:
        raise ValueError(f"shard set {d} holds no images")
    for k, v in out.items():  # an array missing from a shard, or short there, would shift every later row
        if len(parts[k]) != len(man["shards"]) or v.shape[0] != man["num_images"]:
            raise ValueError(f"shard set {d}: {k!r} is in {len(parts[k])} of {len(man['shards'])} shards with "
                             f"{v.shape[0]} rows, manifest says {man['num_images']} images")
    return out
