"""Denoiser models."""
from .adm import ADM_PRESETS, ADMUNet, adm_kwargs_from_flags

__all__ = ["ADMUNet", "ADM_PRESETS", "adm_kwargs_from_flags"]
