"""Benchmark runner: `python benchmarks/run.py --device cpu|cuda --quick --json FILE`.

Runs every suite (bench_*.py with run(device, quick)), writes
{"device", "torch", "rows": [...], "ratios": {...}} and prints the ratios.
Ratios are time ratios A/B for a name "A_vs_B": below 1 means A is faster. The JSON is rewritten
after every suite, and a suite whose run() takes ``emit`` writes its rows as it goes (partial=True).
``device_probe`` {"before", "after"}: the card's state before the first suite and after the last
(device_probe()): absolute times of runs on different days compare only where these agree (one
H100 ran the same cuDNN kernel 1.5x slower than another day's).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from summarize import probe_line  # noqa: E402
from timing import copy_bandwidth_gbps, matmul_tflops  # noqa: E402

SUITES = ["bench_update", "bench_lora", "bench_denoiser", "bench_step", "bench_distill", "bench_scale",
          "bench_generate"]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# nvidia-smi --query-gpu fields of the probe -> JSON keys (the throttle field last: renamed in newer drivers)
SMI_FIELDS = (("clocks.sm", "sm_clock_mhz"), ("clocks.mem", "mem_clock_mhz"), ("clocks.max.sm", "max_sm_clock_mhz"),
              ("clocks.max.mem", "max_mem_clock_mhz"), ("power.draw", "power_w"), ("power.limit", "power_limit_w"),
              ("temperature.gpu", "temperature_c"), ("clocks_throttle_reasons.active", "throttle_mask"))
THROTTLE_FIELD_NAMES = ("clocks_throttle_reasons.active", "clocks_event_reasons.active")
# NVML's clocks throttle (event) reason bits
THROTTLE_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
                    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}


def device_probe(device: str, matmul_n: int = 8192, copy_bytes: int = 1 << 30, rounds: int = 3) -> dict:
    """The machine's state now, so that runs on different days can be compared. On CUDA: the
    measured fp16 dense matmul (matmul_n^3) TFLOP/s and device-to-device copy GB/s (each the median of
    ``rounds``; well under a second on an H100), then nvidia-smi's clocks, power, temperature and
    active throttle reasons, read right after that load (idle clocks say nothing). On the CPU: the
    load average. Never raises: a failure is recorded as ``error`` / ``smi_error``."""
    t0 = time.perf_counter()
    probe = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device == "cuda":
        try:
            probe["matmul_fp16_tflops"] = _4g(statistics.median(matmul_tflops(device, matmul_n) for _ in range(rounds)))
            probe["copy_gbps"] = _4g(statistics.median(copy_bandwidth_gbps(device, copy_bytes) for _ in range(rounds)))
        except Exception as exc:  # noqa: BLE001 - a probe must not cost the run
            probe["error"] = f"{type(exc).__name__}: {exc}"[:200]
        probe.update(nvidia_smi_state())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the first suite's peak is its own
    elif hasattr(os, "getloadavg"):
        probe["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    probe["seconds"] = round(time.perf_counter() - t0, 2)
    return probe


def _4g(v: float) -> float:
    return float(f"{v:.4g}")


def nvidia_smi_state(timeout: float = 10) -> dict:
    """Clocks (MHz), power (W), temperature (C) and active throttle reasons of the first GPU
    nvidia-smi lists, as SMI_FIELDS' keys; {"smi_error": why} when nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"smi_error": "nvidia-smi not found"}
    why = ""
    for throttle in THROTTLE_FIELD_NAMES:  # an unknown field fails the whole query
        fields = ",".join([f for f, _ in SMI_FIELDS[:-1]] + [throttle])
        try:
            res = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            return {"smi_error": f"{type(exc).__name__}: {exc}"[:200]}
        if res.returncode == 0 and res.stdout.strip():
            return _parse_smi(res.stdout.strip().splitlines()[0])
        why = f"exit {res.returncode}: {(res.stdout + res.stderr).strip()}"
    return {"smi_error": f"nvidia-smi {why}"[:200]}


