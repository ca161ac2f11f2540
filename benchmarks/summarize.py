"""Short table of a gpu_check.sh output folder: card and its probe (speed, clocks, throttling), test tally,
ratios, fastest rows."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path


def main(folder: str) -> None:
    out = Path(folder)
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "unknown card"
    print(f"card: {gpu.splitlines()[0] if gpu else '?'}")
    suites = {f: _load(out / f) for f in ("bench.json", "scale.json") if (out / f).exists()}  # each read once
    for fname, data in suites.items():  # the card's speed and state, beside its name
        print(f"{Path(fname).stem} {probe_line(data.get('device_probe') or {})}")
    for f in sorted(out.glob("tests*.txt")):
        for name, text in _test_groups(f):
            tally = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|errors?).*?)\s*=*$", text, flags=re.M)
            print(f"tests {name}: {tally[-1] if tally else 'no pytest summary line (timed out?)'}")
    for fname in ("bench.json", "scale.json"):
        _table(out / fname, suites.get(fname))
    if "bench.json" in suites:
        data = suites["bench.json"]
        for line in decisions(data.get("ratios") or {}) + goal_lines(data):
            print(line)


# Defaults waiting on a GPU measurement: (ratio, its meaning below 1, what to change when below 1)
PENDING = (
    ("distill_graph_implicit_vs_stacked", "implicit A stage faster in the graphed step (factorised bank)",
     "make 'implicit' the CUDA automatic A stage (ops/lora/__init__.py _resolve_a_stage)"),
    ("distill_implicit_vs_stacked", "implicit A stage faster eager (factorised bank)",
     "with the graphed ratio below 1 too: make 'implicit' the CUDA automatic A stage"),
    ("lora_graph_implicit_vs_stacked", "implicit A stage faster per conv layer inside CUDA graphs",
     "supports the distill rows above (per layer: 3x3 256->256)"),
    ("lora_graph_in_base_vs_implicit", "base conv + LoRA in the same Triton kernels faster per conv layer "
     "than cuDNN + the implicit LoRA kernels (channels_last, CUDA graphs)",
     "time a channels_last bank with PPAP_FAST_LORA_A_STAGE=in_base in the graphed distill step "
     "(#3's per-layer goal: lora_graph_in_base_vs_base_graph <= 1.15)"),
    ("lora_linear_graph_in_base_vs_default", "the linear LoRA layer faster with its base GEMM in the in-base "
     "kernels (DeiT-S qkv, CUDA graphs)", "make 'in_base' the CUDA default of lora_linear (ops/lora/__init__.py)"),
    ("distill_graph_cl_best_vs_nchw", "the graphed distill step faster with the bank in channels_last "
     "(PPAP_BENCH_DISTILL_CL=1; NCHW rows cannot vectorise the LoRA kernels' activation loads)",
     "convert the bank and its inputs to channels_last in distill on CUDA, with the A stage of the best row"),
    ("distill_graph_loralib_factorised_vs_delta", "loralib convs faster as factorised LoRA in the graphed step",
     "make 'factorised' the CUDA default of experts/bank.py loralib_conv_route"),
    ("distill_loralib_factorised_vs_delta", "loralib convs faster as factorised LoRA eager",
     "with the graphed ratio below 1 too: the same default change"),
    ("distill_graph_loralib_lowrank_vs_delta", "loralib convs faster through their low-rank factors (one stacked "
     "grouped conv + bmm) than as N dense convs in the graphed step (N=10: 3730 -> 1339 GFLOP)",
     "make 'lowrank' the CUDA default of experts/bank.py loralib_conv_route (then re-read "
     "distill_graph_vs_frozen_fwdbwd)"),
    ("distill_triton_vs_auto", "Triton LoRA faster than cuda_full eager (factorised bank)",
     "make 'triton' first in the CUDA automatic order (ops/lora/__init__.py _ORDER)"),
    ("distill_graph_amp_bf16_vs_fp32", "the graphed distill step (ExpertAdamW) faster with --amp bf16",
     "recommend `distill --amp bf16` for CUDA in README (or make it the CUDA default: an identity change)"),
    ("eps_triton_vs_cuda", "the Triton guided eps correction faster than the CUDA kernel (bench_update)",
     "put 'triton' before 'cuda' in ops/eps_correction.py's automatic CUDA choice (as guided_update's "
     "auto_cuda_backend)"),
    ("step_overlap_vs_fast", "the fast guided step faster with its guide on a side stream (overlap_guide; "
     "#4's guided / unguided and MFU goals)", "add overlap_guide=True on CUDA to fast_sampling.recommended_options"),
    ("step_compiled_guide_vs_fast", "the fast guided step faster with its guide compiled (compile_guide)",
     "add compile_guide=True on CUDA to fast_sampling.recommended_options (first step: its compile time)"),
    ("channel_sums_vs_separate", "a residual add writing the next GroupNorm's channel sums (ops.channel_sums) "
     "faster than the GroupNorm's own statistics pass", "set models/adm.py CHANNEL_SUMS's default to 'auto' "
     "(check denoiser_channel_sums_vs_off too)"),
    ("denoiser_compiled_chstats_vs_compiled", "compiled ADM faster with per-channel GroupNorm statistics",
     "set_group_norm_stats('channel') for compiled CUDA ADMs too "
     "(fast_sampling._denoiser_compile_kwargs: CPU + freeze only)"),
)


# defaults switched before a GPU measured them: key -> (what a ratio above 1.03 means, what to do)
REVERT_ABOVE = {
    "gn_stats_split_vs_group": ("the split GroupNorm statistics (channels_last) slower than one program per "
                                "group", "set ops/norm_act_triton.py GN_STATS_CL's default back to 'group'"),
    "resample_triton_vs_torch": ("the Triton 2x resampling slower than PyTorch's NHWC kernels",
                                 "leave Upsample / Downsample fast_resample off in ADMUNet.fuse_norm_act"),
    "cl_tile_rows_vs_narrow": ("the whole-row channels_last tiles of the GroupNorm apply and residual passes "
                               "slower than 32-channel tiles", "set ops/norm_act_triton.py CL_TILE's default "
                               "back to 'narrow'"),
    "wgrad_split_new_vs_old": ("the LoRA weight gradient slower split for 8 programs a SM than for 2",
                               "set ops/lora/triton_kernels.py WGRAD_PROGRAMS_PER_SM's default back to 2"),
    "out_head_fused_vs_half": ("ADM's output head as one op (norm + SiLU + 3x3 conv, ops.group_norm_silu_conv3x3) "
                               "slower than the half head (Triton norm, cuDNN conv)",
                               "default ADMUNet.fuse_norm_act's fused_out_head to False (models/adm.py)"),
    "cat_triton_vs_torch": ("the Triton channel concatenation (ops.cat_channels) slower than torch.cat",
                            "leave ADMUNet.fast_cat off in ADMUNet.fuse_norm_act"),
}


# (label, device_probe key, unit) of the probe line
PROBE_FIGURES = (("matmul fp16", "matmul_fp16_tflops", " TFLOP/s"), ("copy", "copy_gbps", " GB/s"),
                 ("SM clock", "sm_clock_mhz", " MHz"), ("max SM clock", "max_sm_clock_mhz", " MHz"),
                 ("mem clock", "mem_clock_mhz", " MHz"), ("power", "power_w", " W"),
                 ("power limit", "power_limit_w", " W"), ("temp", "temperature_c", " C"),
                 ("throttle", "throttle_reasons", ""), ("load", "loadavg", ""))


def probe_line(probe: dict) -> str:
    """One line of run.py's device_probe: each figure before -> after the suites (one value where
    both agree), and the probe's errors; the numbers to check before comparing times across runs."""
    before, after = probe.get("before") or {}, probe.get("after") or {}
    parts = []
    for label, key, unit in PROBE_FIGURES:
        if key not in before and key not in after:
            continue
        b, a = (_probe_value(d.get(key), key in d) for d in (before, after))
        parts.append(f"{label} {b}{unit}" if a == b else f"{label} {b} -> {a}{unit}")
    for d, when in ((before, "before"), (after, "after")):
        parts += [f"{k.upper()} {when}: {d[k]}" for k in ("error", "smi_error") if d.get(k)]
    return "probe: " + (", ".join(parts) if parts else "none recorded")


