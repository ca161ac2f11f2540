"""``lora_conv2d(..., a_stage="auto")``: time the conv A stages on the call's own shapes, keep the fastest.

Which A stage is fastest depends on the GPU, the layer's shape, the memory format and whether a
gradient is wanted (benchmarks/NOTES.md: stacked vs implicit vs in_base flip between layers and
between eager and graphed runs). "auto" measures instead of guessing, like cudnn.benchmark: the
first call with a new key (shapes, dtypes, memory format, geometry, backend, which gradients are
needed) runs each applicable stage (one warm-up, then the median of ``REPS`` timed runs, forward
and, when a gradient is wanted, backward on detached copies of the inputs), and every later call
with that key takes the winner. A call made while a CUDA graph is being captured cannot time
anything: it takes the first candidate ("stacked"; "default" for a linear layer) and caches nothing
(warm up before capture, as GraphedTrainStep does). Linear layers choose between their default path
and "in_base" the same way.
``a_stage_choices()`` lists what was chosen and the times; ``clear_a_stage_choices()`` forgets.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Tuple

import torch

CANDIDATES = ("stacked", "implicit", "in_base")
REPS = 3
_CHOICES: Dict[tuple, Tuple[str, Dict[str, float]]] = {}


def a_stage_choices() -> Dict[tuple, Tuple[str, Dict[str, float]]]:
    """{key: (chosen A stage, {candidate: median ms (inf when it failed)})} of this process."""
    return dict(_CHOICES)


def clear_a_stage_choices() -> None:
    _CHOICES.clear()


def grads_wanted(x, A, B, expert_bias) -> tuple:
    """Which of (x, A, B, expert_bias) the call being tuned differentiates (part of its key)."""
    return tuple(bool(torch.is_grad_enabled() and t is not None and t.requires_grad) for t in (x, A, B, expert_bias))


def runner(call: Callable, leaves: tuple, need: tuple) -> Callable[[str], None]:
    """run(stage): ``call(stage, x, A, B, expert_bias)`` on detached copies of ``leaves`` (x, A, B,
    expert_bias) that require the gradients in ``need``, and its backward when any is wanted."""
    def run(stage):
        with torch.enable_grad() if any(need) else torch.no_grad():
            ins = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(leaves, need)]
            y = call(stage, *ins)
            if any(need):
                torch.autograd.grad(y, [t for t, n in zip(ins, need) if n], torch.ones_like(y))
    return run


def _elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """One run of fn in ms (CUDA events on CUDA; the wall clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)  # the stream fn's kernels go to (not the current device's)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error (illegal address, device-side assert, launch failure): it poisons the CUDA context,
    so it must surface, unlike a stage that merely cannot run (out of shared memory, unsupported shape)."""
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(exc, accel)) or "CUDA error" in str(exc)


def choose(run: Callable[[str], None], key: tuple, candidates, device: torch.device) -> str:
    """The fastest of ``candidates`` for ``key`` (cached): ``run(stage)`` does one call with that A stage.
    A candidate that raises is recorded as inf (a CUDA error is raised: :func:`is_device_fault`); if all do,
    the first is taken (also inside a capture)."""
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit[0]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return candidates[0]
    times: Dict[str, float] = {}
    for stage in candidates:
        try:
            run(stage)  # warm-up: compiles, cuDNN algorithm choice, allocator
            times[stage] = statistics.median(_elapsed_ms(lambda: run(stage), device) for _ in range(REPS))
        except Exception as exc:  # noqa: BLE001  (a stage that cannot run here is simply not chosen)
            if is_device_fault(exc):  # not "cannot run here": the context is broken for every later call
                raise
            times[stage] = float("inf")
    choice = min(candidates, key=lambda s: times[s])
    _CHOICES[key] = (choice, times)
    return choice


def key_for(x, W, A, B, expert_bias, stride, padding, dilation, groups, backend, a_blocks, grads) -> tuple:
    from .fast import _conv_format

    return (x.device.type, x.device.index, tuple(x.shape), x.dtype, _conv_format(x), tuple(W.shape), W.dtype,
            _conv_format(W),
            tuple(A.shape), A.dtype, B.dtype, expert_bias is not None, str(stride), str(padding), str(dilation),
            groups, backend, a_blocks, grads)
