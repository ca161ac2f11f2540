import numpy as np
import pytest
import torch

from ppap_fast.data import (DigitsSplits, ShardWriter, from_uint8, load_digits_16, load_shards, random_shift,
                            to_uint8, values_to_unit)


def test_polarity_mapping_is_linear_and_not_inverted():
    v = values_to_unit(np.array([0, 8, 16]))
    assert torch.allclose(v, torch.tensor([-1.0, 0.0, 1.0]))
    x, y = load_digits_16()
    assert x.shape == (1797, 1, 16, 16) and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    # background (corners) is -1, ink is bright: most pixels dark, the centre brighter than the border
    assert bool((x[:, :, 0, 0] == -1).all())
    assert float(x.mean()) < -0.3
    assert float(x[:, :, 5:11, 5:11].mean()) > float(x[:, :, :2, :].mean())


def test_uint8_round_trip_and_layout():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (3, 16, 16, 1)
    assert to_uint8(torch.full((1, 1, 2, 2), -1.0)).max() == 0
    assert to_uint8(torch.full((1, 1, 2, 2), 1.0)).min() == 255
    assert float((from_uint8(u) - x).abs().max()) <= 1 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="expected uint8 N x H x W x C, got float32"):
        from_uint8(u.astype(np.float32))


def test_to_uint8_truncate_is_guided_diffusions_quantisation():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 1, 8)
    official = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(to_uint8(x, truncate=True), official)
    assert to_uint8(x, truncate=True).ravel().tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    assert to_uint8(x).ravel().tolist() == [0, 0, 0, 128, 191, 255, 255, 255]  # the demo's files: rounded
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(torch.full((1, 1, 1, 1), float("nan")), truncate=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_to_uint8_refuses_non_finite_images(bad):
    # NaN -> uint8 was 0 (a plausible black pixel) and +-Inf clamped to a saturated one: a diverged
    # sample became a valid-looking image in a shard (distill's data-free generation has no own check)
    x = torch.zeros(2, 1, 4, 4)
    x[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(x)


def test_seeded_split_is_disjoint_and_deterministic():
    a, b = DigitsSplits.create(0), DigitsSplits.create(0)
    sizes = [a.diffusion[0].shape[0], a.classifier[0].shape[0], a.eval[0].shape[0]]
    assert sizes == [900, 500, 397]
    assert torch.equal(a.eval[0], b.eval[0])
    other = DigitsSplits.create(1).eval[0]
    assert torch.isfinite(other).all() and not torch.equal(other, a.eval[0])
    flat = lambda t: {bytes(r.numpy().tobytes()) for r in t.flatten(1)}  # noqa: E731
    assert not (flat(a.eval[0]) & flat(a.classifier[0]))


def test_random_shift_pads_with_background():
    x = torch.ones(8, 1, 16, 16)
    s = random_shift(x, 1, generator=torch.Generator().manual_seed(0))
    assert s.shape == x.shape
    assert set(s.unique().tolist()) <= {-1.0, 1.0}
    assert float((s == -1).float().sum(dim=(1, 2, 3)).max()) <= 31


def _shard(k, n):
    return {"images": np.full((n, 4, 4, 1), k, np.uint8), "logits": np.full((n, 3), k, np.float32)}


def test_shard_resume_after_interruption(tmp_path):
    calls = []

    def make(k):
        calls.append(k)
        if k == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # the run dies while making shard 2
        return _shard(k, w.shard_count(k))

    w = ShardWriter(tmp_path / "s", num_images=23, shard_size=5)
    with pytest.raises(KeyboardInterrupt):
        w.run(make)
    assert w.missing() == [2, 3, 4]
    assert not list((tmp_path / "s").glob("*.tmp"))
    with pytest.raises(ValueError, match="incomplete"):
        load_shards(tmp_path / "s")
    w2 = ShardWriter(tmp_path / "s", num_images=23, shard_size=5)
    assert w2.run(make) == [2, 3, 4]
    data = load_shards(tmp_path / "s")
    assert data["images"].shape == (23, 4, 4, 1)
    counts = np.bincount(data["images"][:, 0, 0, 0], minlength=5)
    assert counts.tolist() == [5, 5, 5, 5, 3]  # nothing lost, nothing duplicated
    assert w2.run(make) == []  # a complete set is left alone
    with pytest.raises(ValueError, match="num_images=23, not 24"):
        ShardWriter(tmp_path / "s", num_images=24, shard_size=5)


def test_shard_writer_removes_stale_manifest_temporaries(tmp_path):
    # only the shards' temporaries were removed on resume: a killed manifest write stayed forever
    w = ShardWriter(tmp_path, num_images=10, shard_size=5)
    w.run(lambda k: _shard(k, 5))
    stale = [tmp_path / ".manifest.json.k2j4x.json.tmp", tmp_path / ".shard_00001.npz.a8f.npz.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    ShardWriter(tmp_path, num_images=10, shard_size=5)
    assert not any(p.exists() for p in stale) and (tmp_path / "notes.tmp").exists()


@pytest.mark.parametrize("writer", ["json", "npz", "safetensors"])
def test_atomic_writes_fsync_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch, writer):
    # nothing was fsynced: a power loss after the rename could leave a renamed but empty file
    import os
    import stat

    from ppap_fast.data import shards

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync_dir" if stat.S_ISDIR(st.st_mode) else "fsync", st.st_ino))
        if stat.S_ISDIR(st.st_mode):
            raise OSError(22, "directory fsync unsupported here")  # best effort: must not fail the write
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / f"out.{writer}"
    if writer == "json":
        shards.write_json_atomic(path, {"a": 1})
    elif writer == "npz":
        shards.write_npz_atomic(path, images=np.zeros((2, 4, 4, 1), np.uint8))
    else:
        shards.save_safetensors_atomic(path, {"w": torch.ones(3)})
    ino, dir_ino = path.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", ino), ("replace", ino), ("fsync_dir", dir_ino)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_shard_arrays_must_line_up_with_the_images(tmp_path):
    # only the images' row count was checked: logits one row short were written, and load_shards
    # concatenated them, pairing every later image with its neighbour's logits
    w = ShardWriter(tmp_path / "w", num_images=10, shard_size=5)
    with pytest.raises(ValueError, match="every array needs 5 rows"):
        w.run(lambda k: {**_shard(k, 5), "logits": np.zeros((4, 3), np.float32)})
    w.run(lambda k: _shard(k, 5))
    from ppap_fast.data import write_npz_atomic

    write_npz_atomic(w.shard_path(0), images=np.zeros((5, 4, 4, 1), np.uint8))  # a shard without logits
    with pytest.raises(ValueError, match="'logits' is in 1 of 2 shards"):
        load_shards(tmp_path / "w")


def test_load_shards_checks_each_shard_like_shard_set(tmp_path):
    # only the totals were checked: logits 4 rows in shard 0 and 6 in shard 1 added up to the images' 10, pairing
    # image 4 with shard 1's first logits; float16 and float32 shards were upcast together without a word
    from ppap_fast.data import write_npz_atomic

    w = ShardWriter(tmp_path, num_images=10, shard_size=5)
    w.run(lambda k: _shard(k, 5))
    images = {k: np.full((5, 4, 4, 1), k, np.uint8) for k in (0, 1)}
    write_npz_atomic(w.shard_path(0), images=images[0], logits=np.zeros((4, 3), np.float32))
    write_npz_atomic(w.shard_path(1), images=images[1], logits=np.ones((6, 3), np.float32))
    with pytest.raises(ValueError, match=r"shard_00000.npz: 'logits' is \(4, 3\) float32, expected \(5, 3\)"):
        load_shards(tmp_path)
    write_npz_atomic(w.shard_path(0), images=images[0], logits=np.zeros((5, 3), np.float16))
    write_npz_atomic(w.shard_path(1), images=images[1], logits=np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match=r"shard_00001.npz: 'logits' is \(5, 3\) float32, expected \(5, 3\) float16"):
        load_shards(tmp_path)
    write_npz_atomic(w.shard_path(1), images=images[1], logits=np.ones((5, 3), np.float16))
    assert load_shards(tmp_path)["logits"].dtype == np.float16

def test_shard_writer_refuses_images_that_its_own_check_counts_missing(tmp_path):
    # N x H x W images (no channel axis) were written and the set marked complete, but shard_is_complete (a
    # rerun) counted every shard missing and ShardSet refused the set; a shard without images was a KeyError
    from ppap_fast.data import ShardSet

    w = ShardWriter(tmp_path, num_images=4, shard_size=2)
    with pytest.raises(ValueError, match=r"shard 0: expected 2 uint8 images N x H x W x C, got \(2, 4, 4\) uint8"):
        w.run(lambda k: {"images": np.zeros((2, 4, 4), np.uint8)})
    with pytest.raises(ValueError, match="shard 0: expected 2 uint8 images N x H x W x C, got no 'images'"):
        w.run(lambda k: {"logits": np.zeros((2, 3), np.float32)})
    assert not list(tmp_path.glob("shard_*.npz"))
    w.run(lambda k: {"images": np.zeros((2, 4, 4, 1), np.uint8)})
    assert w.missing() == [] and len(ShardSet(tmp_path)) == 4

def test_corrupt_shard_is_redone(tmp_path):
    w = ShardWriter(tmp_path, num_images=10, shard_size=5)
    w.run(lambda k: _shard(k, 5))
    w.shard_path(1).write_bytes(b"garbage")
    assert w.missing() == [1]
    assert w.run(lambda k: _shard(k, 5)) == [1]
    assert load_shards(tmp_path)["images"].shape[0] == 10


# ----------------------------------------------------------------------------- lazy shard sets
def test_an_unreadable_shard_says_what_rewrites_it_when_the_set_is_opened(tmp_path):
    """A flipped byte in a shard under 4 KiB fails its CRC-32 in the headers' read, when the set is opened: the
    message said 'not a readable npz shard' only, not (as the CRC-32 check does) how to get the shard back."""
    from ppap_fast.data import ShardSet

    w = ShardWriter(tmp_path, num_images=4, shard_size=2)
    w.run(lambda k: _shard(k, 2))
    shard = w.shard_path(1)
    raw = bytearray(shard.read_bytes())
    assert len(raw) < 4096
    raw[100] ^= 0xFF  # in the images' bytes
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard_00001.npz is not a readable npz shard \(BadZipFile: Bad CRC-32 .*\); "
                                         r"remove it and rerun generate with the set's arguments: it rewrites missing"):
        ShardSet(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match=r"shard_00001.npz is not a readable npz shard \(FileNotFoundError: .*\); "
                                         r"rerun generate with the set's arguments: it rewrites missing shards"):
        ShardSet(tmp_path)
    assert w.run(lambda k: _shard(k, 2)) == [1] and len(ShardSet(tmp_path)) == 4  # what the message promises


def _mixed_set(path, n=23, shard=5):
    rng = np.random.default_rng(0)
    w = ShardWriter(path, num_images=n, shard_size=shard)

    def make(k):
        c = w.shard_count(k)
        return {"images": rng.integers(0, 256, (c, 5, 4, 3), dtype=np.uint8),
                "targets": rng.standard_normal((c, 2, 5, 4)).astype(np.float16),
                "logits": rng.standard_normal((c, 7)).astype(np.float32)}

    w.run(make)
    return w


def test_shard_set_reads_only_the_requested_rows(tmp_path):
    from ppap_fast.data import ShardSet
    from ppap_fast.data.shards import npz_members

    w = _mixed_set(tmp_path)
    full = load_shards(tmp_path)
    s = ShardSet(tmp_path)
    assert len(s) == 23 and set(s.names) == {"images", "targets", "logits"} and s.counts.tolist() == [5, 5, 5, 5, 3]
    assert all(m.offset is not None for m in npz_members(w.shard_path(0)).values())  # np.savez: rows addressable
    # the set holds an index of the files, never their arrays
    assert not [k for k, v in vars(s).items() if isinstance(v, np.ndarray) and v.nbytes > 1024]
    assert s.bytes_read == 0
    rows = np.array([22, 0, 7, 7, 4, 5, 19, 22, 13])  # any order, repeats, shard boundaries, the short last shard
    for name in ("images", "targets", "logits"):
        got = s.gather(name, rows)
        assert got.dtype == full[name].dtype and not isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, full[name][rows])
    row_bytes = sum(full[k][0].nbytes for k in ("images", "targets", "logits"))
    assert s.bytes_read == rows.size * row_bytes  # exactly the rows asked for, nothing else
    assert s.gather("images", torch.tensor([3, 1])).shape == (2, 5, 4, 3)
    assert s.gather("logits", []).shape == (0, 7)
    with pytest.raises(IndexError, match=r"out of range \[0, 23\)"):
        s.gather("images", [23])
    with pytest.raises(IndexError, match=r"out of range \[0, 23\)"):  # not read as the last row
        s.gather("images", [-1])
    with pytest.raises(KeyError, match="no array 'depth'"):
        s.gather("depth", [0])


