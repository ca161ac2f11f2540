"""ops.channel_sums: a GroupNorm's statistics gathered by the op that writes its input.

``bias_residual_add(..., channel_sums=cs)`` and ``cat_channels(..., channel_sums=cs)`` add per-channel
partial sums of what they write to ``cs``; ``group_norm_act(x, ..., channel_sums=cs)`` then builds its
group statistics from them instead of reading x once more (its statistics pass). ADM's fused model
passes them from each block's residual add (and the decoder's skip copy) to the next block's first
GroupNorm: one read of every such activation less (stop 19's profile: the GroupNorm statistics read
~24 GiB a step at ADM-256 b32).

For a channels_last target x [B, C, H, W] (P = H * W positions, in chunks of ``p_chunk``):

    shift[b, c]      = x[b, c] at position 0 (float32 of the stored value)
    part[b, k, 0, c] = sum over chunk k of (x - shift[b, c]);  part[b, k, 1, c]: of (x - shift[b, c])^2

Shifted sums, as group_norm_act's own statistics: no cancellation at a large mean. A group's sums are
its channels' sums moved exactly to the shift of the group's first channel (:func:`group_stats_reference`).
Producers may fill channel ranges separately (a decoder buffer: a block's output, then its skip); a
consumer takes the sums only while every channel was written and x not modified since
(:meth:`ChannelSums.complete_for`; tensors made under torch.inference_mode have no version: never).
"""
from __future__ import annotations

import weakref

import torch

_TARGET_PROGRAMS = 4096  # a producer's launch at 256 channels a program: chunks sized for about this many
CHUNK_ALIGN = 256  # p_chunk is a multiple of this (so of every producer's position tile)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_p_chunk(batch: int, channels: int, positions: int) -> int:
    """Positions per chunk (a multiple of CHUNK_ALIGN) for a [batch, channels, positions] target: about
    _TARGET_PROGRAMS producer programs at 256 channels each."""
    if positions == 0:  # an empty target: one chunk of zero sums
        return CHUNK_ALIGN
    chunks = _cdiv(_TARGET_PROGRAMS, max(1, batch * _cdiv(channels, 256)))
    chunks = max(1, min(_cdiv(positions, CHUNK_ALIGN), chunks))
    return _cdiv(_cdiv(positions, chunks), CHUNK_ALIGN) * CHUNK_ALIGN


class ChannelSums:
    """Per-channel shifted sums of ``target`` (module docstring): ``part`` [B, K, 2, C] and ``shift``
    [B, C], float32 on target's device; ``p_chunk`` positions a chunk (default: about 4096 producer
    programs at 256 channels each), K = ceil(P / p_chunk)."""

    def __init__(self, target: torch.Tensor, p_chunk: int | None = None):
        if not isinstance(target, torch.Tensor) or not target.is_floating_point() or target.dim() != 4 \
                or not target.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("ChannelSums: target must be a floating-point channels_last-contiguous [B, C, H, W] "
                             f"tensor, got {getattr(target, 'dtype', type(target).__name__)} "
                             f"{tuple(getattr(target, 'shape', ()))}")
        B, C, H, W = target.shape
        P = H * W
        if p_chunk is None:
            p_chunk = default_p_chunk(B, C, P)
        if isinstance(p_chunk, bool) or not isinstance(p_chunk, int) or p_chunk < 16 or p_chunk % 16:
            raise ValueError(f"ChannelSums: p_chunk must be a positive multiple of 16, got {p_chunk!r}")
        self.p_chunk = p_chunk
        self.chunks = max(1, _cdiv(P, p_chunk))
        self.part = torch.empty(B, self.chunks, 2, C, dtype=torch.float32, device=target.device)
        self.shift = torch.empty(B, C, dtype=torch.float32, device=target.device)
        self._key = (target.data_ptr(), tuple(target.shape), target.stride(), target.dtype, target.device)
        self._target = weakref.ref(target)  # gone: its address may hold another tensor (the caching allocator)
        self._filled = torch.zeros(C, dtype=torch.bool)  # host-side: which channels a producer wrote
        self._version = None

    @property
    def channels(self) -> int:
        return self.part.shape[-1]

    def offset_of(self, t: torch.Tensor) -> int:
        """The channel offset of t in the target (t the target or a channel slice of it); ValueError otherwise."""
        ptr, shape, stride, dtype, device = self._key
        ok = isinstance(t, torch.Tensor) and t.dim() == 4 and t.stride() == stride and t.dtype == dtype \
            and t.device == device and (t.shape[0],) + tuple(t.shape[2:]) == (shape[0],) + shape[2:]
        off, rem = divmod(t.data_ptr() - ptr, t.element_size()) if ok else (-1, 1)
        if rem or not 0 <= off <= shape[1] - t.shape[1]:
            raise ValueError(f"channel_sums: the output ({getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}) "
                             f"is not the sums' target ({dtype} {shape}, channels_last) or a channel slice of it")
        return off

    def begin_write(self, t: torch.Tensor) -> None:
        """A producer is about to write into t: the channels written before stay only while t is unmodified since."""
        if self._version is not None and (t.is_inference() or t._version != self._version):
            self._filled.zero_()

    def mark_written(self, c0: int, c1: int, t: torch.Tensor) -> None:
        """Channels c0 up to c1 (exclusive) hold the sums of what was just written into t (the target or a
        view of it)."""
        self._filled[c0:c1] = True
        self._version = None if t.is_inference() else t._version

    def complete_for(self, x: torch.Tensor) -> bool:
        """Whether these are x's sums: x is the target, every channel written, x unmodified since."""
        return (isinstance(x, torch.Tensor) and not x.is_inference() and self._version is not None
                and self._target() is not None
                and (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device) == self._key
                and x._version == self._version and bool(self._filled.all()))


