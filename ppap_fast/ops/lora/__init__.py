"""Multi-expert LoRA / bias / norm ops for PPAP (reference first; fast paths added alongside)."""
from . import reference  # noqa: F401
