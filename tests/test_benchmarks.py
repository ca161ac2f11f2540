"""The benchmark runner and the real-scale suite run end to end on CPU (tiny models), so that the
GPU session's prepared script does not fail on a Python error. No timing is asserted here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_scale_suite_and_summary(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "PPAP_GEN_IMAGES": "20", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/run.py"), "--device", "cpu", "--quick",
                          "--only", "bench_scale", "bench_generate", "--json", str(out)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert not data["errors"]
    rows = {r["bench"]: r for r in data["rows"]}
    sampling, gen = rows["guided_sampling_ddim25"], rows["datafree_generation_ddim25"]
    assert sampling["steps"] == 25 and sampling["guided_images_per_s"] > 0 and sampling["flops_per_run"] > 0
    assert gen["images"] == 20 and gen["images_per_s"] > 0
    assert data["ratios"]["sample_guided_vs_unguided"] > 0
    summary = subprocess.run([sys.executable, str(ROOT / "benchmarks/summarize.py"), str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0 and "guided_sampling_ddim25" in summary.stdout, summary.stderr


def test_update_bench_bandwidth_accounting():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_update

    assert bench_update.copy_bandwidth_gbps("cpu", nbytes=1 << 20, reps=3) > 0


def test_denoiser_suite_profiles_and_times_variants(tmp_path):
    out = tmp_path / "den.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/run.py"), "--device", "cpu", "--quick",
                          "--only", "bench_denoiser", "--json", str(out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert not row.get("partial") and row["nchw_ms"] > 0 and row["channels_last_ms"] > 0 and row["gflop"] > 0
    assert row["profile_top"] and all(p["ms"] >= 0 and 0 <= p["share"] <= 1 for p in row["profile_top"])
    assert data["ratios"]["denoiser_channels_last_vs_nchw"] > 0


def test_denoiser_resample_row_runs_the_triton_ops():
    """The CUDA-only resample row, on CPU through the Triton interpreter (tiny shapes): Triton times,
    torch times, bit-for-bit flags and the ratio."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser

    from ppap_fast import ops

    row = {}
    ratio = bench_denoiser._resample_ratio(row, 1, 1, device="cpu", channels=8, size=4)
    assert ops.last_backend("upsample_nearest2x") == ops.last_backend("avg_pool2x") == "triton"
    assert row["resample_up_bitwise"] and row["resample_pool_bitwise"]
    assert all(row[f"resample_{k}_ms"] > 0 for k in ("up_torch", "up_triton", "pool_torch", "pool_triton"))
    assert ratio > 0


def test_denoiser_gn_stats_row_times_both_statistics_kernels(monkeypatch):
    """The CUDA-only GroupNorm statistics row on CPU (interpreter, tiny map): both modes run (the split
    kernels, then the per-group one), their times and ratio recorded, the module's mode restored."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser

    from _util import LaunchRecorder
    from ppap_fast.ops import norm_act_triton as NT

    part, group = LaunchRecorder(NT._gn_stats_cl_part_kernel), LaunchRecorder(NT._gn_stats_kernel)
    monkeypatch.setattr(NT, "_gn_stats_cl_part_kernel", part)
    monkeypatch.setattr(NT, "_gn_stats_kernel", group)
    row = {}
    ratio = bench_denoiser._gn_stats_ratio(row, 1, 1, device="cpu", channels=64, size=4)
    assert part.launches and group.launches and NT.GN_STATS_CL == "split"
    assert row["gn_stats_split_ms"] > 0 and row["gn_stats_group_ms"] > 0 and ratio > 0


def test_denoiser_channel_sums_row_times_both_paths(monkeypatch):
    """The CUDA-only channel sums row on CPU (interpreter, tiny map): the separate path runs the GroupNorm's own
    statistics kernels, the other the residual op's sums kernel and the statistics from them; times, the ratio
    and the two outputs' difference recorded."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser

    from _util import LaunchRecorder
    from ppap_fast.ops import norm_act_triton as NT
    from ppap_fast.ops import residual_triton as RT

    recs = {}
    for mod, name in ((NT, "_gn_stats_cl_part_kernel"), (NT, "_gn_stats_from_sums_kernel"),
                      (RT, "_bias_residual_sums_kernel")):
        recs[name] = LaunchRecorder(getattr(mod, name))
        monkeypatch.setattr(mod, name, recs[name])
    row = {}
    ratio = bench_denoiser._channel_sums_ratio(row, 1, 1, device="cpu", channels=64, size=4)
    # median_ms: 2 warm-up calls + 1 rep each, after one call each for the difference
    assert [len(r.launches) for r in recs.values()] == [4, 4, 4]
    assert row["channel_sums_separate_ms"] > 0 and row["channel_sums_ms"] > 0 and ratio > 0
    assert 0 <= row["channel_sums_rel_diff"] < 1e-3


def test_denoiser_channel_sums_off_row_times_them_on_and_off(monkeypatch):
    """denoiser_channel_sums_vs_off: the fused ADM timed with PPAP_FAST_CHANNEL_SUMS=1 and with =0 whatever the
    default (CUDA-only row, here a tiny ADM on CPU under the shipped default "0": the row once divided the default
    run by the =0 run, off by off, a ratio of 1 whatever the sums cost); the mode comes back, ratio = on / off."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser
    import torch

    from ppap_fast.models import adm as ADM
    from ppap_fast.ops import norm_act as NA

    from _util import tiny_adm

    monkeypatch.setattr(ADM, "CHANNEL_SUMS", "0")
    model = tiny_adm().to(memory_format=torch.channels_last).fuse_norm_act()
    x, t = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.tensor([5, 700])
    sums_seen, real = {"0": [], "1": []}, NA.group_norm_act
    monkeypatch.setattr(NA, "group_norm_act", lambda *a, channel_sums=None, **k: sums_seen[ADM.CHANNEL_SUMS].append(
        channel_sums is not None) or real(*a, channel_sums=channel_sums, **k))
    row = {"fused_norm_act_ms": 4.0}
    ratio = bench_denoiser._channel_sums_off_ratio(model, x, t, "cpu", 1, row,
                                                   lambda v, ms: row.__setitem__(f"{v}_ms", ms))
    assert any(sums_seen["1"]) and sums_seen["0"] and not any(sums_seen["0"]) and ADM.CHANNEL_SUMS == "0"
    assert row["fused_channel_sums_ms"] > 0 and row["fused_no_channel_sums_ms"] > 0
    assert ratio == round(row["fused_channel_sums_ms"] / row["fused_no_channel_sums_ms"], 4)


def test_denoiser_cl_tile_row_times_both_tilings_and_copy_fractions(monkeypatch):
    """The CUDA-only channels_last tile row on CPU (interpreter, tiny map): the GroupNorm apply and the
    residual kernels run in both tilings (rows, then narrow: grids differ), times and the ratio recorded,
    the module's mode restored; then the copy figure and each op's time against a copy of its bytes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser

    from _util import LaunchRecorder
    from ppap_fast.ops import norm_act_triton as NT
    from ppap_fast.ops import residual_triton as RT

    apply, res = LaunchRecorder(NT._gn_apply_kernel), LaunchRecorder(RT._bias_residual_kernel)
    monkeypatch.setattr(NT, "_gn_apply_kernel", apply)
    monkeypatch.setattr(RT, "_bias_residual_kernel", res)
    row = {"gn_stats_split_ms": 3.0, "cat_triton_ms": 4.0}
    ratio = bench_denoiser._cl_tile_ratio(row, 1, 1, device="cpu", channels=128, size=8)
    assert NT.CL_TILE == "rows" and ratio > 0
    for rec in (apply, res):  # 128 channels: 2 blocks of 64 in rows / 4 of 32 in narrow (interpreter)
        assert [grid[1] for grid, _ in rec.launches] == [2] * 3 + [4] * 3  # median_ms: 2 warm-up calls + 1 rep
    assert all(row[f"cl_tile_{op}_{mode}_ms"] > 0 for op in ("gn", "residual") for mode in ("rows", "narrow"))
    copies = []
    monkeypatch.setattr(bench_denoiser, "_median_ms", lambda fn, *a: copies.append(fn()) or 2.0)
    fractions = bench_denoiser._vs_copy(row, 1, 1, device="cpu", channels=128, size=8)
    assert len(copies) == 1 and copies[0].shape == (1, 128, 8, 8) and row["copy_ms"] == 2.0
    assert fractions == {"gn_vs_copy": 1.0, "cat_vs_copy": 1.0}  # 3 passes in 3 ms, 4 in 4 ms: copy speed


def test_denoiser_adm_conv_row_times_cudnn_and_each_tiling(monkeypatch):
    """The CUDA-only ADM conv row on CPU (interpreter, tiny map): cuDNN's stand-in and the Triton conv in
    each tiling timed (the tiling contexts entered and left), the Triton output checked against the conv."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser

    from ppap_fast.ops.lora import triton_conv as tc

    entered = []
    real_tiles = tc.tiles
    monkeypatch.setattr(tc, "tiles", lambda *t: (entered.append(t), real_tiles(*t))[1])
    row = {}
    ratio = bench_denoiser._adm_conv_ratio(row, 1, 1, device="cpu", channels=16, size=4)
    assert entered == [t for t in bench_denoiser.ADM_CONV_TILES if t is not None] and not tc._TILE_OVERRIDE
    assert row["adm_conv_cudnn_ms"] > 0 and row["adm_conv_triton_default_ms"] > 0 and ratio > 0
    assert row["adm_conv_triton_rel_err"] < 1e-2


def test_denoiser_out_head_row_times_both_heads():
    """The CUDA-only output-head row on CPU (reference GroupNorm, tiny map): the heads timed, their
    relative difference small and non-zero (fp16 rounding), the ratio recorded."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser

    row = {}
    ratio = bench_denoiser._out_head_ratio(row, 1, 1, device="cpu", channels=64, size=4)
    assert row["out_head_half_ms"] > 0 and row["out_head_float_ms"] > 0 and ratio > 0
    assert 0 < row["out_head_half_rel_diff"] < 5e-3
    assert row["out_head_fused_ms"] > 0 and 0 < row["out_head_fused_rel_diff"] < 5e-3  # the one-op head too


