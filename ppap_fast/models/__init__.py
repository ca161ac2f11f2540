"""Denoiser models."""
from .adm import ADMUNet, adm_kwargs_from_flags

__all__ = ["ADMUNet", "adm_kwargs_from_flags"]
