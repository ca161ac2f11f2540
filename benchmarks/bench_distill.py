"""One distillation step over a mixed-timestep batch: all experts in one pass vs one expert after another.

sequential = for each expert, forward/backward on that expert's samples of the batch (what
training expert by expert costs for the same samples); onepass = the bank routes every sample in
one forward/backward. Both end with one AdamW step. Ratio distill_onepass_vs_sequential =
time(onepass) / time(sequential), below 1 = one pass faster; rows also give images/s. On CUDA also
the one-pass step captured whole in a CUDA graph (capturable AdamW; 3 eager warm-up steps, then
replays): distill_graph_vs_onepass = time(graph) / time(eager one pass); the captured step with what
distill steps by default (ExpertAdamW on the sampled experts) against it: distill_graph_expert_adamw_vs_adamw. The banks use the ResNet
placement's default "loralib" layout (the official checkpoints': dense per-expert deltas, routed by
lora_conv2d_delta); on CUDA also a "factorised" bank (lora_conv2d, the multi-expert LoRA kernels),
eager: distill_factorised_vs_loralib = time(factorised) / time(loralib), and the same with its LoRA
layers on the cpp backend: distill_cpp_vs_auto = time(cpp) / time(automatic backend), and on
Triton (what GraphedTrainStep prefers inside its graph): distill_triton_vs_auto; and the
loralib bank with its dense deltas as one stacked conv (CUDA's automatic choice) against the
per-sample grouped conv (PPAP_FAST_LORA_DELTA=grouped): distill_delta_stacked_vs_grouped. The
factorised bank with a_stage="implicit" (PPAP_FAST_LORA_A_STAGE: cuDNN base conv + one implicit-GEMM
Triton kernel per direction for the LoRA share) against the default stacked A stage, eager and
captured: distill_implicit_vs_stacked, distill_graph_implicit_vs_stacked. And the loralib bank with
its convs routed as the exactly equal rank r*k*k factorised LoRA (PPAP_FAST_LORALIB_CONV=factorised:
base conv once + each sample's own expert, instead of N dense convs) against its dense deltas, eager
and captured: distill_loralib_factorised_vs_delta, distill_graph_loralib_factorised_vs_delta; and with
PPAP_FAST_LORALIB_CONV=lowrank (the base conv once + the LoRA's low-rank factors as one stacked grouped conv
and a bmm, where that needs fewer FLOPs than N dense convs), captured with ExpertAdamW against the same
step on the dense deltas: distill_graph_loralib_lowrank_vs_delta; eager, on every device, the same two routes
forced (the default is "lowrank" on a CPU, "delta" on CUDA): distill_loralib_lowrank_vs_delta on the suite's
bank, and on a CPU a torchvision ResNet18 PPAP-5 bank (r 16, alpha 8, batch 16, 3x64x64), closer to a real
guide than the tiny one: distill_resnet18_lowrank_vs_delta; the low-rank route's A stage with each sample's own
expert (PPAP_FAST_LOWRANK_A=own, the CPU default) against every expert stacked then gathered ("stacked"):
distill_lowrank_own_a_vs_stacked_a, distill_resnet18_own_a_vs_stacked_a. Opt-in
(PPAP_BENCH_DISTILL_CL=1): the factorised bank in channels_last, captured, with the default A stage,
"in_base", "auto" and "implicit": distill_graph_cl_in_base_vs_stacked, distill_graph_cl_auto_vs_stacked,
distill_graph_cl_implicit_vs_stacked, distill_graph_cl_vs_nchw (channels_last vs NCHW, default A stage),
distill_graph_cl_best_vs_nchw (the best channels_last row vs NCHW). And one optimizer step alone on
the trainable tensors of a ResNet-50 bank (N=10: 168 stacked tensors, 4M elements; grads set, every expert sampled):
expert_adamw_vs_adamw = time(ExpertAdamW.step) / time(torch.optim.AdamW(foreach=True).step).
The LoRA overhead where a user pays it (#3): the captured ExpertAdamW step against the frozen backbone
(no experts, no LoRA) doing forward + loss + backward to the input only, captured too:
distill_graph_vs_frozen_fwdbwd (CPU, both eager: distill_onepass_vs_frozen_fwdbwd).
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import geomean, median_ms, round_robin_ms  # noqa: E402

from ppap_fast.experts import ExpertBank  # noqa: E402


def _model(device):
    if device == "cuda":
        import torchvision

        return torchvision.models.resnet50(weights=None), 64, (3, 128, 128), 16, 8
    from ppap_fast.models.tiny import TinyResNet

    return TinyResNet(widths=(16, 32, 64), layers=(1, 1, 1), in_channels=1, num_classes=10), 64, (1, 16, 16), 4, 2


def _kd(student, teacher):
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher / 0.25, -1), log_target=True,
                    reduction="batchmean")


def _ratios(ratios, acc) -> dict:
    out = {"distill_onepass_vs_sequential": geomean(ratios)} if ratios else {}
    out.update({k: geomean(v) for k, v in acc.items() if v})
    return out


def run(device: str = "cpu", quick: bool = False, emit=None) -> dict:
    """``emit(rows, ratios)`` (benchmarks/run.py): called after every N's main figures and again after
    its CUDA rows, so that a run killed at its time limit keeps what finished."""
    model, batch, shape, r, alpha = _model(device)
    reps = 10 if device == "cuda" else (3 if quick else 8)
    rows, ratios = [], []
    acc: dict = {k: [] for k in ("distill_delta_stacked_vs_grouped", "distill_factorised_vs_loralib",
                                "distill_cpp_vs_auto", "distill_triton_vs_auto", "distill_graph_vs_onepass",
                                "distill_implicit_vs_stacked", "distill_graph_implicit_vs_stacked",
                                "distill_loralib_factorised_vs_delta", "distill_graph_loralib_factorised_vs_delta")}
    if device == "cpu":  # a real architecture's loralib step: seconds on a CPU
        try:
            rows.append({**_loralib_route_row(*_resnet18_setup(), reps), "model": "resnet18"})
            acc["distill_resnet18_lowrank_vs_delta"] = [rows[-1]["lowrank_vs_delta"]]
            acc["distill_resnet18_own_a_vs_stacked_a"] = [rows[-1]["own_a_vs_stacked_a"]]
        except Exception as exc:  # noqa: BLE001
            rows.append({"op": "distill_step_resnet18_loralib", "error": _error(exc)})
    try:  # first: seconds, where the rows below take minutes
        rows.append(_adamw_row(device, quick))
        acc["expert_adamw_vs_adamw"] = [rows[-1]["expert_adamw_vs_adamw"]]
    except Exception as exc:  # noqa: BLE001 - the suite's main rows must still run
        rows.append({"op": "optimizer_step", "error": _error(exc)})
    if device == "cuda":  # seconds too: the LoRA weight gradient's split (a default switched before a GPU timed it)
        try:
            rows.append(_wgrad_row(device))
            acc["wgrad_split_new_vs_old"] = [rows[-1]["wgrad_split_new_vs_old"]]
        except Exception as exc:  # noqa: BLE001
            rows.append({"op": "conv_lora_wgrad", "error": _error(exc)})
    gen = torch.Generator().manual_seed(0)
    for n in ([5] if quick and device != "cuda" else [5, 10]):
        bank = ExpertBank(model, placement="resnet", n_experts=n, r=r, alpha=alpha).to(device).train()
        opt = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
        x = torch.randn(batch, *shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        teacher = torch.randn(batch, model.fc.out_features, generator=gen).to(device)
        groups = [(t // (1000 // n) == e).nonzero().flatten() for e in range(n)]

        def onepass():
            opt.zero_grad(set_to_none=True)
            _kd(bank(x, t), teacher).backward()
            opt.step()

        def sequential():
            opt.zero_grad(set_to_none=True)
            for rows_e in groups:
                if rows_e.numel():
                    (_kd(bank(x[rows_e], t[rows_e]), teacher[rows_e]) * rows_e.numel() / batch).backward()
            opt.step()

        one = median_ms(onepass, device, reps)
        seq = median_ms(sequential, device, reps)
        row = {"op": "distill_step", "n_experts": n, "batch": batch, "shape": list(shape),
               "onepass_ms": round(one, 3), "sequential_ms": round(seq, 3),
               "onepass_img_per_s": round(batch / one * 1e3, 1), "sequential_img_per_s": round(batch / seq * 1e3, 1)}
        ratios.append(one / seq)
        try:
            route_row = _loralib_route_row(bank, x, t, teacher, reps)
            row.update({f"onepass_loralib_{k}": v for k, v in route_row.items() if k.endswith("_ms")})
            acc.setdefault("distill_loralib_lowrank_vs_delta", []).append(route_row["lowrank_vs_delta"])
            acc.setdefault("distill_lowrank_own_a_vs_stacked_a", []).append(route_row["own_a_vs_stacked_a"])
        except Exception as exc:  # noqa: BLE001
            row["loralib_route_error"] = _error(exc)
        rows.append(row)
        if emit is not None:  # the ratio of this N first: the CUDA rows below take minutes
            emit([dict(r) for r in rows], _ratios(ratios, acc))
        rows.append(_frozen_row(device, bank, model, x, t, teacher, reps, n, one))
        for key in ("distill_graph_vs_frozen_fwdbwd", "distill_onepass_vs_frozen_fwdbwd"):
            if key in rows[-1]:
                acc.setdefault(key, []).append(rows[-1][key])
        if emit is not None:  # before the CUDA rows below, which take minutes
            emit([dict(r) for r in rows], _ratios(ratios, acc))
        if device == "cuda":
            def checkpoint():
                if emit is not None:
                    emit([dict(r) for r in rows], _ratios(ratios, acc))
            _cuda_extras(row, acc, bank, onepass, one, model, n, r, alpha, x, t, teacher, reps, batch, checkpoint,
                         graph_expert_adamw_ms=rows[-1].get("onepass_graph_expert_adamw_ms"))
    return {"rows": rows, "ratios": _ratios(ratios, acc)}


def _resnet18_setup(batch: int = 16, size: int = 64, n: int = 5):
    """A torchvision ResNet18 PPAP-N bank (loralib layout, r 16, alpha 8: the official settings) and a batch."""
    import torchvision

    gen = torch.Generator().manual_seed(1)
    bank = ExpertBank(torchvision.models.resnet18(weights=None), placement="resnet", n_experts=n, r=16,
                      alpha=8).train()
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return bank, x, t, torch.randn(batch, 1000, generator=gen)


def _loralib_route_row(bank, x, t, teacher, reps) -> dict:
    """One eager one-pass step (AdamW) of a loralib bank with its convs on the dense-delta route and on the
    low-rank route with each A stage (PPAP_FAST_LORALIB_CONV / PPAP_FAST_LOWRANK_A forced), alternating
    rounds: lowrank_vs_delta = time(low-rank route, the device's default A stage) / time(delta),
    own_a_vs_stacked_a = time(own A stage) / time(stacked A stage)."""
    from ppap_fast.ops.lora import vectorized as V

    device = x.device.type
    opt = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    ran = []  # the A stage of every low-rank conv call
    lowrank = V.loralib_conv2d_lowrank

    def counted(xi, *a, **k):
        ran.append(V.lowrank_a_stage(xi.device))
        return lowrank(xi, *a, **k)

    def onepass():
        opt.zero_grad(set_to_none=True)
        _kd(bank(x, t), teacher).backward()
        opt.step()

    def on(route, a_stage=None):
        def step():
            ran.clear()
            env = {"PPAP_FAST_LORALIB_CONV": route, **({"PPAP_FAST_LOWRANK_A": a_stage} if a_stage else {})}
            _with_env(env, onepass)
            if set(ran) != ({a_stage} if a_stage else set()):
                raise RuntimeError(f"the {route} route (A stage {a_stage}) ran low-rank convs with {sorted(set(ran))}")
        return step

    V.loralib_conv2d_lowrank = counted
    try:  # alternating rounds: load drift on a shared machine hits all alike
        times = round_robin_ms({"delta": on("delta"), "stacked": on("lowrank", "stacked"),
                                "own": on("lowrank", "own")}, device, reps)
    finally:
        V.loralib_conv2d_lowrank = lowrank
    ms = {k: statistics.median(v) for k, v in times.items()}
    low = ms[V.lowrank_a_stage(x.device)]  # what the low-rank route runs here by default
    return {"op": "distill_step_loralib_routes", "n_experts": bank.n_experts, "batch": x.shape[0],
            "shape": list(x.shape[1:]), "delta_ms": round(ms["delta"], 3),
            "lowrank_stacked_a_ms": round(ms["stacked"], 3), "lowrank_own_a_ms": round(ms["own"], 3),
            "lowrank_ms": round(low, 3), "lowrank_vs_delta": round(low / ms["delta"], 4),
            "own_a_vs_stacked_a": round(ms["own"] / ms["stacked"], 4)}


def _with_env(env: dict, fn):
    """fn() with the environment variables ``env`` set, restored after."""
    from ppap_fast.ops._registry import environ_set

    with environ_set(env):
        return fn()


def _frozen_row(device, bank, model, x, t, teacher, reps, n, one) -> dict:
    """frozen_fwdbwd: the distill step the users run against the frozen backbone alone (#3's LoRA overhead
    per training step). CUDA: the one-pass step captured with ExpertAdamW (_graphed_ms(expert_adamw=True),
    distill's default) vs _frozen_fwdbwd_ms captured; CPU: the eager one-pass step ``one`` vs it eager."""
    row = {"op": "frozen_fwdbwd", "n_experts": n, "batch": x.shape[0], "shape": list(x.shape[1:])}
    try:
        frozen_ms, _ = _frozen_fwdbwd_ms(_frozen_model(model, device), x, teacher, reps)
        row["frozen_ms"] = round(frozen_ms, 3)
        if device == "cuda":
            step_ms = _graphed_ms(bank, x, t, teacher, reps, True)
            row["onepass_graph_expert_adamw_ms"] = round(step_ms, 3)
            row["distill_graph_vs_frozen_fwdbwd"] = round(step_ms / frozen_ms, 4)
        else:
            row["onepass_ms"] = round(one, 3)
            row["distill_onepass_vs_frozen_fwdbwd"] = round(one / frozen_ms, 4)
    except Exception as exc:  # noqa: BLE001
        row["error"] = _error(exc)
    return row


def _frozen_model(model, device):
    """A copy of the unwrapped backbone (ExpertBank wraps its own deep copy; this one's BatchNorm running
    statistics must not leak into the banks built from ``model`` later): fp32, NCHW, every weight
    requires_grad=False, train mode (BatchNorm on batch statistics, as the bank's per-expert ones)."""
    return copy.deepcopy(model).to(device).requires_grad_(False).train()


def _frozen_fwdbwd_ms(frozen, x, teacher, reps):
    """Median ms of ``frozen`` forward + _kd + backward to the input (a leaf on x's memory that requires grad):
    every layer's input gradient, no weight gradient, the model-level frozen base layers' fwd + dgrad.
    Captured in a CUDA graph on CUDA (GraphedTrainStep, as _graphed_ms), eager on CPU.
    Returns (ms, the input leaf of the last step (captured: of every replay), its gradient in .grad)."""
    trainable = [name for name, p in frozen.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"the frozen model has trainable weights: {trainable[:4]}")

    leaf = []

    def step(x, teacher):  # a fresh leaf of x each step: its gradient written, not accumulated
        leaf[:] = [x.detach().requires_grad_(True)]
        loss = _kd(frozen(leaf[0]), teacher)
        loss.backward()
        return loss

    if x.device.type == "cuda":
        from ppap_fast.train_graph import GraphedTrainStep

        run = GraphedTrainStep(step, lora_backend=None)
        ms = _replayed_ms(run, lambda: run(x, teacher), reps)
    else:
        ms = median_ms(lambda: step(x, teacher), x.device.type, reps)
    return ms, leaf[0]


def _wgrad_row(device: str, batch: int = 64, channels: int = 256, size: int = 14, r: int = 16, n: int = 5,
               reps: int = 20) -> dict:
    """conv_lora_wgrad (the A weight gradient of the Triton LoRA conv) at resnet50.layer3.conv2's shape
    (3x3, fp16 channels_last, random experts) with the automatic split (WGRAD_PROGRAMS_PER_SM a SM) vs
    the split of 2 programs a SM it had before: ms of each, both splits, the new / old ratio."""
    from ppap_fast.ops import lora as L
    from ppap_fast.ops.lora import triton_kernels as TK

    gen = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, torch.float16).contiguous(memory_format=cl)
    dh = torch.randn(batch, r, size, size, generator=gen).to(device, torch.float16).contiguous(memory_format=cl)
    seg = L.build_segments(torch.randint(0, n, (batch,), generator=gen).to(device), n)
    out = torch.empty(n, r, channels, 3, 3, device=device, dtype=torch.float16)
    splits = {"new": TK.wgrad_auto_split(x, dh, out), "old": TK.wgrad_auto_split(x, dh, out, per_sm=2)}
    ms, res = {}, {}
    for k, sp in splits.items():
        ms[k] = median_ms(lambda: TK.conv_lora_wgrad(x, dh, out, seg.sorted_idx, seg.offsets, 1, 1, 1, split=sp),
                          device, reps)
        res[k] = out.float().clone()
    err = float((res["new"] - res["old"]).norm() / res["old"].norm())
    return {"op": "conv_lora_wgrad", "shape": [batch, channels, size, size], "r": r, "n_experts": n,
            "split_new": splits["new"], "split_old": splits["old"], "new_ms": round(ms["new"], 4),
            "old_ms": round(ms["old"], 4), "new_vs_old_rel_diff": err,
            "wgrad_split_new_vs_old": round(ms["new"] / ms["old"], 4)}


def _adamw_row(device: str, quick: bool, n: int = 10) -> dict:
    """One step of ExpertAdamW vs torch.optim.AdamW(foreach=True) on a ResNet-50 bank's trainable tensors
    (random weights; TinyResNet without torchvision), timed round-robin (median per-round ratio); on
    CPU with one thread (as bench_update: a shared box's descheduled OpenMP threads swamp the times)."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _adamw_row_timed(device, quick, n)
    finally:
        torch.set_num_threads(threads)


def _adamw_row_timed(device: str, quick: bool, n: int) -> dict:
    import statistics

    from timing import round_robin_ms

    from ppap_fast.distill import make_bank
    from ppap_fast.experts import ExpertAdamW

    try:
        import torchvision

        model, arch = torchvision.models.resnet50(weights=None), "resnet50"
    except ImportError:
        model, arch = _model("cpu")[0], "tiny_resnet"
    bank = make_bank(model, n).to(device)
    gen = torch.Generator().manual_seed(0)
    ours = [p for p in bank.parameters_to_train()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=gen).to(device, a.dtype)
        b.grad = a.grad.clone()
    opts = {"expert_adamw": ExpertAdamW(ours, n, lr=1e-4, weight_decay=0.05),
            "adamw_foreach": torch.optim.AdamW(theirs, lr=1e-4, weight_decay=0.05, foreach=True)}
    times = round_robin_ms({k: o.step for k, o in opts.items()}, device, 10 if quick else 30, warmup=3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {"op": "optimizer_step", "model": arch, "n_experts": n, "tensors": len(ours),
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "elements": sum(p.numel() for p in ours), "expert_adamw_ms": round(ms["expert_adamw"], 3),
            "adamw_foreach_ms": round(ms["adamw_foreach"], 3),
            "expert_adamw_vs_adamw": round(statistics.median(
                a / b for a, b in zip(times["expert_adamw"], times["adamw_foreach"])), 4)}


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _cuda_extras(row, acc, bank, onepass, one, model, n, r, alpha, x, t, teacher, reps, batch, checkpoint=None,
                 graph_expert_adamw_ms=None):
    """The CUDA-only rows of one N; a variant that fails records why in the row (the others still run).
    ``checkpoint()`` after each block (run() emits the rows and ratios so far). ``graph_expert_adamw_ms``:
    the captured ExpertAdamW step already timed (the frozen_fwdbwd row), reused instead of timed again."""
    device = "cuda"
    checkpoint = checkpoint or (lambda: None)
    try:  # the loralib bank's dense deltas: CUDA's automatic stacked conv vs the per-sample grouped one
        st_ms = _with_backend("PPAP_FAST_LORA_DELTA", "stacked", "lora_conv2d_delta", "stacked",
                              lambda: median_ms(onepass, device, reps))
        gr_ms = _with_backend("PPAP_FAST_LORA_DELTA", "grouped", "lora_conv2d_delta", "vectorized",
                              lambda: median_ms(onepass, device, reps))
    except Exception as exc:  # noqa: BLE001
        row["onepass_delta_stacked_error"] = _error(exc)
    else:
        row["onepass_delta_stacked_ms"] = round(st_ms, 3)
        row["onepass_delta_grouped_ms"] = round(gr_ms, 3)
        acc["distill_delta_stacked_vs_grouped"].append(st_ms / gr_ms)
    checkpoint()
    try:  # the factorised layout (the multi-expert LoRA kernels), automatic and cpp backends
        f_ms, c_ms, tr_ms, im_ms, g_st, g_im = _factorised_ms(model, n, r, alpha, x, t, teacher, reps)
    except Exception as exc:  # noqa: BLE001
        row["factorised_error"] = _error(exc)
    else:
        row["factorised_onepass_ms"] = round(f_ms, 3)
        row["factorised_onepass_cpp_ms"] = round(c_ms, 3)
        row["factorised_onepass_img_per_s"] = round(batch / f_ms * 1e3, 1)
        acc["distill_factorised_vs_loralib"].append(f_ms / one)
        row["factorised_onepass_triton_ms"] = round(tr_ms, 3)
        acc["distill_cpp_vs_auto"].append(c_ms / f_ms)
        acc["distill_triton_vs_auto"].append(tr_ms / f_ms)
        row["factorised_onepass_implicit_ms"] = round(im_ms, 3)
        acc["distill_implicit_vs_stacked"].append(im_ms / f_ms)
        if isinstance(g_st, str):
            row["factorised_graph_error"] = g_st
        else:
            row["factorised_graph_ms"] = round(g_st, 3)
            row["factorised_graph_implicit_ms"] = round(g_im, 3)
            acc["distill_graph_implicit_vs_stacked"].append(g_im / g_st)
    checkpoint()
    try:  # the one-pass step captured whole in a CUDA graph (ppap_fast.train_graph)
        g_ms = _graphed_ms(bank, x, t, teacher, reps)
    except Exception as exc:  # noqa: BLE001
        row["onepass_graph_error"] = _error(exc)
    else:
        row["onepass_graph_ms"] = round(g_ms, 3)
        row["onepass_graph_img_per_s"] = round(batch / g_ms * 1e3, 1)
        acc["distill_graph_vs_onepass"].append(g_ms / one)
    try:  # the same with what distill steps by default (expert_mean): ExpertAdamW, sampled experts only
        ge_ms = graph_expert_adamw_ms or _graphed_ms(bank, x, t, teacher, reps, True)
    except Exception as exc:  # noqa: BLE001
        row["onepass_graph_expert_adamw_error"] = _error(exc)
    else:
        row["onepass_graph_expert_adamw_ms"] = round(ge_ms, 3)
        if row.get("onepass_graph_ms"):
            acc.setdefault("distill_graph_expert_adamw_vs_adamw", []).append(ge_ms / row["onepass_graph_ms"])
        try:  # distill --amp bf16: the same step with the forward under bf16 autocast
            ga_ms = _graphed_ms(bank, x, t, teacher, reps, True, amp="bf16")
        except Exception as exc:  # noqa: BLE001
            row["onepass_graph_amp_bf16_error"] = _error(exc)
        else:
            row["onepass_graph_amp_bf16_ms"] = round(ga_ms, 3)
            row["onepass_graph_amp_bf16_img_per_s"] = round(batch / ga_ms * 1e3, 1)
            acc.setdefault("distill_graph_amp_bf16_vs_fp32", []).append(ga_ms / ge_ms)
    checkpoint()
    if os.environ.get("PPAP_BENCH_DISTILL_CL") == "1":  # opt-in: three more captured ResNet50 steps
        try:
            cl_st, cl_ib, cl_auto, cl_impl = _channels_last_ms(model, n, r, alpha, x, t, teacher, reps)
        except Exception as exc:  # noqa: BLE001
            row["channels_last_error"] = _error(exc)
        else:
            row["factorised_graph_channels_last_ms"] = round(cl_st, 3)
            row["factorised_graph_channels_last_in_base_ms"] = round(cl_ib, 3)
            row["factorised_graph_channels_last_auto_ms"] = round(cl_auto, 3)
            row["factorised_graph_channels_last_implicit_ms"] = round(cl_impl, 3)
            acc.setdefault("distill_graph_cl_in_base_vs_stacked", []).append(cl_ib / cl_st)
            acc.setdefault("distill_graph_cl_auto_vs_stacked", []).append(cl_auto / cl_st)
            acc.setdefault("distill_graph_cl_implicit_vs_stacked", []).append(cl_impl / cl_st)
            if "factorised_graph_ms" in row:
                acc.setdefault("distill_graph_cl_vs_nchw", []).append(cl_st / row["factorised_graph_ms"])
                acc.setdefault("distill_graph_cl_best_vs_nchw", []).append(
                    min(cl_st, cl_ib, cl_auto, cl_impl) / row["factorised_graph_ms"])
        checkpoint()
    try:  # the loralib bank's convs through their low-rank factors where that needs fewer FLOPs than N dense convs
        lr_ms = _lowrank_graphed_ms(bank, x, t, teacher, reps)
        row["onepass_graph_expert_adamw_loralib_lowrank_ms"] = round(lr_ms, 3)
        if row.get("onepass_graph_expert_adamw_ms"):
            acc.setdefault("distill_graph_loralib_lowrank_vs_delta", []).append(
                lr_ms / row["onepass_graph_expert_adamw_ms"])
    except Exception as exc:  # noqa: BLE001
        row["loralib_lowrank_error"] = _error(exc)
    checkpoint()
    try:  # the loralib bank's convs as the equal rank r*k*k factorised LoRA (implicit A stage)
        def lf(fn):
            return _with_backend("PPAP_FAST_LORALIB_CONV", "factorised", "lora_conv2d/a_stage", "implicit", fn)

        lf_ms = lf(lambda: median_ms(onepass, device, reps))
        row["onepass_loralib_factorised_ms"] = round(lf_ms, 3)
        acc["distill_loralib_factorised_vs_delta"].append(lf_ms / one)
        lg_ms = lf(lambda: _graphed_ms(bank, x, t, teacher, reps))
        row["onepass_graph_loralib_factorised_ms"] = round(lg_ms, 3)
        if "onepass_graph_ms" in row:
            acc["distill_graph_loralib_factorised_vs_delta"].append(lg_ms / row["onepass_graph_ms"])
    except Exception as exc:  # noqa: BLE001
        row["loralib_factorised_error"] = _error(exc)
    checkpoint()


def _lowrank_graphed_ms(bank, x, t, teacher, reps):
    """_graphed_ms (ExpertAdamW) of the loralib bank with PPAP_FAST_LORALIB_CONV=lowrank; raises where no conv took
    the low-rank route (each falls back to the delta route where that is cheaper: a delta-vs-delta figure)."""
    from ppap_fast.ops.lora import vectorized as V

    lowrank, calls = V.loralib_conv2d_lowrank, []

    def counted(*a, **k):
        calls.append(1)
        return lowrank(*a, **k)

    V.loralib_conv2d_lowrank = counted
    try:
        ms = _with_env({"PPAP_FAST_LORALIB_CONV": "lowrank"}, lambda: _graphed_ms(bank, x, t, teacher, reps, True))
    finally:
        V.loralib_conv2d_lowrank = lowrank
    if not calls:
        raise RuntimeError("PPAP_FAST_LORALIB_CONV=lowrank ran no low-rank conv (every conv took the delta route)")
    return ms


def _channels_last_ms(model, n, r, alpha, x, t, teacher, reps):
    """The factorised bank in channels_last (weights and input), its step captured in a CUDA graph with
    the default A stage, a_stage="in_base" (the frozen conv and its LoRA in one Triton implicit GEMM),
    "auto" (the fastest per layer, timed in the warm-up steps) and "implicit" (cuDNN's conv + the
    implicit LoRA kernels, whose tile loads vectorise in channels_last): (stacked, in_base, auto,
    implicit) ms."""
    device = x.device.type
    bank = ExpertBank(model, placement="resnet", n_experts=n, r=r, alpha=alpha, layout="factorised").to(device).train()
    bank.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    stacked = _graphed_ms(bank, xc, t, teacher, reps)
    in_base = _with_backend("PPAP_FAST_LORA_A_STAGE", "in_base", "lora_conv2d/a_stage", "in_base",
                            lambda: _graphed_ms(bank, xc, t, teacher, reps))
    auto = _with_backend("PPAP_FAST_LORA_A_STAGE", "auto", "lora_conv2d/a_stage", None,
                         lambda: _graphed_ms(bank, xc, t, teacher, reps))
    implicit = _with_backend("PPAP_FAST_LORA_A_STAGE", "implicit", "lora_conv2d/a_stage", "implicit",
                             lambda: _graphed_ms(bank, xc, t, teacher, reps))
    return stacked, in_base, auto, implicit


def _factorised_ms(model, n, r, alpha, x, t, teacher, reps):
    """One-pass step of a factorised-layout bank (lora_conv2d: the multi-expert LoRA kernels): eager
    with the automatic backend, the cpp one, Triton and the automatic backend with a_stage="implicit",
    then captured in a CUDA graph with the default and the implicit A stage;
    (auto, cpp, triton, implicit, graph, graph implicit) ms, the last two the error text where the graphed ones failed."""
    device = x.device.type
    bank = ExpertBank(model, placement="resnet", n_experts=n, r=r, alpha=alpha, layout="factorised").to(device).train()
    opt = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def onepass():
        opt.zero_grad(set_to_none=True)
        _kd(bank(x, t), teacher).backward()
        opt.step()

    auto = median_ms(onepass, device, reps)
    cpp = _with_cpp_backend(lambda: median_ms(onepass, device, reps))
    from ppap_fast.ops import lora as L

    with L.prefer_backend("triton"):
        tri = median_ms(onepass, device, reps)
    if L.last_backend.get("lora_conv2d") != "triton":
        raise RuntimeError(f"the bank ran lora_conv2d on {L.last_backend.get('lora_conv2d')!r}, not triton")
    implicit = _with_backend("PPAP_FAST_LORA_A_STAGE", "implicit", "lora_conv2d/a_stage", "implicit",
                             lambda: median_ms(onepass, device, reps))
    try:  # a failed capture costs the graphed pair only
        g_stacked = _graphed_ms(bank, x, t, teacher, reps)
        g_implicit = _with_backend("PPAP_FAST_LORA_A_STAGE", "implicit", "lora_conv2d/a_stage", "implicit",
                                   lambda: _graphed_ms(bank, x, t, teacher, reps))
    except Exception as exc:  # noqa: BLE001
        g_stacked = g_implicit = _error(exc)
    return auto, cpp, tri, implicit, g_stacked, g_implicit


def _with_backend(env: str, value: str, op: str, backend: str, fn):
    """fn() with the environment variable env=value, checking that op then ran backend."""
    from ppap_fast.ops import lora as L

    def checked():
        out = fn()
        if backend is not None and L.last_backend.get(op) != backend:
            raise RuntimeError(f"the bank ran {op} on {L.last_backend.get(op)!r}, not {backend}")
        return out

    return _with_env({env: value}, checked)


def _with_cpp_backend(fn):
    """fn() with the LoRA ops' cpp backend (C++ autograd, one Python -> C++ call per layer) picked first."""
    return _with_backend("PPAP_FAST_LORA_CPP", "1", "lora_conv2d", "cpp", fn)


def _graphed_ms(bank, x, t, teacher, reps, expert_adamw: bool = False, amp: str = "none"):
    """Median ms of the one-pass step captured in a CUDA graph: capturable torch AdamW on every
    trainable tensor, or (``expert_adamw``) distill's expert_mean default: ExpertAdamW stepping the
    sampled experts only (ExpertBank.step_sampled_experts). ``amp``: the forward under
    distributed.amp_autocast (distill --amp)."""
    from ppap_fast.distributed import amp_autocast
    from ppap_fast.train_graph import GraphedTrainStep

    bank.check_inputs = False
    lr = torch.tensor(1e-4, device=x.device)
    if expert_adamw:
        from ppap_fast.distill import expert_counts
        from ppap_fast.experts import ExpertAdamW

        opt = ExpertAdamW(bank.parameters_to_train(), bank.n_experts, lr=lr, weight_decay=0.05)
    else:
        opt = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=lr, weight_decay=0.05,
                                capturable=True)

    def step(x, t, teacher):
        with amp_autocast(amp, x.device):
            out = bank(x, t)
        loss = _kd(out.float(), teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if expert_adamw:
            bank.step_sampled_experts(opt, expert_counts(bank.expert_index(t), bank.n_experts) > 0)
        else:
            opt.step()
        return loss

    run = GraphedTrainStep(step)
    try:
        return _replayed_ms(run, lambda: run(x, t, teacher), reps)
    finally:
        bank.check_inputs = True


def _replayed_ms(run, fn, reps):
    """Median ms of fn (calls the GraphedTrainStep ``run``: 3 eager steps, the capture, then replays). A failed
    capture raises: GraphedTrainStep then trains eagerly, an eager time under a graphed row's name."""
    ms = median_ms(fn, "cuda", reps, warmup=5)
    if not run.captured:
        raise RuntimeError(f"the step was not captured in a CUDA graph ({run.capture_error}): its eager time is "
                           "not a graphed figure")
    return ms


if __name__ == "__main__":
    import json

    if sys.argv[2:3] == ["adamw"]:  # the optimizer step row alone: bench_distill.py cpu adamw
        print(json.dumps(_adamw_row(sys.argv[1], quick=True), indent=1))
    else:
        print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu", quick=True), indent=1))