def test_distill_wgrad_row_times_both_splits():
    """bench_distill's CUDA-only weight-gradient row on CPU (interpreter, tiny layer): both splits timed,
    the results equal, the ratio recorded."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_distill

    row = bench_distill._wgrad_row("cpu", batch=4, channels=16, size=4, r=4, n=2, reps=1)
    assert row["split_new"] >= 1 and row["split_old"] >= 1 and row["new_ms"] > 0 and row["old_ms"] > 0
    assert row["new_vs_old_rel_diff"] < 1e-3 and row["wgrad_split_new_vs_old"] > 0


def test_distill_loralib_route_row_times_both_routes(monkeypatch):
    """bench_distill's loralib route row (the CPU default's evidence): each route runs what it names (the row
    raises otherwise), with whatever PPAP_FAST_LORALIB_CONV the caller had left in place afterwards."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_distill

    monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", "factorised")
    monkeypatch.delenv("PPAP_FAST_LOWRANK_A", raising=False)
    row = bench_distill._loralib_route_row(*bench_distill._resnet18_setup(batch=2, size=32, n=2), reps=1)
    assert min(row["delta_ms"], row["lowrank_stacked_a_ms"], row["lowrank_own_a_ms"]) > 0
    assert row["lowrank_ms"] == row["lowrank_own_a_ms"]  # the CPU default A stage
    assert row["lowrank_vs_delta"] > 0 and row["own_a_vs_stacked_a"] > 0
    assert os.environ["PPAP_FAST_LORALIB_CONV"] == "factorised" and "PPAP_FAST_LOWRANK_A" not in os.environ


def test_denoiser_cat_row_runs_the_triton_op():
    """The CUDA-only concatenation row, on CPU through the Triton interpreter (tiny shapes): Triton and
    torch times, the bit-for-bit flag and the ratio."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser

    from ppap_fast import ops

    row = {}
    ratio = bench_denoiser._cat_ratio(row, 1, 1, device="cpu", channels=8, size=4)
    assert ops.last_backend("cat_channels") == "triton"
    assert row["cat_bitwise"] is True
    assert row["cat_torch_ms"] > 0 and row["cat_triton_ms"] > 0 and ratio > 0


def test_emitted_rows_survive_a_killed_suite(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as runner

    path = tmp_path / "b.json"
    out = {"device": "cpu", "rows": [{"suite": "a", "x": 1}], "ratios": {"r_a": 1.0}, "errors": {}}
    emit = runner._emitter(out, "b", path)
    emit({"y": 2}, {"r_b": 0.5})
    emit([{"y": 2}, {"z": 3}], {"r_b": 0.4})  # cumulative: replaces the first snapshot
    data = json.loads(path.read_text())
    assert data["rows"] == [{"suite": "a", "x": 1}, {"suite": "b", "partial": True, "y": 2},
                            {"suite": "b", "partial": True, "z": 3}]
    assert data["ratios"] == {"r_a": 1.0, "r_b": 0.4}
    assert data["running"] == "b"  # killed now, the JSON names the suite it was cut in
    assert out["rows"] == [{"suite": "a", "x": 1}]  # the runner's own state is untouched
    assert emit.rows == [{"y": 2}, {"z": 3}] and emit.ratios == {"r_b": 0.4}  # what run.py keeps on an error


def test_a_failing_suite_keeps_its_emitted_rows(tmp_path, monkeypatch):
    """A suite that emitted rows and then raised (a compile that fails): the JSON keeps them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import types

    import run as runner

    mod = types.ModuleType("bench_fake")

    def run(device, quick, emit=None):
        emit({"bench": "eager", "ms": 1.0}, {"fake_ratio": 0.5})
        raise RuntimeError("compile exploded")

    mod.run = run
    monkeypatch.setitem(sys.modules, "bench_fake", mod)
    monkeypatch.setattr(runner, "HERE", tmp_path)  # where run.py looks for suites
    (tmp_path / "bench_fake.py").write_text("")
    path = tmp_path / "b.json"
    assert runner.main(["--device", "cpu", "--only", "bench_fake", "--json", str(path)]) == 1
    data = json.loads(path.read_text())
    assert data["errors"]["bench_fake"] == "RuntimeError: compile exploded"
    assert data["rows"] == [{"suite": "bench_fake", "partial": True, "bench": "eager", "ms": 1.0}]
    assert data["ratios"] == {"fake_ratio": 0.5}


def test_plot_draws_one_panel_per_suite_and_a_rerun_replaces_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plot

    step = {"suite": "bench_step", "config": "adm", "shape": [32, 3, 256, 256], "reference_ms": 674.0,
            "reference_unguided_ms": 571.0, "fast_ms": 573.0, "fast_unguided_ms": 565.0, "floor_ms": 73.0}
    lora = [{"suite": "bench_lora", "layer": "resnet50.layer3.conv2 3x3 256->256", "N": 5, "variant": v,
             "fwd_ms": 0.1, "fwdbwd_ms": ms} for v, ms in (("base", 0.3), ("ours[cuda_full]", 1.9), ("loop", 4.8))]
    update = {"suite": "bench_update", "sampler": "ddim", "var_type": None, "shape": [32, 3, 256, 256],
              "dtype": "torch.float32", "cuda_hbm_fraction": 0.7, "triton_hbm_fraction": 0.8}
    first = tmp_path / "a.json"
    first.write_text(json.dumps({"device": "Card X", "rows": [step, *lora, dict(update, cuda_hbm_fraction=0.1)]}))
    second = tmp_path / "b.json"
    second.write_text(json.dumps({"device": "Card X", "rows": [update]}))
    device, by_suite = plot.load([first, second])
    assert device == "Card X" and by_suite["bench_update"] == [update]  # the rerun's rows, not both runs'
    out = tmp_path / "fig" / "h.png"
    assert plot.plot([first, second], out) == ["bench_step", "bench_lora", "bench_update"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert not list(out.parent.glob("*.tmp.png"))
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"device": "cpu", "rows": [{"suite": "bench_scale"}]}))
    with pytest.raises(ValueError, match="no rows"):
        plot.plot([empty], tmp_path / "x.png")


def test_plot_distill_panel_skips_optimizer_rows_and_draws_a_cut_run(tmp_path):
    """bench_distill writes an optimizer_step row beside the distill_step rows, and a run cut inside
    the suite lacks the graphed images/s of its last N: the panel draws both (it divided by zero)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plot

    rows = [{"suite": "bench_distill", "op": "optimizer_step", "n_experts": 10, "expert_adamw_ms": 8.6},
            {"suite": "bench_distill", "op": "distill_step", "n_experts": 5, "batch": 64, "shape": [3, 128, 128],
             "sequential_img_per_s": 75.0, "onepass_img_per_s": 379.0, "onepass_graph_img_per_s": 1999.0},
            {"suite": "bench_distill", "op": "distill_step", "n_experts": 10, "batch": 64, "shape": [3, 128, 128],
             "sequential_img_per_s": 41.0, "onepass_img_per_s": 334.0, "partial": True}]
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"device": "Card X", "rows": rows}))
    out = tmp_path / "d.png"
    assert plot.plot([src], out) == ["bench_distill"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_decisions_name_the_switch():
    """summarize.decisions: a pending default's ratio below 0.97 says what to change, otherwise keep."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    lines = summarize.decisions({"distill_graph_implicit_vs_stacked": 0.8, "distill_triton_vs_auto": 1.02,
                                 "gn_stats_split_vs_group": 1.2, "resample_triton_vs_torch": 0.3,
                                 "cat_triton_vs_torch": 1.1, "cl_tile_rows_vs_narrow": 1.04})
    assert len(lines) == len(summarize.PENDING) + len(summarize.REVERT_ABOVE)
    by_key = {ln.split()[1].rstrip(":"): ln for ln in lines}
    assert "_resolve_a_stage" in by_key["distill_graph_implicit_vs_stacked"]
    assert "keep the current default" in by_key["distill_triton_vs_auto"]
    assert "not measured" in by_key["distill_loralib_factorised_vs_delta"]
    # a default switched before a GPU measured it: reverted above 1.03, kept below
    assert "GN_STATS_CL" in by_key["gn_stats_split_vs_group"]
    assert "keep the new default" in by_key["resample_triton_vs_torch"]
    assert "fast_cat off" in by_key["cat_triton_vs_torch"]
    assert "CL_TILE" in by_key["cl_tile_rows_vs_narrow"]


