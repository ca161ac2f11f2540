"""Timestep experts: LoRA layers, placements, the ExpertBank, checkpoints, ExpertAdamW (per-expert step counts)."""
from .bank import (ExpertBank, ExpertBatchNorm, ExpertGroupNorm, ExpertLayerNorm, RoutedBias, RoutedConv2d,
                   RoutedLinear, fold_batchnorm_)
from .checkpoint import (check_ppap_checkpoint_manifest, export_ppap_checkpoint, import_ppap_checkpoint,
                         load_experts, load_experts_into, save_experts)
from .lora import LAYOUTS, LoRAConv2d, LoRALinear
from .optim import ExpertAdamW
from .peft_export import export_peft
from .placement import RULES, Placement, make_placement

__all__ = [
    "ExpertBank", "RoutedLinear", "RoutedConv2d", "RoutedBias", "ExpertBatchNorm", "ExpertLayerNorm",
    "ExpertGroupNorm", "fold_batchnorm_", "LoRALinear", "LoRAConv2d", "LAYOUTS", "Placement", "RULES",
    "make_placement", "save_experts", "load_experts", "load_experts_into", "import_ppap_checkpoint",
    "export_ppap_checkpoint", "check_ppap_checkpoint_manifest", "export_peft", "ExpertAdamW",
]
