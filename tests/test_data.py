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
    with pytest.raises(ValueError):
        from_uint8(u.astype(np.float32))


def test_seeded_split_is_disjoint_and_deterministic():
    a, b = DigitsSplits.create(0), DigitsSplits.create(0)
    sizes = [a.diffusion[0].shape[0], a.classifier[0].shape[0], a.eval[0].shape[0]]
    assert sizes == [900, 500, 397]
    assert torch.equal(a.eval[0], b.eval[0])
    assert not torch.equal(DigitsSplits.create(1).eval[0], a.eval[0])
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
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "s", num_images=24, shard_size=5)


def test_corrupt_shard_is_redone(tmp_path):
    w = ShardWriter(tmp_path, num_images=10, shard_size=5)
    w.run(lambda k: _shard(k, 5))
    w.shard_path(1).write_bytes(b"garbage")
    assert w.missing() == [1]
    assert w.run(lambda k: _shard(k, 5)) == [1]
    assert load_shards(tmp_path)["images"].shape[0] == 10
