"""Fused guided update vs the eager (unfused) PyTorch reference, same inputs; and the one-pass guided
eps correction (ops.guided_eps, what PPAPGuidance.correct runs for any diffusers scheduler) vs its
eager formula (arithmetic in float32, then a cat of the variance channels): ratio eps_fused_vs_eager,
geomean over the same shapes / dtypes of the best fast backend.

Ratio update_fused_vs_eager = time(fused) / time(eager), below 1 = fused faster (geomean over the
rows: DDIM, DDPM learned-range, DDPM fixed variance); on CUDA also the achieved bandwidth of the
fused op (bytes it must read + write / time) against the card's measured copy bandwidth (a 1 GiB
device-to-device copy, same run): ``update_hbm_fraction`` is the best row's fraction (goal >= 0.8).
CUDA times are per call over calls issued back to back (device time: a sync and launch per call
would add ~20 us to a ~60 us kernel); batch 32 and 256 at 3x256x256 (25 MB and 200 MB a tensor).

CPU: one thread (the suite sets it and restores it), and eager and fused are timed round-robin with
the per-row ratio the median over rounds of the ratio within a round: on a small shared box every
eager op's OpenMP region with 2 threads can wait for a descheduled thread, which once inflated the
eager DDIM time from 1 ms to 200 ms and said nothing about either implementation.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from timing import back_to_back_ms, copy_bandwidth_gbps, error_text, geomean, round_robin_ms  # noqa: E402

from ppap_fast import ops  # noqa: E402
from ppap_fast.ops import update as gu  # noqa: E402
from ppap_fast.schedule import Schedule  # noqa: E402


def _inputs(B, C, H, device, dtype, gen):
    out = torch.randn(B, 2 * C, H, H, generator=gen).to(device, dtype)
    x, grad, noise = (torch.randn(B, C, H, H, generator=gen).to(device, dtype) for _ in range(3))
    return x, out[:, :C], out[:, C:], grad, noise


def run(device: str = "cpu", quick: bool = False, emit=None) -> dict:
    if device == "cuda":
        return _run(device, quick, emit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(device, quick, emit)
    finally:
        torch.set_num_threads(threads)


def _run(device: str, quick: bool, emit=None) -> dict:
    gen = torch.Generator().manual_seed(0)
    sched = Schedule.create("linear", 1000, "ddim25").to(device)
    shapes = [(32, 3, 256)] if device == "cuda" else [(8, 3, 64)]
    if device == "cuda":
        shapes.append((256, 3, 256))
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    reps = 50 if device == "cuda" else (40 if quick else 200)
    fast = [b for b, why in ops.backend_report(device)["ops"]["guided_update"]["available"].items()
            if why == "ok" and b != "reference"]
    rows, ratios, fractions = [], [], []
    hbm = copy_bandwidth_gbps(device) if device == "cuda" else None
    if hbm is not None:
        rows.append({"op": "device_copy", "bytes": 1 << 30, "copy_GBps": round(hbm, 1)})
    for B, C, H in shapes:
        for dtype in dtypes:
            for sampler, var_type in (("ddim", None), ("ddpm", "learned_range"), ("ddpm", "fixed_large")):
                table = gu.build_table(sched, sampler, eta=0.0 if sampler == "ddim" else 1.0,
                                       var_type=var_type or "learned_range")
                x, eps, v, grad, noise = _inputs(B, C, H, device, dtype, gen)
                idx = torch.randint(0, sched.num_timesteps, (B,), generator=gen).to(device)
                v = v.tanh() if table.mode == gu.MODES["ddpm_learned"] else None
                args = dict(v=v, grad=grad, noise=noise)
                row = {"op": "guided_update", "sampler": sampler, "var_type": var_type, "shape": [B, C, H, H],
                       "dtype": str(dtype), "threads": torch.get_num_threads() if device == "cpu" else None}
                # read x, eps, grad (+ v for learned range, + noise for DDPM); write x_prev and pred_xstart
                n_tensors = 3 + (v is not None) + (sampler == "ddpm") + 2
                nbytes = x.numel() * x.element_size() * n_tensors
                fns = {b: (lambda b=b: ops.guided_update(x, eps, idx, table, backend=b, **args)) for b in fast}
                best = _time_vs_eager(row, lambda: gu.guided_update_reference(x, eps, idx, table, **args), fns,
                                      device, reps, nbytes, hbm)
                if best is not None:
                    ratios.append(row[f"{best}_vs_eager"])
                fractions += [row[f"{b}_hbm_fraction"] for b in fast if f"{b}_hbm_fraction" in row]
                rows.append(row)
    ratio = geomean(ratios) if ratios else None
    out = {"update_fused_vs_eager": ratio}
    if fractions:
        out["update_hbm_fraction"] = max(fractions)
    if emit is not None:  # the update figures survive a guided_eps row that raises (never run on a GPU yet)
        emit(list(rows), dict(out))
    eps_rows, eps_ratios = _eps_rows(device, shapes, dtypes, reps, hbm, gen)
    rows += eps_rows
    out["eps_fused_vs_eager"] = geomean(eps_ratios) if eps_ratios else None
    both = [r["triton_ms"] / r["cuda_ms"] for r in eps_rows if "triton_ms" in r and "cuda_ms" in r]
    if device == "cuda" and both:  # the automatic CUDA choice (cuda) is unmeasured: this decides it
        out["eps_triton_vs_cuda"] = geomean(both)
    return {"rows": rows, "ratios": out}


def _time_vs_eager(row, eager_fn, fns: dict, device, reps, nbytes, hbm):
    """Time eager_fn and each backend's fn into row (``{b}_ms``, ``{b}_vs_eager``, ``eager_ms``; on CUDA
    back to back, with ``{b}_GBps`` and ``{b}_hbm_fraction`` of nbytes moved, a backend that raises ``{b}_error``;
    on CPU round-robin, the ratio the median of per-round ratios); returns the backend with the lowest ratio
    (None without one)."""
    if device == "cuda":
        eager = back_to_back_ms(eager_fn, device, reps)
        for b, fn in fns.items():
            try:
                ms = back_to_back_ms(fn, device, reps)
            except Exception as exc:  # noqa: BLE001 - a kernel this GPU refuses costs only its own figures
                row[f"{b}_error"] = error_text(exc)
                continue
            row[f"{b}_ms"], row[f"{b}_vs_eager"] = round(ms, 4), round(ms / eager, 4)
            row[f"{b}_GBps"] = round(nbytes / ms / 1e6, 1)
            row[f"{b}_hbm_fraction"] = round(nbytes / ms / 1e6 / hbm, 4)
    else:
        times = round_robin_ms({"eager": eager_fn, **fns}, device, reps, warmup=3)
        eager = statistics.median(times["eager"])
        for b in fns:
            row[f"{b}_ms"] = round(statistics.median(times[b]), 4)
            row[f"{b}_vs_eager"] = round(statistics.median(f / e for f, e in zip(times[b], times["eager"])), 4)
    row["eager_ms"] = round(eager, 4)
    return min((b for b in fns if f"{b}_vs_eager" in row), key=lambda b: row[f"{b}_vs_eager"], default=None)


def _eager_eps(model_output, grad, coef, channels):
    """PPAPGuidance.correct's eps correction before ops.guided_eps: arithmetic, then a cat."""
    new = (model_output[:, :channels].float() - coef * grad.float()).to(model_output.dtype)
    return torch.cat([new, model_output[:, channels:]], dim=1)


