"""Per-sample random streams: sample j's starting noise and per-step sampler noise come from its
own CPU generator, so its image does not depend on the batch it ran in (batch size, micro-batch
split, a resume with another ``--batch-size``): the same keys give the same numbers anywhere."""
from __future__ import annotations

import hashlib

import torch


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (run seed, shard, sample index); hashed, so neighbouring keys
    give unrelated streams and no two key tuples of realistic size collide by arithmetic."""
    if not keys:
        raise ValueError("sample_seed needs at least one key")
    data = b"".join(int(k).to_bytes(16, "little", signed=True) for k in keys)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


class PerSampleNoise:
    """One ``torch.Generator`` per sample, seeded ``sample_seed(*prefix, j)`` for sample j of
    ``rows``; :meth:`randn` stacks one draw per sample (in row order), :meth:`noise_fn` is the
    samplers' ``noise_fn(i, x)`` for a batch holding ``rows`` (a slice of the samples)."""

    def __init__(self, prefix: tuple, rows: range | list):
        self.rows = list(rows)
        self.generators = [torch.Generator().manual_seed(sample_seed(*prefix, j)) for j in self.rows]

    def randn(self, per_sample_shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(int(s) for s in per_sample_shape)
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators])

    def noise_fn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.rows):
            raise ValueError(f"noise for a batch of {x.shape[0]} samples asked of a stream of {len(self.rows)}")
        return self.randn(x.shape[1:], x.dtype).to(x.device)
