"""Timestep experts: LoRA layers, placements, the ExpertBank, checkpoints."""
from .bank import (ExpertBank, ExpertBatchNorm, ExpertGroupNorm, ExpertLayerNorm, RoutedBias, RoutedConv2d,
                   RoutedLinear, fold_batchnorm_)
from .lora import LAYOUTS, LoRAConv2d, LoRALinear
from .placement import RULES, Placement, make_placement

__all__ = [
    "ExpertBank", "RoutedLinear", "RoutedConv2d", "RoutedBias", "ExpertBatchNorm", "ExpertLayerNorm",
    "ExpertGroupNorm", "fold_batchnorm_", "LoRALinear", "LoRAConv2d", "LAYOUTS", "Placement", "RULES",
    "make_placement",
]
