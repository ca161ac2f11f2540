"""Loading of the compiled extension and Triton, with the reason when absent."""
from __future__ import annotations

import os

import torch

_C = None
EXTENSION_ERROR: str | None = None
try:
    from ppap_fast import _C  # noqa: F401  registers torch.ops.ppap_fast.*
except Exception as exc:  # missing build, ABI mismatch with this torch, ...
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

if _C is not None:
    from ppap_fast.ops import _fake_kernels

    _fake_kernels.register()

TRITON_ERROR: str | None = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpp_unavailable(device: torch.device) -> str | None:
    if _C is None:
        return f"extension ppap_fast._C not loaded ({EXTENSION_ERROR})"
    if device.type != "cpu":
        return "the cpp path runs on CPU tensors only"
    return None


def cuda_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the cuda path runs on CUDA tensors only"
    if _C is None:
        return f"extension ppap_fast._C not loaded ({EXTENSION_ERROR})"
    if not _C.cuda_compiled():
        return "extension was built without CUDA (no nvcc or CPU-only torch at build time)"
    return None


def triton_unavailable(device: torch.device) -> str | None:
    if TRITON_ERROR is not None:
        return f"triton not importable ({TRITON_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return "Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU"


def reference_unavailable(device: torch.device) -> str | None:
    return None
