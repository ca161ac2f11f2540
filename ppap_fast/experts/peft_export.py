"""Export one expert of an ExpertBank as a standard peft LoRA adapter directory.

``export_peft(bank, n, out_dir)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` such that, on the plain off-the-shelf model,
``peft.PeftModel.from_pretrained(model, out_dir)`` computes expert ``n``
(eval mode). peft is not needed to write the files, only to load them.

How each per-expert piece maps (peft 0.21 semantics):

* LoRA on Linear: ``lora_A [r, in]``, ``lora_B [out, r]``, same r and alpha.
* LoRA on Conv2d, factorised layout: peft's ``lora_A`` is an ungrouped conv
  ``C_in -> R`` with the base kernel/stride/padding (dilation 1), ``lora_B`` a
  1x1 conv with the base groups. Our grouped A is written block-diagonally
  (zeros outside its group's input channels), R = r * groups, alpha * groups:
  the same product. Dilated convs cannot be expressed (peft's A has no
  dilation) and raise, except 1x1 ones (dilation does nothing there).
* LoRA on Conv2d, loralib layout (A [r*kh, C_in*kw], B [C_out/g*kh, r*kh],
  delta = (B @ A).view(W.shape)): this is not a product of a C_in-conv and a
  1x1 conv of rank r, but it is one of rank r*kh*kh, by rearranging entries
  only (no numerical factorisation): for each kernel row a and factor row p,
  A'[(a, p)] holds A[p] in kernel row a and zeros elsewhere, and
  B'[o, (a, p)] = B[o*kh + a, p]. When C_out is smaller (or groups > 1) the
  adapter is the dense delta itself: B' = identity per group, A' = delta.
  Either way the exported rank is larger than r (per-module ``rank_pattern``).
* Per-expert bias of a LoRA module (modules_to_save would replace the LoRA
  target): peft's ``lora_bias`` (a bias on lora_B, multiplied by the scaling).
  Such modules are exported with scaling 1 (``alpha_pattern``: alpha = R,
  ``B' = B * alpha/r``) and ``lora_B.bias = expert bias - base bias``; the bank
  does not keep the base bias of those modules, so ``base_model=`` is required.
  (peft's ``bias="lora_only"`` would need no base bias, but it overwrites the base layer's bias itself:
  wrong under ``disable_adapter()``, and peft refuses a second adapter with it.)
  ``lora_bias`` is set only when some LoRA module needs it (it is global; other
  targets get a zero lora_B bias).
* Per-expert BatchNorm (affine + running statistics), LayerNorm, GroupNorm and
  per-expert biases of modules without LoRA: ``modules_to_save`` (full copies of
  those modules with the expert's values).

peft matches ``modules_to_save`` by plain string suffix and excludes from LoRA
any module matched by a modules_to_save name; both rules are checked here and a
layout peft would load differently raises ValueError naming the modules. Other
modules a suffix happens to match are saved with their base values (exact).

peft's mixed batches (``model(x, adapter_names=[...])``) raise peft's own TypeError
when an adapter saves a norm (``modules_to_save``), i.e. for every resnet /
mobilenet_v2 / ViT placement (peft 0.21 also leaves that PeftModel failing the
same way afterwards); single-adapter use (``set_adapter``) works.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from .bank import ExpertBank, ExpertBatchNorm, ExpertGroupNorm, ExpertLayerNorm, RoutedBias, RoutedConv2d, \
    RoutedLinear, _Routed
from .checkpoint import check_output_dir

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# submodules peft (0.21) adds to each LoRA Linear / Conv2d target
_PEFT_LORA_CHILDREN = ("base_layer", "lora_dropout", "lora_dropout.default", "lora_A", "lora_A.default",
                       "lora_B", "lora_B.default", "lora_embedding_A", "lora_embedding_B",
                       "lora_magnitude_vector")


def _conv_lora_factorised(m: RoutedConv2d, n: int):
    """(A' [R, C_in, kh, kw], B' [C_out, R/g], R, alpha') of a factorised conv, without scale."""
    A, B = m.lora_A[n].detach(), m.lora_B[n].detach()  # [r*g, C_in/g, kh, kw], [C_out, r]
    g = m.groups
    R, cin_g = A.shape[0], A.shape[1]
    if g == 1:
        return A.clone(), B.clone(), R, m.alpha
    full = A.new_zeros(R, m.in_channels, *A.shape[2:])
    r = R // g
    for j in range(g):
        full[j * r:(j + 1) * r, j * cin_g:(j + 1) * cin_g] = A[j * r:(j + 1) * r]
    return full, B.clone(), R, m.alpha * g  # alpha'/R' = alpha/r


def _conv_lora_dense(m: RoutedConv2d, n: int):
    """Scaled dense delta as a rank-C_out adapter: B' identity per group, A' the delta
    placed in its group's input channels. Returns (A', B', R, alpha' = R) (scaling 1)."""
    D = m.delta_weight(n).detach()  # [C_out, C_in/g, kh, kw], scaled
    g, c_out = m.groups, m.out_channels
    cin_g, og = D.shape[1], c_out // g
    A = D.new_zeros(c_out, m.in_channels, *D.shape[2:])
    for j in range(g):
        A[j * og:(j + 1) * og, j * cin_g:(j + 1) * cin_g] = D[j * og:(j + 1) * og]
    B = torch.eye(og, dtype=D.dtype, device=D.device).repeat(g, 1)  # [C_out, og]: group j row i -> col i
    return A, B, c_out, float(c_out)


def _conv_lora_loralib(m: RoutedConv2d, n: int):
    """loralib layout -> peft conv LoRA by rearranging entries (see module doc)."""
    kh, kw = m.kernel_size
    r_l = m.lora_A.shape[1]  # r * kh
    R = r_l * kh
    if m.groups > 1 or m.out_channels <= R:
        return _conv_lora_dense(m, n)
    A_l, B_l = m.lora_A[n].detach(), m.lora_B[n].detach()  # [r*kh, C_in*kw], [C_out*kh, r*kh]
    A = A_l.new_zeros(kh, r_l, kh, m.in_channels * kw)  # (a, p) -> flat [kh rows, C_in*kw] block a
    for a in range(kh):
        A[a, :, a] = A_l
    # the flat [kh, C_in*kw] of one kernel-row block is the row-major [C_in, kh, kw] of W
    A = A.reshape(R, m.in_channels, kh, kw)
    B = B_l.reshape(m.out_channels, kh, r_l).reshape(m.out_channels, R)
    return A, B, R, m.alpha * R / m.r  # alpha'/R' = alpha/r


def _plain_state(mod: nn.Module) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in mod.state_dict().items()}


