"""Bundled demo data (scikit-learn digits at 16x16) and sharded sample files."""
from .digits import (DigitsSplits, IMAGE_SIZE, INK_THRESHOLD, NUM_CLASSES, SEMANTIC_CLASSES, from_uint8, ink_mask,
                     load_digits_16, random_shift, semantic_mask, to_uint8, values_to_unit)
from .shards import (ShardSet, ShardWriter, load_shards, save_figure_atomic, save_safetensors_atomic, write_json_atomic,
                     write_npz_atomic)

__all__ = ["DigitsSplits", "IMAGE_SIZE", "INK_THRESHOLD", "NUM_CLASSES", "SEMANTIC_CLASSES", "ink_mask",
           "semantic_mask", "from_uint8", "load_digits_16", "random_shift", "to_uint8", "values_to_unit", "ShardSet",
           "ShardWriter", "load_shards", "write_npz_atomic", "write_json_atomic", "save_safetensors_atomic",
           "save_figure_atomic"]