def test_lora_bench_cuda_branch_runs_on_cpu(monkeypatch):
    """bench_lora's CUDA-only code (channels_last, in_base, implicit, loralib and graphed rows, their
    ratios) runs on CPU tensors under the Triton interpreter with the GPU parts faked (no capture, no
    CUDA backends, one call per timing): a Python error there would otherwise cost a GPU session's
    rows. The ratios must all come out, finite."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (tests/conftest.py sets it)")
    import math

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_lora

    calls = {"graph": 0, "profiled": 0}

    def one_call_ms(fn, device, reps, warmup=0):
        fn()
        return 1.0

    def fake_captured(step, reps, grad, profile=False):
        with torch.set_grad_enabled(grad):
            step()  # the captured step runs once eagerly: the code path without the graph
        calls["graph"] += 1
        calls["profiled"] += profile
        return (1.0 + 0.01 * calls["graph"], None, ([{"name": "kernel", "ms": 0.1}] if profile else []),
                0.9 + 0.01 * calls["graph"])

    make, loralib = bench_lora._make, bench_lora._loralib
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(bench_lora, "_configs", lambda device, quick: [
        dict(name="tiny 3x3 8->8", kind="conv", S=3, cin=8, cout=8, k=3, pad=1, H=4),
        dict(name="tiny linear", kind="linear", S=2, K=16, O=24, L=5)])
    monkeypatch.setattr(bench_lora, "_make", lambda cfg, N, r, device, dtype, gen: make(cfg, N, r, "cpu",
                                                                                         torch.float32, gen))
    monkeypatch.setattr(bench_lora, "_loralib", lambda cfg, route, N, r, device, dtype, gen, seg=None: loralib(
        cfg, route, N, r, "cpu", torch.float32, gen, seg))
    monkeypatch.setattr(bench_lora, "median_ms", one_call_ms)
    monkeypatch.setattr(bench_lora, "_captured_ms", fake_captured)
    monkeypatch.setattr(bench_lora, "profile_top", lambda *a, **k: [])
    from ppap_fast.ops.lora import segments as seg_mod
    # as on CUDA: segments are checked without reading values (a copy of expert_idx is refused as stale)
    monkeypatch.setattr(seg_mod, "_values_comparable", lambda a, b: False)
    monkeypatch.setattr(bench_lora.L, "available_backends",
                        lambda op, dev: {"triton": "ok", "cuda": "faked off", "cuda_full": "faked off",
                                         "cpp": "faked off"})
    out = bench_lora.run("cuda", quick=True)
    variants = {r["variant"] for r in out["rows"]}
    for v in ("ours[triton,a_stage=in_base,channels_last]", "triton_conv[plain,channels_last]",
              "base[channels_last,cudagraph]", "ours[triton,a_stage=in_base,channels_last,tiles=64x128x64,cudagraph]",
              "triton_conv[plain,channels_last,tiles=128x256x64,cudagraph]"):
        assert v in variants, v
    for k in ("lora_graph_in_base_vs_base_graph", "lora_graph_in_base_vs_implicit", "conv_triton_vs_cudnn_graph",
              "lora_graph_implicit_vs_stacked", "loralib_graph_factorised_vs_delta", "lora_fwdbwd_graph_vs_base_graph",
              "lora_implicit_vs_stacked", "loralib_factorised_vs_delta", "lora_fwdbwd_vs_base",
              "lora_linear_graph_in_base_vs_base_graph", "lora_linear_graph_in_base_vs_default",
              "lora_fwdbwd_graph_vs_base_graph_b2b"):
        assert k in out["ratios"] and math.isfinite(out["ratios"][k]) and out["ratios"][k] > 0, k
    assert not [r for r in out["rows"] if r.get("skipped") and "peft" not in r["variant"]]
    assert not [r for r in out["rows"] if r.get("error")]  # a variant's error is now a row, not a raise
    assert all(r["fwdbwd_b2b_ms"] > 0 for r in out["rows"] if r["variant"].endswith("cudagraph]"))
    profiled = {(r["layer"], r["variant"]) for r in out["rows"] if r.get("fwdbwd_graph_profile_top")}
    assert ("tiny 3x3 8->8", "ours[triton,a_stage=implicit,channels_last,cudagraph]") in profiled
    assert ("tiny linear", "ours[triton,cudagraph]") in profiled and len(profiled) == calls["profiled"]


def test_distill_channels_last_rows_run_on_cpu(monkeypatch):
    """bench_distill's opt-in channels_last rows (PPAP_BENCH_DISTILL_CL=1) on a tiny ResNet under the
    Triton interpreter, the CUDA-graph capture faked by one eager step with Triton preferred: every A
    stage runs (bench_distill checks each ran the stage it names) on a channels_last bank."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (tests/conftest.py sets it)")
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_distill

    from ppap_fast.models.tiny import TinyResNet
    from ppap_fast.ops import lora as L
    from ppap_fast.ops.lora import autotune

    seen = []

    def eager_step(bank, x, t, teacher, reps):
        assert x.is_contiguous(memory_format=torch.channels_last)
        bench_distill._kd(bank(x, t), teacher).backward()
        seen.append(L.last_backend.get("lora_conv2d/a_stage"))
        return 1.0 + len(seen)

    monkeypatch.setattr(bench_distill, "_graphed_ms", eager_step)
    monkeypatch.setenv("PPAP_LORA_BACKEND", "triton")  # on a GPU the graphed step prefers Triton itself
    monkeypatch.setattr(autotune, "_elapsed_ms", lambda fn, device: 1.0)  # "auto": warm-ups only (interpreter time)
    autotune.clear_a_stage_choices()
    torch.manual_seed(0)
    model = TinyResNet(widths=(16, 16), layers=(1, 1), in_channels=1, num_classes=10)
    x, t, teacher = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.randn(3, 10)
    out = bench_distill._channels_last_ms(model, 4, 2, 2, x, t, teacher, 1)
    assert out == (2.0, 3.0, 4.0, 5.0)
    assert seen[1] == "in_base" and seen[3] == "implicit" and seen[0] != "in_base"
    assert autotune.a_stage_choices()  # "auto" tuned the bank's convs
    autotune.clear_a_stage_choices()


def _fake_suite(monkeypatch, tmp_path, name, run=None, source=""):
    """A suite run.py finds (a file under its HERE) and imports: ``run`` as its run(), else ``source``."""
    import types

    (tmp_path / f"{name}.py").write_text(source)
    if run is not None:
        mod = types.ModuleType(name)
        mod.run = run
        monkeypatch.setitem(sys.modules, name, mod)