def test_shard_set_attach_fallbacks_and_errors(tmp_path):
    from ppap_fast.data import ShardSet
    from ppap_fast.data.shards import write_npz_atomic

    w = _mixed_set(tmp_path / "s")
    full = load_shards(tmp_path / "s")
    # outputs computed later, in other files with the same shard layout
    side = [write_npz_atomic(tmp_path / f"side_{k}.npz", extra=np.arange(w.shard_count(k) * 2).reshape(-1, 2)
                             + 100 * k) for k in range(w.num_shards)]
    s = ShardSet(tmp_path / "s")
    s.attach("extra", side)
    np.testing.assert_array_equal(s.gather("extra", [5, 0, 22]), [[100, 101], [0, 1], [404, 405]])
    with pytest.raises(ValueError, match=r"side_1.npz: 'extra' is \(5, 2\).*expected \(3, "):
        s.attach("extra", side[:4] + side[1:2])
    with pytest.raises(ValueError, match="4 files for 5 shards"):
        s.attach("extra", side[:4])
    # a shard written compressed (not by us): read whole, with a warning, same values
    p = w.shard_path(2)
    with np.load(p) as z:
        arrays = {n: z[n] for n in z.files}
    np.savez_compressed(p, **arrays)
    s = ShardSet(tmp_path / "s")
    with pytest.warns(UserWarning, match="compressed or Fortran-ordered"):
        got = s.gather("targets", [11, 3, 10])
    np.testing.assert_array_equal(got, full["targets"][[11, 3, 10]])
    # a shard without one of the arrays, a damaged shard, an incomplete set
    write_npz_atomic(p, images=arrays["images"])
    with pytest.raises(ValueError, match="shard_00002.npz has no array 'targets'"):
        ShardSet(tmp_path / "s")
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(ValueError, match="shard_00002.npz is not a readable npz shard"):
        ShardSet(tmp_path / "s")
    p.unlink()
    with pytest.raises(FileNotFoundError, match="not a shard set"):
        ShardSet(tmp_path)
    ShardWriter(tmp_path / "s", num_images=23, shard_size=5).write_manifest(complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        ShardSet(tmp_path / "s")


def test_shard_set_gather_refuses_non_integer_rows(tmp_path):
    # float rows were truncated (1.7 -> row 1) and a boolean mask read as rows 0/1: wrong data, silently
    from ppap_fast.data import ShardSet

    _mixed_set(tmp_path)
    s = ShardSet(tmp_path)
    with pytest.raises(TypeError, match="integer"):
        s.gather("images", [1.7, 2.0])
    with pytest.raises(TypeError, match="integer"):
        s.gather("logits", np.zeros(23, dtype=bool))
    with pytest.raises(TypeError, match="integer"):
        s.gather("logits", torch.tensor([0.0, 3.0]))
    assert s.gather("logits", np.array([3], dtype=np.uint8)).shape == (1, 7)
    assert s.gather("logits", []).shape == (0, 7) and s.gather("logits", np.array([])).shape == (0, 7)


@pytest.mark.parametrize("offset,value", [(10, 99), (8, 1)])  # compression method, encryption flag
def test_shard_with_damaged_zip_directory_is_redone(tmp_path, offset, value):
    # a flipped field of the zip directory made zipfile raise NotImplementedError / RuntimeError,
    # which escaped shard_is_complete (a resume crashed instead of redoing the shard) and ShardSet
    from ppap_fast.data import ShardSet

    w = _mixed_set(tmp_path)
    p = w.shard_path(1)
    raw = bytearray(p.read_bytes())
    raw[raw.find(b"PK\x01\x02") + offset] = value
    p.write_bytes(bytes(raw))
    assert w.missing() == [1]
    with pytest.raises(ValueError, match="shard_00001.npz is not a readable npz shard"):
        ShardSet(tmp_path)


def test_shard_set_with_a_scalar_member_is_a_clear_error(tmp_path):
    # a 0-d array in a shard raised IndexError ('tuple index out of range') naming nothing
    from ppap_fast.data import ShardSet

    w = ShardWriter(tmp_path, num_images=6, shard_size=3)
    w.run(lambda k: {"images": np.zeros((3, 2, 2, 1), np.uint8), "seed": np.int64(k)})
    with pytest.raises(ValueError, match=r"shard_00000.npz: 'seed' is \(\)"):
        ShardSet(tmp_path)


@pytest.mark.parametrize("text", ['{"shards": ', b"\xff\xfe\x00 binary", "[1, 2]", '{"complete": true}',
                                  '{"complete": true, "shards": 3}'])
def test_a_damaged_or_foreign_manifest_is_one_value_error_naming_it(tmp_path, text):
    """A manifest.json that is not JSON (json's message named no file; binary bytes: a UnicodeDecodeError naming
    none), a list (AttributeError) or an object without shards / num_images (KeyError): reading the set, or writing
    into it, raised a bare error."""
    from ppap_fast.data import ShardSet, ShardWriter, load_shards

    m = tmp_path / "manifest.json"
    m.write_bytes(text) if isinstance(text, bytes) else m.write_text(text)
    not_json = text in ('{"shards": ', b"\xff\xfe\x00 binary")
    reader_why = r"manifest.json is not valid JSON \(" if not_json else \
        r"manifest.json must hold a JSON object, got a JSON list: not a readable shard set; write it again with " \
        r"`generate`$" if text == "[1, 2]" else r"manifest.json is not a shard set manifest \(no shards list"
    for read in (ShardSet, load_shards):
        with pytest.raises(ValueError, match=reader_why):
            read(tmp_path)
    why = "manifest.json is not valid JSON" if not_json else "manifest.json is not a shard set manifest"
    with pytest.raises(ValueError, match=why):  # not adopted; said to be damaged / foreign as the readers say
        ShardWriter(tmp_path, num_images=4, shard_size=2)
    if str(text).startswith("{\"complete\""):  # a string count is no count either (was "num_images=4, not 4")
        (tmp_path / "manifest.json").write_text('{"complete": true, "num_images": "4", "shard_size": 2}')
        with pytest.raises(ValueError, match=why):
            ShardWriter(tmp_path, num_images=4, shard_size=2)


def test_a_manifest_with_a_bool_where_an_int_belongs_is_refused(tmp_path):
    """bool is an int in Python: `num_images: true` read as a set of 1 image, and a rerun's writer took
    `num_images: true` / `shard_size: true` for 1."""
    import json

    from ppap_fast.data import ShardSet
    from ppap_fast.info import data_set_summary

    w = ShardWriter(tmp_path, num_images=1, shard_size=1)
    w.run(lambda k: _shard(k, 1))
    mpath = tmp_path / "manifest.json"
    man = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**man, "num_images": True}))
    for read in (ShardSet, load_shards, data_set_summary):
        with pytest.raises(ValueError, match="manifest.json is not a .*manifest"):
            read(tmp_path)
    for key in ("num_images", "shard_size"):
        mpath.write_text(json.dumps({**man, key: True, "complete": False}))
        with pytest.raises(ValueError, match=f"{key}=True, not 1"):
            ShardWriter(tmp_path, num_images=1, shard_size=1)
    mpath.write_text(json.dumps(man))
    assert len(ShardSet(tmp_path)) == 1 and data_set_summary(tmp_path)["num_images"] == 1


