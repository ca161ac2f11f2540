"""A whole training step (forward, loss, backward, optimizer step) captured in one CUDA graph.

Distilling PPAP experts is launch-bound on a GPU: a ResNet50 bank at batch 64 and 128x128 needs
about 5 ms of arithmetic per step but took 189 ms eagerly on an H100 (benchmarks/NOTES.md), the
time of some thousand small launches (routed LoRA, per-expert norms) issued from Python.
:class:`GraphedTrainStep` runs the first ``warmup`` steps eagerly on a side stream (they allocate
the optimizer state and autotune), captures the next one and replays it from then on with the
new inputs copied into static buffers: every step is a real step, in order. The multi-expert LoRA
ops in the step prefer their Triton backend there (``lora_backend``; None keeps the automatic
choice): with no host time left, its kernels were the fastest in every H100 layer row.

The step function must be capturable: no host synchronisation (``ExpertBank.check_inputs`` off,
no ``.item()``), an optimizer made with ``capturable=True`` (or an ``ExpertAdamW``) and a tensor
learning rate (set it with ``group["lr"].fill_(lr)`` between steps), inputs of one shape and dtype. It should call
``optimizer.zero_grad(set_to_none=True)`` before ``backward()`` (in the graph, gradients are then
written, not accumulated). The returned loss tensor is static: read or copy it before the next step.
A capture that fails warns once and runs that step and every later one eagerly (``capture_error``).
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Callable

import torch

__all__ = ["GraphedTrainStep", "why_no_graph", "capture_after_warmup"]


def why_no_graph(device: torch.device, distributed: bool = False) -> str | None:
    """Why a training step on ``device`` cannot be captured here (None: it can)."""
    if device.type != "cuda":
        return f"CUDA-graph capture needs a CUDA device (training runs on {device})"
    if not torch.cuda.is_available():  # it said "needs a CUDA device (training runs on cuda)"
        return f"CUDA-graph capture needs a CUDA device, and torch sees none here (training asked for {device})"
    if distributed:
        return "not with several processes (DDP's gradient all-reduce is not captured here)"
    return None


def capture_after_warmup(step: Callable[[], object], warmup: int = 3, *, pool=None, device=None):
    """``step()`` ``warmup`` times on a side stream (lazy inits, cuDNN and Triton autotuning,
    compiles: what capture refuses), then once under capture; returns (graph, what the captured call
    returned: static outputs that every replay rewrites). ``pool``: a
    ``torch.cuda.graph_pool_handle()`` shared with other graphs that never run at the same time.
    For a step whose warm-up calls must count as real work, see :class:`GraphedTrainStep`."""
    # torch.cuda.graph captures on a stream of the *current* device: make it ``device`` (else, with
    # the tensors on cuda:1 and cuda:0 current, their kernels ran uncaptured and replays did nothing)
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
    return graph, out


class GraphedTrainStep:
    """``step(*inputs) -> loss``: ``step_fn(*static_inputs)`` eagerly ``warmup`` times, then captured
    once and replayed (module docstring)."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], warmup: int = 3, lora_backend: str | None = "triton"):
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 1:  # 2.5 ran as 2
            raise ValueError(f"warmup must be an int >= 1 (the optimizer state must exist before capture), got "
                             f"{warmup!r}")
        if lora_backend is not None:
            from .ops import lora

            lora.check_backend_name(lora_backend)
        self.step_fn, self.warmup = step_fn, int(warmup)
        self.lora_backend = lora_backend
        self.static: list[torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.eager_steps = 0
        self.capture_error: str | None = None  # why the capture failed: every step eager from then on
        self._side = None

    def lora_preference(self):
        """The LoRA ops' automatic backend during the warm-up and capture (``lora_backend``; the
        warm-up compiles what the capture then records)."""
        if self.lora_backend is None:
            return contextlib.nullcontext()
        from .ops import lora

        return lora.prefer_backend(self.lora_backend)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _load(self, inputs):
        if self.static is None:
            for i, x in enumerate(inputs):
                if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
                    got = f"a tensor on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(f"GraphedTrainStep takes CUDA tensors, got {got} as input {i}: move the inputs "
                                     "to the GPU, or call the step function itself (why_no_graph(device) says when)")
            self.static = [x.detach().clone() for x in inputs]
            return
        if len(inputs) != len(self.static):
            raise ValueError(f"{len(inputs)} inputs, the captured step takes {len(self.static)}")
        for i, (s, x) in enumerate(zip(self.static, inputs)):
            if not isinstance(x, torch.Tensor):  # x.shape raised AttributeError
                raise ValueError(f"input {i} is a {type(x).__name__}; the captured step takes a tensor "
                                 f"{tuple(s.shape)} {s.dtype} on {s.device} (static shapes)")
            if x.shape != s.shape or x.dtype != s.dtype or x.device != s.device:
                raise ValueError(f"input {i} is {tuple(x.shape)} {x.dtype} on {x.device}; the captured step "
                                 f"takes {tuple(s.shape)} {s.dtype} on {s.device} (static shapes)")
            s.copy_(x, non_blocking=True)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not inputs:  # self.static[0] raised IndexError
            raise ValueError("GraphedTrainStep takes the step's input tensors (at least one: the step runs on "
                             "their device), got none")
        if self.capture_error is not None:
            return self.step_fn(*inputs)
        self._load(inputs)
        # capture and replay on the inputs' device (torch.cuda.graph and replay use the current one's streams)
        with torch.cuda.device(self.static[0].device):
            return self._step()

    def _step(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        cur = torch.cuda.current_stream(self.static[0].device)
        if self.eager_steps < self.warmup:
            if self._side is None:
                self._side = torch.cuda.Stream(device=self.static[0].device)
            self._side.wait_stream(cur)
            with torch.cuda.stream(self._side), self.lora_preference():
                loss = self.step_fn(*self.static)
            cur.wait_stream(self._side)
            self.eager_steps += 1
            return loss
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), self.lora_preference():
                loss = self.step_fn(*self.static)
        except Exception as exc:  # noqa: BLE001 - as the sampler's capture: eager from now on
            self.capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"GraphedTrainStep: capturing the training step in a CUDA graph failed "
                          f"({self.capture_error}); training eagerly from now on", UserWarning, stacklevel=3)
            return self.step_fn(*self.static)  # the failed capture ran nothing: this is the step's execution
        self.loss, self.graph = loss, graph
        graph.replay()  # capturing ran nothing: this is the step's execution
        return self.loss
