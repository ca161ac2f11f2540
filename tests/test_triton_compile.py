"""The Triton kernels compile for a real GPU (sm_90), checked without one.

The CPU parity tests run the kernels under TRITON_INTERPRET=1, which accepts code that a GPU
compile rejects; tools/triton_compile_check.py records the launch configurations of the public
ops and compiles them for sm_90 (cubin via Triton's ptxas). Here: one bf16 configuration per
kernel (the largest tiles; a few seconds, cached by Triton afterwards); .ci/run runs every
configuration. Subprocesses: the check needs triton imported without the interpreter.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "triton_compile_check.py"


def _run(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_kernel_compiles_for_sm90_quick():
    r = _run([str(TOOL), "--quick"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert " 0 failed; 0 kernels never launched; 0 scenario errors" in out, out[-3000:]


def test_check_reports_a_gpu_only_compile_error(tmp_path):
    """A bf16 tl.dot with K = 8 runs under the interpreter but is rejected by the GPU compiler:
    the check must say which kernel and why."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TOOL.parent)!r})
        import triton_compile_check as t  # drops TRITON_INTERPRET before importing triton
        import torch, triton, triton.language as tl

        @triton.jit
        def small_dot_kernel(a_ptr, o_ptr, B: tl.constexpr):
            offs = tl.arange(0, B)
            a = tl.load(a_ptr + offs[:, None] * B + offs[None, :])
            tl.store(o_ptr + offs[:, None] * B + offs[None, :], tl.dot(a, a).to(tl.bfloat16))

        rec = t.Recorder({{"test:small_dot_kernel": small_dot_kernel}})
        rec.install()
        a = torch.zeros(8, 8, dtype=torch.bfloat16)
        small_dot_kernel[(1,)](a, a, B=8)  # recorded, not launched
        rec.uninstall()
        (cfg,) = rec.configs.values()
        res = t.compile_one(cfg, ptx_only=True)
        print(cfg.label())
        print("OK" if res["ok"] else "ERROR " + res["error"])
    """)
    path = tmp_path / "small_dot.py"  # triton.jit reads the kernel's source from its file
    path.write_text(script)
    r = _run([str(path)], timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "a:bf16,o:bf16 | B=8" in out, out[-2000:]
    assert "ERROR CompilationError" in out and "K >= 16" in out, out[-2000:]


def test_group_norm_act_compiles_with_one_element_a_group():
    """C == G on one position: Triton passes Cg == HW == 1 as constexprs, so the statistics kernels'
    element count Cg * HW is a Python int there (no .to()); both the split (channels fastest) and the
    one-program-per-group kernel must still compile (PTX, fp32)."""
    r = _run([str(TOOL), "--scenario", "group_norm_act one element a group", "--dtypes", "fp32", "--ptx-only"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for kernel in ("_gn_stats_cl_part_kernel", "_gn_stats_cl_reduce_kernel", "_gn_stats_kernel", "_gn_apply_kernel"):
        assert re.search(rf"^{kernel}\s+fp32\s+ok\b", out, re.M), (kernel, out[-3000:])  # each one compiled
    assert " 0 failed;" in out and " 0 scenario errors" in out, out[-3000:]
