"""Interop with other formats: Hugging Face directories (hf.py)."""
