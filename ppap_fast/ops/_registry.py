"""Backend registry: each op has a reference path and optional fast paths.

Order of preference on a CUDA tensor: cuda > triton > reference; on a CPU
tensor: cpp > reference (Triton on CPU only runs under TRITON_INTERPRET=1 and
is picked only when asked for explicitly). Asking for a backend that cannot run
raises (a global ``set_backend`` / PPAP_FAST_BACKEND only concerns the ops that have it); `last_backend(op)` tells which path ran most recently.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKENDS = ("cuda", "cpp", "triton", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


class BackendUnavailableError(RuntimeError):
    pass


@dataclass
class _Op:
    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    available: dict[str, Callable[[torch.device], str | None]] = field(default_factory=dict)
    last: str | None = None


_OPS: dict[str, _Op] = {}
_forced: str | None = os.environ.get("PPAP_FAST_BACKEND") or None  # a bad name raises at the first op (forced())
if _forced == "auto":
    _forced = None


def forced() -> str | None:
    """The backend forced for every op that has it (set_backend / PPAP_FAST_BACKEND), or None. A misspelt
    PPAP_FAST_BACKEND raises here: it matched no op's backend and was ignored, silently."""
    if _forced is not None and _forced not in BACKENDS:
        raise ValueError(f"PPAP_FAST_BACKEND={_forced!r} is no backend; expected one of {BACKENDS} or 'auto'")
    return _forced


@contextlib.contextmanager
def environ_set(env: dict):
    """The environment variables ``env`` set (the PPAP_FAST_* choices read at call time) inside the block,
    each restored after (removed where it was unset)."""
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)  # a value that is no str raises part way: the keys set before it are restored
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def register(op: str, backend: str, fn: Callable, why_unavailable: Callable[[torch.device], str | None]):
    """Register `fn` as `backend` of `op`; why_unavailable(device) returns None when it can run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    entry = _OPS.setdefault(op, _Op(op))
    entry.impls[backend] = fn
    entry.available[backend] = why_unavailable


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    entry = _OPS.get(op)
    if entry is None:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_OPS)}")
    if backend not in entry.impls:
        return f"op {op!r} has no {backend!r} implementation (it has {sorted(entry.impls)})"
    return entry.available[backend](torch.device(device))


def select(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The implementation to run for `op` on `device` (records the choice)."""
    device = torch.device(device)
    entry = _OPS[op]
    if backend is None and forced() is not None and _forced in entry.impls:
        backend = _forced  # a global choice applies to the ops that have that backend; explicit ones are strict
    if backend is not None and backend != "auto":
        reason = why_unavailable(op, backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} for op {op!r} on {device} is unavailable: {reason}")
        entry.last = backend
        return entry.impls[backend]
    for name in _AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]:
        if name in entry.impls and entry.available[name](device) is None:
            entry.last = name
            return entry.impls[name]
    raise BackendUnavailableError(f"no backend of op {op!r} can run on {device}")


def select_gated(op: str, x: torch.Tensor, backend: str | None, fast_dtypes, reference_only: str | None = None):
    """:func:`select` for ops whose fast paths take only ``fast_dtypes`` (and, where ``reference_only``
    says why, cannot run at all, e.g. forward-only kernels under autograd): then the automatic choice
    falls back to the reference, and a fast backend asked for (explicitly, or by a global set_backend:
    it must run where asked) raises."""
    b = backend
    if b is None and forced() in _OPS[op].impls:
        b = _forced
    why = reference_only or (None if x.dtype in fast_dtypes else f"takes fp32/fp16/bf16, got {x.dtype}")
    if why is not None:
        if b in (None, "auto"):
            b = "reference"
        elif b != "reference":
            raise BackendUnavailableError(f"backend {b!r} for op {op!r} {why}")
    return select(op, x.device, b)


def last_backend(op: str) -> str | None:
    """The backend that last ran the registry op named op ("guided_update", ...), None before its first call."""
    return _OPS[op].last


def set_backend(backend: str | None) -> None:
    """Force one backend for every op that has it (None or "auto" restores automatic choice): it must
    run where asked (else BackendUnavailableError); ops without that backend keep choosing automatically,
    so that e.g. forcing "cpp" does not break the per-expert norms, which have none."""
    global _forced
    if backend not in (None, "auto") and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")
    _forced = None if backend == "auto" else backend


def report(device: str | torch.device | None = None) -> dict:
    """Per op: which backends can run on `device` (or why not) and which ran last."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {}
    for name, entry in sorted(_OPS.items()):
        out[name] = {
            "available": {b: (why_unavailable(name, b, device) or "ok") for b in entry.impls},
            "last": entry.last,
        }
    return out