def check_producer(op: str, channel_sums, out) -> None:
    """A producer op's channel_sums argument (bias_residual_add, cat_channels): a ChannelSums whose target is
    ``out`` or holds it as a channel slice; marks the write about to start (ChannelSums.begin_write)."""
    if not isinstance(channel_sums, ChannelSums):
        raise TypeError(f"{op}: channel_sums must be a ChannelSums, got {type(channel_sums).__name__}")
    if out is None:
        raise ValueError(f"{op}: channel_sums needs out= (their target or a channel slice of it)")
    channel_sums.offset_of(out)
    channel_sums.begin_write(out)


def attached(x: torch.Tensor) -> ChannelSums | None:
    """The ChannelSums a producer attached to x (ADM's fused path), where they are complete for x."""
    cs = getattr(x, "_ppap_channel_sums", None)
    return cs if cs is not None and cs.complete_for(x) else None


def attach(x: torch.Tensor, cs: ChannelSums) -> ChannelSums:
    """cs left on x for the GroupNorm reading x next (:func:`attached`); returns cs."""
    x._ppap_channel_sums = cs
    return cs


def fill_reference(cs: ChannelSums, y: torch.Tensor, c_off: int) -> None:
    """cs's sums of channels c_off.. from y (what a producer wrote there), in PyTorch."""
    B, C = y.shape[:2]
    P = y.shape[2] * y.shape[3]
    v = y.detach().reshape(B, C, P).float()
    k = v[:, :, 0] if P else v.new_zeros(B, C)
    d = v - k[:, :, None]
    pad = cs.chunks * cs.p_chunk - P
    d = torch.nn.functional.pad(d, (0, pad)).reshape(B, C, cs.chunks, cs.p_chunk)
    cs.shift[:, c_off:c_off + C] = k
    cs.part[:, :, 0, c_off:c_off + C] = d.sum(-1).transpose(1, 2)
    cs.part[:, :, 1, c_off:c_off + C] = (d * d).sum(-1).transpose(1, 2)


def group_stats_reference(cs: ChannelSums, num_groups: int, positions: int):
    """(shift [B, G], mean of x - shift [B, G], biased variance [B, G]) of each of num_groups groups G
    from cs's sums of x, its target, over positions (P = H * W) per channel:
    channel c's sums moved to the group's shift (its first channel's): with delta = shift_c - shift_g,
    sum(x - shift_g) = s1_c + P delta, sum((x - shift_g)^2) = s2_c + 2 delta s1_c + P delta^2."""
    B, C = cs.shift.shape
    cg = C // num_groups
    s1 = cs.part[:, :, 0].sum(1).view(B, num_groups, cg)
    s2 = cs.part[:, :, 1].sum(1).view(B, num_groups, cg)
    sh = cs.shift.view(B, num_groups, cg)
    kg = sh[:, :, 0]
    delta = sh - kg[:, :, None]
    n = float(cg * positions)
    m1 = (s1 + positions * delta).sum(-1) / n
    var = ((s2 + 2 * delta * s1 + positions * delta * delta).sum(-1) / n - m1 * m1).clamp_min(0)
    return kg, m1, var


__all__ = ["ChannelSums", "check_producer", "default_p_chunk", "group_stats_reference", "fill_reference", "attached", "attach"]
