"""AdamW for stacked per-expert tensors [N, ...] with one step count per expert.

Training N experts in one pass over a mixed batch equals training each on its own samples only if
an expert's optimizer advances when it has samples, and only then. torch.optim.AdamW keeps one step
count per tensor: masking the update of the unsampled experts (``ExpertBank.step_sampled_experts``)
still leaves their bias corrections on the shared count, so after the first step an expert skipped
its updates differed from separate training. :class:`ExpertAdamW` keeps ``step`` [N] per tensor.
"""
from __future__ import annotations

import operator

import torch
from torch._utils import _flatten_dense_tensors

__all__ = ["ExpertAdamW"]


def _lr_scalar(lr):
    """A one-element tensor lr as 0-dim (a view: foreach ops take only 0-dim tensor scalars)."""
    return lr.reshape(()) if isinstance(lr, torch.Tensor) else lr


def _foreach_scale_(tensors, scalar) -> None:
    """``t.mul_(scalar)`` for each tensor, as torch's single-tensor op rounds it: on CPU the in-place foreach
    op rounds a half tensor's product otherwise (the out-of-place one does not)."""
    if tensors[0].dtype in (torch.float16, torch.bfloat16):
        torch._foreach_copy_(tensors, torch._foreach_mul(tensors, scalar))
    else:
        torch._foreach_mul_(tensors, scalar)


def _coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-expert step sizes and bias corrections: float32 for half-precision parameters
    (as torch.optim.AdamW's Python-float scalars, which its bf16 / fp16 kernels read as float32; rounded to
    bf16 they were up to 0.4% off), else the parameters'."""
    return torch.promote_types(dtype, torch.float32)


def _flat_copy(tensors) -> torch.Tensor:
    """The tensors flattened and concatenated into a new 1-D tensor: one call, however many tensors (their
    flattening views made in C++, not one Python call each); a copy even of a single tensor."""
    flat = _flatten_dense_tensors(tensors)
    return flat.clone() if len(tensors) == 1 else flat  # of one tensor: a view of it


_shape = operator.attrgetter("shape")

# torch.optim.AdamW's implementation options: the values ExpertAdamW takes (no-ops: it behaves so already) and
# why it refuses the others
_TORCH_OPTIONS = {
    "foreach": ((None, False), "it picks its own multi-tensor step, with foreach=False's results"),
    "fused": ((None, False), "it steps the tensors together in a few ops of its own"),
    "capturable": ((None, False, True), "it is capturable after a first eager step"),
    "maximize": ((False,), "it minimizes: negate the loss instead"),
    "differentiable": ((False,), "its step runs under no_grad"),
}


def _check_torch_options(options) -> None:
    for name, value in options.items():
        taken, why = _TORCH_OPTIONS[name]
        if not any(value is v for v in taken):
            raise ValueError(f"ExpertAdamW does not support {name}={value!r} ({why}); leave {name} unset")


class _FlatPlan:
    """What the concatenated step of one list of parameters reuses from step to step: the owner index,
    the sizes, and the 1-D views of the tensors it writes (the parameters, then their states), which
    gather them in one ``cat`` and take the results back in one ``_foreach_copy_`` (re-creating ~4 views
    per tensor each step was most of an eager step's host time). ``flat`` is None where one of them is
    not contiguous (no 1-D view): they are then flattened at each step."""

    def __init__(self, params, dsts, owner):
        self.owner = owner
        self.shapes = list(map(_shape, params))
        self.strides = list(map(torch.Tensor.stride, params))
        self.ptrs = list(map(torch.Tensor.data_ptr, dsts))
        self.sizes = [x.numel() for x in dsts]
        self.flat = [x.view(-1) for x in dsts] if all(x.is_contiguous() for x in dsts) else None

    def matches(self, params, dsts) -> bool:
        """Still the views of ``dsts``: the same memory (a replaced state or ``p.data`` has other memory, as
        the views keep the old alive), and the parameters of the same shapes and strides."""
        return (list(map(torch.Tensor.data_ptr, dsts)) == self.ptrs and list(map(_shape, params)) == self.shapes
                and list(map(torch.Tensor.stride, params)) == self.strides)

    def gather(self, dsts, out):
        """``dsts`` flattened and concatenated into ``out`` (contiguous)."""
        flat = self.flat if self.flat is not None else [x.reshape(-1) for x in dsts]
        torch.cat(flat, out=out.view(-1))

    def scatter(self, src, dsts):
        """The inverse of :meth:`gather`: ``src`` back into ``dsts``."""
        pieces = src.view(-1).split(self.sizes)
        if self.flat is not None:
            torch._foreach_copy_(self.flat, pieces)
        else:
            torch._foreach_copy_(dsts, [v.view(x.shape) for v, x in zip(pieces, dsts)])


class ExpertAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, optional amsgrad) on parameters whose dim 0 is the
    expert, stepping only the experts in ``step(sampled)``: they update exactly as under their own
    AdamW, with bias corrections from their own step counts (``state[p]["step"]``, float32 [N]);
    the others keep parameters, moments and counts. Every expert sampled at every step: the same
    updates as torch.optim.AdamW (bitwise for float32 on CPU; float64: to 1 ulp of the bias
    corrections; bf16 / fp16: step sizes, bias corrections and the update in float32, rounded once, as
    torch.optim.AdamW(foreach=False) on CPU, bitwise). ``lr`` may be a tensor (set it in place with
    ``group["lr"].fill_(lr)``; on the parameters' device to be captured). Sync-free: capturable in a CUDA
    graph after a first eager step (which allocates the state). On CUDA a step is a few dozen kernels
    however many tensors (stepping them one by one was ~20 each), issued by a few dozen Python calls (the
    views that concatenate the tensors are kept from step to step). Of torch.optim.AdamW's implementation
    options it takes foreach / fused None or False, capturable either way, maximize / differentiable False."""

    def __init__(self, params, n_experts: int, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, foreach=None,
                 fused=None, capturable: bool = False, maximize: bool = False, differentiable: bool = False):
        _check_torch_options(dict(foreach=foreach, fused=fused, capturable=capturable, maximize=maximize,
                                  differentiable=differentiable))
        if not isinstance(n_experts, int) or isinstance(n_experts, bool) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"a tensor lr must be one floating element, got shape {tuple(lr.shape)} {lr.dtype}")
            if not lr.item() >= 0.0:
                raise ValueError(f"invalid learning rate: {lr.item()}")
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

    # device types stepped by _step_foreach (CPU: foreach ops loop over the tensors there anyway, and
    # concatenating measured slower: its extra passes over memory); the others concatenate the tensors
    # (a few dozen kernels in all); tests set () to run the concatenated path on CPU
    _foreach_device_types = ("cpu",)

    def add_param_group(self, param_group):
        if isinstance(param_group, dict):  # (torch refuses the others)
            _check_torch_options({k: v for k, v in param_group.items() if k in _TORCH_OPTIONS})
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                self._check_param(p)
        except ValueError:
            self.param_groups.pop()  # refused: not stepped later
            raise

    def _check_sampled(self, sampled):
        if not isinstance(sampled, torch.Tensor) or sampled.dtype != torch.bool or sampled.shape != (self.n_experts,):
            got = (f"{tuple(sampled.shape)} {sampled.dtype}" if isinstance(sampled, torch.Tensor)
                   else type(sampled).__name__)
            raise ValueError(f"sampled must be a bool tensor [{self.n_experts}] (which experts step), got {got}")

    @torch.no_grad()
    def step(self, sampled: torch.Tensor | None = None, closure=None):
        """One AdamW step of the experts with ``sampled[n]`` (bool [N]; None: all). A parameter
        without a gradient is skipped, as by torch.optim.AdamW. ``closure`` (also as the only positional
        argument, as torch's ``step(closure)``) re-evaluates the loss first; its value is returned.

        The tensors of a group on one device with one dtype step together, in a number of ops that
        does not grow with the number of tensors on CUDA (:meth:`_step_concatenated`), in foreach ops
        on CPU (:meth:`_step_foreach`): the same elementwise ops either way, so the same results."""
        if callable(sampled) and closure is None:
            sampled, closure = None, sampled
        if sampled is not None:
            self._check_sampled(sampled)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_device_dtype: dict = {}
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
                    if group["amsgrad"]:
                        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                by_device_dtype.setdefault((p.device, p.dtype), []).append(p)
            for params in by_device_dtype.values():
                device = params[0].device
                on = (torch.ones(self.n_experts, dtype=torch.bool, device=device) if sampled is None
                      else sampled.to(device))
                if params[0].device.type in self._foreach_device_types:
                    self._step_foreach(params, group, on)
                else:
                    self._step_concatenated(params, group, on)
        return loss

    @staticmethod
    def _capturing() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def _owner_index(self, params) -> torch.Tensor:
        """int32, for each element of the concatenated flattened ``params``, its row i * N + n of a
        [len(params), N] coefficient table (tensor i, expert n). Cached per tensor list; built on the
        device (no host copy). Built inside a CUDA graph capture it is not cached (its values exist
        only when the graph replays); one a captured graph reads is never evicted (freed, its memory
        reused, the replays would read other data)."""
        cache = self.__dict__.setdefault("_owner_cache", {})
        pinned = self.__dict__.setdefault("_owner_pinned", set())  # keys read by captured graphs
        key = tuple((id(p), tuple(p.shape), p.device) for p in params)
        capturing = self._capturing()
        owner = cache.get(key)
        if owner is None:
            n = self.n_experts
            rows = torch.arange(len(params) * n, dtype=torch.int32, device=params[0].device).view(-1, n)
            owner = torch.cat([rows[i].unsqueeze(1).expand(n, p.numel() // n).reshape(-1)
                               for i, p in enumerate(params)])
            if capturing:
                return owner
            if len(cache) >= 8:  # a few lists of tensors with gradients, in practice
                for k in [k for k in cache if k not in pinned]:
                    del cache[k]
            cache[key] = owner
        elif capturing:
            pinned.add(key)
        return owner

    @staticmethod
    def _advance_counts(counts, on) -> torch.Tensor:
        """Adds ``on`` to every count [N] (one foreach op); returns them as float64
        [tensors, N] for the bias corrections (float64, as torch's Python floats), clamped to 1: a count
        still 0 belongs to an expert never stepped, whose update is discarded. Counts differ between
        tensors where one had no gradient at some step."""
        torch._foreach_add_(counts, [on.to(torch.float32)] * len(counts))
        return torch.stack(counts).double().clamp(min=1)

    def _step_foreach(self, params, group, on):
        """The step of ``params`` (one device and dtype, all with gradients and state) on CPU: torch's AdamW
        ops in place, each one foreach op over the tensors (per-expert step sizes and bias corrections
        broadcast), then the rows of the experts not sampled put back as they were (read from ``on`` on the
        host, free on a CPU). Each op passes over the data once: every expert sampled, 1.2x torch's foreach
        AdamW on a ResNet50 PPAP-10 bank (quiet machine), where new tensors and masked ``torch.where`` commits
        per tensor took 2.2x; 4 of 10 experts unsampled, 0.6x that old step (benchmarks/NOTES.md, stop 26)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd, amsgrad = _lr_scalar(group["lr"]), group["eps"], group["weight_decay"], group["amsgrad"]
        states = [self.state[p] for p in params]
        t = self._advance_counts([st["step"] for st in states], on)
        off = (~on).nonzero().flatten()
        if off.numel() == self.n_experts:
            return
        exp_avgs, exp_avg_sqs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        max_sqs = [st["max_exp_avg_sq"] for st in states] if amsgrad else []
        writes = params + exp_avgs + exp_avg_sqs + max_sqs
        kept = [w.index_select(0, off) for w in writes] if off.numel() else None
        per_expert = [(1,) * (p.dim() - 1) for p in params]  # [N, 1, ...]: broadcast over each tensor
        coef_dtype = _coefficient_dtype(params[0].dtype)
        step_size_neg = [x.view(-1, *k) for x, k in zip((-(lr / (1 - beta1 ** t))).to(coef_dtype), per_expert)]
        bc2_sqrt = [x.view(-1, *k) for x, k in zip((1 - beta2 ** t).sqrt().to(coef_dtype), per_expert)]
        grads = [p.grad for p in params]
        # torch's p.mul_(1 - lr * wd) then addcdiv_: p + (value * m) / denom, the update in the coefficients'
        # dtype (float32 for half parameters) rounded once when added
        if wd != 0:
            _foreach_scale_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        _foreach_scale_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if amsgrad:
            torch._foreach_maximum_(max_sqs, exp_avg_sqs)
        denoms = torch._foreach_sqrt(max_sqs if amsgrad else exp_avg_sqs)
        torch._foreach_div_(denoms, bc2_sqrt)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_mul(exp_avgs, step_size_neg)
        torch._foreach_div_(updates, denoms)
        del denoms
        if updates[0].dtype == params[0].dtype:
            torch._foreach_add_(params, updates)
        else:  # a half parameter's float32 update, rounded once
            for p, u in zip(params, updates):
                p.copy_(u.add_(p))
        if kept is not None:
            for w, k in zip(writes, kept):
                w.index_copy_(0, off, k)

    def _flat_plan(self, params, dsts) -> _FlatPlan:
        """The :class:`_FlatPlan` of ``params`` (writing ``dsts``), cached per list of parameters and rebuilt
        when its views went stale. Inside a CUDA graph capture one is used only with the owner index that
        :meth:`_owner_index` keeps for the graph, and one built there is not cached (as its owner index)."""
        plans = self.__dict__.setdefault("_flat_plans", {})
        key = tuple(map(id, params))
        capturing = self._capturing()
        plan = plans.get(key)
        valid = plan is not None and plan.matches(params, dsts)
        if valid and not capturing:
            return plan
        owner = self._owner_index(params)  # in a capture: the one kept for the graph's replays
        if valid and owner is plan.owner:
            return plan
        plan = _FlatPlan(params, dsts, owner)
        if not capturing:
            if len(plans) >= 8:  # as the owner indexes: a few lists of tensors with gradients, in practice
                plans.clear()
            plans[key] = plan
        return plan

    def _step_concatenated(self, params, group, on):
        """The step of ``params`` (one device and dtype, all with gradients and state): the single-
        tensor AdamW ops on the tensors concatenated ([sum of numels]: a few dozen kernels however
        many tensors), the per-expert coefficients spread to the elements by one gather, the masked
        commits one ``torch.where`` each, then one ``_foreach_copy_`` back. The views that concatenate
        the parameters and states are cached (:class:`_FlatPlan`): a step issues the same few dozen
        Python calls however many tensors."""
        beta1, beta2 = group["betas"]
        lr, eps, wd, amsgrad = _lr_scalar(group["lr"]), group["eps"], group["weight_decay"], group["amsgrad"]
        dtype, device = params[0].dtype, params[0].device
        if isinstance(lr, torch.Tensor) and lr.device != device and self._capturing():
            # a CPU scalar's value is read when the kernels are captured: fill_ would not reach the replays
            raise ValueError(f"a tensor lr on {lr.device} cannot be captured with parameters on {device}: the graph "
                             f"would keep its value at capture; create it on {device}")
        states = [self.state[p] for p in params]
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        dsts = list(params) + [st[k] for k in names for st in states]  # what the step writes, row by row
        plan = self._flat_plan(params, dsts)
        owner = plan.owner
        coef_dtype = _coefficient_dtype(dtype)
        # half precision: the coefficients (and so the update, by type promotion) in float32, where the new
        # parameters land after rounding once (torch's addcdiv_)
        coef_rows = 2 if coef_dtype == dtype else 0
        rows = 1 + len(names)
        # rows: [coefficients], the parameters and states gathered (adjacent: one cat, one copy back), 3 work rows
        ws = torch.empty(coef_rows + rows + 3, owner.numel(), dtype=dtype, device=device)
        gathered = ws[coef_rows:coef_rows + rows]
        t = self._advance_counts([st["step"] for st in states], on)
        coefs = ws[0:2] if coef_rows else torch.empty(2, owner.numel(), dtype=coef_dtype, device=device)
        table = torch.stack([-(lr / (1 - beta1 ** t)), (1 - beta2 ** t).sqrt()]).to(coef_dtype).view(2, -1)
        step_size_neg, bc2_sqrt = torch.index_select(table, 1, owner, out=coefs).unbind(0)
        on_elem = on.expand(len(params), -1).reshape(-1).index_select(0, owner)

        grad = _flat_copy([q.grad for q in params])  # a copy: spent below as a work buffer
        plan.gather(dsts, gathered)
        p, exp_avg, exp_avg_sq = gathered[0], gathered[1], gathered[2]
        new_avg, new_avg_sq, denom = ws[coef_rows + rows:].unbind(0)
        torch.lerp(exp_avg, grad, 1 - beta1, out=new_avg)
        torch.mul(exp_avg_sq, beta2, out=new_avg_sq).addcmul_(grad, grad, value=1 - beta2)
        if amsgrad:
            max_sq = gathered[3]
            torch.maximum(max_sq, new_avg_sq, out=denom)
            torch.where(on_elem, denom, max_sq, out=max_sq)
            denom.sqrt_()
        else:
            torch.sqrt(new_avg_sq, out=denom)
        denom.div_(bc2_sqrt).add_(eps)
        # torch's p.mul_(1 - lr * wd) then addcdiv_: p + (value * m) / denom; into spent buffers
        new_p = torch.mul(new_avg, step_size_neg, out=grad if coef_dtype == dtype else bc2_sqrt).div_(denom)
        new_p.add_(torch.mul(p, 1 - lr * wd, out=denom) if wd != 0 else p)
        if new_p.dtype != dtype:  # a half parameter's float32 update, rounded once (into the spent gradient)
            new_p = grad.copy_(new_p)
        torch.where(on_elem, new_p, p, out=p)
        torch.where(on_elem, new_avg, exp_avg, out=exp_avg)
        torch.where(on_elem, new_avg_sq, exp_avg_sq, out=exp_avg_sq)
        plan.scatter(gathered, dsts)

    def load_state_dict(self, state_dict):
        """As torch's, refusing a state without one step count per expert (torch.optim.AdamW's single
        count cannot tell how often each expert stepped); counts move to their parameter's device."""
        # the saved ids of the parameters, in order, name ours (as torch's load_state_dict maps them)
        ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        ours = dict(zip(ids, (p for g in self.param_groups for p in g["params"])))
        for i, st in state_dict.get("state", {}).items():
            step = st.get("step")
            if isinstance(step, torch.Tensor) and step.dim() == 1 and tuple(step.shape) != (self.n_experts,):
                raise ValueError(f"optimizer state of parameter {i} has step counts for {step.shape[0]} experts, "
                                 f"this optimizer's bank has {self.n_experts}: a state of another bank")
            if not isinstance(step, torch.Tensor) or tuple(step.shape) != (self.n_experts,):
                shape = tuple(step.shape) if isinstance(step, torch.Tensor) else type(step).__name__
                raise ValueError(
                    f"optimizer state of parameter {i} has a step count of shape {shape}, not one per expert "
                    f"[{self.n_experts}]: written by torch.optim.AdamW (one count shared by the experts, before "
                    "ExpertAdamW), it cannot be resumed exactly")
            p = ours.get(i)
            bad = {k: tuple(v.shape) for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor)
                   and p is not None and v.shape != p.shape}
            if bad:  # (otherwise the next step failed in a broadcast)
                raise ValueError(f"optimizer state of parameter {i} has moments of shapes {bad} for a parameter of "
                                 f"shape {tuple(p.shape)}: a state of another bank (other rank, placement or model)")
        super().load_state_dict(state_dict)
        self.__dict__.pop("_flat_plans", None)  # views of the replaced states: rebuilt at the next step
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
