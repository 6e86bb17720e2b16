"""lunatrain: reproducible LoRA adapter training for a personal assistant."""

__version__ = "0.1.0"
