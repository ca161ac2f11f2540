"""The benchmark runner and the real-scale suite run end to end on CPU (tiny models), so that the
GPU session's prepared script does not fail on a Python error. No timing is asserted here."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
