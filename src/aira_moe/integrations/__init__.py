"""Integrations with training frameworks (only llamafactory.py imports LLaMA-Factory)."""