def test_a_manifest_whose_config_is_no_object_is_refused_on_read(tmp_path):
    """Its readers (distill_ppap's and the CLI's teacher checks, the distributed distill) all do
    manifest.get("config", {}).get(...): a damaged 'config' was an AttributeError traceback."""
    import json

    from ppap_fast.data import ShardSet

    w = ShardWriter(tmp_path, num_images=4, shard_size=2)
    w.run(lambda k: _shard(k, 2))
    man = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**man, "config": "x"}))
    for read in (ShardSet, load_shards):
        with pytest.raises(ValueError, match=r"manifest.json is damaged \(its 'config' is a JSON str, not an object\)"):
            read(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**man, "config": {"seed": 0}}))
    assert len(ShardSet(tmp_path)) == 4

def test_shards_without_a_manifest_are_not_adopted(tmp_path):
    """A folder with shards but no manifest.json (removed by hand, copied without it): ShardWriter kept every
    shard of the right size as this run's and wrote a manifest with this run's settings over them."""

    def shard(seed):
        return lambda k: {"images": np.full((2, 4, 4, 1), seed, np.uint8)}

    ShardWriter(tmp_path, num_images=4, shard_size=2, meta={"seed": 0}).run(shard(0))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds shards but no manifest.json"):
        ShardWriter(tmp_path, num_images=4, shard_size=2, meta={"seed": 1})
    assert not (tmp_path / "manifest.json").exists()
    fresh = tmp_path / "fresh"  # an empty or new folder, or one holding other files, is still written
    fresh.mkdir()
    (fresh / "notes.txt").write_text("x")
    assert ShardWriter(fresh, num_images=4, shard_size=2, meta={"seed": 1}).run(shard(1)) == [0, 1]
    assert (load_shards(fresh)["images"] == 1).all()


