"""Export of aira_moe adapters to other formats (a standard LoRA adapter for multi-LoRA serving)."""

from .lora import export_lora, to_lora_adapter

__all__ = ["export_lora", "to_lora_adapter"]