def test_a_suite_that_fails_to_import_costs_only_itself(tmp_path, monkeypatch):
    """An import error (a module missing on the device image) was a NameError in run.py's handler (no
    emitter yet), ending the whole run, or, after another suite, re-filed that suite's emitted rows
    under the broken one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as runner

    def ok(device, quick, emit=None):
        emit({"bench": "a", "ms": 1.0}, {"ok_ratio": 0.5})
        return {"rows": [{"bench": "a", "ms": 1.0}], "ratios": {"ok_ratio": 0.5}}

    _fake_suite(monkeypatch, tmp_path, "bench_fake_ok", run=ok)
    _fake_suite(monkeypatch, tmp_path, "bench_fake_broken", source="raise ImportError('no module named nothere')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bench_fake_broken", raising=False)
    monkeypatch.setattr(runner, "HERE", tmp_path)
    path = tmp_path / "b.json"
    assert runner.main(["--device", "cpu", "--only", "bench_fake_broken", "bench_fake_ok", "bench_fake_broken",
                        "--json", str(path)]) == 1
    data = json.loads(path.read_text())
    assert "nothere" in data["errors"]["bench_fake_broken"]
    assert data["rows"] == [{"suite": "bench_fake_ok", "bench": "a", "ms": 1.0}]  # not re-filed as the broken one's
    assert data["ratios"] == {"ok_ratio": 0.5}


def test_runner_names_the_suite_it_was_killed_in_and_times_each(tmp_path, monkeypatch):
    """While a suite runs, the JSON says which ("running"), so a run cut by the time limit tells a suite
    that was cut from one that never started; each finished suite's seconds are recorded."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as runner

    path = tmp_path / "b.json"
    seen = []

    def slow(device, quick):
        seen.append(json.loads(path.read_text()).get("running"))
        return {"rows": [], "ratios": {}}

    _fake_suite(monkeypatch, tmp_path, "bench_fake_slow", run=slow)
    monkeypatch.setattr(runner, "HERE", tmp_path)
    assert runner.main(["--device", "cpu", "--only", "bench_fake_slow", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert seen == ["bench_fake_slow"] and "running" not in data
    assert data["seconds"]["bench_fake_slow"] >= 0 and data["triton"]


def test_runner_records_the_backends_each_suite_ran(tmp_path, monkeypatch):
    """backends_used: every backend the dispatched ops picked during a suite (a reference or fallback
    path where a fast one was meant shows there); the library's own state is restored after."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import run as runner
    from ppap_fast import ops
    from ppap_fast.ops import _registry
    from ppap_fast.ops import lora as L

    def uses_ops(device, quick):
        x = torch.randn(2, 3, 4, 4)
        table = ops.build_table(__import__("ppap_fast.schedule", fromlist=["Schedule"]).Schedule.create(
            "linear", 1000, "ddim25"), "ddim", eta=0.0)
        ops.guided_update(x, x, torch.tensor([3, 4]), table, backend="reference")
        L.lora_linear(torch.randn(2, 3, 8), torch.randn(5, 8), None, torch.randn(2, 4, 8), torch.randn(2, 5, 4),
                      torch.tensor([0, 1]), 0.5, backend="reference")
        return {"rows": [], "ratios": {}}

    last, select = L.last_backend, _registry.select
    _fake_suite(monkeypatch, tmp_path, "bench_fake_ops", run=uses_ops)
    monkeypatch.setattr(runner, "HERE", tmp_path)
    path = tmp_path / "b.json"
    assert runner.main(["--device", "cpu", "--only", "bench_fake_ops", "--json", str(path)]) == 0
    used = json.loads(path.read_text())["backends_used"]["bench_fake_ops"]
    assert used["guided_update"] == ["reference"] and used["lora_linear"] == ["reference"]
    assert L.last_backend is last and _registry.select is select and last["lora_linear"] == "reference"


def test_lora_bench_emits_as_it_goes_and_a_failing_variant_costs_only_its_row(monkeypatch):
    """bench_lora reports through emit after every layer and N (a run killed at its limit keeps them; it
    wrote nothing until its end), and a variant that raises (a kernel failing on the GPU) is a row with
    its error instead of ending the suite; each "ours" row says which backend / A stage ran."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_lora

    def broken_loop(*a, **k):
        raise RuntimeError("loop exploded")

    monkeypatch.setattr(bench_lora, "_loop", broken_loop)
    monkeypatch.setattr(bench_lora, "median_ms", lambda fn, device, reps, warmup=0: (fn(), 1.0)[1])
    monkeypatch.setenv("PPAP_BENCH_LORA_LAYERS", "3x3,qkv")
    seen = []
    out = bench_lora.run("cpu", quick=True, emit=lambda rows, ratios: seen.append((list(rows), dict(ratios))))
    assert len(seen) == 2 and seen[-1] == (out["rows"], out["ratios"])  # one per (layer, N): 2 layers, N = 5
    assert len(seen[0][0]) < len(out["rows"])
    errors = [r for r in out["rows"] if r.get("error")]
    assert [r["variant"] for r in errors] == ["loop", "loop"] and "loop exploded" in errors[0]["error"]
    assert "lora_fwdbwd_vs_loop" not in out["ratios"] and out["ratios"]["lora_fwdbwd_vs_base"] > 0
    ours = [r for r in out["rows"] if r["variant"].startswith("ours") and not r.get("error")]
    assert ours and all(r["ran"].split("/")[0] in ("reference", "cpp", "vectorized") for r in ours), ours


def test_distill_bench_emits_each_n_before_its_cuda_rows(monkeypatch):
    """bench_distill reports through emit after each N's main figures and after each block of its CUDA
    rows (it wrote nothing until its end: a run killed in the CUDA rows of the last N lost
    distill_onepass_vs_sequential with the rest)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_distill

    monkeypatch.setattr(bench_distill, "median_ms", lambda fn, device, reps, warmup=0: (fn(), 1.0)[1])
    monkeypatch.setattr(bench_distill, "round_robin_ms", lambda fns, device, reps: {k: [f(), 1.0][1:] for k, f in fns.items()})
    seen = []
    out = bench_distill.run("cpu", quick=True, emit=lambda rows, ratios: seen.append((rows, ratios)))
    assert len(seen) == 2 and seen[1] == (out["rows"], out["ratios"])  # again after the frozen_fwdbwd row
    assert seen[0][0] == out["rows"][:-1] and out["rows"][-1]["op"] == "frozen_fwdbwd"
    assert seen[0][1]["distill_onepass_vs_sequential"] == out["ratios"]["distill_onepass_vs_sequential"] > 0
    assert "distill_onepass_vs_frozen_fwdbwd" not in seen[0][1] and out["ratios"]["distill_onepass_vs_frozen_fwdbwd"] > 0
    assert out["ratios"]["distill_loralib_lowrank_vs_delta"] == out["ratios"]["distill_resnet18_lowrank_vs_delta"] == 1
    assert out["ratios"]["distill_lowrank_own_a_vs_stacked_a"] == out["ratios"]["distill_resnet18_own_a_vs_stacked_a"] == 1
    # the CUDA rows' blocks, their GPU parts faked: a checkpoint after each, ratios filled in as they go
    monkeypatch.setenv("PPAP_BENCH_DISTILL_CL", "1")
    monkeypatch.setattr(bench_distill, "_with_backend", lambda env, value, op, backend, fn: fn())
    monkeypatch.setattr(bench_distill, "_factorised_ms", lambda *a: (1.0, 0.9, 0.8, 0.7, 0.6, 0.5))
    monkeypatch.setattr(bench_distill, "_graphed_ms", lambda *a, amp="none": 0.25 if amp == "bf16" else 0.5)
    monkeypatch.setattr(bench_distill, "_lowrank_graphed_ms", lambda *a: 0.5)
    monkeypatch.setattr(bench_distill, "_channels_last_ms", lambda *a: (0.5, 0.4, 0.3, 0.2))
    row, acc, snaps = {}, {k: [] for k in ("distill_delta_stacked_vs_grouped", "distill_factorised_vs_loralib",
                                           "distill_cpp_vs_auto", "distill_triton_vs_auto", "distill_graph_vs_onepass",
                                           "distill_implicit_vs_stacked", "distill_graph_implicit_vs_stacked",
                                           "distill_loralib_factorised_vs_delta",
                                           "distill_graph_loralib_factorised_vs_delta")}, []
    bench_distill._cuda_extras(row, acc, None, lambda: None, 1.0, None, 5, 4, 2, None, None, None, 1, 64,
                               lambda: snaps.append(sum(bool(v) for v in acc.values())))
    assert snaps == [1, 6, 9, 14, 15, 17], snaps  # 15: the loralib lowrank route's captured step
    assert row["onepass_graph_expert_adamw_loralib_lowrank_ms"] == 0.5
    assert acc["distill_graph_loralib_lowrank_vs_delta"] == [1.0]
    assert row["onepass_graph_expert_adamw_ms"] == 0.5 and acc["distill_graph_expert_adamw_vs_adamw"] == [1.0]
    assert row["onepass_graph_amp_bf16_ms"] == 0.25 and acc["distill_graph_amp_bf16_vs_fp32"] == [0.5]
    assert not [k for k in row if k.endswith("error")], row
    row, acc = {}, {k: [] for k in acc}  # the captured ExpertAdamW step the frozen_fwdbwd row timed: reused
    bench_distill._cuda_extras(row, acc, None, lambda: None, 1.0, None, 5, 4, 2, None, None, None, 1, 64,
                               graph_expert_adamw_ms=0.4)
    assert row["onepass_graph_expert_adamw_ms"] == 0.4 and acc["distill_graph_expert_adamw_vs_adamw"] == [0.8]
    # the factorised bank's capture failed (_graphed_ms raises): its eager figures stay, the graphed pair says why
    monkeypatch.setattr(bench_distill, "_factorised_ms", lambda *a: (1.0, 0.9, 0.8, 0.7) + ("RuntimeError: not captured",) * 2)
    row, acc = {}, {k: [] for k in acc}
    bench_distill._cuda_extras(row, acc, None, lambda: None, 1.0, None, 5, 4, 2, None, None, None, 1, 64)
    assert row["factorised_graph_error"] == "RuntimeError: not captured" and "factorised_graph_ms" not in row
    assert acc["distill_triton_vs_auto"] == [0.8] and acc["distill_implicit_vs_stacked"] == [0.7]
    assert not acc["distill_graph_implicit_vs_stacked"] and "factorised_error" not in row


def test_summary_shows_errors_cuts_and_backends(tmp_path):
    """The short table printed last says what did not run or ran another path: row errors and skips
    (bench_distill's *_error keys were not printed), a variant's warnings (a compile that fell back to
    eager), the suite a run was cut in, and the backends each suite ran."""
    (tmp_path / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB\n")
    data = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "running": "bench_step",
            "ratios": {"distill_onepass_vs_sequential": 0.13}, "errors": {}, "seconds": {"bench_distill": 120.5},
            "backends_used": {"bench_distill": {"lora_conv2d": ["reference", "triton"]}},
            "rows": [{"suite": "bench_distill", "op": "distill_step", "onepass_ms": 1.0,
                      "channels_last_error": "RuntimeError: in_base exploded"},
                     {"suite": "bench_step", "partial": True, "bench": "guided_ddim_step", "fast_ms": 2.0,
                      "fast_warnings": ["CUDA-graph capture of the guided step failed"],
                      "fast_compiled": {"ms": 3.0, "warnings": ["torch.compile of the denoiser failed"]}}]}
    (tmp_path / "bench.json").write_text(json.dumps(data))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/summarize.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for text in ("in_base exploded", "CUDA-graph capture of the guided step failed",
                 "torch.compile of the denoiser failed", "killed inside bench_step", "bench_distill 120.5",
                 "lora_conv2d=reference/triton"):
        assert text in res.stdout, (text, res.stdout)


def _fake_graphed_step(captured: bool):
    """A GraphedTrainStep stand-in on CPU: runs the step eagerly; ``captured`` what a GPU's capture gave."""
    class Fake:
        def __init__(self, step, warmup=3, lora_backend="triton"):
            self.step, self.captured = step, captured
            self.capture_error = None if captured else "RuntimeError: operation not permitted when stream is capturing"

        def __call__(self, *inputs):
            return self.step(*inputs)
    return Fake


def test_distill_graphed_rows_refuse_a_step_whose_capture_failed(monkeypatch):
    """A GraphedTrainStep whose capture failed trains eagerly from then on (capture_error): bench_distill's
    graphed rows (_graphed_ms, and the frozen step's _replayed_ms) raise instead of reporting that eager time as
    a graphed one (each caller records the error in its row)."""
    import torch

    import ppap_fast.train_graph as tg
    from ppap_fast.experts import ExpertBank

    bench_distill, model, x, t, teacher = _tiny_distill_inputs(4)
    monkeypatch.setattr(bench_distill, "median_ms", lambda fn, device, reps, warmup=0: [fn() for _ in range(2)] and 1.0)
    bank = ExpertBank(model, placement="resnet", n_experts=4, r=2, alpha=2).train()
    monkeypatch.setattr(tg, "GraphedTrainStep", _fake_graphed_step(captured=False))
    with pytest.raises(RuntimeError, match="not captured.*operation not permitted"):  # ExpertAdamW: CPU-capable
        bench_distill._graphed_ms(bank, x, t, teacher, 1, True)
    assert bank.check_inputs
    run = tg.GraphedTrainStep(lambda: torch.ones(()))
    with pytest.raises(RuntimeError, match="not captured"):
        bench_distill._replayed_ms(run, run, 1)
    monkeypatch.setattr(tg, "GraphedTrainStep", _fake_graphed_step(captured=True))
    assert bench_distill._graphed_ms(bank, x, t, teacher, 1, True) == 1.0


def test_distill_graphed_lowrank_row_checks_the_low_rank_route_ran(monkeypatch):
    """distill_graph_loralib_lowrank_vs_delta's step: with the route's per-conv check refusing every conv (the delta
    route then runs) the row raises instead of timing delta as low-rank; with low-rank convs it times them."""
    import ppap_fast.train_graph as tg
    from ppap_fast.experts import ExpertBank
    from ppap_fast.ops.lora import vectorized as V

    bench_distill, model, x, t, teacher = _tiny_distill_inputs(4)
    monkeypatch.setattr(bench_distill, "median_ms", lambda fn, device, reps, warmup=0: [fn() for _ in range(2)] and 1.0)
    monkeypatch.setattr(tg, "GraphedTrainStep", _fake_graphed_step(captured=True))
    monkeypatch.delenv("PPAP_FAST_LORALIB_CONV", raising=False)
    bank = ExpertBank(model, placement="resnet", n_experts=4, r=2, alpha=2).train()
    assert bench_distill._lowrank_graphed_ms(bank, x, t, teacher, 1) == 1.0
    assert V.loralib_conv2d_lowrank.__name__ == "loralib_conv2d_lowrank"  # put back
    monkeypatch.setattr(V, "lowrank_is_cheaper", lambda *a: False)
    with pytest.raises(RuntimeError, match="no low-rank conv"):
        bench_distill._lowrank_graphed_ms(bank, x, t, teacher, 1)


def test_distill_graphed_step_with_expert_adamw_moves_sampled_experts_only(monkeypatch):
    """bench_distill's graphed row with distill's default optimizer (ExpertAdamW through
    ExpertBank.step_sampled_experts), its step run eagerly (no GPU here): the experts with samples
    move, an expert without one keeps its parameters."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_distill

    import ppap_fast.train_graph as tg
    from ppap_fast.experts import ExpertBank

    monkeypatch.setattr(bench_distill, "median_ms", lambda fn, device, reps, warmup=0: [fn() for _ in range(2)] and 1.0)
    monkeypatch.setattr(tg, "GraphedTrainStep", _fake_graphed_step(captured=True))
    model, _, shape, _, _ = bench_distill._model("cpu")
    bank = ExpertBank(model, placement="resnet", n_experts=4, r=2, alpha=2).train()
    gen = torch.Generator().manual_seed(0)
    x, teacher = torch.randn(4, *shape, generator=gen), torch.randn(4, model.fc.out_features, generator=gen)
    t = torch.tensor([0, 100, 300, 600])  # experts 0, 0, 1, 2: expert 3 has no sample
    before = [p.detach().clone() for p in bank.parameters_to_train()]
    assert bench_distill._graphed_ms(bank, x, t, teacher, 1, True) == 1.0
    after = bank.parameters_to_train()
    for e in range(3):
        assert any(not torch.equal(a[e], b[e]) for a, b in zip(after, before)), e
    assert all(torch.equal(a[3], b[3]) for a, b in zip(after, before))
    assert bank.check_inputs



def _tiny_distill_inputs(batch=8):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_distill

    model, _, shape, _, _ = bench_distill._model("cpu")
    gen = torch.Generator().manual_seed(0)
    x, teacher = torch.randn(batch, *shape, generator=gen), torch.randn(batch, model.fc.out_features, generator=gen)
    return bench_distill, model, x, torch.randint(0, 1000, (batch,), generator=gen), teacher


def test_distill_frozen_fwdbwd_row_on_cpu():
    """bench_distill's frozen_fwdbwd row (#3's LoRA overhead per training step) on CPU: the eager one-pass
    step against the frozen backbone's forward + loss + backward to the input, both times finite, the ratio
    theirs."""
    import math

    from ppap_fast.experts import ExpertBank

    bench_distill, model, x, t, teacher = _tiny_distill_inputs()
    bank = ExpertBank(model, placement="resnet", n_experts=4, r=2, alpha=2).train()
    row = bench_distill._frozen_row("cpu", bank, model, x, t, teacher, 1, 4, 3.0)
    assert "error" not in row, row
    assert row["op"] == "frozen_fwdbwd" and row["n_experts"] == 4 and row["onepass_ms"] == 3.0
    assert math.isfinite(row["frozen_ms"]) and row["frozen_ms"] > 0
    ratio = row["distill_onepass_vs_frozen_fwdbwd"]
    assert math.isfinite(ratio) and ratio == pytest.approx(3.0 / row["frozen_ms"], rel=1e-2, abs=1e-4)


def test_distill_frozen_fwdbwd_computes_input_grads_only():
    """The frozen step of frozen_fwdbwd: no weight is trainable and none gets a gradient, the input gets
    one (the backward ran to it), the backbone it copies keeps its weights trainable and its BatchNorm
    statistics; a model with a trainable weight is refused."""
    import torch

    bench_distill, model, x, _, teacher = _tiny_distill_inputs()
    stats = [b.clone() for b in model.buffers()]
    frozen = bench_distill._frozen_model(model, "cpu")
    assert frozen.training and all(m.training for m in frozen.modules())
    ms, leaf = bench_distill._frozen_fwdbwd_ms(frozen, x, teacher, 2)
    assert ms > 0
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad or p.grad is not None]
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    assert x.grad is None and not x.requires_grad
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    with pytest.raises(ValueError, match="trainable"):
        bench_distill._frozen_fwdbwd_ms(frozen.fc.requires_grad_(True) and frozen, x, teacher, 1)


_FAKE_SMI = """#!/bin/sh
case "$*" in
  *clocks_throttle_reasons*) echo 'Field "clocks_throttle_reasons.active" is not a valid field to query.'; exit 2;;
  *) echo "1755, 2619, 1980, 2619, 612.30, 700.00, 61, 0x0000000000000024";;
