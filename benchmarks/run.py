"""Benchmark runner: `python benchmarks/run.py --device cpu|cuda --quick --json FILE`.

Runs every suite (bench_*.py with run(device, quick)), writes
{"device", "torch", "rows": [...], "ratios": {...}} and prints the ratios.
Ratios are time ratios A/B for a name "A_vs_B": below 1 means A is faster. The JSON is rewritten
after every suite, and a suite whose run() takes ``emit`` writes its rows as it goes (partial=True).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
SUITES = ["bench_update", "bench_lora", "bench_denoiser", "bench_step", "bench_distill", "bench_scale",
          "bench_generate"]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


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
    print(f"device: {out['device']}")
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
