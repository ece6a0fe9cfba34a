"""Structural pruning of Llama-style decoders: group definitions, masks, and export of a
physically smaller checkpoint that `AutoModelForCausalLM.from_pretrained` loads after
`import atp` (the `atp_pruned_<family>` config and model classes are registered here)."""

from atp.structural.export import mask_structures, remove_structures
from atp.structural.groups import StructureMask, decoder_parameters, full_mask, layer_groups

__all__ = ["StructureMask", "decoder_parameters", "full_mask", "layer_groups", "mask_structures", "remove_structures"]
