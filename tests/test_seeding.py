"""Per-sample random streams (ppap_fast.seeding): a sample's numbers depend on its keys only."""
import pytest
import torch

from ppap_fast.seeding import PerSampleNoise, sample_seed


def test_sample_seed_is_a_stable_63_bit_hash_of_its_keys():
    seeds = {sample_seed(s, k, j) for s in (0, 1, -1) for k in range(20) for j in range(50)}
    assert len(seeds) == 3 * 20 * 50 and all(0 <= v < 2**63 for v in seeds)
    assert sample_seed(3, 1, 2) == sample_seed(3, 1, 2) != sample_seed(3, 2, 1)
    assert sample_seed(0, 1_000_003) != sample_seed(1, 0)  # no arithmetic aliasing of (seed, k)
    assert sample_seed(2**70) != sample_seed(2**70 + 1)
    with pytest.raises(ValueError, match="at least one key"):
        sample_seed()


def test_per_sample_streams_ignore_how_samples_are_batched():
    whole = PerSampleNoise((7,), range(5))
    x = torch.empty(5, 2, 3, 3)
    want = [whole.randn((2, 3, 3)), whole.noise_fn(0, x), whole.noise_fn(1, x)]
    parts = [PerSampleNoise((7,), range(0, 2)), PerSampleNoise((7,), range(2, 5))]
    got = [torch.cat([p.randn((2, 3, 3)) for p in parts])]
    for i in range(2):
        got.append(torch.cat([p.noise_fn(i, torch.empty(len(p.rows), 2, 3, 3)) for p in parts]))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert not torch.equal(want[1], want[2]) and not torch.equal(want[0][0], want[0][1])
    other = PerSampleNoise((8,), range(5)).randn((2, 3, 3))  # want is forced finite by the assert_close above
    assert torch.isfinite(other).all() and torch.equal(other, want[0]) is False
    assert whole.noise_fn(2, x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="batch of 4 samples asked of a stream of 5"):
        whole.noise_fn(3, x[:4])
