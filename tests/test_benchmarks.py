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


def test_summary_decisions_name_the_switch():
    """summarize.decisions: a pending default's ratio below 0.97 says what to change, otherwise keep."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import summarize

    lines = summarize.decisions({"distill_graph_implicit_vs_stacked": 0.8, "distill_triton_vs_auto": 1.02})
    assert len(lines) == len(summarize.PENDING)
    by_key = {ln.split()[1].rstrip(":"): ln for ln in lines}
    assert "_resolve_a_stage" in by_key["distill_graph_implicit_vs_stacked"]
    assert "keep the current default" in by_key["distill_triton_vs_auto"]
    assert "not measured" in by_key["distill_loralib_factorised_vs_delta"]


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
        return 1.0 + 0.01 * calls["graph"], None, ([{"name": "kernel", "ms": 0.1}] if profile else [])

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
              "lora_linear_graph_in_base_vs_base_graph", "lora_linear_graph_in_base_vs_default"):
        assert k in out["ratios"] and math.isfinite(out["ratios"][k]) and out["ratios"][k] > 0, k
    assert not [r for r in out["rows"] if r.get("skipped") and "peft" not in r["variant"]]
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
