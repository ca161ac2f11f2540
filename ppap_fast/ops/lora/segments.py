"""Per-batch segment metadata for multi-expert (SGMV) kernels.

Computed on the device with fixed-size outputs and no host synchronisation
(no ``.item()``, no ``nonzero``, no ``bincount``), so it can run inside CUDA
graph capture (vLLM's idea): samples are stable-sorted by expert id.

* ``sorted_idx`` int32 [S]: sample ids ordered by expert (stable);
* ``counts``     int32 [N]: samples per expert (0 for empty experts);
* ``offsets``    int32 [N+1]: segment e covers ``sorted_idx[offsets[e]:offsets[e+1]]``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Segments(NamedTuple):
    expert_idx: torch.Tensor  # long [S], as given
    sorted_idx: torch.Tensor  # int32 [S]
    counts: torch.Tensor      # int32 [N]
    offsets: torch.Tensor     # int32 [N+1]
    num_experts: int


def build_segments(expert_idx: torch.Tensor, num_experts: int, out: Optional[Segments] = None) -> Segments:
    """Sort samples by expert on the device. ``out`` (a previous result of the same
    S and N) is reused in place, e.g. as static buffers for a captured CUDA graph.

    Values outside [0, N) are not checked here (that would need a host sync); the
    public ops validate ids when not capturing.
    """
    if expert_idx.dim() != 1:
        raise ValueError(f"expert_idx must be 1-D [S], got shape {tuple(expert_idx.shape)}")
    idx = expert_idx.long()
    dev = idx.device
    order = torch.argsort(idx, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
    if out is None:
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
        torch.cumsum(counts, 0, dtype=torch.int32, out=offsets[1:])
        return Segments(idx, order, counts, offsets, num_experts)
    out.expert_idx.copy_(idx)
    out.sorted_idx.copy_(order)
    out.counts.copy_(counts)
    out.offsets[0].zero_()
    torch.cumsum(counts, 0, dtype=torch.int32, out=out.offsets[1:])
    return out
