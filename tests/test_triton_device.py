"""Triton launches on the *current* CUDA device and its current stream, whatever device the pointer
arguments are on. Every Triton entry point therefore makes its input's device current
(_kernel_util.on_device): without it a model on cuda:1 (``--device cuda:1``, cuda:0 current) ran its
kernels on cuda:0 against cuda:1 memory (an illegal address without peer access) on a stream not
ordered after the producer of its inputs. CPU: the helper with stand-ins, and that each op's Triton
path runs inside it (interpreter); two GPUs: the ops on cuda:1 with cuda:0 current."""
from __future__ import annotations

import contextlib
import os
import types

import pytest
import torch

from ppap_fast.ops import _kernel_util as KU

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def test_on_device_switches_only_to_another_cuda_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    with KU.on_device(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    for dev in (torch.device("cuda", 0), torch.device("cpu")):
        with KU.on_device(types.SimpleNamespace(device=dev)):
            pass
    assert len(entered) == 1


@pytest.fixture
def guard_log(monkeypatch):
    """Replace on_device in every op module by a recorder of the tensors it was entered with; the
    recorder also notes whether a kernel launch happened inside it."""
    from ppap_fast.ops import norm, norm_act, residual, update
    from ppap_fast.ops.lora import fast

    log = {"entered": [], "depth": 0, "outside": 0}

    @contextlib.contextmanager
    def rec(t):
        log["entered"].append(t)
        log["depth"] += 1
        try:
            yield
        finally:
            log["depth"] -= 1

    for mod in (fast, norm, norm_act, residual, update):
        monkeypatch.setattr(mod, "on_device", rec)
    import triton.runtime.interpreter as TI

    real = TI.InterpretedFunction.__getitem__

    def getitem(self, grid):
        run = real(self, grid)

        def launch(*a, **k):
            if log["depth"] == 0:
                log["outside"] += 1
            return run(*a, **k)
        return launch
    monkeypatch.setattr(TI.InterpretedFunction, "__getitem__", getitem)
    return log


@pytest.mark.skipif(not INTERP, reason="CPU interpreter check")
def test_every_triton_op_launches_under_the_device_guard(guard_log):
    from ppap_fast.ops import lora, norm, norm_act, residual, update
    from ppap_fast.schedule import Schedule

    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 1, 0])
    x = torch.randn(3, 8, 5, 5, generator=g, requires_grad=True)
    A, B = torch.randn(2, 4, 8, 3, 3, generator=g) * 0.1, torch.randn(2, 6, 4, generator=g) * 0.1
    for a_stage in ("stacked", "implicit", "in_base"):
        lora.lora_conv2d(x, torch.randn(6, 8, 3, 3, generator=g), None, A, B, idx, 0.5, padding=1,
                         backend="triton", a_stage=a_stage)  # (a CUDA backward runs with its device current)
    xl = torch.randn(3, 4, 8, generator=g)
    lora.lora_linear(xl, torch.randn(6, 8, generator=g), None, torch.randn(2, 4, 8, generator=g),
                     torch.randn(2, 6, 4, generator=g), idx, 0.5, backend="triton")
    w, b = torch.ones(2, 8), torch.zeros(2, 8)
    norm.expert_batch_norm(x.detach(), idx, w, b, torch.zeros(2, 8), torch.ones(2, 8), True, backend="triton")
    norm.expert_group_norm(x.detach(), idx, 2, w, b, backend="triton")
    norm.expert_layer_norm(torch.randn(3, 4, 8, generator=g), idx, w, b, backend="triton")
    norm_act.group_norm_act(x.detach(), 2, backend="triton")
    residual.bias_residual_add(x.detach(), x.detach(), None, backend="triton")
    table = update.build_table(Schedule.create("cosine", 10))
    xi = torch.randn(3, 3, 4, 4, generator=g)
    update.guided_update(xi, torch.randn_like(xi), torch.tensor([1, 2, 3]), table, backend="triton")
    assert guard_log["entered"], "no Triton op entered the device guard"
    assert guard_log["outside"] == 0, f"{guard_log['outside']} forward launches outside the device guard"


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.cuda
@two_gpus
def test_ops_on_the_second_gpu_with_the_first_current():
    from ppap_fast.ops import lora, norm_act

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    idx = torch.tensor([0, 1, 0], device=dev)
    x = torch.randn(3, 16, 8, 8, device=dev, generator=g)
    W = torch.randn(32, 16, 3, 3, device=dev, generator=g)
    A, B = torch.randn(2, 8, 16, 3, 3, device=dev, generator=g), torch.randn(2, 32, 8, device=dev, generator=g)
    for a_stage in ("stacked", "implicit", "in_base"):
        y = lora.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend="triton", a_stage=a_stage)
        ref = lora.lora_conv2d(x.double(), W.double(), None, A.double(), B.double(), idx, 0.5, padding=1,
                               backend="reference")
        assert (y.double() - ref).abs().max() < 1e-2 * ref.abs().max()
    y = norm_act.group_norm_act(x, 4, backend="triton")
    assert (y - norm_act.group_norm_act_reference(x, 4)).abs().max() < 1e-4
    torch.cuda.synchronize(dev)


def test_tf32_setting_read_with_the_new_precision_api():
    """torch >= 2.9: after ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` reading the legacy
    ``allow_tf32`` raises; _dot_cfg read it for every fp32 launch on CUDA (a RuntimeError per LoRA call).
    In a subprocess: the precision flags are process-global."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from ppap_fast.ops.lora.triton_kernels import tf32_matmul_allowed\n"
            "assert tf32_matmul_allowed() is False\n"
            "if not hasattr(torch.backends.cuda.matmul, 'fp32_precision'):\n"
            "    raise SystemExit(0)\n"
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
            "assert tf32_matmul_allowed() is True\n"
            "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
            "assert tf32_matmul_allowed() is False\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
