"""Per-batch segment metadata for multi-expert (SGMV) kernels.

Computed on the device with fixed-size outputs and no host synchronisation
(no ``.item()``, no ``nonzero``, no ``bincount``), so it can run inside CUDA
graph capture (vLLM's idea): samples are stable-sorted by expert id.

* ``sorted_idx`` int32 [S]: sample ids ordered by expert (stable);
* ``counts``     int32 [N]: samples per expert (0 for empty experts);
* ``offsets``    int32 [N+1]: segment e covers ``sorted_idx[offsets[e]:offsets[e+1]]``;
* ``source``     [the expert_idx given, its version counter then]: what ``check_segments`` compares
  (the tensor's identity: its memory and layout, and its version counter).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Segments(NamedTuple):
    expert_idx: torch.Tensor  # long [S], contiguous (a copy when the one given is not)
    sorted_idx: torch.Tensor  # int32 [S]
    counts: torch.Tensor      # int32 [N]
    offsets: torch.Tensor     # int32 [N+1]
    num_experts: int
    source: Optional[list] = None  # [expert_idx as given, its _version at build] (updated by out=)


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> Optional[bool]:
    """The same tensor or a view of the same memory and layout (views share the version counter);
    None when that cannot be told (no storage: fake / functorch tensors). Reads no values (no sync)."""
    if a is b:
        return True
    try:
        return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and a.device == b.device)
    except RuntimeError:
        return None


def _values_comparable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both on the CPU: comparing their values costs no device sync."""
    return a.device.type == "cpu" and b.device.type == "cpu"


def check_segments(seg: Segments, expert_idx: torch.Tensor, num_experts: int) -> None:
    """ValueError unless ``seg`` is ``build_segments(expert_idx, num_experts)`` for expert_idx as it
    is now. No host sync (fine under CUDA graph capture): N and S; for the tensor it was built from (or
    a view of it), its version counter, which any in-place change since has bumped. Another tensor is
    compared by value on CPU; on other devices that would sync, so another tensor (other memory or
    layout) is refused. The same tensor without a version counter (an inference tensor) is trusted."""
    if seg.num_experts != num_experts or seg.expert_idx.shape != expert_idx.shape:
        raise ValueError(f"segments were built for N={seg.num_experts}, S={seg.expert_idx.shape[0]}; "
                         f"this call has N={num_experts}, S={expert_idx.shape[0]}")
    if torch.compiler.is_compiling():
        return
    src, ver = seg.source if seg.source is not None else (seg.expert_idx, None)
    same = _same_tensor(expert_idx, src)
    now = _version(expert_idx) if same else None
    if ver is not None and now is not None:
        stale = now != ver
    elif _values_comparable(expert_idx, seg.expert_idx):
        stale = not torch.equal(seg.expert_idx, expert_idx.long())
    elif same is False:
        raise ValueError(f"stale segments: they were built from another expert_idx tensor than this one "
                         f"(on {expert_idx.device.type} their values are not compared: that would sync); "
                         "pass the tensor they were built from, or rebuild them: "
                         "build_segments(expert_idx, N, out=segments)")
    else:
        return
    if stale:
        raise ValueError("stale segments: expert_idx differs from (or was changed in place since) the one "
                         "they were built from; rebuild them: build_segments(expert_idx, N, out=segments)")


def saved_for_backward(seg: Segments) -> tuple:
    """seg's tensors for an autograd Function's ``ctx.save_for_backward`` (after its own): autograd then
    refuses a backward after they changed in place (``build_segments(out=)``, an in-place change of the
    expert_idx they hold) instead of routing the gradients by the new values, as the reference and the
    cpp backend do. Inference tensors (no version counter: nothing to check, and unsavable) are left out."""
    return tuple(t for t in (seg.expert_idx, seg.sorted_idx, seg.offsets) if not t.is_inference())


def build_segments(expert_idx: torch.Tensor, num_experts: int, out: Optional[Segments] = None) -> Segments:
    """Sort samples by expert (expert_idx [S], values in [0, N), N = num_experts) on the device. ``out`` (a
    previous result of the same
    S and N) is reused in place, e.g. as static buffers for a captured CUDA graph.

    Values outside [0, N) are not checked here (that would need a host sync); the
    public ops validate ids when not capturing.
    """
    if expert_idx.dim() != 1:
        raise ValueError(f"expert_idx must be 1-D [S], got shape {tuple(expert_idx.shape)}")
    idx = expert_idx.long().contiguous()  # the kernels read expert_idx[s] at offset s (a strided view: wrong experts)
    dev = idx.device
    order = torch.argsort(idx, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
    if out is None:
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
        torch.cumsum(counts, 0, dtype=torch.int32, out=offsets[1:])
        return Segments(idx, order, counts, offsets, num_experts, [expert_idx, _version(expert_idx)])
    out.expert_idx.copy_(idx)
    out.sorted_idx.copy_(order)
    out.counts.copy_(counts)
    out.offsets[0].zero_()
    torch.cumsum(counts, 0, dtype=torch.int32, out=out.offsets[1:])
    if out.source is not None:
        out.source[:] = [expert_idx, _version(expert_idx)]  # after the copy: it may be expert_idx itself
    return out