def _check_base_model(bank: ExpertBank, base_model: nn.Module) -> None:
    """The plain model the adapter will be loaded on must be the bank's frozen base."""
    routed_in = [k for k, m in base_model.named_modules() if isinstance(m, _Routed)]
    if routed_in:  # bank.model: its routed modules keep no base bias where the bias is per expert
        raise ValueError(f"base_model contains the bank's routed modules ({routed_in[:3]}"
                         f"{' ...' if len(routed_in) > 3 else ''}): pass the plain (un-routed) model the bank was "
                         "built from, not bank.model")
    mine = dict(bank.model.named_modules())
    theirs = dict(base_model.named_modules())
    routed = dict(bank.routed_modules())
    problems = []
    for name in routed:
        if name not in theirs:
            problems.append(f"{name}: missing")
    for name, m in theirs.items():
        if name in routed:
            r = routed[name]
            for attr in ("weight", "bias"):
                shared = getattr(r, attr, None)
                if shared is None and getattr(r, "expert_" + attr, None) is None:
                    continue  # the bank's base had none
                theirs_t = getattr(m, attr, None)
                if not isinstance(theirs_t, torch.Tensor):
                    problems.append(f"{name}.{attr}: missing in base_model")
                elif shared is not None and not torch.equal(theirs_t.detach().to(shared.device, shared.dtype),
                                                            shared.detach()):
                    problems.append(f"{name}.{attr}: differs from the bank's frozen base")
            continue
        if any(name.startswith(p + ".") for p in routed):
            continue
        own = mine.get(name)
        if own is None:
            problems.append(f"{name}: not in the bank's model")
            continue
        for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            w = getattr(own, k, None)
            if v is None or w is None:
                continue
            if v.shape != w.shape or not torch.equal(v.detach().to(w.device, w.dtype), w.detach()):
                problems.append(f"{name}.{k}: differs from the bank's frozen base")
    for name, own in mine.items():  # shared weights that base_model lacks
        if any(name == p or name.startswith(p + ".") for p in routed):
            continue
        for k, _ in (*own.named_parameters(recurse=False), *own.named_buffers(recurse=False)):
            if k not in own._non_persistent_buffers_set and \
                    not isinstance(getattr(theirs.get(name), k, None), torch.Tensor):  # (not a cache filled by a call)
                problems.append(f"{name}.{k}: missing in base_model")
    if problems:
        raise ValueError(f"base_model is not the bank's frozen base model ({len(problems)} differences): "
                         f"{problems[:10]}; pass the plain model the bank was built from")