def test_a_run_that_wrote_no_shard_does_not_lock_its_directory(tmp_path):
    """generate_datafree failing in its first shard (a NaN teacher, a wrong image_shape) left a manifest with its
    settings: the rerun with corrected ones was refused although nothing had been written (as distributed's is not)."""

    def failing(k):
        raise ValueError("teacher logits hold non-finite values")

    with pytest.raises(ValueError, match="non-finite"):
        ShardWriter(tmp_path, num_images=4, shard_size=2, meta={"seed": 0}).run(failing)
    assert (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("shard_*.npz"))
    w = ShardWriter(tmp_path, num_images=6, shard_size=3, meta={"seed": 1})
    assert w.run(lambda k: {"images": np.full((3, 4, 4, 1), 1, np.uint8)}) == [0, 1]
    assert load_shards(tmp_path)["images"].shape[0] == 6
    # once a shard exists the settings are compared again
    def killed_after_the_first(k):
        if k:
            raise KeyboardInterrupt
        return {"images": np.zeros((2, 4, 4, 1), np.uint8)}

    with pytest.raises(KeyboardInterrupt):
        ShardWriter(tmp_path / "b", num_images=4, shard_size=2, meta={"seed": 0}).run(killed_after_the_first)
    with pytest.raises(ValueError, match="seed: 0 there vs 1 now"):
        ShardWriter(tmp_path / "b", num_images=4, shard_size=2, meta={"seed": 1})
    with pytest.raises(ValueError, match="num_images=4, not 6"):
        ShardWriter(tmp_path / "b", num_images=6, shard_size=2, meta={"seed": 0})