def _eps_rows(device, shapes, dtypes, reps, hbm, gen):
    """guided_eps (one pass) vs the eager correction on a learned-variance output [B, 2C, H, H]."""
    fast = [b for b, why in ops.backend_report(device)["ops"]["guided_eps"]["available"].items()
            if why == "ok" and b != "reference"]
    rows, ratios = [], []
    for B, C, H in shapes:
        for dtype in dtypes:
            model_output = torch.randn(B, 2 * C, H, H, generator=gen).to(device, dtype)
            grad = torch.randn(B, C, H, H, generator=gen).to(device, dtype)
            coef = torch.rand(B, 1, 1, 1, generator=gen).to(device)
            row = {"op": "guided_eps", "shape": [B, 2 * C, H, H], "dtype": str(dtype),
                   "threads": torch.get_num_threads() if device == "cpu" else None}
            nbytes = model_output.element_size() * (2 * model_output.numel() + grad.numel())  # read both, write one
            fns = {b: (lambda b=b: ops.guided_eps(model_output, grad, coef, C, backend=b)) for b in fast}
            best = _time_vs_eager(row, lambda: _eager_eps(model_output, grad, coef, C), fns, device, reps, nbytes,
                                  hbm)
            if best is not None:
                ratios.append(row[f"{best}_vs_eager"])
            rows.append(row)
    return rows, ratios


if __name__ == "__main__":
    import json

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu", quick=True), indent=1))