def _parse_smi(line: str) -> dict:
    values = [v.strip() for v in line.split(",")]
    out = {}
    for (_, key), v in zip(SMI_FIELDS, values):
        try:
            out[key] = float(v) if key != "throttle_mask" else v
        except ValueError:  # [N/A], [Not Supported]
            out[key] = None
    try:
        mask = int(out.get("throttle_mask") or "", 16)
    except ValueError:
        out["throttle_reasons"] = None
    else:
        out["throttle_reasons"] = [THROTTLE_REASONS.get(1 << b, hex(1 << b)) for b in range(64) if mask >> b & 1]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write results here (atomically)")
    p.add_argument("--only", nargs="*", default=None, help="suites to run (default: all present)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    out = {"device": device_name(args.device), "device_type": args.device, "torch": torch.__version__,
           "triton": _triton_version(), "quick": args.quick, "rows": [], "ratios": {}, "errors": {},
           "memory_gib": {}, "seconds": {}, "backends_used": {}}
    out["device_probe"] = {"before": device_probe(args.device)}
    for name in args.only or SUITES:
        if not (HERE / f"{name}.py").exists():
            continue
        t0 = time.perf_counter()
        # before the import: a suite that fails to import must not crash the runner (NameError) or,
        # on CUDA, hit the previous suite's emitter set to None below
        emit = _emitter(out, name, args.json)
        if args.json:  # a run killed inside this suite says so: "running" names it (absent once it ends)
            _write_json({**out, "running": name}, args.json)
        used = _BackendRecorder()
        try:
            with used:
                suite = importlib.import_module(name)
                kwargs = {"emit": emit} if "emit" in inspect.signature(suite.run).parameters else {}
                res = suite.run(args.device, args.quick, **kwargs)
        except Exception as exc:  # one broken suite must not hide the others, nor what it emitted
            traceback.print_exc()
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            out["rows"] += [dict(suite=name, partial=True, **r) for r in emit.rows]
            out["ratios"].update(emit.ratios)
        else:
            out["rows"] += [dict(suite=name, **r) for r in res["rows"]]
            out["ratios"].update(res["ratios"])
            print(f"[{name} {time.perf_counter() - t0:.0f}s] " + json.dumps(res["ratios"]), flush=True)
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
        out["backends_used"][name] = used.used
        if args.device == "cuda":  # what a suite left behind (e.g. graph pools) must not starve the next
            suite = emit = res = None
            gc.collect()
            torch.cuda.empty_cache()
            out["memory_gib"][name] = {"peak": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                       "left": round(torch.cuda.memory_allocated() / 2**30, 2)}
            torch.cuda.reset_peak_memory_stats()
        if args.json:  # after every suite: a run killed at its time limit keeps what finished
            _write_json(out, args.json)
    out["device_probe"]["after"] = device_probe(args.device)  # throttling during the run shows here
    if args.json:
        _write_json(out, args.json)
    print(f"device: {out['device']}")
    print(probe_line(out["device_probe"]))
    for k, v in out["ratios"].items():
        print(f"  {k:32s} {v}")
    for k, v in out["errors"].items():
        print(f"  ERROR {k}: {v}")
    return 1 if out["errors"] else 0


def _triton_version():
    try:
        import triton
    except Exception:  # noqa: BLE001
        return None
    return triton.__version__


class _BackendRecorder:
    """Within the block, every backend the dispatched ops choose: {op: sorted backends} in ``used``
    (the registry ops through _registry.select, the LoRA ops through ops.lora.last_backend), so the
    JSON says when a suite ran a reference / fallback path where a fast one was meant."""

    def __init__(self):
        self.used: dict = {}
        self._undo = []

    def _add(self, op, backend):
        if backend is not None:
            self.used.setdefault(op, [])
            if backend not in self.used[op]:
                self.used[op] = sorted(self.used[op] + [str(backend)])

    def __enter__(self):
        try:
            from ppap_fast.ops import _registry
            from ppap_fast.ops import lora as L
        except Exception:  # noqa: BLE001 - nothing to record; the suite reports its own import error
            return self
        rec = self
        orig_select = _registry.select

        def select(op, device, backend=None):
            fn = orig_select(op, device, backend)
            rec._add(op, _registry._OPS[op].last)
            return fn

        class Recording(dict):
            def __setitem__(self, k, v):
                rec._add(k, v)
                super().__setitem__(k, v)

        orig_last = L.last_backend
        _registry.select = select
        L.last_backend = Recording(orig_last)

        def undo():
            _registry.select = orig_select
            orig_last.clear()
            orig_last.update(L.last_backend)
            L.last_backend = orig_last
        self._undo.append(undo)
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False


def _emitter(out: dict, suite: str, path):
    """emit(rows, ratios) for a suite that reports as it goes: the JSON then holds the suite's rows so
    far (marked partial) until it returns, so a run killed at its time limit keeps them."""
    def emit(rows, ratios=None):
        rows = [rows] if isinstance(rows, dict) else list(rows)
        emit.rows, emit.ratios = rows, dict(ratios or {})
        if path:
            snap = {**out, "rows": out["rows"] + [dict(suite=suite, partial=True, **r) for r in rows],
                    "ratios": {**out["ratios"], **(ratios or {})}, "running": suite}
            _write_json(snap, path)
    emit.rows, emit.ratios = [], {}
    return emit


def _write_json(out: dict, path: Path) -> None:
    from ppap_fast.data.shards import _atomic

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
    _atomic(path, write, ".json")


if __name__ == "__main__":
    sys.exit(main())
