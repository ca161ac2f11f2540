"""Fused guided update vs the eager (unfused) PyTorch reference, same inputs.

Ratio update_fused_vs_eager = time(fused) / time(eager), below 1 = fused faster;
on CUDA also the achieved bandwidth of the fused op (bytes read + written / time).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402

from ppap_fast import ops  # noqa: E402
from ppap_fast.ops import update as gu  # noqa: E402
from ppap_fast.schedule import Schedule  # noqa: E402


def _inputs(B, C, H, device, dtype, gen):
    out = torch.randn(B, 2 * C, H, H, generator=gen).to(device, dtype)
    x, grad, noise = (torch.randn(B, C, H, H, generator=gen).to(device, dtype) for _ in range(3))
    return x, out[:, :C], out[:, C:], grad, noise


def run(device: str = "cpu", quick: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    sched = Schedule.create("linear", 1000, "ddim25").to(device)
    shapes = [(32, 3, 256)] if device == "cuda" else [(8, 3, 64)]
    if device == "cuda" and not quick:
        shapes.append((256, 3, 256))
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    reps = 50 if device == "cuda" else (5 if quick else 20)
    fast = [b for b, why in ops.backend_report(device)["ops"]["guided_update"]["available"].items()
            if why == "ok" and b != "reference"]
    rows, ratios = [], []
    for B, C, H in shapes:
        for dtype in dtypes:
            for sampler in ("ddim", "ddpm"):
                table = gu.build_table(sched, sampler, eta=0.0 if sampler == "ddim" else 1.0)
                x, eps, v, grad, noise = _inputs(B, C, H, device, dtype, gen)
                idx = torch.randint(0, sched.num_timesteps, (B,), generator=gen).to(device)
                v = v.tanh() if table.mode == gu.MODES["ddpm_learned"] else None
                args = dict(v=v, grad=grad, noise=noise)
                eager = median_ms(lambda: gu.guided_update_reference(x, eps, idx, table, **args), device, reps)
                row = {"op": "guided_update", "sampler": sampler, "shape": [B, C, H, H], "dtype": str(dtype),
                       "eager_ms": round(eager, 4)}
                n_tensors = 5 + (1 if v is not None else 0) + 1  # x, eps, grad, noise, (v) in; sample, pred out
                nbytes = x.numel() * x.element_size() * (n_tensors + 1)
                for b in fast:
                    ms = median_ms(lambda: ops.guided_update(x, eps, idx, table, backend=b, **args), device, reps)
                    row[f"{b}_ms"] = round(ms, 4)
                    row[f"{b}_vs_eager"] = round(ms / eager, 4)
                    if device == "cuda":
                        row[f"{b}_GBps"] = round(nbytes / ms / 1e6, 1)
                best = min((row[f"{b}_ms"] for b in fast), default=None)
                if best is not None:
                    ratios.append(best / eager)
                rows.append(row)
    ratio = round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 4) if ratios else None
    return {"rows": rows, "ratios": {"update_fused_vs_eager": ratio}}


if __name__ == "__main__":
    import json

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu", quick=True), indent=1))