def test_a_resumed_set_keeps_the_manifest_keys_another_version_wrote(tmp_path):
    """A rerun rewrote an unfinished set's manifest from its own keys only: what another version recorded there
    (e.g. how its cached targets are encoded) was dropped, and the finished set read as if never recorded."""
    import json

    def killed_after_the_first(k):
        if k:
            raise KeyboardInterrupt
        return _shard(k, 2)

    with pytest.raises(KeyboardInterrupt):
        ShardWriter(tmp_path, num_images=4, shard_size=2, meta={"seed": 0}).run(killed_after_the_first)
    mpath = tmp_path / "manifest.json"
    man = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**man, "targets_encoding": "v2", "extra": {"a": [1]}}))
    assert ShardWriter(tmp_path, num_images=4, shard_size=2, meta={"seed": 0}).run(lambda k: _shard(k, 2)) == [1]
    got = json.loads(mpath.read_text())
    assert got["complete"] is True and got["seed"] == 0
    assert got["targets_encoding"] == "v2" and got["extra"] == {"a": [1]}


def test_datafree_preview_of_a_depth_teacher_without_a_channel_dim(tmp_path):
    """Depth teachers may output [B, H, W] (a Hugging Face model's predicted_depth; docs/distributed.md): their set
    got no preview.png ("teacher outputs of shape (H, W), no preview"); it is drawn as one channel."""
    from PIL import Image

    from ppap_fast.data.preview import datafree_preview

    rng = np.random.default_rng(0)
    depth = rng.standard_normal((4, 5, 6)).astype(np.float16)
    ShardWriter(tmp_path, num_images=4, shard_size=2).run(
        lambda k: {"images": rng.integers(0, 256, (2, 5, 6, 1), dtype=np.uint8), "targets": depth[2 * k:2 * k + 2]})
    assert datafree_preview(tmp_path).endswith("each beside its teacher output (min to max)")
    with Image.open(tmp_path / "preview.png") as im:
        grid = np.asarray(im.convert("RGB"))
    cell = 5 * 8 + 1, 6 * 8 + 1  # 5x6 images shown 8x, 1-pixel borders
    beside = grid[1:cell[0], 1 + cell[1]:2 * cell[1]]
    d = depth[0].astype(np.float32)
    want = ((d - d.min()) / (d.max() - d.min()) * 255).round().astype(np.uint8).repeat(8, 0).repeat(8, 1)
    assert np.array_equal(beside[..., 0], want)


