"""ppap_fast: Practical Plug-and-Play guidance of diffusion models.

Submodules load lazily so that `import ppap_fast` works without the compiled
extension, Triton, or the optional model libraries.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "schedule", "sampling", "guidance", "experts", "models", "ops", "testing", "metrics",
    "distill", "finetune", "data", "cli", "demo", "integrations", "fast_sampling", "distributed",
    "guided_sample", "info", "progress", "score", "seeding", "seg_demo", "train_graph",
}
_EXPORTS = {
    "Schedule": "schedule",
    "ExpertBank": "experts",
    "ClassGuide": "guidance",
    "X0HatGuide": "guidance",
    "ComposedGuide": "guidance",
    "DenseRegressionGuide": "guidance",
    "SegmentationGuide": "guidance",
    "as_cond_fn": "guidance",
    "sample_loop": "sampling",
    "ddim_step": "sampling",
    "ddpm_step": "sampling",
    "FastGuidedSampler": "fast_sampling",
    "fast_sample_loop": "fast_sampling",
}
__all__ = sorted(_EXPORTS)  # `from ppap_fast import *` resolves these through __getattr__


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"ppap_fast.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ppap_fast.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ppap_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_EXPORTS))
