"""LoRA-family adapter files (kohya/A1111, LyCORIS, diffusers, PEFT): module names, parsing, weight patches."""

from sumie.adapters.lora.file import LoraFile, LoraModule, LoraPatches, lora_info, parse_lora, read_lora
from sumie.adapters.lora.names import default_targets, kohya_name, lora_targets

__all__ = ["LoraFile", "LoraModule", "LoraPatches", "default_targets", "kohya_name", "lora_info", "lora_targets",
           "parse_lora", "read_lora"]