def _probe_value(v, present: bool) -> str:
    if not present:
        return "?"
    if isinstance(v, list):
        return "[" + " ".join(str(x) for x in v) + "]" if v else "none"
    return "n/a" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def decisions(ratios: dict) -> list:
    """One line per pending default: the measured ratio and whether it says to switch."""
    lines = []
    for key, meaning, action in PENDING + tuple((k, "", "") for k in REVERT_ABOVE):
        v = ratios.get(key)
        if v is None:
            lines.append(f"decision {key}: not measured")
        elif not is_valid_figure(v):
            lines.append(f"decision {key} = {v}: not a valid ratio (zero, negative, NaN or infinite): no decision")
        elif key in REVERT_ABOVE:
            meaning, action = REVERT_ABOVE[key]
            if v > 1.03:
                lines.append(f"decision {key} = {v}: {meaning} -> {action}")
            else:
                lines.append(f"decision {key} = {v}: keep the new default (revert only above 1.03)")
        elif v < 0.97:
            lines.append(f"decision {key} = {v}: {meaning} -> {action}")
        else:
            lines.append(f"decision {key} = {v}: keep the current default (needs < 0.97 to switch)")
    return lines


def is_valid_figure(v) -> bool:
    """A time ratio, MFU or bandwidth fraction worth reading: a finite number above 0 (a zero or
    non-finite time makes 0, NaN or inf, which would read as met or as a switch)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# the issues' GPU goals: (label, ratio key or (row suite, row key[, variant]), "<=" / ">=", goal)
GOALS = (
    ("#4 fast / reference", "step_fast_vs_reference", "<=", 1 / 3),
    ("#4 guided / unguided", "step_guided_vs_unguided", "<=", 1.02),
    ("#4 guided / unguided, overlap_guide", "step_guided_vs_unguided_overlap", "<=", 1.02),
    ("#4 guided / unguided, compile_guide", "step_guided_vs_unguided_compiled_guide", "<=", 1.02),
    ("#4 MFU", ("bench_step", "fast_mfu"), ">=", 0.5),
    ("#4 MFU, overlap_guide", ("bench_step", "fast_overlap", "mfu"), ">=", 0.5),
    ("#4 MFU, compile_guide", ("bench_step", "fast_compiled_guide", "mfu"), ">=", 0.5),
    ("#4 fused update / HBM", "update_hbm_fraction", ">=", 0.8),
    ("#3 LoRA fwd+bwd / base layer", "lora_fwdbwd_vs_base", "<=", 1.15),
    ("#3 LoRA fwd / peft mixed batch", "lora_fwd_vs_peft", "<=", 1 / 3),
    ("#3 one-pass / sequential distill", "distill_onepass_vs_sequential", "<=", 0.5),
)


def goal_lines(data: dict) -> list:
    """One line per issue goal: the figure (not measured when absent) and whether it meets the goal."""
    lines = []
    for label, key, op, goal in GOALS:
        if isinstance(key, str):
            v = (data.get("ratios") or {}).get(key)
        else:
            rows = [r for r in data.get("rows") or []
                    if isinstance(r, dict) and r.get("suite") == key[0] and key[1] in r]
            v = rows[0][key[1]] if rows else None
            for k in key[2:]:  # a variant that fell back from an option asked is not the variant named
                v = v.get(k) if isinstance(v, dict) and not v.get("fallbacks") else None
        fell_back = _fast_step_fallbacks(data, key)
        if not isinstance(v, (int, float)):
            lines.append(f"goal {label} {op} {goal:.4g}: not measured")
        elif not is_valid_figure(v):
            lines.append(f"goal {label} {op} {goal:.4g}: {v} not a valid figure (zero, negative, NaN or infinite): "
                         "not measured")
        elif fell_back:
            lines.append(f"goal {label} {op} {goal:.4g}: {v} (fast path fell back: {', '.join(fell_back)}): "
                         "no verdict")
        else:
            met = v <= goal if op == "<=" else v >= goal
            lines.append(f"goal {label} {op} {goal:.4g}: {v} {'MET' if met else 'not met'}")
    return lines


# goals read from bench_step's main fast steps: key -> whether the unguided step's fallbacks count too
_FAST_STEP_GOALS = {"step_fast_vs_reference": False, "step_guided_vs_unguided": True,
                    ("bench_step", "fast_mfu"): False}


def _fast_step_fallbacks(data: dict, key) -> list:
    """The bench_step row's ``fast_fallbacks`` (options asked that did not run) behind a goal's figure."""
    if key not in _FAST_STEP_GOALS:
        return []
    rows = [r for r in data.get("rows") or [] if isinstance(r, dict) and r.get("suite") == "bench_step"]
    fallbacks = [str(f) for r in rows for f in r.get("fast_fallbacks") or []]
    return [f for f in fallbacks if _FAST_STEP_GOALS[key] or not f.startswith("unguided:")]


def _test_groups(path: Path):
    """(group, text) of a tests.txt whose groups start with '=== tests NAME' lines (else the whole file)."""
    parts = re.split(r"^=== tests (\S+)\n", path.read_text(), flags=re.M)
    if len(parts) == 1:
        return [(path.stem, parts[0])]
    return list(zip(parts[1::2], parts[2::2]))


_NOTE_SUFFIXES = ("error", "skipped", "warnings", "fallbacks")
FIGURE_SUFFIXES = ("_ms", "GBps", "_fraction", "_s", "_per_s", "_gib", "tflops", "mfu_vs_dense_bf16_peak", "images")


def _table(path: Path, data: dict | None) -> None:
    """The suite JSON at ``path`` as ``_load`` read it (None: no such file)."""
    if data is None:
        print(f"{path.stem}: no {path.name}")
        return
    if "_unreadable" in data:
        print(f"{path.stem}: {path.name} unreadable: {data['_unreadable']}")
        return
    print(f"{path.stem} device: {data.get('device', '? (no device key)')} (torch {data.get('torch', '?')})")
    for key in ("ratios", "rows"):
        if key not in data:
            print(f"  {path.name} has no {key}")
    for k, v in (data.get("ratios") or {}).items():
        print(f"  {k:30s} {v}")
    for k, v in data.get("errors", {}).items():
        print(f"  ERROR {k}: {v}")
    if data.get("running"):
        print(f"  CUT: the run was killed inside {data['running']} (its rows so far are marked partial)")
    if data.get("seconds"):
        print("  seconds per suite: " + ", ".join(f"{k} {v}" for k, v in data["seconds"].items()))
    for suite, used in (data.get("backends_used") or {}).items():  # a fallback shows up here
        print(f"  backends {suite}: " + ", ".join(f"{op}={'/'.join(b)}" for op, b in sorted(used.items())))
    if data.get("memory_gib"):
        print("  GPU memory GiB per suite (peak, left after): " + ", ".join(
            f"{k} {v.get('peak', '?')}/{v.get('left', '?')}" if isinstance(v, dict) else f"{k} {v}"
            for k, v in data["memory_gib"].items()))
    for row in data.get("rows") or []:
        keys = [k for k in row if k.endswith(FIGURE_SUFFIXES)]
        label = " ".join(str(row.get(k)) for k in ("suite", "bench", "op", "name", "config", "layer", "N",
                                                    "variant", "sampler", "var_type", "shape", "dtype") if k in row)
        print(f"  {label}: " + ", ".join(f"{k}={row[k]}" for k in keys))
        for k in row:  # what did not run, or ran another path than the row names: never silent
            if k.endswith(_NOTE_SUFFIXES) and row[k]:
                print(f"    {k.upper() if 'error' in k else k}: {row[k]}")
        for k, v in row.items():  # a variant's own figures (bench_step: fast_compiled, ...)
            if isinstance(v, dict) and ("ms" in v or "error" in v):
                print(f"      {k}: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items()
                                                 if kk not in ("warnings", "applied_options")
                                                 and not kk.endswith("profile_top")))
                if v.get("warnings"):
                    print(f"      {k} warnings: {v['warnings']}")
                for key in (kk for kk in v if kk.endswith("profile_top")):
                    _print_profile(f"{k}.{key}", v[key])
        for key in (k for k in row if k.endswith("profile_top")):
            _print_profile(key, row[key])


def _load(path: Path) -> dict:
    """A suite JSON as a dict; one whose text is no JSON object gives {"_unreadable": why} (a cut write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"_unreadable": f"{type(err).__name__}: {err}"}
    return data if isinstance(data, dict) else {"_unreadable": f"a JSON {type(data).__name__}, not an object"}


def _print_profile(key: str, ops: list) -> None:
    """Top 6 kernels / ops; an op-level profile (rows with shapes) all of its rows, each with its
    inputs (dtype[shape]) and the top kernel it launched (the JSON holds 3)."""
    print(f"    {key}:")
    by_shape = any("shapes" in op for op in ops)
    for op in ops if by_shape else ops[:6]:
        print(f"      {op['share']:6.1%} {op['ms']:9.3f} ms x{op['calls']:<4d} {op['name']}"
              + (f"  {_inputs(op)}" if by_shape else ""))
        for kern in op.get("kernels", [])[:1]:
            print(f"{'':26s}-> {kern['ms']:9.3f} ms {kern['name']}")


def _inputs(op: dict) -> str:
    """The tensor inputs of an op-profile row: dtype[shape] each (scalars left out)."""
    shapes, dtypes = op.get("shapes") or [], op.get("dtypes") or []
    dtypes = list(dtypes) + [""] * (len(shapes) - len(dtypes))
    return " ".join(f"{d or '?'}[{','.join(map(str, s))}]" for s, d in zip(shapes, dtypes) if s)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ppap_gpu_out")