def test_datafree_preview_removes_a_killed_preview_write(tmp_path):
    from ppap_fast.data.preview import datafree_preview

    _mixed_set(tmp_path)
    killed = tmp_path / ".preview.png.a1_b2c3d.png.tmp"  # shards._atomic's name; a SIGKILL runs no cleanup
    killed.write_bytes(b"partial")
    other = tmp_path / ".preview.png.a1_b2c3d.npz.tmp"
    other.write_bytes(b"not the preview's")
    assert "preview.png" in datafree_preview(tmp_path, shown=4)
    assert (tmp_path / "preview.png").is_file() and not killed.exists() and other.exists()


def test_a_hand_edited_manifest_or_mixed_shards_are_clear_errors(tmp_path):
    """A shard listed twice was counted twice (its rows read twice), `shards: []` with `num_images: 0` was an
    IndexError in ShardSet, and an array only a later shard holds was dropped without a word."""
    import json

    from ppap_fast.data import ShardSet

    w = ShardWriter(tmp_path, num_images=4, shard_size=2)
    w.run(lambda k: _shard(k, 2))
    mpath = tmp_path / "manifest.json"
    man = json.loads(mpath.read_text())
    for edit, msg in (({"shards": [man["shards"][0]] * 2}, r"lists shard\(s\) \['shard_00000.npz'\] more than once"),
                      ({"shards": [], "num_images": 0}, "lists 0 shards and 0 images")):
        mpath.write_text(json.dumps({**man, **edit}))
        for read in (ShardSet, load_shards):
            with pytest.raises(ValueError, match="manifest.json is damaged: it " + msg):
                read(tmp_path)
    mpath.write_text(json.dumps(man))
    np.savez(tmp_path / man["shards"][1], **_shard(1, 2), extra=np.zeros(2))
    with pytest.raises(ValueError, match=r"shard_00001.npz has array\(s\) \['extra'\] that shard shard_00000.npz lacks"):
        ShardSet(tmp_path)
    np.savez(tmp_path / man["shards"][1], **_shard(1, 2))
    assert len(ShardSet(tmp_path)) == 4 and len(load_shards(tmp_path)["images"]) == 4


