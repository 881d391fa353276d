"""Inference: sampling and KV-cached generation (generate.py)."""
