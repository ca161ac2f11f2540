"""AdamW for stacked per-expert tensors [N, ...] with one step count per expert.

Training N experts in one pass over a mixed batch equals training each on its own samples only if
an expert's optimizer advances when it has samples, and only then. torch.optim.AdamW keeps one step
count per tensor: masking the update of the unsampled experts (``ExpertBank.step_sampled_experts``)
still leaves their bias corrections on the shared count, so after the first step an expert skipped
its updates differed from separate training. :class:`ExpertAdamW` keeps ``step`` [N] per tensor.
"""
from __future__ import annotations

import torch

__all__ = ["ExpertAdamW"]


class ExpertAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, optional amsgrad) on parameters whose dim 0 is the
    expert, stepping only the experts in ``step(sampled)``: they update exactly as under their own
    AdamW, with bias corrections from their own step counts (``state[p]["step"]``, float32 [N]);
    the others keep parameters, moments and counts. Every expert sampled at every step: the same
    updates as torch.optim.AdamW (bitwise for float32 on CPU; float64: to 1 ulp of the bias
    corrections). ``lr`` may be a tensor (set it in place with ``group["lr"].fill_(lr)``). Sync-free:
    capturable in a CUDA graph after a first eager step (which allocates the state)."""

    def __init__(self, params, n_experts: int, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False):
        if not isinstance(n_experts, int) or isinstance(n_experts, bool) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"a tensor lr must be one floating element, got shape {tuple(lr.shape)} {lr.dtype}")
        elif not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        self.n_experts = n_experts  # before the base class adds (and so checks) the parameter groups
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=bool(amsgrad)))

    def _check_param(self, p):
        if p.dim() == 0 or p.shape[0] != self.n_experts:
            raise ValueError(f"ExpertAdamW takes stacked per-expert tensors [{self.n_experts}, ...]; got one of "
                             f"shape {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"ExpertAdamW takes floating parameters, got dtype {p.dtype}")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._check_param(p)

    def _sampled(self, sampled, device):
        if sampled is None:
            return torch.ones(self.n_experts, dtype=torch.bool, device=device)
        if not isinstance(sampled, torch.Tensor) or sampled.dtype != torch.bool or sampled.shape != (self.n_experts,):
            got = (f"{tuple(sampled.shape)} {sampled.dtype}" if isinstance(sampled, torch.Tensor)
                   else type(sampled).__name__)
            raise ValueError(f"sampled must be a bool tensor [{self.n_experts}] (which experts step), got {got}")
        return sampled.to(device)

    @torch.no_grad()
    def step(self, sampled: torch.Tensor | None = None):
        """One AdamW step of the experts with ``sampled[n]`` (bool [N]; None: all). A parameter
        without a gradient is skipped, as by torch.optim.AdamW."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, amsgrad = group["lr"], group["eps"], group["weight_decay"], group["amsgrad"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("ExpertAdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(self.n_experts, dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if amsgrad:
                        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                on = self._sampled(sampled, p.device)
                on_p = on.view(-1, *([1] * (p.dim() - 1)))
                grad, exp_avg, exp_avg_sq, count = p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"]
                count.add_(on.to(count.dtype))
                # the same ops as torch's single-tensor AdamW; bias corrections per expert (float64, as its
                # Python floats); an expert never sampled yet is clamped to 1 here and discarded below
                t = count.double().clamp(min=1)
                step_size_neg = (-(lr / (1 - beta1 ** t))).to(p.dtype).view_as(on_p)
                bc2_sqrt = (1 - beta2 ** t).sqrt().to(p.dtype).view_as(on_p)
                new_avg = exp_avg.lerp(grad, 1 - beta1)
                new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                if amsgrad:
                    new_max = torch.maximum(st["max_exp_avg_sq"], new_avg_sq)
                    st["max_exp_avg_sq"].copy_(torch.where(on_p, new_max, st["max_exp_avg_sq"]))
                    denom = (new_max.sqrt() / bc2_sqrt).add_(eps)
                else:
                    denom = (new_avg_sq.sqrt() / bc2_sqrt).add_(eps)
                new_p = p.mul(1 - lr * wd) if wd != 0 else p.clone()
                new_p.add_(new_avg * step_size_neg / denom)  # torch's addcdiv: p + (value * m) / denom
                p.copy_(torch.where(on_p, new_p, p))
                exp_avg.copy_(torch.where(on_p, new_avg, exp_avg))
                exp_avg_sq.copy_(torch.where(on_p, new_avg_sq, exp_avg_sq))

    def load_state_dict(self, state_dict):
        """As torch's, refusing a state without one step count per expert (torch.optim.AdamW's single
        count cannot tell how often each expert stepped); counts move to their parameter's device."""
        for i, st in state_dict.get("state", {}).items():
            step = st.get("step")
            if not isinstance(step, torch.Tensor) or tuple(step.shape) != (self.n_experts,):
                shape = tuple(step.shape) if isinstance(step, torch.Tensor) else type(step).__name__
                raise ValueError(
                    f"optimizer state of parameter {i} has a step count of shape {shape}, not one per expert "
                    f"[{self.n_experts}]: written by torch.optim.AdamW (one count shared by the experts, before "
                    "ExpertAdamW), it cannot be resumed exactly")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
