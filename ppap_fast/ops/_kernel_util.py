"""Host-side helpers shared by the Triton op modules (ops.lora, ops.norm)."""
from __future__ import annotations

import contextlib

import torch

_SM_COUNT: dict = {}

# CUDA caps launch-grid axes 1 and 2 at 65535 blocks (axis 0 at 2^31 - 1): a kernel with samples on
# axis 1 or 2 launches in chunks of at most this many samples (tests lower it to reach the chunked path)
MAX_GRID_YZ = 65535


def grid_chunks(n: int):
    """(first, count) chunks covering n samples, count <= MAX_GRID_YZ. Chunk starts are multiples of 16
    (where the limit allows), so a kernel taking `first` as an argument compiles once for every chunk."""
    step = MAX_GRID_YZ - MAX_GRID_YZ % 16 if MAX_GRID_YZ >= 16 else MAX_GRID_YZ
    if step < 1:
        raise ValueError(f"MAX_GRID_YZ must be >= 1, got {MAX_GRID_YZ}")
    if n <= MAX_GRID_YZ:  # the common case: one launch over every sample
        return [(0, n)]
    return [(first, min(step, n - first)) for first in range(0, n, step)]


def sm_count(device: torch.device, other: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device); `other` for any other
    device (what the caller's split heuristics assume off the GPU)."""
    if device.type != "cuda":
        return other
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def new_buffer(shape, dtype, device, poison: bool) -> torch.Tensor:
    """A buffer the kernels fully overwrite: empty, or NaN-filled when `poison` (tests)."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def autocast_off(device_type: str):
    """A context with autocast off for device_type: torch.autocast(enabled=False) where autocast is
    on, else nothing to switch (building an autocast object costs microseconds on every eager call)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def on_device(t: torch.Tensor):
    """A context making t's CUDA device the current one, where it is not already (else nothing to
    switch). Triton launches on the *current* device and its current stream whatever device the
    pointer arguments live on: a tensor on cuda:1 with cuda:0 current gave a kernel on cuda:0 reading
    cuda:1 memory (an illegal address without peer access) on a stream not ordered after the one that
    wrote its inputs. (The C++ ops take a CUDAGuard; the autograd engine runs a CUDA backward with its
    device current.)"""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def autocast_input(x: torch.Tensor):
    """Under torch.autocast the fast paths compute in the autocast dtype (like F.linear / F.conv2d
    would), with autocast off inside them so that every op sees one dtype. Returns (x in that dtype,
    the context to run the op in: :func:`autocast_off`)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    return x, autocast_off(dev)


def first_order_only(backward):
    """``@once_differentiable`` that refuses ``create_graph=True`` (grad mode on in the backward) with a
    clear error, as the cpp backend does. once_differentiable alone returns grads whose graph leads
    nowhere: ``torch.autograd.grad(penalty_of(dx), A)`` then silently drops the penalty's dependence on
    A (or says "not used in the graph"); the reference's double backward is exact."""
    import functools

    from torch.autograd.function import once_differentiable

    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(f"ppap_fast: the {backward.__qualname__.split('.')[0]} backward is built from kernels "
                               "without derivatives: double backward (create_graph=True) is not supported; use "
                               "backend='reference'")
        return inner(ctx, *grads)

    return wrapper


def _bcp_strides(t: torch.Tensor):
    """(stride_b, stride_c, stride_p) of t viewed as [B, C, P], or None if its spatial dims do
    not flatten to one stride."""
    dims = [d for d in range(2, t.dim()) if t.shape[d] != 1]  # size-1 dims take no steps: any stride
    if not dims:
        return t.stride(0), t.stride(1), 1
    for a, b in zip(dims, dims[1:]):
        if t.stride(a) != t.stride(b) * t.shape[b]:
            return None
    # the position stride is the innermost non-size-1 dim's (x[..., 1:2] of [B, C, H, W]: H's, not W's)
    return t.stride(0), t.stride(1), t.stride(dims[-1])