def export_peft(bank: ExpertBank, expert: int, out_dir, *, base_model: nn.Module | None = None,
                base_model_name_or_path: str | None = None) -> dict:
    """Write expert ``expert`` of ``bank`` as a peft LoRA adapter in ``out_dir`` (created).

    Load it with ``peft.PeftModel.from_pretrained(plain_model, out_dir)`` where
    ``plain_model`` is the off-the-shelf model the bank was built from (same module
    names and weights); in eval mode it then equals ``bank(x, expert_idx=expert)``.
    ``base_model``, when given, is checked to be that model (ValueError otherwise).
    Raises ValueError, naming the modules, when a per-expert piece cannot be
    expressed exactly in peft's format (nothing is written then).
    ``base_model_name_or_path``: recorded in the adapter config (peft's field of that name).
    Returns the adapter config written (a dict).
    """
    if not isinstance(bank, ExpertBank):
        raise TypeError(f"export_peft needs an ExpertBank, got {type(bank).__name__}")
    if base_model is not None and not isinstance(base_model, nn.Module):
        raise TypeError(f"export_peft: base_model must be the plain nn.Module the bank was built from, "
                        f"got {type(base_model).__name__}")
    expert = bank._check_n(expert)
    check_output_dir(out_dir, "export_peft")
    if base_model is not None:
        _check_base_model(bank, base_model)
    n = expert

    lora, saved, bad = {}, {}, []
    for name, m in bank.routed_modules():
        if isinstance(m, RoutedLinear):
            lora[name] = m
        elif isinstance(m, RoutedConv2d):
            if tuple(m.dilation) != (1, 1) and tuple(m.kernel_size) != (1, 1):  # no effect on a 1x1 kernel
                bad.append(f"{name} (Conv2d with dilation {tuple(m.dilation)}: peft's conv lora_A has no dilation)")
            lora[name] = m
        elif isinstance(m, (RoutedBias, ExpertBatchNorm, ExpertLayerNorm, ExpertGroupNorm)):
            saved[name] = m
        else:
            bad.append(f"{name} ({type(m).__name__} has no peft equivalent)")
    if bad:
        raise ValueError(f"expert {n} cannot be exported as a peft LoRA adapter: {bad}")
    if not lora:
        raise ValueError("the bank has no LoRA modules; peft needs at least one LoRA target")

    # peft's matching rules, replicated: modules_to_save by string suffix; LoRA targets excluded
    # when a modules_to_save name matches one of their dotted components.
    all_names = [k for k, _ in bank.model.named_modules(remove_duplicate=False) if k]
    wrapped = [k for k in all_names if any(k.endswith(s) for s in saved)]
    excluded = sorted(k for k in lora if any(re.match(rf"(^|.*\.){s}($|\..*)", k) for s in saved))
    wrapped_lora = sorted(k for k in wrapped if k in lora)
    nested = sorted(k for k in wrapped if any(o != k and o.startswith(k + ".") for o in (*wrapped, *lora)))
    # peft injects these children into every LoRA target before it matches modules_to_save, so the
    # suffix rule also sees them (a saved "out" matches "<target>.lora_dropout": TypeError on load)
    injected = sorted({f"{k}.{c}" for k in lora for c in _PEFT_LORA_CHILDREN
                       if any(f"{k}.{c}".endswith(s) for s in saved)})
    if excluded or wrapped_lora or nested or injected:
        raise ValueError(
            "peft would load this adapter differently: modules_to_save names are matched by string suffix "
            f"(per-expert non-LoRA modules {sorted(saved)}); LoRA modules it would not adapt: "
            f"{sorted(set(excluded) | set(wrapped_lora))}; modules_to_save matches that contain other adapted "
            f"modules: {nested}; peft's own LoRA submodules it would match: {injected[:10]}. Rename the modules "
            "or change the placement.")
    mods = dict(bank.model.named_modules())

    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    r0, a0 = bank.placement.r, bank.placement.alpha
    need_lora_bias = any(m.expert_bias is not None for m in lora.values())
    if need_lora_bias and base_model is None:
        biased = sorted(k for k, m in lora.items() if m.expert_bias is not None)
        raise ValueError(
            f"expert {n}: {len(biased)} LoRA module(s) with a per-expert bias ({biased[:3]}"
            f"{' ...' if len(biased) > 3 else ''}): peft holds it as lora_B.bias = expert bias - base bias, and "
            f"the bank does not keep the base bias: call export_peft(bank, {n}, out_dir, base_model=model) with the "
            "plain model the bank was built from (ppap-fast export-peft passes it itself)")
    mods_base = dict(base_model.named_modules()) if base_model is not None else {}
    with torch.no_grad():
        for name, m in lora.items():
            if isinstance(m, RoutedLinear):
                A, B, R, alpha = m.lora_A[n].detach().clone(), m.lora_B[n].detach().clone(), m.r, m.alpha
            elif m.layout == "factorised":
                A, B, R, alpha = _conv_lora_factorised(m, n)
            else:
                A, B, R, alpha = _conv_lora_loralib(m, n)
            bias = None
            if m.expert_bias is not None:  # scaling 1: B absorbs alpha/R, lora_B.bias = the bias change
                if alpha != R:
                    B = B * (alpha / R)
                    alpha = float(R)
                b0 = mods_base[name].bias.detach().to(m.expert_bias.device, m.expert_bias.dtype)
                bias = m.expert_bias[n].detach() - b0
            elif need_lora_bias:
                bias = B.new_zeros(B.shape[0])
            if isinstance(m, RoutedConv2d):
                B = B.reshape(*B.shape, 1, 1)
            key = PREFIX + name
            tensors[key + ".lora_A.weight"] = A.contiguous()
            tensors[key + ".lora_B.weight"] = B.contiguous()
            if bias is not None:
                tensors[key + ".lora_B.bias"] = bias.contiguous().clone()
            if R != r0:
                rank_pattern["^" + re.escape(name)] = R
            if alpha != a0:
                alpha_pattern["^" + re.escape(name)] = alpha
        for name in wrapped:
            m = mods[name]
            plain = saved[name].to_plain(n) if name in saved else m
            for k, v in _plain_state(plain).items():
                tensors[PREFIX + name + "." + k] = v

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    nonfinite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if nonfinite:
        raise ValueError(f"expert {n} has non-finite values in {nonfinite[:10]}")

    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": "(?:" + "|".join(re.escape(k) for k in lora) + ")",
        "modules_to_save": list(saved) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": need_lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    from ..data.shards import save_safetensors_atomic, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "ppap_fast.expert": str(n), "ppap_fast.n_experts": str(bank.n_experts),
            "ppap_fast.arch": str(bank.arch), "ppap_fast.band": json.dumps(list(bank.bands[n]))}
    save_safetensors_atomic(out / WEIGHTS_NAME, tensors, metadata=meta)
    write_json_atomic(out / CONFIG_NAME, config)
    return config


__all__ = ["export_peft"]