def test_a_resumed_old_format_set_records_no_identity_its_shards_lack_and_a_finished_set_is_not_rewritten(tmp_path,
                                                                                                           monkeypatch):
    """A set written before the model fingerprints were recorded (no unet_state / teacher_state) is resumed without
    comparing them, but its rewritten manifest recorded this run's as the whole set's; and a rerun on a finished
    set rewrote its manifest, changing the hash a distill state records (its resume was refused)."""
    import json

    import ppap_fast.data.shards as shards
    from ppap_fast.distributed import data_manifest_hash

    def shard(k):
        return {"images": np.full((2, 4, 4, 1), k, np.uint8)}

    def killed_after_the_first(k):
        if k:
            raise KeyboardInterrupt
        return shard(k)

    new = {"seed": 0, "unet_state": "u1", "teacher_state": "t1"}
    with pytest.raises(KeyboardInterrupt):  # an unfinished old-format set
        ShardWriter(tmp_path / "a", num_images=6, shard_size=2, meta={"seed": 0}).run(killed_after_the_first)
    assert ShardWriter(tmp_path / "a", num_images=6, shard_size=2, meta=new).run(shard) == [1, 2]
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["complete"] is True and man["seed"] == 0
    assert "unet_state" not in man and "teacher_state" not in man
    for meta in ({"seed": 0}, new):  # finished: an old-format one, and one with every key
        d = tmp_path / f"b{len(meta)}"
        ShardWriter(d, num_images=4, shard_size=2, meta=meta).run(shard)
        m = d / "manifest.json"
        before, h, written = m.read_bytes(), data_manifest_hash(d), []
        with monkeypatch.context() as mp:
            mp.setattr(shards, "write_json_atomic", lambda *a, **k: written.append(a[0]))
            assert ShardWriter(d, num_images=4, shard_size=2, meta=new).run(shard) == []
        assert written == [] and m.read_bytes() == before and data_manifest_hash(d) == h
    d = tmp_path / "b3"  # a finished set missing a shard is rewritten (unfinished, then finished)
    (d / "shard_00001.npz").unlink()
    assert ShardWriter(d, num_images=4, shard_size=2, meta=new).run(shard) == [1]
    assert json.loads((d / "manifest.json").read_text())["complete"] is True


def test_read_json_object_names_the_file_and_ends_in_the_advice(tmp_path):
    from ppap_fast.data.shards import read_json_object

    f = tmp_path / "c.json"
    with pytest.raises(FileNotFoundError, match=r"^thing config not found: .*c\.json$"):
        read_json_object(f, "thing config")
    f.write_text('{"a": ')
    with pytest.raises(ValueError, match=r"^thing config .*c\.json is not valid JSON \(Expecting value.*\): "
                                         r"regenerate or fix the file$"):
        read_json_object(f, "thing config")
    f.write_text('"text"')
    with pytest.raises(ValueError, match=r"^thing config .*c\.json must hold a JSON object, got a string: "
                                         r"write it again$"):
        read_json_object(f, "thing config", advice="write it again")
    f.write_text('{"a": [1, 2.5]}')
    assert read_json_object(f, "thing config", advice="write it again") == {"a": [1, 2.5]}
