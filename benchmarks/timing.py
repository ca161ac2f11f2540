"""Wall times of callables, synchronising CUDA around each call."""
from __future__ import annotations

import math
import statistics
import time
from collections import Counter
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


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Measured memory bandwidth: bytes read + written by a large device copy / time."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = back_to_back_ms(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / ms / 1e6


def matmul_tflops(device: str, n: int = 8192, reps: int = 10, dtype: torch.dtype = torch.float16) -> float:
    """Measured dense matmul throughput: 2 n^3 FLOP of an n x n x n ``dtype`` matmul / time (TFLOP/s)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = back_to_back_ms(lambda: torch.mm(a, b, out=out), device, reps)
    return 2 * n**3 / ms / 1e9


def geomean(values) -> float:
    """Geometric mean of positive ratios, rounded to 4 digits (how every suite aggregates its rows).
    NaN when a value is zero, negative, non-finite or no number, or there is none: a figure over
    fewer rows would read as the whole one; summarize.py reports NaN as 'not a valid figure'."""
    values = list(values)
    if not values or not all(_is_positive_finite(v) for v in values):
        return math.nan
    return round(math.exp(sum(map(math.log, values)) / len(values)), 4)


def _is_positive_finite(v) -> bool:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0


def error_text(exc) -> str:
    """An exception as one short line for a row's ``*_error`` key: its type and first message line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def profile_top(fn: Callable, device: str, k: int = 12, grad: bool = False, by_shape: bool = False) -> list[dict]:
    """Top k ops and kernels of one call of fn (after one warm call) by self device time (self CPU time
    on CPU): name, ms, share, calls. ``grad``: run with autograd recording (fwd + bwd profiles).
    ``by_shape``: the host-side ops only (aten ops, no kernel rows), one row per op and input shapes,
    each with its ``shapes``, ``dtypes`` and (on CUDA) the ``kernels`` it launched ({name, ms}, top 3):
    which op a kernel seen in a CUDA-graph replay's profile (names only) belongs to."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.set_grad_enabled(grad):
        fn()  # warm
        if device == "cuda":  # its kernels finish outside the profiled window
            torch.cuda.synchronize()
        with profile(activities=acts, record_shapes=by_shape) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
    events = prof.key_averages(group_by_input_shape=by_shape)
    outside_us, outside = 0.0, []
    if by_shape:
        details, in_ops = _op_details(prof.events(), _kineto_dtypes(prof))
        if device == "cuda":
            outside_us, outside = _kernels_outside_ops(events, in_ops)
        events = [e for e in events if e.device_type == DeviceType.CPU]

    total = sum(_self_us(e, device) for e in events) + outside_us or 1.0
    top = sorted(events, key=lambda e: _self_us(e, device), reverse=True)[:k]
    rows = [{"name": e.key[:80], "ms": round(_self_us(e, device) / 1e3, 3),
             "share": round(_self_us(e, device) / total, 4), "calls": int(e.count)} for e in top]
    if by_shape:
        for row, e in zip(rows, top):
            row.update(details.get((e.key, str(e.input_shapes)), {"shapes": _jsonable(e.input_shapes)}))
        if outside_us >= 0.01 * total:  # e.g. Triton kernels launched from Python: no aten op around them
            rows.append({"name": "(kernels launched outside any op)", "ms": round(outside_us / 1e3, 3),
                         "share": round(outside_us / total, 4), "calls": 0, "shapes": [], "kernels": outside})
    return rows


def _self_us(e, device: str) -> float:
    """Self device time of a profile row on CUDA, self CPU time on the CPU (us)."""
    if device == "cuda":
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
    return float(e.self_cpu_time_total)


def _kernels_outside_ops(averages, in_ops: Counter) -> tuple[float, list]:
    """Device time (us) of the kernels no host-side op launched (each kernel's total less ``in_ops``,
    what the ops launched of it) and the top 3 of them ({name, ms})."""
    from torch.autograd import DeviceType

    rest = Counter()
    for e in averages:
        if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False):
            rest[e.key] += _self_us(e, "cuda")
    rest.subtract(in_ops)
    rest = Counter({name: us for name, us in rest.items() if us > 0})
    return sum(rest.values()), [{"name": name[:100], "ms": round(us / 1e3, 3)} for name, us in rest.most_common(3)]


def _kineto_dtypes(prof) -> dict:
    """{(op name, str(input shapes)): input dtypes} from the profiler's raw events: torch 2.11's FunctionEvent
    has no input_dtypes (the device image's torch), its kineto events do. Empty where they cannot be read."""
    try:
        return {(e.name(), str(e.shapes())): list(e.dtypes()) for e in prof.profiler.kineto_results.events()}
    except (AttributeError, RuntimeError, TypeError):
        return {}


def _op_details(events, fallback_dtypes: dict | None = None) -> tuple[dict, Counter]:
    """{(op name, str(input shapes)): {shapes, dtypes, kernels}} of a profile's host-side events
    (key_averages keeps no dtypes nor kernel names), and the device time (us) per kernel name of
    every kernel an op launched. ``fallback_dtypes``: the same keys' dtypes where the events have none."""
    from torch.autograd import DeviceType

    out, kernel_us, in_ops = {}, {}, Counter()
    for ev in events:
        if ev.device_type != DeviceType.CPU:
            continue
        key = (ev.key, str(ev.input_shapes))
        if key not in out:
            dtypes = list(getattr(ev, "input_dtypes", None) or (fallback_dtypes or {}).get(key) or [])
            out[key] = {"shapes": _jsonable(ev.input_shapes), "dtypes": dtypes}
            kernel_us[key] = Counter()
        for kern in getattr(ev, "kernels", ()):
            kernel_us[key][kern.name] += kern.duration
            in_ops[kern.name] += kern.duration
    for key, d in out.items():
        if kernel_us[key]:
            d["kernels"] = [{"name": name[:100], "ms": round(us / 1e3, 3)}
                            for name, us in kernel_us[key].most_common(3)]
    return out, in_ops


def _jsonable(shapes):
    """Profiler input shapes as nested lists of ints (tensor lists stay nested; None for a non-tensor)."""
    if isinstance(shapes, (list, tuple)):
        return [_jsonable(s) for s in shapes]
    return shapes if isinstance(shapes, (int, float, str)) or shapes is None else str(shapes)
