"""Adapters to other diffusion codebases. Each submodule imports its library lazily, so
``import ppap_fast.integrations`` (and its submodules) work without diffusers installed.

* :mod:`ppap_fast.integrations.diffusers`: ``PPAPGuidance`` (score correction for any
  eps / v / sample-prediction diffusers scheduler) and ``PPAPGuidedPipeline``.
* :mod:`ppap_fast.integrations.guided_diffusion`: ``as_cond_fn`` for guided-diffusion's samplers.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "PPAPGuidance": "diffusers",
    "PPAPGuidedPipeline": "diffusers",
    "as_cond_fn": "guided_diffusion",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"ppap_fast.integrations.{_LAZY[name]}"), name)
    if name in ("diffusers", "guided_diffusion"):
        return importlib.import_module(f"ppap_fast.integrations.{name}")
    raise AttributeError(f"module 'ppap_fast.integrations' has no attribute {name!r}")


__all__ = sorted(_LAZY)