esac
"""


def test_device_probe_records_speed_clocks_and_throttling(tmp_path, monkeypatch):
    """run.device_probe on a (faked) CUDA machine: measured matmul TFLOP/s and copy GB/s (here on CPU
    tensors), nvidia-smi's clocks, power, temperature and decoded throttle reasons (a driver that
    renamed the throttle field: the query falls back), JSON-able; without nvidia-smi it records why."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as runner
    import timing

    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(_FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(runner, "matmul_tflops", lambda device, n: timing.matmul_tflops("cpu", n, reps=2))
    monkeypatch.setattr(runner, "copy_bandwidth_gbps", lambda device, nbytes: timing.copy_bandwidth_gbps(
        "cpu", nbytes, reps=2))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    probe = runner.device_probe("cuda", matmul_n=64, copy_bytes=1 << 16)
    assert probe["matmul_fp16_tflops"] > 0 and probe["copy_gbps"] > 0 and "error" not in probe, probe
    assert probe["sm_clock_mhz"] == 1755 and probe["max_sm_clock_mhz"] == 1980 and probe["mem_clock_mhz"] == 2619
    assert probe["power_w"] == 612.3 and probe["power_limit_w"] == 700 and probe["temperature_c"] == 61
    assert probe["throttle_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]  # 0x24
    assert json.loads(json.dumps(probe)) == probe

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert runner.device_probe("cuda", matmul_n=64, copy_bytes=1 << 16)["smi_error"] == "nvidia-smi not found"
    assert "loadavg" in runner.device_probe("cpu")  # CPU: nothing measured, nothing queried


def test_runner_probes_before_and_after_and_summary_prints_probe_and_op_profiles(tmp_path, monkeypatch):
    """run.py records device_probe before the first suite and after the last; summarize prints the
    probe next to the card (before -> after) and an op-level profile with each op's inputs and kernels,
    a variant's profiles as tables rather than inline lists."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as runner

    _fake_suite(monkeypatch, tmp_path, "bench_fake_probe", run=lambda device, quick: {"rows": [], "ratios": {}})
    monkeypatch.setattr(runner, "HERE", tmp_path)
    path = tmp_path / "b.json"
    assert runner.main(["--device", "cpu", "--only", "bench_fake_probe", "--json", str(path)]) == 0
    probe = json.loads(path.read_text())["device_probe"]
    assert set(probe) == {"before", "after"} and probe["before"]["utc"] <= probe["after"]["utc"]

    out = tmp_path / "gpu_out"
    out.mkdir()
    (out / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB\n")
    before = {"matmul_fp16_tflops": 612.3, "copy_gbps": 2890.0, "sm_clock_mhz": 1980.0, "max_sm_clock_mhz": 1980.0,
              "power_w": 420.5, "throttle_reasons": []}
    after = dict(before, matmul_fp16_tflops=401.7, sm_clock_mhz=1335.0, throttle_reasons=["sw_power_cap"])
    op = {"name": "aten::mm", "ms": 8.6, "share": 0.1, "calls": 5, "shapes": [[2048, 1000], [1000, 2048], []],
          "dtypes": ["float", "float", "Scalar"],
          "kernels": [{"name": "sm80_xmma_gemm_f32f32_f32f32_f32_nt_n_tilesize128x128x8", "ms": 8.6}]}
    compiled_op = {"name": "triton_poi_fused_group_norm_silu_144", "ms": 64.0, "share": 0.2, "calls": 3,
                   "shapes": [[32, 256, 64, 64]], "dtypes": ["c10::Half"]}
    row = {"suite": "bench_step", "bench": "guided_ddim_step", "fast_ms": 250.0, "fast_op_profile_top": [op],
           "fast_compiled": {"ms": 300.0, "op_profile_top": [compiled_op]}}
    (out / "bench.json").write_text(json.dumps({"device": "NVIDIA H100", "torch": "2.14", "ratios": {}, "rows": [row],
                                                "device_probe": {"before": before, "after": after}}))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/summarize.py"), str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("card: NVIDIA H100") and lines[1].startswith("bench probe: "), lines
    for text in ("matmul fp16 612.3 -> 401.7 TFLOP/s", "copy 2890 GB/s", "SM clock 1980 -> 1335 MHz",
                 "throttle none -> [sw_power_cap]"):
        assert text in lines[1], (text, lines[1])
    for text in ("aten::mm  float[2048,1000] float[1000,2048]", "-> ", "sm80_xmma_gemm_f32f32",
                 "fast_compiled.op_profile_top:", "triton_poi_fused_group_norm_silu_144  c10::Half[32,256,64,64]"):
        assert text in res.stdout, (text, res.stdout)
    assert "op_profile_top=[" not in res.stdout  # not dumped inline with the variant's figures


def test_op_profile_of_an_eager_step_names_ops_with_their_shapes():
    """profile_top(by_shape=True) (the profiler works on CPU too): aten ops with input shapes and dtypes;
    bench_step._op_profile runs a CUDA-graph sampler's step eagerly for the profile (flag restored)
    and a failing step is a row, not a raise; kernels no op launched are summed in one row."""
    import types

    import torch
    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step
    import timing

    from ppap_fast.experts import ExpertBank
    from ppap_fast.fast_sampling import FastGuidedSampler
    from ppap_fast.guidance import ClassGuide
    from ppap_fast.models import ADMUNet
    from ppap_fast.models.tiny import TinyResNet
    from ppap_fast.schedule import Schedule

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    rows = timing.profile_top(lambda: conv(torch.randn(2, 3, 8, 8)), "cpu", k=3, by_shape=True)
    top = [r for r in rows if "conv" in r["name"]][0]
    assert top["shapes"][:2] == [[2, 3, 8, 8], [8, 3, 3, 3]] and top["dtypes"][:2] == ["float", "float"], rows
    assert json.loads(json.dumps(rows)) == rows

    model = ADMUNet(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                    attention_resolutions=(), channel_mult=(1,), num_heads=1).eval()
    bank = ExpertBank(TinyResNet(widths=(8,), layers=(1,), in_channels=3, num_classes=4), "resnet", n_experts=2).eval()
    sampler = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim25"), guide=ClassGuide(bank, 1),
                                cuda_graph=True)
    x = torch.randn(2, 3, 8, 8)
    ops = bench_step._op_profile(sampler, x, 12, "cpu", k=1000)  # every op: the check below needs no ranking
    assert sampler.cuda_graph is True
    assert len(ops) > 20 and all(op["calls"] > 0 and op["ms"] >= 0 and "dtypes" in op for op in ops)
    convs = {str(op["shapes"][1]) for op in ops if "convolution" in op["name"] and op["shapes"]}
    assert "[8, 3, 3, 3]" in convs, convs  # the guide's / denoiser's 3 -> 8 stem conv, by its weight shape
    failed = bench_step._op_profile(types.SimpleNamespace(cuda_graph=True, step=None), x, 12, "cpu")
    assert failed[0]["name"].startswith("op profile failed: TypeError")
    guide_ops = bench_step._guide_profile(sampler, x, 12, "cpu", k=1000)  # the guide alone: no denoiser
    names = {op["name"] for op in guide_ops}
    assert "aten::convolution_backward" in names or any("backward" in n for n in names), names
    assert not any(op["shapes"] and op["shapes"][1] == [32, 3, 3, 3] for op in guide_ops if "conv" in op["name"])
    assert bench_step._guide_profile(None, x, 12, "cpu")[0]["name"].startswith("guide profile failed")

    kernel = types.SimpleNamespace(device_type=DeviceType.CUDA, key="triton_fused_norm", self_device_time_total=500.0)
    host = types.SimpleNamespace(device_type=DeviceType.CPU, key="aten::mm", self_device_time_total=9.0)
    us, rest = timing._kernels_outside_ops([kernel, host], timing.Counter({"triton_fused_norm": 200.0}))
    assert us == 300.0 and rest == [{"name": "triton_fused_norm", "ms": 0.3}]


def test_bench_step_second_guide_phase_equals_its_reference():
    """bench_step's DeiT-S phase (here its CPU stand-in, a tiny timm ViT bank guiding through a resize):
    the fast guided step equals the reference stack's step with the same transform, timings and both
    ratios are recorded, the guide FLOPs include the transform; a failing setup is a recorded error."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    from ppap_fast.models import ADMUNet
    from ppap_fast.schedule import Schedule

    torch.manual_seed(0)
    model = ADMUNet(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                    attention_resolutions=(), channel_mult=(1, 2), num_heads=1, use_scale_shift_norm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    sched = Schedule.create("linear", 1000, "ddim25")
    x = torch.randn(2, 3, 16, 16)
    res = bench_step._guide_phase(bench_step._deit_setup, model, model, sched, x, 12, 1, 10.0, {}, {}, "cpu",
                                  reps=2, warm=1)
    assert "error" not in res, res
    assert res["config"] == "tiny_vit32_ppap5" and res["rel_err"] < 1e-4
    assert all(res[k] > 0 for k in ("reference_ms", "fast_ms", "fast_unguided_ms", "fast_vs_reference",
                                    "guided_vs_unguided", "guide_gflop"))

    def broken(device):
        raise RuntimeError("no timm here")

    failed = bench_step._guide_phase(broken, model, model, sched, x, 12, 1, 10.0, {}, {}, "cpu", reps=2, warm=1)
    assert failed["error"] == "RuntimeError: no timm here" and "fast_ms" not in failed


def test_bench_step_second_guide_transform_on_the_bank_device():
    """_deit_setup returns its input transform on the bank's device (a CPU transform would copy its
    mean / std host-to-device every step: a host sync, which fails the fast step's CUDA-graph capture)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    bank, tf, _ = bench_step._deit_setup("meta")  # a non-CPU device that needs no GPU
    assert next(bank.parameters()).device.type == "meta"
    assert {b.device.type for b in tf.buffers()} == {"meta"}


def test_bench_step_overlap_variant_is_the_fast_step_with_its_guide_on_a_side_stream():
    """The CUDA-only variant phases start with fast_overlap: recommended_options of its own model copy (fused
    norms, channels_last, cuDNN timing), the bf16 guide, graphs and overlap_guide (built here on CPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step
    import torch

    from ppap_fast.guidance import ClassGuide
    from ppap_fast.schedule import Schedule

    model, bank, _, _ = bench_step._setup("cpu")
    sched = Schedule.create("linear", 1000, "ddim25")
    variants = bench_step._cuda_variants(model, sched, ClassGuide(bank, 1, scale=10.0))
    assert list(variants)[0] == "fast_overlap" and variants["fast_overlap"][0] == "step_overlap_vs_reference"
    sampler = variants["fast_overlap"][1]()
    assert sampler.overlap_guide and sampler.cuda_graph and sampler.cudnn_benchmark
    assert sampler.opts.guide_autocast == torch.bfloat16 and sampler.opts.channels_last
    assert sampler.model is not model and sampler.model.fused_out_norm_act
    assert not getattr(model, "fused_out_norm_act", False)  # the caller's model untouched
    assert list(variants)[1] == "fast_compiled_guide"
    compiled = variants["fast_compiled_guide"][1]()
    assert compiled.opts.compile_guide and not compiled.overlap_guide and compiled.cuda_graph


def test_variant_ratios_give_each_guide_variant_its_guided_over_unguided():
    """A variant phase's ratio vs the reference becomes its ratio vs the fast step and its guided / unguided
    through the reference's time: fast 150 ms, unguided 142, reference 480, overlap 144 -> 144 / 142."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    ratios = {"step_fast_vs_reference": 150 / 480, "step_overlap_vs_reference": 144 / 480}
    got = bench_step._variant_ratios("fast_overlap", ratios, 142 / 480)
    assert got == {"step_overlap_vs_fast": round(144 / 150, 4), "step_guided_vs_unguided_overlap": round(144 / 142, 4)}
    ratios["step_compiled_guide_vs_reference"] = 147 / 480
    assert bench_step._variant_ratios("fast_compiled_guide", ratios, 142 / 480)["step_guided_vs_unguided_compiled_guide"] \
        == round(147 / 142, 4)
    assert bench_step._variant_ratios("fast_nchw", {**ratios, "step_nchw_vs_reference": 0.8}, 142 / 480) == {}
    assert bench_step._variant_ratios("fast_overlap", {"step_fast_vs_reference": 0.3}, 0.29) == {}  # phase failed


def test_step_fallbacks_name_the_options_asked_that_did_not_run():
    """bench_step's fallbacks: options asked (True; merge_experts where a guide is) that applied_options says do
    not run, e.g. cuda_graph off CUDA (as after a failed capture), a routed bank; none where all run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    from ppap_fast.fast_sampling import FastGuidedSampler, FastSamplingWarning
    from ppap_fast.guidance import ClassGuide
    from ppap_fast.schedule import Schedule

    model, bank, _, _ = bench_step._setup("cpu")
    sched, guide = Schedule.create("linear", 1000, "ddim25"), ClassGuide(bank, 1, scale=10.0)
    asked = dict(cuda_graph=True, guide_autocast=None)
    with pytest.warns(FastSamplingWarning):
        graphed = FastGuidedSampler(model, sched, guide=guide, **asked)
        graphed.step(bench_step.torch.randn(1, 3, 32, 32), 12)
    assert bench_step._fallbacks(asked, graphed) == ["cuda_graph"]
    assert bench_step._fallbacks({}, FastGuidedSampler(model, sched, guide=guide, merge_experts=False)) == \
        ["merge_experts"]
    assert bench_step._fallbacks({"channels_last": False}, FastGuidedSampler(model, sched, guide=guide)) == []
    assert bench_step._fallbacks({}, FastGuidedSampler(model, sched)) == []  # unguided: nothing to merge


def test_step_warnings_keep_the_fused_head_fallback():
    """bench_step's rows keep the fast path's warnings: the sampler's FastSamplingWarning and the RuntimeWarning of
    ADMUNet's fused output head falling back to the unfused head (caught, then dropped, before); others not."""
    import warnings

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    from ppap_fast.fast_sampling import FastSamplingWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("cuda_graph=True: capture failed\ndetails", FastSamplingWarning)
        warnings.warn("ADMUNet: the fused output head (ops.group_norm_silu_conv3x3) on cuda:0 differs", RuntimeWarning)
        warnings.warn("some library is deprecated", DeprecationWarning)
    assert bench_step._step_warnings(caught) == [
        "cuda_graph=True: capture failed", "ADMUNet: the fused output head (ops.group_norm_silu_conv3x3) on cuda:0 differs"]


def test_variant_ratios_refuse_a_comparison_with_a_fallback():
    """A guide variant (or the main fast steps) that fell back from an option asked gives no _vs_fast nor
    guided / unguided figure: it would not compare what the decision names (summarize: not measured)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    ratios = {"step_fast_vs_reference": 150 / 480, "step_overlap_vs_reference": 144 / 480}
    assert bench_step._variant_ratios("fast_overlap", ratios, 142 / 480, ["cuda_graph"]) == {}
    assert bench_step._variant_ratios("fast_overlap", ratios, 142 / 480, ["unguided:cuda_graph"]) == {}
    assert bench_step._variant_ratios("fast_overlap", ratios, 142 / 480, []) != {}


def test_goal_lines_read_ratios_rows_and_variants():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    data = {"ratios": {"step_guided_vs_unguided": 1.041, "step_guided_vs_unguided_overlap": 1.01},
            "rows": [{"suite": "bench_lora"}, {"suite": "bench_step", "fast_mfu": 0.494,
                                               "fast_overlap": {"ms": 140.0, "mfu": 0.52}}]}
    lines = {line.split(":")[0]: line.split(": ", 1)[1] for line in summarize.goal_lines(data)}
    assert lines["goal #4 guided / unguided <= 1.02"] == "1.041 not met"
    assert lines["goal #4 guided / unguided, overlap_guide <= 1.02"] == "1.01 MET"
    assert lines["goal #4 MFU >= 0.5"] == "0.494 not met"
    assert lines["goal #4 MFU, overlap_guide >= 0.5"] == "0.52 MET"
    assert lines["goal #4 MFU, compile_guide >= 0.5"] == "not measured"
    assert lines["goal #3 LoRA fwd+bwd / base layer <= 1.15"] == "not measured"
    assert len(lines) == len(summarize.GOALS)
    # a variant whose capture (or another option asked) fell back: its MFU is not the variant's
    data["rows"][1]["fast_overlap"]["fallbacks"] = ["cuda_graph"]
    lines = {line.split(":")[0]: line.split(": ", 1)[1] for line in summarize.goal_lines(data)}
    assert lines["goal #4 MFU, overlap_guide >= 0.5"] == "not measured"


def test_goal_lines_give_no_verdict_on_a_fast_step_that_fell_back():
    """fast_mfu (and the main fast step's ratios) of a bench_step row whose fast path fell back (fast_fallbacks,
    e.g. a failed capture) are not the fast path's figures: the goal line says so and is neither MET nor not met."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    data = {"ratios": {"step_fast_vs_reference": 0.3, "step_guided_vs_unguided": 1.01},
            "rows": [{"suite": "bench_step", "fast_mfu": 0.6, "fast_fallbacks": ["cuda_graph"]}]}
    lines = {line.split(":")[0]: line.split(": ", 1)[1] for line in summarize.goal_lines(data)}
    assert lines["goal #4 MFU >= 0.5"] == "0.6 (fast path fell back: cuda_graph): no verdict"
    assert lines["goal #4 fast / reference <= 0.3333"] == "0.3 (fast path fell back: cuda_graph): no verdict"
    assert lines["goal #4 guided / unguided <= 1.02"] == "1.01 (fast path fell back: cuda_graph): no verdict"
    # the unguided step's fallback touches guided / unguided only
    data["rows"][0]["fast_fallbacks"] = ["unguided:cuda_graph"]
    lines = {line.split(":")[0]: line.split(": ", 1)[1] for line in summarize.goal_lines(data)}
    assert lines["goal #4 MFU >= 0.5"] == "0.6 MET"
    assert lines["goal #4 fast / reference <= 0.3333"] == "0.3 MET"
    assert lines["goal #4 guided / unguided <= 1.02"] == "1.01 (fast path fell back: unguided:cuda_graph): no verdict"


def test_summary_prints_what_a_json_without_device_torch_ratios_or_rows_has(tmp_path, capsys):
    """A suite JSON missing device, torch, ratios or rows (or cut mid-write) made _table raise KeyError and
    the summary lost every line after it; it prints what is there and says what is missing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    (tmp_path / "bench.json").write_text(json.dumps({"errors": {"bench_step": "RuntimeError: boom"},
                                                     "running": "bench_step"}))
    (tmp_path / "scale.json").write_text('{"device": "cuda", "rows": [{"suite": "bench_sc')
    summarize.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "bench device: ? (no device key) (torch ?)" in out
    assert "  bench.json has no ratios\n  bench.json has no rows\n" in out
    assert "  ERROR bench_step: RuntimeError: boom" in out
    assert "CUT: the run was killed inside bench_step" in out
    assert "scale: scale.json unreadable: JSONDecodeError: " in out
    assert "goal #4 MFU >= 0.5: not measured" in out
    assert "decision eps_triton_vs_cuda: not measured" in out


def test_summary_reads_null_sections_and_a_memory_entry_without_peak(tmp_path, capsys):
    """"ratios": null / "rows": null / "backends_used": null raised AttributeError in the goal lines, a
    memory_gib entry without peak a KeyError: the summary lost every line after them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    (tmp_path / "bench.json").write_text(json.dumps({"device": "cuda", "torch": "2.11", "ratios": None, "rows": None,
                                                     "backends_used": None,
                                                     "memory_gib": {"bench_step": {"left": 3.5}, "bench_lora": 2}}))
    summarize.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "GPU memory GiB per suite (peak, left after): bench_step ?/3.5, bench_lora 2" in out
    assert "goal #4 MFU >= 0.5: not measured" in out
    assert "goal #4 fast / reference <= 0.3333: not measured" in out
    assert "decision eps_triton_vs_cuda: not measured" in out


def test_step_variants_old_paths_can_be_skipped(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    monkeypatch.delenv("PPAP_BENCH_STEP_COMPILE_GUIDE", raising=False)
    monkeypatch.setenv("PPAP_SKIP_COMPILE", "1")
    monkeypatch.delenv("PPAP_BENCH_STEP_OLD_PATHS", raising=False)
    assert list(bench_step._cuda_variants(None, None, None)) == ["fast_overlap", "fast_compiled_guide", "fast_unfused",
                                                                  "fast_nchw"]
    monkeypatch.setenv("PPAP_BENCH_STEP_OLD_PATHS", "0")
    assert list(bench_step._cuda_variants(None, None, None)) == ["fast_overlap", "fast_compiled_guide"]


def _fake_gpu_tools(tmp_path, run_py: str) -> dict:
    """A copy of benchmarks/ and a PATH whose nvidia-smi and python3 are stand-ins: python3 runs ``run_py``
    (bash) for benchmarks/run.py, the real interpreter for summarize.py, and succeeds at anything else."""
    import shutil

    root, bin_dir = tmp_path / "repo", tmp_path / "bin"
    shutil.copytree(ROOT / "benchmarks", root / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    (root / "ppap_fast").mkdir()
    (root / "ppap_fast" / "_C.fake.so").touch()  # no build unless asked
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'Fake Card 80GB, 81559 MiB, 1, 1980 MHz'\n")
    (bin_dir / "python3").write_text(
        "#!/usr/bin/env bash\n"
        f'case "$*" in\n  *benchmarks/run.py*) {run_py};;\n'
        f'  *benchmarks/summarize.py*) exec {sys.executable} "$@";;\n  *) exit 0;;\nesac\n')
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    return {"root": root, "env": {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}}


def test_gpu_check_removes_a_json_write_cut_by_the_bench_timeout(tmp_path):
    """run.py killed by the bench stage's timeout mid-write leaves its atomic write's temporary file
    (``.bench.json.<random>.json.tmp``, a hidden name); gpu_check.sh removes it, keeps bench.json and
    still writes the summary (the device tool returns a few files only)."""
    out = tmp_path / "out"
    cut_run = ('printf \'{"device": "Fake Card", "torch": "x", "rows": [], "ratios": {"step_fast_vs_reference": 0.3}, '
               '"errors": {}, "running": "bench_step"}\' > "$OUT/bench.json"; '
               'echo half > "$OUT/.bench.json.k3x9.json.tmp"; exit 124')
    fake = _fake_gpu_tools(tmp_path, cut_run)
    res = subprocess.run(["bash", str(fake["root"] / "benchmarks/gpu_check.sh"), "bench"], capture_output=True,
                         text=True, timeout=120, env={**fake["env"], "OUT": str(out), "GPU_CHECK_DEADLINE": "60"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["backends.json", "bench.json", "gpu.txt", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "CUT: the run was killed inside bench_step" in summary
    assert "goal #4 fast / reference <= 0.3333: 0.3 MET" in summary


def test_gpu_check_keeps_its_deadline_and_summary_when_nvidia_smi_hangs_after_the_bench(tmp_path):
    """The GPU state read after the bench (2 x 20 s of nvidia-smi) and the summary ran outside
    GPU_CHECK_DEADLINE: a hanging nvidia-smi passed the device call's limit and summary.txt was lost."""
    import time

    out, hang_mark = tmp_path / "out", tmp_path / "bench_ran"
    bench = (f'touch {hang_mark}; printf \'{{"device": "Fake Card", "torch": "x", "rows": [], '
             '"ratios": {"step_fast_vs_reference": 0.3}, "errors": {}}\' > "$OUT/bench.json"')
    fake = _fake_gpu_tools(tmp_path, bench)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(f"#!/usr/bin/env bash\n[[ -e {hang_mark} ]] && exec sleep 300\necho 'Fake Card 80GB, 1'\n")
    deadline = 20
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(fake["root"] / "benchmarks/gpu_check.sh"), "bench"], capture_output=True,
                         text=True, timeout=180, env={**fake["env"], "OUT": str(out), "GPU_CHECK_DEADLINE": str(deadline)})
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert took < deadline + 6, f"{took:.1f}s for a {deadline}s deadline\n{res.stdout}"
    assert "goal #4 fast / reference <= 0.3333: 0.3 MET" in (out / "summary.txt").read_text()
    gpu = (out / "gpu.txt").read_text()
    assert "gpu state after bench: nvidia-smi failed (exit 124: hung " in gpu, gpu
    assert "skipped: " in gpu.split("gpu state after bench:")[1], gpu


def test_summary_decides_nothing_on_a_zero_nan_or_infinite_ratio():
    """A ratio from a zero or non-finite time (0.0, NaN, inf in the JSON) is no measurement: it neither
    meets a goal nor switches or keeps a default (0.0 read 'MET' and 'switch', NaN 'keep the new default')."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    bad = {"step_fast_vs_reference": 0.0, "step_guided_vs_unguided": float("nan"), "update_hbm_fraction": float("inf"),
           "eps_triton_vs_cuda": 0.0, "out_head_fused_vs_half": float("nan"), "step_overlap_vs_fast": float("inf"),
           "lora_fwd_vs_peft": -0.5}
    data = {"ratios": bad, "rows": [{"suite": "bench_step", "fast_mfu": float("nan"),
                                     "fast_overlap": {"ms": 0.0, "mfu": float("inf")}}]}
    goals = {line.split(":")[0]: line.split(": ", 1)[1] for line in summarize.goal_lines(data)}
    for label in ("goal #4 fast / reference <= 0.3333", "goal #4 guided / unguided <= 1.02",
                  "goal #4 fused update / HBM >= 0.8", "goal #4 MFU >= 0.5", "goal #4 MFU, overlap_guide >= 0.5",
                  "goal #3 LoRA fwd / peft mixed batch <= 0.3333"):
        assert goals[label].endswith("not a valid figure (zero, negative, NaN or infinite): not measured"), label
    decided = {ln.split()[1].rstrip(":"): ln for ln in summarize.decisions(bad)}
    for key in ("eps_triton_vs_cuda", "out_head_fused_vs_half", "step_overlap_vs_fast"):
        assert decided[key].endswith("not a valid ratio (zero, negative, NaN or infinite): no decision"), decided[key]


def test_plot_draws_no_bar_for_a_zero_nan_or_missing_figure(tmp_path):
    """A NaN or zero time / rate / fraction in the JSON, or one a cut run lacks, gets no bar (it was drawn
    as a 0 bar, a measurement it is not), and a NaN first in the distill panel no longer stops the picture
    (NaN axis limit)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plot

    nan = float("nan")
    rows = {
        "bench_step": [{"suite": "bench_step", "shape": [4], "reference_ms": 9.0, "reference_unguided_ms": nan,
                        "fast_ms": 0.0, "fast_unguided_ms": 3.0, "floor_ms": nan}],
        "bench_update": [{"suite": "bench_update", "sampler": "ddim", "dtype": "torch.float32", "shape": [4],
                          "cuda_hbm_fraction": 0.7}, {"suite": "bench_update", "sampler": "ddpm", "shape": [4],
                                                      "dtype": "torch.float32", "cuda_hbm_fraction": nan,
                                                      "triton_hbm_fraction": 0.9}],
        "bench_distill": [{"suite": "bench_distill", "n_experts": 5, "batch": 8, "shape": [3, 8, 8],
                           "sequential_img_per_s": nan, "onepass_img_per_s": 40.0},
                          {"suite": "bench_distill", "n_experts": 10, "batch": 8, "shape": [3, 8, 8],
                           "sequential_img_per_s": 10.0, "onepass_img_per_s": 0.0}],
    }
    heights = {}
    for suite, suite_rows in rows.items():
        fig, ax = plt.subplots()
        plot.DRAW[suite](ax, suite_rows)
        heights[suite] = [p.get_height() for p in ax.patches]
        assert all(math.isfinite(v) for v in ax.get_ylim()), suite
        plt.close(fig)
    assert heights["bench_step"] == [9.0, 3.0]
    drawn = {s: sorted(h for h in hs if not math.isnan(h)) for s, hs in heights.items()}
    assert drawn["bench_update"] == [0.7, 0.9] and drawn["bench_distill"] == [10.0, 40.0]
    src = tmp_path / "n.json"
    src.write_text(json.dumps({"device": "Card X", "rows": [r for rs in rows.values() for r in rs]}))
    assert plot.plot([src], tmp_path / "n.png") == ["bench_step", "bench_update", "bench_distill"]


def test_denoiser_cuda_op_row_that_raises_costs_only_its_own_ratios(monkeypatch):
    """bench_denoiser's CUDA op rows (never run together on a GPU): one raising (a Triton kernel refused on the
    device) records its error in the row; the rows after it, out_head_fused_vs_half among them, are kept (an
    exception there cost the whole suite's figures)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_denoiser as BD

    def fake(name, value):
        def ratio(row, batch, reps):
            row[f"{name}_ms"] = value
            return value
        return ratio

    def refused(row, batch, reps):
        raise RuntimeError("triton: out of resource: shared memory\nmore detail")

    def head(row, batch, reps):
        row.update(out_head_half_ms=2.0, out_head_fused_ms=1.5)
        return 0.8

    for fn, value in (("_residual_ratio", 0.9), ("_resample_ratio", 1.1), ("_gn_stats_ratio", 0.95),
                      ("_cl_tile_ratio", 1.01), ("_channel_sums_ratio", 1.2), ("_adm_conv_ratio", 1.3)):
        monkeypatch.setattr(BD, fn, fake(fn, value))
    monkeypatch.setattr(BD, "_cat_ratio", refused)
    monkeypatch.setattr(BD, "_vs_copy", lambda row, batch, reps: {"gn_vs_copy": 1.4})
    monkeypatch.setattr(BD, "_out_head_ratio", head)
    row = {}
    ratios = BD._cuda_op_ratios(row, 4, 1)
    assert ratios == {"residual_fused_vs_eager": 0.9, "resample_triton_vs_torch": 1.1, "gn_stats_split_vs_group": 0.95,
                      "cl_tile_rows_vs_narrow": 1.01, "channel_sums_vs_separate": 1.2, "gn_vs_copy": 1.4,
                      "out_head_half_vs_float": 0.8, "out_head_fused_vs_half": 0.75, "adm_conv_triton_vs_cudnn": 1.3}
    assert row["cat_triton_vs_torch_error"] == "RuntimeError: triton: out of resource: shared memory"


def test_plot_step_panel_draws_the_guide_variants_the_gpu_call_times():
    """The GPU call times overlap_guide / compile_guide only (old paths and compile skipped): the step panel draws
    them, but not a variant whose options fell back (not the variant named); a CPU run's update rows (no HBM
    fraction) say so instead of an empty panel."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plot

    row = {"suite": "bench_step", "shape": [32], "reference_ms": 470.0, "reference_unguided_ms": 400.0,
           "fast_ms": 157.0, "fast_unguided_ms": 150.0, "fast_overlap": {"ms": 152.0},
           "fast_compiled_guide": {"ms": 140.0, "fallbacks": ["cuda_graph"]}}
    fig, (ax, ax_update) = plt.subplots(1, 2)
    plot._step(ax, [row])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["reference\nguided", "reference\nunguided", "fast\nguided",
                                                            "fast\nunguided", "fast\noverlap\nguide"]
    assert [p.get_height() for p in ax.patches] == [470.0, 400.0, 157.0, 150.0, 152.0]
    plot._update(ax_update, [{"suite": "bench_update", "sampler": "ddim", "eager_ms": 1.0, "cpp_ms": 0.2}])
    assert "no HBM fraction measured" in ax_update.get_title() and not ax_update.patches
    plt.close(fig)


def test_profile_top_drains_the_warm_call_before_profiling(monkeypatch):
    """On CUDA the warm call's kernels must finish before the profiler starts, else the profiled window holds
    the tail of the warm call too (its kernels counted in the top list and the shares)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    import torch.profiler

    import timing

    seen = []

    class FakeProfile:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            seen.append("profile on")
            return self

        def __exit__(self, *exc):
            seen.append("profile off")
            return False

        def key_averages(self, group_by_input_shape=False):
            return []

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: seen.append("sync"))
    assert timing.profile_top(lambda: seen.append("call"), "cuda", k=3) == []
    assert seen == ["call", "sync", "profile on", "call", "sync", "profile off"]


def test_update_bench_keeps_its_figures_when_a_guided_eps_kernel_fails(monkeypatch):
    """bench_update's guided_eps rows have never run on a GPU: a backend that raises there costs only its own
    figures (``<backend>_error``), and the guided_update figures (#4's update_hbm_fraction) are emitted before
    the eps rows, so an eps failure that stops the suite keeps them (it lost the whole suite)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import bench_update

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # the CUDA timing path, on the CPU

    def refused():
        raise RuntimeError("CUDA error: misaligned address\nmore")

    row = {}
    best = bench_update._time_vs_eager(row, lambda: torch.ones(64).sum(), {"cuda": lambda: torch.ones(64),
                                                                          "triton": refused}, "cuda", 2, 256, 1.0)
    assert best == "cuda" and row["triton_error"] == "RuntimeError: CUDA error: misaligned address"
    assert row["cuda_ms"] > 0 and row["cuda_vs_eager"] > 0 and "triton_ms" not in row
    monkeypatch.undo()

    def eps_fails(*args):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(bench_update, "_eps_rows", eps_fails)
    emitted = []
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_update.run("cpu", quick=True, emit=lambda rows, ratios: emitted.append((rows, ratios)))
    (rows, ratios), = emitted
    assert {r["op"] for r in rows} == {"guided_update"} and len(rows) == 3
    assert 0 < ratios["update_fused_vs_eager"] < float("inf")


def test_denoiser_fused_row_that_raises_keeps_the_eager_figures(monkeypatch):
    """bench_denoiser's fused ADM (CUDA only; its fused output head and channel sums never ran on a GPU): a
    failure records ``fused_norm_act_error`` / ``channel_sums_off_error`` in the row and leaves the model unfused,
    instead of losing the suite (the eager figures and the op rows, out_head_fused_vs_half among them)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import bench_denoiser as BD
    from ppap_fast.ops import norm_act as NA

    from _util import tiny_adm

    model = tiny_adm().to(memory_format=torch.channels_last)
    x, t = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.tensor([5, 700])
    row = {}

    def record(variant, ms):
        row[f"{variant}_ms"] = ms

    def sums_fail(*args):
        raise RuntimeError("channel sums: triton compile failed\nmore")

    monkeypatch.setattr(BD, "_channel_sums_off_ratio", sums_fail)
    ratios = BD._fused_rows(model, x, t, "cpu", 1, row, record, 2.0)
    assert list(ratios) == ["denoiser_fused_norm_act_vs_eager"] and ratios["denoiser_fused_norm_act_vs_eager"] > 0
    assert row["channel_sums_off_error"] == "RuntimeError: channel sums: triton compile failed"
    assert not model.fused_out_norm_act

    def refused(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(NA, "group_norm_act", refused)
    row.clear()
    assert BD._fused_rows(model, x, t, "cpu", 1, row, record, 2.0) == {}
    assert row == {"fused_norm_act_error": "RuntimeError: out of resource: shared memory"}
    assert not model.fused_out_norm_act


def test_geomean_of_a_zero_negative_or_nan_ratio_is_nan_and_summary_calls_it_invalid():
    """A row ratio that rounded to 0.0 (or came out negative, NaN, inf) made math.log raise and killed the
    suite; the aggregate is NaN instead, which summarize reports as no valid figure."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import math

    import summarize
    import timing

    assert timing.geomean([0.5, 2.0, 4.0]) == 1.5874
    for bad in (0.0, -0.5, float("nan"), float("inf"), None):
        assert math.isnan(timing.geomean([0.5, bad, 2.0])), bad
    assert math.isnan(timing.geomean([]))
    data = {"ratios": {"lora_fwd_vs_peft": timing.geomean([0.2, 0.0])}, "rows": []}
    goals = {line.split(":")[0]: line.split(": ", 1)[1] for line in summarize.goal_lines(data)}
    assert goals["goal #3 LoRA fwd / peft mixed batch <= 0.3333"] == (
        "nan not a valid figure (zero, negative, NaN or infinite): not measured")
