"""Data: text corpora -> token shards (`prepare_dataset`) -> packed batches (`PackedLoader`).

Names are imported on first use so that tokenizer worker processes never import torch.
"""
from __future__ import annotations

__all__ = ["PackedLoader", "prepare_dataset", "default_corpus", "iter_documents", "expand_paths"]


def __getattr__(name: str):
    if name == "PackedLoader":
        from velocis.data.loader import PackedLoader

        return PackedLoader
    if name == "prepare_dataset":
        from velocis.data.prepare import prepare_dataset

        return prepare_dataset
    if name in ("iter_documents", "expand_paths"):
        from velocis.data import sources

        return getattr(sources, name)
    if name == "default_corpus":
        import importlib

        return importlib.import_module("velocis.data.default_corpus")
    raise AttributeError(f"module 'velocis.data' has no attribute {name!r}")
