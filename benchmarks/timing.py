"""Wall times of callables, synchronising CUDA around each call."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def timed_ms(fn: Callable, device: str) -> float:
    """One call of ``fn``, in ms (the device's queue drained before and after)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable, device: str, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed_ms(fn, device) for _ in range(reps))


def round_robin_ms(fns: dict, device: str, reps: int, warmup: int = 2) -> dict:
    """Per-round times (ms) of each callable, timed one after the other in every round, so that load
    drift on a shared machine hits all alike: {name: [ms per round]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed_ms(fn, device))
    return times


def back_to_back_ms(fn: Callable, device: str, reps: int, warmup: int = 3) -> float:
    """Mean ms per call over ``reps`` calls issued back to back (one sync around the whole run): on
    CUDA the device time of a kernel-bound op, without the per-call launch latency and sync that
    ``timed_ms`` includes (on CPU the same as a mean of wall times)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def geomean(values) -> float:
    """Geometric mean of positive ratios, rounded to 4 digits (how every suite aggregates its rows)."""
    values = list(values)
    return round(math.exp(sum(map(math.log, values)) / len(values)), 4)


def profile_top(fn: Callable, device: str, k: int = 12, grad: bool = False) -> list[dict]:
    """Top k ops and kernels of one call of fn (after one warm call) by self device time (self CPU time
    on CPU): name, ms, share, calls. ``grad``: run with autograd recording (fwd + bwd profiles)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.set_grad_enabled(grad):
        fn()  # warm
        with profile(activities=acts) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
    events = prof.key_averages()

    def self_us(e):
        if device == "cuda":
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:k]
    return [{"name": e.key[:80], "ms": round(self_us(e) / 1e3, 3), "share": round(self_us(e) / total, 4),
             "calls": int(e.count)} for e in top]
